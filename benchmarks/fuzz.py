"""The long fuzzing run: mutated captures, bad command lines and mutated reports, in process.

    python benchmarks/fuzz.py [--cases 5000] [--seed 0] [--reports 200] [--json out.json]

Prints an outcome table by mutation kind (cases, clear errors, usage errors, correct verdicts,
unclear messages, internal errors, tracebacks, hangs, silent acceptances, executed payloads), then
every distinct crash site (exception type at file:line in fxdiff, and the kinds that reached it)
and every silent-acceptance class. Exit 1 when anything bad happened. See tests/fuzzing.py.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import fuzzing as fz  # noqa: E402


def family_of(r: fz.CaseResult) -> str:
    return r.kind.split(".")[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=5000, help="mutated captures (each through --commands)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reports", type=int, default=200, help="mutated reports (each: render, view)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--commands", default="inspect,compare,compare_ref,load",
                    help="what each mutated capture goes through (see fuzzing.run_mutation)")
    ap.add_argument("--work", help="work directory (default: a new temporary one)")
    ap.add_argument("--json", help="write every case result here")
    ap.add_argument("--by", choices=["kind", "family"], default="kind")
    a = ap.parse_args()

    torch.set_num_threads(1)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="fxdiff-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    import fxdiff
    print(f"fxdiff from {fxdiff.__file__}, torch {torch.__version__}, work dir {work}", flush=True)
    start = time.perf_counter()
    good, spec = fz.make_good_capture(work)
    size = sum(f.stat().st_size for f in good.iterdir())
    print(f"good capture {good} ({size / 1024:.0f} KiB)", flush=True)

    results: list[fz.CaseResult] = []
    mutator = fz.Mutator(good, seed=a.seed, work=work)
    commands = tuple(a.commands.split(","))
    t = time.perf_counter()
    for i, mut in enumerate(mutator.generate(a.cases)):
        results += fz.run_mutation(mut, good, work, commands=commands, timeout=a.timeout)
        if (i + 1) % 250 == 0:
            bad = sum(r.outcome in fz.BAD for r in results)
            print(f"  {i + 1}/{a.cases} mutated captures, {time.perf_counter() - t:.0f} s, {bad} bad outcomes",
                  flush=True)
    n_caps = a.cases
    lines = fz.bad_command_lines(good, spec, work / "cli")
    t = time.perf_counter()
    for line in lines:
        results.append(fz.run_bad_line(line, timeout=a.timeout))
    print(f"  {len(lines)} bad command lines, {time.perf_counter() - t:.0f} s", flush=True)
    report = fz.good_report(good, work)
    for kind, doc in fz.report_mutations(report, random.Random(a.seed), a.reports):
        for command in ("render", "view"):
            results.append(fz.run_report_case(kind, doc, work, command, timeout=a.timeout))
    elapsed = time.perf_counter() - start

    key = (lambda r: f"{r.family}/{family_of(r)}") if a.by == "family" else (lambda r: f"{r.kind} [{r.command}]")
    print()
    print(fz.table(results, key))
    print()
    print("By family:")
    print(fz.table(results, lambda r: f"{r.family}: {r.command}"))
    print()
    print(f"{n_caps} mutated captures ({len(results) - len(lines) - 2 * a.reports} runs), {len(lines)} bad command "
          f"lines, {2 * a.reports} report runs in {elapsed:.0f} s")
    print()
    print("Distinct crash sites and silent-acceptance classes (-> mutation kinds [command]):")
    for site, kinds in fz.sites(results).items():
        print(f"  {site}")
        print(f"      {', '.join(kinds[:12])}{f' ... (+{len(kinds) - 12})' if len(kinds) > 12 else ''}")
    examples = collections.OrderedDict()
    for r in results:
        if r.outcome in fz.BAD and r.family == "cli":
            examples.setdefault((r.outcome, r.kind, r.site), r)
    if examples:
        print()
        print("Bad command lines (one example per outcome, kind and site):")
        for (outcome, kind, site), r in examples.items():
            print(f"  {outcome:9s} exit={r.exit_code} fxdiff {r.detail}")
            print(f"            -> {site if site != '-' else r.message}")
    if a.json:
        Path(a.json).write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=0))
    return 1 if any(r.outcome in fz.BAD for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
