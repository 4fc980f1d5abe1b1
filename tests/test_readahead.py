"""Issue 26: a routed study's instances are read and decoded in the last seconds of its quiet period
(``node.jobs.readahead``), on the real CT received through the node's own ingest path; the job
takes them instead of reading them and de-identifies the same series."""

from __future__ import annotations

import secrets
from pathlib import Path

import pydicom

from ainode_sdk.registry import Registry
from node.dicomio import encode
from node.instances import ReceivedInstance
from node.jobs import readahead
from node.jobs.pipeline import Pipeline, Services
from node.jobs.readahead import ReadAhead, profile_fingerprint
from node.jobs.snapshot import JobPlan
from node.jobs.stages import Stages
from node.settings.config import Settings
from node.storage.index import Index, StudyState
from node.storage.ingest import Ingest
from node.storage.keys import KeyringProvider
from node.storage.secrets import PSEUDONYM_SECRET, NodeSecrets
from node.storage.store import ObjectStore

from .peers import CT_SERIES, series_files

QUIET_S = 30.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _received(tmp_path: Path, modality: str = "CT", files: int = 12) -> tuple[Pipeline, Index, str, Clock]:
    """A node's pipeline over ``files`` instances of the chest CT, received through its ingest; its
    one route takes ``modality`` with a quiet period of :data:`QUIET_S`."""
    settings = Settings.model_validate({
        "node": {"data_dir": str(tmp_path)}, "keys": {"provider": "env"}, "peers": [{"ae_title": "STORESCU"}],
        "routes": [{"name": "lung", "match": {"Modality": modality}, "algorithms": ["lung-ct-density"],
                    "completion": {"quiet_period_s": QUIET_S}}],
    })  # fmt: skip
    store = ObjectStore(tmp_path / "store", KeyringProvider([secrets.token_bytes(32)]))
    index = Index.for_data_dir(tmp_path)
    node_secrets = NodeSecrets(store)
    ingest = Ingest(store, index, node_secrets)
    for path in series_files(CT_SERIES)[:files]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ingest(ReceivedInstance(
            str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.SOPClassUID),
            "1.2.840.10008.1.2", "STORESCU", path.read_bytes(),
        ))  # fmt: skip
    ingest.close()
    (study,) = index.studies()
    clock = Clock(study.last_received_at)
    services = Services(settings, store, index, node_secrets, Registry(), "cpu", clock=clock)
    return Pipeline(services), index, study.study_key, clock


def _deidentified(stages: Stages, index: Index, job_id: int) -> list[bytes]:
    """The job's series as its de-identify stage leaves it, each instance encoded."""
    job = index.job(job_id)
    assert job is not None
    ids = stages.deidentify(job, JobPlan.from_json(job.route_snapshot))
    try:
        return [encode(ds) for ds in stages.deidentified_series(job, ids)]
    finally:
        stages.forget(job.id)


def test_a_routed_study_is_read_ahead_before_its_quiet_period_ends_and_its_job_deidentifies_the_same(tmp_path):
    pipeline, index, key, clock = _received(tmp_path)
    ahead = ReadAhead(pipeline.s, pipeline.headers)
    clock.now += readahead.LULL_S + 1
    assert ahead.read_once() == 0  # 29 s of the quiet period left: too early
    clock.now += QUIET_S - readahead.LEAD_S - readahead.LULL_S  # within LEAD_S of its end
    rows = index.instances(key)
    assert ahead.read_once() == len(rows)
    assert ahead.held_bytes == sum(r.size for r in rows)
    assert ahead.read_once() == 0  # nothing read twice

    clock.now += readahead.LEAD_S
    (job_id,) = pipeline.plan(key)
    pipeline.stages.read_ahead = ahead
    with_read_ahead = _deidentified(pipeline.stages, index, job_id)
    assert ahead.held_bytes == 0  # every instance taken by the job
    originals = [pydicom.dcmread(f, stop_before_pixels=True) for f in series_files(CT_SERIES)[:12]]
    stored = pipeline.stages.stored_map(key)  # what re-identification will use
    assert {str(ds.SOPInstanceUID) for ds in originals} <= set(stored.uids.values())
    assert stored.original_study_instance_uid == str(originals[0].StudyInstanceUID)
    assert _deidentified(Stages(pipeline.s), index, job_id) == with_read_ahead  # read by the job itself


def test_an_instance_read_ahead_under_another_profile_is_de_identified_again_by_the_job(tmp_path):
    pipeline, index, key, clock = _received(tmp_path)
    ahead, kept = ReadAhead(pipeline.s, pipeline.headers), ReadAhead(pipeline.s, pipeline.headers)
    clock.now += QUIET_S - 1
    assert ahead.read_once() == kept.read_once() > 0  # under the default profile as configured then
    before = pipeline.s.settings
    profile = before.deidentification["default"].model_copy(update={"retain_device_identity": True})
    pipeline.s.active.replace(before.model_copy(update={"deidentification": {"default": profile}}))  # a reload
    clock.now += 2
    (job_id,) = pipeline.plan(key)  # its plan has the reloaded profile
    pipeline.stages.read_ahead = ahead
    with_read_ahead = _deidentified(pipeline.stages, index, job_id)
    assert ahead.held_bytes == 0
    assert _deidentified(Stages(pipeline.s), index, job_id) == with_read_ahead
    under_the_old_profile = [kept.take(row) for row in index.instances(key)]
    assert [encode(p.dataset) for p in under_the_old_profile if p] != with_read_ahead  # they differ here


def test_no_read_ahead_for_a_study_no_route_takes_one_still_arriving_or_one_planned(tmp_path):
    pipeline, _index, key, clock = _received(tmp_path / "mr", modality="MR")
    clock.now += QUIET_S - 1
    assert ReadAhead(pipeline.s, pipeline.headers).read_once() == 0  # no route takes a CT

    pipeline, index, key, clock = _received(tmp_path / "ct")
    ahead = ReadAhead(pipeline.s, pipeline.headers)
    clock.now += readahead.LULL_S / 2
    assert ahead.read_once() == 0  # its instances may still be arriving
    clock.now += QUIET_S
    assert len(pipeline.plan(key)) == 1 and index.study(key).state != StudyState.RECEIVING
    assert ahead.read_once() == 0  # planned: its job reads


def test_what_is_read_ahead_is_bounded_handed_over_once_and_dropped_unless_taken(tmp_path):
    pipeline, index, key, clock = _received(tmp_path)
    rows = index.instances(key)
    monotonic = Clock(100.0)
    ahead = ReadAhead(pipeline.s, pipeline.headers, max_bytes=rows[0].size + rows[1].size + 1, clock=monotonic)
    clock.now += QUIET_S - 1
    assert ahead.read_once() == 2  # room for two
    first = ahead.take(rows[0])
    assert first is not None and "PixelData" in first.dataset  # the whole instance, decoded
    secret = pipeline.s.secrets.get(PSEUDONYM_SECRET)
    assert first.deidentified == profile_fingerprint(secret, pipeline.s.settings.deidentification["default"])
    assert first.originals is not None and first.uid_map  # what the job's pseudonym map needs
    assert ahead.take(rows[0]) is None  # handed over once
    changed = rows[1]
    changed.received_at += 1  # another receipt of it since: read again by the job
    assert ahead.take(changed) is None and ahead.held_bytes == 0

    assert ahead.read_once() == 2
    monotonic.now += readahead.KEEP_S + 1
    ahead.read_once()  # what was not taken in time is dropped first, then read again
    assert ahead.held_bytes == rows[0].size + rows[1].size
    monotonic.now += readahead.KEEP_S + 1
    clock.now += 2
    assert len(pipeline.plan(key)) == 1  # planned; its job never takes them (it ran elsewhere)
    assert ahead.read_once() == 0 and ahead.held_bytes == 0


def test_reading_ahead_stops_when_another_instance_of_the_study_comes(tmp_path, monkeypatch):
    pipeline, index, _key, clock = _received(tmp_path)
    monkeypatch.setattr(readahead, "CHECK_EVERY", 4)
    looked_up, calls = index.study, []

    def study(study_key: str):  # after the pass began, the study received another instance
        row = looked_up(study_key)
        if row is not None and calls:
            row.last_received_at += 0.5
        calls.append(study_key)
        return row

    monkeypatch.setattr(index, "study", study)
    clock.now += QUIET_S - 1
    assert ReadAhead(pipeline.s, pipeline.headers).read_once() == 4  # then left to the receivers


def test_an_instance_over_the_size_left_to_its_job(tmp_path, monkeypatch):
    pipeline, index, key, clock = _received(tmp_path, files=2)
    sizes = sorted(r.size for r in index.instances(key))
    monkeypatch.setattr(readahead, "MAX_INSTANCE_BYTES", sizes[0] - 1)  # both over it
    clock.now += QUIET_S - 1
    assert ReadAhead(pipeline.s, pipeline.headers).read_once() == 0
