"""Retrying an attempt with exponential backoff: the part of our downloads the libraries do not retry.

botocore retries each S3 request (``Config(retries=...)``, see :func:`dynadiff.data.download.make_s3_client`);
what it does not retry is a body that breaks mid-stream, which our S3 and HTTP downloads resume from the byte
where it broke; huggingface_hub's ``HfApi.model_info`` does not retry at all. Those three loops are this one.
"""

from __future__ import annotations

import logging
import random
import time
import typing as tp

logger = logging.getLogger(__name__)

T = tp.TypeVar("T")
MAX_DELAY = 60.0  # s, before jitter


class Transient(Exception):
    """An attempt failed in a way worth retrying; the message says why (logged, then given to ``give_up``)."""


def retry(
    attempt: tp.Callable[[], T],
    *,
    label: str,
    retries: int,
    backoff: float,
    give_up: tp.Callable[[Transient, int], BaseException],
    note: tp.Callable[[], str] = lambda: "",
    sleep: tp.Callable[[float], object] = time.sleep,
    log: logging.Logger = logger,
) -> T:
    """What ``attempt()`` returns, calling it again (at most ``retries`` more times) while it raises
    :class:`Transient`; any other exception goes through at once.

    Before retry ``k`` (1-based): a warning ``"{label}: {cause}; retry k/retries in x s{note()}"`` on ``log``, then
    ``sleep(x)`` with ``x = min(60, backoff * 2**(k-1))`` times a jitter in [0.5, 1.5] (``sleep`` may raise, e.g. to
    cancel). Once the retries are spent: ``raise give_up(error, attempts) from error.__cause__`` (an error raised
    ``from None`` stays so).
    """
    failures = 0
    while True:
        try:
            return attempt()
        except Transient as error:
            failures += 1
            if failures > retries:
                raise give_up(error, failures) from error.__cause__
            delay = min(MAX_DELAY, backoff * 2 ** (failures - 1)) * random.uniform(0.5, 1.5)
            log.warning("%s: %s; retry %d/%d in %.1f s%s", label, error, failures, retries, delay, note())
            sleep(delay)
