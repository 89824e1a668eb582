"""Edge cases of HF interop against transformers' own modules: configs off the defaults (DeepSeek top-1,
rms_norm_eps != 1e-6), router logits and the load-balancing loss of a patched model, and fields moekit
refuses instead of silently computing something else."""

import json

import pytest
import torch

from moekit.interop.hf import load_hf
from moekit.interop.patch import patch
from tests.interop.test_hf import tiny_hf as build

transformers = pytest.importorskip("transformers")


IDS = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("over", [dict(num_experts_per_tok=1), dict(rms_norm_eps=1e-2)],
                         ids=["top1_normalised", "rms_norm_eps"])
def test_deepseek_off_default_configs_match_hf(over, tmp_path):
    hf = build("deepseek_v3", **over)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    with torch.no_grad():
        assert (ours(IDS).logits - hf(IDS).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_patched_model_returns_hf_router_logits_and_loss(model_type):
    hf = build(model_type)
    with torch.no_grad():
        ref = hf(IDS, labels=IDS, output_router_logits=True)
        patch(hf)
        got = hf(IDS, labels=IDS, output_router_logits=True)
    assert len(got.router_logits) == len(ref.router_logits) > 0
    for a, b in zip(got.router_logits, ref.router_logits):
        assert (a - b).abs().max().item() <= 1e-5
    assert (got.loss - ref.loss).abs().item() <= 1e-5  # includes HF's load-balancing loss where the family has one
    if ref.aux_loss is not None:
        assert (got.aux_loss - ref.aux_loss).abs().item() <= 1e-5


@pytest.mark.parametrize("model_type, field, value", [("mixtral", "hidden_act", "gelu"),
                                                      ("mixtral", "sliding_window", 4),
                                                      ("qwen3_moe", "use_sliding_window", True)])
def test_fields_moekit_cannot_compute_are_refused(model_type, field, value, tmp_path):
    build(model_type).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] = value
    if field == "use_sliding_window":
        cfg["sliding_window"] = 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"config.json {field if field != 'use_sliding_window' else 'sliding_window'}="):
        load_hf(tmp_path)


def _tiny_moekit(**over):
    from moekit.config import ModelConfig, MoEConfig, RouterConfig
    from moekit.models.decoder import MoETransformer

    router = RouterConfig(top_k=2, renormalize=over.pop("renormalize", True))
    moe = MoEConfig(d_model=32, num_experts=4, expert_hidden=16, router=router)
    return MoETransformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, moe=moe, **over))


@pytest.mark.parametrize("over, match", [(dict(attention_bias=True), r"cannot hold .*q_proj\.bias"),
                                         (dict(moe_layers="every_other"), r"cannot hold .*layers\.0\.ffn\.w_gate"),
                                         (dict(renormalize=False), r"router\.renormalize=False")])
def test_export_refuses_what_the_format_cannot_hold(over, match, tmp_path):
    from moekit.interop.hf import save_hf

    with pytest.raises(ValueError, match=match):
        save_hf(_tiny_moekit(**over), tmp_path / "out", "mixtral")
    assert not (tmp_path / "out").exists()
