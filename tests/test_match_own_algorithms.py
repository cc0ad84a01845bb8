"""What the matcher computes itself gives the libraries' answers: its least-cost assignment is
scipy's, ties included (look-alike ops are paired as scipy paired them), its Weisfeiler-Lehman
hashes networkx's."""

from __future__ import annotations

import random

import pytest

from fxdiff.match.patience import assignment


def test_assignment_equals_scipy_with_ties():
    lsa = pytest.importorskip("scipy.optimize").linear_sum_assignment
    rng = random.Random(0)
    for trial in range(3000):
        nr, nc = rng.randint(1, 12 if trial % 10 else 64), rng.randint(1, 12 if trial % 10 else 64)
        pool = [0.0, 1.0, 2.0, 1e9] if trial % 3 == 0 else [rng.random() for _ in range(3)] + [1e9]
        cost = [[rng.choice(pool) if trial % 2 else rng.random() * 2 for _ in range(nc)] for _ in range(nr)]
        rows, cols = lsa(cost)
        assert assignment(cost) == (list(rows), list(cols)), cost
    assert assignment([]) == ([], [])
    assert assignment([[0.0] * 3] * 3) == ([0, 1, 2], [0, 1, 2])


@pytest.mark.parametrize("name", ["conformer", "gpt2"])
def test_wl_hashes_equal_networkx(name):
    """The matcher's Weisfeiler-Lehman hashes are networkx's (>= 3.5), node for node, on real graphs."""
    nx = pytest.importorskip("networkx")
    if tuple(int(p) for p in nx.__version__.split(".")[:2]) < (3, 5):
        pytest.skip("networkx before 3.5 hashed directed graphs otherwise")
    import warnings

    import fxdiff
    import tiny_models
    from fxdiff.match.compute_graph import ComputeGraph

    model, args, kwargs, loss = tiny_models.build(name)
    cg = ComputeGraph(fxdiff.capture(model, args, kwargs, loss=loss))
    g = nx.DiGraph()
    g.add_nodes_from((n, {"label": cg.key[n]}) for n in cg.order)
    g.add_edges_from((p, n) for n in cg.order for p in cg.preds[n])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = nx.weisfeiler_lehman_subgraph_hashes(g.reverse(copy=False), node_attr="label", iterations=2,
                                                        digest_size=8)
    assert len(cg.order) > 50
    assert cg.wl == {n: tuple(expected[n]) for n in cg.order}
    assert len({h[1] for h in cg.wl.values()}) > 10   # the hashes tell nodes apart
