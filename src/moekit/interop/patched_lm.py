"""moekit's tools on the checkpoints users have: an HF model folder, loaded by transformers, MoE blocks patched.

``load_patched(folder)`` returns a ``PatchedLM``: the transformers model with moekit MoELayers inside, behind
moekit's model interface (``forward(ids) -> LMOutput`` with every MoE layer's aux record, ``moe_layers``,
``param_groups``, parameter counts). ``inspect``'s routing recorder, ``prune``/``merge``/``extract`` (they edit
the MoELayers in place), ``finetune``'s freeze policies and training loop, and ``distill`` (teacher logits)
then run on it unchanged. Attention, norms, embeddings and dense layers stay transformers' own code.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from moekit.config import ModelConfig
from moekit.deploy import moe_layers
from moekit.deploy.merge import GroupRouter
from moekit.errors import CheckpointError
from moekit.interop.patch import PatchedMoEBlock, block_tensors, entry_for, layer_index, moe_config, patch
from moekit.models.decoder import LMOutput, MoETransformer


class PatchedLM(nn.Module):
    """A patched transformers causal LM with moekit's model interface."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        self.train(hf_model.training)  # train()/eval() on the wrapper reach the HF model (dropout, jitter)

    def forward(self, ids: Tensor) -> LMOutput:
        records = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: records.append(out.aux)) for m in self.moe_layers()]
        try:
            logits = self.hf(input_ids=ids).logits
        finally:
            for h in hooks:
                h.remove()
        aux_loss = sum((a.loss for a in records if a.loss is not None), logits.new_zeros((), dtype=torch.float32))
        return LMOutput(logits, aux_loss, records)

    def moe_layers(self) -> list[nn.Module]:
        return list(moe_layers(self).values())  # forward order: named_modules walks the layers in order

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            emb = {id(m.weight): m.weight.numel() for m in (self.hf.get_input_embeddings(),
                                                             self.hf.get_output_embeddings()) if m is not None}
            n -= sum(emb.values())
        return n

    # the decoder's own definitions: they read only named_modules / named_parameters / moe_layers / num_params
    num_active_params = MoETransformer.num_active_params
    param_groups = MoETransformer.param_groups

    @property
    def cfg(self) -> ModelConfig:
        """A nominal moekit config of the same width, depth, heads and (first) MoE layer: what the FLOP
        estimate and ``distill``'s dense twin read. The family's attention details are not carried."""
        c = self.hf.config.get_text_config()
        blocks = {layer_index(n): m.moe for n, m in self.hf.named_modules() if isinstance(m, PatchedMoEBlock)}
        moe = blocks[min(blocks)].cfg if blocks else None
        heads = c.num_attention_heads
        return ModelConfig(vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers,
                           n_heads=heads, n_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                           head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                           max_seq_len=getattr(c, "max_position_embeddings", 4096),
                           dense_hidden=getattr(c, "intermediate_size", 0) or 0, moe=moe,
                           first_k_dense=min(blocks) if blocks else 0)


def auto_class(config):
    """transformers' Auto class that builds ``config``'s model with an LM head: causal LMs, else the image-text
    models (Qwen3-VL-MoE, GLM-4.5V, ...), which run on token ids alone; the MoE blocks are their language
    model's."""
    import transformers

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto
    raise CheckpointError(f"model_type={config.model_type!r}: transformers has no causal-LM or image-text-to-text "
                          "model for this config")


def load_patched(folder: str | Path, dtype: torch.dtype = torch.float32, dispatcher: str = "local",
                 experts: str = "auto") -> PatchedLM:
    """An HF model folder (config.json + weights, as ``save_pretrained`` writes it) -> PatchedLM."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{str(folder)!r} has no config.json (expected a Hugging Face model folder)")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: not a JSON object ({e})") from None
    entry_for(SimpleNamespace(model_type=model_type))  # an unpatchable family fails before its weights are read
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.AutoConfig.from_pretrained(folder)
        hf = auto_class(config).from_pretrained(folder, config=config, dtype=dtype)
    return PatchedLM(patch(hf.eval(), dispatcher=dispatcher, experts=experts))


def hf_base_config(model: PatchedLM) -> dict:
    """``train.checkpoint.save_model``'s ``config`` for a (pruned, merged, ...) patched HF model: the HF
    config it was built from; ``load_model(path)`` rebuilds it (``deploy.layout.default_build``)."""
    return {"hf_config": model.hf.config.to_dict()}


def build_patched(base_config: dict) -> PatchedLM:
    """The untransformed patched model of ``hf_base_config``: transformers builds it from the config (its
    weights are then replaced by the saved tensors), then ``patch``."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.AutoConfig.for_model(**base_config["hf_config"])
        return PatchedLM(patch(auto_class(cfg).from_config(cfg).eval()))


# the HF config fields that hold the number of routed experts, by family (DBRX: under ffn_config)
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
# the moekit layer fields that the family's HF block fixes; the rest (dispatch, kernels, losses, training-time
# capacity and dropout) do not change what the saved model computes in eval mode
_BLOCK_FIELDS = ("expert_hidden", "expert_hidden_sizes", "activation", "bias", "num_shared_experts", "shared_hidden",
                 "shared_gate", "router")


def _expert_count_field(text_cfg) -> tuple[object, str]:
    for owner in (text_cfg, getattr(text_cfg, "ffn_config", None)):
        for name in EXPERT_COUNT_FIELDS:
            if isinstance(getattr(owner, name, None), int):
                return owner, name
    raise RuntimeError(f"{type(text_cfg).__name__}: none of {EXPERT_COUNT_FIELDS} holds the expert count")


def to_hf(model: PatchedLM) -> tuple[nn.Module | None, str]:
    """The family's own transformers model (no moekit modules) computing what ``model`` computes after
    prune / merge / extract: the expert count changed in its config, the blocks' tensors mapped back through
    the family's key map. ``(None, why)`` when the family's config cannot say it: MoE layers with different
    expert counts (extract keeps what each layer uses), merge's many-to-one router (``--router map``), a top-k
    capped below the config's, or moekit tensors the HF block has no place for."""
    import copy

    hf = model.hf
    entry = entry_for(hf.config)
    blocks = {n: m for n, m in hf.named_modules() if isinstance(m, PatchedMoEBlock)}
    counts = sorted({b.moe.cfg.num_experts for b in blocks.values()})
    if len(counts) != 1:
        return None, f"its MoE layers keep different numbers of experts ({counts[0]}..{counts[-1]})"
    config = copy.deepcopy(hf.config)
    owner, name = _expert_count_field(config.get_text_config())
    setattr(owner, name, counts[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = next(hf.parameters())
        out = auto_class(config).from_config(config, dtype=ref.dtype).eval()
    text_cfg = out.config.get_text_config()
    filled = set()
    with torch.no_grad():
        for bname, block in out.named_modules():
            if type(block).__name__ != entry.block:
                continue
            layer = blocks[bname].moe
            if isinstance(layer.router, GroupRouter):
                return None, f"{bname}: merged with a many-to-one router (--router map); --router average is portable"
            if layer.cfg.capacity.eval_capacity_factor is not None:
                return None, f"{bname}: drops tokens in evaluation (eval_capacity_factor); HF blocks are dropless"
            views = block_tensors(entry, block)  # views into the new block's tensors (every TRANSFORMS rule is one)
            want = moe_config(entry, text_cfg, layer_index(bname), views)
            if any(getattr(want, f) != getattr(layer.cfg, f) for f in _BLOCK_FIELDS):
                return None, (f"{bname}: its layer ({layer.cfg.router}) differs from what {type(config).__name__} "
                              f"describes ({want.router}), e.g. a merged many-to-one router or a capped top-k")
            src = layer.state_dict()
            extra = [k for k in src if k not in views and src[k].count_nonzero()] + \
                [k for k in views if k not in src or src[k].shape != views[k].shape]
            if extra:
                return None, f"{bname}: {entry.block} has no place for {extra}"
            for k, view in views.items():
                view.copy_(src[k])
            filled |= {f"{bname}.{k}" for k in block.state_dict()}
        own = {k: v for k, v in hf.state_dict().items() if ".moe." not in k}
        rest = {k: t for k, t in out.state_dict().items() if k not in filled}
        resized = [k for k, t in rest.items() if t.shape != own[k].shape]
        if resized:  # JetMoE: the expert count also sizes its mixture-of-attention experts
            return None, f"{name}={counts[0]} also resizes {resized[0]} outside the MoE blocks"
        for k, t in rest.items():
            t.copy_(own[k])
        # the config may still hold settings that no longer fit (DeepSeek-V3's group scores need >= 2 experts
        # per group): transformers' model must give the same logits on a probe
        probe = torch.randint(0, text_cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        try:
            diff = (out(input_ids=probe.to(ref.device)).logits - model(probe.to(ref.device)).logits).abs().max()
        except (RuntimeError, IndexError, ValueError) as e:
            return None, f"transformers' {type(out).__name__} with {counts[0]} experts fails ({str(e)[:80]})"
        if diff > 1e-4 * (1 + model(probe.to(ref.device)).logits.abs().max()):
            return None, f"transformers' {type(out).__name__} with {counts[0]} experts differs (max logit diff {diff:.2g})"
    return out, f"{type(out).__name__} with {counts[0]} experts per MoE layer, same logits on a probe"
