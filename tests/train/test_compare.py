import json

import pytest
import torch

from moekit.config import CapacityConfig, ModelConfig, MoEConfig, RouterConfig
from moekit.models.decoder import MoETransformer
from moekit.models.presets import PRESETS, get_preset
from moekit.train.trainer import train_flops_per_token
from tests.corpus import write_docs


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_dense_twin_spends_the_moes_flops_per_token(preset):
    """The twin's FFN in a former MoE layer has the active width and the experts' activation: switch-like's
    GELU experts have 2 matrices, a SwiGLU twin of the same width would have 3 (12% more FLOPs)."""
    cfg = get_preset(preset, vocab_size=2048)
    with torch.device("meta"):
        moe, twin = MoETransformer(cfg), MoETransformer(cfg.dense_twin())
    ratio = train_flops_per_token(twin, 128) / train_flops_per_token(moe, 128)
    assert abs(ratio - 1) < 0.01, ratio
    m = cfg.moe
    matrices = 3 if m.activation in ("swiglu", "geglu") else 2
    active_hidden = m.router.top_k * m.expert_hidden + m.num_shared_experts * m.shared_hidden_size
    for block, twin_block in zip(moe.layers, twin.layers):
        if block.is_moe:  # the modules actually built: the experts' number of matrices at the active width
            assert sum(p.numel() for p in twin_block.ffn.parameters()) == matrices * cfg.d_model * active_hidden


def test_compare_with_gelu_top1_experts_reports_matched_flops(tmp_path, capsys, monkeypatch):
    from moekit.cli import main

    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    docs = write_docs(tmp_path / "docs", "def g{i}_{j}(y):\n    return y * {j}\n", 150)
    model = tmp_path / "switch.json"  # switch-like in miniature: top-1, GELU experts, every other layer
    model.write_text(json.dumps(ModelConfig(
        vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, moe_layers="every_other",
        moe=MoEConfig(d_model=32, num_experts=4, expert_hidden=64, activation="gelu",
                      router=RouterConfig(kind="switch", top_k=1),
                      capacity=CapacityConfig(capacity_factor=1.25))).to_dict()))
    assert main(["compare", "--config", str(model), "--data", str(docs), "--vocab-size", "300", "--steps", "4",
                 "--batch-size", "2", "--seq-len", "16", "--out", str(tmp_path / "cmp"), "--no-progress"]) == 0
    rows = json.loads((tmp_path / "cmp" / "summary.json").read_text())["rows"]
    moe, dense = (r["train_flops_per_token"] for r in rows)
    assert abs(dense / moe - 1) < 0.01
    out = capsys.readouterr().out
    assert out.startswith("corpus: ")  # printed before training, not after
    assert f"MoE training FLOPs/token = {moe / dense:.3f}x dense" in out
    assert (tmp_path / "cmp" / "val_loss_gap.png").is_file() and not (tmp_path / "cmp" / "loss_vs_flops.png").exists()
