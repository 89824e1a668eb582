"""The calculator against transformers' own model classes on the meta device, and published figures."""

import warnings

import pytest
import torch

from moekit.analysis import flops, memory, params
from moekit.cli import main as cli_main

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
TINY_CASES = {
    "mixtral": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=80, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      num_experts=6, num_experts_per_tok=2, decoder_sparse_step=2),
    "qwen3_moe": dict(intermediate_size=80, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2,
                      head_dim=24, mlp_only_layers=[0]),
    "olmoe": dict(intermediate_size=32, num_experts=6, num_experts_per_tok=2, eos_token_id=0, pad_token_id=0),
    "deepseek_v3": dict(intermediate_size=80, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=24,
                        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12),
    "deepseek_v2": dict(intermediate_size=80, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2,
                        num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12),
    "gpt_oss": dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16),
    "llama": dict(intermediate_size=80),
    "qwen2": dict(intermediate_size=80),
    "qwen3": dict(intermediate_size=80, head_dim=24),
}


def hf_meta_model(cfg_dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.AutoConfig.for_model(**cfg_dict)
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("model_type", sorted(TINY_CASES))
def test_tiny_configs_count_equals_hf_to_the_parameter(model_type):
    cfg = dict(model_type=model_type, **TINY, **TINY_CASES[model_type])
    model = hf_meta_model(cfg)
    count = params.count_params(params.spec_from_hf(model.config.to_dict()))
    assert count.total == sum(p.numel() for p in model.parameters())
    # active = everything except the experts each token skips, counted from HF's own expert modules
    spec = params.spec_from_hf(model.config.to_dict())
    expert_total = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    if spec.num_experts:
        active_from_hf = count.total - expert_total + expert_total * spec.top_k // spec.num_experts
        assert count.active == active_from_hf
    else:
        assert count.active == count.total


@pytest.mark.parametrize("name", params.shipped_configs())
def test_full_size_shipped_configs_equal_hf(name):
    cfg, _ = params.load_config(name)
    model = hf_meta_model(cfg)
    assert params.count_params(params.spec_from_hf(cfg, name)).total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,total_b,active_b", [
    ("mixtral-8x7b", 46.7, 12.9),
    ("qwen3-30b-a3b", 30.5, 3.3),
    ("deepseek-v3", 671.0, 37.0),  # DeepSeek-V3 report: 671B total, 37B activated (HF weights add 14B MTP)
])
def test_published_figures(name, total_b, active_b):
    cfg, _ = params.load_config(name)
    c = params.count_params(params.spec_from_hf(cfg, name))
    assert round(c.total / 1e9, 1) == total_b
    assert abs(c.active / 1e9 - active_b) < 0.6
    if name == "deepseek-v3":
        assert 11e9 < c.mtp < 15e9  # the MTP module reported separately (~685B with it)


def test_moekit_preset_spec_matches_the_real_module():
    from moekit.models.decoder import MoETransformer
    from moekit.models.presets import get_preset

    configs = [get_preset(p, vocab_size=300) for p in ("tiny", "mixtral-like", "switch-like")]
    for cfg in configs + [c.dense_twin() for c in configs]:
        model = MoETransformer(cfg)
        c = params.count_params(params.spec_from_moekit(cfg))
        assert c.total == model.num_params()
        assert c.active == model.num_active_params()


def test_flops_and_memory_hand_computed():
    spec = params.spec_from_hf(params.load_config("mixtral-8x7b")[0])
    c = params.count_params(spec)
    # matmul params: active minus embedding table minus norms
    assert flops.matmul_params_per_token(spec) == c.active - 32000 * 4096 - (2 * 32 + 1) * 4096
    attn = 32 * 2 * 1024 * 32 * (128 + 128)
    assert flops.attention_flops_per_token(spec, 1024) == attn
    assert flops.forward_flops_per_token(spec, 1024) == 2 * flops.matmul_params_per_token(spec) + attn
    # KV cache: 32 layers x 2 (K, V) x 8 kv heads x 128 x 2 bytes
    assert memory.kv_cache_bytes_per_token(spec) == 32 * 2 * 8 * 128 * 2
    assert memory.weight_bytes(c.total)["bf16"] == 2 * c.total  # the famous ~94 GB in fp16/bf16
    assert round(memory.weight_bytes(c.total)["bf16"] / 1e9) == 93
    ds = params.spec_from_hf(params.load_config("deepseek-v3")[0])
    assert memory.kv_cache_bytes_per_token(ds) == 61 * (512 + 64) * 2  # MLA latent + rope key
    t1 = memory.training_bytes_per_gpu(spec, ep=1)
    t8 = memory.training_bytes_per_gpu(spec, ep=8)
    experts = c.breakdown["routed_experts"]
    assert t1["params_per_gpu"] - t8["params_per_gpu"] == pytest.approx(experts * 7 / 8)
    assert t1["total"] == pytest.approx(16 * c.total)
    with pytest.raises(ValueError, match="ep=3 must divide num_experts=8"):
        memory.training_bytes_per_gpu(spec, ep=3)


def test_errors_and_cli(capsys, tmp_path):
    with pytest.raises(ValueError, match="model_type='bert'"):
        params.spec_from_hf({"model_type": "bert"})
    with pytest.raises(FileNotFoundError, match="neither a config.json path nor a shipped config"):
        params.load_config("no-such-model")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        params.load_config(bad)
    assert cli_main(["calc", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    assert "46,702,792,704" in out and "12,879,925,248" in out
    assert cli_main(["calc", "no-such-model"]) == 2
