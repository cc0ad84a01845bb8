"""Capture overhead on a CUDA GPU, as ratios to eager fwd+bwd: time and peak GPU memory.

For the Conformer bench model (13M), GPT2LMHeadModel 124M and a ~1.1B-parameter LlamaForCausalLM
in bf16 (hidden 2048, 22 layers, 32 heads, 4 kv heads, intermediate 5632, vocab 32000), random
weights, ``--batch`` x ``--seq`` tokens (the Conformer bench: its own inputs), the median of ``--repeat``
runs of each:

- eager:            ``loss(model(**inputs)).backward()``
- held:             ``fxdiff.capture(...)``, every value and gradient kept on the GPU
- held + save:      the same, then ``fxdiff.save`` (copied to the host and written after the run)
- stream:           ``fxdiff.capture(..., stream_to=dir)``: values and gradients copied to pinned
                    host memory and written while the model runs (what ``fxdiff capture -o`` does)
- summary:          ``keep="summary"``, held (statistics, sample and hash computed on the GPU)
- summary + save:   the same, then ``fxdiff.save``
- summary stream:   ``keep="summary"``, ``stream_to=dir``

Peak GPU memory is ``torch.cuda.max_memory_allocated`` over one run. The disk's write speed is
measured with the capture writer (``O_DIRECT`` where allowed) on 2 GiB, and the least time any
capture that writes ``B`` bytes can take, ``B / speed``, is printed beside it. Needs a CUDA
device; run from the repository root:
``python benchmarks/capture_overhead_cuda.py [--models conformer,gpt2,llama] [--batch 8] [--json out.json]``.
"""

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fxdiff  # noqa: E402
from machine import disk_speed  # noqa: E402  (this folder is the script's)
from fxdiff.store.summary import _digest, is_summary  # noqa: E402

TARGET_TIME, TARGET_MEMORY = 2.0, 1.10


def conformer(seq, batch):
    spec = importlib.util.spec_from_file_location("conformer_specs", ROOT / "examples/conformer/specs.py")
    specs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(specs)
    model = specs.bench_reference().cuda().eval()
    inputs = {k: v.cuda() for k, v in specs.bench_inputs().items()}
    return model, inputs, specs.loss


def gpt2(seq, batch):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(attn_implementation="sdpa")).cuda().eval()
    ids = torch.randint(0, 50257, (batch, seq), generator=torch.Generator().manual_seed(1)).cuda()
    return model, {"input_ids": ids}, lambda out: out["logits"].float().square().mean()


def llama(seq, batch):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                         intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048,
                         attn_implementation="sdpa")
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(1)).cuda()
    return model, {"input_ids": ids}, lambda out: out["logits"].float().square().mean()


MODELS = {"conformer": conformer, "gpt2": gpt2, "llama": llama}


def timed(fn, repeat):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del result
    return statistics.median(times), times


def peak(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    del result
    return torch.cuda.max_memory_allocated()


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) if os.path.isdir(path) else 0


def checks(name, model, inputs, loss, out):
    """Streamed vs held capture on the same run; summaries' hashes vs the CPU's of the held tensors."""
    held = fxdiff.capture(model, kwargs=inputs, loss=loss)
    streamed = fxdiff.capture(model, kwargs=inputs, loss=loss, stream_to=out)

    def differing(a, b):
        return sum(not torch.equal(a[k], b[k].to(a[k].device)) for k in a)
    same = set(held.values) == set(streamed.values) and set(held.grads) == set(streamed.grads)
    print(f"{name}: streamed vs held: same nodes {'yes' if same else 'NO'}; values differing "
          f"{differing(held.values, streamed.values)}, gradients differing {differing(held.grads, streamed.grads)} "
          "(CUDA backward kernels are not bit-reproducible run to run: gradients may differ)", flush=True)
    del streamed
    summary = fxdiff.capture(model, kwargs=inputs, loss=loss, keep="summary")
    names = [k for k, v in summary.values.items() if is_summary(v)][::7]
    hashes = sum(summary.values[k].digest == _digest(held.values[k].cpu(), summary.values[k].digest) for k in names)
    stats = max(abs(summary.values[k].stats["sumsq"] - held.values[k].double().square().sum().item())
                / max(held.values[k].double().square().sum().item(), 1e-30) for k in names)
    print(f"{name}: summaries on the GPU vs the held values: {hashes} of {len(names)} hashes equal to the CPU's; "
          f"largest relative error of the sum of squares {stats:.2e}", flush=True)
    shutil.rmtree(out, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="conformer,gpt2,llama")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--modes", default=None, help="comma-separated subset of the modes")
    parser.add_argument("--no-checks", action="store_true")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    a = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("capture_overhead_cuda.py needs a CUDA device")
    folder = tempfile.mkdtemp(prefix="fxdiff-cuda-bench-", dir=a.dir)
    speed = disk_speed(folder, 2 << 30)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {os.cpu_count()} CPU cores; disk writes "
          f"{speed / 1e9:.2f} GB/s; targets: time <= {TARGET_TIME}x eager, peak GPU memory <= {TARGET_MEMORY}x "
          "eager's", flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "disk_bytes_per_s": speed,
              "batch": a.batch, "seq": a.seq, "models": {}}
    try:
        for name in a.models.split(","):
            model, inputs, loss = MODELS[name](a.seq, a.batch)
            out = os.path.join(folder, "c")

            def eager():
                model.zero_grad(set_to_none=True)
                loss(model(**inputs)).backward()
                model.zero_grad(set_to_none=True)

            def run(save=False, **kw):
                def fn():
                    c = fxdiff.capture(model, kwargs=inputs, loss=loss, **kw)
                    return fxdiff.save(c, out) if save else c
                return fn

            modes = {
                "eager": (eager, False),
                "held": (run(), False),
                "held + save": (run(save=True), True),
                "stream": (run(stream_to=out), True),
                "summary": (run(keep="summary"), False),
                "summary + save": (run(save=True, keep="summary"), True),
                "summary stream": (run(keep="summary", stream_to=out), True),
            }
            if a.modes:
                modes = {k: v for k, v in modes.items() if k == "eager" or k in a.modes.split(",")}
            if not a.no_checks:
                checks(name, model, inputs, loss, out)
            results = {}
            for kind, (fn, writes) in modes.items():
                try:
                    t, times = timed(fn, a.repeat)
                    p = peak(fn)
                    results[kind] = {"s": t, "times": times, "peak": p, "bytes": folder_bytes(out) if writes else 0}
                except Exception as e:  # noqa: BLE001 -- report and go on
                    print(f"  {kind}: failed: {type(e).__name__}: {e}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            e = results["eager"]
            params = sum(p.numel() for p in model.parameters())
            print(f"{name}: {params / 1e6:.1f}M params, {next(model.parameters()).dtype}, batch {a.batch} x {a.seq}; eager fwd+bwd "
                  f"{e['s'] * 1e3:.1f} ms, peak GPU memory {e['peak'] / 2**30:.2f} GiB", flush=True)
            for kind, r in results.items():
                if kind == "eager":
                    continue
                r["time_ratio"], r["memory_ratio"] = r["s"] / e["s"], r["peak"] / e["peak"]
                met = f"time {'met' if r['time_ratio'] <= TARGET_TIME else 'MISSED'}, memory " \
                      f"{'met' if r['memory_ratio'] <= TARGET_MEMORY else 'MISSED'}"
                wrote = f"; wrote {r['bytes'] / 1e9:.2f} GB (>= {r['bytes'] / speed / e['s']:.1f}x eager at the " \
                        "disk's speed)" if r["bytes"] else ""
                print(f"  {kind:>14}: {r['s'] * 1e3:8.1f} ms = {r['time_ratio']:6.2f}x eager "
                      f"[{', '.join(f'{x:.3f}' for x in r['times'])} s]; peak GPU memory {r['peak'] / 2**30:6.2f} GiB "
                      f"= {r['memory_ratio']:.2f}x{wrote}; {met}", flush=True)
            report["models"][name] = {"params": params, **{k: v for k, v in results.items()}}
            model = inputs = None
            torch.cuda.empty_cache()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if a.json:
            pathlib.Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
