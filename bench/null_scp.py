"""The receive path's ceiling: ainode's Storage SCP (pynetdicom, the same presentation contexts,
PDU size and C-STORE handler with its header parse, the C heap settings of the node's receiving
processes) in one process, storing nothing.

Run by ``bench/ingest.py --receivers scp-only``; not a receiver anyone should deploy (it answers
Success without storing). Usage: ``python bench/null_scp.py PORT``.
"""

from __future__ import annotations

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


def main() -> None:
    set_up_process_memory(starts_children=False)  # as the node's child receivers
    configure_pydicom()  # and pydicom's value validation off
    scp = StorageSCP("AINODE", [PeerRule("STORESCU")], discard)
    scp.start("127.0.0.1", int(sys.argv[1]))
    print("listening", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
