import copy
import math

import pytest
import torch

from moekit.config import CapacityConfig, ConfigError, LossConfig, MoEConfig, RouterConfig
from moekit.layers import blockwise, losses
from moekit.layers.capacity import apply_capacity, expert_capacity
from moekit.layers.dispatch import Dispatcher, LocalDispatcher, PaddedDispatcher
from moekit.layers.experts import MLP, GroupedExperts
from moekit.layers.moe import MoELayer
from moekit.layers.routing import Routing, topk_assignments

from .reference import combine_loop64, softmax_topk_routing64


def make_layer(seed=0, **kw) -> MoELayer:
    torch.manual_seed(seed)
    router = kw.pop("router", RouterConfig(top_k=2))
    cfg = MoEConfig(d_model=kw.pop("d_model", 12), num_experts=kw.pop("num_experts", 5),
                    expert_hidden=kw.pop("expert_hidden", 20), router=router, **kw)
    return MoELayer(cfg)


def routing_from(token, expert, weight, T, E, k=1) -> Routing:
    token, expert = torch.as_tensor(token), torch.as_tensor(expert)
    weight = torch.as_tensor(weight, dtype=torch.float32)
    return Routing(token, expert, weight, torch.zeros_like(token), torch.zeros(T, E), torch.full((T, E), 1.0 / E),
                   T, E, k)


# --------------------------------------------------------------------- dispatchers vs loop reference
def run_dispatch(kind, experts, x_TD, routing, backend):
    """``kind``: "local", "padded", or "composed" (the protocol's default run over LocalDispatcher's own
    dispatch and combine, which LocalDispatcher.run hands to ``experts.gathered`` instead)."""
    experts.backend = backend
    if kind == "composed":
        return Dispatcher.run(LocalDispatcher(), x_TD, routing, experts)
    return (LocalDispatcher() if kind == "local" else PaddedDispatcher()).run(x_TD, routing, experts)


DISPATCH_CASES = [("local", "grouped_mm"), ("local", "loop"), ("local", "auto"), ("local", "blockwise"),
                  ("composed", "grouped_mm"), ("composed", "blockwise"), ("padded", "bmm"), ("padded", "loop"),
                  ("padded", "blockwise")]


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("T,E,K,D,F", [(17, 4, 2, 8, 16), (64, 8, 3, 16, 24), (5, 6, 1, 4, 8)])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_every_dispatcher_equals_loop_reference(seed, T, E, K, D, F, activation):
    g = torch.Generator().manual_seed(seed)
    experts = GroupedExperts(E, D, F, activation)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x_TD = torch.randn(T, D, generator=g)
    logits = torch.randn(T, E, generator=g)
    token_N, expert_N, rank_N = topk_assignments(logits, K)
    weight_N = torch.rand(T * K, generator=g)
    routing = Routing(token_N, expert_N, weight_N, rank_N, logits, logits.softmax(-1), T, E, K)
    dy_TD = torch.randn(T, D, generator=g)

    x_ref = x_TD.clone().requires_grad_(True)
    y_ref = combine_loop64(x_ref, experts, token_N, expert_N, weight_N)
    grads_ref = torch.autograd.grad((y_ref * dy_TD.double()).sum(), [x_ref, *experts.parameters()])

    for kind, backend in DISPATCH_CASES:
        x = x_TD.clone().requires_grad_(True)
        y = run_dispatch(kind, experts, x, routing, backend)
        grads = torch.autograd.grad((y * dy_TD).sum(), [x, *experts.parameters()])
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5, msg=f"{kind}/{backend} output")
        for g_, r_ in zip(grads, grads_ref):
            torch.testing.assert_close(g_.double(), r_.double(), rtol=1e-5, atol=1e-5, msg=f"{kind}/{backend} grad")


@pytest.mark.parametrize("kind,backend", DISPATCH_CASES)
def test_empty_experts_and_all_tokens_on_one_expert(kind, backend):
    torch.manual_seed(0)
    T, E, D, F = 9, 4, 6, 10
    experts = GroupedExperts(E, D, F)
    x = torch.randn(T, D)
    for expert in ([2] * T, [0, 3] * 4 + [0]):  # everything on expert 2; experts 1 and 2 empty
        routing = routing_from(list(range(T)), expert, torch.rand(T), T, E)
        y = run_dispatch(kind, experts, x, routing, backend)
        ref = combine_loop64(x, experts, routing.token_N, routing.expert_N, routing.weight_N)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    # no assignments at all: output is exactly zero
    empty = routing_from([], [], [], T, E)
    empty.token_N, empty.expert_N = empty.token_N.long(), empty.expert_N.long()
    y = run_dispatch("local", experts, x, empty, "loop" if backend == "bmm" else backend)
    assert torch.equal(y, torch.zeros_like(x))


@pytest.fixture(params=["serial", "pooled"])
def block_schedule(request):
    """Both schedules of the blockwise kernel's expert blocks; pooled needs >= 2 torch threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    previous = blockwise.set_block_schedule(request.param)
    yield request.param
    blockwise.set_block_schedule(previous)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu", "silu", "clamped_swiglu", "relu2",
                                        "swiglu_limit10"])
@pytest.mark.parametrize("frozen", ["none", "experts", "x"])
def test_blockwise_gradients_equal_float64_loop_including_gate_weights(activation, frozen, block_schedule):
    """The blockwise path writes its backward by hand: every gradient (x, each weight stack, the gate weights)
    against autograd through the float64 loop, also when only some inputs need gradients; with the expert
    blocks run one after another and on the worker pool."""
    g = torch.Generator().manual_seed(11)
    T, E, K, D, F = 23, 5, 2, 8, 12
    experts = GroupedExperts(E, D, F, activation, backend="blockwise")
    # clamped_swiglu, swiglu_limit10: weights large enough that some pre-activations pass the clamp (7, 10)
    scale = {"clamped_swiglu": 1.0, "swiglu_limit10": 1.3}.get(activation, 0.3)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    x = torch.randn(T, D, generator=g)
    token_N, expert_N, _ = topk_assignments(torch.randn(T, E, generator=g), K)
    weight_N = torch.rand(T * K, generator=g)
    dy = torch.randn(T, D, generator=g)
    experts.requires_grad_(frozen != "experts")
    x.requires_grad_(frozen != "x")
    weight_N.requires_grad_(True)
    inputs = [t for t in (x, weight_N, *experts.parameters()) if t.requires_grad]
    ref = combine_loop64(x, experts, token_N, expert_N, weight_N)
    grads_ref = torch.autograd.grad((ref * dy.double()).sum(), inputs)
    routing = Routing(token_N, expert_N, weight_N, torch.zeros_like(token_N), torch.zeros(T, E), None, T, E, K)
    counts_E, meta = LocalDispatcher().plan(routing)
    y = experts.gathered(x, meta.token_R, meta.weight_R, counts_E)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad((y * dy).sum(), inputs), grads_ref):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference keeps no pre-activations but computes the same
        y_ng = experts.gathered(x, meta.token_R, meta.weight_R, counts_E)
    torch.testing.assert_close(y_ng, y.detach(), rtol=0, atol=0)


def test_pooled_blocks_are_deterministic_and_leave_thread_settings_alone(block_schedule):
    """Whichever worker runs which block, the sums are in row order: two runs are bit-identical. The workers'
    single-thread setting does not leak into the caller or into threads started later."""
    import threading

    g = torch.Generator().manual_seed(5)
    T, E, K, D, F = 257, 16, 4, 24, 40
    experts = GroupedExperts(E, D, F, "swiglu", backend="blockwise")
    x = torch.randn(T, D, generator=g, requires_grad=True)
    token_N, expert_N, _ = topk_assignments(torch.randn(T, E, generator=g), K)
    weight_N = torch.rand(T * K, generator=g, requires_grad=True)
    routing = Routing(token_N, expert_N, weight_N, torch.zeros_like(token_N), torch.zeros(T, E), None, T, E, K)
    dy = torch.randn(T, D, generator=g)
    runs = []
    for _ in range(3):
        counts_E, meta = LocalDispatcher().plan(routing)
        y = experts.gathered(x, meta.token_R, meta.weight_R, counts_E)
        runs.append((y.detach(), *torch.autograd.grad((y * dy).sum(), (x, weight_N, *experts.parameters()))))
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))
    threads = torch.get_num_threads()
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert (threads, seen) == (max(2, threads), [threads])


@pytest.fixture
def fresh_pool():
    """The pooled schedule at >= 2 torch threads, with the next blockwise call starting a new pool; yields a
    function that runs 8 one-block-per-expert blocks through it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    previous = blockwise.set_block_schedule("pooled")
    if blockwise._pool is not None:
        blockwise._pool[1].shutdown(wait=True)
        blockwise._pool = None
    experts = GroupedExperts(8, 8, 16, "swiglu", backend="blockwise")
    x = torch.randn(64, 8)
    counts_E, meta = LocalDispatcher().plan(routing_from(list(range(64)), [t % 8 for t in range(64)],
                                                         torch.rand(64), 64, 8))
    yield lambda: experts.gathered(x, meta.token_R, meta.weight_R, counts_E)
    blockwise.set_block_schedule(previous)
    torch.set_num_threads(threads)


def test_block_workers_each_run_one_intra_op_thread(fresh_pool):
    """A fresh pool's workers run torch ops on one thread each and the caller keeps its count (restoring the
    caller's count once put every worker back on the caller's count: 2 x 2 threads on 2 cores)."""
    threads = torch.get_num_threads()
    fresh_pool()
    workers, pool = blockwise._pool
    assert workers == threads
    assert blockwise._start_workers(pool, workers, torch.get_num_threads) == [1] * workers
    assert torch.get_num_threads() == threads


def test_block_pool_falls_back_to_serial_when_workers_keep_more_threads(fresh_pool, monkeypatch):
    """Where a worker cannot keep its own count (a torch build whose setting is process-wide), the pool is not
    used: a warning, the serial schedule, the caller's thread count kept, the same output."""
    threads = torch.get_num_threads()
    start = blockwise._start_workers
    monkeypatch.setattr(blockwise, "_start_workers", lambda pool, n, task: [2] * n if task is torch.get_num_threads
                        else start(pool, n, task))
    with pytest.warns(UserWarning, match="run serially"):
        y = fresh_pool()
    assert blockwise._pool is None and blockwise.block_schedule() == "serial"
    assert torch.get_num_threads() == threads
    torch.testing.assert_close(y, fresh_pool(), rtol=0, atol=0)


def test_blockwise_expert_dropout_masks_hidden_units_like_nn_dropout():
    """Training with expert dropout: the blockwise path drops hidden units with probability p and scales the
    kept ones by 1/(1-p); outputs and gradients equal the float64 loop with the same mask."""
    torch.manual_seed(3)
    T, E, D, F, p = 16, 3, 6, 10, 0.4
    experts = GroupedExperts(E, D, F, expert_dropout=p, backend="blockwise").train()
    x = torch.randn(T, D, requires_grad=True)
    routing = routing_from(list(range(T)), [t % E for t in range(T)], torch.rand(T), T, E)
    counts_E, meta = LocalDispatcher().plan(routing)
    torch.manual_seed(99)
    y = experts.gathered(x, meta.token_R, meta.weight_R, counts_E)
    torch.manual_seed(99)  # the same draw: one Bernoulli(1-p) per routed row and hidden unit
    keep_RF = torch.empty(T, F).bernoulli_(1 - p).double() / (1 - p)
    assert 0.3 < (keep_RF == 0).double().mean() < 0.5
    ref = torch.zeros(T, D, dtype=torch.float64)
    for r, (t, e) in enumerate(zip(meta.token_R.tolist(), torch.repeat_interleave(torch.arange(E), counts_E).tolist())):
        x_D = x[t].double()
        h = torch.nn.functional.silu(experts.w_gate_EFD[e].double() @ x_D) * (experts.w_up_EFD[e].double() @ x_D)
        ref[t] += meta.weight_R[r].double() * (experts.w_down_EDF[e].double() @ (h * keep_RF[r]))
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    dy = torch.randn(T, D)
    params = [x, *experts.parameters()]
    for got, want in zip(torch.autograd.grad((y * dy).sum(), params), torch.autograd.grad((ref * dy).sum(), params)):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # eval: no dropout, the plain function
        torch.testing.assert_close(experts.eval().gathered(x, meta.token_R, meta.weight_R, counts_E),
                                   combine_loop64(x, experts, routing.token_N, routing.expert_N, routing.weight_N).float())


# --------------------------------------------------------------------- whole layer vs float64 reference
LAYER_CASES = [("local", "auto"), ("local", "blockwise"), ("local", "grouped_mm"), ("local", "loop"),
               ("padded", "auto"), ("padded", "blockwise")]


@pytest.mark.parametrize("dispatcher,experts", LAYER_CASES)
@pytest.mark.parametrize("seed", [0, 7])
def test_layer_equals_float64_mixtral_reference(dispatcher, experts, seed):
    layer = make_layer(seed, dispatcher=dispatcher, experts=experts,
                       router=RouterConfig(top_k=2, renormalize=True)).eval()
    x = torch.randn(3, 7, 12)
    y = layer(x).y
    tok, exp, w = softmax_topk_routing64(x.view(-1, 12), layer.router.gate.weight, 2, renormalize=True)
    ref = combine_loop64(x.view(-1, 12), layer.experts, tok, exp, w).view_as(x)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["grouped_mm", "loop", "blockwise"])
def test_fine_grained_layer_folds_gate_weights_exactly(backend):
    """Experts narrower than d_model get the gate weights on their hidden rows (before the down projection):
    outputs equal the float64 loop reference, and every gradient (router included) equals the padded path,
    which weights the unscaled expert outputs in its combine einsum."""
    layer = make_layer(5, d_model=16, expert_hidden=8, num_experts=6, num_shared_experts=1, experts=backend,
                       router=RouterConfig(top_k=3, renormalize=True)).eval()
    x = torch.randn(2, 9, 16)
    tok, exp, w = softmax_topk_routing64(x.view(-1, 16), layer.router.gate.weight, 3, renormalize=True)
    shared64 = copy.deepcopy(layer.shared).double()
    ref = combine_loop64(x.view(-1, 16), layer.experts, tok, exp, w) + shared64(x.view(-1, 16).double())
    torch.testing.assert_close(layer(x).y.double().view(-1, 16), ref, rtol=1e-5, atol=1e-6)

    grads = []
    for dispatcher in (LocalDispatcher(), PaddedDispatcher()):
        layer.dispatcher = dispatcher
        xi = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        (layer(xi).y * torch.linspace(-1, 1, 16)).sum().backward()
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    for g_fold, g_plain in zip(*grads):
        torch.testing.assert_close(g_fold, g_plain, rtol=1e-5, atol=1e-6)


def test_one_expert_top1_equals_dense_ffn_outputs_and_grads():
    torch.manual_seed(3)
    layer = make_layer(3, num_experts=1, router=RouterConfig(top_k=1), loss=LossConfig(aux_coef=0.0))
    dense = MLP(12, 20, "swiglu")
    with torch.no_grad():
        dense.w_gate.weight.copy_(layer.experts.w_gate_EFD[0])
        dense.w_up.weight.copy_(layer.experts.w_up_EFD[0])
        dense.w_down.weight.copy_(layer.experts.w_down_EDF[0])
    x1 = torch.randn(4, 6, 12, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = layer(x1).y, dense(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(y1)
    (y1 * dy).sum().backward()
    (y2 * dy).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.experts.w_gate_EFD.grad[0], dense.w_gate.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.experts.w_down_EDF.grad[0], dense.w_down.weight.grad, rtol=1e-5, atol=1e-6)


def test_shared_expert_is_added_and_gated():
    layer = make_layer(4, num_shared_experts=2, shared_hidden=8, shared_gate=True).eval()
    x = torch.randn(10, 12)
    routed_only = make_layer(4).eval()
    routed_only.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared")})
    expected = routed_only(x).y + torch.sigmoid(layer.shared_gate(x)) * layer.shared(x)
    torch.testing.assert_close(layer(x).y, expected)
    assert layer.shared.w_up.weight.shape == (16, 12)  # 2 shared experts of width 8 = one MLP of width 16


# --------------------------------------------------------------------- capacity
def test_capacity_formula():
    assert expert_capacity(num_tokens=10, num_experts=4, top_k=1, capacity_factor=1.0) == 3  # ceil(2.5)
    assert expert_capacity(num_tokens=10, num_experts=4, top_k=2, capacity_factor=1.25) == 7  # ceil(6.25)
    assert expert_capacity(num_tokens=2, num_experts=8, top_k=1, capacity_factor=1.0, min_capacity=4) == 4


def test_capacity_drop_counts_hand_computed():
    # 6 tokens, 3 experts, top-1, capacity factor 1 -> C = 2.  Expert choices: 0 0 0 1 0 2
    # by position: expert 0 keeps tokens 0, 1; drops 2 and 4 -> 2 of 6 dropped
    r = routing_from(range(6), [0, 0, 0, 1, 0, 2], [0.9, 0.5, 0.8, 0.7, 0.95, 0.6], 6, 3)
    kept = apply_capacity(r, expert_capacity(6, 3, 1, 1.0), "position", "drop")
    assert kept.token_N.tolist() == [0, 1, 3, 5]
    # by priority (gate weight): expert 0 keeps tokens 4 (0.95) and 0 (0.9)
    kept = apply_capacity(r, 2, "priority", "drop")
    assert sorted(kept.token_N.tolist()) == [0, 3, 4, 5]


def test_capacity_top2_first_choices_before_second_choices():
    # top-2, 4 tokens, 2 experts, capacity 3: all 4 first choices are kept before any second choice
    token = [0, 0, 1, 1, 2, 2, 3, 3]
    expert = [0, 1, 0, 1, 1, 0, 1, 0]
    r = routing_from(token, expert, [0.5] * 8, 4, 2, k=2)
    r.rank_N = torch.tensor([0, 1] * 4)
    kept = apply_capacity(r, 3, "position", "drop")
    firsts = kept.rank_N == 0
    assert int(firsts.sum()) == 4 and kept.num_assignments == 6
    # the two kept second choices are those of the earliest tokens: tokens 0 and 1 for expert 1? expert 1 has
    # first choices of tokens 2, 3 plus seconds of tokens 0, 1 -> only token 0's second fits
    assert sorted(zip(kept.token_N.tolist(), kept.expert_N.tolist())) == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1),
                                                                          (3, 1)]


def test_overflow_reroutes_to_next_best_expert_with_room():
    # 4 tokens all prefer expert 0; capacity 2; second preference differs
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    r = Routing(torch.arange(4), torch.zeros(4, dtype=torch.long), probs[:, 0].clone(), torch.zeros(4, dtype=torch.long),
                probs.log(), probs, 4, 3, 1)
    kept = apply_capacity(r, 2, "position", "reroute")
    assignment = dict(zip(kept.token_N.tolist(), kept.expert_N.tolist()))
    assert assignment == {0: 0, 1: 0, 2: 1, 3: 1}
    weights = dict(zip(kept.token_N.tolist(), kept.weight_N.tolist()))
    assert weights[2] == pytest.approx(0.2) and weights[3] == pytest.approx(0.35)
    # with capacity 1 the third expert fills too: token 1 -> 0; 2 -> 1 (pref 0.2); 3 -> 2 (expert 1 full)
    kept = apply_capacity(r, 1, "position", "reroute")
    assert dict(zip(kept.token_N.tolist(), kept.expert_N.tolist())) == {0: 0, 1: 2, 2: 1}


def test_layer_reports_dropped_fraction_and_dropped_tokens_get_zero():
    layer = make_layer(5, router=RouterConfig(top_k=1), capacity=CapacityConfig(capacity_factor=0.5,
                                                                                eval_capacity_factor=None))
    x = torch.randn(40, 12)
    out = layer.train()(x)
    C = expert_capacity(40, 5, 1, 0.5)
    assert int(out.aux.counts_E.max()) <= C
    assert out.aux.dropped_fraction.item() == pytest.approx(1 - int(out.aux.counts_E.sum()) / 40)
    assert out.aux.dropped_fraction.item() > 0
    zero_rows = (out.y.abs().sum(-1) == 0).sum().item()
    assert zero_rows == 40 - int(out.aux.counts_E.sum())
    out_eval = layer.eval()(x)  # eval factor None = dropless
    assert out_eval.aux.dropped_fraction.item() == 0 and int(out_eval.aux.counts_E.sum()) == 40


# --------------------------------------------------------------------- routers
def test_switch_router_top1_gate_is_softmax_probability():
    layer = make_layer(6, router=RouterConfig(kind="switch", top_k=1)).eval()
    x = torch.randn(20, 12)
    out = layer(x)
    tok, exp, w = softmax_topk_routing64(x, layer.router.gate.weight, 1, renormalize=False)
    ref = combine_loop64(x, layer.experts, tok, exp, w)
    torch.testing.assert_close(out.y.double(), ref, rtol=1e-5, atol=1e-6)


def test_noisy_topk_noise_only_in_training_and_matches_equations():
    layer = make_layer(7, router=RouterConfig(kind="noisy_topk", top_k=2))
    with torch.no_grad():
        layer.router.noise.weight.normal_()
    x = torch.randn(30, 12)
    layer.eval()
    a, b = layer(x).y, layer(x).y
    assert torch.equal(a, b)
    # eval == softmax over the kept clean logits (= renormalised softmax top-k)
    tok, exp, w = softmax_topk_routing64(x, layer.router.gate.weight, 2, renormalize=True)
    torch.testing.assert_close(a.double(), combine_loop64(x, layer.experts, tok, exp, w), rtol=1e-5, atol=1e-6)
    layer.train()
    torch.manual_seed(1)
    r = layer.router(x)
    torch.manual_seed(1)
    clean = x.double() @ layer.router.gate.weight.double().t()
    std = torch.nn.functional.softplus(x.double() @ layer.router.noise.weight.double().t())
    noisy = clean + torch.randn(30, 5).double() * (std + 1e-9)
    top = noisy.topk(2, dim=-1)
    assert torch.equal(r.expert_N.view(30, 2), top.indices)
    torch.testing.assert_close(r.weight_N.view(30, 2).double(), top.values.softmax(-1), rtol=1e-5, atol=1e-6)
    assert not torch.equal(layer(x).y, a)


def test_noisy_topk_load_probability_matches_monte_carlo():
    """P(x, i) (Shazeer appendix A) == frequency of i in the top-k when only i's noise is resampled."""
    layer = make_layer(8, router=RouterConfig(kind="noisy_topk", top_k=2)).train()
    with torch.no_grad():
        layer.router.noise.weight.normal_(0, 0.5)
    x = torch.randn(3, 12)
    torch.manual_seed(0)
    r = layer.router(x)
    p = r.extra["load_prob_TE"].double()
    torch.manual_seed(0)
    clean = (x @ layer.router.gate.weight.t()).double()
    std = torch.nn.functional.softplus(x @ layer.router.noise.weight.t()).double() + 1e-9
    noisy = clean + torch.randn(3, 5).double() * std
    S = 20000
    for t in range(3):
        for i in range(5):
            others = torch.cat([noisy[t, :i], noisy[t, i + 1:]])
            kth = others.topk(2).values[-1]  # i is in the top-2 iff it beats the 2nd best of the others
            fresh = clean[t, i] + torch.randn(S, dtype=torch.float64) * std[t, i]
            assert (fresh > kth).double().mean().item() == pytest.approx(p[t, i].item(), abs=0.015)


def test_gshard_second_expert_kept_with_probability_2g2():
    layer = make_layer(9, num_experts=4, router=RouterConfig(kind="gshard", top_k=2)).train()
    x = torch.randn(4000, 12)
    torch.manual_seed(0)
    r = layer.router(x)
    tok, exp, w = softmax_topk_routing64(x, layer.router.gate.weight, 2, renormalize=True)
    expected_second = torch.clamp(2 * w.view(-1, 2)[:, 1], max=1.0).sum().item()
    kept_second = int((r.rank_N == 1).sum())
    assert int((r.rank_N == 0).sum()) == 4000
    assert abs(kept_second - expected_second) < 4 * math.sqrt(4000 * 0.25)  # within 4 sigma
    assert layer.router.eval()(x).num_assignments == 8000


def test_router_is_float32_under_bf16_autocast():
    layer = make_layer(10)
    x = torch.randn(16, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.bfloat16())
        r = layer.router(x.bfloat16())
    assert out.aux.logits_TE.dtype == torch.float32 and r.weight_N.dtype == torch.float32
    assert r.probs_TE.dtype == torch.float32
    ref = x.bfloat16().float() @ layer.router.gate.weight.t()
    torch.testing.assert_close(r.logits_TE, ref)  # not rounded to bf16


def test_jitter_only_in_training():
    layer = make_layer(11, router=RouterConfig(kind="switch", top_k=1, jitter_eps=0.1))
    x = torch.randn(8, 12)
    layer.eval()
    assert torch.equal(layer.router(x).logits_TE, layer.router(x).logits_TE)
    layer.train()
    assert not torch.equal(layer.router(x).logits_TE, layer.router(x).logits_TE)


# --------------------------------------------------------------------- losses
def test_switch_aux_loss_formula_and_order_invariance():
    torch.manual_seed(0)
    T, E, K = 50, 6, 2
    logits = torch.randn(T, E)
    probs = logits.softmax(-1)
    tok, exp, _ = topk_assignments(probs, K)
    loss = losses.switch_aux_loss(probs, exp, tok)
    f = torch.bincount(exp, minlength=E).double() / (T * K)
    ref = E * (f * probs.double().mean(0)).sum()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    perm = torch.randperm(T)
    tok_p, exp_p, _ = topk_assignments(probs[perm], K)
    assert losses.switch_aux_loss(probs[perm], exp_p, tok_p).item() == pytest.approx(loss.item(), rel=1e-6)
    # balanced -> 1, collapsed -> E
    uniform = torch.full((E, E), 1.0 / E)
    assert losses.switch_aux_loss(uniform, torch.arange(E), torch.arange(E)).item() == pytest.approx(1.0)
    onehot = torch.zeros(T, E)
    onehot[:, 0] = 1
    assert losses.switch_aux_loss(onehot, torch.zeros(T, dtype=torch.long), torch.arange(T)).item() == pytest.approx(E)


def test_losses_invariant_to_padding():
    torch.manual_seed(1)
    T, E = 20, 4
    logits = torch.randn(T, E)
    probs = logits.softmax(-1)
    tok, exp, _ = topk_assignments(probs, 1)
    pad_logits = torch.cat([logits, torch.randn(7, E) * 5])
    pad_probs = pad_logits.softmax(-1)
    ptok, pexp, _ = topk_assignments(pad_probs, 1)
    mask = torch.cat([torch.ones(T), torch.zeros(7)])
    assert losses.switch_aux_loss(pad_probs, pexp, ptok, mask).item() == pytest.approx(
        losses.switch_aux_loss(probs, exp, tok).item(), rel=1e-6)
    assert losses.router_z_loss(pad_logits, mask).item() == pytest.approx(losses.router_z_loss(logits).item(), rel=1e-6)


def test_z_loss_importance_load_and_seq_aux_match_float64_formulas():
    torch.manual_seed(2)
    B, S, E, K = 3, 8, 5, 2
    logits = torch.randn(B * S, E)
    z_ref = (torch.logsumexp(logits.double(), -1) ** 2).mean()
    assert losses.router_z_loss(logits).item() == pytest.approx(z_ref.item(), rel=1e-6)

    gates = torch.rand(B * S, E)
    imp = gates.double().sum(0)
    assert losses.importance_loss(gates).item() == pytest.approx((imp.var(unbiased=False) / imp.mean() ** 2).item(),
                                                                 rel=1e-5)
    assert losses.load_loss(gates).item() == pytest.approx(losses.importance_loss(gates).item(), rel=1e-6)

    scores = torch.sigmoid(logits)
    tok, exp, _ = topk_assignments(scores, K)
    ref = 0.0
    for b in range(B):
        s_norm = scores[b * S:(b + 1) * S].double()
        s_norm = s_norm / s_norm.sum(-1, keepdim=True)
        sel = exp.view(B * S, K)[b * S:(b + 1) * S]
        f = torch.tensor([E / (K * S) * (sel == i).sum().item() for i in range(E)], dtype=torch.float64)
        ref += (f * s_norm.mean(0)).sum().item() / B
    assert losses.seq_aux_loss(scores, exp, tok, S, K).item() == pytest.approx(ref, rel=1e-6)


def test_layer_total_loss_is_weighted_sum_and_differentiable():
    layer = make_layer(12, loss=LossConfig(aux_coef=0.01, z_coef=0.001, importance_coef=0.1, seq_aux_coef=0.02))
    out = layer(torch.randn(2, 9, 12))
    L = out.aux.losses
    expected = 0.01 * L["aux"] + 0.001 * L["z"] + 0.1 * L["importance"] + 0.02 * L["seq_aux"]
    assert out.aux.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    out.aux.loss.backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,match", [
    (dict(router=RouterConfig(top_k=9)), r"top_k=9.*num_experts=5"),
    (dict(capacity=dict(capacity_factor=0.0)), r"CapacityConfig.capacity_factor=0.0"),
    (dict(capacity=dict(capacity_factor=-1.0)), r"capacity_factor=-1.0.*> 0"),
    (dict(activation="tanh"), r"MoEConfig.activation='tanh'"),
    (dict(dispatcher="magic"), r"MoEConfig.dispatcher='magic'.*'local', 'padded'"),
    (dict(experts="magic"), r"MoEConfig.experts='magic'.*'auto', .*'blockwise'"),
    (dict(dispatcher="grouped", experts="loop"), r"MoEConfig.experts='loop'.*old-style dispatcher='grouped'"),
    (dict(router=dict(kind="nope")), r"RouterConfig.kind='nope'"),
    (dict(router=RouterConfig(kind="switch", top_k=2)), r"top_k=2.*switch"),
])
def test_bad_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_layer(**kwargs)


def test_bad_input_errors():
    layer = make_layer(13)
    with pytest.raises(ValueError, match=r"d_model=12.*\(4, 11\)"):
        layer(torch.randn(4, 11))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(4, 12, dtype=torch.long))
    x = torch.randn(4, 12)
    x[1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="router logits contain NaN or Inf"):
        layer(x)


def test_fine_grained_segmentation_keeps_total_and_active_params():
    base = MoEConfig(d_model=8, num_experts=4, expert_hidden=24, router=RouterConfig(top_k=2))
    fine = base.fine_grained(3)
    assert (fine.num_experts, fine.expert_hidden, fine.router.top_k) == (12, 8, 6)
    n = lambda c: sum(p.numel() for p in MoELayer(c).experts.parameters())
    assert n(fine) == n(base)
    assert fine.router.top_k * fine.expert_hidden == base.router.top_k * base.expert_hidden  # active FFN width
    with pytest.raises(ConfigError, match="fine_grained.m=5"):
        base.fine_grained(5)


@pytest.mark.parametrize("dispatcher,experts", [("local", "blockwise"), ("local", "grouped_mm"), ("local", "loop"),
                                                ("padded", "bmm")])
def test_bf16_autocast_backends_agree(dispatcher, experts):
    layer = make_layer(14, d_model=16, expert_hidden=32, dispatcher=dispatcher, experts=experts)
    ref = make_layer(14, d_model=16, expert_hidden=32, experts="loop")
    x = torch.randn(3, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = layer(x).y, ref(x).y
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x).y, rtol=0.05, atol=0.02)  # bf16 vs fp32
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0.02, atol=0.01)


def test_float64_and_zero_token_batches():
    layer = make_layer(15, d_model=16).double()  # auto backend must fall back from grouped_mm for float64
    x = torch.randn(6, 16, dtype=torch.float64)
    tok, exp, w = softmax_topk_routing64(x, layer.router.gate.weight, 2, renormalize=True)
    torch.testing.assert_close(layer.eval()(x).y, combine_loop64(x, layer.experts, tok, exp, w))
    out = layer.train()(torch.randn(0, 16, dtype=torch.float64))
    assert out.y.shape == (0, 16) and torch.isfinite(out.aux.loss) and out.aux.loss.item() == 0.0


def test_auto_backend_is_blockwise_on_cpu_and_grouped_elsewhere():
    """"auto" picks the cache-blocked path on CPU only; on other devices (here: meta, standing in for CUDA)
    it keeps one grouped_mm per projection; explicit choices are kept; padded (uniform) rows use bmm."""
    ex = GroupedExperts(4, 16, 32)
    cpu, meta = torch.empty(8, 16), torch.empty(8, 16, device="meta")
    assert ex.backend_for(cpu) == "blockwise" and ex.backend_for(meta.bfloat16()) == "grouped_mm"
    assert ex.backend_for(meta) == "loop"  # off-CPU grouped_mm kernels want bf16
    assert ex.backend_for(cpu, uniform_rows=True) == "bmm"
    for forced in ("grouped_mm", "loop", "blockwise"):
        ex.backend = forced
        assert ex.backend_for(cpu) == ex.backend_for(meta, uniform_rows=True) == forced


def test_old_style_dispatcher_values_still_load():
    """Configs written when MoEConfig.dispatcher also named the experts kernel load as the same pair."""
    for old, new in [("auto", ("local", "auto")), ("blockwise", ("local", "blockwise")),
                     ("grouped", ("local", "grouped_mm")), ("loop", ("local", "loop")), ("padded", ("padded", "auto"))]:
        cfg = MoEConfig.from_dict({**MoEConfig(d_model=8, expert_hidden=8).to_dict(), "dispatcher": old,
                                   "experts": "auto"})
        assert (cfg.dispatcher, cfg.experts) == new


def test_bmm_backend_refuses_unequal_blocks():
    layer = make_layer(16, experts="bmm")
    with pytest.raises(ValueError, match="'bmm' needs equal-size expert blocks"):
        layer(torch.randn(7, 12))


def test_auto_schedule_pools_only_enough_blocks_that_are_not_small():
    """auto: serial for fewer than two blocks per worker or small blocks (mean rows x d x hidden below
    POOL_MIN_BLOCK_MACS), pooled otherwise; the explicit schedules ignore both."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    previous = blockwise.set_block_schedule("auto")
    try:
        x = torch.empty(0, 64)
        blocks_of = lambda n, rows: [(e, e * rows, (e + 1) * rows) for e in range(n)]  # noqa: E731
        big_rows = blockwise.POOL_MIN_BLOCK_MACS // (64 * 128) + 1
        assert blockwise.block_pool(x, blocks_of(8, big_rows), 128) is not None
        assert blockwise.block_pool(x, blocks_of(8, big_rows - 2), 128) is None  # small blocks
        assert blockwise.block_pool(x, blocks_of(3, big_rows * 4), 128) is None  # 3 blocks on 2 workers
        blockwise.set_block_schedule("pooled")
        assert blockwise.block_pool(x, blocks_of(8, 16), 128) is not None
        blockwise.set_block_schedule("serial")
        assert blockwise.block_pool(x, blocks_of(8, big_rows), 128) is None
    finally:
        blockwise.set_block_schedule(previous)
        torch.set_num_threads(threads)
