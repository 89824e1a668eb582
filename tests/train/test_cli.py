import json
import re
from pathlib import Path

import pytest

from moekit.cli import main
from moekit.config import ModelConfig, MoEConfig, RouterConfig
from tests.corpus import write_docs


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    folder = write_docs(tmp_path_factory.mktemp("docs"), "def f{i}_{j}(x):\n    return x + {j}\n", 150)
    with pytest.MonkeyPatch.context() as mp:  # one tokenizer/token cache for the module
        mp.setenv("MOEKIT_CACHE", str(folder.parent / "cache"))
        yield folder


def _model_json(docs):
    model_json = docs.parent / "model.json"  # a small model through --config (the vocabulary follows the data)
    model_json.write_text(json.dumps(ModelConfig(
        vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
        moe=MoEConfig(d_model=32, num_experts=4, expert_hidden=32, router=RouterConfig(top_k=2))).to_dict()))
    return model_json


def _tiny_train_args(docs, steps):
    return ["train", "--data", str(docs), "--config", str(_model_json(docs)), "--vocab-size", "300",
            "--steps", str(steps), "--batch-size", "2", "--seq-len", "16", "--no-progress"]


def _train(docs, out, steps, *extra):
    return main([*_tiny_train_args(docs, steps), "--save-every", "2", "--eval-every", "2", "--out", str(out), *extra])


def _losses(run):
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in recs]


def test_train_resume_and_generate_from_the_command_line(docs, tmp_path, capsys):
    assert _train(docs, tmp_path / "full", 4) == 0
    assert _train(docs, tmp_path / "half", 2) == 0
    assert _train(docs, tmp_path / "half", 4, "--resume") == 0
    assert _losses(tmp_path / "half") == _losses(tmp_path / "full")  # the resumed run appends exactly the uninterrupted run's records
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
    (["generate", "/no/run"], "/no/run: does not exist"),
])
def test_bad_arguments_give_one_line_errors_naming_them(docs, argv, message, capsys):
    if argv[0] == "train" and "--data" not in argv:
        argv = argv[:1] + ["--data", str(docs), "--vocab-size", "300"] + argv[1:]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_help_does_not_import_torch():
    """`moekit --help` and every `moekit CMD --help` run without importing torch (a fast, light CLI)."""
    import subprocess
    import sys

    from moekit.cli import _COMMANDS

    code = ("import sys\nfrom moekit import cli\n"
            "for argv in [['--help']] + [[c, '--help'] for c in sys.argv[1:]]:\n"
            "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch imported:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *_COMMANDS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("torch imported: False")


def test_every_option_has_help_a_shown_default_and_every_command_examples(capsys):
    import argparse

    from moekit.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in subparsers.items():
        assert sub.epilog and f"moekit {name}" in sub.epilog, name  # usage examples
        for action in sub._actions:
            assert action.help, f"moekit {name} {action.option_strings or action.dest}: no help text"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split("options:")[1].split())  # argparse wraps lines
    for option, default in [("--steps", 600), ("--batch-size", 16), ("--seq-len", 128), ("--lr", 0.003),
                            ("--seed", 0), ("--save-every", 100), ("--expert-parallel", 0)]:
        assert re.search(rf"{option} \S+ (?:(?! --[a-z]).)*?\(default: {default}\)", text), option
    assert subparsers["experiments"].parse_args([]).out != "docs"  # --quick must not overwrite the committed report
    assert "--vocab-size" not in subparsers["inspect"].format_help()  # inspect uses the checkpoint's tokenizer


def test_every_help_example_parses_and_finetune_examples_name_a_valid_recipe():
    """The examples under each command's --help use options that exist, with values the command accepts."""
    import argparse
    import shlex

    from moekit.cli import build_parser
    from moekit.train.finetune import get_recipe

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    examples = [line.split("#")[0] for sub in subparsers.values() for line in sub.epilog.splitlines()
                if line.strip().startswith("moekit ")]
    assert len(examples) >= len(subparsers)
    for example in examples:
        ns, extra = parser.parse_known_args(shlex.split(example)[1:])
        assert not extra or (getattr(ns, "dst", "") is None and len(extra) == 1), example  # main's DST rule
        if ns.command == "finetune":
            get_recipe(ns.recipe, freeze=ns.freeze, steps=ns.steps, lr=ns.lr)


@pytest.mark.parametrize("argv, dst, data", [
    (["extract", "runs/a", "runs/t", "--data", "x/", "y/"], "runs/t", ["x/", "y/"]),
    (["extract", "runs/a", "--data", "x/", "y/", "runs/t"], "runs/t", ["x/", "y/"]),
    (["prune", "runs/a", "--data", "x/", "runs/p", "--keep", "2"], "runs/p", ["x/"]),
    (["merge", "runs/a", "--num-experts", "2", "runs/m"], "runs/m", None),
])
def test_output_folder_may_follow_the_data_paths(argv, dst, data, monkeypatch):
    from moekit import cli

    def deploy_transform(ns, transform):  # stands in for the real work: shows what the command received
        cli._take_dst(ns)
        seen.append((ns.checkpoint, ns.dst, ns.data))

    seen = []
    monkeypatch.setattr(cli, "_deploy_transform", deploy_transform)
    assert main(argv) is not None
    assert seen == [("runs/a", dst, data)]


def test_missing_output_folder_is_a_one_line_error(docs, capsys):
    assert main(["extract", "runs/a", "--data", str(docs)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moekit extract: error: missing DST") and err.count("\n") == 1


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, tmp_path, capsys):
    from moekit import cli

    def buggy(ns):
        raise KeyError("internal")

    help_, args, _fn, examples = cli._COMMANDS["calc"]
    monkeypatch.setitem(cli._COMMANDS, "calc", (help_, args, buggy, examples))
    with pytest.raises(KeyError, match="internal"):  # a bug is not turned into a tidy one-liner
        main(["calc", "tiny"])
    bad = tmp_path / "model.json"
    bad.write_text('{"d_model": 32,, }')
    assert main(["train", "--config", str(bad), "--data", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "not valid JSON" in err
    typo = tmp_path / "typo.json"
    typo.write_text('{"vocab_size": 300, "d_model": 32, "n_layrs": 2}')
    assert main(["train", "--config", str(typo), "--data", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown field 'n_layrs' (did you mean 'n_layers'?)" in err
    assert main(["experiments", "--only", "nonsense"]) == 2
    assert "--only nonsense: unknown experiment" in capsys.readouterr().err


def test_ctrl_c_under_default_flags_saves_and_resume_matches_an_uninterrupted_run(docs, tmp_path):
    """SIGINT to `moekit train` (no --save-every): the step finishes, a checkpoint is saved, the exact
    `--resume` command is printed (no traceback); running it logs the losses of an uninterrupted run."""
    import os
    import shlex
    import signal
    import subprocess
    import sys
    import time

    steps = 60  # far more than can run between the first logged step and the signal's arrival
    run = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "moekit", *_tiny_train_args(docs, steps), "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().strip()) and proc.poll() is None:
        assert time.monotonic() < deadline, "no training step logged"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    stopped = int(re.search(rf"interrupted after step (\d+) of {steps}", err).group(1))
    assert 0 < stopped < steps
    assert (run / "latest").read_text().strip() == f"ckpt-{stopped:06d}"
    resume = shlex.split(err.split("continue with: ")[1].splitlines()[0])
    assert resume[0] == "moekit" and resume[-1] == "--resume"
    done = subprocess.run([sys.executable, "-m", "moekit", *resume[1:]], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert main([*_tiny_train_args(docs, steps), "--out", str(tmp_path / "full")]) == 0
    assert _losses(run) == _losses(tmp_path / "full")


# `moekit train` whose save of the interrupted step stalls in the middle (after the files are written into the
# temporary folder, while their checksums are taken) until the test presses Ctrl-C again. The stall is chosen
# by the CLI's own state: after the first SIGINT its handler has put back the default action.
SLOW_FINAL_SAVE = """
import pathlib, signal, sys, time
from moekit.cli import main
from moekit.train import manifest
real = manifest.file_digest
def digest_then_stall(path):
    if signal.getsignal(signal.SIGINT) is signal.SIG_DFL:
        pathlib.Path(sys.argv[1]).write_text(str(path.parent))
        time.sleep(600)
    return real(path)
manifest.file_digest = digest_then_stall
sys.exit(main(sys.argv[2:]))
"""


def test_a_second_ctrl_c_during_the_final_save_quits_and_keeps_the_previous_checkpoint(docs, tmp_path):
    """SIGINT, then SIGINT again while the interrupted step's checkpoint is being written: the process ends at
    once by the signal (no traceback, no second message); `latest` still names the previous checkpoint, which
    passes its checksums, and `--resume` continues from it to the losses of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from moekit.train.checkpoint import load_model

    steps, run, saving = 20, tmp_path / "run", tmp_path / "saving"  # steps: more than run between two polls
    args = [*_tiny_train_args(docs, steps), "--save-every", "2", "--out", str(run)]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_FINAL_SAVE, str(saving), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    deadline = time.monotonic() + 300
    while not (run / "latest").is_file() and proc.poll() is None:  # the first checkpoint (step 2) is written
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    while not saving.is_file() and proc.poll() is None:
        assert time.monotonic() < deadline, "the interrupted step's save never started"
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()  # saving: neither the end of the run nor of the process
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)  # the save would stall for 600 s: ending now is the second Ctrl-C
    assert proc.returncode == -signal.SIGINT, err
    assert err.strip().splitlines() == [("SIGINT: stopping after this step and saving a checkpoint "
                                         "(press Ctrl-C again to quit at once)")]
    unfinished = int(re.fullmatch(r"\.ckpt-(\d+)\.tmp-.*", Path(saving.read_text()).name).group(1))
    previous = (run / "latest").read_text().strip()
    assert previous == f"ckpt-{unfinished - 1 - (unfinished - 1) % 2:06d}"  # the last save-every-2 checkpoint
    assert not (run / f"ckpt-{unfinished:06d}").exists()
    load_model(run)  # the checkpoint `latest` names is whole: every file matches manifest.json
    assert main([*args, "--resume"]) == 0
    assert not list(run.glob(".*.tmp-*"))  # the stalled save's leftovers are gone
    assert main([*_tiny_train_args(docs, steps), "--save-every", "2", "--out", str(tmp_path / "full")]) == 0
    assert _losses(run) == _losses(tmp_path / "full")


def test_training_into_an_existing_run_is_refused_unless_overwrite(docs, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(docs, run, 4) == 0
    capsys.readouterr()
    assert _train(docs, run, 2) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert [s for s, *_ in _losses(run) if s == 4]  # the first run is untouched
    assert _train(docs, run, 2, "--overwrite") == 0
    assert max(s for s, *_ in _losses(run)) == 2  # only the new run's metrics
    assert (run / "latest").read_text().strip() == "ckpt-000002"
    assert main(["generate", str(run), "--max-new-tokens", "3"]) == 0  # a loadable run
    assert main(["train", "--preset", "tiny", "--data", str(docs), "--vocab-size", "300", "--steps", "4",
                 "--out", str(run), "--resume", "--no-progress"]) == 2  # another model than the run's
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was trained with another model" in err and "d_model 32 there, 128 now" in err


def test_a_failed_run_leaves_no_folder(docs, tmp_path, monkeypatch):
    from moekit.train import trainer

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the training loop")

    monkeypatch.setattr(trainer, "train", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        _train(docs, tmp_path / "new", 2)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("extra, message", [
    (["--preset", "tiny", "--seq-len", "100000"], "--seq-len 100000: longer than the model's context "
                                                  "(preset tiny: max_seq_len=256)"),
    (["--config", "BIG", "--seq-len", "100000"], "--seq-len 100000: the training split has only"),
    (["--config", "BIG", "--batch-size", "100000000"], "the logits alone need"),
])
def test_sequence_length_and_memory_limits_are_checked_up_front(docs, tmp_path, extra, message, capsys):
    big = tmp_path / "big.json"
    big.write_text(json.dumps(dict(json.loads(_model_json(docs).read_text()), max_seq_len=200_000)))
    extra = [str(big) if a == "BIG" else a for a in extra]
    assert main(["train", "--data", str(docs), "--vocab-size", "300", "--out", str(tmp_path / "r"), "--no-progress",
                 *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_a_run_killed_before_its_first_checkpoint_can_be_replaced(docs, tmp_path, capsys):
    """A hard kill (second Ctrl-C, SIGKILL) before the first checkpoint leaves the tokenizer and maybe metrics:
    neither a plain start nor --resume can use the folder, and both say to --overwrite it."""
    run = tmp_path / "killed"
    run.mkdir()
    (run / "tokenizer.json").write_text("{}")
    for extra, message in ([], "stopped before its first checkpoint: replace it with --overwrite"), \
                          (["--resume"], "holds no checkpoint to continue; start the run again with --overwrite"):
        assert _train(docs, run, 2, *extra) == 2
        assert message in capsys.readouterr().err
    assert _train(docs, run, 2, "--overwrite") == 0
    assert (run / "latest").read_text().strip() == "ckpt-000002"


def test_bf16_on_a_cpu_warns_before_any_work(tmp_path, capsys):
    assert main(["train", "--bf16", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2  # the missing data stops it right after the warning
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("warning: --bf16 on a CPU:") and err[1].startswith("moekit train: error: data path")
