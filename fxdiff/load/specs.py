"""Load model: model, inputs and loss specs, and checkpoints.

A spec is ``path/to/file.py:function`` or ``package.module:function``. Loading a spec *executes*
that file, which is the point: it is the user's own model code. A model may also be a local Hugging
Face model directory (``config.json`` and weights: transformers' ``AutoModel``, offline, no remote
code) or a ``.nemo`` file (NeMo's own ``restore_from``, which builds the class its config names: as
with a spec, that is the user's model code). Data files (inputs, checkpoints) are never unpickled:
``torch.load`` runs with ``weights_only=True`` and archives are read member by member with path checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import tarfile
from pathlib import Path
from typing import IO, Any, Callable

import torch

from .. import tree
from ..errors import FxdiffError, blame_user


def load_callable(spec: str, what: str) -> Callable:
    """The function named by ``file.py:function`` or ``package.module:function``."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name.isidentifier():
        raise FxdiffError(f"{what} {spec!r}: expected 'path/to/file.py:function' or 'package.module:function'")
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise FxdiffError(f"{what} {spec!r}: file {source} not found")
        module = _import_file(path, what, spec)
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as e:
            raise FxdiffError(f"{what} {spec!r}: cannot import {source} ({e})") from None
        except (Exception, SystemExit) as e:  # user code may call sys.exit
            raise blame_user(f"{what} {spec}: importing {source}", e) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise FxdiffError(f"{what} {spec!r}: {source} has no function {name!r}")
    return fn


def _import_file(path: Path, what: str, spec: str):
    path = path.resolve()
    name = f"fxdiff_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # so the file can import its siblings, as when run as a script
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        del sys.modules[name]
        raise blame_user(f"{what} {spec}: importing {path.name}", e) from None
    return module


def is_model_file(spec: str) -> bool:
    """Whether ``spec`` is a model given as files: a Hugging Face model directory or a ``.nemo`` file."""
    return Path(spec, "config.json").is_file() or (spec.endswith(".nemo") and Path(spec).is_file())


def _needs_arguments(fn: Callable, what: str, spec: str) -> None:
    """Refuse a function that cannot be called without arguments, before calling it."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return
    required = [p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        raise FxdiffError(f"{what} {spec!r}: takes arguments ({', '.join(required)}); expected a function "
                          "called with none")


def load_model(spec: str) -> torch.nn.Module:
    """The model ``spec`` names: a zero-argument builder's result, a Hugging Face model directory
    or a ``.nemo`` file (see the module docstring)."""
    if Path(spec, "config.json").is_file():
        return _load_hf(spec)
    if spec.endswith(".nemo") and Path(spec).is_file():
        return _load_nemo(spec)
    build = load_callable(spec, "model spec")
    _needs_arguments(build, "model spec", spec)
    try:
        model = build()
    except (Exception, SystemExit) as e:
        raise blame_user(f"model spec {spec}", e) from None
    if not isinstance(model, torch.nn.Module):
        raise FxdiffError(f"model {spec!r}: returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def _load_hf(path: str) -> torch.nn.Module:
    """``AutoModel.from_pretrained(path)``: local files only, no code from the directory."""
    try:
        from transformers import AutoModel
    except ImportError:
        raise FxdiffError(f"model {path}: a Hugging Face model directory needs transformers "
                          "(pip install transformers)") from None
    try:
        return AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 -- transformers raises many types for a bad directory
        raise FxdiffError(f"model {path}: transformers cannot load it ({type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0]})") from None


def _load_nemo(path: str) -> torch.nn.Module:
    """``ModelPT.restore_from(path)`` on the CPU, with NeMo."""
    try:
        from nemo.core import ModelPT
    except ImportError:
        raise FxdiffError(f"model {path}: restoring a .nemo model needs NeMo (pip install nemo_toolkit); without it, "
                          "give a file.py:function that builds the model, with this file as its checkpoint") from None
    try:
        return ModelPT.restore_from(restore_path=path, map_location=torch.device("cpu"))
    except Exception as e:
        raise blame_user(f"model {path}: NeMo's restore_from", e) from None


def load_loss(spec: str) -> Callable[[Any], torch.Tensor]:
    """The loss function named by ``spec``: takes the model output, returns a scalar."""
    return load_callable(spec, "loss spec")


def split_call(obj: Any, what: str) -> tuple[tuple, dict]:
    """(args, kwargs) from a tuple/list, a dict of kwargs, ``{"args", "kwargs"}`` or one tensor."""
    if isinstance(obj, torch.Tensor):
        return (obj,), {}
    if isinstance(obj, (tuple, list)):
        return tuple(obj), {}
    if isinstance(obj, dict):
        if obj and set(obj) <= {"args", "kwargs"}:
            return tuple(obj.get("args", ())), dict(obj.get("kwargs", {}))
        if all(str(k).isdigit() for k in obj):  # a flat file of positional tensors "0", "1", ...
            return tuple(obj[k] for k in sorted(obj, key=int)), {}
        return (), dict(obj)
    raise FxdiffError(f"{what}: got {type(obj).__name__}; expected a tuple of args, a dict of kwargs "
                      "or {'args': ..., 'kwargs': ...}")


def load_inputs(spec: str) -> tuple[tuple, dict]:
    """Model inputs from ``file.py:function``, a ``.safetensors`` file or a ``.pt`` file."""
    if spec.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file
        _require_file(spec, "inputs")
        try:
            flat = load_file(spec)
            with safe_open(spec, "pt") as f:
                structure = (f.metadata() or {}).get(CALL_KEY)
        except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types
            raise FxdiffError(f"inputs {spec}: not a readable safetensors file ({e})", option="inputs") from None
        if structure is not None:
            return split_call(_decode_call(structure, flat, spec), f"inputs {spec}")
        return split_call(_unflatten_args(flat, spec), f"inputs {spec}")
    if spec.endswith((".pt", ".pth")):
        return split_call(_torch_load(spec, "inputs"), f"inputs {spec}")
    make = load_callable(spec, "inputs spec")
    _needs_arguments(make, "inputs spec", spec)
    try:
        made = make()
    except (Exception, SystemExit) as e:
        raise blame_user(f"inputs spec {spec}", e) from None
    return split_call(made, f"inputs spec {spec}")


CALL_KEY = "fxdiff.args"     # safetensors metadata: the call's structure as JSON, tensors by key
_TENSOR = "fxdiff.tensor"    # {"fxdiff.tensor": key} stands for the tensor stored under key


def inputs_file(args: tuple, kwargs: dict) -> bytes:
    """A call as a ``.safetensors`` file: every tensor cloned under its path (``args.0``,
    ``kwargs.mask``; safetensors refuses tensors that share memory, so copies are written), and the
    structure with non-tensor arguments (None, bools, numbers, strings, lists, tuples as lists,
    dicts) as JSON in the metadata under ``fxdiff.args``. ``load_inputs`` reads it back."""
    from safetensors.torch import save
    tensors: dict[str, torch.Tensor] = {}
    structure = {"args": _encode(list(args), tensors, "args"), "kwargs": _encode(dict(kwargs), tensors, "kwargs")}
    return save(tensors, metadata={CALL_KEY: json.dumps(structure, allow_nan=False)})


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().clone().contiguous()
        return {_TENSOR: path}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
    raise FxdiffError(f"inputs: {path} is a {type(obj).__name__}; an inputs file holds tensors, None, bools, "
                      "numbers, strings, lists and dicts with string keys", option="inputs")


def _decode_call(text: str, tensors: dict[str, torch.Tensor], spec: str) -> Any:
    """The call stored by ``inputs_file``, its tensors taken from ``tensors``."""
    def decode(obj: Any) -> Any:
        if isinstance(obj, list):
            return [decode(v) for v in obj]
        if not isinstance(obj, dict):
            return obj
        if set(obj) == {_TENSOR}:
            if not isinstance(obj[_TENSOR], str) or obj[_TENSOR] not in tensors:
                raise FxdiffError(f"inputs {spec}: {CALL_KEY} refers to tensor {obj[_TENSOR]!r}, which the file "
                                  "lacks", option="inputs")
            return tensors[obj[_TENSOR]]
        return {k: decode(v) for k, v in obj.items()}
    try:
        structure = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise FxdiffError(f"inputs {spec}: {CALL_KEY} is not JSON ({e})", option="inputs") from None
    if not isinstance(structure, dict) or not isinstance(structure.get("args"), list) \
            or not isinstance(structure.get("kwargs"), dict):
        raise FxdiffError(f"inputs {spec}: {CALL_KEY} is not {{'args': [...], 'kwargs': {{...}}}}", option="inputs")
    try:
        return decode(structure)
    except RecursionError:
        raise FxdiffError(f"inputs {spec}: {CALL_KEY} is nested too deeply", option="inputs") from None


def _unflatten_args(flat: dict[str, torch.Tensor], spec: str) -> Any:
    """Keys ``args.0`` / ``kwargs.name`` rebuild the call; other keys are kwargs or positions."""
    if any(k.startswith(("args.", "kwargs.")) for k in flat):
        positions = {k: k[5:] for k in flat if k.startswith("args.")}
        other = [k for k in flat if not k.startswith(("args.", "kwargs."))]
        if other or not all(p.isascii() and p.isdigit() for p in positions.values()) \
                or sorted(map(int, positions.values())) != list(range(len(positions))):
            raise FxdiffError(f"inputs {spec}: keys {(other or sorted(positions))[:6]}: expected args.0, args.1, ... "
                              "(no gap) and kwargs.NAME", option="inputs")
        args = [flat[k] for k in sorted(positions, key=lambda k: int(positions[k]))]
        kwargs = {k[7:]: v for k, v in flat.items() if k.startswith("kwargs.")}
        return {"args": args, "kwargs": kwargs}
    return flat


def _require_file(path: str, option: str) -> None:
    if Path(path).is_dir():
        raise FxdiffError(f"{option} {path}: is a directory, expected a file", option=option)
    if os.path.exists(path) and not Path(path).is_file():
        raise FxdiffError(f"{option} {path}: not a regular file", option=option)
    if not Path(path).is_file():
        raise FxdiffError(f"{option} {path}: file not found", option=option)


def _torch_load(source: str | IO[bytes], option: str, label: str | None = None) -> Any:
    if isinstance(source, str):
        _require_file(source, option)
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch.load raises many types for bad files
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        reason = (f"it holds a pickled {unsafe.group(1)}, which would run code to load; save the tensors "
                  "alone (e.g. safetensors.torch.save_file(ckpt['state_dict'], ...)) where it was written"
                  if unsafe else text.splitlines()[0] if text else type(e).__name__)
        raise FxdiffError(f"{option} {label or source}: cannot be loaded safely (weights_only=True): {reason}",
                          option=option) from None


@dataclasses.dataclass
class CheckpointLoad:
    """What loading a checkpoint did: keys the model lacked or did not expect, a stripped prefix."""

    path: str
    missing: list[str]
    unexpected: list[str]
    stripped_prefix: str = ""


def checkpoint_warning(loaded: Any) -> str | None:
    """What loading a checkpoint left out, in a line (from a ``CheckpointLoad`` as a capture's
    metadata keeps it), or None when every key fit."""
    if not isinstance(loaded, dict):
        return None
    missing, unexpected = (loaded.get(k) if isinstance(loaded.get(k), list) else [] for k in ("missing", "unexpected"))
    if not (missing or unexpected):
        return None
    return (f"{loaded.get('path')}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors``, ``.pt``/``.pth``/``.bin``, Lightning ``.ckpt`` or ``.nemo``."""
    _require_file(path, "checkpoint")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001
            raise FxdiffError(f"checkpoint {path}: not a readable safetensors file ({e})", option="checkpoint") from None
    if path.endswith(".nemo"):
        obj = _read_nemo_weights(path)
    else:
        obj = _torch_load(path, "checkpoint")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FxdiffError(f"checkpoint {path}: expected a state dict (names to tensors)", option="checkpoint")
    return obj


NEMO_MEMBER_LIMIT = 64 << 30   # a weights member larger than this is refused before it is read


def _read_nemo_weights(path: str, limit: int | None = None) -> Any:
    """The state dict in ``model_weights.ckpt`` of a ``.nemo`` tar, streamed from the archive; an
    archive with any member that is a link or whose name is absolute or climbs out with ``..`` is
    refused as a whole, and so is a weights member over ``limit`` bytes (default
    ``NEMO_MEMBER_LIMIT``, read at call time so that a test can lower it)."""
    limit = NEMO_MEMBER_LIMIT if limit is None else limit
    try:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            for member in members:
                name = Path(member.name)
                if name.is_absolute() or ".." in name.parts or member.issym() or member.islnk():
                    raise FxdiffError(f"checkpoint {path}: unsafe archive member {member.name!r}", option="checkpoint")
            for member in members:
                if Path(member.name).name == "model_weights.ckpt" and member.isfile():
                    if member.size > limit:
                        raise FxdiffError(f"checkpoint {path}: model_weights.ckpt is {member.size} bytes, over the "
                                          f"limit of {limit}", option="checkpoint")
                    with tar.extractfile(member) as stream:
                        return _torch_load(stream, "checkpoint", f"{path} (model_weights.ckpt)")
    except (tarfile.TarError, OSError) as e:
        raise FxdiffError(f"checkpoint {path}: not a readable .nemo archive ({e})", option="checkpoint") from None
    raise FxdiffError(f"checkpoint {path}: no model_weights.ckpt inside the .nemo archive", option="checkpoint")


def load_checkpoint(model: torch.nn.Module, path: str) -> CheckpointLoad:
    """Load the checkpoint at ``path`` into ``model`` (non-strict) and say what did not fit.

    A prefix that every checkpoint key carries and the model lacks (``model.``, ``module.``) is
    stripped. A checkpoint sharing no key with the model is an error.
    """
    state = read_state_dict(path)
    expected = set(model.state_dict())
    prefix = ""
    if not expected & set(state):
        prefix = _common_prefix(state, expected)
        state = {k[len(prefix):]: v for k, v in state.items()}
    if not expected & set(state):
        raise FxdiffError(f"checkpoint {path}: none of its {len(state)} keys are in the model "
                          f"(e.g. {next(iter(state), '?')!r} vs {next(iter(expected), '?')!r})", option="checkpoint")
    current = model.state_dict()
    wrong = [k for k, v in state.items() if k in current and tuple(v.shape) != tuple(current[k].shape)]
    if wrong:
        k = wrong[0]
        raise FxdiffError(f"checkpoint {path}: {len(wrong)} tensors do not fit the model, e.g. {k} is "
                          f"{list(state[k].shape)} in the checkpoint, {list(current[k].shape)} in the model",
                          option="checkpoint")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:   # torch refuses what else does not fit (a dtype it cannot copy...)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise FxdiffError(f"checkpoint {path}: does not fit the model ({lines[-1] if lines else e})",
                          option="checkpoint") from None
    return CheckpointLoad(path, list(result.missing_keys), list(result.unexpected_keys), prefix)


def _common_prefix(state: dict[str, Any], expected: set[str]) -> str:
    for key in state:
        parts = key.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i]) + "."
            if all(k.startswith(prefix) for k in state) and key[len(prefix):] in expected:
                return prefix
    return ""


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``float32``/``fp32``/``float64``/``float16``/``bfloat16`` (and short forms) as a torch dtype."""
    if name is None:
        return None
    aliases = {"fp32": "float32", "fp64": "float64", "double": "float64", "fp16": "float16",
               "half": "float16", "bf16": "bfloat16"}
    key = aliases.get(name, name)
    if key not in _DTYPES:
        raise FxdiffError(f"dtype {name}: expected one of {', '.join(_DTYPES)}", option="dtype")
    return _DTYPES[key]


def check_device(device: str) -> torch.device:
    """``device`` as a torch device that this machine has, or a clear error."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise FxdiffError(f"device {device!r}: not a torch device", option="device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FxdiffError(f"device {device}: this machine has no CUDA device", option="device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise FxdiffError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA devices", option="device")
    if dev.type == "meta":
        raise FxdiffError(f"device {device}: meta tensors hold no values to record", option="device")
    if dev.type not in ("cpu", "cuda"):
        try:   # mps, xpu, hpu...: torch raises its own types (AssertionError, RuntimeError) when absent
            torch.empty(0, device=dev)
        except Exception as e:  # noqa: BLE001 -- any failure to allocate there means the device is not usable
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise FxdiffError(f"device {device}: not available on this machine ({reason})", option="device") from None
    return dev


def place(model: torch.nn.Module, args: tuple, kwargs: dict, device: str | None,
          dtype: torch.dtype | None) -> tuple[torch.nn.Module, tuple, dict]:
    """Move the model and inputs to ``device``; cast floating tensors to ``dtype``."""
    if device:
        check_device(device)
    model = model.to(device=device, dtype=dtype) if (device or dtype) else model

    def move(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device) if device else t
    return model, tree.map_tensors(args, move), tree.map_tensors(kwargs, move)
