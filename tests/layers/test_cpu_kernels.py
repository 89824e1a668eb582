"""The fused CPU SwiGLU kernels (layers/cpu_kernels.c) against float64 math, inside the blockwise experts
against autograd through the float64 loop, and the aten fallback when no compiler is there."""

import pytest
import torch
import torch.nn.functional as F

from moekit.layers import blockwise, cpu_kernels
from moekit.layers.dispatch import LocalDispatcher
from moekit.layers.experts import GroupedExperts
from moekit.layers.routing import Routing, topk_assignments

from .reference import combine_loop64

needs_kernels = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler: the aten path is used")


def strided(t: torch.Tensor, extra: int = 5) -> torch.Tensor:
    """t as the leading columns of a wider buffer (the kernels' row stride != row length)."""
    wide = torch.full((t.shape[0], t.shape[1] + extra), float("nan"))
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


@needs_kernels
@pytest.mark.parametrize("with_scale", [True, False])
def test_swiglu_kernels_match_float64_math(with_scale):
    g_ = torch.Generator().manual_seed(0)
    n, f = 37, 45  # not a multiple of any vector width: the loops' tails run too
    gate = torch.randn(n, f, generator=g_) * 4
    gate[0, :6] = torch.tensor([0.0, -100.0, 100.0, -87.5, 88.5, 1e-30])  # exp's clamp and the tiny end
    g, u = strided(gate), strided(torch.randn(n, f, generator=g_))
    s = torch.rand(n, generator=g_) if with_scale else None
    dh = torch.randn(n, f, generator=g_)
    g64, u64, dh64 = g.double(), u.double(), dh.double()
    s64 = s.double()[:, None] if with_scale else torch.ones(n, 1, dtype=torch.float64)
    sig = torch.sigmoid(g64)
    want_h = F.silu(g64) * u64 * s64
    want = {"hs": want_h, "ds": (dh64 * F.silu(g64) * u64).sum(1), "du": dh64 * s64 * F.silu(g64),
            "dg": dh64 * s64 * u64 * sig * (1 + g64 * (1 - sig))}

    h = cpu_kernels.swiglu_forward(g, u, s, torch.empty(n, f))
    torch.testing.assert_close(h.double(), want_h, rtol=1e-6, atol=1e-6)
    dg, du, hs, ds = strided(dh.clone()), torch.empty(n, f), torch.empty(n, f), torch.empty(n)
    cpu_kernels.swiglu_backward(g, u, s, dg, dg, du, hs, ds)  # dg in place of dh, as the blockwise kernel does
    got = {"hs": hs, "ds": ds, "du": du, "dg": dg}
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-5, atol=1e-5, msg=name)
    dg2, du2 = torch.empty(n, f), torch.empty(n, f)
    cpu_kernels.swiglu_backward(g, u, s, dh, dg2, du2, None, None)  # no hs, no ds; dh left as it was
    assert torch.equal(dg2, dg) and torch.equal(du2, du)
    torch.testing.assert_close(dh.double(), dh64)


def routed_problem(gen, T, E, K, D):
    """x, top-k assignments with random gate weights, and an upstream gradient."""
    x = torch.randn(T, D, generator=gen, requires_grad=True)
    token_N, expert_N, _ = topk_assignments(torch.randn(T, E, generator=gen), K)
    weight_N = torch.rand(T * K, generator=gen, requires_grad=True)
    return x, token_N, expert_N, weight_N, torch.randn(T, D, generator=gen)


def run_experts(experts, x, weight_N, token_N, expert_N, T, E, K, dy):
    routing = Routing(token_N, expert_N, weight_N, torch.zeros_like(token_N), torch.zeros(T, E), None, T, E, K)
    counts_E, meta = LocalDispatcher().plan(routing)
    y = experts.gathered(x, meta.token_R, meta.weight_R, counts_E)
    return [y.detach(), *torch.autograd.grad((y * dy).sum(), (x, weight_N, *experts.parameters()))]


@needs_kernels
@pytest.mark.parametrize("schedule", ["serial", "pooled"])
def test_blockwise_with_kernels_equals_float64_loop_and_the_aten_path(schedule, monkeypatch):
    """Heterogeneous experts (each block a column slice of the saved pre-activations), both schedules: the
    kernels run (counted), every output and gradient matches the float64 loop and the aten path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    previous = blockwise.set_block_schedule(schedule)
    try:
        g_ = torch.Generator().manual_seed(3)
        T, E, K, D = 61, 6, 2, 16
        sizes = (24, 9, 24, 17, 3, 24)
        experts = GroupedExperts(E, D, max(sizes), "swiglu", hidden_sizes=sizes, backend="blockwise")
        with torch.no_grad():
            for p in experts.parameters():
                p.copy_(torch.randn(p.shape, generator=g_) * 0.5)
            for e, f in enumerate(sizes):  # the float64 loop uses every unit: zero those beyond expert e's size
                experts.w_gate_EFD[e, f:] = experts.w_up_EFD[e, f:] = experts.w_down_EDF[e, :, f:] = 0
        x, token_N, expert_N, weight_N, dy = routed_problem(g_, T, E, K, D)
        calls = {"forward": 0, "backward": 0}
        for name in calls:
            real = getattr(cpu_kernels, f"swiglu_{name}")

            def counted(*a, _real=real, _name=name):
                calls[_name] += 1
                return _real(*a)
            monkeypatch.setattr(cpu_kernels, f"swiglu_{name}", counted)
        fused = run_experts(experts, x, weight_N, token_N, expert_N, T, E, K, dy)
        assert calls == {"forward": E, "backward": E}
        monkeypatch.setenv("MOEKIT_CPU_KERNELS", "0")
        aten = run_experts(experts, x, weight_N, token_N, expert_N, T, E, K, dy)
        assert calls == {"forward": E, "backward": E}  # disabled: not called again
        ref = combine_loop64(x, experts, token_N, expert_N, weight_N)
        ref_grads = torch.autograd.grad((ref * dy.double()).sum(), (x, weight_N, *experts.parameters()))
        for got, via_aten, want in zip(fused, aten, [ref.detach(), *ref_grads]):
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got, via_aten, rtol=1e-5, atol=1e-6)
    finally:
        blockwise.set_block_schedule(previous)
        torch.set_num_threads(threads)


def test_no_compiler_falls_back_to_aten_ops(monkeypatch, tmp_path):
    """A machine without a working C compiler builds nothing and computes through aten, the same numbers as
    with the kernels disabled."""
    monkeypatch.setattr(cpu_kernels, "_lib", False)
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    assert cpu_kernels.library() is None
    assert not list((tmp_path / "kernels").glob("*.so"))
    g_ = torch.Generator().manual_seed(4)
    T, E, K, D, F_ = 19, 4, 2, 8, 12
    experts = GroupedExperts(E, D, F_, "swiglu", backend="blockwise")
    x, token_N, expert_N, weight_N, dy = routed_problem(g_, T, E, K, D)
    without = run_experts(experts, x, weight_N, token_N, expert_N, T, E, K, dy)
    monkeypatch.setenv("MOEKIT_CPU_KERNELS", "0")
    disabled = run_experts(experts, x, weight_N, token_N, expert_N, T, E, K, dy)
    assert all(torch.equal(a, b) for a, b in zip(without, disabled))


def test_kernels_build_once_into_the_cache_and_load_from_it(monkeypatch, tmp_path):
    if cpu_kernels.library() is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(cpu_kernels, "_lib", False)
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    assert cpu_kernels.library() is not None
    built = list((tmp_path / "kernels").glob("*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_kernels, "_lib", False)
    monkeypatch.setenv("CC", "/bin/false")  # a second load must not need the compiler
    assert cpu_kernels.library() is not None
    assert built[0].stat().st_mtime_ns == stamp and list((tmp_path / "kernels").iterdir()) == built


@needs_kernels
@pytest.mark.parametrize("scale", ["none", "fixed", "learned"])
def test_swiglu_autograd_op_matches_float64_autograd(scale):
    """The one-pass SwiGLU under autograd (MLP, shared experts, grouped and bmm backends): 3-D inputs, an
    upstream gradient that is not contiguous (an expanded one from .sum()), the scale with or without grad."""
    g_ = torch.Generator().manual_seed(8)
    g = (torch.randn(3, 11, 29, generator=g_) * 3).requires_grad_(True)
    u = torch.randn(3, 11, 29, generator=g_, requires_grad=True)
    s = None if scale == "none" else torch.rand(3, 11, generator=g_).requires_grad_(scale == "learned")
    h = cpu_kernels.swiglu_hidden(g, u, s)
    assert h is not None and type(h.grad_fn).__name__ == "SwiGLUHiddenBackward"
    inputs = [t for t in (g, u, s) if t is not None and t.requires_grad]
    g64, u64 = g.double(), u.double()
    want = F.silu(g64) * u64 * (1 if s is None else s.double()[..., None])
    torch.testing.assert_close(h.double(), want, rtol=1e-6, atol=1e-6)
    for dh in (torch.randn(h.shape, generator=g_), None):  # None: the expanded gradient of h.sum()
        got = torch.autograd.grad(h.sum() if dh is None else (h * dh).sum(), inputs, retain_graph=True)
        ref = torch.autograd.grad(want.sum() if dh is None else (want * dh.double()).sum(), inputs,
                                  retain_graph=True)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)


def test_swiglu_op_steps_aside_where_it_does_not_apply():
    g, u = torch.randn(4, 6), torch.randn(4, 6)
    assert cpu_kernels.swiglu_hidden(g.double(), u.double()) is None  # float64: aten
    assert cpu_kernels.swiglu_hidden(g.t(), u.t()) is None  # rows not contiguous
    assert cpu_kernels.swiglu_hidden(g, u, torch.ones(5)) is None  # a scale of another shape


@needs_kernels
def test_mlp_with_scale_matches_float64_and_the_aten_path(monkeypatch):
    """A gated shared expert: MLP(x, scale) = scale * FFN(x), fused and through aten, against float64 rows."""
    from moekit.layers.experts import MLP

    from .reference import mlp64

    torch.manual_seed(2)
    mlp = MLP(16, 24)
    x = torch.randn(2, 9, 16, requires_grad=True)
    s = torch.rand(2, 9, requires_grad=True)
    dy = torch.randn(2, 9, 16)
    runs = []
    for enabled in ("1", "0"):
        monkeypatch.setenv("MOEKIT_CPU_KERNELS", enabled)
        y = mlp(x, scale=s)
        runs.append([y.detach(), *torch.autograd.grad((y * dy).sum(), (x, s, *mlp.parameters()))])
    ref = mlp64(mlp, x.reshape(-1, 16)).view(2, 9, 16) * s.double()[..., None]
    torch.testing.assert_close(runs[0][0].double(), ref.detach(), rtol=1e-6, atol=1e-6)
    for fused, aten in zip(*runs):
        torch.testing.assert_close(fused, aten, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_large_hidden_blocks_split_over_threads_with_the_same_result():
    """A dense FFN's [T, H] hidden units run in row chunks on torch's threads: each row's arithmetic is the
    same, so the result is bit-identical to one thread's, forward and every gradient."""
    g_ = torch.Generator().manual_seed(9)
    n, f = 613, 517
    assert n * f >= cpu_kernels.PARALLEL_MIN
    g = torch.randn(n, f, generator=g_, requires_grad=True)
    u = torch.randn(n, f, generator=g_, requires_grad=True)
    s = torch.rand(n, generator=g_, requires_grad=True)
    dh = torch.randn(n, f, generator=g_)
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            h = cpu_kernels.swiglu_hidden(g, u, s)
            runs.append([h.detach(), *torch.autograd.grad((h * dh).sum(), (g, u, s))])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    want = F.silu(g.double()) * u.double() * s.double()[:, None]
    torch.testing.assert_close(runs[0][0].double(), want, rtol=1e-6, atol=1e-6)
