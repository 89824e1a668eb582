"""Worker bodies for the multi-process tests (importable by spawned processes).

Reference: the unsharded single-process MoELayer applied to every rank's tokens separately (capacity is
per rank in EP), with J = (1/W) sum_r L_r; EP gradients after ``reduce_gradients`` must equal dJ/dparam
(expert shards: the matching slice), and each rank's input gradient must equal W * dJ/dx_r = dL_r/dx_r.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from moekit.config import CapacityConfig, LossConfig, ModelConfig, MoEConfig, RouterConfig
from moekit.distributed import AllToAllDispatcher, build_mesh, parallelize
from moekit.layers.build import build_moe_layer
from moekit.layers.capacity import capacity_filter
from moekit.layers.moe import MoELayer
from moekit.models.decoder import MoETransformer, lm_loss

D = 16


@dataclass(frozen=True)
class Case:
    name: str
    num_experts: int = 4
    top_k: int = 2
    router: str = "softmax_topk"
    capacity_factor: float | None = None
    overflow: str = "drop"
    skew: bool = False  # every token picks the last two experts (the other ranks receive nothing)
    empty_rank: int | None = None  # this rank has no tokens at all
    chunks: int = 1
    shared: bool = False
    router_extra: tuple = ()  # extra RouterConfig fields as (name, value) pairs
    hidden_sizes: tuple[int, ...] | None = None  # heterogeneous experts
    hierarchical_groups: int = 0  # two-level MoE: each group is an MoELayer, sharded on its own
    float64: bool = True  # float64 + loop experts (tight tolerance); else float32 + torch._grouped_mm


def make_layer(case: Case, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    cfg = MoEConfig(d_model=D, num_experts=case.num_experts, expert_hidden=24,
                    expert_hidden_sizes=case.hidden_sizes, experts="loop" if case.float64 else "grouped_mm",
                    hierarchical_groups=case.hierarchical_groups,
                    num_shared_experts=1 if case.shared else 0,
                    router=RouterConfig(kind=case.router, top_k=case.top_k, **dict(case.router_extra)),
                    capacity=CapacityConfig(capacity_factor=case.capacity_factor, overflow=case.overflow),
                    loss=LossConfig(aux_coef=0.01, z_coef=1e-3))
    layer = build_moe_layer(cfg).to(torch.float64 if case.float64 else torch.float32)
    if case.skew:
        with torch.no_grad():
            w = layer.router.gate.weight
            w.zero_()
            w[-1], w[-2] = 3.0, 1.5
    return layer


def rank_inputs(case: Case, world_size: int, dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x_TD, upstream grad g_TD) for every rank; uneven token counts, optionally one empty rank."""
    gen = torch.Generator().manual_seed(1234)
    out = []
    for r in range(world_size):
        T = 0 if r == case.empty_rank else 9 + 4 * r
        if case.skew:  # positive inputs: the skewed gate rows win for every token
            x = torch.rand(T, D, generator=gen, dtype=dtype) + 0.1
        else:
            x = torch.randn(T, D, generator=gen, dtype=dtype)
        out.append((x, torch.randn(T, D, generator=gen, dtype=dtype)))
    return out


def rank_loss(layer: MoELayer, x: torch.Tensor, g: torch.Tensor):
    out = layer(x)
    # the router losses are means over tokens: undefined (NaN) for a rank without tokens
    aux = out.aux.loss if x.shape[0] > 0 else 0.0
    return out.y, (out.y * g).sum() + aux


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, case: Case) -> None:
    tol = 1e-10 if case.float64 else 2e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m: f"[{case.name}] {name}: {m}")


_MESHES: dict = {}


def mesh_for(ep_size: int, dp_replicate: int = 1):
    """One mesh per layout per worker process (each mesh creates process groups: collective, slow)."""
    key = (ep_size, dp_replicate)
    if key not in _MESHES:
        _MESHES[key] = build_mesh(ep_size, dp_replicate)
    return _MESHES[key]


def full_grad(p: torch.Tensor) -> torch.Tensor:
    """The gradient of this rank's (unsharded) parameter: FSDP holds it as a DTensor shard (collective)."""
    return p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad


def assert_grads_match(ep: MoELayer, plan, ref: MoELayer, case: Case, when: str) -> None:
    ref_params = dict(ref.named_parameters())
    r = plan.mesh.ep_rank
    for name, p in ep.named_parameters():
        want = ref_params[name].grad
        if name in plan.expert_keys:
            L = plan.expert_keys[name] // plan.mesh.ep_size
            want = want[r * L:(r + 1) * L]
        assert_close(f"{name}.grad{when}", full_grad(p), want, case)


def check_layer(rank: int, world_size: int, ep_size: int, case: Case, dp_replicate: int = 1) -> None:
    dtype = torch.float64 if case.float64 else torch.float32
    inputs = rank_inputs(case, world_size, dtype)

    ref = make_layer(case)
    ref_x = [x.clone().requires_grad_() for x, _ in inputs]
    ref_y = []
    J = 0.0
    for xr, (_, g) in zip(ref_x, inputs):
        y, loss = rank_loss(ref, xr, g)
        ref_y.append(y.detach())
        J = J + loss / world_size
    J.backward()

    ep = make_layer(case, seed=rank)  # other seeds on other ranks: parallelize makes the replicas identical
    plan = parallelize(ep, mesh_for(ep_size, dp_replicate), num_chunks=case.chunks)
    x = inputs[rank][0].clone().requires_grad_()
    y, loss = rank_loss(ep, x, inputs[rank][1])
    loss.backward()  # FSDP reduces the gradients: nothing to call

    assert_close("y", y, ref_y[rank], case)
    assert_close("x.grad", x.grad, world_size * ref_x[rank].grad, case)
    assert_grads_match(ep, plan, ref, case, "")
    # global-norm clipping: every shard's squared norm counted once
    total = plan.clip_grad_norm_(1e-3)
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e-3)
    assert_close("grad norm", total.to(want.dtype), want, case)
    assert_grads_match(ep, plan, ref, case, " after clipping")
    if ep_size > 1 and isinstance(ep, MoELayer):
        check_bytes(ep, x.detach(), plan.mesh.ep_rank, case.num_experts // ep_size)
    with torch.no_grad():  # inference takes the path without autograd graphs
        assert_close("y without grad", ep(inputs[rank][0]).y, ref_y[rank], case)


def check_bytes(ep: MoELayer, x: torch.Tensor, ep_rank: int, L: int) -> None:
    """Bytes counted by the dispatcher vs the routing: every kept assignment whose expert lives on another
    rank crosses the wire 4 times (dispatch, combine, and both backward exchanges)."""
    assert isinstance(ep.dispatcher, AllToAllDispatcher)
    ep.unshard()  # the router is called outside the layer's forward: gather its FSDP-sharded weight
    with torch.no_grad():
        kept = capacity_filter(ep.router(x), ep.cfg.capacity, training=True)
    ep.reshard()
    rows_to_others = int((kept.expert_N // L != ep_rank).sum())
    totals = torch.tensor([rows_to_others * 4 * D * x.element_size(), ep.dispatcher.stats.bytes_sent])
    dist.all_reduce(totals)
    assert totals[0] == totals[1], totals.tolist()


def check_full_state_load(rank: int, world_size: int, ep_size: int) -> None:
    """A single-process state dict loads into the sharded layer (its expert slice, its FSDP shard)."""
    case = Case("single-process state", num_experts=8, shared=True)
    full = make_layer(case, seed=0)
    ep = make_layer(case, seed=98)
    plan = parallelize(ep, mesh_for(ep_size))
    plan.load_full_state_dict(full.state_dict())
    x = rank_inputs(case, world_size, torch.float64)[rank][0]
    with torch.no_grad():
        torch.testing.assert_close(ep(x).y, full(x).y, rtol=1e-10, atol=1e-10)


def check_errors(rank: int, world_size: int) -> None:
    import pytest

    from moekit.errors import UsageError

    with pytest.raises(UsageError, match="must divide the world size"):
        build_mesh(3)
    with pytest.raises(UsageError, match="must divide num_experts"):
        parallelize(make_layer(Case("e", num_experts=3, top_k=1)), mesh_for(2))


def layer_suite(rank: int, world_size: int, runs: list[tuple]) -> None:
    """runs: (ep_size, case) or (ep_size, case, dp_replicate)."""
    for run in runs:
        check_layer(rank, world_size, *run)
        dist.barrier()


def checkpoint_suite(rank: int, world_size: int, ep_sizes: list[int], errors: bool) -> None:
    for ep_size in ep_sizes:
        check_full_state_load(rank, world_size, ep_size)
    if errors:
        check_errors(rank, world_size)


# ----------------------------------------------------------------------------- training equivalence
STEPS, BATCH, SEQ, VOCAB = 8, 8, 12, 48


def tiny_lm(dead_experts: bool = False) -> MoETransformer:
    """The smallest MoETransformer that exercises FSDP + EP: 2 layers, 4 experts, top-2, a shared expert.
    Router losses: the z-loss is a token mean (per-rank means average to the full-batch value); the
    load-balancing loss is not linear in the batch, so it is off here (see parallelize.py).
    ``dead_experts``: a DeepSeek router whose selection bias rules out experts 2 and 3, so that with ep=2 the
    second expert shard gets no tokens at all (its weights still decay and must stay in step)."""
    torch.manual_seed(0)
    router = RouterConfig(kind="deepseek", top_k=2, score_func="softmax") if dead_experts else RouterConfig(top_k=2)
    moe = MoEConfig(d_model=D, num_experts=4, expert_hidden=32, num_shared_experts=1, experts="grouped_mm",
                    router=router, loss=LossConfig(aux_coef=0.0, z_coef=1e-3))
    model = MoETransformer(ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=2, n_heads=2, max_seq_len=SEQ,
                                       dense_hidden=32, moe=moe))
    if dead_experts:
        for moe_layer in model.moe_layers():
            moe_layer.router.bias[2:] = -100.0
    return model


def lm_objective(model: MoETransformer, ids_BS: torch.Tensor) -> torch.Tensor:
    out = model(ids_BS[:, :-1])
    return lm_loss(out.logits, ids_BS[:, 1:]) + out.aux_loss


def batches() -> list[torch.Tensor]:
    """Learnable without attention: the next token is a fixed function of the current one, (3t + 1) mod V."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        cols = [torch.randint(0, VOCAB, (BATCH,), generator=gen)]
        for _ in range(SEQ - 1):
            cols.append((3 * cols[-1] + 1) % VOCAB)
        out.append(torch.stack(cols, 1))
    return out


def train_curve(model: MoETransformer, plan=None) -> list[float]:
    """nanoGPT-style loop: forward -> backward -> clip -> AdamW step. With a plan every rank trains on its
    1/W of each batch (FSDP reduces the gradients) and the logged loss is the mean over ranks (= the
    full-batch loss)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for ids in batches():
        loss = lm_objective(model, plan.local_batch(ids) if plan else ids)
        loss.backward()
        if plan:
            plan.clip_grad_norm_(0.5)
            losses.append(plan.mean_over_ranks([loss.item()])[0])
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


def gather_full_state(model: torch.nn.Module, plan) -> dict[str, torch.Tensor]:
    """The single-process state dict of a sharded model, on every rank (collective; a test helper: the
    trainer saves shards with DCP instead)."""
    out = {}
    for key, t in model.state_dict().items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        if key in plan.expert_keys and plan.mesh.ep_size > 1:
            parts = [torch.empty_like(t) for _ in range(plan.mesh.ep_size)]
            dist.all_gather(parts, t.contiguous(), group=plan.mesh.ep_group)
            t = torch.cat(parts)
        out[key] = t
    return out


def train_fsdp_ep(rank: int, world_size: int, ep_size: int, dead_experts: bool, out: str) -> None:
    model = tiny_lm(dead_experts)
    plan = parallelize(model, mesh_for(ep_size))
    losses = train_curve(model, plan)
    if dead_experts:  # the second expert shard really received no tokens
        with torch.no_grad():
            counts = sum(a.counts_E for a in model(batches()[0][:, :-1]).moe_aux)
        assert counts[2:].sum() == 0 and counts[:2].sum() > 0, counts
    sd = gather_full_state(model, plan)
    if rank == 0:
        torch.save({"losses": losses, "state_dict": sd}, out)


# ----------------------------------------------------------------------------- the trainer: DCP, resharding
def trainer_setup():
    from moekit.config import TrainConfig
    from moekit.train.data import TokenStream

    torch.manual_seed(0)
    # DeepSeek-V3 routing with aux-loss-free bias balancing: the bias update must see the global loads
    router = RouterConfig(kind="deepseek", top_k=2, score_func="sigmoid", bias_update_rate=0.05)
    # the grouped kernels on both sides: after 6 AdamW steps, blockwise vs grouped rounding moves a weight whose
    # gradient is ~0 by ~lr (Adam normalises the noise), which would hide what this compares: the distribution
    moe = MoEConfig(d_model=32, num_experts=4, expert_hidden=32, num_shared_experts=1, router=router,
                    loss=LossConfig(aux_coef=0.0, z_coef=1e-3), experts="grouped_mm")
    model = MoETransformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32,
                                       moe=moe))
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=16, grad_accum=2, lr=1e-2, warmup_steps=2, log_every=1,
                      eval_every=3, eval_batches=2, save_every=3, grad_clip=0.5)
    gen = torch.Generator().manual_seed(0)
    data = TokenStream(torch.randint(0, 64, (3000,), generator=gen))
    return model, cfg, data


class RankDraws:
    """Draws rank + 1 values from every generator after each step (as dropout on each rank's own batch would),
    so that the ranks' RNG streams differ; ``resumed``: the streams a resumed rank starts from."""

    def __init__(self, rank: int):
        self.rank, self.resumed = rank, None

    def after_step(self, ctx) -> None:
        import random

        import numpy as np

        torch.rand(self.rank + 1), np.random.rand(self.rank + 1), [random.random() for _ in range(self.rank + 1)]

    def after_resume(self, step: int) -> None:
        from moekit.train.rng import rng_state

        self.resumed = rng_state()


def trainer_run(rank: int, world_size: int, ep_size: int, run_dir: str, resume: bool, async_save: bool,
                out: str) -> None:
    """moekit.train.train on a (dp_shard x ep) mesh: fresh, or resumed from ``run_dir``'s latest checkpoint
    (sharded at another world size, or single-process). Rank 0 saves the records; every rank the RNG streams
    it resumed with (``out``.rng<rank>)."""
    from moekit.train.hooks import RouterBiasUpdate
    from moekit.train.trainer import train

    model, cfg, data = trainer_setup()
    plan = parallelize(model, mesh_for(ep_size))
    draws = RankDraws(rank)
    records = train(model, data, data, cfg, out_dir=run_dir, resume=resume, parallel=plan,
                    hooks=[RouterBiasUpdate(), draws], async_save=async_save)
    if rank == 0:
        torch.save(records, out)
    if resume:
        with open(f"{out}.rng{rank}", "w") as f:
            json.dump(draws.resumed, f)
