"""Trainer hooks: extras plug in here instead of subclassing the trainer.

A hook is any object with some of: ``after_step(ctx)`` (after the optimizer step, outside autograd),
``after_eval(ctx)``, ``after_resume(step)`` (the run restarts from the checkpoint of that step).
``ctx`` is the trainer's ``StepContext``.
"""

from __future__ import annotations

import json
import os
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

    def _csv_row(self, record: dict) -> str:
        return ",".join(str(record.get(c, "")) for c in self.columns)

    def write(self, record: dict) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if record.get("split") == "train":
            if self.columns is None:
                self.columns = [k for k, v in record.items() if not isinstance(v, (list, dict))]
                if not (self.out_dir / "metrics.csv").exists():
                    (self.out_dir / "metrics.csv").write_text(",".join(self.columns) + "\n")
            with open(self.out_dir / "metrics.csv", "a") as f:
                f.write(self._csv_row(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record.get('split', 'train')}/{k}", v, record["step"])

    def after_resume(self, step: int) -> None:
        """Drop rows logged after the checkpoint (a run killed past it): the resumed run logs them again."""
        kept = [r for r in read_metrics(self.out_dir) if r["step"] <= step]
        _replace_text(self.out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        csv = self.out_dir / "metrics.csv"
        if csv.is_file():
            header = csv.read_text().split("\n", 1)[0]
            self.columns = header.split(",")
            rows = [self._csv_row(r) for r in kept if r.get("split") == "train"]
            _replace_text(csv, "".join(line + "\n" for line in [header, *rows]))

    def after_step(self, ctx) -> None:
        if ctx.record is not None:
            self.write(ctx.record)

    def after_eval(self, ctx) -> None:
        self.write(ctx.eval_record)


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_metrics(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
