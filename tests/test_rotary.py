"""An attention's inputs told apart by their values, where the ops that make them fold into the
attention's match: Hugging Face's Llama attention written out (rotate-half rotary embedding from
``inv_freq``, heads repeated for their group, softmax of the scaled products) against torchtune's
(an interleaved rotary embedding from a cos/sin cache built from ``theta``, ``sdpa``), its q and k
rows permuted per head by the conversion. The bugs are those the trials against torchtune planted;
each was told only as 'introduced here' at the attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import fxdiff
from fxdiff.judge import rotary

HEADS, GROUPS, D, WIDTH, SEQ = 4, 2, 8, 16, 6


def _frequencies(base: float) -> torch.Tensor:
    return base ** -(torch.arange(0, D, 2).float() / D)


class HalfRotated(nn.Module):
    """Hugging Face's Llama attention, written out."""

    def __init__(self, base=10000.0):
        super().__init__()
        self.q, self.o = nn.Linear(WIDTH, HEADS * D, bias=False), nn.Linear(HEADS * D, WIDTH, bias=False)
        self.k, self.v = nn.Linear(WIDTH, GROUPS * D, bias=False), nn.Linear(WIDTH, GROUPS * D, bias=False)
        self.register_buffer("inv_freq", _frequencies(base))

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, HEADS, D).transpose(1, 2)
        k, v = (p(x).view(b, s, GROUPS, D).transpose(1, 2) for p in (self.k, self.v))
        angles = torch.arange(s).float()[:, None] * self.inv_freq[None]
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

        def half(t):
            return torch.cat([-t[..., D // 2:], t[..., :D // 2]], -1)
        q, k = q * cos + half(q) * sin, k * cos + half(k) * sin
        k, v = (t.repeat_interleave(HEADS // GROUPS, dim=1) for t in (k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        return self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1))


class Interleaved(nn.Module):
    """torchtune's: the port. ``rotate``: which of q and k it rotates; ``tile``: its key and value
    heads tiled, not repeated in groups; ``swap``: its key and value swapped in its code; ``half``:
    it rotates the halves of each head, as the reference does, on weights converted for pairs."""

    def __init__(self, base=10000.0, rotate="qk", tile=False, swap=False, half=False):
        super().__init__()
        self.half = half
        self.q, self.o = nn.Linear(WIDTH, HEADS * D, bias=False), nn.Linear(HEADS * D, WIDTH, bias=False)
        self.k, self.v = nn.Linear(WIDTH, GROUPS * D, bias=False), nn.Linear(WIDTH, GROUPS * D, bias=False)
        self.rotate, self.tile, self.swap = rotate, tile, swap
        self.register_buffer("theta", _frequencies(base))
        angles = torch.arange(16).float()[:, None] * self.theta[None]
        self.register_buffer("cache", torch.stack([angles.cos(), angles.sin()], -1))

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, HEADS, D)
        k, v = (p(x).view(b, s, GROUPS, D) for p in (self.k, self.v))
        if self.swap:
            k, v = v, k

        def turned(t):
            c = self.cache[:s].view(1, s, 1, D // 2, 2)
            if self.half:
                cos, sin = torch.cat([c[..., 0], c[..., 0]], -1), torch.cat([c[..., 1], c[..., 1]], -1)
                return t * cos + torch.cat([-t[..., D // 2:], t[..., :D // 2]], -1) * sin
            pairs = t.reshape(*t.shape[:-1], D // 2, 2)
            return torch.stack([pairs[..., 0] * c[..., 0] - pairs[..., 1] * c[..., 1],
                                pairs[..., 1] * c[..., 0] + pairs[..., 0] * c[..., 1]], -1).flatten(3)
        q, k = turned(q) if "q" in self.rotate else q, turned(k) if "k" in self.rotate else k
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.tile:
            k, v = (t.repeat(1, HEADS // GROUPS, 1, 1) for t in (k, v))
        else:
            k, v = (t.unsqueeze(2).expand(b, GROUPS, HEADS // GROUPS, s, D).flatten(1, 2) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


def _port(ref: HalfRotated, permute=True, **kw) -> Interleaved:
    """``ref``'s weights converted as torchtune's ``hf_to_tune`` does: each head's q and k rows from
    the rotate-half order to interleaved pairs (with ``permute``; a conversion that forgets it
    without)."""
    def interleaved(w, heads):
        return w.view(heads, 2, D // 2, WIDTH).transpose(1, 2).reshape(heads * D, WIDTH) if permute else w
    port = Interleaved(**kw)
    port.load_state_dict({"q.weight": interleaved(ref.q.weight.detach(), HEADS),
                          "k.weight": interleaved(ref.k.weight.detach(), GROUPS), "v.weight": ref.v.weight,
                          "o.weight": ref.o.weight, "theta": port.theta, "cache": port.cache})
    return port


def _story(**kw) -> str:
    torch.manual_seed(0)
    ref = HalfRotated()
    captured = fxdiff.capture(ref, (torch.randn(2, SEQ, WIDTH),))
    report = fxdiff.compare(captured, _port(ref, **kw))
    told, = {entry["blame"] for entry in report.first_divergence()["forward"]}   # one story, at each first divergence
    return told


def test_the_converted_port_matches():
    torch.manual_seed(0)
    ref = HalfRotated()
    assert not fxdiff.compare(fxdiff.capture(ref, (torch.randn(2, SEQ, WIDTH),)), _port(ref)).diverged


def test_another_base_is_told_with_each_sides_tables():
    assert _story(base=500000.0) == (
        "the query and key rotated another way: they agree at position 0, which a rotation leaves as it is, and differ "
        "from position 1 on; they rotate with other tables: the reference's inv_freq (base 10000) against the "
        "candidate's cache, theta (base 500000)")


def test_weights_left_in_the_rotate_half_order_are_told_as_other_features_turned():
    assert _story(permute=False) == (
        "the query and key rotated another way: they agree at position 0, which a rotation leaves as it is, and differ "
        "from position 1 on; its frequencies are the reference's (inv_freq pairs with theta): it turns other features "
        "together, or turns them for other positions")


def test_halves_rotated_on_weights_converted_for_pairs_are_told_inside_the_rotation():
    """The first divergence is inside the rotation, whose ops pair one by one: 'a tensor it reads
    pairs with nothing: cache'. The attention they lead to tells it."""
    assert _story(half=True) == (
        "the query and key rotated another way: they agree at position 0, which a rotation leaves as it is, and differ "
        "from position 1 on; its frequencies are the reference's (inv_freq pairs with theta): it turns other features "
        "together, or turns them for other positions")


def test_a_key_left_unrotated_is_told_apart_from_the_query():
    assert _story(rotate="q").startswith(
        "the key rotated another way: it agrees at position 0, which a rotation leaves as it is, and differs from "
        "position 1 on (the query agrees)")


def test_key_and_value_heads_tiled_are_told_as_repeated_another_way():
    assert _story(tile=True) == (
        "the key and value heads of a grouped-query attention repeated another way: the reference repeats each in "
        "turn (2 heads for 4: [0, 0, 1, 1]), the candidate tiles them ([0, 1, 0, 1])")


def test_key_and_value_swapped_before_the_rotation_are_named():
    assert _story(swap=True) == ("the attention's key and value swapped: the candidate passes as the key what the "
                                 "reference passes as the value, and the other way round")


def test_a_base_is_read_off_its_frequencies_and_only_off_frequencies():
    assert rotary.base(_frequencies(500000.0)) == 500000
    assert rotary.base(_frequencies(10000.0)) == 10000
    assert rotary.base(torch.linspace(1, 0.1, 4)) is None
    assert rotary.base(torch.ones(4)) is None


class MergedHeads(nn.Module):
    """fair-esm's attention: heads merged into the batch, (batch x heads, positions, features),
    rotate-half, written out with ``bmm``; ``port``: Hugging Face's ESM, heads apart and ``sdpa``;
    ``rotate``: which of q and k the port rotates."""

    def __init__(self, port=False, rotate="qk"):
        super().__init__()
        self.port, self.rotate = port, rotate
        self.q, self.k, self.v = (nn.Linear(WIDTH, HEADS * D, bias=False) for _ in range(3))
        self.o = nn.Linear(HEADS * D, WIDTH, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        angles = torch.arange(s).float()[:, None] * _frequencies(10000.0)[None]
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

        def turned(t, role="qk"):
            return t * cos + torch.cat([-t[..., D // 2:], t[..., :D // 2]], -1) * sin if role in self.rotate else t
        if self.port:
            q, k, v = (p(x).view(b, s, HEADS, D).transpose(1, 2) for p in (self.q, self.k, self.v))
            out = F.scaled_dot_product_attention(turned(q, "q"), turned(k, "k"), v)
            return self.o(out.transpose(1, 2).reshape(b, s, -1))
        q, k, v = (p(x).view(b, s, HEADS, D).transpose(1, 2).reshape(b * HEADS, s, D) for p in (self.q, self.k, self.v))
        probs = torch.bmm(turned(q) * D ** -0.5, turned(k).transpose(1, 2)).softmax(-1)
        return self.o(torch.bmm(probs, v).view(b, HEADS, s, D).transpose(1, 2).reshape(b, s, -1))


def test_heads_merged_into_the_batch_against_heads_apart_are_compared():
    """fair-esm against Hugging Face's ESM: each side's attention takes its inputs laid out its own
    way, so their values were not compared, and a port's key left unrotated had no story."""
    torch.manual_seed(0)
    ref, x = MergedHeads(), torch.randn(2, SEQ, WIDTH)
    captured = fxdiff.capture(ref, (x,))
    port = MergedHeads(port=True)
    port.load_state_dict(ref.state_dict())
    assert not fxdiff.compare(captured, port).diverged
    port = MergedHeads(port=True, rotate="q")
    port.load_state_dict(ref.state_dict())
    told, = {e["blame"] for e in fxdiff.compare(captured, port).first_divergence()["forward"]}
    assert told == ("the key rotated another way: it agrees at position 0, which a rotation leaves as it is, and "
                    "differs from position 1 on (the query agrees)"), told
