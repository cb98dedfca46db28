"""A Python API for scripts and notebooks: a bundle with its model, SAE and steering engine.

    from build_map.steering.session import open_bundle
    with open_bundle("bundle/") as s:
        s.apply_recipe("calm.recipe.json")
        print(s.generate("Tell me about your weekend."))
        for piece in s.stream([{"role": "user", "content": "Hi!"}], edits=[Edit(12, 2.0)]):
            print(piece, end="")

Loading follows the explorer (``explore BUNDLE``): the manifest names the model, hookpoint and SAE;
``model``/``sae`` override them, and an SAE other than the bundle's is refused unless passed
explicitly. ``load_parts`` is that loading without a session, for the explorer and CLIs to share.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from build_map.bundle import sources
from build_map.bundle.read import Bundle, load_bundle
from build_map.lm.hookpoints import d_model, normalize_hookpoint
from build_map.lm.models import LoadedModel, load_model
from build_map.sae.formats import load_sae
from build_map.sae.model import SparseAutoencoder, check_matches_model
from build_map.steering.engine import SteeringEngine
from build_map.steering.recipes import Recipe, check_recipe, load_recipe, make_recipe
from build_map.steering.requests import Edit, Prompt, SamplingConfig, SteeringError, SteeringLimits

logger = logging.getLogger(__name__)


def load_parts(
    bundle: Bundle,
    device: str = "auto",
    dtype: str = "auto",
    model: str | LoadedModel | None = None,
    sae: str | Path | SparseAutoencoder | None = None,
) -> tuple[LoadedModel, SparseAutoencoder, str]:
    """The bundle's model, SAE and normalized hookpoint (``model``/``sae`` override the manifest)."""
    hookpoint = sources.hookpoint(bundle)
    if not isinstance(sae, SparseAutoencoder):  # check the hash before the slow model load
        path = sources.sae_path(bundle, None if sae is None else str(sae))
        sources.check_sae_hash(bundle, path, explicit=sae is not None)
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(sources.model_spec(bundle, model), device, dtype)
    )
    hookpoint = normalize_hookpoint(loaded.model, hookpoint)
    if isinstance(sae, SparseAutoencoder):
        check_matches_model(sae, d_model(loaded.model), hookpoint)
        sae = sae.to(loaded.device)
    else:
        sae = load_sae(path, device=loaded.device, d_model=d_model(loaded.model), hookpoint=hookpoint)
    if sae.d_sae != bundle.n_features:
        raise sources.BundleSourceError(
            f"The SAE has {sae.d_sae} features but the bundle describes {bundle.n_features}; "
            "pass the SAE this bundle was built from."
        )
    return loaded, sae, hookpoint


def make_engine(
    bundle: Bundle, loaded: LoadedModel, sae: SparseAutoencoder, hookpoint: str, **kwargs: Any
) -> SteeringEngine:
    """A steering engine with the bundle's max activations as scales and its hidden features."""
    features = bundle.features
    return SteeringEngine(
        loaded.model, loaded.tokenizer, sae, hookpoint,
        feature_scale=features["max_act"].to_numpy(dtype="float32"),
        hidden=features["hidden"].to_numpy(dtype=bool), **kwargs,
    )  # fmt: skip


@dataclass
class Session:
    """Bundle + model + SAE + engine. Generation uses the applied recipe unless told otherwise."""

    bundle: Bundle
    loaded: LoadedModel
    sae: SparseAutoencoder
    engine: SteeringEngine
    hookpoint: str
    edits: tuple[Edit, ...] = ()
    """Edits used when ``generate``/``stream`` get none (set by ``apply_recipe``)."""
    multiplier: float = 1.0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    def apply_recipe(self, recipe: Recipe | dict | str | Path) -> Recipe:
        """Use a recipe's edits, multiplier and sampling from now on (checked against the bundle)."""
        if isinstance(recipe, Recipe):
            check_recipe(recipe, self.bundle, self.engine.limits)
        else:
            recipe = load_recipe(recipe, self.bundle, self.engine.limits)
        self.edits, self.multiplier, self.sampling = recipe.edits, recipe.multiplier, recipe.sampling
        return recipe

    def recipe(self) -> dict:
        """The current edits and sampling as a recipe dict (for ``save_recipe``)."""
        return make_recipe(self.bundle, self.edits, self.multiplier, self.sampling)

    def generate(
        self,
        messages_or_prompt: Prompt,
        edits: Sequence[Edit] | None = None,
        sampling: SamplingConfig | None = None,
        multiplier: float | None = None,
    ) -> str:
        """The reply to chat messages, a user message (str) or token ids."""
        return "".join(self.stream(messages_or_prompt, edits, sampling, multiplier))

    def stream(
        self,
        messages_or_prompt: Prompt,
        edits: Sequence[Edit] | None = None,
        sampling: SamplingConfig | None = None,
        multiplier: float | None = None,
    ) -> Iterator[str]:
        """The reply as text pieces while it is generated."""
        return iter(
            self.engine.stream(
                messages_or_prompt,
                self.edits if edits is None else tuple(edits),
                self.sampling if sampling is None else sampling,
                self.multiplier if multiplier is None else multiplier,
            )
        )

    def sweep(self, features_or_recipe: Any, prompts: Sequence[Prompt], strengths: Sequence[float], **kwargs):
        """``build_map.steering.sweep.sweep`` on this session (see there)."""
        from build_map.steering.sweep import sweep

        return sweep(self, features_or_recipe, prompts, strengths, **kwargs)

    def attribute(
        self,
        messages_or_ids: Prompt,
        position: int = -1,
        edits: Sequence[Edit] = (),
        multiplier: float = 1.0,
        **kwargs: Any,
    ):
        """``build_map.steering.attribution.attribute_token`` on this session's model and SAE, hidden features
        left out (see there). Chat messages / str are templated as for generation (so position -1
        explains the reply's first token); with ``edits`` the steered model is explained."""
        from build_map.steering.attribution import attribute_with_engine

        ids = torch.tensor([self.engine.prompt_ids(messages_or_ids)])
        kwargs.setdefault("hidden", self.bundle.features["hidden"].to_numpy(bool))
        return attribute_with_engine(self.engine, ids, position, edits, multiplier, **kwargs)

    def close(self) -> None:
        """Finish running requests and remove the engine's hook from the model."""
        self.engine.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_bundle(
    path: str | Path,
    device: str = "auto",
    model: str | LoadedModel | None = None,
    sae: str | Path | SparseAutoencoder | None = None,
    dtype: str = "auto",
    limits: SteeringLimits | None = None,
    backend: str = "hf",
    tensor_parallel_size: int = 1,
) -> Session:
    """Load a bundle with its model, SAE and a steering engine.

    ``model``: HF id, folder, .gguf or an already loaded ``LoadedModel`` (default: the manifest's).
    ``sae``: a path or a ``SparseAutoencoder`` (default: the manifest's, checked by sha256).
    ``backend``: who generates (``interp_backend``): ``hf`` (this engine), ``eager`` or ``vllm``
    (interp-engine; the hf model stays loaded for re-reading replies, attribution and sweeps)."""
    bundle = load_bundle(path)
    loaded, sae_module, hookpoint = load_parts(bundle, device, dtype, model, sae)
    generator = backend_generator(bundle, loaded, backend, model, tensor_parallel_size)
    engine = make_engine(bundle, loaded, sae_module, hookpoint, limits=limits, generator=generator)
    return Session(bundle, loaded, sae_module, engine, hookpoint)


def backend_generator(
    bundle: Bundle, loaded: LoadedModel, backend: str, model: Any = None, tensor_parallel_size: int = 1
):
    """None for ``hf``; else interp-engine's generator on the same model (its folder or id)."""
    from build_map.steering.interp_backend import BACKENDS, load_generator

    if backend == "hf":
        return None
    if backend not in BACKENDS:
        raise SteeringError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}.")
    from build_map.lm.models import model_folder

    spec = model if isinstance(model, str) else sources.model_spec(bundle, None)
    return load_generator(model_folder(spec), backend, str(loaded.device.type), tensor_parallel_size)
