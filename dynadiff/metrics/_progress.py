"""Progress bars that honour ``TQDM_DISABLE`` and the callers' ``progress`` flag."""

from __future__ import annotations

import typing as tp

T = tp.TypeVar("T")


def progress_bar(items: tp.Iterable[T], show: bool, desc: str) -> tp.Iterable[T]:
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)  # no explicit `disable`: TQDM_DISABLE still applies
