"""moekit's tools on the checkpoints users have: an HF model folder, loaded by transformers, MoE blocks patched.

``load_patched(folder)`` returns a ``PatchedLM``: the transformers model with moekit MoELayers inside, behind
moekit's model interface (``forward(ids) -> LMOutput`` with every MoE layer's aux record, ``moe_layers``,
``param_groups``, parameter counts). ``inspect``'s routing recorder, ``prune``/``merge``/``extract`` (they edit
the MoELayers in place), ``finetune``'s freeze policies and training loop, and ``distill`` (teacher logits)
then run on it unchanged. Attention, norms, embeddings and dense layers stay transformers' own code.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.config import ModelConfig
from moekit.deploy import moe_layers
from moekit.errors import CheckpointError
from moekit.interop.patch import PatchedMoEBlock, layer_index, patch
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


def load_patched(folder: str | Path, dtype: torch.dtype = torch.float32, dispatcher: str = "local",
                 experts: str = "auto") -> PatchedLM:
    """An HF model folder (config.json + weights, as ``save_pretrained`` writes it) -> PatchedLM."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{str(folder)!r} has no config.json (expected a Hugging Face model folder)")
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return PatchedLM(patch(hf.eval(), dispatcher=dispatcher, experts=experts))


def is_hf_folder(path: str | Path) -> bool:
    """True for a folder transformers can load (config.json with a model_type), False for moekit checkpoints."""
    import json

    cfg = Path(path) / "config.json"
    return cfg.is_file() and "model_type" in json.loads(cfg.read_text())


def hf_base_config(model: PatchedLM) -> dict:
    """``train.checkpoint.save_model``'s ``config`` for a (pruned, merged, ...) patched HF model: the HF
    config it was built from; ``load_model(path, build=build_patched)`` rebuilds it."""
    return {"hf_config": model.hf.config.to_dict()}


def build_patched(base_config: dict) -> PatchedLM:
    """The untransformed patched model of ``hf_base_config``: transformers builds it from the config (its
    weights are then replaced by the saved tensors), then ``patch``."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.AutoConfig.for_model(**base_config["hf_config"])
        return PatchedLM(patch(transformers.AutoModelForCausalLM.from_config(cfg).eval()))
