"""moekit's tools on an HF model folder (save_pretrained of a tiny from_config model), patched.

Reference: the same folder converted to a native moekit model (``load_hf``) for the families convert supports:
prune, merge, extract and finetune must give the same model either way. Every family class loads and prunes;
inspect and distill run on the patched model with the HF model's own logits as the teacher.
"""

import pytest
import torch

from moekit.deploy.extract import extract_task
from moekit.errors import CheckpointError
from moekit.deploy.merge import merge_model
from moekit.deploy.prune import measure_loads, prune_model
from moekit.interop.hf import load_hf
from moekit.interop.patched_lm import PatchedLM, build_patched, hf_base_config, load_patched
from moekit.train.checkpoint import load_model, read_state, save_model
from moekit.train.data import Corpus, TokenStream
from moekit.train.finetune import finetune, get_recipe
from moekit.train.tokenizer import train_bpe
from tests.interop.test_patch_families import tiny_hf

transformers = pytest.importorskip("transformers")

V = 96
BATCHES = [(x, x) for x in torch.randint(0, V, (3, 2, 12), generator=torch.Generator().manual_seed(3))]


def saved(model_type, tmp_path, **over):
    hf = tiny_hf(model_type, **over)
    hf.save_pretrained(tmp_path / model_type)
    return hf, tmp_path / model_type


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# one family per gating class: softmax top-k (+ jitter), gated shared expert, DeepSeek-V2 softmax groups,
# DeepSeek-V3 sigmoid + bias + groups, top-k-then-softmax, ERNIE bias, JetMoE output bias, DBRX row layout,
# PhiMoE SparseMixer, gpt-oss router and expert biases (clamped SwiGLU), Llama 4 input-gated experts
CLASSES = ["mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3", "granitemoe", "ernie4_5_moe", "jetmoe", "dbrx",
           "phimoe", "gpt_oss", "llama4_text"]


@pytest.mark.parametrize("model_type", CLASSES)
def test_hf_folder_loads_patched_and_prunes(model_type, tmp_path):
    hf, folder = saved(model_type, tmp_path)
    model = load_patched(folder)
    assert isinstance(model, PatchedLM) and model.moe_layers()
    ids = BATCHES[0][0]
    assert (logits(model, ids) - logits(hf, ids)).abs().max().item() <= 1e-5
    loads = measure_loads(model, BATCHES)
    assert set(loads) == {n for n, _ in model.named_modules() if n.endswith(".moe")}
    E = model.moe_layers()[0].cfg.num_experts
    model, kept = prune_model(model, loads, keep=E // 2)  # E // 2 stays divisible by the DeepSeek groups
    assert all(layer.cfg.num_experts == E // 2 for layer in model.moe_layers())
    for name, k in kept.items():  # the dropped experts are the least loaded ones
        dropped = sorted(set(range(E)) - set(k))
        assert loads[name][dropped].max() <= loads[name][k].min()
    out = logits(model, ids)
    assert torch.isfinite(out).all() and (out - logits(hf, ids)).abs().max().item() > 1e-6
    # the pruned model saves in moekit's deploy format and rebuilds through transformers + patch
    save_model(tmp_path / "pruned", model, config=hf_base_config(model), state={"kept": kept})
    again = load_model(tmp_path / "pruned", build=build_patched)
    assert read_state(tmp_path / "pruned")["kept"] == kept and torch.equal(logits(again, ids), out)


# every other family with a patch entry (image-text models included: they run on token ids) but the token
# classifier openai_privacy_filter: its folder loads through moekit's one model loader with transformers'
# logits, and prune runs on it (the gating classes above check what prune keeps)
from tests.interop.test_patch_families import FAMILIES, lm  # noqa: E402

OTHERS = sorted(f for f in FAMILIES if ":" not in f and f not in CLASSES + ["llama4", "openai_privacy_filter"])


@pytest.mark.parametrize("model_type", OTHERS)
def test_every_patchable_folder_loads_and_prunes(model_type, tmp_path):
    hf, folder = saved(model_type, tmp_path)
    model = load_model(folder)  # the loader every command uses: config.json with a model_type -> patched
    assert isinstance(model, PatchedLM) and model.moe_layers()
    ids = BATCHES[0][0]
    assert (logits(model, ids) - logits(lm(hf), ids)).abs().max().item() <= 1e-5
    loads = measure_loads(model, BATCHES)
    E = model.moe_layers()[0].cfg.num_experts
    model, kept = prune_model(model, loads, keep=E // 2)
    assert all(layer.cfg.num_experts == E // 2 for layer in model.moe_layers())
    assert torch.isfinite(logits(model, ids)).all()


def test_a_llama4_multimodal_folder_loads_its_language_model_patched(tmp_path):
    """Scout's format (Llama4ForConditionalGeneration): transformers' causal-LM loader reads the language model,
    which patches as llama4_text and gives the multimodal model's text logits."""
    hf, folder = saved("llama4", tmp_path)
    model = load_patched(folder)
    assert model.hf.config.model_type == "llama4_text" and model.moe_layers()
    ids = BATCHES[0][0]
    assert (logits(model, ids) - logits(hf.language_model, ids)).abs().max().item() <= 1e-5


def native_and_patched(model_type, tmp_path):
    _, folder = saved(model_type, tmp_path)
    return load_hf(folder).eval(), load_patched(folder)


def same_function(a, b, tol=1e-5):
    ids = BATCHES[1][0]
    return (logits(a, ids) - logits(b, ids)).abs().max().item() <= tol


@pytest.mark.parametrize("model_type, tool", [("qwen2_moe", "prune"), ("qwen2_moe", "merge"), ("qwen2_moe", "extract"),
                                              ("deepseek_v3", "prune"), ("deepseek_v3", "merge"),
                                              ("gpt_oss", "prune"), ("gpt_oss", "merge")])
def test_prune_merge_extract_match_the_native_model(model_type, tool, tmp_path):
    native, patched = native_and_patched(model_type, tmp_path)
    assert same_function(native, patched)
    keep = native.moe_layers()[0].cfg.num_experts // 2  # divisible by DeepSeek's expert groups
    results = []
    for model in (native, patched):
        if tool == "extract":
            model, kept, _ = extract_task(model, BATCHES, min_share=0.15)
        else:
            loads = measure_loads(model, BATCHES)
            model, kept = (prune_model(model, loads, keep=keep) if tool == "prune" else
                           merge_model(model, loads, keep))
        results += [list(kept.values()), model]
    assert results[0] == results[2]  # the same experts kept / merged, layer by layer
    assert same_function(results[1], results[3])


def test_finetune_matches_the_native_model(tmp_path):
    native, patched = native_and_patched("qwen2_moe", tmp_path)
    stream = TokenStream(torch.randint(0, V, (4000,), generator=torch.Generator().manual_seed(4)))
    recipe = get_recipe("moe", steps=3, batch_size=4, dropout=0.0, expert_dropout=0.0, aux_coef=0.01)
    runs = []
    for model in (native, patched):
        torch.manual_seed(0)
        tuned, records, report = finetune(model, stream, None, recipe, progress=False,
                                          tcfg_overrides={"seq_len": 16, "eval_every": 0, "log_every": 1})
        runs.append((tuned, [r["loss"] for r in records if "loss" in r], report))
    (nat, nat_loss, nat_rep), (pat, pat_loss, pat_rep) = runs
    assert len(pat_loss) == 3 and pat_loss == pytest.approx(nat_loss, rel=1e-4, abs=1e-5)
    # the "moe" policy froze the same parameters: experts and routers
    assert pat_rep["by_group"]["experts"] == nat_rep["by_group"]["experts"]
    assert pat_rep["by_group"]["router"] == nat_rep["by_group"]["router"]
    assert same_function(nat, pat, tol=1e-4)


def test_inspect_and_distill_run_on_a_patched_hf_model(tmp_path):
    from moekit.analysis.report import inspect_model
    from moekit.config import TrainConfig
    from moekit.deploy.distill import distill, kd_loss_fn

    tok = train_bpe(["def f(x):\n    return x + 1\n" * 50, "class A:\n    pass\n" * 50], 300)
    hf, folder = saved("deepseek_v3", tmp_path, vocab_size=tok.vocab_size)
    model = load_patched(folder)
    stream = TokenStream(torch.randint(0, tok.vocab_size, (3000,), generator=torch.Generator().manual_seed(5)))
    report = inspect_model(model, Corpus(tok, stream, stream, [], [], "random tokens"), tmp_path / "inspect",
                           batches=2, batch_size=2, seq_len=16)
    text = report.read_text()
    assert "hf.model.layers.1.mlp.moe.router" in text and "- expert 7:" in text
    # the KD target is the HF model's own output
    x, y = stream.batch(0, 2, 16)
    with torch.no_grad():
        target = hf(x).logits
    assert kd_loss_fn(model, temperature=1.0, alpha=1.0)(type("Out", (), {"logits": target})(), x, y).item() < 1e-6
    tcfg = TrainConfig(steps=4, batch_size=2, seq_len=16, lr=3e-3, warmup_steps=1, eval_every=0, log_every=1)
    student, records = distill(model, stream, None, tcfg, progress=False)
    losses = [r["loss"] for r in records if "loss" in r]
    assert student.cfg.moe is None and student.cfg.d_model == hf.config.hidden_size and len(losses) == 4
    assert losses[-1] < losses[0]


def test_a_token_classifier_folder_is_refused_in_one_line(tmp_path):
    """openai_privacy_filter patches, but the tools need an LM head: refused by name before anything runs."""
    _, folder = saved("openai_privacy_filter", tmp_path)
    with pytest.raises(CheckpointError, match=r"^model_type='openai_privacy_filter': transformers has no causal-LM"):
        load_model(folder)
