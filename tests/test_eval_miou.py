"""eval.py --compute-miou with stand-in segmenters written here (the real ones: tests/miou/,
tests/test_segmenter_mask2former.py): the protocol end to end, its cache, and every way a segmenter can break it.

The stand-in is a colour quantiser, so the expected mIoU is computed here independently: the saved PNGs, the
reconstruction resized to 512 (PIL bicubic), each channel thresholded at 128, per-class boolean masks.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scripts import eval_here, generated, run_eval

from dynadiff.config import MiouConfig
from dynadiff.miou import SegmentationError, Segmenter, build_segmenter, check_segmenter, compute_miou, segment

N = 4
STAND_IN = r'''
import sys
from pathlib import Path

import numpy as np
from PIL import Image

args = sys.argv[1:]
mode = args.pop(0) if args and args[0].startswith("mode=") else "mode=ok"
in_dir, out_dir = Path(args[-2]), Path(args[-1])
names = sorted(p.name for p in in_dir.glob("*.png"))
with open(Path(__file__).with_suffix(".log"), "a") as log:
    log.write(f"{len(names)}\n")
if mode == "mode=fail":
    print("loading the model...", flush=True)
    print("RuntimeError: CUDA out of memory (stand-in)", file=sys.stderr)
    sys.exit(3)
for k, name in enumerate(names):
    rgb = np.asarray(Image.open(in_dir / name).convert("RGB"))
    label = ((rgb[..., 0] >= 128) * 4 + (rgb[..., 1] >= 128) * 2 + (rgb[..., 2] >= 128)).astype(np.uint8)
    if mode == "mode=fewer" and k > 0:
        break
    if mode == "mode=small":
        label = label[::2, ::2]
    if mode == "mode=16bit":
        Image.fromarray(label.astype(np.uint16) * 1000).save(out_dir / name)
        continue
    if mode == "mode=classes":
        label = label + 20
    Image.fromarray(label).save(out_dir / name)
'''


def quantised(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    return (rgb[..., 0] >= 128).astype(int) * 4 + (rgb[..., 1] >= 128) * 2 + (rgb[..., 2] >= 128)


def reference_iou(pred: np.ndarray, label: np.ndarray) -> float:
    ious = [((pred == c) & (label == c)).sum() / ((pred == c) | (label == c)).sum()
            for c in range(8) if (label == c).any()]
    return float(np.mean(ious))


@pytest.fixture(scope="module")
def setup(eval_setup):
    return eval_setup


@pytest.fixture
def stand_in(tmp_path):
    script = tmp_path / "quantise.py"
    script.write_text(STAND_IN)
    return script


def command(script: Path, mode: str = "ok") -> list[str]:
    return [sys.executable, str(script), f"mode={mode}"]


def calls(script: Path) -> list[int]:
    log = script.with_suffix(".log")
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def test_miou_end_to_end_cached_and_labelled(setup, tmp_path, stand_in, caplog, monkeypatch):
    """The first run in its own process, as a user runs it; the reruns, whose subject is the segmentation cache,
    in this one."""
    cache = tmp_path / "cache"
    seg = f"miou.segmenter={json.dumps(command(stand_in))}"
    proc = run_eval(setup, cache, "--limit", str(N), "--metrics", "pixcorr", "--compute-miou", seg, "miou.n_classes=8")
    assert proc.returncode == 0, proc.stderr
    out = cache / "reconstructions_subj01_unaveraged"  # the link to the latest run's folder
    result = json.loads((out / "metrics.json").read_text())
    miou = result["miou"]
    # independent: the saved files, quantised here
    labels = [quantised(Image.open(out / f"{i}_gt.png").convert("RGB")) for i in range(N)]
    preds = [quantised(Image.open(out / f"{i}.png").convert("RGB").resize((512, 512), Image.Resampling.BICUBIC))
             for i in range(N)]
    expected = [reference_iou(p, lab) for p, lab in zip(preds, labels)]
    np.testing.assert_allclose(miou["per_image"], expected, rtol=1e-12)
    assert miou["mean"] == pytest.approx(np.mean(expected), rel=1e-12)
    shuffled = [reference_iou(preds[i], labels[(i + 1) % N]) for i in range(N)]
    assert miou["shuffled"] == pytest.approx(np.mean(shuffled), rel=1e-12)
    assert miou["segmenter"]["command"] == command(stand_in) and miou["segmenter"]["n_classes"] == 8
    assert miou["segmenter"]["comparable_with_paper"] is False  # a command of one's own is not the paper's set-up
    table = (out / "metrics.md").read_text()
    assert f"| mIoU (ViT-Adapter, COCO-Stuff) | {miou['mean']:.4f} | {miou['shuffled']:.4f} (shuffled pairs) | ↑ |" in table
    assert "not comparable with the paper" in table and "| mIoU" in proc.stdout
    assert calls(stand_in) == [2 * N]  # one call, every image of the pairs (the images differ)

    # another run on the same images (other metrics: another run id) segments nothing again
    code, log = eval_here(setup, cache, "--limit", str(N), "--metrics", "pixcorr,ssim", "--compute-miou", seg,
                          "miou.n_classes=8", caplog=caplog, monkeypatch=monkeypatch)
    assert code == 0, log
    assert generated(log) == 0 and calls(stand_in) == [2 * N]
    assert json.loads((out / "metrics.json").read_text())["miou"]["per_image"] == miou["per_image"]
    # one more image: only its two images are segmented
    code, log = eval_here(setup, cache, "--limit", str(N + 1), "--metrics", "pixcorr", "--compute-miou", seg,
                          "miou.n_classes=8", caplog=caplog, monkeypatch=monkeypatch)
    assert code == 0, log
    assert calls(stand_in) == [2 * N, 2]


def test_failing_segmenter_writes_no_metrics(setup, tmp_path, stand_in, caplog, monkeypatch):
    cache = tmp_path / "cache"
    code, err = eval_here(setup, cache, "--limit", "2", "--metrics", "pixcorr", "--compute-miou",
                          f"miou.segmenter={json.dumps(command(stand_in, 'fail'))}", caplog=caplog,
                          monkeypatch=monkeypatch)
    assert code == 1
    assert "the segmenter failed (exit status 3)" in err
    assert "| RuntimeError: CUDA out of memory (stand-in)" in err and "| loading the model..." in err
    rerun = err.split("rerun it by hand to see everything: ")[1].splitlines()[0]
    assert rerun.startswith(f"{sys.executable} {stand_in} mode=fail ") and rerun.endswith("/out")
    in_dir = Path(rerun.split()[-2])
    assert len(list(in_dir.glob("*.png"))) == 4  # kept for the rerun by hand
    assert "No metrics were written" in err
    out = cache / "reconstructions_subj01_unaveraged"
    assert not (out / "metrics.json").exists() and not list(cache.glob("reconstructions_*/metrics.json"))


def test_missing_segmenter_is_one_line_before_any_work(setup, tmp_path, caplog, monkeypatch):
    cache = tmp_path / "cache"
    code, log = eval_here(setup, cache, "--limit", "2", "--compute-miou", "miou.segmenter=[/nonexistent/segment]",
                          caplog=caplog, monkeypatch=monkeypatch)
    assert code == 1
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "the segmenter program /nonexistent/segment is not there" in log, log
    assert len(errors) == 1 and "\n" not in errors[0].getMessage() and generated(log) == 0
    # the default, the paper's ViT-Adapter, without its environment: how to build it
    code, log = eval_here(setup, cache, "--limit", "2", "--compute-miou", caplog=caplog, monkeypatch=monkeypatch)
    assert code == 1 and "./setup_miou.sh" in log and generated(log) == 0


@pytest.mark.parametrize(("mode", "message"), [
    ("fewer", r"3 of 4 label map\(s\) break the contract .*3 missing"),
    ("small", r"4 of 4 .* e\.g\. .*\.png: 256x256, but its image is 512x512"),
    ("16bit", r"4 of 4 .*not an 8-bit label map \(PNG mode I;16"),
])
def test_maps_that_break_the_contract(tmp_path, stand_in, mode, message):
    seg = Segmenter("vit-adapter", tuple(command(stand_in, mode)), 8, default_command=False)
    images = [np.full((512, 512, 3), 60 * k, np.uint8) for k in range(4)]
    with pytest.raises(SegmentationError, match=message) as e:
        segment(images, seg, tmp_path / "cache")
    assert "Rerun it by hand: " in str(e.value)
    assert not list((tmp_path / "cache" / "segmentations" / seg.identity).glob("*.png"))  # nothing cached


def test_label_beyond_the_class_count(tmp_path, stand_in):
    seg = Segmenter("vit-adapter", tuple(command(stand_in, "classes")), 8, default_command=False)
    images = [np.full((512, 512, 3), 200, np.uint8)] * 2
    with pytest.raises(SegmentationError, match=r"class 27 found, but there are 8 classes .*miou\.n_classes"):
        compute_miou(images, images, seg, tmp_path / "cache")


def test_timeout(tmp_path):
    slow = tmp_path / "slow.py"
    slow.write_text("import time\ntime.sleep(30)\n")
    seg = Segmenter("vit-adapter", (sys.executable, str(slow)), 8, default_command=False)
    with pytest.raises(SegmentationError, match=r"longer than miou.timeout_s=0.5 s"):
        segment([np.zeros((512, 512, 3), np.uint8)], seg, tmp_path / "cache", timeout_s=0.5)


def test_default_segmenters(tmp_path):
    vit = build_segmenter(MiouConfig(), tmp_path, "cuda:1")
    assert vit.command[0].endswith("miou/env/bin/python") and vit.command[1].endswith("miou/segment.py")
    assert vit.device_args == ("--device", "cuda:1") and vit.n_classes == 172
    assert vit.describe()["comparable_with_paper"] is True
    m2f = build_segmenter(MiouConfig(model="mask2former"), tmp_path, "cpu")
    assert m2f.command == (sys.executable, "-m", "dynadiff.segmenters.mask2former", "--weights",
                           str(tmp_path / "mask2former-swin-large-coco-panoptic"))
    assert m2f.n_classes == 133 and m2f.describe()["comparable_with_paper"] is False
    with pytest.raises(SegmentationError, match=r"mask2former-swin-large-coco-panoptic is missing: fetch it with "
                                                r"`python prepare_weights.py --only segmenter`"):
        check_segmenter(m2f)
    folder = tmp_path / "mask2former-swin-large-coco-panoptic"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(SegmentationError, match=r"preprocessor_config.json not found: fetch it with"):
        check_segmenter(m2f)  # each file the segmenter needs, before any work
    # new weights, new cache
    before = m2f.identity
    (folder / "config.json").write_text('{"other": 1}')
    assert m2f.identity != before


def test_mask2former_in_this_environment_through_eval(setup, tmp_path):
    """miou.model=mask2former on tiny random weights (the real layout): the protocol end to end, labelled as not
    comparable; the scores are those of the cached label maps, recomputed here."""
    from dynadiff.miou import image_key
    from dynadiff.models.tiny import write_tiny_mask2former

    weights = write_tiny_mask2former(tmp_path / "m2f", n_labels=7)
    cache = tmp_path / "cache"
    proc = run_eval(setup, cache, "--limit", "3", "--metrics", "pixcorr", "--compute-miou", "miou.model=mask2former",
                    f"miou.weights={weights}")
    assert proc.returncode == 0, proc.stderr
    out = cache / "reconstructions_subj01_unaveraged"
    miou = json.loads((out / "metrics.json").read_text())["miou"]
    seg = miou["segmenter"]
    assert seg["model"] == "mask2former" and seg["comparable_with_paper"] is False and seg["n_classes"] == 133
    assert seg["command"][1:4] == ["-m", "dynadiff.segmenters.mask2former", "--weights"]
    table = (out / "metrics.md").read_text()
    assert "| mIoU (Mask2Former Swin-L, COCO panoptic: not the paper's) |" in table
    assert "NOT comparable with the paper's ViT-Adapter mIoU" in table
    store = cache / "segmentations" / seg["cache_id"]
    gts = [np.asarray(Image.open(out / f"{i}_gt.png").convert("RGB")) for i in range(3)]
    recs = [np.asarray(Image.open(out / f"{i}.png").convert("RGB").resize((512, 512), Image.Resampling.BICUBIC))
            for i in range(3)]
    labels = [np.asarray(Image.open(store / f"{image_key(g)}.png")) for g in gts]
    preds = [np.asarray(Image.open(store / f"{image_key(r)}.png")) for r in recs]
    assert all(m.shape == (512, 512) and m.dtype == np.uint8 and m.max() < 7 for m in labels + preds)
    expected = [reference_iou(p, lab) for p, lab in zip(preds, labels)]
    np.testing.assert_allclose(miou["per_image"], expected, rtol=1e-12)
