"""Where the windows of a time course start: offsets in TRs or seconds, and the window a checkpoint was trained on."""

from __future__ import annotations

import dataclasses
import typing as tp
from pathlib import Path

import numpy as np

from dynadiff.data.preprocess import TR, window_bounds

if tp.TYPE_CHECKING:
    from dynadiff.config import NsdDatasetConfig

DEFAULT_OFFSETS = "-3:13"


class TimecourseError(RuntimeError):
    """The time course cannot run as asked (one line, said to the user)."""


def _range_or_list(text: str, number: type, default_step, option: str, usage: str, unit: str) -> list:
    """``START:STOP[:STEP]`` (STOP excluded, like ``range``) or a comma-separated list of ``number``s; a one-line
    :class:`TimecourseError` naming ``option`` otherwise."""
    try:
        if ":" not in text:
            return [number(p) for p in text.split(",") if p.strip()]
        parts = [number(p) for p in text.split(":")]
        if len(parts) not in (2, 3):
            raise ValueError
    except ValueError:
        raise TimecourseError(f"{option} {text!r}: expected {usage}") from None
    start, stop, step = (*parts, default_step) if len(parts) == 2 else parts
    if not step > 0:
        raise TimecourseError(f"{option} {text}: the step must be a positive number of {unit}")
    if number is int:
        return list(range(start, stop, step))
    return list(np.arange(start, stop - 1e-9, step))


def parse_offsets(text: str) -> list[int]:
    """``START:STOP[:STEP]`` (Python's range: STOP excluded) or a comma-separated list, in TRs from the onset."""
    text = str(text).strip()
    offsets = _range_or_list(text, int, 1, "--offsets", "START:STOP[:STEP] (integers, in TRs from the onset; STOP "
                             "excluded, e.g. -3:13) or a list such as 0,3,6", "TRs")
    if not offsets:
        raise TimecourseError(f"--offsets {text}: no offset in that range (STOP is excluded: e.g. -3:13 is -3 to 12)")
    if len(set(offsets)) != len(offsets):
        raise TimecourseError(f"--offsets {text}: an offset is repeated")
    return sorted(offsets)


def offsets_from_seconds(text: str, tr: float = TR) -> tuple[list[int], dict[int, float]]:
    """``--offsets-s``: window starts in seconds (``START:STOP[:STEP]`` or a list) snapped to the nearest TR.

    Returns the offsets in TRs and, for each, the seconds asked for; two values snapped to one volume are an error.
    """
    text = str(text).strip()
    seconds = _range_or_list(text, float, tr, "--offsets-s", "START:STOP[:STEP] in seconds (STOP excluded, e.g. "
                             "-4:16:1.33) or a list such as 0,4,8", "seconds")
    if not seconds or not all(np.isfinite(seconds)):
        raise TimecourseError(f"--offsets-s {text}: no finite offset")
    asked: dict[int, float] = {}
    for s in seconds:
        k = int(round(s / tr))
        if k in asked:
            raise TimecourseError(f"--offsets-s {text}: {asked[k]:g} s and {s:g} s both become volume {k:+d} "
                                  f"({k * tr:.2f} s; the TR is {tr:.4f} s): space them by at least a TR")
        asked[k] = float(s)
    return sorted(asked), {k: asked[k] for k in sorted(asked)}


@dataclasses.dataclass(frozen=True)
class ModelWindow:
    """The window a checkpoint was trained on: ``n_trs`` volumes from ``offset`` volumes after the onset."""

    offset: int
    n_trs: int
    source: str  # where it was read from


def model_window(checkpoint: Path, nsd_cfg: "NsdDatasetConfig") -> ModelWindow:
    """A train.py checkpoint's window, from the training config in its metadata; other checkpoints (the published
    ones): the config's ``offset``/``duration`` (published: 4.6 s, 8 s -> volumes t+3 .. t+8)."""
    from dynadiff.decoder import CheckpointInfo

    offset, duration, source = nsd_cfg.offset, nsd_cfg.duration, "the data config (offset, duration)"
    recorded = CheckpointInfo.read(checkpoint).window
    if recorded is not None:
        offset, duration, source = recorded["offset"], recorded["duration"], f"checkpoint {checkpoint}"
    start, end = window_bounds(0, offset, duration)
    return ModelWindow(start, end - start, f"{source}: offset {offset:g} s, duration {duration:g} s")
