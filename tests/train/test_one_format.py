"""One model format: the folders prune, merge, extract and upcycle write work in generate, inspect and finetune,
and finetune's output of a transformed model loads again with the same structure."""
import json

import pytest
import torch

from moekit.cli import main
from moekit.config import ModelConfig, MoEConfig, RouterConfig
from moekit.layers.moe import MoELayer
from moekit.train.checkpoint import load_model
from tests.corpus import write_docs


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_format")
    docs = write_docs(root / "docs", "def h{i}_{j}(y):\n    return y * {j}\n", 120)
    (root / "model.json").write_text(json.dumps(ModelConfig(
        vocab_size=300, d_model=16, n_layers=2, n_heads=2, max_seq_len=64,
        moe=MoEConfig(d_model=16, num_experts=4, expert_hidden=16, router=RouterConfig(top_k=2))).to_dict()))
    data = ["--data", str(docs), "--batch-size", "2", "--seq-len", "16", "--batches", "1"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEKIT_CACHE", str(root / "cache"))
        for label, extra in (("moe", []), ("dense", ["--dense"])):
            assert main(["train", "--data", str(docs), "--config", str(root / "model.json"), "--vocab-size", "300",
                         "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--out", str(root / label),
                         "--no-progress", *extra]) == 0
        for cmd, args in (("prune", ["--keep", "2"]), ("merge", ["--num-experts", "3"]),
                          ("extract", ["--min-share", "0.2"])):
            assert main([cmd, str(root / "moe"), str(root / cmd), *data, *args]) == 0, cmd
        assert main(["upcycle", str(root / "dense"), str(root / "upcycle"), "--num-experts", "4", "--top-k", "2"]) == 0
        yield root, data


@pytest.mark.parametrize("name", ["prune", "merge", "extract", "upcycle"])
def test_generate_inspect_finetune_take_every_output(outputs, name, capsys):
    root, data = outputs
    folder = root / name
    before = load_model(folder)
    experts = [m.cfg.num_experts for m in before.modules() if isinstance(m, MoELayer)]
    assert experts == {"prune": [2, 2], "merge": [3, 3], "upcycle": [4, 4]}.get(name, experts)
    capsys.readouterr()
    assert main(["generate", str(folder), "--prompt", "def h0", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def h0")
    assert main(["inspect", str(folder), *data, "--out", str(root / f"inspect-{name}")]) == 0
    assert (root / f"inspect-{name}" / "report.md").is_file()
    ft = root / f"ft-{name}"
    assert main(["finetune", str(folder), *data, "--recipe", "moe_full", "--steps", "1", "--out", str(ft),
                 "--no-progress"]) == 0
    after = load_model(ft)  # the fine-tuned transformed model keeps its structure
    assert [m.cfg.num_experts for m in after.modules() if isinstance(m, MoELayer)] == experts
    assert before.state_dict().keys() == after.state_dict().keys()
    assert any(not torch.equal(v, after.state_dict()[k]) for k, v in before.state_dict().items())
    assert main(["generate", str(ft), "--max-new-tokens", "2"]) == 0


def test_a_folder_of_two_models_names_them(outputs, tmp_path, capsys):
    root, _ = outputs
    import shutil

    for label in ("moe", "dense"):  # the layout of a demo / compare folder
        shutil.copytree(root / label, tmp_path / label)
    capsys.readouterr()
    assert main(["generate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"holds 2 models; pass one of them: {tmp_path / 'dense'}, {tmp_path / 'moe'}" in err


def test_upcycle_without_a_tokenizer_says_what_is_missing(outputs, tmp_path, capsys):
    root, _ = outputs
    model = load_model(root / "dense")
    from moekit.train.checkpoint import save_model

    save_model(tmp_path / "dense", model)  # a model folder without tokenizer.json
    assert main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--num-experts", "2"]) == 0
    assert load_model(tmp_path / "moe").cfg.moe.num_experts == 2  # the model loads
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "moe")]) == 2
    assert "no tokenizer.json in it or its run folder" in capsys.readouterr().err
