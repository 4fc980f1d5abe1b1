"""Issue 11 (defects 6 and 7): ``ainode send`` sends compressed files; refused files are reported
in one line that names the cause, and the others still go."""

from __future__ import annotations

import subprocess

import pydicom
import pytest

from .peers import AINODE, CT_SERIES, DATA, TRANSCODED, node_config, series_files, wait_until

pytestmark = [pytest.mark.integration]

JPEG_LOSSLESS = [DATA / "transfer_syntaxes" / "pydicom_3.0.2_test_files" / "SC_rgb_jpeg_gdcm.dcm",
                 DATA / "transfer_syntaxes" / "pydicom_data" / "JPEG-LL.dcm"]  # fmt: skip
J2K = series_files(TRANSCODED / "j2k_lossless")
UNCOMPRESSED = series_files(TRANSCODED / "explicit_le")
US_J2K = DATA / "transfer_syntaxes" / "pydicom_data" / "US1_J2KR.dcm"  # ultrasound: not a class ainode takes


def _send(port: int, called: str, files) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AINODE, "send", *map(str, files), "--to", f"127.0.0.1:{port}", "--aet", called, "--calling-aet", "STORESCU"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_send_delivers_compressed_and_uncompressed_series_in_one_call(tmp_path, start_node, orthanc):
    assert {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in JPEG_LOSSLESS} == {"1.2.840.10008.1.2.4.70"}
    files = [*JPEG_LOSSLESS, *J2K, *UNCOMPRESSED]
    config_path, config = node_config(tmp_path, peers=[{"ae_title": "STORESCU"}], destinations={}, routes=[])
    node = start_node(config_path, config)

    sent = _send(node.port, "AINODE", [*files, US_J2K])
    assert sent.returncode == 1  # one file failed ...
    assert f"sent {len(files)} of {len(files) + 1} instance(s); 1 failed" in sent.stdout, sent.stdout + sent.stderr
    refusals = [line for line in sent.stderr.splitlines() if "not sent" in line]
    assert len(refusals) == 1 and refusals[0].startswith(f"{US_J2K}: not sent: ")  # ... in one line, no traceback
    assert "Ultrasound Image Storage" in refusals[0] and "Traceback" not in sent.stderr
    listing = wait_until(lambda: (out := node.studies()).strip() and out, 20)
    assert sum(int(line.split()[2]) for line in listing.splitlines()) == len(files)

    pacs = orthanc("AINODE", node.port)
    to_pacs = _send(pacs.dicom_port, "PACS", files)
    assert to_pacs.returncode == 0, to_pacs.stderr
    assert len(pacs.rest("GET", "/instances")) == len(files)


def test_deidentify_names_the_empty_attribute(tmp_path):
    import base64
    import os
    import secrets

    source = tmp_path / "in"
    source.mkdir()
    for n, keyword in enumerate(("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")):
        ds = pydicom.dcmread(series_files(CT_SERIES)[n])
        setattr(ds, keyword, "")
        ds.save_as(source / f"{keyword}.dcm")
    env = {**os.environ, "AINODE_KEY": base64.b64encode(secrets.token_bytes(32)).decode()}
    done = subprocess.run(
        [AINODE, "deidentify", str(source), "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env,
        check=False,
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert any("StudyInstanceUID.dcm: not de-identified: Study Instance UID (0020,000D) is empty" in x for x in lines)
    assert any("SeriesInstanceUID.dcm: not de-identified: Series Instance UID (0020,000E) is empty" in x for x in lines)
    assert any("SOPInstanceUID.dcm: not de-identified: SOP Instance UID (0008,0018) is empty" in x for x in lines)
    assert "de-identified 0, quarantined 0, failed 3" in done.stdout
