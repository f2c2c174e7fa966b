"""Train a Dynadiff decoder (brain module + UNet LoRA) on NSD.

    python train.py --subject 1 [--output runs/subj01] [KEY=VALUE ...]
    python train.py --subjects 1 2 5 7 --output runs/all     # one model, a subject layer each
    python train.py --output runs/subj01 --resume             # continue an interrupted run exactly
    python train.py --output runs/subj01 --resume --steps 40000   # train a run longer (lr: the 40000-step schedule)
    torchrun --nproc_per_node 8 train.py --subject 1 ...      # data-parallel: one process per GPU (batch per GPU)

Defaults come from config/train.yaml (with --resume: from the run's own
config.yaml); flags override them; KEY=VALUE overrides (any config key,
validated) come last. The checkpoint to evaluate is
{output}/checkpoints/best/model.safetensors (lowest validation loss) or
{output}/checkpoints/last/model.safetensors:

    python eval.py --subject 1 --checkpoint runs/subj01/checkpoints/best/model.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import sys
from pathlib import Path

from dynadiff.cli import ConfigError, apply_overrides, join_option_values, load_yaml, setup_logging, value_overrides
from dynadiff.commands import default_config

logger = logging.getLogger("dynadiff.train")
DEFAULT_CONFIG = default_config("train.yaml")
# custom_infra.yaml sections -> the config keys they set (dynadiff.infra)
INFRA_TARGETS = {"train": "infra", "task_infra_data": "data.nsd_dataset_config.infra"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    who = p.add_mutually_exclusive_group()
    who.add_argument("--subject", type=int,
                     help="NSD subject: 1, 2, 5 or 7 (default: from the config, 1); with a BIDS source, the "
                     "participant whose label ends with it")
    who.add_argument("--subjects", type=int, nargs="+", metavar="S",
                     help="several subjects, one model with a subject layer each (e.g. --subjects 1 2 5 7)")
    p.add_argument("--output", type=Path, help="run folder: checkpoints, log.csv, samples (default runs/train)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint "
                   "(with --steps: to that many steps, the learning rate following their schedule from there on)")
    p.add_argument("--cache", type=Path, help="cache folder of the fMRI windows, and with --infra-yaml of the "
                   "training job (default ./cache)")
    p.add_argument("--vd_cache_dir", type=Path, help="local Versatile Diffusion folder (Hugging Face layout)")
    p.add_argument("--infra-yaml", type=Path, help="cluster resources (custom_infra.yaml, section 'train')")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, help="samples per micro-batch")
    p.add_argument("--window", metavar="START:STOP", help="the fMRI window in TRs from the onset volume t: volumes "
                   "t+START .. t+STOP-1 (published: 3:9; 1 TR: e.g. 4:5); sets data.nsd_dataset_config.offset and "
                   "duration (seconds)")
    p.add_argument("--first-sessions", type=int, metavar="K",
                   help="train on the subject's first K sessions only, in chronological order (of those "
                   "data.nsd_dataset_config.sessions names; a BIDS dataset's ses- labels by their number)")
    p.add_argument("--init-from", type=Path, metavar="CHECKPOINT",
                   help="start from a train.py checkpoint (of one subject or several): its weights, its subjects' "
                   "layers kept, a new layer for each subject of this run it lacks (docs/training.md, 'A new "
                   "subject'); init_subject_steps=N: the first N steps train the subject layers alone")
    p.add_argument("--config", type=Path, help="base YAML config (default config/train.yaml; with --resume, the run's)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, applied last")
    # `--window -3:3`: argparse would take -3:3 for an option; joined, it is --window's value
    argv = join_option_values(sys.argv[1:] if argv is None else list(argv), ("--window",),
                              accept=lambda v: re.match(r"-\d", v) is not None)
    return p.parse_intermixed_args(argv)  # KEY=VALUE overrides may come between flags


# options that set one config key to their value
FLAG_KEYS = {"output": "output_dir", "vd_cache_dir": "versatilediffusion_config.vd_cache_dir", "device": "device",
             "steps": "steps", "batch_size": "batch_size"}


def flag_overrides(args: argparse.Namespace) -> list[str]:
    out = value_overrides(args, FLAG_KEYS)
    if args.subject is not None:
        out += ["data.subjects=null", f"data.nsd_dataset_config.subject={args.subject}"]
    if args.subjects is not None:
        out += [f"data.subjects=[{','.join(map(str, args.subjects))}]", f"data.nsd_dataset_config.subject={args.subjects[0]}"]
    if args.resume:
        out.append("resume=true")
    if args.window is not None:
        out += window_keys(args.window)
    if args.first_sessions is not None:
        out.append(f"data.nsd_dataset_config.first_sessions={args.first_sessions}")
    if args.cache is not None:
        out.append(f"data.nsd_dataset_config.infra.folder={args.cache}")
        if args.infra_yaml is not None:  # the training job's exca folder (submitit logs, cached result)
            out.append(f"infra.folder={args.cache}")
    return out


def window_keys(text: str) -> list[str]:
    """``--window START:STOP`` -> the offset and duration (seconds) whose volumes are t+START .. t+STOP-1."""
    from dynadiff.data.preprocess import window_seconds

    try:
        start, stop = (int(x) for x in text.split(":"))
        offset, duration = window_seconds(start, stop)
    except ValueError:
        raise ConfigError(f"--window {text}: expected START:STOP, integers in TRs from the onset with STOP > START "
                          "(e.g. 3:9, the published 6-TR window, or 4:5, one TR)") from None
    return [f"data.nsd_dataset_config.offset={offset!r}", f"data.nsd_dataset_config.duration={duration!r}"]


def base_config(args: argparse.Namespace) -> dict:
    """config/train.yaml, or, with --resume and no --config, the run's saved config.yaml."""
    if args.config is not None:
        return load_yaml(args.config)
    if args.resume and args.output is not None and (args.output / "config.yaml").exists():
        saved = load_yaml(args.output / "config.yaml")
        saved.pop("resume", None)
        return saved
    return load_yaml(DEFAULT_CONFIG)


def build_config(args: argparse.Namespace):
    from dynadiff.config import TrainConfig

    overrides = []  # precedence: config file < --infra-yaml < flags < KEY=VALUE (as eval.py)
    if args.infra_yaml is not None:
        from dynadiff.infra import infra_overrides, load_infra_yaml

        overrides += infra_overrides(args.infra_yaml, INFRA_TARGETS)
        train_section = load_infra_yaml(args.infra_yaml).get("train")
        if train_section is not None and train_section.folder is None:  # null: the cache folder (--cache wins)
            overrides.append("infra.folder=./cache")
    flags = flag_overrides(args)
    items = overrides + flags + list(args.overrides)
    if args.init_from is not None:
        items.append(f"init_from={json.dumps(str(args.init_from))}")
    if any(item.split("=", 1)[0].strip() == "init_from" for item in items):
        from dynadiff.cli import override_tree
        from dynadiff.resolve import given_keys, with_pretrained

        # completed from the checkpoint it starts from (its subjects, width, brain module, window, LoRA)
        return with_pretrained(override_tree(TrainConfig, base_config(args), items),
                               given_keys([*flags, *args.overrides]))
    return apply_overrides(TrainConfig, base_config(args), items)


def check_before_run(cfg) -> None:
    """What can be checked here before a (possibly cluster) run: paths, --resume, the device (locally only)."""
    from dynadiff.device import check_device_available
    from dynadiff.training import check_inputs, check_output

    from dynadiff.training.distributed import detect_world
    from dynadiff.training import TrainingError

    check_inputs(cfg)
    world = detect_world()
    if world.launcher == "torchrun" and cfg.infra.cluster is not None:
        raise TrainingError(f"train.py runs under torchrun ({world.size} processes) but the infra asks for a cluster "
                            f"job (infra.cluster={cfg.infra.cluster}): use one or the other (for a multi-task cluster "
                            "job: nodes and tasks_per_node in the infra YAML, without torchrun)")
    if cfg.infra.cluster is None:  # the training runs in this process: its device must be here
        check_device_available(cfg.device)  # (a cluster node may have GPUs that this machine lacks)
    elif cfg.resume:  # before submitting the job (which checks again): --resume, and --steps against the checkpoint
        tasks = (cfg.infra.nodes or 1) * (cfg.infra.tasks_per_node or 1)
        check_output(cfg, Path(cfg.output_dir), tasks)


def resume_hint(cfg, argv: list[str]) -> str:
    """After Ctrl-C: what the run folder kept, and the command that continues (or restarts) the run."""
    from dynadiff.training import MODEL_FILE, complete_checkpoint_dir, read_resume_state

    script = sys.argv[0] if Path(sys.argv[0]).name == "train.py" else "train.py"
    base = [a for a in argv if a != "--resume"]
    if cfg is None:
        return "interrupted before the training started: nothing was written; run the same command to start it"
    out = Path(cfg.output_dir)
    if cfg.infra.cluster is not None:
        return ("interrupted: train.py stopped waiting, but the training job goes on on the cluster (cancel it with "
                f"scancel to stop it); its checkpoints are in {out / 'checkpoints' / 'last'}. Run the same command "
                "to wait for it again")
    last = complete_checkpoint_dir(out / "checkpoints" / "last")
    try:
        step = read_resume_state(last).step if last is not None else None
    except Exception:  # noqa: BLE001 - interrupted while writing its first checkpoint: as if none
        step = None
    if step is None:
        return (f"interrupted before the first checkpoint: nothing was kept in {out}. Start again with the same "
                f"command, without --resume:\n  {shlex.join([sys.executable, script, *base])}")
    return (f"interrupted: kept the checkpoint of step {step} ({last / MODEL_FILE}) and log.csv up to step "
            f"{step}; the steps after it are lost. Continue the run with:\n  "
            f"{shlex.join([sys.executable, script, *base, '--resume'])}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    setup_logging(args.verbose)
    built: dict = {}  # the config, once built: what Ctrl-C reports
    try:
        return run(args, built)
    except KeyboardInterrupt:
        logger.error("%s", resume_hint(built.get("cfg"), argv))
        return 130


def run(args: argparse.Namespace, built: dict) -> int:
    import exca  # noqa: F401 - importing exca sets its logger's level (INFO): set ours after it

    # exca logs a failed task's traceback as a warning (twice: its handler and ours); our errors say what to do
    logging.getLogger("exca").setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    from dynadiff.checkpoint import CheckpointError
    from dynadiff.data.nsd import NsdDataError
    from dynadiff.training.distributed import DistributedSetupError, detect_world
    from dynadiff.training import TrainingError

    from dynadiff import jobs

    try:
        cfg = built["cfg"] = build_config(args)
        check_before_run(cfg)
        before = jobs.snapshot(cfg.infra)
        world = detect_world()
        if world.distributed:  # one of torchrun's processes: every one trains (no exca job, no shared result)
            from dynadiff.training import train

            result = train(cfg)
            if not world.is_main:
                return 0
        else:
            result = cfg.run()
    except ConfigError as e:
        logger.error("%s", e)
        return 2
    except (TrainingError, NsdDataError, CheckpointError, FileNotFoundError, DistributedSetupError) as e:
        logger.error("%s", e)
        return 1
    except jobs.JOB_ERRORS as e:  # the training job failed (cluster run)
        logger.error("%s\nTo continue from the last checkpoint, add --resume.",
                     jobs.failure_report(cfg.infra, "training", before, error=e))
        return 1
    print(json.dumps(result, indent=1))
    commands = result["eval_command"].splitlines()  # one per subject
    print("Evaluate with:" + (f" {commands[0]}" if len(commands) == 1 else "".join(f"\n  {c}" for c in commands)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
