"""`moekit train` under torchrun on localhost: 4 processes (EP=2 x FSDP=2) save sharded checkpoints, 2
processes (EP=2) resume them with asynchronous saves; the result loads whole in one process and converts
to a Hugging Face Mixtral folder. These are the command lines the README's distributed section shows."""

import os
import subprocess
import sys
import textwrap

import torch

from moekit.cli import main
from moekit.distributed.dcp import is_sharded
from moekit.distributed.launch import free_port
from moekit.interop.hf import load_hf
from moekit.train.checkpoint import load_model, resolve_checkpoint


def torchrun(nproc: int, *args: str, env: dict) -> str:
    """stdout and stderr of `moekit train` on ``nproc`` local processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "moekit", "train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_torchrun_train_fsdp_ep_and_resume_elsewhere(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):  # a tiny corpus: train and val files
        (data / f"doc{i}.py").write_text(textwrap.dedent(f"""
            def f{i}(x):
                return [x * k + {i} for k in range(10)]
            """) * 20)
    run = tmp_path / "run"
    env = dict(os.environ, MOEKIT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    common = ["--expert-parallel", "2", "--data", str(data), "--vocab-size", "300", "--batch-size", "4",
              "--seq-len", "32", "--save-every", "2", "--out", str(run), "--no-progress"]
    out = torchrun(4, *common, "--steps", "2", env=env)
    assert out.count("val loss") == 1, out  # only rank 0 prints
    assert is_sharded(resolve_checkpoint(run)) and resolve_checkpoint(run).name == "ckpt-000002"
    out = torchrun(2, *common, "--steps", "4", "--resume", "--async-save", env=env)
    assert "step 4: val loss" in out, out
    assert out.count("resuming 4 ranks' checkpoint at 2: rank r continues saved rank r's RNG streams; the streams "
                     "of saved ranks 2-3 are not used") == 1, out
    assert resolve_checkpoint(run).name == "ckpt-000004"
    model = load_model(run)  # the sharded checkpoint read whole: all 8 experts of the tiny preset
    assert model.layers[0].ffn.experts.w_up_EFD.shape[0] == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # `moekit convert runs/ep2 runs/ep2-hf --to hf --model-type mixtral`: the HF folder holds the same model
    assert main(["convert", str(run), str(tmp_path / "hf"), "--to", "hf", "--model-type", "mixtral"]) == 0
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path / "hf")(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
