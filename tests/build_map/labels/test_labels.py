"""Labels: automatic ones are short and readable, imported ones win, bad files fail clearly, the
optional LLM labeller talks to an OpenAI-compatible endpoint (faked on 127.0.0.1)."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pandas as pd
import pytest

from build_map.labels.auto import auto_labels
from build_map.labels.files import LabelFileError, read_hide_file, read_label_file
from build_map.labels.llm import LLMLabelError, llm_labels
from build_map.labels.text import DEAD_LABEL, MAX_AUTO_CHARS, apply_labels, clean_label

N = 10


def _example(feature, words, focus, act=2.0, bucket="top", rank=0):
    acts = [0.0] * len(words)
    acts[focus] = act
    return {"feature": feature, "rank": rank, "bucket": bucket, "act": act, "tokens": words, "acts": acts}


@pytest.fixture
def tables():
    """Feature 0 fires on food words (its context holds the words it promotes), 1 on "thanks", 2 on " the" (which every feature's context has),
    3 is dead, the others fire on the byte-level newline/space markers and plain words."""
    rows = []
    for rank, word in enumerate(["Ġpizza", " pasta", " pizza"]):
        words = ["I", " like", " the", word, " food", " we", " eat", " now"]
        rows.append(_example(0, words, 3, act=3.0 - rank, rank=rank))
    for rank in range(3):
        rows.append(
            _example(
                1, ["Well", " thanks", " for", " the", " you", " welcome", " help"], 1, act=2.0, rank=rank
            )
        )
    for rank in range(3):
        rows.append(_example(2, ["on", " the", " mat"], 1, act=1.0, rank=rank))
    for feature in range(4, N):
        words = ["Ċ", f" word{feature}", " the", "▁x"]
        rows.append(_example(feature, words, 1 if feature % 2 else 0, act=1.5))
        rows.append({**_example(feature, words, 2, act=0.5, bucket="q50"), "acts": [0.0, 0.0, 0.5, 0.4]})
    examples = pd.DataFrame(rows)
    features = pd.DataFrame(
        {
            "feature": range(N),
            "dead": [i == 3 for i in range(N)],
            "top_logits": [["Ġfood", " eat", "123", "!!", " eat"], [" you", " welcome"], [" cat"], []]
            + [[f" out{i}", "\n"] for i in range(4, N)],
        }
    )
    return features, examples


def test_auto_labels_readable_and_distinct(tables):
    features, examples = tables
    labels = auto_labels(features, examples)
    assert len(labels) == N
    assert labels[3] == DEAD_LABEL
    live = [label for i, label in enumerate(labels) if i != 3]
    assert all(label and len(label) <= MAX_AUTO_CHARS for label in live)
    assert len(set(live)) == len(live)
    for label in labels:
        assert not re.search(r"[ĠĊ▁ĉ]", label), label
        assert not re.fullmatch(r"[\d\s,\[\]]+", label), label  # never a list of ids
    assert labels[0].startswith("'pizza'")
    assert "→ food, eat" in labels[0]
    assert "'thanks'" in labels[1] and "you" in labels[1]
    assert labels[2].startswith("'the'")  # the only token it fires on, even if common
    assert "'↵'" in labels[4]  # newline made visible rather than dropped


def test_auto_labels_prefer_specific_tokens(tables):
    """A token every feature fires on weighs less than one specific to the feature (TF-IDF)."""
    features, examples = tables
    common = examples[examples["feature"] >= 4].copy()
    common["acts"] = [[0.0, 1.0, 1.0, 0.0]] * len(common)  # fires on " wordN" and " the" equally
    labels = auto_labels(features[features["feature"] >= 4].reset_index(drop=True), common)
    assert all(label.startswith(f"'word{i}'") for i, label in zip(range(4, N), labels, strict=True))


def test_auto_labels_show_whole_words_and_skip_logit_fragments(tables):
    """A feature firing on the piece "strugg" of " struggle" reads 'struggle'; logit-lens tokens that
    never occur as words ("outheastern", or "acific" seen only where a window cuts " Pacific")
    stay out of the label, real words ("eat") stay in."""
    features, examples = tables
    pieces = ["acific", " I", " strugg", "le", " to", " eat", "<|im_end|>", "Ċ", "Good", "."]
    rows = [{**_example(0, pieces, 2, act=4.0), "acts": [0, 0, 4.0, 1.0, 0, 0, 0, 0, 0, 0]}]
    rows.append({**_example(1, pieces, 8, act=2.0), "acts": [0, 0, 0, 0, 0, 0, 1.0, 0, 2.0, 0]})
    features = features.iloc[:2].assign(
        top_logits=[["acific", "outheastern", " eat"], ["outheastern", "acific"]]
    )
    labels = auto_labels(features, pd.DataFrame(rows))
    assert labels[0] == "'struggle' → eat", labels
    assert labels[1].startswith("'Good'") and "→" not in labels[1] and "im_end" not in labels[1], labels


def test_clean_label_strips_controls_and_caps():
    assert clean_label("a\x00b\u202e\tc\n d") == "ab c d"
    assert len(clean_label("x" * 500)) == 120
    assert clean_label("x" * 500).endswith("…")
    assert clean_label(None) == ""


@pytest.mark.parametrize("kind", ["csv", "json-list", "json-map", "parquet"])
def test_imported_labels_win(tmp_path, tables, kind):
    features, examples = tables
    rows = pd.DataFrame({"feature": [0, 3, 7], "label": ["Food words", "dead but named", "<b>x</b>\x07"]})
    if kind == "csv":
        path = tmp_path / "labels.csv"
        rows.to_csv(path, index=False)
    elif kind == "json-list":
        path = tmp_path / "labels.json"
        path.write_text(json.dumps(rows.to_dict(orient="records")))
    elif kind == "json-map":
        path = tmp_path / "labels.json"
        path.write_text(
            json.dumps({str(f): label for f, label in zip(rows.feature, rows.label, strict=True)})
        )
    else:
        path = tmp_path / "labels.parquet"
        rows.to_parquet(path)
    imported = read_label_file(path, N)
    assert imported.to_dict() == {0: "Food words", 3: "dead but named", 7: "<b>x</b>"}
    out = apply_labels(features, auto_labels(features, examples), imported)
    assert out.loc[0, "label"] == "Food words" and out.loc[0, "label_source"] == "imported"
    assert out.loc[3, "label"] == "dead but named"
    assert out.loc[1, "label_source"] == "auto"
    assert (out["label_source"] == "imported").sum() == 3


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("labels.txt", "0,a\n", r"unknown label file type '\.txt'; use \.csv"),
        ("labels.csv", "id,label\n0,a\n", r"missing column\(s\) feature"),
        ("labels.csv", "feature,name\n0,a\n", r"missing column\(s\) label"),
        ("labels.csv", "feature,label\nfirst,a\n", r"feature ids must be integers; found 'first'"),
        ("labels.csv", "feature,label\n10,a\n", r"feature id 10 is out of range; valid ids are 0\.\.9"),
        ("labels.json", '[{"feature": -1, "label": "a"}]', r"out of range; valid ids are 0\.\.9"),
        ("labels.json", '{"2.5": "a"}', "must be integers"),
        ("labels.json", '"just text"', "must be a list of"),
        ("labels.json", "{not json", "not valid JSON"),
        ("labels.csv", "feature,label\n1,a\n1,b\n", "feature 1 has conflicting labels 'a' and 'b'"),
    ],
)
def test_bad_label_files(tmp_path, name, text, message):
    path = _write(tmp_path, name, text)
    with pytest.raises(LabelFileError, match=message) as info:
        read_label_file(path, N)
    assert str(path) in str(info.value)


def test_label_file_missing_and_duplicates(tmp_path):
    with pytest.raises(LabelFileError, match=r"does not exist") as info:
        read_label_file(tmp_path / "nope.csv", N)
    assert "nope.csv" in str(info.value)
    same = _write(tmp_path, "same.csv", "feature,label\n1,a\n1,a\n2,\n")
    assert read_label_file(same, N).to_dict() == {1: "a"}  # identical duplicates and empty labels are fine


def test_hide_files(tmp_path):
    text = _write(tmp_path, "hide.txt", "# features to hide\n3\n\n 7  # too spicy\n3\n")
    assert read_hide_file(text, N) == {3, 7}
    assert read_hide_file(_write(tmp_path, "h.csv", "feature,why\n1,x\n2,y\n"), N) == {1, 2}
    assert read_hide_file(_write(tmp_path, "bare.csv", "4\n5\n"), N) == {4, 5}
    assert read_hide_file(_write(tmp_path, "h.json", "[0, 9]"), N) == {0, 9}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("hide.txt", "1\nten\n", r"feature ids must be integers; found 'ten'"),
        ("hide.txt", "12\n", r"valid ids are 0\.\.9"),
        ("hide.json", '{"hide": [1]}', "must be a list of feature ids"),
        ("hide.csv", "a,b\n1,2\n", "needs a 'feature' column"),
        ("hide.xlsx", "1", r"unknown hide file type '\.xlsx'"),
    ],
)
def test_bad_hide_files(tmp_path, name, text, message):
    path = _write(tmp_path, name, text)
    with pytest.raises(LabelFileError, match=message) as info:
        read_hide_file(path, N)
    assert str(path) in str(info.value)
    with pytest.raises(LabelFileError, match="does not exist"):
        read_hide_file(tmp_path / "missing.txt", N)


# ---------------------------------------------------------------- LLM labeller


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


def test_llm_labels_need_configuration(tables, monkeypatch):
    for name in ("SAE_MAP_LLM_URL", "SAE_MAP_LLM_KEY", "SAE_MAP_LLM_MODEL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(LLMLabelError, match="SAE_MAP_LLM_URL and SAE_MAP_LLM_MODEL are not set"):
        llm_labels(*tables)


def test_llm_labels_from_fake_endpoint(tables, fake_endpoint, monkeypatch):
    features, examples = tables
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
    out = apply_labels(features, auto_labels(features, examples), read_label_series({1: "thanks"}), labels)
    assert list(out.loc[[0, 1, 2], "label_source"]) == ["llm", "imported", "auto"]


def read_label_series(mapping):
    return pd.Series(mapping, dtype=object)


def test_llm_endpoint_errors_are_clear(tables, fake_endpoint):
    _FakeChat.fail = True
    with pytest.raises(LLMLabelError, match="answered HTTP 500: model exploded"):
        llm_labels(*tables, url=fake_endpoint, model="m", features=[0])
    with pytest.raises(LLMLabelError, match="cannot be reached"):
        llm_labels(*tables, url="http://127.0.0.1:9/v1", model="m", features=[0], timeout=2)


def test_topic_words_keep_the_activating_side_of_auto_labels():
    from build_map.labels.text import AUTO, IMPORTED, topic_words

    assert topic_words("'pizza' / 'pasta' → food, eat", AUTO) == "'pizza' / 'pasta'"
    assert topic_words("Italian food → recipes", IMPORTED) == "Italian food → recipes"
