"""One model per offset: train.py --window (1-TR windows included), eval.py reading a checkpoint's window, and
timecourse.py --checkpoints [--generalization] on tiny models trained here."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from dynadiff.checkpoint import read_metadata
from dynadiff.data.preprocess import window_bounds, window_seconds
from scripts import load_script


def _tiny_overrides(*args):
    """tests/training/conftest.py's tiny training keys (that folder is not a package: loaded by path)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("training_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_overrides(*args)


def test_window_seconds_inverts_window_bounds():
    for start in range(-12, 30):
        for stop in range(start + 1, start + 10):
            offset, duration = window_seconds(start, stop)
            for t in (0, 2, 117):  # the onset only shifts the window
                assert window_bounds(t, offset, duration) == (t + start, t + stop)
    assert window_bounds(0, *window_seconds(3, 9)) == window_bounds(0, 4.6, 8.0) == (3, 9)  # the published window
    with pytest.raises(ValueError, match="stop > start"):
        window_seconds(4, 4)


@pytest.fixture(scope="module")
def per_offset_models(synthetic_nsd, train_vd, tmp_path_factory):
    """Three tiny train.py runs on 1-TR windows at offsets 2, 4 and 6 (their checkpoints), and one on 2 TRs at 6."""
    import torch

    train = load_script("train")
    root = tmp_path_factory.mktemp("per_offset")
    paths = {}
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, window in (("w2", "2:3"), ("w4", "4:5"), ("w6", "6:7"), ("w6b", "6:8")):
            out = root / name
            argv = ["--window", window, *_tiny_overrides(synthetic_nsd[0], train_vd, out, root / "cache"),
                    "steps=2", "val_every=0", "checkpoint_every=2"]
            assert train.main(argv) == 0
            paths[name] = out / "checkpoints" / "last" / "model.safetensors"
    finally:
        torch.set_num_threads(previous)
    return {"root": root, "paths": paths}


def _tc_args(synthetic_nsd, train_vd, cache, *extra):
    return ["--subject", "1", "--vd_cache_dir", str(train_vd), "--device", "cpu", "--batch-size", "2",
            "--cache", str(cache), "--no-blur-faces", "--metrics", "pixcorr,ssim", "--limit", "3",
            f"data.nsd_dataset_config.nsddata_path={synthetic_nsd[0]}", "data.nsd_dataset_config.sessions=[1,21]",
            "data.nsd_dataset_config.image_size=32", "versatilediffusion_config.image_size=32",
            "versatilediffusion_config.num_inference_steps=2", *extra]


def test_train_window_is_recorded_and_read_back_by_eval(per_offset_models, synthetic_nsd, train_vd, tmp_path, caplog):
    ckpt = per_offset_models["paths"]["w4"]
    meta = json.loads(read_metadata(ckpt)["train_config"])["data"]["nsd_dataset_config"]
    assert window_bounds(0, meta["offset"], meta["duration"]) == (4, 5)
    assert read_metadata(ckpt)["n_timepoints"] == "1"
    eval_script = load_script("eval")
    args = _tc_args(synthetic_nsd, train_vd, tmp_path / "cache", "--checkpoint", str(ckpt))
    args.remove("--no-blur-faces")
    caplog.set_level(logging.INFO)
    cfg = eval_script.resolve_config(eval_script.parse_args(args))
    data = cfg.data.nsd_dataset_config
    assert window_bounds(0, data.offset, data.duration) == (4, 5)
    assert "fMRI window from the checkpoint's training config: volumes t+4 .. t+4" in caplog.text
    # a window given on the command line that is not the checkpoint's is refused
    with pytest.raises(Exception, match=r"window given on the command line \(volumes t\+3 \.\. t\+8\) is not"):
        eval_script.resolve_config(eval_script.parse_args(args + ["data.nsd_dataset_config.offset=4.0"]))
    # other seconds for the same volumes are that window: accepted as given
    caplog.clear()
    same = eval_script.resolve_config(eval_script.parse_args(args + ["data.nsd_dataset_config.offset=5.0",
                                                                      "data.nsd_dataset_config.duration=1.6"]))
    assert window_bounds(0, same.data.nsd_dataset_config.offset, same.data.nsd_dataset_config.duration) == (4, 5)
    assert same.data.nsd_dataset_config.offset == 5.0 and "fMRI window from the checkpoint" not in caplog.text


def test_one_model_per_offset_and_generalization(per_offset_models, synthetic_nsd, train_vd, tmp_path, capsys):
    tc = load_script("timecourse")
    paths = per_offset_models["paths"]
    cache = tmp_path / "cache"
    glob = str(per_offset_models["root"] / "w[246]" / "checkpoints" / "last" / "model.safetensors")
    assert tc.main(_tc_args(synthetic_nsd, train_vd, cache, "--checkpoints", glob, "--generalization")) == 0
    out = cache / "timecourse_subj01_unaveraged"
    summary = json.loads((out / "timecourse.json").read_text())
    assert summary["mode"] == "per-offset models" and summary["offsets"] == [2, 4, 6]
    assert summary["checkpoints"] == [str(paths[k]) for k in ("w2", "w4", "w6")]
    assert summary["n_trs"] == [1, 1, 1]
    assert [r["checkpoint"] for r in summary["rows"]] == summary["checkpoints"]
    assert [(r["start_volume"], r["end_volume"]) for r in summary["rows"]] == [(2, 3), (4, 5), (6, 7)]
    g = summary["generalization"]
    assert g["train_offsets"] == g["test_offsets"] == [2, 4, 6]
    for m in ("pixcorr", "ssim"):
        matrix = np.array(g["means"][m], dtype=float)
        assert matrix.shape == (3, 3) and np.isfinite(matrix).all()
        # the diagonal is the time course: each model at its own offset
        assert np.diag(matrix) == pytest.approx([r["metrics"][m]["mean"] for r in summary["rows"]], abs=0)
    assert Image.open(out / "generalization.png").size[0] > 300
    assert "generalization.png" in capsys.readouterr().out
    # the off-diagonal cells are the model decoding other offsets' windows: not its own images
    assert g["means"]["pixcorr"][0][1] != g["means"]["pixcorr"][0][0]


def test_per_offset_checkpoints_are_checked(per_offset_models, synthetic_nsd, train_vd, tmp_path, caplog, eval_setup):
    tc = load_script("timecourse")
    paths = per_offset_models["paths"]
    cache = tmp_path / "cache"
    # two models trained at one offset
    assert tc.main(_tc_args(synthetic_nsd, train_vd, cache, "--checkpoints", str(paths["w6"]), str(paths["w6b"]))) == 2
    assert "were both trained at offset +6" in caplog.text
    caplog.clear()
    # a checkpoint that does not record its window (like the published ones): its offset is never guessed
    assert tc.main(_tc_args(synthetic_nsd, eval_setup["vd"], cache, "--checkpoints", str(eval_setup["ckpt"]),
                            "versatilediffusion_config.image_size=64", "data.nsd_dataset_config.image_size=64")) == 2
    assert "does not record the window it was trained on" in caplog.text
    caplog.clear()
    assert tc.main(_tc_args(synthetic_nsd, train_vd, cache, "--generalization")) == 2
    assert "give them with --checkpoints" in caplog.text
    caplog.clear()
    assert tc.main(_tc_args(synthetic_nsd, train_vd, cache, "--checkpoints", str(tmp_path / "none*"))) == 2
    assert "matches no file" in caplog.text
    assert not cache.exists() or not any(cache.glob("timecourse_*"))


@pytest.mark.parametrize("window", ["4:4", "6:2", "a:b", "3"])
def test_a_bad_window_is_one_line(window, synthetic_nsd, train_vd, tmp_path, caplog):
    train = load_script("train")
    argv = ["--window", window, *_tiny_overrides(synthetic_nsd[0], train_vd, tmp_path / "run", tmp_path / "cache")]
    assert train.main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"--window {window}: expected START:STOP" in errors[0] and "\n" not in errors[0]
    assert not (tmp_path / "run").exists()


def test_a_negative_window_start_is_a_value_not_an_option():
    train = load_script("train")
    assert train.parse_args(["--window", "-3:3", "steps=2"]).window == "-3:3"
    assert train.parse_args(["--window", "-3:-2"]).window == "-3:-2"
    assert train.parse_args(["--window", "4:5", "--verbose"]).window == "4:5"
