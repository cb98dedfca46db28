"""``build-map sweep BUNDLE``: effect and coherence of a feature (or a recipe) across strengths."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from build_map.cli.base import add_bundle_model_options, common_options
from build_map.steering.requests import Prompt
from build_map.steering.sweep_window import SweepError


def add(subparsers: argparse._SubParsersAction) -> None:
    from build_map.steering.sweep import DEFAULT_STRENGTHS

    parser = subparsers.add_parser(
        "sweep", parents=[common_options()], help="strength sweep: effect and coherence vs steering strength",
        description="Generate at a range of strengths for a feature (or a recipe) and a prompt set; measure the "
        "feature's effect and the reply's coherence under the unsteered model; write Parquet, PNG and HTML.",
    )  # fmt: skip
    parser.add_argument("bundle", help="bundle folder (its manifest names the model and SAE)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--feature", type=int, action="append", dest="features", metavar="ID",
                      help="feature to steer (repeat for several, steered together)")  # fmt: skip
    what.add_argument("--recipe", help="recipe JSON file whose edits are scaled by the strengths")
    parser.add_argument("--mode", choices=("nudge", "pin"), default="nudge", help="mode of --feature edits")
    parser.add_argument("--prompts", nargs="+", default=None, metavar="FILE_OR_TEXT",
                        help="prompts: text, or files (.json list, else one prompt per line); "
                        "default: four everyday prompts")  # fmt: skip
    parser.add_argument("--strengths", type=parse_strengths, default=DEFAULT_STRENGTHS,
                        help="comma-separated strengths (× max activation); 'a,b,...,c' steps from a "
                        "by b-a up to c (default: 0,0.25,0.5,1,1.5,2,3,4)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=48, help="reply length (default: 48)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed (decoding is greedy; default 0)")
    parser.add_argument(
        "--batch-rows", type=int, default=None, help="most rows per generate call (default: all)"
    )
    parser.add_argument(
        "--out", required=True, help="folder for sweep.parquet, sweep.png, sweep.html, sweep.json"
    )
    parser.add_argument("--steer-prompt", action="store_true",
                        help="steer the prompt's positions too (default: only the positions that write the reply)")  # fmt: skip
    parser.add_argument("--steer-special-tokens", action="store_true",
                        help="with --steer-prompt, also steer the chat template's special tokens")  # fmt: skip
    add_bundle_model_options(parser)
    parser.add_argument("--backend", default="hf", choices=("hf", "eager", "vllm"),
                        help="who generates the sweep's replies: hf (one batched generate, the default), "
                        "eager or vllm (interp-engine, one request per row); re-reading stays on hf")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from build_map.steering.recipes import load_recipe
    from build_map.steering.requests import SteeringScope
    from build_map.steering.session import open_bundle
    from build_map.steering.sweep import DEFAULT_PROMPTS
    from build_map.steering.sweep_plots import plot_sweep
    from build_map.steering.sweep_window import (
        SweepError,
        WindowRule,
        suggest_window,
        sweep_summary,
        window_text,
    )

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SweepError(
            f"--out {out} is a file; the sweep writes a folder (sweep.parquet, …): choose another path."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SweepError(
            f"--out {out} cannot be made ({exc.strerror or exc}); choose a folder you can write to."
        ) from exc
    prompts = read_prompts(args.prompts) if args.prompts else list(DEFAULT_PROMPTS)
    with open_bundle(args.bundle, device=args.device, model=args.model, sae=args.sae, dtype=args.dtype,
                     backend=args.backend) as s:  # fmt: skip
        target = load_recipe(args.recipe, s.bundle) if args.recipe else args.features
        frame = s.sweep(target, prompts, args.strengths, max_new_tokens=args.max_new_tokens, seed=args.seed,
                        mode=args.mode, batch_rows=args.batch_rows, progress=not args.no_progress,
                        scope=SteeringScope(args.steer_prompt, args.steer_special_tokens))  # fmt: skip
        title = _title(s.bundle, frame.attrs["sweep"]["features"])
    window = suggest_window(frame)
    frame.to_parquet(out / "sweep.parquet", index=False)
    plot_sweep(frame, out / "sweep.png", out / "sweep.html", window=window, title=title)
    meta = {**frame.attrs["sweep"], "strengths": sorted(set(frame["strength"])), "prompts": prompts,
            "window": window, "rule": asdict(WindowRule())}  # fmt: skip
    (out / "sweep.json").write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    print(sweep_summary(frame).to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"suggested window: {window_text(window)}")
    print(f"wrote {out / 'sweep.parquet'}, sweep.png, sweep.html, sweep.json")
    return 0


def parse_strengths(text: str) -> tuple[float, ...]:
    """``0,0.5,2`` or ``0,0.25,...,4`` (an arithmetic progression from the first two to the last)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if "..." in parts:
            i = parts.index("...")
            if i < 2 or i != len(parts) - 2:
                raise ValueError
            head, last = [float(p) for p in parts[:i]], float(parts[-1])
            step = head[-1] - head[-2]
            if step <= 0 or last < head[-1]:
                raise ValueError
            count = int(math.floor((last - head[-1]) / step + 1e-9))
            values = head + [head[-1] + step * (j + 1) for j in range(count)]
            values += [] if math.isclose(values[-1], last) else [last]
        else:
            values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give comma-separated numbers, e.g. 0,0.5,1,2 or 0,0.25,...,4"
        ) from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one finite strength")
    return tuple(round(v, 10) for v in values)


def read_prompts(items: Iterable[str]) -> list[Prompt]:
    """Prompts from text or files: a .json file holds a list (strings or chat message lists),
    any other file one prompt per non-empty line."""
    prompts: list[Prompt] = []
    for item in items:
        path = Path(item).expanduser()
        if not path.is_file():
            prompts.append(item)
        elif path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise SweepError(f"{path}: a prompts .json file holds a list of strings or message lists.")
            prompts += data
        else:
            prompts += [
                line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
            ]
    if not prompts:
        raise SweepError("the prompt files hold no prompts.")
    return prompts


def _title(bundle: Any, features: Sequence[int]) -> str:
    labels = bundle.features["label"]
    named = [f"{f}: {labels.iloc[f]}" for f in features[:3]]
    more = f" (+{len(features) - 3} more)" if len(features) > 3 else ""
    return f"Strength sweep — {'; '.join(named)}{more}"
