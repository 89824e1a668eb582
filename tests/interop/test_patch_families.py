"""``patch`` against transformers' own modules, one tiny random model per family (from_config, no hub).

For every entry of PATCH_FAMILIES: the patched model gives the unpatched model's logits and the same gradient
for every parameter (float32, eval mode), expert gradients compared through the entry's key map; a bf16 model
patches and runs. Families with training-time input jitter draw the same noise as transformers; PhiMoE's
training mode (sampled experts, straight-through gradients) equals transformers' with the same seed.
"""

import copy
import warnings

import pytest
import torch

from moekit.config import RouterConfig
from moekit.interop.patch import PatchedMoEBlock, moe_config, patch
from moekit.layers.moe import MoELayer
from moekit.interop.patch_families import PATCH_FAMILIES, TRANSFORMS, shared_keys, topk_softmax

transformers = pytest.importorskip("transformers")

V = 96
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
            max_position_embeddings=64, tie_word_embeddings=False)
MOE = dict(num_experts_per_tok=2, intermediate_size=24)
DEEPSEEK = dict(MOE, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=16, n_group=2, topk_group=1,
                routed_scaling_factor=1.5, first_k_dense_replace=1)
MLA = dict(kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4)
LINEAR_ATTENTION = dict(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
                        linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)
MROPE = dict(rope_type="default", rope_theta=1e4, mrope_section=[1, 1, 2])
VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32)
OCR_TEXT = dict(TINY, **DEEPSEEK, topk_method="group_limited_greedy", mlp_layer_types=["dense", "sparse"])
OCR_VISION = dict(sam_config=dict(hidden_size=16, output_channels=16, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=64, global_attn_indexes=[0], window_size=2, downsample_channels=[16, 32]),
                  encoder_config=dict(vocab_size=V, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2))
MISTRAL4 = dict(DEEPSEEK, first_k_dense_replace=0, **MLA)
MULTIMODAL = ("qwen3_vl_moe", "qwen3_omni_moe_thinker", "glm4v_moe", "aria", "deepseek_ocr2", "unlimited_ocr",
              "mistral_large4", "mistral4")  # built by AutoModelForImageTextToText (Mistral 4: a flat text config)
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
    "lfm2_moe": dict(MOE, num_experts=4, moe_intermediate_size=16, num_dense_layers=1, routed_scaling_factor=1.5,
                     layer_types=["full_attention", "conv"]),
    "lfm2_moe:no_bias": dict(MOE, num_experts=4, moe_intermediate_size=16, num_dense_layers=0, use_expert_bias=False,
                             norm_topk_prob=False, layer_types=["conv", "full_attention"]),
    "lara_mini": dict(MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24, head_dim=8,
                      **LINEAR_ATTENTION),
    "dots3_note_text": dict(DEEPSEEK, num_local_experts=8, shared_experts_intermediate_size=16, head_dim=8,
                            num_key_value_heads=4, mlp_layer_types=["dense", "sparse"], pad_token_id=0, bos_token_id=0,
                            eos_token_id=0),
    "aria_text": dict(MOE, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1),
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
    "mistral_large4": dict(text_config=dict(TINY, **MISTRAL4),
                           vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, head_dim=8, patch_size=16, image_size=32)),
}


def tiny_hf(model_type, dtype=torch.float32, seed=0, **over):
    """A tiny random HF model of the family (``over``: config fields off the tiny defaults)."""
    torch.manual_seed(seed)
    family = model_type.split(":")[0]  # "family:variant" keys test another gating of the family
    nested = family == "dbrx" or "text_config" in FAMILIES[model_type]
    kw = {**({} if nested else TINY), **FAMILIES[model_type], **over}
    auto = transformers.AutoModelForImageTextToText if family in MULTIMODAL else transformers.AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.AutoConfig.for_model(family, **kw)
        model = auto.from_config(cfg).eval()
    with torch.no_grad():  # HF zero-inits some tensors (routers, correction biases): randomise everything
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and "rotary" not in name and "inv_freq" not in name:
                t.normal_(1.0 if "norm" in name and t.dim() == 1 else 0.0, 0.1 if "norm" in name else 0.05)
    return model.to(dtype)


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
    ref = tiny_hf(model_type)
    model = patch(copy.deepcopy(ref))
    n = sum(isinstance(m, PatchedMoEBlock) for m in model.modules())
    block = PATCH_FAMILIES[ref.config.model_type].block
    assert n >= 1 and not any(type(m).__name__ == block for m in model.modules())
    ids, labels = ids_labels()
    want = ref(ids, labels=labels, output_router_logits=True)
    got = model(ids, labels=labels, output_router_logits=True)
    assert (got.logits - want.logits).abs().max().item() <= 1e-5
    # transformers' hooks still collect the router logits (and its load-balancing loss, part of .loss)
    assert len(got.router_logits) == len(want.router_logits) >= n
    for a, b in zip(got.router_logits, want.router_logits):
        assert (a - b).abs().max().item() <= 1e-5
    want.loss.backward()
    got.loss.backward()
    pairs = list(grad_pairs(ref, model))
    assert len(pairs) >= len(list(ref.parameters()))
    for name, g_ref, g in pairs:
        assert (g_ref is None) == (g is None), name
        if g is None:  # no gradient in HF either (DeepSeek-V3.2's sparse-attention indexer: a top-k selection)
            continue
        assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-6), f"{name}: {(g - g_ref).abs().max().item()}"


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_patch_runs_in_bf16(model_type):
    ref = tiny_hf(model_type, dtype=torch.bfloat16)
    model = patch(copy.deepcopy(ref))
    ids, labels = ids_labels()
    with torch.no_grad():
        want = ref(ids).logits.float()
        got = model(ids).logits.float()
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
        assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-6), f"{name}: {(g - g_ref).abs().max().item()}"
    router_grads = [g for name, _, g in grad_pairs(ref, model) if name.endswith("router.gate.weight")]
    assert router_grads and all(g.abs().max() > 0 for g in router_grads)
    torch.manual_seed(6)
    with torch.no_grad():
        assert (model(ids).logits - want.logits).abs().max().item() > 1e-4


NEAREST = {  # each NOT_PATCHABLE family's block, mapped onto the closest MoELayer moekit has
    "llama4_text": (dict(intermediate_size=24, intermediate_size_mlp=48, num_local_experts=4, num_experts_per_tok=1,
                         head_dim=8), "Llama4TextMoe", "router",
                    (("router.weight", "router.gate.weight", "same"),
                     ("experts.gate_up_proj", "experts.w_gate_EFD", "T_first_half"),
                     ("experts.gate_up_proj", "experts.w_up_EFD", "T_second_half"),
                     ("experts.down_proj", "experts.w_down_EDF", "T")) + shared_keys("shared_expert"),
                    lambda cfg, i: RouterConfig(kind="deepseek", score_func="sigmoid", top_k=1, renormalize=False)),
    "gpt_oss": (dict(MOE, num_local_experts=4, head_dim=8), "GptOssMLP", "router",
                (("router.weight", "router.gate.weight", "same"),
                 ("experts.gate_up_proj", "experts.w_gate_EFD", "T_even"),
                 ("experts.gate_up_proj", "experts.w_up_EFD", "T_odd"),
                 ("experts.down_proj", "experts.w_down_EDF", "T")), topk_softmax),
}
LAYOUTS = {"T": lambda t, E: t.transpose(1, 2), "T_first_half": lambda t, E: t.chunk(2, dim=-1)[0].transpose(1, 2),
           "T_second_half": lambda t, E: t.chunk(2, dim=-1)[1].transpose(1, 2),
           "T_even": lambda t, E: t[..., ::2].transpose(1, 2), "T_odd": lambda t, E: t[..., 1::2].transpose(1, 2)}


@pytest.mark.parametrize("model_type", sorted(NEAREST))
def test_not_patchable_families_are_refused_and_the_nearest_moe_layer_differs(model_type, monkeypatch):
    """The README's reasons, measured: the closest MoELayer (same experts, closest router) computes another
    function than the family's block, so patch refuses the family with the reason instead."""
    from moekit.errors import UsageError
    from moekit.interop.patch_families import NOT_PATCHABLE, PatchEntry

    over, block_cls, router, keys, gating = NEAREST[model_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.AutoConfig.for_model(model_type, **{**TINY, **over})
        hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    assert model_type in NOT_PATCHABLE or hf.config.model_type in NOT_PATCHABLE
    with pytest.raises(UsageError, match="patch cannot reproduce this family"):
        patch(hf)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, t in hf.named_parameters():
            t.normal_(0.0, 0.05 if "bias" not in name else 0.0)  # gpt-oss biases 0: its activation alone differs
    block = next(m for m in hf.modules() if type(m).__name__ == block_cls)
    for k, f in LAYOUTS.items():
        monkeypatch.setitem(TRANSFORMS, k, f)
    src = block.state_dict()
    tensors = {mk: TRANSFORMS[t](src[hk], len(src["router.weight"])) for hk, mk, t in keys}
    entry = PatchEntry(block=block_cls, router=router, keys=keys, gating=gating)
    moe = MoELayer(moe_config(entry, hf.config, 0, tensors))
    missing, unexpected = moe.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"router.bias"}
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        want = block(x)
        want = (want[0] if isinstance(want, tuple) else want).reshape(x.shape)
        got = moe(x).y
    assert (got - want).abs().max().item() > 1e-3, "the nearest MoELayer computes the family's block: patch it"
    if model_type == "llama4_text":  # the same experts and router gating the expert *input* give Llama 4 exactly
        x_TD, w = x.reshape(-1, 32), moe.experts
        r = moe.router(x_TD)
        with torch.no_grad():
            gx = [(e, g * x_TD[t]) for t, e, g in zip(r.token_N.tolist(), r.expert_N.tolist(), r.weight_N)]
            rows = [w.w_down_EDF[e] @ (torch.nn.functional.silu(w.w_gate_EFD[e] @ v) * (w.w_up_EFD[e] @ v))
                    for e, v in gx]
            y_TD = torch.stack(rows) + moe.shared(x_TD)
        assert (y_TD - want.reshape(-1, 32)).abs().max().item() <= 1e-5
    print(f"{model_type}: nearest MoELayer max |diff| {(got - want).abs().max().item():.3g}, "
          f"output scale {want.abs().max().item():.3g}")


def test_every_patch_entry_has_a_tiny_model_here():
    assert {k.split(":")[0] for k in FAMILIES} == set(PATCH_FAMILIES)


def test_grouped_axk2_is_refused():
    """A.X-K2 with expert groups fills dropped groups' experts with 0, not -inf: a kept expert whose score + bias
    is negative loses to them, which moekit's group-limited router never does."""
    from moekit.errors import ConfigError

    with pytest.raises(ConfigError, match="config.n_group=2"):
        patch(tiny_hf("axk2", n_group=2, topk_group=1))


def test_a_family_without_an_entry_is_refused_by_name():
    from moekit.errors import UsageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("llama", **TINY))
    with pytest.raises(UsageError, match=r"model_type='llama': no patch entry; patchable: .*\bphimoe\b"):
        patch(hf)
