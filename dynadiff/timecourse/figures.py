"""The outputs a person looks at: the CSV table, the time course and generalisation plots, the filmstrips."""

from __future__ import annotations

import numpy as np

STRIP_TILE = 96


def csv_table(summary: dict) -> str:
    """One row per offset: the window in volumes and seconds from the onset, counts, then each metric's mean, 95 %
    interval and chance."""
    import csv
    import io

    metrics = summary["metrics"]
    head = ["offset_tr", "start_volume", "end_volume", "start_s", "end_s", "asked_s", "checkpoint", "n_images",
            "dropped_images", "dropped_events"]
    for m in metrics:
        head += [f"{m}_mean", f"{m}_ci95_low", f"{m}_ci95_high", f"{m}_chance"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(head)
    for r in summary["rows"]:
        line = [r["offset"], r["start_volume"], r["end_volume"], f"{r['start_s']:.4f}", f"{r['end_s']:.4f}",
                "" if r["asked_s"] is None else f"{r['asked_s']:g}", r["checkpoint"], r["n_images"], r["dropped_images"],
                r["dropped_events"]]
        for m in metrics:
            v = r["metrics"].get(m)
            line += ["", "", "", ""] if v is None else [
                f"{v['mean']:.6f}", f"{v['ci95'][0]:.6f}", f"{v['ci95'][1]:.6f}",
                "" if v["chance"] is None else f"{v['chance']:.6f}"]
        writer.writerow(line)
    return buf.getvalue()


def _metric_panels(n: int, cell: tuple[float, float], margin: tuple[float, float] = (0.0, 0.0)):
    """A figure with one panel per metric, three to a row (panels beyond ``n`` hidden): (figure, the n panels).
    Each panel is ``cell`` inches, plus ``margin`` for the whole figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, max(1, n))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cell[0] * cols + margin[0], cell[1] * rows + margin[1]),
                             squeeze=False, dpi=100)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return fig, list(axes.ravel()[:n])


def _rendered(fig, title: str) -> np.ndarray:
    """(H, W, 3) uint8 of the figure under ``title``; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return picture


def plot_timecourse(summary: dict) -> np.ndarray:
    """(H, W, 3) uint8: each metric against the window's start (s from onset), 95 % interval shaded, chance dashed,
    the number of images at each point, the model's own window marked."""
    from dynadiff.metrics.catalog import METRICS

    metrics = summary["metrics"] or []
    fig, panels = _metric_panels(len(metrics), (4.2, 3.2))
    for ax, m in zip(panels, metrics):
        rows = [r for r in summary["rows"] if m in r["metrics"]]
        x = np.array([r["start_s"] for r in rows])
        mean = np.array([r["metrics"][m]["mean"] for r in rows])
        low = np.array([r["metrics"][m]["ci95"][0] for r in rows])
        high = np.array([r["metrics"][m]["ci95"][1] for r in rows])
        ax.fill_between(x, low, high, color="tab:blue", alpha=0.25, linewidth=0, label="95 % interval")
        ax.plot(x, mean, "o-", color="tab:blue", markersize=3, label="mean")
        chance = [r["metrics"][m]["chance"] for r in rows]
        if all(c is not None for c in chance):
            ax.plot(x, chance, "--", color="grey", linewidth=1, label="chance")
        ax.axvline(0, color="black", linewidth=0.6)
        if summary["model_offset"] is not None:
            ax.axvline(summary["model_offset"] * summary["tr_s"], color="tab:orange", linewidth=0.8, linestyle=":",
                       label="model's window")
        for xi, yi, r in zip(x, mean, rows):
            ax.annotate(str(r["n_images"]), (xi, yi), textcoords="offset points", xytext=(0, 4), ha="center",
                        fontsize=6, color="dimgrey")
        info = METRICS[m]
        ax.set_title(f"{info.label} ({'higher' if info.higher_is_better else 'lower'} is better)", fontsize=9)
        ax.set_xlabel("window start (s from onset)", fontsize=8)
        ax.tick_params(labelsize=7)
    if panels:
        panels[0].legend(fontsize=6, loc="best")
    mode = "averaged" if summary["averaged"] else "unaveraged"
    how = (f"{summary['n_trs']}-TR windows of one model sliding from the onset" if summary["model_offset"] is not None
           else "one model per offset, each at its own window")
    return _rendered(fig, f"subject {summary['subject']}, {mode}: {how} (n images at each point)")


def _tile(image: np.ndarray | None, size: int = STRIP_TILE) -> np.ndarray:
    from PIL import Image

    if image is None:  # no window within the run at this offset
        tile = np.full((size, size, 3), 235, dtype=np.uint8)
        tile[size // 2 - 1:size // 2 + 1, size // 4:3 * size // 4] = 150
        return tile
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def strip(gt: np.ndarray, recs: list[np.ndarray | None], size: int = STRIP_TILE, gap: int = 4) -> np.ndarray:
    """(size, W, 3) uint8: the ground truth, a gap, then the reconstruction at each offset (grey dash: none)."""
    white = np.full((size, gap, 3), 255, dtype=np.uint8)
    return np.concatenate([_tile(gt, size), white, white] + [_tile(r, size) for r in recs], axis=1)


def filmstrip(strips: dict[int, np.ndarray], summary: dict, max_rows: int = 8) -> np.ndarray:
    """Up to ``max_rows`` strips (evenly spaced over the images) under a header naming each column's offset."""
    from PIL import Image, ImageDraw

    keys = sorted(strips)
    picks = [keys[j] for j in np.unique(np.linspace(0, len(keys) - 1, min(max_rows, len(keys))).round().astype(int))]
    body = np.concatenate([np.pad(strips[i], ((0, 4), (0, 0), (0, 0)), constant_values=255) for i in picks], axis=0)
    header = Image.new("RGB", (body.shape[1], 28), "white")
    draw = ImageDraw.Draw(header)
    draw.text((4, 8), "truth", fill="black")
    x0 = STRIP_TILE + 8
    for j, k in enumerate(summary["offsets"]):
        draw.text((x0 + j * STRIP_TILE + 4, 2), f"t{k:+d}", fill="black")
        draw.text((x0 + j * STRIP_TILE + 4, 14), f"{k * summary['tr_s']:+.1f}s", fill="dimgrey")
    return np.concatenate([np.asarray(header), body], axis=0)


def plot_generalization(summary: dict) -> np.ndarray:
    """(H, W, 3) uint8: per metric, the train offset x test offset matrix of means (the diagonal: each model at its
    own offset), values written in the cells."""
    from dynadiff.metrics.catalog import METRICS

    g = summary["generalization"]
    metrics = summary["metrics"]
    size = 1.0 + 0.45 * len(g["test_offsets"])
    fig, panels = _metric_panels(len(metrics), (size, size), margin=(1.0, 0.6))
    labels = [f"{k:+d}" for k in g["test_offsets"]]
    for ax, m in zip(panels, metrics):
        values = np.array([[np.nan if v is None else v for v in row] for row in g["means"][m]], dtype=float)
        cmap = "viridis" if METRICS[m].higher_is_better else "viridis_r"
        im = ax.imshow(values, cmap=cmap, origin="lower")
        for (a, b), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white")
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_yticks(range(len(labels)), [f"{k:+d}" for k in g["train_offsets"]], fontsize=7)
        ax.set_xlabel("test offset (TRs from onset)", fontsize=8)
        ax.set_ylabel("train offset", fontsize=8)
        ax.set_title(METRICS[m].label, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _rendered(fig, f"subject {summary['subject']}: temporal generalisation (train time x test time)")
