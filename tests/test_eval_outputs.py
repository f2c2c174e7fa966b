"""eval.py's outputs cannot lie: what it prints, ``metrics.json``, ``config.yaml``, ``run.json`` and the PNGs
of the folder it names are always one run's, whatever ran before in the same cache.

Each run writes into its own folder, ``reconstructions_subjXX_{mode}_{run id}``; the original's
``reconstructions_subjXX_{mode}`` is a link to the latest. Runs are driven in-process through ``eval.main``
(fast) except where a second process is the point (concurrency, Ctrl-C).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from scripts import eval_command, generated, load_script, run_eval, started

LIMIT = 4
METRICS = ("--metrics", "pixcorr,ssim")


@pytest.fixture(scope="module")
def eval_cli():
    return load_script("eval")


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO)  # the messages checked here are INFO and above


def _main(eval_cli, setup, cache, *extra, checkpoint=None, capsys=None):
    code = eval_cli.main([*setup["base"], "--cache", str(cache), "--checkpoint", str(checkpoint or setup["ckpt"]),
                          *extra])
    return code, capsys.readouterr().out if capsys is not None else ""


def _printed(stdout: str) -> tuple[Path, dict]:
    """The folder eval.py named and the metric means it printed."""
    folder = Path(re.search(r"Reconstructions and metrics of run \w+: (\S+)", stdout).group(1))
    means = {label: float(value) for label, value in re.findall(r"^\| (PixCorr|SSIM) \| (-?[\d.]+) \|", stdout, re.M)}
    return folder, means


def _files(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file of a run folder."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _assert_one_run(folder: Path, means: dict, checkpoint: Path, n: int) -> None:
    """The folder's metrics.json, metrics.md, config.yaml, run.json and PNGs all belong to the printed run."""
    result = json.loads((folder / "metrics.json").read_text())
    assert {"PixCorr": result["means"]["pixcorr"], "SSIM": result["means"]["ssim"]} == pytest.approx(means, abs=5e-5)
    assert result["checkpoint"] == str(checkpoint) and result["n_images"] == n
    assert result["output_dir"] == str(folder) and folder.name.endswith("_" + result["run_id"])
    assert json.loads((folder / "run.json").read_text())["run_id"] == result["run_id"]
    assert yaml.safe_load((folder / "config.yaml").read_text())["checkpoint"] == str(checkpoint)
    assert f"| PixCorr | {result['means']['pixcorr']:.4f} |" in (folder / "metrics.md").read_text()
    pngs = sorted(p.name for p in folder.glob("*.png") if p.name != "overview.png")
    assert pngs == sorted([f"{i}.png" for i in range(n)] + [f"{i}_gt.png" for i in range(n)])
    # the per-image values are those of the PNGs on disk (independent: numpy's Pearson at 425 px)
    for i in range(n):
        rec = np.asarray(Image.open(folder / f"{i}.png").resize((425, 425)), dtype=float).ravel()
        gt = np.asarray(Image.open(folder / f"{i}_gt.png").resize((425, 425)), dtype=float).ravel()
        assert result["per_image"]["pixcorr"][i] == pytest.approx(np.corrcoef(rec, gt)[0, 1], abs=1e-6)


@pytest.mark.parametrize("digest", ["1119165644017420", "12e4567890123456", "0000000000000001"])
def test_a_digest_that_reads_as_a_number_stays_a_string(eval_cli, eval_setup, tmp_path, monkeypatch, digest):
    """Hex digests made of digits (a demo run met "1119165644017420") are passed as quoted overrides, never read as
    numbers (an int, a float or 1) that the config refuses or silently changes."""
    from dynadiff import decoder
    from dynadiff.data import dataset

    monkeypatch.setattr(dataset, "data_digest", lambda cfg: digest)
    monkeypatch.setattr(decoder, "checkpoint_digest", lambda path: digest)
    args = [*eval_setup["base"], "--cache", str(tmp_path / "cache"), "--checkpoint", str(eval_setup["ckpt"])]
    cfg = eval_cli.resolve_config(eval_cli.parse_args(args))
    assert cfg.data_digest == digest and cfg.checkpoint_digest == digest


def test_two_checkpoints_one_cache_a_b_a(eval_cli, eval_setup, tmp_path, capsys):
    """A, then B, then A again into one cache: each run's printed metrics are those of the folder it names, B
    leaves A's outputs untouched, and the third run (served from exca's cached result) names A's folder."""
    setup, cache = eval_setup, tmp_path / "cache"
    a, b = setup["ckpt"], setup["ckpt_b"]
    code, out_a = _main(eval_cli, setup, cache, "--limit", str(LIMIT), *METRICS, checkpoint=a, capsys=capsys)
    assert code == 0
    folder_a, means_a = _printed(out_a)
    _assert_one_run(folder_a, means_a, a, LIMIT)
    files_a = _files(folder_a)
    link = cache / "reconstructions_subj01_unaveraged"
    assert link.is_symlink() and link.resolve() == folder_a.resolve()

    code, out_b = _main(eval_cli, setup, cache, "--limit", str(LIMIT), *METRICS, checkpoint=b, capsys=capsys)
    assert code == 0
    folder_b, means_b = _printed(out_b)
    assert folder_b != folder_a and means_b != means_a
    _assert_one_run(folder_b, means_b, b, LIMIT)
    assert _files(folder_a) == files_a  # A's outputs untouched
    assert link.resolve() == folder_b.resolve()
    assert f"also {link}" in out_b

    code, out_again = _main(eval_cli, setup, cache, "--limit", str(LIMIT), *METRICS, checkpoint=a, capsys=capsys)
    assert code == 0
    assert _printed(out_again) == (folder_a, means_a)
    assert _files(folder_a) == files_a
    assert link.resolve() == folder_a.resolve()


def test_smaller_limit_gets_its_own_folder(eval_cli, eval_setup, tmp_path, capsys):
    setup, cache = eval_setup, tmp_path / "cache"
    code, out6 = _main(eval_cli, setup, cache, "--limit", "6", *METRICS, capsys=capsys)
    assert code == 0
    folder6, means6 = _printed(out6)
    files6 = _files(folder6)
    code, out2 = _main(eval_cli, setup, cache, "--limit", "2", *METRICS, capsys=capsys)
    assert code == 0
    folder2, means2 = _printed(out2)
    assert folder2 != folder6
    _assert_one_run(folder2, means2, setup["ckpt"], 2)  # exactly 2 images: no PNG of the 6-image run
    _assert_one_run(folder6, means6, setup["ckpt"], 6)
    assert _files(folder6) == files6
    # the two images of the smaller run are those of the larger (one image cache, seeded per image)
    for i in range(2):
        assert (folder2 / f"{i}.png").read_bytes() == (folder6 / f"{i}.png").read_bytes()


def test_a_folder_that_no_longer_matches_its_cached_result_is_written_again(eval_cli, eval_setup, tmp_path, capsys,
                                                                           caplog):
    setup, cache = eval_setup, tmp_path / "cache"
    code, out = _main(eval_cli, setup, cache, "--limit", str(LIMIT), *METRICS, capsys=capsys)
    assert code == 0
    folder, means = _printed(out)
    reference = _files(folder)
    damages = {
        "an image deleted": lambda: (folder / "2.png").unlink(),
        "a stray image of no image of this run": lambda: (folder / "7.png").write_bytes((folder / "0.png").read_bytes()),
        "metrics.json edited": lambda: (folder / "metrics.json").write_text(
            (folder / "metrics.json").read_text().replace('"n_images": 4', '"n_images": 3')),
        "metrics.json deleted (a crash before the end)": lambda: (folder / "metrics.json").unlink(),
        "run.json of another run": lambda: (folder / "run.json").write_text('{"run_id": "00000000"}'),
    }
    for what, damage in damages.items():
        damage()
        caplog.clear()
        code, out = _main(eval_cli, setup, cache, "--limit", str(LIMIT), *METRICS, capsys=capsys)
        assert code == 0, what
        assert "do not match this run's cached result" in caplog.text, what
        assert "generating" not in caplog.text, what  # from the image cache: nothing generated again
        assert _printed(out) == (folder, means), what
        assert _files(folder) == reference, what
    # an intact folder is only reported: nothing rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    caplog.clear()
    assert _main(eval_cli, setup, cache, "--limit", str(LIMIT), *METRICS, capsys=capsys)[0] == 0
    assert "do not match" not in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes


def test_an_earlier_versions_output_folder_is_left_alone(eval_cli, eval_setup, tmp_path, capsys, caplog):
    setup, cache = eval_setup, tmp_path / "cache"
    legacy = cache / "reconstructions_subj01_unaveraged"
    legacy.mkdir(parents=True)
    (legacy / "0.png").write_bytes(b"an earlier run's image")
    code, out = _main(eval_cli, setup, cache, "--limit", "2", *METRICS, capsys=capsys)
    assert code == 0
    folder, means = _printed(out)
    assert folder.parent == cache and folder != legacy
    _assert_one_run(folder, means, setup["ckpt"], 2)
    assert not legacy.is_symlink() and (legacy / "0.png").read_bytes() == b"an earlier run's image"
    assert "left as it is" in caplog.text


def test_the_same_run_twice_at_once_waits_and_reuses(eval_setup, tmp_path):
    """A second eval.py of the same run on the same cache says who holds it, waits, then only reports.

    The first run is stopped (SIGSTOP) once it holds the run's lock, so that the second surely finds it held."""
    import subprocess

    setup, cache = eval_setup, tmp_path / "cache"
    args = ["--limit", "4", *METRICS]
    with started(eval_command(setup, cache, *args), setup["env"]) as first:
        deadline = time.time() + 120
        while not any(f.read_text().startswith(f"pid {first.pid} ")
                      for f in cache.glob(".reconstructions_subj01_unaveraged_*.lock")):
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)
        try:
            with open(tmp_path / "second.err", "w+") as err2:
                second = subprocess.Popen(eval_command(setup, cache, *args), env=setup["env"], stdout=subprocess.PIPE,
                                          stderr=err2, text=True)
                while "waiting for it to finish" not in (tmp_path / "second.err").read_text():
                    assert second.poll() is None and time.time() < deadline, (tmp_path / "second.err").read_text()
                    time.sleep(0.05)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        out1, err1 = first.communicate(timeout=600)
        out2, _ = second.communicate(timeout=600)
    err2 = (tmp_path / "second.err").read_text()
    assert first.returncode == 0 and second.returncode == 0, (err1, err2)
    assert re.search(rf"is in use by pid {first.pid} on \S+, since [\d-]+ [\d:]+: waiting for it to finish", err2)
    assert generated(err1) == 4 and generated(err2) == 0
    assert "reconstructing" in err1 and "reconstructing" not in err2  # the second reports the first's result
    assert _printed(out1) == _printed(out2)


def test_images_another_run_is_generating_are_waited_for_and_said(eval_cli, eval_setup, tmp_path, capsys, caplog):
    """Images claimed in exca's in-flight registry by another live process: the run says so, waits for that
    process, and generates them itself only once it is gone."""
    import subprocess

    from exca.cachedict.inflight import InflightRegistry, Pid, WorkerInfo

    from dynadiff.evaluation import reconstruction_config

    setup, cache = eval_setup, tmp_path / "cache"
    args = ["--limit", "2", *METRICS]
    cfg = eval_cli.resolve_config(eval_cli.parse_args([*setup["base"], "--cache", str(cache), "--checkpoint",
                                                       str(setup["ckpt"]), *args]))
    rec = reconstruction_config(cfg)
    folder = rec.infra.uid_folder(create=True)
    other = subprocess.Popen(["sleep", "60"])
    try:
        worker = WorkerInfo(token="other-run", liveness=Pid(host=os.uname().nodename, pid=other.pid))
        reg = InflightRegistry(folder, worker=worker)
        assert reg.claim(["0", "1"]) == ["0", "1"]
        reg.close()
        killer = threading.Timer(3.0, lambda: (other.kill(), other.wait()))  # reaped: a zombie looks alive
        killer.start()
        t0 = time.monotonic()
        code, out = _main(eval_cli, setup, cache, *args, capsys=capsys)
        killer.join()
    finally:
        other.kill()
        other.wait()
    assert code == 0
    assert time.monotonic() - t0 >= 3.0  # it waited for the other process
    assert f"2 of the images to generate are being generated by another run (process {other.pid} on" in caplog.text
    _assert_one_run(*_printed(out), setup["ckpt"], 2)


@pytest.mark.parametrize("case", ["folder holding model.safetensors", "folder holding one .safetensors"])
def test_a_folder_holding_one_checkpoint_file_is_that_file(eval_cli, eval_setup, tmp_path, capsys, caplog, case):
    setup, cache = eval_setup, tmp_path / "cache"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    name = "model.safetensors" if case.startswith("folder holding model") else "weights.safetensors"
    os.link(setup["ckpt"], folder / name)  # the same file: the same bytes, sizes and times
    if name == "model.safetensors":
        (folder / "state.safetensors.tmp").write_text("not a checkpoint")  # other files do not matter
    code, out = _main(eval_cli, setup, cache, "--limit", "2", *METRICS, checkpoint=folder, capsys=capsys)
    assert code == 0, caplog.text
    assert f"reading {folder / name}" in caplog.text
    folder_out, means = _printed(out)
    _assert_one_run(folder_out, means, folder / name, 2)


def _checkpoint_cases(tmp_path: Path, ckpt: Path) -> dict[str, tuple[Path, str]]:
    """Bad --checkpoint paths -> (path, what the one-line error must say)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    foreign = tmp_path / "notes.safetensors"
    foreign.write_text("these are my notes, not tensors")
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a", "b"):
        os.link(ckpt, two / f"{n}.safetensors")
    run = tmp_path / "run"
    (run / "checkpoints" / "best").mkdir(parents=True)
    os.link(ckpt, run / "checkpoints" / "best" / "model.safetensors")
    others = tmp_path / "others"
    others.mkdir()
    (others / "README.txt").write_text("x")
    torch_file = tmp_path / "cut.pt"
    torch_file.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    return {
        "empty folder": (empty, r"checkpoint folder \S+empty is empty: give a DeepSpeed checkpoint folder"),
        "truncated .safetensors": (truncated, r"not a readable \.safetensors file \(truncated, or another format\?\)"),
        "text file named .safetensors": (foreign, r"not a readable \.safetensors file"),
        "folder of two .safetensors": (two, r"holds several \.safetensors files \(a\.safetensors, b\.safetensors\)"),
        "train.py run folder": (run, r"is a train\.py run folder, not a checkpoint: pass \S+checkpoints/best/model\.safetensors"),
        "folder of other files": (others, r"holds no checkpoint \(1 entries: README\.txt\)"),
        "truncated torch file": (torch_file, r"cut\.pt is not a complete torch file"),
    }


def test_bad_checkpoint_paths_are_one_clear_line(eval_cli, eval_setup, tmp_path, capsys, caplog):
    setup, cache = eval_setup, tmp_path / "cache"
    cases = _checkpoint_cases(tmp_path, setup["ckpt"])
    unknown = tmp_path / "weights.npz"
    unknown.write_bytes(b"\0")
    cases["unknown file kind"] = (unknown, r"is a file of an unknown kind \(suffix '\.npz'\)")
    for what, (path, message) in cases.items():
        caplog.clear()
        code, _ = _main(eval_cli, setup, cache, "--limit", "2", *METRICS, checkpoint=path, capsys=capsys)
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert code == 1, what
        assert len(errors) == 1 and re.search(message, errors[0].getMessage()), (what, caplog.text)
        assert "Traceback" not in caplog.text and "image cache" not in caplog.text, what
    assert not cache.exists() or not list(cache.glob("reconstructions_*")), "nothing written"


def test_checkpoint_cli_bad_inputs(eval_setup, tmp_path, capsys):
    from dynadiff.checkpoint.__main__ import main as checkpoint_cli

    for what, (path, message) in _checkpoint_cases(tmp_path, eval_setup["ckpt"]).items():
        assert checkpoint_cli(["inspect", str(path)]) == 1, what
        err = capsys.readouterr().err
        assert re.search(message, err) and err.count("\n") == 1, (what, err)
    assert checkpoint_cli(["convert", str(eval_setup["ckpt"]), str(tmp_path / "out.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "convert reads a DeepSpeed checkpoint folder" in err and "is a .safetensors file already" in err
    assert "mp_rank" not in err and not (tmp_path / "out.safetensors").exists()
    # a folder holding model.safetensors is inspected as that file
    folder = tmp_path / "best"
    folder.mkdir()
    os.link(eval_setup["ckpt"], folder / "model.safetensors")
    assert checkpoint_cli(["inspect", str(folder)]) == 0
    assert f"{folder / 'model.safetensors'}: " in capsys.readouterr().out


def test_brain_module_configuration_comes_from_the_checkpoint(eval_cli, eval_setup, tmp_path, capsys, caplog):
    """A train.py checkpoint records its brain_modules_config: eval.py uses it (the fixture's base arguments do
    not give hidden=32), says so, and refuses a command-line override that disagrees with it."""
    setup, cache = eval_setup, tmp_path / "cache"
    code, out = _main(eval_cli, setup, cache, "--limit", "2", *METRICS, capsys=capsys)
    assert code == 0
    assert "brain module configuration from the checkpoint's metadata: hidden=32" in caplog.text
    folder, _ = _printed(out)
    assert yaml.safe_load((folder / "config.yaml").read_text())["brain_modules_config"]["hidden"] == 32
    # the same value given explicitly: the same run (same folder), no complaint
    code, out2 = _main(eval_cli, setup, cache, "--limit", "2", *METRICS, "brain_modules_config.hidden=32", capsys=capsys)
    assert code == 0 and _printed(out2)[0] == folder
    caplog.clear()
    code, _ = _main(eval_cli, setup, cache, "--limit", "2", *METRICS, "brain_modules_config.hidden=64",
                    "brain_modules_config.n_tokens=257", capsys=capsys)
    assert code == 2
    assert re.search(r"disagrees with checkpoint \S+subj01\.safetensors.*: hidden=64 \(checkpoint: 32\)\. Drop those",
                     caplog.text)


def test_a_checkpoint_that_does_not_fit_says_why(eval_cli, eval_setup, tmp_path, capsys, caplog):
    """Without recorded configuration (as the published checkpoints): another subject's voxel count is named as
    such; other brain-module sizes are not blamed on the subject."""
    from safetensors.torch import load_file, save_file

    setup, cache = eval_setup, tmp_path / "cache"
    bare = tmp_path / "bare.safetensors"  # the tensors only, no metadata
    save_file(load_file(setup["ckpt"]), str(bare))
    other = tmp_path / "other_bare.safetensors"
    save_file(load_file(setup["other"]), str(other))
    code, _ = _main(eval_cli, setup, cache, "--limit", "2", *METRICS, "brain_modules_config.hidden=32",
                    checkpoint=other, capsys=capsys)
    assert code == 1
    assert (f"expects {setup['n_voxels'] - 7} voxels per window, and subject 1 has {setup['n_voxels']} nsdgeneral "
            "voxels in this data: is it the checkpoint of another subject?") in caplog.text
    caplog.clear()
    code, _ = _main(eval_cli, setup, cache, "--limit", "2", *METRICS, "brain_modules_config.hidden=48",
                    checkpoint=bare, capsys=capsys)
    assert code == 1
    assert "brain module has other sizes than brain_modules_config" in caplog.text
    assert "another subject" not in caplog.text


def test_devices_and_yaml_are_checked_before_any_work(eval_cli, eval_setup, tmp_path, capsys, caplog):
    import torch

    setup, cache = eval_setup, tmp_path / "cache"
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("task_infra_data:\n  cluster: local\n   mem_gb: 4\n")
    cases = [(["--device", "tpu"], 2, r"unknown device 'tpu': use auto, cpu, cuda, cuda:N"),
             (["--infra-yaml", str(bad_yaml)], 2, r"bad\.yaml is not valid YAML: line 3, column 10"),
             (["--config", str(bad_yaml)], 2, r"bad\.yaml is not valid YAML: line 3, column 10"),
             (["--config", str(tmp_path)], 2, r"is a folder, not a YAML file")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], 1, r"device 'cuda' asked for, but CUDA is not available here"))
    for extra, expected, message in cases:
        caplog.clear()
        code, _ = _main(eval_cli, setup, cache, "--limit", "2", *extra, capsys=capsys)
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert code == expected and len(errors) == 1 and re.search(message, errors[0]), (extra, caplog.text)
    assert not cache.exists(), "nothing computed or written"


def test_ctrl_c_says_what_is_kept_and_the_rerun_continues(eval_setup, tmp_path):
    setup, cache = eval_setup, tmp_path / "cache"
    slow = ["--limit", "6", "--batch-size", "1", "--metrics", "pixcorr", "--no-blur-faces",
            "versatilediffusion_config.num_inference_steps=8"]

    def cached_images() -> int:
        return sum(len(f.read_text().splitlines())
                   for f in cache.glob("dynadiff.config.ReconstructionConfig.generate*/*/*-info.jsonl"))

    with started(eval_command(setup, cache, *slow), setup["env"]) as proc:
        deadline = time.time() + 300
        while cached_images() < 2:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    kept = int(re.search(r"interrupted: (\d+) generated image\(s\) are kept in", err).group(1))
    assert 2 <= kept < 6 and kept == cached_images()
    assert "Run the same command again to continue: only the missing images are generated" in err
    resumed = run_eval(setup, cache, *slow)
    assert resumed.returncode == 0, resumed.stderr
    assert generated(resumed.stderr) == 6 - kept


def test_rewritten_data_is_a_new_run(eval_cli, eval_setup, tmp_path, capsys, caplog):
    """The data folder rewritten in place (as `prepare_data.py --synthetic` with another seed would): the windows
    are computed again and the images drawn again, in a new run folder; nothing of the old data's cache is served."""
    import shutil

    import nibabel as nib

    setup, cache = eval_setup, tmp_path / "cache"
    nsd = tmp_path / "nsd"
    shutil.copytree(setup["nsd"], nsd)
    args = ["--limit", "2", *METRICS, f"data.nsd_dataset_config.nsddata_path={nsd}"]
    code, out = _main(eval_cli, setup, cache, *args, capsys=capsys)
    assert code == 0
    folder, means = _printed(out)
    before = [np.asarray(Image.open(folder / f"{i}.png")) for i in range(2)]
    series = sorted(nsd.rglob("timeseries_session*_run*.nii.gz"))
    for path in series:  # the same files, other values
        img = nib.load(path)
        nib.save(nib.Nifti1Image(-np.asarray(img.dataobj), img.affine, img.header), path)
    caplog.clear()
    code, out = _main(eval_cli, setup, cache, *args, capsys=capsys)
    assert code == 0
    folder2, means2 = _printed(out)
    assert folder2 != folder and generated(caplog.text) == 2
    after = [np.asarray(Image.open(folder2 / f"{i}.png")) for i in range(2)]
    assert all(not np.array_equal(a, b) for a, b in zip(before, after))
    _assert_one_run(folder2, means2, setup["ckpt"], 2)
    assert json.loads((folder / "metrics.json").read_text())["means"]["pixcorr"] == pytest.approx(means["PixCorr"], abs=5e-5)


def test_the_default_checkpoint_is_subjXX_or_subXX(eval_cli, eval_setup, tmp_path, capsys, caplog, monkeypatch):
    """Without --checkpoint: checkpoints/subj01 (the original's README) or checkpoints/sub01 (its code), said; when
    neither exists, the error names both and the command that fetches the published one."""
    setup, cache = eval_setup, tmp_path / "cache"
    monkeypatch.chdir(tmp_path)
    args = [*setup["base"], "--cache", str(cache), "--limit", "2", *METRICS]
    assert eval_cli.main(args) == 1
    assert ("no checkpoint of subject 1: neither checkpoints/subj01 nor checkpoints/sub01 exists. Fetch the "
            "published one with `python prepare_weights.py --only checkpoints --subjects 1`") in caplog.text
    (tmp_path / "checkpoints" / "sub01").mkdir(parents=True)
    os.link(setup["ckpt"], tmp_path / "checkpoints" / "sub01" / "model.safetensors")
    caplog.clear()
    assert eval_cli.main(args) == 0
    assert "checkpoint of subject 1: checkpoints/sub01 (no checkpoints/subj01)" in caplog.text
    folder, means = _printed(capsys.readouterr().out)
    _assert_one_run(folder, means, Path("checkpoints/sub01/model.safetensors"), 2)
    (tmp_path / "checkpoints" / "subj01").mkdir()
    os.link(setup["ckpt_b"], tmp_path / "checkpoints" / "subj01" / "model.safetensors")
    caplog.clear()
    assert eval_cli.main(args) == 0
    assert "checkpoints/sub01" not in caplog.text
    folder_b, means_b = _printed(capsys.readouterr().out)
    _assert_one_run(folder_b, means_b, Path("checkpoints/subj01/model.safetensors"), 2)
