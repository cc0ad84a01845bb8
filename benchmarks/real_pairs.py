"""fxdiff on pairs of independent real implementations: every pair x (clean + bugs) x (fp32, bf16).

    PYTHONPATH=. python benchmarks/real_pairs.py [--pairs a,b] [--dtypes fp32,bf16] [--json out.json]

Prints one row per run: pair, variant, dtype, verdict (diverged / clean / ERROR), expected verdict,
localised (for bugs: whether one first-divergence entry names the bug's module on both sides, see
``tests.real_pairs.localised``), the first-divergence modules reported (ref | cand) and the modules
expected, then totals: false alarms on correct ports, failed captures, bugs localised n/m.
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

from tests.real_pairs import BF16, PAIRS, build, run_pair  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": BF16}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--json")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    import fxdiff
    rows = []
    t0 = time.time()
    for pname in a.pairs.split(","):
        pair = PAIRS[pname]
        try:
            ref, _, _ = build(pair)
            args, kwargs = pair.inputs()
            ref_cap = fxdiff.capture(ref, args=args, kwargs=kwargs, mode="eval", seed=0)
        except Exception as e:  # noqa: BLE001
            ref_cap = None
            print(f"{pname}: reference capture failed: {type(e).__name__}: {e}", file=sys.stderr)
        for variant in [None] + [b.name for b in pair.bugs]:
            for dname in a.dtypes.split(","):
                if dname != "fp32" and not pair.bf16:
                    continue        # the library itself cannot run in bf16 (see Pair.note)
                t = time.time()
                report, ok, loc, d = run_pair(pair, variant, DTYPES[dname], ref_capture=ref_cap)
                bug = pair.bug(variant) if variant else None
                row = {"pair": pname, "variant": variant or "clean", "dtype": dname,
                       "expected": "diverged" if bug else "clean", "seconds": round(time.time() - t, 2)}
                if report is None:
                    row.update(verdict="ERROR", localised=False, error=d["error"][:300], where=d["where"], stage=d["stage"])
                else:
                    fd = d["frontier"]["backward" if bug is not None and bug.direction == "backward" else "forward"]
                    row.update(verdict="diverged" if report.diverged else "clean", localised=bool(loc),
                               reported=[(e["ref_module"], e["cand_module"], e["op"]) for e in fd[:4]],
                               first_forward=[(e["ref_module"], e["cand_module"], e["op"]) for e in d["frontier"]["forward"][:4]],
                               first_backward=[(e["ref_module"], e["cand_module"], e["op"]) for e in d["frontier"]["backward"][:4]],
                               summary=report.summary(),
                               outputs=[(o["ref"], o["cand"], o["metrics"].passed, o["metrics"].note) for o in report.outputs],
                               unmatched_ref_params=list(report.unmatched.get("ref_params", [])))
                if bug is not None:
                    row["expected_modules"] = (bug.ref_re, bug.cand_re, bug.direction + (", exact" if bug.exact else ""))
                    row["kind"] = bug.kind
                rows.append(row)
    print(f"{'pair':<20} {'variant':<19} {'dtype':<5} {'verdict':<9} {'expected':<9} {'loc':<4} reported (ref | cand) / expected")
    for r in rows:
        if r["verdict"] == "ERROR":
            rep = f"{r['stage']}: {r['error'][:110]} @ {r['where']}"
        else:
            rep = "; ".join(f"{x[0] or '<root>'} | {x[1] or '<root>'} ({x[2]})" for x in r["reported"][:2]) or "-"
            if len(r["reported"]) > 2:
                rep += f"; +{len(r['reported']) - 2}"
        exp = f"  [want {r['expected_modules'][0]} | {r['expected_modules'][1]}]" if "expected_modules" in r else ""
        loc = ("yes" if r["localised"] else "NO") if r["expected"] == "diverged" else "-"
        ok = r["verdict"] == r["expected"]
        print(f"{r['pair']:<20} {r['variant']:<19} {r['dtype']:<5} {r['verdict'] + ('' if ok else '!'):<9} "
              f"{r['expected']:<9} {loc:<4} {rep}{exp}")
    clean = [r for r in rows if r["expected"] == "clean"]
    bugs = [r for r in rows if r["expected"] == "diverged"]
    errors = [r for r in rows if r["verdict"] == "ERROR"]
    print()
    for dname in a.dtypes.split(","):
        c = [r for r in clean if r["dtype"] == dname]
        b = [r for r in bugs if r["dtype"] == dname]
        print(f"{dname}: false alarms on correct ports {sum(r['verdict'] == 'diverged' for r in c)}/{len(c)}, "
              f"clean {sum(r['verdict'] == 'clean' for r in c)}/{len(c)}; bugs detected "
              f"{sum(r['verdict'] == 'diverged' for r in b)}/{len(b)}, bugs localised "
              f"{sum(r['localised'] for r in b)}/{len(b)}; captures failed "
              f"{sum(r['verdict'] == 'ERROR' for r in c + b)}")
    for r in errors:
        print(f"  ERROR {r['pair']}/{r['variant']}/{r['dtype']} ({r['stage']}): {r['error'][:200]} at {r['where']}")
    print(f"total {time.time() - t0:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
