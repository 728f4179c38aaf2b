"""Two (or more) `ddpm eval fid` results side by side, each with its 95% interval and real-data floor,
and each one's difference from the first with the difference's own interval.

    python bench/compare_fid.py BASELINE.json CANDIDATE.json [MORE.json ...]

The difference's standard error is sqrt(se_a^2 + se_b^2): the two sample sets are drawn independently
(each from its own model or settings), against the same reference. A difference whose interval holds 0 is
not a difference at this sample count. Results of other extractors, reference splits or sample counts
are refused or flagged: their FIDs are not on one scale (FID is biased upward at small counts).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

Z_95 = 1.959964


def load(path: str) -> dict:
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"compare_fid: cannot read {path}: {e}") from None
    if not isinstance(result, dict) or "fid" not in result:
        raise SystemExit(f"compare_fid: {path} is not an `ddpm eval fid` result")
    if "fid_se" not in result:
        raise SystemExit(f"compare_fid: {path} has no fid_se: score it again with today's `ddpm eval fid`")
    return result


def compare(results: dict[str, dict]) -> list[str]:
    """The table's lines for ``results`` (name -> eval fid result), the first the baseline."""
    (base_name, base), *others = results.items()
    scale = {(r["extractor"], r["reference"]["split"], r["reference"]["dataset"]) for r in results.values()}
    if len(scale) > 1:
        raise SystemExit(f"compare_fid: the results use different extractors or references: {sorted(scale)}")
    lines = [f"{'result':<28} {'n':>6} {'FID':>9} {'95% interval':>20} {'floor':>8} {'vs ' + base_name:>32}"]
    for name, r in results.items():
        lo, hi = r["fid_interval"]
        floor = r.get("real_floor", {}).get("fid")
        versus = ""
        if r is not base:
            diff = r["fid"] - base["fid"]
            se = math.hypot(r["fid_se"], base["fid_se"])
            d_lo, d_hi = diff - Z_95 * se, diff + Z_95 * se
            verdict = "no difference" if d_lo <= 0 <= d_hi else ("better" if diff < 0 else "worse")
            versus = f"{diff:+.2f} [{d_lo:+.2f}, {d_hi:+.2f}] {verdict}"
        note = " (screening)" if r.get("screening") else ""
        floor_text = f"{floor:.2f}" if floor is not None else "-"
        lines.append(
            f"{name[:28]:<28} {r['num_samples']:>6} {r['fid']:>9.2f} {f'[{lo:.2f}, {hi:.2f}]':>20} "
            f"{floor_text:>8} {versus:>32}{note}"
        )
    if len({r["num_samples"] for r in results.values()}) > 1:
        lines.append("note: the sample counts differ; FID is biased upward at smaller counts")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="eval fid result JSONs, the first the baseline")
    args = parser.parse_args(argv)
    if len(args.results) < 2:
        parser.error("give at least two results")
    results = {path: load(path) for path in args.results}
    names = {Path(path).parent.name or path: result for path, result in results.items()}
    print("\n".join(compare(names if len(names) == len(results) else results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
