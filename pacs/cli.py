"""The `vnpacs` command line: serve, import, verify, db upgrade, remote AEs, synthetic data."""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import signal
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from sqlalchemy import delete, insert, select

from pacs.settings import Settings, SettingsError, load_settings, unknown_variables

app = typer.Typer(help="vnpacs: DICOM PACS and teleradiology server", no_args_is_help=True)
db_app = typer.Typer(help="Index database schema", no_args_is_help=True)
remote_app = typer.Typer(help="DICOM peers that C-MOVE may send to", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(remote_app, name="remote")
console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML settings file (VNPACS_* variables override it)")
]

_state: dict[str, Path | None] = {"config": None}


@app.callback()
def main(config: ConfigOption = None) -> None:
    _state["config"] = config


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _settings() -> Settings:
    """The settings, or a clear message and exit code 2 when they cannot be used (never a traceback)."""
    try:
        settings = load_settings(_state["config"])
    except SettingsError as exc:
        console.print(f"settings: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except ValidationError as exc:  # a value of the wrong type, from the file or the environment
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            message = f"settings: VNPACS_{field.upper()}: {error['msg']}"
            console.print(message, style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level)
    for name in unknown_variables(os.environ):
        logging.getLogger("vnpacs").warning("environment variable %s names no setting: ignored", name)
    return settings


# ---- serve ----------------------------------------------------------------------------------------------------


@app.command()
def serve() -> None:
    """Serve DIMSE and HTTP in one process on the configured ports."""
    import uvicorn

    from pacs.app import build_background, build_dimse, build_http, build_runtime, prepare_to_serve
    from pacs.workers import DimseWorkers, dimse_processes, shared_listener

    settings = _settings()
    runtime = build_runtime(settings, journal="serve")
    prepare_to_serve(runtime)
    dimse = build_dimse(runtime)
    processes = dimse_processes(settings)
    listener = shared_listener(settings.dicom_host, settings.dicom_port) if processes > 1 else None
    workers = DimseWorkers(settings, listener, runtime.archive, processes - 1) if listener is not None else None
    dimse.start(listener, workers.load if workers is not None else None)
    background = build_background(runtime)
    for task in background:
        task.start()
    if workers is not None:
        workers.start()
    # Everything built so far lives as long as the process: keep it out of the garbage collector's scans, which
    # otherwise walk these hundreds of thousands of objects on every full collection (tail latency of requests).
    gc.freeze()
    # uvicorn stops gracefully on SIGTERM, then raises the signal again for the previous handler: let that be an
    # exit through the `finally` below (workers, background tasks, journal), not the default instant termination.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.getLogger("vnpacs").info(
        "DIMSE %s on %s:%d, HTTP on %s:%d, index %s, blobs %s",
        settings.ae_title,
        settings.dicom_host,
        settings.dicom_port,
        settings.http_host,
        settings.http_port,
        runtime.engine.url.render_as_string(hide_password=True),
        runtime.blobs.url,
    )
    try:
        uvicorn.run(
            build_http(runtime),
            host=settings.http_host,
            port=settings.http_port,
            # httptools hands response bodies to the socket as they are; h11 joins each into a new bytes object,
            # a copy of every retrieved object (whole-study WADO-RS 58 against 44 ms for 105 MB here).
            http="httptools",
            log_level="warning",
            access_log=False,
        )
    finally:
        if workers is not None:
            workers.stop()
        for task in reversed(background):
            task.stop()
        dimse.stop()
        if listener is not None:
            listener.close()
        runtime.close()


@app.command()
def worker() -> None:
    """Deliver messages owed to the HIS (a Celery worker on VNPACS_BROKER_URL), for scale-out nodes that run
    `serve` with VNPACS_OUTBOUND_WORKER=false."""
    from pacs.app import build_runtime

    settings = _settings()
    runtime = build_runtime(settings)
    owed = runtime.outbound.sweep()
    threading.Thread(target=runtime.outbound.sweep_periodically, name="outbox-sweep", daemon=True).start()
    console.print(
        f"outbound worker: {owed} message(s) owed queued again; broker {runtime.outbound.celery.conf.broker_url}"
    )
    try:
        runtime.outbound.celery.worker_main(
            ["worker", "--pool=threads", "--concurrency=2", "--queues=vnpacs-outbound", "--without-heartbeat",
             "--without-gossip", "--without-mingle", "--loglevel=INFO"]
        )  # fmt: skip
    finally:
        runtime.close()


# ---- import ---------------------------------------------------------------------------------------------------


def _iter_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            console.print(f"[yellow]not found:[/] {path}")
    return files


@app.command("import")
def import_(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (searched recursively)")],
    workers: Annotated[int, typer.Option(help="Files stored in parallel")] = 4,
) -> None:
    """Store DICOM files through the same ingest path as C-STORE; prints stored / duplicates / rejected."""
    from pacs.app import build_runtime
    from pacs.part10 import as_part10
    from storage.ingest import IngestError

    settings = _settings()
    runtime = build_runtime(settings, journal="import")
    files = _iter_files(paths)
    counts: Counter[str] = Counter()
    rejected: list[tuple[Path, str]] = []

    def one(path: Path) -> tuple[Path, str, str]:
        try:
            with as_part10(path, settings.tmp_dir) as part10:
                result = runtime.archive.ingest_file(part10, source="import")
            return path, result.outcome, result.message
        except IngestError as exc:
            return path, "unavailable" if exc.kind == "unavailable" else "rejected", exc.message

    with Progress(
        TextColumn("[bold]Importing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("import", total=len(files))
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for path, outcome, message in pool.map(one, files):
                counts[outcome] += 1
                if outcome in ("rejected", "unavailable"):
                    rejected.append((path, message))
                progress.advance(task)

    table = Table(title="Import summary")
    table.add_column("result")
    table.add_column("files", justify="right")
    for outcome in ("stored", "duplicate", "conflict", "rejected", "unavailable"):
        table.add_row(outcome, str(counts.get(outcome, 0)))
    Console().print(table)
    for path, message in rejected:
        Console().print(f"[red]rejected[/] {path}: {message}")
    runtime.close()
    if counts.get("unavailable"):
        raise typer.Exit(2)


# ---- verify ---------------------------------------------------------------------------------------------------


@app.command()
def verify(
    repair: Annotated[bool, typer.Option("--repair", help="Re-index orphan blobs")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Check presence and size only, not the SHA-256")] = False,
) -> None:
    """Check that every index row has its blob with the recorded hash; list orphan and missing blobs."""
    from pacs.app import build_runtime
    from storage.blobstore import BlobStoreError
    from storage.ingest import IngestError
    from storage.models import Instance, InstanceConflict

    settings = _settings()
    runtime = build_runtime(settings, journal="verify" if repair else None)
    blobs = runtime.blobs
    with runtime.engine.connect() as conn:
        rows = list(conn.execute(select(Instance.sop_instance_uid, Instance.blob_key, Instance.size, Instance.sha256)))
        rows += list(
            conn.execute(
                select(
                    InstanceConflict.sop_instance_uid,
                    InstanceConflict.blob_key,
                    InstanceConflict.size,
                    InstanceConflict.sha256,
                )
            )
        )
    missing: list[str] = []
    corrupt: list[str] = []
    referenced: set[str] = set()
    with Progress(TextColumn("[bold]Verifying"), BarColumn(), MofNCompleteColumn(), console=console) as progress:
        task = progress.add_task("verify", total=len(rows))
        for sop_uid, key, size, sha in rows:
            referenced.add(key)
            try:
                with blobs.open(key) as fp:
                    if quick:
                        data_size = fp.seek(0, os.SEEK_END) if hasattr(fp, "seek") else len(fp.read())
                        ok = data_size == size
                    else:
                        digest = hashlib.sha256()
                        total = 0
                        while chunk := fp.read(1024 * 1024):
                            digest.update(chunk)
                            total += len(chunk)
                        ok = total == size and digest.hexdigest() == sha
            except BlobStoreError:
                missing.append(f"{sop_uid} ({key})")
            else:
                if not ok:
                    corrupt.append(f"{sop_uid} ({key})")
            progress.advance(task)
    orphans = [key for key in blobs.iter_keys() if key not in referenced]

    repaired = 0
    if repair and orphans:
        for key in list(orphans):
            try:
                with blobs.local_file(key) as path:
                    runtime.archive.ingest_file(path, source="repair")
                orphans.remove(key)
                repaired += 1
            except (IngestError, BlobStoreError) as exc:
                console.print(f"[red]cannot re-index[/] {key}: {exc}")

    out = Console()
    out.print(
        f"index rows: {len(rows)}, missing blobs: {len(missing)}, hash mismatches: {len(corrupt)}, "
        f"orphan blobs: {len(orphans)}" + (f", re-indexed: {repaired}" if repair else "")
    )
    for item in missing:
        out.print(f"[red]missing[/] {item}")
    for item in corrupt:
        out.print(f"[red]hash mismatch[/] {item}")
    for key in orphans:
        out.print(f"[yellow]orphan[/] {key}")
    runtime.close()
    if missing or corrupt or orphans:
        raise typer.Exit(1)


# ---- synthetic data -------------------------------------------------------------------------------------------


@app.command()
def generate(
    out: Annotated[Path, typer.Argument(help="Folder to write the studies into")],
    studies: Annotated[int, typer.Option(help="Number of studies")] = 2,
    series: Annotated[int, typer.Option(help="Series per study")] = 2,
    slices: Annotated[int, typer.Option(help="Slices per series")] = 50,
    size: Annotated[int, typer.Option(help="Rows and columns")] = 512,
    seed: Annotated[int, typer.Option(help="Same seed, same files")] = 0,
) -> None:
    """Write synthetic CT studies (Vietnamese names, ISO_IR 192) for demos, tests and benchmarks."""
    from pacs.synthetic import generate_ct_studies

    total = studies * series * slices
    with Progress(TextColumn("[bold]Generating"), BarColumn(), MofNCompleteColumn(), console=console) as progress:
        task = progress.add_task("generate", total=total)
        paths = generate_ct_studies(
            out,
            studies=studies,
            series_per_study=series,
            slices=slices,
            rows=size,
            cols=size,
            seed=seed,
            progress=lambda n: progress.update(task, completed=n),
        )
    Console().print(f"{len(paths)} files in {out}")


# ---- db -------------------------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply the Alembic migrations (the index's, then the RIS tables') to the configured database."""
    from pacs.app import migrate_schema

    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate_schema(settings.resolved_database_url, revision)
    Console().print(f"database at revision {revision}")


# ---- remote AEs -----------------------------------------------------------------------------------------------


@remote_app.command("add")
def remote_add(
    name: str,
    aet: Annotated[str, typer.Option("--aet", help="AE title of the peer")],
    host: Annotated[str, typer.Option("--host")],
    port: Annotated[int, typer.Option("--port")],
) -> None:
    """Add (or update) a peer C-MOVE may send to."""
    from pacs.app import build_runtime
    from storage.models import RemoteAE

    if not 0 < len(aet) <= 16:
        raise typer.BadParameter("AE title must be 1 to 16 characters", param_hint="--aet")
    runtime = build_runtime(_settings())
    with runtime.engine.begin() as conn:
        conn.execute(delete(RemoteAE).where(RemoteAE.name == name))
        conn.execute(insert(RemoteAE).values(name=name, ae_title=aet, host=host, port=port))
    Console().print(f"remote {name}: {aet}@{host}:{port}")


@remote_app.command("remove")
def remote_remove(name: str) -> None:
    """Remove a peer."""
    from pacs.app import build_runtime
    from storage.models import RemoteAE

    runtime = build_runtime(_settings())
    with runtime.engine.begin() as conn:
        if conn.execute(delete(RemoteAE).where(RemoteAE.name == name)).rowcount == 0:
            console.print(f"[red]no remote named {name}")
            raise typer.Exit(1)


@remote_app.command("list")
def remote_list() -> None:
    """List the configured peers."""
    from pacs.app import build_runtime
    from storage.models import RemoteAE

    runtime = build_runtime(_settings())
    table = Table("name", "AE title", "host", "port")
    with runtime.engine.connect() as conn:
        for row in conn.execute(
            select(RemoteAE.name, RemoteAE.ae_title, RemoteAE.host, RemoteAE.port).order_by(RemoteAE.name)
        ):
            table.add_row(row.name, row.ae_title, row.host, str(row.port))
    Console().print(table)


@remote_app.command("echo")
def remote_echo(name: str) -> None:
    """C-ECHO a configured peer."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from pacs import netio
    from pacs.app import build_runtime
    from storage.models import RemoteAE

    netio.apply()
    settings = _settings()
    runtime = build_runtime(settings)
    with runtime.engine.connect() as conn:
        remote = conn.execute(
            select(RemoteAE.ae_title, RemoteAE.host, RemoteAE.port).where(RemoteAE.name == name)
        ).first()
    if remote is None:
        console.print(f"[red]no remote named {name}")
        raise typer.Exit(1)
    ae = AE(ae_title=settings.ae_title)
    ae.add_requested_context(Verification)
    assoc = ae.associate(remote.host, remote.port, ae_title=remote.ae_title)
    if not assoc.is_established:
        console.print(f"[red]association with {remote.ae_title}@{remote.host}:{remote.port} failed")
        raise typer.Exit(1)
    rsp = assoc.send_c_echo()
    assoc.release()
    code = getattr(rsp, "Status", None)
    if code != 0:
        console.print(f"[red]C-ECHO failed, status {code}")
        raise typer.Exit(1)
    Console().print(f"C-ECHO {remote.ae_title}@{remote.host}:{remote.port}: success")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
