"""The encrypted object store, key sources and the index."""

from __future__ import annotations

import base64
import os
import secrets

import pytest

from node.errors import KeyProviderError, OutOfResourcesError, StorageError, TamperedObjectError
from node.settings.config import EnvKeySource, FileKeySource
from node.storage.index import Index, InstanceRow, StudyState
from node.storage.keys import KeyringProvider, generate_key_file, load_key_provider
from node.storage.store import HEADER_BYTES, ObjectStore

from .peers import CT_SERIES, flip_last_ciphertext_byte, series_files


@pytest.fixture
def store(tmp_path):
    return ObjectStore(tmp_path / "store", KeyringProvider([secrets.token_bytes(32)]))


def test_roundtrip_and_no_plaintext_on_disk(store, tmp_path):
    payload = series_files(CT_SERIES)[0].read_bytes()
    object_id = store.put(payload)
    assert store.get(object_id) == payload
    (path,) = [p for p in (tmp_path / "store" / "objects").rglob("*") if p.is_file()]
    on_disk = path.read_bytes()
    assert b"Lung_Dx-A0001" not in on_disk
    assert payload[-4096:-4032] not in on_disk  # no 64-byte run of the pixel data
    assert len(on_disk) == len(payload) + HEADER_BYTES + 16


def test_a_streamed_object_is_sealed_as_a_whole_one_and_a_failed_stream_leaves_nothing(store, tmp_path):
    files = [p.read_bytes() for p in series_files(CT_SERIES)[:3]]
    object_id = store.put_stream(iter(files), "streamed", size_hint=sum(map(len, files)))
    assert store.get(object_id) == b"".join(files)  # the same envelope: one tag over the whole
    on_disk = (tmp_path / "store" / "objects" / "st" / "streamed").read_bytes()
    assert len(on_disk) == sum(map(len, files)) + HEADER_BYTES + 16
    assert b"Lung_Dx-A0001" not in on_disk

    def failing():
        yield files[0]
        raise ValueError("cannot encode")

    with pytest.raises(ValueError, match="cannot encode"):
        store.put_stream(failing(), "failed")
    assert not store.exists("failed")
    assert list((tmp_path / "store" / "tmp").iterdir()) == []  # no partial object left behind


@pytest.mark.parametrize("position", [0, 10, HEADER_BYTES - 1, HEADER_BYTES + 5, -1])
def test_flipped_byte_is_reported_as_tampering(store, tmp_path, position):
    object_id = store.put(b"x" * 1000)
    path = next(p for p in (tmp_path / "store" / "objects").rglob("*") if p.is_file())
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises((TamperedObjectError, KeyProviderError)):
        store.get(object_id)


def test_truncated_and_swapped_objects_are_rejected(store, tmp_path):
    a, b = store.put(b"a" * 100), store.put(b"b" * 100)
    objects = tmp_path / "store" / "objects"
    path_a, path_b = objects / a[:2] / a, objects / b[:2] / b
    path_a.write_bytes(path_a.read_bytes()[:50])
    with pytest.raises(TamperedObjectError, match="truncated"):
        store.get(a)
    path_b.write_bytes(store.seal(a, b"not b"))  # valid ciphertext, but for another object id
    with pytest.raises(TamperedObjectError, match="authentication failed"):
        store.get(b)


def test_quarantine_keeps_object_encrypted(store, tmp_path):
    object_id = store.put(b"secret")
    target = store.quarantine(object_id)
    assert target.parent.name == "quarantine" and b"secret" not in target.read_bytes()


def test_disk_watermark_refuses_writes(tmp_path):
    full = ObjectStore(tmp_path / "store", KeyringProvider([secrets.token_bytes(32)]), min_free_bytes=2**62)
    with pytest.raises(OutOfResourcesError):
        full.put(b"data")


def test_key_file_permissions_and_env(tmp_path, monkeypatch):
    path = tmp_path / "k.key"
    key_id = generate_key_file(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_key_provider(FileKeySource(provider="file", path=path)).current().key_id == key_id
    with pytest.raises(KeyProviderError, match="already exists"):
        generate_key_file(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyProviderError, match="readable by others"):
        load_key_provider(FileKeySource(provider="file", path=path))
    with pytest.raises(KeyProviderError, match="not set"):
        load_key_provider(EnvKeySource(provider="env", variable="AINODE_NO_SUCH_VAR"))
    monkeypatch.setenv("AINODE_K", base64.b64encode(b"short").decode())
    with pytest.raises(KeyProviderError, match="32 bytes"):
        load_key_provider(EnvKeySource(provider="env", variable="AINODE_K"))


def test_index_late_instance_reopens_study_and_duplicates_are_ignored(tmp_path):
    index = Index.for_data_dir(tmp_path)

    def row(sop: str, t: float) -> InstanceRow:
        return InstanceRow(
            object_id=f"obj{sop}", sop_key=sop, study_key="study", series_key="series",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2", size=1, received_at=t,
        )  # fmt: skip

    assert index.add_instance(row("a", 1.0), "PACS")
    assert not index.add_instance(row("a", 2.0), "PACS")
    assert index.quiet_studies(10, now=5.0) == []
    assert index.quiet_studies(1, now=5.0) == ["study"]
    index.set_study_state("study", StudyState.DONE)
    assert index.add_instance(row("b", 6.0), "PACS")
    study = index.study("study")
    assert study is not None
    assert (study.state, study.generation, study.instance_count) == (StudyState.RECEIVING, 2, 2)


def test_a_record_quarantined_by_one_reader_is_named_so_to_the_next(store):
    from node.storage import segments

    object_id = store.append(b"instance" * 100)
    where = segments.locate(store.segments_root, object_id)
    flip_last_ciphertext_byte(where.path, where.offset)
    with pytest.raises(TamperedObjectError, match="tampered"):
        store.get(object_id)  # the first reader finds it: quarantined, its record shredded
    with pytest.raises(StorageError, match="quarantined"):  # not "deleted": another reader sees why
        store.get(object_id)
    other = store.append(b"other")
    store.delete(other)
    with pytest.raises(StorageError, match=r"deleted$"):  # deleted by its owner, not quarantined
        store.get(other)


def test_objects_are_counted_per_master_key_and_one_deleted_while_counting_is_left_out(store, tmp_path):
    kept = [store.put(b"a" * 100), store.append(b"b" * 100), store.append(b"c" * 100)]
    gone = [store.put(b"d" * 100), store.append(b"e" * 100)]
    listed = store.object_ids()
    for object_id in gone:  # deleted after the listing (a stage output swept, a study purged)
        store.delete(object_id)
    store.object_ids = lambda prefix="": listed  # type: ignore[method-assign]
    assert store.objects_per_key() == {store.keys.current().key_id: len(kept)}


def test_segment_records_roundtrip_crypto_shred_and_reclaim(store, tmp_path, monkeypatch):
    from node.storage import segments

    monkeypatch.setattr(segments, "SEGMENT_BYTES", 3 * 2**20)  # a few instances per segment
    payloads = [p.read_bytes() for p in series_files(CT_SERIES)[:8]]
    ids = [store.append(p) for p in payloads]
    assert [store.get(i) for i in ids] == payloads
    paths = store.segment_paths()
    assert len(paths) > 1  # rotated; only the last one is still open for appending
    assert segments.held(paths[-1]) and not segments.held(paths[0])
    for path in paths:
        data = path.read_bytes()
        assert all(p[1000:1064] not in data for p in payloads)  # no plaintext at rest

    first = [i for i in ids if segments.locate(store.segments_root, i).path == paths[0]]
    store.delete(first[0])
    with pytest.raises(StorageError, match="deleted"):  # its data key is gone: never readable again
        store.get(first[0])
    assert store.reclaim_segments(first) == 0  # not finished (no .done mark) and records still live
    store.close_segments()
    for path in paths:
        segments.mark_done(path)
    assert store.reclaim_segments(first[:1]) == 0  # other records of the segment are live
    for object_id in first[1:]:
        store.delete(object_id)
    assert store.reclaim_segments(first) == 1
    assert not paths[0].exists() and all(p.exists() for p in paths[1:])
    assert [store.get(i) for i in ids[len(first) :]] == payloads[len(first) :]


def test_a_record_is_written_whole_when_the_kernel_takes_it_a_little_at_a_time(store, monkeypatch):
    """An instance's head, nonce and ciphertext go to the segment in one ``writev`` without being
    joined; a short write is continued where it stopped, and a body of the wrong length is refused
    with nothing left behind."""
    from node.storage import segments

    writev = os.writev
    calls: list[int] = []

    def short_writev(fd: int, buffers: list[memoryview]) -> int:
        calls.append(len(buffers))
        return writev(fd, [buffers[0][:1000]])  # the kernel takes at most 1000 bytes

    payload = series_files(CT_SERIES)[0].read_bytes()
    first = store.append(payload)
    monkeypatch.setattr(segments.os, "writev", short_writev)
    second = store.append(payload)
    monkeypatch.undo()
    assert store.get(first) == store.get(second) == payload
    assert calls[0] == 3 and len(calls) > len(payload) // 1000  # head, nonce, ciphertext; continued
    path = store.segment_paths()[-1]
    size = path.stat().st_size
    with pytest.raises(StorageError, match="length differs"):
        store.segment_writer.append(100, lambda object_id: (b"s" * segments.SLOT.size, (b"n", b"c" * 98)))
    assert path.stat().st_size == size and store.get(second) == payload


def test_the_index_writer_is_woken_once_per_batch_not_once_per_row(store, tmp_path, monkeypatch):
    """Issue 26: while rows gather for a commit, queueing one more does not wake the writer (each
    wake took the interpreter lock from the associations' threads); every row is still written."""
    import threading
    import types

    import pydicom

    from node.instances import ReceivedInstance
    from node.storage import batch
    from node.storage.ingest import Ingest
    from node.storage.secrets import NodeSecrets

    wakes = []

    class Counting(threading.Condition):
        def notify_all(self) -> None:
            if threading.current_thread().name != "ainode-index-writer":
                wakes.append(1)
            super().notify_all()

    monkeypatch.setattr(batch, "threading", types.SimpleNamespace(Condition=Counting, Thread=threading.Thread))
    index = Index.for_data_dir(tmp_path)
    ingest = Ingest(store, index, NodeSecrets(store))
    paths = series_files(CT_SERIES)[:20]
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ingest(ReceivedInstance(
            str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.SOPClassUID),
            "1.2.840.10008.1.2", "STORESCU", path.read_bytes(),
        ))  # fmt: skip
    assert ingest.flush(10)
    assert len(wakes) < 5  # once when the queue starts (per batch): 20 before
    (study,) = index.studies()
    assert len(index.instances(study.study_key)) == len(paths)
    ingest.close()
