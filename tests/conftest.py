"""Fixtures: real vnpacs servers in subprocesses, in each storage configuration, with real S3 and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.services import (
    PgDatabase,
    S3Service,
    VnpacsService,
    create_pg_database,
    ensure_postgres_running,
    start_vnpacs,
    start_weed,
)

CONFIGURATIONS = ["fs-sqlite", "fs-pg", "s3-sqlite", "s3-pg"]


@pytest.fixture(scope="session")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Service]:
    svc = start_weed(tmp_path_factory.mktemp("weed"))
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def postgres() -> None:
    ensure_postgres_running()


StartServer = Callable[..., VnpacsService]


@pytest.fixture
def start_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """Start vnpacs in a configuration: 'fs-sqlite' (embedded default), 'fs-pg', 's3-sqlite', 's3-pg'."""
    started: list[VnpacsService] = []
    databases: list[PgDatabase] = []

    def start(configuration: str = "fs-sqlite", **env: str) -> VnpacsService:
        storage, index = configuration.split("-")
        overrides: dict[str, str] = {}
        if index == "pg":
            request.getfixturevalue("postgres")
            database = create_pg_database()
            databases.append(database)
            overrides["VNPACS_DATABASE_URL"] = database.url
        if storage == "s3":
            s3: S3Service = request.getfixturevalue("weed")
            overrides["VNPACS_STORAGE_URL"] = s3.url(f"vnpacs-{uuid.uuid4().hex[:12]}")
            overrides["VNPACS_S3_ACCESS_KEY"] = s3.access_key
            overrides["VNPACS_S3_SECRET_KEY"] = s3.secret_key
        overrides.update(env)
        server = start_vnpacs(overrides, tmp_path_factory.mktemp(configuration))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
    for database in databases:
        database.drop()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VnpacsService]:
    """One embedded-default server (filesystem + SQLite) shared by a module's tests."""
    server = start_vnpacs({}, tmp_path_factory.mktemp("embedded"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def artifacts() -> Path:
    path = Path(__file__).resolve().parent.parent / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path
