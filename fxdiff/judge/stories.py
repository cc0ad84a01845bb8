"""Why a divergence starts where it does: the stories told at a first divergence.

A story names the cause where the ops say it: an argument that differs (``eps``), an attention's
scale, mask or bias, an op one side alone has, a value each side builds its own way (a mask, an
index, a rotary table), a norm written out another way, values or parameters used in each other's
place, a parameter that differs and how. Each ``_blame_*`` or ``_name_*`` function looks at the
forward first divergences not told yet (``NodeRow.blame`` empty) and tells the ones it can; they
run in ``tell``'s order, the more specific first. Each reads the two captures and the judged rows
and writes only ``NodeRow.blame`` or a parameter row's note.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Collection, Iterator

import torch
import torch.fx

from ..model.alignment import Alignment, ParamPair
from ..model.capture import DTYPE, MODULE, SHAPE, TARGET, Capture
from ..model.report import NodeRow, OutputRow, ParamRow
from ..ops import DEFAULT_OPS, GETITEM, node_key
from ..store.summary import is_summary
from . import activations, arguments, attention, masks, norms, rotary
from .isolate import replay
from .rows import block_after, coarser, counterpart_module, cut, own_verdict, replay_boundary, stored
from ..match.confidence import OTHER_USERS
from ..targets import Targets
from .tensors import Tolerance, compare_tensors, machine_eps


def tell(ref: Capture, cand: Capture, rows: list[NodeRow], params: list[ParamRow], alignment: Alignment,
         rejected: list[NodeRow], lowered: list[NodeRow], tol: Tolerance) -> None:
    """Tell what starts each forward first divergence, where a story fits: ``rejected``, the weak
    pairs set aside; ``lowered``, the rows the candidate computes at a coarser dtype of its own."""
    _blame_arguments(ref, cand, rows)
    _blame_untied(ref, cand, rows, params)
    _blame_factor(ref, cand, rows)
    _blame_unread(ref, cand, rows, params)
    _blame_lowered(ref, cand, rows, lowered)
    _blame_norm(ref, cand, rows)
    _blame_one_sided_norm(ref, cand, rows)
    _blame_norm_gain(ref, cand, rows)
    _blame_mask(ref, cand, rows)
    _blame_index(ref, cand, rows)
    _blame_attention_scale(ref, cand, rows, tol)
    _blame_attention_bias(ref, cand, rows)
    _blame_activation(ref, cand, rows)
    _name_crossed_names(ref, cand, rows, params)
    _name_fused_parts_crossed(ref, cand, rows)
    _blame_attention_inputs(ref, cand, rows, alignment)
    _blame_made_another_way(ref, cand, rows, rejected, params, tol)
    _blame_one_sided(ref, cand, rows, alignment)
    _blame_weight_made(ref, cand, rows, alignment)
    _blame_side_input(ref, cand, rows, rejected)
    _name_role_swaps(ref, cand, rows)
    _name_swapped_parameters(ref, cand, rows, alignment)
    _name_crossed_inputs(ref, cand, rows)
    _name_gate_swap(ref, cand, rows)
    _name_swapped_roles(ref, cand, rows)
    _blame_parameter_values(ref, rows, params)
    _blame_unpaired_tensors(ref, cand, rows, alignment)
    _blame_made_from_constants(ref, cand, rows)
    _name_rearranged(ref, cand, rows)
    _name_other_ops(ref, cand, rows)


def tell_outputs(ref: Capture, cand: Capture, outputs: list[OutputRow], rows: list[NodeRow]) -> None:
    """Tell what starts an output that is a first divergence of its own (``OutputRow.frontier``: the
    ops before it pair with nothing), where a story fits: a norm one side alone runs last (T5's
    encoder's final norm left out), set as the frontier's ``blame``."""
    compared = {"ref": {r.ref_node for r in rows}, "cand": {r.cand_node for r in rows}}
    for o in outputs:
        f = o.frontier
        if not f:
            continue
        nodes = {"ref": ref.node(f["ref_node"]), "cand": cand.node(f["cand_node"])}
        for side, other in (("ref", "cand"), ("cand", "ref")):
            norm, theirs = norms.norm_of(nodes[side]), _through_views(nodes[other], compared[other])
            if norm is None or theirs.name not in compared[other] or norms.norm_of(theirs) is not None:
                continue
            module = nodes[side].meta.get(MODULE, "")
            f["blame"] = [f"{side}-only {norm.words()}: the {'candidate' if side == 'ref' else 'reference'} returns "
                          "its input as it is", *((module, f["cand_module"]) if side == "ref" else
                                                  (f["ref_module"], module))]
            break


def reordered_rows(ref: Capture, cand: Capture, rows: list[NodeRow], alignment: Alignment) -> dict[str, str]:
    """The parameters paired with the candidate's laid out another way that an op where a divergence
    is introduced does not follow, told there: ``{ref param: what}`` (``_blame_reordered_rows``)."""
    return _blame_reordered_rows(ref, cand, rows, alignment)


def name_parameters(ref: Capture, cand: Capture, params: list[ParamRow], rows: list[NodeRow]) -> list[str]:
    """Notes on the parameter rows that differ: read with other constant arguments (a weight norm's
    dim), their rows or columns in another order, another parameter's values. Returns the lines
    that say the first, for the warnings."""
    said = _name_reading_arguments(ref, cand, params)
    said += _name_untied(ref, cand, params, rows)
    _name_reordered_parameters(ref, cand, params)
    return said


def place_unpaired(ref: Capture, cand: Capture, alignment: Alignment) -> list[str]:
    """Lines for the warnings: each candidate matrix that pairs with nothing whose rows are all rows
    (or columns) of one reference matrix that pairs with nothing either, and where they are in it (a
    fused weight split at other offsets, Phi-3's ``qkv_proj`` with k taken at rows 48:80, or
    interleaved, its ``gate_up_proj`` split into even and odd rows); then the rows of that matrix
    in two of them, or in none. Told for the first layer, the others counted."""
    indexes: dict[tuple[str, int], dict[bytes, list[int]]] = {}
    placed: dict[str, list[tuple[str, str, list[int]]]] = {}
    for name in alignment.unmatched_cand_params[:_MOST_NOTED]:
        b = cand.params.get(name)
        if b is None or is_summary(b) or b.dim() != 2:
            continue
        for other in alignment.unmatched_ref_params:
            a = ref.params.get(other)
            if a is None or is_summary(a) or a.dim() != 2 or a.dtype != b.dtype:
                continue
            found = None
            for dim, what in ((0, "rows"), (1, "columns")):
                m = a if dim == 0 else a.t()
                if m.shape[1] != b.shape[1] or not len(b) <= len(m) <= _MOST_ROWS:
                    continue
                index = indexes.get((other, dim))
                if index is None:
                    index = indexes[(other, dim)] = {}
                    for i, r in enumerate(_row_bytes(m)):
                        index.setdefault(r, []).append(i)
                taken = _taken(index, _row_bytes(b))
                if taken:
                    found = (name, what, taken)
                    break
            if found:
                placed.setdefault(other, []).append(found)
                break
    lines: dict[str, list[str]] = {}   # by the text with its numbers taken out: one a layer
    for other, parts in placed.items():
        said = [f"{name} pairs with nothing: its rows are {other}'s {what} {_span(taken)}"
                for name, what, taken in parts]
        used = [i for _, _, taken in parts for i in taken]
        size = len(ref.params[other]) if parts[0][1] == "rows" else ref.params[other].shape[1]
        twice, none = sorted({i for i in used if used.count(i) > 1}), sorted(set(range(size)) - set(used))
        said += [f"{other}: {parts[0][1]} {_span(rows)} are in {where} of them"
                 for rows, where in ((twice, "two"), (none, "none")) if rows]
        for line in said:
            lines.setdefault(re.sub(r"\.\d+\.", ".#.", line), []).append(line)
    return [alike[0] + (f" (and {len(alike) - 1} more like it)" if len(alike) > 1 else "") for alike in lines.values()]


def _taken(index: dict[bytes, list[int]], rows: list[bytes]) -> list[int] | None:
    """The positions of ``rows`` among the rows ``index`` finds by their bytes, each taken once;
    None when one is not there."""
    taken: list[int] = []
    for r in rows:
        found = [i for i in index.get(r, ()) if i not in taken]
        if not found:
            return None
        taken.append(found[0])
    return taken


def _span(taken: list[int]) -> str:
    """Positions as a slice, ``[48:80]`` or ``[1:320:2]``, a few runs, ``[0:32], [64:96]``, a short
    list, or ``in another order``."""
    step = taken[1] - taken[0] if len(taken) > 1 else 1
    if step > 0 and taken == list(range(taken[0], taken[0] + step * len(taken), step)):
        return f"[{taken[0]}:{taken[-1] + 1}{f':{step}' if step > 1 else ''}]"
    runs = [[taken[0], taken[0] + 1]]
    for i in taken[1:]:
        if i == runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([i, i + 1])
    if len(runs) <= _RUNS and 2 * len(runs) <= len(taken):
        return ", ".join(f"[{a}:{b}]" for a, b in runs)
    return str(taken) if len(taken) <= _LISTED else "in another order"


_RUNS = 8   # blocks of a fused weight told one by one


def _blame_lowered(ref: Capture, cand: Capture, rows: list[NodeRow], lowered: list[NodeRow]) -> None:
    """Blame a forward first divergence that the candidate computes at a coarser dtype than the
    reference and its own parameters (``assemble._lowered``) on that."""
    own = sorted({str(t.dtype).removeprefix("torch.") for t in cand.params.values()
                  if not is_summary(t) and t.is_floating_point()})
    for row in rows:
        if row.first_forward and not row.blame and any(row is x for x in lowered):
            a, b = (c.node(n).meta.get(DTYPE) for c, n in ((ref, row.ref_node), (cand, row.cand_node)))
            row.blame = [f"the candidate computes it in {b} (its parameters are {', '.join(own)}), the reference "
                         f"in {a}",
                         row.ref_module, row.cand_module]


def _blame_parameter_values(ref: Capture, rows: list[NodeRow], params: list[ParamRow]) -> None:
    """Blame a forward first divergence introduced at an op that reads a parameter or buffer
    whose value differs from its counterpart's (a patch kernel transposed in a conversion, a
    position table shifted)."""
    differ = {p.ref: p for p in params if p.value is not None and not p.value.passed}
    for row, name in _introduced_reading(ref, rows, differ):
        note = differ[name].value.note
        row.blame = [f"a tensor it reads differs: {name} against the candidate's {', '.join(differ[name].cand)}"
                     + (f": {note}" if note else ""), row.ref_module, row.cand_module]


def _blame_reordered_rows(ref: Capture, cand: Capture, rows: list[NodeRow], alignment: Alignment) -> dict[str, str]:
    """Blame a forward first divergence introduced at an op that reads a parameter paired by content
    with the candidate's laid out another way: its rows in another order (a classifier's classes
    reordered in a conversion: the op's output features are those rows, and nothing after it puts
    them back), reshaped to its transpose's shape (``w.reshape(n, m)`` for ``w.T``), or transposed
    where both sides' ops read it alike (a square projection's weight, at ``F.linear``'s ``weight``
    on both sides: a transpose is a layout only between ops that read it the other way round, a
    Conv1D against a Linear). The parameter's value is then a difference: ``{ref param: what}``."""
    relaid = {pp.ref: pp for pp in alignment.params if pp.transform.get("kind") in ("permute_rows", "transpose")
              or _reshaped_for_transposed(pp, ref, cand)}
    found: dict[str, str] = {}
    for row, name in _introduced_reading(ref, rows, relaid):
        pp = relaid[name]
        kind = pp.transform["kind"]
        if kind == "permute_rows":
            index = pp.transform["index"]
            order = ", ".join(map(str, index[:8])) + (", ..." if len(index) > 8 else "")
            how = f"with its rows in another order ([{order}])"
        elif kind == "transpose":
            argument = _read_alike(ref.node(row.ref_node), cand.node(row.cand_node), name, pp.cand[0])
            if argument is None:
                continue
            how = (f"transposed, though both sides' {row.op} ops ({row.ref_node}, {row.cand_node}) read it as their "
                   f"{argument}")
        else:
            how = f"reshaped to {list(ref.params[name].shape)}, the shape of its transpose, not transposed"
        if kind != "transpose":
            how += f", which its {row.op} op ({row.ref_node}) does not follow"
        found[name] = f"is the candidate's {pp.cand[0]} {how}: not a layout, a difference"
        row.blame = [f"{name} {found[name]}", row.ref_module, row.cand_module]
    return found


def _read_alike(rn: torch.fx.Node, cn: torch.fx.Node, name: str, cand_name: str) -> str | None:
    """The argument (by name where torch can tell) at which calls of one function read parameter
    ``name`` on the reference's side and ``cand_name`` on the candidate's, or None."""
    if rn.op != "call_function" or rn.meta.get(TARGET) != cn.meta.get(TARGET):
        return None
    for k, a, b in arguments.side_by_side(rn, cn):
        if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and a.op == b.op == "get_attr" \
                and (str(a.target), str(b.target)) == (name, cand_name):
            return k if isinstance(k, str) else f"argument {k}"
    return None


def _reshaped_for_transposed(pp: ParamPair, ref: Capture, cand: Capture) -> bool:
    """Whether a parameter pairs with the candidate's as a reshape of a matrix to its transpose's
    shape, (m, n) from (n, m): almost always a conversion that meant ``.T``."""
    if pp.transform.get("kind") != "reshape" or len(pp.cand) != 1:
        return False
    a, b = ref.params.get(pp.ref), cand.params.get(pp.cand[0])
    return a is not None and b is not None and a.dim() == b.dim() == 2 and a.shape != b.shape \
        and tuple(a.shape) == tuple(reversed(b.shape))


def _introduced_reading(ref: Capture, rows: list[NodeRow], names: Collection[str]) -> Iterator[tuple[NodeRow, str]]:
    """The forward first divergences introduced at an op, not blamed yet, whose block (the ops from
    the compared values to it: a Conv1D's ``addmm`` and the view after it) reads one of the
    parameters ``names``: each with the first it reads."""
    compared = {r.ref_node for r in rows}
    for row in rows:
        if not names or not row.first_forward or row.blame or row.cause() != "introduced":
            continue
        node = ref.node(row.ref_node)
        name = next((n for n in [*_params_read(node), *_held(node, compared)] if n in names), None)   # its own arguments first
        if name is not None:
            yield row, name


def _blame_unpaired_tensors(ref: Capture, cand: Capture, rows: list[NodeRow], alignment: Alignment) -> None:
    """Blame a forward first divergence introduced at an op, with no other story, on the one
    parameter or buffer each side reads on the way to it that pairs with nothing, of one size (an
    index buffer built another way: no content pairs it, so no value of it was compared); or on
    the one such tensor one side reads where the other reads none and builds nothing from
    constants in its place (Swin's shifted-window mask, a buffer in timm, left out of a port)."""
    left_r, left_c = set(alignment.unmatched_ref_params), set(alignment.unmatched_cand_params)
    compared_r, compared_c = {r.ref_node for r in rows}, {r.cand_node for r in rows}
    for row in rows:
        if not row.first_forward or row.blame or row.cause() != "introduced":
            continue
        rn, cn = ref.node(row.ref_node), cand.node(row.cand_node)
        xs = [n for n in _held(rn, compared_r) if n in left_r and n in ref.params]
        ys = [n for n in _held(cn, compared_c) if n in left_c and n in cand.params]
        if len(xs) == len(ys) == 1 and ref.params[xs[0]].numel() == cand.params[ys[0]].numel():
            row.blame = [f"a tensor it reads pairs with nothing: {xs[0]} against the candidate's {ys[0]}, of one "
                         "size, whose values differ", row.ref_module, row.cand_module]
        elif len(xs) + len(ys) == 1 and not _builds_side_input(cn if xs else rn, compared_c if xs else compared_r):
            name, other = (xs[0], "candidate") if xs else (ys[0], "reference")
            row.blame = [f"a tensor it reads pairs with nothing: {name}, where the {other} reads or builds nothing "
                         "in its place", row.ref_module, row.cand_module]


def _builds_side_input(node: torch.fx.Node, compared: set[str]) -> bool:
    """Whether an op on the way from the compared values to ``node`` computes from constants alone
    (a mask built in the forward pass) or reads a parameter or buffer."""
    up = _upstream(node, compared)
    return any(n.op == "get_attr" or n.op == "call_function" and _from_constants(n, compared)
               for n in node.graph.nodes if n.name in up)


def _blame_arguments(ref: Capture, cand: Capture, rows: list[NodeRow]) -> None:
    """Blame a forward first divergence of one function on both sides on the constant arguments it
    was called with where they differ (a norm's ``eps``, an attention's ``scale`` or
    ``is_causal``), by keyword or position; the function's call is looked for behind the views
    that follow it on one side (HF's Swin norm's output viewed as the image that timm's is)."""
    for row in rows:
        if not row.first_forward or row.blame:
            continue
        rn, cn = ref.node(row.ref_node), cand.node(row.cand_node)
        if rn.meta.get(TARGET) != cn.meta.get(TARGET):
            rn, cn = _through_views(rn, set()), _through_views(cn, set())
        if rn.op != "call_function" or rn.meta.get(TARGET) != cn.meta.get(TARGET):
            continue
        given = arguments.side_by_side(rn, cn)
        # a flag one side sets where the other passes a tensor instead, or one of another shape, may say
        # the same thing another way (sdpa's is_causal against an attn_mask; its enable_gqa against k
        # and v with their heads repeated)
        flags = all(isinstance(a, torch.fx.Node) == isinstance(b, torch.fx.Node)
                    and (not isinstance(a, torch.fx.Node) or a.meta.get(SHAPE) == b.meta.get(SHAPE)) for _, a, b in given)
        if str(rn.meta.get(TARGET)).endswith("__getitem__"):   # x[index], where both index alike-shaped tensors
            tensors = [n.args[0] for n in (rn, cn)]
            shape = tensors[0].meta.get(SHAPE) if isinstance(tensors[0], torch.fx.Node) else None
            if len(rn.args) != 2 or len(cn.args) != 2 or not isinstance(tensors[1], torch.fx.Node) \
                    or not shape or shape != tensors[1].meta.get(SHAPE):
                continue
            a, b = (_index_text(n.args[1], len(shape)) for n in (rn, cn))
            given = [("index", _Written(a[0]), _Written(b[0]))] if a[0] is not None and b[0] is not None \
                and a[1] != b[1] else []
        differ = _differing(given, flags)
        if differ:
            row.blame = [f"its arguments differ: {', '.join(differ)}", rn.meta.get(MODULE, row.ref_module),
                         cn.meta.get(MODULE, row.cand_module)]


def _blame_factor(ref: Capture, cand: Capture, rows: list[NodeRow]) -> None:
    """Blame a forward first divergence at a product of a compared value and a single number on
    each side (an embedding scaled by sqrt(d): Gemma's ``embed_scale`` buffer against a
    ``torch.tensor`` a port makes, rounded to bfloat16) on the two numbers, where they differ."""
    compared_r, compared_c = {r.ref_node for r in rows}, {r.cand_node for r in rows}

    def factor(capture: Capture, node: torch.fx.Node, compared: set[str]) -> tuple[float, str] | None:
        if node_key(node) not in ("mul", "div") or len(node.args) != 2:
            return None
        values, numbers = [], []
        for i, a in enumerate(node.args):
            if isinstance(a, torch.fx.Node) and _through_views(a, compared).name in compared:
                values.append(i)
            elif type(a) in (int, float):
                numbers.append((float(a), "a number"))
            elif isinstance(a, torch.fx.Node) and (t := stored(capture, a)) is not None and t.numel() == 1 \
                    and t.is_floating_point():
                made = str(a.target) if a.op == "get_attr" else a.name if a.name == node_key(a) else \
                    f"{a.name}, {node_key(a)}"
                numbers.append((float(t), made))
        if len(values) != 1 or len(numbers) != 1 or node_key(node) == "div" and values != [0]:
            return None
        return numbers[0]
    for row in rows:
        if not row.first_forward or row.blame:
            continue
        rn, cn = ref.node(row.ref_node), cand.node(row.cand_node)
        a, b = factor(ref, rn, compared_r), factor(cand, cn, compared_c)
        if a is None or b is None or node_key(rn) != node_key(cn) or math.isclose(a[0], b[0], rel_tol=1e-7):
            continue
        row.blame = [f"its factor differs: {a[0]:.7g} ({a[1]}) against {b[0]:.7g} ({b[1]})",
                     row.ref_module, row.cand_module]


def _blame_norm(ref: Capture, cand: Capture, rows: list[NodeRow]) -> None:
    """Blame a forward first divergence at a normalisation's output on the two sides' norms where
    one writes it out and the other calls it (``norms.norm_of``): of another kind (an RMS norm
    ported as a ``layer_norm``, which subtracts the mean), or with another eps; where they are
    alike, on a number one side alone scales their input by."""
    for row in rows:
        if not row.first_forward or row.blame:
            continue
        a, b = norms.norm_of(ref.node(row.ref_node)), norms.norm_of(cand.node(row.cand_node))
        if a is None and b is None:   # inside norms written out (their eps added, paired with another op)
            a, b = (_norm_after(n) for n in (ref.node(row.ref_node), cand.node(row.cand_node)))
        if a is None or b is None:
            continue
        written = a.written or b.written   # both calls: their arguments' story tells them apart
        if written and (a.kind != b.kind or a.outside != b.outside):
            what = "a norm of another kind" if a.kind != b.kind else "its eps added elsewhere"
            row.blame = [f"{what}: the reference's {a.words()} against the candidate's {b.words()}",
                         row.ref_module, row.cand_module]
        elif written and a.eps is not None and b.eps is not None and not math.isclose(a.eps, b.eps, rel_tol=1e-6):
            row.blame = [f"its eps differs: {a.eps:g} against {b.eps:g} (the reference's {a.words()}, the "
                         f"candidate's {b.words()})", row.ref_module, row.cand_module]
        elif a.kind == b.kind:
            _blame_scaled_input(ref, cand, row, {(r.ref_node, r.cand_node) for r in rows})


def _norm_after(node: torch.fx.Node) -> norms.Norm | None:
    """The norm whose output ``node`` leads to within a few ops, the first found."""
    found = _first_after(node, lambda u: norms.norm_of(u) is not None, most=6)
    return norms.norm_of(found) if found is not None else None


def _blame_scaled_input(ref: Capture, cand: Capture, row: NodeRow, pairs: set[tuple[str, str]]) -> None:
    """Blame a norm alike on both sides on a number one side alone multiplies its input by (an
    embedding scaled by sqrt(d) in a port of a model that does not scale it): the norm hides most
    of it, the residual stream does not. ``pairs``: the compared (reference, candidate) nodes."""
    x, y = norms.source(ref.node(row.ref_node)), norms.source(cand.node(row.cand_node))
    if x is None or y is None:
        return
    for side, mine, theirs in (("ref", x, y), ("cand", y, x)):
        numbers = [a for a in mine.args if type(a) in (int, float)]
        if node_key(mine) not in ("mul", "div") or len(mine.all_input_nodes) != 1 or len(numbers) != 1:
            continue
        inner = mine.all_input_nodes[0]
        if ((inner.name, theirs.name) if side == "ref" else (theirs.name, inner.name)) in pairs:
            module = mine.meta.get(MODULE, "")
            row.blame = [f"{side}-only {node_key(mine)} by {numbers[0]:g} ({mine.name}) of the norm's input, where "
                         f"the {'candidate' if side == 'ref' else 'reference'} normalises it as it is",
                         *((module, row.cand_module) if side == "ref" else (row.ref_module, module))]
            return


def _blame_one_sided_norm(ref: Capture, cand: Capture, rows: list[NodeRow]) -> None:
    """Blame a forward first divergence of one function on both sides whose input one side
    normalises first, in ops that pair with nothing, and the other passes as it is (a final norm
    ported as an ``Identity``): the norm, by kind and module."""
    compared_r, compared_c = {r.ref_node for r in rows}, {r.cand_node for r in rows}
    for row in rows:
        if not row.first_forward or row.blame:
            continue
        rn, cn = ref.node(row.ref_node), cand.node(row.cand_node)
        if not arguments.same_function(rn, cn) or not (rn.args and cn.args) \
                or not isinstance(rn.args[0], torch.fx.Node) or not isinstance(cn.args[0], torch.fx.Node):
            x, y = rn, cn   # the norm's output itself paired with the other side's input to it (GPT-NeoX's)
            if not any(norms.norm_of(n) is not None and norms.norm_of(m) is None and norms.source(n) is not None
                       and norms.source(n).name not in mine
                       and _relative_distance(stored(a, norms.source(n)), stored(b, m)) < 1e-3
                       for n, m, mine, a, b in ((x, y, compared_r, ref, cand), (y, x, compared_c, cand, ref))):
                continue
            norm = norms.norm_of(x) or norms.norm_of(y)
            side, module = ("ref", x.meta.get(MODULE, "")) if norms.norm_of(x) else ("cand", y.meta.get(MODULE, ""))
            row.blame = [f"{side}-only {norm.words()}: the {'candidate' if side == 'ref' else 'reference'} "
                         "passes its input as it is", *((module, row.cand_module) if side == "ref" else
                                                         (row.ref_module, module))]
            continue
        x, y = _through_views(rn.args[0], compared_r), _through_views(cn.args[0], compared_c)
        for side, (a, b), (mine, theirs) in (("ref", (x, y), (compared_r, compared_c)),
                                            ("cand", (y, x), (compared_c, compared_r))):
            # the other side's input compared as it is, and no norm's output itself
            norm = norms.norm_of(a) if a.name not in mine and b.name in theirs and norms.norm_of(b) is None else None
            if norm is not None:
                module = a.meta.get(MODULE, "")
                other = counterpart_module(rows, module, side)
                row.blame = [f"{side}-only {norm.words()}: the {'candidate' if side == 'ref' else 'reference'} "
                             f"passes its input as it is", *((module, other) if side == "ref" else (other, module))]
                break


def _blame_norm_gain(ref: Capture, cand: Capture, rows: list[NodeRow]) -> None:
    """Blame a forward first divergence at a norm's output, or at an op reading one on each side, on
    the norms' gains where one adds a number to its weight and the other does not (Gemma's
    ``1 + w`` ported as Llama's ``w``)."""
    for row in rows:
        if not row.first_forward or row.blame:
            continue
        rn, cn = ref.node(row.ref_node), cand.node(row.cand_node)
        for x, y in _places(rn, cn):
            a, b = norms.gain(x), norms.gain(y)
            if a is None or b is None or a[0] == b[0]:
                continue
            w, v = ref.params.get(a[1]), cand.params.get(b[1])
            if w is None or v is None or is_summary(w) or is_summary(v) or w.shape != v.shape:
                continue
            eps = 4 * max(machine_eps(w.dtype), machine_eps(v.dtype))
            mine, theirs = w.double() + a[0], v.double() + b[0]
            if not torch.allclose(mine, theirs, rtol=eps, atol=eps):   # a port that converts g = w - 1 agrees
                said = [f"{o:g} + {name}" if o else name for o, name in (a, b)]
                row.blame = [f"the norm's gain differs: the reference multiplies by {said[0]}, the candidate by "
                             f"{said[1]}", x.meta.get(MODULE, row.ref_module), y.meta.get(MODULE, row.cand_module)]
                break


def _blame_mask(ref: Capture, cand: Capture, rows: list[NodeRow]) -> None:
    """Blame a forward first divergence at a masked write or selection on both sides (``x[mask] =
    0``, ``masked_fill``, ``where``) on its mask where the elements the two masks pick differ: a
    padding mask built from lengths with ``>`` for ``>=``. The masks pair with nothing (each side
    builds its own, from values that pair), so no comparison saw them; the ops each side builds
    its mask with are named."""
    compared_r, compared_c = {r.ref_node for r in rows}, {r.cand_node for r in rows}
    for row in rows:
        if not row.first_forward or row.blame:
            continue
        rn, cn = ref.node(row.ref_node), cand.node(row.cand_node)
        if masks.use(rn) is None or masks.use(rn) != masks.use(cn):
            continue
        a, b = masks.picked(ref, rn), masks.picked(cand, cn)
        if a is None or b is None or a.shape != b.shape or torch.equal(a, b):
            continue
        while a.dim() > 1 and torch.equal(a, a[..., :1].expand_as(a)) and torch.equal(b, b[..., :1].expand_as(b)):
            a, b = a[..., 0], b[..., 0]   # a mask of rows, repeated over their features: told by rows
        differ = a != b
        where = ", ".join(str(list(i)) for i in differ.nonzero()[:3].tolist())
        built = [_built_with(capture, masks.mask_of(n), compared)
                 for capture, n, compared in ((ref, rn, compared_r), (cand, cn, compared_c))]
        row.blame = [f"the mask it {masks.use(rn)} through differs at {int(differ.sum())} of "
                     f"{'x'.join(map(str, differ.shape))} positions ({where}{', ...' if differ.sum() > 3 else ''}; "
                     f"ref's picks {int(a.sum())}, the candidate's {int(b.sum())}): ref's {built[0]}, "
                     f"the candidate's {built[1]}", row.ref_module, row.cand_module]


def _blame_index(ref: Capture, cand: Capture, rows: list[NodeRow]) -> None:
    """Blame a forward first divergence of one function on both sides on an integer argument that
    each side builds its own way, where the two differ: T5's relative position buckets, computed
    per call in Hugging Face's and read from a buffer in torchtune's, at the embedding that looks
    them up. No comparison saw them: they pair with nothing."""
    compared_r, compared_c = {r.ref_node for r in rows}, {r.cand_node for r in rows}
    for row in rows:
        if not row.first_forward or row.blame:
            continue
        rn, cn = ref.node(row.ref_node), cand.node(row.cand_node)
        if rn.op != "call_function" or not arguments.same_function(rn, cn):
            continue
        for k, a, b in arguments.side_by_side(rn, cn):
            if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)) \
                    or a.name in compared_r or b.name in compared_c:
                continue
            x, y = stored(ref, a), stored(cand, b)
            if x is None or y is None or x.is_floating_point() or y.is_floating_point() or x.shape != y.shape \
                    or torch.equal(x, y):
                continue
            differ = x != y
            at = differ.nonzero()[0].tolist()
            name = "index" if k in ("idx", "indices") else k if isinstance(k, str) else f"argument {k}"
            built = [_built_with(capture, n, compared)
                     for capture, n, compared in ((ref, a, compared_r), (cand, b, compared_c))]
            row.blame = [f"its {name} differs at {int(differ.sum())} of {differ.numel()} elements (the first {at}: "
                         f"{x[tuple(at)].item()} against {y[tuple(at)].item()}): the reference's {built[0]}, "
                         f"the candidate's {built[1]}", row.ref_module, row.cand_module]
            break


def _blame_made_from_constants(ref: Capture, cand: Capture, rows: list[NodeRow]) -> None:
    """Name how each side makes a forward first divergence computed from no compared value (a
    rotary table from ``inv_freq`` against one read from a buffer of cosines, with another base):
    what differs is in the constants, buffers or ops each side makes it from."""
    compared_r, compared_c = {r.ref_node for r in rows}, {r.cand_node for r in rows}
    for row in rows:
        if not row.first_forward or row.blame:
            continue
        rn, cn = ref.node(row.ref_node), cand.node(row.cand_node)
        if _from_constants(rn, compared_r) and _from_constants(cn, compared_c):
            row.blame = [f"a value each side computes from its parameters, buffers and constants alone differs: the "
                         f"reference's "
                         f"{_built_with(ref, rn, compared_r)}, the candidate's {_built_with(cand, cn, compared_c)}",
                         row.ref_module, row.cand_module]


def _built_with(capture: Capture, node: torch.fx.Node, compared: set[str]) -> str:
    """``made with gt from add_3``: the ops that make ``node`` from compared values, views left out,
    and the compared values, inputs, parameters and buffers they start from; ``read from
    NAME`` where it is a parameter or buffer (or a view of one)."""
    source = _through_views(node, compared)
    if source.op == "get_attr":
        return f"read from {source.target}"
    up = _upstream(node, compared) | {node.name}
    ops = [node_key(n) for n in capture.graph.nodes if n.name in up and n.op == "call_function"
           and not DEFAULT_OPS.is_view(n, node_key(n))]
    starts = sorted({a.name if a.op != "get_attr" else str(a.target) for n in capture.graph.nodes if n.name in up
                     for a in n.all_input_nodes if a.name in compared or a.op in ("placeholder", "get_attr")})
    text = "made with " + ", ".join(ops[:_FEW_OPS]) + (", ..." if len(ops) > _FEW_OPS else "")
    return f"{text} from {', '.join(starts)}" if starts else f"{text} from constants"


def _blame_attention_bias(ref: Capture, cand: Capture, rows: list[NodeRow]) -> None:
    """Blame a forward first divergence at an attention's output on what the two sides add to its
    scores (``attention.bias``) where that differs: the positions one side masks and the other does
    not (a padding mask ignored or inverted, a causal mask off by one), or, where neither masks,
    the bias (T5's relative position bias transposed, its heads mixed up, left out of a layer).
    Each side builds it its own way (a mask's ``where`` against an ``add`` into the scores), so its
    parts pair with nothing and no comparison saw them."""
    for row in rows:
        if not row.first_forward or row.blame or row.ref_slice or row.cand_slice:
            continue
        a, b = attention.bias(ref, ref.node(row.ref_node)), attention.bias(cand, cand.node(row.cand_node))
        if a is None or b is None or a.shape != b.shape:
            continue
        # where each side builds it (a causal mask at the model's root); where one side passes none (a
        # layer that ignores the mask), the attentions
        sources = [attention.bias_source(ref.node(row.ref_node)), attention.bias_source(cand.node(row.cand_node))]
        built = [row.ref_module, row.cand_module] if None in sources else [n.meta.get(MODULE, "") for n in sources]
        ma, mb = torch.isneginf(a), torch.isneginf(b)
        if not torch.equal(ma, mb):
            only = [(ma & ~mb), (mb & ~ma)]
            first = [f" (the first {o.nonzero()[0].tolist()})" if o.any() else "" for o in only]
            row.blame = [f"the attention's mask differs: the reference masks {int(only[0].sum())} positions the "
                         f"candidate does not{first[0]}, the candidate {int(only[1].sum())} the reference does not"
                         f"{first[1]}", *built]
            continue
        x, y = a.masked_fill(ma, 0), b.masked_fill(mb, 0)
        peak = float((x - y).abs().max()) if x.numel() else 0.0
        if peak <= 1e-3 * max(float(x.abs().max()), float(y.abs().max()), 1e-30):
            continue
        if sources.count(None) == 1:   # one side adds nothing: what the other adds, by name
            source = next(n for n in sources if n is not None)
            side, other = ("reference", "candidate") if sources[0] is not None else ("candidate", "reference")
            what = str(source.target) if source.op == "get_attr" else f"{source.name} ({node_key(source)})"
            row.blame = [f"the {side} adds {what} to the attention's scores, the {other} nothing (max abs diff "
                         f"{peak:.3g})", *built]
            continue
        how, flipped = "", b.transpose(-1, -2)
        both = ~ma & ~torch.isneginf(flipped)
        if both.any() and torch.allclose(a[both], flipped[both], rtol=1e-4, atol=1e-4 * peak):
            how = ": the candidate's is the reference's transposed, query and key positions swapped"
        elif x.dim() >= 3 and (heads := _order(x.movedim(-3, 0).reshape(x.shape[-3], -1),
                                               y.movedim(-3, 0).reshape(y.shape[-3], -1))):
            how = f": the candidate's heads in another order, {heads}"   # one bias a head (a table's columns)
        row.blame = [f"the bias added to the attention's scores differs where neither side masks (max abs diff "
                     f"{peak:.3g}){how}", *built]


def _differing(given: list[tuple[int | str, Any, Any]], flags: bool = True) -> list[str]:
    """``eps 1e-05 against 1e-06``: the constant arguments of two calls (``arguments.side_by_side``)
    that differ; with ``flags`` False, bool flags left out."""
    return [f"{k if isinstance(k, str) else f'argument {k}'} {a!r} against {b!r}" for k, a, b in given
            if _constant(a) and _constant(b) and _spread(a, b) != _spread(b, a) and k not in _NO_EFFECT
            and (flags or type(a) is not bool)]


def _name_reading_arguments(ref: Capture, cand: Capture, params: list[ParamRow]) -> list[str]:
    """Name, on a parameter whose value or gradient differs, the constant arguments that the op
    reading it is called with where they differ from those of its counterpart's reader: a weight
    norm over another dim (wav2vec2's positional conv normed over its output channels, not its
    kernel: the weight it makes agrees, its two parameters and their gradients do not, and
    nothing in the forward pass differs). Returns the lines that say so."""
    said, readers = [], {}
    for p in params:
        if len(p.cand) != 1 or all(m is None or m.passed for m in (p.value, p.grad)):
            continue
        readers = readers or {"ref": _sole_readers(ref), "cand": _sole_readers(cand)}
        a, b = readers["ref"].get(p.ref), readers["cand"].get(p.cand[0])
        differ = _differing(arguments.side_by_side(a, b)) if a is not None and b is not None \
            and arguments.same_function(a, b) else []
        if differ:
            note = f"read by {node_key(a)} with {', '.join(differ)}"
            p.value, p.grad = (m if m is None or m.passed else dataclasses.replace(m, note=note)
                               for m in (p.value, p.grad))
            said.append(f"{p.ref} is {note} (the candidate's {p.cand[0]})")
    return said


def _tied(ref: Capture, cand: Capture, params: list[ParamRow],
          rows: list[NodeRow]) -> Iterator[tuple[ParamRow, NodeRow, str]]:
    """A reference parameter read by more ops than its counterpart (an embedding tied to the output
    projection, ported as two tensors), for each of its reader ops whose counterpart reads instead a
    candidate parameter that pairs with nothing: the parameter's row, the op's and that parameter."""
    readers_r, readers_c = _readers(ref), _readers(cand)
    paired = {p.ref for p in params} | {c for p in params for c in p.cand}
    row_of = {r.ref_node: r for r in rows if not (r.ref_slice or r.cand_slice)}
    for p in params:
        if len(p.cand) != 1 or len(readers_r.get(p.ref, ())) <= max(1, len(readers_c.get(p.cand[0], ()))):
            continue
        for op in readers_r[p.ref]:
            row = row_of.get(op.name)
            theirs = cand.node(row.cand_node) if row is not None else None
            if theirs is None or theirs in readers_c[p.cand[0]]:
                continue
            alone = [x for x in _params_read(theirs) if x not in paired]
            if len(alone) == 1:
                yield p, row, alone[0]


def _name_untied(ref: Capture, cand: Capture, params: list[ParamRow], rows: list[NodeRow]) -> list[str]:
    """Name a weight the reference ties and the candidate keeps as two tensors holding the same
    values (Gemma's output projection, the embedding's own weight, ported as an untied copy): the
    forward pass agrees; the tied weight's gradient is the sum of its uses', the candidate's
    counterpart has only its own. On the gradient's row, and as a line for the warnings."""
    said = []
    for p, row, copy in _tied(ref, cand, params, rows):
        if p.grad is None or p.grad.passed or p.grad.note:
            continue
        mine, theirs = ref.params.get(p.ref), cand.params.get(copy)
        if mine is None or theirs is None or is_summary(mine) or is_summary(theirs) or mine.shape != theirs.shape \
                or not torch.equal(cand.params[p.cand[0]], theirs):
            continue
        where = row.ref_module or "<root>"
        note = f"tied in the reference, also read in {where}; the candidate's {copy} there is a copy, untied"
        p.grad = dataclasses.replace(p.grad, note=note)
        said.append(f"{p.ref} is {note}: its gradient lacks that use's")
    return said


def _blame_untied(ref: Capture, cand: Capture, rows: list[NodeRow], params: list[ParamRow]) -> None:
    """Blame a forward first divergence at an op that reads a weight the reference ties (its output
    projection reads the embedding's) where the candidate reads one of its own that pairs with
    nothing (untied, and loaded from another tensor)."""
    readers = None
    for p, row, theirs in _tied(ref, cand, params, rows):
        if not row.first_forward or row.blame:
            continue
        readers = readers or _readers(ref)
        others = sorted({n.meta.get(MODULE) or "<root>" for n in readers[p.ref] if n.name != row.ref_node})
        row.blame = [f"the candidate reads {theirs} here, which pairs with nothing; the reference reads {p.ref}, tied "
                     f"(read in {', '.join(others)} too)", row.ref_module, row.cand_module]


def _blame_unread(ref: Capture, cand: Capture, rows: list[NodeRow], params: list[ParamRow]) -> None:
    """Blame a forward first divergence whose ops on the reference's side read a parameter whose
    counterpart the candidate holds but never reads (T5's gated GELU ported without its gate: the
    value projection converted, loaded and left unused)."""
    readers_c = _readers(cand)
    counterpart = {p.ref: p.cand[0] for p in params if len(p.cand) == 1 and p.cand[0] not in readers_c}
    if not counterpart:
        return
    readers_r = _readers(ref)
    for row in rows:
        if not row.first_forward or row.blame:
            continue
        block = {row.ref_node, *row.ref_block}
        read = [name for name in counterpart if any(n.name in block for n in readers_r.get(name, ()))]
        if read:
            where = next(n for n in readers_r[read[0]] if n.name in block).meta.get(MODULE) or "<root>"
            row.blame = [f"the candidate never reads its {counterpart[read[0]]}, the counterpart of {read[0]}, "
                         "which the reference reads here", where, row.cand_module]


def _name_reordered_parameters(ref: Capture, cand: Capture, params: list[ParamRow]) -> None:
    """Name, on a parameter whose value differs from its counterpart's of its shape, the other
    parameter of the reference's whose values the candidate's holds (an output projection loaded
    from the embedding), or the rows or columns the candidate holds in another order (Swin's
    relative position table with its heads, its columns, in another order): not a layout the
    matcher follows, whose pair is transformed before it is compared."""
    failing = [p for p in params
               if len(p.cand) == 1 and p.value is not None and not p.value.passed and not p.value.note]
    by_start: dict[tuple, list[str]] = {}   # told by their first elements first: comparing each whole is slow
    for name, t in ref.params.items():
        if not is_summary(t) and t.dim():
            by_start.setdefault(_start(t), []).append(name)
    for p in failing[:_MOST_NOTED]:
        a, b = ref.params.get(p.ref), cand.params.get(p.cand[0])
        if a is None or b is None or is_summary(a) or is_summary(b) or a.shape != b.shape or a.dim() == 0:
            continue
        other = next((name for name in by_start.get(_start(b), ())
                      if name != p.ref and torch.equal(ref.params[name], b)), None)
        if other is not None:   # a tied weight loaded where it is not tied
            p.value = dataclasses.replace(p.value, note=f"the candidate's holds the values of {other}")
            continue
        for what, dim in (("rows", 0), ("columns", a.dim() - 1))[:a.dim()]:
            moved = _order(a.movedim(dim, 0).reshape(a.shape[dim], -1), b.movedim(dim, 0).reshape(b.shape[dim], -1))
            if moved:
                p.value = dataclasses.replace(p.value, note=f"the candidate's {what} in another order: {moved}")
                break


_MOST_NOTED = 64   # parameters whose values differ, told how: past this many, the story is the conversion's


def _start(t: torch.Tensor) -> tuple:
    """A tensor's shape, dtype and first few elements' bytes."""
    return tuple(t.shape), t.dtype, t.reshape(-1)[:16].contiguous().view(torch.uint8).numpy().tobytes()


def _sole_readers(capture: Capture) -> dict[str, torch.fx.Node]:
    """Each parameter or buffer read by one op (through views): that op."""
    return {name: ops[0] for name, ops in _readers(capture).items() if len(ops) == 1}


def _readers(capture: Capture) -> dict[str, list[torch.fx.Node]]:
    """The ops that read each parameter or buffer (through views), each once."""
    readers: dict[str, dict[torch.fx.Node, None]] = {}
    for n in capture.graph.nodes:
        if n.op == "get_attr":
            readers.setdefault(str(n.target), {}).update(dict.fromkeys(_after_views(n)))
    return {name: list(ops) for name, ops in readers.items()}


def _after_views(node: torch.fx.Node) -> Iterator[torch.fx.Node]:
    """The ops that read ``node``, through the views of it."""
    for u in node.users:
        if u.op == "call_function" and DEFAULT_OPS.is_view(u, node_key(u)):
            yield from _after_views(u)
        elif u.op == "call_function":
            yield u


def _blame_attention_scale(ref: Capture, cand: Capture, rows: list[NodeRow], tol: Tolerance) -> None:
    """Blame a forward first divergence introduced at an attention's output on its scale where the
    two sides' differ (``attention.scale_of``) and calling one side's attention again with the other
    side's scale gives the other side's value (a scale of 1/d for 1/sqrt(d), one applied twice)."""
    for row in rows:
        if not row.first_forward or row.blame or row.cause() != "introduced" or row.ref_slice or row.cand_slice:
            continue
        r, c = attention.scale_of(ref.node(row.ref_node)), attention.scale_of(cand.node(row.cand_node))
        if r is None or c is None or math.isclose(r.value, c.value, rel_tol=1e-6):
            continue
        if r.sdpa is not None:
            out, other = attention.rescaled(ref, r, c.value / r.value), cand.values[row.cand_node]
        elif c.sdpa is not None:
            out, other = attention.rescaled(cand, c, r.value / c.value), ref.values[row.ref_node]
        else:
            continue
        if out is None or is_summary(other) or out.numel() != other.numel():
            continue
        m = compare_tensors(other, out, tol)
        if own_verdict(m, tol, precision=coarser(other, out)).passed:
            row.blame = [f"the attention's scale differs: {r.words()} against {c.words()}",
                         row.ref_module, row.cand_module]


def _spread(a: Any, b: Any) -> Any:
    """``a`` as a list the length of ``b`` where ``a`` is one number and ``b`` a list (a conv's
    ``stride=1`` against ``stride=(1,)``: the same)."""
    return [a] * len(b) if type(a) in (int, float) and type(b) in (list, tuple) else list(a) if type(a) is tuple else a


class _Written(str):
    """Text shown as it is written (an index), not quoted."""

    def __repr__(self) -> str:
        return str(self)


def _index_text(index: Any, dims: int) -> tuple[str | None, list[str] | None]:
    """``x[index]``'s index as Python writes it (``[..., :-1]``), and the same index spelt one way
    for a tensor of ``dims`` dimensions (``...`` spelt out, trailing ``:`` left out), to compare;
    None, twice, where it holds a tensor or adds a dimension."""
    def one(i: Any) -> str | None:
        if i is Ellipsis:
            return "..."
        if type(i) is int:
            return str(i)
        if isinstance(i, slice) and all(v is None or type(v) is int for v in (i.start, i.stop, i.step)):
            text = f"{'' if i.start is None else i.start}:{'' if i.stop is None else i.stop}"
            return text + (f":{i.step}" if i.step not in (None, 1) else "")
        return None
    parts = [one(i) for i in (index if isinstance(index, tuple) else (index,))]
    if None in parts or parts.count("...") > 1:
        return None, None
    if "..." in parts:
        at = parts.index("...")
        parts_all = parts[:at] + [":"] * (dims - len(parts) + 1) + parts[at + 1:]
    else:
        parts_all = list(parts)
    while parts_all and parts_all[-1] == ":":
        parts_all.pop()
    return f"[{', '.join(parts)}]", parts_all


def _constant(x: Any) -> bool:
    """A number, flag or word, or a list of them (a padding, a shape)."""
    return type(x) in (bool, int, float) or isinstance(x, str) or type(x) in (list, tuple) and all(map(_constant, x))


_NO_EFFECT = {"inplace"}   # arguments that change where a result goes, not its value (torchvision's ReLU(inplace=True))


def _blame_activation(ref: Capture, cand: Capture, rows: list[NodeRow]) -> None:
    """Blame a forward first divergence on an activation of another kind on the two sides, the
    row's op or the one on its way from the compared values (``activations.activation_of``):
    Hugging Face's ``gelu_new`` written out against torchtune's exact ``F.gelu``."""
    compared_r, compared_c = {r.ref_node for r in rows}, {r.cand_node for r in rows}

    def kinds(capture: Capture, name: str, compared: set[str]) -> set[str]:
        """The activations the node is or computes with, each told at its output only."""
        node = capture.node(name)
        nodes = [node, *(capture.node(x) for x in _upstream(node, compared))]
        found = {n.name: activations.activation_of(n) for n in nodes}
        return {kind for n in nodes if (kind := found[n.name]) is not None
                and not any(found.get(u.name) for u in n.users)}
    for row in rows:
        if not row.first_forward or row.blame:
            continue
        a, b = kinds(ref, row.ref_node, compared_r), kinds(cand, row.cand_node, compared_c)
        if len(a) == len(b) == 1 and {activations.kind(x) for x in a} != {activations.kind(x) for x in b}:
            row.blame = [f"an activation of another kind: the reference's {a.pop()} against the candidate's {b.pop()}",
                         row.ref_module, row.cand_module]


def _blame_made_another_way(ref: Capture, cand: Capture, rows: list[NodeRow], rejected: list[NodeRow],
                            params: list[ParamRow], tol: Tolerance) -> None:
    """Blame a forward first divergence introduced in the candidate's block on values both sides
    make, each its own way, before it (a rotary embedding's cos and sin from a buffer against ones
    computed from ``inv_freq``; q and k rotated by them) when the block, replayed with those values
    taken from the reference too, computes the reference's value: the difference came in with them,
    not with the block's own ops (a head expansion one side alone writes out). Such values pair
    only weakly and were set aside when they differ (``assemble._verify_weak``); the replay is the evidence
    they are what differs. The first of them that does is named, with the parameters and buffers
    of the candidate's it is made from."""
    compared_r, compared_c = {r.ref_node for r in rows}, {r.cand_node for r in rows}
    notes = {p.cand[0]: p.value.note for p in params if len(p.cand) == 1 and p.value is not None and p.value.note}
    weak = [r for r in rejected if r.ref_shape == r.cand_shape and not (r.ref_slice or r.cand_slice or r.cand_permuted)
            and r.ref_node in ref.values and r.cand_node in cand.values
            and not is_summary(ref.values[r.ref_node]) and not is_summary(cand.values[r.cand_node])]
    if not weak:
        return
    boundary, layouts = replay_boundary(ref, cand, rows)
    for row in rows:
        if not row.first_forward or row.blame or row.cause() != "introduced":
            continue
        up_r = _upstream(ref.node(row.ref_node), compared_r)
        up_c = _upstream(cand.node(row.cand_node), compared_c)
        before = [r for r in weak if r.ref_node in up_r and r.cand_node in up_c]
        feeding = {r.cand_node: _upstream(cand.node(r.cand_node), compared_c) for r in before}
        first = [r for r in before if not any(o.cand_node in feeding[r.cand_node] for o in before)]
        for taken in (first, before):   # where they start, else all of them
            if not taken:
                continue
            out = replay(ref, cand, row.cand_node, {**boundary, **{r.cand_node: r.ref_node for r in taken}},
                         ref.values[row.ref_node], layouts=layouts)
            if isinstance(out, str):
                continue
            m = compare_tensors(cut(ref.values[row.ref_node], row.ref_slice), cut(out, row.cand_slice), tol)
            if not own_verdict(m, tol, precision=coarser(ref.values[row.ref_node], cand.values[row.cand_node])).passed:
                continue
            used = taken if taken is first else [r for r in taken if not any(r.cand_node in feeding[o.cand_node]
                                                                             for o in taken)]
            r = min(used, key=lambda r: r.depth)
            what = (f"a value made another way on each side differs: ref {node_key(ref.node(r.ref_node))} "
                    f"({r.ref_node}) against cand {node_key(cand.node(r.cand_node))} ({r.cand_node})")
            held = _held(cand.node(r.cand_node), compared_c)
            if held:
                what += f", the candidate's made with {', '.join(held)}"
            what += "".join(f"; {name} differs: {notes[name]}" for name in held if name in notes)
            row.blame = [what, r.ref_module, r.cand_module]
            break


def _held(node: torch.fx.Node, compared: set[str]) -> list[str]:
    """The parameters and buffers read on the way from the compared values to ``node``."""
    up = _upstream(node, compared)
    return sorted({str(n.target) for n in node.graph.nodes if n.op == "get_attr" and n.name in up})


def _blame_one_sided(ref: Capture, cand: Capture, rows: list[NodeRow], alignment: Alignment) -> None:
    """Blame a forward first divergence on an op present on one side only (a forgotten residual
    add, an extra scale) when such an op lies between the divergent node and its compared inputs on
    one side, and none on the other (where both sides have some, they compute the same thing in
    different ways): the divergence starts at that op's module, not at the first matched op
    downstream."""
    # an op fed by compared activations (not only by the model's inputs, as a mask is)
    compared_r = {r.ref_node for r in rows if r.op != "input"}
    compared_c = {r.cand_node for r in rows if r.op != "input"}
    only_r, only_c = _unpaired(ref, alignment, "ref"), _unpaired(cand, alignment, "cand")
    left = {"ref": set(alignment.unmatched_ref_params) & ref.param_grads.keys(),
            "cand": set(alignment.unmatched_cand_params) & cand.param_grads.keys()}
    for row in rows:
        if not row.first_forward or row.blame:   # its arguments, already named
            continue
        block_r = [ref.node(n) for n in (row.ref_node, *row.ref_block)]
        block_c = [cand.node(n) for n in (row.cand_node, *row.cand_block)]
        op_r, op_c = _one_sided_input(block_r, compared_r, only_r), _one_sided_input(block_c, compared_c, only_c)
        if (op_r is None) == (op_c is None):
            continue
        side, op = ("ref", op_r) if op_r is not None else ("cand", op_c)
        # a product whose weights pair with nothing where the other side's trained ones pair with nothing
        # too: it computes there as well, another way (a fused qkv, its rows scrambled)
        if node_key(op) in _NOT_ELEMENTWISE and left["cand" if side == "ref" else "ref"] \
                and any(p in left[side] for p in _params_read(op)):
            continue
        module = op.meta.get(MODULE, "")
        other = counterpart_module(rows, module, side)
        modules = [r.ref_module if side == "ref" else r.cand_module for r in rows]
        kinds = {r.op for r, m in zip(rows, modules) if m == module}
        if module and kinds == {node_key(op)} and not any(m.startswith(module + ".") for m in modules):
            # a leaf module of this one op called twice (torchvision's one ReLU a block), one call matched:
            # the other is where the value it takes is on the other side, not where the first call's is
            at = {r.ref_node: r.cand_module for r in rows} if side == "ref" else \
                {r.cand_node: r.ref_module for r in rows}
            compared = compared_r if side == "ref" else compared_c
            inputs = (_through_views(a, compared).name for a in op.all_input_nodes)
            other = next((at[n] for n in inputs if n in at), other)
        what = f"{side}-only {node_key(op)} ({op.name})"
        unpaired = set(alignment.unmatched_ref_params if side == "ref" else alignment.unmatched_cand_params)
        trained = (ref if side == "ref" else cand).param_grads
        alone = [n for n in _params_read(op) if n in unpaired and n not in trained]
        if alone:   # a buffer only it reads (timm's attention mask); a norm's own weights would say no more
            what += f", reading {', '.join(alone)}, which {'pairs' if len(alone) == 1 else 'pair'} with nothing"
        # a side input (a mask) that side alone builds, where the other passes none (is_causal=True)
        masks = {"ref": _one_sided_input(block_r, compared_r, only_r, side=True),
                 "cand": _one_sided_input(block_c, compared_c, only_c, side=True)}
        also = masks.pop(side)
        if also is not None and None in masks.values():
            what += f", or the side input it alone passes, built by {node_key(also)} ({also.name})"
        row.blame = [what, *((module, other) if side == "ref" else (other, module))]


def _blame_weight_made(ref: Capture, cand: Capture, rows: list[NodeRow], alignment: Alignment) -> None:
    """Blame a forward first divergence, not blamed yet, on a tensor one side's op makes from
    parameters alone, with an op the other side does not have, where the other side's op reads its
    parameters as they are (a weight norm ``g * v / |v|`` dropped in a conversion: the conv reads
    ``v``)."""
    unpaired = {"ref": _unpaired(ref, alignment, "ref"), "cand": _unpaired(cand, alignment, "cand")}

    def made(node: torch.fx.Node, side: str) -> torch.fx.Node | None:
        for a in node.all_input_nodes:
            a = _through_views(a, set())
            if a.op == "call_function" and a.name in unpaired[side] and a.all_input_nodes \
                    and all(_through_views(x, set()).op == "get_attr" for x in a.all_input_nodes):
                return a
        return None
    for row in rows:
        if not row.first_forward or row.blame:
            continue
        rn, cn = ref.node(row.ref_node), cand.node(row.cand_node)
        found = {"ref": made(rn, "ref"), "cand": made(cn, "cand")}
        if (found["ref"] is None) == (found["cand"] is None):
            continue
        side, other = ("ref", "cand") if found["ref"] is not None else ("cand", "ref")
        op, made_of = found[side], _params_read(found[side])
        reads = set(_params_read(rn if other == "ref" else cn))
        pairs = [(p.ref, c) if side == "ref" else (c, p.ref) for p in alignment.params for c in p.cand]
        counterpart = next(((mine, theirs) for mine, theirs in pairs if mine in made_of and theirs in reads), None)
        as_is = "" if counterpart is None else \
            f"; the {'reference' if other == 'ref' else 'candidate'} reads {counterpart[1]}, the counterpart of " \
            f"{counterpart[0]}, as it is"
        row.blame = [f"{side}-only {node_key(op)} ({op.name}) makes a tensor it reads from {', '.join(made_of)}{as_is}",
                     row.ref_module, row.cand_module]


def _unpaired(capture: Capture, alignment: Alignment, side: str) -> set[str]:
    """The ops of one side that pair with nothing: unmatched, or in no pair while holding no tensor
    of their own (an op of several outputs, whose items hold them)."""
    paired = {n for p in alignment.pairs for n in (getattr(p, side), *getattr(p, f"{side}_block"))}
    return set(getattr(alignment, f"unmatched_{side}")) | {
        n.name for n in capture.graph.nodes
        if n.op == "call_function" and n.name not in paired and n.name not in capture.values}


def _blame_side_input(ref: Capture, cand: Capture, rows: list[NodeRow], rejected: list[NodeRow]) -> None:
    """Blame a forward first divergence on a differing side input (a mask built in the model's
    forward) when the input was built differently on the two sides: among the ops that feed the
    divergent pair through uncompared nodes only, a pair aligned by op order (not by size alone)
    that was dropped as weak because its values differ with nothing upstream to explain it is,
    here, the explanation, unless some compared value it feeds agrees (then the two ops were
    look-alikes paired wrongly). The latest such pair is blamed."""
    compared_r, compared_c = {r.ref_node for r in rows}, {r.cand_node for r in rows}
    failing_r = {r.ref_node for r in rows if not r.forward.passed}
    failing_c = {r.cand_node for r in rows if not r.forward.passed}
    keys = {r.ref_node: (node_key(ref.node(r.ref_node)), node_key(cand.node(r.cand_node))) for r in rejected}
    # aligned by order, called alike; or two different elementwise ops in each other's place (SiLU
    # against Hardswish). Either of one shape: ops paired by their place alone (an attention mask's
    # `where` against a softmax; a rotated key against half a rotated query) tell nothing
    differing = [r for r in rejected if r.ref_shape == r.cand_shape
                 and (r.confidence >= OTHER_USERS and keys[r.ref_node][0] == keys[r.ref_node][1]
                      and _called_alike(ref.node(r.ref_node), cand.node(r.cand_node))
                      or len(set(keys[r.ref_node])) == 2 and not _NOT_ELEMENTWISE.intersection(keys[r.ref_node])
                      and _elementwise(ref.node(r.ref_node)) and _elementwise(cand.node(r.cand_node)))
                 and not r.forward.passed
                 and set(block_after(ref.node(r.ref_node), compared_r)[1]) <= failing_r
                 and set(block_after(cand.node(r.cand_node), compared_c)[1]) <= failing_c]
    for row in rows:
        if not row.first_forward or row.blame or not differing:
            continue
        up_r = _upstream(ref.node(row.ref_node), compared_r)
        up_c = _upstream(cand.node(row.cand_node), compared_c)
        found = [r for r in differing if r.ref_node in up_r and r.cand_node in up_c]
        if found:   # a side input aligned by order first, else two different ops
            r = max(found, key=lambda r: (r.confidence >= OTHER_USERS, r.depth))
            key_r, key_c = keys[r.ref_node]
            what = f"a side input that differs: {r.op} ({r.ref_node} | {r.cand_node})" if key_r == key_c else \
                f"ops that differ: ref {key_r} ({r.ref_node}) against cand {key_c} ({r.cand_node})"
            row.blame = [what, r.ref_module, r.cand_module]


def _elementwise(node: torch.fx.Node) -> bool:
    """Whether ``node`` computes from one tensor a value of its shape, and moves no data (an activation)."""
    inputs = node.all_input_nodes
    return len(inputs) == 1 and inputs[0].meta.get(SHAPE) == node.meta.get(SHAPE) is not None \
        and not DEFAULT_OPS.is_view(node, node_key(node))


def _called_alike(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    """Whether two calls pass tensors at the same places (``x * y`` against ``x * 8.0`` are not)."""
    return len(a.args) == len(b.args) and all(isinstance(x, torch.fx.Node) == isinstance(y, torch.fx.Node)
                                              for x, y in zip(a.args, b.args))


def _name_other_ops(ref: Capture, cand: Capture, rows: list[NodeRow]) -> None:
    """Name the ops of each side at a forward first divergence introduced there with no other story,
    where the two sides compute it elementwise with other ops (QuickGELU's ``x * sigmoid(1.702 x)``
    against ``gelu``; GELU written out with ``erf`` against ``gelu(approximate='tanh')``): the
    blocks from the compared values to it, views left out, a few ops each, an op's constant keyword
    arguments with it. Blocks of products, norms or attention are left alone, but for one op a side
    (a GroupNorm ported as a LayerNorm): one side writing out what the other fuses is how ports
    differ when they agree, too."""
    compared_r, compared_c = {r.ref_node for r in rows}, {r.cand_node for r in rows}
    for row in rows:
        if not row.first_forward or row.blame or row.cause() != "introduced":
            continue
        ops = []
        for capture, name, compared in ((ref, row.ref_node, compared_r), (cand, row.cand_node, compared_c)):
            if _from_constants(capture.node(name), compared):   # a table made another way: not an op's doing
                break
            block = _upstream(capture.node(name), compared) | {name}
            ops.append([n for n in capture.graph.nodes if n.name in block and n.op == "call_function"
                        and not DEFAULT_OPS.is_view(n, node_key(n))])
        keys = [[node_key(n) for n in side] for side in ops]
        if len(keys) == 2 and keys[0] and keys[1] and sorted(keys[0]) != sorted(keys[1]) and max(map(len, keys)) <= _FEW_OPS \
                and (not _NOT_ELEMENTWISE.intersection(keys[0] + keys[1]) or len(keys[0]) == len(keys[1]) == 1):
            ref_ops, cand_ops = (", ".join(map(_with_constants, side)) for side in ops)
            row.blame = [f"computed with other ops: ref {ref_ops} against cand {cand_ops}", row.ref_module, row.cand_module]


def _name_rearranged(ref: Capture, cand: Capture, rows: list[NodeRow]) -> None:
    """Name a forward first divergence introduced at an op whose input holds, on the two sides, the
    same features in another order along its last dimension (Swin's 2x2 patches merged as x0, x2,
    x1, x3 against x0, x1, x2, x3), or along another (litgpt's key heads, its query groups in
    another order): each side arranges its input
    with ops of its own (views, slices, a concatenation), which pair with nothing, so no
    comparison saw the difference before the op that reads it."""
    compared_r, compared_c = {r.ref_node for r in rows}, {r.cand_node for r in rows}
    for row in rows:
        if not row.first_forward or row.blame or row.cause() != "introduced":
            continue
        rn, cn = ref.node(row.ref_node), cand.node(row.cand_node)
        if not (rn.args and cn.args and isinstance(rn.args[0], torch.fx.Node)
                and isinstance(cn.args[0], torch.fx.Node)):
            continue
        rx, cx = rn.args[0], cn.args[0]
        if rx.name in compared_r or cx.name in compared_c or rx.name not in ref.values or cx.name not in cand.values:
            continue
        a, b = ref.values[rx.name], cand.values[cx.name]
        if is_summary(a) or is_summary(b) or a.dim() == 0 or a.shape[-1:] != b.shape[-1:] \
                or a.numel() != b.numel() or a.dtype != b.dtype:
            continue
        if a.shape != b.shape:   # one layout flattened: told by rows of the last dimension
            a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        # the last dimension first (features), then each other one (heads, positions)
        for dim in (a.dim() - 1, *range(a.dim() - 1)):
            moved = _order(a.movedim(dim, 0).reshape(a.shape[dim], -1), b.movedim(dim, 0).reshape(b.shape[dim], -1))
            if moved:
                what = "the same features along its last dimension in another order" if dim == a.dim() - 1 \
                    else f"its values in another order along dimension {dim} of {list(a.shape)}"
                row.blame = [f"its input holds {what}: {moved} (ref's {rx.name}, the candidate's {cx.name})",
                             row.ref_module, row.cand_module]
                break


def _order(x: torch.Tensor, y: torch.Tensor) -> str | None:
    """``the candidate's [32:64] is the reference's [64:96], ...`` (or a few rows shuffled one by one:
    ``the reference's [1, 0, 3, 2]``): where each row of ``y`` is a row of ``x`` and they are not in
    the same order, the blocks that moved; else None."""
    if torch.equal(x, y) or len(x) > _MOST_ROWS:
        return None
    rows: dict[bytes, list[int]] = {}
    for i, r in enumerate(_row_bytes(x)):
        rows.setdefault(r, []).append(i)
    taken = []
    for r in _row_bytes(y):
        found = rows.get(r)
        if not found:
            return None
        taken.append(found.pop(0) if len(found) > 1 else found[0])
    runs: list[list[int]] = []   # [start in y, start in x, length]
    for j, i in enumerate(taken):
        if runs and i == runs[-1][1] + runs[-1][2] and j == runs[-1][0] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([j, i, 1])
    if len(taken) <= _LISTED and all(n == 1 for j, i, n in runs if i != j):
        return f"the reference's {taken}"
    moved = [f"the candidate's [{j}:{j + n}] is the reference's [{i}:{i + n}]" for j, i, n in runs if i != j]
    return ", ".join(moved[:4]) + (f" and {len(moved) - 4} more" if len(moved) > 4 else "")


_LISTED = 16   # a shuffle of at most this many is told as the order itself


def _row_bytes(x: torch.Tensor) -> list[bytes]:
    """Each row of a matrix as its bytes (numpy holds no bfloat16)."""
    raw = x.contiguous().view(torch.uint8).numpy()
    return [r.tobytes() for r in raw]


_MOST_ROWS = 1 << 16   # past this many, a search row by row costs more than its story is worth


def _with_constants(node: torch.fx.Node) -> str:
    """``gelu(approximate='tanh')``: an op's key and the constant keyword arguments it was given."""
    given = [f"{k}={v!r}" for k, v in node.kwargs.items() if _constant(v)]
    return f"{node_key(node)}({', '.join(given)})" if given else node_key(node)


_FEW_OPS = 6   # more, and a list of each side's ops tells less than the module does
_NOT_ELEMENTWISE = {"matmul", "linear", "conv", "sdpa", "softmax", "log_softmax", "layer_norm", "batch_norm",
                    "group_norm", "embedding"}


def _from_constants(node: torch.fx.Node, compared: set[str]) -> bool:
    """Whether ``node`` is computed from no compared value (a mask built from its sizes alone)."""
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n.name in compared:
            return False
        if n.name not in seen:
            seen.add(n.name)
            stack.extend(n.all_input_nodes)
    return True


def _upstream(start: torch.fx.Node, compared: set[str]) -> set[str]:
    """The nodes that feed ``start`` through nodes that are not compared."""
    seen: set[str] = set()
    stack = list(start.all_input_nodes)
    while stack:
        n = stack.pop()
        if n.name in seen or n.name in compared:
            continue
        seen.add(n.name)
        stack.extend(n.all_input_nodes)
    return seen


def _name_role_swaps(ref: Capture, cand: Capture, rows: list[NodeRow]) -> None:
    """Name a role swap at a forward first divergence: an input of the candidate's op that is a
    slice of a fused output (q, k, v of one qkv projection; the two halves of a GLU) holding what
    the reference computes in another role than the one it is used in here."""
    sliced = _sliced(rows)
    if not sliced:
        return
    for row in rows:
        if not row.first_forward or row.blame:
            continue
        ref_inputs = {_through_views(a, set()).name for a in ref.node(row.ref_node).all_input_nodes}
        for a in cand.node(row.cand_node).all_input_nodes:
            fused = _fused_source(a, sliced)
            value = cand.values.get(a.name)
            if fused is None or value is None:
                continue
            distance = {r.ref_node: _relative_distance(ref.values.get(r.ref_node), value) for r in sliced[fused]}
            holds = min(distance, key=distance.get)
            used_as = [r.ref_node for r in sliced[fused] if r.ref_node in ref_inputs and r.ref_node != holds]
            if distance[holds] < 0.1 and holds not in ref_inputs and used_as:
                cand_module = cand.node(fused).meta.get(MODULE, "")
                row.blame = [f"role swap: a slice of the candidate's {cand_module or '<root>'} output holds what the "
                             f"reference computes in {ref.node(holds).meta.get(MODULE, '') or '<root>'}, and is used "
                             f"where the reference uses {ref.node(used_as[0]).meta.get(MODULE, '') or '<root>'}",
                             ref.node(used_as[0]).meta.get(MODULE, ""), cand_module]
                break


def _name_swapped_roles(ref: Capture, cand: Capture, rows: list[NodeRow]) -> None:
    """Name an attention's query, key or value passed in another role at a forward first divergence
    at attention on both sides, written out or not (timm's fused qkv split by its views and a
    written-out attention, against HF's three projections and ``scaled_dot_product_attention``,
    q and k converted into each other's places): what each side passes in each role is told by the
    compared value, or the slice of a fused output, it comes from."""
    compared_r, compared_c = {r.ref_node for r in rows}, {r.cand_node for r in rows}
    paired = {r.cand_node: (r.ref_node, r.ref_slice) for r in rows if not r.cand_slice}
    sliced_ref = _sliced(rows, "ref")

    def held_ref(n: torch.fx.Node) -> tuple | None:
        row = _slice_row(n, sliced_ref, "ref") if _fused_source(n, sliced_ref) else None
        if row is not None:
            return row.ref_node, row.ref_slice
        n = _through_views(n, compared_r)
        return (n.name, None) if n.name in compared_r else None

    for row in rows:
        if not row.first_forward or row.blame:
            continue
        mine, theirs = attention.roles(ref.node(row.ref_node)), attention.roles(cand.node(row.cand_node))
        if mine is None or theirs is None:
            continue
        held = {role: held_ref(n) for role, n in mine.items()}
        got = {role: paired.get(_through_views(n, compared_c).name) for role, n in theirs.items()}
        crossed = [(role, other) for role in got for other in held
                   if other != role and got[role] is not None and got[role] == held[other] and got[role] != held[role]]
        if len(crossed) == 2 and crossed[0] == crossed[1][::-1]:
            (a, b), _ = crossed
            row.blame = [f"the attention's {a} and {b} swapped: the candidate passes as the {a} what the reference "
                         f"passes as the {b}, and the other way round", row.ref_module, row.cand_module]
        elif crossed:
            what = "; ".join(f"as the {role} what the reference passes as the {other}" for role, other in crossed)
            row.blame = [f"another input at the attention: the candidate passes {what}", row.ref_module, row.cand_module]


def _name_crossed_inputs(ref: Capture, cand: Capture, rows: list[NodeRow]) -> None:
    """Name another input at a forward first divergence of one function on both sides (not one
    whose arguments may come in any order): the candidate passes, at one argument, what pairs with
    another value of the reference's than the one it passes there (roles swapped: a query
    projection given the key's weights, q and k each matching and crossing at the attention, a
    GLU's gate and value; or the wrong value: cross-attention fed the encoder's states before its
    final norm)."""
    compared_r, compared_c = {r.ref_node for r in rows}, {r.cand_node for r in rows}
    pair_of = {r.cand_node: r.ref_node for r in rows if not r.cand_slice}   # a fused output's slices: _slice_read
    slice_of = {r.cand_node: r for r in rows if r.ref_slice and not r.cand_slice}   # pairs with a slice of the reference's
    sliced, sliced_ref = _sliced(rows), _sliced(rows, "ref")
    for row in rows:
        if not row.first_forward or row.blame:
            continue
        rn, cn = ref.node(row.ref_node), cand.node(row.cand_node)
        if not arguments.same_function(rn, cn) or node_key(rn) in arguments.SYMMETRIC:
            continue
        ref_args = [_through_views(a, compared_r).name if isinstance(a, torch.fx.Node) else None for a in rn.args]
        for i, b in enumerate(cn.args[:len(ref_args)]):
            if not isinstance(b, torch.fx.Node) or ref_args[i] not in compared_r:
                continue
            if ref_args[i] in sliced_ref:   # the reference reads a slice of its own fused output
                read, got = _slice_row(rn.args[i], sliced_ref, "ref"), slice_of.get(_through_views(b, compared_c).name)
                if read is not None and got is not None and got.ref_node == read.ref_node and got.ref_slice != read.ref_slice:
                    module, where = (cand.node(r.cand_node).meta.get(MODULE, "") or "<root>" for r in (got, read))
                    row.blame = [f"another input: the candidate passes what it computes in {module} where the reference "
                                 f"passes what the candidate computes in {where}", row.ref_module, row.cand_module]
                    break
                continue
            got = pair_of.get(_through_views(b, compared_c).name) or _slice_read(b, sliced)
            if got is not None and got != ref_args[i]:
                module, where = (ref.node(n).meta.get(MODULE, "") or "<root>" for n in (got, ref_args[i]))
                if module != where:
                    what = f"what the reference computes in {module} where the reference passes what it computes in {where}"
                else:   # two values of one module: named by their nodes and what they are made with
                    what = (f"the counterpart of the reference's {_made(ref, got, compared_r)} where the reference "
                            f"passes {_made(ref, ref_args[i], compared_r)}")
                row.blame = [f"another input: the candidate passes {what}", row.ref_module, row.cand_module]
                break


def _name_swapped_parameters(ref: Capture, cand: Capture, rows: list[NodeRow], alignment: Alignment) -> None:
    """Name two parameters swapped in a conversion (a layer's two norms' weights): at a forward first
    divergence whose op reads a parameter paired, by its bytes, with one the candidate's ops read in
    another order than the reference's among the parameters of the same name and shape in that
    layer. The pairing follows the bytes, so each op pairs with the one after or before it on the
    other side."""
    pairs = {pp.ref: pp.cand[0] for pp in alignment.params if len(pp.cand) == 1 and pp.transform.get("kind") == "identity"}
    unblamed = [r for r in rows if r.first_forward and not r.blame]
    if not unblamed or not pairs:
        return
    order_r, order_c = _first_reads(ref), _first_reads(cand)
    for row in unblamed:
        for p in (p for p in _params_read(ref.node(row.ref_node)) if p in pairs and p in order_r and pairs[p] in order_c):
            layer, leaf = p.rsplit(".", 2)[0], p.rpartition(".")[2]
            for other, theirs in pairs.items():
                if other == p or other.rsplit(".", 2)[0] != layer or other.rpartition(".")[2] != leaf \
                        or other not in order_r or theirs not in order_c \
                        or ref.params[other].shape != ref.params[p].shape:   # only what fits the other's place
                    continue
                if (order_r[p] < order_r[other]) != (order_c[pairs[p]] < order_c[theirs]):
                    row.blame = [f"parameters swapped: {p} holds what the candidate's {pairs[p]} does and {other} what "
                                 f"its {theirs} does, which its ops read in the other order",
                                 row.ref_module, row.cand_module]
                    break
            if row.blame:
                break


def _name_gate_swap(ref: Capture, cand: Capture, rows: list[NodeRow]) -> None:
    """Name a gated unit's gate and value swapped at a forward first divergence at their product:
    each side multiplies an activation of one compared value by another, and the candidate applies
    its activation to the counterpart of the value the reference multiplies by as it is (T5's
    ``gelu(wi_0 x) * wi_1 x`` against ``gelu(w3 x) * w1 x``, ``w1`` holding ``wi_0``)."""
    compared_r, compared_c = {r.ref_node for r in rows}, {r.cand_node for r in rows}
    pair_of = {r.cand_node: r.ref_node for r in rows if not r.cand_slice}

    def factors(capture: Capture, node: torch.fx.Node, compared: set[str]) -> list[tuple[str | None, str]] | None:
        """(activation or None, compared value) for each operand of a product of two."""
        if node_key(node) != "mul" or len(node.all_input_nodes) != 2:
            return None
        out = []
        for a in node.all_input_nodes:
            a = _through_views(a, compared)
            if a.name in compared:
                out.append((None, a.name))
                continue
            # an activation: ops of one compared value alone (a GELU written out takes several)
            inside = [capture.node(x) for x in _upstream(a, compared) | {a.name}]
            sources = {x.name for n in inside for x in n.all_input_nodes if x.name in compared}
            if len(sources) != 1 or any(n.op == "get_attr" for n in inside):
                return None
            ops = [n for n in inside if n.op == "call_function"]
            out.append((node_key(a) if len(ops) == 1 else "its activation", sources.pop()))
        return out if sum(act is not None for act, _ in out) == 1 else None

    def product(capture: Capture, name: str, compared: set[str]) -> list[tuple[str | None, str]] | None:
        """The factors of the one such product the node is, or reads through values not compared."""
        node = capture.node(name)
        found = [f for f in (factors(capture, n, compared)
                             for n in (node, *(capture.node(x) for x in _upstream(node, compared))))
                 if f is not None]
        return found[0] if len(found) == 1 else None
    for row in rows:
        if not row.first_forward or row.blame:
            continue
        a, b = product(ref, row.ref_node, compared_r), product(cand, row.cand_node, compared_c)
        if a is None or b is None:
            continue
        b = [(act, pair_of.get(name)) for act, name in b]
        gated_r, gated_c = (next(name for act, name in side if act) for side in (a, b))
        if {n for _, n in a} == {n for _, n in b} and gated_r != gated_c:
            act_r, act_c = (next(act for act, _ in side if act) for side in (a, b))
            where = {n: ref.node(n).meta.get(MODULE, "") or "<root>" for _, n in a}
            plain = next(n for act, n in a if act is None)
            row.blame = [f"the gate and the value swapped: the candidate applies {act_c} to the counterpart of what the "
                         f"reference computes in {where[plain]} and multiplies by that of {where[gated_r]}; the reference "
                         f"applies {act_r} to {where[gated_r]}", row.ref_module, row.cand_module]


def _name_fused_parts_crossed(ref: Capture, cand: Capture, rows: list[NodeRow]) -> None:
    """Name the parts of a fused projection used in each other's places (Phi-3's ``qkv_proj`` split
    into k and v swapped in a conversion, ``gate_up_proj``'s halves taken in the other order): at a
    forward first divergence, or at one of its inputs, the reference reads one slice of its fused
    output, through views, and the candidate reads the output of its projection that pairs with
    another slice of it. Each part pairs by its values, so every compared value agrees up to here."""
    sliced = _sliced(rows, "ref")
    part_of = {r.cand_node: r for r in rows if r.ref_slice and not r.cand_slice}
    if not sliced or not part_of:
        return

    def cand_part(node: torch.fx.Node) -> NodeRow | None:
        for _ in range(8):   # back through the views and single-input ops to the projection
            if node.name in part_of:
                return part_of[node.name]
            if node.op != "call_function" or len(node.all_input_nodes) != 1:
                return None
            node = node.all_input_nodes[0]
        return None
    for row in rows:
        if not row.first_forward or row.blame:
            continue
        rn, cn = ref.node(row.ref_node), cand.node(row.cand_node)
        for x, y in _places(rn, cn):
            read, theirs = _slice_read_at(x, sliced, "ref"), cand_part(y)
            if read is None or theirs is None or theirs.ref_node != read[0].ref_node or theirs is read[0]:
                continue
            (part, a, b), (c, d) = read, theirs.ref_slice
            fused = ref.node(part.ref_node).meta.get(MODULE) or part.ref_node
            module_of = {n: cand.node(n).meta.get(MODULE) or n for n in (part.cand_node, theirs.cand_node)}
            row.blame = [f"the parts of a fused projection in each other's places: here the reference reads [{a}:{b}] "
                         f"of {fused}'s output, which the candidate computes in {module_of[part.cand_node]}; the "
                         f"candidate reads {module_of[theirs.cand_node]}'s, which pairs with [{c}:{d}]",
                         fused, module_of[theirs.cand_node]]
            break


def _blame_attention_inputs(ref: Capture, cand: Capture, rows: list[NodeRow], alignment: Alignment) -> None:
    """Tell which of an attention's query, key and value differ, at a forward first divergence at
    attention on both sides, or on the way to one (inside a rotary embedding whose ops pair one by
    one), by the values each side passes (``_attention_story``)."""
    unblamed = [r for r in rows if r.first_forward and not r.blame]
    if not unblamed:
        return
    pairs = {(pp.ref, c) for pp in alignment.params for c in pp.cand}
    attentions = {r.ref_node: r.cand_node for r in rows if attention.inputs(ref.node(r.ref_node)) is not None
                  and attention.inputs(cand.node(r.cand_node)) is not None}
    told: dict[str, str | None] = {}   # by attention: the frontier rows of one rotation lead to one
    for row in unblamed:
        at = row.ref_node
        if at not in attentions:
            after = _first_after(ref.node(at), lambda u: u.name in attentions)
            at = after.name if after is not None else None
        if at is not None and at not in told:
            told[at] = _attention_story(ref, cand, ref.node(at), cand.node(attentions[at]), pairs,
                                        {r.ref_node for r in rows})
        if at is not None and told[at] is not None:
            row.blame = [told[at], row.ref_module, row.cand_module]


def _places(rn: torch.fx.Node, cn: torch.fx.Node) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """The two sides' ops of a row, then their inputs position by position where they take as many."""
    inputs = list(zip(rn.all_input_nodes, cn.all_input_nodes)) \
        if len(rn.all_input_nodes) == len(cn.all_input_nodes) else []
    return [(rn, cn), *inputs]


def _first_after(node: torch.fx.Node, wanted: Callable[[torch.fx.Node], bool],
                 most: int = 32) -> torch.fx.Node | None:
    """The first op ``node``'s value reaches, within ``most`` ops after it, that is ``wanted``."""
    seen, frontier = {node.name}, [node]
    while frontier and len(seen) <= most:
        frontier = [u for n in frontier for u in n.users if u.name not in seen]
        for u in frontier:
            if wanted(u):
                return u
            seen.add(u.name)
    return None


def _attention_story(ref: Capture, cand: Capture, rn: torch.fx.Node, cn: torch.fx.Node,
                     pairs: set[tuple[str, str]], compared: set[str]) -> str | None:
    """What differs between two attentions' query, key and value, told by the values each side
    passes (the ops that make them, a rotary embedding written out or a cache indexed, fold into the
    attention's match and are not compared one by one): the key and the value swapped; a query or
    key rotated another way (it agrees at position 0, which a rotation leaves as it is), with the
    tables each side rotates with; the heads in another order (a grouped-query attention's key and
    value heads tiled, not repeated in groups). The query's and key's features may be in another
    order on each side, the same for both (the attention does not change: a conversion permutes q
    and k rows for another rotary layout); that order is read off the query at position 0. None
    when none of these is so."""
    mine, theirs = attention.inputs(rn), attention.inputs(cn)
    a, b = _attention_values(ref, mine), _attention_values(cand, theirs)
    if a is None or b is None:
        return None
    if any(a[r].shape != b[r].shape for r in a):   # fair-esm's (batch x heads, positions, features)
        if not all(a[r].numel() == b[r].numel() and a[r].shape[-2:] == b[r].shape[-2:] for r in a):
            return None
        a, b = ({r: t.reshape(-1, *t.shape[-2:]) for r, t in side.items()} for side in (a, b))
    mine, theirs = {r: n for r, (n, _) in mine.items()}, {r: n for r, (n, _) in theirs.items()}
    limit = min(0.05, 1000 * max(machine_eps(t.dtype) for t in (*a.values(), *b.values())))

    def close(x: torch.Tensor, y: torch.Tensor) -> bool:
        return _relative_distance(x.double(), y.double()) <= limit
    order = _feature_order(a["query"][..., 0, :], b["query"][..., 0, :], limit)
    plain = a
    if order is not None:
        a = {r: t[..., order] if r != "value" else t for r, t in a.items()}

    def alike(x: torch.Tensor, role: str) -> bool:   # the reference's role, everywhere or at position 0
        return any(close(x, y[role]) or close(x[..., :1, :], y[role][..., :1, :]) for y in (a, plain))
    differ = [r for r in ("query", "key", "value") if not close(a[r], b[r])]
    if not differ:
        return None
    swapped = [(x, y) for i, x in enumerate(differ) for y in differ[i + 1:] if alike(b[x], y) and alike(b[y], x)]
    rotated = [r for r in differ if r != "value" and rotary.agrees_at_start(a[r], b[r], close)]
    if swapped:
        x, y = swapped[0]
        made = {r: _through_views(mine[r], compared) for r in (x, y)}   # the projection each comes from
        made = {r: f" (made in {n.meta[MODULE]})" if n.name in compared and n.meta.get(MODULE) else ""
                for r, n in made.items()}
        return (f"the attention's {x} and {y} swapped: the candidate passes as the {x} what the reference "
                f"passes as the {y}{made[y]}, and the other way round")
    if rotated and len(rotated) == len(differ):
        agree = [r for r in ("query", "key") if r not in rotated]
        both = len(rotated) > 1
        return (f"the {' and '.join(rotated)} rotated another way: {'they agree' if both else 'it agrees'} at "
                f"position 0, which a rotation leaves as it is, and differ{'' if both else 's'} from position 1 "
                f"on{f' (the {agree[0]} agrees)' if agree else ''}"
                + _rotary_tables(ref, cand, (mine[rotated[0]], mine["value"]), (theirs[rotated[0]], theirs["value"]),
                                 pairs))
    first = (..., slice(0, _HEAD_POSITIONS), slice(None))   # enough positions to tell heads apart
    orders = {r: _heads_order(a[r][first], b[r][first], limit) for r in differ}
    if not all(orders.values()) or len({tuple(o) for o in orders.values()}) != 1:
        return None
    return _heads_text(differ, orders[differ[0]], a[differ[0]][first], limit)


_HEAD_POSITIONS = 64


def _heads_text(roles: list[str], order: list[int], x: torch.Tensor, limit: float) -> str:
    """The story of ``roles`` holding the reference's heads (dimension 1 of ``x``, the reference's
    value of the first) in ``order``: told as a grouped-query attention's heads repeated another way
    where the reference's heads are a few repeated."""
    what = " and ".join(roles)
    heads = x.transpose(0, 1).reshape(x.shape[1], -1)
    ids = [int(row.nonzero()[0]) for row in _near(heads, heads, limit)]
    distinct = sorted(set(ids))
    if len(distinct) == len(ids):
        return (f"the attention's {what} {'hold' if len(roles) > 1 else 'holds'} the reference's heads in another "
                f"order: {order}")
    number = {h: k for k, h in enumerate(distinct)}
    mine, theirs = [number[i] for i in ids], [number[ids[j]] for j in order]
    tiled = list(range(len(distinct))) * (len(ids) // len(distinct))

    def how(seq: list[int]) -> str:
        return "repeats each in turn" if seq == sorted(seq) else "tiles them" if seq == tiled else "repeats them"
    return (f"the {what} heads of a grouped-query attention repeated another way: the reference {how(mine)} "
            f"({len(distinct)} heads for {len(ids)}: {mine}), the candidate {how(theirs)} ({theirs})")


def _feature_order(x: torch.Tensor, y: torch.Tensor, limit: float) -> list[int] | None:
    """The order of ``x``'s last dimension that ``y``'s holds (each feature of ``y``, over all other
    dimensions, one of ``x``'s: ``_near``); None when a feature has none or two share one, or the
    order is the same."""
    d = x.shape[-1]
    near = _near(x.reshape(-1, d).t(), y.reshape(-1, d).t(), limit)
    if not bool(near.any(dim=1).all()):
        return None
    order = near.double().argmax(dim=1).tolist()   # the first near one
    return order if len(set(order)) == d and order != list(range(d)) else None


def _attention_values(capture: Capture,
                      inputs: dict[str, tuple[torch.fx.Node, bool]]) -> dict[str, torch.Tensor] | None:
    """The values of an attention's ``inputs`` (``attention.inputs``), the key (..., positions,
    features) as the others; None when one is not kept."""
    values = {}
    for role, (node, swapped) in inputs.items():
        v = stored(capture, node)
        if v is None or v.dim() < 2:
            return None
        values[role] = v.transpose(-1, -2) if swapped else v
    return values


def _rotary_tables(ref: Capture, cand: Capture, mine: tuple[torch.fx.Node, torch.fx.Node],
                   theirs: tuple[torch.fx.Node, torch.fx.Node], pairs: set[tuple[str, str]]) -> str:
    """What each side rotates a query or key with (``mine``, ``theirs``: it and the attention's value,
    whose tables, Gemma's embedding scale, are not the rotation's), for a story: the reference's
    tables' counterpart (the candidate may keep its frequencies beside the cache it reads,
    torchtune's ``theta``), or the tables each side reads (and the candidate's frequencies) and the
    bases they were made with."""
    def read(capture: Capture, nodes: tuple[torch.fx.Node, torch.fx.Node]) -> list[str]:
        return [t for t in rotary.tables(capture, nodes[0]) if t not in rotary.tables(capture, nodes[1])]
    r = read(ref, mine)
    same = [(x, y) for x in r for y in cand.params if (x, y) in pairs and _equal(ref.params[x], cand.params[y])]
    if same:
        return (f"; its frequencies are the reference's ({same[0][0]} pairs with {same[0][1]}): it turns other "
                "features together, or turns them for other positions")
    c = read(cand, theirs)
    c += [n for n, t in cand.params.items() if n not in c and n not in cand.param_grads and rotary.base(t)]
    if not r or not c:
        return ""

    def named(capture: Capture, names: list[str]) -> str:
        bases = {n: rotary.base(capture.params[n]) for n in names[:3]}
        return ", ".join(f"{n} (base {b:g})" if b else n for n, b in bases.items()) + \
            (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"; they rotate with other tables: the reference's {named(ref, r)} against the candidate's {named(cand, c)}"


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same values, to float32's rounding (not summaries)."""
    return not is_summary(a) and not is_summary(b) and a.shape == b.shape \
        and torch.allclose(a.double(), b.double(), rtol=1e-6, atol=0)


def _heads_order(x: torch.Tensor, y: torch.Tensor, limit: float) -> list[int] | None:
    """The reference's heads (dimension 1 of ``x``) in the order ``y`` holds them (``_near``); None
    when a head of ``y`` is none of ``x``'s or the order is the same."""
    if x.dim() != 4:
        return None
    near = _near(x.transpose(0, 1).reshape(x.shape[1], -1), y.transpose(0, 1).reshape(y.shape[1], -1), limit)
    order: list[int] = []
    for row in near:
        found = row.nonzero().flatten().tolist()
        if not found:
            return None
        order.append(next((i for i in found if i not in order), found[0]))
    return order if order != list(range(len(order))) else None


def _near(xs: torch.Tensor, ys: torch.Tensor, limit: float) -> torch.Tensor:
    """Which rows of ``xs`` each row of ``ys`` is, within ``limit`` of its size (its distance to
    them over its norm): a boolean matrix, a row for each of ``ys``."""
    xs, ys = xs.double(), ys.double()
    return torch.cdist(ys, xs) <= limit * ys.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _name_crossed_names(ref: Capture, cand: Capture, rows: list[NodeRow], params: list[ParamRow]) -> None:
    """Name two parameters of a layer each paired, by its values, with the candidate's namesake of
    the other (the reference's ``k_proj.weight`` with the candidate's ``v_proj.weight``, and
    ``v_proj`` with ``k_proj``: swapped in a conversion), on both rows and at a forward first
    divergence not blamed yet whose op reads one of them. The values agree, so no comparison of
    them fails; their names say the candidate uses each in the other's place."""
    def split(name: str) -> tuple[str, str]:   # ("layers.0.attn", "k_proj.weight")
        parts = name.rsplit(".", 2)
        return (parts[0], ".".join(parts[1:])) if len(parts) == 3 else ("", name)
    single = [p for p in params if len(p.cand) == 1]
    by_layer: dict[str, list[ParamRow]] = {}
    for p in single:
        by_layer.setdefault(split(p.ref)[0], []).append(p)
    crossed: dict[str, str] = {}
    for members in by_layer.values():
        for i, p in enumerate(members):
            for q in members[i + 1:]:
                (_, a), (lb, b), (_, c), (ld, d) = split(p.ref), split(p.cand[0]), split(q.ref), split(q.cand[0])
                if a != c and a == d and c == b and lb == ld:
                    for x, y in ((p, q), (q, p)):
                        crossed[x.ref] = (f"holds the values of the candidate's {x.cand[0]}, and the candidate's "
                                          f"{y.cand[0]} those of {y.ref}: names crossed")
    for p in single:
        if p.ref in crossed and p.value is not None and not p.value.note:
            p.value = dataclasses.replace(p.value, note=crossed[p.ref])
    if not crossed:
        return
    compared = {r.ref_node for r in rows}
    for row in rows:
        if not row.first_forward or row.blame or row.cause() != "introduced":
            continue
        node = ref.node(row.ref_node)
        up = _upstream(node, compared)
        inside = [node, *(n for n in ref.graph.nodes if n.name in up)]   # in graph order: one story each run
        # read by the op itself, on its way from the compared values, or by the compared ops it starts from
        edge = [a for n in inside for a in n.all_input_nodes if a.name in compared]
        name = next((n for x in (*inside, *edge) for n in _params_read(x) if n in crossed), None)
        if name is not None:
            row.blame = [f"parameters crossed: {name} {crossed[name]}", row.ref_module, row.cand_module]


def _first_reads(capture: Capture) -> dict[str, int]:
    """Where in the graph each parameter is first read by an op (through views): its position."""
    first: dict[str, int] = {}
    for i, n in enumerate(capture.graph.nodes):
        if n.op == "call_function" and not DEFAULT_OPS.is_view(n, node_key(n)):
            for target in _params_read(n):
                first.setdefault(target, i)
    return first


def _params_read(node: torch.fx.Node) -> list[str]:
    """The parameters and buffers ``node`` takes as arguments, directly or through views."""
    return [str(n.target) for n in (_through_views(a, set()) for a in node.all_input_nodes) if n.op == "get_attr"]


def _made(capture: Capture, name: str, compared: set[str]) -> str:
    """``transpose_8 (transpose, made with layers.0.pos_bias_u)``: a node, its op and the parameters
    and buffers read on the way to it from the compared values."""
    held = _held(capture.node(name), compared)
    return f"{name} ({node_key(capture.node(name))}{', made with ' + ', '.join(held) if held else ''})"


def _sliced(rows: list[NodeRow], side: str = "cand") -> dict[str, list[NodeRow]]:
    """The rows of each fused output's slices (q, k and v of one qkv projection) on ``side``, by node."""
    sliced: dict[str, list[NodeRow]] = {}
    for r in rows:
        if r.cand_slice if side == "cand" else r.ref_slice:
            sliced.setdefault(r.cand_node if side == "cand" else r.ref_node, []).append(r)
    return sliced


def _slice_read(node: torch.fx.Node, sliced: dict[str, list[NodeRow]]) -> str | None:
    """The reference node paired with the one slice of a candidate's fused output that ``node``
    reads (``_slice_row``)."""
    row = _slice_row(node, sliced)
    return row.ref_node if row is not None else None


def _slice_row(node: torch.fx.Node, sliced: dict[str, list[NodeRow]], side: str = "cand") -> NodeRow | None:
    """The row of the one slice of a fused output on ``side`` that ``node``, a view of that output
    split another way (timm's ``qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)``,
    ``nn.MultiheadAttention``'s ``unflatten`` and items), reads all its elements from; None when it
    reads from several or cannot be told. The views are replayed on the fused output's element
    numbers."""
    found = _slice_read_at(node, sliced, side)
    return found[0] if found is not None else None


def _slice_read_at(node: torch.fx.Node, sliced: dict[str, list[NodeRow]],
                   side: str = "cand") -> tuple[NodeRow, int, int] | None:
    """``_slice_row``'s row, and the first and past-the-last column of the slice of the fused output
    that ``node`` is taken from (the first of its views and slices that keeps to one part: the
    reference's ``qkv[..., 64:96]``, not the half of each head of it that rotary embeddings take)."""
    chain = [node]
    while chain[-1].name not in sliced:
        if len(chain) > 16 or chain[-1].op != "call_function" or not chain[-1].all_input_nodes:
            return None
        chain.append(chain[-1].all_input_nodes[0])
    fused = chain.pop()
    shape = fused.meta.get(SHAPE)
    if not chain or not shape:
        return None
    value: Any = torch.arange(math.prod(shape)).reshape(shape)
    spans = []
    for n in reversed(chain):
        fn = Targets.default().resolve(str(n.meta.get(TARGET)))
        key = node_key(n)   # items of a split, and slices of a tensor's own (``x[..., 8:]``)
        if fn is None or not (DEFAULT_OPS.is_view(n, key) or key in DEFAULT_OPS.splits or key == "getitem") \
                or any(isinstance(a, torch.fx.Node) for a in (*n.args[1:], *n.kwargs.values())):
            return None
        try:
            value = fn(value, *n.args[1:], **n.kwargs)
        except Exception:  # noqa: BLE001 -- a view that cannot be replayed here tells nothing
            return None
        if isinstance(value, torch.Tensor) and value.numel():
            columns = value % shape[-1]
            spans.append((int(columns.min()), int(columns.max()) + 1))
    if not isinstance(value, torch.Tensor) or not value.numel():
        return None
    columns = value % shape[-1]
    blocks = [(r, r.cand_slice if side == "cand" else r.ref_slice) for r in sliced[fused.name]]
    owners = [(r, lo, hi) for r, (lo, hi) in blocks if bool(((columns >= lo) & (columns < hi)).all())]
    if len(owners) != 1:
        return None
    row, lo, hi = owners[0]
    return next((row, a, b) for a, b in spans if lo <= a and b <= hi)


def _fused_source(node: torch.fx.Node, sliced: dict[str, list[NodeRow]]) -> str | None:
    """The fused node that ``node`` is a slice or view of (through getitem, chunk items and views)."""
    for _ in range(8):
        if node.name in sliced:
            return node.name
        if node.op != "call_function" or not node.all_input_nodes:
            return None
        node = node.all_input_nodes[0]
    return None


def _relative_distance(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """RMS of ``a - b`` over the RMS of ``a`` (inf when the shapes differ or one is missing), as the
    judge measures them."""
    if a is None or b is None or a.shape != b.shape:
        return math.inf
    m = compare_tensors(a, b, Tolerance())
    return m.rms_diff / m.ref_rms if m.ref_rms > 0 else math.inf


def _one_sided_input(block: list[torch.fx.Node], compared: set[str], only: set[str],
                     side: bool = False) -> torch.fx.Node | None:
    """An input of the ``block`` (a node and the ops folded into its match; through views) that is
    an op in ``only`` whose tensor inputs are compared nodes, parameters and values made from
    constants (HF's SpecAugment mask, from numpy), one compared at least:
    an op added to (or left out of) a matched computation, such as a residual add, and not a side
    computation of its own, such as a mask or a slice of a table; with ``side``, an op computed
    from no compared value at all (a mask built from constants) instead."""
    inner = {n.name for n in block}
    for a in (a for n in block for a in n.all_input_nodes if a.name not in inner):
        op = _through_views(a, compared)
        if op.name not in compared and op.meta.get(TARGET) in GETITEM and isinstance(op.args[0], torch.fx.Node) \
                and not DEFAULT_OPS.is_view(op, node_key(op)):
            op = op.args[0]   # an output of an op of several (nn.MultiheadAttention's), not a split's: that op
        if op.name not in only:
            continue
        if side:
            if _from_constants(op, compared):
                return op
            continue
        sources = [_through_views(x, compared, items=True) for x in op.all_input_nodes]
        # activations among them: a mask made from a compared mask (GPT-2's additive causal mask from
        # the attention mask) is a side computation too
        if any(x.name in compared and _floating(x) for x in sources) \
                and all(x.name in compared or x.op == "get_attr" or _from_constants(x, compared) for x in sources):
            return op
    return None


def _floating(node: torch.fx.Node) -> bool:
    """Whether ``node`` holds floating-point (or complex) values, as recorded."""
    return str(node.meta.get(DTYPE)).startswith(("float", "bfloat", "complex"))


def _through_views(node: torch.fx.Node, compared: set[str], items: bool = False) -> torch.fx.Node:
    """``node``, or the node it is a view of (through reshapes, transposes, expands, ``x[None]``, a
    pad of nothing..., with ``items`` the items of a split too), stopping at a compared node."""
    while node.name not in compared and node.op == "call_function" and len(node.all_input_nodes) == 1:
        key = node_key(node)   # an item of a split has its split's key
        if not (key in DEFAULT_OPS.transparent or key in ("getitem", "pad") and DEFAULT_OPS.is_view(node, key)
                or items and key in DEFAULT_OPS.splits):
            break
        node = node.all_input_nodes[0]
    return node
