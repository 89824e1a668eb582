"""`torchrun --nproc-per-node 2 -m moekit train --expert-parallel 2`: end to end on localhost."""

import os
import subprocess
import sys
import textwrap

import torch

from moekit.distributed.launch import free_port
from moekit.train.checkpoint import load_model


def test_torchrun_train_expert_parallel(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):  # a tiny corpus: train and val files
        (data / f"doc{i}.py").write_text(textwrap.dedent(f"""
            def f{i}(x):
                return [x * k + {i} for k in range(10)]
            """) * 20)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "moekit", "train", "--expert-parallel", "2",
           "--data", str(data), "--vocab-size", "300", "--steps", "3", "--batch-size", "4", "--seq-len", "32",
           "--eval-every", "3", "--out", str(run), "--no-progress"]
    env = dict(os.environ, MOEKIT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("val loss") == 1, proc.stdout  # only rank 0 prints
    model = load_model(run)  # the checkpoint is in the single-process layout: all 8 experts
    assert model.layers[0].ffn.experts.w_up_EFD.shape[0] == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())
