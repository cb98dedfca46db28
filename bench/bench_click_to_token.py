"""Select a feature → add it → send → first steered token, through the explorer's own objects.

    python bench/bench_click_to_token.py BUNDLE [--trials 5] [--feature N] [--device auto]

Loads BUNDLE with its model and SAE like ``explore`` does, then per trial: a simulated map click
(``MapView._handle_msg``), "Add to edits", Send; prints the time from the click to the first
steered token reaching the chat (Python side: add ~5-20 ms for the browser to paint it, see
tests/test_browser_explore.py for the on-screen figure) and the steered reply's tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

from explorer.cli import load_shared
from explorer.ui.app import ExplorerSession


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--feature", type=int, default=None, help="feature to steer (default: first visible)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prompt", default="Tell me about your favourite place.")
    args = parser.parse_args()
    shared = load_shared(
        argparse.Namespace(bundle=args.bundle, model=None, sae=None, device=args.device, dtype="auto")
    )
    features = shared.bundle.features
    feature = args.feature
    if feature is None:
        feature = int(features.index[~features["hidden"] & ~features["dead"]][0])
    first, rates = [], []
    for trial in range(args.trials + 1):  # trial 0 warms up
        session = ExplorerSession(shared)
        session.chat.max_new_tokens.value = args.max_new_tokens
        start = time.perf_counter()
        session.map._handle_msg({"type": "feature-click", "feature": feature})
        session.add_selected()
        columns = session.chat.send(args.prompt)
        session.chat.wait(600)
        steered = columns[-1]
        if steered.first_token_at is None:
            raise SystemExit(f"no steered token (status {steered.status}): {steered.pane.object}")
        end = steered.first_token_at
        if trial:
            first.append((end - start) * 1000)
            n_tokens = len(shared.engine.tokenizer(steered.text, add_special_tokens=False)["input_ids"])
            rates.append((n_tokens - 1) / max(steered.last_token_at - end, 1e-9))
    device = shared.engine.model.get_input_embeddings().weight.device
    print(
        f"{shared.bundle.manifest.get('model', {}).get('name')} on {device}: click → first steered token "
        f"median {statistics.median(first):.0f} ms (min {min(first):.0f}, max {max(first):.0f}, n={len(first)}); "
        f"pair streaming ~{statistics.median(rates):.1f} tokens/s per column"
    )
    shared.engine.close()


if __name__ == "__main__":
    main()
