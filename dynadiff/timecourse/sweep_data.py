"""The windows of a time course: eval.py's test samples cut at every offset from the cleaned runs (each loaded once),
which offsets each image can be decoded at, and their generation through the checkpoint's Decoder."""

from __future__ import annotations

import dataclasses
import logging
import typing as tp
from pathlib import Path

import numpy as np

if tp.TYPE_CHECKING:
    from dynadiff.config import EvalConfig, NsdDatasetConfig, SweepGenerationConfig

logger = logging.getLogger(__package__)


class SweepData:
    """eval.py's test samples, with every window of any offset cut from the cleaned runs (each loaded once)."""

    def __init__(self, nsd_cfg: "NsdDatasetConfig") -> None:
        from dynadiff.data import nsd
        from dynadiff.data.dataset import list_trials, select_samples

        self.cfg = nsd_cfg
        self.root = nsd_cfg.data_folder
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
        return RunSeriesConfig(nsddata_path=self.cfg.nsddata_path, bids=self.cfg.bids, infra=infra)

    def image(self, index: int, size: int) -> np.ndarray:
        """(size, size, 3) uint8: the stimulus of sample ``index``."""
        from dynadiff.data.dataset import image_paths, load_image

        return load_image(image_paths(self.cfg)(self.nsd_ids[index]), size)

    @property
    def n_voxels(self) -> int:
        return int(self._series[0].shape[0])

    def onset(self, trial) -> int | float:
        """The trial's onset: a volume (NSD), or seconds (a BIDS source, whose runs have their own TR)."""
        return self.items[trial.item].volumes[trial.row]

    def _times(self, offset: int, n_trs: int) -> np.ndarray:
        """A BIDS source's window at ``offset`` in seconds after the onset: NSD's volumes ``offset ..
        offset + n_trs - 1`` after it, at NSD's TR (as :func:`dynadiff.data.preprocess.window_times`)."""
        from dynadiff.data.preprocess import TR

        return (offset + np.arange(n_trs)) * TR

    def usable(self, index: int, offset: int, n_trs: int) -> list:
        """The repetitions of sample ``index`` whose window at ``offset`` lies within their run."""
        if self.cfg.bids is not None:
            from dynadiff.data.preprocess import sample_positions

            def inside(t) -> bool:
                pos = sample_positions([self.onset(t)], self._times(offset, n_trs), self.items[t.item].run.tr)
                return pos.min() >= 0 and pos.max() <= self._series[t.item].shape[1] - 1

            return [t for t in self.samples[index] if inside(t)]
        return [t for t in self.samples[index] if 0 <= self.onset(t) + offset and
                self.onset(t) + offset + n_trs <= self._series[t.item].shape[1]]

    def window(self, index: int, offset: int, n_trs: int) -> np.ndarray:
        """(voxels, n_trs) float32: the mean of the usable repetitions' windows (error if none is usable)."""
        trials = self.usable(index, offset, n_trs)
        if not trials:
            raise ValueError(f"sample {index} has no window within its run at offset {offset}")
        acc = np.zeros((self.n_voxels, n_trs), dtype=np.float64)
        for t in trials:
            if self.cfg.bids is not None:
                from dynadiff.data.preprocess import sample_windows

                acc += sample_windows(self._series[t.item], [self.onset(t)], self._times(offset, n_trs),
                                      self.items[t.item].run.tr)[0]
                continue
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
