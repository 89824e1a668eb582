"""The calculator against transformers' own model classes (meta device, eager FLOP counting) and published
figures."""

import json
import warnings

import pytest
import torch

from moekit.analysis import flops, memory, params
from moekit.cli import main as cli_main
from moekit.errors import ConfigError, UsageError

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
TINY_CASES = {
    "mixtral": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=80, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      num_experts=6, num_experts_per_tok=2, decoder_sparse_step=2),
    "qwen3_moe": dict(intermediate_size=80, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2,
                      head_dim=24, mlp_only_layers=[0], attention_bias=True),  # the 91,008 vs 91,392
    "qwen3_next": dict(intermediate_size=80, moe_intermediate_size=32, shared_expert_intermediate_size=24,
                       num_experts=6, num_experts_per_tok=2, head_dim=16, linear_num_key_heads=2,
                       linear_key_head_dim=8, linear_num_value_heads=4, linear_value_head_dim=8, num_hidden_layers=4,
                       mlp_only_layers=[1], attention_bias=True),  # the bias of the doubled (gated) q_proj
    "flex_olmo": dict(intermediate_size=32, num_experts=6, num_experts_per_tok=2, eos_token_id=0, pad_token_id=0),
    "minimax": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, head_dim=16),
    "phimoe": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, attention_bias=True,
                   lm_head_bias=True),
    "granitemoe": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, attention_bias=True),
    "granitemoe_swa": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                           shared_intermediate_size=40, sliding_window=8,
                           layer_types=["full_attention", "sliding_attention", "full_attention"]),
    "granitemoeshared": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                             shared_intermediate_size=40),
    "glm4_moe": dict(intermediate_size=80, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                     num_experts_per_tok=2, first_k_dense_replace=1, use_qk_norm=True, attention_bias=True,
                     head_dim=16),
    "dots1": dict(intermediate_size=80, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2,
                  num_experts_per_tok=2, first_k_dense_replace=1),
    "ernie4_5_moe": dict(intermediate_size=80, moe_intermediate_size=32, moe_num_experts=6, moe_k=2,
                         moe_num_shared_experts=1, moe_layer_start_index=1),
    "jetmoe": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2,
                   kv_channels=16, eos_token_id=0, bos_token_id=0),
    # DBRX: transformers 5's DbrxForCausalLM needs rope_theta inside attn_config to build
    "dbrx": dict(d_model=64, n_layers=3, n_heads=4, attn_config=dict(kv_n_heads=2, rope_theta=10000.0),
                 ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2)),
    "hunyuan_v1_moe": dict(intermediate_size=48, num_experts=4, moe_topk=2, head_dim=16,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "olmoe": dict(intermediate_size=32, num_experts=6, num_experts_per_tok=2, eos_token_id=0, pad_token_id=0),
    "deepseek_v3": dict(intermediate_size=80, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=24,
                        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                        num_key_value_heads=4),
    "deepseek_v2": dict(intermediate_size=80, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2,
                        num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, attention_bias=True),
    # MLA with a sparse-attention indexer; dense/sparse layers from mlp_layer_types
    "deepseek_v32": dict(intermediate_size=80, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                         num_experts_per_tok=2, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                         qk_rope_head_dim=8, v_head_dim=12, num_key_value_heads=4, index_n_heads=2, index_head_dim=8,
                         mlp_layer_types=["dense", "sparse", "sparse"]),
    "glm_moe_dsa": dict(intermediate_size=80, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2,
                        num_experts_per_tok=2, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                        qk_rope_head_dim=8, v_head_dim=12, num_key_value_heads=4, index_n_heads=2, index_head_dim=8,
                        mlp_layer_types=["dense", "dense", "sparse"]),
    "glm4_moe_lite": dict(intermediate_size=80, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                          num_experts_per_tok=2, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                          qk_rope_head_dim=8, v_head_dim=12, num_key_value_heads=4,
                          mlp_layer_types=["dense", "sparse", "sparse"]),
    "solar_open": dict(moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                       head_dim=16),
    "minimax_m2": dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16),
    "exaone_moe": dict(intermediate_size=80, moe_intermediate_size=32, num_experts=8, num_shared_experts=1,
                       num_experts_per_tok=2, mlp_layer_types=["dense", "sparse", "sparse"]),
    "hy_v3": dict(intermediate_size=80, moe_intermediate_size=32, num_experts=8, num_shared_experts=1,
                  num_experts_per_tok=2, head_dim=16, attention_bias=True,
                  mlp_layer_types=["dense", "sparse", "sparse"]),
    "afmoe": dict(intermediate_size=80, moe_intermediate_size=32, num_experts=8, num_shared_experts=2,
                  num_experts_per_tok=2, head_dim=16, attention_bias=True, num_dense_layers=1),
    "flint": dict(intermediate_size=80, moe_intermediate_size=32, shared_expert_intermediate_size=24, num_experts=6,
                  num_experts_per_tok=2, head_dim=16, mlp_only_layers=[0], sliding_window=8,
                  layer_types=["full_attention", "sliding_attention", "full_attention"]),
    "mellum": dict(moe_intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                   mlp_layer_types=["sparse", "sparse", "sparse"]),
    "gpt_oss": dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                    sliding_window=8),
    "llama4_text": dict(intermediate_size=32, intermediate_size_mlp=80, num_local_experts=4, num_experts_per_tok=1,
                        head_dim=16, interleave_moe_layer_step=2, num_hidden_layers=4, attention_chunk_size=8),
    "switch_transformers": dict(d_model=64, d_ff=48, d_kv=16, num_heads=4, num_layers=4, num_decoder_layers=3,
                                num_experts=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=1),
    # hybrids: Mamba / Mamba-2 / gated DeltaNet layers beside attention, MoE beside dense FFNs
    "jamba": dict(intermediate_size=48, num_experts=4, num_experts_per_tok=2, num_hidden_layers=4,
                  attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=0),
    "jamba:biases": dict(intermediate_size=48, num_experts=4, num_experts_per_tok=2, num_hidden_layers=4,
                         attn_layer_period=4, attn_layer_offset=3, expert_layer_period=3, expert_layer_offset=1,
                         mamba_proj_bias=True, mamba_conv_bias=False, mamba_dt_rank=6, mamba_expand=3),
    "granitemoehybrid": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                             shared_intermediate_size=40, mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=16,
                             attention_bias=True, layer_types=["mamba", "attention", "mamba"]),
    "granitemoehybrid:dense": dict(num_local_experts=0, shared_intermediate_size=40, mamba_n_heads=4,
                                   mamba_proj_bias=True, layer_types=["attention", "mamba", "mamba"]),
    "qwen3_5_moe_text": dict(moe_intermediate_size=32, shared_expert_intermediate_size=24, num_experts=6,
                             num_experts_per_tok=2, head_dim=16, linear_num_key_heads=2, linear_key_head_dim=8,
                             linear_num_value_heads=4, linear_value_head_dim=8, num_hidden_layers=4,
                             attention_bias=True),
    # parallel blocks (one norm per layer), wider dense prefix layers, shared experts
    "cohere2_moe": dict(intermediate_size=48, num_experts=4, num_experts_per_tok=2, head_dim=16,
                        mlp_layer_types=["dense", "sparse", "sparse"], prefix_dense_intermediate_size=80,
                        num_shared_experts=2, shared_expert_combination_strategy="sum"),
    "cohere2_moe:biases": dict(intermediate_size=48, num_experts=4, num_experts_per_tok=2, head_dim=16,
                               attention_bias=True, first_k_dense_replace=1, rms_norm_eps=1e-6),
    # heads per layer, a per-head (or per head dim) output gate, dense first layer
    "laguna": dict(intermediate_size=80, moe_intermediate_size=32, shared_expert_intermediate_size=24,
                   num_experts=6, num_experts_per_tok=2, head_dim=16, num_attention_heads_per_layer=[4, 8, 2],
                   layer_types=["full_attention", "sliding_attention", "sliding_attention"], sliding_window=8),
    "laguna:per_element_gate": dict(intermediate_size=80, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                                    head_dim=16, gating="per-element", attention_bias=True,
                                    mlp_layer_types=["sparse", "dense", "sparse"]),
    # value heads narrower than query/key heads; sliding layers with twice the kv heads and sinks
    "mimo_v2_flash": dict(intermediate_size=80, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                          head_dim=24, v_head_dim=16, attention_bias=True,
                          layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
    "lara_mini": dict(moe_intermediate_size=32, shared_expert_intermediate_size=24, num_experts=6,
                      num_experts_per_tok=2, head_dim=16, linear_num_key_heads=2, linear_key_head_dim=8,
                      linear_num_value_heads=4, linear_value_head_dim=8, num_hidden_layers=5, sliding_window=8),
    # gated short-convolution layers beside attention
    "lfm2_moe": dict(intermediate_size=80, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2,
                     num_dense_layers=1, layer_types=["conv", "full_attention", "conv"]),
    "lfm2_moe:conv_bias": dict(intermediate_size=80, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2,
                               num_dense_layers=0, conv_bias=True, use_expert_bias=False, conv_L_cache=4,
                               layer_types=["full_attention", "conv", "conv"]),
    # Kimi Delta Attention beside MLA
    "kimi_linear": dict(intermediate_size=80, moe_intermediate_size=32, num_local_experts=8, n_shared_experts=2,
                        num_experts_per_tok=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                        num_key_value_heads=4, linear_head_dim=8, linear_num_heads=4, attention_bias=True,
                        layer_types=["linear_attention", "full_attention", "linear_attention"],
                        pad_token_id=0, bos_token_id=0, eos_token_id=0),
    # KDA with full-rank gates beside MLA with a per-head output gate (head_dim = qk_rope_head_dim: transformers
    # re-reads a saved config's head_dim as the rope dim)
    "bailing_hybrid": dict(intermediate_size=80, moe_intermediate_size=32, num_local_experts=8, n_shared_experts=1,
                           num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=24,
                           qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, num_key_value_heads=4, head_dim=8,
                           first_k_dense_replace=1, layer_group_size=2, attention_bias=True, pad_token_id=0,
                           eos_token_id=0),
    "aria_text": dict(intermediate_size=48, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=2,
                      attention_bias=True),
    "mistral4": dict(intermediate_size=80, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                     num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16,
                     qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, num_key_value_heads=4),
    # blocks of one mixer (Mamba-2, attention) or one FFN (ReLU^2 MLP, MoE)
    "nemotron_h": dict(intermediate_size=80, moe_intermediate_size=32, moe_shared_expert_intermediate_size=24,
                       n_routed_experts=6, num_experts_per_tok=2, head_dim=16, mamba_num_heads=4, mamba_head_dim=16,
                       n_groups=2, ssm_state_size=8, layers_block_type=["linear_attention", "moe", "full_attention",
                                                                        "mlp", "linear_attention", "moe"]),
    "nemotron_h:pattern": dict(intermediate_size=80, moe_intermediate_size=32, n_routed_experts=6,
                               num_experts_per_tok=2, mamba_num_heads=8, mamba_head_dim=8, n_groups=1, ssm_state_size=8,
                               use_bias=True, mamba_conv_bias=False, hybrid_override_pattern="M-*EME"),
    "kolibri1": dict(moe_intermediate_size=32, shared_expert_intermediate_size=24, num_experts=6,
                     num_experts_per_tok=2, head_dim=16, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    # per-head output gate with a bias per head, four norms per layer
    "beam": dict(intermediate_size=80, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, n_group=2,
                 topk_group=1, head_dim=16, attention_bias=True, sliding_window=8,
                 layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                 mlp_layer_types=["dense", "sparse", "sparse"]),
    # a lightning indexer (GQA) on the sparse layers, dense layers of their own width, a shared expert
    "minimax_m3_vl_text": dict(intermediate_size=32, dense_intermediate_size=80, shared_intermediate_size=24,
                               num_local_experts=6, num_experts_per_tok=2, head_dim=16, rotary_dim=8, index_n_heads=2,
                               index_head_dim=8, layer_types=["full_attention", "minimax_m3_sparse", "full_attention"],
                               mlp_layer_types=["dense", "sparse", "sparse"], pad_token_id=0, bos_token_id=0,
                               eos_token_id=0),
    # Qwen3-Next's hybrid with a QSA indexer, gated-residual hyper-connections and n-gram embeddings on two layers
    "qwen4_exp_text": dict(moe_intermediate_size=32, shared_expert_intermediate_size=24, num_experts=6,
                           num_experts_per_tok=2, head_dim=16, linear_num_key_heads=2, linear_key_head_dim=8,
                           linear_num_value_heads=4, linear_value_head_dim=8, num_hidden_layers=4, attention_bias=True,
                           hc_count=2, hc_lowrank=4, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16,
                           indexer_budget=8, indexer_compress_ratio=2, ple_layer_ids=[1, 3], ple_embed_dim=16,
                           heads_per_ngram=2, ngram_vocab_size_base=50, make_ngram_vocab_size_divisible_by=8,
                           eos_token_id=0, pad_token_id=0),
    # gpt-oss's layers, bidirectional, a biased token-classification head of num_labels outputs
    "openai_privacy_filter": dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                  sliding_window=8, num_labels=7, pad_token_id=0, eos_token_id=0),
    # MLA with a fused query/gate projection, an indexer on every layer, gated norms
    "axk2": dict(intermediate_size=80, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2,
                 num_experts_per_tok=2, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                 v_head_dim=12, num_key_value_heads=4, index_n_heads=2, index_head_dim=8, gated_norm_rank=4,
                 attention_bias=True, mlp_layer_types=["dense", "sparse", "dense"]),
    # MLA with a per-head output gate, wider sliding-window layers (per_layer_config), an indexer on the others
    "dots3_note_text": dict(intermediate_size=80, moe_intermediate_size=32, shared_experts_intermediate_size=24,
                            n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, n_group=2, topk_group=1,
                            q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                            num_key_value_heads=4, head_dim=16, index_n_heads=2, index_head_dim=16, num_hidden_layers=4,
                            sliding_window=8, mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
                            layer_types=["indexed_attention", "sliding_attention", "indexed_attention",
                                         "sliding_attention"],
                            per_layer_config={1: dict(num_attention_heads=8, num_key_value_heads=8, q_lora_rank=32,
                                                      kv_lora_rank=24, qk_nope_head_dim=16, head_dim=24),
                                              3: dict(num_attention_heads=8, num_key_value_heads=8, q_lora_rank=32,
                                                      kv_lora_rank=24, qk_nope_head_dim=16, head_dim=24)},
                            pad_token_id=0, bos_token_id=0, eos_token_id=0),
    "llama": dict(intermediate_size=80),
    "qwen2": dict(intermediate_size=80),
    "qwen3": dict(intermediate_size=80, head_dim=24, tie_word_embeddings=True),
}
LLAMA4_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=56,
                     patch_size=14, projector_input_dim=64, projector_output_dim=64, vision_output_dim=64)


def tiny_config(case: str) -> dict:
    """The tiny config of a TINY_CASES key ("family" or "family:variant")."""
    model_type = case.split(":")[0]
    if model_type in ("switch_transformers", "dbrx"):
        return dict(model_type=model_type, vocab_size=100, **TINY_CASES[case])
    return dict(model_type=model_type, **{**TINY, **TINY_CASES[case]})


def hf_model(cfg_dict, device="meta", **kwargs):
    """transformers' own model class for the config: seq2seq for Switch, image-text for Llama 4 (vision +
    text, likewise Qwen3.5-MoE, Qwen3-VL-MoE, GLM-4.5V, Aria) and Mistral 4 (its auto class, a text-only model), causal LM otherwise."""
    auto = {"switch_transformers": transformers.AutoModelForSeq2SeqLM,
            "llama4": transformers.AutoModelForImageTextToText,
            "mistral4": transformers.AutoModelForImageTextToText,
            "qwen3_5_moe": transformers.AutoModelForImageTextToText,
            "qwen3_vl_moe": transformers.AutoModelForImageTextToText,
            "glm4v_moe": transformers.AutoModelForImageTextToText,
            "aria": transformers.AutoModelForImageTextToText,
            "glm5_next": transformers.AutoModelForImageTextToText,
            "minimax_m3_vl": transformers.AutoModelForImageTextToText,
            "qwen3_omni_moe_thinker": transformers.AutoModelForImageTextToText,
            "qwen4_exp": transformers.AutoModelForImageTextToText,
            "openai_privacy_filter": transformers.AutoModelForTokenClassification,
            "deepseek_ocr2": transformers.AutoModelForImageTextToText,
            "unlimited_ocr": transformers.AutoModelForImageTextToText,
            "mistral_large4": transformers.AutoModelForImageTextToText,
            "dots3_note": transformers.AutoModelForImageTextToText}.get(cfg_dict["model_type"],
                                                                   transformers.AutoModelForCausalLM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.AutoConfig.for_model(**cfg_dict)
        with torch.device(device):
            return auto.from_config(cfg, **kwargs)


def numel(model, keep=lambda name: True) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if keep(n))


def spec_of(model_type: str, model) -> params.ArchSpec:
    return params.spec_from_hf(model.config.to_dict())


@pytest.mark.parametrize("model_type", sorted(TINY_CASES))
def test_tiny_configs_count_equals_hf_to_the_parameter(model_type):
    model = hf_model(tiny_config(model_type))
    spec = spec_of(model_type, model)
    count = params.count_params(spec)
    assert count.total == numel(model)
    # active, from HF's own modules: every parameter outside the routed-expert containers, plus top_k/E of
    # each MoE layer's experts container
    # routed experts: HF's "experts" containers (shared ones are "shared_expert(s)"); JetMoE's attention and MLP
    # mixtures hold their stacked experts as input_linear / output_linear (their routers and biases are shared)
    is_expert = (lambda n: n.endswith(("input_linear.weight", "output_linear.weight"))) if model_type == "jetmoe" \
        else (lambda n: ".experts." in n)
    container = lambda n: n.split(".experts.")[0] if ".experts." in n else n.rsplit(".", 2)[0]
    expert_containers = {container(n) for n, _ in model.named_parameters() if is_expert(n)}
    assert len(expert_containers) == len(spec.moe_layers) * (2 if spec.attn_experts else 1)
    top_k = {"switch_transformers": 1}.get(model_type, spec.top_k)
    per_layer = [numel(model, lambda n, c=c: is_expert(n) and container(n) == c) for c in expert_containers]
    assert all(p % max(spec.num_experts, 1) == 0 for p in per_layer)
    active = numel(model, lambda n: not is_expert(n)) + sum(p // spec.num_experts * top_k for p in per_layer)
    assert (count.active == count.total) == (not spec.num_experts)
    assert count.active == active
    emb = numel(model, lambda n: "embed_tokens" in n or n in ("shared.weight", "transformer.wte.weight",
                                                              "model.embeddings.weight",
                                                              "lm_head.weight", "lm_head.bias",
                                                              "score.weight", "score.bias"))
    assert count.active_non_embedding == active - emb
    head = numel(model, lambda n: n.startswith(("lm_head.", "score."))) if not spec.tie_embeddings \
        else spec.vocab * spec.d
    assert count.active_with_head == count.active_non_embedding + head


def test_llama4_vision_tower_counted_apart_equals_hf():
    text = tiny_config("llama4_text")
    model = hf_model(dict(model_type="llama4", text_config=text, vision_config=LLAMA4_VISION))
    c = params.count_params(params.spec_from_hf(model.config.to_dict()))
    assert c.total == numel(model, lambda n: n.startswith("language_model."))
    assert c.separate["vision"] == numel(model, lambda n: not n.startswith("language_model."))
    assert c.total_with_separate == numel(model)


# dots1/hunyuan/dbrx: see TINY_CASES; lfm2_moe's default layer_types is None, which transformers cannot build
OCR_TEXT = dict(intermediate_size=80, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2,
                num_experts_per_tok=2, attention_bias=True, mlp_layer_types=["dense", "sparse", "sparse"])
OCR_SAM = dict(hidden_size=16, output_channels=16, num_hidden_layers=3, num_attention_heads=2, image_size=64,
               global_attn_indexes=[1], window_size=2)
QWEN3_5_VISION = dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=64, patch_size=4,
                      temporal_patch_size=2, num_position_embeddings=16)


# image-text families: (text sub-config, vision sub-config) of their tiny configs
VISION_LANGUAGE = {
    "qwen3_5_moe": (TINY_CASES["qwen3_5_moe_text"], QWEN3_5_VISION),
    "qwen3_vl_moe": (TINY_CASES["qwen3_moe"], dict(QWEN3_5_VISION, deepstack_visual_indexes=[0, 1])),  # DeepStack
    "glm4v_moe": (dict(intermediate_size=80, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                       num_experts_per_tok=2, first_k_dense_replace=1, head_dim=16, attention_bias=True,
                       rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 2, 4],
                                            partial_rotary_factor=1.0)),
                  dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=64, image_size=56,
                       attention_bias=True)),
    "aria": (TINY_CASES["aria_text"], dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=16)),
    # KDA and MLA (no RoPE dims) layers, an indexer with k-pool compression on the layers the pattern marks "F",
    # hyper-connections
    "glm5_next": (dict(intermediate_size=80, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                       num_experts_per_tok=2, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=0,
                       v_head_dim=12, num_key_value_heads=4, index_n_heads=2, index_head_dim=8, index_topk=8,
                       index_kpool=4, linear_head_dim=8, linear_num_heads=2, hc_mult=2, attention_bias=True,
                       num_hidden_layers=4, pad_token_id=0, index_topk_pattern="FFFS",
                       layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
                       mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),
                  dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=64,
                       projection_intermediate_size=40, patch_size=4)),
    "qwen4_exp": (TINY_CASES["qwen4_exp_text"], QWEN3_5_VISION),
    # MLA without a q latent, a NoPE layer (the 4th), a layer reusing layer 0's KV latent, an indexer-free layer
    "mistral_large4": (dict(intermediate_size=80, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2,
                            num_experts_per_tok=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                            v_head_dim=12, num_key_value_heads=4, index_n_heads=2, index_head_dim=16, index_topk=8,
                            num_hidden_layers=4, kv_source_layers=[0, 0, 2, 3], index_topk_pattern="FSFF",
                            attention_bias=True),
                       dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            patch_size=16, image_size=32)),
    # its vision tower has MoE blocks of its own (and a dense one)
    "dots3_note": (TINY_CASES["dots3_note_text"], dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                      num_attention_heads=2, moe_intermediate_size=8,
                                                      num_local_experts=4, num_experts_per_tok=2, attention_bias=True,
                                                      mlp_layer_types=["sparse", "dense"], adapter_in_dim=16,
                                                      adapter_out_dim=64)),
    "minimax_m3_vl": (TINY_CASES["minimax_m3_vl_text"], dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                            num_attention_heads=2, patch_size=4)),
    "qwen3_omni_moe_thinker": (dict(TINY_CASES["qwen3_moe"], norm_topk_prob=False),
                               dict(QWEN3_5_VISION, deepstack_visual_indexes=[1])),
    # SAM (windowed and global layers; DeepSeek-OCR-2's mlp_dim and downsample_channels derived) + a second encoder
    "deepseek_ocr2": (OCR_TEXT, dict(sam_config=OCR_SAM, encoder_config=dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))),
    "unlimited_ocr": (OCR_TEXT, dict(sam_config=dict(OCR_SAM, mlp_dim=48, downsample_channels=[16, 24]),
                                     encoder_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                         num_attention_heads=2, image_size=32, patch_size=8))),
}
# towers beside the vision one: tiny config, parameter-name prefix in transformers' model
AUDIO = {"qwen3_omni_moe_thinker": (dict(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32,
                                         output_dim=64, downsample_hidden_size=8, num_mel_bins=20),
                                    "model.audio_tower."),
         "dots3_note": (dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                             downsample_hidden_size=8, adapter_input_size=16, adapter_out_dim=64, feature_size=20),
                        "model.audio_tower.")}


# Qwen4-Exp's defaults leave the QSA indexer fields None: transformers cannot build that model, calc refuses it
NO_FULL_SIZE_DEFAULTS = ("qwen4_exp", "qwen4_exp_text")


@pytest.mark.parametrize("model_type", NO_FULL_SIZE_DEFAULTS)
def test_families_transformers_cannot_build_at_defaults(model_type):
    with pytest.raises(TypeError):
        hf_model({"model_type": model_type})
    with pytest.raises(ConfigError, match=r"indexer_n_heads=None \(qwen4_exp_text\)"):
        params.spec_from_hf({"model_type": model_type})


@pytest.mark.parametrize("use_transformers", [True, False], ids=["transformers", "table"])
@pytest.mark.parametrize("size", ["tiny", "full_size_defaults"])
@pytest.mark.parametrize("model_type", sorted(VISION_LANGUAGE))
def test_vision_towers_counted_apart_equal_hf(model_type, size, use_transformers, monkeypatch):
    """The hub's Qwen3.5-MoE and Qwen3-VL-MoE configs are image-text: the text decoder is `total`, the vision tower
    apart."""
    from moekit.interop import config_reader

    if size == "full_size_defaults" and model_type in NO_FULL_SIZE_DEFAULTS:
        pytest.skip("transformers cannot build its defaults: see test_families_transformers_cannot_build_at_defaults")
    cfg = {"model_type": model_type}
    if size == "full_size_defaults" and model_type == "deepseek_ocr2":
        cfg.update(text_config=dict(mlp_layer_types=["dense"] + ["sparse"] * 31))  # (None by default: see below)
    if size == "tiny":
        text, vision = VISION_LANGUAGE[model_type]
        cfg.update(text_config={**TINY, **text}, vision_config=vision)
        if model_type in AUDIO:
            cfg.update(audio_config=AUDIO[model_type][0])
    model = hf_model(cfg)
    if not use_transformers:
        monkeypatch.setattr(config_reader, "_transformers", lambda: None)
    c = params.count_params(params.spec_from_hf(cfg))
    is_vision = lambda n: not n.startswith(("model.language_model.", "lm_head."))  # tower and projector
    is_audio = lambda n: model_type in AUDIO and n.startswith(AUDIO[model_type][1])
    assert c.total == numel(model, lambda n: not is_vision(n))
    assert c.separate["vision"] == numel(model, lambda n: is_vision(n) and not is_audio(n)) > 0
    assert c.separate.get("audio", 0) == numel(model, is_audio) and ("audio" in c.separate) == (model_type in AUDIO)


@pytest.mark.parametrize("use_transformers", [True, False], ids=["transformers", "table"])
@pytest.mark.parametrize("variant", ["language_config", "first_k_dense_replace"])
def test_unlimited_ocr_text_config_as_the_original_checkpoint_stores_it(variant, use_transformers, monkeypatch):
    """Unlimited-OCR's original config holds the text config as language_config, and may give the dense layers by
    first_k_dense_replace instead of mlp_layer_types (1 when absent): read as transformers reads them."""
    from moekit.interop import config_reader

    text, vision = VISION_LANGUAGE["unlimited_ocr"]
    text = {k: v for k, v in {**TINY, **text}.items() if k != "mlp_layer_types"}
    cfg = {"model_type": "unlimited_ocr", "vision_config": vision}
    if variant == "language_config":
        cfg.update(language_config=text)
    else:
        cfg.update(text_config=dict(text, first_k_dense_replace=2))
    model = hf_model(cfg)
    if not use_transformers:
        monkeypatch.setattr(config_reader, "_transformers", lambda: None)
    c = params.count_params(params.spec_from_hf(cfg))
    language = lambda n: n.startswith(("model.language_model.", "lm_head."))
    assert c.total == numel(model, language)
    assert c.separate["vision"] == numel(model, lambda n: not language(n))


@pytest.mark.parametrize("use_transformers", [True, False], ids=["transformers", "table"])
def test_deepseek_ocr2_without_mlp_layer_types_is_refused_as_transformers_cannot_build_it(use_transformers,
                                                                                         monkeypatch):
    from moekit.errors import ConfigError
    from moekit.interop import config_reader

    with pytest.raises(TypeError):  # transformers indexes mlp_layer_types[layer_idx]
        hf_model({"model_type": "deepseek_ocr2"})
    if not use_transformers:
        monkeypatch.setattr(config_reader, "_transformers", lambda: None)
    with pytest.raises(ConfigError, match="mlp_layer_types"):
        params.spec_from_hf({"model_type": "deepseek_ocr2"})


FAMILY_DEFAULTS = sorted(set(params.HF_SPECS) - {"deepseek", "llama4", "switch_transformers", "dots1",
                                                   "hunyuan_v1_moe", "dbrx", "lfm2_moe", "qwen3_5_moe",
                                                   "qwen3_vl_moe", "glm4v_moe", "aria", "glm5_next",
                                                   "minimax_m3_vl", "qwen3_omni_moe_thinker", "qwen4_exp",
                                                   "qwen4_exp_text", "deepseek_ocr2", "unlimited_ocr",
                                                   "mistral_large4", "dots3_note"})


def test_privacy_filter_default_labels_without_transformers(monkeypatch):
    """A config.json without id2label / num_labels gets transformers' default label set: the head counted without
    transformers has as many rows as the one transformers builds."""
    from moekit.interop import config_reader

    rows = hf_model({"model_type": "openai_privacy_filter"}).score.weight.shape[0]
    monkeypatch.setattr(config_reader, "_transformers", lambda: None)
    assert params.spec_from_hf({"model_type": "openai_privacy_filter"}).head_rows == rows


@pytest.mark.parametrize("model_type", FAMILY_DEFAULTS)
def test_every_family_at_its_full_size_defaults_equals_hf(model_type):
    """The family's config class defaults (its reference model, e.g. DeepSeek-V3's 671B) on the meta device."""
    model = hf_model({"model_type": model_type})
    assert params.count_params(params.spec_from_hf({"model_type": model_type})).total == numel(model)


def test_trimmed_deepseek_config_counts_transformers_defaults():
    """A config without n_shared_experts (transformers: 1) used to be counted without shared experts."""
    cfg = tiny_config("deepseek_v3")
    del cfg["n_shared_experts"]
    assert params.count_params(params.spec_from_hf(cfg)).total == numel(hf_model(cfg))


@pytest.mark.parametrize("name", params.shipped_configs())
def test_full_size_shipped_configs_equal_hf(name):
    cfg, _ = params.load_config(name)
    if cfg["model_type"] == "deepseek":
        pytest.skip("DeepSeekMoE v1 is remote code: counted analytically, checked against its published total")
    c = params.count_params(params.spec_from_hf(cfg, name))
    # Kimi-K2 is remote code with DeepSeek-V3's architecture: transformers builds it as deepseek_v3
    hf_cfg = dict(cfg, model_type="deepseek_v3") if cfg["model_type"] == "kimi_k2" else cfg
    # Llama 4: HF builds the vision tower too; our total is the text decoder, the tower is reported apart
    assert (c.total_with_separate if cfg["model_type"] == "llama4" else c.total) == numel(hf_model(hf_cfg))


# (name, published total, published active (billions), the active convention the publisher uses); Meta's
# Llama 4 total includes the vision tower, DeepSeek's 671B excludes the MTP module (tested below)
PUBLISHED = [
    ("mixtral-8x7b", "46.7", "12.9", "active"),  # Mistral AI: 46.7B total, 12.9B active
    ("mixtral-8x22b", "141", "39", "active"),
    ("qwen3-30b-a3b", "30.5", "3.3", "active"),  # Qwen3 model card: 30.5B total, 3.3B activated
    ("qwen3-235b-a22b", "235", "22", "active"),
    ("qwen1.5-moe-a2.7b", "14.3", "2.7", "active"),
    ("olmoe-1b-7b", "6.9", "1.3", "active"),  # OLMoE paper: 6.9B total, 1.3B active
    ("llama-4-scout-17b-16e", "109", "17", "active"),  # Meta: 109B total (text + vision), 17B active
    ("deepseek-v3", "671", "37", "active_with_head"),  # DeepSeek-V3 report: 671B total, 37B activated
    ("deepseek-v2-lite", "15.7", "2.4", "active_with_head"),  # DeepSeek-V2 report: 15.7B, 2.4B activated
    ("gpt-oss-120b", "116.83", "5.13", "active_with_head"),  # gpt-oss model card: 116.83B, 5.13B active
    ("gpt-oss-20b", "20.91", "3.61", "active_with_head"),  # 20.91B total, 3.61B active
    ("llama-3-8b", "8.0", "8.0", "active"),
    # DeepSeekMoE paper (Dai et al. 2024) and model card: 16.4B total, 2.8B activated
    ("deepseek-moe-16b", "16.4", "2.8", "active"),
    # Moonshot AI: 1T total (1,026B), 32B activated
    ("kimi-k2", "1026", "32", "active"),
]


def same_within_rounding(n: int, published: str) -> bool:
    """The published figure is n in billions rounded or truncated to the digits it shows."""
    digits = len(published.split(".")[1]) if "." in published else 0
    scaled = n / 1e9 * 10 ** digits
    return int(published.replace(".", "")) in (round(scaled), int(scaled))


@pytest.mark.parametrize("name,total_b,active_b,convention", PUBLISHED)
def test_published_figures(name, total_b, active_b, convention):
    cfg, _ = params.load_config(name)
    c = params.count_params(params.spec_from_hf(cfg, name))
    assert same_within_rounding(c.total_with_separate if name.startswith("llama-4") else c.total, total_b)
    assert same_within_rounding(getattr(c, convention), active_b)


def test_deepseek_v3_mtp_and_buffers():
    cfg, _ = params.load_config("deepseek-v3")
    s = params.spec_from_hf(cfg)
    c = params.count_params(s)
    assert c.total == 671_026_404_352 and "mtp" in c.separate
    # the MTP module: projection 2d x d, three norms, one MoE decoder layer (HF layer 3 has the same shape)
    layer = params.attention_params(s) + 2 * s.d + params.moe_layer_params(s)
    assert c.separate["mtp"] == 2 * s.d * s.d + 3 * s.d + layer
    # HF model card: "685B, which includes 671B of the Main Model weights and 14B of the MTP Module"; the
    # stored MTP layer carries its own copy of the embedding and head (the card's total also counts FP8
    # scale tensors, ~0.04B)
    stored_mtp = c.separate["mtp"] + 2 * s.vocab * s.d
    assert round(stored_mtp / 1e9) == 13 or round(stored_mtp / 1e9) == 14
    assert abs((c.total + stored_mtp) / 1e9 - 685) < 1
    assert c.buffers == {"e_score_correction_bias": 58 * 256}


@pytest.mark.parametrize("model_type", ["mixtral", "llama", "qwen3_moe", "deepseek_v3", "qwen3", "mimo_v2_flash", "laguna",
                                        "cohere2_moe"])
def test_forward_flops_equal_torch_flop_counter_on_hf_eager(model_type):
    """2 x matmul params + attention FLOPs, times T tokens at context T (eager attention computes the full
    T x T scores), equals torch's FlopCounterMode on transformers' eager forward."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = hf_model(tiny_config(model_type), device="cpu", attn_implementation="eager",
                     experts_implementation=None if model_type in ("llama", "qwen3") else "eager").eval()
    T = 7
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.randint(0, 100, (1, T)))
    spec = spec_of(model_type, model)
    assert T * flops.forward_flops_per_token(spec, T) == fc.get_total_flops()
    assert flops.flops_report(spec, T)["train_flops_per_token"] == 3 * flops.forward_flops_per_token(spec, T)


def test_moekit_preset_spec_matches_the_real_module():
    import dataclasses

    from moekit.config import MLAConfig, RouterConfig
    from moekit.models.decoder import MoETransformer
    from moekit.models.presets import PRESETS, get_preset

    configs = [get_preset(p, vocab_size=300) for p in PRESETS]
    mix = get_preset("mixtral-like", vocab_size=300, n_layers=2)
    configs += [
        dataclasses.replace(mix, attention="mla", mla=MLAConfig(q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16,
                                                                qk_rope_head_dim=8, v_head_dim=16),
                            attention_bias=True),
        dataclasses.replace(mix, attention_bias=True, attention_out_bias=True, dense_layers=(0,), attn_windows=(4, 0)),
        dataclasses.replace(mix, tie_embeddings=True, qk_norm="full", attention_bias=True,
                            moe=dataclasses.replace(mix.moe, router=RouterConfig(kind="noisy_topk", top_k=2),
                                                    num_shared_experts=1, shared_gate=True)),
    ]
    for cfg in configs + [c.dense_twin() for c in configs]:
        torch.manual_seed(0)
        with torch.device("meta"):
            model = MoETransformer(cfg)
        c = params.count_params(params.spec_from_moekit(cfg))
        assert c.total == model.num_params()
        assert c.active == model.num_active_params()
        assert c.active_non_embedding == model.num_active_params(exclude_embeddings=True)
    with pytest.raises(ValueError, match="router.kind='top_p'"):
        params.spec_from_moekit(dataclasses.replace(mix, moe=dataclasses.replace(
            mix.moe, router=RouterConfig(kind="top_p", top_k=2))))


@pytest.mark.parametrize("case", ["mimo_v2_flash", "laguna", "cohere2_moe", "qwen3_5_moe_text", "jamba",
                                  "granitemoehybrid", "lara_mini", "lfm2_moe", "nemotron_h", "kolibri1"])
def test_kv_cache_equals_the_hf_cache_after_a_forward(case):
    """Per-layer K/V widths (MiMo-V2-Flash: 2x kv heads on sliding layers, narrower values) and no K/V on Mamba /
    linear-attention layers: the calculator's cache at 1 value per element equals what transformers stores."""
    model = hf_model(tiny_config(case), device="cpu").eval()
    T = 5
    with torch.no_grad():
        cache = model(torch.randint(0, 100, (1, T)), use_cache=True).past_key_values
    stored = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers
                 if getattr(layer, "keys", None) is not None)
    spec = spec_of(case, model)
    assert memory.kv_cache_bytes(spec, 1, T, bytes_per_value=1) == stored > 0


# configs.json that leave the family's layer patterns to be derived at load time (transformers fills them in
# __post_init__; without transformers the calculator derives them)
DERIVED_PATTERNS = {
    "cohere2_moe": dict(intermediate_size=48, num_experts=4, head_dim=16, first_k_dense_replace=2,
                        num_hidden_layers=5, prefix_dense_intermediate_size=80, sliding_window_pattern=2,
                        prefix_dense_sliding_window_pattern=2),
    "qwen3_5_moe_text": dict(num_hidden_layers=6, full_attention_interval=3, moe_intermediate_size=32,
                             shared_expert_intermediate_size=24, num_experts=6, head_dim=16, linear_num_key_heads=2,
                             linear_key_head_dim=8, linear_num_value_heads=4, linear_value_head_dim=8),
    "mimo_v2_flash": dict(num_hidden_layers=7, intermediate_size=80, moe_intermediate_size=32, n_routed_experts=8,
                          head_dim=24, v_head_dim=16),
    "laguna": dict(intermediate_size=80, moe_intermediate_size=32, shared_expert_intermediate_size=24,
                   num_experts=6, head_dim=16),
    "jamba": dict(num_hidden_layers=9, intermediate_size=48, num_experts=4, attn_layer_period=4,
                  attn_layer_offset=2),
    "granitemoehybrid": dict(intermediate_size=48, num_local_experts=4, mamba_n_heads=8),
    "lara_mini": dict(num_hidden_layers=7, moe_intermediate_size=32, shared_expert_intermediate_size=24,
                      num_experts=6, head_dim=16, linear_num_key_heads=2, linear_key_head_dim=8,
                      linear_num_value_heads=4, linear_value_head_dim=8),
    "kimi_linear": dict(num_hidden_layers=6, intermediate_size=80, moe_intermediate_size=32, num_local_experts=8,
                        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, num_key_value_heads=4,
                        pad_token_id=0, bos_token_id=0, eos_token_id=0,
                        linear_attn_config=dict(head_dim=8, num_heads=2, short_conv_kernel_size=3,
                                                full_attn_layers=[2, 6], kda_layers=[1, 3, 4, 5])),
    "nemotron_h": dict(intermediate_size=80, moe_intermediate_size=32, n_routed_experts=6, mamba_num_heads=8,
                       mamba_head_dim=8, mamba_n_groups=2, mamba_d_conv=3, mamba_conv_bias=False, ssm_state_size=8,
                       hybrid_override_pattern="M-*EME"),
    "bailing_hybrid": dict(num_hidden_layers=6, intermediate_size=80, moe_intermediate_size=32, num_local_experts=8,
                           n_group=1, topk_group=1, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                           v_head_dim=12, num_key_value_heads=4, head_dim=16, layer_group_size=3, pad_token_id=0,
                           eos_token_id=0),
    # the checkpoint's own fields: sparse_attention_config (legacy indexer names) and moe_layer_freq
    "minimax_m3_vl_text": dict(intermediate_size=32, dense_intermediate_size=80, shared_intermediate_size=24,
                               num_local_experts=6, head_dim=16, rotary_dim=8, moe_layer_freq=[0, 1, 1],
                               sparse_attention_config=dict(sparse_attention_freq=[0, 1, 1], sparse_num_index_heads=2,
                                                            sparse_index_dim=8),
                               pad_token_id=0, bos_token_id=0, eos_token_id=0),
    "axk2": dict(num_hidden_layers=5, intermediate_size=80, moe_intermediate_size=32, n_routed_experts=8,
                 q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                 num_key_value_heads=4, index_n_heads=2, index_head_dim=8, gated_norm_rank=4, first_k_dense_replace=2,
                 moe_layer_freq=2),
    # the released checkpoint's legacy fields: swa_* shapes, first_k_dense_replace, the default layer pattern
    "dots3_note_text": dict(num_hidden_layers=6, intermediate_size=80, moe_intermediate_size=32,
                            moe_shared_expert_intermediate_size=24, n_routed_experts=8, n_group=2, topk_group=1,
                            q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                            num_key_value_heads=4, head_dim=16, index_n_heads=2, index_head_dim=16,
                            swa_num_attention_heads=8, swa_num_key_value_heads=8, swa_q_lora_rank=32,
                            swa_kv_lora_rank=24, swa_head_dim=24, swa_qk_nope_head_dim=16, swa_v_head_dim=8,
                            first_k_dense_replace=2, pad_token_id=0, bos_token_id=0, eos_token_id=0),
    "beam": dict(num_hidden_layers=8, intermediate_size=80, moe_intermediate_size=32, num_experts=8, n_group=2,
                 topk_group=1, head_dim=16, sliding_window=8),
}


@pytest.mark.parametrize("model_type", sorted(DERIVED_PATTERNS))
def test_derived_layer_patterns_equal_hf_with_and_without_transformers(model_type, monkeypatch):
    from moekit.interop import config_reader

    cfg = dict(model_type=model_type, **{**TINY, **DERIVED_PATTERNS[model_type]})
    want = numel(hf_model(cfg))
    with_tf = params.spec_from_hf(cfg)
    monkeypatch.setattr(config_reader, "_transformers", lambda: None)
    table = params.spec_from_hf(cfg)
    assert params.count_params(with_tf).total == params.count_params(table).total == want
    for i in range(table.n_layers):  # the same windows and mixers per layer, read either way
        assert (table.window(i), i in table.linear_layers) == (with_tf.window(i), i in with_tf.linear_layers)
    assert table.moe_layers == with_tf.moe_layers


def test_flops_and_memory_hand_computed():
    spec = params.spec_from_hf(params.load_config("mixtral-8x7b")[0])
    c = params.count_params(spec)
    # matmul params: active minus embedding table minus norms (Mixtral has no biases)
    assert flops.matmul_params_per_token(spec) == c.active - 32000 * 4096 - (2 * 32 + 1) * 4096
    attn = 32 * 2 * 1024 * 32 * (128 + 128)
    assert flops.attention_flops_per_token(spec, 1024) == attn
    # KV cache: 32 layers x 2 (K, V) x 8 kv heads x 128 x 2 bytes
    assert memory.kv_cache_bytes_per_token(spec) == 32 * 2 * 8 * 128 * 2
    assert memory.kv_cache_bytes(spec, 4, 1000) == 4 * 1000 * 32 * 2 * 8 * 128 * 2
    w = memory.weight_bytes(c.total)
    assert w["bf16"] == 2 * c.total and round(w["bf16"] / 1e9) == 93  # the famous ~94 GB in fp16
    assert w["int4"] == pytest.approx(c.total * (0.5 + 2 / 128))
    ds = params.spec_from_hf(params.load_config("deepseek-v3")[0])
    assert memory.kv_cache_bytes_per_token(ds) == 61 * (512 + 64) * 2  # MLA latent + rope key
    # gpt-oss: 12 of 24 layers keep at most 128 positions
    oss = params.spec_from_hf(params.load_config("gpt-oss-20b")[0])
    per_layer = 2 * 8 * 64 * 2
    assert memory.kv_cache_bytes(oss, 1, 4096) == per_layer * (12 * 128 + 12 * 4096)
    assert flops.attention_flops_per_token(oss, 4096) == 2 * 64 * 128 * (12 * 128 + 12 * 4096)
    # Llama 4 Scout: 36 chunked layers (8192 positions) + 12 global NoPE layers
    scout = params.spec_from_hf(params.load_config("llama-4-scout-17b-16e")[0])
    assert memory.kv_cache_bytes(scout, 1, 100_000) == 2 * 8 * 128 * 2 * (36 * 8192 + 12 * 100_000)
    # switch-base-8: 12 decoder layers cache self K/V per generated token and cross K/V per encoder token
    sw = params.spec_from_hf(params.load_config("switch-base-8")[0])
    assert memory.kv_cache_bytes_per_token(sw) == 12 * 2 * (2 * 12 * 64 * 2)
    assert flops.attention_flops_per_token(sw, 100) == (12 + 2 * 12) * 2 * 100 * 12 * (64 + 64)


def test_training_memory_layouts():
    spec = params.spec_from_hf(params.load_config("mixtral-8x7b")[0])
    c = params.count_params(spec)
    experts, other = c.breakdown["routed_experts"], c.total - c.breakdown["routed_experts"]
    t1 = memory.training_bytes_per_gpu(spec)
    assert t1["total"] == pytest.approx(16 * c.total)  # 2 + 2 + 4 + 8 bytes per parameter
    t8 = memory.training_bytes_per_gpu(spec, ep=8, dp=2)
    assert t8["params_per_gpu"] == pytest.approx(other + experts / 8)
    assert t8["total"] == pytest.approx(16 * (other + experts / 8))
    z = memory.training_bytes_per_gpu(spec, ep=8, dp=2, zero1=True)
    assert z["optimizer_states"] == pytest.approx(12 * (other / 16 + experts / 8 / 2))
    assert z["weights_and_grads"] == t8["weights_and_grads"]
    with pytest.raises(ValueError, match="ep=3 must divide num_experts=8"):
        memory.training_bytes_per_gpu(spec, ep=3)
    with pytest.raises(ValueError, match="ep=0 and dp=1"):
        memory.training_bytes_per_gpu(spec, ep=0)


def test_errors_and_cli(capsys, tmp_path):
    with pytest.raises(ValueError, match="model_type='bert'"):
        params.spec_from_hf({"model_type": "bert"})
    with pytest.raises(UsageError, match="neither a config.json path nor a shipped config"):
        params.load_config("no-such-model")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        params.load_config(bad)
    assert cli_main(["calc", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    assert "46,702,792,704" in out and "12,879,925,248" in out and "46.7B" in out
    assert cli_main(["calc", "deepseek-v3", "--json", "--ep", "8", "--dp", "2", "--zero1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params"]["total"] == 671_026_404_352 and report["params"]["separate"]["mtp"] > 0
    assert report["memory"]["layout"] == {"ep": 8, "dp": 2, "zero1": True}
    assert cli_main(["calc", "tiny"]) == 0  # a moekit preset
    capsys.readouterr()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(tiny_config("mixtral")))
    assert cli_main(["calc", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    (tmp_path / "hybrid").mkdir()  # a saved HF config.json of a Mamba hybrid
    hybrid = hf_model(tiny_config("jamba"))
    hybrid.config.save_pretrained(tmp_path / "hybrid")
    assert cli_main(["calc", str(tmp_path / "hybrid")]) == 0
    out = capsys.readouterr().out
    assert f"{numel(hybrid):,}" in out and "2 of 4 layers use Mamba" in out
    assert cli_main(["calc", "no-such-model"]) == 2
    assert cli_main(["calc", "mixtral-8x7b", "--ep", "3"]) == 2


def test_moekit_expert_biases_are_counted_to_the_parameter():
    """MoEConfig.bias puts biases on every routed and shared expert projection; the calculator counts them
    like the meta-device model (gated and plain activations)."""
    from moekit.config import ModelConfig, MoEConfig, RouterConfig
    from moekit.models.decoder import MoETransformer

    for activation in ("swiglu", "gelu"):
        moe = MoEConfig(d_model=16, num_experts=4, expert_hidden=12, activation=activation, bias=True,
                        num_shared_experts=1, shared_hidden=8, router=RouterConfig(top_k=2))
        cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, moe=moe)
        with torch.device("meta"):
            model = MoETransformer(cfg)
        c = params.count_params(params.spec_from_moekit(cfg))
        assert (c.total, c.active) == (model.num_params(), model.num_active_params())


@pytest.mark.parametrize("use_transformers", [True, False], ids=["transformers", "table"])
@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_trimmed_configs_count_the_same(case, use_transformers, monkeypatch):
    """A config.json with every field at transformers' default left out counts as the full one, read through
    transformers or through the defaults table (no transformers)."""
    from moekit.interop import config_reader

    model_type = case.split(":")[0]
    full = hf_model(tiny_config(case)).config.to_dict()
    fields = config_reader.table()[model_type]["fields"]
    trimmed = {k: v for k, v in full.items() if k not in fields or fields[k] != v}
    assert len(trimmed) < len(full)
    want = params.count_params(params.spec_from_hf(full)).total
    if not use_transformers:
        monkeypatch.setattr(config_reader, "_transformers", lambda: None)
    assert params.count_params(params.spec_from_hf(dict(trimmed, model_type=model_type))).total == want
