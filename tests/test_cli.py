"""The `vnpacs` command line: import, verify (and repair), db upgrade, settings from TOML, health."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from pydicom import dcmread

from pacs.synthetic import make_multiframe
from tests.conftest import StartServer
from tests.data import write_ct
from tests.scu import c_find, dataset_bytes, run_dcmtk, storage_corpus, study_identifier
from tests.services import free_ports, http_status, start_vnpacs, vm_hwm_bytes


def vnpacs(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pacs", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def offline_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VNPACS_")}
    env["VNPACS_DATA_DIR"] = str(data_dir)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return env


def test_import_stores_a_folder_and_summarises_duplicates_and_rejections(tmp_path: Path) -> None:
    src = tmp_path / "src"
    corpus = storage_corpus()[:40]
    for i, item in enumerate(corpus):
        (src / "a").mkdir(parents=True, exist_ok=True)
        shutil.copy(item.path, src / "a" / f"{i}.dcm")
    shutil.copy(corpus[0].path, src / "again.dcm")  # an identical duplicate
    (src / "notes.txt").write_text("không phải DICOM")
    env = offline_env(tmp_path / "data")

    result = vnpacs(env, "import", str(src))
    assert result.returncode == 0, result.stderr
    unique = len({c.sop_instance_uid for c in corpus})
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.stdout.splitlines()
            if line.count("│") == 3}  # fmt: skip
    assert rows["stored"] == str(unique)
    assert rows["duplicate"] == "1"  # the identical copy
    assert rows["conflict"] == str(len(corpus) - unique)  # same UID, other bytes: kept aside, not served
    assert rows["rejected"] == "1"
    assert "notes.txt" in result.stdout

    db = sqlite3.connect(tmp_path / "data" / "index.db")
    (count,) = db.execute("SELECT count(*) FROM instance").fetchone()
    assert count == unique
    verify = vnpacs(env, "verify")
    assert verify.returncode == 0, verify.stdout


def test_import_wraps_a_bare_dataset_without_changing_its_bytes(tmp_path: Path) -> None:
    source = write_ct(tmp_path / "src", study="bare")
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(dataset_bytes(source))  # no preamble, no File Meta: as some old archives keep them
    env = offline_env(tmp_path / "data")
    result = vnpacs(env, "import", str(bare))
    assert result.returncode == 0, result.stderr
    db = sqlite3.connect(tmp_path / "data" / "index.db")
    (key,) = db.execute("SELECT blob_key FROM instance").fetchone()
    stored = tmp_path / "data" / "blobs" / key
    assert dataset_bytes(stored) == bare.read_bytes()
    assert dcmread(stored).SOPInstanceUID == dcmread(source).SOPInstanceUID


def test_verify_finds_missing_corrupt_and_orphan_blobs_and_repair_reindexes_orphans(tmp_path: Path) -> None:
    env = offline_env(tmp_path / "data")
    files = [write_ct(tmp_path / "in", study="verify", index=i) for i in range(1, 5)]
    assert vnpacs(env, "import", str(tmp_path / "in")).returncode == 0
    assert vnpacs(env, "verify").returncode == 0

    db = sqlite3.connect(tmp_path / "data" / "index.db")
    keys = [k for (k,) in db.execute("SELECT blob_key FROM instance ORDER BY instance_number")]
    blobs = tmp_path / "data" / "blobs"
    (blobs / keys[0]).unlink()  # missing
    corrupt = blobs / keys[1]
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 0xFF
    corrupt.write_bytes(bytes(data))  # hash mismatch
    db.execute("DELETE FROM instance WHERE blob_key = ?", (keys[2],))  # its blob becomes an orphan
    db.commit()

    result = vnpacs(env, "verify")
    assert result.returncode == 1
    assert "missing blobs: 1, hash mismatches: 1, orphan blobs: 1" in result.stdout
    assert keys[0] in result.stdout and keys[1] in result.stdout and keys[2] in result.stdout

    repaired = vnpacs(env, "verify", "--repair")
    assert "re-indexed: 1" in repaired.stdout
    (count,) = db.execute("SELECT count(*) FROM instance WHERE blob_key = ?", (keys[2],)).fetchone()
    assert count == 1
    assert len(files) == 4


def test_db_upgrade_creates_the_schema_on_postgresql(tmp_path: Path) -> None:
    from tests.services import create_pg_database, ensure_postgres_running

    ensure_postgres_running()
    database = create_pg_database()
    try:
        env = offline_env(tmp_path / "data")
        env["VNPACS_DATABASE_URL"] = database.url
        result = vnpacs(env, "db", "upgrade")
        assert result.returncode == 0, result.stderr
        import psycopg

        with psycopg.connect(database.conninfo) as conn:
            tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"patient", "study", "series", "instance", "instance_conflict", "remote_ae", "alembic_version"} <= tables
    finally:
        database.drop()


def test_nodes_starting_together_on_a_new_postgresql_database_all_get_the_schema(tmp_path: Path) -> None:
    """Several nodes of the scale-out layout start at once against one empty database: each runs the migrations at
    start, and none may fail on another's half-made schema."""
    from tests.services import create_pg_database, ensure_postgres_running

    ensure_postgres_running()
    with create_pg_database() as database:
        env = offline_env(tmp_path / "data")
        env["VNPACS_DATABASE_URL"] = database.url
        upgrades = [subprocess.Popen([sys.executable, "-m", "pacs", "db", "upgrade"], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(4)]  # fmt: skip
        outputs = [(proc.wait(120), proc.stdout.read() if proc.stdout else "") for proc in upgrades]
        assert all(code == 0 for code, _ in outputs), [out[-800:] for code, out in outputs if code]
        import psycopg

        with psycopg.connect(database.conninfo) as conn:
            versions = conn.execute("SELECT count(*) FROM alembic_version").fetchone()
            ris_versions = conn.execute("SELECT count(*) FROM worklist_alembic_version").fetchone()
        assert versions == (1,) and ris_versions == (1,)


def test_settings_come_from_a_toml_file_and_the_environment_overrides_it(tmp_path: Path) -> None:
    dicom_port, http_port, hl7_port = free_ports(3)
    config = tmp_path / "vnpacs.toml"
    config.write_text(
        f'[vnpacs]\nae_title = "TOMLPACS"\ndicom_port = {dicom_port}\nhttp_port = {http_port}\nhl7_port = {hl7_port}\n'
        f'data_dir = "{tmp_path / "data"}"\n'
    )
    env = offline_env(tmp_path / "ignored")
    env.pop("VNPACS_DATA_DIR")
    env["VNPACS_AE_TITLE"] = "ENVPACS"
    proc = subprocess.Popen([sys.executable, "-m", "pacs", "--config", str(config), "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        from tests.services import wait_until

        wait_until(lambda: http_status(f"http://127.0.0.1:{http_port}/health") == 200, timeout=60, what="serve")
        assert run_dcmtk("echoscu", "-aec", "ENVPACS", "127.0.0.1", str(dicom_port)).returncode == 0
        assert (tmp_path / "data" / "index.db").exists()
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_settings_file_with_an_unknown_key_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    config = tmp_path / "vnpacs.toml"
    config.write_text('[vnpacs]\nae_title = "TOMLPACS"\nallowed_ae = ["CT1"]\n')  # misspelt: allowed_aes
    env = offline_env(tmp_path / "data")
    result = vnpacs(env, "--config", str(config), "remote", "list")
    assert result.returncode == 2
    assert "unknown setting(s): allowed_ae (did you mean allowed_aes?)" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "data" / "index.db").exists()  # nothing ran on settings it could not read

    config.write_text("[vnpacs\nae_title = 1\n")
    result = vnpacs(env, "--config", str(config), "remote", "list")
    assert result.returncode == 2 and "settings:" in result.stderr and str(config) in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_an_invalid_setting_is_named_and_a_misspelt_variable_is_warned_about(tmp_path: Path) -> None:
    env = offline_env(tmp_path / "data")
    env["VNPACS_DICOM_PORT"] = "mười một"
    result = vnpacs(env, "remote", "list")
    assert result.returncode == 2
    assert "VNPACS_DICOM_PORT" in result.stderr and "integer" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr

    env["VNPACS_DICOM_PORT"] = "11112"
    env["VNPACS_ALLOWED_AE"] = "CT1"
    result = vnpacs(env, "remote", "list")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "VNPACS_ALLOWED_AE (did you mean VNPACS_ALLOWED_AES?)" in result.stderr
    assert "VNPACS_DICOM_PORT" not in result.stderr and "VNPACS_DATA_DIR" not in result.stderr


def test_a_large_multiframe_object_is_streamed_not_held_in_memory(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server("fs-sqlite")
    big = make_multiframe(tmp_path / "big.dcm", target_bytes=400 * 1024 * 1024)
    result = run_dcmtk("storescu", "-aec", "VNPACS", "127.0.0.1", str(server.dicom_port), str(big), timeout=300)
    assert result.returncode == 0, result.stderr
    peak = vm_hwm_bytes(server.pid)
    assert peak < 300 * 1024 * 1024, f"peak RSS {peak / 2**20:.0f} MiB for a 400 MiB object"
    matches, final = c_find(server.dicom_port, study_identifier("IMAGE", SOPInstanceUID=str(
        dcmread(big, stop_before_pixels=True).SOPInstanceUID), NumberOfFrames=""))  # fmt: skip
    assert final == 0 and len(matches) == 1 and int(matches[0].NumberOfFrames) > 1
    big.unlink()


def test_health_is_503_when_the_database_is_unreachable(tmp_path: Path) -> None:
    server = start_vnpacs({}, tmp_path / "srv")
    try:
        assert http_status(server.base_url + "/health") == 200
    finally:
        server.stop()
    dead_port = free_ports(1)[0]
    env = {"VNPACS_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:{dead_port}/nothing"}
    # The schema migration needs the database, so serve refuses to start instead of serving false successes.
    proc = subprocess.run([sys.executable, "-m", "pacs", "serve"], env={**offline_env(tmp_path / "d2"), **env},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode != 0
    assert "connection" in proc.stderr.lower() or "refused" in proc.stderr.lower()


def test_generate_writes_synthetic_vietnamese_studies_that_import_cleanly(tmp_path: Path) -> None:
    env = offline_env(tmp_path / "data")
    made = vnpacs(env, "generate", str(tmp_path / "gen"), "--studies", "2", "--series", "1", "--slices", "3",
                  "--size", "64")  # fmt: skip
    assert made.returncode == 0, made.stderr
    files = sorted((tmp_path / "gen").rglob("*.dcm"))
    assert len(files) == 6
    ds = dcmread(files[0])
    assert ds.SpecificCharacterSet == "ISO_IR 192" and not str(ds.PatientName).isascii()
    assert vnpacs(env, "import", str(tmp_path / "gen")).returncode == 0
    db = sqlite3.connect(tmp_path / "data" / "index.db")
    assert db.execute("SELECT count(*) FROM instance").fetchone() == (6,)
