"""``log.csv``: the losses, learning rate, gradient norm and speed of a run, one row per logged step."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from dynadiff.files import write_text

LOG_FIELDS = ("step", "split", "loss", "lr", "grad_norm", "samples_per_s", "epoch", "time_s")


class CsvLog:
    """``log.csv``: one row per logged train step and per validation (``split`` = train / val)."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = Path(path)
        rows = []
        if resume_step is not None and self.path.exists():  # drop rows logged after the checkpoint
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        text = io.StringIO()
        writer = csv.DictWriter(text, LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.path, text.getvalue())

    def write(self, **row) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, LOG_FIELDS).writerow({k: _fmt(row.get(k)) for k in LOG_FIELDS})


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
