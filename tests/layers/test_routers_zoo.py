"""Every router of the zoo against a slow float64 reference written from its paper's equations."""

import math

import pytest
import torch

from moekit.config import ConfigError, LossConfig, ModelConfig, MoEConfig, RouterConfig
from moekit.layers.build import build_moe_layer
from moekit.layers.experts import GroupedExperts
from moekit.layers.moe import MoELayer
from moekit.layers.routing import sinkhorn
from moekit.models.decoder import MoETransformer

from .reference import combine_loop64, expert_ffn64


def layer_for(kind, E=6, k=2, seed=0, d=8, **router_kw):
    torch.manual_seed(seed)
    cfg = MoEConfig(d_model=d, num_experts=E, expert_hidden=16,
                    router=RouterConfig(kind=kind, top_k=k, **router_kw),
                    loss=LossConfig(aux_coef=0.0))
    return build_moe_layer(cfg)


def as_set(r):
    return {(t, e): w for t, e, w in zip(r.token_N.tolist(), r.expert_N.tolist(), r.weight_N.tolist())}


def logits64(layer, x):
    return x.double() @ layer.router.gate.weight.double().t()


# ------------------------------------------------------------------ expert choice
@pytest.mark.parametrize("T,E,k", [(20, 4, 2), (3, 6, 1), (7, 7, 3)])
def test_expert_choice_matches_reference(T, E, k):
    layer = layer_for("expert_choice", E=E, k=k)
    x = torch.randn(T, 8)
    r = layer.router(x)
    p = torch.softmax(logits64(layer, x), -1)
    C = min(T, max(1, math.ceil(T * k / E)))
    ref = {}
    for e in range(E):
        for t in sorted(range(T), key=lambda t: -p[t, e].item())[:C]:
            ref[(t, e)] = p[t, e].item()
    got = as_set(r)
    assert got.keys() == ref.keys()
    assert all(abs(got[key] - ref[key]) < 1e-6 for key in ref)
    assert torch.equal(r.counts_E(), torch.full((E,), C))  # perfectly balanced by construction


def test_expert_choice_all_equal_logits():
    layer = layer_for("expert_choice", E=4, k=1)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
    r = layer.router(torch.randn(8, 8))
    assert r.counts_E().tolist() == [2, 2, 2, 2]
    assert torch.allclose(r.weight_N, torch.full_like(r.weight_N, 0.25))


# ------------------------------------------------------------------ sinkhorn
def test_sinkhorn_balances_and_matches_reference():
    g = torch.Generator().manual_seed(1)
    T, E = 24, 4
    logits = torch.randn(T, E, generator=g) + torch.tensor([3.0, 0, 0, 0])  # skewed towards expert 0
    P = logits.double().exp()
    for _ in range(50):
        P = P / P.sum(0, keepdim=True) * (T / E)
        P = P / P.sum(1, keepdim=True)
    ours = sinkhorn(logits, 50)
    torch.testing.assert_close(ours.double(), P, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours.sum(0).double(), torch.full((E,), T / E, dtype=torch.float64), atol=1e-3)


def test_sinkhorn_router_is_more_balanced_than_topk_in_training_and_topk_in_eval():
    layer = layer_for("sinkhorn", E=4, k=1, sinkhorn_iters=30)
    with torch.no_grad():
        layer.router.gate.weight[0] += 1.5  # a router that prefers expert 0
    x = torch.randn(400, 8).abs()
    greedy = torch.bincount(logits64(layer, x).argmax(-1), minlength=4)
    r = layer.router.train()(x)
    assert r.counts_E().max() < greedy.max()
    r_eval = layer.router.eval()(x)
    assert torch.equal(r_eval.counts_E(), greedy)
    assert torch.allclose(r.weight_N, torch.ones_like(r.weight_N))  # k=1 renormalised


# ------------------------------------------------------------------ top-p
@pytest.mark.parametrize("p,k", [(0.5, 4), (0.9, 3), (0.2, 2), (1.0, 6)])
def test_top_p_matches_reference(p, k):
    layer = layer_for("top_p", E=6, k=k, top_p=p)
    x = torch.randn(30, 8) * 2
    r = layer.router(x)
    probs = torch.softmax(logits64(layer, x), -1)
    ref = {}
    for t in range(30):
        order = sorted(range(6), key=lambda e: -probs[t, e].item())
        kept, mass = [], 0.0
        for e in order[:k]:
            if mass >= p:
                break
            kept.append(e)
            mass += probs[t, e].item()
        s = sum(probs[t, e].item() for e in kept)
        ref.update({(t, e): probs[t, e].item() / s for e in kept})
    got = as_set(r)
    assert got.keys() == ref.keys()
    assert all(abs(got[key] - ref[key]) < 1e-5 for key in ref)
    out = layer(x)
    assert out.aux.experts_per_token.item() == pytest.approx(len(ref) / 30)


def test_top_p_degenerate_all_equal_and_single_expert():
    layer = layer_for("top_p", E=4, k=4, top_p=0.5)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
    r = layer.router(torch.randn(5, 8))
    assert r.num_assignments == 10 and torch.allclose(r.weight_N, torch.full((10,), 0.5))
    one = layer_for("top_p", E=1, k=1, top_p=0.9)
    assert one.router(torch.randn(3, 8)).num_assignments == 3


# ------------------------------------------------------------------ DeepSeek
def deepseek_reference(scores, bias, k, n_groups, topk_groups, scale, sigmoid):
    T, E = scores.shape
    out = {}
    for t in range(T):
        sel = [scores[t, e].item() + bias[e].item() for e in range(E)]
        size = E // n_groups
        group_score = []
        for g in range(n_groups):
            members = sorted(sel[g * size:(g + 1) * size], reverse=True)
            group_score.append(sum(members[:2]) if sigmoid else members[0])
        groups = sorted(range(n_groups), key=lambda g: -group_score[g])[:topk_groups]
        eligible = [e for e in range(E) if e // size in groups]
        chosen = sorted(eligible, key=lambda e: -sel[e])[:k]
        s = sum(scores[t, e].item() for e in chosen)
        out.update({(t, e): scores[t, e].item() / s * scale for e in chosen})
    return out


@pytest.mark.parametrize("score_func,n_groups,topk_groups",
                         [("sigmoid", 4, 2), ("sigmoid", 1, 1), ("softmax", 3, 1)])
def test_deepseek_routing_matches_reference(score_func, n_groups, topk_groups):
    E = 12
    layer = layer_for("deepseek", E=E, k=3, score_func=score_func, n_groups=n_groups, topk_groups=topk_groups,
                      routed_scaling_factor=2.5)
    with torch.no_grad():
        layer.router.bias.copy_(torch.randn(E) * 0.1)
    x = torch.randn(25, 8)
    lg = logits64(layer, x)
    scores = lg.sigmoid() if score_func == "sigmoid" else lg.softmax(-1)
    ref = deepseek_reference(scores, layer.router.bias.double(), 3, n_groups, topk_groups, 2.5,
                             score_func == "sigmoid")
    got = as_set(layer.router(x))
    assert got.keys() == ref.keys()
    assert all(abs(got[key] - ref[key]) < 1e-5 for key in ref)


def test_deepseek_bias_update_reduces_imbalance_without_gradients():
    torch.manual_seed(3)
    E = 8
    layer = layer_for("deepseek", E=E, k=2, score_func="sigmoid", bias_update_rate=0.01)
    skew = torch.linspace(-1.0, 1.5, E)  # a fixed preference for the last experts

    def imbalance(r):
        c = r.counts_E().float()
        return (c.max() / c.mean()).item()

    x0 = torch.randn(512, 8)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.randn(E, 8) * 0.1)
        layer.router.gate.weight[:, 0] += skew  # feature 0 shifts every token towards high-skew experts
    x0[:, 0] = 1.0
    start = imbalance(layer.router(x0))
    history = []
    for step in range(200):
        x = torch.randn(512, 8)
        x[:, 0] = 1.0
        r = layer.router(x)
        out = layer(x)
        out.y.sum().backward()  # gradients flow to the gate, never to the bias
        assert layer.router.bias.grad is None and not layer.router.bias.requires_grad
        layer.router.update_bias(r.counts_E())
        history.append(imbalance(r))
    assert start > 1.5
    assert sum(history[-20:]) / 20 < 0.6 * start
    assert sum(history[-20:]) / 20 < sum(history[:20]) / 20


# ------------------------------------------------------------------ task and sequence routing
def test_task_routing_uses_fixed_expert_sets():
    layer = layer_for("task", E=6, k=2, num_tasks=3)
    x = torch.randn(3, 4, 8)
    task_ids = torch.tensor([0, 2, 1])
    r = layer.router(x.view(-1, 8), seq_len=4, task_ids_T=task_ids.repeat_interleave(4))
    for t, e in zip(r.token_N.tolist(), r.expert_N.tolist()):
        assert e in {(task_ids[t // 4].item() * 2 + j) % 6 for j in range(2)}
    y = layer(x, task_ids=task_ids).y
    tok, exp, w = r.token_N, r.expert_N, r.weight_N
    ref = combine_loop64(x.view(-1, 8), layer.experts, tok, exp, w)
    torch.testing.assert_close(y.view(-1, 8).double(), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs task_ids"):
        layer(x)
    with pytest.raises(ValueError, match=r"num_tasks=3"):
        layer(x, task_ids=torch.tensor([0, 5, 1]))


def test_sequence_routing_matches_reference():
    layer = layer_for("sequence", E=5, k=2)
    x = torch.randn(3, 6, 8)
    y = layer(x).y
    ref = torch.zeros(18, 8, dtype=torch.float64)
    for b in range(3):
        p = torch.softmax(layer.router.gate.weight.double() @ x[b].double().mean(0), -1)
        top = sorted(range(5), key=lambda e: -p[e].item())[:2]
        s = sum(p[e].item() for e in top)
        for t in range(6):
            for e in top:
                ref[b * 6 + t] += p[e].item() / s * expert_ffn64(layer.experts, e, x[b, t].double())
    torch.testing.assert_close(y.view(-1, 8).double(), ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ soft MoE
def test_soft_moe_matches_float64_reference():
    torch.manual_seed(4)
    cfg = MoEConfig(d_model=8, num_experts=3, expert_hidden=12, router=RouterConfig(kind="soft", top_k=1,
                                                                                    slots_per_expert=2))
    layer = build_moe_layer(cfg)
    x = torch.randn(2, 5, 8)
    y = layer(x).y
    phi = layer.phi.weight.double()  # [E*p, D]
    for b in range(2):
        X = x[b].double()
        logits = X @ phi.t()  # [m, E*p]
        Dm = torch.softmax(logits, dim=0)
        Cm = torch.softmax(logits, dim=1)
        slots = Dm.t() @ X
        outs = torch.stack([expert_ffn64(layer.experts, s // 2, slots[s]) for s in range(6)])
        torch.testing.assert_close(y[b].double(), Cm @ outs, rtol=1e-5, atol=1e-6)


def test_noncausal_routers_are_refused_by_the_decoder_unless_allowed():
    for kind in ("expert_choice", "sequence", "soft"):
        moe = MoEConfig(d_model=16, num_experts=4, expert_hidden=16, router=RouterConfig(kind=kind, top_k=1))
        with pytest.raises(ConfigError, match="allow_noncausal"):
            MoETransformer(ModelConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2, moe=moe))
        moe.allow_noncausal = True
        model = MoETransformer(ModelConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2, moe=moe))
        assert model(torch.randint(0, 20, (2, 6))).logits.shape == (2, 6, 20)


# ------------------------------------------------------------------ hierarchical and heterogeneous
def test_hierarchical_moe_equals_two_level_reference():
    torch.manual_seed(5)
    cfg = MoEConfig(d_model=8, num_experts=6, expert_hidden=12, hierarchical_groups=2,
                    router=RouterConfig(top_k=2))
    layer = build_moe_layer(cfg).eval()
    x = torch.randn(10, 8)
    y = layer(x).y
    ref = torch.zeros(10, 8, dtype=torch.float64)
    p_top = torch.softmax(x.double() @ layer.router.gate.weight.double().t(), -1)
    for t in range(10):
        groups = sorted(range(2), key=lambda g: -p_top[t, g].item())[:2]
        s = sum(p_top[t, g].item() for g in groups)
        for g in groups:
            inner = layer.groups[g]
            p = torch.softmax(inner.router.gate.weight.double() @ x[t].double(), -1)
            top = sorted(range(3), key=lambda e: -p[e].item())[:2]
            si = sum(p[e].item() for e in top)
            for e in top:
                w = p_top[t, g].item() / s * p[e].item() / si
                ref[t] += w * expert_ffn64(inner.experts, e, x[t].double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    out = layer.train()(x)
    assert out.aux.counts_E.numel() == 6 and "aux_top" in out.aux.losses


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_heterogeneous_experts_each_behave_like_their_own_size(bias, activation):
    """Experts of different widths: the masked stacks (loop, grouped_mm: units beyond an expert's size zeroed)
    and blockwise (each expert's own units) against a float64 FFN of each expert's own size, outputs and
    every gradient (the reference never touches the units beyond an expert's size, so their gradients must
    be exactly 0 too)."""
    torch.manual_seed(6)
    sizes = (4, 16, 8)
    ex = GroupedExperts(3, 8, max(sizes), activation, hidden_sizes=sizes, bias=bias)
    x = torch.randn(9, 8)
    w_R = torch.rand(9)
    counts = torch.tensor([3, 4, 2])
    dy = torch.randn(9, 8)
    params_ = list(ex.parameters())
    expert_R = torch.repeat_interleave(torch.arange(3), counts).tolist()

    def ffn64(e, x_D):
        h, act = sizes[e], {"swiglu": torch.nn.functional.silu, "relu": torch.nn.functional.relu}[activation]

        def proj(w, b, v, rows):
            out = w[e, rows].double() @ v if rows is not None else w[e, :, :h].double() @ v
            return out if b is None else out + (b[e, rows] if rows is not None else b[e]).double()

        up = proj(ex.w_up_EFD, ex.b_up_EF, x_D, slice(0, h))
        hid = act(proj(ex.w_gate_EFD, ex.b_gate_EF, x_D, slice(0, h))) * up if ex.gated else act(up)
        return proj(ex.w_down_EDF, ex.b_down_ED, hid, None)

    x64 = x.double().requires_grad_(True)
    ref = torch.stack([w_R[r].double() * ffn64(e, x64[r]) for r, e in enumerate(expert_R)])
    want = torch.autograd.grad((ref * dy.double()).sum(), [x64, *params_])
    for backend in ("loop", "grouped_mm", "blockwise"):
        ex.backend = backend
        xi = x.clone().requires_grad_(True)
        y = ex(xi, counts, scale_R=w_R)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6, msg=backend)
        got = torch.autograd.grad((y * dy).sum(), [xi, *params_])
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-6, msg=backend)
    layer = MoELayer(MoEConfig(d_model=8, num_experts=3, expert_hidden_sizes=sizes,
                               router=RouterConfig(top_k=1)))
    assert layer(torch.randn(5, 8)).y.shape == (5, 8)


# ------------------------------------------------------------------ mask, task_ids, seq_len in every layer type
def test_soft_moe_padding_takes_no_slot_share_and_gets_zero():
    """A padded sequence gives its real tokens exactly the output of the unpadded sequence (float64 formula),
    padding rows are 0; an all-padding sequence stays finite; task_ids are refused."""
    torch.manual_seed(7)
    cfg = MoEConfig(d_model=8, num_experts=3, expert_hidden=12, router=RouterConfig(kind="soft", top_k=1,
                                                                                    slots_per_expert=2))
    layer = build_moe_layer(cfg)
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    y = layer(x, mask=mask).y
    X = x[0, :4].double()
    logits = X @ layer.phi.weight.double().t()
    slots = torch.softmax(logits, dim=0).t() @ X
    outs = torch.stack([expert_ffn64(layer.experts, s // 2, slots[s]) for s in range(6)])
    torch.testing.assert_close(y[0, :4].double(), torch.softmax(logits, dim=1) @ outs, rtol=1e-5, atol=1e-6)
    assert torch.equal(y[0, 4:], torch.zeros(2, 8)) and torch.equal(y[1], torch.zeros(6, 8))
    with pytest.raises(ValueError, match="task_ids"):
        layer(x, task_ids=torch.tensor([0, 1]))


def hierarchical(seed=8, **kw):
    torch.manual_seed(seed)
    router = kw.pop("router", RouterConfig(top_k=2))
    return build_moe_layer(MoEConfig(d_model=8, num_experts=6, expert_hidden=12, hierarchical_groups=2,
                                     router=router, **kw)).eval()


def test_hierarchical_mask_removes_padding_from_every_loss():
    layer = hierarchical(loss=LossConfig(aux_coef=0.01, z_coef=0.001, importance_coef=0.1))
    x = torch.randn(1, 7, 8)
    padded = torch.cat([x, torch.randn(1, 3, 8) * 5], dim=1)
    mask = torch.tensor([[1] * 7 + [0] * 3])
    out, ref = layer(padded, mask=mask), layer(x)
    torch.testing.assert_close(out.y[:, :7], ref.y)
    torch.testing.assert_close(out.aux.loss, ref.aux.loss)
    assert out.aux.losses.keys() == ref.aux.losses.keys() >= {"aux_top", "z_top", "importance_top", "aux"}
    for k in ref.aux.losses:
        torch.testing.assert_close(out.aux.losses[k], ref.aux.losses[k], msg=k)


def test_hierarchical_groups_route_by_task_ids():
    """Task routing inside the groups: every token's inner experts come from its own task id."""
    layer = hierarchical(router=RouterConfig(kind="task", top_k=1, num_tasks=3))
    x = torch.randn(3, 4, 8)
    task_ids = torch.tensor([0, 2, 1])
    y = layer(x, task_ids=task_ids).y.view(-1, 8)
    p_top = torch.softmax(x.view(-1, 8).double() @ layer.router.gate.weight.double().t(), -1)
    ref = torch.zeros(12, 8, dtype=torch.float64)
    for t in range(12):
        e = task_ids[t // 4].item() % 3  # task t -> expert t mod (E/G) inside every group (k = 1)
        g = int(p_top[t].argmax())  # top level: softmax top-min(k=1, G), renormalised: weight 1
        ref[t] = expert_ffn64(layer.groups[g].experts, e, x.view(-1, 8)[t].double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)


def test_hierarchical_top_router_is_any_registered_router():
    """A sequence-level top router (it needs seq_len): each sequence's tokens all go to its mean's best
    group, weight 1; a switch top router picks one group per token with its softmax probability."""
    layer = hierarchical(top_router=RouterConfig(kind="sequence", top_k=1), router=RouterConfig(top_k=1),
                         allow_noncausal=True)
    x = torch.randn(3, 5, 8)
    y = layer(x).y
    for b in range(3):
        g = int(torch.argmax(layer.router.gate.weight.double() @ x[b].double().mean(0)))
        inner = layer.groups[g]
        for t in range(5):
            e = int(torch.argmax(inner.router.gate.weight.double() @ x[b, t].double()))
            torch.testing.assert_close(y[b, t].double(), expert_ffn64(inner.experts, e, x[b, t].double()),
                                       rtol=1e-5, atol=1e-6)
    switch = hierarchical(top_router=RouterConfig(kind="switch", top_k=1), router=RouterConfig(top_k=1))
    xt = torch.randn(6, 8)
    p_top = torch.softmax(xt.double() @ switch.router.gate.weight.double().t(), -1)
    for t in range(6):
        g = int(p_top[t].argmax())
        inner = switch.groups[g]
        e = int(torch.argmax(inner.router.gate.weight.double() @ xt[t].double()))
        want = p_top[t, g] * expert_ffn64(inner.experts, e, xt[t].double())
        torch.testing.assert_close(switch(xt).y[t].double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match=r"RouterConfig.top_k=2: must be 1 for kind='switch'"):
        hierarchical(top_router=RouterConfig(kind="switch", top_k=2))


# ------------------------------------------------------------------ SparseMixer (PhiMoE)
def sparsemixer_logits(dtype, seed=0, eps=0.1):
    """Random rows plus the rows a threshold router can get wrong: exact ties for the best and the second
    best, candidates at a relative gap of exactly 2*eps and just either side, negative rows, all-zero rows
    (a 0/0 gap) and one dominant expert."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(40, 6, generator=g, dtype=torch.float64) * 0.5]
    ties = torch.randn(6, 6, generator=g, dtype=torch.float64)
    ties[:, 1] = ties[:, 0] = ties.max(-1).values + 0.1
    ties[:, 3] = ties[:, 2]
    rows.append(ties)
    edge = 1.0 - 2 * eps
    rows.append(torch.tensor([[1.0, edge, edge + 1e-6, edge - 1e-6, -1.0, 0.5],
                              [edge, 1.0, -0.3, edge, edge - 1e-6, 1.0 - 1e-7],
                              [-0.5, -0.6, -0.55, -2.0, -0.51, -0.7],
                              [0.0] * 6,
                              [5.0, 0.0, 0.0, 0.0, 0.0, -0.0]], dtype=torch.float64))
    return torch.cat(rows).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [False, True])
def test_sparsemixer_matches_transformers_phimoe_routing(training, dtype):
    """moekit's SparseMixer against transformers' own PhiMoE ``sparsemixer`` on the same logits and seed:
    the same experts, gate values, logit gradients (the Heun straight-through estimate in training) and the
    same random numbers consumed."""
    phimoe = pytest.importorskip("transformers.models.phimoe.modeling_phimoe")
    from moekit.layers.routing import sparsemixer_top2

    for seed in range(4):
        logits = sparsemixer_logits(dtype, seed)
        ours, theirs = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        torch.manual_seed(seed)
        want_w, want_e = phimoe.sparsemixer(theirs, jitter_eps=0.1, training=training)
        rng_after = torch.get_rng_state()
        torch.manual_seed(seed)
        got_e, got_w = sparsemixer_top2(ours, 0.1, training)
        assert torch.equal(torch.get_rng_state(), rng_after)
        assert torch.equal(got_e, want_e)
        torch.testing.assert_close(got_w, want_w, rtol=0, atol=0)
        dy = torch.randn(want_w.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        (want_w * dy).sum().backward()
        (got_w * dy).sum().backward()
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=1e-6 if dtype == torch.float32 else 1e-12)
        assert ours.grad.abs().max() > 0
        if training:  # on these logits the sampling picks non-argmax experts and the Heun scale is used
            assert not torch.equal(got_e[:, 0], logits.argmax(-1))
            ratios = set()
            for t, row in enumerate(logits.double().tolist()):
                m = max(row)
                cand = [e for e, v in enumerate(row) if v == m or (m - v) / max(abs(v), m) <= 0.2]
                p = math.exp(row[got_e[t, 0]]) / sum(math.exp(row[e]) for e in cand)
                ratios.add(round(got_w[t, 0].item() / p, 4))
            assert ratios == {1.0, 0.3333}


def test_sparsemixer_in_a_plain_moe_layer_and_the_calculator():
    """``RouterConfig(kind="sparsemixer")``: top-2 only (one-line errors otherwise); in training the layer runs
    exactly the sampled assignments and the gate gets the straight-through gradient; the calculator counts
    a decoder using it to the parameter."""
    from moekit.analysis import params

    with pytest.raises(ConfigError, match=r"RouterConfig.top_k=1: must be 2 .*kind='sparsemixer'"):
        MoEConfig(d_model=8, num_experts=4, expert_hidden=8, router=RouterConfig(kind="sparsemixer", top_k=1))
    with pytest.raises(ConfigError, match=r"RouterConfig.top_k=2: must be 2 \(and num_experts >= 2\)"):
        MoEConfig(d_model=8, num_experts=1, expert_hidden=8, router=RouterConfig(kind="sparsemixer"))
    with pytest.raises(ConfigError, match="sparsemixer_eps"):
        RouterConfig(kind="sparsemixer", sparsemixer_eps=-0.1)
    layer = layer_for("sparsemixer", E=5, k=2, sparsemixer_eps=0.3).train()
    x = torch.randn(24, 8)
    torch.manual_seed(3)
    r = layer.router(x)
    torch.manual_seed(3)
    y = layer(x).y
    assert r.num_assignments == 48 and (r.expert_N.view(24, 2)[:, 0] != r.expert_N.view(24, 2)[:, 1]).all()
    ref = combine_loop64(x, layer.experts, r.token_N, r.expert_N, r.weight_N.detach())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    assert torch.isfinite(layer.router.gate.weight.grad).all() and layer.router.gate.weight.grad.abs().max() > 0

    moe = MoEConfig(d_model=16, num_experts=4, expert_hidden=8, router=RouterConfig(kind="sparsemixer"))
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, moe=moe)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    counts = params.count_params(params.spec_from_moekit(cfg))
    assert (counts.total, counts.active) == (model.num_params(), model.num_active_params())
