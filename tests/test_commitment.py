"""Issue 25 (storage commitment, PS3.4 Annex J): Orthanc asks ainode to commit what it sent
(its REST call for storage commitment) and gets success for stored instances and a failure for
an unknown one; ainode asks Orthanc to commit the results it delivered (``commitment: true``)
and counts the delivery done on Orthanc's report; a peer that cannot commit dead-letters."""

from __future__ import annotations

from typing import Any

import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from .console import Pacs
from .peers import CT_SERIES, LUNG_ROUTE, free_port, node_config, series_files, start_orthanc, storescu, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _commit(pacs: Any, instances: list[list[str]]) -> dict[str, Any]:
    started = pacs.rest("POST", "/modalities/ainode/storage-commitment", {"DicomInstances": instances, "Timeout": 60})
    path = started["Path"]
    return wait_until(lambda: ((r := pacs.rest("GET", path))["Status"] != "Pending" and r) or None, 60, 0.5)


def test_orthanc_asks_ainode_and_ainode_asks_orthanc_to_commit(tmp_path, start_node):
    node_port = free_port()
    pacs = start_orthanc(tmp_path / "orthanc", "AINODE", node_port)
    try:
        config_path, config = node_config(
            tmp_path, port=node_port,
            peers=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}],
            destinations={"pacs": {"type": "dicom", "peer": "PACS", "commitment": True}},
            routes=[{**LUNG_ROUTE, "destinations": ["pacs"]}],
        )  # fmt: skip
        node = start_node(config_path, config)
        files = series_files(CT_SERIES)
        for path in files:
            pacs.rest("POST", "/instances", raw=path.read_bytes())
        (study,) = pacs.rest("GET", "/studies")
        pacs.rest("POST", "/modalities/ainode/store", {"Resources": [study], "Synchronous": True})
        sent = [[str(ds.SOPClassUID), str(ds.SOPInstanceUID)]
                for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in files)]  # fmt: skip

        # Orthanc as requester: every instance it sent is committed
        report = _commit(pacs, sent)
        print("Orthanc's commitment of 64:", report["Status"], len(report["Success"]), len(report["Failures"]))
        assert report["Status"] == "Success" and len(report["Success"]) == 64
        # ... and one the node never received is not
        unknown = [sent[0][0], generate_uid()]
        report = _commit(pacs, [*sent[:2], unknown])
        assert report["Status"] == "Failure" and len(report["Success"]) == 2
        (failure,) = report["Failures"]
        assert failure["SOPInstanceUID"] == unknown[1] and failure["FailureReason"] == 0x0112
        assert "storage commitment reported to PACS: 2 committed, 1 failed" in node.log()

        # Orthanc as committer: the results' delivery is done once Orthanc's report confirms them
        wait_until(lambda: node.job_state(1) == "delivered" or None, 180)
        (row,) = _commitments(node)
        assert (row.peer, row.requested, row.committed, row.failures) == ("PACS", 2, 2, "[]")
        assert "storage commitment confirmed" in node.log()
    finally:
        pacs.stop()


def _commitments(node: Any) -> list[Any]:
    from sqlalchemy import select

    from node.storage.tables import CommitmentRow

    with node.index().session() as s:
        return list(s.scalars(select(CommitmentRow)))


def test_a_destination_that_cannot_commit_dead_letters(tmp_path, start_node):
    pacs = Pacs(free_port(), tmp_path / "pacs" / "received")  # DCMTK storescp: no storage commitment
    pacs.start()
    try:
        config_path, config = node_config(
            tmp_path, peers=[{"ae_title": "STORESCU"}, {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
            destinations={"pacs": {"type": "dicom", "peer": "PACS", "commitment": True}},
            routes=[{**LUNG_ROUTE, "destinations": ["pacs"]}],
        )  # fmt: skip
        config["delivery"] = {"max_attempts": 1}
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        node = start_node(config_path, config)
        assert storescu(node.port, series_files(CT_SERIES)).returncode == 0
        wait_until(lambda: node.job_state(1) == "failed" or None, 180)
        reason = node.index().job(1).reason
        print("dead letter:", reason)
        assert "storage commitment request to PACS" in reason  # storescp takes no such association
        assert len(pacs.received()) == 2  # the objects went; the commitment could not be had
    finally:
        pacs.stop()
