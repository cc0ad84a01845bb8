"""A recorded call's arguments by name: torch's own parameter lists for its ops (``conv2d``'s
``stride``, not "argument 3"), Python's signature for other functions, and their defaults."""

from __future__ import annotations

import ast
import functools
import inspect
import re
from typing import Any, Callable

import torch.fx

from ..model.capture import TARGET
from ..targets import Targets


def named(node: torch.fx.Node) -> dict[int | str, Any]:
    """The arguments ``node`` was called with, by parameter name where it can be told, else by
    position; those left out take the op's default."""
    target = str(node.meta.get(TARGET))
    given = _given(node, parameter_names(target))
    return {**{k: v for k, v in defaults(target).items() if k not in given}, **given}


def side_by_side(rn: torch.fx.Node, cn: torch.fx.Node) -> list[tuple[int | str, Any, Any]]:
    """Two calls of one function's arguments side by side, by name where torch or Python can tell
    (a keyword on one side, a position on the other), else by position; an argument one side leaves
    out takes the op's default (``F.gelu(x)`` against ``F.gelu(x, approximate='tanh')``)."""
    target = str(rn.meta.get(TARGET))
    names, default = parameter_names(target), defaults(target)
    a, b = _given(rn, names), _given(cn, names)
    return [(k, a.get(k, default.get(k)), b.get(k, default.get(k))) for k in [*a, *(k for k in b if k not in a)]
            if (k in a or k in default) and (k in b or k in default)]


def _given(node: torch.fx.Node, names: tuple[str, ...]) -> dict[int | str, Any]:
    """The arguments ``node`` passes, positional ones by ``names`` where there are enough of them."""
    return {**{names[i] if i < len(names) else i: a for i, a in enumerate(node.args)}, **node.kwargs}


def parameter_names(target: str) -> tuple[str, ...]:
    """The positional parameter names of the op a capture names (``F.layer_norm``: ``input,
    normalized_shape, weight, bias, eps``); none when they cannot be told."""
    signature = _signature(target)
    return tuple(signature.parameters) if signature is not None else ()


def defaults(target: str) -> dict[str, Any]:
    """The default values of the keyword parameters of the op a capture names, where they can be told."""
    signature = _signature(target)
    return {} if signature is None else {p.name: p.default for p in signature.parameters.values()
                                         if p.default is not inspect.Parameter.empty}


@functools.lru_cache(maxsize=256)
def _signature(target: str) -> inspect.Signature | None:
    """The signature of the op a capture names: the one torch lists for its overridable functions
    (builtins such as ``conv2d`` included), else the one Python can tell, or the one its docstring
    opens with where that names more parameters (torch lists ``scaled_dot_product_attention``
    without ``is_causal`` and ``scale``); None when none can."""
    fn = Targets.default().resolve(target)
    try:
        listed = inspect.signature(_testing_overrides().get(fn, fn))
    except (TypeError, ValueError):
        listed = None
    documented = _documented(fn)
    if documented is not None and (listed is None or len(documented.parameters) > len(listed.parameters)):
        return documented
    return listed if listed is not None else _aten(fn)


def _aten(fn: Any) -> inspect.Signature | None:
    """The signature of the aten operator a torch builtin of no listed signature calls by its name
    (``torch._weight_norm``: ``v, g, dim=0``), from its first schema; None where there is none."""
    name = getattr(fn, "__name__", None)
    try:
        schemas = torch._C._jit_get_schemas_for_operator(f"aten::{name}") if name else []
    except RuntimeError:
        return None
    if not schemas:
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    try:
        return inspect.Signature([inspect.Parameter(a.name, kinds[a.kwarg_only], default=a.default_value
                                                    if a.has_default_value() else inspect.Parameter.empty)
                                  for a in schemas[0].arguments])
    except ValueError:   # a name Python cannot take, or an order it does not allow
        return None


def _documented(fn: Any) -> inspect.Signature | None:
    """The signature a torch builtin's docstring opens with (``name(a, b=0.0, ...) -> Tensor``),
    read as Python syntax and literal defaults, never run; None where there is none."""
    match = re.match(r"\s*\w+\((.*?)\)\s*(?:->|\n|$)", getattr(fn, "__doc__", None) or "", re.S)
    if match is None:
        return None
    try:
        args = ast.parse(f"def _({match.group(1)}): pass").body[0].args
        defaults = [ast.literal_eval(d) for d in args.defaults]
    except (SyntaxError, ValueError):
        return None
    positional = [*args.posonlyargs, *args.args]
    first = len(positional) - len(defaults)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([inspect.Parameter(a.arg, kind, default=defaults[i - first] if i >= first
                                                else inspect.Parameter.empty) for i, a in enumerate(positional)])


@functools.cache
def _testing_overrides() -> dict[Any, Callable]:
    """torch's stand-in for each overridable function, with its parameters' names."""
    from torch.overrides import get_testing_overrides
    return get_testing_overrides()


SYMMETRIC = frozenset({"add", "mul", "maximum", "minimum", "eq", "ne"})   # arguments that may come in any order


def same_function(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    """Whether two nodes call one function, spelt alike or as torch's function and its method
    (``torch.matmul``, ``Tensor.matmul``: their arguments in one order; not ``where``, whose method
    takes the condition second)."""
    ta, tb = (str(n.meta.get(TARGET)) for n in (a, b))
    name = ta.rpartition(".")[2]
    return ta == tb or (name == tb.rpartition(".")[2] and name != "where")
