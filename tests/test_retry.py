"""dynadiff.retry: the one backoff loop of the downloads."""

import logging

import pytest

from dynadiff.retry import Transient, retry


class Flaky:
    """Raises ``errors`` one after the other, then returns "done"."""

    def __init__(self, *errors: BaseException):
        self.errors, self.calls = list(errors), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def _give_up(error: Transient, attempts: int) -> RuntimeError:
    return RuntimeError(f"gave up after {attempts}: {error}")


def test_retries_with_growing_jittered_delays_then_succeeds(caplog):
    attempt, slept = Flaky(Transient("HTTP 503"), Transient("reset"), Transient("reset")), []
    with caplog.at_level(logging.WARNING):
        out = retry(attempt, label="f.bin", retries=3, backoff=2.0, give_up=_give_up, sleep=slept.append,
                    note=lambda: " from byte 7")
    assert out == "done" and attempt.calls == 4
    assert [lo <= s <= hi for s, (lo, hi) in zip(slept, [(1, 3), (2, 6), (4, 12)])] == [True] * 3
    assert "f.bin: HTTP 503; retry 1/3 in" in caplog.text and "retry 3/3" in caplog.text
    assert caplog.text.count("from byte 7") == 3


def test_gives_up_after_the_retries_with_the_last_cause():
    attempt = Flaky(*[Transient(f"try {i}") for i in range(5)])
    with pytest.raises(RuntimeError, match="gave up after 3: try 2") as info:
        retry(attempt, label="x", retries=2, backoff=0, give_up=_give_up, sleep=lambda s: None)
    assert attempt.calls == 3 and info.value.__suppress_context__


def test_delays_are_capped_at_a_minute():
    slept = []
    retry(Flaky(*[Transient("down")] * 12), label="x", retries=12, backoff=1.0, give_up=_give_up,
          sleep=slept.append)
    assert max(slept) <= 90 and min(slept[8:]) >= 30  # 60 s before jitter from the 8th retry on


def test_other_errors_are_not_retried():
    attempt = Flaky(PermissionError("denied"))
    with pytest.raises(PermissionError):
        retry(attempt, label="x", retries=5, backoff=0, give_up=_give_up, sleep=lambda s: None)
    assert attempt.calls == 1


def test_a_sleep_that_raises_stops_the_retries():
    class Stop(Exception):
        pass

    def cancelled(seconds):
        raise Stop

    attempt = Flaky(Transient("reset"))
    with pytest.raises(Stop):
        retry(attempt, label="x", retries=5, backoff=0, give_up=_give_up, sleep=cancelled)
    assert attempt.calls == 1
