"""A/B: run one bench script in two checkouts, interleaved, and compare the figures.

    uv run python bench/ab.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 3] [--script bench/bench.py]
                              [--json FILE] [-- extra args for the script]

Each checkout runs its own copy of the script with its own ``.venv`` (so each side
measures its own code), alternating A, B, B, A, ... so that a noisy stretch of the
machine hits both sides alike. VM-to-VM noise here is about ±150 ms: compare the
medians over rounds, not single runs. Figures with ``p50_s`` (or ``p50_ms``) and
flat numbers are compared; the table prints each side's per-round values, the
median of each and the ratio B/A (below 1: B is faster or smaller).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def flatten(data: Any, prefix: str = "") -> dict[str, float]:
    """Numbers of a bench report, one per dotted key (a summary counts by its p50)."""
    out: dict[str, float] = {}
    if isinstance(data, dict):
        if "p50_s" in data:
            return {prefix: float(data["p50_s"]) * 1000}
        if "p50_ms" in data:
            return {prefix: float(data["p50_ms"])}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, int | float) and not isinstance(data, bool):
        out[prefix] = float(data)
    return out


def run_side(checkout: Path, script: str, extra: list[str]) -> dict[str, float]:
    python = checkout / ".venv" / "bin" / "python"
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        proc = subprocess.run(
            [str(python), str(checkout / script), *extra, "--json", out.name],
            cwd=checkout,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            sys.exit(f"{checkout}: {script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return flatten(json.loads(Path(out.name).read_text()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("a", type=Path, help="the baseline checkout")
    parser.add_argument("b", type=Path, help="the checkout under test")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--script", default="bench/bench.py")
    parser.add_argument("--json", dest="json_path", type=Path)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    extra = argv[cut + 1 :]  # for the bench script
    sides: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    for round_no in range(args.rounds):
        order = ("A", "B") if round_no % 2 == 0 else ("B", "A")
        for side in order:
            checkout = args.a if side == "A" else args.b
            print(f"round {round_no + 1}/{args.rounds}: {side} ({checkout})", file=sys.stderr)
            sides[side].append(run_side(checkout, args.script, extra))
    keys = sorted(set().union(*sides["A"], *sides["B"]))
    rows = []
    print(f"{'figure':<58} {'A median':>10} {'B median':>10} {'B/A':>6}   per round A | B")
    for key in keys:
        a_vals = [r[key] for r in sides["A"] if key in r]
        b_vals = [r[key] for r in sides["B"] if key in r]
        if not a_vals or not b_vals:
            continue
        a_med, b_med = statistics.median(a_vals), statistics.median(b_vals)
        ratio = b_med / a_med if a_med else float("nan")
        rows.append({"figure": key, "a": a_vals, "b": b_vals, "ratio": ratio})
        fmt = ", ".join
        print(
            f"{key[:58]:<58} {a_med:>10.1f} {b_med:>10.1f} {ratio:>6.2f}   "
            f"{fmt(f'{v:.1f}' for v in a_vals)} | {fmt(f'{v:.1f}' for v in b_vals)}"
        )
    if args.json_path:
        args.json_path.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
