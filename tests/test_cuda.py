"""The GPU code paths: run only where CUDA is available (skipped on CPU-only machines).

- torch._grouped_mm in bf16 with experts that get no rows, forward and backward, against the float32 loop;
- the MoE layer compiled with fullgraph=True on the GPU equals eager;
- one FSDP2 + EP training step on a 1-rank NCCL mesh equals the plain model's step.
"""

import pytest
import torch

from moekit.config import LossConfig, ModelConfig, MoEConfig, RouterConfig
from moekit.layers.experts import GroupedExperts
from moekit.layers.moe import MoELayer
from moekit.models.decoder import MoETransformer, lm_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda", 0)
BF16_TOL = {"rtol": 2e-2, "atol": 2e-2}


def test_grouped_mm_bf16_with_empty_experts():
    if torch.cuda.get_device_capability(CUDA) < (8, 0):
        pytest.skip("torch._grouped_mm needs compute capability >= 8.0")
    torch.manual_seed(0)
    counts_E = torch.tensor([5, 0, 19, 0, 8], device=CUDA)  # experts 1 and 3 get no rows
    R, D, F = int(counts_E.sum()), 64, 128  # row strides are multiples of 16 bytes, as the kernel needs
    grouped = GroupedExperts(5, D, F, backend="grouped_mm").to(CUDA, torch.bfloat16)
    loop = GroupedExperts(5, D, F, backend="loop").to(CUDA)
    loop.load_state_dict({k: v.float() for k, v in grouped.state_dict().items()})
    x = torch.randn(R, D, device=CUDA)
    g = torch.randn(R, D, device=CUDA)
    outs = []
    for experts, dtype in ((grouped, torch.bfloat16), (loop, torch.float32)):
        xi = x.to(dtype).requires_grad_()
        y = experts(xi, counts_E)
        (y.float() * g).sum().backward()
        outs.append([y.float(), xi.grad.float()] + [p.grad.float() for p in experts.parameters()])
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, **BF16_TOL)
    w_up_grad = grouped.w_up_EFD.grad
    assert w_up_grad[1].abs().sum() == 0 and w_up_grad[3].abs().sum() == 0  # empty experts: zero grads


def test_compiled_layer_on_gpu():
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=64, num_experts=4, expert_hidden=128, experts="grouped_mm",
                    router=RouterConfig(top_k=2), loss=LossConfig(aux_coef=0.01, z_coef=1e-3))
    eager = MoELayer(cfg).to(CUDA, torch.bfloat16)
    compiled = MoELayer(cfg).to(CUDA, torch.bfloat16)
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(4, 16, 64, device=CUDA, dtype=torch.bfloat16)
    ys = []
    for layer in (eager, torch.compile(compiled, fullgraph=True)):
        out = layer(x)
        (out.y.float().square().mean() + out.aux.loss).backward()
        ys.append(out.y)
    torch.testing.assert_close(ys[1], ys[0], **BF16_TOL)
    for (k, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **BF16_TOL, msg=k)


def test_fsdp_ep_step_on_one_gpu():
    """A 1-rank NCCL process group, a (1 x 1 x 1) mesh: FSDP2 and the expert layout on one GPU give the
    plain model's AdamW step."""
    import torch.distributed as dist

    from moekit.distributed import build_mesh, parallelize
    from moekit.distributed.launch import free_port

    def model():
        torch.manual_seed(0)
        moe = MoEConfig(d_model=64, num_experts=4, expert_hidden=64, experts="grouped_mm",
                        router=RouterConfig(top_k=2), loss=LossConfig(aux_coef=0.0, z_coef=1e-3))
        return MoETransformer(ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_seq_len=16,
                                          moe=moe)).to(CUDA)

    ids = torch.randint(0, 128, (2, 16), device=CUDA)
    torch.cuda.set_device(CUDA)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            device_id=CUDA)
    try:
        sharded, plain = model(), model()
        plan = parallelize(sharded, build_mesh(ep=1, device_type="cuda"))
        for m in (sharded, plain):
            opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
            out = m(ids[:, :-1])
            (lm_loss(out.logits, ids[:, 1:]) + out.aux_loss).backward()
            opt.step()
        for (k, p), q in zip(sharded.named_parameters(), plain.parameters()):
            got = p.full_tensor() if hasattr(p, "full_tensor") else p
            torch.testing.assert_close(got, q, rtol=1e-5, atol=1e-5, msg=k)
        assert plan.expert_keys
    finally:
        dist.destroy_process_group()
