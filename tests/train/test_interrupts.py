"""Signal handling phases: at once outside training, after the step inside it, at once on a second signal."""

from __future__ import annotations

import os
import signal

import pytest

from clm_runner.train.interrupts import GracefulStop, RunInterrupted, StopNow, exit_code_for


@pytest.fixture
def stop():
    handler = GracefulStop().install()
    yield handler
    handler.restore()


def test_outside_training_a_signal_stops_at_once(stop: GracefulStop) -> None:
    with pytest.raises(StopNow) as caught:
        os.kill(os.getpid(), signal.SIGTERM)
    assert caught.value.signum == signal.SIGTERM


def test_inside_training_the_first_signal_only_asks_and_the_second_stops(stop: GracefulStop) -> None:
    class Args:
        world_size = 1

    with stop.during_training():
        assert not stop.should_stop(Args())
        os.kill(os.getpid(), signal.SIGINT)  # no exception: the step finishes
        assert stop.signum == signal.SIGINT and stop.should_stop(Args())
        with pytest.raises(StopNow):
            os.kill(os.getpid(), signal.SIGINT)


def test_restore_puts_the_previous_handlers_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    handler = GracefulStop().install()
    assert signal.getsignal(signal.SIGTERM) == handler._handle
    handler.restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_exit_codes_follow_the_shell_convention() -> None:
    assert exit_code_for(signal.SIGINT) == 130 and exit_code_for(signal.SIGTERM) == 143
    assert RunInterrupted("x", signum=signal.SIGTERM).exit_code == 143
