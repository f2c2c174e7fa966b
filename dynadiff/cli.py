"""Shared command-line helpers: ``KEY=VALUE`` overrides of a validated config.

``apply_overrides(Config, base, ["data.nsd_dataset_config.nsddata_path=/data/nsd"])``
walks the pydantic model classes to check every key before anything runs:
an unknown key names the closest valid prefix and what it allows; a wrong
value names the key and pydantic's reason.
"""

from __future__ import annotations

import logging
import os
import sys
import typing as tp
from pathlib import Path

import pydantic
import yaml


class ConfigError(ValueError):
    """A configuration key or value given by the user is invalid."""


def _model_class(annotation) -> type[pydantic.BaseModel] | None:
    """The BaseModel class behind an annotation (``X``, ``X | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for arg in tp.get_args(annotation):
        cls = _model_class(arg)
        if cls is not None:
            return cls
    return None


def check_key(model: type[pydantic.BaseModel], key: str) -> None:
    """Raise :class:`ConfigError` unless ``key`` (dotted) names a field of ``model``."""
    cls: type[pydantic.BaseModel] | None = model
    done: list[str] = []
    for part in key.split("."):
        if cls is None:
            raise ConfigError(f"unknown config key {key!r}: {'.'.join(done)!r} has no sub-keys")
        fields = {name: f for name, f in cls.model_fields.items() if not name.startswith("_")}
        if part not in fields:
            where = f"under {'.'.join(done)!r}" if done else "at the top level"
            raise ConfigError(f"unknown config key {key!r}: allowed keys {where} are {sorted(fields)}")
        cls = _model_class(fields[part].annotation)
        done.append(part)


def parse_value(text: str) -> tp.Any:
    """YAML scalar/list syntax: ``3``, ``0.5``, ``true``, ``null``, ``[1,21]``, ``./path``."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def set_dotted(tree: dict, key: str, value: tp.Any) -> dict:
    """A copy of ``tree`` with ``key`` (dotted) set to ``value``, through exca's ``ConfDict`` (a mapping value is
    merged into the mapping there; any other value replaces what is there)."""
    from exca import ConfDict

    conf = ConfDict(tree)
    conf[key] = value
    return conf


M = tp.TypeVar("M", bound=pydantic.BaseModel)


def apply_overrides(model: type[M], base: dict, overrides: tp.Sequence[str]) -> M:
    """Validate ``base`` (nested dict) with ``KEY=VALUE`` overrides applied, as ``model``."""
    return validate(model, override_tree(model, base, overrides))


def override_tree(model: type[pydantic.BaseModel], base: dict, overrides: tp.Sequence[str]) -> dict:
    """A copy of ``base`` (nested dict) with ``KEY=VALUE`` overrides applied, each key checked against ``model``:
    the tree to validate (or to complete with typed values first)."""
    from exca import ConfDict

    tree = ConfDict(base)  # a copy: base is left as it is
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"expected KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        check_key(model, key)
        tree[key] = parse_value(text)
    return tree


def validate(model: type[M], tree: dict) -> M:
    try:
        return model.model_validate(tree)
    except pydantic.ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                parent = ".".join(str(p) for p in err["loc"][:-1])
                lines.append(f"unknown config key {loc!r} (not a field of {parent or 'the config'})")
            else:
                msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
                lines.append(f"invalid value for {loc!r}: {msg} (got {err.get('input')!r})")
        if len(lines) == 1:  # one problem, one line
            raise ConfigError(f"invalid configuration: {lines[0]}") from None
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def load_yaml(path: Path) -> dict:
    """The mapping in a YAML file; :class:`ConfigError` (one line, with the place of a syntax error) otherwise."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder, not a YAML file")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text (YAML) file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} should hold a mapping, got {type(data).__name__}")
    return data


def _yaml_problem(error: yaml.YAMLError) -> str:
    """``line L, column C: <problem>`` of a YAML parse error (1-based, as editors count)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def join_option_values(argv: tp.Sequence[str], options: tp.Collection[str],
                       accept: tp.Callable[[str], bool] = lambda value: True) -> list[str]:
    """``OPTION VALUE`` -> ``OPTION=VALUE`` for each of ``options`` whose next word ``accept`` takes.

    argparse takes a word that starts with ``-`` (``--no-sign-request``, ``-3:13``) for an option of its own,
    not for the value of the option before it; joined, it is that option's value.
    """
    out, i = [], 0
    while i < len(argv):
        if argv[i] in options and i + 1 < len(argv) and accept(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def value_overrides(args, keys: tp.Mapping[str, str]) -> list[str]:
    """``KEY=VALUE`` for each command-line option that was given: ``keys`` maps argparse destinations to config
    keys (options left out are ``None``)."""
    return [f"{key}={getattr(args, dest)}" for dest, key in keys.items() if getattr(args, dest) is not None]


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def setup_job_logging() -> None:
    """In a submitit job (SLURM or local processes), send the log to the job's log files.

    A job is a fresh Python in which nothing has configured logging (the submitting
    script's :func:`setup_logging` does not travel with it); elsewhere, a no-op.
    """
    if os.environ.get("SUBMITIT_EXECUTOR") and not logging.getLogger().handlers:
        setup_logging()
