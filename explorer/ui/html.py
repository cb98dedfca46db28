"""The explorer's HTML: feature cards, feature links and chips, reply tokens, notices.

Every string that came from the bundle, the model or the user (labels, cluster names, tokens,
examples, messages) is untrusted: it is escaped here, at the one place it becomes HTML. Elements
carrying ``data-feature="N"`` select feature N when clicked (``LinkedHTML``), ``data-token="i"``
picks a reply token (``TokenPicker``).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from build_map.bundle.read import Bundle
from build_map.common.assets import asset_text
from build_map.features.probe_config import CLEAR_STEERABILITY
from build_map.steering.click import click_strength, is_calibrated
from build_map.steering.requests import DEFAULT_STRENGTH

N_TOP_EXAMPLES = 5
"""Examples from the "top" bucket shown on a card."""
N_QUANTILE_EXAMPLES = 1
"""Examples shown from each lower activation-quantile bucket (how the feature looks when weak)."""
N_NEIGHBOURS = 8
N_LOGIT_TOKENS = 10
CONTEXT_TOKENS = 24
"""Tokens shown on each side of an example's focus (most active) token."""
HIGHLIGHT_RGB = "255, 140, 0"

CSS = asset_text("explorer.css")


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def show_token(token: str) -> str:
    """A token as readable, escaped text: whitespace made visible where it would vanish."""
    shown = str(token).replace("\n", "⏎").replace("\t", "⇥")
    return esc(shown)


def feature_name(bundle: Bundle, feature: int) -> str:
    """``#12 label`` for a visible feature; hidden features never show their label."""
    row = bundle.features.iloc[feature]
    if bool(row["hidden"]):
        return f"#{feature} (hidden)"
    label = str(row["label"] or "").strip()
    return f"#{feature} {label}" if label else f"#{feature}"


def feature_link(bundle: Bundle, feature: int, css_class: str = "feature-link", extra: str = "") -> str:
    title = esc(feature_name(bundle, feature))
    return (
        f'<button type="button" class="{css_class}" data-feature="{int(feature)}" title="{title}">'
        f"{title}{extra}</button>"
    )


def _as_list(value: object) -> list:
    if value is None:
        return []
    if isinstance(value, float) and np.isnan(value):
        return []
    return list(value)


def _token_list(label: str, tokens: Iterable[str], css_class: str) -> str:
    items = "".join(f'<span class="tok {css_class}">{show_token(t)}</span>' for t in tokens)
    return f'<div class="tok-row"><span class="tok-label">{esc(label)}</span>{items or "—"}</div>'


def render_example(tokens: Sequence[str], acts: Sequence[float], max_act: float) -> str:
    """One context, each token's background alpha ∝ its activation / the feature's max activation."""
    acts = np.asarray(acts, dtype=float)
    if len(tokens) == 0:
        return '<div class="example">—</div>'
    focus = int(np.argmax(acts)) if len(acts) else 0
    start, stop = max(0, focus - CONTEXT_TOKENS), min(len(tokens), focus + CONTEXT_TOKENS + 1)
    scale = max_act if max_act > 0 else (float(acts.max()) if len(acts) and acts.max() > 0 else 1.0)
    spans = []
    for i in range(start, stop):
        act = float(acts[i]) if i < len(acts) else 0.0
        alpha = min(max(act / scale, 0.0), 1.0)
        style = f' style="background: rgba({HIGHLIGHT_RGB}, {alpha:.2f})"' if alpha > 0 else ""
        spans.append(f'<span class="etok" title="{act:.3g}"{style}>{show_token(tokens[i])}</span>')
    prefix = "…" if start > 0 else ""
    suffix = "…" if stop < len(tokens) else ""
    return f'<div class="example">{prefix}{"".join(spans)}{suffix}</div>'


def _examples_html(examples: pd.DataFrame, max_act: float) -> str:
    if examples.empty:
        return '<p class="muted">No examples recorded for this feature.</p>'
    parts = []
    for bucket, rows in examples.groupby("bucket", sort=False):
        limit = N_TOP_EXAMPLES if bucket == "top" else N_QUANTILE_EXAMPLES
        title = (
            "Top activations"
            if bucket == "top"
            else f"Around the {esc(str(bucket).lstrip('q'))}th percentile"
        )
        body = "".join(
            f'<div class="example-row"><span class="act">{float(r.act):.3g}</span>'
            f"{render_example(_as_list(r.tokens), _as_list(r.acts), max_act)}</div>"
            for r in rows.head(limit).itertuples()
        )
        parts.append(f'<div class="bucket"><h4>{title}</h4>{body}</div>')
    return "".join(parts)


def _cluster_path(bundle: Bundle, row: pd.Series) -> str:
    names = [str(row[c]) for c in bundle.cluster_columns if row[c] is not None and str(row[c]).strip()]
    if not names:
        return ""
    return '<div class="cluster-path">' + " › ".join(esc(n) for n in names) + "</div>"


def _neighbours_html(bundle: Bundle, row: pd.Series) -> str:
    visible = [
        int(n)
        for n in _as_list(row["neighbors"])
        if 0 <= int(n) < bundle.n_features and not bool(bundle.features.iloc[int(n)]["hidden"])
    ][:N_NEIGHBOURS]
    if not visible:
        return ""
    links = "".join(feature_link(bundle, n) for n in visible)
    return f'<div class="neighbours"><h4>Neighbours</h4>{links}</div>'


def render_card(bundle: Bundle, feature: int) -> str:
    """The card for one feature: label, cluster path, statistics, logit lens, examples, neighbours."""
    bundle.check_feature(feature)
    row = bundle.features.iloc[int(feature)]
    if bool(row["hidden"]):
        return (
            f'<div class="card"><h3>Feature #{int(feature)}</h3>'
            '<div class="notice warn">This feature is hidden in this bundle: it is not drawn, '
            "its details are not shown, and it cannot be steered.</div></div>"
        )
    label = str(row["label"] or "").strip() or "(no label)"
    dead = (
        '<div class="notice warn">Dead feature: it never fired on the corpus.</div>'
        if bool(row["dead"])
        else ""
    )
    max_act = float(row["max_act"])
    stats = (
        f'<div class="stats"><span>density <b>{float(row["density"]) * 100:.3g}%</b></span>'
        f"<span>max act <b>{max_act:.3g}</b></span>"
        f"<span>mean act <b>{float(row['mean_act']):.3g}</b></span>"
        f'<span class="muted">label: {esc(row["label_source"])}</span>{_label_score_html(row)}</div>'
    )
    fires = _token_list("fires on", _as_list(row["top_tokens"])[:N_LOGIT_TOKENS], "fires")
    return (
        f'<div class="card"><h3><span class="fid">#{int(feature)}</span> {esc(label)}</h3>'
        f'{_cluster_path(bundle, row)}{dead}{stats}<div class="lens">{fires}'
        f"{_steering_html(bundle, int(feature), row)}</div>"
        f"{_examples_html(bundle.examples_for(int(feature)), max_act)}"
        f"{_neighbours_html(bundle, row)}</div>"
    )


def _label_score_html(row: pd.Series) -> str:
    """How well the label held up on examples its labeller never saw (``build-map score``)."""
    detection = float(row.get("detection", float("nan")))
    if not np.isfinite(detection):
        return ""
    fuzzing = float(row.get("fuzzing", float("nan")))
    judge = esc(row.get("label_judge") or "")
    fuzz = f" · fuzzing <b>{10 * fuzzing:.1f}/10</b> vs 5 by chance" if np.isfinite(fuzzing) else ""
    title = (
        f"Judge {judge}: given the label, pick this feature's held-out example among three of its "
        "neighbours' (detection), and the words it fires on in an example (fuzzing); 10 draws each."
    )
    of_built = " (of the built label)" if row.get("label_source") == "edited" else ""
    return f'<span title="{title}">detection <b>{10 * detection:.1f}/10</b> vs 2.5 by chance{fuzz}{of_built}</span>'


def _steering_html(bundle: Bundle, feature: int, row: pd.Series) -> str:
    """What a click does: the calibrated strength, the steerability and the tokens the feature
    makes likelier / less likely through the model (the output probe), then the direct logit lens.
    Bundles built before the probe say so and show the logit lens alone."""
    lens = _token_list("promotes", _as_list(row["top_logits"])[:N_LOGIT_TOKENS], "up") + _token_list(
        "suppresses", _as_list(row["bottom_logits"])[:N_LOGIT_TOKENS], "down"
    )
    if bool(row["dead"]):
        return lens
    if not is_calibrated(bundle, feature):
        note = (
            f"Not calibrated: this bundle was built before the output probe, so a click steers at the default "
            f"×{DEFAULT_STRENGTH:g}, which often changes nothing visible. Rebuild it with build-map build."
        )
        return f'{notice("info", note)}<p class="muted">Direct logit lens (decoder → unembedding):</p>{lens}'
    strength, steerability = click_strength(bundle, feature), float(row["steerability"])
    level = "steers clearly" if steerability >= CLEAR_STEERABILITY else "steers weakly"
    head = (
        f'<div class="steer-head"><span>one click: <b>×{strength:.3g}</b> max act</span>'
        f'<span title="Share of next-token probability moved onto the tokens below at that strength">'
        f"steerability <b>{steerability:.2f}</b> · {level}</span>"
        f'<span class="meter"><span style="width:{min(100.0, 100 * steerability / 0.5):.0f}%"></span></span></div>'
    )
    output = _token_list("writes", _as_list(row["output_promotes"])[:N_LOGIT_TOKENS], "up") + _token_list(
        "holds back", _as_list(row["output_suppresses"])[:N_LOGIT_TOKENS], "down"
    )
    return f"{head}{output}<details><summary>direct logit lens</summary>{lens}</details>"


SORTS = ("relevance", "steerability", "label score")
"""How lists of features (search results, features of a reply) are ordered."""
_SORT_COLUMNS = {"steerability": "steerability", "label score": "detection"}


def sort_features(bundle: Bundle, features: Sequence[int], by: str) -> list[int]:
    """``features`` in their own order ("relevance"), or most steerable first, or best-labelled
    first (detection score); features without the figure go last, in their own order."""
    column = _SORT_COLUMNS.get(by)
    if column is None or column not in bundle.features:
        return list(features)
    values = bundle.features[column].to_numpy(dtype=float)
    return sorted(features, key=lambda f: -np.nan_to_num(values[int(f)], nan=-1.0))


def render_chips(
    bundle: Bundle,
    scored: Sequence[tuple[int, float]],
    title: str = "Active features",
    by: str = "relevance",
    unit: str = "",
) -> str:
    """Feature chips (click to select) with a score each (followed by ``unit``), e.g. the features
    most specific to a reply; ``by``: see ``sort_features``."""
    if not scored:
        return ""
    score_of = dict(scored)
    order = sort_features(bundle, [f for f, _ in scored], by)
    chips = "".join(
        feature_link(
            bundle,
            f,
            "chip",
            f' <span class="score">{_score(score_of[f])}{esc(unit)}</span>{_steer_mark(bundle, f, by)}',
        )
        for f in order
    )
    return f'<div class="chips"><span class="chips-title">{esc(title)}</span>{chips}</div>'


def _score(value: float) -> str:
    """2 significant digits, whole numbers from 100 up ("1,300", not "1.3e+03")."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2g}"


SPECIFIC_UNIT = "×"
"""After a specificity score (``build_map.steering.text_features``): N× the feature's usual level."""


def _steer_mark(bundle: Bundle, feature: int, by: str) -> str:
    if by != "steerability" or not is_calibrated(bundle, feature):
        return ""
    return (
        f' <span class="steer-mark">s {float(bundle.features["steerability"].iat[int(feature)]):.2f}</span>'
    )


def render_tokens(pieces: Sequence[str]) -> str:
    """A reply's tokens as clickable chips (``TokenPicker``), each escaped."""
    spans = "".join(
        f'<span class="tok pick" data-token="{i}" title="token {i}">{show_token(p)}</span>'
        for i, p in enumerate(pieces)
    )
    return f'<div class="tok-pick-row">{spans}</div>'


def notice(kind: str, text: str) -> str:
    """A notice box (kind: info, warn, error) holding escaped text; "" for no text."""
    return f'<div class="notice {kind}">{esc(text)}</div>' if text else ""


def muted(text: str) -> str:
    return f'<p class="muted">{esc(text)}</p>'


def message_html(role: str, text: str, streaming: bool = False) -> str:
    """A chat message (role: user, reply, reply steered) holding escaped text."""
    cursor = " cursor" if streaming else ""
    return f'<div class="msg {role}{cursor}">{esc(text)}</div>'
