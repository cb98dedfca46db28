"""Optional LLM labels from an OpenAI-compatible chat-completions endpoint (a local vLLM,
llama.cpp or Ollama server, or a hosted one); off unless asked for."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterable

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from build_map.labels.text import clean_label, label_token
from build_map.lm.tokens import MARKERS

ENV_URL, ENV_KEY, ENV_MODEL = "SAE_MAP_LLM_URL", "SAE_MAP_LLM_KEY", "SAE_MAP_LLM_MODEL"


class LLMLabelError(ValueError):
    """The LLM labeller is not configured or its endpoint failed."""


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
            words = [str(t).translate(MARKERS) for t in example.tokens]
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
