"""Issue 5 (part): delivery retries with backoff, the dead-letter state and replay, against a real
Orthanc that is down when results are due."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest

from .peers import (
    CT_PATIENT_NAME,
    CT_SERIES,
    DATA,
    LUNG_ROUTE,
    ROOT,
    TOOL_ENV,
    dciodvfy,
    folder_node_config,
    free_port,
    make_studies,
    node_config,
    series_files,
    start_orthanc,
    start_storescu,
    storescu,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _setup(tmp_path, start_node, max_attempts: int):
    dicom_port, http_port = free_port(), free_port()  # Orthanc will listen here, later
    config_path, config = node_config(
        tmp_path,
        peers=[{"ae_title": "STORESCU"}, {"ae_title": "PACS", "host": "127.0.0.1", "port": dicom_port}],
        destinations={"pacs": {"type": "dicom", "peer": "PACS"}},
        routes=[{**LUNG_ROUTE, "destinations": ["pacs"]}],
    )
    config["delivery"] = {"max_attempts": max_attempts, "backoff_s": 1.0, "max_backoff_s": 2.0}
    config_path.write_text(__import__("yaml").safe_dump(config))
    node = start_node(config_path, config)
    sent = storescu(node.port, series_files(CT_SERIES))
    assert sent.returncode == 0, sent.stderr
    return node, dicom_port, http_port


def _job(node) -> dict:
    shown = node.cli("jobs", "show", "1")
    return json.loads(shown.stdout) if shown.returncode == 0 else {}


def _results_in(pacs) -> set[str]:
    modalities = set()
    for study in pacs.rest("GET", "/studies"):
        for series in pacs.rest("GET", f"/studies/{study}/series"):
            modalities.add(series["MainDicomTags"].get("Modality"))
    return modalities


def test_delivery_retries_until_the_pacs_returns(tmp_path, start_node):
    node, dicom_port, http_port = _setup(tmp_path, start_node, max_attempts=20)
    wait_until(lambda: "retrying in" in (_job(node).get("reason") or ""), 180)
    pacs = start_orthanc(tmp_path / "orthanc", "AINODE", node.port, dicom_port, http_port)
    try:
        job = wait_until(lambda: (j := _job(node)).get("state") == "delivered" and j, 120)
        assert job["attempts"] >= 1  # failed attempts before the one that delivered
        assert _results_in(pacs) == {"SEG", "SR"}
    finally:
        pacs.stop()


def test_dead_letter_is_listed_and_replayed(tmp_path, start_node):
    node, dicom_port, http_port = _setup(tmp_path, start_node, max_attempts=2)
    job = wait_until(lambda: (j := _job(node)).get("state") == "failed" and j, 180)
    assert job["reason"].startswith("dead letter after 2 attempt(s)")
    listed = node.cli("jobs", "list", "--state", "failed").stdout
    assert listed.split()[0] == "1" and "dead letter" in listed
    assert "failed" in node.cli("studies", "list").stdout
    pacs = start_orthanc(tmp_path / "orthanc", "AINODE", node.port, dicom_port, http_port)
    try:
        retried = node.cli("jobs", "retry", "1")
        assert retried.returncode == 0, retried.stderr
        job = wait_until(lambda: (j := _job(node)).get("state") == "delivered" and j, 60)
        assert job["timings"].get("algorithm_s") is not None  # kept from the first (only) analysis
        audit = node.cli("audit", "show").stdout
        assert audit.count("algorithm lung-ct-density") == 1  # the replay did not analyse again
        assert audit.count("results sent (SEG, SR)") == 1
        assert _results_in(pacs) == {"SEG", "SR"}
        assert "done" in node.cli("studies", "list").stdout
    finally:
        pacs.stop()


def test_every_odd_transfer_syntax_file_gets_a_sensible_answer(tmp_path, start_node):
    """Every file of ../shared/data/transfer_syntaxes (truncated, bad VR, meta-less, every codec) is
    offered; the node answers each without an internal error, keeps serving, and a clean CT study
    sent afterwards still gets its results."""
    config_path, config, results = folder_node_config(tmp_path)
    node = start_node(config_path, config)
    files = sorted(p for p in (DATA / "transfer_syntaxes").rglob("*") if p.is_file())
    assert len(files) > 200
    # dcmsend proposes each file's own transfer syntax (storescu cannot transcode compressed files)
    offered = subprocess.run(
        ["dcmsend", "-v", "--no-halt", "-aet", "STORESCU", "-aec", "AINODE", "127.0.0.1", str(node.port),
         *map(str, files)],
        capture_output=True, text=True, env=TOOL_ENV, timeout=600, check=False,
    )  # fmt: skip
    summary = offered.stdout + offered.stderr
    stored = int(summary.split("with status SUCCESS  :")[1].split()[0])
    refused = int(summary.split("with status ERROR    :")[1].split()[0])
    assert stored > 100, summary[-3000:]
    assert refused >= 1  # files without a Study Instance UID: 0xC000 Cannot Understand
    log = node.log()
    assert "C-STORE refused (CANNOT_UNDERSTAND): Study Instance UID (0020,000D) is missing" in log
    assert '"C-STORE failed"' not in log  # no internal error on any file
    assert node.proc is not None and node.proc.poll() is None

    echo = subprocess.run(
        ["echoscu", "-aet", "STORESCU", "-aec", "AINODE", "127.0.0.1", str(node.port)],
        capture_output=True, text=True, env=TOOL_ENV, check=False,
    )  # fmt: skip
    assert echo.returncode == 0
    sent = storescu(node.port, series_files(CT_SERIES))
    assert sent.returncode == 0, sent.stderr
    wait_until(lambda: results.exists() and len(list(results.rglob("*.dcm"))) == 2, 180)


def test_kill_9_mid_association_after_complete_and_during_analysis_delivers_exactly_once(tmp_path, start_node):
    node_port = free_port()
    pacs = start_orthanc(tmp_path / "orthanc", "AINODE", node_port)
    try:
        config_path, config = node_config(
            tmp_path,
            port=node_port,
            peers=[{"ae_title": "STORESCU"}, {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}],
            destinations={"pacs": {"type": "dicom", "peer": "PACS"}},
            routes=[{**LUNG_ROUTE, "destinations": ["pacs"], "completion": {"quiet_period_s": 2.0}}],
        )
        files = series_files(CT_SERIES)
        (second,) = make_studies(CT_SERIES, 1, tmp_path / "second")
        node = start_node(config_path, config)
        # 1. killed mid-association: Nagle left on, so the sender is slow enough to be cut off
        sender = start_storescu(node.port, files, env={**TOOL_ENV, "TCP_NODELAY": "0"})
        segments = node.data_dir / "store" / "segments"
        wait_until(lambda: any(p.stat().st_size for p in segments.glob("*.seg")), 30, 0.05)
        node.kill()
        sender.communicate(timeout=60)
        assert sender.returncode != 0  # the modality saw the failure and will send again

        # 2. restarted; the modality resends, then sends a second study; killed while the first
        #    study's algorithm runs and the second is complete, its job waiting for the worker
        node = start_node(config_path, config)
        assert storescu(node.port, files).returncode == 0
        assert storescu(node.port, second).returncode == 0

        def states() -> list[str]:
            return [node.job_state(i) or "" for i in (1, 2)]

        wait_until(lambda: sorted(states()) == ["pending", "running"], 60, 0.1)
        node.kill()

        # 3. restarted: the jobs resume from the index and each study's results reach the PACS once
        node = start_node(config_path, config)
        wait_until(lambda: states() == ["delivered", "delivered"], 240)
        studies = pacs.rest("GET", "/studies")
        assert len(studies) == 2
        for study in studies:
            series = pacs.rest("GET", f"/studies/{study}/series")
            assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["SEG", "SR"]
            assert all(len(s["Instances"]) == 1 for s in series)
        listing = node.cli("studies", "list").stdout
        assert listing.count(f"{len(files):>5} instance(s)") == 2 and listing.count("done") == 2  # nothing lost
    finally:
        pacs.stop()


def test_eight_concurrent_senders_all_delivered(tmp_path, start_node):
    studies = make_studies(CT_SERIES, 8, tmp_path / "studies")
    config_path, config, results = folder_node_config(tmp_path)
    node = start_node(config_path, config)
    senders = [start_storescu(node.port, files) for files in studies]
    for sender in senders:
        _out, err = sender.communicate(timeout=300)
        assert sender.returncode == 0, err[-2000:]  # every instance acknowledged with Success
    listing = wait_until(lambda: (out := node.studies()).count("done") == 8 and out, 600, 1.0)
    assert listing.count(f"{len(studies[0]):>5} instance(s)") == 8
    assert len(list(results.rglob("*.dcm"))) == 16  # a SEG and an SR for each study
    assert node.proc is not None and node.proc.poll() is None


def test_sigterm_finishes_the_running_job_and_kill_9_before_delivery_resumes(tmp_path, start_node):
    """SIGTERM while the algorithm runs: no new associations, the job finishes (results built and
    their delivery attempted), the node exits. kill -9 while results wait for a PACS that is down:
    after restart they reach the PACS once."""
    node, dicom_port, http_port = _setup(tmp_path, start_node, max_attempts=20)
    wait_until(lambda: _job(node).get("state") == "running", 120, 0.1)
    assert node.proc is not None
    node.proc.send_signal(__import__("signal").SIGTERM)
    assert node.proc.wait(timeout=120) == 0
    job = _job(node)
    assert job["results"] and job["state"] == "pending"  # built, delivery waiting for the PACS
    assert "retrying in" in job["reason"]

    node = start_node(node.config_path, __import__("yaml").safe_load(node.config_path.read_text()))
    wait_until(lambda: _job(node).get("attempts", 0) >= 2, 120)
    node.kill()  # results built, not yet delivered
    pacs = start_orthanc(tmp_path / "orthanc", "AINODE", node.port, dicom_port, http_port)
    try:
        node = start_node(node.config_path, __import__("yaml").safe_load(node.config_path.read_text()))
        wait_until(lambda: _job(node).get("state") == "delivered", 120)
        (study,) = pacs.rest("GET", "/studies")
        series = pacs.rest("GET", f"/studies/{study}/series")
        assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["SEG", "SR"]
        assert all(len(s["Instances"]) == 1 for s in series)
    finally:
        pacs.stop()


def test_one_study_over_four_concurrent_associations(tmp_path, start_node):
    """A PACS may send one study on several associations at once: every instance is acknowledged,
    the node sees one study, and the results are built once."""
    config_path, config, results = folder_node_config(tmp_path)
    node = start_node(config_path, config)
    files = series_files(CT_SERIES)
    senders = [start_storescu(node.port, files[i::4]) for i in range(4)]
    for sender in senders:
        _out, err = sender.communicate(timeout=120)
        assert sender.returncode == 0, err[-2000:]
    listing = wait_until(lambda: (out := node.studies()) and "done" in out and out, 180)
    assert len(listing.strip().splitlines()) == 1 and f"{len(files):>5} instance(s)" in listing
    assert len(list(results.rglob("*.dcm"))) == 2


def test_a_late_burst_supersedes_the_first_analysis(tmp_path, start_node):
    """Two bursts separated by more than the quiet period: the first is analysed and delivered; the
    late burst re-opens the study, the whole series is analysed again, and the first results are
    withdrawn with an IOCM Rejection Note, which Orthanc acts on through deploy/orthanc's script.
    The PACS asks for every kind of result object (SEG, SR, GSPS, SC), the folder for the SR only:
    each gets what it asks for, and the PACS ends with one study holding only the superseding
    objects (and the note)."""
    node_port = free_port()
    pacs = start_orthanc(
        tmp_path / "orthanc", "AINODE", node_port, lua_scripts=[ROOT / "deploy" / "orthanc" / "iocm-rejection.lua"]
    )
    try:
        config_path, config = node_config(
            tmp_path,
            port=node_port,
            peers=[{"ae_title": "STORESCU"}, {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}],
            destinations={
                "pacs": {"type": "dicom", "peer": "PACS", "objects": ["SEG", "SR", "GSPS", "SC"]},
                "folder": {"type": "folder", "path": str(tmp_path / "results"), "objects": ["SR"]},
            },
            routes=[{**LUNG_ROUTE, "destinations": ["pacs", "folder"], "completion": {"quiet_period_s": 2.0}}],
        )
        node = start_node(config_path, config)
        files = sorted(
            series_files(CT_SERIES),
            key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]),
        )
        assert storescu(node.port, files[:40]).returncode == 0  # first burst: the upper 40 slices
        wait_until(lambda: node.job_state(1) == "delivered", 180)
        first = {i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.rest("GET", "/instances?expand")}
        assert len(first) == 7  # SEG, SR, GSPS and four key images
        (study,) = pacs.rest("GET", "/studies")
        modalities = sorted(s["MainDicomTags"]["Modality"] for s in pacs.rest("GET", f"/studies/{study}/series"))
        assert modalities == ["OT", "PR", "SEG", "SR"]  # four series
        (only,) = (tmp_path / "results").rglob("*.dcm")
        assert only.name.startswith("SR_")  # the folder asked for the SR only

        assert storescu(node.port, files[40:]).returncode == 0  # late burst
        wait_until(lambda: node.job_state(2) == "delivered", 180)
        superseded = json.loads(node.cli("jobs", "show", "1").stdout)
        assert superseded["state"] == "superseded" and "withdrawn from pacs, folder" in superseded["reason"]
        in_folder = {p.name.split("_", 1)[1].removesuffix(".dcm") for p in (tmp_path / "results").rglob("*.dcm")}
        assert len(in_folder) == 1 and not in_folder & first  # the folder holds only the new SR

        series = pacs.rest("GET", f"/studies/{study}/series")
        assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["KO", "OT", "PR", "SEG", "SR"]
        assert sum(len(s["Instances"]) for s in series) == 8  # the superseding seven and the note
        for uid in first:  # the first analysis is gone from the PACS
            assert pacs.rest("POST", "/tools/lookup", raw=uid.encode()) == []
        seg_series = next(s for s in series if s["MainDicomTags"]["Modality"] == "SEG")
        seg_file = tmp_path / "seg.dcm"
        seg_file.write_bytes(pacs.rest("GET", f"/instances/{seg_series['Instances'][0]}/file"))
        seg = pydicom.dcmread(seg_file)
        referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
        assert len(referenced) == len(files)  # the superseding analysis covers the whole series
        kos_series = next(s for s in series if s["MainDicomTags"]["Modality"] == "KO")
        kos_file = tmp_path / "kos.dcm"
        kos_file.write_bytes(pacs.rest("GET", f"/instances/{kos_series['Instances'][0]}/file"))
        errors, _warnings = dciodvfy(kos_file)
        assert errors == []
        kos = pydicom.dcmread(kos_file)
        assert kos.ConceptNameCodeSequence[0].CodeValue == "113001"
        withdrawn = {
            sop.ReferencedSOPInstanceUID
            for item in kos.CurrentRequestedProcedureEvidenceSequence
            for ser in item.ReferencedSeriesSequence
            for sop in ser.ReferencedSOPSequence
        }
        assert withdrawn == first
        assert "superseded results withdrawn" in node.cli("audit", "show").stdout
        # highdicom warns about the (re-identified) patient name while building the note: the node's
        # log records such library warnings without their text
        assert "library warning (text withheld)" in node.log() and CT_PATIENT_NAME not in node.log()
    finally:
        pacs.stop()


def test_receiver_processes_share_the_port_follow_reloads_and_die_with_the_node(tmp_path, start_node):
    """With node.receivers = 2 a child process receives on the same port: associations are spread
    over both, a reload that admits a new peer reaches both, and kill -9 of the node leaves no
    receiver behind."""
    node, config_path, config, child = _node_with_two_receivers(tmp_path, start_node)

    config["peers"].append({"ae_title": "NEWPEER"})
    config_path.write_text(__import__("yaml").safe_dump(config))
    assert node.cli("config", "reload").returncode == 0
    wait_until(lambda: "receiver 1 reloaded its configuration" in node.log(), 30)
    one_file = series_files(CT_SERIES)[:1]
    for _ in range(16):  # each on its own association; the main process hands them out in turn
        sent = subprocess.run(
            ["storescu", "-aet", "NEWPEER", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, one_file)],
            capture_output=True, text=True, env=TOOL_ENV, timeout=60, check=False,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr  # admitted by whichever process took the association
    record_ids = [line.split()[0] for line in (node.data_dir / "audit" / "audit.log").read_text().splitlines()]
    writers = {r.split("-")[1] for r in record_ids}  # audit-<writer>-<n>: one writer id per process
    assert len(writers) == 2  # the main process and the child both received (and audited)
    assert len(set(record_ids)) == len(record_ids)  # record ids stay unique across processes

    os.kill(child, signal.SIGKILL)  # a receiver crashes: the node restarts it
    wait_until(lambda: node.log().count("receiver 1 listening") == 2, 60)
    assert "receiver 1 exited" in node.log()
    children = subprocess.run(["pgrep", "-P", str(node.proc.pid), "-f", "spawn_main"], capture_output=True, text=True)
    (child,) = map(int, children.stdout.split())

    node.kill()
    wait_until(lambda: not Path(f"/proc/{child}").exists(), 10, 0.1)


def test_concurrent_associations_are_balanced_over_the_receivers(tmp_path, start_node):
    """Four concurrent associations on a node with two receiver processes: two each (the main
    process hands every connection to the receiver with the fewest open ones), whatever the
    senders' ports; a connection closed before its A-ASSOCIATE-RQ (a port probe) holds nothing.
    All four are established before any sends, so none ends (and frees its receiver) before the
    last connects, however loaded the machine."""
    from pynetdicom import AE

    config_path, config = node_config(tmp_path, peers=[{"ae_title": "STORESCU"}], destinations={}, routes=[])
    config["node"]["receivers"] = 2
    config_path.write_text(__import__("yaml").safe_dump(config))
    node = start_node(config_path, config)  # it probed the port: a connection closed at once
    wait_until(lambda: "receiver 1 listening" in node.log(), 60)
    studies = make_studies(CT_SERIES, 4, tmp_path / "studies")
    before = len((node.data_dir / "audit" / "audit.log").read_text().splitlines())
    first = pydicom.dcmread(studies[0][0], stop_before_pixels=True)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(str(first.SOPClassUID), [str(first.file_meta.TransferSyntaxUID)])
    associations = [ae.associate("127.0.0.1", node.port, ae_title="AINODE") for _ in studies]
    try:
        assert all(assoc.is_established for assoc in associations)
        for assoc, files in zip(associations, studies, strict=True):
            statuses = [assoc.send_c_store(path) for path in files]
            assert all(status.get("Status") == 0x0000 for status in statuses)
    finally:
        for assoc in associations:
            assoc.release()

    def received() -> list[str] | None:  # the writer of each association's "instances received"
        ids = [line.split()[0] for line in (node.data_dir / "audit" / "audit.log").read_text().splitlines()]
        shown = node.cli("audit", "show").stdout.splitlines()  # one record per line, in file order
        if len(shown) != len(ids):
            return None  # a record was appended in between
        pairs = list(zip(ids, shown, strict=True))[before:]
        writers = [i.split("-")[1] for i, text in pairs if "instances received" in text]
        return writers if len(writers) == 4 else None

    writers = wait_until(received, 60)
    assert sorted(Counter(writers).values()) == [2, 2], writers


def _node_with_two_receivers(tmp_path, start_node, **node_settings):
    """A folder node with ``node.receivers: 2`` (and ``node_settings``), once its child receiver
    listens: the node, its configuration path and content, and the child's pid."""
    config_path, config, _results = folder_node_config(tmp_path)
    config["node"] |= {"receivers": 2, **node_settings}
    config_path.write_text(__import__("yaml").safe_dump(config))
    node = start_node(config_path, config)
    wait_until(lambda: "receiver 1 listening" in node.log(), 60)
    assert node.proc is not None
    children = subprocess.run(["pgrep", "-P", str(node.proc.pid), "-f", "spawn_main"], capture_output=True, text=True)
    (child,) = map(int, children.stdout.split())
    return node, config_path, config, child


def test_a_stopped_receiver_gets_no_connection_and_is_restarted(tmp_path, start_node):
    """Issue 22, defect 8: a receiving process that stops making progress (SIGSTOP) is detected
    within the network timeout, gets no new connection meanwhile, and is restarted."""
    node, _config_path, _config, child = _node_with_two_receivers(tmp_path, start_node, network_timeout_s=10)
    os.kill(child, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        time.sleep(2.0)  # a sender starts while the receiver is stopped
        one_file = series_files(CT_SERIES)[:1]
        for _ in range(8):  # each on its own association: none may be handed to the stopped receiver
            sent = subprocess.run(
                ["storescu", "-aet", "STORESCU", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, one_file)],
                capture_output=True, text=True, env=TOOL_ENV, timeout=30, check=False,
            )  # fmt: skip
            assert sent.returncode == 0, sent.stderr
        wait_until(lambda: "receiver 1 made no progress" in node.log(), 30, 0.1)
        assert time.monotonic() - stopped_at < 10  # within network_timeout_s
        assert "receiver 1 has shown no progress" in node.log()
        wait_until(lambda: node.log().count("receiver 1 listening") == 2, 60)
        assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    finally:
        if Path(f"/proc/{child}").exists():
            os.kill(child, signal.SIGCONT)
    files = series_files(CT_SERIES)
    assert storescu(node.port, files).returncode == 0  # the restarted receiver takes its share again
