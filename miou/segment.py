"""Segment images with ViT-Adapter (Mask2Former + BEiT-v2-L adapter, COCO-Stuff-164k): the mIoU segmenter.

This file runs INSIDE the separate environment ``setup_miou.sh`` builds (Python 3.7, torch 1.9.0+cu111,
mmcv-full 1.4.2, mmsegmentation 0.20.2, ViT-Adapter's code): it must stay Python 3.7, and it imports torch,
mmcv and mmseg only inside functions, so that ``--help`` and argument errors work anywhere.

Contract (miou/README.md)::

    segment.py IN_DIR OUT_DIR [--device cuda|cuda:N|cpu] [--config PATH] [--checkpoint PATH] [--vit-adapter DIR]

- reads every ``IN_DIR/NAME.png`` (sorted by name; other files are ignored) and writes ``OUT_DIR/NAME.png``
  (``OUT_DIR`` is created): an 8-bit single-channel ("L") label map of the input's width and height, each pixel
  the COCO-Stuff-164k class index 0..170 as mmsegmentation numbers them, 255 where the model gives no class
  (any value outside 0..170; the real model labels every pixel, so 255 does not occur with it);
- each map is written under a temporary name and renamed: a map under its final name is whole;
- exit status 0 once every map is written; otherwise one line ``segment.py: error: ...`` on stderr and status 1
  (2: bad command line, 130: interrupted); the maps written before the failure are whole, no other is there.

``--self-check`` imports everything, builds the model with its checkpoint and segments one small synthetic
image: the last step of ``setup_miou.sh``.

Paths: ``--vit-adapter``, else ``$MIOU_VIT_ADAPTER``, else ``ViT-Adapter/`` beside this file;
``--checkpoint``, else ``$MIOU_WEIGHTS/{MODEL}.pth``, else ``weights/{MODEL}.pth`` beside this file;
``--config``, else ViT-Adapter's ``segmentation/configs/coco_stuff164k/{MODEL}_ss.py``.
"""

import argparse
import logging
import os
import re
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = "mask2former_beitv2_adapter_large_896_80k_cocostuff164k"
CONFIG_IN_REPO = os.path.join("segmentation", "configs", "coco_stuff164k", MODEL + "_ss.py")
N_CLASSES = 171  # COCO-Stuff-164k in mmsegmentation: 80 thing + 91 stuff classes
NO_CLASS = 255
SETUP = "run ./setup_miou.sh in the dynadiff folder (it builds this environment; miou/README.md)"

logger = logging.getLogger("segment")


class SegmentError(Exception):
    """A failure reported as one line on stderr (exit status 1)."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="segment.py",
        description="Write an 8-bit label map (COCO-Stuff-164k class 0..170, 255: none) of every IN_DIR/NAME.png "
                    "to OUT_DIR/NAME.png, same size, with ViT-Adapter Mask2Former BEiT-v2-L (miou/README.md).")
    parser.add_argument("in_dir", nargs="?", help="folder of the .png images to segment")
    parser.add_argument("out_dir", nargs="?", help="folder the label maps go to (created)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda; ViT-Adapter's "
                        "deformable attention has no CPU kernel: on cpu the model builds but cannot segment)")
    parser.add_argument("--config", help=f"mmseg config (default: ViT-Adapter's {CONFIG_IN_REPO})")
    parser.add_argument("--checkpoint", help=f"weights (default: $MIOU_WEIGHTS/{MODEL}.pth, else weights/ beside "
                        "this file)")
    parser.add_argument("--vit-adapter", help="ViT-Adapter's code (default: $MIOU_VIT_ADAPTER, else ViT-Adapter/ "
                        "beside this file)")
    parser.add_argument("--self-check", action="store_true", help="import everything, build the model and "
                        "segment one synthetic image; no IN_DIR OUT_DIR")
    args = parser.parse_args(argv)
    if not re.match(r"^(cpu|cuda(:\d+)?)$", args.device):
        parser.error(f"--device must be cpu, cuda or cuda:N, not {args.device!r}")
    if args.self_check and (args.in_dir or args.out_dir):
        parser.error("--self-check takes no IN_DIR OUT_DIR")
    if not args.self_check and not (args.in_dir and args.out_dir):
        parser.error("IN_DIR and OUT_DIR are required (or --self-check)")
    return args


def model_paths(args):
    """(vit_adapter, config, checkpoint): the argument, else the environment variable, else the default."""
    vit_adapter = args.vit_adapter or os.environ.get("MIOU_VIT_ADAPTER") or os.path.join(HERE, "ViT-Adapter")
    weights = os.environ.get("MIOU_WEIGHTS") or os.path.join(HERE, "weights")
    checkpoint = args.checkpoint or os.path.join(weights, MODEL + ".pth")
    config = args.config or os.path.join(vit_adapter, CONFIG_IN_REPO)
    return os.path.abspath(vit_adapter), os.path.abspath(config), os.path.abspath(checkpoint)


def check_model_files(vit_adapter, config, checkpoint):
    if not os.path.isdir(os.path.join(vit_adapter, "segmentation", "mmseg_custom")):
        raise SegmentError(f"ViT-Adapter's code is not in {vit_adapter} (no segmentation/mmseg_custom): {SETUP}, "
                           "or give --vit-adapter")
    ops = os.path.join(vit_adapter, "segmentation", "ops")
    if not os.path.isdir(ops):
        raise SegmentError(f"{ops} is missing (the deformable-attention op's Python side, a link to "
                           f"../detection/ops): {SETUP}")
    if not os.path.isfile(config):
        raise SegmentError(f"config {config} not found: {SETUP}, or give --config")
    if not os.path.isfile(checkpoint) or os.path.getsize(checkpoint) == 0:
        raise SegmentError(f"checkpoint {checkpoint} not found (or empty): {SETUP}, or give --checkpoint")


def list_inputs(in_dir, out_dir):
    """Sorted names of the .png files of ``in_dir``; ``out_dir`` created."""
    if not os.path.isdir(in_dir):
        raise SegmentError(f"input folder {in_dir} does not exist")
    names = sorted(n for n in os.listdir(in_dir) if n.endswith(".png") and os.path.isfile(os.path.join(in_dir, n)))
    if not names:
        raise SegmentError(f"no .png image in {in_dir}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SegmentError(f"output folder {out_dir} is a file")
    if os.path.isdir(out_dir) and os.path.samefile(in_dir, out_dir):
        raise SegmentError(f"OUT_DIR is IN_DIR ({in_dir}): the label maps would replace the images")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise SegmentError(f"cannot create output folder {out_dir}: {e}")
    return names


def import_stack(vit_adapter):
    """(torch, mmcv.runner, mmseg.apis), with ViT-Adapter's modules registered in mmseg's registries."""
    import importlib

    # ViT-Adapter's segmentation code is not an installable package: its own scripts import mmseg_custom,
    # mmcv_custom and ops from the segmentation folder, their working directory. This puts that folder first.
    seg_dir = os.path.join(vit_adapter, "segmentation")
    if seg_dir not in sys.path:
        sys.path.insert(0, seg_dir)
    modules = {}
    # mmcv_custom: ViT-Adapter's checkpoint loading (BEiT); mmseg_custom: BEiTAdapter, the Mask2Former head,
    # EncoderDecoderMask2Former (it imports ops, hence the compiled MultiScaleDeformableAttention).
    for name in ("torch", "mmcv", "mmcv.runner", "mmseg", "mmseg.apis", "mmcv_custom", "mmseg_custom"):
        try:
            modules[name] = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001  ImportError, mmseg's assert on mmcv's version, a .so that fails to load
            raise SegmentError(f"cannot import {name} ({type(e).__name__}: {_first_line(e)}) with {sys.executable}: "
                               f"this must run in the segmentation environment; {SETUP}")
    return modules["torch"], modules["mmcv.runner"], modules["mmseg.apis"]


def check_device(torch, device):
    if device.startswith("cuda") and not torch.cuda.is_available():
        cuda = getattr(getattr(torch, "version", None), "cuda", None)
        raise SegmentError(f"--device {device}: CUDA is not available to torch {torch.__version__} (built for CUDA "
                           f"{cuda}): no GPU visible, or its driver too old; run on a GPU machine")


class _Warnings(logging.Handler):
    def __init__(self):
        logging.Handler.__init__(self, logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def build_model(runner, apis, config, checkpoint, device):
    """mmseg's segmentor from ``config`` with the weights of ``checkpoint``, on ``device``, in eval mode."""
    try:
        # As ViT-Adapter's image_demo.py: build without weights, then load them with mmcv (mmseg's own loading
        # also requires CLASSES and PALETTE in the checkpoint's meta, which label maps do not need).
        model = apis.init_segmentor(config, checkpoint=None, device=device)
    except Exception as e:  # noqa: BLE001  whatever the config or the build raises: one line
        raise SegmentError(f"cannot build the model of {config}: {type(e).__name__}: {_first_line(e)}")
    # mmcv reports the checkpoint's keys that do not match the model as one warning to this logger; a missing
    # key means weights the model needs are not in the file (another model's checkpoint): an error, not a warning.
    load_log = logging.getLogger("segment.checkpoint")
    load_log.propagate = False
    collected = _Warnings()
    load_log.addHandler(collected)
    try:
        runner.load_checkpoint(model, checkpoint, map_location="cpu", logger=load_log)
    except Exception as e:  # noqa: BLE001  a damaged or foreign file: one line
        raise SegmentError(f"cannot load checkpoint {checkpoint}: {type(e).__name__}: {_first_line(e)}")
    finally:
        load_log.removeHandler(collected)
    marker = "missing keys in source state_dict:"
    missing = [m for m in collected.messages if marker in m]
    if missing:
        keys = missing[0].split(marker, 1)[1].strip()
        raise SegmentError(f"checkpoint {checkpoint} lacks weights of the model of {config} (missing: "
                           f"{_shorten(keys, 200)}): is it {MODEL}.pth?")
    for message in collected.messages:
        logger.warning("checkpoint %s: %s", checkpoint, _shorten(" ".join(message.split()), 300))
    model.eval()
    return model


def n_classes_of(model):
    n = getattr(getattr(model, "decode_head", None), "num_classes", None)
    return n if isinstance(n, int) and n > 0 else N_CLASSES


def label_map(result, size, n_classes):
    """(H, W) uint8 map of ``inference_segmentor``'s result for an image of ``size`` (W, H); values outside
    0..n_classes-1 become 255."""
    import numpy as np

    pred = result[0] if isinstance(result, (list, tuple)) else result
    if hasattr(pred, "detach"):  # a torch tensor (other mmseg versions)
        pred = pred.detach().cpu().numpy()
    pred = np.asarray(pred)
    if pred.ndim == 3 and pred.shape[0] == 1:
        pred = pred[0]
    width, height = size
    if pred.shape != (height, width):
        raise SegmentError(f"the model returned a map of shape {tuple(pred.shape)} for a {width}x{height} image "
                           f"(expected ({height}, {width}))")
    if not np.issubdtype(pred.dtype, np.integer):
        if not np.all(np.isfinite(pred)) or not np.all(pred == np.round(pred)):
            raise SegmentError(f"the model returned labels that are not integers (dtype {pred.dtype})")
        pred = pred.astype(np.int64)
    valid = (pred >= 0) & (pred < n_classes)
    return np.where(valid, pred, NO_CLASS).astype(np.uint8)


def write_map(labels, path):
    """Write ``labels`` (H, W) uint8 as an "L" PNG at ``path``: a temporary file in the same folder, renamed."""
    from PIL import Image

    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(labels, mode="L").save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def segment_folder(model, apis, in_dir, out_dir, names, device):
    """Segment ``in_dir/NAME`` into ``out_dir/NAME`` for each of ``names``, in order."""
    from PIL import Image

    n_classes = n_classes_of(model)
    if n_classes > NO_CLASS:
        raise SegmentError(f"the model has {n_classes} classes: they do not fit an 8-bit map with 255 for none")
    for i, name in enumerate(names):
        src, dst = os.path.join(in_dir, name), os.path.join(out_dir, name)
        try:
            with Image.open(src) as im:
                size = im.size
        except Exception as e:  # noqa: BLE001  PIL raises several kinds for a damaged file
            raise SegmentError(f"cannot read image {src}: {_first_line(e)}")
        try:
            result = apis.inference_segmentor(model, src)  # mmcv reads the file: BGR, 3 channels, as mmseg expects
        except Exception as e:  # noqa: BLE001  the model's failure, whatever it is: one line naming the image
            hint = ""
            if device == "cpu" and "cpu" in str(e).lower():
                hint = " (ViT-Adapter's deformable attention has no CPU kernel: use --device cuda)"
            raise SegmentError(f"segmenting {src} failed: {type(e).__name__}: {_first_line(e)}{hint}")
        try:
            labels = label_map(result, size, n_classes)
        except SegmentError as e:
            raise SegmentError(f"{src}: {e}")
        try:
            write_map(labels, dst)
        except OSError as e:
            raise SegmentError(f"cannot write {dst}: {e}")
        if (i + 1) % 100 == 0 or i + 1 == len(names):
            logger.info("%d/%d label maps written to %s", i + 1, len(names), out_dir)


def self_check(args):
    """Build the model and segment a synthetic 72x40 image; print what was checked."""
    import numpy as np
    from PIL import Image

    vit_adapter, config, checkpoint = model_paths(args)
    check_model_files(vit_adapter, config, checkpoint)
    torch, runner, apis = import_stack(vit_adapter)
    mmcv_version = getattr(sys.modules.get("mmcv"), "__version__", "?")
    mmseg_version = getattr(sys.modules.get("mmseg"), "__version__", "?")
    print(f"imports: torch {torch.__version__}, mmcv {mmcv_version}, mmseg {mmseg_version}, "
          f"ViT-Adapter from {vit_adapter}")
    check_device(torch, args.device)
    model = build_model(runner, apis, config, checkpoint, args.device)
    print(f"model: {os.path.basename(config)} with {checkpoint} on {args.device}")
    work = tempfile.mkdtemp(prefix="segment-self-check-")
    try:
        in_dir, out_dir = os.path.join(work, "in"), os.path.join(work, "out")
        os.makedirs(in_dir)
        rows, cols = np.mgrid[0:40, 0:72]
        image = np.stack([rows * 6, cols * 3, (rows + cols) * 2], axis=-1).astype(np.uint8)
        Image.fromarray(image).save(os.path.join(in_dir, "check.png"))
        segment_folder(model, apis, in_dir, out_dir, list_inputs(in_dir, out_dir), args.device)
        with Image.open(os.path.join(out_dir, "check.png")) as out:
            if out.mode != "L" or out.size != (72, 40):
                raise SegmentError(f"self-check: the label map is {out.mode} {out.size}, not L (72, 40)")
            classes = sorted(set(np.asarray(out).ravel().tolist()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"segmentation: a 72x40 image gave a 72x40 label map of classes {_shorten(str(classes), 120)}")
    print("self-check passed")


def run(args):
    if args.self_check:
        self_check(args)
        return
    in_dir, out_dir = os.path.abspath(args.in_dir), os.path.abspath(args.out_dir)
    names = list_inputs(in_dir, out_dir)
    vit_adapter, config, checkpoint = model_paths(args)
    check_model_files(vit_adapter, config, checkpoint)
    torch, runner, apis = import_stack(vit_adapter)
    check_device(torch, args.device)
    model = build_model(runner, apis, config, checkpoint, args.device)
    logger.info("segmenting %d image(s) of %s on %s", len(names), in_dir, args.device)
    segment_folder(model, apis, in_dir, out_dir, names, args.device)


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _shorten(text, n):
    return text if len(text) <= n else text[:n - 3] + "..."


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="segment.py: %(message)s", stream=sys.stderr)
    try:
        run(args)
    except SegmentError as e:
        sys.stderr.write(f"segment.py: error: {e}\n")
        return 1
    except Exception as e:  # noqa: BLE001  a fault no check above foresaw: still one line, never a silent success
        sys.stderr.write(f"segment.py: error: {type(e).__name__}: {_first_line(e)}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("segment.py: interrupted; the label maps written are whole, the others are not there: "
                         "run the same command again\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
