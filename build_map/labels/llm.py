"""LLM labels and an LLM judge that stay local: the bundle's own chat model (``self``) or an
OpenAI-compatible chat-completions endpoint (a local vLLM, llama.cpp or Ollama server, or a hosted
one). Off unless asked for: the offline labels (``contexts``) are the default.

Prompts follow Goodfire's Llama-3 SAE write-up: examples from the top and from several activation
quantiles, the words the feature fires on marked «like this», and the words it writes. Only the
examples a labeller may see are used (``scores.labelling_examples``: the held-out ones score the
label). Every answer is cached per prompt, so an interrupted run over 65,536 features continues
where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from build_map.features.config import TOP_BUCKET
from build_map.labels.judges import Option
from build_map.labels.snippets import snippet
from build_map.labels.text import clean_label, label_token

logger = logging.getLogger(__name__)

ENV_URL, ENV_KEY, ENV_MODEL = "SAE_MAP_LLM_URL", "SAE_MAP_LLM_KEY", "SAE_MAP_LLM_MODEL"
SELF = "self"
PROMPT_VERSION = 2  # part of every cache key: a new prompt never reuses old answers

Messages = list[dict[str, str]]


class LLMLabelError(ValueError):
    """The LLM labeller is not configured or its endpoint failed."""


class Chat(Protocol):
    name: str

    def complete(self, prompts: Sequence[Messages], max_tokens: int) -> list[str]: ...

    def count_tokens(self, text: str) -> int: ...


# ---------------------------------------------------------------- chats


@dataclass
class EndpointChat:
    """An OpenAI-compatible chat-completions endpoint."""

    endpoint: str
    model: str
    key: str | None = None
    timeout: float = 60.0

    @property
    def name(self) -> str:
        return f"{self.model}@{self.endpoint.removesuffix('/chat/completions')}"

    def complete(self, prompts: Sequence[Messages], max_tokens: int) -> list[str]:
        return [self._one(messages, max_tokens) for messages in prompts]

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)  # the endpoint's tokenizer is not here; ~4 characters a token

    def _one(self, messages: Messages, max_tokens: int) -> str:
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(
            self.endpoint, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read().decode("utf-8"))
            return str(reply["choices"][0]["message"]["content"])
        except urllib.error.HTTPError as exc:
            detail = exc.read(300).decode("utf-8", "replace")
            raise LLMLabelError(f"LLM endpoint {self.endpoint} answered HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise LLMLabelError(
                f"LLM endpoint {self.endpoint} cannot be reached ({exc}); check {ENV_URL} or --labeler."
            ) from exc
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise LLMLabelError(
                f"LLM endpoint {self.endpoint} gave no chat-completions reply ({exc!r}); is it OpenAI-compatible?"
            ) from exc


@dataclass
class ModelChat:
    """The bundle's own model as the labeller: its chat template, batched greedy decoding. A chat
    model such as Llama-3.1-8B-Instruct labels well; a 135M one does not (the demo stays offline)."""

    model: object
    tokenizer: object
    spec: str
    batch_size: int = 8

    @property
    def name(self) -> str:
        return f"self:{self.spec}"

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def complete(self, prompts: Sequence[Messages], max_tokens: int) -> list[str]:
        import torch

        tokenizer = self.tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            raise LLMLabelError(
                f"--labeler self needs a chat model; {self.spec} has no chat template. Use an "
                "instruction-tuned model or --labeler URL."
            )
        device = next(self.model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            texts = [
                tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                for m in prompts[start : start + self.batch_size]
            ]
            rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
            with torch.inference_mode():
                generated = self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                    pad_token_id=pad,
                )  # fmt: skip
            out.extend(tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True))
        return out


def chat_for(spec: str, loaded=None, *, key: str | None = None, model: str | None = None) -> Chat:
    """``"self"`` → the loaded model (a ``LoadedModel``); an http(s) URL → that endpoint, its
    model from ``model`` or $SAE_MAP_LLM_MODEL; ``"env"`` → $SAE_MAP_LLM_URL."""
    if spec == SELF:
        if loaded is None:
            raise LLMLabelError("--labeler self needs the bundle's model loaded.")
        return ModelChat(loaded.model, loaded.tokenizer, str(loaded.spec))
    url = os.environ.get(ENV_URL) if spec == "env" else spec
    if url and not re.match(r"https?://", url):
        raise LLMLabelError(
            f"{url!r} is no labeller or judge: give offline, self, or the http(s) URL of an OpenAI-compatible "
            "endpoint."
        )
    model = model or os.environ.get(ENV_MODEL)
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
    return EndpointChat(endpoint, model, key or os.environ.get(ENV_KEY) or None)


# ---------------------------------------------------------------- labels

_LABEL_SYSTEM = (
    "You name features of a sparse autoencoder trained on a language model. You get text snippets "
    "where the feature fires, from its strongest activations down to weak ones; the words it fires on "
    "are marked «like this». You may also get the words it makes the model write next. Reply with one "
    "short label, at most eight words, saying what the marked words have in common in their context "
    "(a topic, a grammatical role, a kind of phrase), not just which word they are. Reply with the "
    "label only."
)


def label_messages(row: pd.Series, examples: pd.DataFrame | None, per_bucket: int = 3) -> Messages:
    """The chat asking for one feature's label: up to ``per_bucket`` snippets per activation bucket
    (top first, then the quantiles from high to low), marked words, and the words it writes."""
    lines = []
    if examples is not None and len(examples):
        for bucket, rows in sorted(examples.groupby("bucket"), key=lambda b: _bucket_rank(b[0])):
            title = "strongest" if bucket == TOP_BUCKET else f"around the {bucket[1:]}th percentile"
            chosen = rows.sort_values("rank").head(per_bucket)
            lines.append(f"Activations {title}:")
            for example in chosen.itertuples(index=False):
                snip = snippet(example.tokens, example.acts, example.act)
                lines.append(f"- {clean_label(snip.marked_text(snip.active()), 400)}")
    writes = _as_list(row.get("output_promotes")) or _as_list(row.get("top_logits"))
    words = ", ".join(label_token(t) for t in writes[:10])
    text = "\n".join(lines) or "(no snippets)"
    return [
        {"role": "system", "content": _LABEL_SYSTEM},
        {"role": "user", "content": f"{text}\nWords it makes likelier next: {words or '(none)'}"},
    ]


def _bucket_rank(bucket: str) -> float:
    return -math.inf if bucket == TOP_BUCKET else -float(bucket[1:])


def _as_list(values) -> list[str]:
    return (
        [] if values is None or (isinstance(values, float) and np.isnan(values)) else [str(v) for v in values]
    )


class AnswerCache:
    """Answers per prompt in a JSON-lines file, appended as they come (a killed run loses at most
    the batch in flight)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.answers: dict[str, str] = {}
        if path is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.answers[str(entry["key"])] = str(entry["answer"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a kill
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(chat: Chat, messages: Messages) -> str:
        text = json.dumps([PROMPT_VERSION, chat.name, messages], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def add(self, key: str, answer: str) -> None:
        self.answers[key] = answer
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"key": key, "answer": answer}) + "\n")


def cache_file(chat: Chat, kind: str) -> Path:
    from build_map.common.paths import cache_dir

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", chat.name)[:80]
    return cache_dir("labels") / f"{kind}-{slug}.jsonl"


def llm_labels(
    features_df: pd.DataFrame,
    examples_df: pd.DataFrame,
    chat: Chat | None = None,
    *,
    url: str | None = None,
    key: str | None = None,
    model: str | None = None,
    features: Iterable[int] | None = None,
    timeout: float = 60.0,
    cache: Path | None | bool = True,
    batch_size: int = 8,
) -> pd.Series:
    """Labels of the live features (``features`` narrows them) from ``chat``, or from the endpoint
    ``url``/``model`` (default $SAE_MAP_LLM_URL / $SAE_MAP_LLM_MODEL). ``cache``: True = the
    labeller's file in the user cache, a Path = that file, None/False = none."""
    if chat is None:
        chat = chat_for(url or "env", key=key, model=model)
        if isinstance(chat, EndpointChat):
            chat.timeout = timeout
    jobs = _label_jobs(features_df, examples_df, features)
    store = AnswerCache(cache_file(chat, "label") if cache is True else (cache or None))
    keyed = [(feature, messages, AnswerCache.key(chat, messages)) for feature, messages in jobs]
    todo = [job for job in keyed if job[2] not in store.answers]
    if len(keyed) > len(todo):
        logger.info(
            "LLM labels: %d of %d features answered before (cache)", len(keyed) - len(todo), len(keyed)
        )
    with tqdm(
        total=len(todo), desc=f"LLM labels ({chat.name})", unit="feature", disable=len(todo) < 20
    ) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            for (_, _, k), answer in zip(batch, chat.complete([m for _, m, _ in batch], 32), strict=True):
                store.add(k, answer)
            bar.update(len(batch))
    labels = {feature: clean_label(_first_line(store.answers[k])) for feature, _, k in keyed}
    return pd.Series({f: t for f, t in labels.items() if t}, dtype=object, name="label")


def dry_run(features_df: pd.DataFrame, examples_df: pd.DataFrame, chat: Chat) -> tuple[str, int, int]:
    """(the prompt of the first live feature, its tokens, estimated prompt tokens for all of them)."""
    jobs = _label_jobs(features_df, examples_df, None)
    if not jobs:
        return "(no live features)", 0, 0
    text = "\n\n".join(m["content"] for m in jobs[0][1])
    sample = jobs[:: max(1, len(jobs) // 20)]
    mean = np.mean([chat.count_tokens("\n\n".join(m["content"] for m in job[1])) for job in sample])
    return text, chat.count_tokens(text), int(mean * len(jobs))


def _label_jobs(features_df: pd.DataFrame, examples_df: pd.DataFrame, features: Iterable[int] | None):
    live = features_df.loc[~features_df["dead"].astype(bool), "feature"].astype(int)
    wanted = live.tolist() if features is None else sorted(set(map(int, features)) & set(live.tolist()))
    by_feature = {int(f): rows for f, rows in examples_df.groupby("feature")}
    rows = features_df.set_index("feature")
    return [(f, label_messages(rows.loc[f], by_feature.get(f))) for f in wanted]


def _first_line(text: str) -> str:
    line = next((part for part in str(text).strip().splitlines() if part.strip()), "")
    return line.strip().strip('"').removeprefix("Label:").strip()


# ---------------------------------------------------------------- judge

_JUDGE_SYSTEM = (
    "You check labels of sparse-autoencoder features. You get a label and numbered text snippets "
    "with some words marked «like this». Say which snippet's marked words the label describes best. "
    "Reply with the number only."
)


@dataclass
class LLMJudge:
    """Detection and fuzzing by an LLM (``scores``): it picks the snippet whose marked words the
    label describes; its answers are cached like labels."""

    chat: Chat
    cache: AnswerCache | None = None

    @property
    def name(self) -> str:
        return f"llm:{self.chat.name}"

    def rate(self, label: str, options: Sequence[Option]) -> np.ndarray:
        listing = "\n".join(
            f"{i + 1}. {clean_label(snip.marked_text(marked), 400)}"
            for i, (snip, marked) in enumerate(options)
        )
        messages = [
            {"role": "system", "content": _JUDGE_SYSTEM},
            {"role": "user", "content": f"Label: {clean_label(label)}\nSnippets:\n{listing}"},
        ]
        store = self.cache or AnswerCache(None)
        k = AnswerCache.key(self.chat, messages)
        if k not in store.answers:
            store.add(k, self.chat.complete([messages], 4)[0])
        found = re.search(r"\d+", store.answers[k])
        ratings = np.zeros(len(options))
        if found and 1 <= int(found.group()) <= len(options):
            ratings[int(found.group()) - 1] = 1.0
        return ratings  # no number: all tied, which scores chance
