"""torch.compile: the MoE layer compiles to one graph (fullgraph=True: no graph break, so no host sync
dynamo could not trace) with the grouped and loop expert backends, and compiled layer / model equal eager
in outputs and gradients. Compiling is slow on a small CPU: tiny shapes, few compiles; the layer and model
checks use the "aot_eager" backend (dynamo's graph capture and AOT autograd, without generating C++), the
CLI run compiles with inductor, the default."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moekit.config import LossConfig, ModelConfig, MoEConfig, RouterConfig
from moekit.distributed.parallelize import apply_activation_checkpointing, apply_compile
from moekit.layers.moe import MoELayer
from moekit.models.decoder import MoETransformer, lm_loss


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend,dtype,tol", [("grouped_mm", torch.bfloat16, 2e-2), ("loop", torch.float32, 1e-5)])
def test_layer_fullgraph_matches_eager(backend, dtype, tol):
    """grouped_mm's compiled kernel takes bf16 only (its fake-tensor rule), so the grouped case runs in bf16:
    tolerance of bf16 rounding (different fusion orders); the loop case is float32."""
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, num_experts=4, expert_hidden=32, experts=backend, router=RouterConfig(top_k=2),
                    loss=LossConfig(aux_coef=0.01, z_coef=1e-3))
    eager = MoELayer(cfg).to(dtype)
    with torch.no_grad():  # skewed router: experts 0 and 1 get no tokens
        eager.router.gate.weight[:2] -= 5.0
    compiled = MoELayer(cfg).to(dtype)
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.config.capture_scalar_outputs = True  # what apply_compile sets (the loop's block sizes)
    run = torch.compile(compiled, fullgraph=True, backend="aot_eager")  # raises on any graph break
    x = torch.rand(2, 8, 16, dtype=dtype) + 0.1
    g = torch.randn(2, 8, 16, dtype=dtype)
    outs = []
    for layer in (eager, run):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        ((out.y * g).sum() + out.aux.loss).backward()
        outs.append((out.y, xi.grad, out.aux.counts_E))
    assert outs[0][2][:2].sum() == 0  # the empty experts case is exercised
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    want_g = grads(eager)
    for k, got in grads(compiled).items():
        torch.testing.assert_close(got, want_g[k], rtol=tol, atol=tol, msg=k)


def tiny_model() -> MoETransformer:
    torch.manual_seed(0)
    moe = MoEConfig(d_model=16, num_experts=4, expert_hidden=16, router=RouterConfig(top_k=2),
                    loss=LossConfig(aux_coef=0.01, z_coef=1e-3))
    return MoETransformer(ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=8,
                                      dense_hidden=16, moe=moe))


def test_compiled_checkpointed_model_matches_eager():
    """Per-block compile + activation checkpointing vs the plain eager model: logits, losses, gradients."""
    eager, compiled = tiny_model(), tiny_model()
    apply_activation_checkpointing(compiled)
    apply_compile(compiled, backend="aot_eager")
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # in place: names unchanged
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (eager, compiled):
        out = model(ids[:, :-1])
        loss = lm_loss(out.logits, ids[:, 1:]) + out.aux_loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    want = grads(eager)
    assert want.keys() == grads(compiled).keys()
    for k, got in grads(compiled).items():
        torch.testing.assert_close(got, want[k], rtol=1e-4, atol=1e-5, msg=k)


def test_cli_train_compile(tmp_path):
    """`moekit train --device cpu --compile --activation-checkpointing` end to end on a tiny corpus."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.py").write_text(textwrap.dedent("""
        def f(x):
            return [x * k for k in range(10)]
        """) * 40)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "moekit", "train", "--device", "cpu", "--compile", "--activation-checkpointing",
           "--data", str(data), "--vocab-size", "300", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
           "--eval-every", "2", "--out", str(run), "--no-progress"]
    env = dict(os.environ, MOEKIT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    # inductor generates and builds C++ for each graph: minutes on a busy 2-core machine
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "step 2: val loss" in proc.stdout
    assert (run / "latest").is_file()


def test_blockwise_runs_eagerly_inside_a_compiled_layer():
    """The blockwise kernel (the CPU default) is one graph break under torch.compile: dynamo does not trace its
    per-expert block closure (it recompiled that once per expert index, up to its limit), and the compiled
    layer equals eager."""
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, num_experts=12, expert_hidden=16, experts="blockwise", router=RouterConfig(top_k=2),
                    loss=LossConfig(aux_coef=0.0))
    eager = MoELayer(cfg)
    x = torch.randn(64, 16)
    torch._dynamo.reset()
    layer = MoELayer(cfg)
    layer.load_state_dict(eager.state_dict())
    run = torch.compile(layer, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = run(x).y
    assert int((eager(x).aux.counts_E > 0).sum()) > 8  # more blocks than dynamo's recompile limit
    torch.testing.assert_close(got, eager(x).y, rtol=1e-5, atol=1e-6)
