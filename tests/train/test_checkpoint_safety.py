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
from moekit.distributed import dcp
from moekit.errors import CheckpointError
from moekit.models.decoder import MoETransformer
from moekit.train import checkpoint as ckpt
from moekit.train.data import TokenStream
from moekit.train.rng import rng_state, set_rng_state
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
    path = ckpt.save_checkpoint(tmp_path, 1, model, model.cfg, {"optimizer": opt.state_dict(), "rng": rng_state()})
    draws = torch.rand(3), random.random(), np.random.rand()
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "manifest.json", "model.safetensors",
                                                      "optimizer.safetensors", "trainer_state.json"]
    for f in path.iterdir():
        assert not f.read_bytes().startswith(b"\x80"), f  # no pickle stream anywhere
    _, _, state = ckpt.load_checkpoint(path)
    set_rng_state(state["rng"])
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


@pytest.mark.parametrize("target", [".metadata", "__0_0.distcp"])
def test_sharded_checkpoint_pickles_run_no_code(run, sharded_run, tmp_path, capsys, target):
    """DCP itself unpickles .metadata and non-tensor entries. Whoever can write the files can also rewrite the
    manifest: the payload must be refused by the loader, not only by the checksums."""
    import torch.distributed.checkpoint as torch_dcp

    from moekit.train.manifest import write_manifest

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    shutil.copytree(sharded_run, evil)
    folder = evil / "ckpt-000006"
    if target == ".metadata":
        (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    else:  # a valid checkpoint whose one non-tensor entry is the payload
        model = ckpt.load_model(folder)
        for f in folder.glob("*.distcp"):
            f.unlink()
        torch_dcp.save({"model": model.state_dict(), "optim": {"param_groups": [{"lr": Payload(marker)}]}},
                       checkpoint_id=str(folder))
        torch_dcp.load({"optim": {"param_groups": [{"lr": None}]}}, checkpoint_id=str(folder))
        assert marker.exists()  # the payload is live: DCP's own load runs it
        marker.unlink()
    (folder / "manifest.json").unlink()
    write_manifest(folder, "moekit sharded checkpoint")
    for argv in (["generate", str(evil)], ["inspect", str(evil), *data_args(run)],
                 ["convert", str(evil), str(tmp_path / "hf"), "--to", "hf"]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        one_line_error(capsys, folder / target)
    capsys.readouterr()
    assert train_cli(run, evil, "--resume") == 2
    one_line_error(capsys, folder / target)
    assert not marker.exists()


# ----------------------------------------------------------------------------- damage is detected and named
def flip_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def sharded_run(run, tmp_path_factory):
    """The CLI run's checkpoints 4 and 6 (weights, AdamW state, RNG) written again through the sharded (DCP)
    path by one process, into a run folder with the run's tokenizer."""
    out = tmp_path_factory.mktemp("sharded") / "run"
    out.mkdir()
    shutil.copyfile(run / "run" / "tokenizer.json", out / "tokenizer.json")  # copied into each checkpoint
    for step in (4, 6):
        cfg, tensors, state = ckpt.load_checkpoint(run / "run" / f"ckpt-{step:06d}")
        model = MoETransformer(cfg)
        model.load_state_dict(tensors, strict=False)
        opt = make_optimizer(model, TrainConfig())
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        dcp.save(out, step, model, opt, None, cfg.to_dict(), {"train_config": state["train_config"]})
    return out


MODEL_FILES = ["model.safetensors", "config.json", "trainer_state.json", "optimizer.safetensors", "tokenizer.json",
               "manifest.json"]
SHARDED_FILES = [".metadata", "__0_0.distcp", "rng-0.json", "config.json", "trainer_state.json", "tokenizer.json",
                 "manifest.json"]


def copy_of(kind: str, run: Path, request, dst: Path) -> Path:
    """A copy of the CLI run (single-process checkpoints) or of the same checkpoints written sharded."""
    shutil.copytree(run / "run" if kind == "model" else request.getfixturevalue("sharded_run"), dst)
    assert sorted(p.name for p in (dst / "ckpt-000006").iterdir()) == sorted(
        MODEL_FILES if kind == "model" else SHARDED_FILES)
    return dst


@pytest.mark.parametrize("kind,name", [("model", n) for n in MODEL_FILES] + [("sharded", n) for n in SHARDED_FILES])
def test_flipped_byte_is_a_one_line_error_naming_the_file(run, tmp_path, capsys, request, kind, name):
    damaged = copy_of(kind, run, request, tmp_path / "run")
    flip_byte(damaged / "ckpt-000006" / name)
    for argv in (["generate", str(damaged)], ["inspect", str(damaged), *data_args(run)],
                 ["convert", str(damaged), str(tmp_path / "hf"), "--to", "hf"]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        one_line_error(capsys, damaged / "ckpt-000006" / name)


@pytest.mark.parametrize("kind,name", [("model", "model.safetensors"), ("sharded", "__0_0.distcp")])
def test_resume_falls_back_to_the_newest_intact_checkpoint_bit_identically(run, tmp_path, capsys, request, kind,
                                                                           name):
    """Sharded: resumed in one process, from the sharded step-4 checkpoint."""
    good = load_file(run / "run" / "ckpt-000006" / "model.safetensors")
    damaged = copy_of(kind, run, request, tmp_path / "run")
    flip_byte(damaged / "ckpt-000006" / name)
    capsys.readouterr()
    assert train_cli(run, damaged, "--resume") == 0
    out = capsys.readouterr().out
    assert f"checkpoint {damaged / 'ckpt-000006'} is damaged: {damaged / 'ckpt-000006' / name}" in out
    assert f"resuming from {damaged / 'ckpt-000004'} (the newest intact checkpoint)" in out
    again = load_file(damaged / "ckpt-000006" / "model.safetensors")  # steps 5-6 trained again
    assert good.keys() == again.keys() and all(torch.equal(good[k], again[k]) for k in good)


def test_sharded_checkpoint_loads_unchecked_with_no_verify(sharded_run, tmp_path):
    damaged = tmp_path / "run"
    shutil.copytree(sharded_run, damaged)
    (damaged / "ckpt-000006" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="ckpt-000006/manifest.json: missing"):
        ckpt.load_model(damaged)
    want = ckpt.load_model(sharded_run)
    got = ckpt.load_model(damaged, verify=False)
    assert all(torch.equal(got.state_dict()[k], w) for k, w in want.state_dict().items())


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


def truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])


def test_damaged_tokenizer_is_a_one_line_error_naming_it(run, tmp_path, capsys):
    """Tokenizer.load is where every command reads a tokenizer: the run folder's (a checkpoint without its own
    copy) or the checkpoint's own (unchecked with --no-verify)."""
    model = ckpt.load_model(run / "run")
    bare = tmp_path / "bare"
    ckpt.save_checkpoint(bare, 6, model, model.cfg)  # no tokenizer.json in the run folder yet: none copied in
    shutil.copyfile(run / "run" / "tokenizer.json", bare / "tokenizer.json")
    truncate(bare / "tokenizer.json")
    own = tmp_path / "own"
    shutil.copytree(run / "run", own)
    truncate(own / "ckpt-000006" / "tokenizer.json")
    for bad, argv in ((bare / "tokenizer.json", [str(bare)]), (own / "ckpt-000006" / "tokenizer.json",
                                                                 [str(own), "--no-verify"])):
        for cmd in (["generate"], ["inspect", *data_args(run)]):
            capsys.readouterr()
            assert main([cmd[0], *argv, *cmd[1:]]) == 2, (cmd, argv)
            one_line_error(capsys, f"{bad}: not a readable tokenizer file")
    (bare / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {}, "merges": []}}')
    capsys.readouterr()
    assert main(["generate", str(bare)]) == 2
    one_line_error(capsys, f"{bare / 'tokenizer.json'}: has no <|endoftext|> token")


# ----------------------------------------------------------------------------- killed saves, rotation
KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    from moekit.config import ModelConfig, MoEConfig
    from moekit.models.decoder import MoETransformer
    from moekit.distributed import dcp
    from moekit.train import checkpoint as ckpt, manifest
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=32,
                                       moe=MoEConfig(d_model=16, num_experts=4, expert_hidden=16)))
    def save(step):  # a single-process checkpoint, or a sharded one (DCP) written by one process
        if sys.argv[2] == "sharded":
            dcp.save(sys.argv[1], step, model, None, None, model.cfg.to_dict(), {})
        else:
            ckpt.save_checkpoint(sys.argv[1], step, model, model.cfg)
    save(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real = manifest.file_digest
    def digest_then_die(path):  # SIGKILL once the second checkpoint's files are partly written
        real(path)
        os.kill(os.getpid(), signal.SIGKILL)
    manifest.file_digest = digest_then_die
    save(2)
""")


@pytest.mark.parametrize("kind", ["model", "sharded"])
def test_save_killed_midway_keeps_the_previous_checkpoint_and_is_cleaned_up(tmp_path, kind):
    env = dict(os.environ, PYTHONPATH=str(SRC.parent))
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path), kind], env=env, capture_output=True)
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


SAVE = {"model": lambda run_dir, step, model, keep_last: ckpt.save_checkpoint(run_dir, step, model, model.cfg,
                                                                             keep_last=keep_last),
        "sharded": lambda run_dir, step, model, keep_last: dcp.save(run_dir, step, model, None, None,
                                                                    model.cfg.to_dict(), {}, keep_last=keep_last)}


@pytest.mark.parametrize("kind", SAVE)
def test_rotation_follows_the_order_of_writing(tmp_path, kind):
    model = tiny_model()
    for step in (300, 250, 20):  # a second run written into the same folder: names sort the other way
        SAVE[kind](tmp_path, step, model, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000020", "ckpt-000250"]
    assert (tmp_path / "latest").read_text() == "ckpt-000020"
    assert ckpt.resolve_checkpoint(tmp_path).name == "ckpt-000020"
    SAVE[kind](tmp_path, 250, model, keep_last=1)  # re-saving a step makes it the newest
    assert [p.name for p in tmp_path.glob("ckpt-*")] == ["ckpt-000250"]
    assert (tmp_path / "checkpoints.txt").read_text() == "ckpt-000250\n"
