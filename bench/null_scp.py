"""The receive path's ceilings: ainode's Storage SCP (pynetdicom, the same presentation contexts,
PDU size and C-STORE handler with its header parse, the C heap settings of the node's receiving
processes) in one process, storing nothing (``scp-only``) or, with ``--durable DIR``, appending each
instance's bytes as received to one file and ``fdatasync``-ing it before Success (``scp-durable``:
the least any receiver that answers Success only once the instance is on disk must do — no
encryption, no index).

Run by ``bench/ingest.py --receivers scp-only scp-durable``; not a receiver anyone should deploy.
Usage: ``python bench/null_scp.py PORT [--durable DIR]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--durable", type=Path, help="append each instance here and fdatasync before Success")
    args = parser.parse_args()
    set_up_process_memory(starts_children=False)  # as the node's child receivers
    configure_pydicom()  # and pydicom's value validation off
    store = DurableAppend(args.durable) if args.durable else discard
    scp = StorageSCP("AINODE", [PeerRule("STORESCU")], store)
    scp.start("127.0.0.1", args.port)
    print("listening", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
