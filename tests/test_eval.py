"""eval.py end to end on the synthetic mini-NSD with a tiny model (checkpoint through the real save path)."""

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from scripts import eval_command, eval_here, generated, load_script, run_eval, started

REPO = Path(__file__).resolve().parents[1]
N_LIMIT = 6


def _load_eval_module():
    return load_script("eval")


@pytest.fixture(scope="module")
def setup(eval_setup):
    return eval_setup


def _run(setup, cache, *extra, checkpoint=None, wait=True):
    return run_eval(setup, cache, *extra, checkpoint=checkpoint, wait=wait)


def _out(cache):
    return Path(cache) / "reconstructions_subj01_unaveraged"  # the link to the latest run's folder


def _generated(stderr: str) -> int:
    return generated(stderr)


def test_end_to_end_outputs_cache_and_invalidation(setup, tmp_path, caplog, capsys, monkeypatch):
    """The first run as a user runs it (its own process); the reruns in this process (their subject is the
    cache on disk, not how eval.py starts)."""
    cache = tmp_path / "cache"

    def rerun(*extra):
        return eval_here(setup, cache, *extra, caplog=caplog, monkeypatch=monkeypatch)

    proc = _run(setup, cache, "--limit", str(N_LIMIT), "--metrics", "pixcorr,ssim")
    assert proc.returncode == 0, proc.stderr
    assert _generated(proc.stderr) == N_LIMIT
    out = _out(cache)
    for i in range(N_LIMIT):
        assert Image.open(out / f"{i}.png").size == (64, 64)
        assert Image.open(out / f"{i}_gt.png").size == (512, 512)
    assert not (out / f"{N_LIMIT}.png").exists()
    result = json.loads((out / "metrics.json").read_text())
    assert result["metrics"] == ["pixcorr", "ssim"] and result["n_images"] == N_LIMIT
    assert len(result["per_image"]["pixcorr"]) == N_LIMIT
    # the per-image values are the metric of the saved files (independent: numpy corrcoef at 425 px)
    rec = np.asarray(Image.open(out / "2.png").resize((425, 425)), dtype=float) / 255
    gt = np.asarray(Image.open(out / "2_gt.png").resize((425, 425)), dtype=float) / 255
    assert result["per_image"]["pixcorr"][2] == pytest.approx(np.corrcoef(rec.ravel(), gt.ravel())[0, 1], abs=1e-6)
    table = (out / "metrics.md").read_text()
    assert "| PixCorr |" in table and "| SSIM |" in table and "shuffled pairs" in table
    assert Image.open(out / "overview.png").size == (N_LIMIT * 160, 2 * 160)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["checkpoint"] == str(setup["ckpt"]) and saved["versatilediffusion_config"]["num_inference_steps"] == 2
    # the ground truth is the stimulus, RGB, resized to 512 with bilinear filtering
    from dynadiff.data.nsd import stimulus_png

    nsd_id = None
    ids = np.load(setup["nsd"] / "test_images_ids.npy")
    stim = [np.asarray(Image.open(stimulus_png(setup["nsd"], i)).convert("RGB").resize((512, 512), Image.BILINEAR))
            for i in ids]
    gt0 = np.asarray(Image.open(out / "0_gt.png"))
    assert any(np.array_equal(gt0, s) for s in stim), nsd_id

    # a finished run re-run only reports: nothing generated, nothing rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    code, log = rerun("--limit", str(N_LIMIT), "--metrics", "pixcorr,ssim")
    assert code == 0, log
    assert _generated(log) == 0 and "| PixCorr |" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    # more sampling steps: every image regenerated (no stale reuse); default metrics skip what has no weights
    before = [np.asarray(Image.open(out / f"{i}.png")) for i in range(N_LIMIT)]
    code, log = rerun("--limit", str(N_LIMIT), "versatilediffusion_config.num_inference_steps=3")
    assert code == 0, log
    assert _generated(log) == N_LIMIT
    assert any(not np.array_equal(b, np.asarray(Image.open(out / f"{i}.png"))) for i, b in enumerate(before))
    result = json.loads((out / "metrics.json").read_text())
    assert result["metrics"] == ["pixcorr", "ssim"]
    assert {"alexnet2", "clip", "dreamsim"} <= set(result["skipped"])
    assert "alexnet-owt-7be5be79.pth" in result["skipped"]["alexnet2"]

    # a checkpoint rewritten in place is a new run
    time.sleep(0.01)
    os.utime(setup["ckpt"])
    code, log = rerun("--limit", str(N_LIMIT), "--metrics", "pixcorr,ssim")
    assert code == 0, log
    assert _generated(log) == N_LIMIT


def _items_in_cache(cache: Path) -> int:
    return sum(len(f.read_text().splitlines())
               for f in cache.glob("dynadiff.config.ReconstructionConfig.generate*/*/*-info.jsonl"))


def test_killed_run_resumes_with_missing_images_only(setup, tmp_path):
    slow = ["--batch-size", "1", "--limit", "6", "--metrics", "pixcorr", "--no-blur-faces",
            "versatilediffusion_config.num_inference_steps=8"]
    cache = tmp_path / "cache"
    proc = _run(setup, cache, *slow, wait=False)
    deadline = time.time() + 300
    while _items_in_cache(cache) < 2:
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"run ended before it could be interrupted: {proc.communicate()}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _items_in_cache(cache)
    assert 2 <= done < 6
    assert not (_out(cache) / "metrics.json").exists()
    ref_cache = tmp_path / "ref"  # an uninterrupted run, in its own cache, runs meanwhile (one thread each)
    with started(eval_command(setup, ref_cache, *slow), setup["env"]) as ref:
        resumed = _run(setup, cache, *slow)
        _, ref_err = ref.communicate(timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert _generated(resumed.stderr) == 6 - done
    assert _items_in_cache(cache) == 6  # exactly one image per test index
    files = sorted(p.name for p in _out(cache).glob("[0-9]*.png") if "_gt" not in p.name)
    assert files == [f"{i}.png" for i in range(6)]
    # same images as the uninterrupted run
    assert ref.returncode == 0, ref_err
    for i in range(6):
        np.testing.assert_array_equal(np.asarray(Image.open(_out(cache) / f"{i}.png")),
                                      np.asarray(Image.open(_out(ref_cache) / f"{i}.png")))


def test_bad_inputs_are_clear_errors(setup, tmp_path, caplog):
    eval_cli = _load_eval_module()
    base = [*setup["base"], "--cache", str(tmp_path / "cache"), "--limit", "2", "--metrics", "pixcorr"]

    def run(*extra, checkpoint=setup["ckpt"]):
        caplog.clear()
        code = eval_cli.main([*base, "--checkpoint", str(checkpoint), *extra])
        return code, caplog.text

    code, log = run(checkpoint=tmp_path / "checkpoints" / "subj01")
    assert code == 1 and "checkpoints/subj01 not found" in log and "checkpoints/README.md" in log
    code, log = run("--vd_cache_dir", str(tmp_path / "novd"))
    assert code == 1 and "Versatile Diffusion folder" in log and "novd does not exist" in log
    code, log = run(f"data.nsd_dataset_config.nsddata_path={tmp_path / 'nonsd'}")
    assert code == 1 and "the NSD folder" in log and "nonsd does not exist" in log and "prepare_data.py" in log
    code, log = run("data.nsd_dataset_config.subject=3")
    assert code == 2 and "unknown subject 3" in log
    code, log = run("versatilediffusion_config.num_steps=3")
    assert code == 2 and "unknown config key 'versatilediffusion_config.num_steps'" in log
    assert "num_inference_steps" in log
    code, log = run("--metrics", "alexnet2")
    assert code == 1 and "alexnet-owt-7be5be79.pth" in log
    code, log = run("--subject", "3")  # any number parses (a BIDS participant's); NSD's config refuses it
    assert code == 2 and "unknown subject 3" in log
    code, log = run(checkpoint=setup["other"])
    assert code == 1 and "and subject 1 has" in log and "another subject" in log
    assert not (_out(tmp_path / "cache") / "metrics.json").exists()

    # a corrupt image cache entry: a clear error, no metrics written
    assert run()[0] == 0
    (_out(tmp_path / "cache") / "metrics.json").unlink()
    for data in (tmp_path / "cache").glob("dynadiff.config.ReconstructionConfig.generate*/*/data/*"):
        data.write_bytes(data.read_bytes()[:100])
    code, log = run("--metrics", "ssim")
    assert code == 1 and "may be corrupt" in log and "image_generation.mode=force" in log
    assert not (_out(tmp_path / "cache") / "metrics.json").exists()
    assert run("--metrics", "ssim", "image_generation.mode=force")[0] == 0


def test_to_uint8_truncates_by_default_and_rounds_on_request():
    import torch

    from dynadiff.decoder import to_uint8

    values = [0.0, 0.5, 0.999, 1.0, 1.2, -0.1, 0.5 / 255, 0.7 / 255, 254.6 / 255]
    image = torch.tensor(values).reshape(1, 1, -1).expand(3, 1, -1)  # (3, 1, W)
    # by hand: x * 255, clamped to [0, 255], then the fraction dropped (truncate) or to the nearest (round)
    assert to_uint8(image)[0, :, 0].tolist() == [0, 127, 254, 255, 255, 0, 0, 0, 254]
    assert to_uint8(image, "round")[0, :, 0].tolist() == [0, 128, 255, 255, 255, 0, 0, 1, 255]
    assert to_uint8(image).shape == (1, len(values), 3) and to_uint8(image).dtype == np.uint8
    with pytest.raises(ValueError, match="'truncate' or 'round'"):
        to_uint8(image, "floor")


def test_reconstructions_are_truncated_to_8_bits(setup, tmp_path):
    """The saved reconstruction is the model's float image truncated to 8 bits (the original's
    ``(x * 255).astype(uint8)``), computed here from the same model and window; ``to_uint8=round`` rounds."""
    import torch

    from dynadiff.checkpoint import load_checkpoint
    from dynadiff.config import NsdDatasetConfig
    from dynadiff.models.config import FmriMLPConfig, VersatileDiffusionConfig

    eval_cli = _load_eval_module()
    args = ["--limit", "1", "--metrics", "pixcorr", "--no-blur-faces"]
    saved = {}
    for mode in ("truncate", "round"):
        cache = tmp_path / mode
        assert eval_cli.main([*setup["base"], "--cache", str(cache), "--checkpoint", str(setup["ckpt"]), *args,
                              f"to_uint8={mode}"]) == 0
        saved[mode] = np.asarray(Image.open(_out(cache) / "0.png")).astype(int)

    ds = NsdDatasetConfig(nsddata_path=setup["nsd"], subject=1, sessions=[1, 21], infra={"folder": tmp_path / "w"}).build()
    vd = VersatileDiffusionConfig(vd_cache_dir=setup["vd"], image_size=64, num_inference_steps=2)
    model = vd.build(FmriMLPConfig(hidden=32), n_voxels=ds.n_voxels)
    load_checkpoint(model, setup["ckpt"])
    window = torch.from_numpy(ds.brain(0))
    with torch.no_grad():  # as eval.py samples it: a batch of --batch-size 2, the short batch padded by repetition
        x = model.reconstruct(torch.stack([window, window]), torch.zeros(2, dtype=torch.long), seed=0)[0]
    x = x.clamp(0, 1).permute(1, 2, 0).numpy().astype(np.float64) * 255
    np.testing.assert_array_equal(saved["truncate"], np.floor(x))
    np.testing.assert_array_equal(saved["round"], np.round(x))
    assert (saved["round"] - saved["truncate"]).mean() > 0.3  # about half a level brighter on average
