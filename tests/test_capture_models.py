"""The eager recorder on real models: graphs, values and gradients checked against autograd and eager.

What "a gradient for every node with a path to the loss" means here: take, for every recorded value,
the autograd edge of the tensor *as it was produced* (``get_gradient_edge`` at production; for the
output of a custom ``autograd.Function``, which gets its edge only when ``apply`` returns, when the
loss is computed, provided the tensor was not changed in place since). The node has a path to the
loss exactly when ``torch.autograd.grad(loss, edge, allow_unused=True)`` is not None. Such a node
must have ``capture.grads[node]`` equal to that gradient, and no other node may have a gradient.
Finite differences in float64 then check the meaning of the gradients on sampled nodes.
"""

from __future__ import annotations

import random

import numpy
import functools

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.autograd.graph import get_gradient_edge

import fxdiff
from fxdiff import tree
from fxdiff.model.capture import GRAD, NO_GRAD, TARGET
from fxdiff.ops import op_key
from fxdiff.record import Recorder, RunConfig, objective, record
from fxdiff.record.eager import record_eager
from tiny_models import MODELS, build

HOOKED = [name for name in MODELS if name != "mlp"]



class Probe(Recorder):
    """A recorder that also keeps, for each value, its tensor, its version and its autograd edge."""

    last: "Probe"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept: dict[str, tuple[torch.Tensor, int, object, bool]] = {}
        Probe.last = self

    def hold(self, node, t, copy=None):
        super().hold(node, t, copy)
        self.kept[node.name] = (t, t._version, get_gradient_edge(t) if t.requires_grad else None, t._base is None)


def record_with(recorder, model, args, kwargs, loss):
    """A capture made by the eager tracer with another ``Recorder`` class."""
    return record(model, args, kwargs, RunConfig(loss=loss),
                  tracers={"eager": functools.partial(record_eager, recorder=recorder)})


def ground_truth(model, args, kwargs, loss):
    """Capture with ``Probe``; return (capture, {node: true gradient or None}, {node: not a view})."""
    truth: dict[str, torch.Tensor | None] = {}
    plain: dict[str, bool] = {}

    def probing_loss(outputs):
        value = objective(RunConfig(loss=loss), outputs)
        probe = Probe.last
        if not probe.kept:   # called again on detached outputs, for the output gradients
            return value
        edges = {}
        for name, (t, version, edge, not_view) in probe.kept.items():
            if edge is None and t.requires_grad and t._version == version:
                edge = get_gradient_edge(t)  # a custom Function's output: its edge exists only now
            if edge is not None:
                edges[name] = edge
            elif not t.requires_grad and t._version == version:
                truth[name] = None
            plain[name] = not_view
        grads = torch.autograd.grad(value, list(edges.values()), allow_unused=True, retain_graph=True)
        truth.update(zip(edges, grads))
        probe.kept.clear()  # so the recorder's end-of-run sharing check sees only its own references
        return value

    cap = record_with(Probe, model, args, kwargs, probing_loss)
    return cap, truth, plain


class Perturb(Recorder):
    """A recorder that adds ``eps * direction`` to one node's value right after it is produced."""

    target: str
    delta: torch.Tensor

    def hold(self, node, t, copy=None):
        if node.name == Perturb.target:
            t.data.add_(Perturb.delta)  # .data: the run's autograd version counters stay untouched
        super().hold(node, t, copy)


def finite_difference(model, args, kwargs, loss, node: str, direction: torch.Tensor, eps: float) -> float:
    values = []
    for sign in (1, -1):
        Perturb.target, Perturb.delta = node, sign * eps * direction
        values.append(record_with(Perturb, model, args, kwargs, loss).meta["loss_value"])
    return (values[0] - values[1]) / (2 * eps)


@pytest.mark.parametrize("name", HOOKED)
def test_every_node_with_a_path_to_the_loss_has_its_autograd_gradient(name):
    model, args, kwargs, loss = build(name, torch.float64)
    cap, truth, plain = ground_truth(model, args, kwargs, loss)
    reached = {n for n, g in truth.items() if g is not None}
    assert len(truth) >= 0.9 * len(cap.values), "the ground truth must cover nearly every node"
    assert len(reached) >= 0.5 * len(cap.values)
    for n in reached:
        assert n in cap.grads, f"{name}: node {n} has a path to the loss but no recorded gradient"
        assert torch.equal(cap.grads[n], truth[n]), f"{name}: gradient of {n} differs from autograd"
    unreached = set(truth) - reached
    assert not unreached & set(cap.grads), f"{name}: gradients on nodes with no path to the loss"
    for node in cap.graph.nodes:
        if node.name in cap.values:
            assert node.meta[GRAD] == ("recorded" if node.name in cap.grads else "none")


@pytest.mark.parametrize("name", [n for n in HOOKED if n != "custom_function"])
def test_node_gradients_match_finite_differences(name):
    model, args, kwargs, loss = build(name, torch.float64)
    cap = fxdiff.capture(model, args, kwargs, loss=loss)
    _, _, plain = ground_truth(model, args, kwargs, loss)
    order = [n.name for n in cap.graph.nodes]
    eligible = [n for n in order if n in cap.grads and plain.get(n) and cap.values[n].is_floating_point()
                and cap.grads[n].abs().max() > 0]
    picks = eligible[len(eligible) // 12:: max(1, len(eligible) // 6)][:6]
    assert len(picks) >= min(4, len(eligible)) and len(eligible) >= 4
    gen = torch.Generator().manual_seed(3)
    for n in picks:
        direction = torch.randn(cap.values[n].shape, generator=gen, dtype=torch.float64)
        direction /= direction.norm()
        expected = float((cap.grads[n].double() * direction).sum())
        fd = finite_difference(model, args, kwargs, loss, n, direction, eps=1e-6)
        assert fd == pytest.approx(expected, rel=1e-5, abs=1e-9), f"{name}: node {n}"


def eager_param_grads(model, args, kwargs, loss, mode="eval"):
    """Parameter gradients of a plain eager run, with fxdiff's seed and objective."""
    model.train(mode == "train")
    fxdiff.record.session.seed_everything(0)
    model.zero_grad(set_to_none=True)
    out = model(*tree.map_tensors(args, torch.clone), **tree.map_tensors(kwargs, torch.clone))
    objective(RunConfig(loss=loss), out).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("name", list(MODELS))
def test_parameter_gradients_equal_eager_exactly(name):
    model, args, kwargs, loss = build(name)
    cap = fxdiff.capture(model, args, kwargs, loss=loss)
    eager = eager_param_grads(model, args, kwargs, loss)
    assert cap.param_grads.keys() == eager.keys() and eager
    for n, g in eager.items():
        assert torch.equal(cap.param_grads[n], g), f"{name}: gradient of {n}"


def test_custom_function_backward_is_what_eager_uses_not_the_derivative():
    model, args, _, _ = build("custom_function", torch.float64)
    cap = fxdiff.capture(model, args)
    x = args[0]

    def replayed(weight):  # the forward ops alone, as a graph replay would differentiate them
        h = torch.nn.functional.linear(x, weight, model.inner.bias)
        return float(objective(RunConfig(), model.outer(torch.tanh(h * h * h))).detach())

    direction = torch.randn(model.inner.weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    eps = 1e-6
    weight = model.inner.weight.detach()
    true = (replayed(weight + eps * direction) - replayed(weight - eps * direction)) / (2 * eps)
    recorded = float((cap.param_grads["inner.weight"] * direction).sum())
    assert abs(recorded - true) > 1e-2 * abs(true), "the custom backward must show in the recorded gradients"


def test_a_custom_functions_output_made_with_autograd_off_keeps_its_gradient_and_loads(tmp_path):
    """BLOOM's GELU is an ``autograd.Function`` whose forward's ops run with autograd off; its last
    op's output is what ``apply`` returns, then requiring grad. The node was marked as reached by no
    gradient and held one, so the saved capture was refused on load as inconsistent."""
    import warnings
    from transformers import BloomConfig, BloomModel
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = BloomModel(BloomConfig(n_layer=1, n_head=2, hidden_size=16, vocab_size=50)).eval()
    cap = fxdiff.capture(model, (), {"input_ids": torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(1))})
    gelu = [n for n in cap.graph.nodes if n.meta.get("fxdiff_module", "").endswith("mlp.gelu_impl")]
    assert gelu and gelu[-1].name in cap.grads and NO_GRAD not in gelu[-1].meta
    assert all(NO_GRAD in n.meta for n in gelu[:-1])   # the forward's own ops: no gradient reaches them
    loaded = fxdiff.load(fxdiff.save(cap, tmp_path / "bloom.fxd"))
    assert torch.equal(loaded.grads[gelu[-1].name], cap.grads[gelu[-1].name])


# -- in-place ops ---------------------------------------------------------------------------------

class InPlace(nn.Module):
    """masked_fill_, item assignment, and an in-place multiply through a view of a later-used tensor."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.fill = nn.Parameter(torch.full((4,), 0.5))

    def forward(self, x, mask):
        y = self.lin(x)
        y.masked_fill_(mask, 0.0)
        z = y * 2
        z[1] = self.fill
        z.view(-1)[:3].mul_(10)
        return z.sum(-1) * y.mean()


def nodes_of(cap, key: str, in_place: bool = False):
    """Op nodes whose canonical op key is ``key`` (``in_place``: only ``Tensor.<op>_`` calls), in order."""
    return [n for n in cap.nodes("call_function") if op_key(n.meta[TARGET]) == key
            and n.meta[TARGET].endswith(f"{key}_") == in_place]


def test_in_place_ops_record_values_as_produced():
    torch.manual_seed(0)
    model = InPlace().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    mask = torch.rand(3, 4) > 0.5
    cap, truth, _ = ground_truth(model, (x, mask), {}, None)
    linear = x @ model.lin.weight.T + model.lin.bias
    masked = linear.masked_fill(mask, 0.0)
    z = masked * 2
    assigned = z.clone()
    assigned[1] = model.fill
    final = assigned.clone()
    final.view(-1)[:3] *= 10
    (linear_node,), (masked_node,), (setitem_node,) = (nodes_of(cap, k, k == "masked_fill")
                                                        for k in ("linear", "masked_fill", "setitem"))
    z_node, (write_node,) = nodes_of(cap, "mul")[0], nodes_of(cap, "mul", in_place=True)
    for node, value in ((linear_node, linear), (masked_node, masked), (z_node, z), (setitem_node, assigned),
                        (write_node, final.view(-1)[:3])):
        assert torch.equal(cap.values[node.name], value.detach()), node.name
    # z changed through a view of it: its next use reads a `mutated` node fed by the write
    mutated, = nodes_of(cap, "mutated")
    assert mutated.args == (setitem_node, write_node)
    assert torch.equal(cap.values[mutated.name], final.detach())
    for node in (linear_node, masked_node, z_node, mutated):
        assert torch.equal(cap.grads[node.name], truth[node.name]), node.name
    assert torch.equal(x, cap.inputs["args"][0])


class ScalesQuery(nn.Module):
    """fairseq's attention (fair-esm): a linear on a (T, B, E) input, whose output is a view of a
    matrix product, scaled in place; with ``in_place=False``, out of place (Hugging Face's ESM)."""

    def __init__(self, in_place=True):
        super().__init__()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
        self.in_place = in_place

    def forward(self, x):
        q = self.q(x)
        if self.in_place:
            q *= 0.25
        else:
            q = q * 0.25
        scores = torch.bmm(q.transpose(0, 1), self.k(x).permute(1, 2, 0))
        return scores.softmax(-1).sum((0, 1))


def test_a_view_written_in_place_keeps_the_gradient_of_the_value_it_held():
    """A view's gradient hook never fires once the view is written to in place: the gradient of the
    linear before the scale was missing, and a correct port that scales out of place was DIVERGED
    ('gradient on cand only')."""
    torch.manual_seed(0)
    model, x = ScalesQuery().double(), torch.randn(5, 2, 8, dtype=torch.float64)
    port = ScalesQuery(in_place=False).double()
    port.load_state_dict(model.state_dict())
    cap = fxdiff.capture(model, (x,))
    _, truth, _ = ground_truth(port, (x,), {}, None)   # the same gradient, from autograd's own graph
    q = nodes_of(cap, "linear")[0]
    assert cap.values[q.name].shape == (5, 2, 8)
    assert torch.allclose(cap.grads[q.name], truth[q.name], rtol=1e-12, atol=0)
    assert fxdiff.compare(cap, port).verdict == "match"


def test_inputs_changed_in_place_by_the_model_are_recorded_as_given():
    class Scale(nn.Module):
        def forward(self, x):
            x.mul_(3)
            return x.sum(0)

    x = torch.arange(6.0).reshape(2, 3)
    cap = fxdiff.capture(Scale(), (x,))
    assert torch.equal(cap.inputs["args"][0], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(cap.values["args_0"], torch.arange(6.0).reshape(2, 3))
    write, = nodes_of(cap, "mul", in_place=True)
    assert torch.equal(cap.values[write.name], 3 * torch.arange(6.0).reshape(2, 3))
    assert torch.equal(x, torch.arange(6.0).reshape(2, 3)), "the caller's tensor must not change"


class Keeper(nn.Module):
    """Uses a view of its weight, and keeps a tensor of the run that its next call zeroes in place."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))
        self.kept = None

    def forward(self, x):
        if self.kept is not None:
            with torch.no_grad():
                self.kept.zero_()
        h = x @ self.weight.t()
        self.kept = h
        return h.tanh()


def test_values_stay_fixed_when_the_model_later_changes_what_it_shares_with_them():
    torch.manual_seed(0)
    model, x = Keeper(), torch.randn(3, 4)
    cap = fxdiff.capture(model, (x,))
    before = {n: v.clone() for n, v in cap.values.items()}
    kept = model.kept
    with torch.no_grad():
        model.weight.mul_(-1)
    model(x)
    assert torch.equal(kept, torch.zeros(3, 4)), "the model zeroed the tensor it kept from the captured run"
    assert all(torch.equal(cap.values[n], v) for n, v in before.items())
    matmul, = nodes_of(cap, "matmul")
    assert torch.equal(cap.values[matmul.name], x @ model.weight.detach().t() * -1)


# -- the model is left as found -------------------------------------------------------------------

class Stateful(nn.Module):
    """BatchNorm, dropout, a buffer made on first use, numpy/random/torch RNG use in forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.norm = nn.BatchNorm1d(5)
        self.drop = nn.Dropout(0.5)
        self.register_buffer("scale", torch.ones(5))

    def forward(self, x):
        if not hasattr(self, "cache"):
            self.register_buffer("cache", torch.ones(5) * 2, persistent=False)
        self.scale = self.scale * 1.5  # a buffer replaced by a new tensor
        noise = torch.as_tensor(numpy.random.rand(5)) * random.random() + torch.rand(5)
        return self.drop(self.norm(self.lin(x))) * self.scale * self.cache + noise.to(x.dtype) * 0


@pytest.mark.parametrize("stream", [False, True])
def test_capture_leaves_model_state_rng_and_grads_as_found(tmp_path, stream):
    """Streamed, the parameters' copies are kept in a file, not in memory: put back all the same."""
    torch.manual_seed(0)
    model = Stateful()
    model.train()
    model.drop.eval()
    x = torch.randn(8, 5)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = dict(model.named_buffers())
    grads = {n: p.grad for n, p in model.named_parameters()}
    flags = {n: m.training for n, m in model.named_modules()}
    torch.manual_seed(123)
    numpy.random.seed(123)
    random.seed(123)
    rng = (torch.get_rng_state(), numpy.random.get_state()[1].copy(), random.getstate())
    for mode in ("train", "eval"):
        cap = fxdiff.capture(model, (x,), mode=mode, stream_to=tmp_path / mode if stream else None)
        assert cap.meta["mode"] == mode
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert dict(model.named_buffers()).keys() == buffers.keys()
    assert all(model.get_buffer(k) is v for k, v in buffers.items())
    assert all(p.grad is grads[n] and bool((p.grad == 7).all()) for n, p in model.named_parameters())
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert numpy.array_equal(numpy.random.get_state()[1], rng[1])
    assert random.getstate() == rng[2]
    assert model.norm.num_batches_tracked.item() == 0


@pytest.mark.parametrize("name", ["bert", "wav2vec2"])
def test_train_mode_disables_dropout_and_is_deterministic(name):
    """Wav2Vec2 draws its SpecAugment masks from numpy's RNG in train mode: seeded, so repeatable."""
    model, args, kwargs, _ = build(name)
    first = fxdiff.capture(model, args, kwargs, mode="train")
    second = fxdiff.capture(model, args, kwargs, mode="train")
    assert first.values.keys() == second.values.keys()
    assert all(torch.equal(v, second.values[n]) for n, v in first.values.items())
    assert all(torch.equal(g, second.grads[n]) for n, g in first.grads.items())
    for m in model.modules():  # an eager train-mode run with every dropout at p=0 is the reference
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "dropout", None), float):  # attention dropout kept as a float
            m.dropout = 0.0
    eager = eager_param_grads(model, args, kwargs, None, mode="train")
    assert eager.keys() == first.param_grads.keys()
    assert all(torch.equal(first.param_grads[n], g) for n, g in eager.items())
    with_dropout = fxdiff.capture(build(name)[0], args, kwargs, mode="train", keep_dropout=True)
    assert not torch.equal(with_dropout.outputs["last_hidden_state"], first.outputs["last_hidden_state"])


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_in_train_mode(reentrant):
    """Checkpointed layers run their forward again in backward, outside the recorder, with dropout on:
    with dropout switched off in the recorded forward, those gradients would not be its own."""
    model, args, kwargs, _ = build("gpt2")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    with pytest.raises(fxdiff.api.FxdiffError, match="activation checkpointing") as refused:
        fxdiff.capture(model, args, kwargs, mode="train")
    assert refused.value.option == "keep_dropout"
    fxdiff.capture(model, args, kwargs, mode="train", keep_dropout=True)   # attention dropout as it will run again
    plain = build("gpt2")[0]
    for m in (model, plain):   # the plain model's attention dropout is written out (replayable): none here
        for block in m.transformer.h:
            block.attn.attn_dropout.p = 0.0
    kept = fxdiff.capture(model, args, kwargs, mode="train", keep_dropout=True)   # the same draws twice
    plain = fxdiff.capture(plain, args, kwargs, mode="train", keep_dropout=True)
    assert torch.equal(kept.outputs["logits"], plain.outputs["logits"])
    assert all(torch.equal(g, kept.param_grads[n]) for n, g in plain.param_grads.items())
    # a reentrant checkpoint runs its first forward under no_grad: no gradients there, none compared
    assert any(n.meta.get(NO_GRAD) for n in kept.graph.nodes) == reentrant
    assert fxdiff.compare(plain, kept).verdict == fxdiff.compare(kept, plain).verdict == "match"
    with pytest.raises(fxdiff.api.FxdiffError, match="rng_replay=False"):   # the reference's draws replayed
        fxdiff.compare(plain, model)


class ShiftedDraws(nn.Module):
    """``model`` after one unrelated random draw: a port that consumes the generator differently."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        torch.rand(3)
        return self.model(*args, **kwargs)


def test_attention_dropout_is_replayed_like_any_dropout():
    """``scaled_dot_product_attention`` draws its dropout inside the kernel: recorded written out, its
    dropout an ``F.dropout``, so a port that draws in another order takes the reference's masks."""
    model, args, kwargs, _ = build("bert")
    assert model.config._attn_implementation == "sdpa" and model.config.attention_probs_dropout_prob > 0
    ref = fxdiff.capture(model, args, kwargs, mode="train", keep_dropout=True)
    # per layer the attention weights', attention output's and feed-forward's; the embeddings'
    assert sum(1 for n in ref.graph.nodes if str(n.meta.get(TARGET)).endswith("dropout")) == 2 * 3 + 1
    report = fxdiff.compare(ref, ShiftedDraws(model))
    assert not report.diverged and len(report.replayed) == 7


def test_a_module_compared_in_another_dtype_is_given_back_as_it_was():
    model, args, kwargs, _ = build("bert")
    ref = fxdiff.capture(model, args, kwargs)
    before = {n: (p, p.detach().clone()) for n, p in [*model.named_parameters(), *model.named_buffers()]}
    assert fxdiff.compare(ref, model, dtype="bfloat16").verdict == "within noise"
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(now[n] is p and p.dtype == v.dtype and torch.equal(p, v) for n, (p, v) in before.items())
    assert fxdiff.compare(ref, model).verdict == "match"


def test_torchscript_submodule_runs_unseen_and_is_put_back():
    """TorchScript runs its ops itself, out of the recorder's sight: its output enters the graph as a
    constant, its parameters' gradients are still captured, and the model is left as found."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.GELU()), nn.Linear(4, 2))
    scripted = nn.Sequential(torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.GELU())), nn.Linear(4, 2))
    scripted.load_state_dict(eager.state_dict())
    before = {k: v.clone() for k, v in scripted.state_dict().items()}
    x = torch.randn(3, 4)
    cap = fxdiff.capture(scripted, (x,))
    assert torch.equal(cap.outputs, scripted(x))
    assert set(cap.param_grads) == {"0.0.weight", "0.0.bias", "1.weight", "1.bias"}
    assert all(torch.equal(v, scripted.state_dict()[k]) for k, v in before.items())
    assert not fxdiff.compare(cap, eager).diverged


def test_outputs_keep_their_structure_as_plain_containers():
    model, args, kwargs, loss = build("conformer")
    cap = fxdiff.capture(model, args, kwargs, loss=loss)
    assert set(cap.outputs) == {"log_probs", "encoded", "encoded_lengths"}  # a dataclass, as a dict
    assert not any(t.requires_grad for _, t in tree.flatten(cap.outputs))
    model, args, kwargs, _ = build("gpt2")
    cached = fxdiff.capture(model, args, {**kwargs, "use_cache": True})  # a ModelOutput holding a Cache
    assert isinstance(cached.outputs["logits"], torch.Tensor) and isinstance(cached.outputs["cache"], str)
    logits, = cached.output_nodes()
    assert logits.name in cached.grads


class Clobber(torch.autograd.Function):
    """Identity whose backward overwrites its saved input and the incoming gradient in place."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        result = grad * 1
        x.detach().zero_()
        grad.mul_(0)
        return result


class ClobberModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        h = self.lin(x)
        return Clobber.apply(h) * 2


@pytest.mark.parametrize("stream", [False, True])
def test_writes_the_recorder_cannot_foresee_still_leave_values_and_gradients_as_produced(tmp_path, stream):
    """Streamed, too: the stream's copier may copy a tensor after such a write."""
    torch.manual_seed(0)
    model, x = ClobberModel(), torch.randn(2, 3)
    cap = fxdiff.capture(model, (x,), loss=lambda out: out.sum(), stream_to=tmp_path / "c" if stream else None)
    linear, = nodes_of(cap, "linear")
    assert torch.equal(cap.values[linear.name], model.lin(x).detach())
    clone, = nodes_of(cap, "clone")  # the Function's output, whose gradient backward zeroed in place
    assert torch.equal(cap.grads[clone.name], torch.full((2, 3), 2.0))


def test_values_and_gradients_are_held_without_copies():
    """A view and the tensor it views share memory in the capture, as in the run: no value was copied."""
    model, args, kwargs, loss = build("conformer")
    cap = fxdiff.capture(model, args, kwargs, loss=loss)
    storages = {}
    for table in (cap.values, cap.grads):
        for t in table.values():
            storages.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    shared = [ts for ts in storages.values() if len(ts) > 1]
    assert len(shared) > 20
    transpose = next(n for n in cap.nodes("call_function") if op_key(n.meta[TARGET]) == "transpose"
                     and n.args[0].name in cap.values)
    assert cap.values[transpose.name].untyped_storage().data_ptr() == \
        cap.values[transpose.args[0].name].untyped_storage().data_ptr()


def test_tensor_inside_a_slice_is_an_input_of_the_op():
    class Crop(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, n):
            return self.lin(x[:, :n]).sum(1)

    torch.manual_seed(0)
    x, n = torch.randn(2, 5, 4), torch.tensor(3)
    cap = fxdiff.capture(Crop(), (x, n))
    crop, = nodes_of(cap, "getitem")
    assert cap.node("args_1") in crop.all_input_nodes
    assert torch.equal(cap.values[crop.name], x[:, :3])


class Codebook(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("embed", torch.randn(16, 4))

    def encode(self, x):
        return (x @ self.embed.t()).argmax(-1)

    def decode(self, codes):
        return F.embedding(codes, self.embed)


class Quantized(nn.Module):
    """Codebooks called through methods other than ``forward`` (EnCodec's residual quantizer)."""

    def __init__(self):
        super().__init__()
        self.proj, self.books = nn.Linear(4, 4), nn.ModuleList(Codebook() for _ in range(2))

    def forward(self, x):
        x = self.proj(x)
        out = torch.zeros_like(x)
        for book in self.books:
            out = out + book.decode(book.encode(x - out))
        return out


def test_ops_reading_a_module_whose_forward_never_ran_are_its_own():
    """No module hook runs for ``encode``: every op of the quantizer was the root's."""
    cap = fxdiff.capture(Quantized(), (torch.randn(3, 4),))
    modules = {n.name: n.meta["fxdiff_module"] for n in cap.nodes("call_function")}
    for key, count in (("matmul", 2), ("embedding", 2)):
        nodes = nodes_of(cap, key)
        assert [modules[n.name] for n in nodes] == [f"books.{i}" for i in range(count)], key
    assert modules[nodes_of(cap, "linear")[0].name] == "proj"
    assert {modules[n.name] for n in nodes_of(cap, "sub")} == {""}   # the caller's own ops stay its own
