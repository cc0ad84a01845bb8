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
import inspect
from typing import Any

import torch
import torch.fx

from .. import tree
from ..errors import FxdiffError, blame_user
from .recorder import Aliased, NoDropout, Recorder
from .session import (Run, RunConfig, backward, forward_context, prepared, record_run, seed_everything,
                      taken_grads)


def record_fx(model: torch.nn.Module, args: tuple, kwargs: dict, config: RunConfig) -> Run:
    """The ``fx`` tracer: trace, check the trace against a plain eager run, record the traced run."""
    eager = _eager_run(model, args, kwargs, config)
    try:
        return _traced_run(model, args, kwargs, config, eager, copy=False)
    except Aliased:
        return _traced_run(model, args, kwargs, config, eager, copy=True)


def trace(model: torch.nn.Module, concrete: dict[str, Any] | None = None) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace(model, concrete)``, or a one-line ``FxdiffError`` naming the model and why."""
    try:
        return torch.fx.symbolic_trace(model, concrete_args=concrete or None)
    except Exception as e:  # noqa: BLE001 -- tracing runs arbitrary model code
        first = (str(e).strip().splitlines() or [""])[0]
        raise FxdiffError(f"tracer fx: {type(model).__name__} cannot be traced by torch.fx.symbolic_trace "
                          f"({type(e).__name__}: {first}); use the eager tracer", option="tracer") from None


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
        raise FxdiffError(f"tracer fx: the inputs do not fit {type(model).__name__}.forward ({e})", option="tracer") from None
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
        raise FxdiffError(f"tracer fx: cannot pass the inputs to the trace of {type(model).__name__}.forward"
                          f"{bound.signature}; use the eager tracer", option="tracer")
    values = []
    for p in params:
        if p.kind == p.VAR_POSITIONAL:
            values.extend(bound.arguments.get(p.name, ()))
        else:
            values.append(bound.arguments[p.name])
    return values


def _eager_run(model, args, kwargs, config: RunConfig) -> tuple[list, dict[str, torch.Tensor]]:
    """Flat outputs and parameter gradients of a plain eager run, set up as the recorded run is."""
    with prepared(model, args, kwargs, config) as (_, call_args, call_kwargs):
        with torch.enable_grad(), NoDropout() if config.disable_dropout else contextlib.nullcontext(), \
                forward_context(model, config):
            try:
                outputs = model(*call_args, **call_kwargs)
            except (Exception, SystemExit) as e:   # the user's model failed, as it would without fxdiff
                raise blame_user(f"the forward pass of {type(model).__name__}", e) from e
        backward(model, outputs, config)
        return ([(p, t.detach()) for p, t in tree.flatten(outputs)],
                {n: p.grad for n, p in model.named_parameters() if p.grad is not None})


def _traced_run(model, args, kwargs, config: RunConfig, eager, copy) -> Run:
    with prepared(model, args, kwargs, config) as (before, call_args, call_kwargs):
        bound = _bind(model, call_args, call_kwargs)
        gm = trace(model, _concrete(bound))
        seed_everything(config.seed)  # after tracing, which may draw random numbers of its own
        rec = Recorder(model, disable_dropout=config.disable_dropout, copy=copy)
        positional = _positional(gm, model, bound)
        run = record_run(model, rec, call_args, call_kwargs,
                         lambda run_gm=_Interpreter(gm, rec, model), a=positional: run_gm.run(*a),
                         config, before,
                         check=lambda outputs: _check_against_eager(model, eager, tree.flatten(outputs),
                                                                    taken_grads(model)))
        del call_args, call_kwargs, bound, gm, positional
        rec.release()
    return run


def _check_against_eager(model, eager, outputs, grads) -> None:
    """Refuse the trace unless it reproduces eager's outputs and parameter gradients exactly."""
    eager_outputs, eager_grads = eager
    refuse = f"tracer fx: the traced graph of {type(model).__name__} does not reproduce the model"
    hint = ("(custom autograd.Function, no_grad region or hook in forward?); use the eager tracer")
    if [p for p, _ in outputs] != [p for p, _ in eager_outputs]:
        raise FxdiffError(f"{refuse}: its outputs are {[p for p, _ in outputs]}, eager's "
                          f"{[p for p, _ in eager_outputs]} {hint}", option="tracer")
    for (path, t), (_, e) in zip(outputs, eager_outputs):
        if not _same(t.detach(), e):
            raise FxdiffError(f"{refuse}: output {path} differs from eager {hint}", option="tracer")
    if grads.keys() != eager_grads.keys():
        raise FxdiffError(f"{refuse}: gradients reach {sorted(grads.keys() ^ eager_grads.keys())[:3]} "
                          f"in only one of the two runs {hint}", option="tracer")
    for name, g in grads.items():
        if not _same(g, eager_grads[name]):
            diff = float((g.double() - eager_grads[name].double()).abs().max())
            raise FxdiffError(f"{refuse}: the gradient of parameter {name} differs from eager "
                              f"(max abs diff {diff:.3g}) {hint}", option="tracer")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and values, NaNs in the same places counting as equal."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return torch.equal(a, b)
