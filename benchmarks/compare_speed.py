"""Compare speed and memory at real sizes: two GPT-2 captures, compared in a fresh process.

Builds ``transformers.GPT2LMHeadModel`` from a config (random weights, nothing downloaded; GPT-2
124M by default: 12 layers, 768 wide), captures it on random token ids with SDPA attention (the
reference) and with the written-out ("eager") attention (the candidate: same weights, other ops in
every attention block, so that every tensor downstream of the first attention differs by float32
rounding), each written under ``--dir`` while the model runs, as ``fxdiff capture`` writes it (kept
there, and reused by later runs with the same sizes). It also captures the reference a second time:
a bit-identical pair.

Each case is then compared in a fresh Python process, three times: through ``fxdiff.compare``
(timed by phase: load, match, judge), through the command line (``python -m fxdiff.cli compare A
B``, end to end: interpreter start, imports and exit included), and through the command line again
with its phases timed (start, imports, load, match, judge, waiting for the digest check, the text
report, exit). The ``drawn`` case also computes error histograms (``histograms=True``; the CLI with
``--html``, which draws the report too). Printed, as ratios: tensor data of both captures per
second of compare, the peak resident memory of the process (``VmHWM``, file pages mapped from the
captures included) over the size of the two captures, and the CLI's time over its target.
Targets: >= 1 GB/s; peak RSS <= 1.5 GB at GPT-2 124M, i.e. independent of capture size; the CLI
under 6 s end to end on the GPT-2 124M pair (in proportion to the data at other sizes; the drawn
case is not held to it).

    PYTHONPATH=. python benchmarks/compare_speed.py [--seq 512] [--layers 12] [--dir DIR]

The captures are read from the page cache (they were just written or read), as on a machine with
memory to spare; a cold read is bounded by the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name  # this folder is the script's

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_GBPS = 1.0
TARGET_RSS_GB = 1.5
TARGET_CLI_S = 6.0      # the CLI, end to end, on the GPT-2 124M pair
GPT2_BYTES = 7.03e9     # tensor data of that pair

# The API's steps timed into ``phases`` (which each child defines), the start of both children.
_TIMING = r"""
import time
def timed(name, fn):
    def run(*a, **k):
        start = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            phases[name] += time.perf_counter() - start
    return run
def time_api(api):
    api.load_deferred, api.match = timed("load", api.load_deferred), timed("match", api.match)
    api.judge = timed("judge", api.judge)
    deferred = api.load_deferred
    def load_deferred(path):
        capture, check = deferred(path)
        return capture, timed("verify wait", check)
    api.load_deferred = load_deferred
"""

_CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
import torch
import fxdiff
from fxdiff import api
torch.set_num_threads(int(sys.argv[3]))
phases = {"load": 0.0, "match": 0.0, "judge": 0.0, "verify wait": 0.0}
time_api(api)
def rss(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
base = rss("VmRSS:")
t1 = time.perf_counter()
report = fxdiff.compare(sys.argv[1], sys.argv[2], histograms=sys.argv[4] == "1")
t2 = time.perf_counter()
s = report.summary()
print(json.dumps({"compare_s": t2 - t1, "imports_s": t1 - t0, "phases": phases, "peak_rss": rss("VmHWM:"),
                  "base_rss": base, "diverged": report.diverged, "pairs": s["nodes"]["pairs"],
                  "fwd_mismatch": s["nodes"]["forward_mismatches"], "bwd_mismatch": s["nodes"]["backward_mismatches"]}))
"""

# The command line with its phases timed: ``fxdiff compare`` as ``python -m fxdiff.cli`` runs it,
# the API's steps wrapped; the times are printed by an exit handler (the program runs those before
# it exits) with the wall-clock time then, so that the caller can tell the exit's own cost.
_CLI_CHILD = r"""
import atexit, json, sys, time
wall0 = time.time()
t0 = time.perf_counter()
import fxdiff.cli as cli
from fxdiff import digest
for side in sys.argv[2:4]:
    digest.start(side)   # as the command does before it imports torch
import fxdiff.render.text as text
from fxdiff import api
phases = {"imports": time.perf_counter() - t0, "load": 0.0, "match": 0.0, "judge": 0.0, "verify wait": 0.0,
          "report": 0.0}
time_api(api)
text.render = timed("report", text.render)
def done():
    print(json.dumps({"phases": phases, "started": wall0, "ended": time.time()}), file=sys.stderr, flush=True)
atexit.register(done)
sys.argv = ["fxdiff", *sys.argv[1:]]
cli.run()
"""


def build(a, attn: str):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=a.layers, n_embd=a.embd, n_head=a.heads, attn_implementation=attn)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def captures(a) -> dict[str, Path]:
    """Capture (or reuse) ref (SDPA), ref2 (the same run again) and cand (eager attention)."""
    import torch
    import fxdiff
    folder = Path(a.dir)
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"gpt2-L{a.layers}-E{a.embd}-H{a.heads}-B{a.batch}-S{a.seq}-streamed"
    paths = {k: folder / f"{tag}-{k}" for k in ("ref", "ref2", "cand")}
    if all((p / "manifest.json").is_file() for p in paths.values()) and not a.recapture:
        return paths
    ids = torch.randint(0, 50257, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))
    ref = build(a, "sdpa")
    cand = build(a, "eager")
    cand.load_state_dict(ref.state_dict())
    for key, model in (("ref", ref), ("ref2", ref), ("cand", cand)):
        start = time.perf_counter()
        fxdiff.capture(model, kwargs={"input_ids": ids}, stream_to=paths[key])
        print(f"captured {key}: {time.perf_counter() - start:.1f} s", flush=True)
    return paths


def tensor_bytes(path: Path) -> int:
    return (path / "tensors.safetensors").stat().st_size


def warm(path: Path) -> None:
    """Read a capture's files once, so that the timed compare reads them from the page cache
    (captures are written past it, with O_DIRECT)."""
    buf = bytearray(1 << 26)
    for f in path.iterdir():
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def run_case(name: str, ref: Path, cand: Path, a, histograms: bool = False) -> dict:
    warm(ref)
    warm(cand)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _TIMING + _CHILD, str(ref), str(cand), str(a.threads), "1" if histograms else "0"],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{name}: compare failed\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    drawing = ["--html", os.path.join(tempfile.gettempdir(), "fxdiff-bench.html")] if histograms else []
    warm(ref)
    warm(cand)
    start = time.perf_counter()
    cli = subprocess.run([sys.executable, "-m", "fxdiff.cli", "compare", str(ref), str(cand), *drawing], env=env,
                         capture_output=True, text=True)
    result["cli_s"] = time.perf_counter() - start
    result["cli_exit"] = cli.returncode
    warm(ref)
    warm(cand)
    start = time.time()
    timed = subprocess.run([sys.executable, "-c", _TIMING + _CLI_CHILD, "compare", str(ref), str(cand), *drawing], env=env,
                           capture_output=True, text=True)
    end = time.time()
    report = json.loads(timed.stderr.strip().splitlines()[-1])
    result["cli_phases"] = {"start": report["started"] - start, **report["phases"], "exit": end - report["ended"]}
    result["cli_timed_s"] = end - start
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the compare")
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "fxdiff-bench-gpt2"),
                        help="where the captures are kept (reused when present)")
    parser.add_argument("--recapture", action="store_true", help="capture again even when present")
    parser.add_argument("--cases", default="noisy,identical,drawn")
    a = parser.parse_args()

    paths = captures(a)
    print(f"machine: {os.cpu_count()} cores, {cpu_name()}; python {platform.python_version()}; "
          f"load average {os.getloadavg()[0]:.1f} before the compares")
    params = a.layers * 12 * a.embd ** 2 + 50257 * a.embd + 1024 * a.embd
    print(f"model: GPT2LMHeadModel, {a.layers} layers x {a.embd} ({params / 1e6:.0f}M params), "
          f"batch {a.batch} x {a.seq} tokens; captures {tensor_bytes(paths['ref']) / 1e9:.2f} GB (SDPA) and "
          f"{tensor_bytes(paths['cand']) / 1e9:.2f} GB (eager attention) of tensor data")
    ok = True
    cases = {"noisy": ("ref", "cand", "SDPA vs eager attention: values differ by rounding downstream of layer 0"),
             "identical": ("ref", "ref2", "the same run captured twice: every pair bit-identical"),
             "drawn": ("ref", "cand", "noisy, with the error histograms a drawing needs (CLI: --html)")}
    for case in a.cases.split(","):
        r, c, what = cases[case]
        data = tensor_bytes(paths[r]) + tensor_bytes(paths[c])
        res = run_case(case, paths[r], paths[c], a, histograms=case == "drawn")
        gbps = data / 1e9 / res["compare_s"]
        peak = res["peak_rss"] / 1e9
        ph = res["phases"]
        cli_limit = TARGET_CLI_S * data / GPT2_BYTES   # 6 s for the GPT-2 124M pair, in proportion otherwise
        met = gbps >= TARGET_GBPS and peak <= TARGET_RSS_GB * max(1.0, data / 5.6e9) \
            and (case == "drawn" or res["cli_s"] <= cli_limit)
        ok &= met
        cp = res["cli_phases"]
        print(f"{case}: {what}")
        print(f"  compare {res['compare_s']:.2f} s in process (load {ph['load']:.2f}, match {ph['match']:.2f}, "
              f"judge {ph['judge']:.2f}, waiting for the digest check {ph['verify wait']:.2f}): {gbps:.2f} GB/s = {gbps / TARGET_GBPS:.2f}x the {TARGET_GBPS} GB/s target")
        print(f"  CLI end to end {res['cli_s']:.2f} s = {res['cli_s'] / cli_limit:.2f}x the {cli_limit:.1f} s target "
              f"(exit {res['cli_exit']}, {data / 1e9 / res['cli_s']:.2f} GB/s); timed again by phase, "
              f"{res['cli_timed_s']:.2f} s: " + ", ".join(f"{k} {v:.2f}" for k, v in cp.items()))
        print(f"  peak RSS {peak:.2f} GB ({res['base_rss'] / 1e9:.2f} GB after imports) = "
              f"{peak / (data / 1e9):.2f}x the captures' {data / 1e9:.2f} GB, {peak / TARGET_RSS_GB:.2f}x the "
              f"{TARGET_RSS_GB} GB target; {res['pairs']} pairs, {res['fwd_mismatch']} forward / "
              f"{res['bwd_mismatch']} backward mismatches, {'diverged' if res['diverged'] else 'match'}")
    print(f"load average {os.getloadavg()[0]:.1f} after")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
