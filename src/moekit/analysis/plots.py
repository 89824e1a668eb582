"""PNG plots. The only module that imports matplotlib (lazily, Agg backend, so no display is needed)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _integer_ticks(ax, n_x: int | None = None, n_y: int | None = None) -> None:
    """A tick and a label at every integer index (experts, layers): no -0.5 ticks, no skipped experts."""
    for n, set_ticks, axis in ((n_x, ax.set_xticks, "x"), (n_y, ax.set_yticks, "y")):
        if n is not None:
            set_ticks(range(n))
            ax.tick_params(axis=axis, labelsize=8 if n <= 32 else 6)


def loss_curves(runs: dict[str, list[dict]], path: str | Path) -> Path:
    """Train loss (thin) and validation loss (markers) of several runs against steps."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (label, records) in enumerate(runs.items()):
        color = f"C{i}"
        tr = [r for r in records if r.get("split") == "train"]
        va = [r for r in records if r.get("split") == "val"]
        ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], color=color, alpha=0.35, lw=1)
        ax.plot([r["step"] for r in va], [r["val_loss"] for r in va], "o-", color=color, label=f"{label} (val)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("loss vs steps (thin: train, markers: validation)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def load_heatmap(load_LE, path: str | Path, title: str = "expert load (share of assignments)") -> Path:
    """Layer x expert heatmap of the share of each layer's assignments that each expert received."""
    import numpy as np

    plt = _plt()
    load = np.full((len(load_LE), max(len(r) for r in load_LE)), np.nan)  # layers pruned to fewer experts:
    for i, row in enumerate(load_LE):  # their missing columns stay NaN, drawn blank
        load[i, :len(row)] = row
    share = load / np.clip(np.nansum(load, 1, keepdims=True), 1e-12, None)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * share.shape[1] + 2), max(2.5, 0.45 * share.shape[0] + 1.5)))
    im = ax.imshow(share, cmap="viridis", aspect="auto")
    _integer_ticks(ax, n_x=share.shape[1], n_y=share.shape[0])
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer (in model order)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="share")
    return _save(fig, path)


def load_histogram(counts_E, path: str | Path, title: str) -> Path:
    plt = _plt()
    counts = [float(c) for c in counts_E]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * len(counts) + 2), 3.2))
    ax.bar(range(len(counts)), counts, color="C0")
    mean = sum(counts) / max(len(counts), 1)
    ax.axhline(mean, color="C3", ls="--", lw=1, label="balanced")
    _integer_ticks(ax, n_x=len(counts))
    ax.set_xlabel("expert")
    ax.set_ylabel("assignments")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def matrix(m_EE, path: str | Path, title: str, label: str = "tokens") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(m_EE, cmap="magma")
    _integer_ticks(ax, n_x=len(m_EE), n_y=len(m_EE))
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    return _save(fig, path)


def xy_lines(series: dict[str, tuple[list, list]], path: str | Path, xlabel: str, ylabel: str, title: str,
             logx: bool = False, hline: float | None = None) -> Path:
    """Generic line plot: label -> (xs, ys); ``hline``: a reference level (e.g. 0 for a difference)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, "o-", label=label)
    if hline is not None:
        ax.axhline(hline, color="0.4", lw=1, ls="--")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return _save(fig, path)


def seed_bands(series: dict[str, list[tuple[list, list]]], path: str | Path, xlabel: str, ylabel: str, title: str,
               logx: bool = False) -> Path:
    """label -> one (xs, ys) per seed, all seeds on the same xs: the mean as a line, min..max as a band."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (label, runs) in enumerate(series.items()):
        n = min(len(xs) for xs, _ in runs)
        xs = runs[0][0][:n]
        cols = [[ys[j] for _, ys in runs] for j in range(n)]
        ax.plot(xs, [sum(c) / len(c) for c in cols], "-", color=f"C{i}", label=f"{label} ({len(runs)} seeds)")
        ax.fill_between(xs, [min(c) for c in cols], [max(c) for c in cols], color=f"C{i}", alpha=0.25, lw=0)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
