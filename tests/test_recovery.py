"""Crash recovery from the ingest journals: which blobs a restart removes and which it must spare."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.blobstore import FileBlobStore, blob_key_for
from storage.db import make_engine, upgrade
from storage.ingest import Archive, Journal
from tests.data import write_ct


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
