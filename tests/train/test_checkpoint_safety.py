"""Checkpoints: nothing runs on load, damage is detected and named, resume falls back to an intact checkpoint,
killed saves leave nothing behind, rotation follows the order of writing."""
import ast
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moekit.cli import main
from moekit.config import ModelConfig, MoEConfig, RouterConfig, TrainConfig
from moekit.errors import CheckpointError
from moekit.models.decoder import MoETransformer
from moekit.train import checkpoint as ckpt
from moekit.train.data import TokenStream
from moekit.train.trainer import make_optimizer, train
from tests.corpus import write_docs

SRC = Path(ckpt.__file__).parents[1]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return MoETransformer(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=32,
                                      moe=MoEConfig(d_model=16, num_experts=4, expert_hidden=16)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run trained through the CLI: 6 steps, checkpoints at 4 and 6 (keep-last 2)."""
    root = tmp_path_factory.mktemp("safety")
    write_docs(root / "docs", "def g{i}_{j}(x):\n    return x - {j}\n", 120)
    (root / "model.json").write_text(json.dumps(ModelConfig(
        vocab_size=300, d_model=16, n_layers=2, n_heads=2, max_seq_len=64,
        moe=MoEConfig(d_model=16, num_experts=4, expert_hidden=16, router=RouterConfig(top_k=2))).to_dict()))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEKIT_CACHE", str(root / "cache"))
        assert train_cli(root, root / "run") == 0
        yield root


def train_cli(root, out, *extra):
    return main(["train", "--data", str(root / "docs"), "--config", str(root / "model.json"), "--vocab-size", "300",
                 "--steps", "6", "--batch-size", "2", "--seq-len", "16", "--save-every", "2", "--eval-every", "3",
                 "--out", str(out), "--no-progress", *extra])


def data_args(root):
    return ["--data", str(root / "docs"), "--batch-size", "2", "--seq-len", "16", "--batches", "1"]


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert str(n) in err, (n, err)
    return err


# ----------------------------------------------------------------------------- nothing runs on load
class Payload:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_no_unsafe_torch_load_in_src():
    for f in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("torch.load"):
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert kw.get("weights_only") == "True", f"{f}:{node.lineno}: {ast.unparse(node)}"


def test_checkpoint_holds_no_pickle_and_restores_optimizer_and_rng(tmp_path):
    model = tiny_model()
    opt = make_optimizer(model, TrainConfig())
    model(torch.randint(0, 64, (2, 8))).logits.sum().backward()
    opt.step()
    torch.manual_seed(3), random.seed(4), np.random.seed(5)
    path = ckpt.save_checkpoint(tmp_path, 1, model, model.cfg, {"optimizer": opt.state_dict(), "rng": ckpt.rng_state()})
    draws = torch.rand(3), random.random(), np.random.rand()
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "manifest.json", "model.safetensors",
                                                      "optimizer.safetensors", "trainer_state.json"]
    for f in path.iterdir():
        assert not f.read_bytes().startswith(b"\x80"), f  # no pickle stream anywhere
    _, _, state = ckpt.load_checkpoint(path)
    ckpt.set_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), draws[0]) and random.random() == draws[1] and np.random.rand() == draws[2]
    saved, loaded = opt.state_dict(), state["optimizer"]
    assert loaded["param_groups"] == saved["param_groups"]
    for i, s in saved["state"].items():
        assert s.keys() == loaded["state"][i].keys() and all(torch.equal(v, loaded["state"][i][k]) for k, v in s.items())
    opt2 = make_optimizer(tiny_model(), TrainConfig())
    opt2.load_state_dict(loaded)  # loads into a fresh AdamW


@pytest.mark.parametrize("no_verify", [[], ["--no-verify"]])
def test_pickle_payloads_run_no_code(run, tmp_path, capsys, no_verify):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()  # the payload is live: unpickling it does run code
    marker.unlink()
    evil = tmp_path / "evil"
    shutil.copytree(run / "run", evil)
    blob = pickle.dumps(Payload(marker))
    for folder in evil.glob("ckpt-*"):
        for f in list(folder.iterdir()) + [folder / "trainer_state.pt"]:
            f.write_bytes(blob)
    cmds = [["generate", str(evil)], ["inspect", str(evil), *data_args(run)],
            ["convert", str(evil), str(tmp_path / "hf"), "--to", "hf"]]
    for argv in cmds:
        capsys.readouterr()
        assert main(argv + no_verify) == 2, argv
        one_line_error(capsys, evil / "ckpt-000006")
    capsys.readouterr()
    assert train_cli(run, evil, "--resume", *no_verify) == 2
    one_line_error(capsys, evil / "ckpt-000006")
    assert not marker.exists()


# ----------------------------------------------------------------------------- damage is detected and named
def flip_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "trainer_state.json", "optimizer.safetensors",
                                  "tokenizer.json", "manifest.json"])
def test_flipped_byte_is_a_one_line_error_naming_the_file(run, tmp_path, capsys, name):
    damaged = tmp_path / "run"
    shutil.copytree(run / "run", damaged)
    flip_byte(damaged / "ckpt-000006" / name)
    for argv in (["generate", str(damaged)], ["inspect", str(damaged), *data_args(run)],
                 ["convert", str(damaged), str(tmp_path / "hf"), "--to", "hf"]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        one_line_error(capsys, damaged / "ckpt-000006" / name)


def test_resume_falls_back_to_the_newest_intact_checkpoint_bit_identically(run, tmp_path, capsys):
    good = load_file(run / "run" / "ckpt-000006" / "model.safetensors")
    damaged = tmp_path / "run"
    shutil.copytree(run / "run", damaged)
    flip_byte(damaged / "ckpt-000006" / "model.safetensors")
    capsys.readouterr()
    assert train_cli(run, damaged, "--resume") == 0
    out = capsys.readouterr().out
    assert f"checkpoint {damaged / 'ckpt-000006'} is damaged: {damaged / 'ckpt-000006' / 'model.safetensors'}" in out
    assert f"resuming from {damaged / 'ckpt-000004'} (the newest intact checkpoint)" in out
    again = load_file(damaged / "ckpt-000006" / "model.safetensors")  # steps 5-6 trained again
    assert good.keys() == again.keys() and all(torch.equal(good[k], again[k]) for k in good)


def test_no_intact_checkpoint_is_an_error_naming_each(tmp_path):
    model = tiny_model()
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, model, model.cfg)
    flip_byte(tmp_path / "ckpt-000002" / "config.json")
    (tmp_path / "ckpt-000001" / "manifest.json").unlink()
    with pytest.raises(CheckpointError) as err:
        ckpt.newest_intact(tmp_path)
    assert "ckpt-000002/config.json" in str(err.value) and "ckpt-000001/manifest.json: missing" in str(err.value)
    assert ckpt.newest_intact(tmp_path, verify=False)[0].name == "ckpt-000002"


def test_files_added_after_saving_are_refused(tmp_path):
    model = tiny_model()
    path = ckpt.save_checkpoint(tmp_path, 1, model, model.cfg)
    (path / "layers.json").write_text("{}")
    with pytest.raises(CheckpointError, match="layers.json: not listed in manifest.json"):
        ckpt.load_model(tmp_path)


# ----------------------------------------------------------------------------- killed saves, rotation
KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    from moekit.config import ModelConfig, MoEConfig
    from moekit.models.decoder import MoETransformer
    from moekit.train import checkpoint as ckpt
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=32,
                                       moe=MoEConfig(d_model=16, num_experts=4, expert_hidden=16)))
    ckpt.save_checkpoint(sys.argv[1], 1, model, model.cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real = ckpt.file_digest
    def digest_then_die(path):  # SIGKILL once the second checkpoint's files are partly written
        real(path)
        os.kill(os.getpid(), signal.SIGKILL)
    ckpt.file_digest = digest_then_die
    ckpt.save_checkpoint(sys.argv[1], 2, model, model.cfg)
""")


def test_save_killed_midway_keeps_the_previous_checkpoint_and_is_cleaned_up(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(SRC.parent))
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path)], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert [p.name.split(".tmp-")[0] for p in tmp_path.glob(".*.tmp-*")] == [".ckpt-000002"]  # left by the kill
    assert (tmp_path / "latest").read_text() == "ckpt-000001" and not (tmp_path / "ckpt-000002").exists()
    model = ckpt.load_model(tmp_path)  # verified against its manifest
    assert torch.equal(model.state_dict()["embed.weight"], tiny_model().state_dict()["embed.weight"])
    ckpt.save_checkpoint(tmp_path, 3, model, model.cfg)  # the next save removes the leftovers
    assert not list(tmp_path.glob(".*.tmp-*"))
    (tmp_path / ".ckpt-000009.tmp-x").mkdir()  # ... and so does the start of training
    train(model, TokenStream(torch.arange(500) % 64), None,
          TrainConfig(steps=1, batch_size=1, seq_len=8, warmup_steps=0, eval_every=0), out_dir=tmp_path)
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_rotation_follows_the_order_of_writing(tmp_path):
    model = tiny_model()
    for step in (300, 250, 20):  # a second run written into the same folder: names sort the other way
        ckpt.save_checkpoint(tmp_path, step, model, model.cfg, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000020", "ckpt-000250"]
    assert (tmp_path / "latest").read_text() == "ckpt-000020"
    assert ckpt.resolve_checkpoint(tmp_path).name == "ckpt-000020"
    ckpt.save_checkpoint(tmp_path, 250, model, model.cfg, keep_last=1)  # re-saving a step makes it the newest
    assert [p.name for p in tmp_path.glob("ckpt-*")] == ["ckpt-000250"]
    assert (tmp_path / "checkpoints.txt").read_text() == "ckpt-000250\n"
