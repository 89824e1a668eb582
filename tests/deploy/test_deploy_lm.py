"""Deploy transforms on a small MoETransformer LM: offloaded decoding, prune/merge/int8 save-load."""

import copy

import torch

from moekit.config import LossConfig, ModelConfig, MoEConfig, RouterConfig
from moekit.deploy import moe_layers
import json

from moekit.deploy.extract import extract_task
from moekit.train.checkpoint import load_model, save_model
from moekit.deploy.merge import merge_model
from moekit.deploy.offload import cache_stats, offload_experts
from moekit.deploy.prune import measure_loads
from moekit.deploy.quantize import quantize_experts
from moekit.models.decoder import MoETransformer
from moekit.models.generate import generate

V, D = 64, 32


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    moe = MoEConfig(d_model=D, num_experts=6, expert_hidden=32, router=RouterConfig(top_k=2),
                    loss=LossConfig(aux_coef=0.01))
    return MoETransformer(ModelConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=2, max_seq_len=48,
                                      moe=moe, tie_embeddings=True)).eval()


def test_offloaded_lm_identical_logits_and_kv_cache_decoding(tmp_path):
    model = tiny_lm()
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(0))
    off = offload_experts(copy.deepcopy(model), 2, source="disk", path=str(tmp_path / "e.safetensors"))
    assert torch.equal(off(ids).logits, model(ids).logits)
    prompt = ids[:1, :5]
    ref = generate(model, prompt, 12)
    assert torch.equal(generate(off, prompt, 12), ref)
    stats = cache_stats(off)
    assert stats.hits > 0 and 0 < stats.hit_rate < 1  # decoding reuses experts across steps


def test_transformed_lm_roundtrip(tmp_path):
    model = tiny_lm(1)
    batches = [torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    loads = measure_loads(model, batches)
    assert list(loads) == [n for n, _ in moe_layers(model).items()] and len(loads) == 2
    variants = {"merged": merge_model(copy.deepcopy(model), loads, 3)[0],
                "extracted_int8": quantize_experts(extract_task(copy.deepcopy(model), batches, min_share=0.1)[0])}
    for name, m in variants.items():
        save_model(tmp_path / name, m, state={"v": name})
        loaded = load_model(tmp_path / name)
        assert json.loads((tmp_path / name / "trainer_state.json").read_text()) == {"v": name}
        assert isinstance(loaded, MoETransformer)
        assert torch.equal(loaded(batches[0]).logits, m(batches[0]).logits), name
