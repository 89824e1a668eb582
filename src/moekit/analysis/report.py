"""`moekit inspect`: route real data through a trained model and write plots + a Markdown report."""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.analysis import plots
from moekit.analysis import routing_stats as rs
from moekit.device import model_device

CAPACITY_FACTORS = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0]


def inspect_model(model, corpus, out_dir: str | Path, *, batches: int = 8, batch_size: int = 8,
                  seq_len: int = 128) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    data = corpus.val.eval_batches(batches, batch_size, seq_len)
    ids = torch.cat([x.reshape(-1) for x, _ in data])
    with torch.no_grad(), rs.RoutingRecorder(model) as rec:
        for x, _ in data:
            model(x.to(model_device(model)))
    lines = ["# Routing report\n", f"data: {corpus.description}; {ids.numel():,} tokens routed\n",
             "| layer | experts/token | imbalance (max/mean) | load entropy / max | router entropy (nats) |",
             "|---|---|---|---|---|"]
    load_LE, sweeps = [], {}
    tok = corpus.tokenizer
    top_lines = []
    for i, (name, layer) in enumerate(rec.layers.items()):
        s = rs.summarize_layer(layer)
        load_LE.append(s["load"])
        lines.append(f"| {i} ({name}) | {s['experts_per_token']:.2f} | {s['imbalance_max_over_mean']:.2f} | "
                     f"{s['load_entropy_nats']:.3f} / {s['max_load_entropy_nats']:.3f} | "
                     f"{s['router_entropy_nats']:.3f} |")
        token_N, expert_N, _, _ = layer.cat()
        plots.load_histogram(s["load"], out_dir / f"load_layer{i}.png", f"layer {i}: assignments per expert")
        plots.matrix(rs.coactivation_EE(token_N, expert_N, layer.num_tokens, layer.num_experts).numpy(),
                     out_dir / f"coactivation_layer{i}.png", f"layer {i}: tokens shared by expert pairs")
        sweeps[f"layer {i}"] = rs.dropped_fraction_sweep(layer.routings, CAPACITY_FACTORS)
        if i == 0:
            for e, top in enumerate(rs.top_tokens_per_expert(ids, token_N, expert_N, layer.num_experts, n=8)):
                shown = ", ".join(f"`{tok.decode([t])!r}`x{c}" for t, c in top)
                top_lines.append(f"- expert {e}: {shown}")
    plots.load_heatmap(load_LE, out_dir / "load_heatmap.png")
    plots.xy_lines({k: (list(v), list(v.values())) for k, v in sweeps.items()}, out_dir / "capacity_sweep.png",
                   "capacity factor", "dropped fraction of assignments", "tokens dropped vs capacity factor")
    lines += ["", "## Dropped fraction vs capacity factor", "",
              "| layer | " + " | ".join(str(f) for f in CAPACITY_FACTORS) + " |",
              "|---|" + "---|" * len(CAPACITY_FACTORS)]
    for k, v in sweeps.items():
        lines.append(f"| {k} | " + " | ".join(f"{x:.3f}" for x in v.values()) + " |")
    lines += ["", "## Most frequent tokens per expert (layer 0)", "", *top_lines, "",
              "Plots: load_heatmap.png, capacity_sweep.png, load_layer*.png, coactivation_layer*.png", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
