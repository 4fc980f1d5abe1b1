"""Issue 25 (priors): a route that asks for the patient's prior study — Orthanc holds two CT
studies of one patient a year apart; the later one is forwarded; the node fetches the earlier
one (C-FIND + C-GET), de-identifies it with the same patient pseudonym and date offset, and gives
it to lung-ct-density, whose SR reports the change in each lung's volume and %LAA-950 and the
interval — equal to the difference of each study's own results. A patient without a prior gets
today's results unchanged."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from lung_ct_density import LungCtDensity
from node.jobs.volume import load_volume

from .peers import (
    CT_SERIES,
    CT_SOFT_SERIES,
    LUNG_ROUTE,
    free_port,
    node_config,
    series_files,
    start_orthanc,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _copy(source: Path, out: Path, patient_id: str, study_date: datetime.date) -> list[pydicom.Dataset]:
    """The series in ``source`` as a new study of ``patient_id`` on ``study_date``."""
    study, series = generate_uid(), generate_uid()
    copies = []
    out.mkdir(parents=True)
    for n, path in enumerate(series_files(source)):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = study, series, patient_id
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date.strftime("%Y%m%d")
        ds.save_as(out / f"{n:03d}.dcm")
        copies.append(ds)
    return copies


def _own(datasets: list[pydicom.Dataset]) -> dict[tuple[str, str], float]:
    """lung-ct-density's own measurements of a series, (group, concept meaning) -> value."""
    volume, _slices = load_volume(datasets)
    result = LungCtDensity().run(volume, "cpu")
    return {(m.segment_label, m.concept[2]): m.value for m in result.measurements}


def _sr_values(sr: pydicom.Dataset) -> dict[tuple[str, str], float]:
    """The SR's measurements, (group's tracking identifier, concept meaning) -> value (highdicom)."""
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = report.content.get_volumetric_roi_measurement_groups() + report.content.get_image_measurement_groups()
    return {(str(g.tracking_identifier), m.name.meaning): float(m.value) for g in groups for m in g.get_measurements()}


def test_the_prior_is_fetched_and_the_changes_reported(tmp_path, start_node):
    node_port = free_port()
    pacs = start_orthanc(tmp_path / "orthanc", "AINODE", node_port)
    try:
        today = datetime.date(2026, 11, 20)
        current = _copy(CT_SERIES, tmp_path / "current", "PRIORS-1", today)
        prior = _copy(CT_SOFT_SERIES, tmp_path / "prior", "PRIORS-1", today - datetime.timedelta(days=365))
        alone = _copy(CT_SERIES, tmp_path / "alone", "NO-PRIOR-2", today)
        for folder in ("current", "prior", "alone"):
            for path in sorted((tmp_path / folder).glob("*.dcm")):
                pacs.rest("POST", "/instances", raw=path.read_bytes())
        config_path, config = node_config(
            tmp_path, port=node_port,
            peers=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}],
            destinations={"pacs": {"type": "dicom", "peer": "PACS"}},
            routes=[{**LUNG_ROUTE, "destinations": ["pacs"],
                     "priors": {"source": "orthanc", "count": 1, "max_age_days": 730}}],
        )  # fmt: skip
        config["sources"] = {"orthanc": {"type": "dimse", "peer": "PACS", "retrieve": "get"}}
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        node = start_node(config_path, config)

        def forward(uid: str) -> str:
            (found,) = pacs.rest("POST", "/tools/lookup", raw=uid.encode())
            pacs.rest("POST", "/modalities/ainode/store", {"Resources": [found["ID"]], "Synchronous": True})
            return str(found["ID"])

        def sr_of(study_id: str) -> Any:
            for series in pacs.rest("GET", f"/studies/{study_id}/series"):
                if series["MainDicomTags"].get("Modality") == "SR":
                    path = tmp_path / f"{study_id}.dcm"
                    path.write_bytes(pacs.rest("GET", f"/instances/{series['Instances'][0]}/file"))
                    return pydicom.dcmread(path)
            return None

        study_id = forward(str(current[0].StudyInstanceUID))
        values = _sr_values(wait_until(lambda: sr_of(study_id), 300, 1.0))
        now, then = _own(current), _own(prior)
        for lung in ("Left lung", "Right lung"):
            expected_volume = now[(lung, "Volume")] - then[(lung, "Volume")]
            laa = next(k[1] for k in now if k[0] == lung and "950" in k[1])
            expected_laa = now[(lung, laa)] - then[(lung, laa)]
            got_volume = values[(lung, "Change in volume since prior")]
            got_laa = values[(lung, "Change in %LAA-950 since prior")]
            print(f"{lung}: volume change {got_volume:+.1f} ml (expected {expected_volume:+.1f}); "
                  f"%LAA-950 change {got_laa:+.2f} (expected {expected_laa:+.2f})")  # fmt: skip
            assert got_volume == pytest.approx(expected_volume, abs=0.1)
            assert got_laa == pytest.approx(expected_laa, abs=0.01)
            assert values[(lung, "Interval since prior study")] == 365  # dates shifted by one offset
        assert len(node.index().studies()) == 1  # the prior was not taken in as a study of its own

        alone_id = forward(str(alone[0].StudyInstanceUID))
        values = _sr_values(wait_until(lambda: sr_of(alone_id), 300, 1.0))
        assert not any("since prior" in k[1] for k in values)  # no prior: today's results only
        assert values[("Left lung", "Volume")] == pytest.approx(now[("Left lung", "Volume")], abs=0.05)
    finally:
        pacs.stop()
