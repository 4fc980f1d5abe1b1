"""Issue 11 (defects 8 and 11): one stored pseudonym map per study is what re-identifies every
series' results; start-up reconciliation leaves no unreferenced PHI in the store."""

from __future__ import annotations

import os
import time

import pydicom
import pytest

from node.datadir import open_data_dir
from node.deid.reid import PseudonymMap
from node.settings import load_settings

from .peers import CT_SERIES, CT_SOFT_SERIES, folder_node_config, series_files, storescu, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_stored_map_re_identifies_the_results_of_every_series(tmp_path, start_node):
    config_path, config, results = folder_node_config(tmp_path)
    node = start_node(config_path, config)
    lung, soft = series_files(CT_SERIES), series_files(CT_SOFT_SERIES)
    assert storescu(node.port, [*lung, *soft]).returncode == 0
    wait_until(lambda: len(list(results.rglob("*.dcm"))) == 4, 240)
    originals = {str(pydicom.dcmread(f[0], stop_before_pixels=True).SeriesInstanceUID) for f in (lung, soft)}

    data = open_data_dir(load_settings(config_path))
    (study,) = data.index.studies()
    mapping = PseudonymMap.from_bytes(data.store.get(study.map_object_id))
    mapped = set(mapping.uids.values())
    assert originals <= mapped  # both series ...
    sop_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in [*lung, *soft]}
    assert sop_uids <= mapped  # ... and every instance of both
    maps = [o for o in data.store.object_ids() if o == study.map_object_id]
    assert len(maps) == 1
    referenced = set()
    for path in results.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        if ds.Modality == "SEG":
            referenced.add(str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID))
            assert str(ds.StudyInstanceUID) == str(pydicom.dcmread(lung[0]).StudyInstanceUID)
    assert referenced == originals  # each SEG points at its own original series


def test_start_up_reconciliation_removes_leftovers_and_purge_leaves_nothing(tmp_path, start_node):
    config_path, config, _results = folder_node_config(tmp_path)
    node = start_node(config_path, config)
    files = series_files(CT_SERIES)
    assert storescu(node.port, files[:5]).returncode == 0
    wait_until(lambda: "done" in node.studies(), 60)
    node.kill()

    data = open_data_dir(load_settings(config_path))
    stale = data.store.root / "tmp" / "0123456789abcdef0123456789abcdef.deadbeef"
    stale.write_bytes(b"AIN1 half a sealed object")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    orphan_instance = data.store.put(files[5].read_bytes())  # stored, then killed before the index insert
    orphan_map = data.store.put(b'{"key_id": "x", "uids": {}, "originals": {}}')  # a job's map, never recorded
    data.close()

    node = start_node(config_path, config)
    assert not stale.exists()
    assert data.store.exists(orphan_instance) and not data.store.exists(orphan_map)
    listing = wait_until(lambda: (out := node.studies()).count("    6 instance(s)") and out, 30)
    audit = node.cli("audit", "show").stdout
    assert (
        "start-up reconciliation: 1 unfinished temporary file(s) removed, 1 stored instance(s) indexed, "
        "1 unreferenced object(s) deleted" in audit
    )

    study_key = listing.split()[0]
    wait_until(lambda: "done" in node.studies(), 60)
    purged = node.cli("purge", study_key)
    assert purged.returncode == 0, purged.stderr
    left = [o for o in data.store.object_ids() if not o.startswith("secret-")]
    assert left == []  # originals, map and results gone: nothing of the study stays past its purge
    assert list((data.store.root / "tmp").iterdir()) == []


def test_a_record_cut_after_acknowledgement_is_found_set_aside_and_the_rest_analysed(tmp_path, start_node):
    """Issue 22, defect 10: damage to a segment after C-STORE Success is reported by ``store verify``,
    quarantined and audited at start-up, and the study's other instances are still analysed."""
    config_path, config, results = folder_node_config(tmp_path)
    config["node"]["receivers"] = 1
    config_path.write_text(__import__("yaml").safe_dump(config))
    node = start_node(config_path, config)
    files = series_files(CT_SERIES)
    assert storescu(node.port, files).returncode == 0
    wait_until(lambda: "done" in node.studies(), 120)
    node.stop()

    segments = sorted((node.data_dir / "store" / "segments").glob("*.seg"), key=lambda p: p.stat().st_size)
    damaged = segments[-1]
    os.truncate(damaged, damaged.stat().st_size - 300)  # the last instance's record loses its tail

    verify = node.cli("store", "verify")
    assert verify.returncode != 0
    (line,) = [x for x in verify.stderr.splitlines() if x.startswith("damaged or missing: instance g")]
    object_id, study_key = line.split()[4], line.split()[7].rstrip(":")
    assert "no whole record" in line and "1 indexed instance(s) damaged or missing" in verify.stdout

    node = start_node(config_path, config)
    assert "damaged stored instance set aside" in node.log()
    assert (node.data_dir / "store" / "quarantine" / object_id).exists()
    assert (
        f"damaged stored instance set aside: instance {object_id} of study {study_key}"
        in node.cli("audit", "show").stdout
    )
    assert f"{len(files) - 1} instance(s)" in node.studies()
    rerun = node.cli("studies", "rerun", study_key)
    assert rerun.returncode == 0, rerun.stderr
    wait_until(lambda: node.job_state(2) == "delivered" or None, 120)
    seg = next(p for p in results.rglob("SEG_*.dcm"))
    referenced = pydicom.dcmread(seg).ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert len(referenced) == len(files) - 1  # analysed without the damaged instance
    assert node.cli("store", "verify").returncode == 0
