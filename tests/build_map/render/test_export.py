"""`build-map export`: one offline HTML file with the map and every visible feature's card.

Decodes the card data embedded in the page and checks it against the bundle; checks that the page
reaches no other host, that untrusted text stays text, that hidden features are nowhere, and (in
headless Chromium, from file://) that `#feature=N` and clicks open the right card.
"""

from __future__ import annotations

import gzip
import re

import numpy as np
import pandas as pd
import pytest

from build_map.bundle.write import write_bundle
from build_map.cli.main import main as build_map_main
from build_map.render.export.cards import ExportConfig, ExportError
from build_map.render.export.codec import (
    TEXT_ALPHABET,
    encode_text,
    huffman_code_lengths,
    huffman_encode,
    length_counts,
)
from build_map.render.export.page import export_bundle
from build_map.render.offline_assets import OfflineAssetsError, external_references, node_modules_dir
from tests.support.browser import offline_browser
from tests.support.card_data import cards, decode_text, huffman_decode, read_card_data

N = 40
SCRIPT_LABEL = '<script>alert("label")</script> & <b>bold</b>'
SCRIPT_FEATURE, HIDDEN, DEAD = 4, (3, 11, 12), 20
TOKENS = [" the", " cat", "<b>", "&amp;", "\n", " caf\u00e9", "\u2212", "</script>", " sat", "."]


def tiny_tables(n: int = N):
    rng = np.random.default_rng(0)
    coarse = np.arange(n) % 3
    fine = np.arange(n) % 6
    xy = (
        np.array([[0, 0], [8, 0], [4, 7]], dtype=float)[coarse]
        + rng.normal(0, 1, (n, 2))
        + fine[:, None] // 3
    )
    labels = [f"{['apple', 'river', 'python'][i % 3]} feature {i}" for i in range(n)]
    labels[SCRIPT_FEATURE] = SCRIPT_LABEL
    features = pd.DataFrame(
        {
            "feature": np.arange(n),
            "x": xy[:, 0],
            "y": xy[:, 1],
            "label": labels,
            "label_source": "auto",
            "density": rng.uniform(1e-4, 0.05, n),
            "max_act": rng.uniform(1.0, 5.0, n),
            "mean_act": rng.uniform(0.2, 1.0, n),
            "detection": np.where(np.arange(n) % 4 == 0, np.nan, (np.arange(n) % 10) / 10),
            "top_tokens": [[TOKENS[i % 10], TOKENS[(i + 2) % 10]] for i in range(n)],
            "top_logits": [[f"up{i}", "<i>"] for i in range(n)],
            "bottom_logits": [[f"down{i}"] if i % 5 else [] for i in range(n)],
            # neighbour lists include hidden features (3, 11, 12) and one out of range (999)
            "neighbors": [[(i + 1) % n, 3, (i + 7) % n, 999] for i in range(n)],
            "dead": np.arange(n) == DEAD,
            "hidden": np.isin(np.arange(n), HIDDEN),
            "cluster_0": [["Fruit & food", "Water <places>", "Code"][c] for c in coarse],
            "cluster_1": [f"fine {f}" for f in fine],
        }
    )
    rows = []
    for i in range(n):
        if i == DEAD:
            continue
        for rank in range(12 if i == 0 else 3):  # feature 0 has more than max_examples
            tokens = [TOKENS[(i + rank + t) % 10] for t in range(6)]
            acts = [0.0, 0.5 * (rank + 1), 0.0, 2.0 + i + rank, 0.25, 0.0]
            rows.append(("top", i, rank, 2.0 + i + rank, tokens, acts))
        rows.append(("q50", i, 0, 0.5, ["ignored"], [0.5]))
    examples = pd.DataFrame(rows, columns=["bucket", "feature", "rank", "act", "tokens", "acts"])
    examples = examples.sample(frac=1.0, random_state=0)  # not in (feature, rank) order on purpose
    clusters = pd.DataFrame(
        {
            "level": 0,
            "cluster": [0, 1, 2],
            "name": ["Fruit & food", "Water <places>", "Code"],
            "size": 1,
            "x": 0.0,
            "y": 0.0,
            "parent": -1,
        }
    )
    return features, examples, clusters


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    """Keep DataMapPlot's and the project's caches out of the user's folders."""
    try:
        node_modules_dir()
    except OfflineAssetsError as error:
        pytest.skip(f"map assets not installed: {error}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
        patch.setenv("SAE_MAP_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    features, examples, clusters = tiny_tables()
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    render = lambda folder: (folder / "map.html").write_text("<html></html>")  # noqa: E731 - not used by export
    manifest = {"model": {"id": "tiny-llama"}, "hookpoint": "model.layers.1"}
    return write_bundle(
        out, manifest=manifest, features=features, examples=examples, clusters=clusters, render_map=render
    )


@pytest.fixture(scope="module")
def exported(bundle, offline_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "features.html"
    summary = export_bundle(bundle, out, config=ExportConfig(max_examples=10))
    return summary, out.read_text(encoding="utf-8")


# ------------------------------------------------------------------ the file


def test_one_card_per_visible_feature(exported):
    summary, html = exported
    features, examples, _ = tiny_tables()
    header, arrays = read_card_data(html)
    decoded = cards(header, arrays)
    visible = [i for i in range(N) if i not in HIDDEN]
    assert [c["feature"] for c in decoded] == visible  # the dead one has a card too
    assert summary.n_features == len(visible) and summary.n_hidden == len(HIDDEN)
    for card in decoded:
        row = features.iloc[card["feature"]]
        assert card["label"] == row["label"]
        assert card["clusters"] == [row["cluster_0"], row["cluster_1"]]
        assert card["density"] == pytest.approx(row["density"], rel=1e-6)
        assert card["max_act"] == pytest.approx(row["max_act"], rel=1e-3)
        assert card["mean_act"] == pytest.approx(row["mean_act"], rel=1e-3)
        assert card["detection"] == pytest.approx(row["detection"], nan_ok=True)
        for name in ("top_tokens", "top_logits", "bottom_logits"):
            assert card[name] == list(row[name])
        assert card["neighbors"] == [n for n in row["neighbors"] if n not in HIDDEN and n < N]
        top = examples[(examples["feature"] == card["feature"]) & (examples["bucket"] == "top")]
        top = top.sort_values("rank").head(10)
        assert len(card["examples"]) == len(top)
        for got, (_, want) in zip(card["examples"], top.iterrows(), strict=True):
            assert got["tokens"] == list(want["tokens"])
            assert got["act"] == pytest.approx(want["act"], rel=1e-3)
            assert max(got["quantised"]) == 255  # relative to the example's own maximum
            assert got["acts"] == pytest.approx(list(want["acts"]), abs=max(want["acts"]) / 255)


def test_no_external_references(exported):
    _, html = exported
    assert external_references(html) == []
    assert (
        re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:|//|\.\.?/)""", html, flags=re.IGNORECASE) == []
    )
    assert "fonts.googleapis.com" not in html


def test_untrusted_text_is_not_live_html(exported):
    _, html = exported
    assert "<script>alert" not in html
    assert "Water <places>" not in html
    data = html.index('id="sae-card-data"')
    card_script = html[data : html.index("</script>", html.index("<script>", data))]
    assert "window.saeCards" in card_script
    assert "innerHTML" not in card_script  # the card script builds text nodes


def test_hidden_features_absent(exported):
    _, html = exported
    header, arrays = read_card_data(html)
    assert not set(HIDDEN) & set(arrays["feature"].tolist())
    assert not set(HIDDEN) & set(arrays["neighbors"].tolist())
    hidden_labels = set(tiny_tables()[0]["label"].iloc[list(HIDDEN)])
    assert not hidden_labels & set(header["labels"])


def test_overwrite_needs_consent(bundle, exported, tmp_path):
    out = tmp_path / "exists.html"
    out.write_text("keep me")
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        export_bundle(bundle, out)
    assert out.read_text() == "keep me"
    with pytest.raises(ExportError, match="is a folder"):
        export_bundle(bundle, tmp_path)


def test_cli_wiring(bundle, tmp_path, capsys, monkeypatch):
    # The map is tested above; here only the arguments and the card data matter.
    monkeypatch.setattr(
        "build_map.render.export.page._render_map", lambda *args: "<html><body></body></html>"
    )
    out = tmp_path / "cli.html"
    out.write_text("old")
    assert build_map_main(["export", str(bundle), str(out), "--overwrite", "--max-examples", "1"]) == 0
    header, arrays = read_card_data(out.read_text(encoding="utf-8"))
    assert int(np.diff(arrays["ex_offsets"]).max()) == 1
    assert "feature cards" in capsys.readouterr().out


def test_sparse_bundle_exports(tmp_path, monkeypatch):
    """No examples at all, missing labels and cluster names, empty lists: still one card each."""
    monkeypatch.setattr(
        "build_map.render.export.page._render_map", lambda *args: "<html><body></body></html>"
    )
    features, examples, clusters = tiny_tables(5)
    features["label"] = [None, "b", None, "d", "e"]
    features["cluster_1"] = [None, "x", "x", None, "y"]
    features["top_tokens"] = [[]] * 5
    features["neighbors"] = [[]] * 5
    features["hidden"] = [False, True, False, False, False]
    empty = examples.iloc[:0]
    render = lambda folder: (folder / "map.html").write_text("<html></html>")  # noqa: E731
    path = write_bundle(
        tmp_path / "b", manifest={}, features=features, examples=empty, clusters=clusters, render_map=render
    )
    summary = export_bundle(path, tmp_path / "sparse.html")
    decoded = cards(*read_card_data(summary.out.read_text(encoding="utf-8")))
    assert [c["feature"] for c in decoded] == [0, 2, 3, 4]
    assert [c["label"] for c in decoded] == ["", "", "d", "e"]
    assert [c["clusters"][1] for c in decoded] == ["", "x", "", "y"]
    assert all(c["examples"] == [] and c["top_tokens"] == [] and c["neighbors"] == [] for c in decoded)
    assert decoded[2]["top_logits"] == ["up3", "<i>"]


# ------------------------------------------------------------------ codecs


def test_huffman_round_trip():
    rng = np.random.default_rng(1)
    for n_symbols in (1, 2, 7, 3000):
        counts = np.sort(rng.zipf(1.2, n_symbols))[::-1]
        lengths = huffman_code_lengths(counts)
        assert (2.0**-lengths).sum() <= 1.0 and np.all(np.diff(lengths) >= 0)
        symbols = rng.integers(0, n_symbols, 500)
        stream, bits = huffman_encode(symbols, lengths)
        assert huffman_decode(stream, 0, int(bits.sum()), length_counts(lengths)) == symbols.tolist()
        middle = int(bits[:100].sum())
        assert huffman_decode(stream, middle, middle + int(bits[100]), length_counts(lengths)) == [
            symbols[100]
        ]
    skewed = huffman_code_lengths(np.array([10**12] + [1] * 5000))
    assert skewed.max() <= 24


def test_text_codec_round_trip():
    rng = np.random.default_rng(2)
    assert not set("<>&") & set(TEXT_ALPHABET) and len(TEXT_ALPHABET) == 91
    for size in (0, 1, 12, 13, 14, 4097):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        text = encode_text(data)
        assert len(text) <= 2 * (size * 8 // 13 + 1)
        assert decode_text(text, size) == data
        assert decode_text("\r\n".join(text[i : i + 76] for i in range(0, len(text), 76)), size) == data


# ------------------------------------------------------------------ in the browser


def _open(browser, path, fragment=""):
    page = browser.new_page((1400, 900))
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(path.as_uri() + fragment)
    page.wait_for_function(
        "window.saeCards && window.saeCards.ready && window.saeCards.mapReady", timeout=60000
    )
    return page, dialogs


def _card_label(page):
    page.wait_for_selector(".sae-panel.sae-open .sae-card-label")
    return page.inner_text(".sae-card-label")


@pytest.mark.browser
def test_deep_link_opens_card_and_follows_hash(exported):
    summary, _ = exported
    with offline_browser() as browser:
        page, dialogs = _open(browser, summary.out, f"#feature={SCRIPT_FEATURE}")
        assert _card_label(page) == SCRIPT_LABEL  # the literal text, not markup
        assert page.eval_on_selector(".sae-card", "el => el.dataset.feature") == str(SCRIPT_FEATURE)
        assert page.locator(".sae-card script, .sae-card b").count() == 0
        assert page.locator(".sae-token").count() > 0 and page.locator(".sae-token-peak").count() > 0
        neighbours = page.locator(".sae-card .sae-links a").all_inner_texts()
        assert neighbours and not any(
            text.startswith(f"#{h}\n") or text == f"#{h}" for h in HIDDEN for text in neighbours
        )
        page.click(".sae-card .sae-links a >> nth=0")  # a neighbour link: the hash and the card follow
        page.wait_for_function("location.hash === '#feature=5'")
        page.wait_for_function("document.querySelector('.sae-card').dataset.feature === '5'")
        page.evaluate("location.hash = '#feature=3'")  # hidden: no card
        page.wait_for_selector(".sae-message")
        assert "not in this export" in page.inner_text(".sae-message")
        page.screenshot(path=str(summary.out.with_suffix(".png")))
        assert dialogs == [] and browser.blocked == []
        assert not [line for line in browser.console if line.startswith("pageerror")]


@pytest.mark.browser
def test_click_on_point_opens_card_and_sets_hash(exported):
    summary, _ = exported
    with offline_browser() as browser:
        page, _ = _open(browser, summary.out)
        drawn = page.evaluate("Array.from(datamap.metaData.feature)")
        assert not set(HIDDEN) & set(drawn) and DEAD not in drawn
        target = page.evaluate(
            """() => {
              const pos = datamap.pointLayer.props.data.attributes.getPosition.value;
              const viewport = datamap.deckgl.getViewports()[0];
              for (let row = 0; row < datamap.metaData.feature.length; row++) {
                const [x, y] = viewport.project([pos[2 * row], pos[2 * row + 1]]);
                const picked = datamap.deckgl.pickObject({x, y, radius: 0});
                if (picked && picked.index === row && x < 900) return {x, y, feature: datamap.metaData.feature[row]};
              }
              return null;
            }"""
        )
        assert target is not None
        page.mouse.click(target["x"], target["y"])
        page.wait_for_function(f"location.hash === '#feature={target['feature']}'")
        page.wait_for_function(
            f"document.querySelector('.sae-card')?.dataset.feature === '{target['feature']}'"
        )
        page.fill("#text-search", "python feature 1")  # search lists matching labels; a result opens its card
        page.wait_for_selector(".sae-search-results.sae-open a")
        results = page.locator(".sae-search-results a").all_inner_texts()
        assert results and all("python feature 1" in r for r in results)
        assert not any("python feature 11" in r for r in results)  # hidden
        page.click(".sae-search-results a >> nth=0")
        page.wait_for_function("location.hash === '#feature=14'")
        assert _card_label(page) == "python feature 14"
        assert browser.blocked == []


@pytest.mark.browser
def test_browser_decodes_text_with_line_breaks(exported):
    """The page's decoder skips characters a mail program may add (it is the same code as the worker's)."""
    summary, _ = exported
    data = gzip.compress(bytes(range(256)) * 40)
    text = encode_text(data)
    wrapped = "\r\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    with offline_browser() as browser:
        page, _ = _open(browser, summary.out)
        for sample in (text, wrapped):
            decoded = page.evaluate(
                "async ([text, n]) => Array.from(new Uint8Array(await window.saeCards.decoder()(text, n)))",
                [sample, len(data)],
            )
            assert bytes(decoded) == bytes(range(256)) * 40


def test_export_checks_its_output_path_and_options_before_any_work(tmp_path):
    from build_map.render.export.page import check_out

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(ExportError, match="notes.txt is a file, not a folder"):
        check_out(a_file / "deeper" / "x.html", overwrite=False)
    with pytest.raises(ExportError, match="cannot be written"):
        check_out("/proc/features.html", overwrite=False)
    with pytest.raises(ExportError, match="already exists"):
        check_out(a_file, overwrite=False)
    assert check_out(tmp_path / "new" / "x.html", overwrite=False) == tmp_path / "new" / "x.html"
    with pytest.raises(ExportError, match="--max-examples -1: give 0 or more"):
        ExportConfig(max_examples=-1)
    assert a_file.read_text() == "mine"
