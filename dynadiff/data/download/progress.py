"""What the user sees of a download besides the log: the byte counts on the progress bars and the summary."""

from __future__ import annotations

import dataclasses
import threading
import typing as tp


@dataclasses.dataclass
class DownloadSummary:
    downloaded: int = 0  # files fetched in this run
    skipped: int = 0  # files already complete
    bytes_downloaded: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        return (
            f"downloaded {self.downloaded} file(s) ({_human(self.bytes_downloaded)}), "
            f"skipped {self.skipped} already complete, in {self.seconds:.1f} s"
        )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def _locked(bar, lock: threading.Lock) -> tp.Callable[[int], None]:
    def update(n: int) -> None:
        with lock:
            bar.update(n)

    return update
