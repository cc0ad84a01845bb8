"""Zero-argument model builders, inputs and loss for fxdiff (``specs.py:<function>``).

Every builder returns a model with the same weights: the reference is initialised
under ``torch.manual_seed(0)`` (without disturbing the caller's RNG) and the ports
load its state dict, converted for the renamed port. The sibling files are loaded
by path, so this file works however it is imported.
"""

import importlib.util
import os
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load(stem):
    """Import ``<stem>.py`` from this folder under a name private to this example."""
    name = f"fxdiff_example_conformer_{stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(_HERE, f"{stem}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_reference = _load("reference")
_port = _load("port")
_renamed = _load("renamed_port")

BUGS = _port.BUGS
BUGS_RENAMED = _renamed.BUGS_RENAMED

CONFIGS = {
    "small": {},  # the constructors' defaults: d_model 64, 3 layers, 4 heads
    # NeMo's Conformer-S sizes: one fwd+bwd on bench_inputs() takes about 1 s on one CPU thread
    "bench": dict(d_model=176, n_layers=16, n_heads=4, conv_kernel_size=31, num_classes=256),
}
SEED = 0


def make_model(kind="reference", config="small", bug=None):
    """Build ``kind`` ("reference", "port" or "renamed") with the reference's seeded weights."""
    if kind not in ("reference", "port", "renamed") or (kind == "reference" and bug is not None):
        raise ValueError(f"no model {kind!r} with bug {bug!r}")
    kwargs = CONFIGS[config]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        ref = _reference.ConformerSSLModel(**kwargs)
        if kind == "reference":
            return ref
        if kind == "port":
            model = _port.ConformerSSLPort(**kwargs, bug=bug)
            model.load_state_dict(ref.state_dict())
        else:
            model = _renamed.RenamedConformerSSL(**kwargs, bug=bug)
            model.load_state_dict(_renamed.convert_state_dict(ref.state_dict()))
    return model


def make_inputs(seconds=(1.6, 1.1), seed=1, sample_rate=16000):
    """White-noise audio batch, zero-padded to the longest example, and its lengths in samples."""
    lengths = torch.tensor([int(s * sample_rate) for s in seconds])
    generator = torch.Generator().manual_seed(seed)
    audio = 0.1 * torch.randn(len(seconds), int(lengths.max()), generator=generator)
    audio = audio.masked_fill(torch.arange(audio.size(1)) >= lengths[:, None], 0.0)
    return {"audio": audio, "lengths": lengths}


def loss(output):
    """Masked cross-entropy of the codebook log-probs against fixed pseudo-random targets."""
    log_probs, lengths = output.log_probs, output.encoded_lengths
    batch, frames, classes = log_probs.shape
    generator = torch.Generator().manual_seed(SEED)
    targets = torch.randint(classes, (batch, frames), generator=generator).to(log_probs.device)
    valid = (torch.arange(frames, device=log_probs.device) < lengths[:, None]).to(log_probs.dtype)
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (nll * valid).sum() / valid.sum()


def inputs():
    return make_inputs()


def bench_inputs():
    return make_inputs(seconds=(4.0, 3.2, 2.5, 3.6))


def reference():
    return make_model("reference")


def bench_reference():
    return make_model("reference", "bench")


def bench_port():
    return make_model("port", "bench")


def port():
    return make_model("port")


def port_bug_feature_std():
    return make_model("port", bug="feature_std")


def port_bug_layernorm_eps():
    return make_model("port", bug="layernorm_eps")


def port_bug_rel_shift():
    return make_model("port", bug="rel_shift")


def port_bug_conv_padding():
    return make_model("port", bug="conv_padding")


def port_bug_glu_order():
    return make_model("port", bug="glu_order")


def port_bug_half_step():
    return make_model("port", bug="half_step")


def renamed():
    return make_model("renamed")


def renamed_bug_rel_shift():
    return make_model("renamed", bug="rel_shift")


def renamed_bug_qkv_order():
    return make_model("renamed", bug="qkv_order")


def renamed_bug_half_step():
    return make_model("renamed", bug="half_step")


def renamed_bug_layernorm_eps():
    return make_model("renamed", bug="layernorm_eps")


def renamed_bug_conv_padding():
    return make_model("renamed", bug="conv_padding")
