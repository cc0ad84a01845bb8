"""The terminal report of a comparison, with rich. Data in, renderables out; the caller prints them.

In order: the verdict and the outputs; the first divergence, forward and backward, and why it is
believed; one row per module (the repeated blocks, by default) that differs; the parameter
gradients and the parameter and buffer values that differ (grouped by module when there are many);
op-level rows and the ops that pair with nothing on request; the summary. A table with no rows is
one line instead, and names are never cut: a table too wide for the console is printed one block
per row.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Callable, Iterable, Iterator

from rich.console import Console, ConsoleOptions, Group, NewLine, RenderableType, RenderResult
from rich.measure import Measurement
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.markup import escape
from rich.text import Text

from ..ops import node_key
from ..model.capture import DTYPE, GRAD, MODULE, SHAPE, Capture
from ..model.report import LIVE_ELEMENTS, Metrics, NodeRow, OutputRow, ParamRow, Report

MANY = 12          # more parameter rows than this are grouped by module
SHOWN_FIRST = 3    # first-divergence entries shown per direction
ROOT = "<root>"


def fmt(x: float | None) -> str:
    """A diff or a ratio in 3 significant digits."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.3g}"


_PRECISIONS = {2.0 ** -7: "bfloat16", 2.0 ** -10: "float16 or TF32", 2.0 ** -23: "float32", 2.0 ** -52: "float64"}


def _precision(eps: float) -> str:
    return _PRECISIONS.get(eps, f"eps {eps:.3g}")


def _verdict(m: Metrics | None) -> Text:
    if m is None:
        return Text("-", style="dim")
    if m.within_noise:
        return Text("within noise", style="green")
    if m.passed:
        return Text("ok", style="green")
    return Text.assemble(("DIFF", "bold red"), f": {m.note}" if m.note else "")


def _verdicts(ms: list[Metrics]) -> Text:
    """One verdict for many comparisons: DIFF with how many differ, else the best that fits all."""
    if not ms:
        return Text("-", style="dim")
    bad = sum(not m.passed for m in ms)
    if bad:
        return Text(f"DIFF {bad}/{len(ms)}", style="bold red")
    return _verdict(next((m for m in ms if m.within_noise), ms[0]))


def _all_metrics(report: Report) -> list[Metrics]:
    return [m for m in [*(o.metrics for o in report.outputs),
                        *(x for r in report.nodes for x in (r.forward, r.backward)),
                        *(x for p in report.params for x in (p.grad, p.value))] if m is not None]


def _rule(report: Report) -> str:
    """How the verdicts were reached, in words."""
    tol = report.tolerance
    if tol.get("atol") is not None or tol.get("rtol") is not None:
        return f"strict: |cand - ref| <= {tol.get('atol') or 0:g} + {tol.get('rtol') or 0:g} * |ref| for every element"
    metrics = [m for r in report.nodes for m in (r.forward, r.backward) if m is not None]
    noisy = [m for m in metrics if m.within_noise]
    coarsest = max((m.eps for m in metrics), default=0.0)
    if metrics and all(m.max_abs_diff == 0 for m in metrics):
        return f"noise-aware ({_precision(coarsest)}): all {len(metrics)} comparisons bit for bit"
    return (f"noise-aware ({_precision(coarsest)}): {len(noisy)} of {len(metrics)} comparisons pass within their "
            "noise level, not bit for bit")


class Rows:
    """A table of names and verdicts: a rich table when it fits the console, else one block per
    row with the name on a line of its own, so that no name is ever cut."""

    def __init__(self, title: str, columns: list[str], rows: list[list[Text | str]], caption: str = ""):
        self.title, self.columns, self.caption = title, columns, caption
        self.rows = [[c if isinstance(c, Text) else Text(c) for c in row] for row in rows]

    def table(self) -> Table:
        table = Table(title=self.title, title_justify="left", caption=self.caption or None, caption_justify="left")
        for col in self.columns:
            table.add_column(col, overflow="fold")
        for row in self.rows:
            table.add_row(*row)
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table = self.table()
        if Measurement.get(console, options.update_width(10**6), table).maximum <= options.max_width:
            yield table
            return
        yield Text(self.title, style="table.title")
        for name, *cells in self.rows:
            facts = [Text.assemble(f"{col} ", cell) for col, cell in zip(self.columns[1:], cells) if cell.plain]
            yield Padding(name, (0, 0, 0, 2), expand=False)
            yield Padding(Text(" · ").join(facts), (0, 0, 0, 6), expand=False)
        if self.caption:
            yield Text(self.caption, style="table.caption")


def verdict(report: Report) -> Text:
    """MATCH or DIVERGED, and in a few words how."""
    if report.diverged:
        s = report.summary()
        n, g = s["nodes"], s["param_grads"]
        parts = [(sum(not o.metrics.passed for o in report.outputs), len(report.outputs), "outputs"),
                 (n["forward_mismatches"], n["forward_matches"] + n["forward_mismatches"], "op values"),
                 (n["backward_mismatches"], n["backward_matches"] + n["backward_mismatches"], "op gradients"),
                 (g["mismatched"], g["matched"] + g["mismatched"], "parameter gradients"),
                 (s["param_values"]["mismatched"], s["param_values"]["compared"], "parameter and buffer values")]
        how = [", ".join(f"{bad} of {of} {what}" for bad, of, what in parts if bad) + " differ"] \
            if any(bad for bad, _, _ in parts) else []
        unpaired = s["uncompared"]["trained_ref_params"]
        if unpaired:
            how.append(f"{unpaired} trained reference {_plural(unpaired, 'parameter')} found no counterpart")
        return Text.assemble(("DIVERGED", "bold red"), ": " + "; ".join(how) if how else "")
    metrics = _all_metrics(report)
    if report.verdict == "within noise":
        how = f"within {_precision(max(m.eps for m in metrics if m.within_noise))} noise"
        explained = [f"{r.op} in {r.cand_module or '<root>'}" + (" (gradient)" if d == "backward" else "")
                     for r in report.nodes for d in r.explained]
        if explained:
            how += (f"; past it at {len(explained)} {_plural(len(explained), 'op')}, where replaying the candidate's "
                    f"ops shows the same computation carrying that noise: {_names(explained, 3)}")
    else:
        how = "within the tolerance" if any(m.max_abs_diff > 0 for m in metrics) else "bit for bit"
        if any(r.forward is not None and r.forward.note.startswith(LIVE_ELEMENTS) for r in report.nodes):
            how += " where any output depends on the values"
    s = report.summary()
    if not any(s["nodes"][k] for k in ("backward_matches", "backward_mismatches")) \
            and not any(s["param_grads"][k] for k in ("matched", "mismatched")):
        how += "; forward only: no gradient was compared"
    return Text.assemble(("MATCH", "bold green"), f", {how}")


def outputs_section(report: Report, show_all: bool = False) -> RenderableType:
    """The outputs that differ, by name (all with ``show_all``); one line when all match."""
    rows = [o for o in report.outputs if show_all or not o.metrics.passed]
    lines: list[RenderableType] = []
    if rows:
        same = len(report.outputs) - len(rows)
        lines.append(Rows("Outputs", ["output", "match", "max abs diff", "max rel diff", "cosine"],
                          [[_pair_name(o.ref, o.cand), _verdict(o.metrics), fmt(o.metrics.max_abs_diff),
                            fmt(o.metrics.max_rel_diff), fmt(o.metrics.cosine)] for o in rows],
                          _more(same, "output")))
    elif len(report.outputs) == 1:   # "outputs: all 1 match (0)" read as a count
        lines.append(Text(f"output {report.outputs[0].ref}: matches"))
    elif report.outputs:
        names = [o.ref for o in report.outputs]
        lines.append(Text(f"outputs: all {len(names)} match ({_names(names)})"))
    for side in ("ref", "cand"):
        left = getattr(report.unmatched, f"{side}_outputs")
        if left:
            lines.append(Text(f"{_plural(len(left), 'output')} on the {_SIDE[side]} only, not compared: "
                              f"{_names(left)}"))
    return Group(*lines)


_SIDE = {"ref": "reference", "cand": "candidate"}


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def _more(n: int, word: str) -> str:
    """``and 3 more modules match``; empty for none."""
    return f"and {n} more {_plural(n, word)} {'matches' if n == 1 else 'match'}" if n else ""


def _names(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _pair_name(ref: str, cand: str | None) -> str:
    return ref if cand in (None, ref) else f"{ref} (cand {cand})"


def first_divergence(report: Report) -> RenderableType | None:
    """The frontier of the divergence, forward and backward, and why each entry is believed."""
    firsts = {d: sorted((r for r in report.nodes if getattr(r, f"first_{d}")), key=lambda r: r.depth,
                        reverse=d == "backward") for d in ("forward", "backward")}
    outputs = [o for o in report.outputs if o.frontier]
    if not any(firsts.values()) and not outputs:
        return None
    downstream = _downstream(report, {r.ref_node for r in firsts["forward"]})
    lines = [Text("First divergence", style="bold")]
    for d, rows in firsts.items():
        if d == "forward":
            lines += _output_frontier(outputs)
        if not rows and not (d == "forward" and outputs):
            lines.append(Text(f"{d}: none, every compared {'value' if d == 'forward' else 'gradient'} matches"))
        for r in rows[:SHOWN_FIRST]:
            m = r.forward if d == "forward" else r.backward
            where = f"{r.ref_module or ROOT} {r.ref_node} ({r.op})"
            if (r.cand_module, r.cand_node) != (r.ref_module, r.ref_node):
                where += f", cand {r.cand_module or ROOT} {r.cand_node}"
            why = _cause(r) if d == "forward" else _consequence(r, downstream)
            lines.append(Text.assemble((f"{d}: ", "bold"), where))
            if r.blame and (d == "forward" or not r.first_forward):   # a backward-only story: its module
                what, ref_module, cand_module = r.blame
                lines.append(_indent(Text.assemble(("starts at: ", "bold"), f"{what} in {ref_module or ROOT}"
                                                   + (f" (cand {cand_module or ROOT})" if cand_module != ref_module
                                                      else ""))))
            lines += [_indent(Text(_judged(m))), _indent(Text.from_markup(why))]
        if len(rows) > SHOWN_FIRST:
            lines.append(_indent(Text(f"and {len(rows) - SHOWN_FIRST} more {d} (--ops lists them)")))
    return Group(*lines)


def _output_frontier(outputs: list[OutputRow]) -> list[RenderableType]:
    """The outputs that differ with no compared value before them differing, and the unpaired ops
    between (``OutputRow.frontier``)."""
    lines: list[RenderableType] = []
    for o in outputs[:SHOWN_FIRST]:
        f = o.frontier
        where = f"output {o.ref}: {f['ref_module'] or ROOT} {f['ref_node']} ({f['op']})"
        if (f["cand_module"], f["cand_node"]) != (f["ref_module"], f["ref_node"]):
            where += f", cand {f['cand_module'] or ROOT} {f['cand_node']}"
        listed = "; ".join(f"{side} {_names(f['unpaired_ops'][side])}" for side in ("ref", "cand")
                           if f["unpaired_ops"][side])
        lines.append(Text.assemble(("forward: ", "bold"), where))
        if f.get("blame"):
            what, ref_module, cand_module = f["blame"]
            lines.append(_indent(Text.assemble(("starts at: ", "bold"), f"{what} in {ref_module or ROOT}"
                                               + (f" (cand {cand_module or ROOT})" if cand_module != ref_module
                                                  else ""))))
        lines += [_indent(Text(_judged(o.metrics))),
                  _indent(Text.from_markup("[bold]made after the last compared values[/]: every compared value it "
                                           "depends on matches; the ops in between pair with none of the other "
                                           f"side's: {escape(listed or 'none')}"))]
    return lines


def _indent(text: Text) -> Padding:
    return Padding(text, (0, 0, 0, 4), expand=False)


_ONE_SIDED = ("gradient on ref only", "gradient on cand only")


def _judged(m: Metrics) -> str:
    """What the verdict compared: the error and the noise level it was judged against."""
    if m.note in _ONE_SIDED:   # no numbers: nothing to subtract
        other = "candidate" if m.note.endswith("ref only") else "reference"
        return (f"{m.note}: none reached the {other}'s op (nothing it is computed from requires grad there, "
                "or no path leads from it to the loss)")
    diffs = f"max abs diff {fmt(m.max_abs_diff)}, max rel diff {fmt(m.max_rel_diff)}"
    if m.error is None or not m.noise:
        what = m.note or f"{m.mismatched} of {m.numel} elements outside the tolerance"
        return f"{what}; {diffs}"
    level = f"noise level {fmt(m.noise)} ({_precision(m.eps)})"
    if m.error > m.noise:
        return f"relative error {fmt(m.error)} is {m.error / m.noise:.3g}x its {level}; {diffs}"
    return (f"relative error {fmt(m.error)} is within its {level}, but an element is off by {fmt(m.max_scaled_diff)} "
            f"of its magnitude (or of the tensors' RMS), more than rounding allows; {diffs}")


def _cause(r: NodeRow) -> str:
    cause = r.cause()
    if cause == "introduced":
        return "[bold]introduced here[/]: the candidate's ops, replayed alone on the reference's inputs, already differ"
    if cause == "amplified":
        return ("[bold]amplified here[/]: replayed alone on the reference's inputs the candidate agrees; "
                "differences within the noise upstream grew here")
    return (f"[bold]not replayed in isolation[/]: {escape(r.isolated_why or 'no reason recorded')}; "
            "introduced here or amplified is not known")


def _consequence(r: NodeRow, downstream: set[str]) -> str:
    if r.forward is not None and not r.forward.passed:
        return "[bold]consequence of the forward divergence[/]: this node's forward value already differs"
    if r.ref_node in downstream:
        return "[bold]consequence of the forward divergence[/]: this node is downstream of it"
    if r.consequence:
        return ("[bold]consequence of the forward divergence[/]: the gradient reaching it goes back through ops "
                "whose forward values differ")
    only = "[bold]backward only[/]: its forward value matches and no forward divergence precedes it"
    if r.backward is not None and r.backward.note in _ONE_SIDED:
        return only   # replaying it says nothing of a gradient autograd never computed
    cause = r.backward_cause()
    if cause == "custom backward":
        return (f"{only}; the candidate's ops, differentiated back from the reference's gradients, agree with the "
                "reference: its own backward is not their derivative")
    if cause == "introduced":
        return f"{only}; the candidate's ops, differentiated back from the reference's gradients, already differ"
    if r.isolated_backward_why:
        return f"{only}; not replayed in isolation: {escape(r.isolated_backward_why)}"
    return only


def _downstream(report: Report, start: set[str]) -> set[str]:
    """The reference nodes that ``start`` feeds, directly or not, ``start`` included."""
    users: dict[str, list[str]] = defaultdict(list)
    for n in report.graph.get("ref", []):
        for a in n.get("inputs", ()):
            users[a].append(n["name"])
    seen, stack = set(start), list(start)
    while stack:
        for u in users[stack.pop()]:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def module_key(report: Report, depth: int | None = None) -> Callable[[str], str]:
    """The module table's row for a module path: its ancestor ``depth`` levels deep; by default the
    repeated block it is in (``layers.3``) or, outside the blocks, the outermost module beside them
    (``decoder``); without repeated blocks, depth 1."""
    if depth is None:
        blocks = repeated_blocks(p for n in report.graph.get("ref", []) for p in _prefixes(n.get("module") or ""))
        if blocks:
            parent = next(iter(blocks)).rpartition(".")[0]

            def key(module: str) -> str:
                for prefix in _prefixes(module):
                    if prefix in blocks or not (parent == prefix or parent.startswith(prefix + ".")):
                        return prefix
                return module
            return key
        depth = 1
    return lambda module: ".".join(module.split(".")[:depth])


def repeated_blocks(paths: Iterable[str]) -> set[str]:
    """The shallowest modules named by an integer index under one parent (``layers.0``,
    ``layers.1``, ...), two or more of them; the largest group at that depth."""
    groups: dict[str, set[str]] = defaultdict(set)
    for path in paths:
        parent, _, last = path.rpartition(".")
        if last.isdigit():
            groups[parent].add(path)
    groups = {p: g for p, g in groups.items() if len(g) >= 2}
    if not groups:
        return set()
    return groups[min(groups, key=lambda p: (len(_prefixes(p)), -len(groups[p])))]


def _prefixes(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [".".join(parts[:k]) for k in range(1, len(parts) + 1)]


def modules_section(report: Report, key: Callable[[str], str], show_all: bool = False) -> RenderableType | None:
    """One row per module (of ``key``) that differs, like the original "Intermediate layers" table;
    one line when every module matches."""
    groups: dict[str, list[NodeRow]] = defaultdict(list)
    for r in sorted(report.nodes, key=lambda r: r.depth):
        groups[key(r.ref_module)].append(r)
    if not groups:
        return None
    # a divergence blamed on an op on one side only (or a role swap) starts in that op's module
    blamed = {key(r.blame[1]): r for r in report.nodes if r.first_forward and r.blame}
    rows, same = [], 0
    for name, members in groups.items():
        fwd = [r.forward for r in members if r.forward is not None]
        bwd = [r.backward for r in members if r.backward is not None]
        if all(m.passed for m in fwd + bwd) and name not in blamed and not show_all:
            same += 1
            continue
        cand = _counterpart([r.cand_module for r in members])
        first = _first_inside(name, members)
        if name in blamed:
            first = Text.assemble(blamed[name].blame[0], ", then " if first.plain else "",
                                  first if first.plain else (" <- first", "bold yellow"))
        rows.append([_pair_name(name or ROOT, cand or None), _verdicts(fwd), _verdicts(bwd),
                     fmt(max((m.max_abs_diff for m in fwd), default=None)), first])
    if not rows:
        return Text(f"modules: all {same} match")
    return Rows("Modules", ["module", "forward", "backward", "fwd max abs diff", "first divergent op"], rows,
                _more(same, "module"))


def _first_inside(name: str, members: list[NodeRow]) -> Text:
    """The module's first op whose value differs, else its last (first in backward order) whose
    gradient differs; marked when it is the first divergence itself."""
    fwd = [r for r in members if r.forward is not None and not r.forward.passed]
    bwd = [r for r in members if r.backward is not None and not r.backward.passed]
    if not fwd and not bwd:
        return Text("")
    r, d = (fwd[0], "forward") if fwd else (bwd[-1], "backward")
    inside = r.ref_module[len(name) + 1:] if name and r.ref_module.startswith(name + ".") else \
        ("" if r.ref_module == name else r.ref_module)
    text = Text(("" if d == "forward" else "bwd: ") + r.ref_node + (f" in {inside}" if inside else ""))
    if r.first_forward if d == "forward" else r.first_backward:
        text.append(" <- first", style="bold yellow")
    return text


def _counterpart(modules: list[str]) -> str:
    """The deepest candidate module that holds three quarters of ``modules`` (the candidate modules
    of one reference module's ops): an op or two that pair outside it (the decoder's logits product
    against the model's ``proj_out``) do not make the whole model its counterpart."""
    counts = Counter(p for m in modules for p in _prefixes(m))
    return max((p for p, n in counts.items() if 4 * n >= 3 * len(modules)), key=lambda p: p.count("."), default="")


def params_section(report: Report, key: Callable[[str], str], what: str = "grad",
                   show_all: bool = False) -> RenderableType | None:
    """The parameter gradients (``what="grad"``) or the parameter and buffer values (``"value"``)
    that differ: one row each, or one row per module of ``key`` when there are more than ``MANY``;
    one line when all match."""
    title = "Parameter gradients" if what == "grad" else "Parameter and buffer values"
    compared = [p for p in report.params if getattr(p, what) is not None]
    bad = [p for p in compared if not getattr(p, what).passed]
    lines: list[RenderableType] = []
    if compared and (bad or show_all):
        noun = "parameter gradient" if what == "grad" else "value"
        caption = "" if show_all else _more(len(compared) - len(bad), noun)
        lines.append(_param_rows(title, compared if show_all else bad, what, caption) if show_all or len(bad) <= MANY
                     else _param_groups(title, compared, what, key, caption))
    elif compared:
        lines.append(Text(f"{title.lower()}: all {len(compared)} match"))
    if what == "grad":
        unpaired = report.unmatched.ref_params
        if unpaired:
            lines.append(Text(f"not compared, no counterpart in the candidate: "
                              f"{_names(unpaired, len(unpaired) if show_all else 8)}"))
        extra = report.unmatched.trained_cand_params   # a bias the reference does not have
        if extra:
            lines.append(Text(f"trained in the candidate only, no counterpart in the reference: "
                              f"{_names(extra, len(extra) if show_all else 8)}"))
        unseeded = [p.ref for p in report.params if p.grad is None and p.grad_uncompared]
        if unseeded:
            lines.append(Text(f"gradients not compared, seeded from different outputs on each side: "
                              f"{_names(unseeded, len(unseeded) if show_all else 8)}"))
    return Group(*lines) if lines else None


def _param_rows(title: str, params: list[ParamRow], what: str, caption: str) -> Rows:
    transforms = any(p.transform.get("kind", "identity") != "identity" for p in params)
    columns = ["parameter" if what == "grad" else "parameter or buffer", *(["transform"] if transforms else []),
               "match", "max abs diff", "max rel diff"]
    rows = []
    for p in params:
        m = getattr(p, what)
        kind = [p.transform.get("kind", "identity")] if transforms else []
        one_sided = m.note in _ONE_SIDED   # nothing to subtract: no figures
        rows.append([_pair_name(p.ref, ", ".join(p.cand)), *kind, _verdict(m), fmt(None if one_sided else m.max_abs_diff),
                     fmt(None if one_sided else m.max_rel_diff)])
    return Rows(title, columns, rows, caption)


def _param_groups(title: str, params: list[ParamRow], what: str, key: Callable[[str], str], caption: str) -> Rows:
    groups: dict[str, list[ParamRow]] = defaultdict(list)
    for p in params:
        groups[key(p.ref.rpartition(".")[0])].append(p)
    rows = []
    for name, members in groups.items():
        bad = [p for p in members if not getattr(p, what).passed]
        if not bad:
            continue
        # a gradient on one side only has no figure: the worst measured one, else that note
        worst = max(bad, key=lambda p: (getattr(p, what).note not in _ONE_SIDED, getattr(p, what).max_abs_diff))
        m = getattr(worst, what)
        rows.append([name or ROOT, Text(f"{len(bad)} of {len(members)}", style="bold red"),
                     m.note if m.note in _ONE_SIDED else fmt(m.max_abs_diff), worst.ref[len(name) + 1:] if name else worst.ref])
    return Rows(f"{title}, by module", ["module", "differ", "worst max abs diff", "worst of them"], rows, caption)


def nodes_table(report: Report, show_all: bool = False) -> RenderableType:
    """Op-level rows: the matched pairs that differ (all with ``show_all``)."""
    rows = [r for r in report.nodes if show_all or _failing(r)]
    if not rows:
        return Text(f"ops: all {len(report.nodes)} matched pairs match")
    out = []
    for r in rows:
        name = Text(f"{r.ref_module or ROOT} {r.ref_node}")
        if r.first_forward or r.first_backward:
            name.append(" <- first", style="bold yellow")
        out.append([name, f"{r.cand_module or ROOT} {r.cand_node}", r.op, _verdict(r.forward), _verdict(r.backward),
                    fmt(r.forward.max_abs_diff if r.forward else None),
                    fmt(r.backward.max_abs_diff if r.backward else None), r.rationale])
    hidden = len(report.nodes) - len(rows)
    return Rows("Ops", ["ref op", "cand op", "op", "fwd", "bwd", "fwd max abs", "bwd max abs", "match basis"], out,
                f"and {hidden} more matched pairs match (--all shows them)" if hidden else "")


def unmatched_table(report: Report) -> RenderableType | None:
    """The ops of each side that pair with nothing, and why (``--ops``, ``--all``)."""
    out = [[side, f"{u.module or ROOT} {u.node}", u.op, "x".join(map(str, u.shape or [])), u.reason]
           for side, nodes in (("ref", report.unmatched.ref), ("cand", report.unmatched.cand)) for u in nodes]
    if not out:
        return None
    return Rows("Unmatched ops", ["side", "op", "kind", "shape", "why"], out, "")


def _failing(r: NodeRow) -> bool:
    return (r.forward is not None and not r.forward.passed) or (r.backward is not None and not r.backward.passed)


def summary_panel(report: Report) -> Panel:
    """Counts that add up, and how the verdicts were reached."""
    s = report.summary()
    n, p, t, v = s["nodes"], s["param_grads"], s["tensors"], s["param_values"]
    outputs_bad = sum(not o.metrics.passed for o in report.outputs)
    lines = [
        f"outputs:             {len(report.outputs) - outputs_bad} match, {outputs_bad} differ"
        + (f"; {s['uncompared']['ref_outputs']} ref, {s['uncompared']['cand_outputs']} cand not paired"
           if s["uncompared"]["ref_outputs"] or s["uncompared"]["cand_outputs"] else ""),
        f"op values:           {_counted(n, 'forward')}; {n['unmatched_ref']} ref, {n['unmatched_cand']} cand ops "
        "unmatched",
        f"op gradients:        {_counted(n, 'backward')}",
        f"parameters:          {t['total']} parameters and buffers = {t['trained']} trained + "
        f"{t['buffers_or_frozen']} buffers or frozen (no gradient)"
        + (f"; {t['unpaired']} without a counterpart" if t["unpaired"] else ""),
        f"parameter gradients: {p['matched']} match, {p['mismatched']} differ"
        + (f", {s['uncompared']['trained_ref_params']} without a counterpart" if s["uncompared"]["trained_ref_params"]
           else "")
        + (f", {s['uncompared']['param_grads']} not compared" if s["uncompared"]["param_grads"] else ""),
        f"values:              {v['compared'] - v['mismatched']} parameters and buffers match, "
        f"{v['mismatched']} differ",
        f"verdicts:            {_rule(report)}",
        *([f"rng replay:          {len(report.replayed)} random ops took ref's draws"] if report.replayed else []),
    ]
    word = "[bold red]DIVERGED[/]" if report.diverged else "[bold green]MATCH[/]"
    return Panel(escape("\n".join(lines)), title=f"Summary: {word}", title_align="left", expand=False)


def _counted(n: dict[str, Any], direction: str) -> str:
    """``N match, M differ (rate)`` of the op pairs in ``direction``, or that none was compared."""
    matches, mismatches = n[f"{direction}_matches"], n[f"{direction}_mismatches"]
    if not matches + mismatches:
        return "none compared"
    return f"{matches} match ({n[f'{direction}_match_rate']:.1%}), {mismatches} differ"


def capture_summary(cap: Capture, label: str, top: int = 10) -> RenderableType:
    """What ``fxdiff inspect`` prints: versions, setup, counts, sizes and the largest nodes."""
    s, m = cap.summary(), cap.info
    lines = [
        f"[bold]{escape(label)}[/]: {escape(str(m.model or m.model_class))}",
        escape(f"  fxdiff {m.fxdiff}, torch {m.torch}, python {m.python}, tracer {m.tracer}, {m.mode} mode, "
               f"seed {m.seed}, device {m.device}, dtype {m.dtype}, captured {m.started}"),
        f"  {s['nodes']} nodes ({s['ops']} ops, {s['inputs']} inputs), {s['params']} params/buffers, "
        f"{s['values']} values, {s['grads']} gradients, {s['param_grads']} parameter gradients",
        "  sizes: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in s["bytes"].items()),
    ]
    table = Table(title=f"Largest {top} nodes", title_justify="left")
    for col in ("node", "module", "op", "shape", "dtype", "grad"):
        table.add_column(col, overflow="fold")
    ranked = sorted((n for n in cap.graph.nodes if n.name in cap.values), key=lambda n: -cap.values[n.name].numel())
    for n in ranked[:top]:
        table.add_row(*(Text(c) for c in (n.name, str(n.meta.get(MODULE) or "<root>"), node_key(n),
                                          str(tuple(n.meta.get(SHAPE) or ())), str(n.meta.get(DTYPE)),
                                          str(n.meta.get(GRAD, "-")))))
    return Group(*(Text.from_markup(line) for line in lines), table)


def render(report: Report, show_all: bool = False, ops: bool = False,
           modules_depth: int | None = None) -> RenderableType:
    """The terminal report, in order: verdict and outputs, first divergence, modules, parameter
    gradients, parameter and buffer values, op-level rows and the ops that pair with nothing (with
    ``ops`` or ``show_all``), summary.
    ``show_all`` shows every row of every table; ``modules_depth`` picks the module table's rows
    (see ``module_key``)."""
    key = module_key(report, modules_depth)

    def parts() -> Iterator[RenderableType | None]:
        yield Group(verdict(report), outputs_section(report, show_all))
        yield first_divergence(report)
        yield modules_section(report, key, show_all)
        yield params_section(report, key, "grad", show_all)
        yield params_section(report, key, "value", show_all)
        if ops or show_all:
            yield nodes_table(report, show_all)
            yield unmatched_table(report)
        yield summary_panel(report)
    shown = [p for p in parts() if p is not None]
    return Group(*(x for p in shown for x in (p, NewLine())))
