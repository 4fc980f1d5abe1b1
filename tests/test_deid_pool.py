"""Issue 26: a series de-identified in worker processes (:mod:`node.jobs.deidentify`) is the series
de-identified in the job's process — the same encodings, the same UID maps, in order — an
instance that cannot be decoded is reported by its position and the rest come through, a
quarantine reason still stops the series, and a pool that lost a worker is replaced."""

from __future__ import annotations

import os
import signal

import pydicom
import pytest

from node.deid.pseudonyms import Pseudonymizer
from node.dicomio import decode, encode
from node.errors import AinodeError, QuarantinedError
from node.jobs.deidentify import DeidentificationPool, PoolBroken, deidentify_here
from node.settings.config import Deidentification

from .peers import CT_SERIES, series_files

PSEUDONYMS = Pseudonymizer(b"\x01" * 32, "test-key")
PROFILE = Deidentification()


@pytest.fixture(scope="module")
def payloads() -> list[bytes]:
    return [p.read_bytes() for p in series_files(CT_SERIES)]


@pytest.fixture()
def pool():
    pool = DeidentificationPool(workers=2)
    pool.start()
    yield pool
    pool.shutdown()


def test_the_pool_gives_what_the_job_process_gives(pool, payloads):
    told: list[tuple[int, AinodeError]] = []
    pooled = list(pool.deidentify(payloads, len(payloads), PSEUDONYMS, PROFILE, lambda i, e: told.append((i, e))))
    here = list(deidentify_here(payloads, PSEUDONYMS, PROFILE, lambda i, e: told.append((i, e))))
    assert told == [] and len(pooled) == len(here) == len(payloads)
    for a, b in zip(pooled, here, strict=True):
        assert a is not None and b is not None and a.encoded is not None
        assert a.encoded == encode(b.dataset)  # the same de-identified instance, byte for byte
        assert a.uid_map == b.uid_map
        assert a.dataset.SOPInstanceUID == b.dataset.SOPInstanceUID
    original = decode(payloads[0], stop_before_pixels=True)
    assert all(d.dataset.PatientID != original.PatientID and d.dataset.PatientName != original.PatientName
               for d in pooled if d)  # fmt: skip


def test_an_undecodable_instance_is_reported_and_the_rest_come_through_in_order(pool, payloads):
    damaged = list(payloads)
    damaged[40] = b"\x00" * 200  # not DICOM
    damaged[41] = None  # could not be read from the store at all
    told: list[int] = []
    out = list(pool.deidentify(damaged, len(damaged), PSEUDONYMS, PROFILE, lambda i, e: told.append(i)))
    assert told == [40] and out[40] is None and out[41] is None
    assert [d is not None for d in out].count(True) == len(payloads) - 2
    originals = [decode(p, stop_before_pixels=True).InstanceNumber for p in payloads]
    assert [d.dataset.InstanceNumber for d in out if d] == [n for i, n in enumerate(originals) if i not in (40, 41)]


def test_a_quarantine_reason_stops_the_series(pool, payloads):
    marked = list(payloads)
    ds = pydicom.dcmread(series_files(CT_SERIES)[50])
    ds.BurnedInAnnotation = "YES"
    marked[50] = encode(ds)
    with pytest.raises(QuarantinedError, match="quarantined"):
        list(pool.deidentify(marked, len(marked), PSEUDONYMS, PROFILE, lambda i, e: None))


def test_a_pool_that_lost_a_worker_is_replaced(pool, payloads):
    pids = {f.result() for f in [pool._executor().submit(os.getpid) for _ in range(8)]}
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(PoolBroken):
        list(pool.deidentify(payloads, len(payloads), PSEUDONYMS, PROFILE, lambda i, e: None))
    again = list(pool.deidentify(payloads, len(payloads), PSEUDONYMS, PROFILE, lambda i, e: None))
    assert len([d for d in again if d]) == len(payloads)
