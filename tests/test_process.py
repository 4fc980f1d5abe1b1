"""Issue 26: long-running processes leave their start-up objects out of full garbage collections."""

from __future__ import annotations

import gc
import json
import re

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
