from moekit.analysis import plots


def _records(offset):
    train = [{"split": "train", "step": s, "flops": 1e9 * s, "loss": 5.0 - s / 10 + offset} for s in range(1, 11)]
    val = [{"split": "val", "step": s, "flops": 1e9 * s, "val_loss": 5.0 - s / 10 + offset} for s in (5, 10)]
    return train + val


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def test_loss_curves_and_load_heatmap_render(tmp_path):
    runs = {"moe": _records(0.0), "dense": _records(0.2)}
    assert _is_png(plots.loss_curves(runs, tmp_path / "loss.png"))
    load_LE = [[10, 0, 5, 5], [1, 2, 3, 4]]  # an expert with zero load must not break the colour scale
    assert _is_png(plots.load_heatmap(load_LE, tmp_path / "sub" / "load.png"))
    assert _is_png(plots.xy_lines({"a": ([1, 2], [3, 4])}, tmp_path / "xy.png", "x", "y", "t"))


def test_layer_and_expert_axes_have_a_labelled_tick_at_every_integer(tmp_path, monkeypatch):
    """Layers are integers (no -0.5 / 0.5 ticks) and every expert is labelled, not every other one."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    L, E = 3, 16
    plots.load_heatmap([[i + e for e in range(E)] for i in range(L)], tmp_path / "h.png")
    plots.load_histogram(list(range(E)), tmp_path / "b.png", "t")
    plots.matrix([[0] * E for _ in range(E)], tmp_path / "m.png", "t")
    heat, bars, mat = (f.axes[0] for f in figures)
    for axis, n in ((heat.yaxis, L), (heat.xaxis, E), (bars.xaxis, E), (mat.xaxis, E), (mat.yaxis, E)):
        figures[0].canvas.draw()
        assert list(axis.get_ticklocs()) == list(range(n))
        assert [t.get_text() for t in axis.get_ticklabels()] == [str(i) for i in range(n)]
