"""demo.py end to end in its fast mode: synthetic NSD -> tiny VD -> train.py loop -> eval.py pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scripts import load_script

REPO = Path(__file__).resolve().parents[2]


def _script(name: str):
    return load_script(name)


def test_fast_demo_trains_a_checkpoint_that_eval_loads(tmp_path, capsys):
    from dynadiff.checkpoint import load_checkpoint, read_metadata
    from dynadiff.models import vd

    out = tmp_path / "demo"
    assert _script("demo").main(["--fast", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
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
