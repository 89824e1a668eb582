from moekit.analysis import plots


def _records(offset):
    train = [{"split": "train", "step": s, "flops": 1e9 * s, "loss": 5.0 - s / 10 + offset} for s in range(1, 11)]
    val = [{"split": "val", "step": s, "flops": 1e9 * s, "val_loss": 5.0 - s / 10 + offset} for s in (5, 10)]
    return train + val


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def test_loss_curves_and_load_heatmap_render(tmp_path):
    runs = {"moe": _records(0.0), "dense": _records(0.2)}
    for x in ("step", "flops"):
        assert _is_png(plots.loss_curves(runs, tmp_path / f"loss_{x}.png", x=x))
    load_LE = [[10, 0, 5, 5], [1, 2, 3, 4]]  # an expert with zero load must not break the colour scale
    assert _is_png(plots.load_heatmap(load_LE, tmp_path / "sub" / "load.png"))
    assert _is_png(plots.xy_lines({"a": ([1, 2], [3, 4])}, tmp_path / "xy.png", "x", "y", "t"))
