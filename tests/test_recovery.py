"""Crash recovery from the ingest journals: which blobs a restart removes and which it must spare."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from storage.blobstore import BlobStore, FileBlobStore, blob_key_for, open_blob_store
from storage.db import make_engine, upgrade
from storage.ingest import Archive, Journal
from storage.query import objects_for
from tests.data import write_ct
from tests.services import S3Service, index_database


def test_recovery_removes_only_unreferenced_blobs_of_dead_processes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    blobs = FileBlobStore(tmp_path / "blobs")
    journal_dir = tmp_path / "journal"

    # A committed object: its key stays even if a dead journal lists it as pending.
    committed = write_ct(tmp_path / "in", study="rec", index=1)
    archive = Archive(make_engine(url), blobs, journal=Journal(journal_dir / "node-serve.log"))
    stored = archive.ingest_file(committed)
    committed_key = blob_key_for(stored.sha256)

    # Blobs written by processes that died before their index commit.
    orphan_key = "aa/" + "a" * 64 + ".dcm"
    shared_key = "bb/" + "b" * 64 + ".dcm"
    for key in (orphan_key, shared_key):
        blobs.put_file(key, committed, committed.stat().st_size)
    (journal_dir / "node-import-111.log").write_text(f"+ {orphan_key}\n+ {shared_key}\n+ {committed_key}\n")

    # A live import process is storing the same bytes as `shared_key` right now.
    live = Journal(journal_dir / "node-import-222.log")
    live.begin(shared_key)

    removed = archive.recover()
    assert removed == [orphan_key]
    assert not blobs.exists(orphan_key)
    assert blobs.exists(shared_key)
    assert blobs.exists(committed_key)
    assert not (journal_dir / "node-import-111.log").exists()  # a dead journal is consumed
    assert (journal_dir / "node-import-222.log").exists()  # a live one is left alone
    live.close()


def test_a_journal_in_use_cannot_be_opened_twice(tmp_path: Path) -> None:
    first = Journal(tmp_path / "node-serve.log")
    try:
        with pytest.raises(RuntimeError, match="in use"):
            Journal(tmp_path / "node-serve.log")
    finally:
        first.close()


# ---- two nodes, one index and one blob store: a deleter and a writer of the same bytes ----------------------------


@dataclass
class _Nodes:
    """Two archives sharing one index and one blob store, each with its own journal folder: two nodes."""

    first: Archive
    second: Archive
    blobs: BlobStore


@pytest.fixture(params=["fs-sqlite", "s3-pg"])
def nodes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[_Nodes]:
    storage, index = request.param.split("-")
    if storage == "s3":
        s3: S3Service = request.getfixturevalue("weed")
        store_url, keys = (
            s3.url(f"race-{uuid.uuid4().hex[:12]}"),
            {"access_key": s3.access_key, "secret_key": s3.secret_key},
        )
    else:
        store_url, keys = str(tmp_path / "blobs"), {}
    with index_database(index, tmp_path) as url:
        upgrade(url)
        archives = []
        for name in ("a", "b"):
            blobs = open_blob_store(store_url, tmp_dir=tmp_path / f"tmp-{name}", **keys)
            journal = Journal(tmp_path / f"journal-{name}" / "node.log")
            archives.append(Archive(make_engine(url), blobs, journal=journal))
        try:
            yield _Nodes(archives[0], archives[1], archives[1].blobs)
        finally:
            for archive in archives:
                archive.engine.dispose()
                assert archive.journal is not None
                archive.journal.close()


def _spooled(archive: Archive, source: Path) -> Path:
    """A copy of an object where a receiving protocol spools it: the store's own temporary folder, from which the
    filesystem store adopts it by a rename."""
    copy = Path(archive.blobs.tmp_dir) / f"rx-{uuid.uuid4().hex}.dcm"  # type: ignore[attr-defined]
    shutil.copyfile(source, copy)
    return copy


def _stored_bytes(blobs: BlobStore, key: str) -> bytes:
    with blobs.open(key) as fp:
        return fp.read()


def test_recovery_on_one_node_keeps_a_blob_another_node_is_storing(nodes: _Nodes, tmp_path: Path) -> None:
    """Node A died while storing an object and restarts just as node B stores the very same bytes: A's recovery
    deletes the blob after B wrote it and before B committed. B's commit sees the deletion and writes the blob
    again before the object is acknowledged."""
    obj = write_ct(tmp_path / "in", study="race", index=1)
    key = blob_key_for(hashlib.sha256(obj.read_bytes()).hexdigest())
    # A's dead journal: the write of `key` began and never ended.
    assert nodes.first.journal is not None
    (nodes.first.journal.path.parent / "node-import-999.log").write_text(f"+ {key}\n")

    recovered: list[list[str]] = []
    commit = nodes.second._committer._run_batch

    def recover_then_commit(jobs: list[Any]) -> None:
        assert nodes.blobs.exists(key)  # B's blob is written, its row not yet committed
        recovered.append(nodes.first.recover())
        commit(jobs)

    nodes.second._committer._run_batch = recover_then_commit
    spooled = _spooled(nodes.second, obj)
    result = nodes.second.ingest_file(spooled, adopt=True)
    spooled.unlink(missing_ok=True)

    assert recovered == [[key]]  # A did delete it: the interleaving happened
    assert result.outcome == "stored"
    assert nodes.blobs.exists(key)
    assert _stored_bytes(nodes.blobs, key) == obj.read_bytes()


def test_recovery_waits_for_a_commit_of_the_same_bytes_in_progress(nodes: _Nodes, tmp_path: Path) -> None:
    """The other order: B is committing when A's recovery starts. A waits for B's commit, then finds the blob
    referenced and leaves it."""
    obj = write_ct(tmp_path / "in", study="race", index=2)
    key = blob_key_for(hashlib.sha256(obj.read_bytes()).hexdigest())
    assert nodes.first.journal is not None
    (nodes.first.journal.path.parent / "node-import-998.log").write_text(f"+ {key}\n")

    in_commit = threading.Event()
    guard = nodes.second._guard_blobs

    def slow_guard(conn: Any, jobs: list[Any]) -> None:
        guard(conn, jobs)
        in_commit.set()
        time.sleep(0.5)  # B holds its locks; A's recovery must wait for the commit

    nodes.second._guard_blobs = slow_guard  # type: ignore[method-assign]
    recovered: list[list[str]] = []

    def recover() -> None:
        assert in_commit.wait(30)
        recovered.append(nodes.first.recover())

    recovery = threading.Thread(target=recover)
    recovery.start()
    spooled = _spooled(nodes.second, obj)
    result = nodes.second.ingest_file(spooled, adopt=True)
    spooled.unlink(missing_ok=True)
    recovery.join(30)

    assert result.outcome == "stored"
    assert recovered == [[]]
    assert _stored_bytes(nodes.blobs, key) == obj.read_bytes()


def test_a_correction_deleting_an_object_sent_again_meanwhile_keeps_its_blob(nodes: _Nodes, tmp_path: Path) -> None:
    """An administrator deletes an object on node A while the modality sends it again to node B: A removes the
    rows and the blob after B wrote it; B's commit restores the blob, and the object B acknowledged is served."""
    obj = write_ct(tmp_path / "in", study="race", index=3)
    first = nodes.first.ingest_file(obj)
    key = blob_key_for(first.sha256)
    with nodes.first.engine.connect() as conn:
        stored = objects_for(conn, "STUDY", {"StudyInstanceUID": first.study_instance_uid})

    deleted: list[int] = []
    commit = nodes.second._committer._run_batch

    def delete_then_commit(jobs: list[Any]) -> None:
        deleted.append(nodes.first.delete(stored))
        assert not nodes.blobs.exists(key)  # the deleter got there between B's write and B's commit
        commit(jobs)

    nodes.second._committer._run_batch = delete_then_commit
    spooled = _spooled(nodes.second, obj)
    again = nodes.second.ingest_file(spooled, adopt=True)
    spooled.unlink(missing_ok=True)

    assert deleted == [1]
    assert again.outcome == "stored"
    assert _stored_bytes(nodes.blobs, key) == obj.read_bytes()
