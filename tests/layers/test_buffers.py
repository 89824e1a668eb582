"""The blockwise kernel's reused buffers (layers/buffers.py) never hand out storage something still holds:
tensors saved for a pending backward, a retained graph, a gradient the caller kept. Reference: the same layer
on the readable loop backend (plain autograd, no pooled buffers)."""

import copy

import pytest
import torch

from moekit.config import LossConfig, MoEConfig, RouterConfig
from moekit.layers import blockwise, buffers
from moekit.layers.moe import MoELayer


@pytest.fixture(autouse=True)
def pool_everything(monkeypatch):
    monkeypatch.setattr(buffers, "MIN_BYTES", 0)  # tiny test shapes go through the pool too
    buffers.release()
    yield
    buffers.release()


def layers(seed=0):
    torch.manual_seed(seed)
    cfg = MoEConfig(d_model=16, num_experts=6, expert_hidden=24, num_shared_experts=1, shared_hidden=8,
                    router=RouterConfig(top_k=2), loss=LossConfig(aux_coef=0.0), experts="blockwise")
    fast = MoELayer(cfg)
    ref = copy.deepcopy(fast)
    ref.experts.backend = "loop"
    return fast, ref


def grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("schedule", ["serial", "pooled"])
def test_two_pending_graphs_and_a_retained_graph_keep_their_buffers(schedule):
    previous = blockwise.set_block_schedule(schedule)
    try:
        fast, ref = layers()
        xs = [torch.randn(40, 16, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
        for m in (fast, ref):
            y1, y2 = (m(x).y for x in xs)  # both graphs alive: the second forward must not reuse the first's
            (y2 ** 2).sum().backward(retain_graph=True)
            (y2 ** 2).sum().backward()  # the retained graph's saved tensors are read a second time
            (y1 * 3).sum().backward()
        for n, g in grads(ref).items():
            torch.testing.assert_close(grads(fast)[n], g, rtol=1e-5, atol=1e-6, msg=n)
    finally:
        blockwise.set_block_schedule(previous)


def test_a_kept_gradient_is_not_overwritten_and_freed_buffers_are_reused():
    fast, _ = layers()
    x = torch.randn(40, 16)
    fast(x).y.sum().backward()
    kept = {n: p.grad for n, p in fast.named_parameters()}  # the caller holds step 1's gradients
    snapshot = {n: g.clone() for n, g in kept.items()}
    fast.zero_grad(set_to_none=True)
    fast(x * 2).y.sum().backward()
    for n, g in kept.items():
        assert torch.equal(g, snapshot[n]), n
        assert not torch.equal(fast.get_parameter(n).grad, g), n  # step 2's gradient differs: x doubled
    del kept, snapshot
    fast.zero_grad(set_to_none=True)
    pooled = sum(len(b) for b in buffers._pool.values())
    for _ in range(3):  # steady state: every buffer comes back from the pool
        fast(x).y.sum().backward()
        fast.zero_grad(set_to_none=True)
    assert sum(len(b) for b in buffers._pool.values()) == pooled


def test_small_and_non_cpu_requests_bypass_the_pool(monkeypatch):
    monkeypatch.setattr(buffers, "MIN_BYTES", 1 << 20)
    t = buffers.empty(torch.empty(0), 4, 4)
    assert t.shape == (4, 4) and not buffers._pool
    big = buffers.empty(torch.empty(0), 512, 1024)  # 2 MB: pooled
    assert big.shape == (512, 1024) and sum(len(b) for b in buffers._pool.values()) == 1
    again = buffers.empty(torch.empty(0), 512, 1024)  # the first is still held: a new buffer
    assert again.data_ptr() != big.data_ptr()
    ptr = big.data_ptr()
    del big
    assert buffers.empty(torch.empty(0), 256, 1024).data_ptr() != ptr  # half the size: not tied up
    assert buffers.empty(torch.empty(0), 480, 1024).data_ptr() == ptr  # freed, within 25%: reused


def test_the_pool_trims_its_smallest_free_buffers_and_keeps_held_ones():
    """More than MAX_FREE free buffers of different sizes: a miss drops the smallest free ones (by identity, not
    by comparing tensors) and never one that is still held."""
    like = torch.empty(0)
    held = [buffers.empty(like, 10 * (i + 1)) for i in range(3)]
    sizes = [100 * 2 ** i for i in range(buffers.MAX_FREE + 2)]  # each > 25% apart: none fits another's request
    for n in sizes:
        buffers.empty(like, n)  # dropped at once: free in the pool
    pool = buffers._pool[(like.device, like.dtype)]
    free = [b for b in pool if buffers._free(b)]
    assert len(free) == buffers.MAX_FREE  # each miss made room for itself
    assert sorted(b.numel() for b in free) == sizes[-buffers.MAX_FREE:]  # the smallest were dropped
    assert all(any(b.data_ptr() == h.data_ptr() for b in pool) for h in held)
