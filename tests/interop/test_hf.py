"""Load tiny random HF models (transformers' own classes, from_config) into moekit: identical logits;
export back: transformers reloads it with identical logits."""

import json
import warnings

import pytest
import torch

from moekit.errors import CheckpointError
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
    "deepseek_v2": dict(intermediate_size=80, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2,
                        num_experts_per_tok=3, n_group=4, topk_group=2, topk_method="group_limited_greedy",
                        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                        qk_rope_head_dim=8, v_head_dim=12, routed_scaling_factor=1.5, num_key_value_heads=4),
    # yarn RoPE (its default), sinks, biases, sliding window 4 (< the 11 test tokens) on even layers
    "gpt_oss": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=4),
    # dense/MoE interleaved, layer 3 NoPE (temperature > 1 from position 3 on), chunks of 4 on the others
    "llama4_text": dict(num_hidden_layers=4, intermediate_size=24, intermediate_size_mlp=40, num_local_experts=4,
                        num_experts_per_tok=1, head_dim=8, interleave_moe_layer_step=2, attention_chunk_size=4,
                        floor_scale=4),
}


def tiny_hf(model_type, seed=0, **over):
    """A tiny random HF model of the family (``over``: config fields off the family's tiny defaults)."""
    torch.manual_seed(seed)
    kw = {**TINY, **FAMILIES[model_type], **over}
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
    with pytest.raises(CheckpointError, match=f"missing: \\['{shards[1]}'\\]"):
        load_hf(tmp_path / "sharded")


def _saved(hf, path):
    hf.save_pretrained(path)
    return path


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_hf(tmp_path / "empty")
    folder = _saved(tiny_hf("olmoe"), tmp_path / "olmoe")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type='bert': not supported"):
        load_hf(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 40}))
    with pytest.raises(CheckpointError, match=r"experts.0.gate_proj.weight' has shape \(32, 32\), expected \(40, 32\)"):
        load_hf(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf(folder)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"])
def test_patched_hf_model_gives_identical_logits(model_type):
    import moekit
    from moekit.interop.patch import PatchedMoEBlock

    hf = tiny_hf(model_type)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
    moekit.patch(hf)
    got = hf(ids).logits
    assert sum(isinstance(layer.mlp, PatchedMoEBlock) for layer in hf.model.layers) >= 2
    assert (got.detach() - ref).abs().max().item() <= 1e-5
    got.sum().backward()  # the patched model trains
    assert hf.model.layers[-1].mlp.moe.experts.w_up_EFD.grad is not None


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_dense_load_and_upcycled_model_equals_dense_at_step_0(model_type, tmp_path):
    from moekit.interop.upcycle import upcycle

    torch.manual_seed(3)
    kw = {**TINY, "intermediate_size": 48}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **kw)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 0.05 if "norm" not in name else 1.0)
    hf.save_pretrained(tmp_path / "dense")
    dense = load_hf(tmp_path / "dense").eval()
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (dense(ids).logits - ref).abs().max().item() <= 1e-5
        moe = upcycle(dense, num_experts=4, top_k=2).eval()
        assert moe.cfg.moe.num_experts == 4 and all(b.is_moe for b in moe.layers)
        assert (moe(ids).logits - ref).abs().max().item() <= 1e-5
        noisy = upcycle(dense, num_experts=4, top_k=2, expert_noise=0.1).eval()
        assert (noisy(ids).logits - ref).abs().max().item() > 1e-4  # noise really perturbs the experts


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_upcycled_dense_twin_keeps_its_activation_and_equals_it_at_step_0(activation):
    """A dense twin's former MoE FFNs use the experts' activation (a GELU one has no gate projection): the
    upcycled experts take that activation and copy its matrices, so at step 0 the MoE is the dense model."""
    from moekit.config import ModelConfig, MoEConfig, RouterConfig
    from moekit.interop.upcycle import upcycle
    from moekit.models.decoder import MoETransformer

    torch.manual_seed(0)
    moe_cfg = MoEConfig(d_model=32, num_experts=4, expert_hidden=24, activation=activation,
                        router=RouterConfig(kind="switch", top_k=1))
    cfg = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, max_seq_len=32,
                      moe_layers="every_other", moe=moe_cfg)
    dense = MoETransformer(cfg.dense_twin()).eval()
    moe = upcycle(dense, num_experts=4, top_k=2, moe_layers="every_other").eval()
    assert [b.is_moe for b in moe.layers] == [b.is_moe for b in MoETransformer(cfg).layers]
    assert moe.cfg.moe.activation == activation and moe.cfg.moe.expert_hidden == 24
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        assert (moe(ids).logits - dense(ids).logits).abs().max().item() <= 1e-5


def test_upcycle_to_hf_of_gelu_ffns_is_a_one_line_error(tmp_path, capsys):
    from moekit.cli import main
    from moekit.config import ModelConfig, MoEConfig
    from moekit.models.decoder import MoETransformer
    from moekit.train.checkpoint import save_model

    cfg = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, max_seq_len=32,
                      moe_layers="every_other", moe=MoEConfig(d_model=32, num_experts=4, expert_hidden=24,
                                                              activation="gelu"))
    save_model(tmp_path / "dense", MoETransformer(cfg.dense_twin()))
    assert main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "hf"), "--moe-layers", "every_other",
                 "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Mixtral checkpoint, whose experts are SwiGLU" in err
    assert "are gelu" in err
    assert not (tmp_path / "hf").exists()


def test_cli_convert_roundtrip_and_upcycle_to_mixtral(tmp_path):
    from moekit.cli import main

    hf = tiny_hf("qwen3_moe")
    hf.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "ck"), "--to", "moekit"]) == 0
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "back"), "--to", "hf"]) == 0
    ids = torch.randint(0, 96, (1, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, "intermediate_size": 48})).eval()
    dense.save_pretrained(tmp_path / "dense")
    assert main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "mixtral"), "--num-experts", "4", "--to", "hf"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixtral = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    with torch.no_grad():  # HF's own Mixtral, built from the upcycled Llama, computes the dense function
        assert (mixtral(ids).logits - dense(ids).logits).abs().max().item() <= 1e-5
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "x"), "--to", "moekit"]) == 2
