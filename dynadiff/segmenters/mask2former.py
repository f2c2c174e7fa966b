"""Mask2Former (``facebook/mask2former-swin-large-coco-panoptic``, through transformers): an mIoU segmenter that
runs in this project's own environment.

    python -m dynadiff.segmenters.mask2former IN_DIR OUT_DIR [--weights DIR] [--device auto] [--batch-size 4]

**Not comparable with the paper's mIoU.** The paper segments with ViT-Adapter trained on COCO-Stuff (171
classes), in the separate Python 3.7 environment of ``setup_miou.sh``. This is another model, trained on COCO
panoptic's 133 categories (80 things, 53 stuff classes, several of them merges of COCO-Stuff's): other
predictions, another label set. Use it to compare runs with each other, never with published tables.

Contract (every segmenter's, :mod:`dynadiff.segmenters`): each ``IN_DIR/NAME.png`` (sorted; hidden names,
starting with ".", are skipped) gives ``OUT_DIR/NAME.png``, an 8-bit "L" map of the input's size holding the
model's label id per pixel (``config.json``'s ``id2label``: 0..132 for this checkpoint, see :func:`label_names`).
255 means "no class"; this segmenter never writes it, as every pixel gets its most likely class. Each map is
written to a temporary name, then renamed: a crash never leaves a half-written map. An existing
``OUT_DIR/NAME.png`` is replaced.

The map is transformers' semantic post-processing of Mask2Former (``post_process_semantic_segmentation``): the
mask logits resized bilinearly to the model's input size; per class, the sum over queries of the query's class
probability (softmax, the null class dropped) times its mask probability (sigmoid); resized bilinearly to the
image's own size; the most likely class. transformers resizes the mask logits to a fixed 384x384 ("the
preprocessed image size for all models", its comment says) and keeps the padding of the model's input; this resizes them to the
input's actual size and cuts the padding off, where there is any, before going to the image's size. For an
unpadded 384x384 input the two are the same computation. Images are batched only with images of the same size,
so no image is padded for another one and a map depends neither on ``--batch-size`` nor on the other images.
Inference is in float32 under ``no_grad``, with cuDNN's autotuning off: the same images give the same maps.

Weights are read from ``--weights`` only (default :func:`default_weights_dir`, where ``python prepare_weights.py
--only segmenter`` puts them); nothing is downloaded at run time. Exit status 2 for a usage or set-up mistake
(missing folder or weights, bad option), 1 for anything else (an unreadable image, damaged weights), 0 once
every map is written. Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
import typing as tp
from pathlib import Path

from dynadiff.cli import ConfigError, setup_logging
from dynadiff.device import check_device_name, resolve_device
from dynadiff.files import atomic_path
from dynadiff.metrics.config import MetricsWeightsConfig

if tp.TYPE_CHECKING:
    import numpy as np
    import torch

logger = logging.getLogger("dynadiff.segmenters.mask2former")  # its name under python -m too

REPO = "facebook/mask2former-swin-large-coco-panoptic"  # the Hub repository prepare_weights.py fetches
FOLDER_NAME = "mask2former-swin-large-coco-panoptic"  # its folder under the weights root
CONFIG_FILES = ("config.json", "preprocessor_config.json")  # read besides one copy of the weights
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # either; transformers prefers the first
NO_CLASS = 255  # the contract's "no class" value: label ids must stay below it
FETCH_COMMAND = "python prepare_weights.py --only segmenter"
LEGACY_LONGEST_EDGE = 1333  # transformers 4's default max_size, for a preprocessor_config.json with "size": N


class SegmentationError(RuntimeError):
    """A failure of the run itself (an unreadable image, damaged weights, a map that cannot be written): exit 1.
    Set-up and usage mistakes are :class:`~dynadiff.cli.ConfigError` (exit 2), raised before any work."""


# ----------------------------------------------------------------------------- weights


def default_weights_dir(weights_dir: Path | None = None) -> Path:
    """``{weights_dir}/mask2former-swin-large-coco-panoptic``, ``weights_dir`` defaulting to ``$DYNADIFF_WEIGHTS``,
    else ``./weights`` (the metrics' rule, ``metrics_weights.weights_dir``): where ``prepare_weights.py --only
    segmenter`` puts the checkpoint and where the segmenter reads it."""
    return MetricsWeightsConfig(weights_dir=weights_dir).resolved_weights_dir() / FOLDER_NAME


def fetch_command(folder: Path) -> str:
    """The command that fetches the checkpoint into ``folder``."""
    if os.path.abspath(folder) == os.path.abspath(default_weights_dir()):
        return FETCH_COMMAND
    return f"{FETCH_COMMAND} {shlex.quote(f'segmenter.path={folder}')}"


def check_weights(folder: Path) -> Path:
    """The weights file of the checkpoint folder ``folder``; :class:`ConfigError` naming the first missing file
    and the command that fetches it."""
    folder = Path(folder)
    how = f"fetch it with `{fetch_command(folder)}`, or give the folder that holds it (--weights DIR)"
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "not found"
        raise ConfigError(f"Mask2Former weights folder {folder} {what}: {how}")
    partial = any((folder / f".{name}.part").is_file() for name in CONFIG_FILES + WEIGHT_FILES)
    if partial:
        how += " (a download was interrupted there: the same command resumes it)"
    for name in CONFIG_FILES:
        if not (folder / name).is_file():
            raise ConfigError(f"Mask2Former weights: {folder / name} not found: {how}")
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(f"Mask2Former weights: no {' or '.join(WEIGHT_FILES)} in {folder}: {how}")


def label_names(weights: Path | None = None) -> dict[int, str]:
    """What the values of the maps mean: the model's label ids and names (``config.json``'s ``id2label``),
    checked to be 0..N-1 with N <= 255 (an 8-bit map, 255 kept for "no class"). Reads JSON only."""
    folder = Path(weights) if weights is not None else default_weights_dir()
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
        id2label = {int(k): str(v) for k, v in config["id2label"].items()}
        model_type = config.get("model_type")
    except FileNotFoundError:
        raise ConfigError(f"Mask2Former weights: {path} not found: fetch it with `{fetch_command(folder)}`") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SegmentationError(f"{path} is not a readable model configuration ({type(e).__name__}: {e}): fetch "
                                f"it again with `{fetch_command(folder)}`") from None
    if model_type != "mask2former":
        raise ConfigError(f"{path} describes a {model_type!r} model, not a Mask2Former one (model_type "
                          "'mask2former'): give the folder of a Mask2Former checkpoint (--weights DIR)")
    if sorted(id2label) != list(range(len(id2label))) or not id2label:
        raise SegmentationError(f"{path}: the label ids of id2label are not 0..N-1: fetch it again with "
                                f"`{fetch_command(folder)}`")
    if len(id2label) > NO_CLASS:
        raise ConfigError(f"{path}: the model has {len(id2label)} labels (ids 0..{len(id2label) - 1}), more than "
                          f"an 8-bit label map holds (ids 0..{NO_CLASS - 1}, {NO_CLASS} meaning no class): use a "
                          f"model of at most {NO_CLASS} labels")
    return dict(sorted(id2label.items()))


def processor_overrides(folder: Path) -> dict[str, tp.Any]:
    """Arguments that make transformers 5 read ``preprocessor_config.json`` as transformers 4 did: a bare
    ``"size": N`` meant the shortest edge N and the longest at most ``max_size`` (default 1333); transformers 5
    keeps the shortest edge only and cannot resize with it."""
    path = Path(folder) / "preprocessor_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SegmentationError(f"{path} is not readable JSON ({e}): fetch it again with "
                                f"`{fetch_command(Path(folder))}`") from None
    size = config.get("size") if isinstance(config, dict) else None
    if isinstance(size, int) and not isinstance(size, bool):
        longest = config.get("max_size") or LEGACY_LONGEST_EDGE
        logger.info("%s gives \"size\": %d: read as transformers 4 did, shortest edge %d, longest edge at most %d",
                    path, size, size, longest)
        return {"size": {"shortest_edge": size, "longest_edge": longest}}
    return {}


def load_model(weights: Path, device: str = "cpu"):
    """``(model, image processor)`` from the local checkpoint folder ``weights`` (nothing downloaded), the
    model in float32 and eval mode on ``device``. :class:`SegmentationError` (one line) for a file transformers
    cannot read or weights that leave some of the model's parameters unset."""
    import torch
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    weights = Path(weights)
    again = f"fetch it again with `{fetch_command(weights)}`"
    try:
        model, info = Mask2FormerForUniversalSegmentation.from_pretrained(
            weights, local_files_only=True, dtype=torch.float32, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 (transformers', safetensors', torch's errors: one line, not a traceback)
        raise SegmentationError(f"cannot load the Mask2Former model in {weights} ({_one_line(e)}): {again}") from None
    unset = sorted(info.get("missing_keys", ())) + sorted(str(k) for k in info.get("mismatched_keys", ()))
    if unset:
        raise SegmentationError(f"{check_weights(weights)} leaves {len(unset)} of the model's parameters unset (e.g. "
                                f"{unset[0]}): it is not this model's checkpoint; {again}")
    try:
        processor = AutoImageProcessor.from_pretrained(weights, local_files_only=True, **processor_overrides(weights))
    except SegmentationError:
        raise
    except Exception as e:  # noqa: BLE001 (as above)
        raise SegmentationError(f"cannot load the image processor of {weights} ({_one_line(e)}): {again}") from None
    return model.to(device).eval(), processor


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


# ----------------------------------------------------------------------------- maps


def semantic_maps(class_logits: torch.Tensor, mask_logits: torch.Tensor, input_size: tuple[int, int],
                  sizes: tp.Sequence[tuple[int, int]],
                  valid: tp.Sequence[tuple[int, int]] | None = None) -> list[torch.Tensor]:
    """Label maps from Mask2Former's outputs (pure: no I/O).

    ``class_logits``: (B, Q, C + 1), the last class being "no object"; ``mask_logits``: (B, Q, h, w), over the
    model's whole input, of size ``input_size`` (H, W); ``sizes``: each image's (height, width) to return;
    ``valid``: each image's (height, width) in that input before padding (None: no padding). Returns B maps
    (height, width) of class ids 0..C-1 (int64): the mask logits resized bilinearly to the input's size, the
    padding cut off, sum_q softmax(class)[q, c] * sigmoid(mask)[q] per class c, resized bilinearly to the image's
    size, argmax over c (every resize with align_corners=False). With ``input_size`` (384, 384) and no padding,
    this is transformers' ``post_process_semantic_segmentation``.
    """
    import torch
    import torch.nn.functional as F

    probs = class_logits.softmax(dim=-1)[..., :-1]  # (B, Q, C)
    maps = []
    for i, size in enumerate(sizes):  # one image at a time: (Q, H, W) floats at the input's size
        masks = F.interpolate(mask_logits[i : i + 1], size=tuple(input_size), mode="bilinear", align_corners=False)
        if valid is not None:
            masks = masks[..., : valid[i][0], : valid[i][1]]  # (1, Q, height in the input, width in the input)
        scores = torch.einsum("bqc,bqhw->bchw", probs[i : i + 1], masks.sigmoid())  # (1, C, ., .)
        scores = F.interpolate(scores, size=tuple(size), mode="bilinear", align_corners=False)  # (1, C, height, width)
        maps.append(scores[0].argmax(dim=0))
    return maps


def write_map(labels: np.ndarray, path: Path) -> None:
    """(H, W) uint8 label map -> 8-bit "L" PNG at ``path``, written to a hidden temporary name then renamed."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(labels).save(tmp, format="PNG")


# ----------------------------------------------------------------------------- folders


def list_images(in_dir: Path) -> list[Path]:
    """The ``NAME.png`` files of ``in_dir`` (hidden ones left out), sorted; :class:`ConfigError` if none."""
    in_dir = Path(in_dir)
    if not in_dir.is_dir():
        what = "is not a folder" if in_dir.exists() else "does not exist"
        raise ConfigError(f"input folder {in_dir} {what}")
    images = sorted(p for p in in_dir.iterdir() if p.suffix == ".png" and not p.name.startswith(".") and p.is_file())
    if not images:
        raise ConfigError(f"no .png image in {in_dir}: nothing to segment")
    return images


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header: an unreadable file stops the run before the model loads."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise SegmentationError(f"{path} is not a readable image ({_one_line(e)}): nothing was segmented") from None


def _load_rgb(path: Path, done: int, total: int):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise SegmentationError(f"cannot read {path} ({_one_line(e)}): {done} of the {total} maps were written "
                                "before it, each complete; replace or remove that image and run again") from None


def _batches(sizes: dict[Path, tuple[int, int]], batch_size: int) -> list[list[Path]]:
    """Batches of at most ``batch_size`` images of one size each (same size in, same size through the model: no
    padding), in the order of the images' first appearance."""
    groups: dict[tuple[int, int], list[Path]] = {}
    for path, size in sizes.items():
        groups.setdefault(size, []).append(path)
    return [paths[i : i + batch_size] for paths in groups.values() for i in range(0, len(paths), batch_size)]


@contextlib.contextmanager
def _deterministic() -> tp.Iterator[None]:
    """cuDNN without autotuning and with deterministic algorithms for the block (restored after)."""
    import torch

    cudnn = torch.backends.cudnn
    saved = cudnn.benchmark, cudnn.deterministic
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = saved


def segment_folder(in_dir: Path, out_dir: Path, weights: Path | None = None, device: str = "auto",
                   batch_size: int = 4, *, progress: bool = True) -> list[Path]:
    """Segment every ``in_dir/NAME.png`` (sorted) into ``out_dir/NAME.png`` (created if missing); returns the
    maps' paths in the images' order.

    ``weights``: the checkpoint folder (default :func:`default_weights_dir`); ``device``: auto, cpu, cuda,
    cuda:N; ``batch_size``: images per forward pass (of one size each). Raises :class:`ConfigError` for a usage
    or set-up mistake, before any work; :class:`SegmentationError` for a failure during the run (the maps
    written before it stay, each complete).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size must be a whole number >= 1, got {batch_size!r}")
    try:
        check_device_name(device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    images = list_images(in_dir)
    if out_dir.resolve() == in_dir.resolve():
        raise ConfigError(f"the output folder is the input folder ({in_dir}): the maps would replace the images; "
                          "give another OUT_DIR")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output folder {out_dir} is a file")
    weights = Path(weights) if weights is not None else default_weights_dir()
    check_weights(weights)
    labels = label_names(weights)
    sizes = {path: _image_size(path) for path in images}  # (width, height)
    device = resolve_device(device)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the output folder {out_dir} ({e.strerror or e})") from None

    import torch
    from tqdm import tqdm

    model, processor = load_model(weights, device)
    logger.info("segmenting %d image(s) of %s into %s: Mask2Former %s, %d labels, on %s", len(images), in_dir,
                out_dir, weights, len(labels), device)
    done = 0
    with torch.no_grad(), _deterministic(), tqdm(total=len(images), unit="image", desc="Mask2Former", file=sys.stderr,
                                                 disable=not progress) as bar:
        for batch in _batches(sizes, batch_size):
            pictures = [_load_rgb(path, done, len(images)) for path in batch]
            try:
                inputs = processor(images=pictures, return_tensors="pt")
                pixel_values = inputs["pixel_values"].to(device)  # (B, 3, H, W)
                pixel_mask = inputs.get("pixel_mask")  # (B, H, W), 1 on the image, 0 on padding
                outputs = model(pixel_values=pixel_values,
                                pixel_mask=pixel_mask.to(device) if pixel_mask is not None else None)
            except torch.cuda.OutOfMemoryError:
                raise SegmentationError(f"out of memory on {device} with --batch-size {batch_size}: {done} of the "
                                        f"{len(images)} maps were written, each complete; run again with a "
                                        "smaller --batch-size") from None
            except (RuntimeError, ValueError) as e:
                logger.debug("the failure:", exc_info=True)
                raise SegmentationError(f"Mask2Former failed on {', '.join(p.name for p in batch)} "
                                        f"({_one_line(e)}): {done} of the {len(images)} maps were written before, "
                                        "each complete (--verbose shows the traceback)") from None
            n_classes = outputs.class_queries_logits.shape[-1] - 1
            if n_classes != len(labels):
                raise SegmentationError(f"the model predicts {n_classes} classes but {weights / 'config.json'} "
                                        f"names {len(labels)}: fetch it again with `{fetch_command(weights)}`")
            valid = None
            if pixel_mask is not None:
                valid = [(int(m.any(dim=1).sum()), int(m.any(dim=0).sum())) for m in pixel_mask]
            maps = semantic_maps(outputs.class_queries_logits, outputs.masks_queries_logits,
                                 tuple(pixel_values.shape[-2:]), [sizes[path][::-1] for path in batch], valid)
            for path, label_map in zip(batch, maps):
                target = out_dir / path.name
                try:
                    write_map(label_map.to(torch.uint8).cpu().numpy(), target)
                except OSError as e:
                    raise SegmentationError(f"cannot write {target} ({e.strerror or e}): {done} of the "
                                            f"{len(images)} maps were written before it, each complete") from None
                done += 1
            bar.update(len(batch))
    logger.info("wrote %d label map(s) to %s", done, out_dir)
    return [out_dir / path.name for path in images]


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dynadiff.segmenters.mask2former", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_dir", type=Path, metavar="IN_DIR", help="folder of NAME.png images")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR",
                   help="folder of the NAME.png label maps (created if missing; same-named maps are replaced)")
    p.add_argument("--weights", type=Path, metavar="DIR",
                   help=f"checkpoint folder (config.json, preprocessor_config.json, {' or '.join(WEIGHT_FILES)}); "
                   f"default $DYNADIFF_WEIGHTS/{FOLDER_NAME}, else ./weights/{FOLDER_NAME}: where "
                   f"`{FETCH_COMMAND}` puts it")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=4, metavar="N",
                   help="images per forward pass (default 4); does not change the maps")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return p


def main(argv: tp.Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        segment_folder(args.in_dir, args.out_dir, args.weights, args.device, args.batch_size)
    except ConfigError as e:
        logger.error("%s", e)
        return 2
    except SegmentationError as e:
        logger.error("%s", e)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted: the maps written so far are complete, none is half-written; run the same "
                     "command again to segment everything")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
