"""Issue 26: long-running processes leave their start-up objects out of full garbage collections,
and their C heap keeps freed memory for the next instance's buffers."""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from node.process import freeze_start_up_objects

from .peers import node_config, wait_until


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_freeze_collects_garbage_first_and_freezes_the_living():
    gc.collect()
    before = gc.get_freeze_count()
    garbage = _Cycle()
    garbage_id = id(garbage)
    del garbage  # a reference cycle: only a collection frees it
    alive = _Cycle()
    try:
        freeze_start_up_objects()
        assert gc.get_freeze_count() > before
        assert not any(o is alive for o in gc.get_objects())  # frozen: out of every collection
        assert not any(id(o) == garbage_id and isinstance(o, _Cycle) for o in gc.get_objects())
    finally:
        gc.unfreeze()
    assert any(o is alive for o in gc.get_objects())


@pytest.mark.integration
def test_the_node_and_its_child_receiver_freeze_once_started(tmp_path, start_node):
    config_path, config = node_config(tmp_path, peers=[{"ae_title": "STORESCU"}], destinations={}, routes=[])
    config["node"]["receivers"] = 2  # the main process and one child receiver
    config_path.write_text(yaml.safe_dump(config))
    node = start_node(config_path, config)
    node.wait_warm()
    wait_until(lambda: node.log().count("start-up objects frozen") >= 2 or None, 30)
    lines = [line for line in node.log().splitlines() if "start-up objects frozen" in line]
    counts = [int(m.group(1)) for line in lines if (m := re.search(r'"objects": (\d+)', line))]
    assert len(counts) == 2, lines
    assert min(counts) > 10_000  # a started process's modules and tables, not a handful
    assert all(json.loads(line)["level"] == "INFO" for line in lines)
    assert node.log().count("C heap keeps freed memory for reuse") == 2  # both receiving processes


_FAULTS = """
import resource, sys
from node.process import keep_freed_heap
kept = keep_freed_heap() if sys.argv[1] == "keep" else None
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
start = faults()
for _ in range(200):  # what a C-STORE of a CT slice allocates: the data set, its ciphertext, the record
    data = bytearray(600_000)
    record = bytes(data) + b"tag"
    del data, record
print(kept, faults() - start)
"""


def _faults(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True,
        cwd=Path(__file__).parent.parent, env={**os.environ, **(env or {})},
    )  # fmt: skip
    kept, faults = done.stdout.split()
    return kept, int(faults)


def test_the_heap_keeps_freed_buffers_for_the_next_ones():
    kept, faults = _faults("keep")
    default_kept, default_faults = _faults("default")
    assert kept == "True" and default_kept == "None"
    assert default_faults > 20_000  # glibc's defaults: every buffer's pages faulted in anew
    assert faults < 1_000


def test_an_administrators_heap_tunables_stand():
    kept, faults = _faults("keep", {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"})
    assert kept == "False"
    assert faults > 20_000  # glibc's behaviour as the administrator set it


def test_children_get_huge_pages_unless_the_administrator_set_them():
    from node.process import HUGE_PAGES_TUNABLE, with_huge_pages

    assert with_huge_pages("") == HUGE_PAGES_TUNABLE
    assert with_huge_pages("glibc.malloc.arena_max=2") == f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}"
    assert with_huge_pages("glibc.malloc.hugetlb=0") == "glibc.malloc.hugetlb=0"
