"""Unpacking the two zip archives among the weights (DreamSim's release, torch.hub's copy of the DINO repo).

Members are unpacked into a hidden folder beside their place, then moved there
by rename: an interrupted unpack leaves the archive (unpacked again next run),
never a half-filled final folder. The archive is deleted once unpacked.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

from dynadiff.fetch.http import FetchError


def unpack(zip_path: Path, dest: Path, kind: str, label: str) -> None:
    """``kind`` ``"zip"``: the members into the folder ``dest`` as they are (what ``dreamsim`` does);
    ``"repo-zip"``: the archive's single top folder becomes ``dest`` (what ``torch.hub`` does)."""
    staging = dest.parent / f".{dest.name}.unpack" if kind == "repo-zip" else dest / f".{zip_path.name}.unpack"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as z:
            for name in z.namelist():
                parts = name.replace("\\", "/").split("/")
                if name.startswith("/") or ".." in parts or ":" in parts[0]:
                    raise FetchError(f"{label}: refusing {zip_path}: member {name!r} would be unpacked outside its folder")
            z.extractall(staging)
    except (zipfile.BadZipFile, EOFError) as e:
        shutil.rmtree(staging, ignore_errors=True)
        zip_path.unlink(missing_ok=True)
        raise FetchError(f"{label}: {zip_path} is not a readable zip archive ({e}): deleted; run again to download "
                         "it again") from None
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise FetchError(f"{label}: cannot unpack {zip_path} into {staging}: {e.strerror or e}") from None
    try:
        if kind == "repo-zip":
            tops = [p for p in staging.iterdir()]
            if len(tops) != 1 or not tops[0].is_dir():
                raise FetchError(f"{label}: {zip_path} should hold one top folder (a GitHub archive), it holds "
                                 f"{len(tops)} entries")
            _replace(tops[0], dest)
        else:
            _merge(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    zip_path.unlink(missing_ok=True)


def _merge(src: Path, dst: Path) -> None:
    """Move the content of folder ``src`` into folder ``dst``: its files replace theirs, folders are merged."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if entry.is_dir() and target.is_dir() and not target.is_symlink():
            _merge(entry, target)
        else:
            _replace(entry, target)


def _replace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing what is there (an incomplete earlier copy)."""
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    elif dst.exists() or dst.is_symlink():
        dst.unlink()
    os.replace(src, dst)
