"""Opt-in tracer: record a model by running the graph that ``torch.fx.symbolic_trace`` makes of it.

The traced ``GraphModule`` is interpreted node by node (a ``torch.fx.Interpreter`` whose ``run_node``
sets the module path from ``node.meta["nn_module_stack"]``) under the eager ``Recorder``, so every
torch call becomes capture nodes by the same rules as ``--tracer eager``: same node names, targets,
meta keys, alias and in-place handling; inside leaf modules (``torch.nn`` layers, ``call_module``
nodes) the recorder's module hooks give the paths.

A traced graph keeps only the forward ops: a custom ``autograd.Function``'s backward, a ``no_grad``
region or a hook registered in ``forward`` can make its gradients differ from the model's without
any error. So the traced run's outputs and parameter gradients are first compared with a plain eager
run, and the capture is refused unless they are equal.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
from typing import Any

import torch
import torch.fx

from . import tree
from .errors import FxdiffError
from .record import (Aliased, Loss, NoDropout, Recorder, Run, assemble, clone_call, gc_paused, objective,
                     preserved_state, record_run, seed_everything, taken_grads)


def record_fx(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *, loss: Loss | None = None,
              seed: int = 0, mode: str = "eval", keep_dropout: bool = False, meta: dict | None = None):
    """Like ``record(..., tracer="fx")``: trace, check the trace against eager, record the traced run."""
    kwargs = dict(kwargs or {})
    started = datetime.datetime.now(datetime.timezone.utc)
    disable_dropout = mode == "train" and not keep_dropout
    eager = _eager_run(model, args, kwargs, loss, seed, mode, disable_dropout)
    try:
        run = _traced_run(model, args, kwargs, loss, seed, mode, disable_dropout, eager, copy=False)
    except Aliased:
        run = _traced_run(model, args, kwargs, loss, seed, mode, disable_dropout, eager, copy=True)
    return assemble(model, run, tracer="fx", mode=mode, seed=seed, keep_dropout=keep_dropout, started=started,
                    meta=meta)


def trace(model: torch.nn.Module, concrete: dict[str, Any] | None = None) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace(model, concrete)``, or a one-line ``FxdiffError`` naming the model and why."""
    try:
        return torch.fx.symbolic_trace(model, concrete_args=concrete or None)
    except Exception as e:  # noqa: BLE001 -- tracing runs arbitrary model code
        first = (str(e).strip().splitlines() or [""])[0]
        raise FxdiffError(f"--tracer fx: {type(model).__name__} cannot be traced by torch.fx.symbolic_trace "
                          f"({type(e).__name__}: {first}); use --tracer eager") from None


class _Interpreter(torch.fx.Interpreter):
    """Runs a traced graph; ops outside leaf modules are attributed to their ``nn_module_stack`` path."""

    def __init__(self, gm: torch.fx.GraphModule, recorder: Recorder, model: torch.nn.Module):
        super().__init__(gm)
        self.recorder = recorder
        self.types = {path: type(m).__name__ for path, m in model.named_modules()}

    def run_node(self, n: torch.fx.Node) -> Any:
        stack = n.meta.get("nn_module_stack")
        if n.op not in ("call_function", "call_method") or not stack:
            return super().run_node(n)
        path = next(reversed(stack.values()))[0]
        with self.recorder.inside(path, self.types.get(path, "")):
            return super().run_node(n)


def _bind(model: torch.nn.Module, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """The call bound to ``model.forward``'s parameters, defaults filled in."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise FxdiffError(f"--tracer fx: the inputs do not fit {type(model).__name__}.forward ({e})") from None
    bound.apply_defaults()
    return bound


def _concrete(bound: inspect.BoundArguments) -> dict[str, Any]:
    """Arguments holding no tensor (None, flags, sizes): the trace is specialised to their values."""
    return {name: value for name, value in bound.arguments.items()
            if bound.signature.parameters[name].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                              inspect.Parameter.VAR_KEYWORD)
            and not tree.flatten(value)}


def _positional(gm: torch.fx.GraphModule, model: torch.nn.Module, bound: inspect.BoundArguments) -> list:
    """The call's arguments in the order of the traced graph's placeholders (one per parameter)."""
    params = list(bound.signature.parameters.values())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(params) != len(placeholders) or any(p.kind == p.VAR_KEYWORD for p in params):
        raise FxdiffError(f"--tracer fx: cannot pass the inputs to the trace of {type(model).__name__}.forward"
                          f"{bound.signature}; use --tracer eager")
    values = []
    for p in params:
        if p.kind == p.VAR_POSITIONAL:
            values.extend(bound.arguments.get(p.name, ()))
        else:
            values.append(bound.arguments[p.name])
    return values


def _eager_run(model, args, kwargs, loss, seed, mode, disable_dropout) -> tuple[list, dict[str, torch.Tensor]]:
    """Flat outputs and parameter gradients of a plain eager run, set up as the recorded run is."""
    with preserved_state(model):
        model.train(mode == "train")
        seed_everything(seed)
        for p in model.parameters():
            p.grad = None
        call_args, call_kwargs = clone_call(args, kwargs)
        with torch.enable_grad(), (NoDropout() if disable_dropout else contextlib.nullcontext()):
            outputs = model(*call_args, **call_kwargs)
        value = objective(loss, outputs, seed)
        if value.requires_grad:
            value.backward()
        return ([(p, t.detach()) for p, t in tree.flatten(outputs)],
                {n: p.grad for n, p in model.named_parameters() if p.grad is not None})


def _traced_run(model, args, kwargs, loss, seed, mode, disable_dropout, eager, copy) -> Run:
    with gc_paused(), preserved_state(model) as before:
        model.train(mode == "train")
        for p in model.parameters():
            p.grad = None
        call_args, call_kwargs = clone_call(args, kwargs)
        bound = _bind(model, call_args, call_kwargs)
        gm = trace(model, _concrete(bound))
        seed_everything(seed)  # after tracing, which may draw random numbers of its own
        rec = Recorder(model, disable_dropout=disable_dropout, copy=copy)
        positional = _positional(gm, model, bound)
        run = record_run(model, rec, call_args, call_kwargs,
                         lambda run_gm=_Interpreter(gm, rec, model), a=positional: run_gm.run(*a),
                         loss, seed, before,
                         check=lambda outputs: _check_against_eager(model, eager, tree.flatten(outputs),
                                                                    taken_grads(model)))
        del call_args, call_kwargs, bound, gm, positional
        rec.release()
    return run


def _check_against_eager(model, eager, outputs, grads) -> None:
    """Refuse the trace unless it reproduces eager's outputs and parameter gradients exactly."""
    eager_outputs, eager_grads = eager
    refuse = f"--tracer fx: the traced graph of {type(model).__name__} does not reproduce the model"
    hint = ("(custom autograd.Function, no_grad region or hook in forward?); use --tracer eager")
    if [p for p, _ in outputs] != [p for p, _ in eager_outputs]:
        raise FxdiffError(f"{refuse}: its outputs are {[p for p, _ in outputs]}, eager's "
                          f"{[p for p, _ in eager_outputs]} {hint}")
    for (path, t), (_, e) in zip(outputs, eager_outputs):
        if not _same(t.detach(), e):
            raise FxdiffError(f"{refuse}: output {path} differs from eager {hint}")
    if grads.keys() != eager_grads.keys():
        raise FxdiffError(f"{refuse}: gradients reach {sorted(grads.keys() ^ eager_grads.keys())[:3]} "
                          f"in only one of the two runs {hint}")
    for name, g in grads.items():
        if not _same(g, eager_grads[name]):
            diff = float((g.double() - eager_grads[name].double()).abs().max())
            raise FxdiffError(f"{refuse}: the gradient of parameter {name} differs from eager "
                              f"(max abs diff {diff:.3g}) {hint}")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and values, NaNs in the same places counting as equal."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return torch.equal(a, b)
