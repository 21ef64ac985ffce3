"""readers.wait: polls with a budget, retries only what a cluster in motion raises, lets a bug through."""
from __future__ import annotations

import time

import pytest

from runbook.cluster.readers import wait
from runbook.core.transport import TransportError


def counting(*outcomes):
    """A predicate that yields the given outcomes in turn (an exception instance is raised)."""
    calls = []

    def predicate():
        out = outcomes[min(len(calls), len(outcomes) - 1)]
        calls.append(out)
        if isinstance(out, BaseException):
            raise out
        return out

    return predicate, calls


@pytest.mark.parametrize("error", [TransportError("h: unreachable"), RuntimeError("no postgres host answered"),
                                   ValueError("half a JSON document"), ConnectionRefusedError()])
def test_expected_errors_are_retried_until_a_truthy_value(error):
    predicate, calls = counting(error, error, "leader")
    assert wait(predicate, 5, 0.01) == "leader"
    assert len(calls) == 3


def test_a_bug_in_the_predicate_propagates_at_once():
    predicate, calls = counting(KeyError("node09"), "never")
    with pytest.raises(KeyError):
        wait(predicate, 5, 0.01)
    assert len(calls) == 1


def test_the_budget_bounds_time_and_count_and_the_last_falsy_value_is_returned():
    predicate, calls = counting(0)
    t0 = time.monotonic()
    assert wait(predicate, 0.2, 0.05) == 0
    assert time.monotonic() - t0 < 1.0
    assert 2 <= len(calls) <= int(0.2 / 0.05) + 2


def test_an_expected_error_on_the_last_try_gives_none():
    predicate, calls = counting(TransportError("h: down"))
    assert wait(predicate, 0.1, 0.02) is None
    assert len(calls) >= 2


def test_retry_on_narrows_what_is_retried():
    predicate, calls = counting(RuntimeError("x"), "ok")
    with pytest.raises(RuntimeError):
        wait(predicate, 1, 0.01, retry_on=(TransportError,))
    assert len(calls) == 1
