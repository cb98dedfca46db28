"""Shared fixtures, for every test below this folder: a tiny chat tokenizer and a tiny Llama, built
in-process (no network, no files; the builders are in ``tests/support/tiny.py``).

- ``tiny_tokenizer`` (session): ``make_tiny_tokenizer()``, a byte-level BPE with a ChatML template.
- ``tiny_model`` (session): ``make_tiny_model(tiny_tokenizer)``, a seeded 2-layer Llama in eval mode.
  Shared by every test: do not change its weights or leave hooks on it; ``make_tiny_model(tokenizer,
  seed=...)`` builds a private one.
- ``tiny_loaded`` (session): the two wrapped as ``build_map.lm.models.LoadedModel`` (CPU, float32).
- ``embedded`` (session): the real embedded default (SmolLM2-135M-Instruct), for ``@pytest.mark.slow``
  tests only.

Every test not marked ``slow`` runs with one torch thread (autouse ``_single_thread``): tiny ops gain
nothing from more, and OpenMP's spin-waiting makes them 10-100× slower when other jobs share the CPUs.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from build_map.lm.models import LoadedModel
from tests.support.tiny import make_tiny_model, make_tiny_tokenizer


@pytest.fixture(autouse=True)
def _single_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return make_tiny_model(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast) -> LoadedModel:
    return LoadedModel(tiny_model, tiny_tokenizer, "tiny-llama", torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def embedded() -> LoadedModel:
    """SmolLM2-135M-Instruct, the embedded default (CPU, float32); slow tests only."""
    from build_map.lm.models import load_model

    return load_model(device="cpu")


@pytest.fixture(scope="module")
def planted():
    """A planted decoder (six groups of 50 rows), its groups and its 2-D projection."""
    from build_map.geometry.config import ProjectConfig
    from build_map.geometry.projection import project_directions
    from tests.support.planted import planted_decoder

    directions, groups = planted_decoder()
    xy = project_directions(directions, ProjectConfig(seed=0))
    return directions, groups, xy


@pytest.fixture
def label_tables():
    """(features, examples) of ten features for the label tests (``tests/support/label_tables.py``)."""
    from tests.support.label_tables import label_tables

    return label_tables()


@pytest.fixture(scope="module")
def tiny_bundle_dir(tmp_path_factory):
    """A fresh tiny bundle on disk (``tests/support/tiny_bundle.py``; its map is a placeholder),
    one per test module."""
    from tests.support.tiny_bundle import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("tiny-bundle"), real_map=False)


@pytest.fixture(scope="module")
def tiny_session(tiny_bundle_dir):
    """``open_bundle`` on the module's tiny bundle."""
    from build_map.steering.session import open_bundle

    with open_bundle(tiny_bundle_dir, device="cpu") as session:
        yield session


@pytest.fixture(scope="module")
def explorer_shared(tiny_bundle_dir):
    """The explorer's shared state (bundle, model, SAE, engine) over the module's tiny bundle."""
    import argparse

    from explorer.cli import load_shared

    args = argparse.Namespace(bundle=str(tiny_bundle_dir), model=None, sae=None, device="cpu", dtype="auto")
    state = load_shared(args)
    yield state
    state.engine.close()


@pytest.fixture
def tiny_bundle(tiny_session):
    return tiny_session.bundle
