"""The sweep: decode every (checkpoint, offset, image), measure each offset as eval.py measures its run, and write
the outputs (one run folder per sweep, ``timecourse.json`` written last)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import typing as tp
from pathlib import Path

import numpy as np

from dynadiff.data.preprocess import TR
from dynadiff.timecourse.figures import csv_table, filmstrip, plot_generalization, plot_timecourse, strip
from dynadiff.timecourse.offsets import ModelWindow, TimecourseError
from dynadiff.timecourse.stats import bootstrap_interval, peak
from dynadiff.timecourse.sweep_data import SweepData, generation_config, item_name, plan

if tp.TYPE_CHECKING:
    from dynadiff.config import EvalConfig

logger = logging.getLogger(__package__)


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
        gts = {i: data.image(i, GT_SIZE) for i in range(n)}

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
            # a BIDS source's windows are sampled in seconds (NSD's TR steps from the onset), not cut from volumes
            where = (f"volumes t{k:+d} .. t{k + decoders[j].window.n_trs - 1:+d}" if nsd_cfg.bids is None else
                     f"t{k * TR:+.1f} .. t{(k + decoders[j].window.n_trs - 1) * TR:+.1f} s")
            logger.info("%s offset %+d (%s): %d images%s",
                        "" if sliding else f"model of offset {decoders[j].window.offset:+d},", k, where,
                        r["n_images"], "".join(f", {m} {v['mean']:.3f}" for m, v in r["metrics"].items()))
        rows = [cells[(0, k)] for k in diagonal] if sliding else [cells[(j, d.window.offset)]
                                                                 for j, d in enumerate(decoders)]
        metrics = [m for m in METRICS if any(m in r["metrics"] for r in rows)]
        window = decoders[0].window
        summary = {
            "run_id": rid, "mode": "sliding" if sliding else "per-offset models",
            "subject": nsd_cfg.subject, "averaged": nsd_cfg.averaged,
            "checkpoints": [str(d.checkpoint) for d in decoders],
            "checkpoint_digests": [d.cfg.checkpoint_digest for d in decoders], "data": str(nsd_cfg.data_folder),
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
