"""`moekit finetune / distill / merge / prune / extract` end to end on a tiny trained checkpoint."""
import json

import pytest
import torch

from moekit.cli import main
from moekit.config import ModelConfig, MoEConfig, RouterConfig
from moekit.train.checkpoint import load_model
from tests.corpus import write_docs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy_cli")
    docs = write_docs(root / "docs", "def f{i}_{j}(x):\n    return x * {j}\n", 150)
    cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                      moe=MoEConfig(d_model=32, num_experts=4, expert_hidden=32, router=RouterConfig(top_k=2)))
    (root / "model.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEKIT_CACHE", str(root / "cache"))
        assert main(["train", "--data", str(docs), "--config", str(root / "model.json"), "--vocab-size", "300",
                     "--steps", "6", "--batch-size", "2", "--seq-len", "16", "--out", str(root / "run"),
                     "--no-progress"]) == 0
        yield root


def _data(run):
    return ["--data", str(run / "docs"), "--batch-size", "2", "--seq-len", "16", "--batches", "2"]


def test_finetune_freeze_moe_leaves_experts_and_routers_untouched(run, capsys):
    capsys.readouterr()
    assert main(["finetune", str(run / "run"), *_data(run), "--recipe", "moe", "--steps", "3",
                 "--out", str(run / "ft"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "trainable params:" in out and "val loss:" in out
    before, after = load_model(run / "run").state_dict(), load_model(run / "ft").state_dict()
    expert_keys = [k for k in before if ".ffn.experts." in k or ".ffn.router." in k]
    other_keys = [k for k in before if k not in expert_keys and before[k].is_floating_point()]
    assert expert_keys and all(torch.equal(before[k], after[k]) for k in expert_keys)
    assert any(not torch.equal(before[k], after[k]) for k in other_keys)


def test_prune_merge_extract_save_smaller_models_that_load(run, capsys):
    for cmd, args, experts in [("prune", ["--keep", "2"], 2), ("merge", ["--num-experts", "3"], 3),
                               ("extract", ["--min-share", "0.0"], 4)]:
        capsys.readouterr()
        assert main([cmd, str(run / "run"), str(run / cmd), *_data(run), *args]) == 0, cmd
        out = capsys.readouterr().out
        assert "params:" in out and "val loss:" in out, cmd
        model = load_model(run / cmd)
        layers = [m for m in model.modules() if type(m).__name__ == "MoELayer"]
        assert layers and all(m.cfg.num_experts == experts for m in layers), cmd
        logits = model(torch.randint(0, 300, (1, 8))).logits
        assert logits.shape == (1, 8, 300) and torch.isfinite(logits).all()


def test_distill_reports_gain_retained(run, capsys):
    capsys.readouterr()
    assert main(["distill", str(run / "run"), *_data(run), "--steps", "3", "--out", str(run / "kd"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "KD student" in out and "gain retained" in out


@pytest.mark.parametrize("argv, message", [
    (["prune", "/no/such/run", "x", "--keep", "1"], "/no/such/run"),
    (["prune", "RUN", "x"], "give exactly one of --keep N"),
    (["prune", "RUN", "x", "--keep", "9"], "keep=9: must be an integer in [1, num_experts=4]"),
    (["merge", "RUN", "x", "--num-experts", "0"], "--num-experts=0: must be >= 1"),
    (["extract", "RUN", "x", "--min-share", "1.5"], "min_share=1.5: must be a load share in [0, 1]"),
])
def test_deploy_commands_give_one_line_errors_naming_the_argument(run, argv, message, capsys):
    argv = [str(run / "run") if a == "RUN" else str(run / a) if a == "x" else a for a in argv]
    if argv[1] != "/no/such/run":
        argv += _data(run)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
