"""Parameter correspondence: which candidate tensor(s) hold each reference parameter, and how.

Both sides of a port load the same weights, so a parameter's bytes identify it whatever its name.
``correspond`` finds, in this order: user pairs, exact copies (also reshaped, e.g. a kernel-1
Conv1d weight against a Linear weight), transposes, row blocks of fused tensors (q/k/v in one
``qkv``, also transposed as in GPT-2's Conv1D), fused references against separate candidates,
(also transposed, GPT-2's ``c_attn`` against separate q/k/v), row permutations (per-head
layouts such as RoPE), and last, tensors of one shape equal up to a cast's rounding (``_close``).
Parameters a capture keeps only as summaries (``capture --keep summary``) are paired by the hash
of their content they hold (``device_summary.content_digest``, which a full tensor reproduces):
exact copies, reshapes, and row blocks of a fused full tensor; what needs their elements
(transposes, permutations, offsets, a fused summary, closeness) is not tried. Tensors with equal
content (LayerNorm weights of ones, zero biases) are paired in order of first use with confidence
0.7; the matcher (``match.GraphMatcher``) re-pairs them through the matched ops that consume them,
and only content unique on both sides (confidence 1.0) anchors ops.

A transform is a small JSON-able dict, so a mapping file can hold it and ``convert`` can invert it:

- ``{"kind": "identity"}`` / ``{"kind": "reshape", "shape": [...]}`` / ``{"kind": "transpose"}``
- ``{"kind": "rows", "start": a, "stop": b}``: the reference is rows a:b of one fused candidate
- ``{"kind": "concat"}``: the reference is the candidates concatenated along dim 0 (first step of
  a chain only)
- ``{"kind": "permute_rows", "index": [...]}``: the reference is ``cand[index]``
- ``{"kind": "offset", "value": v}``: the reference is ``cand + v`` (a norm gain stored as ``1 + g``)
- ``{"kind": "chain", "steps": [...]}``: several of the above, applied in order
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import torch
import xxhash

from ..errors import FxdiffError
from ..scratch import one_torch_thread, scratch
from ..store.device_summary import content_digest
from ..store.summary import is_summary
from ..store.tensor_file import evict
from ..model.alignment import ParamPair


def apply_transform(parts: list[torch.Tensor], transform: dict, gradient: bool = False) -> torch.Tensor:
    """The reference-layout tensor obtained from candidate tensor(s) ``parts`` (their gradients,
    with ``gradient``: an offset moves a value, not its gradient)."""
    kind = transform.get("kind", "identity")
    if kind == "chain":
        out = parts
        for step in transform["steps"]:
            out = [apply_transform(out, step, gradient)]
        return out[0]
    if kind == "concat":
        return torch.cat(parts, dim=0)
    if len(parts) != 1:
        raise FxdiffError(f"transform {kind!r} takes one tensor, got {len(parts)}")
    t = parts[0]
    if kind == "identity":
        return t
    if kind == "transpose":
        return t.t()
    if kind == "reshape":
        return t.reshape(transform["shape"])
    if kind == "rows":
        return t[transform["start"]:transform["stop"]]
    if kind == "permute_rows":
        return t[torch.as_tensor(transform["index"], dtype=torch.long)]
    if kind == "offset":
        return t if gradient else t + transform["value"]
    raise FxdiffError(f"unknown parameter transform {kind!r}")


def output_slice(transform: dict) -> tuple[int, int] | None:
    """For a weight that is a row block of a fused weight: the block's output features."""
    steps = transform["steps"] if transform.get("kind") == "chain" else [transform]
    rows = [s for s in steps if s.get("kind") == "rows"]
    return (rows[0]["start"], rows[0]["stop"]) if rows else None


def output_index(transform: dict) -> tuple[int, ...] | None:
    """For a weight whose rows are permuted on the other side: the order in which the other side's
    output features give this side's (``cand_out[..., index]`` is laid out like ``ref_out``)."""
    steps = transform["steps"] if transform.get("kind") == "chain" else [transform]
    perms = [s for s in steps if s.get("kind") == "permute_rows"]
    if len(perms) != 1 or any(s.get("kind") in ("rows", "concat") for s in steps):
        return None
    return tuple(int(i) for i in perms[0]["index"])


def digest(t: torch.Tensor) -> bytes:
    """A name-free identity of a tensor's content: a hash of its elements in row-major order (so
    equal for a tensor and its reshapes, not for its transpose). Floating elements are hashed at
    bfloat16 precision, so a weight and its cast to float64, float16 or bfloat16 share a digest
    (the judge then compares the values themselves). Not always for float16: where it rounds small
    elements to subnormals, ``_close`` pairs by value what the digests did not.

    The tensor is read once, in row-major blocks (each converted on its own: no copy of the whole
    tensor), and the pages of a memory-mapped capture tensor are handed back afterwards."""
    t = t.detach()
    if t.is_quantized:
        t = t.dequantize()
    if t.layout != torch.strided:   # sparse: its dense value
        t = t.to_dense()
    if t.device.type == "meta" or getattr(t, "is_nested", False):  # no data to hash: its shape only
        return hashlib.blake2b(f"{t.device.type}{list(t.shape)}{t.dtype}".encode(), digest_size=16).digest()
    if type(t) is not torch.Tensor:
        t = t.as_subclass(torch.Tensor)
    kind = "float" if t.is_floating_point() else str(t.dtype)
    h = xxhash.xxh3_128()
    if t.device.type == "cpu" and t.numel() <= _SMALL:   # one small copy costs less than the blocks below
        small = t.to(torch.bfloat16 if t.is_floating_point() else t.dtype).contiguous().reshape(-1)
        h.update(small.view(torch.uint8).numpy() if small.dtype != torch.bool else small.numpy())
        h.update(kind.encode())
        evict(t)
        return h.digest()
    with one_torch_thread():
        for block in _row_major_blocks(t):
            dtype = torch.bfloat16 if block.is_floating_point() else block.dtype
            if block.device.type != "cpu":
                block = block.to(dtype).cpu()
            if block.dtype != dtype or not block.is_contiguous():   # converted into a reused buffer
                block = scratch(block.numel(), dtype, "digest").view(block.shape).copy_(block)
            block = block.reshape(-1)
            h.update(block.view(torch.uint8).numpy() if block.dtype != torch.bool else block.numpy())
    h.update(kind.encode())
    evict(t)
    return h.digest()


_BLOCK = 1 << 22   # elements hashed at a time
_SMALL = 1 << 14   # elements of a tensor hashed in one go


def row_digests(t: torch.Tensor) -> list[bytes]:
    """``digest`` of each row of ``t`` (of each element, for a vector), a block of rows converted at
    a time: one ``digest`` call a row costs far more than hashing it."""
    rows = t.detach().reshape(t.shape[0], -1) if t.dim() else t.detach().reshape(1, 1)
    if rows.device.type != "cpu" or rows.is_quantized or rows.layout != torch.strided or type(rows) is not torch.Tensor:
        return [digest(row) for row in rows]
    kind = ("float" if rows.is_floating_point() else str(rows.dtype)).encode()
    dtype = torch.bfloat16 if rows.is_floating_point() else rows.dtype
    out = []
    step = max(1, _BLOCK // max(1, rows.shape[1]))
    with one_torch_thread():
        for start in range(0, rows.shape[0], step):
            block = rows[start:start + step].to(dtype).contiguous()
            raw = (block.view(torch.uint8) if dtype != torch.bool else block).numpy().reshape(block.shape[0], -1)
            for row in raw:
                h = xxhash.xxh3_128(row)
                h.update(kind)
                out.append(h.digest())
    evict(t)
    return out


def _row_major_blocks(t: torch.Tensor):
    """``t``'s elements in row-major order, as consecutive blocks of about ``_BLOCK``: 1-D views,
    or (not contiguous) views of whole rows to be copied in row-major order."""
    if t.is_contiguous():
        flat = t.reshape(-1)
        for start in range(0, flat.numel(), _BLOCK):
            yield flat[start:start + _BLOCK]
        return
    if t.dim() == 0 or t.numel() <= _BLOCK:
        yield t
        return
    row = t[0].numel()
    if row > _BLOCK:   # one row is already larger than a block: block each row
        for r in t:
            yield from _row_major_blocks(r)
        return
    step = max(1, _BLOCK // max(1, row))
    for start in range(0, t.shape[0], step):
        yield t[start:start + step]


def correspond(ref: dict[str, torch.Tensor], cand: dict[str, torch.Tensor],
               ref_order: list[str], cand_order: list[str],
               user: list[ParamPair] = ()) -> tuple[list[ParamPair], list[str], list[str]]:
    """Pair reference and candidate parameters by content: (pairs, unmatched ref, unmatched cand).

    ``*_order`` list parameter names in order of first use; it decides between tensors of equal content.
    """
    summaries = summarised(ref, cand)
    rank_r = {n: i for i, n in enumerate(ref_order)}
    rank_c = {n: i for i, n in enumerate(cand_order)}
    ref_left = sorted(ref, key=lambda n: (rank_r.get(n, len(rank_r)), n))
    cand_left = sorted(cand, key=lambda n: (rank_c.get(n, len(rank_c)), n))
    pairs: list[ParamPair] = []
    claimed: dict[tuple[str, bool], list[tuple[int, int]]] = defaultdict(list)  # rows of fused tensors

    def take(new: list[ParamPair]) -> None:
        used_r = {p.ref for p in new}
        used_c = set()
        for p in new:
            block = output_slice(p.transform)
            if block is not None and len(p.cand) == 1:   # other rows of that tensor stay available
                transposed = p.transform.get("kind") == "chain" and p.transform["steps"][0].get("kind") == "transpose"
                claimed[(p.cand[0], transposed)].append(block)
            else:
                used_c.update(p.cand)
        pairs.extend(new)
        ref_left[:] = [n for n in ref_left if n not in used_r]
        cand_left[:] = [n for n in cand_left if n not in used_c]

    for p in user:
        if p.ref not in ref or any(c not in cand for c in p.cand):
            raise FxdiffError(f"user map: parameter pair {p.ref} -> {', '.join(p.cand)} names a missing parameter")
    take(list(user))
    dig_r, dig_c = Digests(ref, summaries), Digests(cand, summaries)
    take(_by_digest(ref, cand, ref_left, cand_left, dig_r, dig_c, False, {"kind": "identity"}, "identical bytes"))
    take(_by_digest(ref, cand, ref_left, [c for c in cand_left if cand[c].dim() == 2], dig_r, dig_c, True,
                    {"kind": "transpose"}, "identical bytes, transposed"))
    take(_fused(ref, cand, ref_left, [c for c in cand_left if not is_summary(cand[c])], claimed, dig_r))
    cand_left[:] = [n for n in cand_left if (n, False) not in claimed and (n, True) not in claimed]
    take(_fused_ref(ref, cand, [r for r in ref_left if not is_summary(ref[r])], cand_left, dig_c))
    matrices = _permuted(ref, cand, ref_left, cand_left) + _permuted(ref, cand, ref_left, cand_left, transposed=True)
    take(matrices)
    take(_permuted(ref, cand, ref_left, cand_left, vectors=True,
                   known=[output_index(p.transform) for p in matrices]))
    take(_offset(ref, cand, ref_left, cand_left, dig_c))
    take(_close(ref, cand, ref_left, cand_left))
    return pairs, ref_left, cand_left


CLOSE = 2.0 ** -6   # relative RMS difference within which two tensors are one weight, cast (16-bit: about 2**-10)
_SAMPLE = 256       # elements of each tensor compared to find the closest ones


def _close(ref, cand, ref_left, cand_left) -> list[ParamPair]:
    """Tensors of one shape whose values differ only by a cast's rounding, each the other's closest
    (a float16 cast rounds small elements to subnormals, so its digest at bfloat16 precision is not
    the reference's): paired where their relative RMS difference is within ``CLOSE``."""
    def usable(t: torch.Tensor) -> bool:
        return not is_summary(t) and t.is_floating_point() and t.numel() > 0

    def sample(t: torch.Tensor) -> torch.Tensor:
        flat = t.detach().reshape(-1)
        return flat[torch.linspace(0, flat.numel() - 1, _SAMPLE).long()].float()
    by_shape: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for c in cand_left:
        if usable(cand[c]):
            by_shape[tuple(cand[c].shape)].append(c)
    out = []
    for shape, cs in by_shape.items():
        rs = [r for r in ref_left if usable(ref[r]) and tuple(ref[r].shape) == shape]
        if not rs:
            continue
        distance = torch.cdist(torch.stack([sample(ref[r]) for r in rs]), torch.stack([sample(cand[c]) for c in cs]))
        nearest_c, nearest_r = distance.argmin(1).tolist(), distance.argmin(0).tolist()
        for i, r in enumerate(rs):
            c = cs[nearest_c[i]]
            if nearest_r[nearest_c[i]] != i:
                continue
            x, y = ref[r].detach().float(), cand[c].detach().float()
            scale = max(float(x.norm()), float(y.norm()))
            if scale > 0 and float((x - y).norm()) <= CLOSE * scale:
                out.append(ParamPair(r, (c,), {"kind": "identity"}, "equal values up to a cast's rounding"))
    return out


def summarised(*tables: dict[str, torch.Tensor]) -> bool:
    """Whether any of the tensors is a summary: then every digest is a content hash (``Digests``)."""
    return any(is_summary(t) for table in tables for t in table.values())


def content_key(t: torch.Tensor) -> bytes | None:
    """``device_summary.content_digest`` of ``t``, the one a summary holds; None for a summary
    that holds none (not a parameter's, or a slice)."""
    if is_summary(t):
        return t.content.encode() if t.content else None
    return content_digest(t).encode()


class Digests(dict):
    """Digests of named tensors (and of their transposes, under ``(name, True)``), computed once:
    ``digest``, or with ``summaries`` ``content_key`` (None for what a summary cannot tell).
    ``of(t)`` is the digest of any other tensor, the same way."""

    def __init__(self, tensors: dict[str, torch.Tensor], summaries: bool = False):
        super().__init__()
        self.tensors = tensors
        self.of = content_key if summaries else digest

    def __missing__(self, key) -> bytes | None:
        name, transposed = key if isinstance(key, tuple) else (key, False)
        t = self.tensors[name]
        if is_summary(t):
            value = None if transposed else self.of(t)
        else:
            value = self.of(t.t() if transposed else t)
        self[key] = value
        return value


def _by_digest(ref, cand, ref_names, cand_names, dig_r, dig_c, transposed, transform, evidence) -> list[ParamPair]:
    groups_c: dict[bytes, list[str]] = defaultdict(list)
    for c in cand_names:
        groups_c[dig_c[(c, transposed)]].append(c)
    groups_r: dict[bytes, list[str]] = defaultdict(list)
    for r in ref_names:
        groups_r[dig_r[(r, False)]].append(r)
    groups_r.pop(None, None)   # summaries that cannot tell
    out = []
    for key, rs in groups_r.items():
        cs = groups_c.get(key, [])
        for r, c in zip(rs, cs):  # both lists are in order of first use
            t = transform
            if transform["kind"] == "identity" and tuple(ref[r].shape) != tuple(cand[c].shape):
                t = {"kind": "reshape", "shape": list(ref[r].shape)}
            unique = len(rs) == 1 and len(cs) == 1
            out.append(ParamPair(r, (c,), t,
                                 evidence if unique else f"{evidence} ({len(rs)} alike, paired in order of use)",
                                 1.0 if unique else 0.7))
    return out


class _BlockIndex:
    """Tensors indexed by (trailing shape, rows, digest), to find row blocks of a fused tensor."""

    def __init__(self, tensors: dict[str, torch.Tensor], digests: Digests):
        self.table: dict[tuple, dict[int, dict[bytes, list[str]]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(list)))
        self.of = digests.of
        for name, t in tensors.items():
            d = digests[(name, False)] if t.dim() >= 1 else None
            if d is not None:
                self.table[tuple(t.shape[1:])][t.shape[0]][d].append(name)

    def cover(self, fused: torch.Tensor,
              holes: list[tuple[int, int]] = ()) -> tuple[list[tuple[str, int, int]], bool] | None:
        """Cover ``fused``'s rows with indexed blocks, in order, and remove them; None if impossible.
        Row ranges in ``holes`` are already accounted for and skipped.

        Returns (blocks, ambiguous): ambiguous when some block's content is held by several tensors.
        """
        if fused.dim() < 1:
            return None
        by_rows = self.table.get(tuple(fused.shape[1:]))
        if not by_rows:
            return None
        n = fused.shape[0]
        sizes = sorted((r for r in by_rows if r < n), reverse=True)
        blocks, offset, used, ambiguous = [], 0, set(), False
        holes = sorted(holes)
        while offset < n:
            skip = next((stop for start, stop in holes if start == offset), None)
            if skip is not None:
                offset = skip
                continue
            limit = min([start for start, _ in holes if start > offset] + [n])
            for rows in sizes:
                if offset + rows > limit:
                    continue
                d = self.of(fused[offset:offset + rows])
                group = by_rows[rows].get(d, [])
                names = [m for m in group if m not in used]
                if names:
                    ambiguous |= len(group) > 1
                    used.add(names[0])
                    blocks.append((names[0], offset, offset + rows, d))
                    offset += rows
                    break
            else:
                return None
        if not blocks:
            return None
        for name, start, stop, d in blocks:
            by_rows[stop - start][d].remove(name)
        return [b[:3] for b in blocks], ambiguous


def _fused(ref, cand, ref_left, cand_left, claimed, dig_r: Digests) -> list[ParamPair]:
    """Reference parameters that are row blocks of one candidate parameter (possibly transposed);
    ``claimed`` rows (of ``(name, transposed)``) are already paired."""
    index = _BlockIndex({r: ref[r] for r in ref_left}, dig_r)
    out = []
    for c in cand_left:
        views = [(cand[c], [], claimed.get((c, False), []))]
        if cand[c].dim() == 2:
            views.append((cand[c].t(), [{"kind": "transpose"}], claimed.get((c, True), [])))
        for view, pre, holes in views:
            found = index.cover(view, holes)
            if found:
                blocks, ambiguous = found
                for r, start, stop in blocks:
                    rows = {"kind": "rows", "start": start, "stop": stop}
                    t = {"kind": "chain", "steps": pre + [rows]} if pre else rows
                    out.append(ParamPair(r, (c,), t, f"identical bytes, rows {start}:{stop} of fused {c}"
                                         + (" (content not unique, paired in order of use)" if ambiguous else ""),
                                         0.7 if ambiguous else 1.0))
                break
    return out


def _fused_ref(ref, cand, ref_left, cand_left, dig_c: Digests) -> list[ParamPair]:
    """Reference parameters that are several candidate parameters concatenated along rows (of the
    reference, or of its transpose as in GPT-2's ``Conv1D``)."""
    index = _BlockIndex({c: cand[c] for c in cand_left}, dig_c)
    out = []
    for r in ref_left:
        views = [(ref[r], {"kind": "concat"})]
        if ref[r].dim() == 2:
            views.append((ref[r].t(), {"kind": "chain", "steps": [{"kind": "concat"}, {"kind": "transpose"}]}))
        for view, transform in views:
            found = index.cover(view)
            if found:
                blocks, ambiguous = found
                names = tuple(name for name, _, _ in blocks)
                out.append(ParamPair(r, names, transform, f"identical bytes, concatenation of {', '.join(names)}"
                                     + (" (content not unique, paired in order of use)" if ambiguous else ""),
                                     0.7 if ambiguous else 1.0))
                break
    return out


def _permuted(ref, cand, ref_left, cand_left, transposed: bool = False, vectors: bool = False,
              known: list[tuple[int, ...] | None] = ()) -> list[ParamPair]:
    """Matrices whose rows are the same multiset in another order (with ``transposed``, the rows of
    the reference's transpose: a per-head fused qkv stored as GPT-2's transposed Conv1D against a
    Linear whose rows are grouped by head); or ``vectors`` whose elements are, preferring an order
    already ``known`` from the matrices (a bias is permuted like its weight, and its elements may
    tie at bfloat16 precision)."""
    def fits(t: torch.Tensor) -> bool:
        return t.dim() == (1 if vectors else 2) and t.shape[0] > 1 and not is_summary(t)
    by_sig: dict[tuple, list[str]] = defaultdict(list)
    keys_c = {}
    for c in cand_left:
        if fits(cand[c]):
            keys_c[c] = row_digests(cand[c])
            by_sig[(tuple(cand[c].shape), tuple(sorted(keys_c[c])))].append(c)
    out = []
    for r in ref_left:
        if not fits(ref[r]):
            continue
        t = ref[r].t() if transposed else ref[r]
        keys_r = row_digests(t)
        options = by_sig.get((tuple(t.shape), tuple(sorted(keys_r))))
        if not options:
            continue
        ambiguous = len(options) > 1
        c = options.pop(0)
        where = defaultdict(list)
        for i, k in enumerate(keys_c[c]):
            where[k].append(i)
        index = next((list(i) for i in known if i is not None and len(i) == len(keys_r)
                      and [keys_c[c][j] for j in i] == keys_r), None)
        if index is None:
            dt = torch.promote_types(torch.promote_types(cand[c].dtype, t.dtype), torch.float32)
            rows_c = cand[c].detach().cpu().reshape(cand[c].shape[0], -1).to(dt)
            rows_r = t.detach().cpu().reshape(t.shape[0], -1).to(dt)
            index = []
            for i, k in enumerate(keys_r):   # rows equal at bfloat16 precision: the closest one
                j = min(where[k], key=lambda j: float((rows_c[j] - rows_r[i]).abs().sum()))
                where[k].remove(j)
                index.append(j)
        permute = {"kind": "permute_rows", "index": index}
        out.append(ParamPair(r, (c,), {"kind": "chain", "steps": [permute, {"kind": "transpose"}]} if transposed
                             else permute,
                             "identical rows, permuted" + (", transposed" if transposed else "")
                             + (" (several candidates, paired in order of use)" if ambiguous else ""),
                             0.7 if ambiguous else 1.0))
    return out


def _offset(ref, cand, ref_left, cand_left, dig_c) -> list[ParamPair]:
    """Vectors stored as an offset from one (``ref = cand + 1``): norm gains kept as ``1 + g``."""
    free = {dig_c[(c, False)]: c for c in cand_left if cand[c].dim() == 1}
    free.pop(None, None)
    out = []
    for r in ref_left:
        if ref[r].dim() != 1 or not ref[r].is_floating_point() or is_summary(ref[r]):
            continue
        c = free.pop(dig_c.of(ref[r].detach().cpu() - 1), None)
        if c is not None:
            out.append(ParamPair(r, (c,), {"kind": "offset", "value": 1.0}, "identical up to an offset of 1", 1.0))
    return out


def convert(ref_state: dict[str, torch.Tensor], pairs: list[ParamPair],
            cand_shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A candidate state dict built from reference weights by inverting ``pairs``.

    Returns (state dict, candidate names no pair fills).
    """
    out: dict[str, torch.Tensor] = {}
    filled: dict[str, torch.Tensor] = {}
    for p in pairs:
        if p.ref not in ref_state:
            continue
        src = ref_state[p.ref]
        steps = p.transform["steps"] if p.transform.get("kind") == "chain" else [p.transform]
        if steps[0].get("kind") == "concat":  # write the concatenation, then split it
            shapes = [tuple(cand_shapes[c]) for c in p.cand]
            whole = torch.empty((sum(s[0] for s in shapes), *shapes[0][1:]), dtype=src.dtype)
            mask = torch.zeros(whole.shape, dtype=torch.bool)
            _write(whole, mask, src, {"kind": "chain", "steps": steps[1:]})
            offset = 0
            for c, shape in zip(p.cand, shapes):
                out[c] = whole[offset:offset + shape[0]].clone()
                filled[c] = mask[offset:offset + shape[0]].clone()
                offset += shape[0]
            continue
        c = p.cand[0]
        if c not in out:
            out[c] = torch.empty(cand_shapes[c], dtype=src.dtype)
            filled[c] = torch.zeros(cand_shapes[c], dtype=torch.bool)
        _write(out[c], filled[c], src, p.transform)
    incomplete = [c for c, mask in filled.items() if not bool(mask.all())]
    missing = [c for c in cand_shapes if c not in out] + incomplete
    return {k: v for k, v in out.items() if k not in incomplete}, missing


def _write(dst: torch.Tensor, mask: torch.Tensor, src: torch.Tensor, transform: dict) -> None:
    """Write ``src`` (reference layout) into the part of ``dst`` the transform selects."""
    steps = transform["steps"] if transform.get("kind") == "chain" else [transform]
    view, mview = dst, mask
    for step in steps:
        kind = step.get("kind", "identity")
        if kind == "transpose":
            view, mview = view.t(), mview.t()
        elif kind == "rows":
            view, mview = view[step["start"]:step["stop"]], mview[step["start"]:step["stop"]]
        elif kind == "reshape":
            view, mview = view.view(step["shape"]), mview.view(step["shape"])
        elif kind == "permute_rows":   # what follows the permutation applies to src, inverted
            index = torch.as_tensor(step["index"], dtype=torch.long)
            for later in reversed(steps[steps.index(step) + 1:]):
                src = src.t() if later.get("kind") == "transpose" else src
            view[index] = src.to(view.dtype)
            mview[index] = True
            return
        elif kind == "offset":
            src = src - step["value"]
        elif kind != "identity":
            raise FxdiffError(f"cannot invert parameter transform {kind!r}")
    view.copy_(src)
    mview.fill_(True)
