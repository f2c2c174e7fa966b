"""mIoU through a segmenter command (``eval.py --compute-miou``; docs/miou.md).

The segmenter is a program with a small contract (miou/README.md): ``SEGMENTER
IN_DIR OUT_DIR`` reads every ``IN_DIR/NAME.png`` and writes ``OUT_DIR/NAME.png``,
an 8-bit label map of the same size (class index per pixel, 255: no class). It
runs as a subprocess, so it can live in another environment (the paper's
ViT-Adapter needs Python 3.7 and CUDA 11.1: ``setup_miou.sh``) or in this one
(``dynadiff.segmenters.mask2former``).

1. both images of each pair, at 512x512 (a reconstruction of another size is
   resized, bicubic), are looked up in the segmentation cache
   ``{cache}/segmentations/{segmenter id}/{image digest}.png``: a rerun, or
   another run with the same images, segments nothing again;
2. the missing ones are written to a fresh ``pending-*`` folder and segmented in
   one call; the exit status is checked, then that every map exists, is 8-bit
   and has its image's size. A failure raises :class:`SegmentationError` with
   the segmenter's last lines and the command to rerun by hand (the folder is
   kept for that);
3. the maps are moved into the cache, read back as they are (never resized)
   and scored by :mod:`dynadiff.metrics.miou`, with the same score on
   mismatched pairs (reconstruction i against ground truth i+1) as chance level.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import typing as tp
from pathlib import Path

import numpy as np

from dynadiff.config import MiouConfig
from dynadiff.segmenters.mask2former import default_weights_dir

logger = logging.getLogger(__name__)

SIZE = 512  # both images of a pair are segmented at 512x512, as the original
REPO_ROOT = Path(__file__).resolve().parents[1]
VIT_ADAPTER_MODEL = "mask2former_beitv2_adapter_large_896_80k_cocostuff164k"  # miou/segment.py's checkpoint name


class SegmentationError(RuntimeError):
    """The segmenter cannot run, failed, or wrote label maps that break the contract."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    n_classes: int
    comparable_with_paper: bool
    label: str  # how tables name it
    description: str
    how_to_get: str


MODELS: dict[str, ModelInfo] = {
    "vit-adapter": ModelInfo(
        172, True, "ViT-Adapter, COCO-Stuff",
        "ViT-Adapter Mask2Former BEiT-v2-L trained on COCO-Stuff-164k (the paper's segmenter; 172 label bins)",
        "build its environment with ./setup_miou.sh (see miou/README.md)"),
    "mask2former": ModelInfo(
        133, False, "Mask2Former Swin-L, COCO panoptic: not the paper's",
        "Mask2Former Swin-L trained on COCO panoptic (133 classes), run in this environment: NOT comparable with "
        "the paper's ViT-Adapter mIoU (another model, another label set)",
        "fetch it with `python prepare_weights.py --only segmenter`"),
}


@dataclasses.dataclass(frozen=True)
class Segmenter:
    """A resolved segmenter: the command (``IN_DIR OUT_DIR`` are appended), its model and label count."""

    model: str
    command: tuple[str, ...]
    n_classes: int
    default_command: bool  # the model's own command, not one given in miou.segmenter
    device_args: tuple[str, ...] = ()  # appended to a default command; not part of the cache identity
    weights: tuple[str, ...] = ()  # files the command reads without naming them (part of the cache identity)

    @property
    def info(self) -> ModelInfo:
        return MODELS[self.model]

    @property
    def identity(self) -> str:
        """16 hex digits naming the segmentation cache: model, label count, command and the files it names (size
        and modification time of each path argument, a folder's files included): new weights, new cache."""
        from dynadiff.files import stamp_digest  # names, sizes and times of a file or folder's files

        files = {arg: stamp_digest(Path(arg)) for arg in (*self.command, *self.weights) if arg and Path(arg).exists()}
        return hashlib.sha1(json.dumps([self.model, self.n_classes, list(self.command), files]).encode()).hexdigest()[:16]

    def full_command(self, in_dir: Path, out_dir: Path) -> list[str]:
        return [*self.command, *self.device_args, str(in_dir), str(out_dir)]

    def describe(self) -> dict:
        """What metrics.json records of it."""
        return {"model": self.model, "description": self.info.description,
                "comparable_with_paper": self.info.comparable_with_paper and self.default_command,
                "command": list(self.command), "n_classes": self.n_classes, "cache_id": self.identity}


def mask2former_weights(cfg: MiouConfig, weights_dir: Path) -> Path:
    """The mask2former folder: ``miou.weights``, else ``{weights_dir}/mask2former-swin-large-coco-panoptic``."""
    return Path(cfg.weights).expanduser() if cfg.weights is not None else default_weights_dir(weights_dir)


def build_segmenter(cfg: MiouConfig, weights_dir: Path, device: str = "cpu") -> Segmenter:
    """The segmenter ``cfg`` names, with ``device`` (resolved: cpu, cuda, cuda:N) for a default command."""
    info = MODELS[cfg.model]
    n_classes = cfg.n_classes or info.n_classes
    if cfg.segmenter is not None:
        return Segmenter(cfg.model, tuple(cfg.segmenter), n_classes, default_command=False)
    if cfg.model == "vit-adapter":
        miou = REPO_ROOT / "miou"
        env = Path(os.environ.get("MIOU_ENV") or miou / "env")  # setup_miou.sh --prefix / $MIOU_ENV
        command = (str(env / "bin" / "python"), str(miou / "segment.py"))
        weights = Path(os.environ.get("MIOU_WEIGHTS") or miou / "weights") / f"{VIT_ADAPTER_MODEL}.pth"
        # segment.py takes cuda, cuda:N or cpu (its default: cuda); "auto" (a cluster node's device) leaves it
        device_args = () if device == "auto" else ("--device", device)
        return Segmenter(cfg.model, command, n_classes, True, device_args, weights=(str(weights),))
    command = (sys.executable, "-m", "dynadiff.segmenters.mask2former", "--weights",
               str(mask2former_weights(cfg, weights_dir)))
    return Segmenter(cfg.model, command, n_classes, default_command=True, device_args=("--device", device))


def check_segmenter(seg: Segmenter) -> None:
    """Before any work: the program exists (and, for a default command, its script or weights): a
    :class:`SegmentationError` naming what is missing and how to get it otherwise."""
    program = seg.command[0]
    found = shutil.which(program) if os.sep not in program else (program if os.access(program, os.X_OK) else None)
    how = seg.info.how_to_get if seg.default_command else "check miou.segmenter (see miou/README.md)"
    if found is None:
        raise SegmentationError(f"--compute-miou: the segmenter program {program} is not there (or not executable): "
                                f"{how}")
    if seg.default_command:
        missing = [a for a in (*seg.command[1:], *seg.weights) if os.sep in a and not Path(a).exists()]
        if missing:
            raise SegmentationError(f"--compute-miou: {missing[0]} is missing: {how}")
        if seg.model == "mask2former":  # each file of the folder, as the segmenter will want it
            from dynadiff.cli import ConfigError
            from dynadiff.segmenters.mask2former import check_weights

            try:
                check_weights(Path(seg.command[seg.command.index("--weights") + 1]))
            except ConfigError as e:
                raise SegmentationError(f"--compute-miou: {e}") from None


def image_key(image: np.ndarray) -> str:
    """Digest of an image's pixels (shape included): its name in the segmentation cache."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    return hashlib.sha1(repr(image.shape).encode() + image.tobytes()).hexdigest()


def at_size(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """(size, size, 3) uint8: the image as it is, or resized (PIL bicubic) when its size differs."""
    image = np.asarray(image, dtype=np.uint8)
    if image.shape[:2] == (size, size):
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).convert("RGB").resize((size, size), Image.Resampling.BICUBIC))


def _map_problem(path: Path, shape: tuple[int, int]) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode, size = im.mode, im.size
            im.load()
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as e:
        return f"not a readable image ({e})"
    if mode not in ("L", "P"):
        return f"not an 8-bit label map (PNG mode {mode}; expected L)"
    if (size[1], size[0]) != shape:
        return f"{size[0]}x{size[1]}, but its image is {shape[1]}x{shape[0]}"
    return None


def _run(seg: Segmenter, in_dir: Path, out_dir: Path, log_path: Path, timeout_s: float | None) -> None:
    """Run the segmenter; its output goes to the log (and to stderr, so its progress shows); a failure raises."""
    command = seg.full_command(in_dir, out_dir)
    rerun = f"rerun it by hand to see everything: {shlex.join(command)}"
    logger.info("segmenting %d image(s): %s", len(list(in_dir.iterdir())), shlex.join(command))
    tail: collections.deque[str] = collections.deque(maxlen=15)

    def forward(stream: tp.TextIO, log: tp.TextIO) -> None:
        for line in stream:
            log.write(line)
            sys.stderr.write(line)
            tail.append(line.rstrip("\n"))

    try:
        with open(log_path, "w") as log, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                          stdin=subprocess.DEVNULL, text=True, errors="replace") as proc:
            reader = threading.Thread(target=forward, args=(proc.stdout, log), daemon=True)
            reader.start()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise SegmentationError(f"the segmenter ran longer than miou.timeout_s={timeout_s:g} s and was "
                                        f"stopped; {rerun}") from None
            except BaseException:  # Ctrl-C: the segmenter does not outlive eval.py
                proc.kill()
                raise
            finally:
                reader.join(timeout=10)
    except OSError as e:  # the program could not be started
        raise SegmentationError(f"the segmenter could not be started ({e}); {rerun}") from None
    if proc.returncode != 0:
        last = "\n".join(f"  | {line}" for line in tail) or "  | (it printed nothing)"
        raise SegmentationError(f"the segmenter failed (exit status {proc.returncode}); its last lines:\n{last}\n"
                                f"{rerun}\n(full output: {log_path})")


def segment(images: tp.Sequence[np.ndarray], seg: Segmenter, cache: Path,
            timeout_s: float | None = None) -> list[np.ndarray]:
    """(H, W) uint8 label map of each (H, W, 3) uint8 image, in order: from the cache, or segmented (once per
    distinct image) and cached."""
    from PIL import Image

    store = Path(cache) / "segmentations" / seg.identity
    store.mkdir(parents=True, exist_ok=True)
    keys = [image_key(im) for im in images]
    todo = {k: im for k, im in zip(keys, images) if not (store / f"{k}.png").is_file()}
    logger.info("mIoU: %d of %d distinct image(s) already segmented (%s)", len(set(keys)) - len(todo), len(set(keys)),
                store)
    if todo:
        work = Path(tempfile.mkdtemp(prefix="pending-", dir=store))  # kept on failure, for the rerun by hand
        in_dir, out_dir = work / "in", work / "out"
        in_dir.mkdir()
        out_dir.mkdir()
        for k, im in todo.items():
            Image.fromarray(np.asarray(im, dtype=np.uint8)).save(in_dir / f"{k}.png")
        (store / "segmenter.json").write_text(json.dumps(seg.describe(), indent=1))
        _run(seg, in_dir, out_dir, work / "segmenter.log", timeout_s)
        problems = {k: p for k in todo if (p := _map_problem(out_dir / f"{k}.png", np.shape(todo[k])[:2]))}
        if problems:
            kinds = collections.Counter(p if p == "missing" else p.split(" (")[0].split(",")[0] for p in problems.values())
            first = next(iter(problems))
            raise SegmentationError(
                f"the segmenter exited normally but {len(problems)} of {len(todo)} label map(s) break the contract "
                f"(OUT_DIR/NAME.png for each IN_DIR/NAME.png, 8-bit, the image's size): "
                f"{', '.join(f'{n} {kind}' for kind, n in kinds.items())}; e.g. {out_dir / (first + '.png')}: "
                f"{problems[first]}. Rerun it by hand: {shlex.join(seg.full_command(in_dir, out_dir))}")
        for k in todo:
            os.replace(out_dir / f"{k}.png", store / f"{k}.png")
        shutil.rmtree(work, ignore_errors=True)
    maps = {}
    for k in dict.fromkeys(keys):
        with Image.open(store / f"{k}.png") as im:
            maps[k] = np.asarray(im)  # "L" or "P": the stored index, as it is (no resampling ever)
    return [maps[k] for k in keys]


def compute_miou(reconstructions: tp.Sequence[np.ndarray], ground_truths: tp.Sequence[np.ndarray], seg: Segmenter,
                 cache: Path, timeout_s: float | None = None) -> dict:
    """``{"mean", "per_image", "unscored", "shuffled", "segmenter"}`` of the pairs (each image at 512x512)."""
    from dynadiff.metrics.miou import mean_iou

    n = len(reconstructions)
    if n != len(ground_truths) or n == 0:
        raise ValueError(f"mIoU needs pairs: {n} reconstruction(s), {len(ground_truths)} ground truth(s)")
    maps = segment([at_size(im) for im in [*ground_truths, *reconstructions]], seg, cache, timeout_s)
    labels, preds = maps[:n], maps[n:]
    try:
        score = mean_iou(preds, labels, seg.n_classes)
        shuffled = mean_iou(preds, labels[1:] + labels[:1], seg.n_classes)["mean"] if n > 1 else None
    except ValueError as e:  # a class index beyond the model's label count
        raise SegmentationError(f"the segmenter's label maps do not fit the {seg.model} model's {seg.n_classes} "
                                f"classes: {e} (set miou.n_classes if it is another model)") from None
    if score["unscored"]:
        logger.warning("mIoU: %d ground truth(s) have no class at all in their segmentation (all 255): left out of "
                       "the mean", score["unscored"])
    return {**score, "shuffled": shuffled, "segmenter": seg.describe()}
