import math
from collections import Counter

import pytest
import torch
from torch import nn

from moekit.analysis import routing_stats as rs
from moekit.config import MoEConfig, RouterConfig
from moekit.layers.moe import MoELayer


class TwoLayerMoE(nn.Module):
    def __init__(self):
        super().__init__()
        cfg = MoEConfig(d_model=8, num_experts=4, expert_hidden=16, router=RouterConfig(top_k=2))
        self.l0, self.l1 = MoELayer(cfg), MoELayer(cfg)

    def forward(self, x):
        return self.l1(x + self.l0(x).y).y


def test_recorder_captures_every_router_and_counts_match_layer_aux():
    torch.manual_seed(0)
    model = TwoLayerMoE().eval()
    xs = [torch.randn(2, 5, 8), torch.randn(3, 4, 8)]
    with rs.RoutingRecorder(model) as rec:
        for x in xs:
            model(x)
    assert set(rec.layers) == {"l0.router", "l1.router"}
    r0 = rec.layers["l0.router"]
    assert r0.num_tokens == 10 + 12
    token_N, expert_N, _, probs = r0.cat()
    expected = sum(model.l0(x).aux.counts_E for x in xs)
    assert rs.load_E(expert_N, 4).tolist() == expected.tolist()
    assert int(token_N.max()) == 21  # token indices are global across batches
    # hooks are removed on exit
    assert not model.l0.router._forward_hooks


def test_recorder_refuses_models_without_routers():
    with pytest.raises(ValueError, match="no MoE routers"):
        rs.RoutingRecorder(nn.Linear(2, 2)).__enter__()


def test_stats_against_hand_computed_values():
    counts = torch.tensor([6, 2, 0, 4])
    assert rs.imbalance(counts) == pytest.approx(6 / 3)
    p = [6 / 12, 2 / 12, 4 / 12]
    assert rs.load_entropy(counts) == pytest.approx(-sum(q * math.log(q) for q in p))
    assert math.copysign(1.0, rs.load_entropy(torch.tensor([0, 5, 0]))) == 1.0  # 0.000, not -0.000
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25] * 4])
    assert rs.router_entropy(probs) == pytest.approx((math.log(2) + math.log(4)) / 2)


def test_coactivation_and_top_tokens_vs_loops():
    g = torch.Generator().manual_seed(1)
    T, E, K = 30, 5, 2
    expert_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    token_N = torch.arange(T).repeat_interleave(K)
    expert_N = expert_TK.reshape(-1)
    C = rs.coactivation_EE(token_N, expert_N, T, E)
    for i in range(E):
        for j in range(E):
            ref = sum(1 for t in range(T) if i in expert_TK[t].tolist() and j in expert_TK[t].tolist())
            assert C[i, j].item() == ref
    ids = torch.randint(0, 7, (T,), generator=g)
    top = rs.top_tokens_per_expert(ids, token_N, expert_N, E, n=3)
    for e in range(E):
        cnt = Counter(ids[t].item() for t in range(T) if e in expert_TK[t].tolist())
        assert [c for _, c in top[e]] == sorted(cnt.values(), reverse=True)[:3]
        assert all(cnt[i] == c for i, c in top[e])


def test_dropped_fraction_sweep_monotone_and_exact():
    torch.manual_seed(2)
    model = TwoLayerMoE().eval()
    with rs.RoutingRecorder(model) as rec:
        model(torch.randn(4, 16, 8))
    routings = rec.layers["l0.router"].routings
    sweep = rs.dropped_fraction_sweep(routings, [0.25, 0.5, 1.0, 100.0])
    assert sweep[100.0] == 0.0
    vals = [sweep[f] for f in (0.25, 0.5, 1.0)]
    assert vals == sorted(vals, reverse=True) and vals[0] > 0
    # factor 0.25: capacity ceil(64*2/4*0.25) = 8 per expert -> at most 32 of 128 assignments kept
    counts = rs.load_E(routings[0].expert_N, 4)
    kept = counts.clamp(max=8).sum().item()
    assert sweep[0.25] == pytest.approx(1 - kept / 128)
