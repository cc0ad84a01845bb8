"""fxdiff on pairs of independent real implementations: every pair x (correct port + bugs) x
(float32, bfloat16 candidate), compared live against a float32 capture of the reference.

    PYTHONPATH=. python benchmarks/real_pairs.py [--pairs a,b] [--json out.json]

One row per run: pair, variant, dtype, verdict (match / within noise / diverged / ERROR), whether
the first divergence names the bug's module on both sides (``tests.real_pairs.localised``), the
bug's effect (its relative error in float32 at the first divergence) and, for a bfloat16
candidate, what is expected: a bug whose effect exceeds bfloat16's noise level must be localised,
the others reported "within noise". Then the totals that go in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

import fxdiff  # noqa: E402
from fxdiff.judge.noise import OWN_ROUNDING  # noqa: E402
from tests.real_pairs import BF16, PAIRS, build, run_pair  # noqa: E402

BF16_NOISE = OWN_ROUNDING * torch.finfo(BF16).eps


def effect(report, bug) -> float:
    """The bug's relative error at the first divergence (0 when nothing diverged)."""
    entries = report.first_divergence()["backward" if bug.direction == "backward" else "forward"]
    return max((e["error"] or 0.0 for e in entries), default=0.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rows, t0 = [], time.time()
    for name in a.pairs.split(","):
        pair = PAIRS[name]
        ref, _, _ = build(pair)
        args, kwargs = pair.inputs()
        ref_capture = fxdiff.capture(ref, args=args, kwargs=kwargs, mode="eval", seed=0)
        for variant in [None] + [b.name for b in pair.bugs]:
            bug = pair.bug(variant) if variant else None
            size = None
            for dname, dtype in (("fp32", torch.float32), ("bf16", BF16)):
                report, _, loc, d = run_pair(pair, variant, dtype, ref_capture=ref_capture)
                row = {"pair": name, "variant": variant or "correct", "dtype": dname,
                       "verdict": report.verdict if report else "ERROR", "localised": bool(loc) and bug is not None}
                if report is None:
                    row["error"] = f"{d['stage']}: {d['error'][:200]} at {d['where']}"
                elif bug is not None:
                    size = effect(report, bug) if dtype == torch.float32 else size
                    row["effect"] = size
                    row["expect"] = "localised" if dtype == torch.float32 or size > BF16_NOISE else "within noise"
                    fd = d["frontier"]["backward" if bug.direction == "backward" else "forward"]
                    row["reported"] = [f"{e['ref_module'] or '<root>'} | {e['cand_module'] or '<root>'}" for e in fd[:2]]
                rows.append(row)
    print(f"{'pair':<20} {'variant':<18} {'dtype':<5} {'verdict':<13} {'effect':>8}  {'expected':<13} {'result':<7} first divergence")
    for r in rows:
        if "expect" in r:
            good = r["localised"] or (r["expect"] == "within noise" and r["verdict"] != "match")
            result = "ok" if good else "MISSED"
        else:
            good = r["verdict"] in ("match", "within noise")
            result = "ok" if good else "FALSE ALARM"
        r["ok"] = good
        eff = f"{r['effect']:.2g}" if r.get("effect") is not None else "-"
        print(f"{r['pair']:<20} {r['variant']:<18} {r['dtype']:<5} {r['verdict']:<13} {eff:>8}  "
              f"{r.get('expect', 'no divergence'):<13} {result:<7} {'; '.join(r.get('reported', [])) or r.get('error', '')}")
    print()
    for dname in ("fp32", "bf16"):
        mine = [r for r in rows if r["dtype"] == dname]
        correct = [r for r in mine if r["variant"] == "correct"]
        bugs = [r for r in mine if "expect" in r]
        loud = [r for r in bugs if r["expect"] == "localised"]
        quiet = [r for r in bugs if r["expect"] == "within noise"]
        print(f"{dname}: correct ports clean {sum(r['ok'] for r in correct)}/{len(correct)}; bugs localised "
              f"{sum(r['localised'] for r in loud)}/{len(loud)}"
              + (f"; bugs below bf16 noise reported 'within noise' {sum(r['ok'] for r in quiet)}/{len(quiet)}" if quiet else "")
              + f"; errors {sum(r['verdict'] == 'ERROR' for r in mine)}")
    print(f"total {time.time() - t0:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
