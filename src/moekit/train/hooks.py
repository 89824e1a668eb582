"""Trainer hooks: extras plug in here instead of subclassing the trainer.

A hook is any object with some of: ``after_step(ctx)`` (after the optimizer step, outside autograd),
``after_eval(ctx)``. ``ctx`` is the trainer's ``StepContext``.
"""

from __future__ import annotations

import json
from pathlib import Path

from moekit.layers.routing import update_router_biases


class RouterBiasUpdate:
    """Aux-loss-free load balancing (DeepSeek-V3, Wang et al. 2024): after each optimizer step every router
    that keeps a selection bias updates it from the step's expert loads, outside autograd."""

    def after_step(self, ctx) -> None:
        if ctx.counts_per_layer:
            update_router_biases(ctx.model, ctx.counts_per_layer)


class MetricsWriter:
    """Appends every logged record to metrics.jsonl and metrics.csv (columns fixed by the first train row);
    TensorBoard too when it is installed."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.columns: list[str] | None = None
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out_dir / "tb"))
            except ImportError:  # tensorboard not installed: JSONL/CSV only
                self.tb = None

    def write(self, record: dict) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if record.get("split") == "train":
            if self.columns is None:
                self.columns = [k for k, v in record.items() if not isinstance(v, (list, dict))]
                if not (self.out_dir / "metrics.csv").exists():
                    (self.out_dir / "metrics.csv").write_text(",".join(self.columns) + "\n")
            with open(self.out_dir / "metrics.csv", "a") as f:
                f.write(",".join(str(record.get(c, "")) for c in self.columns) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record.get('split', 'train')}/{k}", v, record["step"])

    def after_step(self, ctx) -> None:
        if ctx.record is not None:
            self.write(ctx.record)

    def after_eval(self, ctx) -> None:
        self.write(ctx.eval_record)


def read_metrics(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
