"""The two-environment job, end to end: capture in the reference's env, compare in the port's.

Two virtual environments are made without downloading anything: ``venv`` without pip, and a
``.pth`` file in each env's site-packages that puts this repository's root (so ``import fxdiff``
is this checkout's) and the running interpreter's site-packages (torch, safetensors, click, pip,
setuptools, ...) on its path. Each env gets an ``fxdiff`` console script. The reference package
``tests/two_env/refpkg`` (``fxdiff_refmodel``, with the model and the loss ``ssl_loss`` that exists
nowhere else) is pip-installed into env 1 only, offline, from a copy of its source.

env 1 captures the reference (``fxdiff capture fxdiff_refmodel.specs:build --loss
fxdiff_refmodel.specs:ssl_loss``), in eval mode and in train mode with dropout kept and random
block masking. env 2 runs ``fxdiff compare REF tests/two_env/port.py:build --checkpoint W`` with
no ``--loss`` and no ``--inputs``: the port must run backward from the capture's recorded output
gradients and take the reference's random numbers (the port draws them in another order).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
TWO_ENV = Path(__file__).resolve().parent / "two_env"
REFPKG = TWO_ENV / "refpkg"
PORT = TWO_ENV / "port.py"
REF_SPEC = "fxdiff_refmodel.specs"
BUG_REF_MODULE, BUG_CAND_MODULE = "layers.1.self_attn", "blocks.1.attn"
VARIANTS = {"eval": ["--mode", "eval"], "train": ["--mode", "train", "--keep-dropout"]}
TIMEOUT = 300
REF_PARAMS = 43  # tensors in the reference's state dict


def host_site_dirs() -> list[str]:
    """The running interpreter's site-packages (pure and platform), as they exist on disk."""
    paths = sysconfig.get_paths()
    dirs = [paths["purelib"], paths["platlib"], *site.getsitepackages()]
    return [d for i, d in enumerate(dirs) if d not in dirs[:i] and os.path.isdir(d)]


def child_env() -> dict[str, str]:
    """The environment for subprocesses: nothing from ours that could leak an import path in."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONUSERBASE")}
    env.update(OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    return env


def run(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=child_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)


def run_parallel(cmds: dict[str, list], cwd: Path, width: int = 2) -> dict[str, tuple[int, str, str]]:
    """Run the commands ``width`` at a time (the tests' machine has two cores); name -> (rc, out, err)."""
    results, names = {}, list(cmds)
    for i in range(0, len(names), width):
        procs = {n: subprocess.Popen([str(c) for c in cmds[n]], cwd=cwd, env=child_env(), text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n in names[i:i + width]}
        for n, p in procs.items():
            out, err = p.communicate(timeout=TIMEOUT)
            results[n] = (p.returncode, out, err)
    return results


class Env:
    """A virtual environment that sees this checkout's fxdiff and the host's packages, nothing else."""

    def __init__(self, path: Path):
        venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt", clear=True).create(path)
        bindir = path / ("Scripts" if os.name == "nt" else "bin")
        self.python = bindir / ("python.exe" if os.name == "nt" else "python")
        self.purelib = Path(run([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                path).stdout.strip())
        assert self.purelib.is_dir() and path in self.purelib.parents, self.purelib
        # plain path lines: the host's own .pth files (an editable fxdiff of another checkout) stay out
        (self.purelib / "_fxdiff_host.pth").write_text("\n".join([str(ROOT), *host_site_dirs()]) + "\n")
        self.fxdiff = bindir / "fxdiff"
        self.fxdiff.write_text(f"#!{self.python}\nimport sys\nfrom fxdiff.cli import main\nsys.exit(main())\n")
        self.fxdiff.chmod(0o755)


@pytest.fixture(scope="module")
def envs(tmp_path_factory):
    """(env 1 with fxdiff_refmodel installed, env 2 without it) and a scratch folder."""
    base = tmp_path_factory.mktemp("two_env")
    ref_env, port_env = Env(base / "ref_env"), Env(base / "port_env")
    source = base / "refpkg_src"  # pip builds in the source tree: build a copy, keep ours clean
    shutil.copytree(REFPKG, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    result = run([ref_env.python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                  "--disable-pip-version-check", "--no-cache-dir", "--quiet", source], base)
    assert result.returncode == 0, result.stdout + result.stderr
    return ref_env, port_env, base


def convert(ref_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's weights in the port's layout: renames, q/k/v and gate/up concatenated."""
    out = {"embed.weight": ref_state["pre_encode.out.weight"], "embed.bias": ref_state["pre_encode.out.bias"],
           "mask_emb": ref_state["mask_processor.mask_embedding"],
           "norm.weight": ref_state["final_norm.weight"], "norm.bias": ref_state["final_norm.bias"],
           "head.weight": ref_state["decoder.weight"], "head.bias": ref_state["decoder.bias"]}
    layers = sorted({int(k.split(".")[1]) for k in ref_state if k.startswith("layers.")})
    for i in layers:
        r, c = f"layers.{i}.", f"blocks.{i}."
        for kind, name in (("w", "weight"), ("b", "bias")):
            out[f"{c}ffn.norm_{kind}"] = ref_state[f"{r}norm_feed_forward.{name}"]
            out[f"{c}ffn.{kind}_in"] = torch.cat([ref_state[f"{r}feed_forward.gate.{name}"],
                                                  ref_state[f"{r}feed_forward.linear1.{name}"]])
            out[f"{c}ffn.{kind}_out"] = ref_state[f"{r}feed_forward.linear2.{name}"]
            out[f"{c}attn.norm_{kind}"] = ref_state[f"{r}norm_self_att.{name}"]
            out[f"{c}attn.qkv_{kind}"] = torch.cat([ref_state[f"{r}self_attn.linear_{x}.{name}"] for x in "qkv"])
            out[f"{c}attn.out_{kind}"] = ref_state[f"{r}self_attn.linear_out.{name}"]
    # per layer, gate + linear1 become one tensor and q, k, v one: each weight and bias, 6 fewer
    assert len(out) == len(ref_state) - 6 * len(layers), "every reference tensor lands in the port"
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def reference(envs):
    """env 1: the reference's weights and its captures (one per variant); the port's converted weights."""
    ref_env, _, base = envs
    side = base / "ref_side"
    side.mkdir()
    cmds = {mode: [ref_env.fxdiff, "capture", f"{REF_SPEC}:build", "--inputs", f"{REF_SPEC}:inputs",
                   "--loss", f"{REF_SPEC}:ssl_loss", *options, "-o", side / f"ref_{mode}.fxd"]
            for mode, options in VARIANTS.items()}
    cmds["weights"] = [ref_env.python, "-c",
                       f"from {REF_SPEC} import write_weights; write_weights({str(side / 'ref.safetensors')!r})"]
    results = run_parallel(cmds, side, width=3)
    weights = base / "port_weights.safetensors"
    if results["weights"][0] == 0:
        save_file(convert(load_file(str(side / "ref.safetensors"))), str(weights))
    return {"dir": side, "results": results, "weights": weights}


@pytest.fixture(scope="module")
def comparisons(envs, reference):
    """env 2: the port and the bug variant against both captures; name -> (rc, out, err, report)."""
    _, port_env, base = envs
    side = base / "port_side"
    side.mkdir()
    for mode in VARIANTS:
        assert reference["results"][mode][0] == 0, reference["results"][mode][2]
    assert reference["results"]["weights"][0] == 0, reference["results"]["weights"][2]
    cmds = {f"{build}_{mode}": [port_env.fxdiff, "compare", reference["dir"] / f"ref_{mode}.fxd", f"{PORT}:{build}",
                                "--checkpoint", reference["weights"], "--json", side / f"{build}_{mode}.json"]
            for build in ("build", "build_bug") for mode in VARIANTS}
    results = run_parallel(cmds, side)
    out = {}
    for name, (rc, stdout, stderr) in results.items():
        path = side / f"{name}.json"
        out[name] = (rc, stdout, stderr, json.loads(path.read_text()) if path.is_file() else None)
    return out


def test_envs_are_separate(envs):
    """Both envs see this checkout's fxdiff and the host's torch; only env 1 has the reference package."""
    ref_env, port_env, base = envs
    # find_spec locates without importing (importing torch costs seconds a process on this machine)
    where = ("import importlib.util as u\n"
             "for name in ('fxdiff', 'torch', 'safetensors', 'click', 'fxdiff_refmodel'):\n"
             "    spec = u.find_spec(name); print(name, spec.origin if spec else None)\n")
    for env in (ref_env, port_env):
        result = run([env.python, "-c", where], base)
        assert result.returncode == 0, result.stderr
        found = dict(line.split(" ", 1) for line in result.stdout.splitlines())
        assert Path(found["fxdiff"]).resolve() == ROOT / "fxdiff" / "__init__.py", "fxdiff is this checkout's"
        assert Path(found["torch"]).resolve() == Path(torch.__file__).resolve(), "torch is the host's"
        assert found["safetensors"] != "None" and found["click"] != "None"
        if env is ref_env:
            assert Path(found["fxdiff_refmodel"]).resolve().is_relative_to(ref_env.purelib.resolve()), found
        else:
            assert found["fxdiff_refmodel"] == "None", found
    missing = run([port_env.python, "-c", "import fxdiff_refmodel.specs"], base)
    assert missing.returncode != 0 and "No module named 'fxdiff_refmodel'" in missing.stderr, missing.stderr
    assert os.access(ref_env.fxdiff, os.X_OK) and os.access(port_env.fxdiff, os.X_OK)


@pytest.mark.parametrize("mode", list(VARIANTS))
def test_reference_captured_in_its_env(reference, mode):
    rc, out, err = reference["results"][mode]
    assert rc == 0, err
    assert "captured" in out
    manifest = json.loads((reference["dir"] / f"ref_{mode}.fxd" / "manifest.json").read_text())
    meta = manifest["meta"]
    assert meta["loss"] == f"{REF_SPEC}:ssl_loss" and meta["mode"] == mode
    assert bool(meta.get("keep_dropout")) == (mode == "train")


@pytest.mark.parametrize("mode", list(VARIANTS))
def test_port_matches_in_its_env(comparisons, mode):
    """No reference code, no --loss, no --inputs: exit 0, forward and backward (from the output seeds)."""
    rc, out, err, report = comparisons[f"build_{mode}"]
    assert rc == 0, f"exit {rc}\n{err}\n{out[-3000:]}"
    assert "warning" not in err, err  # the converted checkpoint fills the port exactly
    assert report["verdict"] in ("match", "within noise")  # fused q/k/v and gate/up round differently
    summary = report["summary"]
    assert summary["forward_output_match"]
    assert summary["nodes"]["forward_mismatches"] == 0 and summary["nodes"]["backward_mismatches"] == 0
    assert summary["nodes"]["backward_matches"] > 0, "the port ran backward"
    assert summary["param_grads"]["mismatched"] == 0
    trainable = [p for p in report["params"] if p["ref"] != "pos_enc.pe"]  # the one buffer
    # the mask embedding is used in train mode only: in eval mode no gradient reaches it, on either side
    unused = {"mask_processor.mask_embedding"} if mode == "eval" else set()
    assert len(trainable) == REF_PARAMS and all(p["cand"] for p in trainable), \
        "every reference parameter paired with the port's"
    assert {p["ref"] for p in trainable if not p["grad"]} == unused, "a gradient for every parameter used"
    assert summary["param_grads"]["matched"] == REF_PARAMS - len(unused)


@pytest.mark.parametrize("mode", list(VARIANTS))
def test_port_bug_found_in_its_env(comparisons, mode):
    """The scale bug in block 1's attention is the first forward divergence, on both sides."""
    rc, out, err, report = comparisons[f"build_bug_{mode}"]
    assert rc == 1, f"exit {rc}\n{err}\n{out[-3000:]}"
    assert report is not None and report["verdict"] == "diverged"
    first = report["first_divergence"]["forward"]
    assert first, "no first forward divergence"
    where = [(e["ref_module"], e["cand_module"]) for e in first]
    assert all(r == BUG_REF_MODULE or r.startswith(BUG_REF_MODULE + ".") for r, _ in where), where
    assert all(c == BUG_CAND_MODULE or c.startswith(BUG_CAND_MODULE + ".") for _, c in where), where
