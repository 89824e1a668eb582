"""`moekit inspect / prune / merge / extract / finetune / distill` on an HF model folder (save_pretrained of a tiny
random from_config model, with a tokenizer whose end-of-text token is not moekit's), through the CLI entry point.

References are transformers' own model on the same folder: its router logits (output_router_logits) for the
routing statistics and expert loads, its router with the dropped experts masked to -inf for prune / extract,
its experts replaced by the frequency-weighted group averages for merge, its own cross-entropy for the losses
finetune and distill report.
"""

import json
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from moekit.cli import main
from moekit.train.checkpoint import load_model
from moekit.train.data import build_corpus
from moekit.train.tokenizer import Tokenizer
from tests.corpus import write_docs
from tests.interop.test_patch_families import tiny_hf

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

FAMILIES = ["mixtral", "qwen2_moe"]  # softmax top-k renormalised; not renormalised + gated shared expert
# inspect and prune run on both; the other commands on one each (the suite is near its time limit)
BS, SEQ, NB = 2, 16, 2
E, K = 4, 2


def hf_tokenizer(texts):
    """A byte-level BPE whose only special token is "</s>" (Mixtral's end-of-text), not moekit's separator."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope="module")
def hf_folder(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    docs = write_docs(root / "docs", "def f{i}_{j}(x):\n    return x * {j}\n", 120)
    tok = hf_tokenizer([p.read_text() for p in sorted(docs.iterdir())])
    hf = tiny_hf(request.param, vocab_size=tok.get_vocab_size(), eos_token_id=tok.token_to_id("</s>"))
    hf.save_pretrained(root / "hf")
    tok.save(str(root / "hf" / "tokenizer.json"))
    moekit_tok = Tokenizer(tok)
    moekit_tok.eos_id = tok.token_to_id("</s>")  # documents end with the model's own eos
    corpus = build_corpus([docs], tokenizer=moekit_tok)
    return root, hf, corpus


def data_args(root):
    return ["--data", str(root / "docs"), "--batch-size", str(BS), "--seq-len", str(SEQ), "--batches", str(NB)]


def run(capsys, *argv):
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def router_logits(hf, batches):
    """Per MoE layer: transformers' own router logits [T, E] over ``batches``."""
    with torch.no_grad():
        outs = [hf(input_ids=x, output_router_logits=True).router_logits for x, _ in batches]
    return [torch.cat([o[i].reshape(-1, E) for o in outs]).double() for i in range(len(outs[0]))]


def loads(hf, batches):
    return [torch.bincount(lg.topk(K, dim=-1).indices.flatten(), minlength=E) for lg in router_logits(hf, batches)]


def hf_loss(hf, batches):
    with torch.no_grad():
        return sum(F.cross_entropy(hf(input_ids=x).logits.flatten(0, 1), y.flatten()).item()
                   for x, y in batches) / len(batches)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits if not hasattr(model, "config") else model(input_ids=ids).logits


def masked_router_logits(hf, kept_per_layer, ids):
    """transformers' model with each layer's router logits of the dropped experts set to -inf (its own
    softmax, top-k and renormalisation then run over the kept experts only)."""
    routers = [m.gate.weight for m in hf.modules() if type(m).__name__.endswith("SparseMoeBlock")]
    masks = {}
    for w, kept in zip(routers, kept_per_layer):
        mask = torch.full((E,), float("-inf"))
        mask[kept] = 0.0
        masks[id(w)] = mask
    linear = F.linear

    def masked(x, w, b=None):
        out = linear(x, w, b)
        return out + masks[id(w)] if id(w) in masks else out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "linear", masked)
        return logits(hf, ids)


def ids():
    return torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("hf_folder", FAMILIES, indirect=True)
def test_inspect_matches_the_routing_of_transformers_own_router(hf_folder, capsys, tmp_path):
    root, hf, corpus = hf_folder
    out = run(capsys, "inspect", root / "hf", *data_args(root), "--out", tmp_path / "inspect")
    rows = re.findall(r"^\| (\d) \((\S+)\) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) / [\d.]+ \| ([\d.]+) \|$", out, re.MULTILINE)
    ref = router_logits(hf, corpus.val.eval_batches(NB, BS, SEQ))
    assert len(rows) == len(ref) == 2
    for (_, _, per_token, imb, load_ent, router_ent), lg in zip(rows, ref):
        counts = torch.bincount(lg.topk(K, dim=-1).indices.flatten(), minlength=E).double()
        share, p = counts / counts.sum(), lg.softmax(-1)
        assert float(per_token) == K
        assert float(imb) == pytest.approx((counts.max() / counts.mean()).item(), abs=6e-3)
        assert float(load_ent) == pytest.approx(-(share * share.clamp_min(1e-30).log()).sum().item(), abs=6e-4)
        assert float(router_ent) == pytest.approx(-(p * p.log()).sum(-1).mean().item(), abs=6e-4)


@pytest.mark.parametrize("hf_folder", FAMILIES, indirect=True)
def test_prune_writes_an_hf_folder_equal_to_the_masked_router(hf_folder, capsys, tmp_path):
    root, hf, corpus = hf_folder
    out = run(capsys, "prune", root / "hf", tmp_path / "p", *data_args(root), "--keep", 2)
    assert "an HF model folder" in out
    kept = list(json.loads((tmp_path / "p" / "trainer_state.json").read_text())["kept"].values())
    for kept_e, load_e in zip(kept, loads(hf, corpus.train.eval_batches(NB, BS, SEQ))):  # the most loaded stay
        assert load_e[[e for e in range(E) if e not in kept_e]].max() <= load_e[kept_e].min()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()  # no moekit involved
    assert pruned.config.get_text_config().to_dict().get("num_local_experts",
                                                         pruned.config.to_dict().get("num_experts")) == 2
    x = ids()
    assert (logits(pruned, x) - masked_router_logits(hf, kept, x)).abs().max().item() < 1e-5
    assert (logits(hf, x) - masked_router_logits(hf, kept, x)).abs().max().item() > 1e-4  # pruning changed it
    assert (logits(load_model(tmp_path / "p"), x) - logits(pruned, x)).abs().max().item() < 1e-5


@pytest.mark.parametrize("hf_folder", ["qwen2_moe"], indirect=True)
def test_extract_keeps_what_the_task_uses(hf_folder, capsys, tmp_path):
    root, hf, corpus = hf_folder
    run(capsys, "extract", root / "hf", tmp_path / "x", *data_args(root), "--min-share", 0.2)
    kept = list(json.loads((tmp_path / "x" / "trainer_state.json").read_text())["kept"].values())
    for kept_e, load_e in zip(kept, loads(hf, corpus.train.eval_batches(NB, BS, SEQ))):
        share = load_e.double() / load_e.sum()
        assert kept_e == sorted(e for e in range(E) if share[e] >= 0.2)
    x = ids()
    assert (logits(load_model(tmp_path / "x"), x) - masked_router_logits(hf, kept, x)).abs().max().item() < 1e-5


@pytest.mark.parametrize("hf_folder", ["mixtral"], indirect=True)
def test_merge_equals_transformers_with_experts_averaged_per_group(hf_folder, capsys, tmp_path):
    import copy

    root, hf, corpus = hf_folder
    out = run(capsys, "merge", root / "hf", tmp_path / "m", *data_args(root), "--num-experts", 2)
    assert "--router map" in out  # many-to-one router: saved in moekit's format, read back by the same loader
    groups = list(json.loads((tmp_path / "m" / "trainer_state.json").read_text())["groups"].values())
    ref = copy.deepcopy(hf)
    blocks = [m for m in ref.modules() if type(m).__name__.endswith("SparseMoeBlock")]
    with torch.no_grad():
        for block, layer_groups, f_E in zip(blocks, groups, loads(hf, corpus.train.eval_batches(NB, BS, SEQ))):
            for w in block.experts.parameters():  # [E, ...] stacked expert tensors
                merged = w.double().clone()
                for g in layer_groups:
                    f = f_E[g].double()
                    f = f / f.sum() if f.sum() > 0 else torch.full_like(f, 1 / len(g))
                    merged[g] = torch.einsum("e,e...->...", f, w[g].double())
                w.copy_(merged)
    x = ids()
    assert (logits(load_model(tmp_path / "m"), x) - logits(ref, x)).abs().max().item() < 1e-5


@pytest.mark.parametrize("hf_folder", ["qwen2_moe"], indirect=True)
def test_finetune_an_hf_model_trains_only_what_the_recipe_leaves_free(hf_folder, capsys, tmp_path):
    root, hf, corpus = hf_folder
    out = run(capsys, "finetune", root / "hf", *data_args(root), "--recipe", "moe", "--steps", 3, "--lr", 3e-3,
              "--out", tmp_path / "ft", "--no-progress")
    before = float(re.search(r"val loss: ([\d.]+) ->", out).group(1))
    assert before == pytest.approx(hf_loss(hf, corpus.val.eval_batches(NB, BS, SEQ)), abs=1e-4)
    tuned = load_model(tmp_path / "ft")  # moekit's folder holding the HF config, rebuilt through transformers
    own = dict(hf.named_parameters())
    blocks = [n for n, m in hf.named_modules() if type(m).__name__.endswith("SparseMoeBlock")]
    new = dict(tuned.named_parameters())
    for b in blocks:  # frozen: routed experts and routers (HF layout: gate [E, D], experts.gate_up_proj/down_proj)
        layer = tuned.get_submodule(f"hf.{b}.moe")
        assert torch.equal(layer.router.gate.weight, own[f"{b}.gate.weight"])
        gate, up = own[f"{b}.experts.gate_up_proj"].chunk(2, dim=1)
        assert torch.equal(layer.experts.w_gate_EFD, gate) and torch.equal(layer.experts.w_up_EFD, up)
        assert torch.equal(layer.experts.w_down_EDF, own[f"{b}.experts.down_proj"])
    trained = [k for k in own if ".mlp." not in k]
    assert trained and all(not torch.equal(own[k], new[f"hf.{k}"]) for k in trained if "norm" not in k)


@pytest.mark.parametrize("hf_folder", ["mixtral"], indirect=True)
def test_distill_from_an_hf_teacher(hf_folder, capsys, tmp_path):
    root, hf, corpus = hf_folder
    out = run(capsys, "distill", root / "hf", *data_args(root), "--steps", 2, "--no-scratch",
              "--out", tmp_path / "kd", "--no-progress")
    teacher = float(re.search(r"MoE teacher val loss ([\d.]+)", out).group(1))
    assert teacher == pytest.approx(hf_loss(hf, corpus.val.eval_batches(NB, BS, SEQ)), abs=1e-4)
    student = load_model(tmp_path / "kd" / "student")
    assert student.cfg.moe is None and student.cfg.d_model == hf.config.hidden_size
    assert student.cfg.vocab_size == hf.config.vocab_size


def test_an_unpatchable_family_folder_is_one_line(tmp_path, capsys):
    # an encoder-decoder (capacity-limited Switch): no patch entry, refused before any weights are read
    transformers.AutoConfig.for_model("switch_transformers").save_pretrained(tmp_path / "switch")
    assert main(["prune", str(tmp_path / "switch"), str(tmp_path / "p"), "--keep", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model_type='switch_transformers'" in err and "patchable: " in err
    assert "mixtral" in err and "gpt_oss" in err


@pytest.mark.parametrize("hf_folder", ["qwen2_moe"], indirect=True)
def test_generate_on_an_hf_folder_is_transformers_greedy_decoding(hf_folder, capsys):
    root, hf, corpus = hf_folder
    out = run(capsys, "generate", root / "hf", "--prompt", "def f", "--temperature", 0, "--max-new-tokens", 4)
    tok = corpus.tokenizer
    prompt = torch.tensor([tok.encode("def f")])
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.rstrip("\n") == tok.decode(ref[0].tolist())


def test_a_pruned_model_transformers_cannot_run_stays_in_moekit_format(tmp_path):
    """DeepSeek-V3 scores a group by its two best experts: 8 experts in 4 groups pruned to 4 leave one per group,
    which transformers' router cannot select from; moekit's can, so the model is saved in moekit's format."""
    from moekit.deploy.prune import prune_layer
    from moekit.interop.patched_lm import load_patched, to_hf
    from moekit.train.checkpoint import save_deployed

    tiny_hf("deepseek_v3").save_pretrained(tmp_path / "ds")
    model = load_patched(tmp_path / "ds")
    for name, layer in [(n, m) for n, m in model.named_modules() if type(m).__name__ == "MoELayer"]:
        model.set_submodule(name, prune_layer(layer, [0, 2, 4, 6]))
    out, why = to_hf(model)
    assert out is None and "DeepseekV3ForCausalLM with 4 experts fails" in why
    (tmp_path / "tokenizer.json").write_text("{}")
    written = save_deployed(tmp_path / "p", model, state={}, tokenizer=tmp_path / "tokenizer.json")
    assert written.startswith("a moekit model folder holding the HF config")
    x = ids() % 96
    assert torch.equal(logits(load_model(tmp_path / "p"), x), logits(model, x))
