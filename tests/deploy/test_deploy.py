"""Deploy transforms on small stacks of MoE layers: prune, merge, offload, int8, save/load."""

import copy

import pytest
import torch
from torch import nn

from moekit.config import MoEConfig, RouterConfig
from moekit.deploy import moe_layers, tensor_bytes
from moekit.deploy.merge import group_experts, merge_layer, merge_model
from moekit.deploy.offload import cache_stats, offload_experts, resident_bytes
from moekit.deploy.prune import measure_loads, prune_layer, prune_model, select_experts
from moekit.deploy.quantize import Int8Experts, dequantize, quantize_experts, quantize_per_channel
from moekit.layers.moe import MoELayer

from ..layers.reference import combine_loop64, softmax_topk_routing64

D, F_, E = 16, 32, 6


class Stack(nn.Module):
    """Two MoE layers with residuals: enough structure for model-level transforms."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"moe": MoELayer(cfg)}) for _ in range(2)])

    def forward(self, x):
        for b in self.blocks:
            x = x + b["moe"](x).y
        return x


def make(seed=0, k=2, activation="swiglu", kind="softmax_topk", renormalize=True):
    torch.manual_seed(seed)
    cfg = MoEConfig(d_model=D, num_experts=E, expert_hidden=F_, activation=activation,
                    router=RouterConfig(kind=kind, top_k=k, renormalize=renormalize))
    return Stack(cfg).eval()


def block_experts(model, banned):
    """Make experts ``banned`` unreachable on inputs whose feature 0 is 1 (a large negative router logit)."""
    with torch.no_grad():
        for layer in moe_layers(model).values():
            w = layer.router.gate.weight
            w[banned] = 0.0
            w[banned, 0] = -60.0


def inputs(seed=1, B=3, S=9):
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed))
    x[..., 0] = 1.0
    return x


# ------------------------------------------------------------------------------------ pruning
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_pruning_unused_experts_leaves_outputs_unchanged(seed, activation):
    model = make(seed, activation=activation)
    block_experts(model, [1, 4])
    x = inputs(seed)
    loads = measure_loads(model, [x])
    for counts_E in loads.values():
        assert counts_E[[1, 4]].sum() == 0 and counts_E.sum() == x.shape[0] * x.shape[1] * 2
    y = model(x)
    pruned, kept = prune_model(copy.deepcopy(model), loads, min_share=1e-9)
    assert all(k == [0, 2, 3, 5] for k in kept.values())
    for layer in moe_layers(pruned).values():
        assert layer.cfg.num_experts == 4 and layer.experts.w_up_EFD.shape[0] == 4
        assert layer.router.gate.weight.shape == (4, D)
    # same experts, same renormalised weights (the softmax denominator cancels): equal up to rounding
    torch.testing.assert_close(pruned(x), y, atol=1e-6, rtol=1e-6)
    assert tensor_bytes(pruned) < tensor_bytes(model)


def test_pruned_layer_matches_float64_routing_over_survivors():
    """After pruning, the layer routes with softmax over the kept router rows (the renormalised
    distribution) and top-k among them: checked against the float64 token loop."""
    model = make(3)
    layer = moe_layers(model)["blocks.0.moe"]
    keep = [0, 2, 5]
    pruned = prune_layer(layer, keep)
    x_TD = torch.randn(20, D)
    tok, ex, w = softmax_topk_routing64(x_TD, layer.router.gate.weight[keep], 2, True)
    ref = combine_loop64(x_TD, pruned.experts, tok, ex, w)
    torch.testing.assert_close(pruned(x_TD).y.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pruned.experts.w_down_EDF, layer.experts.w_down_EDF[keep], atol=0, rtol=0)


def test_select_experts():
    counts = torch.tensor([5.0, 0.0, 30.0, 10.0, 55.0])
    assert select_experts(counts, keep=2) == [2, 4]
    assert select_experts(counts, min_share=0.1) == [2, 3, 4]
    assert select_experts(torch.zeros(3), min_share=0.5) == [0]
    with pytest.raises(ValueError, match="keep="):
        select_experts(counts, keep=9)
    with pytest.raises(ValueError, match="exactly one"):
        select_experts(counts)


# ------------------------------------------------------------------------------------ merging
@pytest.mark.parametrize("kind,k", [("softmax_topk", 2), ("softmax_topk", 3), ("switch", 1)])
def test_merging_identical_experts_is_exact(kind, k):
    model = make(2, k=k, kind=kind)
    groups = [[0, 3], [1], [2, 4, 5]]
    with torch.no_grad():
        for layer in moe_layers(model).values():
            for w in (layer.experts.w_gate_EFD, layer.experts.w_up_EFD, layer.experts.w_down_EDF):
                w[3] = w[0]
                w[4] = w[5] = w[2]
    x = inputs(4)
    y = model(x)
    loads = measure_loads(model, [x])
    merged = copy.deepcopy(model)
    for name, layer in moe_layers(model).items():
        merged.set_submodule(name, merge_layer(layer, groups, loads[name], router="map"))
    for layer in moe_layers(merged).values():
        assert layer.experts.w_up_EFD.shape[0] == 3
    torch.testing.assert_close(merged(x), y, atol=2e-6, rtol=1e-6)
    # group loads are the members' loads: routing is preserved (a token hitting two members of a group
    # is one assignment, so compare the token-level gate mass instead of counts)
    x_TD = x.reshape(-1, D)
    for name, layer in moe_layers(model).items():
        r = layer.router(x_TD)
        mr = moe_layers(merged)[name].router(x_TD)
        gates_TG = torch.stack([r.gates_TE()[:, g].sum(-1) for g in groups], dim=1)
        torch.testing.assert_close(mr.gates_TE(), gates_TG)
        torch.testing.assert_close(mr.probs_TE.sum(-1), torch.ones(x_TD.shape[0]))


def test_frequency_weighted_average_and_average_router():
    model = make(5)
    layer = moe_layers(model)["blocks.0.moe"]
    counts = torch.tensor([3.0, 1.0, 0.0, 2.0, 0.0, 4.0])
    groups = [[0, 1], [2, 4], [3, 5]]
    for router in ("map", "average"):
        m = merge_layer(layer, groups, counts, router=router)
        w = layer.experts.w_up_EFD.double()
        ref = torch.stack([(3 * w[0] + w[1]) / 4, (w[2] + w[4]) / 2, (2 * w[3] + 4 * w[5]) / 6])
        torch.testing.assert_close(m.experts.w_up_EFD.double(), ref, atol=1e-6, rtol=1e-6)
    g = layer.router.gate.weight.double()
    torch.testing.assert_close(m.router.gate.weight.double(), torch.stack(
        [(3 * g[0] + g[1]) / 4, (g[2] + g[4]) / 2, (2 * g[3] + 4 * g[5]) / 6]), atol=1e-6, rtol=1e-6)


def test_grouping_strategies():
    sim = torch.eye(4, dtype=torch.float64)
    sim[0, 2] = sim[2, 0] = 0.9
    sim[1, 3] = sim[3, 1] = 0.8
    counts = torch.tensor([10.0, 1.0, 2.0, 7.0])
    assert group_experts(2, counts_E=counts, sim_EE=sim, strategy="similarity") == [[0, 2], [1, 3]]
    assert group_experts(2, counts_E=counts, sim_EE=sim, strategy="frequency") == [[0, 2], [1, 3]]
    assert group_experts(3, counts_E=counts, sim_EE=sim, strategy="frequency") == [[0], [1, 3], [2]]
    model = make(6)
    x = inputs(2)
    merged, groups = merge_model(copy.deepcopy(model), measure_loads(model, [x]), 3)
    assert all(sorted(e for g in gs for e in g) == list(range(E)) for gs in groups.values())
    assert merged(x).shape == x.shape


# ------------------------------------------------------------------------------------ offloading
@pytest.mark.parametrize("source", ["disk", "cpu"])
@pytest.mark.parametrize("cache_size", [1, 3, E])
def test_offloaded_model_gives_identical_logits(tmp_path, source, cache_size):
    model = make(7)
    xs = [inputs(s) for s in range(3)]
    ys = [model(x) for x in xs]
    off = offload_experts(copy.deepcopy(model), cache_size, source=source, path=str(tmp_path / "experts.safetensors"))
    for layer in moe_layers(off).values():
        assert len(list(layer.experts.parameters())) == 0
    for x, y in zip(xs, ys):
        assert torch.equal(off(x), y)
    stats = cache_stats(off)
    assert stats.hits + stats.misses == sum(
        int((c > 0).sum()) for x in xs for c in _per_layer_counts(model, x))
    if cache_size == E:  # everything fits: only the first use of each expert misses
        assert stats.misses <= 2 * E and stats.hits > 0
    for layer in moe_layers(off).values():
        assert len(layer.experts.cache) <= cache_size
    assert resident_bytes(off) < tensor_bytes(model) or cache_size == E


def _per_layer_counts(model, x):
    return [c for c in measure_loads(model, [x]).values()]


# ------------------------------------------------------------------------------------ int8
def test_int8_elementwise_bound_and_output_error():
    torch.manual_seed(0)
    w = torch.randn(4, 24, 40) * torch.logspace(-3, 1, 24)[None, :, None]  # channels of very different scale
    w[1, 3] = 0.0
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8 and s.shape == (4, 24) and q.abs().max() <= 127
    err = (w.double() - q.double() * s.double()[..., None]).abs()
    assert (err <= s.double()[..., None] / 2 + 1e-12).all()
    assert torch.equal(dequantize(q, s)[1, 3], torch.zeros(40))

    model = make(8)
    x = inputs(3)
    y = model(x)
    qm = quantize_experts(copy.deepcopy(model))
    for name, layer in moe_layers(qm).items():
        assert isinstance(layer.experts, Int8Experts) and not list(layer.experts.parameters())
        # the int8 layer computes exactly the float64 function of the dequantised weights
        x_TD = torch.randn(15, D)
        r = layer.router(x_TD)
        ref = combine_loop64(x_TD, layer.experts, r.token_N, r.expert_N, r.weight_N)
        torch.testing.assert_close(layer(x_TD).y.double(), ref, atol=1e-5, rtol=1e-5)
        # and differs from the float layer by the propagated weight error: each weight moves by at most
        # s/2 <= max|w_row| / 254, so the output moves by a small relative amount
        orig = moe_layers(model)[name]
        rel = (layer(x_TD).y - orig(x_TD).y).norm() / orig(x_TD).y.norm()
        assert rel < 1 / 50
    assert (qm(x) - y).norm() / y.norm() < 1 / 50
    int8_bytes = sum(b.numel() * b.element_size() for n, b in qm.named_buffers() if ".q_" in n)
    float_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    assert int8_bytes * 4 == float_bytes


# ------------------------------------------------------------------------------------ save / load
def test_save_load_roundtrip_of_transformed_models(tmp_path):
    from moekit.deploy.extract import extract_task
    from moekit.train.checkpoint import load_model, save_model

    model = make(9)
    block_experts(model, [2])
    x = inputs(5)
    loads = measure_loads(model, [x])
    variants = {
        "extract": extract_task(copy.deepcopy(model), [x], min_share=0.01)[0],
        "merge_map": merge_model(copy.deepcopy(model), loads, 3, router="map")[0],
        "merge_avg_int8": quantize_experts(merge_model(copy.deepcopy(model), loads, 4, router="average")[0]),
    }
    assert [len(v) for v in extract_task(copy.deepcopy(model), [x], min_share=0.01)[1].values()] == [5, 5]

    def build(cfg):
        return Stack(MoEConfig.from_dict(cfg)).eval()

    for name, m in variants.items():
        save_model(tmp_path / name, m, config=model.blocks[0]["moe"].cfg.to_dict())
        loaded = load_model(tmp_path / name, build=build)
        assert torch.equal(loaded(x), m(x)), name
    assert (tmp_path / "merge_avg_int8" / "model.safetensors").stat().st_size < (
        tmp_path / "merge_map" / "model.safetensors").stat().st_size
