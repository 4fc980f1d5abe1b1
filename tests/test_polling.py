"""Issue 26: pynetdicom's reactors poll quickly while an association is busy and as pynetdicom does
(1 ms) once it idles (:mod:`node.network.polling`; that importing any association module installs
it: ``tests/test_uid_checks.py``)."""

from __future__ import annotations

from node.network.polling import BUSY_TURN_S, POLL_S, QUICK_FOR_S, QUICK_S, BackingOffClock


class FakeTime:
    """A clock whose wall and thread CPU time the test moves; sleeps are recorded, not slept."""

    def __init__(self) -> None:
        self.now = 100.0
        self.cpu = 1.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def thread_time(self) -> float:
        return self.cpu

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def time(self) -> float:
        return 42.0


def _idle_turn(fake: FakeTime, clock: BackingOffClock) -> float:
    fake.now += 0.00001
    fake.cpu += 0.00001  # an idle turn: a few queue checks
    clock.sleep(POLL_S)
    return fake.slept[-1]


def test_polls_quickly_after_work_and_as_pynetdicom_once_idle():
    fake = FakeTime()
    clock = BackingOffClock(fake)
    assert _idle_turn(fake, clock) == QUICK_S  # a reactor's first poll: its association has just begun
    while fake.now < 100.0 + QUICK_FOR_S:
        assert _idle_turn(fake, clock) == QUICK_S
    assert _idle_turn(fake, clock) == POLL_S  # idle for longer than QUICK_FOR_S: pynetdicom's own 1 ms
    assert _idle_turn(fake, clock) == POLL_S
    fake.cpu += 2 * BUSY_TURN_S  # a turn that decoded a PDU or served a C-STORE
    clock.sleep(POLL_S)
    assert fake.slept[-1] == QUICK_S
    assert _idle_turn(fake, clock) == QUICK_S


def test_waiting_for_the_interpreter_lock_is_not_work():
    fake = FakeTime()
    clock = BackingOffClock(fake)
    fake.now += 1.0  # long idle
    fake.cpu += 0.00001
    clock.sleep(POLL_S)
    fake.now += 0.050  # the turn waited 50 ms for the lock beside other associations, doing nothing
    fake.cpu += 0.00001
    clock.sleep(POLL_S)
    assert fake.slept[-1] == POLL_S


def test_other_sleeps_and_clocks_are_the_time_modules_own():
    fake = FakeTime()
    clock = BackingOffClock(fake)
    clock.sleep(0.1)
    clock.sleep(0.0001)
    assert fake.slept == [0.1, 0.0001]
    assert clock.time() == 42.0


def test_each_reactor_thread_backs_off_on_its_own():
    import threading

    fake = FakeTime()
    clock = BackingOffClock(fake)
    fake.now += 1.0
    for _ in range(3):
        _idle_turn(fake, clock)
    fake.now += 1.0
    assert _idle_turn(fake, clock) == POLL_S  # this thread idles
    seen: list[float] = []
    other = threading.Thread(target=lambda: (clock.sleep(POLL_S), seen.append(fake.slept[-1])))
    other.start()
    other.join()
    assert seen == [QUICK_S]  # another reactor's first poll
