"""``patch`` against transformers' own modules, one tiny random model per family (from_config, no hub).

For every entry of PATCH_FAMILIES: the patched model gives the unpatched model's logits and the same gradient
for every parameter (float32, eval mode), expert gradients compared through the entry's key map; a bf16 model
patches and runs. Families with training-time input jitter draw the same noise as transformers; PhiMoE's
training mode (sampled experts, straight-through gradients) equals transformers' with the same seed.
"""

import copy
from dataclasses import replace
import warnings

import pytest
import torch

from moekit.interop.patch import PatchedMoEBlock, patch
from moekit.interop.patch_families import NOT_PATCHABLE, PATCH_FAMILIES, TRANSFORMS

transformers = pytest.importorskip("transformers")

V = 96
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
            max_position_embeddings=64, tie_word_embeddings=False)
MOE = dict(num_experts_per_tok=2, intermediate_size=24)
DEEPSEEK = dict(MOE, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=16, n_group=2, topk_group=1,
                routed_scaling_factor=1.5, first_k_dense_replace=1)
MLA = dict(kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4)
LLAMA4_TEXT = dict(intermediate_size=24, intermediate_size_mlp=48, num_local_experts=4, num_experts_per_tok=1,
                   head_dim=8)
LINEAR_ATTENTION = dict(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
                        linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)
MROPE = dict(rope_type="default", rope_theta=1e4, mrope_section=[1, 1, 2])
VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32)
OCR_TEXT = dict(TINY, **DEEPSEEK, topk_method="group_limited_greedy", mlp_layer_types=["dense", "sparse"])
OCR_VISION = dict(sam_config=dict(hidden_size=16, output_channels=16, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=64, global_attn_indexes=[0], window_size=2, downsample_channels=[16, 32]),
                  encoder_config=dict(vocab_size=V, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2))
QWEN4_EXP_TEXT = dict(MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24, head_dim=8,
                      norm_topk_prob=False, hc_count=2, hc_lowrank=4, indexer_n_heads=2, indexer_kv_heads=1,
                      indexer_head_dim=8, indexer_budget=8, indexer_compress_ratio=2, **LINEAR_ATTENTION)
DOTS3_NOTE_TEXT = dict(DEEPSEEK, num_local_experts=8, shared_experts_intermediate_size=16, head_dim=8,
                       num_key_value_heads=4, mlp_layer_types=["dense", "sparse"], pad_token_id=0, bos_token_id=0,
                       eos_token_id=0)
MINIMAX_M3_TEXT = dict(MOE, num_local_experts=4, head_dim=8, rotary_dim=4, shared_intermediate_size=24,
                       dense_intermediate_size=32, mlp_layer_types=["dense", "sparse"], routed_scaling_factor=1.5,
                       index_n_heads=2, index_head_dim=8, index_block_size=4, index_topk_blocks=2,
                       pad_token_id=0, bos_token_id=0, eos_token_id=0)
MISTRAL4 = dict(DEEPSEEK, first_k_dense_replace=0, **MLA)
# built by AutoModelForImageTextToText (Mistral 4: a flat text config)
MULTIMODAL = ("qwen3_vl_moe", "qwen3_omni_moe_thinker", "glm4v_moe", "aria", "deepseek_ocr2", "unlimited_ocr",
              "mistral_large4", "mistral4", "llama4", "qwen4_exp", "dots3_note",
              "minimax_m3_vl", "qwen3_5_moe", "glm5_next")
FAMILIES = {
    "mixtral": dict(MOE, num_local_experts=4, router_jitter_noise=0.1),
    "minimax": dict(MOE, num_local_experts=4, router_jitter_noise=0.1, head_dim=8,
                    layer_types=["full_attention", "linear_attention"]),
    "qwen2_moe": dict(MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      norm_topk_prob=False),
    "qwen3_moe": dict(MOE, num_experts=4, moe_intermediate_size=16, head_dim=8, mlp_only_layers=[0]),
    "qwen3_next": dict(MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24, head_dim=8,
                       **LINEAR_ATTENTION),
    "olmoe": dict(MOE, num_experts=4, norm_topk_prob=True),
    "flex_olmo": dict(MOE, num_experts=4, pad_token_id=0, eos_token_id=0),
    "hunyuan_v1_moe": dict(MOE, num_experts=4, moe_topk=2, head_dim=8),
    "granitemoe": dict(MOE, num_local_experts=4),
    "granitemoeshared": dict(MOE, num_local_experts=4, shared_intermediate_size=24),
    "deepseek_v2": dict(MOE, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=16, n_group=4,
                        topk_group=2, topk_method="group_limited_greedy", routed_scaling_factor=1.5,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
                        qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4),
    "deepseek_v3": dict(MOE, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=16, n_group=4,
                        topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, kv_lora_rank=16,
                        q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4),
    "glm4_moe": dict(MOE, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=16, n_group=2, topk_group=1,
                     routed_scaling_factor=1.5, first_k_dense_replace=1, head_dim=8),
    "dots1": dict(MOE, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=16, n_group=2, topk_group=1,
                  routed_scaling_factor=2.0, first_k_dense_replace=1, head_dim=8),
    "ernie4_5_moe": dict(MOE, moe_num_experts=4, moe_num_shared_experts=1, moe_intermediate_size=16,
                         moe_layer_start_index=0, head_dim=8),
    "deepseek_v32": dict(DEEPSEEK, **MLA),
    "glm4_moe_lite": dict(DEEPSEEK, **MLA),
    "glm_moe_dsa": dict(DEEPSEEK, **MLA),
    "solar_open": dict(DEEPSEEK, head_dim=8),
    "exaone_moe": dict(DEEPSEEK, head_dim=8),
    "mimo_v2_flash": dict(DEEPSEEK, head_dim=8),
    "mellum": dict(MOE, num_experts=4, head_dim=8),
    "granitemoe_swa": dict(MOE, num_local_experts=4),
    "granitemoehybrid": dict(MOE, num_local_experts=4, layer_types=["attention", "attention"],
                             mamba_n_heads=8, mamba_d_head=8),
    "qwen3_5_moe_text": dict(MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                             head_dim=8, **LINEAR_ATTENTION),
    "minimax_m2": dict(MOE, num_local_experts=4, head_dim=8, router_jitter_noise=0.1),
    "hy_v3": dict(MOE, num_experts=4, moe_intermediate_size=16, num_shared_experts=1, head_dim=8,
                  router_scaling_factor=2.5, mlp_layer_types=["dense", "sparse"]),
    "flint": dict(MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24, head_dim=8,
                  mlp_only_layers=[0], layer_types=["full_attention", "sliding_attention"], sliding_window=4),
    "laguna": dict(MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24, head_dim=8,
                   moe_routed_scaling_factor=2.0, layer_types=["full_attention"] * 2,
                   mlp_layer_types=["dense", "sparse"]),
    "cohere2_moe": dict(MOE, num_experts=4, head_dim=8, layer_types=["sliding_attention", "full_attention"],
                        mlp_layer_types=["sparse", "sparse"]),
    "cohere2_moe:sigmoid": dict(MOE, num_experts=4, head_dim=8,
                                layer_types=["sliding_attention", "full_attention"],
                                mlp_layer_types=["sparse", "sparse"], expert_selection_fn="sigmoid",
                                num_shared_experts=1, shared_expert_combination_strategy="sum"),
    "deepseek_v2:greedy": dict(MOE, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=16,
                               topk_method="greedy", routed_scaling_factor=1.5, first_k_dense_replace=1,
                               kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8,
                               v_head_dim=8, num_key_value_heads=4),
    "jamba": dict(MOE, num_experts=4, attn_layer_period=1, attn_layer_offset=0, expert_layer_period=1,
                  expert_layer_offset=0, use_mamba_kernels=False),
    "afmoe": dict(MOE, num_experts=4, moe_intermediate_size=16, num_shared_experts=1, head_dim=8, route_scale=2.0,
                  num_dense_layers=1, layer_types=["full_attention"] * 2),
    # threshold 0.3: 1 to 3 of the 4 experts are first-choice candidates here (mostly 1 at the default 0.01)
    "phimoe": dict(MOE, num_local_experts=4, router_jitter_noise=0.3, input_jitter_noise=0.1),
    "jetmoe": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24, kv_channels=8,
                   num_key_value_heads=2),
    "dbrx": dict(d_model=32, n_heads=4, n_layers=2, vocab_size=V, max_seq_len=64,
                 attn_config=dict(kv_n_heads=2, rope_theta=1e4, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2, moe_jitter_eps=0.1)),
    # issue #18: the families examined after the first table
    "kimi_linear": dict(DEEPSEEK, num_local_experts=8, q_lora_rank=None, layer_types=["linear_attention", "full_attention"],
                        mlp_layer_types=["dense", "sparse"], linear_head_dim=8, linear_num_heads=4,
                        pad_token_id=0, bos_token_id=0, eos_token_id=0, **{k: MLA[k] for k in MLA if k != "q_lora_rank"}),
    "bailing_hybrid": dict(DEEPSEEK, num_local_experts=8, head_dim=8, layer_types=["linear_attention", "full_attention"],
                           mlp_layer_types=["dense", "sparse"], pad_token_id=0, eos_token_id=0,
                           **{k: MLA[k] for k in MLA if k != "q_lora_rank"}),
    "axk2": dict(DEEPSEEK, n_group=None, topk_group=None, head_dim=16, index_head_dim=16, index_n_heads=2,
                 index_topk=4, gated_norm_rank=4, **MLA),
    "axk2:grouped": dict(DEEPSEEK, head_dim=16, index_head_dim=16, index_n_heads=2, index_topk=4, gated_norm_rank=4,
                         **MLA),
    "lfm2_moe": dict(MOE, num_experts=4, moe_intermediate_size=16, num_dense_layers=1, routed_scaling_factor=1.5,
                     layer_types=["full_attention", "conv"]),
    "lfm2_moe:no_bias": dict(MOE, num_experts=4, moe_intermediate_size=16, num_dense_layers=0, use_expert_bias=False,
                             norm_topk_prob=False, layer_types=["conv", "full_attention"]),
    "lara_mini": dict(MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24, head_dim=8,
                      **LINEAR_ATTENTION),
    "dots3_note_text": dict(DOTS3_NOTE_TEXT),
    "dots3_note": dict(text_config=dict(TINY, **DOTS3_NOTE_TEXT),
                       vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          moe_intermediate_size=8, num_local_experts=4, num_experts_per_tok=2,
                                          mlp_layer_types=["sparse"], adapter_in_dim=16, adapter_out_dim=32),
                       audio_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         downsample_hidden_size=8, adapter_input_size=16, adapter_out_dim=32)),
    "minimax_m3_vl_text": dict(MINIMAX_M3_TEXT),
    "minimax_m3_vl": dict(text_config=dict(TINY, **MINIMAX_M3_TEXT),
                          vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)),
    "beam": dict(MOE, num_experts=8, moe_intermediate_size=16, n_group=2, topk_group=1, routed_scaling_factor=1.5,
                 head_dim=8, sliding_window=4, mlp_layer_types=["dense", "sparse"]),
    "qwen3_5_moe": dict(text_config=dict(TINY, **MOE, num_experts=4, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=24, head_dim=8, rope_parameters=MROPE,
                                         **LINEAR_ATTENTION), vision_config=VISION),
    "glm5_next": dict(text_config=dict({**TINY, **DEEPSEEK}, num_local_experts=8, num_key_value_heads=4, head_dim=8,
                                       mlp_layer_types=["dense", "sparse"], layer_types=["full_attention", "linear_attention"],
                                       pad_token_id=0, bos_token_id=0, eos_token_id=0),
                      vision_config=VISION),
    "kolibri1": dict(MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24, head_dim=8,
                     sliding_window=4),
    "kolibri1:norm": dict(MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24, head_dim=8,
                          sliding_window=4, norm_topk_prob=True),
    "qwen4_exp_text": dict(QWEN4_EXP_TEXT),
    "qwen4_exp": dict(text_config=dict(TINY, **QWEN4_EXP_TEXT), vision_config=VISION),
    "aria_text": dict(MOE, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1),
    "gpt_oss": dict(MOE, num_local_experts=4, head_dim=8, sliding_window=4),
    "llama4_text": dict(LLAMA4_TEXT, interleave_moe_layer_step=2),  # layer 0 dense, layer 1 MoE
    "llama4_text:top2": dict(LLAMA4_TEXT, num_experts_per_tok=2),
    # multimodal models (built by AutoModelForImageTextToText, run on text): patch finds their language model's blocks
    "qwen3_vl_moe": dict(text_config=dict(TINY, **MOE, num_experts=4, moe_intermediate_size=16, head_dim=8,
                                          rope_parameters=MROPE), vision_config=VISION),
    "qwen3_omni_moe_thinker": dict(text_config=dict(TINY, **MOE, num_experts=4, moe_intermediate_size=16, head_dim=8,
                                                    norm_topk_prob=False),
                                   vision_config=dict(VISION, deepstack_visual_indexes=[0]),
                                   audio_config=dict(d_model=16, encoder_layers=1, encoder_attention_heads=2,
                                                     encoder_ffn_dim=32, output_dim=32, downsample_hidden_size=8)),
    "glm4v_moe": dict(text_config=dict(TINY, **DEEPSEEK, num_local_experts=8, head_dim=8,
                                       rope_parameters=dict(MROPE, partial_rotary_factor=1.0)), vision_config=VISION),
    "aria": dict(text_config=dict(TINY, **MOE, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1),
                 vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=32, patch_size=16)),
    "deepseek_ocr2": dict(text_config=OCR_TEXT, vision_config=OCR_VISION),
    "unlimited_ocr": dict(text_config=OCR_TEXT, vision_config=OCR_VISION),
    "mistral4": dict(MISTRAL4),
    # a bidirectional token classifier: one label per vocabulary id, so the ids serve as labels
    "openai_privacy_filter": dict(MOE, num_local_experts=4, head_dim=8, sliding_window=4, num_labels=V,
                                  pad_token_id=0, eos_token_id=0),
    "nemotron_h": dict(MOE, n_routed_experts=8, moe_intermediate_size=16, moe_shared_expert_intermediate_size=24,
                       n_group=2, topk_group=1, routed_scaling_factor=1.5, head_dim=8,
                       layers_block_type=["moe", "attention", "mamba"], num_hidden_layers=3, mamba_num_heads=4,
                       mamba_head_dim=8, n_groups=1, ssm_state_size=8, use_mamba_kernels=False, chunk_size=4),
    "mistral_large4": dict(text_config=dict(TINY, **MISTRAL4),
                           vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, head_dim=8, patch_size=16, image_size=32)),
    "llama4": dict(text_config=dict(TINY, **LLAMA4_TEXT), tie_word_embeddings=False,
                   vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32,
                                      projector_output_dim=32)),
}
# transformers' multimodal Llama 4 forward fails without pixel inputs (5.24): its language model runs the text
LANGUAGE_MODEL = {"llama4": "language_model"}


def lm(model):
    """The causal LM of ``model`` to call on token ids (the model itself but for multimodal families)."""
    return getattr(model, LANGUAGE_MODEL.get(model.config.model_type, ""), model)


def tiny_hf(model_type, dtype=torch.float32, seed=0, **over):
    """A tiny random HF model of the family (``over``: config fields off the tiny defaults)."""
    torch.manual_seed(seed)
    family = model_type.split(":")[0]  # "family:variant" keys test another gating of the family
    nested = family == "dbrx" or "text_config" in FAMILIES[model_type]
    kw = {**({} if nested else TINY), **FAMILIES[model_type], **over}
    auto = (transformers.AutoModelForImageTextToText if family in MULTIMODAL else
            transformers.AutoModelForTokenClassification if family == "openai_privacy_filter" else
            transformers.AutoModelForCausalLM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.AutoConfig.for_model(family, **kw)
        model = auto.from_config(cfg).eval()
        with torch.no_grad():  # HF zero-inits some tensors (routers, correction biases): randomise everything
            for name, t in list(model.named_parameters()) + list(model.named_buffers()):
                if t.is_floating_point() and "rotary" not in name and "inv_freq" not in name:
                    t.normal_(1.0 if "norm" in name and t.dim() == 1 else 0.0, 0.1 if "norm" in name else 0.05)
        return model.to(dtype)  # (Llama 4's vision tower: a complex RoPE buffer cast to real, unused by text)


def ids_labels(seed=1):
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(seed))
    return ids, ids


def grad_pairs(ref, patched):
    """(name, reference gradient, patched gradient) for every parameter of the reference model."""
    blocks = {n: m for n, m in patched.named_modules() if isinstance(m, PatchedMoEBlock)}
    entry = PATCH_FAMILIES[ref.config.model_type]
    got = dict(patched.named_parameters(remove_duplicate=False))
    for name, p in ref.named_parameters():
        if not p.requires_grad:  # ERNIE's correction bias: a frozen parameter in HF, a buffer in moekit
            continue
        prefix = next((b for b in blocks if name.startswith(b + ".")), None)
        if prefix is None:
            yield name, p.grad, got[name].grad
            continue
        sub = name[len(prefix) + 1:]
        if sub == entry.output_bias:
            yield name, p.grad, got[name].grad
            continue
        E = blocks[prefix].moe.cfg.num_experts
        rules = [(mk, t) for hk, mk, t in entry.keys if hk == sub]
        assert rules, f"{name} has no rule in the {ref.config.model_type} key map"
        for mk, t in rules:
            yield f"{name} -> {mk}", TRANSFORMS[t](p.grad, E), got[f"{prefix}.moe.{mk}"].grad


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_patch_matches_hf_forward_and_backward(model_type):
    assert_patch_matches(tiny_hf(model_type))


def scale_gpt_oss_past_the_clamp(model, ids):
    """Scale a gpt-oss model's first expert weights so that, on ``ids``, more than 5% of its gate/up
    pre-activations pass the clamp at +-7 (checked, so the test using it does exercise the clamp)."""
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        experts.gate_up_proj.mul_(60)
    seen = []
    hook = experts.register_forward_hook(lambda m, args, out: seen.append(args[0] @ m.gate_up_proj[0]))
    with torch.no_grad():
        model(ids)
    hook.remove()
    assert (seen[0].abs() > 7).float().mean() > 0.05


def test_gpt_oss_patch_matches_past_the_clamp():
    """Expert weights large enough that gate/up pre-activations pass gpt-oss's clamp at +-7 (clamped units
    pass no gradient: the patched model must agree on which)."""
    ref = tiny_hf("gpt_oss")
    scale_gpt_oss_past_the_clamp(ref, ids_labels()[0])
    assert_patch_matches(ref)


def recorded_router_logits(model, ids, out):
    """The router logits transformers recorded (a token classifier's output drops them: its base model's)."""
    if hasattr(out, "router_logits"):
        return out.router_logits
    return model.base_model(ids, output_router_logits=True).router_logits


def assert_grad_close(name, g, g_ref):
    """float32 rounding through a model reaches entries near 0 in proportion to the gradient's scale, so the
    absolute part of the tolerance is 1e-5 of the tensor's largest entry (1e-6 of a unit-scale gradient
    depended on the rounding order of the expert math: the fused CPU kernels or aten's)."""
    atol = max(1e-6, 1e-5 * g_ref.abs().max().item())
    assert torch.allclose(g, g_ref, rtol=1e-4, atol=atol), f"{name}: {(g - g_ref).abs().max().item()}"


def assert_patch_matches(ref):
    """Logits, router logits and every parameter's gradient of ``patch(ref)`` equal the unpatched model's."""
    model = patch(copy.deepcopy(ref))
    n = sum(isinstance(m, PatchedMoEBlock) for m in model.modules())
    block = PATCH_FAMILIES[ref.config.model_type].block
    assert n >= 1 and not any(type(m).__name__ == block for m in model.modules())
    # the HF router's tensors live in moekit's router only: one copy for prune/merge/state dicts
    echoes = [f"{name}.{b.router_name}." for name, b in model.named_modules() if isinstance(b, PatchedMoEBlock)]
    assert not [k for k in model.state_dict() if k.startswith(tuple(echoes))]
    ids, labels = ids_labels()
    want = lm(ref)(ids, labels=labels, output_router_logits=True)
    got = lm(model)(ids, labels=labels, output_router_logits=True)
    assert (got.logits - want.logits).abs().max().item() <= 1e-5
    # transformers' hooks still collect the router logits (and its load-balancing loss, part of .loss)
    got_r, want_r = recorded_router_logits(model, ids, got), recorded_router_logits(ref, ids, want)
    assert len(got_r) == len(want_r) >= n
    for a, b in zip(got_r, want_r):
        assert (a - b).abs().max().item() <= 1e-5
    want.loss.backward()
    got.loss.backward()
    pairs = list(grad_pairs(ref, model))
    assert len(pairs) >= len(list(ref.parameters()))
    for name, g_ref, g in pairs:
        assert (g_ref is None) == (g is None), name
        if g is None:  # no gradient in HF either (DeepSeek-V3.2's sparse-attention indexer: a top-k selection)
            continue
        assert_grad_close(name, g, g_ref)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_patch_runs_in_bf16(model_type):
    ref = tiny_hf(model_type, dtype=torch.bfloat16)
    model = patch(copy.deepcopy(ref))
    ids, labels = ids_labels()
    with torch.no_grad():
        want = lm(ref)(ids).logits.float()
        got = lm(model)(ids).logits.float()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # bf16 rounding differs (moekit computes router logits in float32, which may flip a near-tie choice)
    assert (got - want).abs().mean().item() <= 0.05 * want.abs().mean().item()


@pytest.mark.parametrize("model_type", [m for m in sorted(FAMILIES) if PATCH_FAMILIES[m.split(":")[0]].jitter])
def test_training_jitter_draws_the_same_noise(model_type):
    ref = tiny_hf(model_type).train()
    model = patch(copy.deepcopy(ref))
    assert all(b.jitter_eps == 0.1 for b in model.modules() if isinstance(b, PatchedMoEBlock))
    ids, _ = ids_labels()
    torch.manual_seed(5)
    want = ref(ids).logits
    torch.manual_seed(5)
    got = model(ids).logits
    torch.manual_seed(6)
    other = model(ids).logits
    assert (got - want).abs().max().item() <= 1e-5
    assert (other - want).abs().max().item() > 1e-4  # the noise is really drawn


def test_phimoe_training_matches_hf_with_the_same_seed():
    """PhiMoE in training: input jitter (drawn by the block, then again by its router), the sampled experts,
    the Heun-scaled gates and their straight-through gradients: logits and every gradient equal transformers'
    given the same seed; another seed routes differently."""
    ref = tiny_hf("phimoe").train()
    model = patch(copy.deepcopy(ref))
    ids, labels = ids_labels()
    torch.manual_seed(5)
    want = ref(ids, labels=labels)
    torch.manual_seed(5)
    got = model(ids, labels=labels)
    assert (got.logits - want.logits).abs().max().item() <= 1e-5
    want.loss.backward()
    got.loss.backward()
    for name, g_ref, g in grad_pairs(ref, model):
        assert_grad_close(name, g, g_ref)
    router_grads = [g for name, _, g in grad_pairs(ref, model) if name.endswith("router.gate.weight")]
    assert router_grads and all(g.abs().max() > 0 for g in router_grads)
    torch.manual_seed(6)
    with torch.no_grad():
        assert (model(ids).logits - want.logits).abs().max().item() > 1e-4


def test_a_not_patchable_family_is_refused_with_its_reason(monkeypatch):
    """NOT_PATCHABLE is empty now (gpt_oss, llama4 and phimoe patch); a family listed there is refused with
    its reason, even where an entry exists."""
    from moekit.errors import UsageError

    monkeypatch.setitem(NOT_PATCHABLE, "mixtral", "a reason")
    with pytest.raises(UsageError, match=r"model_type='mixtral': patch cannot reproduce this family: a reason; "
                                         r"patchable: .*\bgpt_oss\b"):
        patch(tiny_hf("mixtral"))


def test_every_patch_entry_has_a_tiny_model_here():
    assert {k.split(":")[0] for k in FAMILIES} == set(PATCH_FAMILIES)


def test_grouped_axk2_fills_dropped_groups_with_zero(monkeypatch):
    """A.X-K2 with expert groups fills dropped groups' experts with selection score 0, not -inf: with correction
    biases that push some score + bias below 0, patch (group_mask_fill="zero") gives transformers' logits, and the
    DeepSeek-V3 rule (-inf) does not."""
    import moekit.interop.patch_families as pf

    ref = tiny_hf("axk2:grouped")
    with torch.no_grad():
        for name, b in ref.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.fill_(-0.6)  # sigmoid scores here are 0.5 +- a few hundredths: score + bias < 0
    # (the dropped experts then tie at 0: torch.topk breaks the tie, in transformers and in moekit alike)
    ids, _ = ids_labels()
    want = ref(ids).logits
    got = patch(copy.deepcopy(ref))(ids).logits
    assert (got - want).abs().max().item() <= 1e-5
    monkeypatch.setitem(pf.PATCH_FAMILIES, "axk2", replace(pf.PATCH_FAMILIES["axk2"], gating=pf.deepseek_v3))
    other = patch(copy.deepcopy(ref))(ids).logits
    assert (other - want).abs().max().item() > 1e-4


def test_a_family_without_an_entry_is_refused_by_name():
    from moekit.errors import UsageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("llama", **TINY))
    with pytest.raises(UsageError, match=r"model_type='llama': no patch entry; patchable: .*\bphimoe\b"):
        patch(hf)


def test_nemotron_h_with_a_latent_projection_is_refused():
    """moe_latent_size: Nemotron-H's experts run in a projected width (fc1/fc2 latent projections around them),
    tensors moekit's MoELayer has no place for."""
    from moekit.errors import UsageError

    with pytest.raises(UsageError, match="fc1_latent_proj"):
        patch(tiny_hf("nemotron_h", moe_latent_size=16))


def test_kolibri1_selects_on_logits_plus_bias(monkeypatch):
    """Kolibri-1 adds its correction bias to the raw logits for selection (RouterConfig.select_on="logits"); the
    DeepSeek-V3 rule (bias on the sigmoid scores) picks other experts on the same model."""
    import moekit.interop.patch_families as pf

    ref = tiny_hf("kolibri1")
    ids, _ = ids_labels()
    want = ref(ids).logits
    assert (patch(copy.deepcopy(ref))(ids).logits - want).abs().max().item() <= 1e-5
    def on_scores(cfg, layer):
        return replace(pf.kolibri1(cfg, layer), select_on="scores")

    monkeypatch.setitem(pf.PATCH_FAMILIES, "kolibri1", replace(pf.PATCH_FAMILIES["kolibri1"], gating=on_scores))
    other = patch(copy.deepcopy(ref))(ids).logits
    assert (other - want).abs().max().item() > 1e-4


def test_glm5_next_past_the_swiglu_limit(monkeypatch):
    """GLM-5-Next clamps gate and up at swiglu_limit=10 in routed and shared experts: with expert weights large
    enough to pass the clamp, patch (swiglu_limit10) gives transformers' logits and a plain SwiGLU does not."""
    import moekit.interop.patch_families as pf

    ref = tiny_hf("glm5_next")
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".mlp.experts.gate_up_proj" in name or ".mlp.shared_experts.gate_proj" in name \
                    or ".mlp.shared_experts.up_proj" in name:
                p.mul_(60.0)
    ids, _ = ids_labels()
    want = ref(ids).logits
    got = patch(copy.deepcopy(ref))(ids).logits
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    monkeypatch.setitem(pf.PATCH_FAMILIES, "glm5_next",
                        replace(pf.PATCH_FAMILIES["glm5_next"], activation=lambda cfg: "swiglu"))
    other = patch(copy.deepcopy(ref))(ids).logits
    assert (other - want).abs().max().item() > 1e-2 * want.abs().max().item()
