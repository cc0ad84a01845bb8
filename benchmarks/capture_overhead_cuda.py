"""Capture overhead on a CUDA GPU, as ratios to eager fwd+bwd: time and peak GPU memory.

For the Conformer bench model (13M) and GPT2LMHeadModel 124M (random weights, batch 1 x ``--seq``
tokens), the median of ``--repeat`` runs of each:

- eager:           ``loss(model(**inputs)).backward()``
- capture:         ``fxdiff.capture(...)``, every value and gradient kept on the GPU
- capture + save:  the same, then ``fxdiff.save`` (copied to the host and written after the run)
- capture stream:  ``fxdiff.capture(..., stream_to=dir)``: each value and gradient cloned on the
                   GPU, copied to pinned host memory on a side stream and written while the model
                   runs (what ``fxdiff capture -o`` does)
- capture summary: ``keep="summary"``, streamed

Peak GPU memory is ``torch.cuda.max_memory_allocated`` over one run. Needs a CUDA device; run from
the repository root: ``python benchmarks/capture_overhead_cuda.py [--models conformer,gpt2]``.
"""

import argparse
import importlib.util
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


def conformer():
    spec = importlib.util.spec_from_file_location("conformer_specs", ROOT / "examples/conformer/specs.py")
    specs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(specs)
    model = specs.bench_reference().cuda().eval()
    inputs = {k: v.cuda() for k, v in specs.bench_inputs().items()}
    return model, inputs, specs.loss


def gpt2(seq):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(attn_implementation="sdpa")).cuda().eval()
    ids = torch.randint(0, 50257, (1, seq), generator=torch.Generator().manual_seed(1)).cuda()
    return model, {"input_ids": ids}, lambda out: out["logits"].float().square().mean()


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="conformer,gpt2")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None)
    a = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("capture_overhead_cuda.py needs a CUDA device")
    folder = tempfile.mkdtemp(prefix="fxdiff-cuda-bench-", dir=a.dir)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {os.cpu_count()} CPU cores", flush=True)
    try:
        for name in a.models.split(","):
            model, inputs, loss = conformer() if name == "conformer" else gpt2(a.seq)
            out = os.path.join(folder, "c")

            def eager():
                model.zero_grad(set_to_none=True)
                loss(model(**inputs)).backward()
                model.zero_grad(set_to_none=True)

            kinds = {
                "eager": eager,
                "capture": lambda: fxdiff.capture(model, kwargs=inputs, loss=loss),
                "capture + save": lambda: fxdiff.save(fxdiff.capture(model, kwargs=inputs, loss=loss), out),
                "capture stream": lambda: fxdiff.capture(model, kwargs=inputs, loss=loss, stream_to=out),
                "capture summary": lambda: fxdiff.capture(model, kwargs=inputs, loss=loss, keep="summary",
                                                          stream_to=out),
            }
            held = fxdiff.capture(model, kwargs=inputs, loss=loss)   # the streamed capture must equal it
            again = fxdiff.capture(model, kwargs=inputs, loss=loss)
            streamed = fxdiff.capture(model, kwargs=inputs, loss=loss, stream_to=out)

            def gap(a, b):   # (tensors that differ, largest difference)
                bad = [float((a[k].cpu().double() - b[k].cpu().double()).abs().max()) for k in a
                       if not torch.equal(a[k].cpu(), b[k].cpu())]
                return len(bad), max(bad, default=0.0)
            same_keys = set(held.values) == set(streamed.values) and set(held.grads) == set(streamed.grads)
            print(f"{name}: streamed vs held on the GPU: same nodes {'yes' if same_keys else 'NO'}; values differing "
                  f"{gap(held.values, streamed.values)}, gradients differing {gap(held.grads, streamed.grads)}; two "
                  f"held runs: values {gap(held.values, again.values)}, gradients {gap(held.grads, again.grads)} "
                  "(CUDA backward kernels are not bit-reproducible run to run)", flush=True)
            del held, again, streamed
            results = {}
            for kind, fn in kinds.items():
                try:
                    t, times = timed(fn, a.repeat)
                    results[kind] = (t, peak(fn), times)
                except Exception as e:  # noqa: BLE001 -- report and go on
                    print(f"  {kind}: failed: {type(e).__name__}: {e}", flush=True)
            size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) if os.path.isdir(out) else 0
            e, pe, _ = results["eager"]
            params = sum(p.numel() for p in model.parameters())
            print(f"{name}: {params / 1e6:.1f}M params; eager fwd+bwd {e * 1e3:.1f} ms, peak GPU memory "
                  f"{pe / 2**30:.2f} GiB; last capture {size / 2**30:.2f} GiB on disk", flush=True)
            for kind, (t, p, times) in results.items():
                if kind != "eager":
                    print(f"  {kind:>15}: {t * 1e3:.1f} ms = {t / e:.2f}x eager [{', '.join(f'{x:.2f}' for x in times)} s]; "
                          f"peak GPU memory {p / 2**30:.2f} GiB = {p / pe:.2f}x eager's", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            model = inputs = None
            torch.cuda.empty_cache()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
