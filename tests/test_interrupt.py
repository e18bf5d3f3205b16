"""retrain.utils.interrupt: Ctrl-C inside a run stops it at the next safe point, not anywhere."""

from __future__ import annotations

import signal

import pytest

from retrain.utils import interrupt


def test_first_ctrl_c_waits_for_the_next_check(capfd):
    reached = []
    with pytest.raises(KeyboardInterrupt), interrupt.stop_at_safe_points():
        signal.raise_signal(signal.SIGINT)
        reached.append("after the signal")  # not interrupted here...
        interrupt.check()  # ...but here
        reached.append("after the check")
    assert reached == ["after the signal"]
    assert "stopping at the next safe point" in capfd.readouterr().err


def test_second_ctrl_c_stops_at_once():
    with pytest.raises(KeyboardInterrupt), interrupt.stop_at_safe_points():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        pytest.fail("the second Ctrl-C did not stop")


def test_a_request_still_pending_at_the_end_stops_there():
    with pytest.raises(KeyboardInterrupt), interrupt.stop_at_safe_points():
        signal.raise_signal(signal.SIGINT)


def test_without_ctrl_c_nothing_happens_and_the_default_comes_back():
    with interrupt.stop_at_safe_points():
        interrupt.check()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    interrupt.check()  # no request left over
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)  # Python's own behaviour again


def test_an_applications_own_handler_is_left_alone():
    calls = []
    previous = signal.signal(signal.SIGINT, lambda *_: calls.append("app"))
    try:
        with interrupt.stop_at_safe_points():
            signal.raise_signal(signal.SIGINT)
            interrupt.check()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert calls == ["app"]
