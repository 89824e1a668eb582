"""Training under FSDP2 + expert parallelism equals one process, and sharded (DCP) checkpoints reshard.

Reference: the same model trained in one process on the full batches. With the load-balancing loss off,
every objective is a token mean, so the W ranks' mean loss is the full-batch loss and the gradients agree
up to float32 summation order. Tolerances: losses rtol/atol 1e-5, weights rtol 1e-4 / atol 1e-5 (AdamW
normalises gradient noise, so a weight whose gradient is ~0 can move by a few ulps x lr).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from moekit.distributed.launch import run_local
from tests.distributed.workers import (
    RankDraws,
    tiny_lm,
    train_curve,
    train_fsdp_ep,
    trainer_run,
    trainer_setup,
)
from tests.train.test_checkpoint_safety import flip_byte

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


def rng_file(path) -> dict:
    return json.loads(Path(path).read_text())


def test_dcp_checkpoints_reshard(tmp_path, caplog):
    """moekit.train.train with DeepSeek bias balancing, grad accumulation, clipping and eval:
    - 4 ranks (EP=2 x FSDP=2) log the single-process losses and save sharded checkpoints at steps 3 and 6,
      each with a manifest and every rank's own RNG streams;
    - its step-3 checkpoint resumes at 2 ranks (EP=2, async saves): both continue the uninterrupted curve,
      rank r continuing saved rank r's RNG streams;
    - in 1 process, ``resume=True`` finds a flipped byte in a step-6 shard, says so and resumes from step 3;
    - a single-process checkpoint resumes under EP=2 (rank 0 continues its streams, rank 1 is reseeded);
    - the sharded step-6 checkpoint loads whole in one process (load_model; `moekit convert` of a sharded
      checkpoint is in test_cli_ep.py: this model's DeepSeek bias and shared expert fit no HF family)."""
    from moekit.distributed.dcp import is_sharded
    from moekit.train.checkpoint import load_model, read_state, resolve_checkpoint, verify_checkpoint
    from moekit.train.hooks import RouterBiasUpdate
    from moekit.train.rng import reseed, rng_state
    from moekit.train.trainer import train

    model, cfg, data = trainer_setup()
    single = train(model, data, data, cfg, out_dir=tmp_path / "single", hooks=[RouterBiasUpdate()])

    run_local(trainer_run, 4, 2, str(tmp_path / "w4"), False, False, str(tmp_path / "w4.pt"), timeout=900)
    assert_continues(torch.load(tmp_path / "w4.pt"), single, after=0)
    assert is_sharded(resolve_checkpoint(tmp_path / "w4"))
    assert not list((tmp_path / "w4").glob(".*tmp*"))  # atomic saves leave no temporary folder
    saved3 = tmp_path / "w4" / "ckpt-000003"
    verify_checkpoint(saved3)  # its manifest lists every rank's files
    streams = [rng_file(saved3 / f"rng-{r}.json")["torch"] for r in range(4)]
    assert len(set(streams)) == 4  # the ranks drew different amounts: each saved its own streams

    resume_copy(tmp_path / "w4", tmp_path / "w2", 3)
    run_local(trainer_run, 2, 2, str(tmp_path / "w2"), True, True, str(tmp_path / "w2.pt"), timeout=900)
    assert_continues(torch.load(tmp_path / "w2.pt"), single, after=3)
    assert is_sharded(resolve_checkpoint(tmp_path / "w2"))  # the async save completed and was published
    verify_checkpoint(resolve_checkpoint(tmp_path / "w2"))
    for r in range(2):
        assert rng_file(f"{tmp_path / 'w2.pt'}.rng{r}") == rng_file(saved3 / f"rng-{r}.json"), r

    shutil.copytree(tmp_path / "w4", tmp_path / "w1")
    flip_byte(tmp_path / "w1" / "ckpt-000006" / "__1_0.distcp")
    model1, _, _ = trainer_setup()
    draws = RankDraws(0)
    with caplog.at_level("WARNING"):
        one = train(model1, data, data, cfg, out_dir=tmp_path / "w1", resume=True, hooks=[RouterBiasUpdate(), draws])
    assert f"{tmp_path / 'w1' / 'ckpt-000006' / '__1_0.distcp'}: sha256 checksum mismatch" in caplog.text
    assert f"resuming from {tmp_path / 'w1' / 'ckpt-000003'}" in caplog.text
    assert "resuming 4 ranks' checkpoint at 1: rank r continues saved rank r's RNG streams" in caplog.text
    assert draws.resumed == rng_file(saved3 / "rng-0.json")
    assert_continues(one, single, after=3)

    resume_copy(tmp_path / "single", tmp_path / "s2", 3)
    run_local(trainer_run, 2, 2, str(tmp_path / "s2"), True, False, str(tmp_path / "s2.pt"), timeout=900)
    assert_continues(torch.load(tmp_path / "s2.pt"), single, after=3)
    assert rng_file(f"{tmp_path / 's2.pt'}.rng0") == read_state(tmp_path / "single" / "ckpt-000003")["rng"]
    reseed(3, 1)
    assert rng_file(f"{tmp_path / 's2.pt'}.rng1") == json.loads(json.dumps(rng_state()))

    sharded = load_model(tmp_path / "w4")
    assert model.layers[0].ffn.router.bias.abs().sum() > 0  # the bias balancing was active
    for k, w in model.state_dict().items():
        torch.testing.assert_close(sharded.state_dict()[k], w, **WEIGHT_TOL, msg=k)
