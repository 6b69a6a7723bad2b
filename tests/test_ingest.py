"""The ingest path itself: concurrent stores share index commits and none is lost or doubled."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import event, func, select

from storage.blobstore import FileBlobStore
from storage.db import make_engine, upgrade
from storage.ingest import Archive
from storage.models import Instance, Series, Study
from tests.data import write_ct


def test_concurrent_stores_share_commits_and_each_object_is_indexed_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    engine = make_engine(url)
    commits: list[int] = []
    event.listen(engine, "commit", lambda conn: commits.append(1))
    archive = Archive(engine, FileBlobStore(tmp_path / "blobs"))
    files = [write_ct(tmp_path / "in", study="group", series=f"se{i % 3}", index=i) for i in range(1, 61)]
    outcomes: list[str] = []
    lock = threading.Lock()

    def store(paths: list[Path]) -> None:
        for path in paths:
            result = archive.ingest_file(path)
            with lock:
                outcomes.append(result.outcome)

    # Eight threads, each also re-sending a file another thread sends: duplicates inside one batch.
    groups = [files[i::8] + [files[(i * 7) % 60]] for i in range(8)]
    threads = [threading.Thread(target=store, args=(g,)) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)

    assert sorted(set(outcomes)) == ["duplicate", "stored"]
    assert outcomes.count("stored") == 60
    with engine.connect() as conn:
        assert conn.execute(select(func.count(Instance.pk))).scalar_one() == 60
        assert conn.execute(select(func.count(Series.pk))).scalar_one() == 3
        assert conn.execute(select(func.count(Study.pk))).scalar_one() == 1
    assert len(commits) < len(outcomes), "concurrent stores should have shared commits"
