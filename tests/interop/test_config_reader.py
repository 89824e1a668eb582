"""The one HF config reader: its defaults table equals transformers' config classes field by field, and a
hand-trimmed config.json (every default left out) loads to the logits of transformers' own model, with
transformers installed and without it (the table path)."""

import json

import pytest
import torch

from moekit.errors import ConfigError
from moekit.interop import config_reader
from moekit.interop.config_reader import TABLE_FAMILIES, defaults_from_transformers, read_hf_config, table
from moekit.interop.families import FAMILIES as FAMILIES_BY_TYPE
from moekit.interop.hf import load_hf, save_hf
from tests.interop.test_hf import FAMILIES, tiny_hf

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("model_type", TABLE_FAMILIES)
def test_defaults_table_equals_transformers_field_by_field(model_type):
    want = defaults_from_transformers(model_type)
    for key, entry in want.items():  # the family and its sub-configs (Llama 4 text/vision, DBRX attn/ffn)
        got = table()[key]
        for part in ("aliases", "default_theta", "sub_configs", "architecture", "sub_config_defaults"):
            assert got.get(part) == entry.get(part), (key, part)
        assert set(got["fields"]) == set(entry["fields"]), key
        for name, value in entry["fields"].items():
            assert got["fields"][name] == value, f"{key}.{name}: table {got['fields'][name]!r}, transformers {value!r}"


def trimmed(folder):
    """Rewrite a saved config.json with every field equal to transformers' default left out (what a user
    writing one by hand does), RoPE included when it is the family's default (base, or gpt-oss's yarn)."""
    cfg = json.loads((folder / "config.json").read_text())
    entry = table()[cfg["model_type"]]
    out = {k: v for k, v in cfg.items() if k not in entry["fields"] or entry["fields"][k] != v}
    rp = out.get("rope_parameters") or {}
    if rp in ({"rope_type": "default", "rope_theta": entry["default_theta"]}, entry["default_rope"]):
        del out["rope_parameters"]
    out.pop("transformers_version", None)
    out.pop("architectures", None)
    (folder / "config.json").write_text(json.dumps(out))
    return out


# the tiny families of test_hf, with the fields the issue found read wrongly left at transformers' default:
# qwen3_moe norm_topk_prob (False), mixtral rope_theta (1e6) and rms_norm_eps (1e-5), olmoe rms_norm_eps,
# deepseek_v3 routed_scaling_factor (2.5), n_shared_experts (1), norm_topk_prob (True)
AT_DEFAULT = {"qwen3_moe": ["norm_topk_prob"],
              "deepseek_v3": ["routed_scaling_factor", "n_shared_experts", "norm_topk_prob"]}


@pytest.mark.parametrize("use_transformers", [True, False], ids=["transformers", "table"])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_trimmed_config_gives_transformers_logits(model_type, use_transformers, tmp_path, monkeypatch):
    over = {f: defaults_from_transformers(model_type)[model_type]["fields"][f] for f in AT_DEFAULT.get(model_type, [])}
    hf = tiny_hf(model_type, **over)
    hf.save_pretrained(tmp_path)
    left = trimmed(tmp_path)
    for f in ("rms_norm_eps", "rope_parameters", *AT_DEFAULT.get(model_type, [])):
        assert f not in left  # the defaults really are left out
    if not use_transformers:
        monkeypatch.setattr(config_reader, "_transformers", lambda: None)
    ours = load_hf(tmp_path).eval()
    with torch.no_grad():
        assert (ours(IDS).logits - hf(IDS).logits).abs().max().item() <= 1e-5


def test_both_paths_read_the_same_values():
    raw = {"model_type": "qwen3_moe", "num_experts": 4, "hidden_size": 32, "rope_theta": 5e5}
    a, b = read_hf_config(raw), read_hf_config(raw, use_transformers=False)
    for name in ("num_experts", "num_local_experts", "norm_topk_prob", "rms_norm_eps", "hidden_size"):
        assert a[name] == b[name], name
    assert a["num_experts"] == 4 and a["rope_parameters"]["rope_theta"] == b["rope_parameters"]["rope_theta"] == 5e5


def test_remote_code_families_map_through_architectures_or_analytic_table():
    kimi = read_hf_config({"model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"], "n_routed_experts": 384})
    assert kimi["model_type"] == "deepseek_v3" and kimi["source_model_type"] == "kimi_k2"
    assert kimi["routed_scaling_factor"] == 2.5 and kimi["n_routed_experts"] == 384
    assert read_hf_config({"model_type": "deepseek"})["first_k_dense_replace"] == 0
    with pytest.raises(ConfigError, match=r"model_type='nope' \(architectures=\['NopeForCausalLM'\]\)"):
        read_hf_config({"model_type": "nope", "architectures": ["NopeForCausalLM"]})


def test_deepseek_without_shared_experts_loads_and_exports(tmp_path):
    """n_shared_experts=0 used to raise a KeyError: HF builds a shared MLP of width 0, moekit builds none."""
    hf = tiny_hf("deepseek_v3", n_shared_experts=0)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    assert ours.cfg.moe.num_shared_experts == 0
    save_hf(ours, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (ours(IDS).logits - hf(IDS).logits).abs().max().item() <= 1e-5
        assert (back(IDS).logits - hf(IDS).logits).abs().max().item() <= 1e-5


def test_mixtral_without_num_experts_per_tok_reads_transformers_default(tmp_path):
    hf = tiny_hf("mixtral")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["num_experts_per_tok"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_hf(tmp_path).cfg.moe.router.top_k == 2  # MixtralConfig's default
    cfg["num_experts_per_tok"] = None  # explicitly null: a one-line error naming the field
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_experts_per_tok") as e:
        load_hf(tmp_path)
    assert "\n" not in str(e.value)
    full = read_hf_config(cfg, use_transformers=False)  # the table path passes null on: the family names it
    with pytest.raises(ConfigError, match="config.json num_experts_per_tok=None"):
        FAMILIES_BY_TYPE["mixtral"].to_moekit(full)


@pytest.mark.parametrize("name", ["deepseek-v3", "kimi-k2", "qwen3-30b-a3b", "mixtral-8x7b", "olmoe-1b-7b",
                                  "gpt-oss-20b", "gpt-oss-120b"])
def test_real_configs_convert_their_key_maps_on_meta(name):
    """Full-size real configs (DeepSeek-V3 with YaRN) translate without refusal, and their key maps cover
    every parameter of the moekit model and exactly the parameters transformers builds (calc's total,
    checked against transformers on the meta device in tests/analysis)."""
    from moekit.analysis import params
    from moekit.interop.hf import check_exportable, family_of, key_pairs
    from moekit.models.decoder import MoETransformer

    cfg, _ = params.load_config(name)
    full = read_hf_config(cfg)
    fam = family_of(full)
    mcfg = fam.to_moekit(full)
    with torch.device("meta"):
        model = MoETransformer(mcfg)
    sd = model.state_dict()
    pairs = key_pairs(fam, full, mcfg)
    check_exportable(fam, fam.to_hf(mcfg), mcfg, sd, pairs)  # and back: the HF format holds it all
    numel = sum(sd[m.split("[")[0]][0].numel() if m.endswith("]") else sd[m].numel() for _, m, _ in pairs)
    count = params.count_params(params.spec_from_hf(cfg))
    assert numel == count.total + sum(count.buffers.values())


def test_llama4_scout_key_map_is_transformers_language_model_on_meta():
    """Llama 4 Scout (multimodal config, llama3 RoPE, NoPE every 4th layer, chunked attention): its key map
    names exactly the language model's tensors of transformers' Llama4ForConditionalGeneration, with their
    shapes, and the model exports as llama4_text."""
    from moekit.analysis import params
    from moekit.interop.families import FAMILIES as CONVERT
    from moekit.interop.hf import check_exportable, family_of, key_pairs
    from moekit.models.decoder import MoETransformer

    transformers = pytest.importorskip("transformers")
    cfg, _ = params.load_config("llama-4-scout-17b-16e")
    full = read_hf_config(cfg)
    fam = family_of(full)
    mcfg = fam.to_moekit(full)
    with torch.device("meta"):
        sd = MoETransformer(mcfg).state_dict()
        hf_cfg = transformers.AutoConfig.for_model(**cfg)
        hf_sd = transformers.Llama4ForConditionalGeneration(hf_cfg).state_dict()
    pairs = key_pairs(fam, full, mcfg)
    for hk, mk, view in pairs:
        assert tuple(hf_sd[hk].shape) == view.hf_shape(tuple(sd[mk].shape)), hk
    assert {hk for hk, _, _ in pairs} == {k for k in hf_sd if k.startswith("language_model.")}
    assert mcfg.nope_layers == tuple(range(3, 48, 4)) and set(mcfg.attn_chunks) == {0, 8192}
    text = CONVERT["llama4_text"]
    back = read_hf_config(text.to_hf(mcfg))
    sd = {k: torch.zeros(()) if k.endswith("router.bias") else v for k, v in sd.items()}  # meta has no values
    check_exportable(text, back, mcfg, sd, key_pairs(text, back, mcfg))
