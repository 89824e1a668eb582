import math

import pytest
import torch

from moekit.config import ConfigError, ModelConfig, MoEConfig, RouterConfig
from moekit.models.blocks import causal_attention
from moekit.models.decoder import MoETransformer, lm_loss
from moekit.models.generate import generate
from moekit.models.presets import PRESETS, get_preset


def tiny_cfg(**kw) -> ModelConfig:
    d = kw.pop("d_model", 32)
    moe = kw.pop("moe", MoEConfig(d_model=d, num_experts=4, expert_hidden=32, router=RouterConfig(top_k=2)))
    return ModelConfig(vocab_size=kw.pop("vocab_size", 50), d_model=d, n_layers=kw.pop("n_layers", 3), n_heads=4,
                       n_kv_heads=kw.pop("n_kv_heads", 2), max_seq_len=64, moe=moe, **kw)


@pytest.mark.parametrize("qk_norm", ["none", "per_head", "full"])
def test_causal_future_tokens_do_not_change_past_logits(qk_norm):
    torch.manual_seed(0)
    model = MoETransformer(tiny_cfg(qk_norm=qk_norm)).eval()
    ids = torch.randint(0, 50, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = torch.randint(0, 50, (2, 5))
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_attention_equals_float64_reference_with_gqa_and_offset():
    g = torch.Generator().manual_seed(1)
    B, H, G, S, L, K = 2, 6, 2, 3, 7, 8
    q = torch.randn(B, H, S, K, generator=g)
    k = torch.randn(B, G, L, K, generator=g)
    v = torch.randn(B, G, L, K, generator=g)
    start = L - S  # the S new queries sit at the end of the L cached positions
    out = causal_attention(q, k, v, start)
    ref = torch.zeros(B, H, S, K, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kv = h // (H // G)
            for s in range(S):
                scores = [(q[b, h, s].double() @ k[b, kv, j].double()).item() / math.sqrt(K)
                          for j in range(start + s + 1)]
                w = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
                ref[b, h, s] = sum(w[j] * v[b, kv, j].double() for j in range(start + s + 1))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.8, 0.9)])
def test_kv_cache_generation_equals_full_recompute(temperature, top_p):
    torch.manual_seed(2)
    model = MoETransformer(tiny_cfg())
    prompt = torch.randint(0, 50, (2, 5))
    out_cache = generate(model, prompt, 10, temperature=temperature, top_p=top_p,
                         generator=torch.Generator().manual_seed(5))
    out_full = generate(model, prompt, 10, temperature=temperature, top_p=top_p,
                        generator=torch.Generator().manual_seed(5), use_cache=False)
    assert torch.equal(out_cache, out_full)
    # and the cached logits of each step equal the full-prefix logits
    model.eval()
    cache = model.new_cache(2)
    step_logits = [model(out_full[:, :5], cache=cache, start_pos=0).logits[:, -1]]
    for t in range(5, 14):
        step_logits.append(model(out_full[:, t:t + 1], cache=cache, start_pos=t).logits[:, -1])
    full = model(out_full[:, :14]).logits[:, 4:14]
    torch.testing.assert_close(torch.stack(step_logits, 1), full, rtol=1e-4, atol=1e-5)


def test_dense_model_equals_hf_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                      dense_hidden=48, rope_theta=10000.0, norm_eps=1e-6)
    ours = MoETransformer(cfg).eval()
    hf_cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {"model.embed_tokens.weight": ours.embed.weight, "model.norm.weight": ours.norm.weight,
          "lm_head.weight": ours.lm_head.weight}
    for i, layer in enumerate(ours.layers):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": layer.attn_norm.weight,
                   p + "post_attention_layernorm.weight": layer.ffn_norm.weight,
                   p + "mlp.gate_proj.weight": layer.ffn.w_gate.weight, p + "mlp.up_proj.weight": layer.ffn.w_up.weight,
                   p + "mlp.down_proj.weight": layer.ffn.w_down.weight})
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = getattr(layer.attn, n).weight
    missing, unexpected = hf.load_state_dict({k: v.detach() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    ids = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_dense_twin_matches_active_params_and_flops():
    cfg = tiny_cfg(moe=MoEConfig(d_model=32, num_experts=6, expert_hidden=24, num_shared_experts=1,
                                 shared_hidden=16, router=RouterConfig(top_k=2)))
    moe, dense = MoETransformer(cfg), MoETransformer(cfg.dense_twin())
    assert dense.cfg.moe is None and dense.layers[0].ffn.w_up.weight.shape[0] == 2 * 24 + 16
    router = sum(m.router.gate.weight.numel() for m in moe.moe_layers())
    assert moe.num_active_params() - router == dense.num_params()
    assert moe.num_params() > dense.num_params()


def test_moe_layer_placement_and_param_groups():
    cfg = tiny_cfg(n_layers=4, moe_layers="every_other")
    model = MoETransformer(cfg)
    assert [b.is_moe for b in model.layers] == [False, True, False, True]
    cfg = tiny_cfg(n_layers=4, first_k_dense=1)
    model = MoETransformer(cfg)
    assert [b.is_moe for b in model.layers] == [False, True, True, True]
    groups = model.param_groups()
    assert all(".experts." in n for n in groups["experts"]) and len(groups["experts"]) == 3 * 3
    assert all(".router." in n for n in groups["router"])
    assert sum(len(v) for v in groups.values()) == len(list(model.named_parameters()))


def test_lm_loss_and_aux_loss():
    torch.manual_seed(4)
    model = MoETransformer(tiny_cfg())
    ids = torch.randint(0, 50, (2, 9))
    out = model(ids[:, :-1])
    loss = lm_loss(out.logits, ids[:, 1:])
    assert loss.item() == pytest.approx(math.log(50), rel=0.05)  # near-uniform at init
    assert len(out.moe_aux) == 3
    assert out.aux_loss.item() == pytest.approx(sum(a.loss.item() for a in out.moe_aux), rel=1e-6)
    (loss + out.aux_loss).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_presets_build_and_errors():
    for name in PRESETS:
        cfg = get_preset(name, vocab_size=100)
        assert cfg.vocab_size == 100
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    MoETransformer(get_preset("tiny", vocab_size=100))
    with pytest.raises(ValueError, match="preset='gpt5'"):
        get_preset("gpt5")
    with pytest.raises(ConfigError, match="ModelConfig.n_kv_heads=3"):
        tiny_cfg(n_kv_heads=3)
    with pytest.raises(ConfigError, match="moe.d_model=16"):
        tiny_cfg(moe=MoEConfig(d_model=16, expert_hidden=8))
    with pytest.raises(ValueError, match="max_seq_len=64"):
        MoETransformer(tiny_cfg())(torch.zeros(1, 65, dtype=torch.long))
