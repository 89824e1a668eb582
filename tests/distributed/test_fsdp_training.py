"""Training under FSDP2 + expert parallelism equals one process, and sharded (DCP) checkpoints reshard.

Reference: the same model trained in one process on the full batches. With the load-balancing loss off,
every objective is a token mean, so the W ranks' mean loss is the full-batch loss and the gradients agree
up to float32 summation order. Tolerances: losses rtol/atol 1e-5, weights rtol 1e-4 / atol 1e-5 (AdamW
normalises gradient noise, so a weight whose gradient is ~0 can move by a few ulps x lr).
"""

import shutil

import pytest
import torch

from moekit.distributed.launch import run_local
from tests.distributed.workers import tiny_lm, train_curve, train_fsdp_ep, trainer_run, trainer_setup

LOSS_TOL = {"rtol": 1e-5, "atol": 1e-5}
WEIGHT_TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.mark.parametrize("world_size,ep_size,dead_experts", [
    (2, 2, True),  # EP=2: the second expert shard gets no tokens at all
    (4, 2, False),  # EP=2 x FSDP=2: each rank holds one expert; dense weights sharded over 4
])
def test_fsdp_ep_training_matches_single_process(tmp_path, world_size, ep_size, dead_experts):
    out = str(tmp_path / "run.pt")
    run_local(train_fsdp_ep, world_size, ep_size, dead_experts, out, timeout=600)
    got = torch.load(out)
    single = tiny_lm(dead_experts)
    want = train_curve(single)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want), **LOSS_TOL)
    assert want[-1] < want[0] - 0.3  # it trains
    for key, w in single.state_dict().items():
        torch.testing.assert_close(got["state_dict"][key], w, **WEIGHT_TOL, msg=key)


def series(records, key, after=0):
    return torch.tensor([r[key] for r in records if key in r and r["step"] > after])


def assert_continues(got: list[dict], want: list[dict], after: int) -> None:
    for key in ("loss", "grad_norm", "val_loss"):
        torch.testing.assert_close(series(got, key, after), series(want, key, after), **LOSS_TOL, msg=key)


def resume_copy(src, dst, step: int):
    shutil.copytree(src, dst)
    (dst / "latest").write_text(f"ckpt-{step:06d}")
    return dst


def test_dcp_checkpoints_reshard(tmp_path):
    """moekit.train.train with DeepSeek bias balancing, grad accumulation, clipping and eval:
    - 4 ranks (EP=2 x FSDP=2) log the single-process losses and save sharded checkpoints at steps 3 and 6;
    - its step-3 checkpoint resumes at 2 ranks (EP=2, async saves) and in 1 process: both continue the
      uninterrupted curve;
    - a single-process checkpoint resumes under EP=2;
    - the sharded step-6 checkpoint loads whole in one process (load_model; `moekit convert` of a sharded
      checkpoint is in test_cli_ep.py: this model's DeepSeek bias and shared expert fit no HF family)."""
    from moekit.distributed.dcp import is_sharded
    from moekit.train.checkpoint import load_model, resolve_checkpoint
    from moekit.train.hooks import RouterBiasUpdate
    from moekit.train.trainer import train

    model, cfg, data = trainer_setup()
    single = train(model, data, data, cfg, out_dir=tmp_path / "single", hooks=[RouterBiasUpdate()])

    run_local(trainer_run, 4, 2, str(tmp_path / "w4"), False, False, str(tmp_path / "w4.pt"), timeout=900)
    assert_continues(torch.load(tmp_path / "w4.pt"), single, after=0)
    assert is_sharded(resolve_checkpoint(tmp_path / "w4"))
    assert not list((tmp_path / "w4").glob(".*tmp*"))  # atomic saves leave no temporary folder

    resume_copy(tmp_path / "w4", tmp_path / "w2", 3)
    run_local(trainer_run, 2, 2, str(tmp_path / "w2"), True, True, str(tmp_path / "w2.pt"), timeout=900)
    assert_continues(torch.load(tmp_path / "w2.pt"), single, after=3)
    assert is_sharded(resolve_checkpoint(tmp_path / "w2"))  # the async save completed and was published

    resume_copy(tmp_path / "w4", tmp_path / "w1", 3)
    model1, _, _ = trainer_setup()
    one = train(model1, data, data, cfg, out_dir=tmp_path / "w1", resume=True, hooks=[RouterBiasUpdate()])
    assert_continues(one, single, after=3)

    resume_copy(tmp_path / "single", tmp_path / "s2", 3)
    run_local(trainer_run, 2, 2, str(tmp_path / "s2"), True, False, str(tmp_path / "s2.pt"), timeout=900)
    assert_continues(torch.load(tmp_path / "s2.pt"), single, after=3)

    sharded = load_model(tmp_path / "w4")
    assert model.layers[0].ffn.router.bias.abs().sum() > 0  # the bias balancing was active
    for k, w in model.state_dict().items():
        torch.testing.assert_close(sharded.state_dict()[k], w, **WEIGHT_TOL, msg=k)
