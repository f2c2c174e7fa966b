"""``custom_infra.yaml``: cluster resources for the exca infras, by section.

Sections (the original's names, plus ``train``):

- ``task_infra_data``: fMRI window preparation (``data.nsd_dataset_config.infra``);
- ``map_infra_image_generation``: image generation (``image_generation``);
- ``train``: the training run (``train.py``).

Each section's keys are the fields of :class:`dynadiff.config.InfraResources`;
an unknown section or key is an error listing the allowed ones. ``train`` is
one job (an exca ``TaskInfra``): the keys that split a map into jobs
(``max_jobs``, ``min_samples_per_job``) are errors there. Its ``nodes`` and
``tasks_per_node`` make it a data-parallel job of ``nodes x tasks_per_node``
processes (one per GPU; exca then starts them with ``srun``): errors in the
other sections, whose jobs each run one process.
"""

from __future__ import annotations

import json
from pathlib import Path

from dynadiff.cli import ConfigError, load_yaml

SECTIONS = ("task_infra_data", "map_infra_image_generation", "train")
MAP_ONLY_KEYS = ("max_jobs", "min_samples_per_job")  # how a map is split into jobs
SINGLE_JOB_SECTIONS = ("train",)
TASK_KEYS = ("nodes", "tasks_per_node")  # processes of one job: data-parallel training only


def load_infra_yaml(path: Path) -> dict:
    """``{section: InfraResources}`` for the sections present in the file, validated."""
    import pydantic

    from dynadiff.config import InfraResources

    data = load_yaml(path)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; allowed sections: {list(SECTIONS)}")
    out = {}
    for section, values in data.items():
        values = values or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} should be a mapping of resources")
        not_here = MAP_ONLY_KEYS if section in SINGLE_JOB_SECTIONS else TASK_KEYS
        allowed = sorted(set(InfraResources.model_fields) - set(not_here))
        bad = sorted(set(values) - set(allowed))
        if bad:
            single = section in SINGLE_JOB_SECTIONS and set(bad) & set(MAP_ONLY_KEYS)
            why = f" ({section!r} runs as a single job: {list(MAP_ONLY_KEYS)} do not apply)" if single else ""
            if section not in SINGLE_JOB_SECTIONS and set(bad) & set(TASK_KEYS):
                why = f" ({list(TASK_KEYS)}: processes of a data-parallel training job, section 'train' only)"
            raise ConfigError(f"{path}: unknown key(s) {bad} in section {section!r}{why}; allowed: {allowed}")
        try:
            out[section] = InfraResources(**values)
        except pydantic.ValidationError as e:
            msgs = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err.get('input')!r})"
                             for err in e.errors())
            raise ConfigError(f"{path}: invalid value in section {section!r}: {msgs}") from None
    return out


def infra_overrides(path: Path, targets: dict[str, str]) -> list[str]:
    """``KEY=VALUE`` overrides setting each present section's resources on its config key.

    ``targets`` maps section names to dotted config keys (sections without a target
    are validated but ignored, e.g. ``train`` for ``eval.py``).
    """
    out = []
    for section, resources in load_infra_yaml(path).items():
        if section not in targets:
            continue
        for key, value in resources.model_dump(mode="json", exclude_none=True).items():
            # JSON is YAML: the value reads back as itself (a constraint "a|b", a path with ": ")
            out.append(f"{targets[section]}.{key}={json.dumps(value)}")
        if (resources.nodes or 1) * (resources.tasks_per_node or 1) > 1:  # several tasks: started by srun only
            out.append(f"{targets[section]}.slurm_use_srun=true")
    return out
