"""Load tiny random HF models (transformers' own classes, from_config) into moekit: identical logits;
export back: transformers reloads it with identical logits."""

import json
import warnings

import pytest
import torch

from moekit.interop.hf import load_hf, save_hf

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
            max_position_embeddings=128, tie_word_embeddings=False)
FAMILIES = {
    "mixtral": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=80, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=False),
    "qwen3_moe": dict(intermediate_size=80, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                      head_dim=16, norm_topk_prob=True),
    "olmoe": dict(intermediate_size=32, num_experts=4, num_experts_per_tok=2, eos_token_id=0, pad_token_id=0),
    "deepseek_v3": dict(intermediate_size=80, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=24,
                        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                        routed_scaling_factor=2.5, num_key_value_heads=4),
}


def tiny_hf(model_type, seed=0):
    torch.manual_seed(seed)
    kw = {**TINY, **FAMILIES[model_type]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.AutoConfig.for_model(model_type, **kw)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # HF inits some tensors (e.g. the DeepSeek correction bias) to zeros: randomise all
        for name, p in model.named_parameters():
            p.normal_(0, 0.05 if "norm" not in name else 1.0)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_load_gives_identical_logits_and_export_roundtrips(model_type, tmp_path):
    hf = tiny_hf(model_type)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids).logits
    assert (got - ref).abs().max().item() <= 1e-5
    # export -> transformers reloads it -> same logits
    save_hf(ours, tmp_path / "export")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert (back(ids).logits - ref).abs().max().item() <= 1e-5


def test_sharded_checkpoints_load_and_missing_shards_are_named(tmp_path):
    hf = tiny_hf("mixtral")
    ours = load_hf(_saved(hf, tmp_path / "hf")).eval()
    save_hf(ours, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    again = load_hf(tmp_path / "sharded").eval()
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours(ids).logits)
    (tmp_path / "sharded" / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=f"missing: \\['{shards[1]}'\\]"):
        load_hf(tmp_path / "sharded")


def _saved(hf, path):
    hf.save_pretrained(path)
    return path


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_hf(tmp_path / "empty")
    folder = _saved(tiny_hf("olmoe"), tmp_path / "olmoe")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type='bert': not supported"):
        load_hf(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 40}))
    with pytest.raises(ValueError, match=r"experts.0.gate_proj.weight' has shape \(32, 32\), expected \(40, 32\)"):
        load_hf(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf(folder)
