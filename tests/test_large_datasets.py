"""Issue 22, defect 7: a data set's size is capped, and under the cap a receiving process does not
hold it whole (it is spooled, encrypted, then sealed into its segment part by part)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import yaml

from .peers import CT_SERIES, folder_node_config, peak_rss_growth, series_files, storescu, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIDE = 11586  # 11586^2 16-bit pixels: a 256 MiB data set


def _huge_ct(path: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(series_files(CT_SERIES)[0])
    ds.StudyDescription = "large object test"  # no route analyses it
    ds.Rows = ds.Columns = SIDE
    ds.PixelData = bytes(SIDE * SIDE * 2)
    ds.save_as(path)
    return ds


def _send_and_watch(node, path: Path) -> tuple[float, int]:
    """Send ``path`` with DCMTK; the node's largest RSS growth (MB) meanwhile, and storescu's exit code."""
    node.wait_warm()  # the growth measured is the data set's own
    growth, sent = peak_rss_growth(node.proc.pid, lambda: storescu(node.port, [path]), settle_s=1.0)
    return growth, sent.returncode


def _config(tmp_path: Path, **node: object) -> tuple[Path, dict]:
    config_path, config, _results = folder_node_config(tmp_path)
    config["node"] |= {"receivers": 1, **node}
    config_path.write_text(yaml.safe_dump(config))
    return config_path, config


def test_a_data_set_over_the_cap_is_refused_without_being_held(tmp_path, start_node):
    huge = tmp_path / "huge.dcm"
    _huge_ct(huge)
    config_path, config = _config(tmp_path, max_dataset_bytes=128 * 2**20)
    node = start_node(config_path, config)
    growth, code = _send_and_watch(node, huge)
    print(f"receiving process RSS growth: {growth:.0f} MB")
    assert code != 0  # refused (0xC000)
    assert growth < 100, f"the receiving process grew by {growth:.0f} MB for a refused 256 MiB data set"
    audit = node.cli("audit", "show").stdout
    assert "C-STORE refused (CANNOT_UNDERSTAND): the data set is over node.max_dataset_bytes (128 MiB)" in audit
    assert not list((node.data_dir / "store" / "tmp").iterdir())  # nothing spooled stays
    assert storescu(node.port, series_files(CT_SERIES)[:1]).returncode == 0  # the node goes on serving


def test_a_large_data_set_under_the_cap_is_stored_in_bounded_memory(tmp_path, start_node):
    huge = tmp_path / "huge.dcm"
    ds = _huge_ct(huge)
    config_path, config = _config(tmp_path)  # default cap: 2 GiB
    node = start_node(config_path, config)
    growth, code = _send_and_watch(node, huge)
    print(f"receiving process RSS growth: {growth:.0f} MB")
    assert code == 0
    size = huge.stat().st_size
    assert growth < size / 1e6, f"the receiving process grew by {growth:.0f} MB for a {size / 1e6:.0f} MB data set"
    assert wait_until(lambda: str(ds.SOPInstanceUID) in node.stored_sop_instance_uids() or None, 60)
    (row,) = [r for s in node.index().studies() for r in node.index().instances(s.study_key)]
    # the whole PS3.10 file (its file meta as the node writes it), sealed from its spool
    assert row.size > SIDE * SIDE * 2 and abs(row.size - size) < 1024
