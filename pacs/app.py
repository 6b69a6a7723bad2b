"""The one place the application is wired: settings → engine, blob store, archive, DIMSE server, HTTP app."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, select

import dicomweb
import viewer_api
from dicomweb import urls
from pacs.auth import authenticator
from pacs.dimse import Destination, DimseServer, DimseService
from pacs.settings import Settings
from storage import db, metadata
from storage.blobstore import BlobStore, FileBlobStore, open_blob_store
from storage.ingest import Archive, Journal, StorageUnavailable
from storage.models import RemoteAE
from worklist import api as orders_api
from worklist import api_reconcile, api_reports, api_results, fhir, hl7, signing
from worklist import db as worklist_db
from worklist.key_images import KeyImages
from worklist.orders import Orders
from worklist.outbound import Outbound, default_broker
from worklist.reconcile import Reconciler
from worklist.reports import Reports

log = logging.getLogger(__name__)


class Background(Protocol):
    """Something `vnpacs serve` runs beside DIMSE and HTTP (the MLLP listener, the reconciler...)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    blobs: BlobStore
    archive: Archive
    orders: Orders
    reports: Reports
    outbound: Outbound
    background: list[Background] = field(default_factory=list)

    def close(self) -> None:
        self.engine.dispose()
        if self.archive.journal is not None:
            self.archive.journal.close(remove=True)


def migrate_schema(url: str, revision: str = "head") -> None:
    """The index's schema to `revision`, then the RIS tables' to their head (each package keeps its own history)."""
    db.upgrade(url, revision)
    worklist_db.upgrade(url)


def build_runtime(settings: Settings, *, migrate: bool = True, journal: str | None = None) -> Runtime:
    """Engine, blob store and archive for `settings`; migrates the schema first unless told not to.

    `journal` names this process's ingest journal ("serve", "import"...); a process that stores objects needs one.
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url
    if migrate:
        migrate_schema(url)
    engine = db.make_engine(url)
    blobs = open_blob_store(
        settings.resolved_storage_url,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        tmp_dir=settings.tmp_dir,
    )
    journal_file = None
    if journal is not None:
        name = f"{settings.node_id}-{journal}" if journal == "serve" else f"{settings.node_id}-{journal}-{os.getpid()}"
        journal_file = Journal(settings.data_dir.resolve() / "journal" / f"{name}.log")
    archive = Archive(engine, blobs, duplicate_policy=settings.duplicate_policy, journal=journal_file)
    orders = Orders(engine)
    key_images = KeyImages(engine, blobs)
    reports = build_reports(settings, engine, orders, key_images)
    outbound = Outbound(
        engine,
        broker_url=settings.broker_url or default_broker(str(settings.data_dir.resolve())),
        his_url=settings.his_oru_url,
        sending_facility=settings.facility_name or settings.ae_title,
        run_worker=settings.outbound_worker,
        public_url=settings.public_url or f"http://{settings.http_host}:{settings.http_port}",
        key_images=key_images,
    )
    reports.on_final.append(outbound.report_signed)
    return Runtime(
        settings=settings,
        engine=engine,
        blobs=blobs,
        archive=archive,
        orders=orders,
        reports=reports,
        outbound=outbound,
    )


def build_reports(settings: Settings, engine: Engine, orders: Orders, key_images: KeyImages | None = None) -> Reports:
    """The report service: signing key from the settings (a development one in DATA_DIR/signing without it), QR
    codes pointing at the viewer under VNPACS_PUBLIC_URL (default the HTTP listener)."""
    base = (settings.public_url or f"http://{settings.http_host}:{settings.http_port}").rstrip("/")
    config = signing.SigningConfig(
        p12=settings.signing_p12,
        password=settings.signing_p12_password,
        trust_roots=settings.signing_trust_roots,
        revocation=settings.signing_revocation,
        development_dir=(settings.data_dir / "signing").resolve(),
    )
    return Reports(
        engine,
        orders,
        signing_config=config,
        viewer_url=lambda uid: f"{base}/viewer/viewer?StudyInstanceUIDs={uid}",
        facility_name=settings.facility_name,
        key_images=key_images,
    )


def receive_tmp_dir(runtime: Runtime) -> Path:
    blobs = runtime.blobs
    return blobs.tmp_dir if isinstance(blobs, FileBlobStore) else runtime.settings.tmp_dir


def prepare_to_serve(runtime: Runtime) -> None:
    """Recover from a crash (unfinished blob writes, spool leftovers), then spool received objects where the
    blob store can adopt them with a rename (no copy)."""
    tmp = receive_tmp_dir(runtime)
    for folder in {tmp, runtime.settings.tmp_dir}:
        if folder.exists():
            for leftover in folder.iterdir():
                with contextlib.suppress(OSError):
                    shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        folder.mkdir(parents=True, exist_ok=True)
    try:
        removed = runtime.archive.recover()
    except Exception as exc:  # the database may be down at start; recovery runs again at the next start
        log.error("crash recovery postponed: %s", exc)
    else:
        if removed:
            log.warning("removed %d blob(s) of transfers interrupted before they were acknowledged", len(removed))
    tempfile.tempdir = str(tmp)


def destination_resolver(engine: Engine):  # type: ignore[no-untyped-def]
    def resolve(ae_title: str) -> Destination | None:
        with engine.connect() as conn:
            row = conn.execute(
                select(RemoteAE.ae_title, RemoteAE.host, RemoteAE.port).where(RemoteAE.ae_title == ae_title)
            ).first()
        return Destination(row.ae_title, row.host, row.port) if row else None

    return resolve


def ris_services(runtime: Runtime) -> list[DimseService]:
    """The RIS's DIMSE services: Modality Worklist, MPPS, Storage Commitment."""
    from worklist.commitment import StorageCommitment
    from worklist.mpps import PerformedProcedureSteps
    from worklist.mwl import ModalityWorklist

    s = runtime.settings
    mwl = ModalityWorklist(runtime.engine, ascii_aes=s.ascii_aes)
    mpps = PerformedProcedureSteps(runtime.orders)
    commitment = StorageCommitment(runtime.engine, runtime.blobs, ae_title=s.ae_title, peers=s.commitment_aes)
    return [
        DimseService(mwl.sop_class, find=mwl.find),
        DimseService(mpps.sop_class, n_create=mpps.n_create, n_set=mpps.n_set),
        DimseService(commitment.sop_class, n_action=commitment.n_action),
    ]


def build_background(runtime: Runtime) -> list[Background]:
    """What `serve` runs beside DIMSE and HTTP, in start order (stopped in reverse)."""
    reconciler = Reconciler(runtime.orders)
    runtime.archive.listeners.append(reconciler.notice)
    warmer = metadata.Warmer(runtime.engine, runtime.blobs)
    runtime.archive.listeners.append(warmer.notice)
    tasks: list[Background] = [reconciler, warmer, runtime.outbound]
    s = runtime.settings
    if s.hl7_port:
        intake = hl7.Hl7Intake(runtime.orders, runtime.engine, application=s.ae_title)
        tasks.append(hl7.MllpListener(intake.handle, s.hl7_host, s.hl7_port))
    return tasks


def build_dimse(runtime: Runtime) -> DimseServer:
    s = runtime.settings
    return DimseServer(
        runtime.archive,
        ae_title=s.ae_title,
        host=s.dicom_host,
        port=s.dicom_port,
        allowed_aes=s.allowed_aes,
        max_pdu=s.max_pdu,
        max_associations=s.max_associations,
        resolve_destination=destination_resolver(runtime.engine),
        services=ris_services(runtime),
        max_find_results=s.max_find_results,
    )


def build_http(runtime: Runtime) -> FastAPI:
    app = FastAPI(title="vnpacs", version="0.1.0", description="DICOM PACS and teleradiology server")

    @app.get("/health", summary="Ready when the index database and the blob store answer")
    def health() -> JSONResponse:
        try:
            runtime.archive.check()
        except StorageUnavailable as exc:
            return JSONResponse({"status": "unavailable", "detail": exc.message}, status_code=503)
        return JSONResponse({"status": "ok", "ae_title": runtime.settings.ae_title})

    authenticate = authenticator(runtime.settings)
    app.include_router(
        dicomweb.router(
            runtime.archive, runtime.settings.ae_title, receive_tmp_dir(runtime), dependencies=[Depends(authenticate)]
        )
    )
    app.include_router(
        api_reconcile.router(
            runtime.orders, runtime.archive, receive_tmp_dir(runtime), dependencies=[Depends(authenticate)]
        )
    )
    app.include_router(orders_api.router(runtime.orders, dependencies=[Depends(authenticate)]))
    app.include_router(fhir.router(runtime.orders, dependencies=[Depends(authenticate)]))
    app.include_router(api_reports.router(runtime.reports, dependencies=[Depends(authenticate)]))
    app.include_router(
        api_results.router(runtime.outbound, public_root=urls.public_root, dependencies=[Depends(authenticate)])
    )
    app.include_router(viewer_api.router(runtime.settings.viewer_dir or viewer_api.DIST))
    if runtime.settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=runtime.settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["ETag", "Warning", "Content-Type", "Content-Length"],
        )
    return app
