"""MoEAux.dropped_fraction: the share of the router's assignments that capacity removed."""
import pytest
import torch

from moekit.config import CapacityConfig, MoEConfig, RouterConfig
from moekit.layers.build import build_moe_layer


@pytest.mark.parametrize("router, capacity, groups", [
    (RouterConfig(top_k=2), CapacityConfig(), 0),
    (RouterConfig(top_k=2), CapacityConfig(capacity_factor=0.5, eval_capacity_factor=0.5), 0),
    (RouterConfig(kind="switch", top_k=1), CapacityConfig(capacity_factor=1.0), 0),
    (RouterConfig(top_k=1), CapacityConfig(capacity_factor=0.5), 2),
])
def test_zero_token_batch_drops_nothing(router, capacity, groups):
    torch.manual_seed(0)
    layer = build_moe_layer(MoEConfig(d_model=8, num_experts=4, expert_hidden=8, router=router, capacity=capacity,
                                      hierarchical_groups=groups))
    for mode in (layer.train(), layer.eval()):
        out = mode(torch.randn(0, 8))
        assert out.y.shape == (0, 8) and float(out.aux.dropped_fraction) == 0.0


def test_dropped_fraction_counts_removed_assignments():
    """All 8 tokens on expert 0 (top-1), capacity C = ceil(8/4 * 1.0) = 2: 6 of 8 assignments dropped."""
    layer = build_moe_layer(MoEConfig(d_model=4, num_experts=4, expert_hidden=8, router=RouterConfig(top_k=1),
                                      capacity=CapacityConfig(capacity_factor=1.0)))
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0] = 1.0
    out = layer.train()(torch.ones(8, 4))
    assert out.aux.counts_E.tolist() == [2, 0, 0, 0]
    assert float(out.aux.dropped_fraction) == pytest.approx(6 / 8)
