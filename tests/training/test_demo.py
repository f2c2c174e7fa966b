"""demo.py end to end in its fast mode: synthetic NSD -> tiny VD -> train.py loop -> eval.py pipeline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scripts import load_script

REPO = Path(__file__).resolve().parents[2]


def _script(name: str):
    return load_script(name)


@pytest.fixture(scope="module")
def fast_demo(tmp_path_factory):
    """demo.py --fast, run once: (its output folder, what it printed)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("fast_demo") / "demo"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert _script("demo").main(["--fast", "--generalization", "--output", str(out)]) == 0
    return out, stdout.getvalue()


def test_fast_demo_trains_a_checkpoint_that_eval_loads(fast_demo):
    from dynadiff.checkpoint import load_checkpoint, read_metadata
    from dynadiff.models import vd

    out, printed = fast_demo
    report = json.loads((out / "demo_results.json").read_text())
    trained, untrained = report["trained"], report["untrained"]
    ckpt = Path(report["train_summary"]["best_checkpoint"])
    assert ckpt == out / "train" / "checkpoints" / "best" / "model.safetensors" and ckpt.is_file()
    # eval.py's pipeline ran on that checkpoint and on the untrained one, over the held-out test images
    assert trained["checkpoint"] == str(ckpt) and untrained["checkpoint"] == str(out / "untrained" / "model.safetensors")
    eval_dir = Path(trained["output_dir"])
    assert (eval_dir / "metrics.json").is_file() and (eval_dir / "overview.png").is_file()
    assert json.loads((eval_dir / "metrics.json").read_text())["means"] == trained["means"]
    assert trained["n_images"] == 4 and set(trained["means"]) == {"pixcorr", "ssim"}
    assert 0.0 <= trained["pixel_identification"] <= 1.0
    assert "| PixCorr |" in printed and "2-way identification, pixels" in printed
    assert f"Overview (ground truth above reconstruction): {eval_dir / 'overview.png'}" in printed
    # then the trained decoder's time course (timecourse.py's pipeline): its peak and pictures are printed
    tc = report["timecourse"]
    tc_dir = Path(tc["output_dir"])
    saved = json.loads((tc_dir / "timecourse.json").read_text())
    assert tc["offsets"] == saved["offsets"] == [2, 3, 4] and saved["checkpoints"] == [str(ckpt)]
    assert saved["model_offset"] == 3 and saved["n_images"] == 2
    curve = {r["offset"]: r["metrics"]["pixcorr"]["mean"] for r in saved["rows"]}
    assert tc["peak_offset"]["pixcorr"] == max(curve, key=curve.get)
    assert f"Peak at offset {tc['peak_offset']['pixcorr']:+d}" in printed
    assert f"Time course plot: {tc_dir / 'timecourse.png'}" in printed and (tc_dir / "timecourse.png").is_file()
    # --generalization: one decoder per offset (1-TR windows), each tested at every offset
    g = report["generalization"]
    g_dir = Path(g["output_dir"])
    saved = json.loads((g_dir / "timecourse.json").read_text())
    assert g["offsets"] == saved["offsets"] == [-1, 1] and saved["n_trs"] == [1, 1]  # a negative --window too
    assert g["pixcorr"] == saved["generalization"]["means"]["pixcorr"]
    best = np.unravel_index(np.argmax(g["pixcorr"]), (2, 2))
    assert (g["best_train_offset"], g["best_test_offset"]) == (g["offsets"][best[0]], g["offsets"][best[1]])
    assert f"Generalisation matrix: {g_dir / 'generalization.png'}" in printed and (g_dir / "generalization.png").is_file()
    # the tiny VD is in VD's layout, its VAE's scaling factor set from the pre-trained latents
    vd_dir = out / "versatile_diffusion"
    assert vd.check_vd_folder(vd_dir) == vd_dir
    assert vd.load_vae(vd_dir).config.scaling_factor != pytest.approx(0.18215)
    # the checkpoint loads completely into a model built as eval.py builds it
    meta = read_metadata(ckpt)
    cfg = json.loads(meta["train_config"])
    from dynadiff.config import TrainConfig

    train_cfg = TrainConfig.model_validate(cfg)
    model = train_cfg.versatilediffusion_config.build(train_cfg.brain_modules_config, n_voxels=int(meta["n_voxels"]))
    before = {k: v.clone() for k, v in model.brain_module.state_dict().items()}
    report_load = load_checkpoint(model, ckpt)
    assert report_load.ok and not report_load.unexpected
    assert any(not torch.equal(before[k], v) for k, v in model.brain_module.state_dict().items())


def test_second_run_refuses_a_foreign_folder(tmp_path):
    from dynadiff.demo import FAST, run_demo

    (tmp_path / "mine.txt").write_text("not the demo's")
    with pytest.raises(FileExistsError, match="not made by the demo"):
        run_demo(tmp_path, FAST)
    assert (tmp_path / "mine.txt").exists()


def test_pixel_identification_of_the_demo_reads_eval_outputs(tmp_path):
    from PIL import Image

    from dynadiff.demo import pixel_identification_from_folder

    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(4)]
    for i, g in enumerate(gts):
        Image.fromarray(g).save(tmp_path / f"{i}_gt.png")
        Image.fromarray(gts[(i + 1) % 4] if i == 3 else g).save(tmp_path / f"{i}.png")  # 3 right, 1 wrong
    score = pixel_identification_from_folder(tmp_path, 4, "per_ground_truth")
    assert 0.5 < score < 1.0


def test_the_printed_eval_command_reevaluates_the_demo_checkpoint(fast_demo, tmp_path):
    """demo.py prints the eval.py command of its trained decoder's evaluation: pasted as is, from another
    directory, it runs, finds every image cached and reports the demo's metrics for the demo's folder."""
    import shlex
    import subprocess

    from scripts import generated

    out, printed = fast_demo
    command = printed.split("Re-evaluate the trained decoder")[1].splitlines()[1].strip()
    report = json.loads((out / "demo_results.json").read_text())
    assert command == report["eval_command"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(shlex.split(command), cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert generated(proc.stderr) == 0
    trained = report["trained"]
    assert f"Reconstructions and metrics of run {trained['run_id']}: {trained['output_dir']}" in proc.stdout
    assert f"| PixCorr | {trained['means']['pixcorr']:.4f} |" in proc.stdout
    assert not list(elsewhere.iterdir())  # nothing written where it was pasted


def test_ctrl_c_is_one_line(tmp_path):
    import signal
    import sys
    import time

    from scripts import started

    out = tmp_path / "demo"
    with started([sys.executable, str(REPO / "demo.py"), "--fast", "--output", str(out)], dict(os.environ)) as proc:
        deadline = time.time() + 120
        while not (out / "nsddata" / "synthetic.json").exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"interrupted: {out} is incomplete; run the same command again" in err


def _readme_python_block() -> str:
    """The first ``python`` code block of the README's "From Python" section, as written."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_from_python_block_runs_as_written_after_the_demo(fast_demo, tmp_path):
    """The README's From Python block, run as written in a fresh Python where the demo ran (its folder named
    demo_output), saves a decoded image; and the Decoder gives the pixels eval.py wrote for the same checkpoint,
    windows and sampler settings."""
    import subprocess
    import sys

    from PIL import Image

    from dynadiff import Decoder

    out, _ = fast_demo
    (tmp_path / "demo_output").symlink_to(out, target_is_directory=True)
    proc = subprocess.run([sys.executable, "-c", _readme_python_block()], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    decoded = np.asarray(Image.open(tmp_path / "decoded.png"))
    assert decoded.shape == (32, 32, 3) and decoded.dtype == np.uint8 and decoded.std() > 0

    report = json.loads((out / "demo_results.json").read_text())
    trained = report["trained"]
    decoder = Decoder.from_checkpoint(trained["checkpoint"], vd_dir=out / "versatile_diffusion", device="cpu")
    test = decoder.test_data()  # eval.py's samples: one repetition per image (seed 3), in its order
    n = trained["n_images"]
    images = decoder([test.brain(i) for i in range(n)], steps=2)  # the demo evaluates with 2 steps, batches of 4
    for i, image in enumerate(images):
        np.testing.assert_array_equal(image, np.asarray(Image.open(Path(trained["output_dir"]) / f"{i}.png")))


def test_fast_demo_on_bids_at_tr_2_trains_evaluates_and_slides_through_the_bids_source(tmp_path):
    """demo.py --fast --bids --tr 2: train.py, eval.py and timecourse.py on the synthetic data written as BIDS
    at TR 2 s; the checkpoint records the BIDS source, and the evaluation's ground truths are the BIDS stimuli
    of the test images the decoder's own test data names."""
    import contextlib
    import io

    from PIL import Image

    from dynadiff.config import BidsSource
    from dynadiff.data import bids
    from dynadiff.data.dataset import load_image
    from dynadiff.decoder import Decoder
    from dynadiff.evaluation import GT_SIZE

    out = tmp_path / "demo"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert _script("demo").main(["--fast", "--bids", "--tr", "2", "--output", str(out)]) == 0
    assert "Data: synthetic BIDS, TR 2 s." in printed.getvalue()
    report = json.loads((out / "demo_results.json").read_text())
    ckpt = Path(report["train_summary"]["best_checkpoint"])
    decoder = Decoder.from_checkpoint(ckpt, vd_dir=out / "versatile_diffusion", device="cpu")
    source = decoder.checkpoint.data_config["bids"]
    assert Path(source["root"]) == out / "bids" and Path(source["derivatives"]) == out / "bids/derivatives/fmriprep"
    test = decoder.test_data(averaged=True)  # the BIDS test images of session 1 (FAST: 6)
    names = bids.image_names(BidsSource(root=out / "bids"))
    listed = (out / "bids/code/test_images.txt").read_text().split()
    assert len(test) == 6 and {names[i - 1] for i in test.nsd_ids} == set(listed)
    eval_dir = Path(report["trained"]["output_dir"])
    assert report["trained"]["n_images"] == 4
    for i in range(4):
        expected = load_image(out / "bids/stimuli" / names[test.nsd_ids[i] - 1], GT_SIZE)
        assert np.array_equal(np.asarray(Image.open(eval_dir / f"{i}_gt.png").convert("RGB")), expected)
    saved = json.loads((Path(report["timecourse"]["output_dir"]) / "timecourse.json").read_text())
    assert saved["offsets"] == [2, 3, 4] and saved["n_images"] == 2 and len(saved["rows"]) == 3
    assert saved["data"] == str(out / "bids")
    # the eval.py command training prints reads the same BIDS source
    import shlex

    eval_script = _script("eval")
    command = shlex.split(report["train_summary"]["eval_command"])
    printed_cfg = eval_script.build_config(eval_script.parse_args(command[2:]))
    assert printed_cfg.data.nsd_dataset_config.bids == BidsSource.model_validate(source)
