"""Issue 6: per-route study completion (quiet period, expected series, maximum wait) and algorithm
parameters, on the real CT received through the node's own ingest path (no network)."""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
import yaml

from ainode_sdk.base import NoParams
from ainode_sdk.registry import Registry
from lung_ct_density import LungCtDensityParams
from node.app import check_algorithms
from node.errors import ConfigError, PluginError, SeriesRefused
from node.instances import ReceivedInstance
from node.jobs.isolation import run_isolated_packed, unpack_result
from node.jobs.pipeline import Pipeline, Services
from node.jobs.volume import load_volume
from node.settings.config import Settings
from node.storage.index import Index, StudyState
from node.storage.ingest import Ingest
from node.storage.keys import KeyringProvider
from node.storage.secrets import NodeSecrets
from node.storage.store import ObjectStore

from .peers import AINODE, CT_SERIES, series_files


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _pipeline(tmp_path: Path, completion: dict) -> tuple[Pipeline, Index, str, Clock]:
    settings = Settings.model_validate(
        {
            "node": {"data_dir": str(tmp_path)},
            "keys": {"provider": "env"},
            "peers": [{"ae_title": "STORESCU"}],
            "routes": [
                {
                    "name": "lung",
                    "match": {"Modality": "CT"},
                    "algorithms": ["lung-ct-density"],
                    "completion": completion,
                }
            ],
        }
    )
    store = ObjectStore(tmp_path / "store", KeyringProvider([secrets.token_bytes(32)]))
    index = Index.for_data_dir(tmp_path)
    node_secrets = NodeSecrets(store)
    ingest = Ingest(store, index, node_secrets)
    for path in series_files(CT_SERIES)[:3]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ingest(ReceivedInstance(
            str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.SOPClassUID),
            "1.2.840.10008.1.2", "STORESCU", path.read_bytes(),
        ))  # fmt: skip
    ingest.close()  # the batching writer has written every index row
    (study,) = index.studies()
    clock = Clock(study.last_received_at)
    services = Services(settings, store, index, node_secrets, Registry(), "cpu", clock=clock)
    return Pipeline(services), index, study.study_key, clock


def test_quiet_period(tmp_path):
    pipeline, index, key, clock = _pipeline(tmp_path, {"quiet_period_s": 30})
    clock.now += 10
    assert pipeline.plan(key) == [] and index.study(key).state == StudyState.RECEIVING
    clock.now += 25
    assert len(pipeline.plan(key)) == 1


def test_expected_series_waits_past_the_quiet_period_until_max_wait(tmp_path):
    completion = {"quiet_period_s": 5, "max_wait_s": 600, "expected_series": {"SeriesDescription": "never sent"}}
    pipeline, _index, key, clock = _pipeline(tmp_path, completion)
    clock.now += 60
    assert pipeline.plan(key) == []  # quiet, but the expected series has not arrived
    clock.now += 600
    assert len(pipeline.plan(key)) == 1  # the maximum wait has passed: analysed anyway


def test_expected_series_present_completes_after_quiet_period(tmp_path):
    completion = {"quiet_period_s": 5, "expected_series": {"SeriesDescription": {"regex": "5mm"}}}
    pipeline, _index, key, clock = _pipeline(tmp_path, completion)
    clock.now += 6
    assert len(pipeline.plan(key)) == 1


def test_algorithm_parameters_are_validated_against_the_plugin(tmp_path):
    def settings_with(parameters: dict) -> Settings:
        route = {
            "name": "lung",
            "match": {"Modality": "CT"},
            "algorithms": [{"name": "lung-ct-density", "parameters": parameters}],
        }
        return Settings.model_validate({"keys": {"provider": "env"}, "routes": [route]})

    check_algorithms(settings_with({"laa_threshold_hu": -910}), Registry(), "x.yaml")
    with pytest.raises(
        ConfigError, match=r"routes\[0\]\.algorithms\[0\]\.parameters\.air_threshold_hu: Input should be less"
    ):
        check_algorithms(settings_with({"air_threshold_hu": 5}), Registry(), "x.yaml")
    with pytest.raises(ConfigError, match=r"parameters\.colour: Extra inputs are not permitted"):
        check_algorithms(settings_with({"colour": "red"}), Registry(), "x.yaml")
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump({"keys": {"provider": "env"}, "routes": [
        {"name": "lung", "match": {"Modality": "CT"}, "algorithms": ["no-such-algorithm"]}]}))  # fmt: skip
    checked = subprocess.run([AINODE, "config", "check", str(path)], capture_output=True, text=True, check=False)
    assert (
        checked.returncode == 2 and "routes[0].algorithms[0]: no algorithm named 'no-such-algorithm'" in checked.stderr
    )


def test_misbehaving_plugins_fail_their_job_not_the_node(caplog):
    volume, _ = load_volume([pydicom.dcmread(p) for p in series_files(CT_SERIES)])
    none = NoParams()
    with pytest.raises(PluginError, match="algorithm raised ValueError: the model file is corrupt"):
        run_isolated_packed("tests.plugins:Raises", volume, "cpu", none, 60)
    # the plugin author gets the traceback in the node's log (issue 11, defect 10)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Traceback (most recent call last)" in logged
    assert 'tests/plugins.py", line' in logged and 'raise ValueError("the model file is corrupt")' in logged
    with pytest.raises(PluginError, match=r"algorithm process died \(exit code 137"):
        run_isolated_packed("tests.plugins:Crashes", volume, "cpu", none, 60)
    with pytest.raises(PluginError, match="ran past its timeout of 2 s"):
        run_isolated_packed("tests.plugins:Hangs", volume, "cpu", none, 2)
    # this process is unharmed; the real algorithm runs in its own child, refusals come back as such
    lung = "lung_ct_density:LungCtDensity"
    result = unpack_result(run_isolated_packed(lung, volume, "cpu", LungCtDensityParams(), 120))
    assert {s.label for s in result.segments} == {"Left lung", "Right lung", "Low attenuation area"}
    assert result.segments[0].mask.shape == volume.voxels.shape and result.segments[0].mask.any()
    with pytest.raises(SeriesRefused, match="modality 'MR'"):
        run_isolated_packed(lung, replace(volume, modality="MR"), "cpu", LungCtDensityParams(), 60)


def test_backlog_cap_refuses_new_instances_with_out_of_resources(tmp_path):
    from node.errors import OutOfResourcesError
    from node.network.status import StoreStatus, status_for

    pipeline, index, key, clock = _pipeline(tmp_path, {"quiet_period_s": 1})
    clock.now += 5
    assert len(pipeline.plan(key)) == 1  # one pending job
    ingest = Ingest(pipeline.s.store, index, pipeline.s.secrets, max_queued_jobs=1)
    path = series_files(CT_SERIES)[10]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    received = ReceivedInstance(
        str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.SOPClassUID),
        "1.2.840.10008.1.2", "STORESCU", path.read_bytes(),
    )  # fmt: skip
    with pytest.raises(OutOfResourcesError) as refused:
        ingest(received)
    assert status_for(refused.value) == StoreStatus.OUT_OF_RESOURCES  # 0xA700: the sender retries later
    assert len(index.instances(key)) == 3  # nothing stored


def test_a_second_analysis_replaces_the_pseudonym_map_without_orphans(tmp_path):
    from node.settings.config import Deidentification

    pipeline, index, key, _clock = _pipeline(tmp_path, {"quiet_period_s": 1})
    series_key = index.instances(key)[0].series_key
    pipeline.stages._deidentify_series(key, series_key, Deidentification())
    first_map = index.study(key).map_object_id
    objects = set(pipeline.s.store.object_ids())
    pipeline.stages._deidentify_series(key, series_key, Deidentification())  # a re-analysis (late instance, retry)
    second_map = index.study(key).map_object_id
    assert second_map != first_map and not pipeline.s.store.exists(first_map)
    assert set(pipeline.s.store.object_ids()) == objects - {first_map} | {second_map}


def test_the_deidentified_series_is_framed_in_one_buffer_and_read_back():
    import pickle

    from node.dicomio import encode
    from node.errors import StorageError
    from node.jobs.series import series_frames, unframe_series

    datasets = [pydicom.dcmread(p) for p in series_files(CT_SERIES)[:4]]
    halfway = []
    framed = b"".join(series_frames(datasets, lambda: halfway.append(True)))
    assert halfway == [True]
    encoded = [encode(ds) for ds in datasets]
    assert list(unframe_series(bytes(framed))) == encoded
    assert list(unframe_series(pickle.dumps(encoded))) == encoded  # what an earlier release stored
    with pytest.raises(StorageError, match="truncated"):
        list(unframe_series(bytes(framed[:-10])))


def test_the_scheduler_wakes_when_a_quiet_period_ends(tmp_path):
    """Between polls, the scheduler's next tick comes when the receiving study's quiet period ends
    (not at the next poll), and at the poll interval once no study is still receiving."""
    from node.jobs.scheduler import QUIET_MARGIN_S, Scheduler

    pipeline, index, key, _clock = _pipeline(tmp_path, {"quiet_period_s": 0.2})
    scheduler = Scheduler(pipeline, index, pipeline.s.settings, executor=None)  # type: ignore[arg-type]
    last = index.study(key).last_received_at
    assert scheduler.next_wait_s(0.25, now=last + 0.05) == pytest.approx(0.15 + QUIET_MARGIN_S)
    assert scheduler.next_wait_s(0.25, now=last - 1.0) == 0.25  # quiet only after the next poll
    assert scheduler.next_wait_s(0.25, now=last + 0.3) == 0.25  # already quiet: the tick plans it
    index.set_study_state(key, StudyState.PROCESSING)
    assert scheduler.next_wait_s(0.25, now=last + 0.05) == 0.25


def test_the_series_writer_runs_at_background_priority(tmp_path):
    """The de-identified series is written by threads with a lower CPU priority (their own nice
    value), so the algorithm's process takes the CPU first; other threads keep theirs."""
    import os
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from node.process import BACKGROUND_NICENESS, lower_thread_priority

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = nice()
    with ThreadPoolExecutor(1, initializer=lower_thread_priority) as pool:
        assert pool.submit(nice).result() == max(before, BACKGROUND_NICENESS)
    assert nice() == before
    pipeline, _index, _key, _clock = _pipeline(tmp_path, {"quiet_period_s": 1})
    writer = pipeline.stages._writer  # what Stages writes the series with
    assert writer.submit(nice).result() == max(before, BACKGROUND_NICENESS)


def test_a_prepared_volume_block_is_used_for_its_shape_and_never_left_behind():
    """A shared block prepared (its pages touched in the background) while the series is
    de-identified is the one the volume fills when the shape matches; a block of another shape is
    released and a new one made; one never used is freed on exit: no block stays in /dev/shm. A
    touch still queued behind other work is cancelled rather than waited for."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from node.jobs.isolation import SharedVolume

    def exists(volume: SharedVolume) -> bool:
        return volume.shm is not None and Path("/dev/shm", volume.shm.name.lstrip("/")).exists()

    with ThreadPoolExecutor(1) as pool:
        with SharedVolume() as same:
            same.prepare((3, 4, 5), pool)
            prepared = same.shm.name if same.shm else None
            array = same.allocate((3, 4, 5))
            assert same.shm is not None and same.shm.name == prepared and not array.any() and exists(same)
            del array
        assert not Path("/dev/shm", str(prepared).lstrip("/")).exists()
        with SharedVolume() as other:
            other.prepare((3, 4, 5), pool)
            first = other.shm.name if other.shm else ""
            array = other.allocate((2, 4, 5))
            assert array.shape == (2, 4, 5) and other.shm is not None and other.shm.name != first
            assert not Path("/dev/shm", first.lstrip("/")).exists() and exists(other)
            array[...] = np.float32(1)
            del array
        with SharedVolume() as unused:
            unused.prepare((3, 4, 5), pool)
            name = unused.shm.name if unused.shm else ""
        assert not Path("/dev/shm", name.lstrip("/")).exists()
        busy = threading.Event()
        blocker = pool.submit(busy.wait, 30)  # the pool is busy (another job's write): the touch queues
        with SharedVolume() as queued:
            queued.prepare((3, 4, 5), pool)
            assert queued.allocate((3, 4, 5)).shape == (3, 4, 5)
            assert not blocker.done()  # returned without waiting for the pool: the queued touch cancelled
            busy.set()
