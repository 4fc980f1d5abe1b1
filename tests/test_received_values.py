"""Issue 22, defect 1: a received UID can never become a path outside the node's roots.

The UID rule (PS3.5 9.1) lives in one place (:mod:`node.uids`) and every way in uses it: the
Storage SCP, start-up reconciliation, ``ainode deidentify``; the path guard (:mod:`node.paths`)
is used by every writer (folder destinations, their withdrawal, ``algorithms check``, de-identify).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from node.errors import InvalidInstanceError
from node.jobs.delivery import withdraw, write_folder
from node.paths import path_under
from node.uids import check_uid

from .peers import AINODE, CT_SERIES, folder_node_config, series_files, wait_until

HOSTILE = ["../../x", "/abs/x", "1.2.3/../x", "1.2.3\\..\\x", "1." + "2" * 63, ""]
"""The values the issue names: traversal, absolute, embedded traversal, backslashes, 65 characters, empty."""


@pytest.mark.parametrize("value", [*HOSTILE, "1.2..3", "1.2.3.", ".1.2", "1.2.a", "1.2.3\0x", "..", "."])
def test_the_uid_rule_refuses_anything_but_digits_and_dots(value):
    with pytest.raises(InvalidInstanceError, match="Study Instance UID"):
        check_uid(value, "Study Instance UID")


def test_the_uid_rule_accepts_a_leading_zero_with_a_log_line_and_strips_padding(caplog):
    assert check_uid("1.2.840.10008.1.1\0", "SOP Class UID") == "1.2.840.10008.1.1"
    assert check_uid("0.1.2", "X") == "0.1.2"
    assert not caplog.records
    assert check_uid("1.02.3", "Study Instance UID") == "1.02.3"
    assert "leading zero" in caplog.text and "1.02.3" not in caplog.text  # the value is never logged


@pytest.mark.parametrize("parts", [("..", "x"), ("/abs",), ("a/../../x",), ("a\\..\\x",), ("",), ("a\0",)])
def test_the_path_guard_keeps_every_path_under_its_root(tmp_path, parts):
    with pytest.raises(InvalidInstanceError):
        path_under(tmp_path / "root", *parts)


def test_the_path_guard_refuses_a_link_that_leads_out(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "out").symlink_to(tmp_path)
    with pytest.raises(InvalidInstanceError, match="outside"):
        path_under(tmp_path / "root", "out", "x.dcm")
    assert path_under(tmp_path / "root", "1.2.3", "SEG_1.2.3.4.dcm") == tmp_path / "root" / "1.2.3" / "SEG_1.2.3.4.dcm"


def _result_object(study_uid: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(series_files(CT_SERIES)[0], stop_before_pixels=True)
    ds.StudyInstanceUID, ds.Modality, ds.SOPInstanceUID = study_uid, "SEG", generate_uid()
    return ds


def _tree(root: Path, *left_out: Path) -> set[str]:
    """Every path under ``root`` except those under ``left_out``."""
    found = set()
    for folder, dirs, files in os.walk(root):
        if any(Path(folder).is_relative_to(p) for p in left_out):
            dirs.clear()
            continue
        found |= {os.path.join(folder, name) for name in dirs + files}
    return found


@pytest.mark.parametrize("study_uid", ["../../TRAVERSAL.1", "1.2.3/../../../x", "1.2.3\\..\\x"])
def test_a_folder_destination_never_writes_or_deletes_outside_its_root(tmp_path, study_uid):
    root = tmp_path / "a" / "b" / "results"
    root.mkdir(parents=True)
    victim = tmp_path / "a" / "victim.dcm"
    victim.write_bytes(b"keep")
    before = _tree(tmp_path)
    with pytest.raises(InvalidInstanceError):
        write_folder(root, [_result_object(study_uid)])
    assert _tree(tmp_path) == before

    from node.settings.config import Settings

    settings = Settings.model_validate({
        "node": {"ae_title": "AINODE", "data_dir": str(tmp_path / "data")},
        "keys": {"provider": "env", "variable": "X"}, "peers": [{"ae_title": "PACS"}],
        "destinations": {"folder": {"type": "folder", "path": str(root)}}, "routes": [],
    })  # fmt: skip
    stale = _result_object(study_uid)
    stale.SOPInstanceUID = "victim"  # would name ../victim.dcm once joined
    with pytest.raises(InvalidInstanceError):
        withdraw(settings, ["folder"], [stale], _result_object("1.2.3"))
    assert victim.read_bytes() == b"keep"


def _send(port: int, datasets: list[pydicom.Dataset], folder: Path) -> list[int | None]:
    """C-STORE each data set on one association as a file: pynetdicom sends its bytes as they are,
    the request's Affected SOP Instance UID taken from the file meta (a valid UID: the node must
    check the data set's own)."""
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(str(datasets[0].SOPClassUID), [str(datasets[0].file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established
    statuses: list[int | None] = []
    chunked, pynetdicom_config.STORE_SEND_CHUNKED_DATASET = pynetdicom_config.STORE_SEND_CHUNKED_DATASET, True
    try:
        for n, ds in enumerate(datasets):
            ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            if check_uid_or_none(ds.get("SOPInstanceUID")):
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = folder / f"{n}.dcm"
            ds.save_as(path)  # the file meta as set here (pydicom would copy the data set's UID into it)
            status = assoc.send_c_store(path)
            statuses.append(int(status.Status) if "Status" in status else None)
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    return statuses


def check_uid_or_none(value: object) -> str | None:
    try:
        return check_uid(value, "UID")
    except InvalidInstanceError:
        return None


@pytest.mark.integration
def test_hostile_uids_are_refused_and_audited_and_nothing_lands_outside(tmp_path, start_node):
    config_path, config, results = folder_node_config(tmp_path)
    node = start_node(config_path, config)
    files = series_files(CT_SERIES)
    hostile = []
    for attribute in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        for value in HOSTILE:
            ds = pydicom.dcmread(files[len(hostile) % len(files)])
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.SOPInstanceUID = generate_uid()
            setattr(ds, attribute, value)
            hostile.append(ds)
    leading_zero = pydicom.dcmread(files[0])
    leading_zero.StudyInstanceUID, leading_zero.SeriesInstanceUID = "1.02.3", generate_uid()
    leading_zero.SOPInstanceUID = generate_uid()
    (tmp_path / "sent").mkdir()
    before = _tree(tmp_path, node.data_dir, results, tmp_path / "sent")

    statuses = _send(node.port, [*hostile, leading_zero], tmp_path / "sent")

    assert statuses[:-1] == [0xC000] * len(hostile), [hex(s or 0) for s in statuses]
    assert statuses[-1] == 0x0000
    assert wait_until(lambda: str(leading_zero.SOPInstanceUID) in node.stored_sop_instance_uids(), 20)
    assert "leading zero" in node.log()
    audit = subprocess.run([AINODE, "audit", "show", "--config", str(config_path)], capture_output=True, text=True,
                           check=True).stdout  # fmt: skip
    assert audit.count("C-STORE refused (CANNOT_UNDERSTAND)") == len(hostile)
    for name in ("Study Instance UID (0020,000D)", "Series Instance UID (0020,000E)", "SOP Instance UID (0008,0018)"):
        assert f"{name} is not a valid UID" in audit and f"{name} is empty" in audit
    after = _tree(tmp_path, node.data_dir, results, tmp_path / "sent")
    assert after - before <= {str(p) for p in tmp_path.glob("node-*.log")}
    assert not Path("/abs").exists() and not (tmp_path.parent / "x").exists()


def test_deidentify_refuses_a_file_whose_uid_is_a_path(tmp_path, key_env):
    ds = pydicom.dcmread(series_files(CT_SERIES)[0])
    ds.SOPInstanceUID = "../../escaped"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    source = tmp_path / "in" / "a.dcm"
    source.parent.mkdir()
    ds.save_as(source)
    out = tmp_path / "deep" / "out"
    env = {**os.environ, "AINODE_KEY": key_env["AINODE_TEST_KEY"]}
    done = subprocess.run([AINODE, "deidentify", str(source), "--out", str(out)], capture_output=True, text=True,
                          env=env, check=False)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "SOP Instance UID (0008,0018) is not a valid UID" in done.stderr
    assert not list(tmp_path.rglob("escaped*"))
