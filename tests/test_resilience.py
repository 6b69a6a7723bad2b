"""Nothing acknowledged is lost: kill -9 mid-ingest, S3 and PostgreSQL outages, recovery afterwards."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.conftest import StartServer
from tests.data import write_ct
from tests.scu import c_get, dataset_bytes, storage_ae, store_files, study_identifier
from tests.services import VnpacsService, http_status, start_weed, wait_until

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def make_series(directory: Path, count: int, study: str) -> list[Path]:
    return [write_ct(directory, study=study, index=i, size=96) for i in range(1, count + 1)]


class Pusher(threading.Thread):
    """Sends files one by one over one association, recording each answer (None: no answer)."""

    def __init__(self, port: int, paths: list[Path], *, between: Callable[[int], None] | None = None) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.paths = paths
        self.between = between
        self.results: dict[Path, int | None] = {}

    def run(self) -> None:
        ae = storage_ae("PUSHER")
        ae.dimse_timeout = 6  # a killed server must not keep the pusher waiting long for an answer
        # The idle timer runs while `between` works (restarting S3 took over 6 s on a loaded CI host): keep it
        # as long as a modality's, so the pusher does not abort the association during the outage itself.
        ae.network_timeout = 60
        ae.add_requested_context(CT, [EXPLICIT_LE])
        assoc = ae.associate("127.0.0.1", self.port, ae_title="VNPACS")
        if not assoc.is_established:
            return
        try:
            for n, path in enumerate(self.paths):
                if not assoc.is_established:
                    break
                try:
                    status: Dataset = assoc.send_c_store(path)
                except Exception:
                    break
                self.results[path] = int(status.Status) if "Status" in status else None
                if self.between:
                    self.between(n)
        finally:
            if assoc.is_established:
                assoc.release()

    def acked(self) -> list[Path]:
        return [p for p, s in self.results.items() if s == 0]


def uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def assert_retrievable(server: VnpacsService, paths: list[Path], out: Path) -> None:
    uids = [uid(p) for p in paths]
    got: dict[str, Path] = {}
    for start in range(0, len(uids), 300):
        part, final = c_get(server.dicom_port, study_identifier("IMAGE", SOPInstanceUID=uids[start : start + 300]),
                            [(CT, EXPLICIT_LE)], out)  # fmt: skip
        assert final == 0
        got.update(part)
    missing = [u for u in uids if u not in got]
    assert not missing, f"{len(missing)} acknowledged objects lost"
    for path, u in zip(paths, uids, strict=True):
        assert dataset_bytes(got[u]) == dataset_bytes(path)


def verify_clean(server: VnpacsService) -> None:
    verify = subprocess.run([sys.executable, "-m", "pacs", "verify"], env=server.env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]
    assert "missing blobs: 0, hash mismatches: 0, orphan blobs: 0" in verify.stdout


@pytest.mark.parametrize("configuration", ["fs-sqlite", "s3-pg"])
def test_kill_9_during_ingest_loses_nothing_acknowledged(
    configuration: str, start_server: StartServer, tmp_path: Path
) -> None:
    # Two DIMSE processes: the kill takes the worker down with the main process, whichever had the association.
    server = start_server(configuration, VNPACS_DIMSE_PROCESSES="2")
    paths = make_series(tmp_path / "in", 600, f"kill-{configuration}")
    pusher = Pusher(server.dicom_port, paths)
    pusher.start()
    wait_until(lambda: len(pusher.results) >= 300, timeout=120, what="300 stores before the kill")
    server.kill()  # SIGKILL, mid-association
    pusher.join(30)
    acked = pusher.acked()
    assert 300 <= len(acked) < 600

    server.start()
    assert_retrievable(server, acked, tmp_path / "after")
    verify_clean(server)

    # Ingest resumes: the rest, including whatever was in flight at the kill, is stored now.
    rest = [p for p in paths if p not in set(acked)]
    statuses = store_files(server.dicom_port, rest)
    assert all(s.Status == 0 for s in statuses.values())
    verify_clean(server)


def test_s3_outage_gives_failures_not_successes_and_ingest_resumes(start_server: StartServer, tmp_path: Path) -> None:
    s3 = start_weed(tmp_path / "weed")
    try:
        server = start_server(
            "fs-sqlite",
            VNPACS_STORAGE_URL=s3.url("outage"),
            VNPACS_S3_ACCESS_KEY=s3.access_key,
            VNPACS_S3_SECRET_KEY=s3.secret_key,
        )
        paths = make_series(tmp_path / "in", 60, "s3-outage")
        outage = {"stopped_at": -1}

        def between(n: int) -> None:
            if n == 19:
                s3.stop()
                outage["stopped_at"] = n
            if n == 24:
                assert http_status(server.base_url + "/health") == 503
                s3.start()

        pusher = Pusher(server.dicom_port, paths, between=between)
        pusher.start()
        pusher.join(300)
        assert len(pusher.results) == 60, "the association must survive the outage"
        during = [pusher.results[p] for p in paths[20:25]]
        assert all(s is not None and 0xA700 <= s <= 0xA7FF for s in during), [hex(s or 0) for s in during]
        after = [pusher.results[p] for p in paths[25:]]
        assert all(s == 0 for s in after), "ingest resumes once S3 is back"
        assert_retrievable(server, pusher.acked(), tmp_path / "out")

        failed = [p for p in paths if pusher.results[p] != 0]
        assert all(s.Status == 0 for s in store_files(server.dicom_port, failed).values())
        assert_retrievable(server, paths, tmp_path / "out-all")
        verify_clean(server)
    finally:
        s3.stop()


def _pg_cluster(action: str) -> None:
    version = sorted(Path("/etc/postgresql").iterdir())[0].name
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action, *(
        ["-m", "fast"] if action == "stop" else [])], check=True, timeout=120)  # fmt: skip


def _pg_up() -> bool:
    import psycopg

    try:
        psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres connect_timeout=1").close()
        return True
    except psycopg.Error:
        return False


def test_postgresql_outage_gives_failures_not_successes_and_ingest_resumes(
    start_server: StartServer, tmp_path: Path
) -> None:
    if not Path("/etc/postgresql").exists():
        pytest.fail("PostgreSQL cluster not installed (make test installs and starts it)")
    server = start_server("fs-pg")
    paths = make_series(tmp_path / "in", 40, "pg-outage")

    def between(n: int) -> None:
        if n == 14:
            _pg_cluster("stop")
        if n == 19:
            assert http_status(server.base_url + "/health") == 503
            _pg_cluster("start")
            wait_until(_pg_up, timeout=60, what="PostgreSQL back")

    pusher = Pusher(server.dicom_port, paths, between=between)
    pusher.start()
    try:
        pusher.join(300)
    finally:
        if not _pg_up():
            _pg_cluster("start")
            wait_until(_pg_up, timeout=60, what="PostgreSQL back")
    assert len(pusher.results) == 40
    during = [pusher.results[p] for p in paths[15:20]]
    assert all(s is not None and 0xA700 <= s <= 0xA7FF for s in during), [hex(s or 0) for s in during]
    # The first stores after the restart may still meet dropped pooled connections; then ingest resumes.
    tail = [pusher.results[p] for p in paths[22:]]
    assert all(s == 0 for s in tail), [hex(s or 0) for s in tail]
    failed = [p for p in paths if pusher.results[p] != 0]
    assert all(s.Status == 0 for s in store_files(server.dicom_port, failed).values())
    assert_retrievable(server, paths, tmp_path / "out")
    verify_clean(server)
