"""Resume state: which local files are already complete, and the manifest that spares hashing them again.

A local file with the object's size (and its MD5 when the ETag is a plain MD5,
i.e. not a multipart upload) is kept. Files checked by hash are recorded in a
small manifest (``.nsd_download_manifest.json`` at the local root, keyed by
path, size, mtime and ETag) so that the next run does not hash them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import typing as tp
from pathlib import Path

from dynadiff.data.download.objects import _CHUNK
from dynadiff.data.download.plan import RemoteObject
from dynadiff.files import write_text

# The package's name, as before the split: log lines keep reading 'dynadiff.data.download: ...'.
logger = logging.getLogger(__package__)

MANIFEST_FILE = ".nsd_download_manifest.json"


def _load_manifest(root: Path) -> dict[str, dict]:
    path = root / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable %s (%s): files will be verified again", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _save_manifest(root: Path, manifest: dict[str, dict]) -> None:
    """Atomic write; a failure only costs re-hashing files on the next run, so it is not fatal."""
    path = root / MANIFEST_FILE
    try:
        write_text(path, json.dumps(manifest, indent=0, sort_keys=True))
    except OSError as e:
        logger.warning("cannot save %s (%s): complete files will be verified again next time", path, e)


def _manifest_entry(path: Path, obj: RemoteObject) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "etag": obj.etag}


def _file_md5(path: Path, on_bytes: tp.Callable[[int], None] | None = None) -> str:
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK * 8):
            md5.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return md5.hexdigest()


def _quick_state(root: Path, obj: RemoteObject, manifest: dict[str, dict]) -> str:
    """'ok' (complete), 'verify' (right size, hash needed) or 'fetch'."""
    dest = root / obj.rel
    try:
        st = dest.stat()
    except FileNotFoundError:
        return "fetch"
    if not dest.is_file() or st.st_size != obj.size:
        return "fetch"
    entry = manifest.get(obj.rel)
    if entry == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "etag": obj.etag}:
        return "ok"
    return "verify" if obj.has_md5 else "ok"
