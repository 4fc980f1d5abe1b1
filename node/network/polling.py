"""pynetdicom's polling, quick while an association is busy and as before once it idles.

pynetdicom runs two threads per association, each a loop that polls: the DUL reactor checks the
socket and its queues and sleeps 1 ms whenever it found nothing to do
(``DULServiceProvider._run_loop_delay``), and the association reactor sleeps 1 ms before every
check for a decoded DIMSE message (``Association._run_reactor``). A C-STORE therefore waits up to
1 ms for the DUL to notice its PDUs, up to 1 ms more for the association to take the message, and
its response up to 1 ms for the DUL to send it: on one association of 527 kB CT instances,
ainode's Storage SCP storing nothing took 2.78 ms per instance, and 1.82 ms with those sleeps at
0.05 ms (``BENCHMARKS.md``, issue 26). Sleeping always that briefly would keep idle associations
spinning, so a reactor polls every :data:`QUICK_S` only for :data:`QUICK_FOR_S` after a loop turn
that did work — measured in the thread's CPU time, so that waiting for the interpreter lock
beside other associations does not count — and every 1 ms, as pynetdicom does, once idle: four
idle associations (16 reactor threads) cost 15.7 % of a core before, 18.3 % with it.

The two modules' ``time`` is replaced by :class:`BackingOffClock`: only pynetdicom's 1 ms poll
changes, every other sleep and clock is the :mod:`time` module's own. Installed once per process
when :mod:`node.network.association` is imported (every module that makes or accepts an
association imports it).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pynetdicom.association
import pynetdicom.dul

POLL_S = 0.001
"""pynetdicom's polling sleep (both reactors)."""

QUICK_S = 0.00005
"""The poll's sleep while the association is busy."""

QUICK_FOR_S = 0.005
"""How long after a loop turn that did work the association counts as busy: a peer's next PDU
(the next C-STORE after a response, the release after the last) comes within it."""

BUSY_TURN_S = 0.0001
"""A turn of a reactor's loop that took more CPU than this did work (an idle turn checks a few
queues and the socket: tens of microseconds; the thread's CPU time, not the wall clock, so that
waiting for the interpreter lock beside other associations does not count)."""

_lock = threading.Lock()
_installed = False


class BackingOffClock:
    """The :mod:`time` module for pynetdicom's reactors: its 1 ms polling sleep is :data:`QUICK_S`
    for :data:`QUICK_FOR_S` after a loop turn that did work (per thread: each reactor is its own),
    every other attribute the module's own.

    Parameters
    ----------
    clock
        The time module to delegate to (a test's fake one).
    """

    def __init__(self, clock: Any = time) -> None:
        self._time = clock
        self._state = threading.local()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._time, name)

    def sleep(self, seconds: float) -> None:
        """``time.sleep``; pynetdicom's poll (:data:`POLL_S`) is :data:`QUICK_S` for
        :data:`QUICK_FOR_S` after a loop turn that did work."""
        if seconds != POLL_S:
            self._time.sleep(seconds)
            return
        state, clock = self._state, self._time
        spent, now = clock.thread_time(), clock.monotonic()
        try:
            if spent - state.spent > BUSY_TURN_S:  # this turn did work
                state.busy = now
        except AttributeError:  # the thread's first poll: its association has just begun
            state.busy = now
        clock.sleep(QUICK_S if now - state.busy < QUICK_FOR_S else POLL_S)
        state.spent = clock.thread_time()  # the sleep's own wake-up is not the next turn's work


def back_off_polling() -> None:
    """Install :class:`BackingOffClock` in pynetdicom's association and DUL modules (once; later
    calls do nothing)."""
    global _installed
    with _lock:
        if _installed:
            return
        clock = BackingOffClock()
        for module in (pynetdicom.association, pynetdicom.dul):
            module.time = clock  # type: ignore[attr-defined]
        _installed = True
