"""The llm-gateway-mcp benchmark suite: ``python -m bench [--quick | --smoke]``.

See bench/README.md for what it measures and docs/performance.md for the latest figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table, write the JSON. 0 when every goal passed,
    1 when a goal was missed, 2 when a column failed (wrong answers, a crash)."""
    from .common import RESULTS
    from .report import render
    from .runner import run_bench

    p = argparse.ArgumentParser(prog="python -m bench", description=main.__doc__)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="a ~30 s smoke run (fewer rounds)")
    g.add_argument(
        "--smoke", action="store_true", help="the smallest configuration (correctness only)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"JSON result path (default {RESULTS / 'latest.json'}; --smoke writes none)",
    )
    p.add_argument("--keep", type=Path, help="keep configs, ledgers and logs in this directory")
    args = p.parse_args(argv)
    profile = "quick" if args.quick else "smoke" if args.smoke else "full"
    doc = run_bench(profile, sys.stderr, keep=args.keep)
    sys.stdout.write(render(doc) + "\n")
    out = args.out if args.out is not None else (None if args.smoke else RESULTS / "latest.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
        sys.stdout.write(f"\nwrote {out}\n")
    if any(c["errors"] for c in doc["columns"].values()) or doc["panel"]["errors"]:
        return 2
    return 0 if all(g["pass"] for g in doc["goals"]) else 1
