"""Data-parallel training (issue 14): ``train.py`` under ``torchrun`` with gloo on the CPU.

Two processes with batch B give, after a few steps, the weights and AdamW moments of one process with batch
2B and the same sample order, to float tolerance (the gradients are averaged, the data split, the random
draws those of the global batch); the sharded optimizer (ZeRO-1) is used there. A rank killed mid-run makes
torchrun fail at once, naming the rank; ``--resume`` continues bit for bit. The pieces (sample split, draws,
dropout masks, device and resume checks) are tested in this process.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scripts import load_script, started

from dynadiff.training.distributed import BatchShareDropout, World, _Share, resolve_device, share_dropout
from dynadiff.training import SampleStream, StepBatches, TrainingError, check_output, read_resume_state

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
# tiny decoder; eps=1 makes AdamW's update about lr * m (no sign-like first steps that turn float rounding of a
# near-zero gradient into a full learning-rate step), so two runs equal up to rounding stay close
TINY = [
    "data.nsd_dataset_config.sessions=[1,21]", "data.nsd_dataset_config.image_size=32",
    "versatilediffusion_config.image_size=32", "data.num_workers=0", "progress=false", "cpu_threads=1",
    "brain_modules_config.hidden=16", "brain_modules_config.n_tokens=4", "brain_modules_config.dropout=0.5",
    "versatilediffusion_config.num_inference_steps=2", "optim.warmup_steps=2", "optim.lr=0.1", "optim.eps=1.0",
    "log_every=1", "val_every=2", "val_max_samples=8", "sample_every=0", "checkpoint_every=2",
    "data.val_fraction=0.1",
]


@pytest.fixture(scope="module")
def cli(synthetic_nsd, train_vd, tmp_path_factory):
    nsd, _ = synthetic_nsd
    cache = tmp_path_factory.mktemp("ddp_cache")

    def args(out: Path, *extra: str) -> list[str]:
        return [str(REPO / "train.py"), "--subject", "1", "--output", str(out), "--cache", str(cache),
                "--vd_cache_dir", str(train_vd), "--device", "cpu", f"data.nsd_dataset_config.nsddata_path={nsd}",
                *TINY, *extra]

    return args


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1")


def _torchrun(nproc: int, args: list[str]) -> list[str]:
    return [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", *args]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _tensors(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "last" / f"{name}.safetensors"))


def _rows(run: Path) -> list[dict]:
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(cli, tmp_path_factory):
    """4 steps of 2 micro-batches: one process with batch 4; two torchrun processes with batch 2 and the
    sharded optimizer."""
    root = tmp_path_factory.mktemp("ddp")
    common = ["--steps", "4", "grad_accumulation=2"]
    one = _run([sys.executable, *cli(root / "one", "--batch-size", "4", *common)])
    two = _run(_torchrun(2, cli(root / "two", "--batch-size", "2", "shard_optimizer=true", *common)))
    return {"root": root, "one": root / "one", "two": root / "two", "two_proc": two, "one_proc": one}


def test_two_processes_of_batch_b_equal_one_process_of_batch_2b(runs, make_train_config):
    one, two = runs["one"], runs["two"]
    from dynadiff.checkpoint import trainable_state_dict
    from dynadiff.training import build_training_data, init_model

    cfg = make_train_config("brain_modules_config.hidden=16", "brain_modules_config.n_tokens=4")
    data = build_training_data(cfg)
    start = {k: v.detach() for k, v in trainable_state_dict(init_model(cfg, data)).items()}  # published names
    wa, wb = _tensors(one, "model"), _tensors(two, "model")
    assert wa.keys() == wb.keys() and len(wa) > 50
    for k in wa:  # the runs agree to rounding, far closer than how much training moved the weights
        moved = float((wa[k] - start[k]).norm())
        assert moved > 0, k
        assert float((wa[k] - wb[k]).norm()) <= 1e-3 * moved + 1e-7, k
    sa, sb = _tensors(one, "state"), _tensors(two, "state")
    assert sa.keys() == sb.keys()
    for k in sa:  # AdamW moments: the averaged gradients (sharded optimizer consolidated on rank 0)
        assert float((sa[k] - sb[k]).norm()) <= 1e-3 * float(sa[k].norm()), k
    # log.csv, from rank 0 only: the losses are the global batch's mean, equal at every step
    ra, rb = _rows(one), _rows(two)
    train_a = [r for r in ra if r["split"] == "train"]
    train_b = [r for r in rb if r["split"] == "train"]
    assert [r["step"] for r in train_a] == [r["step"] for r in train_b] == ["1", "2", "3", "4"]
    for a, b in zip(train_a, train_b):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
        assert float(a["grad_norm"]) == pytest.approx(float(b["grad_norm"]), rel=2e-3)
        assert float(a["epoch"]) == pytest.approx(float(b["epoch"]))  # 8 samples a step in both
    err = runs["two_proc"].stderr
    assert "global batch: 8 samples per optimizer step = batch_size 2 x 2 process(es) x grad_accumulation 2" in err
    assert "optimizer state sharded" in err
    assert runs["two_proc"].stdout.count('"world_size": 2') == 1  # one summary: rank 0's
    assert read_resume_state(two / "checkpoints" / "last").world_size == 2
    assert sorted(p.name for p in (two / "logs").iterdir()) == ["rank0.log", "rank1.log"]


def test_validation_loss_is_reduced_over_ranks(runs, make_train_config):
    """The 2-process validation loss (batches split over the ranks, sums added) is the one-process value at the
    same batch size, recomputed here from the saved weights."""
    from dynadiff.checkpoint import load_checkpoint
    from dynadiff.training import build_training_data, init_model, validation_loss

    two = runs["two"]
    cfg = make_train_config("brain_modules_config.hidden=16", "brain_modules_config.n_tokens=4", "batch_size=2",
                            "val_max_samples=8")
    data = build_training_data(cfg)
    model = init_model(cfg, data)
    load_checkpoint(model, two / "checkpoints" / "last" / "model.safetensors")
    logged = [float(r["loss"]) for r in _rows(two) if r["split"] == "val"]
    assert len(logged) == 2
    assert validation_loss(model, data.val, cfg, None, 8) == pytest.approx(logged[-1], rel=1e-5)


def test_resuming_with_another_world_size_is_refused(runs, make_train_config, cli):
    two = runs["two"]
    cfg = make_train_config("brain_modules_config.hidden=16", "brain_modules_config.n_tokens=4", "batch_size=2",
                            "grad_accumulation=2", "resume=true", out=two)
    with pytest.raises(TrainingError, match=r"cannot resume .* with 1 process\(es\): it was trained by 2 \(global "
                                            r"batch 8 = batch_size 2 x 2 x grad_accumulation 2\); resume it with 2"):
        check_output(cfg, two, world_size=1)
    # train.py in one process says it in one line, exit status 1
    script = load_script("train")
    assert script.main(cli(two, "--batch-size", "2", "--steps", "4", "grad_accumulation=2", "--resume")[1:]) == 1


def test_a_killed_rank_fails_the_run_at_once(runs, cli):
    """Rank 1 gets SIGKILL after the first checkpoint: torchrun stops rank 0 and exits non-zero within seconds,
    naming rank 1 as the root cause; the checkpoint is kept (--resume of a multi-process run: tests/slurm)."""
    run = runs["root"] / "killed"
    args = cli(run, "--batch-size", "2", "--steps", "40", "val_every=0")
    with started(_torchrun(2, args), _env()) as proc:
        checkpoint = run / "checkpoints" / "last" / "state.safetensors"
        deadline = time.monotonic() + 120
        while not checkpoint.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.02)
        (rank1,) = [pid for pid in _children(proc.pid) if _environ(pid).get("RANK") == "1"]
        os.kill(rank1, signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - killed_at < 30  # no hang
    assert re.search(r"Root Cause.*?rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: -9", err, re.S), err[-3000:]
    assert (run / "logs" / "rank1.log").exists()
    assert 0 < read_resume_state(run / "checkpoints" / "last").step < 40


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, parent in parents.items() if parent == p]
        out += kids
        todo += kids
    return out


def _environ(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


# ----------------------------------------------------------------------------- the pieces, in this process


def test_ranks_take_contiguous_shares_of_the_one_process_batches():
    stream = SampleStream(23, seed=4)  # steps run over epoch ends
    single = list(StepBatches(stream, 6, 2, 3, 7))
    for world in (2, 3):
        shares = [list(StepBatches(stream, 6 // world, 2, 3, 7, r, world)) for r in range(world)]
        assert all(len(s) == len(single) for s in shares)
        for m, batch in enumerate(single):
            assert sum((s[m] for s in shares), []) == batch
    with pytest.raises(ValueError, match="rank 2 is not within world_size 2"):
        StepBatches(stream, 3, 1, 0, 1, 2, 2)


def test_global_batch_dropout_keeps_the_rows_of_the_one_process_mask():
    x = torch.randn(6, 5, 7)
    torch.manual_seed(3)
    whole = torch.nn.functional.dropout(x, 0.4, training=True)
    share = _Share()
    drop = BatchShareDropout(0.4, share)
    for start in (0, 2, 4):
        share.value = (start, 6)
        torch.manual_seed(3)
        assert torch.equal(drop(x[start:start + 2]), whole[start:start + 2])  # bit for bit (CPU)
    share.value = None
    torch.manual_seed(3)
    assert torch.equal(drop(x), whole)  # no share: nn.Dropout
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.2), torch.nn.Sequential(torch.nn.Dropout(0.1)))
    keys = list(model.state_dict())
    assert share_dropout(model, share) == 2 and list(model.state_dict()) == keys
    assert isinstance(model[1], BatchShareDropout) and model[2][0].p == 0.1


def test_training_loss_of_a_share_draws_the_global_batch_rows(make_train_config):
    """Rows 0-1 and 2-3 computed apart (share) average to the loss of the 4 rows at once with the same
    generator seed; share (0, B) is the unshared loss bit for bit."""
    from dynadiff.training import build_training_data, collate, init_model

    cfg = make_train_config("brain_modules_config.dropout=0", "brain_modules_config.block_dropout=0")
    data = build_training_data(cfg)
    model = init_model(cfg, data)
    model.train()
    batch = collate([data.train[i] for i in (5, 17, 3, 40)])

    def loss(rows, share=None):
        g = torch.Generator().manual_seed(9)
        return model.training_loss(batch["brain"][rows], batch["img"][rows], batch["subject_idx"][rows], generator=g,
                                   share=share)

    with torch.no_grad():
        whole = loss(slice(0, 4))
        assert torch.equal(loss(slice(0, 4), (0, 4)), whole)
        halves = (loss(slice(0, 2), (0, 4)) + loss(slice(2, 4), (2, 4))) / 2
        wrong = (loss(slice(0, 2)) + loss(slice(2, 4))) / 2  # each half drawing for itself: other noise
    assert float(halves) == pytest.approx(float(whole), rel=1e-5)
    assert abs(float(wrong) - float(whole)) > 1e-3
    with pytest.raises(ValueError, match=r"rows 3..4 are not within a batch of 4"):
        loss(slice(0, 2), (3, 4))


def test_device_of_a_process(monkeypatch):
    world = World(rank=1, size=2, local_rank=1, local_size=2, launcher="torchrun")
    assert resolve_device("cpu", world) == torch.device("cpu")
    with pytest.raises(TrainingError, match=r"device=cuda:1 with 2 processes: give device=cuda"):
        resolve_device("cuda:1", world)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(TrainingError, match=r"2 processes on this node but 1 GPU\(s\) visible: one process per GPU "
                                            r"\(torchrun --nproc_per_node 1\), or device=cpu"):
        resolve_device("cuda", world)
    assert resolve_device("cuda", World(1, 2, 1, 2, "slurm")) == torch.device("cuda", 0)  # a GPU bound per task
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device("auto", world) == torch.device("cuda", 1)


def test_world_from_torchrun_environment():
    from dynadiff.training.distributed import DistributedSetupError, detect_world

    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert detect_world(env) == World(3, 4, 1, 2, "torchrun")
    assert detect_world({}) == World()
    with pytest.raises(DistributedSetupError, match="WORLD_SIZE is missing or not an integer"):
        detect_world({"RANK": "0"})


def test_task_keys_belong_to_the_train_section(tmp_path):
    from dynadiff.cli import ConfigError
    from dynadiff.config import TrainConfig
    from dynadiff.infra import infra_overrides

    path = tmp_path / "infra.yaml"
    path.write_text("train:\n  cluster: slurm\n  folder: /tmp/x\n  tasks_per_node: 2\n  gpus_per_node: 2\n")
    assert set(infra_overrides(path, {"train": "infra"})) >= {"infra.tasks_per_node=2", "infra.slurm_use_srun=true"}
    path.write_text("task_infra_data:\n  nodes: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['nodes'\] in section 'task_infra_data' \(\['nodes', "
                                          r"'tasks_per_node'\]: processes of a data-parallel training job"):
        infra_overrides(path, {})
    with pytest.raises(ValueError, match=r"nodes x tasks_per_node = 2 processes need a cluster"):
        TrainConfig(infra={"tasks_per_node": 2})


def test_shard_optimizer_and_timeout_may_change_on_resume(tmp_path):
    from dynadiff.training import config_differences

    assert config_differences({"shard_optimizer": False, "dist_timeout_s": 60}, {"shard_optimizer": True,
                                                                              "dist_timeout_s": 600}) == []


def test_torchrun_with_a_cluster_in_the_infra_is_refused(make_train_config, monkeypatch, tmp_path):
    """Under torchrun (WORLD_SIZE 2) with a cluster job asked for: a one-line error before anything runs."""
    from scripts import load_script

    from dynadiff.training import TrainingError

    train_script = load_script("train")
    cfg = make_train_config("infra.cluster=slurm", f"infra.folder={tmp_path / 'jobs'}")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(TrainingError, match=r"runs under torchrun \(2 processes\) but the infra asks for a cluster "
                                            r"job \(infra.cluster=slurm\): use one or the other"):
        train_script.check_before_run(cfg)
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process (torchrun --nproc_per_node 1): the cluster job is fine
    monkeypatch.setenv("RANK", "0")
    train_script.check_before_run(cfg)
