"""``build-map train``: harvest activations of a model at a hookpoint and train a TopK SAE on them."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from build_map.cli.base import add_config_argument, common_options, config_from_args, count, source_list

if TYPE_CHECKING:
    from build_map.pipeline.training_run import TrainRun
    from build_map.sae.train_config import TrainConfig


def add(subparsers: argparse._SubParsersAction) -> None:
    from build_map.activations.harvest import HarvestConfig
    from build_map.lm.corpus import CorpusConfig
    from build_map.sae.train_config import TrainConfig

    parser = subparsers.add_parser(
        "train",
        parents=[common_options()],
        help="harvest activations and train a TopK SAE on them",
        description="Harvest residual-stream activations of a model at a hookpoint, train a TopK sparse "
        "autoencoder on them and save it (cfg.json + sae.safetensors + metrics.json).",
    )
    model = parser.add_argument_group("model and data")
    model.add_argument(
        "--model", default=None, help="HF id, local folder or .gguf (default: embedded SmolLM2)"
    )
    model.add_argument("--hookpoint", default=None, help="e.g. model.layers.15 or 15 (default: middle layer)")
    model.add_argument("--tokens", type=count, default=1_000_000, help="tokens to harvest (default: 1M)")
    model.add_argument("--corpus", type=source_list, default=CorpusConfig().sources, dest="sources",
                       help="comma-separated sources: chitchat, chatterbot, .jsonl or text files "
                       "(default: chitchat,chatterbot)")  # fmt: skip
    model.add_argument("--buffer", default=None, help="folder for the activation buffer (default: the cache)")
    add_config_argument(model, HarvestConfig, "compute_dtype", "--harvest-dtype")
    sae = parser.add_argument_group("SAE and training")
    add_config_argument(sae, TrainConfig, "n_latents", "--latents", type=count)
    add_config_argument(sae, TrainConfig, "k", "--k", "-k", type=count)
    add_config_argument(sae, TrainConfig, "lr", "--lr", type=float)
    add_config_argument(sae, TrainConfig, "batch_size", "--batch-size", type=count)
    add_config_argument(sae, TrainConfig, "epochs", "--epochs", type=count)
    add_config_argument(sae, TrainConfig, "aux_k", "--aux-k", type=count)
    add_config_argument(sae, TrainConfig, "dead_tokens", "--dead-tokens", type=count)
    add_config_argument(sae, TrainConfig, "holdout_fraction", "--holdout-fraction", type=float)
    add_config_argument(sae, TrainConfig, "seed", "--seed", type=int)
    add_config_argument(sae, TrainConfig, "device", "--device")
    parser.add_argument("--out", required=True, help="folder to save the SAE in")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from build_map.activations.harvest import HarvestConfig
    from build_map.lm.corpus import CorpusConfig, check_sources
    from build_map.pipeline.training_run import harvest_and_train
    from build_map.sae.train_config import TrainConfig

    # Build every config first: a bad setting fails now, not after a long harvest.
    cfg = config_from_args(TrainConfig, args)
    corpus = CorpusConfig(sources=args.sources, seed=args.seed)
    check_sources(corpus)
    harvest = config_from_args(HarvestConfig, args)
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the model-loading bars too
    trained = harvest_and_train(
        args.model, args.hookpoint, corpus, args.tokens, cfg, args.out,
        buffer=args.buffer, harvest=harvest, progress=not args.no_progress,
    )  # fmt: skip
    print(train_summary(trained, cfg))
    return 0


def train_summary(run: TrainRun, cfg: TrainConfig) -> str:
    """The lines `build-map train` prints: where the SAE went, its held-out quality, the time."""
    m = run.metrics
    dead = round(m.dead_fraction * cfg.n_latents)
    return "\n".join(
        [
            f"SAE saved to {run.folder}",
            f"  {run.hookpoint} · {cfg.n_latents:,} latents · k={cfg.k} · {m.tokens_seen:,} training tokens "
            f"({run.n_tokens:,} harvested in {run.buffer_folder})",
            f"  held-out ({m.heldout_tokens:,} tokens): FVU {m.fvu:.3f} · mean L0 {m.mean_l0:.1f} · "
            f"dead {m.dead_fraction:.1%} ({dead} latents)",
            f"  time: load {run.load_seconds:.0f} s · harvest {run.harvest_seconds:.0f} s · "
            f"train {run.train_seconds:.0f} s",
        ]
    )
