"""Does the server hold up under hours of chat? N browser sessions against one ``explore`` server.

Starts its own server on a bundle (default: the cached demo bundle), opens N pages in headless
Chromium (Debian's, through Playwright), each with a deep link to a different feature (so the
click strength applies and every turn has a default and a steered reply), and has each page chat
for T minutes: send, wait for both replies, send again. Then the pages close, and a second round
of N fresh pages does the same against the same server.

Printed: replies completed and errors per round; the server's RSS every 15 s; RSS growth from the
end of the first minute to the end of round 1 (target ≤ 10 %), across round 2 (≤ 5 %); turn time
against turn number (target: turn 10 ≤ 1.5 × turn 2). ``--no-memory-trim`` runs the server
without its memory remedies (glibc arena cap, ``malloc_trim`` after each batch) for a baseline.

    python bench/bench_soak.py [BUNDLE] [--sessions 4] [--minutes 5] [--rounds 2] [--tokens 40]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from explorer.server import free_port  # noqa: E402
from tests.explorer.test_browser import DEEP_JS  # noqa: E402
from tests.support.browser import offline_browser  # noqa: E402

MESSAGES = (
    "Tell me about your weekend.",
    "What should I cook tonight?",
    "Any ideas for a short trip?",
    "What is a good book to read?",
    "How do I get better at running?",
    "What music do you like?",
)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def steerable_features(bundle: Path, n: int) -> list[int]:
    import pandas as pd

    features = pd.read_parquet(
        bundle / "features.parquet", columns=["feature", "dead", "hidden", "steerability"]
    )
    live = features[~features["dead"] & ~features["hidden"]]
    if live["steerability"].notna().any():
        live = live.sort_values("steerability", ascending=False)
    return [int(f) for f in live["feature"].head(n)]


class Chatter:
    """One page chatting: sends a message whenever its last turn is done."""

    def __init__(self, browser, url: str, feature: int, tokens: int, index: int):
        self.index, self.page = index, browser.new_page(viewport=(1400, 900))
        self.page.add_init_script(DEEP_JS)
        self.page.goto(f"{url}?feature={feature}")
        self.page.wait_for_function("() => window.__deepAll('.edit-row').length === 1", timeout=120_000)
        self.page.get_by_label("Max new tokens").fill(str(tokens))
        self.page.get_by_label("Max new tokens").press("Enter")
        self.sent_at: float | None = None
        self.turn_seconds: list[float] = []
        self.errors = 0

    def step(self, now: float, stop_sending: bool) -> bool:
        """Advance; False once idle after ``stop_sending``."""
        if self.sent_at is not None:
            if not self.page.get_by_role("button", name="Send").is_enabled():
                return True
            self.turn_seconds.append(now - self.sent_at)
            self.errors = self.page.evaluate("() => window.__deepAll('.notice.error').length")
            self.sent_at = None
        if stop_sending:
            return False
        text = MESSAGES[(len(self.turn_seconds) + self.index) % len(MESSAGES)]
        self.page.locator("textarea").fill(text)
        send = self.page.get_by_role("button", name="Send")
        send.click()
        self.sent_at = time.monotonic()
        deadline = self.sent_at + 10
        while send.is_enabled() and time.monotonic() < deadline:  # the turn has started
            time.sleep(0.05)
        return True


def run_round(browser, url, features, args, pid, samples, t0) -> list[Chatter]:
    chatters = [Chatter(browser, url, f, args.tokens, i) for i, f in enumerate(features)]
    end = time.monotonic() + 60 * args.minutes
    next_sample = time.monotonic()
    active = True
    while active:
        now = time.monotonic()
        if now >= next_sample:
            samples.append((now - t0, rss_mb(pid)))
            print(f"  t={now - t0:6.0f}s  RSS {samples[-1][1]:7.0f} MB", flush=True)
            next_sample += 15
        active = any([c.step(now, now >= end) for c in chatters])
        time.sleep(0.2)
    for chatter in chatters:
        chatter.page.close()
    return chatters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", default=None)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=40, help="max new tokens per reply")
    parser.add_argument("--no-memory-trim", action="store_true", help="run the server without its remedies")
    args = parser.parse_args()
    if args.bundle is None:
        from build_map.pipeline.demo import demo_bundle

        args.bundle = str(demo_bundle()[0])
    bundle = Path(args.bundle)
    port = free_port()
    command = [sys.executable, "-m", "explorer", str(bundle), "--port", str(port), "--no-show"]
    command += ["--no-memory-trim"] if args.no_memory_trim else []
    log = open(Path("/tmp") / f"bench_soak_{port}.log", "w+")  # noqa: SIM115 (read at the end)
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd="/tmp")
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "bundle/map.html", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        features = steerable_features(bundle, args.sessions)
        print(f"server pid {server.pid} on {bundle}; {args.sessions} sessions x {args.minutes} min x "
              f"{args.rounds} rounds, features {features}, memory trim {'off' if args.no_memory_trim else 'on'}")  # fmt: skip
        t0 = time.monotonic()
        rounds = []
        with offline_browser() as browser:
            for number in range(1, args.rounds + 1):
                print(f"round {number}", flush=True)
                samples: list[tuple[float, float]] = []
                chatters = run_round(browser, url, features, args, server.pid, samples, t0)
                time.sleep(15)
                samples.append((time.monotonic() - t0, rss_mb(server.pid)))
                print(f"  pages closed, t={samples[-1][0]:6.0f}s  RSS {samples[-1][1]:7.0f} MB")
                rounds.append((samples, chatters))
            page_errors = [c for c in browser.console if c.startswith("pageerror")]
        report(rounds, page_errors)
    finally:
        server.terminate()
        server.wait(30)
        log.seek(0)
        tail = [line for line in log.read().splitlines() if "Traceback" in line or "ERROR" in line]
        print(f"server errors in its log: {len(tail)}")
    return 0


def report(rounds, page_errors) -> None:
    for number, (samples, chatters) in enumerate(rounds, start=1):
        turns = sum(len(c.turn_seconds) for c in chatters)
        errors = sum(c.errors for c in chatters)
        start = samples[0][1] if number > 1 else next((m for t, m in samples if t >= 60), samples[0][1])
        growth = 100 * (samples[-1][1] / start - 1)
        what = "from the end of minute 1" if number == 1 else "across the round"
        print(f"round {number}: {turns} turns ({2 * turns} replies) completed, {errors} error notices; "
              f"RSS {start:.0f} → {samples[-1][1]:.0f} MB ({growth:+.1f} % {what})")  # fmt: skip
    chatters = [c for _, cs in rounds for c in cs]
    by_turn: dict[int, list[float]] = {}
    for chatter in chatters:
        for turn, seconds in enumerate(chatter.turn_seconds, start=1):
            by_turn.setdefault(turn, []).append(seconds)
    line = ", ".join(f"{t}: {statistics.median(s):.1f}s" for t, s in sorted(by_turn.items()))
    print(f"median turn time by turn number: {line}")
    if 2 in by_turn and 10 in by_turn:
        ratio = statistics.median(by_turn[10]) / statistics.median(by_turn[2])
        print(f"turn 10 / turn 2 = {ratio:.2f}x (target <= 1.5x)")
    print(f"page errors: {len(page_errors)}")


if __name__ == "__main__":
    sys.exit(main())
