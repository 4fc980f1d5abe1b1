"""The one main loop of every long-running ainode process: the node, its child receivers and the
Celery workers.

:class:`ProcessLoop` installs the signal handlers (the only place that does): SIGTERM — and
SIGINT, unless the process leaves Ctrl-C to its parent — ends it, SIGHUP asks for a reload; each
turn refreshes the master keys (a rotation reaches every process within a turn), runs the
process's own ``tick`` and, when asked, its ``reload``. A Celery worker, whose main thread Celery
owns, runs the key refresh alone in a thread (:meth:`ProcessLoop.refresh_keys_in_background`).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class ProcessLoop:
    """See the module docstring.

    Parameters
    ----------
    refresh_keys
        Called every turn (:meth:`node.datadir.DataDir.refresh_keys`).
    interval_s
        Seconds between turns.
    """

    def __init__(self, refresh_keys: Callable[[], object], interval_s: float = 0.2) -> None:
        self.refresh_keys = refresh_keys
        self.interval_s = interval_s
        self.done = threading.Event()
        self._reload = threading.Event()

    def run(
        self, tick: Callable[[], object] = lambda: None, reload: Callable[[], object] | None = None,
        interrupt: bool = True,
    ) -> None:  # fmt: skip
        """Turn until SIGTERM (or SIGINT, with ``interrupt``); call from the main thread.

        Parameters
        ----------
        tick
            The process's own work each turn (supervise receivers, beat a heartbeat).
        reload
            Called once after each SIGHUP (none: SIGHUP is ignored).
        interrupt
            Whether SIGINT ends the process (a child receiver leaves Ctrl-C to the node).
        """
        signal.signal(signal.SIGTERM, lambda *_: self.done.set())
        signal.signal(signal.SIGINT, (lambda *_: self.done.set()) if interrupt else signal.SIG_IGN)
        signal.signal(signal.SIGHUP, (lambda *_: self._reload.set()) if reload else signal.SIG_IGN)
        while not self.done.wait(self.interval_s):
            if self._reload.is_set() and reload is not None:
                self._reload.clear()
                reload()
            self.refresh_keys()
            tick()

    def refresh_keys_in_background(self, interval_s: float = 1.0) -> threading.Thread:
        """Refresh the keys every ``interval_s`` in a daemon thread until :meth:`stop`."""

        def turn() -> None:
            while not self.done.wait(interval_s):
                self.refresh_keys()

        thread = threading.Thread(target=turn, name="ainode-keys", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """End the loop (as SIGTERM does)."""
        self.done.set()
