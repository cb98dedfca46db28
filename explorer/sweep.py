"""Strength sweep: how strongly a steered feature shows up, and when the text falls apart.

For every strength × prompt the steered model writes a greedy reply; all rows go through one
batched ``generate`` call with the engine's per-row steering. Then the *unsteered* model re-reads
each prompt + reply once, which gives both measures:

* ``effect``: the steered feature's mean SAE activation over the reply tokens at the hookpoint,
  in units of its max activation (1.0 = firing as strongly as it ever does in the corpus); the
  mean over the features of a multi-feature edit. Measured with steering off, it asks whether the
  *text* now carries the feature, not whether we pushed the residual (which is true by
  construction).
* ``coherence``: the mean log-probability per reply token under the unsteered model (nats; 0 is
  perfectly predictable). Steering too hard pushes the model off the text distribution it knows,
  and the unsteered model then finds the reply improbable; ``perplexity`` = exp(-coherence) is the
  same number as a familiar ratio. One blind spot: degenerate repetition ("the the the") is
  *probable* once it has started, so ``repetition`` (share of reply tokens that repeat an earlier
  reply token) is reported next to it.

Strengths multiply the edits: with ``--feature`` the edit is (feature, 1.0) so strength s adds
s × max_act × the decoder direction; with a recipe, strength s multiplies the recipe's multiplier
(1 = the recipe as saved). Strength 0 is always included (nudge: the unsteered reply; pin: the
feature switched off) and is the baseline of ``suggest_window``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from build_map.hooks import scoped_forward_hook
from explorer.recipes import Recipe
from explorer.steering import Edit, Prompt, SamplingConfig, SteeringEngine

logger = logging.getLogger(__name__)

DEFAULT_STRENGTHS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
DEFAULT_PROMPTS = (
    "Tell me about your day.",
    "What should I cook for dinner tonight?",
    "Write a short poem about the sea.",
    "How do I get better at learning new things?",
)
_LOGIT_BUDGET = 1 << 26  # floats of logits per re-read chunk (~256 MB in fp32)


class SweepError(ValueError):
    """A sweep request cannot run; the message names the value and what to do."""


@dataclass(frozen=True)
class WindowRule:
    """How ``suggest_window`` picks the useful strengths (means over prompts, vs strength 0)."""

    min_effect_rise: float = 0.05
    """The effect must rise by at least this much over strength 0 (units of max activation)."""
    relative_effect_rise: float = 0.2
    """... and by at least this share of the largest rise seen in the sweep."""
    max_coherence_drop: float = 1.0
    """Coherence may fall at most this many nats per token below strength 0 (perplexity × e)."""


# ---------------------------------------------------------------- the sweep


def sweep(
    session_or_engine: Any,
    features_or_recipe: int | Sequence[int] | Edit | Sequence[Edit] | Recipe,
    prompts: Sequence[Prompt],
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    max_new_tokens: int = 48,
    seed: int = 0,
    mode: str = "nudge",
    batch_rows: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per (strength, prompt): reply, effect, coherence, perplexity, repetition, n_tokens.

    ``session_or_engine``: an ``explorer.session.Session`` or a ``SteeringEngine`` (its model,
    tokenizer, SAE, hookpoint and scales are used). ``features_or_recipe``: feature id(s) (steered
    as ``mode`` with strength 1 each), Edit(s), or a Recipe (its edits and multiplier; its sampling
    is not used). ``batch_rows``: most rows per generate call (default: all in one; lower it where
    memory is short). Decoding is greedy; ``seed`` seeds torch for anything stochastic. Edits are
    checked by the engine (hidden features, bounds) before anything is generated."""
    engine = _engine_of(session_or_engine)
    edits, base = sweep_edits(features_or_recipe, mode)
    strengths = _with_zero(strengths)
    if not prompts:
        raise SweepError("no prompts: give at least one prompt to sweep over.")
    prompt_ids = [engine.prompt_ids(p) for p in prompts]
    for ids in prompt_ids:  # length, vocabulary and max_new_tokens, before any generation
        engine.validate([], ids, SamplingConfig(max_new_tokens=max_new_tokens))
    rows = [(s, p) for s in strengths for p in range(len(prompts))]
    row_edits = [[Edit(e.feature, e.strength * base * s, e.mode) for e in edits] for s, _ in rows]
    for strength in strengths:  # hidden features, bounds: refuse before any chunk is generated
        scaled = [Edit(e.feature, e.strength * base * strength, e.mode) for e in edits]
        engine.validate(scaled, prompt_ids[0], SamplingConfig(max_new_tokens=max_new_tokens))
    torch.manual_seed(seed)
    replies, finishes = generate_rows(
        engine, [prompt_ids[p] for _, p in rows], row_edits, max_new_tokens, batch_rows, progress
    )
    features = [e.feature for e in edits]
    effects, coherence = reread(engine, [prompt_ids[p] for _, p in rows], replies, features)
    frame = pd.DataFrame(
        {
            "strength": [float(s) for s, _ in rows],
            "prompt_index": [p for _, p in rows],
            "prompt": [_prompt_text(prompts[p]) for _, p in rows],
            "reply": [engine.decode(r) for r in replies],
            "n_tokens": [len(r) for r in replies],
            "finish": finishes,
            "effect": [float(np.mean(e)) if len(e) else math.nan for e in effects],
            "feature_effects": [list(map(float, e)) for e in effects],
            "coherence": coherence,
            "perplexity": np.exp(-np.asarray(coherence, dtype=float)),
            "repetition": [repetition(r) for r in replies],
        }
    )
    frame.attrs["sweep"] = {
        "features": features,
        "edits": [asdict(e) for e in edits],
        "base_multiplier": base,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "hookpoint": engine.hookpoint,
    }
    return frame


def sweep_edits(features_or_recipe: Any, mode: str = "nudge") -> tuple[list[Edit], float]:
    """The edits a sweep scales, and the multiplier strength 1 stands for."""
    if isinstance(features_or_recipe, Recipe):
        if not features_or_recipe.edits:
            raise SweepError("the recipe has no edits; there is nothing to sweep.")
        return list(features_or_recipe.edits), features_or_recipe.multiplier
    items = [features_or_recipe] if isinstance(features_or_recipe, (int, Edit)) else list(features_or_recipe)
    if not items:
        raise SweepError("no features: pass at least one feature id (or a recipe).")
    edits = [item if isinstance(item, Edit) else Edit(_feature_id(item), 1.0, mode) for item in items]
    return edits, 1.0


def generate_rows(
    engine: SteeringEngine,
    prompt_ids: Sequence[list[int]],
    row_edits: Sequence[Sequence[Edit]],
    max_new_tokens: int,
    batch_rows: int | None = None,
    progress: bool = False,
) -> tuple[list[list[int]], list[str]]:
    """Greedy replies (token ids, end of turn excluded) and finish reasons ("eos" / "length"), each
    row steered with its own edits through the engine's hook."""
    size = batch_rows or len(prompt_ids)
    replies: list[list[int]] = []
    finishes: list[str] = []
    for start in range(0, len(prompt_ids), size):
        chunk = slice(start, start + size)
        new = _generate_chunk(engine, prompt_ids[chunk], row_edits[chunk], max_new_tokens, progress)
        for tokens in new:
            end = next((i for i, t in enumerate(tokens) if t in engine.eos_ids), None)
            replies.append(tokens if end is None else tokens[:end])
            finishes.append("length" if end is None else "eos")
    return replies, finishes


def _generate_chunk(
    engine: SteeringEngine,
    prompt_ids: Sequence[list[int]],
    row_edits: Sequence[Sequence[Edit]],
    max_new_tokens: int,
    progress: bool,
) -> list[list[int]]:
    from transformers import GenerationConfig

    model = engine.model
    ids, mask = _left_pad(prompt_ids, engine.pad_id)
    device = model.get_input_embeddings().weight.device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        eos_token_id=engine.eos_ids or None, pad_token_id=engine.pad_id,
    )  # fmt: skip
    streamer = _StepProgress(max_new_tokens, f"sweep: {len(prompt_ids)} rows") if progress else None
    try:
        with engine.steered(row_edits), torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                streamer=streamer,
            )  # fmt: skip
    finally:
        if streamer is not None:
            streamer.close()
    return out[:, ids.shape[1] :].tolist()


def reread(
    engine: SteeringEngine,
    prompt_ids: Sequence[list[int]],
    replies: Sequence[list[int]],
    features: Sequence[int],
) -> tuple[list[np.ndarray], list[float]]:
    """Unsteered re-read of prompt + reply: per row, each feature's mean activation over the reply
    tokens / its max activation, and the mean log-probability of the reply tokens (NaN if empty).
    Identical rows are read once (low strengths often leave the reply unchanged)."""
    keys = [(tuple(p), tuple(r)) for p, r in zip(prompt_ids, replies, strict=True)]
    unique = list(dict.fromkeys(keys))
    vocab = int(engine.model.config.vocab_size)
    longest = max(1, max(len(r) for _, r in unique))
    size = max(1, _LOGIT_BUDGET // (longest * vocab))
    measured: dict[tuple, tuple[np.ndarray, float]] = {}
    for start in range(0, len(unique), size):
        chunk = unique[start : start + size]
        effects, coherence = _reread_chunk(engine, [p for p, _ in chunk], [r for _, r in chunk], features)
        measured.update(zip(chunk, zip(effects, coherence, strict=True), strict=True))
    return [measured[k][0] for k in keys], [measured[k][1] for k in keys]


def _reread_chunk(
    engine: SteeringEngine,
    prompt_ids: Sequence[list[int]],
    replies: Sequence[list[int]],
    features: Sequence[int],
) -> tuple[list[np.ndarray], list[float]]:
    """One forward of rows laid out as [left pad | prompt | reply | right pad], so every reply
    starts at the same column and logits are computed for reply positions only."""
    sae = engine.sae
    width, longest = max(len(p) for p in prompt_ids), max(1, max(len(r) for r in replies))
    ids = torch.full((len(replies), width + longest), engine.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, reply) in enumerate(zip(prompt_ids, replies, strict=True)):
        span = slice(width - len(prompt), width + len(reply))
        ids[row, span] = torch.tensor(list(prompt) + list(reply), dtype=torch.long)
        mask[row, span] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as if unpadded, like generate does
    keep = torch.arange(width - 1, width + longest - 1)  # the logits that predict reply tokens
    hidden, logits = _forward_with_capture(engine, ids, mask, position_ids, keep)
    index = torch.tensor(list(features), device=sae.W_enc.device)
    scale = engine.feature_scale[index.cpu()].numpy()
    effects, coherence = [], []
    for row, reply in enumerate(replies):
        n = len(reply)
        if n == 0:
            effects.append(np.full(len(features), math.nan))
            coherence.append(math.nan)
            continue
        with torch.inference_mode():
            acts = sae.encode(hidden[row, width : width + n].to(sae.W_enc.device))[:, index].float()  # (n, F)
            logprobs = logits[row, :n].float().log_softmax(-1)
            target = torch.tensor(reply, device=logprobs.device)
            token_logprob = logprobs.gather(-1, target[:, None]).squeeze(-1)
        effects.append(acts.mean(0).cpu().numpy() / scale)
        coherence.append(float(token_logprob.mean()))
    return effects, coherence


def _forward_with_capture(
    engine: SteeringEngine,
    ids: torch.Tensor,
    mask: torch.Tensor,
    position_ids: torch.Tensor,
    keep: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hookpoint output (rows, seq, d_model), logits at ``keep`` (rows, len(keep), vocab)), unsteered."""
    model = engine.model
    device = model.get_input_embeddings().weight.device
    captured: list[torch.Tensor] = []

    def capture(_module: Any, _args: Any, out: Any) -> None:
        captured.append(out[0] if isinstance(out, tuple) else out)

    supported = getattr(model, "_supports_logits_to_keep", lambda: False)()
    extra = {"logits_to_keep": keep.to(device)} if supported else {}
    with scoped_forward_hook(model.get_submodule(engine.hookpoint), capture), torch.inference_mode():
        logits = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
            use_cache=False, **extra,
        ).logits  # fmt: skip
    return captured[0], logits if supported else logits[:, keep.to(logits.device)]


def repetition(tokens: Sequence[int]) -> float:
    """Share of tokens that repeat an earlier token of the same reply (0 = all distinct)."""
    return 1.0 - len(set(tokens)) / len(tokens) if tokens else math.nan


# ---------------------------------------------------------------- the window


def sweep_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean effect, coherence, perplexity and repetition per strength (over prompts)."""
    columns = ["effect", "coherence", "repetition", "n_tokens"]
    summary = frame.groupby("strength")[columns].mean()
    summary["perplexity"] = np.exp(-summary["coherence"])
    return summary.sort_index()


def suggest_window(frame: pd.DataFrame, rule: WindowRule | None = None) -> tuple[float, float] | None:
    """The range of positive strengths worth using, or None when no strength qualifies.

    Rule (on means over prompts, against strength 0): walking up the positive strengths, a
    strength qualifies when its effect rose by at least ``max(min_effect_rise,
    relative_effect_rise × largest rise)`` and its coherence is within ``max_coherence_drop`` nats
    per token of strength 0. The window is the first run of qualifying strengths; it ends at the
    first strength whose coherence collapsed (nothing above it counts) or whose effect fell back."""
    rule = rule or WindowRule()
    summary = sweep_summary(frame)
    if 0.0 not in summary.index:
        raise SweepError("the sweep has no strength 0 to compare with; include 0 in the strengths.")
    base = summary.loc[0.0]
    positive = summary[summary.index > 0]
    rise = positive["effect"] - base["effect"]
    needed = max(rule.min_effect_rise, rule.relative_effect_rise * float(rise.max(skipna=True) or 0.0))
    window: list[float] = []
    for strength, row in positive.iterrows():
        if not row["coherence"] >= base["coherence"] - rule.max_coherence_drop:  # NaN counts as collapsed
            break
        if row["effect"] - base["effect"] >= needed:
            window.append(float(strength))
        elif window:
            break
    return (window[0], window[-1]) if window else None


# ---------------------------------------------------------------- plots


def plot_sweep(
    frame: pd.DataFrame,
    out_png: str | Path | None,
    out_html: str | Path | None,
    window: tuple[float, float] | None = None,
    title: str = "Strength sweep",
) -> None:
    """Effect and coherence vs strength (means as lines, prompts as dots), the window shaded; a
    PNG (matplotlib) and an offline interactive HTML page (Bokeh, resources inlined)."""
    if window is None:
        window = suggest_window(frame)
    if out_png is not None:
        _plot_png(frame, Path(out_png), window, title)
    if out_html is not None:
        _plot_html(frame, Path(out_html), window, title)


def _plot_png(frame: pd.DataFrame, path: Path, window: tuple[float, float] | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    summary = sweep_summary(frame)
    figure = Figure(figsize=(7, 4.4), dpi=120)
    ax = figure.subplots()
    right = ax.twinx()
    if window is not None:
        ax.axvspan(window[0], window[1], color="#2ca02c", alpha=0.15, label="suggested window")
    ax.scatter(frame["strength"], frame["effect"], s=10, color="#1f77b4", alpha=0.35)
    ax.plot(summary.index, summary["effect"], "-o", color="#1f77b4", label="effect (× max act)")
    right.scatter(frame["strength"], frame["coherence"], s=10, color="#d62728", alpha=0.35)
    right.plot(summary.index, summary["coherence"], "-s", color="#d62728", label="coherence (nats/token)")
    ax.set_xlabel("strength (× max activation)")
    ax.set_ylabel("effect: re-read activation / max act", color="#1f77b4")
    right.set_ylabel("coherence: mean log p per token", color="#d62728")
    ax.set_title(title)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False
    )
    figure.tight_layout()
    figure.savefig(path)


def _plot_html(frame: pd.DataFrame, path: Path, window: tuple[float, float] | None, title: str) -> None:
    from bokeh.embed import file_html
    from bokeh.models import BoxAnnotation, ColumnDataSource, HoverTool, LinearAxis, Range1d
    from bokeh.plotting import figure
    from bokeh.resources import INLINE

    summary = sweep_summary(frame).reset_index()
    rows = ColumnDataSource(
        {
            "strength": frame["strength"].to_numpy(),
            "effect": frame["effect"].to_numpy(),
            "coherence": frame["coherence"].to_numpy(),
            "perplexity": frame["perplexity"].to_numpy(),
            "prompt": frame["prompt"].map(_short).to_list(),  # Bokeh escapes @field values
            "reply": frame["reply"].map(_short).to_list(),
        }
    )
    plot = figure(title=title, width=820, height=420, x_axis_label="strength (× max activation)",
                  y_axis_label="effect (re-read activation / max act)", tools="pan,wheel_zoom,box_zoom,reset,save")  # fmt: skip
    plot.extra_y_ranges = {"coherence": Range1d(*_padded_range(frame["coherence"]))}
    plot.add_layout(
        LinearAxis(y_range_name="coherence", axis_label="coherence (mean log p per token)"), "right"
    )
    if window is not None:
        plot.add_layout(BoxAnnotation(left=window[0], right=window[1], fill_color="#2ca02c", fill_alpha=0.15))
    plot.line(summary["strength"], summary["effect"], color="#1f77b4", line_width=2, legend_label="effect")
    plot.line(summary["strength"], summary["coherence"], color="#d62728", line_width=2,
              y_range_name="coherence", legend_label="coherence")  # fmt: skip
    dots = [
        plot.scatter("strength", "effect", source=rows, size=7, color="#1f77b4", alpha=0.5),
        plot.scatter("strength", "coherence", source=rows, size=7, color="#d62728", alpha=0.5,
                     marker="square", y_range_name="coherence"),
    ]  # fmt: skip
    plot.add_tools(
        HoverTool(
            renderers=dots,
            tooltips=[
                ("strength", "@strength"), ("effect", "@effect{0.000}"), ("coherence", "@coherence{0.00}"),
                ("perplexity", "@perplexity{0.0}"), ("prompt", "@prompt"), ("reply", "@reply"),
            ],
        )
    )  # fmt: skip
    plot.legend.location = "top_left"
    path.write_text(file_html(plot, resources=INLINE, title=title), encoding="utf-8")  # escapes the title


def _padded_range(values: pd.Series) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.empty:
        return -1.0, 0.0
    lo, hi = float(finite.min()), float(finite.max())
    pad = max(0.05 * (hi - lo), 0.1)
    return lo - pad, hi + pad


def _short(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------- command line


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``build-map sweep`` (the caller sets ``run=run_sweep``)."""
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
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, ...")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto (bf16 on CUDA and on CPUs with native bf16, else fp32), float32, ...",
    )
    parser.add_argument(
        "--model", default=None, help="model instead of the manifest's (HF id, folder, .gguf)"
    )
    parser.add_argument("--sae", default=None, help="SAE instead of the manifest's")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_sweep(args: argparse.Namespace) -> int:
    from explorer.recipes import load_recipe
    from explorer.session import open_bundle

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(args.prompts) if args.prompts else list(DEFAULT_PROMPTS)
    with open_bundle(args.bundle, device=args.device, model=args.model, sae=args.sae, dtype=args.dtype) as s:
        target = load_recipe(args.recipe, s.bundle) if args.recipe else args.features
        frame = s.sweep(target, prompts, args.strengths, max_new_tokens=args.max_new_tokens, seed=args.seed,
                        mode=args.mode, batch_rows=args.batch_rows, progress=not args.no_progress)  # fmt: skip
        title = _title(s.bundle, frame.attrs["sweep"]["features"])
    window = suggest_window(frame)
    frame.to_parquet(out / "sweep.parquet", index=False)
    plot_sweep(frame, out / "sweep.png", out / "sweep.html", window=window, title=title)
    meta = {**frame.attrs["sweep"], "strengths": sorted(set(frame["strength"])), "prompts": prompts,
            "window": window, "rule": asdict(WindowRule())}  # fmt: skip
    (out / "sweep.json").write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    print(sweep_summary(frame).to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"suggested window: {_window_text(window)}")
    print(f"wrote {out / 'sweep.parquet'}, sweep.png, sweep.html, sweep.json")
    return 0


def run_sweep_cli(argv: list[str] | None = None) -> int:
    """``python -m explorer.sweep BUNDLE ...`` (the same as ``build-map sweep``)."""
    parser = argparse.ArgumentParser(prog="build-map sweep", description=__doc__.split("\n\n")[0])
    add_sweep_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_sweep(args)
    except ValueError as exc:
        if not type(exc).__module__.startswith(("build_map", "explorer")):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


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


# ---------------------------------------------------------------- helpers


class _StepProgress:
    """A generate streamer that only counts decoding steps into a tqdm bar."""

    def __init__(self, total: int, description: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=description, unit="step")
        self.prompt_seen = False

    def put(self, _value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.bar.update(1)
        self.prompt_seen = True

    def end(self) -> None:
        pass

    def close(self) -> None:
        self.bar.close()


def _engine_of(session_or_engine: Any) -> SteeringEngine:
    engine = getattr(session_or_engine, "engine", session_or_engine)
    if not isinstance(engine, SteeringEngine):
        raise SweepError(
            f"expected a Session or a SteeringEngine, got {type(session_or_engine).__name__}; "
            "open one with explorer.session.open_bundle(BUNDLE)."
        )
    return engine


def _with_zero(strengths: Sequence[float]) -> list[float]:
    values = sorted({float(s) for s in strengths})
    if not values or not all(math.isfinite(v) for v in values):
        raise SweepError(f"strengths {list(strengths)!r}: give at least one finite number.")
    if 0.0 not in values:
        logger.info("adding strength 0 (the baseline) to the sweep")
        values = sorted([0.0, *values])
    return values


def _feature_id(item: Any) -> int:
    if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
        raise SweepError(f"{item!r} is not a feature id; pass whole numbers, Edits or a Recipe.")
    return int(item)


def _left_pad(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
        mask[row, width - len(sequence) :] = 1
    return ids, mask


def _prompt_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, torch.Tensor) or all(isinstance(t, int) for t in prompt):
        return json.dumps(
            [int(t) for t in (prompt.flatten().tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        )
    return json.dumps(list(prompt), ensure_ascii=False)


def _title(bundle: Any, features: Sequence[int]) -> str:
    labels = bundle.features["label"]
    named = [f"{f}: {labels.iloc[f]}" for f in features[:3]]
    more = f" (+{len(features) - 3} more)" if len(features) > 3 else ""
    return f"Strength sweep — {'; '.join(named)}{more}"


def _window_text(window: tuple[float, float] | None) -> str:
    if window is None:
        return "none (no strength raised the effect before coherence collapsed; try other strengths)"
    return f"{window[0]:g} to {window[1]:g} (× max activation)"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(run_sweep_cli())
