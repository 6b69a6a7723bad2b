"""Storage Commitment Push Model SCP (PS3.4 Annex J).

N-ACTION (action type 1, on the well-known instance 1.2.840.10008.1.20.1.1) is answered at once; then, in a
thread, every referenced instance is checked: in the index with the same SOP Class, and its blob read back with the
SHA-256 recorded at ingest. The result goes out as N-EVENT-REPORT, event type 1 (all committed) or 2 (failures
exist): committed instances in the Referenced SOP Sequence, the others in the Failed SOP Sequence with a Failure
Reason: 0x0112 not stored, 0x0119 stored under another SOP Class, 0x0110 blob missing or its hash does not verify,
0x0213 the index could not be read.

The report goes on the requesting association while it is still open; otherwise on a new association to the
requesting AE title, found in the `commitment_aes` setting (AET=HOST:PORT) or the remote AE table, proposing SCP/SCU
role selection with us as the Storage Commitment SCP. Sending on a new association is retried a few times; a report
still undelivered is logged, not kept across restarts.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from storage.blobstore import BlobStore, BlobStoreError
from storage.models import Instance, RemoteAE
from worklist import status

log = logging.getLogger(__name__)

STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP Instance (PS3.4 J.3.5)
REQUEST_STORAGE_COMMITMENT = 1
EVENT_ALL_COMMITTED = 1
EVENT_FAILURES_EXIST = 2

FAILURE_PROCESSING = status.PROCESSING_FAILURE  # 0x0110: blob missing or hash mismatch
FAILURE_NO_SUCH_OBJECT = status.NO_SUCH_SOP_INSTANCE  # 0x0112
FAILURE_CLASS_INSTANCE_CONFLICT = status.CLASS_INSTANCE_CONFLICT  # 0x0119
FAILURE_RESOURCE_LIMITATION = status.RESOURCE_LIMITATION  # 0x0213


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int


def parse_peers(entries: Iterable[str]) -> dict[str, Peer]:
    """`AET=HOST:PORT` entries (the commitment_aes setting) by AE title; ValueError on a malformed one."""
    peers: dict[str, Peer] = {}
    for entry in entries:
        aet, _, address = entry.partition("=")
        host, _, port = address.rpartition(":")
        aet, host = aet.strip(), host.strip().strip("[]")
        if not aet or len(aet) > 16 or not host or not port.strip().isdigit():
            raise ValueError(f"storage commitment peer {entry!r} is not AET=HOST:PORT")
        peers[aet] = Peer(aet, host, int(port))
    return peers


@dataclass
class Outcome:
    committed: list[tuple[str, str]] = field(default_factory=list)  # (SOP Class UID, SOP Instance UID)
    failed: list[tuple[str, str, int]] = field(default_factory=list)  # ... and the Failure Reason

    @property
    def event_type(self) -> int:
        return EVENT_FAILURES_EXIST if self.failed else EVENT_ALL_COMMITTED


def blob_digest(blobs: BlobStore, key: str) -> tuple[str, int]:
    """SHA-256 (hex) and size of a stored blob, read back from the store."""
    digest = hashlib.sha256()
    size = 0
    with blobs.open(key) as fp:
        while chunk := fp.read(1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def verify(engine: Engine, blobs: BlobStore, refs: list[tuple[str, str]]) -> Outcome:
    """Which of `refs` (SOP Class UID, SOP Instance UID) are stored under that class with a blob that verifies."""
    outcome = Outcome()
    uids = list(dict.fromkeys(uid for _, uid in refs))
    rows: dict[str, Any] = {}
    try:
        with engine.connect() as conn:
            for start in range(0, len(uids), 500):
                for found in conn.execute(
                    select(
                        Instance.sop_instance_uid,
                        Instance.sop_class_uid,
                        Instance.blob_key,
                        Instance.sha256,
                        Instance.size,
                    ).where(Instance.sop_instance_uid.in_(uids[start : start + 500]))
                ):
                    rows[found.sop_instance_uid] = found
    except SQLAlchemyError as exc:
        log.error("storage commitment: index unavailable: %s", exc)
        outcome.failed = [(cls, uid, FAILURE_RESOURCE_LIMITATION) for cls, uid in refs]
        return outcome
    verified: dict[str, bool] = {}
    for sop_class, uid in refs:
        row = rows.get(uid)
        if row is None:
            outcome.failed.append((sop_class, uid, FAILURE_NO_SUCH_OBJECT))
            continue
        if row.sop_class_uid != sop_class:
            outcome.failed.append((sop_class, uid, FAILURE_CLASS_INSTANCE_CONFLICT))
            continue
        if row.blob_key not in verified:
            try:
                verified[row.blob_key] = blob_digest(blobs, row.blob_key) == (row.sha256, row.size)
            except BlobStoreError as exc:
                log.error("storage commitment: cannot read %s (%s): %s", uid, row.blob_key, exc)
                verified[row.blob_key] = False
        if verified[row.blob_key]:
            outcome.committed.append((sop_class, uid))
        else:
            log.error("storage commitment: %s does not verify against its recorded SHA-256", uid)
            outcome.failed.append((sop_class, uid, FAILURE_PROCESSING))
    return outcome


def event_information(transaction_uid: str, outcome: Outcome, retrieve_ae: str) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    if outcome.committed:
        ds.RetrieveAETitle = retrieve_ae
    items = []
    for sop_class, uid in outcome.committed:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    if items or not outcome.failed:
        ds.ReferencedSOPSequence = Sequence(items)
    if outcome.failed:
        failed = []
        for sop_class, uid, reason in outcome.failed:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = uid
            item.FailureReason = reason
            failed.append(item)
        ds.FailedSOPSequence = Sequence(failed)
    return ds


class StorageCommitment:
    """The Storage Commitment Push Model SCP."""

    sop_class = STORAGE_COMMITMENT_PUSH_MODEL

    def __init__(
        self,
        engine: Engine,
        blobs: BlobStore,
        *,
        ae_title: str,
        peers: Iterable[str] = (),
        attempts: int = 3,
        retry_delay: float = 2.0,
        timeout: float = 30.0,
    ) -> None:
        self.engine = engine
        self.blobs = blobs
        self.ae_title = ae_title
        self.peers = parse_peers(peers)
        self.attempts = attempts
        self.retry_delay = retry_delay
        self.timeout = timeout

    # ---- N-ACTION -------------------------------------------------------------------------------------------

    def n_action(self, event: Any) -> tuple[Any, Dataset | None]:
        calling = status.calling_ae(event)
        if event.action_type != REQUEST_STORAGE_COMMITMENT:
            return status.failure(status.NO_SUCH_ACTION, f"no action type {event.action_type}"), None
        instance = str(event.request.RequestedSOPInstanceUID or "")
        if instance != STORAGE_COMMITMENT_INSTANCE:
            return status.failure(status.INVALID_OBJECT_INSTANCE, f"not the well-known instance: {instance}"), None
        try:
            info = event.action_information
            transaction = str(info.get("TransactionUID", "") or "").strip()
            refs = [
                (str(item.ReferencedSOPClassUID).strip(), str(item.ReferencedSOPInstanceUID).strip())
                for item in info.get("ReferencedSOPSequence") or []
            ]
        except (AttributeError, ValueError, TypeError) as exc:
            return status.failure(status.INVALID_ARGUMENT_VALUE, f"malformed request: {exc}"), None
        if not transaction:
            return status.failure(status.INVALID_ARGUMENT_VALUE, "TransactionUID missing"), None
        if not refs or any(not cls or not uid for cls, uid in refs):
            return status.failure(status.INVALID_ARGUMENT_VALUE, "ReferencedSOPSequence empty or incomplete"), None
        log.info("storage commitment %s from %s: %d instance(s)", transaction, calling, len(refs))
        threading.Thread(
            target=self._commit,
            args=(event.assoc, calling, transaction, refs),
            name=f"commitment-{transaction[-12:]}",
            daemon=True,
        ).start()
        return status.SUCCESS, None

    def _commit(self, assoc: Any, calling: str, transaction: str, refs: list[tuple[str, str]]) -> None:
        try:
            outcome = verify(self.engine, self.blobs, refs)
            info = event_information(transaction, outcome, self.ae_title)
            log.info(
                "storage commitment %s: %d committed, %d failed",
                transaction,
                len(outcome.committed),
                len(outcome.failed),
            )
            answered = self._send_on(assoc, info, outcome.event_type)
            if answered == status.SUCCESS:
                self._reported(transaction, "same association", outcome.event_type)
                return
            if answered is not None:
                log.warning(
                    "storage commitment %s: %s answered 0x%04X on the same association; trying a new one",
                    transaction,
                    calling,
                    answered,
                )
            for attempt in range(1, self.attempts + 1):
                peer = self.resolve(calling)
                if peer is None:
                    log.error(
                        "storage commitment %s: %s and AE %s is not configured (commitment_aes or remote AEs): "
                        "report not delivered",
                        transaction,
                        "association closed" if answered is None else "report refused",
                        calling,
                    )
                    return
                if self._send_new(peer, info, outcome.event_type):
                    self._reported(transaction, "new association", outcome.event_type)
                    return
                if attempt < self.attempts:
                    time.sleep(self.retry_delay * attempt)
            log.error(
                "storage commitment %s: report to %s not delivered after %d attempts",
                transaction,
                calling,
                self.attempts,
            )
        except Exception:  # a thread must not die silently
            log.exception("storage commitment %s failed", transaction)

    @staticmethod
    def _reported(transaction: str, how: str, event_type: int) -> None:
        log.info("storage commitment %s reported on %s (event type %d)", transaction, how, event_type)

    # ---- delivery -------------------------------------------------------------------------------------------

    def resolve(self, ae_title: str) -> Peer | None:
        if ae_title in self.peers:
            return self.peers[ae_title]
        with self.engine.connect() as conn:
            row = conn.execute(
                select(RemoteAE.ae_title, RemoteAE.host, RemoteAE.port).where(RemoteAE.ae_title == ae_title)
            ).first()
        return Peer(row.ae_title, row.host, row.port) if row else None

    def _send_on(self, assoc: Any, info: Dataset, event_type: int) -> int | None:
        """Send the report on the requesting association if it is still open: the status the peer answered, None
        if the association is gone or nothing came back."""
        # One report at a time per association (each pauses its reactor while it waits for the answer).
        lock = assoc.__dict__.setdefault("_vn_commitment_lock", threading.Lock())
        with lock:
            if not _pause(assoc, self.timeout):
                return None
            try:
                from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, A_RELEASE

                pending = assoc.dul.peek_next_pdu()
                if not assoc.is_established or isinstance(pending, A_RELEASE | A_ABORT | A_P_ABORT):
                    return None
                rsp, _ = assoc.send_n_event_report(
                    info, event_type, STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_INSTANCE
                )
            except Exception as exc:
                log.warning("storage commitment report on the open association failed: %s", exc)
                return None
            finally:
                assoc._reactor_checkpoint.set()
        code = rsp.get("Status") if rsp is not None else None
        return int(code) if code is not None else None

    def _send_new(self, peer: Peer, info: Dataset, event_type: int) -> bool:
        from pynetdicom import AE, build_role

        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        role = build_role(STORAGE_COMMITMENT_PUSH_MODEL, scp_role=True)
        try:
            assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, ext_neg=[role])
        except Exception as exc:
            log.warning("storage commitment: cannot reach %s@%s:%d: %s", peer.ae_title, peer.host, peer.port, exc)
            return False
        if not assoc.is_established:
            log.warning("storage commitment: %s@%s:%d refused the association", peer.ae_title, peer.host, peer.port)
            return False
        try:
            rsp, _ = assoc.send_n_event_report(
                info, event_type, STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_INSTANCE
            )
        finally:
            if assoc.is_established:
                assoc.release()
        code = rsp.get("Status") if rsp is not None else None
        if code is None:
            return False
        if code != status.SUCCESS:
            log.warning("storage commitment report answered by %s with status 0x%04X", peer.ae_title, code)
        return True


def _pause(assoc: Any, timeout: float) -> bool:
    """Hold the association's reactor between two messages, so a report can be sent on it; False if the
    association is gone.

    pynetdicom's own send_*() clear the reactor's checkpoint and wait for its `_is_paused` flag, but the reactor
    also raises that flag while it runs a service handler: a report sent then could overtake the N-ACTION response
    still being sent. Here the wait is for the reactor blocked on the checkpoint itself (a waiter on the Event),
    which it only reaches between messages.
    """
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is None or not assoc.is_established:
        return False
    condition = getattr(checkpoint, "_cond", None)
    waiters = getattr(condition, "_waiters", None)
    if waiters is None:
        log.warning("pynetdicom internals changed: storage commitment reports go on a new association")
        return False
    checkpoint.clear()
    deadline = time.monotonic() + timeout
    while not (len(waiters) > 0 and getattr(assoc, "_is_paused", False)):
        if not assoc.is_established or not assoc.is_alive() or time.monotonic() > deadline:
            checkpoint.set()
            return False
        time.sleep(0.001)
    return True
