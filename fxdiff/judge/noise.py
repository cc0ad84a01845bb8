"""Noise-aware verdicts: a difference is a divergence only when it clearly exceeds the numerical
noise that the node can legitimately carry.

Each compared tensor pair gets a relative error, the RMS of the difference over the larger RMS of
the two tensors (gradients: floored at a fraction of the model's typical gradient, so an
analytically zero gradient holding rounding noise is judged against the scale it lives at). Its
noise level is the larger of

- its own rounding: ``OWN_ROUNDING`` units of the coarser precision of the two tensors (a
  bfloat16 candidate against a float32 reference is judged at bfloat16's), and
- what its inputs bring: ``AMPLIFY`` times the largest relative error of its nearest compared
  inputs that passed (backward: of its consumers, and of its own and its inputs' forward values;
  a parameter's gradient: also of its consumers' gradient differences as it sums them, ``_summed``).

A failing input does not raise the level of what follows it, nor does a value after one that
passes on its own rounding (``after_divergence``: a residual sum dilutes the error, which is still
the divergence's), nor, backward, the gradient of such a value, so everything downstream of a real
divergence still fails and the first divergence stays where the error starts. A row the isolation
replays explain (``NodeRow.explained``: the same computation on both sides carrying passing noise
further than ``AMPLIFY`` allows) passes, and its error counts as noise for what follows. A tail
check keeps a few badly wrong elements from hiding in the RMS: no element may stray more than ``TAIL`` noise
levels, relative to its own magnitude or the tensors' RMS, whichever is larger. Measured on real port pairs (see the README): legitimate
float32 reorderings stay near 1e-7, a bfloat16 port under 3e-2, while planted bugs start at 1e-5.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx

from ..model.capture import DTYPE, CaptureInfo
from ..model.report import Metrics, NodeRow, ParamRow
from ..util import named_dtype

OWN_ROUNDING = 8    # a node's own rounding error, in units of machine epsilon
AMPLIFY = 8         # how much one node may amplify the relative error of its inputs
TAIL = 32           # how many noise levels a single element may be off, relative to its magnitude (or the RMS)
# ...and at most this much, forward, however coarse the precision or noisy the inputs (but after a
# difference the replays explained, which is whole elements: another code an argmax picked): a
# bfloat16 level (8 eps = 0.0625) would allow 2.0, and open_clip's class token left unconverted,
# one row of 17, passed at 0.31; correct bfloat16 ports' worst elements measured 0.03-0.10
TAIL_MAX = 0.25
# gradients through non-smooth ops (relu, max, masks) flip where a forward value sits at the kink:
# measured up to 34 noise levels for a correct Conformer port under bfloat16 autocast
TAIL_BACKWARD = 64


def relative_error(m: Metrics, floor: float = 0.0) -> float:
    """RMS of the difference over the larger RMS of the two tensors (at least ``floor``)."""
    scale = max(m.ref_rms, m.cand_rms, floor)
    if scale > 0:
        return m.rms_diff / scale
    return 0.0 if m.rms_diff == 0 else math.inf


TF32_EPS = 2.0 ** -10   # float32 matrix products and convolutions on CUDA may round inputs to TF32


def run_precision(*infos: CaptureInfo) -> float:
    """The coarsest machine epsilon the runs computed at beyond what their tensors' dtypes say:
    TF32 matrix products, or ``torch.autocast``'s dtype (an op autocast keeps in float32, a norm
    or an ``exp``, takes what the lower-precision ops before it rounded, compared or not)."""
    eps = [TF32_EPS for info in infos if info.tf32]
    for info in infos:
        dtype = named_dtype(info.autocast) if info.autocast else None
        if dtype is not None and dtype.is_floating_point:
            eps.append(torch.finfo(dtype).eps)
    return max(eps, default=0.0)


def rounded(graph: torch.fx.Graph) -> tuple[dict[str, float], dict[str, float]]:
    """The machine epsilon of the coarsest floating dtype among the values each node is computed from
    (itself included), and among those its gradient is computed through (those after it too): the
    rounding its value and its gradient carry whatever their own dtype (a float64 run whose norms
    compute in float32, Hugging Face's and torchtune's alike, is float32-precise after the first)."""
    own = {}
    for n in graph.nodes:
        dtype = named_dtype(str(n.meta.get(DTYPE, "")))
        own[n.name] = torch.finfo(dtype).eps if dtype is not None and dtype.is_floating_point else 0.0
    forward: dict[str, float] = {}
    for n in graph.nodes:
        forward[n.name] = max([own[n.name], *(forward[a.name] for a in n.all_input_nodes)])
    backward: dict[str, float] = {}
    for n in reversed(graph.nodes):
        backward[n.name] = max([forward[n.name], *(backward[u.name] for u in n.users)])
    return forward, backward


def verdict(m: Metrics | None, inherited: float, floor: float = 0.0, tail: float = TAIL,
            precision: float = 0.0, tail_max: float = TAIL_MAX) -> Metrics | None:
    """``m`` judged against its noise level; exact dtypes, shape mismatches and NaN/Inf
    differences keep their verdict. ``precision``: the machine epsilon the run computed at, when
    coarser than its tensors' dtypes say (``run_precision``)."""
    if m is None or m.eps == 0 or not math.isfinite(m.max_abs_diff) or "NaN/Inf" in m.note:
        return m
    eps = max(m.eps, precision)
    m = dataclasses.replace(m, eps=eps)
    noise = max(OWN_ROUNDING * eps, AMPLIFY * inherited)
    error = relative_error(m, floor)
    # the worst element: both are upper bounds of |d| / max(|ref|, RMS, floor)
    worst = min(m.max_scaled_diff, m.max_abs_diff / floor) if floor > 0 else m.max_scaled_diff
    passed = error <= noise and worst <= min(tail * noise, tail_max)
    return dataclasses.replace(m, passed=passed, error=error, noise=noise)


def explained(m: Metrics | None, by_replay: bool) -> Metrics | None:
    """``m``, passed where the replays explained its difference as rounding (``by_replay``: see
    ``NodeRow.explained``); its error then counts as noise for what follows it."""
    return dataclasses.replace(m, passed=True) if by_replay and m is not None and not m.passed else m


def _summed(m: Metrics | None, consumers: list[NodeRow], floor: float) -> float:
    """The relative error a parameter's gradient gets from its consumers' output gradients, which it
    sums over every element that used one of its own (a bias over batch and positions): their
    difference plus the rounding of the sum itself (machine epsilon times their RMS, for each
    term), ``sqrt(elements per parameter element)`` times that, at the gradient's own scale. Where
    the terms cancel (a bias whose effect a norm or a ``pool(x) - x`` removes: an analytically
    zero gradient; a mono output's bias summed over every sample), this is much more than their
    relative error, and a float32 sum differs from a float64 one of the same terms by as much."""
    scale = max(m.ref_rms, m.cand_rms, floor) if m is not None else 0.0
    if not scale or not m.numel:
        return 0.0
    terms = [x.backward for x in consumers if x.backward is not None and x.backward.passed]
    return max([math.sqrt(g.numel / m.numel) * (g.rms_diff + g.eps * max(g.ref_rms, g.cand_rms)) / scale
                for g in terms], default=0.0)


def rows_by_ref(rows: list[NodeRow]) -> dict[str, list[NodeRow]]:
    """The rows of each reference node (a node a fused output's slices share has several)."""
    by_ref: dict[str, list[NodeRow]] = {}
    for r in rows:
        by_ref.setdefault(r.ref_node, []).append(r)
    return by_ref


def nearest(graph: torch.fx.Graph, compared: set[str]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Each node's nearest compared ancestors and nearest compared descendants (through nodes that
    are not compared)."""
    nodes = list(graph.nodes)
    preds: dict[str, set[str]] = {}
    for n in nodes:
        acc: set[str] = set()
        for a in n.all_input_nodes:
            acc |= {a.name} if a.name in compared else preds.get(a.name, set())
        preds[n.name] = acc
    succs: dict[str, set[str]] = {}
    for n in reversed(nodes):
        acc = set()
        for u in n.users:
            acc |= {u.name} if u.name in compared else succs.get(u.name, set())
        succs[n.name] = acc
    return preds, succs


def after_divergence(graph: torch.fx.Graph, rows: list[NodeRow]) -> set[str]:
    """The reference nodes after a forward divergence: a nearest compared input failed, or is after
    one. Such a node may pass on its own rounding (a residual add dilutes the error), but what it
    carries is the divergence's, so it lends no noise to what follows."""
    by_ref = rows_by_ref(rows)
    preds, _ = nearest(graph, set(by_ref))
    after: set[str] = set()
    for r in sorted(rows, key=lambda r: r.depth):
        if any(n in after or any(x.forward is not None and not x.forward.passed for x in by_ref[n])
               for n in preds[r.ref_node]):
            after.add(r.ref_node)
    return after


def judge(graph: torch.fx.Graph, rows: list[NodeRow], params: list[ParamRow], node_floor: float,
          param_floor: float, precision: float = 0.0) -> None:
    """Noise-aware verdicts for every row and parameter: parameter values first (each at its own
    rounding), then forward values in topological order (inheriting from compared inputs and from
    the parameters they read), then gradients in reverse order, then parameter gradients."""
    values, grads = rounded(graph)
    for p in params:
        p.value = verdict(p.value, 0.0)
    value_error = {p.ref: p.value.error or 0.0 for p in params if p.value is not None and p.value.passed}
    param_nodes = {n.name: str(n.target) for n in graph.nodes if n.op == "get_attr" and str(n.target) in value_error}
    by_ref = rows_by_ref(rows)
    preds, succs = nearest(graph, set(by_ref) | set(param_nodes))
    order = sorted(rows, key=lambda r: r.depth)

    # nodes after a forward divergence (a compared input failed, or is after one; backward: the node's
    # own value failed or is after one): one may pass on its own rounding (a residual add dilutes the
    # error), but what it carries is the divergence's, so it lends no noise to what follows
    after = {"forward": set(), "backward": set()}

    def passing(names: set[str], direction: str) -> float:
        errors = [getattr(x, direction).error or 0.0 for n in names if n not in after[direction]
                  for x in by_ref.get(n, ()) if getattr(x, direction) is not None and getattr(x, direction).passed]
        if direction == "forward":
            errors += [value_error[param_nodes[n]] for n in names if n in param_nodes]
        return max(errors, default=0.0)

    def failed(names: set[str], direction: str) -> bool:
        return any(n in after[direction] or any(getattr(x, direction) is not None and not getattr(x, direction).passed
                                                for x in by_ref.get(n, ())) for n in names)

    carried: set[str] = set()   # values carrying a difference the replays explained (codes an argmax picked)
    for r in order:
        inputs = preds[r.ref_node]
        if failed(inputs, "forward"):
            after["forward"].add(r.ref_node)
        # such a difference is whole elements (another code's vector), not rounding: no cap on one element
        replayed = "forward" in r.explained or any(n in carried for n in inputs if n not in after["forward"])
        r.forward = explained(verdict(r.forward, passing(inputs, "forward"),
                                      precision=max(precision, values.get(r.ref_node, 0.0)),
                                      tail_max=math.inf if replayed else TAIL_MAX), "forward" in r.explained)
        if replayed:
            carried.add(r.ref_node)
    for r in reversed(order):
        if failed({r.ref_node}, "forward"):
            after["backward"].add(r.ref_node)
        inherited = max(passing(succs[r.ref_node], "backward"), passing(preds[r.ref_node] | {r.ref_node}, "forward"))
        r.backward = explained(verdict(r.backward, inherited, node_floor, TAIL_BACKWARD,
                                       max(precision, grads.get(r.ref_node, 0.0)), math.inf), "backward" in r.explained)
    users: dict[str, set[str]] = {}
    for name, target in param_nodes.items():
        users.setdefault(target, set()).update(succs[name])
    for n in graph.nodes:   # parameters whose values failed still have consumers to judge by
        if n.op == "get_attr" and n.name not in param_nodes:
            users.setdefault(str(n.target), set()).update(x for x in succs[n.name] if x in by_ref)
    read_at = {}   # the rounding a parameter's gradient carries: its readers'
    for n in graph.nodes:
        if n.op == "get_attr":
            read_at[str(n.target)] = max(read_at.get(str(n.target), 0.0), grads.get(n.name, 0.0))
    for p in params:
        consumers = [x for n in users.get(p.ref, ()) if n not in after["backward"] for x in by_ref.get(n, ())]
        inherited = max([m.error or 0.0 for x in consumers for m in (x.forward, x.backward)
                         if m is not None and m.passed], default=0.0)
        p.grad = verdict(p.grad, max(inherited, _summed(p.grad, consumers, param_floor)), param_floor,
                         TAIL_BACKWARD, max(precision, read_at.get(p.ref, 0.0)), math.inf)
