"""Train an MoE model and its dense twin (same active FLOPs per token) on the same batches; collect the
comparison, metrics and plots into a run folder. Used by ``moekit demo`` and ``moekit compare``."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from moekit.config import ModelConfig, TrainConfig
from moekit.models.decoder import MoETransformer
from moekit.train.data import Corpus
from moekit.train.hooks import MetricsWriter, RouterBiasUpdate
from moekit.train.trainer import train, train_flops_per_token


def train_one(label: str, cfg: ModelConfig, corpus: Corpus, train_cfg: TrainConfig, out_dir: Path,
              progress=False, hooks: list = (), should_stop=None, device: torch.device | str = "cpu") -> dict:
    """Train one model from scratch (seeded) into out_dir/label; returns its summary row."""
    torch.manual_seed(train_cfg.seed)
    model = MoETransformer(cfg)
    run_dir = out_dir / label
    run_dir.mkdir(parents=True, exist_ok=True)
    corpus.tokenizer.save(run_dir / "tokenizer.json")  # `moekit generate` needs it beside the checkpoints
    t0 = time.perf_counter()
    records = train(model, corpus.train, corpus.val, train_cfg, out_dir=run_dir, progress=progress, label=label,
                    hooks=[MetricsWriter(run_dir), RouterBiasUpdate(), *hooks], should_stop=should_stop,
                    device=device)
    seconds = time.perf_counter() - t0
    final_val = [r for r in records if r["split"] == "val"][-1]
    train_rows = [r for r in records if r["split"] == "train"]
    load_LE = None
    from moekit.layers.routing import Router

    if any(isinstance(m, Router) for m in model.modules()):  # expert load per layer on the validation batches
        from moekit.analysis.routing_stats import RoutingRecorder, load_E

        model.eval()
        with torch.no_grad(), RoutingRecorder(model, keep_routings=False) as rec:
            for x, _ in corpus.val.eval_batches(train_cfg.eval_batches, train_cfg.batch_size, train_cfg.seq_len):
                model(x.to(device))
        load_LE = [load_E(r.cat()[1], r.num_experts).tolist() for r in rec.layers.values()]
    return {
        "label": label, "params_total": model.num_params(), "params_active": model.num_active_params(),
        "train_flops_per_token": train_flops_per_token(model, train_cfg.seq_len), "steps": train_cfg.steps,
        "val_loss": final_val["val_loss"], "val_ppl": final_val["val_ppl"],
        "tokens_per_s": train_cfg.steps * train_cfg.batch_size * train_cfg.seq_len * train_cfg.grad_accum / seconds,
        "seconds": seconds, "final_imbalance": train_rows[-1]["imbalance"], "records": records,
        "load_per_layer": load_LE,
    }


def compare_moe_dense(moe_cfg: ModelConfig, corpus: Corpus, train_cfg: TrainConfig, out_dir: str | Path,
                      progress: bool = False, should_stop=None, seeds: list[int] | None = None,
                      device: torch.device | str = "cpu") -> dict:
    """MoE vs its dense twin on identical batches, for each seed (default: train_cfg.seed); writes summary.json
    and the first seed's plots to out_dir. The first seed's runs are out_dir/moe and out_dir/dense, further
    seeds' out_dir/moe-seedS and out_dir/dense-seedS.
    ``should_stop``: see ``train`` (an interrupted comparison raises ``TrainingInterrupted``)."""
    from moekit.analysis import plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = list(seeds) if seeds else [train_cfg.seed]
    bar = None
    if progress:  # one bar (and ETA) over all runs
        from tqdm import tqdm

        bar = tqdm(total=2 * train_cfg.steps * len(seeds), desc="moe", dynamic_ncols=True)
    rows = []
    try:
        for i, seed in enumerate(seeds):
            tc, tag = dataclasses.replace(train_cfg, seed=seed), "" if i == 0 else f"-seed{seed}"
            rows += [train_one("moe" + tag, moe_cfg, corpus, tc, out_dir, bar or False, should_stop=should_stop,
                               device=device),
                     train_one("dense" + tag, moe_cfg.dense_twin(), corpus, tc, out_dir, bar or False,
                               should_stop=should_stop, device=device)]
    finally:
        if bar is not None:
            bar.close()
    rows_all, rows = rows, rows[:2]  # the plots show the first seed
    runs = {r["label"]: r["records"] for r in rows}
    files = [plots.loss_curves(runs, out_dir / "loss_vs_steps.png")]
    # both models spend the same FLOPs per token, so loss vs FLOPs would repeat loss vs steps: plot the gap
    val_moe, val_dense = ([r for r in rows[i]["records"] if r["split"] == "val"] for i in (0, 1))
    files.append(plots.xy_lines({"dense - MoE": ([r["step"] for r in val_moe],
                                                 [d["val_loss"] - m["val_loss"] for m, d in zip(val_moe, val_dense)])},
                                out_dir / "val_loss_gap.png", "step", "val loss gap (nats/token)",
                                "dense twin minus MoE validation loss (above 0: MoE ahead)", hline=0.0))
    moe_train = [r for r in rows[0]["records"] if r["split"] == "train"]
    files.append(plots.xy_lines({"MoE": ([r["step"] for r in moe_train], [r["imbalance"] for r in moe_train])},
                                out_dir / "imbalance.png", "step", "load imbalance (max/mean, mean over layers)",
                                "expert load imbalance during training"))
    if rows[0]["load_per_layer"]:
        files.append(plots.load_heatmap(rows[0]["load_per_layer"], out_dir / "expert_load.png",
                                        "MoE expert load on validation data (share per layer)"))
    summary = {"corpus": corpus.description, "train_config": vars(train_cfg), "model_config": moe_cfg.to_dict(),
               "seeds": seeds, "moe_val_losses": [r["val_loss"] for r in rows_all[0::2]],
               "dense_val_losses": [r["val_loss"] for r in rows_all[1::2]],
               "rows": [{k: v for k, v in r.items() if k != "records"} for r in rows_all],
               "plots": [str(f) for f in files]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
