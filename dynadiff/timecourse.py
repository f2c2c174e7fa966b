"""Time-resolved decoding behind ``timecourse.py``: the same test images decoded from windows that slide over time.

For each offset ``k`` (in TRs from the trial's onset volume ``t``), every test image is decoded from the window
``[t + k, t + k + n)`` of the model's own length ``n`` (6 TRs for the published checkpoints, whose window is
``[t + 3, t + 9)``: eval.py's), by the same checkpoint. Then each offset is measured like eval.py measures its
run, with a bootstrap interval over images.

- **Data**: each run is loaded and cleaned once for the whole sweep (:class:`~dynadiff.config.RunSeriesConfig`
  caches the cleaned runs); every offset's windows are cut from them.
- **Test set**: eval.py's samples, in its order (one repetition per image chosen as eval.py does, or the mean of
  all repetitions with ``--averaged-trial``). A repetition whose window would run past the start or end of its
  run is left out at that offset (an averaged image then averages the others; an image left with none is left
  out), and the outputs count what was left out: never padded.
- **Generation**: cached per (checkpoint, offset, image) by exca
  (:class:`~dynadiff.config.SweepGenerationConfig`): a killed sweep resumes with the missing images only, and
  runs as job arrays on a cluster like eval.py's generation.
- **Outputs** in ``{cache}/timecourse_subjXX_{averaged|unaveraged}_{run id}/`` (``timecourse_subjXX_{mode}`` links
  to the latest): ``timecourse.json`` (written last) and ``.csv``, ``timecourse.png``, ``filmstrip.png`` and
  ``strips/{i}.png`` (the ground truth, then the reconstruction at each offset).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import typing as tp
from pathlib import Path

import numpy as np

from dynadiff.data.preprocess import TR, window_bounds

if tp.TYPE_CHECKING:
    from dynadiff.config import EvalConfig, NsdDatasetConfig, SweepGenerationConfig

logger = logging.getLogger(__name__)

DEFAULT_OFFSETS = "-3:13"
N_BOOTSTRAP = 2000
STRIP_TILE = 96


class TimecourseError(RuntimeError):
    """The time course cannot run as asked (one line, said to the user)."""


# ----------------------------------------------------------------------------- offsets


def _range_or_list(text: str, number: type, default_step, option: str, usage: str, unit: str) -> list:
    """``START:STOP[:STEP]`` (STOP excluded, like ``range``) or a comma-separated list of ``number``s; a one-line
    :class:`TimecourseError` naming ``option`` otherwise."""
    try:
        if ":" not in text:
            return [number(p) for p in text.split(",") if p.strip()]
        parts = [number(p) for p in text.split(":")]
        if len(parts) not in (2, 3):
            raise ValueError
    except ValueError:
        raise TimecourseError(f"{option} {text!r}: expected {usage}") from None
    start, stop, step = (*parts, default_step) if len(parts) == 2 else parts
    if not step > 0:
        raise TimecourseError(f"{option} {text}: the step must be a positive number of {unit}")
    if number is int:
        return list(range(start, stop, step))
    return list(np.arange(start, stop - 1e-9, step))


def parse_offsets(text: str) -> list[int]:
    """``START:STOP[:STEP]`` (Python's range: STOP excluded) or a comma-separated list, in TRs from the onset."""
    text = str(text).strip()
    offsets = _range_or_list(text, int, 1, "--offsets", "START:STOP[:STEP] (integers, in TRs from the onset; STOP "
                             "excluded, e.g. -3:13) or a list such as 0,3,6", "TRs")
    if not offsets:
        raise TimecourseError(f"--offsets {text}: no offset in that range (STOP is excluded: e.g. -3:13 is -3 to 12)")
    if len(set(offsets)) != len(offsets):
        raise TimecourseError(f"--offsets {text}: an offset is repeated")
    return sorted(offsets)


def offsets_from_seconds(text: str, tr: float = TR) -> tuple[list[int], dict[int, float]]:
    """``--offsets-s``: window starts in seconds (``START:STOP[:STEP]`` or a list) snapped to the nearest TR.

    Returns the offsets in TRs and, for each, the seconds asked for; two values snapped to one volume are an error.
    """
    text = str(text).strip()
    seconds = _range_or_list(text, float, tr, "--offsets-s", "START:STOP[:STEP] in seconds (STOP excluded, e.g. "
                             "-4:16:1.33) or a list such as 0,4,8", "seconds")
    if not seconds or not all(np.isfinite(seconds)):
        raise TimecourseError(f"--offsets-s {text}: no finite offset")
    asked: dict[int, float] = {}
    for s in seconds:
        k = int(round(s / tr))
        if k in asked:
            raise TimecourseError(f"--offsets-s {text}: {asked[k]:g} s and {s:g} s both become volume {k:+d} "
                                  f"({k * tr:.2f} s; the TR is {tr:.4f} s): space them by at least a TR")
        asked[k] = float(s)
    return sorted(asked), {k: asked[k] for k in sorted(asked)}


@dataclasses.dataclass(frozen=True)
class ModelWindow:
    """The window a checkpoint was trained on: ``n_trs`` volumes from ``offset`` volumes after the onset."""

    offset: int
    n_trs: int
    source: str  # where it was read from


def model_window(checkpoint: Path, nsd_cfg: "NsdDatasetConfig") -> ModelWindow:
    """A train.py checkpoint's window, from the training config in its metadata; other checkpoints (the published
    ones): the config's ``offset``/``duration`` (published: 4.6 s, 8 s -> volumes t+3 .. t+8)."""
    from dynadiff.decoder import CheckpointInfo

    offset, duration, source = nsd_cfg.offset, nsd_cfg.duration, "the data config (offset, duration)"
    recorded = CheckpointInfo.read(checkpoint).window
    if recorded is not None:
        offset, duration, source = recorded["offset"], recorded["duration"], f"checkpoint {checkpoint}"
    start, end = window_bounds(0, offset, duration)
    return ModelWindow(start, end - start, f"{source}: offset {offset:g} s, duration {duration:g} s")


# ----------------------------------------------------------------------------- data


class SweepData:
    """eval.py's test samples, with every window of any offset cut from the cleaned runs (each loaded once)."""

    def __init__(self, nsd_cfg: "NsdDatasetConfig") -> None:
        from dynadiff.data import nsd
        from dynadiff.data.dataset import list_trials, select_samples

        self.cfg = nsd_cfg
        self.root = Path(nsd_cfg.nsddata_path)
        items, trials = list_trials(nsd_cfg, check_windows=False)
        if not trials:
            raise nsd.NsdDataError(f"no test events for subject {nsd_cfg.subject} under {self.root}")
        self.items = items
        self.samples = select_samples(trials, "test", nsd_cfg.averaged, nsd_cfg.seed)
        self.nsd_ids = [s[0].nsd_id for s in self.samples]
        self._series = list(self.series_config().series([nsd.RunEvents(item.run, (), item.stamp) for item in items]))

    def series_config(self):
        from dynadiff.config import RunSeriesConfig

        infra = self.cfg.infra.model_dump(exclude_defaults=True)
        infra.pop("version", None)
        # whole runs are large (about 14 MB each for NSD's 15.7k voxels): read back memory-mapped, never all in RAM
        infra["keep_in_ram"] = False
        return RunSeriesConfig(nsddata_path=self.cfg.nsddata_path, infra=infra)

    @property
    def n_voxels(self) -> int:
        return int(self._series[0].shape[0])

    def onset(self, trial) -> int:
        return self.items[trial.item].volumes[trial.row]

    def usable(self, index: int, offset: int, n_trs: int) -> list:
        """The repetitions of sample ``index`` whose window at ``offset`` lies within their run."""
        return [t for t in self.samples[index] if 0 <= self.onset(t) + offset and
                self.onset(t) + offset + n_trs <= self._series[t.item].shape[1]]

    def window(self, index: int, offset: int, n_trs: int) -> np.ndarray:
        """(voxels, n_trs) float32: the mean of the usable repetitions' windows (error if none is usable)."""
        trials = self.usable(index, offset, n_trs)
        if not trials:
            raise ValueError(f"sample {index} has no window within its run at offset {offset}")
        acc = np.zeros((self.n_voxels, n_trs), dtype=np.float64)
        for t in trials:
            start = self.onset(t) + offset
            acc += self._series[t.item][:, start:start + n_trs]
        return (acc / len(trials)).astype(np.float32)


@dataclasses.dataclass
class OffsetPlan:
    offset: int
    images: list[int]  # sample indices decoded at this offset (eval.py's order)
    dropped_images: int  # of the first n, left out: no repetition within its run
    dropped_events: int  # repetitions left out (of the images kept or not)


def plan(data: SweepData, offsets: tp.Sequence[int], n_trs: int, n: int) -> list[OffsetPlan]:
    out = []
    for k in offsets:
        images, dropped_events = [], 0
        for i in range(n):
            usable = data.usable(i, k, n_trs)
            dropped_events += len(data.samples[i]) - len(usable)
            if usable:
                images.append(i)
        out.append(OffsetPlan(k, images, n - len(images), dropped_events))
    return out


def item_name(offset: int, index: int) -> str:
    return f"{offset}:{index}"


def generate_sweep_images(cfg: "SweepGenerationConfig", items: tp.Sequence[str]) -> tp.Iterator[np.ndarray]:
    """(H, W, 3) uint8 reconstructions of ``"{offset}:{index}"`` items, in order (as eval.py generates its images)."""
    from dynadiff.evaluation import decoder_of

    pairs = [tuple(int(x) for x in str(item).split(":")) for item in items]
    if not pairs:
        return
    data = SweepData(cfg.data)
    decoder = decoder_of(cfg, data.n_voxels, cfg.n_trs)
    logger.info("generating %d image(s) of the time course on %s", len(pairs), decoder.device)
    yield from decoder.images((data.window(i, k, cfg.n_trs) for k, i in pairs), cfg.data.subject)


def generation_config(cfg: "EvalConfig", checkpoint: Path, n_trs: int) -> "SweepGenerationConfig":
    from dynadiff.config import SweepGenerationConfig

    return SweepGenerationConfig(
        data=cfg.data.nsd_dataset_config, brain_modules_config=cfg.brain_modules_config,
        versatilediffusion_config=cfg.versatilediffusion_config, checkpoint=checkpoint,
        checkpoint_digest=cfg.checkpoint_digest, data_digest=cfg.data_digest, n_trs=n_trs,
        allow_missing_keys=cfg.allow_missing_keys, device=cfg.device, batch_size=cfg.batch_size,
        to_uint8=cfg.to_uint8, infra=cfg.image_generation.infra_kwargs(folder=cfg.infra.folder))


# ----------------------------------------------------------------------------- statistics


def bootstrap_interval(values: tp.Sequence[float], n_boot: int = N_BOOTSTRAP, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over images (resampled with replacement; NaN-free values)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    if len(x) == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def peak(rows: list[dict], metric: str, higher_is_better: bool) -> int | None:
    """The offset of the best mean of ``metric`` (None: no offset has it)."""
    scored = [(r["metrics"][metric]["mean"], r["offset"]) for r in rows
              if metric in r["metrics"] and np.isfinite(r["metrics"][metric]["mean"])]
    if not scored:
        return None
    return (max if higher_is_better else min)(scored)[1]


# ----------------------------------------------------------------------------- the sweep


@dataclasses.dataclass
class SweepModel:
    """A checkpoint with its resolved eval.py configuration and the window it was trained on."""

    cfg: "EvalConfig"
    checkpoint: Path
    window: ModelWindow


def output_dir(cfg: "EvalConfig", rid: str) -> Path:
    nsd_cfg = cfg.data.nsd_dataset_config
    mode = "averaged" if nsd_cfg.averaged else "unaveraged"
    return Path(cfg.infra.folder or "./cache") / f"timecourse_subj{nsd_cfg.subject:02d}_{mode}_{rid}"


def check_decoders(decoders: tp.Sequence[SweepModel]) -> None:
    """Per-offset models: one per offset, each with the offset its checkpoint records (never guessed)."""
    from dynadiff.decoder import CheckpointInfo

    seen: dict[int, Path] = {}
    for d in decoders:
        if CheckpointInfo.read(d.checkpoint).window is None:
            raise TimecourseError(f"checkpoint {d.checkpoint} does not record the window it was trained on (only "
                                  "train.py checkpoints do): --checkpoints needs them; slide one model with "
                                  "--checkpoint and --offsets instead")
        if d.window.offset in seen:
            raise TimecourseError(f"checkpoints {seen[d.window.offset]} and {d.checkpoint} were both trained at offset "
                                  f"{d.window.offset:+d}: give one checkpoint per offset")
        seen[d.window.offset] = d.checkpoint


def run_timecourse(decoders: tp.Sequence[SweepModel], offsets: tp.Sequence[int] | None = None,
                   asked_seconds: dict[int, float] | None = None, generalization: bool = False) -> dict:
    """Decode and measure; write the outputs; return the summary (what ``timecourse.json`` holds).

    One decoder and ``offsets``: it slides over them. Several (per-offset models): each at its own offset, and with
    ``generalization`` each at every one's offset too (train time x test time).
    """
    from dynadiff import jobs
    from dynadiff.data.dataset import load_stimulus
    from dynadiff.evaluation import GT_SIZE, EvaluationError, resolve_device
    from dynadiff.faces import blur_faces_batch, load_face_detector
    from dynadiff.files import exclusive, save_png, write_text
    from dynadiff.metrics import compute_metrics
    from dynadiff.metrics.catalog import METRICS
    from dynadiff.metrics.suite import available_metrics

    decoders = sorted(decoders, key=lambda d: d.window.offset)
    sliding = offsets is not None
    if sliding and len(decoders) != 1:
        raise ValueError("offsets slide one decoder")
    cfg = decoders[0].cfg
    nsd_cfg = cfg.data.nsd_dataset_config
    diagonal = list(offsets) if sliding else [d.window.offset for d in decoders]
    # (decoder, test offset) pairs: the time course, then the generalisation matrix's other cells
    tests = [(0, k) for k in diagonal] if sliding else [(j, d.window.offset) for j, d in enumerate(decoders)]
    if generalization and not sliding:
        tests += [(j, k) for j in range(len(decoders)) for k in diagonal if k != decoders[j].window.offset]
    names, _ = available_metrics(cfg.metrics, cfg.metrics_weights)  # logs what is skipped, once
    data_before = jobs.snapshot(nsd_cfg.infra)
    try:
        data = SweepData(nsd_cfg)
    except jobs.JOB_ERRORS as e:
        raise EvaluationError(jobs.failure_report(nsd_cfg.infra, "data preparation (cleaned runs)", data_before,
                                                  error=e)) from e
    n = len(data.samples) if cfg.limit is None else min(cfg.limit, len(data.samples))
    gens = [generation_config(d.cfg, d.checkpoint, d.window.n_trs) for d in decoders]
    plans = {(j, k): plan(data, [k], decoders[j].window.n_trs, n)[0] for j, k in tests}
    key = json.dumps({"generation": [g.infra.uid() for g in gens], "tests": tests, "n": n, "metrics": cfg.metrics,
                      "blur_faces": cfg.blur_faces, "identification": cfg.identification}, sort_keys=True)
    rid = hashlib.sha1(key.encode()).hexdigest()[:8]
    out = output_dir(cfg, rid)
    with exclusive(out.with_name(f".{out.name}.lock"), f"the output folder {out} (same time course)"):
        images: dict[tuple[int, int, int], np.ndarray] = {}  # (decoder, offset, image)
        for j, gen in enumerate(gens):
            items = [item_name(k, i) for jj, k in tests if jj == j for i in plans[(j, k)].images]
            if gen.infra.mode == "cached":
                missing = jobs.missing_items(gen.infra, items)
                logger.info("checkpoint %s: %d reconstructions (%d cached, %d to generate; cache %s)",
                            decoders[j].checkpoint, len(items), len(items) - len(missing), len(missing),
                            gen.infra.uid_folder())
            before = jobs.snapshot(gen.infra)
            try:
                for item, x in zip(items, gen.generate(items)):
                    k, i = (int(v) for v in item.split(":"))
                    images[(j, k, i)] = np.asarray(x)
            except jobs.JOB_ERRORS as e:
                raise EvaluationError(jobs.failure_report(gen.infra, "image generation (time course)", before, items,
                                                          error=e, noun="reconstruction")) from e
        if cfg.blur_faces:
            detector = load_face_detector(resolve_device(cfg.device))
            keys = list(images)
            images = {k: np.asarray(v) for k, v in zip(keys, blur_faces_batch([images[k] for k in keys],
                                                                               detector=detector))}
        gts = {i: load_stimulus(data.root, data.nsd_ids[i], GT_SIZE) for i in range(n)}

        def measure(j: int, k: int) -> dict:
            p, window = plans[(j, k)], decoders[j].window
            row = {"offset": k, "start_volume": k, "end_volume": k + window.n_trs, "start_s": k * TR,
                   "end_s": (k + window.n_trs) * TR, "asked_s": (asked_seconds or {}).get(k),
                   "checkpoint": str(decoders[j].checkpoint), "trained_offset": window.offset,
                   "n_images": len(p.images), "dropped_images": p.dropped_images,
                   "dropped_events": p.dropped_events, "metrics": {}}
            if not p.images:
                return row
            wanted = [m for m in names if len(p.images) > 1 or METRICS[m].family != "identification"]
            result = compute_metrics([images[(j, k, i)] for i in p.images], [gts[i] for i in p.images], wanted,
                                     device=resolve_device(cfg.device), batch_size=max(cfg.batch_size, 8),
                                     weights=cfg.metrics_weights, identification=cfg.identification, progress=False)
            for m in result["metrics"]:
                chance = result["chance"].get(m)
                low, high = bootstrap_interval(result["per_image"][m])
                row["metrics"][m] = {
                    "mean": result["means"][m], "ci95": [low, high],
                    "chance": chance if chance is not None else result["shuffled"].get(m),
                    "chance_kind": "exact" if chance is not None else "shuffled pairs",
                    "per_image": dict(zip(map(str, p.images), result["per_image"][m]))}
            return row

        out.mkdir(parents=True, exist_ok=True)
        (out / "timecourse.json").unlink(missing_ok=True)  # written last: present only for a finished sweep
        cells = {}
        for j, k in tests:
            cells[(j, k)] = measure(j, k)
            r = cells[(j, k)]
            logger.info("%s offset %+d (volumes t%+d .. t%+d): %d images%s",
                        "" if sliding else f"model of offset {decoders[j].window.offset:+d},", k, k,
                        k + decoders[j].window.n_trs - 1, r["n_images"],
                        "".join(f", {m} {v['mean']:.3f}" for m, v in r["metrics"].items()))
        rows = [cells[(0, k)] for k in diagonal] if sliding else [cells[(j, d.window.offset)]
                                                                 for j, d in enumerate(decoders)]
        metrics = [m for m in METRICS if any(m in r["metrics"] for r in rows)]
        window = decoders[0].window
        summary = {
            "run_id": rid, "mode": "sliding" if sliding else "per-offset models",
            "subject": nsd_cfg.subject, "averaged": nsd_cfg.averaged,
            "checkpoints": [str(d.checkpoint) for d in decoders],
            "checkpoint_digests": [d.cfg.checkpoint_digest for d in decoders], "data": str(nsd_cfg.nsddata_path),
            "data_digest": cfg.data_digest, "tr_s": TR, "n_trs": window.n_trs if sliding else
            [d.window.n_trs for d in decoders], "model_offset": window.offset if sliding else None,
            "model_window_source": [d.window.source for d in decoders], "n_images": n, "nsd_ids": data.nsd_ids[:n],
            "offsets": diagonal, "metrics": metrics,
            "higher_is_better": {m: METRICS[m].higher_is_better for m in metrics},
            "peak_offset": {m: peak(rows, m, METRICS[m].higher_is_better) for m in metrics},
            "rows": rows, "output_dir": str(out),
        }
        if generalization and not sliding:
            summary["generalization"] = {
                "train_offsets": diagonal, "test_offsets": diagonal,
                "n_images": [[cells[(j, k)]["n_images"] for k in diagonal] for j in range(len(decoders))],
                "means": {m: [[cells[(j, k)]["metrics"].get(m, {}).get("mean") for k in diagonal]
                              for j in range(len(decoders))] for m in metrics},
                "chance": {m: [[cells[(j, k)]["metrics"].get(m, {}).get("chance") for k in diagonal]
                               for j in range(len(decoders))] for m in metrics}}
            save_png(plot_generalization(summary), out / "generalization.png")
        write_text(out / "timecourse.csv", csv_table(summary))
        save_png(plot_timecourse(summary), out / "timecourse.png")
        column = {k: (0 if sliding else j) for j, k in enumerate(diagonal)}
        strips = {i: strip(gts[i], [images.get((column[k], k, i)) for k in diagonal]) for i in range(n)}
        for i, picture in strips.items():
            save_png(picture, out / "strips" / f"{i}.png")
        save_png(filmstrip(strips, summary), out / "filmstrip.png")
        write_text(out / "run.json", json.dumps({k: summary[k] for k in (
            "run_id", "mode", "subject", "averaged", "checkpoints", "checkpoint_digests", "data", "data_digest",
            "offsets", "n_trs", "n_images")}, indent=1))
        write_text(out / "timecourse.json", json.dumps(summary, indent=1))
    link = point_latest_link(out)
    if link is not None:
        summary = dict(summary, latest_link=str(link))
    return summary


def point_latest_link(out: Path) -> Path | None:
    """``timecourse_subjXX_{mode}`` -> the latest sweep's folder (atomically; a real folder there is left alone)."""
    from dynadiff.files import point_link

    link = out.with_name(out.name.rsplit("_", 1)[0])
    return point_link(link, out, f"{link} is not a link: left as it is; this time course is in {out}")


# ----------------------------------------------------------------------------- outputs


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
