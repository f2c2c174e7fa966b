"""prepare_data.py --windows / --infra-yaml: several subjects' fMRI windows, in the cache eval.py and train.py read."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dynadiff import jobs
from dynadiff.data import nsd
from dynadiff.data.dataset import compute_run_windows, list_trials
from scripts import load_script

REPO = Path(__file__).resolve().parents[2]


prepare_data = load_script("prepare_data")
eval_script = load_script("eval")
train_script = load_script("train")


@pytest.fixture(scope="module")
def two_subject_nsd(tmp_path_factory) -> Path:
    """Raw synthetic mini-NSD of subjects 1 and 2 (different voxel counts), session 1; not prepared."""
    from dynadiff.data.synthetic import write_synthetic_nsd

    root = tmp_path_factory.mktemp("nsd_windows") / "nsd"
    write_synthetic_nsd(root, subjects=(1, 2), seed=3, sessions=(1,), n_unique=8, n_test=4)
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "prepare_data.py"), "--skip-download", "--workers", "1", *map(str, args)]
    return subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)


def _script_configs(root: Path, cache: Path, subject: int) -> list:
    """The data configs eval.py (test split) and train.py (train split) build for this data and cache."""
    common = ["--subject", str(subject), "--cache", str(cache), f"data.nsd_dataset_config.nsddata_path={root}",
              "data.nsd_dataset_config.sessions=[1]"]
    ev = eval_script.build_config(eval_script.parse_args(common)).data.nsd_dataset_config
    tr = train_script.build_config(train_script.parse_args(common)).data.nsd_dataset_config
    assert (ev.split, tr.split) == ("test", "train")
    return [ev, tr]


def test_windows_of_all_subjects_are_what_eval_and_train_read(two_subject_nsd, tmp_path, caplog):
    cache = tmp_path / "cache"
    proc = _run("--path", two_subject_nsd, "--subjects", "1", "2", "--windows", "all", "--cache", cache,
                "--sessions", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_voxels = set()
    for subject in (1, 2):
        n_items = 0
        for cfg in _script_configs(two_subject_nsd, cache, subject):
            items, trials = list_trials(cfg)
            assert items and trials
            n_items += len(items)
            assert jobs.missing_items(cfg.infra, items) == [], (subject, cfg.split)  # same uid, same folder
            cached = list(cfg.run_windows(items))  # read from the cache: nothing is missing
            fresh = list(compute_run_windows(cfg, items))
            assert len(cached) == len(fresh) == len(items)
            for a, b in zip(cached, fresh):
                assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
                np.testing.assert_array_equal(a, b)
            n_voxels.add(cached[0].shape[1])
        assert f"subject {subject}: {n_items} run items (" in proc.stderr
        assert f"): 0 cached, {n_items} to compute" in proc.stderr
        assert f"subject {subject}: windows cached (test: " in proc.stderr
    assert len(n_voxels) == 2  # each subject's own data
    # one cache folder per subject, none other (a config differing from eval.py's would add one)
    assert len(list(cache.glob("dynadiff.config.NsdDatasetConfig.run_windows,1/*"))) == 2

    # the same command again computes nothing
    with caplog.at_level(logging.INFO):
        assert prepare_data.main(["--skip-download", "--workers", "1", "--path", str(two_subject_nsd),
                                  "--subjects", "1", "2", "--windows", "all", "--cache", str(cache),
                                  "--sessions", "1"]) == 0
    assert caplog.text.count(" cached, 0 to compute") == 2


def test_windows_of_one_split_only(two_subject_nsd, tmp_path):
    cache = tmp_path / "cache"
    assert prepare_data.main(["--skip-download", "--workers", "1", "--path", str(two_subject_nsd), "--subjects", "2",
                              "--windows", "test", "--cache", str(cache), "--sessions", "1"]) == 0
    test_cfg, train_cfg = _script_configs(two_subject_nsd, cache, 2)
    assert jobs.missing_items(test_cfg.infra, list_trials(test_cfg)[0]) == []
    train_items = list_trials(train_cfg)[0]
    assert jobs.missing_items(train_cfg.infra, train_items) == train_items


def test_synthetic_data_then_its_windows(tmp_path, monkeypatch):
    """--synthetic with --windows: the windows of the sessions the synthetic data has (no --sessions needed)."""
    from dynadiff.data import synthetic

    write = synthetic.write_synthetic_nsd
    monkeypatch.setattr(synthetic, "write_synthetic_nsd",  # a smaller one: session 1 only
                        lambda root, **kw: write(root, sessions=(1,), n_unique=8, n_test=4, **kw))
    root, cache = tmp_path / "mini", tmp_path / "cache"
    assert prepare_data.main(["--synthetic", "--path", str(root), "--subjects", "1", "--windows", "test",
                              "--cache", str(cache), "--workers", "1"]) == 0
    cfg = _script_configs(root, cache, 1)[0]
    items = list_trials(cfg)[0]
    assert items and jobs.missing_items(cfg.infra, items) == []


def _args(*argv: str):
    return prepare_data.build_parser().parse_args(["--skip-download", *argv])


def test_cache_folder_and_splits_follow_eval_py(tmp_path):
    """--cache wins over the YAML's folder, which wins over config/config.yaml's ./cache, as in eval.py."""
    yaml_path = tmp_path / "infra.yaml"
    yaml_path.write_text(f"task_infra_data:\n  cluster: null\n  folder: {tmp_path / 'from_yaml'}\n"
                         "  cpus_per_task: 3\ntrain:\n  cpus_per_task: 2\n")
    cases = [([], "./cache"), (["--infra-yaml", str(yaml_path)], str(tmp_path / "from_yaml")),
             (["--infra-yaml", str(yaml_path), "--cache", str(tmp_path / "c")], str(tmp_path / "c")),
             (["--cache", str(tmp_path / "c")], str(tmp_path / "c"))]
    for argv, folder in cases:
        ours = prepare_data.windows_config(_args("--windows", "test", *argv), 1, "test", None)
        theirs = eval_script.build_config(eval_script.parse_args(["--subject", "1", *argv])).data.nsd_dataset_config
        assert str(ours.infra.folder) == str(theirs.infra.folder) == folder, argv
        assert ours.infra.uid_folder() == theirs.infra.uid_folder()
        assert ours.infra.cpus_per_task == theirs.infra.cpus_per_task
        assert (ours.infra.cpus_per_task == 3) == ("--infra-yaml" in argv)
    assert prepare_data.window_splits(_args()) == ()
    assert prepare_data.window_splits(_args("--infra-yaml", str(yaml_path))) == ("test", "train")
    assert prepare_data.window_splits(_args("--infra-yaml", str(yaml_path), "--windows", "train")) == ("train",)
    assert prepare_data.window_splits(_args("--windows", "all")) == ("test", "train")


@pytest.mark.parametrize("argv, message", [
    (["--nsd_bucket", "s3://b", "--download-only", "--windows", "test"], "--download-only only downloads"),
    (["--nsd_bucket", "s3://b", "--download-only", "--infra-yaml", "x.yaml"], "--download-only only downloads"),
    (["--skip-download", "--cache", "c"], "--cache is the cache of the fMRI windows"),
    (["--skip-download", "--windows", "val"], "invalid choice: 'val'"),
])
def test_bad_usage_exits_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        prepare_data.main([*argv, "--path", str(tmp_path / "nsd")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_infra_yaml_exits_2_before_anything_is_written(tmp_path, caplog):
    yaml_path = tmp_path / "infra.yaml"
    yaml_path.write_text("task_infra_data:\n  cluster: slurm\n  cpus: 4\n")
    root = tmp_path / "nsd"
    with caplog.at_level(logging.ERROR):
        code = prepare_data.main(["--skip-download", "--path", str(root), "--infra-yaml", str(yaml_path)])
    assert code == 2
    assert "unknown key(s) ['cpus'] in section 'task_infra_data'" in caplog.text
    assert "Traceback" not in caplog.text and not root.exists()


def test_missing_files_of_a_subject_name_them_and_nothing_is_computed(two_subject_nsd, tmp_path, caplog):
    root = _copy(two_subject_nsd, tmp_path / "nsd")
    missing = nsd.Run(2, 1, 3).timeseries_path(root)
    missing.unlink()
    cache = tmp_path / "cache"
    with caplog.at_level(logging.ERROR):
        code = prepare_data.main(["--skip-download", "--workers", "1", "--path", str(root), "--subjects", "1", "2",
                                  "--windows", "all", "--cache", str(cache), "--sessions", "1"])
    assert code == 1
    assert "1 NSD file(s) missing" in caplog.text and str(missing) in caplog.text
    assert "Traceback" not in caplog.text
    for cfg in _script_configs(root, cache, 1):  # checked before any computation
        items = list_trials(cfg)[0]
        assert jobs.missing_items(cfg.infra, items) == items


def _corrupt_run(root: Path) -> Path:
    bad = nsd.Run(2, 1, 3).timeseries_path(root)
    bad.write_bytes(b"not a NIfTI file")
    return bad


def test_a_failed_subject_keeps_the_others_windows_in_process(two_subject_nsd, tmp_path, caplog):
    root = _copy(two_subject_nsd, tmp_path / "nsd")
    bad = _corrupt_run(root)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO):
        code = prepare_data.main(["--skip-download", "--workers", "1", "--path", str(root), "--subjects", "1", "2",
                                  "--windows", "all", "--cache", str(cache), "--sessions", "1"])
    assert code == 1
    assert f"subject 2: cannot read NIfTI file {bad}" in caplog.text
    assert "once the file(s) named above are fixed, run the same command again to compute only what is missing" \
        in caplog.text
    assert "subject 1: windows cached" in caplog.text and "subject 2: windows cached" not in caplog.text
    for cfg in _script_configs(root, cache, 1):
        assert jobs.missing_items(cfg.infra, list_trials(cfg)[0]) == []


def test_a_failed_job_is_reported_after_the_other_subjects_jobs(two_subject_nsd, tmp_path):
    """Cluster jobs (submitit's local executor): subject 2's job raises; subject 1's windows are cached."""
    root = _copy(two_subject_nsd, tmp_path / "nsd")
    bad = _corrupt_run(root)
    yaml_path = tmp_path / "infra.yaml"
    yaml_path.write_text("task_infra_data:\n  cluster: local\n  max_jobs: 1\n  timeout_min: 5\n")
    cache = tmp_path / "cache"
    proc = _run("--path", root, "--subjects", "1", "2", "--sessions", "1", "--infra-yaml", yaml_path, "--cache", cache)
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr
    assert "subject 2: data preparation (fMRI windows): 1 of 1 cluster job(s) failed (on local)" in err, err[-3000:]
    assert f"cannot read NIfTI file {bad}" in err and "_log.err" in err
    missing = re.search(r"(\d+) of (\d+) run item\(s\) missing \(([^)]*)\)", err)
    # one job: the items it finished before the broken run stay cached, none if that came first (exca shuffles)
    assert missing and 0 < int(missing.group(1)) <= int(missing.group(2)), err[-3000:]
    assert "subj02_session01_run03_" in missing.group(3)  # the broken run's items, by uid
    assert "exca.map" not in err  # exca's own logs (a traceback per failed job) are silenced, as in eval.py
    assert "Run the same command again to compute only what is missing" in err
    assert "subject 1: windows cached" in err and "Traceback" not in err
    for cfg in _script_configs(root, cache, 1):
        assert jobs.missing_items(cfg.infra, list_trials(cfg)[0]) == []
    n_broken = 0  # the broken run's items, of either split (which split it has events in depends on the data)
    for cfg in _script_configs(root, cache, 2):
        broken = [item for item in list_trials(cfg)[0] if item.run == nsd.Run(2, 1, 3)]
        assert jobs.missing_items(cfg.infra, broken) == broken
        n_broken += len(broken)
    assert n_broken
