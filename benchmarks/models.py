"""The models the benchmarks run (random weights from configs, nothing downloaded), and the
resident-memory readings they report.

``build(name, seq)`` returns ``(model, inputs, loss)``: ``conformer`` (the Conformer bench, 13M
parameters), ``tiny`` (GPT-2 shape, ~1M), ``gpt2`` (GPT2LMHeadModel 124M, 1 x ``seq`` tokens) and
``gpt2-774m`` (GPT-2 large: 36 layers of 1280, 2 x ``seq`` tokens).
"""

import os
import sys

import torch

_GPT2 = {"gpt2": dict(n_layer=12, n_embd=768, n_head=12),
         "gpt2-774m": dict(n_layer=36, n_embd=1280, n_head=20, n_positions=1024),
         "tiny": dict(vocab_size=1000, n_positions=256, n_layer=4, n_embd=128, n_head=4)}


def build(name: str, seq: int = 256):
    """``(model in eval mode, keyword inputs, loss of the output)`` for the model called ``name``."""
    if name == "conformer":
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples", "conformer"))
        import specs
        return specs.bench_reference().eval(), specs.bench_inputs(), specs.loss
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(attn_implementation="sdpa", **_GPT2[name])).eval()
    batch = 2 if name == "gpt2-774m" else 1
    ids = torch.randint(0, model.config.vocab_size, (batch, min(seq, model.config.n_positions)),
                        generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids}, lambda out: out["logits"].float().square().mean()


def rss(key: str) -> int:
    """This process's ``VmRSS:`` (now) or ``VmHWM:`` (peak) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
