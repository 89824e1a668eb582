"""Property test: the MoE layer equals the float64 loop reference, outputs and gradients, over random
configurations (experts 1..64, top-k 1..E, T including 0 and 1, every dispatcher and experts backend,
capacity on and off, biases, activations, a shared expert with its sigmoid gate)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.config import CapacityConfig, LossConfig, MoEConfig, RouterConfig
from moekit.layers.capacity import capacity_filter
from moekit.layers.moe import MoELayer

from .reference import combine_loop64, mlp64

PAIRS = [("local", b) for b in ("auto", "blockwise", "grouped_mm", "loop")] + \
        [("padded", b) for b in ("auto", "bmm", "blockwise", "grouped_mm", "loop")]


@st.composite
def configs(draw):
    E = draw(st.integers(1, 64))
    return dict(
        E=E, k=draw(st.integers(1, E)), T=draw(st.sampled_from([0, 1]) | st.integers(2, 24)),
        pair=draw(st.sampled_from(PAIRS)), factor=draw(st.none() | st.floats(0.25, 2.0)),
        F=draw(st.sampled_from([4, 12])), activation=draw(st.sampled_from(["swiglu", "gelu"])),
        bias=draw(st.booleans()), shared=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=20, deadline=None)
@given(configs())
def test_layer_outputs_and_gradients_equal_float64_reference(c):
    torch.manual_seed(c["seed"])
    dispatcher, experts = c["pair"]
    cfg = MoEConfig(d_model=8, num_experts=c["E"], expert_hidden=c["F"], activation=c["activation"],
                    bias=c["bias"], num_shared_experts=int(c["shared"]), shared_gate=c["shared"],
                    dispatcher=dispatcher, experts=experts, router=RouterConfig(top_k=c["k"]),
                    capacity=CapacityConfig(capacity_factor=c["factor"]), loss=LossConfig(aux_coef=0.0))
    layer = MoELayer(cfg).train()  # train: the capacity factor applies (no dropout, no jitter configured)
    x = torch.randn(c["T"], 8, requires_grad=True)
    dy = torch.randn(c["T"], 8)
    params = [x, *layer.parameters()]

    kept = capacity_filter(layer.router(x), cfg.capacity, training=True)
    y = layer(x).y
    if c["T"] == 0:
        assert y.shape == x.shape
        return
    ref = combine_loop64(x, layer.experts, kept.token_N, kept.expert_N, kept.weight_N)
    if c["shared"]:
        ref = ref + torch.sigmoid(x.double() @ layer.shared_gate.weight.double().t()) * mlp64(layer.shared, x)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    want = torch.autograd.grad((ref * dy.double()).sum(), params, allow_unused=True)
    got = torch.autograd.grad((y * dy).sum(), params, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:  # a parameter the reference never touches (an unused expert's bias): no gradient
            assert g is None or not g.any()
            continue
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-5)
