"""The receive path's ceilings: ainode's Storage SCP (pynetdicom, the same presentation contexts,
PDU size and C-STORE handler with its header parse, the C heap settings of the node's receiving
processes) in one process, storing nothing (``scp-only``) or, with ``--durable DIR``, appending each
instance's bytes as received to one file and ``fdatasync``-ing it before Success (``scp-durable``:
the least any receiver that answers Success only once the instance is on disk must do — no
encryption, no index).

With ``--phases FILE`` it also times every call of the steps of pynetdicom's acceptance of an
A-ASSOCIATE-RQ (decoding the PDU, making its primitive, negotiating the presentation contexts,
building and encoding the A-ASSOCIATE-AC; each done only for a request not seen before,
:mod:`node.network.acceptance`) and of the copy of a remembered request, and writes them to FILE
(JSON) when it is terminated.

Run by ``bench/ingest.py --receivers scp-only scp-durable`` and ``bench/associations.py``; not a
receiver anyone should deploy.
Usage: ``python bench/null_scp.py PORT [--durable DIR] [--phases FILE]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.dicomio import configure_pydicom
from node.instances import ReceivedInstance
from node.network.scp import PeerRule, StorageSCP
from node.process import set_up_process_memory


def discard(instance: ReceivedInstance) -> None:
    """Keep nothing (the ceiling is what pynetdicom and the header parse cost)."""


class DurableAppend:
    """Append every instance to one file and ``fdatasync`` it before Success (one lock: the
    file's end is shared by the associations)."""

    def __init__(self, directory: Path) -> None:
        self._fd = os.open(directory / "instances.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._lock = threading.Lock()

    def __call__(self, instance: ReceivedInstance) -> None:
        parts = instance.parts() if instance.parts is not None else [instance.encoded]
        with self._lock:
            for part in parts:
                os.write(self._fd, part)
            os.fdatasync(self._fd)


ACCEPTANCE_STEPS = {
    "decode A-ASSOCIATE-RQ": ("pynetdicom.pdu", "A_ASSOCIATE_RQ", "decode"),
    "make its primitive": ("pynetdicom.pdu", "A_ASSOCIATE_RQ", "to_primitive"),
    "negotiate (whole ACSE step)": ("pynetdicom.acse", "ACSE", "_negotiate_as_acceptor"),
    "build A-ASSOCIATE-AC": ("pynetdicom.pdu", "A_ASSOCIATE_AC", "from_primitive"),
    "encode A-ASSOCIATE-AC": ("pynetdicom.pdu", "A_ASSOCIATE_AC", "encode"),
    "copy a remembered request": ("node.network.acceptance", None, "copy_request"),
}
"""The steps of the acceptance that ``--phases`` times: (module, class or ``None``, function)."""


def time_acceptance(out: Path) -> None:
    """Time every call of :data:`ACCEPTANCE_STEPS` (seconds, per call) and write them to ``out``
    (JSON: step -> list of seconds) on SIGTERM, then exit."""
    import importlib

    seconds: dict[str, list[float]] = defaultdict(list)
    for step, (module, cls, method) in ACCEPTANCE_STEPS.items():
        owner = importlib.import_module(module)
        owner = getattr(owner, cls) if cls is not None else owner
        original = getattr(owner, method)

        def timed(*args: Any, _original: Any = original, _step: str = step, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_step].append(time.perf_counter() - start)

        setattr(owner, method, functools.wraps(original)(timed))

    def write(_signum: int, _frame: Any) -> None:
        out.write_text(json.dumps(seconds))
        os._exit(0)

    signal.signal(signal.SIGTERM, write)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--durable", type=Path, help="append each instance here and fdatasync before Success")
    parser.add_argument("--phases", type=Path, help="time pynetdicom's acceptance steps; written here on SIGTERM")
    args = parser.parse_args()
    if args.phases:
        time_acceptance(args.phases)
    set_up_process_memory(starts_children=False)  # as the node's child receivers
    configure_pydicom()  # and pydicom's value validation off
    store = DurableAppend(args.durable) if args.durable else discard
    scp = StorageSCP("AINODE", [PeerRule("STORESCU")], store)
    scp.start("127.0.0.1", args.port)
    print("listening", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
