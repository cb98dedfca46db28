"""The optional LLM labeller talks to an OpenAI-compatible endpoint (faked on 127.0.0.1)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pandas as pd
import pytest

from build_map.labels.contexts import context_labels
from build_map.labels.llm import LLMJudge, LLMLabelError, chat_for, dry_run, label_messages, llm_labels
from build_map.labels.snippets import snippet
from build_map.labels.text import apply_labels


class _FakeChat(BaseHTTPRequestHandler):
    requests: list = []
    fail = False

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        )
        if type(self).fail:
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"model exploded")
            return
        prompt = body["messages"][-1]["content"]
        label = "Food\x1b[31m words" if "pizza»" in prompt else "Gratitude"
        if prompt.startswith("Label:"):  # the judge: the first snippet holding the label's word
            word = prompt.split("'")[1] if "'" in prompt else ""
            listed = [line for line in prompt.splitlines() if line[:1].isdigit()]
            label = next((line.split(".")[0] for line in listed if word and word in line), "none")
        reply = {"choices": [{"message": {"role": "assistant", "content": label}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_endpoint():
    _FakeChat.requests, _FakeChat.fail = [], False
    server = HTTPServer(("127.0.0.1", 0), _FakeChat)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def test_llm_labels_need_configuration(label_tables, monkeypatch):
    for name in ("SAE_MAP_LLM_URL", "SAE_MAP_LLM_KEY", "SAE_MAP_LLM_MODEL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(LLMLabelError, match="SAE_MAP_LLM_URL and SAE_MAP_LLM_MODEL are not set"):
        llm_labels(*label_tables)


def test_llm_labels_from_fake_endpoint(label_tables, fake_endpoint, monkeypatch, tmp_path):
    features, examples = label_tables
    monkeypatch.setenv("SAE_MAP_CACHE", str(tmp_path))
    monkeypatch.setenv("SAE_MAP_LLM_URL", fake_endpoint)
    monkeypatch.setenv("SAE_MAP_LLM_KEY", "sk-test")
    monkeypatch.setenv("SAE_MAP_LLM_MODEL", "tiny-labeller")
    labels = llm_labels(features, examples, features=[0, 1, 3])  # 3 is dead: skipped
    assert labels.to_dict() == {0: "Food[31m words", 1: "Gratitude"}
    first = _FakeChat.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "tiny-labeller"
    assert "food" in first["body"]["messages"][-1]["content"]  # logit lens goes into the prompt
    out = apply_labels(features, context_labels(features, examples), read_label_series({1: "thanks"}), labels)
    assert list(out.loc[[0, 1, 2], "label_source"]) == ["llm", "imported", "auto"]


def read_label_series(mapping):
    return pd.Series(mapping, dtype=object)


def test_llm_endpoint_errors_are_clear(label_tables, fake_endpoint):
    _FakeChat.fail = True
    with pytest.raises(LLMLabelError, match="answered HTTP 500: model exploded"):
        llm_labels(*label_tables, url=fake_endpoint, model="m", features=[0], cache=None)
    with pytest.raises(LLMLabelError, match="cannot be reached"):
        llm_labels(*label_tables, url="http://127.0.0.1:9/v1", model="m", features=[0], timeout=2, cache=None)
    with pytest.raises(LLMLabelError, match="is no labeller or judge"):
        chat_for("ftp://example.org", model="m")


def test_an_interrupted_run_continues_from_its_cache(label_tables, fake_endpoint, tmp_path):
    features, examples = label_tables
    cache = tmp_path / "answers.jsonl"
    first = llm_labels(features, examples, url=fake_endpoint, model="m", features=[0], cache=cache)
    assert len(_FakeChat.requests) == 1
    with cache.open("a") as handle:
        handle.write('{"key": "cut by a ki')  # a kill mid-line
    both = llm_labels(features, examples, url=fake_endpoint, model="m", features=[0, 1], cache=cache)
    assert len(_FakeChat.requests) == 2  # only feature 1 was asked
    assert both[0] == first[0] and both[1] == "Gratitude"


def test_label_prompt_marks_words_across_buckets_and_dry_run_counts(label_tables, fake_endpoint):
    features, examples = label_tables
    messages = label_messages(features.iloc[5], examples[examples["feature"] == 5])
    text = messages[-1]["content"]
    assert text.index("Activations strongest:") < text.index("around the 50th percentile")
    assert "«word5»" in text and "«the»" in text  # the q50 example's marked word
    chat = chat_for(fake_endpoint, model="m")
    prompt, tokens, total = dry_run(features, examples, chat)
    assert "«pizza»" in prompt and tokens > 10 and total > 8 * tokens
    assert _FakeChat.requests == []  # a dry run sends nothing


def test_llm_judge_through_a_fake_endpoint_scores_the_right_label_high(fake_endpoint, tmp_path):
    from build_map.labels.llm import AnswerCache
    from build_map.labels.scores import score_labels
    from tests.build_map.labels.test_scores import topic_tables

    features, examples = topic_tables()
    judge = LLMJudge(chat_for(fake_endpoint, model="judge"), AnswerCache(tmp_path / "judge.jsonl"))
    scored, summary = score_labels(features, examples, judge)
    assert judge.name.startswith("llm:judge@http://127.0.0.1")
    assert scored["detection"].tolist() == [1.0] * 6 and summary.above_chance == 1.0
    asked = len(_FakeChat.requests)
    score_labels(features, examples, judge)  # the same prompts again: answered from the cache
    assert len(_FakeChat.requests) == asked
    wrong = features.assign(label=["'weather'"] * 6)  # the endpoint answers "none": all tied
    assert score_labels(wrong, examples, judge)[0]["detection"].tolist() == [0.25] * 6


def test_self_labeller_and_llm_judge_run_on_the_tiny_model(tiny_loaded, label_tables):
    """The tiny model writes nonsense, but the path a Llama-3.1-8B-Instruct labeller takes runs:
    chat template, batched greedy generation, cleaned one-line labels, a judge that scores."""
    features, examples = label_tables
    chat = chat_for("self", tiny_loaded)
    labels = llm_labels(features, examples, chat, features=[0, 1, 2], cache=None, batch_size=2)
    assert set(labels.index) <= {0, 1, 2} and all("\n" not in t and len(t) <= 120 for t in labels)
    answers = iter(["2", "the first one", "1"])

    class Scripted:
        name = "scripted"

        def complete(self, prompts, max_tokens):
            return [next(answers) for _ in prompts]

    judge = LLMJudge(Scripted())
    snip = snippet([" a", " pizza"], [0.0, 1.0], 1.0)
    options = [(snip, (0,)), (snip, (1,))]
    assert judge.rate("'pizza'", options).tolist() == [0.0, 1.0]
    assert judge.rate("'pizza' ", options).tolist() == [0.0, 0.0]  # no number: all tied
    assert judge.name == "llm:scripted"
