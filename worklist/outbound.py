"""Results out to the HIS: ORU^R01 over MLLP through a durable retry queue (Celery).

Each message is first a row of `ris_outbound` (the outbox, committed with nothing else pending), then a Celery task
that delivers it. The task retries with exponential backoff until the HIS answers AA/CA; the row records attempts,
the last error and the ACK, and can be resent by hand. The broker is Redis in production; the embedded default uses
Celery's SQLAlchemy transport over SQLite in the data dir, and `vnpacs serve` runs the worker in-process. At start
the outbox is swept: rows still PENDING are queued again, so a message owed survives any restart or lost broker.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import socket
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

from celery import Celery
from hl7.mllp.streams import CARRIAGE_RETURN, END_BLOCK, START_BLOCK
from sqlalchemy import Engine, or_, select, update
from sqlalchemy.orm import Session, selectinload

from worklist import key_images as keyimg
from worklist.hl7 import escape_delimiters
from worklist.models import VIETNAM, Order, OutboundMessage, Report, ReportVersion, utcnow

log = logging.getLogger(__name__)

END_OF_FRAME = END_BLOCK + CARRIAGE_RETURN
PENDING, SENT = "PENDING", "SENT"
LEASE_SECONDS = 60  # an attempt that dies (killed worker) frees its message after this
SWEEP_SECONDS = 30


class DeliveryError(Exception):
    """The HIS could not be reached or did not accept the message."""


# ---- HL7 v2 building blocks ---------------------------------------------------------------------------------


def hl7_escape(text: str) -> str:
    """Escape HL7 delimiters and turn line breaks into \\.br\\ (formatted text)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\\.br\\".join(escape_delimiters(line) for line in lines)


def hl7_ts(value: dt.datetime | None) -> str:
    return (value or utcnow()).astimezone(VIETNAM).strftime("%Y%m%d%H%M%S")


def _xpn(name: str) -> str:
    """DICOM PN (family^given^middle) as HL7 XPN components (family^given^middle)."""
    return "^".join(hl7_escape(part) for part in name.split("=")[0].split("^")[:5])


def oru_r01(
    order: Order,
    version: ReportVersion,
    *,
    control_id: str,
    sending_facility: str,
    study_url: str = "",
    key_images: Sequence[tuple[bytes | None, str]] = (),
) -> str:
    """An ORU^R01 (v2.5, UTF-8) carrying a report version: F for FINAL, C for an amended (corrected) result.

    Each key image (JPEG, URL) is an ED OBX with the JPEG in Base64 (`^IM^JPEG^Base64^…`, HL7 v2.5 2.A.24) and an
    RP OBX pointing at it, both with the image's number as sub-ID; a JPEG that could not be rendered leaves the RP.
    """
    status = "C" if version.status == "AMENDED" else "F"
    ids = [f"{hl7_escape(order.patient_id)}^^^{hl7_escape(order.issuer_of_patient_id)}^PI"]
    if order.cccd:
        ids.append(f"{order.cccd}^^^BCA^NI")
    if order.bhyt:
        ids.append(f"{order.bhyt}^^^BHXH^SB")
    when = hl7_ts(version.signed_at or version.created_at)
    procedure = "^".join(
        hl7_escape(v) for v in (order.procedure_code, order.procedure_description, order.procedure_code_scheme)
    )
    modality = order.steps[0].modality if order.steps else ""
    interpreter = f"{hl7_escape(version.author_code)}&{hl7_escape(version.author_name.replace('^', ' '))}"
    segments = [
        f"MSH|^~\\&|VNPACS|{hl7_escape(sending_facility)}|HIS|HIS|{hl7_ts(None)}||ORU^R01^ORU_R01|{control_id}|P|2.5"
        "||||||UNICODE UTF-8",
        f"PID|1||{'~'.join(ids)}||{_xpn(order.patient_name)}||{order.patient_birth_date}|{order.patient_sex}",
        f"PV1|1|O|||||||||||||||||{hl7_escape(order.episode_id)}",
        f"ORC|RE|{hl7_escape(order.placer_order_number or '')}|{hl7_escape(order.accession_number)}||CM",
        f"OBR|1|{hl7_escape(order.placer_order_number or '')}|{hl7_escape(order.accession_number)}|{procedure}"
        f"|||{when}|||||||||||{hl7_escape(order.accession_number)}||||{when}||{modality}|{status}"
        f"|||||||{interpreter}",
    ]
    observations = [
        ("FINDINGS", "Mô tả", version.findings),
        ("IMPRESSION", "Kết luận", version.conclusion),
        ("RECOMMENDATION", "Đề nghị", version.recommendation),
    ]
    n = 0
    for code, label, text in observations:
        if text.strip():
            n += 1
            segments.append(f"OBX|{n}|TX|{code}^{label}^L||{hl7_escape(text)}||||||{status}|||{when}")
    if study_url:
        n += 1
        segments.append(
            f"OBX|{n}|RP|STUDY^Hình ảnh^L||{hl7_escape(study_url)}^VNPACS^IMAGE^HTML||||||{status}|||{when}"
        )
    for k, (jpeg, url) in enumerate(key_images, 1):
        if jpeg is not None:
            n += 1
            data = base64.b64encode(jpeg).decode("ascii")  # A-Z a-z 0-9 + / =: nothing to escape
            segments.append(f"OBX|{n}|ED|KEYIMAGE^Ảnh chính^L|{k}|^IM^JPEG^Base64^{data}||||||{status}|||{when}")
        if url:
            n += 1
            segments.append(
                f"OBX|{n}|RP|KEYIMAGE^Ảnh chính^L|{k}|{hl7_escape(url)}^VNPACS^IM^JPEG||||||{status}|||{when}"
            )
    return "\r".join(segments) + "\r"


def send_mllp(url: str, message: str, *, timeout: float = 10.0) -> str:
    """Send one message to mllp://HOST:PORT and return the ACK; raises DeliveryError unless MSA-1 is AA or CA.

    python-hl7's MLLPClient has no timeouts and reads one recv(); this waits for the whole framed answer.
    """
    parsed = urlparse(url)
    if parsed.scheme != "mllp" or not parsed.hostname or not parsed.port:
        raise DeliveryError(f"HIS endpoint must be mllp://HOST:PORT, got {url!r}")
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(START_BLOCK + message.encode("utf-8") + END_OF_FRAME)
            answer = b""
            while END_OF_FRAME not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    raise DeliveryError("the HIS closed the connection without an ACK")
                answer += chunk
    except OSError as exc:
        raise DeliveryError(f"cannot reach the HIS at {parsed.hostname}:{parsed.port}: {exc}") from exc
    ack = answer.split(START_BLOCK, 1)[-1].split(END_OF_FRAME, 1)[0].decode("utf-8", "replace")
    msa = next((s for s in ack.replace("\n", "\r").split("\r") if s.startswith("MSA")), "")
    code = msa.split("|")[1] if msa.count("|") >= 1 else ""
    if code not in ("AA", "CA"):
        raise DeliveryError(f"the HIS answered {code or 'no MSA'}: {msa[:200]}")
    return ack


# ---- the queue ----------------------------------------------------------------------------------------------


def default_broker(data_dir: str) -> str:
    return f"sqla+sqlite:///{data_dir}/celery.db"


class Outbound(threading.Thread):
    """The outbox, its Celery app and (when `run_worker`) an in-process worker; start()/stop() as a Background."""

    def __init__(
        self,
        engine: Engine,
        *,
        broker_url: str,
        his_url: str,
        sending_facility: str = "VNPACS",
        retry_base: float = 2.0,
        retry_max: float = 300.0,
        run_worker: bool = True,
        public_url: str = "",
        key_images: keyimg.KeyImages | None = None,
    ) -> None:
        super().__init__(name="outbound-worker", daemon=True)
        self.key_images = key_images
        self.engine = engine
        self.his_url = his_url
        self.sending_facility = sending_facility
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.run_worker = run_worker
        self.public_url = public_url.rstrip("/")
        self.celery = Celery("vnpacs", broker=broker_url)
        self.celery.conf.update(
            task_acks_late=True,
            task_reject_on_worker_lost=True,
            worker_prefetch_multiplier=1,
            broker_connection_retry_on_startup=True,
            task_default_queue="vnpacs-outbound",
            # The SQLAlchemy transport hands its options to create_engine; Redis takes the visibility timeout.
            broker_transport_options={} if broker_url.startswith("sqla+") else {"visibility_timeout": 3600},
            worker_hijack_root_logger=False,
        )

        def deliver(task: Any, pk: int) -> str:
            return self._deliver(task, pk)

        self.deliver_task = self.celery.task(bind=True, name="vnpacs.outbound.deliver", max_retries=None)(deliver)
        self._worker: Any = None
        self._stopping = threading.Event()

    # ---- producing ------------------------------------------------------------------------------------------

    def enqueue_report(
        self,
        order: Order,
        version: ReportVersion,
        *,
        study_url: str = "",
        key_images: Sequence[tuple[bytes | None, str]] = (),
    ) -> int | None:
        """Queue the ORU^R01 for a FINAL or AMENDED report version; None when no HIS endpoint is configured."""
        if not self.his_url:
            return None
        with Session(self.engine) as session, session.begin():
            row = OutboundMessage(kind="hl7-oru", destination=self.his_url, payload="", report_version_pk=version.pk)
            session.add(row)
            session.flush()
            row.payload = oru_r01(
                order,
                version,
                control_id=f"VNPACS{row.pk}",
                sending_facility=self.sending_facility,
                study_url=study_url,
                key_images=key_images,
            )
            pk = row.pk
        self.deliver_task.apply_async((pk,))
        return pk

    def report_signed(self, report_pk: int, version_pk: int) -> None:
        """The reports service's on_final hook: queue the ORU^R01 of a FINAL / AMENDED version of an ordered study."""
        with Session(self.engine, expire_on_commit=False) as session:
            version = session.get(ReportVersion, version_pk)
            report = session.get(Report, report_pk)
            if version is None or report is None or report.order_pk is None:
                log.info("report %s has no order: nothing to send to the HIS", report_pk)
                return
            order = session.execute(
                select(Order).options(selectinload(Order.steps)).where(Order.pk == report.order_pk)
            ).scalar_one()
        study_url = (
            f"{self.public_url}/viewer/viewer?StudyInstanceUIDs={report.study_instance_uid}" if self.public_url else ""
        )
        if not self.his_url:
            return
        images: list[tuple[bytes | None, str]] = []
        for k, image in enumerate(keyimg.loads(version.key_images), 1):
            url = f"{self.public_url}/api/reports/{report.pk}/versions/{version.version}/key-images/{k}.jpg"
            jpeg = None
            if self.key_images is not None:
                try:
                    jpeg = self.key_images.jpeg(image)
                except (keyimg.KeyImageError, keyimg.KeyImageUnavailable) as exc:
                    log.warning("report %s: key image %d sent as a link only: %s", report.pk, k, exc)
            images.append((jpeg, url if self.public_url else ""))
        self.enqueue_report(order, version, study_url=study_url, key_images=images)

    def resend(self, pk: int) -> None:
        with Session(self.engine) as session, session.begin():
            row = session.get(OutboundMessage, pk)
            if row is None:
                raise KeyError(pk)
            row.status = PENDING
            row.destination = self.his_url or row.destination
        self.deliver_task.apply_async((pk,))

    def sweep(self) -> int:
        """Queue again every message still owed that no attempt holds (after a restart, a killed worker, a lost
        broker, a purge)."""
        with Session(self.engine) as session:
            owed = list(
                session.execute(
                    select(OutboundMessage.pk).where(
                        OutboundMessage.status == PENDING,
                        or_(OutboundMessage.lease_until.is_(None), OutboundMessage.lease_until <= utcnow()),
                    )
                ).scalars()
            )
        for pk in owed:
            self.deliver_task.apply_async((pk,))
        return len(owed)

    # ---- delivering -----------------------------------------------------------------------------------------

    def _claim(self, pk: int) -> tuple[str, str] | None:
        """Take the row for one delivery attempt: only one worker at a time, only while it is owed."""
        now = utcnow()
        with self.engine.begin() as conn:
            claimed = conn.execute(
                update(OutboundMessage)
                .where(
                    OutboundMessage.pk == pk,
                    OutboundMessage.status == PENDING,
                    or_(OutboundMessage.lease_until.is_(None), OutboundMessage.lease_until <= now),
                )
                .values(lease_until=now + dt.timedelta(seconds=LEASE_SECONDS))
            ).rowcount
            if not claimed:
                return None
            row = conn.execute(
                select(OutboundMessage.destination, OutboundMessage.payload).where(OutboundMessage.pk == pk)
            ).one()
        return row.destination, row.payload

    def _deliver(self, task: Any, pk: int) -> str:
        claim = self._claim(pk)
        if claim is None:  # sent already, or another attempt holds it (and will schedule the next one)
            return "nothing to do"
        destination, payload = claim
        try:
            ack = send_mllp(destination, payload)
        except DeliveryError as exc:
            with Session(self.engine) as session, session.begin():
                row = session.get(OutboundMessage, pk)
                attempts = 1
                delay = self.retry_base
                if row is not None:
                    row.attempts += 1
                    row.last_error = str(exc)[:2000]
                    attempts = row.attempts
                    delay = min(self.retry_max, self.retry_base * 2 ** (attempts - 1))
                    # Held until the retry below is due: copies queued meanwhile (sweeps) find it taken.
                    row.lease_until = utcnow() + dt.timedelta(seconds=delay)
            log.warning("message %d to %s not delivered (attempt %d, next in %.0fs): %s", pk, destination, attempts,
                        delay, exc)  # fmt: skip
            # A new message rather than task.retry(): the row, not the broker's redelivery count, is the record.
            self.deliver_task.apply_async((pk,), countdown=delay)
            return "retry"
        with Session(self.engine) as session, session.begin():
            row = session.get(OutboundMessage, pk)
            if row is not None:
                row.status = SENT
                row.attempts += 1
                row.sent_at = utcnow()
                row.ack = ack[:4000]
                row.last_error = ""
                row.lease_until = None
        return "sent"

    # ---- the in-process worker ------------------------------------------------------------------------------

    def run(self) -> None:
        from celery.worker import WorkController

        self._worker = WorkController(
            app=self.celery,
            pool_cls="threads",
            concurrency=2,
            queues=["vnpacs-outbound"],
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            loglevel="WARNING",
        )
        self._worker.start()

    def sweep_periodically(self) -> None:
        while not self._stopping.wait(SWEEP_SECONDS):
            try:
                self.sweep()
            except Exception as exc:
                log.warning("outbox sweep failed: %s", exc)

    def start(self) -> None:
        try:
            owed = self.sweep()
        except Exception as exc:  # the broker or database may be down at start; messages stay owed in the outbox
            log.error("outbox sweep postponed: %s", exc)
        else:
            if owed:
                log.info("%d message(s) to the HIS still owed: queued again", owed)
        if self.run_worker:
            super().start()
            threading.Thread(target=self.sweep_periodically, name="outbox-sweep", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        if self._worker is not None:
            self._worker.stop(in_sighandler=False)
            self.join(timeout=10)


def outbound_dict(row: OutboundMessage) -> dict[str, Any]:
    return {
        "id": row.pk,
        "kind": row.kind,
        "destination": row.destination,
        "status": row.status,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "created_at": row.created_at.isoformat() if row.created_at else "",
        "sent_at": row.sent_at.isoformat() if row.sent_at else "",
        "report_version_id": row.report_version_pk,
        "payload": row.payload,
        "ack": row.ack,
    }
