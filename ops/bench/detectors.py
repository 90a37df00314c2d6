"""Detector throughput: MB/s of `detect_classes` on benign, adversarial and mixed turns at 1 KB, 64 KB and 1 MB.

Run: .venv/bin/python ops/bench/detectors.py [--seconds 0.5] [--skip-baseline]

Every input holds no hit, so every detector scans all of it (a hit ends the scan early). Each
cell is the best of repeated runs over at least `--seconds`. The baseline is the e-mail pattern
the detectors used before RE2, copied below, on the adversarial 64 KB input `"a." * 32_000`; it
takes seconds on its own. Prints a table; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable

from service.detectors import detect_classes

CATALOGUE = ["pan", "pii", "phi", "public"]
SIZES = {"1 KB": 1_000, "64 KB": 64_000, "1 MB": 1_000_000}
# The e-mail pattern before RE2: `[...]+` restarted at every word boundary of a long run of
# address characters with no "@", so the time grew with the square of the run's length.
OLD_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")

PROSE = (
    "Thanks for getting back to me so quickly. The cough started about a week ago and is worse at "
    "night; I have not had a fever. Could you summarise what the leaflet says about dosage, and "
    "whether it is safe to take with the tablets I already use in the morning? "
)
MIXED = (
    "Order 2024-11-30/77 shipped on 30.11.2024 at 14:05 (tracking 1Z 999 AA1 01 2345 6784). "
    "Call +1 (415) 555-0100 or write to support at example dot com; @jane said the café in "
    "Zürich charges CHF 12.50, not 1250. Ticket #48213, build 3.11.7-r2, see "
    "https://example.org/docs?id=7&lang=de. Tokyo 東京 office: 03-1234-5678. Invoice "
    '{"lines": [{"sku": "A-1002", "qty": 3, "price": 19.99}], "total": 59.97}. '
)
ADVERSARIAL = {
    '"a." repeated': "a.",
    '"1-" repeated': "1-",
    '"a@" repeated': "a@",
    '"1 " repeated': "1 ",
    '("1 " * 18 + "x")': "1 " * 18 + "x",
    '"123-45-" repeated': "123-45-",
    "near-miss addresses": "é" + "a" * 63 + "@b.coé",
}


def sized(unit: str, size: int) -> str:
    return (unit * (size // len(unit) + 1))[:size]


def turn(text: str) -> list[dict[str, object]]:
    return [{"type": "user_input", "content": [{"type": "text", "text": text}]}]


def best_seconds(run: Callable[[], object], budget: float) -> float:
    """The fastest of repeated runs, repeated for at least `budget` seconds (and at least twice)."""
    best, spent, runs = float("inf"), 0.0, 0
    while spent < budget or runs < 2:
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return best


def throughput(text: str, budget: float) -> float:
    steps = turn(text)
    found = detect_classes(steps, CATALOGUE)
    if found:
        raise SystemExit(f"benchmark input holds a hit ({sorted(found)}): it would not be scanned to the end")
    seconds = best_seconds(lambda: detect_classes(steps, CATALOGUE), budget)
    return len(text.encode()) / seconds / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="time spent per cell (default 0.5)")
    parser.add_argument("--skip-baseline", action="store_true", help="skip the old e-mail pattern (seconds)")
    args = parser.parse_args()

    rows = {"benign prose": PROSE, "realistic mixed turn": MIXED} | ADVERSARIAL
    width = max(map(len, rows)) + 2
    print("detect_classes throughput, MB/s (higher is better)")
    print("input".ljust(width) + "".join(size.rjust(10) for size in SIZES))
    for name, unit in rows.items():
        cells = [throughput(sized(unit, size), args.seconds) for size in SIZES.values()]
        print(name.ljust(width) + "".join(f"{cell:10.1f}" for cell in cells), flush=True)

    if args.skip_baseline:
        return
    text = "a." * 32_000
    new = best_seconds(lambda: detect_classes(turn(text), CATALOGUE), args.seconds)
    start = time.perf_counter()
    OLD_EMAIL.search(text)
    old = time.perf_counter() - start
    print()
    print(f'adversarial 64 KB input "a." * 32_000 ({len(text):,} bytes):')
    print(f"  old e-mail regex alone     {old:10.4f} s  {len(text) / old / 1e6:10.3f} MB/s")
    print(f"  detect_classes, all (RE2)  {new:10.4f} s  {len(text) / new / 1e6:10.1f} MB/s  ({old / new:,.0f}x faster)")


if __name__ == "__main__":
    main()
