import json
import math

import pytest
import torch

from moekit.config import ConfigError, ModelConfig, MoEConfig, RouterConfig, TrainConfig
from moekit.errors import CheckpointError, UsageError
from moekit.models.decoder import MoETransformer
from moekit.train import checkpoint as ckpt
from moekit.train.data import TokenStream, build_corpus, collect_files, split_files, stdlib_dir
from moekit.train.hooks import MetricsWriter, read_metrics
from moekit.train.tokenizer import train_bpe
from moekit.train.trainer import lr_at, train


def tiny_model(seed=0, noisy=False):
    torch.manual_seed(seed)
    router = RouterConfig(kind="noisy_topk" if noisy else "softmax_topk", top_k=2)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, dropout=0.1,
                      moe=MoEConfig(d_model=32, num_experts=4, expert_hidden=32, router=router))
    return MoETransformer(cfg)


def stream(seed=0, n=5000):
    return TokenStream(torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(seed)))


def test_resume_gives_bit_identical_losses(tmp_path):
    # dropout and router noise on: resume must restore the RNG as well as weights and AdamW state
    cfg = TrainConfig(steps=8, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=2, log_every=1, eval_every=4,
                      eval_batches=2)
    full = train(tiny_model(noisy=True), stream(), stream(1), cfg, out_dir=tmp_path / "a")

    class Interrupt(Exception):
        pass

    def stop_after_4(ctx):
        if ctx.step == 5:
            raise Interrupt  # "killed" during step 5, after the step-4 checkpoint was written

    stopper = type("Stop", (), {"after_step": staticmethod(stop_after_4)})()
    with pytest.raises(Interrupt):
        train(tiny_model(noisy=True), stream(), stream(1), TrainConfig(**{**vars(cfg), "save_every": 4}),
              out_dir=tmp_path / "b", hooks=[MetricsWriter(tmp_path / "b", tensorboard=False), stopper])
    assert (tmp_path / "b" / "latest").read_text() == "ckpt-000004"
    # a differently initialised model: everything must come from the checkpoint
    resumed = train(tiny_model(seed=99, noisy=True), stream(), stream(1), cfg, out_dir=tmp_path / "b", resume=True,
                    hooks=[MetricsWriter(tmp_path / "b", tensorboard=False)])

    def losses(recs, k):
        return [(r["step"], r[k]) for r in recs if k in r]

    full_after4 = [x for x in losses(full, "loss") if x[0] > 4]
    assert losses(resumed, "loss") == full_after4  # exact equality, not approx
    assert losses(resumed, "val_loss") == [x for x in losses(full, "val_loss") if x[0] > 4]
    # the step-5 row logged before the kill is replaced, not duplicated, in the run's metrics files
    assert losses(read_metrics(tmp_path / "b"), "loss") == losses(full, "loss")
    csv_rows = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert [int(r.split(",")[1]) for r in csv_rows[1:]] == list(range(1, 9))


def test_training_reduces_loss_and_writes_metrics(tmp_path):
    cfg = TrainConfig(steps=30, batch_size=8, seq_len=16, lr=1e-2, warmup_steps=3, log_every=5, eval_every=15,
                      eval_batches=2)
    data = TokenStream(torch.arange(4000) % 17)  # a periodic sequence: learnable
    recs = train(tiny_model(), data, data, cfg, out_dir=tmp_path, hooks=[MetricsWriter(tmp_path, tensorboard=False)])
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert vals[-1] < 0.5 * math.log(64)
    written = read_metrics(tmp_path)
    assert written == recs
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 1 + sum(r["split"] == "train" for r in recs)


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model = tiny_model()
    ckpt.save_checkpoint(tmp_path, 1, model, model.cfg, {"note": "first"})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def crash(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint(tmp_path, 2, model, model.cfg)
    monkeypatch.undo()
    restored = ckpt.load_model(tmp_path)
    for k, v in restored.state_dict().items():
        assert torch.equal(v, before[k])
    assert (tmp_path / "latest").read_text() == "ckpt-000001"
    assert not list(tmp_path.glob(".ckpt-*"))  # no temp folder left behind
    # a crash after the folder rename but before the pointer update also keeps the old pointer
    monkeypatch.setattr("os.replace", crash)  # the pointer files are replaced with os.replace
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 3, model, model.cfg)
    monkeypatch.undo()
    assert ckpt.resolve_checkpoint(tmp_path).name == "ckpt-000001"


def test_checkpoint_roundtrip_and_bad_paths(tmp_path):
    model = tiny_model()
    path = ckpt.save_checkpoint(tmp_path, 5, model, model.cfg)
    cfg, _, state = ckpt.load_checkpoint(path)
    assert cfg == model.cfg and state["step"] == 5
    assert json.loads((path / "config.json").read_text())["moe"]["num_experts"] == 4
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a moekit model folder"):
        ckpt.load_checkpoint(tmp_path / "empty")


def test_tokenizer_roundtrip_is_exact():
    files = sorted(stdlib_dir().glob("*.py"))[:6]
    texts = [f.read_text() for f in files]
    tok = train_bpe(texts, 400)
    for t in texts + ["unicode: héllo wörld ✓ \t\n  x = 1 # 日本語"]:
        assert tok.decode(tok.encode(t)) == t
    assert len(tok.encode(texts[0])) < len(texts[0].encode())  # it compresses


def test_split_is_deterministic_and_disjoint(tmp_path):
    files = sorted(stdlib_dir().glob("*.py"))[:80]
    tr, va = split_files(files, 10.0)
    tr2, va2 = split_files(list(reversed(files)), 10.0)
    assert set(tr) == set(tr2) and set(va) == set(va2)
    assert not set(tr) & set(va) and len(tr) + len(va) == 80 and va


def test_batches_depend_only_on_seed_and_index():
    s = stream()
    a = s.batch(7, 4, 16, seed=3)
    s.batch(1, 4, 16, seed=3)
    b = s.batch(7, 4, 16, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[0][:, 1:], a[1][:, :-1])
    assert not torch.equal(a[0], s.batch(7, 4, 16, seed=4)[0])


def test_user_corpus_and_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    for i in range(4):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 400)
    corpus = build_corpus([tmp_path], vocab_size=300, val_percent=20.0)
    assert len(corpus.train_files) + len(corpus.val_files) == 4 and len(corpus.val) > 0
    with pytest.raises(UsageError, match="data path '/no/such/dir' does not exist"):
        collect_files(["/no/such/dir"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contain no text files"):
        collect_files([tmp_path / "empty"])
    with pytest.raises(ConfigError, match="TrainConfig.lr=0"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TokenStream(torch.arange(10)).batch(0, 2, 16)


def test_bf16_autocast_tracks_float32_and_grad_accum_matches_token_budget():
    data = TokenStream(torch.arange(4000) % 17)
    cfg = TrainConfig(steps=12, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=2, log_every=1, eval_every=0,
                      eval_batches=1)
    runs = {bf16: train(tiny_model(), data, None, TrainConfig(**{**vars(cfg), "bf16": bf16})) for bf16 in (False, True)}
    fp32, bf16 = ([r["loss"] for r in runs[b]] for b in (False, True))
    assert abs(fp32[0] - bf16[0]) < 0.05 and bf16[-1] < 0.7 * bf16[0]  # same start, it still learns
    accum = train(tiny_model(), data, None, TrainConfig(**{**vars(cfg), "grad_accum": 2, "steps": 2}))
    assert [r["tokens"] for r in accum] == [2 * 4 * 16, 4 * 4 * 16]
    assert accum[-1]["flops"] == 2 * accum[0]["flops"] > 0
