"""Edge cases of HF interop against transformers' own modules: configs off the defaults (DeepSeek top-1,
rms_norm_eps != 1e-6), router logits and the load-balancing loss of a patched model, and fields moekit
refuses instead of silently computing something else."""

import json

import pytest
import torch

from moekit.interop.hf import load_hf
from moekit.interop.patch import patch
from tests.interop.test_hf import tiny_hf as build
from tests.interop.test_patch_families import scale_gpt_oss_past_the_clamp

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


def test_fields_moekit_cannot_compute_are_refused(tmp_path):
    build("mixtral").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="config.json hidden_act='gelu'"):
        load_hf(tmp_path)


def assert_converts_both_ways(hf, tmp_path, ids=IDS):
    """HF model -> moekit (same logits) -> HF export that transformers reloads with the same logits."""
    from moekit.interop.hf import save_hf

    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    with torch.no_grad():
        ref = hf(ids).logits
        assert (ours(ids).logits - ref).abs().max().item() <= 1e-5
    save_hf(ours, tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert (back(ids).logits - ref).abs().max().item() <= 1e-5
    return ours


@pytest.mark.parametrize("model_type, over", [
    ("mixtral", dict(sliding_window=4)),
    ("qwen3_moe", dict(use_sliding_window=True, sliding_window=3)),
    ("qwen2_moe", dict(use_sliding_window=True, sliding_window=4, max_window_layers=2)),
], ids=["mixtral", "qwen3_moe", "qwen2_moe-layer_types"])
def test_sliding_window_attention_converts_both_ways(model_type, over, tmp_path):
    ours = assert_converts_both_ways(build(model_type, **over), tmp_path)  # IDS has 11 positions > the windows
    assert any(ours.cfg.attn_windows)


@pytest.mark.parametrize("model_type, over, moe_layers", [
    ("qwen3_moe", dict(attention_bias=True), [0, 1, 2]),  # q, k, v and o biases
    ("olmoe", dict(attention_bias=True), [0, 1, 2]),
    ("deepseek_v3", dict(attention_bias=True), [1, 2]),  # MLA: q_a, kv_a and o biases
    ("qwen3_moe", dict(mlp_only_layers=[1]), [0, 2]),
    ("qwen2_moe", dict(decoder_sparse_step=2), [1]),
], ids=["qwen3_moe-bias", "olmoe-bias", "deepseek_v3-bias", "qwen3_moe-mlp_only_layers", "qwen2_moe-sparse_step"])
def test_attention_bias_and_dense_layers_convert_both_ways(model_type, over, moe_layers, tmp_path):
    ours = assert_converts_both_ways(build(model_type, **over), tmp_path)
    assert [i for i, b in enumerate(ours.layers) if b.is_moe] == moe_layers


def test_llama_attention_bias_converts_both_ways(tmp_path):
    import warnings

    from tests.interop.test_hf import TINY

    torch.manual_seed(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, "intermediate_size": 48},
                                                                    attention_bias=True)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 0.05 if "norm" not in name else 1.0)
    assert_converts_both_ways(hf, tmp_path)


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


def test_upcycled_qwen2_exports_to_qwen2_moe_and_other_targets_fail_in_one_line(tmp_path):
    """Qwen2's q/k/v biases fit Qwen2-MoE, whose shared expert is written at width 0 (it computes nothing):
    transformers' Qwen2-MoE then computes the dense Qwen2's function. Qwen3-MoE needs q/k norms: refused."""
    import warnings

    from moekit.errors import UsageError
    from moekit.interop.hf import save_hf
    from moekit.interop.upcycle import upcycle
    from tests.interop.test_hf import TINY

    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**TINY, "intermediate_size": 48})).eval()
    with torch.no_grad():
        for name, p in dense.named_parameters():
            p.normal_(0, 0.05 if "norm" not in name else 1.0)
    dense.save_pretrained(tmp_path / "dense")
    moe = upcycle(load_hf(tmp_path / "dense"), num_experts=4, top_k=2)
    save_hf(moe, tmp_path / "qwen2_moe", "qwen2_moe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qwen2_moe").eval()
    assert type(back).__name__ == "Qwen2MoeForCausalLM"
    with torch.no_grad():
        assert (back(IDS).logits - dense(IDS).logits).abs().max().item() <= 1e-5
        assert (load_hf(tmp_path / "qwen2_moe").eval()(IDS).logits - dense(IDS).logits).abs().max().item() <= 1e-5
    with pytest.raises(UsageError, match=r"model_type='qwen3_moe' needs tensors .*q_norm") as e:
        save_hf(moe, tmp_path / "qwen3_moe", "qwen3_moe")
    assert "\n" not in str(e.value) and not (tmp_path / "qwen3_moe").exists()


YARN_DS = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
           "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}


@pytest.mark.parametrize("model_type, rope", [
    ("deepseek_v3", YARN_DS),  # DeepSeek-V3's own: attention factor 1, softmax sharpened by mscale^2
    ("qwen3_moe", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 1e6}),
    ("mixtral", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}),
    ("olmoe", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}),
], ids=["yarn-deepseek", "yarn", "linear", "llama3"])
def test_rope_scaling_converts_both_ways_with_transformers_logits(model_type, rope, tmp_path):
    ids = torch.randint(0, 96, (1, 60), generator=torch.Generator().manual_seed(6))  # past the original context
    ours = assert_converts_both_ways(build(model_type, rope_parameters=dict(rope)), tmp_path, ids)
    assert ours.cfg.rope_scaling["rope_type"] == rope["rope_type"]


def test_gpt_oss_clamped_swiglu_converts_both_ways_past_the_clamp(tmp_path):
    """Expert weights large enough that gate/up pre-activations pass gpt-oss's clamp at +-7."""
    hf = build("gpt_oss")
    scale_gpt_oss_past_the_clamp(hf, IDS)
    assert_converts_both_ways(hf, tmp_path)


def test_llama4_top2_with_llama3_rope_converts_both_ways(tmp_path):
    """Two experts per token (each input scaled by its own sigmoid gate) and Scout's llama3 RoPE, past the
    original context."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 500000.0}
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(7))
    ours = assert_converts_both_ways(build("llama4_text", num_experts_per_tok=2, rope_parameters=rope), tmp_path, ids)
    assert ours.cfg.moe.router.top_k == 2 and ours.cfg.nope_layers == (3,)


def test_llama4_multimodal_checkpoint_loads_its_language_model(tmp_path):
    """A Llama4ForConditionalGeneration folder (Scout's format): the language model loads with its logits, the
    vision tower is skipped, and export goes through llama4_text."""
    from moekit.errors import UsageError
    from moekit.interop.hf import save_hf
    from tests.interop.test_hf import FAMILIES, TINY

    torch.manual_seed(0)
    text = {**TINY, **FAMILIES["llama4_text"]}
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    hf = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(text_config=text,
                                                                               vision_config=vision)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 0.05 if "norm" not in name else 1.0)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    with torch.no_grad():
        ref = hf.language_model(IDS).logits  # (transformers' multimodal forward needs pixel inputs)
        assert (ours(IDS).logits - ref).abs().max().item() <= 1e-5
    with pytest.raises(UsageError, match="llama4_text"):
        save_hf(ours, tmp_path / "back")
    save_hf(ours, tmp_path / "back", model_type="llama4_text")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert (back(IDS).logits - ref).abs().max().item() <= 1e-5
