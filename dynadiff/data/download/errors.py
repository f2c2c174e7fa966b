"""The exceptions of the NSD download: the public :class:`DownloadError` and the two that steer the run.

:class:`_AccessError` stops the whole download (every other file would fail the same way);
:class:`_Cancelled` is how a worker leaves when the download is being stopped (Ctrl-C, another error).
"""

from __future__ import annotations


class DownloadError(RuntimeError):
    """The download cannot proceed or did not complete; the message says what and why."""


class _AccessError(DownloadError):
    """The server refused a request for a reason retries cannot fix: the whole download stops."""


class _Cancelled(Exception):
    """Raised inside a worker when the download is being stopped."""
