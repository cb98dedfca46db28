"""Feature labels: automatic ones from statistics, imported ones from a file, optional LLM ones.

Every label is untrusted text. Here it is only cleaned (control characters stripped, whitespace
collapsed, length capped); HTML escaping is the renderers' job.

Priority when several exist for a feature: imported > llm > auto.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import unicodedata
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

AUTO, IMPORTED, LLM = "auto", "imported", "llm"
DEAD_LABEL = "dead feature"
NO_EVIDENCE_LABEL = "unlabelled feature"
MAX_AUTO_CHARS = 60
MAX_LABEL_CHARS = 120  # imported and LLM labels
LABEL_EXTENSIONS = (".csv", ".json", ".parquet", ".pq")
HIDE_TEXT_EXTENSIONS = ("", ".txt", ".ids", ".lst")

ENV_URL, ENV_KEY, ENV_MODEL = "SAE_MAP_LLM_URL", "SAE_MAP_LLM_KEY", "SAE_MAP_LLM_MODEL"

# Byte-level BPE (Ġ space, Ċ newline, ĉ tab) and SentencePiece (▁ space) markers.
_MARKERS = str.maketrans({"Ġ": " ", "▁": " ", "Ċ": "\n", "ĉ": "\t"})
_SPACES = re.compile(r"\s+")


class LabelFileError(ValueError):
    """A label or hide file cannot be used; the message names the file and the fix."""


class LLMLabelError(ValueError):
    """The LLM labeller is not configured or its endpoint failed."""


# ---------------------------------------------------------------- cleaning


def clean_label(text: object, max_chars: int = MAX_LABEL_CHARS) -> str:
    """Drop control/format characters, collapse whitespace, cap the length with an ellipsis."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    kept = str(text)
    if not kept.isprintable():  # the slow path only for text with control/format/odd characters
        chars = (" " if ch.isspace() else ch for ch in kept)
        kept = "".join(ch for ch in chars if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn"))
    kept = _SPACES.sub(" ", kept).strip()
    if len(kept) > max_chars:
        kept = kept[: max_chars - 1].rstrip() + "…"
    return kept


def label_token(token: str) -> str:
    """A token as a label shows it: markers replaced, whitespace trimmed, pure whitespace made visible."""
    text = str(token).translate(_MARKERS)
    stripped = text.strip()
    if stripped:
        return clean_label(stripped, 24)
    if "\n" in text:
        return "↵"
    return "␣" if text else ""


# ---------------------------------------------------------------- automatic labels


def auto_labels(features_df: pd.DataFrame, examples_df: pd.DataFrame) -> list[str]:
    """One short readable label per feature, in ``features_df`` order; ``"dead feature"`` if dead.

    Activating side: the words the feature fires on in its examples (a sub-word token is shown as
    the whole word around it: "strugg" in " struggle" reads 'struggle'), weighted by activation and
    by how rare they are among other features' activating words (TF-IDF with features as
    documents), so a feature firing on " the" everywhere does not win over one specific to "pizza".
    Output side: the first tokens its decoder direction promotes (the logit lens) that occur as
    whole words in the examples; logit-lens fragments such as "outheastern" are left out, and the
    side is dropped when none is a word (common for middle layers of small models).
    """
    words, known = _example_words(examples_df)
    fires_on = _characteristic_words(words)
    labels: list[str] = []
    taken: set[str] = set()
    for feature, dead, top_logits in zip(
        features_df["feature"], features_df["dead"], features_df["top_logits"], strict=True
    ):
        if bool(dead):
            labels.append(DEAD_LABEL)
            continue
        promotes = _wordy(top_logits, known)
        label = _unique(_label_variants(fires_on.get(int(feature), []), promotes), taken)
        taken.add(label)
        labels.append(label)
    return labels


def _token_traits(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct token string: (continues a word, a word may continue after it, starts with a
    space, label form)."""
    shown = np.array([label_token(t) for t in raw], dtype=object)
    text = [str(t).translate(_MARKERS) for t in raw]
    special = np.array([t.startswith("<") and t.endswith(">") and len(t) > 2 for t in text])
    joins_left = np.array([bool(t) and t[0].isalnum() for t in text]) & ~special
    joins_right = np.array([bool(t) and t[-1].isalnum() for t in text]) & ~special
    spaced = np.array([t[:1].isspace() for t in text], dtype=bool)
    return joins_left, joins_right, spaced, shown


def _example_words(examples_df: pd.DataFrame) -> tuple[pd.DataFrame, set[str]]:
    """Every word of every example with an active token (feature, text, weight), and the
    lower-cased words known to be whole words (see the comment at ``known``).

    Tokens are glued into words where an alphanumeric piece follows an alphanumeric piece with no
    space or marker between them. A word's weight is its most active token's activation scaled to
    the example's peak, doubled when the word holds the example's focus token (the one at ``act``).
    Vectorised: 65,536 features x ~19 examples x ~20 tokens is ~25M cells.
    """
    lengths = examples_df["acts"].map(len).to_numpy() if len(examples_df) else np.zeros(0, int)
    frame, lengths = examples_df[lengths > 0], lengths[lengths > 0]
    if frame.empty:
        return pd.DataFrame({"feature": [], "text": [], "weight": []}), set()
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    acts = np.concatenate([np.asarray(a, dtype=np.float64) for a in frame["acts"]])
    distance = np.abs(acts - np.repeat(frame["act"].to_numpy(np.float64), lengths))
    focus = distance == np.repeat(np.minimum.reduceat(distance, starts), lengths)
    peak = np.maximum(np.repeat(np.maximum.reduceat(acts, starts), lengths), 1e-12)
    weight = np.where(acts > 0, acts / peak * np.where(focus, 2.0, 1.0), 0.0)
    codes, raw = pd.factorize(np.concatenate([np.asarray(t, dtype=object) for t in frame["tokens"]]))
    joins_left, joins_right, spaced, shown = _token_traits(np.asarray(raw, dtype=object))
    new_word = np.ones(len(codes), dtype=bool)
    new_word[1:] = ~(joins_left[codes[1:]] & joins_right[codes[:-1]])
    new_word[starts] = True
    word_start = np.flatnonzero(new_word)
    word_weight = np.maximum.reduceat(weight, word_start)
    active = np.flatnonzero(word_weight > 0)
    word_end = np.r_[word_start[1:], len(codes)]
    raw_text = np.asarray(raw, dtype=object)
    texts = [
        shown[codes[s]] if e - s == 1 else label_token("".join(raw_text[codes[s:e]]).translate(_MARKERS))
        for s, e in zip(word_start[active].tolist(), word_end[active].tolist(), strict=True)
    ]
    feature = np.repeat(frame["feature"].to_numpy(np.int64), lengths)[word_start[active]]
    words = pd.DataFrame({"feature": feature, "text": texts, "weight": word_weight[active]})
    # Known words: whole single-token words after a space, and the active words, away from the
    # window edges (a window can start or end inside a word: "acific" of " Pacific" is no word;
    # "ing" after a hyphen is no word either).
    ends = np.cumsum(lengths)
    inner = ~np.isin(word_start, starts) & ~np.isin(word_end, ends)
    single = word_start[(word_end - word_start == 1) & inner & spaced[codes[word_start]]]
    seen = Counter(str(t).lower() for t in shown[codes[single]])
    seen.update(t.lower() for t, keep in zip(texts, inner[active].tolist(), strict=True) if keep)
    known = {word for word, count in seen.items() if count >= 2}  # typos and odd splits occur once
    return words[words["text"] != ""], known


def _characteristic_words(words: pd.DataFrame, limit: int = 3) -> dict[int, list[str]]:
    """feature → up to ``limit`` words it fires on, best first, by TF-IDF.

    TF: the words' weights summed over the feature's examples (see ``_example_words``). IDF:
    sqrt(log(1 + features / features firing on the word)). Words scoring under a third of the
    best are left out.
    """
    if words.empty:
        return {}
    word, shown = pd.factorize(words["text"].to_numpy(dtype=object))
    feature = words["feature"].to_numpy(np.int64)
    keys, inverse = np.unique(feature * len(shown) + word, return_inverse=True)
    tf = np.bincount(inverse, weights=words["weight"].to_numpy(np.float64))
    key_feature, key_word = keys // len(shown), keys % len(shown)
    doc_freq = np.bincount(key_word, minlength=len(shown))[key_word]
    # IDF softened by a square root: rare words should win over " the", not over a feature's main word.
    score = tf * np.sqrt(np.log1p(len(np.unique(key_feature)) / doc_freq))
    order = np.lexsort((key_word, -score, key_feature))  # by feature, best score first
    key_feature, key_word, score = key_feature[order], key_word[order], score[order]
    first = np.r_[True, key_feature[1:] != key_feature[:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    rank = np.arange(len(order)) - group_start
    chosen = (rank < limit) & (score >= score[group_start] / 3)
    out: dict[int, list[str]] = {}
    for f, t in zip(key_feature[chosen].tolist(), shown[key_word[chosen]].tolist(), strict=True):
        out.setdefault(f, []).append(t)
    return out


def _wordy(tokens: Iterable[str] | None, known: set[str], limit: int = 3) -> list[str]:
    """Logit-lens tokens worth showing: whole words of two or more characters seen in the
    examples, deduplicated."""
    shown: list[str] = []
    for token in list(tokens) if tokens is not None else []:
        text = label_token(token)
        lower = text.lower()
        wordlike = len(text) > 1 and any(ch.isalnum() for ch in text)
        if wordlike and lower in known and lower not in (s.lower() for s in shown):
            shown.append(text)
        if len(shown) == limit:
            break
    return shown


def topic_words(label: str, source: str) -> str:
    """The part of a label that says what a feature is about, for naming clusters: an automatic
    label's activating words ("'pizza' / 'pasta'", not the noisier logit-lens side after "→")."""
    return label.split(" → ", 1)[0] if source == AUTO else label


def _label_variants(fires_on: list[str], promotes: list[str]) -> Iterator[str]:
    """Labels from short to detailed; the first one not used by another feature is chosen."""
    for n_in in range(1, max(len(fires_on), 1) + 1):
        for n_out in range(min(len(promotes), 2), len(promotes) + 1):
            left = " / ".join(f"'{t}'" for t in fires_on[:n_in])
            right = ", ".join(promotes[:n_out])
            if left and right:
                text = f"{left} → {right}"
            elif left or right:
                text = left or f"→ {right}"
            else:
                text = NO_EVIDENCE_LABEL
            yield clean_label(text, MAX_AUTO_CHARS)


def _unique(variants: Iterable[str], taken: set[str]) -> str:
    """The first variant not taken; else the most detailed one with a counter (" ·2")."""
    text = NO_EVIDENCE_LABEL
    for text in variants:
        if text not in taken:
            return text
    base, n = text[: MAX_AUTO_CHARS - 4], 2
    while f"{base} ·{n}" in taken:
        n += 1
    return f"{base} ·{n}"


# ---------------------------------------------------------------- imported labels


def read_label_file(path: str | Path, n_features: int) -> pd.Series:
    """Labels from a CSV, JSON or Parquet file with columns feature,label → Series indexed by feature.

    JSON may also be a list of ``{"feature": …, "label": …}`` objects or a ``{"12": "label"}`` mapping.
    """
    path = Path(path)
    frame = _read_table(path, LABEL_EXTENSIONS, "label")
    missing = [column for column in ("feature", "label") if column not in frame.columns]
    if missing:
        found = ", ".join(map(str, frame.columns)) or "none"
        raise LabelFileError(
            f"{path}: missing column(s) {', '.join(missing)}; a label file needs columns feature,label "
            f"(found: {found})."
        )
    ids = _feature_ids(frame["feature"].tolist(), path, n_features)
    labels = [clean_label(text) for text in frame["label"].tolist()]
    chosen: dict[int, str] = {}
    empty = 0
    for feature, label in zip(ids, labels, strict=True):
        if not label:
            empty += 1
            continue
        if feature in chosen and chosen[feature] != label:
            raise LabelFileError(
                f"{path}: feature {feature} has conflicting labels {chosen[feature]!r} and {label!r}; "
                "keep one row per feature."
            )
        chosen[feature] = label
    if empty:
        logger.info("%s: %d rows with an empty label were skipped", path, empty)
    return pd.Series(chosen, dtype=object, name="label").sort_index()


def read_hide_file(path: str | Path, n_features: int) -> set[int]:
    """Feature ids to hide: text with one id per line (``#`` comments allowed), a CSV with a
    ``feature`` column (or a single column of ids), or a JSON list of ids."""
    path = Path(path)
    _check_exists(path, "hide")
    suffix = path.suffix.lower()
    if suffix in HIDE_TEXT_EXTENSIONS:
        lines = [line.split("#", 1)[0].strip() for line in _read_text(path).splitlines()]
        values: list = [line for line in lines if line]
    elif suffix == ".csv":
        frame = _read_table(path, (".csv",), "hide")
        if "feature" in frame.columns:
            values = frame["feature"].tolist()
        elif len(frame.columns) == 1:  # a headerless column of ids: the header is an id too
            frame = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
            values = frame.iloc[:, 0].tolist()
        else:
            raise LabelFileError(
                f"{path}: a hide CSV needs a 'feature' column (found: {', '.join(map(str, frame.columns))})."
            )
    elif suffix == ".json":
        data = _read_json(path)
        if not isinstance(data, list):
            raise LabelFileError(f"{path}: a hide JSON file must be a list of feature ids, e.g. [3, 17].")
        values = [item.get("feature") if isinstance(item, dict) else item for item in data]
    else:
        raise LabelFileError(
            f"{path}: unknown hide file type {suffix!r}; use a .txt file with one id per line, "
            "a .csv with a feature column, or a .json list of ids."
        )
    return set(_feature_ids(values, path, n_features))


def _check_exists(path: Path, kind: str) -> None:
    if not path.is_file():
        raise LabelFileError(f"The {kind} file {path} does not exist; check the path.")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LabelFileError(f"{path}: not UTF-8 text ({exc}).") from exc


def _read_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise LabelFileError(f"{path}: not valid JSON ({exc}).") from exc


def _read_table(path: Path, extensions: tuple[str, ...], kind: str) -> pd.DataFrame:
    _check_exists(path, kind)
    suffix = path.suffix.lower()
    if suffix not in extensions:
        raise LabelFileError(
            f"{path}: unknown {kind} file type {suffix!r}; use {', '.join(extensions)} "
            "with columns feature,label."
        )
    try:
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except Exception as exc:  # pandas/pyarrow raise many error types for a malformed file
        raise LabelFileError(f"{path}: cannot read it as {suffix[1:]} ({exc}).") from exc
    return _json_labels(path, _read_json(path))


def _json_labels(path: Path, data: object) -> pd.DataFrame:
    if isinstance(data, dict):
        return pd.DataFrame({"feature": list(data.keys()), "label": list(data.values())})
    if isinstance(data, list) and all(isinstance(item, dict) for item in data):
        return pd.DataFrame.from_records(data, columns=sorted({key for item in data for key in item}))
    raise LabelFileError(
        f'{path}: a label JSON file must be a list of {{"feature": id, "label": text}} objects '
        'or a {"id": "label"} mapping.'
    )


def _feature_ids(values: list, path: Path, n_features: int) -> list[int]:
    ids = []
    for row, value in enumerate(values, start=1):
        feature = _as_int(value)
        if feature is None:
            raise LabelFileError(f"{path}: feature ids must be integers; found {value!r} (entry {row}).")
        if not 0 <= feature < n_features:
            raise LabelFileError(
                f"{path}: feature id {feature} is out of range; valid ids are 0..{n_features - 1}."
            )
        ids.append(feature)
    return ids


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if float(value).is_integer() else None
    text = str(value).strip()
    return int(text.split(".")[0]) if re.fullmatch(r"[+-]?\d+(\.0*)?", text) else None


# ---------------------------------------------------------------- combining


def apply_labels(
    features_df: pd.DataFrame,
    auto: list[str],
    imported: pd.Series | None = None,
    llm: pd.Series | None = None,
) -> pd.DataFrame:
    """A copy of ``features_df`` with ``label`` and ``label_source``: imported > llm > auto."""
    if len(auto) != len(features_df):
        raise ValueError(f"{len(auto)} automatic labels for {len(features_df)} features.")
    out = features_df.copy()
    labels = pd.Series([clean_label(text, MAX_AUTO_CHARS) for text in auto], index=out["feature"].to_numpy())
    source = pd.Series(AUTO, index=labels.index, dtype=object)
    for override, name in ((llm, LLM), (imported, IMPORTED)):
        if override is None or len(override) == 0:
            continue
        override = override[override.index.isin(labels.index)].map(clean_label)
        override = override[override != ""]
        labels.loc[override.index] = override.to_numpy()
        source.loc[override.index] = name
    out["label"] = labels.to_numpy()
    out["label_source"] = source.to_numpy()
    return out


# ---------------------------------------------------------------- optional LLM labels


def llm_labels(
    features_df: pd.DataFrame,
    examples_df: pd.DataFrame,
    *,
    url: str | None = None,
    key: str | None = None,
    model: str | None = None,
    features: Iterable[int] | None = None,
    n_examples: int = 6,
    timeout: float = 60.0,
) -> pd.Series:
    """Labels from an OpenAI-compatible chat-completions endpoint (off unless asked for).

    ``url``/``key``/``model`` default to $SAE_MAP_LLM_URL, $SAE_MAP_LLM_KEY (optional for local
    servers) and $SAE_MAP_LLM_MODEL. Only live features are labelled (``features`` narrows them).
    """
    endpoint, key, model = _llm_settings(url, key, model)
    live = features_df.loc[~features_df["dead"].astype(bool), "feature"].astype(int)
    wanted = live.tolist() if features is None else sorted(set(map(int, features)) & set(live.tolist()))
    by_feature = {int(f): rows for f, rows in examples_df.groupby("feature")}
    rows = features_df.set_index("feature")
    labels = {}
    for feature in tqdm(wanted, desc="LLM labels", unit="feature", disable=len(wanted) < 20):
        prompt = _llm_prompt(rows.loc[feature], by_feature.get(feature), n_examples)
        labels[feature] = clean_label(_chat(endpoint, key, model, prompt, timeout))
    return pd.Series(labels, dtype=object, name="label")


def _llm_settings(url: str | None, key: str | None, model: str | None) -> tuple[str, str | None, str]:
    url = url or os.environ.get(ENV_URL)
    model = model or os.environ.get(ENV_MODEL)
    key = key or os.environ.get(ENV_KEY) or None
    missing = [name for name, value in ((ENV_URL, url), (ENV_MODEL, model)) if not value]
    if missing:
        raise LLMLabelError(
            f"LLM labels were asked for but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            f"not set. Set {ENV_URL} (an OpenAI-compatible base URL such as http://127.0.0.1:8080/v1), "
            f"{ENV_MODEL} and, if the endpoint needs one, {ENV_KEY}; or build without LLM labels."
        )
    assert url is not None and model is not None
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions"
    return endpoint, key, model


_SYSTEM_PROMPT = (
    "You name features of a sparse autoencoder trained on a language model. Given text snippets where "
    "the feature fires (the strongest token is marked «like this») and the tokens it promotes, reply "
    "with a short label of at most six words describing what it detects. Reply with the label only."
)


def _llm_prompt(row: pd.Series, examples: pd.DataFrame | None, n_examples: int) -> str:
    lines = []
    if examples is not None:
        ordered = examples.sort_values(
            ["bucket", "rank"], key=lambda s: s != "top" if s.name == "bucket" else s
        )
        for example in ordered.head(n_examples).itertuples(index=False):
            acts = np.asarray(example.acts, dtype=np.float64)
            focus = int(np.argmin(np.abs(acts - float(example.act)))) if len(acts) else -1
            words = [str(t).translate(_MARKERS) for t in example.tokens]
            text = "".join(f"«{t}»" if i == focus else t for i, t in enumerate(words))
            lines.append(f"- {clean_label(text, 300)}")
    promotes = ", ".join(label_token(t) for t in list(row.get("top_logits", []) or [])[:10])
    return "Snippets:\n" + ("\n".join(lines) or "(none)") + f"\nPromoted tokens: {promotes or '(none)'}"


def _chat(endpoint: str, key: str | None, model: str, prompt: str, timeout: float) -> str:
    body = {
        "model": model,
        "messages": [{"role": "system", "content": _SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": 32,
    }
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.loads(response.read().decode("utf-8"))
        return str(reply["choices"][0]["message"]["content"])
    except urllib.error.HTTPError as exc:
        detail = exc.read(300).decode("utf-8", "replace")
        raise LLMLabelError(f"LLM endpoint {endpoint} answered HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise LLMLabelError(f"LLM endpoint {endpoint} cannot be reached ({exc}); check {ENV_URL}.") from exc
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise LLMLabelError(
            f"LLM endpoint {endpoint} gave no chat-completions reply ({exc!r}); is it OpenAI-compatible?"
        ) from exc
