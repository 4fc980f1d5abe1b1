"""What this machine charges for memory a process touches for the first time.

A job's arrays are new memory: the de-identified instances, the volume's shared block, the
algorithm's labels and masks, the result objects. On bare metal the kernel supplies a zeroed page
for a few tenths of a microsecond; in a virtual machine whose freed memory goes back to the host
(virtio-balloon free page reporting) every such page is also a fault on the host, and new memory
can cost more than the work done in it. Measured here, in this process, each on ``--mib`` MiB:

- ``anonymous_first``: new anonymous memory (``numpy.empty``, then written once);
- ``anonymous_again``: the same pages written again (the memory bandwidth, for comparison);
- ``anonymous_reused``: new memory right after the same amount was freed (the guest reuses it);
- ``anonymous_settled``: new memory ``--settle`` seconds after a free, when a host that takes
  freed memory back has had time to;
- ``anonymous_small_pages``: the same, after ``--settle``, with NumPy's request for transparent
  huge pages (``madvise(MADV_HUGEPAGE)`` on arrays of 4 MiB and more, its default) turned off;
- ``shared_fill`` and ``shared_populate``: a new shared memory block (as the node's volume
  block, :class:`node.jobs.isolation.SharedVolume`) written by NumPy, or populated by the kernel
  in one call (``madvise(MADV_POPULATE_WRITE)``, Linux 5.14 and later), each after ``--settle``.

Each figure: seconds, GiB/s and the system (kernel) seconds of it. The kernel's free page
reporting setting is recorded where it has one. Prints a table and writes
``bench/results/first_touch.json``.

Usage: ``python bench/first_touch.py [--mib 1024] [--settle 12]``
"""

from __future__ import annotations

import argparse
import importlib
import mmap
import resource
import sys
import time
from collections.abc import Callable
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import write_report  # noqa: E402

MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
"""Linux's ``MADV_POPULATE_WRITE`` (``include/uapi/asm-generic/mman-common.h``); Python names it
only from 3.13."""

_madvise_hugepage: Callable[[bool], bool] | None = getattr(
    importlib.import_module("numpy._core.multiarray"), "_set_madvise_hugepage", None
)
"""NumPy's switch for asking the kernel for transparent huge pages (private, NumPy 2)."""

PAGE_REPORTING = Path("/sys/module/page_reporting/parameters/page_reporting_order")


def _timed(touch: Callable[[], object], nbytes: int) -> dict[str, float]:
    """Seconds, GiB/s and kernel seconds of ``touch()`` over ``nbytes``."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    start = time.perf_counter()
    touch()
    seconds = time.perf_counter() - start
    kernel = resource.getrusage(resource.RUSAGE_SELF).ru_stime - before
    return {"seconds": seconds, "gib_s": nbytes / 2**30 / seconds, "kernel_s": kernel}


def _anonymous(nbytes: int, settle_s: float) -> dict[str, dict[str, float]]:
    figures = {}
    block = np.empty(nbytes, np.uint8)
    figures["anonymous_first"] = _timed(lambda: block.fill(1), nbytes)
    figures["anonymous_again"] = _timed(lambda: block.fill(2), nbytes)
    del block
    block = np.empty(nbytes, np.uint8)
    figures["anonymous_reused"] = _timed(lambda: block.fill(1), nbytes)
    del block
    time.sleep(settle_s)
    block = np.empty(nbytes, np.uint8)
    figures["anonymous_settled"] = _timed(lambda: block.fill(1), nbytes)
    del block
    if _madvise_hugepage is not None:  # the same in 4 KiB pages: NumPy asks for huge pages by default
        _madvise_hugepage(False)
        time.sleep(settle_s)
        block = np.empty(nbytes, np.uint8)
        figures["anonymous_small_pages"] = _timed(lambda: block.fill(1), nbytes)
        _madvise_hugepage(True)
    return figures


def _shared(nbytes: int, settle_s: float, populate: bool) -> dict[str, float]:
    time.sleep(settle_s)
    shm = SharedMemory(create=True, size=nbytes)
    try:
        if populate:
            return _timed(lambda: shm._mmap.madvise(MADV_POPULATE_WRITE, 0, nbytes), nbytes)  # type: ignore[attr-defined]
        return _timed(lambda: np.ndarray((nbytes,), np.uint8, buffer=shm.buf).fill(1), nbytes)
    finally:
        shm.close()
        shm.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--settle", type=float, default=12.0, help="seconds after a free before the next block")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "first_touch.json")
    args = parser.parse_args()
    nbytes = args.mib * 2**20
    figures = _anonymous(nbytes, args.settle)
    figures["shared_fill"] = _shared(nbytes, args.settle, populate=False)
    if sys.platform == "linux":
        figures["shared_populate"] = _shared(nbytes, args.settle, populate=True)
    reporting = PAGE_REPORTING.read_text().strip() if PAGE_REPORTING.exists() else None
    print(f"{args.mib} MiB per figure; free page reporting order: {reporting or 'none'}")
    print(f"{'figure':<22}{'seconds':>10}{'GiB/s':>10}{'kernel s':>10}")
    for name, f in figures.items():
        print(f"{name:<22}{f['seconds']:>10.3f}{f['gib_s']:>10.2f}{f['kernel_s']:>10.2f}")
    write_report(args.out, "first_touch", mib=args.mib, settle_s=args.settle, page_reporting_order=reporting,
                 figures=figures)  # fmt: skip


if __name__ == "__main__":
    main()
