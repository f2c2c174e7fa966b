import pydantic
import pytest

from dynadiff.cli import ConfigError, apply_overrides, check_key, parse_value
from dynadiff.config import DataConfig


class Top(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    data: DataConfig = DataConfig()
    steps: int = 20
    name: str | None = None


def test_overrides_set_nested_keys_with_types():
    cfg = apply_overrides(Top, {}, [
        "data.nsd_dataset_config.nsddata_path=/data/nsd",
        "data.nsd_dataset_config.sessions=[21,1]",
        "data.nsd_dataset_config.infra.folder=/tmp",
        "steps=50",
    ])
    nsd = cfg.data.nsd_dataset_config
    assert str(nsd.nsddata_path) == "/data/nsd" and nsd.sessions == [1, 21] and str(nsd.infra.folder) == "/tmp"
    assert cfg.steps == 50 and cfg.name is None
    # base values are kept where not overridden
    cfg = apply_overrides(Top, {"steps": 7, "data": {"nsd_dataset_config": {"subject": 2}}}, ["name=x"])
    assert cfg.steps == 7 and cfg.data.nsd_dataset_config.subject == 2 and cfg.name == "x"


def test_unknown_key_names_allowed_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'data.nsd_dataset_config.nsd_path'.*'nsddata_path'"):
        apply_overrides(Top, {}, ["data.nsd_dataset_config.nsd_path=/x"])
    with pytest.raises(ConfigError, match=r"allowed keys at the top level are \['data', 'name', 'steps'\]"):
        check_key(Top, "stepz")
    with pytest.raises(ConfigError, match=r"'steps' has no sub-keys"):
        check_key(Top, "steps.x")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides(Top, {}, ["steps"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"invalid value for 'steps': .*integer.*'many'"):
        apply_overrides(Top, {}, ["steps=many"])
    with pytest.raises(ConfigError, match=r"invalid value for 'data.nsd_dataset_config.subject': .*unknown subject 4"):
        apply_overrides(Top, {}, ["data.nsd_dataset_config.subject=4"])
    with pytest.raises(ConfigError, match=r"unknown config key 'data.bogus'"):
        apply_overrides(Top, {"data": {"bogus": 1}}, [])


@pytest.mark.parametrize("text, value", [("3", 3), ("0.5", 0.5), ("true", True), ("null", None),
                                         ("[1, 2]", [1, 2]), ("./a/b", "./a/b"), ("", "")])
def test_parse_value(text, value):
    assert parse_value(text) == value
