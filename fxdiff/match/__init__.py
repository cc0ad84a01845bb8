"""Align two captures whose module names and op decompositions may differ.

``GraphMatcher(ref, cand).match()`` returns an ``Alignment`` (see ``model/alignment.py``), much as
``difflib.SequenceMatcher`` returns opcodes. The stages, one module each, share one ``PairSet``
(``pairset.py``) of pairs between two ``ComputeGraph`` objects (``compute_graph.py``):

1. **Canonicalise** (``compute_graph.py``). Op keys from ``ops.py``; transparent ops (view,
   transpose, ``x[:, None]``, the items of a ``chunk``/``split``...) are contracted into their
   producer, views of parameters (``w.t()``) into the parameter, and a ``matmul`` whose only use is
   adding a bias vector becomes one ``linear`` with that add, leaving a DAG of computing nodes per
   side.
2. **Hard anchors** (``anchors.py``). Graph inputs by value, graph outputs by position; parameters
   by content (``params.correspond``): the op consuming an anchored parameter is anchored with its
   counterpart, including 1:k blocks (one fused qkv projection against separate q, k, v: the pair
   compares a slice of the fused output) and decompositions (``layer_norm`` against a written-out
   norm: the consumers of the weight and of the bias form one block). Only parameters whose content
   is unique on both sides anchor; tensors of equal content (LayerNorm ones, zero biases) are
   settled later by structure. A user map's module pairs come first and win. The anchors that agree
   with both topological orders bound the windows below; the other certain ones still pair (a port
   may run independent ops, q/k/v, in another order).
3. **Soft anchors** (``patience.py``). Between consecutive hard anchors, recursive patience
   alignment: keys unique in both windows, longest order-consistent chain, recursion into the gaps
   with weaker keys (op key, size, module path when both sides share their names, integer indices of
   module paths, op ordinal, Weisfeiler-Lehman hash of the predecessors). A pair whose users are
   other ops is weak (a different formula that happens to start alike). Small leftover windows pair
   look-alike ops (same key and size) whose matched inputs agree, using value closeness only to
   choose among them.
4. **Propagate** (``propagate.py``). The unmatched inputs of a matched pair correspond when their
   sizes (then op keys) single them out: this pairs the outputs of different decompositions
   (``sdpa`` against ``matmul, softmax, matmul``; ``layer_norm`` against mean/var/rsqrt) as one
   many-to-many block, whose inner nodes are listed in ``ref_block`` / ``cand_block``. Unmatched
   users of a matched pair with the same key and size correspond too.
5. **Parameters of equal content** (``settle.py``) are paired through the matched ops that consume
   them; what is still ambiguous is paired in order of first use, with a lower confidence.

Every pair carries a rationale and a confidence (``confidence.py`` names the levels); pairs below
``WEAK`` (0.75) rest on order or sizes alone, and the judge drops them when their values disagree
although everything upstream agrees. What matches nothing is listed as unmatched. Values are never
used to accept or reject a structural match: they stop agreeing after the point of divergence, which
is exactly where a comparison needs the alignment most.
"""

from ..model.alignment import Alignment, Pair, ParamPair
from .matcher import GraphMatcher, match
from .usermap import UserMap

__all__ = ["Alignment", "GraphMatcher", "Pair", "ParamPair", "UserMap", "match"]
