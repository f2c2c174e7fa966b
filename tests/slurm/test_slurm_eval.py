"""``eval.py --infra-yaml`` through the local SLURM cluster, on the mini-NSD with a tiny model.

One run prepares the data as SLURM jobs and generates the test images as a
job array; its images must equal a local run's, bit for bit, at ``--batch-size 4``
(the local run samples one batch of 4, each job a batch of 2 padded to 4). A second run (another sampler
seed, so every image is regenerated) loses one job to ``scancel``: the report
names it and its logs, the other job's images stay cached, and the rerun
submits only the missing images.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scripts import started

REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 4
INFRA_YAML = """\
task_infra_data:
  cluster: slurm
  cpus_per_task: 1
  max_jobs: 2
  min_samples_per_job: 1
  timeout_min: 10
map_infra_image_generation:
  cluster: slurm
  cpus_per_task: 1
  gpus_per_node: 0
  max_jobs: 2
  min_samples_per_job: 1
  timeout_min: 10
train:
  cluster: slurm
  cpus_per_task: 1
"""


@pytest.fixture(scope="module")
def tiny(slurm_available, synthetic_nsd, tmp_path_factory):
    """Tiny VD folder, a checkpoint with non-zero LoRA, the infra YAML and the common eval.py arguments."""
    import torch

    from dynadiff.checkpoint import save_checkpoint
    from dynadiff.models.config import FmriMLPConfig, VersatileDiffusionConfig
    from dynadiff.models.tiny import write_tiny_vd

    nsd, info = synthetic_nsd
    root = tmp_path_factory.mktemp("slurm_eval")
    vd = write_tiny_vd(root / "vd")
    model = VersatileDiffusionConfig(vd_cache_dir=vd, image_size=64).build(FmriMLPConfig(hidden=32),
                                                                           n_voxels=info["n_voxels"][1])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero: make the brain signal reach the images
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ckpt = save_checkpoint(model, root / "subj01.safetensors")
    infra = root / "infra.yaml"
    infra.write_text(INFRA_YAML)
    args = ["--subject", "1", "--vd_cache_dir", str(vd), "--checkpoint", str(ckpt), "--device", "cpu",
            "--batch-size", "4", "--limit", str(N_IMAGES), "--no-blur-faces", "--metrics", "pixcorr",
            f"data.nsd_dataset_config.nsddata_path={nsd}", "data.nsd_dataset_config.sessions=[1,21]",
            "brain_modules_config.hidden=32", "versatilediffusion_config.image_size=64",
            "versatilediffusion_config.num_inference_steps=2"]
    return {"root": root, "infra": infra, "args": args}


def _eval_cmd(tiny, cache: Path, *extra: str, infra: bool = True) -> list[str]:
    cmd = [sys.executable, str(REPO / "eval.py"), *tiny["args"], "--cache", str(cache), *extra]
    return cmd + (["--infra-yaml", str(tiny["infra"])] if infra else [])


def _env(cluster=None) -> dict:
    """eval.py's environment, which its SLURM jobs inherit: the cluster's commands first on PATH, and one
    OpenMP thread per process (jobs share the machine's cores; two threads each would thrash)."""
    return dict(os.environ if cluster is None else cluster.env(), OMP_NUM_THREADS="1")


def _run(cmd: list[str], cluster=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(cluster), capture_output=True, text=True, timeout=420)


def _images(cache: Path) -> list[np.ndarray]:
    out = cache / "reconstructions_subj01_unaveraged"
    return [np.asarray(Image.open(out / f"{i}.png")) for i in range(N_IMAGES)]


def _job_dirs(cache: Path, step: str) -> set[str]:
    """Job ids with a folder in exca's logs of ``step`` (e.g. ``ReconstructionConfig.generate``)."""
    folders = cache.glob(f"dynadiff.config.{step},*/*/logs/*/*")  # any cache version
    return {p.name for p in folders if (p / f"{p.name}_submitted.pkl").exists()}


def _new_jobs(cluster, before: set[str], prefix: str) -> list[dict]:
    return [j for j in cluster.jobs() if j["id"] not in before and j["name"].startswith(prefix)]


@pytest.fixture(scope="module")
def local_run(tiny):
    cache = tiny["root"] / "local"
    proc = _run(_eval_cmd(tiny, cache, infra=False))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _images(cache)


@pytest.fixture(scope="module")
def slurm_run(tiny, slurm_cluster):
    cache = tiny["root"] / "cluster"
    before = {j["id"] for j in slurm_cluster.jobs()}
    proc = _run(_eval_cmd(tiny, cache), slurm_cluster)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"cache": cache, "jobs": [j for j in slurm_cluster.jobs() if j["id"] not in before]}


def test_data_preparation_runs_as_slurm_jobs(slurm_run):
    data_jobs = [j for j in slurm_run["jobs"] if j["name"].startswith("NsdDatasetConfig")]
    assert data_jobs and all(j["state"] == "COMPLETED" for j in data_jobs)
    # the jobs SLURM ran are those exca logged for the windows cache
    assert {j["id"] for j in data_jobs} == _job_dirs(slurm_run["cache"], "NsdDatasetConfig.run_windows")


def test_generation_job_array_gives_the_local_images_in_order(slurm_run, local_run):
    gen_jobs = [j for j in slurm_run["jobs"] if j["name"].startswith("ReconstructionConfig")]
    assert len(gen_jobs) == 2 and len({j["array"] for j in gen_jobs}) == 1  # one array of 2 tasks
    assert all(j["state"] == "COMPLETED" for j in gen_jobs)
    assert {j["id"] for j in gen_jobs} == _job_dirs(slurm_run["cache"], "ReconstructionConfig.generate")
    cluster_images = _images(slurm_run["cache"])
    assert not np.array_equal(local_run[0], local_run[1])  # distinct images: an order mix-up would show
    for i, (a, b) in enumerate(zip(local_run, cluster_images)):
        np.testing.assert_array_equal(b, a, err_msg=f"image {i}: SLURM run differs from the local run")


def test_killed_job_keeps_the_others_images_and_the_rerun_fills_in_the_rest(tiny, slurm_run, local_run,
                                                                           slurm_cluster):
    cache = slurm_run["cache"]  # windows already cached: only generation runs
    seed = ["versatilediffusion_config.seed=7"]  # new images, same data
    before = {j["id"] for j in slurm_cluster.jobs()}
    with started(_eval_cmd(tiny, cache, *seed), _env(slurm_cluster)) as proc:
        deadline = time.monotonic() + 120
        while not (tasks := _new_jobs(slurm_cluster, before, "ReconstructionConfig")):
            assert proc.poll() is None and time.monotonic() < deadline, "no generation job was submitted"
            time.sleep(0.1)
        victim = f"{tasks[0]['array']}_1"
        subprocess.run(["scancel", victim], env=slurm_cluster.env(), check=True)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert "image generation: 1 of 2 cluster job(s) failed (on slurm)" in err, err[-3000:]
    assert f"job {victim}: CANCELLED" in err
    logs = re.search(r"logs: (\S.*_log\.err)\n", err)
    if logs:  # killed while running: its logs exist and say so
        assert "CANCELLED" in Path(logs.group(1)).read_text()
    else:  # killed while pending
        assert "never started" in err
    found = re.search(rf"(\d+) of {N_IMAGES} test image\(s\) missing \(([\d, ]+)\)", err)
    assert found, err[-3000:]
    missing = [int(x) for x in found.group(2).split(",")]
    assert 0 < len(missing) < N_IMAGES and int(found.group(1)) == len(missing)  # the other job's images are kept
    assert "Run the same command again" in err

    before = {j["id"] for j in slurm_cluster.jobs()}
    rerun = _run(_eval_cmd(tiny, cache, *seed, "--verbose"), slurm_cluster)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    k = len(missing)
    assert f"{N_IMAGES - k} of {N_IMAGES} images cached, {k} to generate" in rerun.stderr
    sent = re.findall(r"Sent (\d+) samples for dynadiff\.config\.ReconstructionConfig", rerun.stderr)
    assert sent and {int(s) for s in sent} == {k}  # exca submitted only the missing images
    new = _new_jobs(slurm_cluster, before, "ReconstructionConfig")
    assert len(new) == min(k, 2) and all(j["state"] == "COMPLETED" for j in new)
    assert not _new_jobs(slurm_cluster, before, "NsdDatasetConfig")
    for i, (new_img, old_img) in enumerate(zip(_images(cache), local_run)):  # every image of the new seed
        assert new_img.shape == old_img.shape and not np.array_equal(new_img, old_img), i


def test_resources_the_cluster_refuses_are_one_clear_error(tiny, slurm_run, slurm_cluster):
    """sbatch refuses a GPU on this GPU-less node: the error says so and points at the YAML."""
    yaml_path = tiny["root"] / "gpu.yaml"
    yaml_path.write_text(INFRA_YAML.replace("gpus_per_node: 0", "gpus_per_node: 1"))
    before = {j["id"] for j in slurm_cluster.jobs()}
    cmd = _eval_cmd(tiny, slurm_run["cache"], "versatilediffusion_config.seed=11", infra=False)
    proc = _run(cmd + ["--infra-yaml", str(yaml_path)], slurm_cluster)
    assert proc.returncode == 1
    assert "image generation: submitting the cluster jobs failed (cluster='slurm')" in proc.stderr, proc.stderr[-3000:]
    assert "Invalid generic resource (gres) specification" in proc.stderr
    assert "gpus_per_node" in proc.stderr and "Traceback" not in proc.stderr
    assert not _new_jobs(slurm_cluster, before, "")


def _job_log(cache: Path, job_id: str) -> Path | None:
    logs = list(cache.glob(f"dynadiff.config.ReconstructionConfig.generate,*/*/logs/*/{job_id}/{job_id}_0_log.err"))
    return logs[0] if logs else None


def _wait_for_generation_task(proc, cluster, before: set[str], cache: Path) -> str:
    """A generation array task that runs and has started generating (its log says so), as ``<array>_<i>``."""
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "no generation task ran"
        for j in _new_jobs(cluster, before, "ReconstructionConfig"):
            log = _job_log(cache, j["id"]) if j["state"] == "RUNNING" else None
            if log is not None and "generating" in log.read_text():
                return j["id"]
        time.sleep(0.05)


def _stop_processes(cluster, job_id: str) -> None:
    """SIGSTOP the processes of a running job behind SLURM's back (``scancel --signal=STOP`` would make its
    state STOPPED, which submitit takes for finished): to SLURM it still runs."""
    raw = cluster.raw_ids([job_id])[job_id]  # an array task's own job id
    res = subprocess.run(["scontrol", "listpids", raw], env=cluster.env(), capture_output=True, text=True, check=True)
    pids = [int(line.split()[0]) for line in res.stdout.splitlines()[1:] if line.strip()]
    assert pids, res.stdout
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)


SLOW = ["versatilediffusion_config.num_inference_steps=40"]  # jobs that run for seconds: time to act on one


def test_timed_out_job_is_reported_with_what_to_change(tiny, slurm_run, slurm_cluster):
    """A generation task outlives its 1-minute limit (stopped by SIGSTOP: a job too slow for its limit):
    SLURM kills it (TIMEOUT, about a minute later), the other task's images are kept, and the report
    says which YAML keys to change."""
    cache = slurm_run["cache"]
    yaml_path = tiny["root"] / "timeout.yaml"
    yaml_path.write_text(INFRA_YAML.replace("timeout_min: 10\ntrain", "timeout_min: 1\ntrain"))
    before = {j["id"] for j in slurm_cluster.jobs()}
    cmd = _eval_cmd(tiny, cache, "versatilediffusion_config.seed=13", *SLOW, infra=False)
    with started(cmd + ["--infra-yaml", str(yaml_path)], _env(slurm_cluster)) as proc:
        victim = _wait_for_generation_task(proc, slurm_cluster, before, cache)
        _stop_processes(slurm_cluster, victim)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert "image generation: 1 of 2 cluster job(s) failed (on slurm)" in err, err[-3000:]
    assert f"job {victim}: TIMEOUT\n" in err, err[-3000:]
    assert "give this step more time (its timeout_min in the infra YAML), or split it over more jobs" in err
    assert "will raise again" not in err  # not a bug in the code: no advice to read the log first
    found = re.search(rf"(\d+) of {N_IMAGES} test image\(s\) missing", err)
    assert found and 0 < int(found.group(1)) < N_IMAGES, err[-3000:]  # the other task's images are kept


def test_node_failure_requeues_the_jobs_and_the_run_completes(tiny, slurm_run, slurm_cluster):
    """The node goes DOWN while the generation tasks run: SLURM requeues them, they run again once the node
    is back, and eval.py, which waited, ends with the images of a local run."""
    seed = ["versatilediffusion_config.seed=17", *SLOW]
    cache = slurm_run["cache"]
    before = {j["id"] for j in slurm_cluster.jobs()}
    # the local run (the reference images) goes on meanwhile, one thread: it uses the cores the jobs leave idle
    # (their start, the failure, the requeue) and can only slow them down
    with started(_eval_cmd(tiny, tiny["root"] / "local", *seed, infra=False), _env()) as local, \
            started(_eval_cmd(tiny, cache, *seed), _env(slurm_cluster)) as proc:
        victim = _wait_for_generation_task(proc, slurm_cluster, before, cache)  # its code runs
        try:
            requeued = slurm_cluster.fail_node()
        finally:
            slurm_cluster.restore_node()  # and start the requeued jobs now, not in a few minutes
        assert victim in requeued
        _, err = proc.communicate(timeout=300)
        _, local_err = local.communicate(timeout=420)
    assert local.returncode == 0, local_err[-3000:]
    assert proc.returncode == 0, err[-3000:]
    log = _job_log(cache, victim)
    assert "DUE TO NODE FAILURE" in log.read_text()
    assert log.with_name(log.name.replace(".err", ".out")).read_text().count("Starting with JobEnvironment") == 2
    tasks = _new_jobs(slurm_cluster, before, "ReconstructionConfig")
    assert len(tasks) == 2 and all(j["state"] == "COMPLETED" for j in tasks)
    out = tiny["root"] / "local" / "reconstructions_subj01_unaveraged"
    for i, img in enumerate(_images(cache)):
        np.testing.assert_array_equal(img, np.asarray(Image.open(out / f"{i}.png")),
                                      err_msg=f"image {i}: differs from the local run's after the requeue")


def test_timecourse_runs_its_steps_as_slurm_jobs(tiny, slurm_run, slurm_cluster):
    """timecourse.py --infra-yaml: the cleaned runs as data jobs, the (offset, image) reconstructions as one job
    array; every image the same as a local sweep's (the same per-image PixCorr at every offset)."""
    import json

    cache = slurm_run["cache"]
    before = {j["id"] for j in slurm_cluster.jobs()}
    cmd = [sys.executable, str(REPO / "timecourse.py"), *tiny["args"], "--offsets", "2:5"]
    proc = _run(cmd + ["--cache", str(cache), "--infra-yaml", str(tiny["infra"])], slurm_cluster)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [j for j in slurm_cluster.jobs() if j["id"] not in before]
    series = [j for j in jobs if j["name"].startswith("RunSeriesConfig")]
    gen = [j for j in jobs if j["name"].startswith("SweepGenerationConfig")]
    assert series and all(j["state"] == "COMPLETED" for j in series)
    assert len(gen) == 2 and len({j["array"] for j in gen}) == 1 and all(j["state"] == "COMPLETED" for j in gen)
    local_cache = tiny["root"] / "timecourse_local"
    local = _run(cmd + ["--cache", str(local_cache)])
    assert local.returncode == 0, local.stderr[-3000:]

    def per_image(folder: Path) -> dict:
        summary = json.loads((folder / "timecourse_subj01_unaveraged" / "timecourse.json").read_text())
        return {r["offset"]: r["metrics"]["pixcorr"]["per_image"] for r in summary["rows"]}

    on_slurm, here = per_image(cache), per_image(local_cache)
    assert sorted(on_slurm) == [2, 3, 4] and len(on_slurm[3]) == N_IMAGES
    assert on_slurm == here
    assert on_slurm[2] != on_slurm[3]  # the offsets' images differ: a mix-up would show
