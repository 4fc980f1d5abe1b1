"""The one main loop of every long-running ainode process: the node, its child receivers and the
Celery workers.

:class:`ProcessLoop` installs the signal handlers (the only place that does), before the process
starts its work: SIGTERM — and SIGINT, unless the process leaves Ctrl-C to its parent — ends it,
SIGHUP asks for a reload; each turn refreshes the master keys (a rotation reaches every process within a turn), runs the
process's own ``tick`` and, when asked, its ``reload``. A Celery worker, whose main thread Celery
owns, runs the key refresh alone in a thread (:meth:`ProcessLoop.refresh_keys_in_background`).
"""

from __future__ import annotations

import functools
import gc
import logging
import os
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
        self._installed = False

    def install(self, reload: bool = True, interrupt: bool = True) -> None:
        """Install the signal handlers (main thread), before the process starts its work: a
        SIGHUP that came before them would end the process (its default action).

        Parameters
        ----------
        reload
            Whether SIGHUP asks for a reload (otherwise it is ignored).
        interrupt
            Whether SIGINT ends the process (a child receiver leaves Ctrl-C to the node).
        """
        signal.signal(signal.SIGTERM, lambda *_: self.done.set())
        signal.signal(signal.SIGINT, (lambda *_: self.done.set()) if interrupt else signal.SIG_IGN)
        signal.signal(signal.SIGHUP, (lambda *_: self._reload.set()) if reload else signal.SIG_IGN)
        self._installed = True

    def run(self, tick: Callable[[], object] = lambda: None, reload: Callable[[], object] | None = None) -> None:
        """Turn until SIGTERM (or SIGINT); call from the main thread (:meth:`install` first, or
        it is done here with ``reload`` deciding SIGHUP).

        Parameters
        ----------
        tick
            The process's own work each turn (supervise receivers, beat a heartbeat).
        reload
            Called once after each SIGHUP.
        """
        if not self._installed:
            self.install(reload=reload is not None)
        while not self.done.wait(self.interval_s):
            if self._reload.is_set():
                self._reload.clear()
                if reload is not None:
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


def freeze_start_up_objects() -> None:
    """Leave the objects alive now out of the garbage collector's future full collections
    (:func:`gc.freeze`, after one last collection): call once a process has started up.

    A node's main process holds about 410,000 tracked objects once started (its libraries,
    highdicom's tables, the configuration); each full collection scans them all with the GIL held,
    140-160 ms in which no association or job thread of the process runs. pynetdicom forces one
    every 60 connections (or 30 s idle), and CPython one whenever a quarter as many objects again
    have survived (a 500-slice series de-identified in memory). After the freeze a full collection
    scans only what was made since. Frozen objects are still freed when their last reference
    goes; only a reference cycle among them would stay.
    """
    gc.collect()
    gc.freeze()
    logger.info("start-up objects frozen", extra={"objects": gc.get_freeze_count()})


def give_back_freed_memory() -> None:
    """Return the C heap's free pages to the operating system (glibc's ``malloc_trim``).

    A series decoded in memory leaves hundreds of freed pixel buffers of about 0.5 MB in the heap
    (glibc raises its mmap threshold after such frees, so later ones come from the heap), which the
    process keeps as resident memory until trimmed. Nothing happens where glibc is not the C library.
    """
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""``mallopt`` parameters (glibc's ``malloc.h``)."""

HEAP_KEEP_BYTES = 8 * 1024 * 1024
"""Free memory the C heap keeps (each arena's top, glibc's trim threshold) and the size from which
an allocation gets its own mapping instead (the mmap threshold)."""


def keep_freed_heap(keep_bytes: int = HEAP_KEEP_BYTES) -> bool:
    """Have the C heap keep up to ``keep_bytes`` of freed memory for the next allocations instead
    of returning it to the operating system at once (glibc's ``M_TRIM_THRESHOLD`` and
    ``M_MMAP_THRESHOLD``, both set); call first thing in a process that receives instances.

    glibc's defaults give back the top of the heap whenever 128 KiB of it are free and map each
    allocation above a threshold (128 KiB, raised by frees) on its own: a received CT instance of
    0.5 MB, its ciphertext and the joined record were new mappings or a regrown heap for every
    C-STORE, each page a first-touch fault (expensive in a virtual machine). Sealing 527 kB took
    0.43 ms, 0.05 ms with the heap kept (``BENCHMARKS.md``, issue 26). An administrator's
    ``GLIBC_TUNABLES`` naming either threshold stands; where glibc is not the C library nothing
    changes. Returns whether the thresholds were set.

    At most ``keep_bytes`` stay free per arena (one per thread that allocates, up to eight per
    core), and larger allocations (a volume, a series' pixel data) are still mapped and returned
    when freed, so resident memory grows by little: the node's peak at 500 slices is unchanged.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "trim_threshold" in tunables or "mmap_threshold" in tunables:
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    kept = bool(mallopt(M_TRIM_THRESHOLD, keep_bytes)) and bool(mallopt(M_MMAP_THRESHOLD, keep_bytes))
    if kept:
        logger.info("C heap keeps freed memory for reuse", extra={"keep_bytes": keep_bytes})
    return kept


@functools.cache
def _libc_function(name: str) -> Callable[..., int] | None:
    """The C library's function ``name``, looked up once; ``None`` where it has none (not glibc)."""
    import ctypes
    import ctypes.util

    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):  # not glibc
        return None


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
"""glibc's tunable (2.35 and later) that marks the C heap's large allocations for transparent huge pages."""


def huge_pages_for_children() -> None:
    """Have the processes started from now on (the forkserver of the algorithm and model
    processes, the model conversion child) back their large C allocations with transparent huge
    pages: ``glibc.malloc.hugetlb=1`` is added to ``GLIBC_TUNABLES`` in this process's environment,
    unless it names ``hugetlb`` already (an administrator's setting stands).

    An algorithm process is forked fresh for every study and its libraries (cc3d, SciPy) take
    their working memory from ``malloc``, so every page it touches is a first-touch fault: at 500
    slices lung-ct-density took about 140,000 4 KiB faults and 1.2-2.4 s of system time a run;
    with the tunable 11,000-19,000 faults and 0.3-1.2 s (``BENCHMARKS.md``, issue 26). glibc reads
    the tunable when a process starts, so it reaches children only; a glibc without it ignores it,
    and the kernel applies it only where transparent huge pages are ``madvise`` or ``always``.
    """
    os.environ["GLIBC_TUNABLES"] = with_huge_pages(os.environ.get("GLIBC_TUNABLES", ""))


def with_huge_pages(tunables: str) -> str:
    """``tunables`` (a ``GLIBC_TUNABLES`` value) with :data:`HUGE_PAGES_TUNABLE` added, unless it
    names ``hugetlb`` already: what :func:`huge_pages_for_children` gives the node's children."""
    if "hugetlb" in tunables:
        return tunables
    return f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE


def set_up_process_memory(starts_children: bool = True) -> None:
    """The C library's memory settings of a long-running ainode process, first thing after its
    logging: this process's heap keeps freed memory (:func:`keep_freed_heap`) and, when it starts
    the algorithm and model processes (the node, a Celery worker; not a child receiver), those
    back their large allocations with huge pages (:func:`huge_pages_for_children`)."""
    keep_freed_heap()
    if starts_children:
        huge_pages_for_children()


BACKGROUND_NICENESS = 10
"""Nice value of threads whose work can wait for the CPU (a de-identified series' write)."""


def lower_thread_priority() -> None:
    """Give the calling thread a lower CPU priority (nice :data:`BACKGROUND_NICENESS`, or its own
    if higher): on Linux a thread has its own nice value (``setpriority`` on its thread id).

    A pool's ``initializer``: its threads then take the CPU that the job's critical path (the
    algorithm's process, the next stage) leaves, instead of a fair share of it. A thread cannot
    lower its nice value again without privilege, so only threads kept for such work use it.
    """
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if current < BACKGROUND_NICENESS:
            os.setpriority(os.PRIO_PROCESS, tid, BACKGROUND_NICENESS)
    except OSError as exc:  # not permitted here (or not Linux): the work runs at normal priority
        logger.debug("thread priority unchanged: %s", exc)
