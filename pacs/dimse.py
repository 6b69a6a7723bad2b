"""The DIMSE server: thin pynetdicom handlers over the archive (ingest, query engine, blob store).

Verification, Storage (every SOP class, every transfer syntax pydicom knows), Query/Retrieve C-FIND / C-MOVE / C-GET
in the Patient Root and Study Root information models.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, build_context, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from pacs import netio, status
from storage.blobstore import BlobStoreError
from storage.ingest import Archive, IngestError, SOPClassMismatch, SOPInstanceMismatch, StorageUnavailable
from storage.query import LEVELS, QueryError, StoredObject, find, objects_for
from storage.text import is_ascii

log = logging.getLogger(__name__)

PATIENT_ROOT = {
    str(PatientRootQueryRetrieveInformationModelFind),
    str(PatientRootQueryRetrieveInformationModelMove),
    str(PatientRootQueryRetrieveInformationModelGet),
}
QR_MODELS = [
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
]
_SKIP_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "InstanceAvailability"}


@dataclass
class DimseService:
    """A DIMSE service another package adds to the server (Modality Worklist, MPPS, Storage Commitment...).

    The handlers take pynetdicom's event and answer as pynetdicom's handlers for that message do; the server
    dispatches to them by SOP Class, so several services share one C-FIND / N-CREATE / N-SET / N-ACTION event.
    """

    sop_class: str
    find: Callable[[Any], Iterator[tuple[int, Dataset | None]]] | None = None
    n_create: Callable[[Any], tuple[Any, Dataset | None]] | None = None
    n_set: Callable[[Any], tuple[Any, Dataset | None]] | None = None
    n_action: Callable[[Any], tuple[Any, Dataset | None]] | None = None


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment.replace("\\", "/")[: status.ERROR_COMMENT_MAX]
    return ds


def _aet(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip()


# ---- identifier <-> query ---------------------------------------------------------------------------------------


def identifier_to_query(identifier: Dataset) -> tuple[str, dict[str, str], list[str]]:
    """(level, matching keys, return keys) from a C-FIND/C-MOVE/C-GET identifier."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS:
        raise QueryError(f"missing or invalid QueryRetrieveLevel {level!r}")
    filters: dict[str, str] = {}
    keys: list[str] = []
    for elem in identifier:
        keyword = elem.keyword
        if not keyword or keyword in _SKIP_KEYS:
            continue
        keys.append(keyword)
        if elem.VR == "SQ":
            filters[keyword] = ""
            continue
        value = elem.value
        if value is None:
            text = ""
        elif isinstance(value, list | tuple) or value.__class__.__name__ == "MultiValue":
            text = "\\".join(str(v) for v in value)
        else:
            text = str(value)
        filters[keyword] = text
    return level, filters, keys


def _response(level: str, keys: list[str], row: dict[str, Any], retrieve_aet: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    needs_utf8 = any(isinstance(v, str) and not is_ascii(v) for v in row.values())
    if needs_utf8:
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.RetrieveAETitle = retrieve_aet
    ds.InstanceAvailability = "ONLINE"
    for keyword in dict.fromkeys([*row.keys(), *keys]):
        value = row.get(keyword)
        if keyword == "OtherPatientIDsSequence":
            seq = Sequence()
            for item in value or []:
                sub = Dataset()
                for k, v in item.items():
                    setattr(sub, k, v)
                seq.append(sub)
            ds.OtherPatientIDsSequence = seq
            continue
        try:
            setattr(ds, keyword, value if value not in ("",) else None)
        except (TypeError, ValueError, AttributeError) as exc:
            log.debug("cannot return %s=%r: %s", keyword, value, exc)
    return ds


class SharedLoad(Protocol):
    """How busy each process sharing a listener is, so that the least busy one takes the next association."""

    def publish(self, active: int) -> None: ...

    def may_accept(self, active: int) -> bool: ...


def _in_use(assoc: Any) -> bool:
    """Whether an association is being negotiated or is established: not yet released, aborted or rejected."""
    return not (assoc.is_released or assoc.is_aborted or assoc.is_rejected)


def _shared_listener_server(listener: socket.socket, load: SharedLoad | None) -> type:
    """pynetdicom's threaded server class, serving an already listening socket instead of binding its own."""

    class SharedListenerServer(ThreadedAssociationServer):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # Connections accepted whose Association thread may not run yet: pynetdicom counts an association only
            # once its thread runs, a few milliseconds after the accept, and connections that arrive together (four
            # modalities starting at once) would otherwise find this process idle until then.
            self._vn_accepted: list[socket.socket] = []
            self._vn_lock = threading.RLock()
            super().__init__(*args, **kwargs)

        def load(self) -> int:
            """This process's associations in use, and the connections accepted for which none runs yet (one that
            has ended may take a moment longer to stop its threads: it no longer counts)."""
            running = self.ae.active_associations
            attached = {id(getattr(getattr(assoc.dul, "socket", None), "socket", None)) for assoc in running}
            starting = sum(1 for client in self._vn_accepted if id(client) not in attached)
            return sum(1 for assoc in running if _in_use(assoc)) + starting

        def server_bind(self) -> None:
            own: socket.socket = self.socket  # type: ignore[has-type]
            own.close()
            self.socket = listener
            self.server_address = listener.getsockname()

        def server_activate(self) -> None:
            return None  # already listening

        def get_request(self) -> tuple[socket.socket, Any]:
            # Non-blocking accept: another process may have taken the connection first (BlockingIOError, an
            # OSError, which socketserver ignores). The accepted socket itself blocks, as pynetdicom expects.
            # Connections that arrive together (four modalities starting at once) would all go to whichever
            # process wakes first: a process busier than another leaves the connection to it for a moment.
            # The load is counted and published under one lock with the accept, so that `publish_load` in another
            # thread never overwrites it with a count taken before the accept.
            with self._vn_lock:
                busier = load is not None and not load.may_accept(self.load())
                if not busier:
                    client, address = listener.accept()
                    self._vn_accepted.append(client)
                    self.publish_load()
            if busier:
                time.sleep(0.001)
                raise BlockingIOError("a less busy process takes this association")
            client.setblocking(True)  # as pynetdicom's own accept leaves it
            return client, address

        def publish_load(self) -> None:
            if load is not None:
                with self._vn_lock:
                    load.publish(self.load())

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)  # returns once the Association started
            finally:
                with self._vn_lock:
                    self._vn_accepted.remove(request)

        def server_close(self) -> None:
            return None  # the listener belongs to the process that created it

        def shutdown(self) -> None:
            # pynetdicom's shutdown also removes the server from the AE's list of the servers it started itself,
            # which this one is not in.
            socketserver.BaseServer.shutdown(self)

    return SharedListenerServer


# ---- the application entity ------------------------------------------------------------------------------------


class DimseServer:
    """Owns the pynetdicom AE and its handlers; `start()` serves in background threads."""

    def __init__(
        self,
        archive: Archive,
        *,
        ae_title: str,
        host: str,
        port: int,
        allowed_aes: list[str],
        max_pdu: int,
        max_associations: int,
        resolve_destination: Callable[[str], Destination | None],
        services: list[DimseService] | None = None,
        max_find_results: int = 0,
    ) -> None:
        netio.apply()
        self.archive = archive
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.resolve_destination = resolve_destination
        self.max_find_results = max_find_results
        ae = AE(ae_title=ae_title)
        ae.maximum_pdu_size = max_pdu
        ae.maximum_associations = max_associations
        ae.network_timeout = 120
        ae.dimse_timeout = 120
        ae.acse_timeout = 30
        if allowed_aes:
            ae.require_calling_aet = allowed_aes
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        # Storage contexts are not listed: with pynetdicom's unrestricted storage service every storage, private or
        # unknown SOP class is accepted in the first transfer syntax proposed, and SCP/SCU role selection for C-GET
        # is answered too. Listing ~130 classes × every transfer syntax made pynetdicom deep-copy thousands of
        # objects at each association (~50 ms before the first message).
        for model in QR_MODELS:
            ae.add_supported_context(model, ALL_TRANSFER_SYNTAXES)
        self.services = {service.sop_class: service for service in services or []}
        for sop_class in self.services:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        self.ae = ae
        self._server: Any = None
        _config.UNRESTRICTED_STORAGE_SERVICE = True

    # ---- lifecycle -----------------------------------------------------------------------------------------

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [
            (evt.EVT_C_ECHO, lambda event: status.SUCCESS),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_C_GET, self.on_get),
            (evt.EVT_N_CREATE, lambda event: self._n_service(event, "n_create", "AffectedSOPClassUID")),
            (evt.EVT_N_SET, lambda event: self._n_service(event, "n_set", "RequestedSOPClassUID")),
            (evt.EVT_N_ACTION, lambda event: self._n_service(event, "n_action", "RequestedSOPClassUID")),
        ]

    def _n_service(self, event: Any, kind: str, class_key: str) -> tuple[Any, Dataset | None]:
        service = self.services.get(str(getattr(event.request, class_key, "") or ""))
        handler = getattr(service, kind, None) if service else None
        if handler is None:
            return status.NO_SUCH_SOP_CLASS, None
        return handler(event)  # type: ignore[no-any-return]

    def start(self, listener: socket.socket | None = None, load: SharedLoad | None = None) -> None:
        """Serve in background threads: on our own socket, or on `listener`, a listening socket shared with the
        other processes of this server (each accepts what it is the first to pick up)."""
        if listener is None:
            self._server = self.ae.start_server((self.host, self.port), block=False, evt_handlers=self.handlers())
            return
        server = self.ae.make_server(
            listener.getsockname()[:2],
            evt_handlers=self.handlers(),
            server_class=_shared_listener_server(listener, load),
        )
        thread = threading.Thread(target=server.serve_forever, name="dimse-acceptor", daemon=True)
        thread.start()
        if load is not None:
            # An association that ends frees its process for the next one at once, not at the next count below.
            for ended in (evt.EVT_RELEASED, evt.EVT_ABORTED, evt.EVT_REJECTED):
                server.bind(ended, lambda _event: server.publish_load())

            def publish() -> None:  # and in case one ends otherwise (its connection lost): count them again often
                while self._server is server:
                    server.publish_load()
                    time.sleep(0.02)

            threading.Thread(target=publish, name="dimse-load", daemon=True).start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # ---- Storage -------------------------------------------------------------------------------------------

    def on_store(self, event: Any) -> Dataset | int:
        req = event.request
        calling = _aet(event.assoc.requestor.ae_title)
        negotiated = str(event.context.abstract_syntax)
        if negotiated != str(req.AffectedSOPClassUID):
            return _status(
                status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"SOP Class {req.AffectedSOPClassUID} sent on a context for {negotiated}",
            )
        path = event.dataset_path
        spooled = netio.spooled(path)
        try:
            result = self.archive.ingest_file(
                path,
                calling_ae=calling,
                source="dimse",
                adopt=True,
                expected_sop_class_uid=str(req.AffectedSOPClassUID),
                expected_sop_instance_uid=str(req.AffectedSOPInstanceUID),
                known_digest=(spooled.sha256, spooled.size) if spooled else None,
                known_head=spooled.head if spooled else None,
            )
        except SOPClassMismatch as exc:
            return _status(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, exc.message)
        except SOPInstanceMismatch as exc:
            return _status(status.INVALID_SOP_INSTANCE, exc.message)
        except StorageUnavailable as exc:
            log.error("C-STORE from %s refused, storage unavailable: %s", calling, exc.message)
            return _status(status.OUT_OF_RESOURCES, "storage unavailable, retry later")
        except IngestError as exc:
            log.warning("C-STORE from %s rejected: %s", calling, exc.message)
            return _status(status.CANNOT_UNDERSTAND, exc.message)
        if result.outcome == "conflict":
            log.warning("C-STORE %s from %s: %s", result.sop_instance_uid, calling, result.message)
        return status.SUCCESS  # a bare code: pynetdicom sets it without walking a status Dataset

    # ---- Query ---------------------------------------------------------------------------------------------

    def on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        service = self.services.get(str(event.request.AffectedSOPClassUID))
        if service is not None and service.find is not None:
            yield from service.find(event)
            return
        try:
            level, filters, keys = identifier_to_query(event.identifier)
            patient_root = str(event.request.AffectedSOPClassUID) in PATIENT_ROOT
            if patient_root and level == "PATIENT" and "PatientID" not in keys:
                keys.append("PatientID")
            with self.archive.engine.connect() as conn:
                result = find(
                    conn,
                    level,  # type: ignore[arg-type]
                    filters,
                    keys,
                    patient_root=patient_root,
                    limit=self.max_find_results or None,
                )
            if result.truncated:
                # Like dcm4chee, refuse rather than silently answer part of the matches.
                comment = f"more than {self.max_find_results} matches: narrow the query"
                yield status.OUT_OF_RESOURCES_MATCHES, _status(status.OUT_OF_RESOURCES_MATCHES, comment)
                return
        except QueryError as exc:
            yield (
                status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                _status(status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc)),
            )
            return
        except SQLAlchemyError as exc:
            log.error("C-FIND failed, database unavailable: %s", exc)
            yield (
                status.OUT_OF_RESOURCES_MATCHES,
                _status(status.OUT_OF_RESOURCES_MATCHES, "database unavailable"),
            )
            return
        for row in result.rows:
            if event.is_cancelled:
                yield status.CANCEL, None
                return
            yield status.PENDING, _response(level, keys, row, self.ae_title)
        yield status.SUCCESS, None

    # ---- Retrieve ------------------------------------------------------------------------------------------

    def _objects(self, identifier: Dataset) -> list[StoredObject]:
        level, filters, _ = identifier_to_query(identifier)
        with self.archive.engine.connect() as conn:
            return objects_for(conn, level, filters)  # type: ignore[arg-type]

    def _send_each(self, event: Any, objects: list[StoredObject]) -> Iterator[tuple[int, Dataset | None]]:
        failed: list[str] = []
        for obj in objects:
            if event.is_cancelled:
                yield status.CANCEL, _failed_list(failed)
                return
            try:
                with self.archive.blobs.local_file(obj.blob_key) as path:
                    yield (
                        status.PENDING,
                        netio.StoredFile(path, obj.sop_class_uid, obj.sop_instance_uid, obj.transfer_syntax_uid),
                    )
            except BlobStoreError as exc:
                log.error("cannot read %s for retrieve: %s", obj.sop_instance_uid, exc)
                failed.append(obj.sop_instance_uid)
        if failed:
            yield status.OUT_OF_RESOURCES_SUBOPERATIONS, _failed_list(failed)

    def on_get(self, event: Any) -> Iterator[Any]:
        try:
            objects = self._objects(event.identifier)
        except (QueryError, SQLAlchemyError) as exc:
            yield 0
            code = status.UNABLE_TO_PROCESS if isinstance(exc, QueryError) else status.OUT_OF_RESOURCES
            yield code, _status(code, str(exc).splitlines()[0])
            return
        yield len(objects)
        yield from self._send_each(event, objects)

    def on_move(self, event: Any) -> Iterator[Any]:
        destination = self.resolve_destination(_aet(event.move_destination))
        if destination is None:
            log.warning("C-MOVE to unknown destination %r", _aet(event.move_destination))
            yield None, None
            return
        try:
            objects = self._objects(event.identifier)
        except (QueryError, SQLAlchemyError) as exc:
            # pynetdicom answers a handler exception with a failure status (0xC5xx, "unable to process").
            log.warning("C-MOVE refused: %s", exc)
            raise
        yield (
            destination.host,
            destination.port,
            {
                "ae_title": destination.ae_title,
                "contexts": contexts_for(objects),
                "max_pdu": 0,
            },
        )
        yield len(objects)
        yield from self._send_each(event, objects)


def _failed_list(failed: list[str]) -> Dataset:
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = failed
    return ds


def contexts_for(objects: list[StoredObject]) -> list[PresentationContext]:
    """Presentation contexts to send `objects` as stored, with uncompressed fallbacks (at most 128)."""
    pairs = sorted({(o.sop_class_uid, o.transfer_syntax_uid) for o in objects})
    classes = sorted({o.sop_class_uid for o in objects})
    uncompressed = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    contexts: list[PresentationContext] = []
    if len(pairs) + len(classes) <= 128:
        for sop_class, ts in pairs:
            contexts.append(build_context(sop_class, [ts]))
        for sop_class in classes:
            contexts.append(build_context(sop_class, uncompressed))
    else:
        for sop_class in classes[:128]:
            stored = sorted({o.transfer_syntax_uid for o in objects if o.sop_class_uid == sop_class})
            contexts.append(build_context(sop_class, list(dict.fromkeys([*stored, *uncompressed]))))
    return contexts
