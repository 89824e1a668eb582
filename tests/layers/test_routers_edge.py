"""Every router on degenerate inputs (ties, all-equal logits, one expert, T < E, no tokens) against float64
references written from the papers' equations; the bias-update hook; router statistics."""

import math

import pytest
import torch

from moekit.config import ConfigError, LossConfig, ModelConfig, MoEConfig, RouterConfig
from moekit.layers.build import build_moe_layer
from moekit.layers.routing import update_router_biases
from moekit.layers.stats import routing_stats
from moekit.models.decoder import MoETransformer

from .reference import combine_loop64

D = 8


# ------------------------------------------------------------------ float64 references, one per router
# Each returns (sel_TE, entries): sel_TE is the float64 score the router ranks by, entries a list of
# (owner, token, expert, weight) where owner is the token (token choice) or the expert (expert choice).

def topk_by(row, k):
    return sorted(range(len(row)), key=lambda i: -row[i])[:k]


def ref_softmax_topk(lg, k, renormalize=True, **_):
    p = lg.softmax(-1)
    out = []
    for t in range(lg.shape[0]):
        chosen = topk_by(p[t].tolist(), k)
        s = sum(p[t, e].item() for e in chosen) if renormalize else 1.0
        out += [(t, t, e, p[t, e].item() / s) for e in chosen]
    return p, out


def ref_noisy_eval(lg, k, **_):
    # Shazeer 2017 eq. 3-5 without noise: softmax over the kept logits
    out = []
    for t in range(lg.shape[0]):
        chosen = topk_by(lg[t].tolist(), k)
        z = sum(math.exp(lg[t, e].item()) for e in chosen)
        out += [(t, t, e, math.exp(lg[t, e].item()) / z) for e in chosen]
    return lg, out


def ref_expert_choice(lg, k, **_):
    T, E = lg.shape
    p = lg.softmax(-1)
    C = min(T, max(1, math.ceil(T * k / E)))
    out = [(e, t, e, p[t, e].item()) for e in range(E) for t in topk_by(p[:, e].tolist(), C)]
    return p, out


def ref_sinkhorn(lg, k, iters, **_):
    T, E = lg.shape
    P = [[math.exp(v) for v in row] for row in lg.tolist()]
    for _ in range(iters):
        for e in range(E):
            c = sum(P[t][e] for t in range(T))
            for t in range(T):
                P[t][e] *= (T / E) / c
        for t in range(T):
            r = sum(P[t])
            P[t] = [v / r for v in P[t]]
    p = lg.softmax(-1)
    out = []
    for t in range(T):
        chosen = topk_by(P[t], k)
        s = sum(p[t, e].item() for e in chosen)
        out += [(t, t, e, p[t, e].item() / s) for e in chosen]
    return torch.tensor(P, dtype=torch.float64).reshape(T, E), out


def ref_top_p(lg, k, top_p, **_):
    p = lg.softmax(-1)
    out = []
    for t in range(lg.shape[0]):
        kept, mass = [], 0.0
        for e in topk_by(p[t].tolist(), k):
            if mass >= top_p:
                break
            kept.append(e)
            mass += p[t, e].item()
        s = sum(p[t, e].item() for e in kept)
        out += [(t, t, e, p[t, e].item() / s) for e in kept]
    return p, out


def ref_deepseek(lg, k, bias, n_groups, topk_groups, scale, sigmoid, **_):
    T, E = lg.shape
    scores = lg.sigmoid() if sigmoid else lg.softmax(-1)
    sel = scores + bias
    size = E // n_groups
    out = []
    for t in range(T):
        row = sel[t].tolist()
        group_score = [sum(sorted(row[g * size:(g + 1) * size], reverse=True)[:2 if sigmoid else 1])
                       for g in range(n_groups)]
        groups = topk_by(group_score, topk_groups)
        eligible = [e for e in range(E) if e // size in groups]
        chosen = sorted(eligible, key=lambda e: -row[e])[:k]
        s = sum(scores[t, e].item() for e in chosen) if (k > 1 or sigmoid) else 1.0
        out += [(t, t, e, scores[t, e].item() / s * scale) for e in chosen]
    return sel, out


def ref_sparsemixer(lg, k, eps, **_):
    # SparseMixer eval (GRIN / PhiMoE): twice, the best remaining expert, gated by its softmax over the remaining
    # experts within a relative gap (m - s) / max(|s|, m) <= 2 * eps of the best m (a 0/0 gap counts as inside)
    out = []
    for t, row in enumerate(lg.tolist()):
        left = list(range(len(row)))
        for _ in range(2):
            m = max(row[e] for e in left)
            best = min(e for e in left if row[e] == m)
            cand = [e for e in left if row[e] == m or (m - row[e]) / max(abs(row[e]), m) <= 2 * eps]
            out.append((t, t, best, math.exp(row[best]) / sum(math.exp(row[e]) for e in cand)))
            left.remove(best)
    return lg, out


def ref_task(lg, k, task_ids, **_):
    T, E = lg.shape
    member = torch.zeros(T, E, dtype=torch.float64)
    out = []
    for t in range(T):
        for j in range(k):
            e = (int(task_ids[t]) * k + j) % E
            member[t, e] = 1.0
            out.append((t, t, e, 1.0 / k))
    return member, out


def ref_sequence(lg, k, x, gate, seq_len, **_):
    T = x.shape[0]
    p_T = []
    out = []
    for b in range(T // seq_len if seq_len else 0):
        p = torch.softmax(gate @ x[b * seq_len:(b + 1) * seq_len].mean(0), -1)
        chosen = topk_by(p.tolist(), k)
        s = sum(p[e].item() for e in chosen)
        for t in range(b * seq_len, (b + 1) * seq_len):
            p_T.append(p)
            out += [(t, t, e, p[e].item() / s) for e in chosen]
    return (torch.stack(p_T) if p_T else torch.zeros(0, gate.shape[0], dtype=torch.float64)), out


KINDS = {  # kind -> (router kwargs, top_k, reference, training mode)
    "softmax_topk": ({}, 2, ref_softmax_topk, True),
    "switch": ({}, 1, lambda lg, k, **kw: ref_softmax_topk(lg, k, renormalize=False), True),
    "noisy_topk": ({}, 2, ref_noisy_eval, False),  # training adds noise; eval is the paper's clean gate
    "gshard": ({}, 2, ref_softmax_topk, False),  # training drops second experts at random
    "expert_choice": ({}, 2, ref_expert_choice, True),
    "sinkhorn": ({"sinkhorn_iters": 6}, 2, ref_sinkhorn, True),
    "top_p": ({"top_p": 0.6}, 3, ref_top_p, True),
    "deepseek": ({"score_func": "sigmoid", "n_groups": 3, "topk_groups": 2, "routed_scaling_factor": 2.0},
                 2, ref_deepseek, True),
    "deepseek_v2": ({"score_func": "softmax", "n_groups": 3, "topk_groups": 1}, 2, ref_deepseek, True),
    "sparsemixer": ({"sparsemixer_eps": 0.2}, 2, ref_sparsemixer, False),  # training samples the experts
    "task": ({"num_tasks": 4}, 2, ref_task, True),
    "sequence": ({}, 2, ref_sequence, True),
}
CASES = ("random", "all_equal", "ties", "one_expert", "few_tokens", "no_tokens")


def build(kind, case):
    kw, k, ref, training = KINDS[kind]
    kw = dict(kw)
    E, T = 6, 9
    if case == "one_expert":
        E, k = 1, 1
        kw.update({key: 1 for key in ("n_groups", "topk_groups") if key in kw})
    if kind in ("gshard", "sparsemixer") and E == 1:
        pytest.skip(f"{kind} needs two experts")
    T = {"few_tokens": 2, "no_tokens": 0}.get(case, T)
    torch.manual_seed(hash((kind, case)) % 1000)
    router_kind = "deepseek" if kind == "deepseek_v2" else kind
    cfg = MoEConfig(d_model=D, num_experts=E, expert_hidden=12, loss=LossConfig(aux_coef=0.0),
                    router=RouterConfig(kind=router_kind, top_k=k, **kw))
    layer = build_moe_layer(cfg).train(training)
    with torch.no_grad():
        if case == "all_equal":
            layer.router.gate.weight.zero_()
        if case == "ties":  # experts (0, 1) and (2, 3) are clones: exact ties in every token's logits
            layer.router.gate.weight[1] = layer.router.gate.weight[0]
            layer.router.gate.weight[3] = layer.router.gate.weight[2]
        if case == "random" and router_kind == "deepseek":
            layer.router.bias.copy_(torch.randn(E) * 0.1)
    x = torch.randn(1, T, D)
    task_ids = torch.tensor([3])
    return layer, x, task_ids, k, ref


def run_reference(kind, layer, x, task_ids, k, ref):
    c = layer.router.cfg
    x64 = x.reshape(-1, D).double()
    gate = layer.router.gate.weight.double()
    lg = x64 @ gate.t()
    bias = layer.router.bias.double() if hasattr(layer.router, "bias") else None
    return ref(lg, k, x=x64, gate=gate, seq_len=x.shape[1], task_ids=task_ids.repeat_interleave(x.shape[1]),
               iters=c.sinkhorn_iters, top_p=c.top_p, bias=bias, n_groups=c.n_groups,
               topk_groups=c.topk_groups, scale=c.routed_scaling_factor, sigmoid=c.score_func == "sigmoid",
               eps=c.sparsemixer_eps)


def per_owner(entries, sel_TE):
    """owner -> sorted (selection score, weight) pairs: tie-breaking between equal scores cannot change it."""
    groups = {}
    for owner, t, e, w in entries:
        groups.setdefault(owner, []).append((round(sel_TE[t, e].item(), 9), w))
    return {o: sorted(v) for o, v in groups.items()}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_router_matches_float64_reference_on_degenerate_inputs(kind, case):
    layer, x, task_ids, k, ref = build(kind, case)
    T = x.shape[1]
    routing = layer.router(x.reshape(-1, D), seq_len=T, task_ids_T=task_ids.repeat_interleave(T))
    sel_TE, ref_entries = run_reference(kind, layer, x, task_ids, k, ref)
    expert_choice = kind == "expert_choice"
    got_entries = [(e if expert_choice else t, t, e, w) for t, e, w in
                   zip(routing.token_N.tolist(), routing.expert_N.tolist(), routing.weight_N.tolist())]
    pairs = list(zip(routing.token_N.tolist(), routing.expert_N.tolist()))
    assert len(set(pairs)) == len(pairs), "a (token, expert) pair was assigned twice"
    got, want = per_owner(got_entries, sel_TE), per_owner(ref_entries, sel_TE)
    assert got.keys() == want.keys()
    for owner in want:
        assert [s for s, _ in got[owner]] == pytest.approx([s for s, _ in want[owner]], abs=1e-6)
        assert [w for _, w in got[owner]] == pytest.approx([w for _, w in want[owner]], abs=1e-5)
    assert torch.isfinite(routing.weight_N).all()
    # the layer runs exactly these assignments (empty experts, one expert, no tokens included)
    out = layer(x, task_ids=task_ids)
    want_y = combine_loop64(x.reshape(-1, D), layer.experts, routing.token_N, routing.expert_N,
                            routing.weight_N)
    torch.testing.assert_close(out.y.reshape(-1, D).double(), want_y, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(out.aux.loss)


def test_soft_moe_degenerate_inputs():
    cfg = MoEConfig(d_model=D, num_experts=1, expert_hidden=12, router=RouterConfig(kind="soft", top_k=1))
    layer = build_moe_layer(cfg)
    assert layer(torch.randn(2, 0, D)).y.shape == (2, 0, D)
    # one expert, one slot, one token: the slot is the token, the output is the expert's output
    x = torch.randn(1, 1, D)
    torch.testing.assert_close(layer(x).y[0].double(),
                               combine_loop64(x[0], layer.experts, torch.tensor([0]), torch.tensor([0]),
                                              torch.tensor([1.0])), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # all-equal logits: every slot is the mean token, every output the mean of slots
        layer.phi.weight.zero_()
    x = torch.randn(1, 5, D)
    y = layer(x).y[0].double()
    mean_out = combine_loop64(x[0].mean(0, keepdim=True), layer.experts, torch.tensor([0]), torch.tensor([0]),
                              torch.tensor([1.0]))
    torch.testing.assert_close(y, mean_out.expand(5, D), rtol=1e-5, atol=1e-6)


def test_deepseek_top_k_must_fit_in_the_kept_groups():
    with pytest.raises(ConfigError, match="topk_groups"):
        MoEConfig(d_model=D, num_experts=8, expert_hidden=8,
                  router=RouterConfig(kind="deepseek", top_k=3, n_groups=4, topk_groups=1))


# ------------------------------------------------------------------ bias hook
def deepseek_moe(**kw):
    router = RouterConfig(kind="deepseek", top_k=1, score_func="sigmoid", bias_update_rate=0.1)
    return MoEConfig(d_model=16, num_experts=4, expert_hidden=16, loss=LossConfig(aux_coef=0.0), router=router, **kw)


def test_update_router_biases_steps_every_biased_router_including_hierarchical_groups():
    torch.manual_seed(0)
    flat = MoETransformer(ModelConfig(vocab_size=20, d_model=16, n_layers=2, n_heads=2, moe=deepseek_moe()))
    out = flat(torch.randint(0, 20, (2, 6)))
    update_router_biases(flat, out.moe_aux)
    for layer, aux in zip(flat.moe_layers(), out.moe_aux):
        c = aux.counts_E.float()
        torch.testing.assert_close(layer.router.bias, 0.1 * torch.sign(c.mean() - c))
        assert layer.router.bias.grad is None

    hier = build_moe_layer(deepseek_moe(hierarchical_groups=2))
    aux = hier(torch.randn(12, 16)).aux
    update_router_biases(hier, [aux.counts_E])
    for g, c in zip(hier.groups, aux.counts_E.float().chunk(2)):
        torch.testing.assert_close(g.router.bias, 0.1 * torch.sign(c.mean() - c))
    with pytest.raises(ValueError, match="one record per MoE layer"):
        update_router_biases(flat, out.moe_aux[:1])


# ------------------------------------------------------------------ statistics
def test_routing_stats_from_aux():
    torch.manual_seed(1)
    layer = build_moe_layer(MoEConfig(d_model=D, num_experts=4, expert_hidden=8,
                                      router=RouterConfig(top_k=2)))
    x = torch.randn(10, D)
    aux = layer(x).aux
    st = routing_stats(aux)
    c = aux.counts_E.double()
    assert st["load"] == pytest.approx((c / c.sum()).tolist())
    assert st["imbalance"] == pytest.approx((c.max() / c.mean()).item())
    q = c / c.sum()
    assert st["load_entropy"] == pytest.approx(-(q * q.clamp_min(1e-30).log()).sum().item())
    assert st["max_entropy"] == pytest.approx(math.log(4))
    p = (x.double() @ layer.router.gate.weight.double().t()).softmax(-1)
    assert st["router_entropy"] == pytest.approx(-(p * p.log()).sum(-1).mean().item(), rel=1e-5)
    assert st["experts_per_token"] == 2.0 and st["dropped_fraction"] == 0.0
    for kind in ("soft", "expert_choice", "top_p"):  # every layer type yields the same keys
        other = build_moe_layer(MoEConfig(d_model=D, num_experts=4, expert_hidden=8,
                                          router=RouterConfig(kind=kind, top_k=1)))
        assert routing_stats(other(torch.randn(1, 5, D)).aux).keys() == st.keys()
    empty = routing_stats(layer(torch.randn(0, D)).aux)
    assert empty["imbalance"] == 0.0 and empty["router_entropy"] == 0.0
