"""custom_infra.yaml: sections and keys validated with clear messages, values carried over exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynadiff.cli import ConfigError
from dynadiff.infra import infra_overrides, load_infra_yaml
from scripts import load_script

REPO = Path(__file__).resolve().parents[1]
EVAL_TARGETS = {"task_infra_data": "data.nsd_dataset_config.infra", "map_infra_image_generation": "image_generation"}


def _yaml(tmp_path, text: str) -> Path:
    path = tmp_path / "infra.yaml"
    path.write_text(text)
    return path


def _eval_module():
    return load_script("eval")


def test_shipped_yaml_has_the_original_sections_and_defaults():
    got = load_infra_yaml(REPO / "custom_infra.yaml")
    assert list(got) == ["task_infra_data", "map_infra_image_generation", "train"]
    gen = got["map_infra_image_generation"]
    assert (gen.cluster, gen.cpus_per_task, gen.gpus_per_node, gen.max_jobs, gen.min_samples_per_job,
            gen.timeout_min) == ("auto", 8, 1, 8, 32, 120)
    data = got["task_infra_data"]
    assert (data.cluster, data.max_jobs, data.min_samples_per_job) == ("auto", 32, 16)
    assert got["train"].max_jobs is None and got["train"].gpus_per_node == 1


def test_unknown_section_lists_the_allowed_ones(tmp_path):
    path = _yaml(tmp_path, "map_infra_generation:\n  cluster: slurm\n")
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['map_infra_generation'\]; allowed sections: "
                                          r"\['task_infra_data', 'map_infra_image_generation', 'train'\]"):
        load_infra_yaml(path)


def test_unknown_key_lists_the_allowed_ones(tmp_path):
    path = _yaml(tmp_path, "task_infra_data:\n  cpus: 4\n  partition: dev\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['cpus', 'partition'\] in section 'task_infra_data'; "
                                          r"allowed: \['cluster', 'cpus_per_task', 'folder', 'gpus_per_node', "
                                          r"'max_jobs', 'mem_gb', 'min_samples_per_job', 'mode', "):
        load_infra_yaml(path)


def test_train_is_one_job_and_takes_no_map_keys(tmp_path):
    path = _yaml(tmp_path, "train:\n  gpus_per_node: 8\n  max_jobs: 4\n")
    with pytest.raises(ConfigError, match=r"\['max_jobs'\] in section 'train' \('train' runs as a single job") as e:
        load_infra_yaml(path)
    assert "'max_jobs'" not in str(e.value).split("allowed:")[1]


@pytest.mark.parametrize("text, match", [
    ("cpus_per_task: eight", r"cpus_per_task: Input should be a valid integer.*\(got 'eight'\)"),
    ("gpus_per_node: -1", r"gpus_per_node: Input should be greater than or equal to 0 \(got -1\)"),
    ("cluster: slurmm", r"cluster: Input should be 'auto', 'local', 'slurm'.*\(got 'slurmm'\)"),
    ("mode: retry", r"mode: Input should be 'cached', 'force' or 'read-only' \(got 'retry'\)"),
    ("max_jobs: 0", r"max_jobs: Input should be greater than or equal to 1"),
])
def test_wrong_value_names_section_key_and_value(tmp_path, text, match):
    path = _yaml(tmp_path, f"map_infra_image_generation:\n  {text}\n")
    with pytest.raises(ConfigError, match=rf"invalid value in section 'map_infra_image_generation': {match}"):
        load_infra_yaml(path)


def test_section_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"section 'train' should be a mapping"):
        load_infra_yaml(_yaml(tmp_path, "train: [slurm]\n"))


def test_values_reach_the_config_unchanged(tmp_path):
    """Strings that YAML would re-read as something else (a mapping, a list) arrive as written."""
    from dynadiff.cli import apply_overrides
    from dynadiff.config import EvalConfig

    path = _yaml(tmp_path, "map_infra_image_generation:\n  cluster: slurm\n  slurm_constraint: 'volta32gb|a: b'\n"
                           "  slurm_partition: '[dev]'\n  mem_gb: 12.5\n  folder: '/data/run: 1'\n"
                           "task_infra_data:\n  max_jobs: 3\n")
    cfg = apply_overrides(EvalConfig, {}, infra_overrides(path, EVAL_TARGETS))
    gen = cfg.image_generation
    assert (gen.cluster, gen.slurm_constraint, gen.slurm_partition, gen.mem_gb) == ("slurm", "volta32gb|a: b",
                                                                                   "[dev]", 12.5)
    assert gen.folder == Path("/data/run: 1")
    assert cfg.data.nsd_dataset_config.infra.max_jobs == 3


def test_eval_cli_applies_the_yaml_and_keeps_the_cache_folder(tmp_path):
    """The shipped YAML leaves ``folder`` to --cache; its resources land on the two exca infras."""
    ev = _eval_module()
    args = ev.parse_args(["--subject", "1", "--cache", str(tmp_path / "c"), "--infra-yaml",
                          str(REPO / "custom_infra.yaml")])
    cfg = ev.build_config(args)
    data_infra = cfg.data.nsd_dataset_config.infra
    assert (data_infra.cluster, data_infra.max_jobs, data_infra.min_samples_per_job, data_infra.cpus_per_task,
            data_infra.timeout_min) == ("auto", 32, 16, 8, 120)
    assert Path(data_infra.folder) == tmp_path / "c"
    gen = cfg.image_generation
    assert (gen.cluster, gen.max_jobs, gen.gpus_per_node) == ("auto", 8, 1)
    assert gen.infra_kwargs(folder=cfg.infra.folder)["folder"] == tmp_path / "c"


def test_eval_cli_rejects_a_bad_train_section(tmp_path):
    ev = _eval_module()
    path = _yaml(tmp_path, "train:\n  min_samples_per_job: 2\n")
    args = ev.parse_args(["--subject", "1", "--infra-yaml", str(path)])
    with pytest.raises(ConfigError, match="'train' runs as a single job"):
        ev.build_config(args)
