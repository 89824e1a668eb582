import json

import pytest

from moekit.cli import main
from moekit.config import ModelConfig, MoEConfig, RouterConfig


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    for i in range(4):
        (folder / f"doc{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(150)))
    with pytest.MonkeyPatch.context() as mp:  # one tokenizer/token cache for the module
        mp.setenv("MOEKIT_CACHE", str(folder.parent / "cache"))
        yield folder


def _train(docs, out, steps, *extra):
    model_json = docs.parent / "model.json"  # a small model through --config (the vocabulary follows the data)
    model_json.write_text(json.dumps(ModelConfig(
        vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
        moe=MoEConfig(d_model=32, num_experts=4, expert_hidden=32, router=RouterConfig(top_k=2))).to_dict()))
    return main(["train", "--data", str(docs), "--config", str(model_json), "--vocab-size", "300", "--steps", str(steps), "--batch-size", "2",
                 "--seq-len", "16", "--save-every", "2", "--eval-every", "2", "--out", str(out), "--no-progress", *extra])


def test_train_resume_and_generate_from_the_command_line(docs, tmp_path, capsys):
    assert _train(docs, tmp_path / "full", 4) == 0
    assert _train(docs, tmp_path / "half", 2) == 0
    assert _train(docs, tmp_path / "half", 4, "--resume") == 0
    def losses(run):
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in recs]

    assert losses(tmp_path / "half") == losses(tmp_path / "full")  # the resumed run appends exactly the uninterrupted run's records
    assert (tmp_path / "half" / "latest").read_text() == "ckpt-000004"
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "half"), "--prompt", "def f0", "--max-new-tokens", "6",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def f0")
    assert main(["generate", str(tmp_path / "half"), "--prompt", "", "--max-new-tokens", "3"]) == 0
    assert main(["generate", str(tmp_path / "half"), "--prompt", "x = 1\n" * 40]) == 2
    assert "--prompt is" in capsys.readouterr().err


def test_inspect_encodes_other_data_with_the_checkpoints_tokenizer(docs, tmp_path, capsys, monkeypatch):
    """inspect on data the model was not trained on: the token ids must be the checkpoint tokenizer's, not those
    of a tokenizer trained afresh on the new data."""
    from moekit.analysis import report
    from moekit.train.tokenizer import Tokenizer

    assert _train(docs, tmp_path / "run", 2) == 0
    other = tmp_path / "other"
    other.mkdir()
    text = "".join(f"class Widget{i}:\n    size = {i * 7}\n" for i in range(200))
    (other / "w.py").write_text(text)
    seen = {}
    real = report.inspect_model

    def spy(model, corpus, out, **kw):
        seen["corpus"] = corpus
        return real(model, corpus, out, **kw)

    monkeypatch.setattr(report, "inspect_model", spy)
    assert main(["inspect", str(tmp_path / "run"), "--data", str(other), "--batches", "1", "--batch-size", "2",
                 "--seq-len", "16", "--out", str(tmp_path / "insp")]) == 0
    trained = Tokenizer.load(tmp_path / "run" / "tokenizer.json")
    corpus = seen["corpus"]
    assert corpus.tokenizer.encode(text[:200]) == trained.encode(text[:200])
    assert (tmp_path / "insp" / "report.md").is_file()


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "/no/such/dir", "--no-progress"], "data path '/no/such/dir' does not exist"),
    (["train", "--config", "/no/model.json", "--no-progress"], "--config '/no/model.json' does not exist"),
    (["train", "--preset", "huge", "--no-progress"], "preset='huge': unknown"),
    (["train", "--lr", "-1", "--no-progress"], "TrainConfig.lr=-1"),
    (["train", "--resume", "--no-progress"], "--resume needs --out"),
    (["generate", "/no/run"], "checkpoint path '/no/run' does not exist"),
])
def test_bad_arguments_give_one_line_errors_naming_them(docs, argv, message, capsys):
    if argv[0] == "train" and "--data" not in argv:
        argv = argv[:1] + ["--data", str(docs), "--vocab-size", "300"] + argv[1:]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
