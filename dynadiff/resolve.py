"""The configuration of a command that decodes a checkpoint (``eval.py``, ``timecourse.py``, ``live.py``), resolved
once: the defaults file < ``--infra-yaml`` < flags < ``KEY=VALUE``, then what the checkpoint records, applied as
typed values.

A ``train.py`` checkpoint records the brain module's configuration and the window it was trained on: they replace
the config file's (logged); given on the command line and different, that is a :class:`ConfigError` (the weights
only fit the configuration they were trained with).
"""

from __future__ import annotations

import logging
import typing as tp
from pathlib import Path

from dynadiff.cli import ConfigError, load_yaml, override_tree, set_dotted, validate

if tp.TYPE_CHECKING:
    from dynadiff.config import EvalConfig, TrainConfig
    from dynadiff.decoder import CheckpointInfo

logger = logging.getLogger(__name__)

# custom_infra.yaml sections -> the config keys they set (dynadiff.infra)
INFRA_TARGETS = {"task_infra_data": "data.nsd_dataset_config.infra", "map_infra_image_generation": "image_generation"}


def eval_tree(config: Path, flags: tp.Sequence[str], overrides: tp.Sequence[str],
              infra_yaml: Path | None = None) -> dict:
    """The configuration tree before the checkpoint: ``config`` < ``infra_yaml`` < ``flags`` < ``overrides``
    (each ``KEY=VALUE``, its key checked)."""
    from dynadiff.config import EvalConfig

    items = []
    if infra_yaml is not None:
        from dynadiff.infra import infra_overrides

        items += infra_overrides(infra_yaml, INFRA_TARGETS)
    return override_tree(EvalConfig, load_yaml(config), [*items, *flags, *overrides])


def given_keys(overrides: tp.Sequence[str]) -> set[str]:
    """The keys of ``KEY=VALUE`` items given on the command line."""
    return {o.split("=", 1)[0].strip() for o in overrides if "=" in o}


def with_checkpoint(tree: dict, info: "CheckpointInfo", on_command_line: set[str], **typed: tp.Any) -> "EvalConfig":
    """The configuration of ``tree`` with the checkpoint ``info`` applied: its path, the brain module's
    configuration and window it records, and ``typed`` (more keys, e.g. ``checkpoint_digest``); validated."""
    from dynadiff.config import EvalConfig

    cfg = validate(EvalConfig, tree)
    tree = set_dotted(tree, "checkpoint", info.path)
    for key, value in typed.items():
        tree = set_dotted(tree, key, value)
    if info.brain_config is not None:
        tree = set_dotted(tree, "brain_modules_config", brain_config(cfg, info, on_command_line))
    window = checkpoint_window(cfg, info, on_command_line)
    if window is not None:
        tree = set_dotted(tree, "data.nsd_dataset_config.offset", window["offset"])
        tree = set_dotted(tree, "data.nsd_dataset_config.duration", window["duration"])
    return validate(EvalConfig, tree)


def brain_config(cfg: "EvalConfig", info: "CheckpointInfo", on_command_line: set[str]) -> dict:
    """The brain module's configuration a checkpoint records, checked against the one given (see the module)."""
    given = cfg.brain_modules_config.model_dump(mode="json")
    recorded = info.brain_config
    conflicts = [f"{k}={given[k]!r} (checkpoint: {v!r})" for k, v in recorded.items()
                 if given.get(k) != v and ({f"brain_modules_config.{k}", "brain_modules_config"} & on_command_line)]
    if conflicts:
        raise ConfigError(
            f"brain_modules_config given on the command line disagrees with checkpoint {info.path}, which records "
            f"the configuration it was trained with: {', '.join(conflicts)}. Drop those overrides: eval.py takes the "
            "brain module's configuration from the checkpoint")
    changed = {k: v for k, v in recorded.items() if given.get(k) != v}
    if changed:
        logger.info("brain module configuration from the checkpoint's metadata: %s (the config file has %s)",
                    ", ".join(f"{k}={v}" for k, v in changed.items()),
                    ", ".join(f"{k}={given.get(k)}" for k in changed))
    return dict(recorded)


def checkpoint_window(cfg: "EvalConfig", info: "CheckpointInfo", on_command_line: set[str]) -> dict | None:
    """``{"offset", "duration"}`` of the window the checkpoint was trained on where its volumes differ from the
    config's (None where they do not: 4.6 s and 4.0 s both start at t+3, and are left as given)."""
    from dynadiff.data.preprocess import window_bounds

    recorded = info.window
    if recorded is None:
        return None
    given = cfg.data.nsd_dataset_config
    ours, theirs = (window_bounds(0, w["offset"], w["duration"]) for w in (
        {"offset": given.offset, "duration": given.duration}, recorded))
    if ours == theirs:
        return None
    volumes = "volumes t{:+d} .. t{:+d}".format
    if {"data.nsd_dataset_config.offset", "data.nsd_dataset_config.duration"} & on_command_line:
        raise ConfigError(
            f"the window given on the command line ({volumes(ours[0], ours[1] - 1)}) is not the one checkpoint "
            f"{info.path} was trained on ({volumes(theirs[0], theirs[1] - 1)}: offset={recorded['offset']:g}, "
            f"duration={recorded['duration']:g}). Drop those overrides: the window is taken from the checkpoint")
    logger.info("fMRI window from the checkpoint's training config: %s (offset=%g s, duration=%g s; the config file "
                "has %s)", volumes(theirs[0], theirs[1] - 1), recorded["offset"], recorded["duration"],
                volumes(ours[0], ours[1] - 1))
    return recorded


def resolve_eval(tree: dict, on_command_line: set[str]) -> "EvalConfig":
    """``eval.py``'s configuration: every input checked before any work (:func:`dynadiff.evaluation.preflight`),
    then the checkpoint (resolved, digested, its records) and the data files' digest applied: a rewritten
    checkpoint or data is a new run, never an old run's cached images or metrics."""
    from dynadiff.config import EvalConfig
    from dynadiff.evaluation import preflight

    checked = preflight(validate(EvalConfig, tree))
    return with_checkpoint(tree, checked.checkpoint, on_command_line, checkpoint_digest=checked.checkpoint.digest,
                           data_digest=checked.data_digest)


# what a run from a pretrained model takes from it, unless given on the command line (then they must agree)
PRETRAINED_VD_KEYS = ("dual_attention", "lora_rank", "lora_alpha", "lora_target_modules")


def with_pretrained(tree: dict, on_command_line: set[str]) -> "TrainConfig":
    """``train.py``'s configuration ``tree`` (with ``init_from``), completed from that checkpoint: its subjects,
    input width and digest, and the brain module and LoRA it was trained with (given on the command line, they must
    agree), and its window unless one is given (of as many TRs). A :class:`ConfigError` of one line for a
    checkpoint that cannot start this run: unreadable, without recorded subjects, another configuration or number
    of TRs per window, or ``--resume`` as well."""
    from dynadiff.config import TrainConfig
    from dynadiff.data.preprocess import window_bounds
    from dynadiff.decoder import CheckpointInfo, DecoderError

    if tree.get("resume"):
        raise ConfigError("--init-from starts a new run from a checkpoint, --resume continues a run from its own: "
                          "give one of them")
    try:
        info = CheckpointInfo.read(tree["init_from"])
    except DecoderError as e:
        raise ConfigError(f"--init-from: {e}") from None
    if info.kind != "safetensors" or info.subjects is None or info.n_voxels is None or info.n_timepoints is None:
        raise ConfigError(f"--init-from {info.path}: it records no subjects (a published or converted checkpoint): "
                          "give a train.py checkpoint (RUN/checkpoints/best/model.safetensors)")
    for key, value in (("init_from", str(info.path)), ("init_subjects", info.subjects),
                       ("init_n_voxels", info.n_voxels), ("init_digest", info.digest)):
        tree = set_dotted(tree, key, value)
    given = validate(TrainConfig, tree).model_dump(mode="json")
    recorded = {**{f"brain_modules_config.{k}": v for k, v in (info.brain_config or {}).items()},
                **{f"versatilediffusion_config.{k}": v for k, v in (info.vd_config or {}).items()
                   if k in PRETRAINED_VD_KEYS}}
    window_given = bool({"data.nsd_dataset_config.offset", "data.nsd_dataset_config.duration"} & on_command_line)
    if not window_given:
        recorded.update({f"data.nsd_dataset_config.{k}": v for k, v in (info.window or {}).items()})
    conflicts, taken = [], []
    for key, value in recorded.items():
        section, name = key.rsplit(".", 1)
        current = given
        for part in section.split("."):
            current = current[part]
        if current.get(name) == value:
            continue
        if key in on_command_line or section in on_command_line:
            conflicts.append(f"{key}={current.get(name)!r} (checkpoint: {value!r})")
        else:
            tree = set_dotted(tree, key, value)
            taken.append(f"{key}={value}")
    if conflicts:
        raise ConfigError(f"--init-from {info.path} was trained with other settings than those given: "
                          f"{', '.join(conflicts)}; drop them (the checkpoint's are used)")
    cfg = validate(TrainConfig, tree)
    data = cfg.data.nsd_dataset_config
    start, stop = window_bounds(0, data.offset, data.duration)
    if stop - start != info.n_timepoints:
        raise ConfigError(f"--init-from {info.path} reads windows of {info.n_timepoints} TRs, this run's are "
                          f"{stop - start} (offset {data.offset} s, duration {data.duration} s): give a window of "
                          f"{info.n_timepoints} TRs (--window), or none (the checkpoint's)")
    if taken:
        logger.info("from the checkpoint this run starts from: %s", ", ".join(taken))
    return cfg
