"""Extending moekit without editing src/: a toy router, a toy dispatcher and a toy experts backend are
registered from this file and checked against the float64 loop reference. README.md ("Extending the core")
shows the three snippets between the ``example:`` markers verbatim; a test below keeps them in sync."""
# ruff: noqa: I001  (each example keeps its own imports, as a reader would write them)

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from moekit.analysis import params
from moekit.config import ConfigError, ModelConfig, MoEConfig, RouterConfig
from moekit.models.decoder import MoETransformer

from .reference import combine_loop64

# example: router
from moekit.layers.routing import Router, Routing, register_router


@register_router("round_robin")
class RoundRobinRouter(Router):
    """Token t goes to expert t mod E with weight 1 (a fixed, perfectly balanced assignment, like hash
    layers, Roller et al. 2021); the learned gate only feeds the aux losses and statistics."""

    def route(self, logits_TE, **ctx):
        T, E = logits_TE.shape
        token_N = torch.arange(T, device=logits_TE.device)
        return Routing(token_N, token_N % E, logits_TE.new_ones(T), torch.zeros_like(token_N), logits_TE,
                       logits_TE.softmax(-1), T, E, top_k=1)

    @classmethod
    def config_problem(cls, cfg):  # checked by MoEConfig: (field, value, what is allowed) or None
        k = cfg.router.top_k
        return None if k == 1 else ("top_k", k, "must be 1 for kind='round_robin'")
# end example

# example: dispatcher
from moekit.layers.dispatch import Dispatcher, register_dispatcher


class DenseDispatcher(Dispatcher):
    """Every expert computes every token (E blocks of T rows); combine weights them by the dense [T, E]
    gate matrix, zero where a token does not use an expert. E times the FLOPs: a check, not a fast path."""

    uniform_rows = True  # equal blocks: "auto" experts use one batched matmul

    def dispatch(self, x_TD, routing):
        T, E = routing.num_tokens, routing.num_experts
        counts_E = torch.full((E,), T, dtype=torch.long, device=x_TD.device)
        return x_TD.repeat(E, 1), counts_E, routing.gates_TE()

    def combine(self, y_RD, gates_TE):
        T, E = gates_TE.shape
        return torch.einsum("te,etd->td", gates_TE.to(y_RD.dtype), y_RD.view(E, T, -1))


register_dispatcher("dense", lambda cfg: DenseDispatcher())
# end example

# example: experts
from moekit.layers.experts import ExpertsBackend, register_experts_backend
from moekit.layers.ffn import ffn


class RowByRowBackend(ExpertsBackend):
    """Each row alone through its expert's FFN (ffn.py): the slowest possible kernel, the plainest."""

    def rows(self, experts, x_RD, counts_E, scale_R=None):
        w = experts.weights(x_RD.dtype)
        expert_R = torch.repeat_interleave(torch.arange(counts_E.numel()), counts_E.cpu()).tolist()
        y_RD = torch.cat([ffn(x_RD[r:r + 1], w.expert(e), experts.act) for r, e in enumerate(expert_R)]
                         + [x_RD.new_zeros(0, experts.d_model)])
        return y_RD if scale_R is None else y_RD * scale_R[:, None].to(y_RD.dtype)


register_experts_backend("row_by_row", RowByRowBackend())
# end example


def layer_and_reference(seed, T=11, E=4, **kw):
    """An MoE layer (built by the decoder's factory) and its output, input and parameter gradients next to the
    float64 loop over the router's own assignments."""
    from moekit.layers.build import build_moe_layer

    torch.manual_seed(seed)
    router = kw.pop("router", RouterConfig(top_k=2))
    layer = build_moe_layer(MoEConfig(d_model=8, num_experts=E, expert_hidden=12, router=router, **kw))
    x = torch.randn(T, 8, requires_grad=True)
    dy = torch.randn(T, 8)
    routing = layer.router(x)
    ref = combine_loop64(x, layer.experts, routing.token_N, routing.expert_N, routing.weight_N)
    params_ = [x, *layer.experts.parameters()]
    want = torch.autograd.grad((ref * dy.double()).sum(), params_)
    y = layer(x).y
    got = torch.autograd.grad((y * dy).sum(), params_)
    return y, ref, got, want


@pytest.mark.parametrize("kw", [
    dict(router=RouterConfig(kind="round_robin", top_k=1)),
    dict(dispatcher="dense"),
    dict(experts="row_by_row"),
    dict(dispatcher="dense", experts="row_by_row", router=RouterConfig(kind="round_robin", top_k=1)),
    dict(dispatcher="padded", experts="row_by_row", bias=True),
    dict(dispatcher="dense", experts="blockwise", activation="gelu", bias=True),
])
def test_toy_router_dispatcher_and_backend_equal_the_float64_loop(kw):
    y, ref, got, want = layer_and_reference(3, **kw)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-6)


def test_round_robin_router_assigns_by_position():
    layer = MoETransformer(ModelConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, moe=MoEConfig(
        d_model=8, num_experts=3, expert_hidden=8, router=RouterConfig(kind="round_robin", top_k=1))))
    counts = layer(torch.randint(0, 16, (2, 6))).moe_aux[0].counts_E
    assert counts.tolist() == [4, 4, 4]  # 12 tokens, every third one per expert


def test_registries_feed_config_validation_and_the_calculator():
    with pytest.raises(ConfigError, match=r"RouterConfig.top_k=2: must be 1 for kind='round_robin'"):
        MoEConfig(d_model=8, expert_hidden=8, router=RouterConfig(kind="round_robin", top_k=2))
    with pytest.raises(ConfigError, match=r"MoEConfig.experts='row-by-row'.*'row_by_row'"):
        MoEConfig(d_model=8, expert_hidden=8, experts="row-by-row")
    moe = MoEConfig(d_model=16, num_experts=4, expert_hidden=8, router=RouterConfig(kind="round_robin", top_k=1))
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, moe=moe)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    counts = params.count_params(params.spec_from_moekit(cfg))
    assert (counts.total, counts.active) == (model.num_params(), model.num_active_params())
    with pytest.raises(ValueError, match=r"router.kind='expert_choice'.*must be one of .*'round_robin'"):
        params.spec_from_moekit(dataclasses.replace(cfg, moe=dataclasses.replace(
            moe, router=RouterConfig(kind="expert_choice", top_k=1))))


def test_readme_shows_this_files_examples_verbatim():
    source = Path(__file__).read_text()
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    examples = re.findall(r"# example: (\w+)\n(.*?)# end example\n", source, re.S)
    assert [name for name, _ in examples] == ["router", "dispatcher", "experts"]
    for name, code in examples:
        assert f"```python\n{code}```" in readme, f"README's {name} example differs from {__file__}"
