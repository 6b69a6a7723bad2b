"""Orders: the one service every way in (HL7 v2, FHIR, JSON REST, MPPS, ingest, reports) goes through.

Placing an order is idempotent on the placer order number, then on the accession number: the same order sent twice
changes nothing the second time; a changed order updates the fields and records what changed. Every status change is
kept with its time and source.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import Engine, or_, select
from sqlalchemy.orm import Session, selectinload

from storage.text import nfc, search_key
from worklist.identity import IdentifierError, validate_bhyt, validate_cccd
from worklist.models import (
    CANCELLED,
    COMPLETED,
    DISCONTINUED,
    ENDED,
    IMAGES_AVAILABLE,
    IN_PROGRESS,
    ORDER_STATUSES,
    REPORTED_FINAL,
    REPORTED_PRELIMINARY,
    SCHEDULED,
    Order,
    OrderEvent,
    ProcedureStep,
    utcnow,
)

PRIORITIES = ("STAT", "HIGH", "ROUTINE", "MEDIUM", "LOW")
SEXES = ("M", "F", "O", "")
# How far along the normal flow each status is; an event never moves an order backwards.
_PROGRESS = {
    SCHEDULED: 0,
    IN_PROGRESS: 1,
    COMPLETED: 2,
    IMAGES_AVAILABLE: 3,
    REPORTED_PRELIMINARY: 4,
    REPORTED_FINAL: 5,
}


class OrderError(ValueError):
    """Input that cannot make a valid order; `str()` says why."""


class OrderNotFound(OrderError):
    pass


class OrderConflict(OrderError):
    """A change the order's current state does not allow (cancelling a completed exam...)."""


@dataclass
class StepIn:
    modality: str
    station_ae_title: str = ""
    start_date: str = ""  # YYYYMMDD
    start_time: str = ""  # HHMMSS
    sps_id: str = ""
    station_name: str = ""
    location: str = ""
    performing_physician_name: str = ""
    description: str = ""


@dataclass
class OrderIn:
    """An order as any interface delivers it, before validation."""

    patient_id: str
    patient_name: str
    issuer_of_patient_id: str = ""
    cccd: str = ""
    bhyt: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    placer_order_number: str = ""
    filler_order_number: str = ""
    accession_number: str = ""
    episode_id: str = ""
    priority: str = "ROUTINE"
    procedure_code: str = ""
    procedure_code_scheme: str = ""
    procedure_description: str = ""
    requested_procedure_id: str = ""
    referring_physician_name: str = ""
    reason_for_study: str = ""
    study_instance_uid: str = ""
    steps: list[StepIn] = field(default_factory=list)


def _date(value: str, what: str) -> str:
    value = value.strip().replace("-", "")
    if not value:
        return ""
    try:
        dt.datetime.strptime(value[:8], "%Y%m%d")
    except ValueError as exc:
        raise OrderError(f"{what} must be a date YYYYMMDD, got {value!r}") from exc
    return value[:8]


def _time(value: str, what: str) -> str:
    value = value.strip().replace(":", "")
    if value and (not value.split(".")[0].isdigit() or len(value.split(".")[0]) not in (2, 4, 6)):
        raise OrderError(f"{what} must be a time HHMMSS, got {value!r}")
    return value


def validate(data: OrderIn) -> OrderIn:
    """A normalised copy of `data` (NFC text, upper-case codes, checked identifiers), or OrderError."""
    d = OrderIn(**{f.name: getattr(data, f.name) for f in fields(OrderIn) if f.name != "steps"})
    d.steps = [StepIn(**asdict(s)) for s in data.steps]
    d.patient_id = d.patient_id.strip()
    if not d.patient_id:
        raise OrderError("the order has no patient ID")
    if len(d.patient_id) > 64:
        raise OrderError("patient ID longer than 64 characters")
    d.patient_name = nfc(d.patient_name.strip())
    if not d.patient_name:
        raise OrderError("the order has no patient name")
    d.patient_birth_date = _date(d.patient_birth_date, "birth date")
    d.patient_sex = d.patient_sex.strip().upper()[:1]
    if d.patient_sex not in SEXES:
        raise OrderError(f"patient sex must be M, F or O, got {data.patient_sex!r}")
    try:
        if d.cccd.strip():
            d.cccd = validate_cccd(d.cccd, birth_date=d.patient_birth_date, sex=d.patient_sex)
        if d.bhyt.strip():
            d.bhyt = validate_bhyt(d.bhyt)
    except IdentifierError as exc:
        raise OrderError(str(exc)) from exc
    d.accession_number = d.accession_number.strip()
    if len(d.accession_number) > 16:
        raise OrderError(f"accession number {d.accession_number!r} is longer than 16 characters")
    d.placer_order_number = d.placer_order_number.strip()
    if not d.placer_order_number and not d.accession_number:
        raise OrderError("the order needs a placer order number or an accession number")
    d.priority = (d.priority or "ROUTINE").strip().upper()
    if d.priority not in PRIORITIES:
        raise OrderError(f"priority must be one of {', '.join(PRIORITIES)}, got {data.priority!r}")
    for name in ("procedure_description", "referring_physician_name", "reason_for_study", "episode_id"):
        setattr(d, name, nfc(getattr(d, name).strip()))
    d.procedure_description = d.procedure_description[:64]
    if not d.steps:
        raise OrderError("the order has no scheduled procedure step (modality)")
    for i, step in enumerate(d.steps, 1):
        step.modality = step.modality.strip().upper()
        if not step.modality:
            raise OrderError(f"scheduled procedure step {i} has no modality")
        step.station_ae_title = step.station_ae_title.strip()
        if len(step.station_ae_title) > 16:
            raise OrderError(f"station AE title {step.station_ae_title!r} is longer than 16 characters")
        step.start_date = _date(step.start_date, "scheduled start date")
        step.start_time = _time(step.start_time, "scheduled start time")
        step.performing_physician_name = nfc(step.performing_physician_name.strip())
        step.description = nfc(step.description.strip())[:64]
        step.sps_id = step.sps_id.strip()[:16]
    if d.study_instance_uid and (len(d.study_instance_uid) > 64 or not d.study_instance_uid.replace(".", "").isdigit()):
        raise OrderError(f"study instance UID {d.study_instance_uid!r} is not a UID")
    return d


def new_accession_number() -> str:
    """A RIS-assigned accession number (16 characters at most): date plus 8 random digits."""
    return f"{utcnow():%y%m%d}{secrets.randbelow(10**8):08d}"


_ORDER_FIELDS = [f.name for f in fields(OrderIn) if f.name not in ("steps", "accession_number", "study_instance_uid")]
_STEP_FIELDS = [f.name for f in fields(StepIn) if f.name != "sps_id"]


def order_dict(order: Order) -> dict[str, Any]:
    """The JSON view of an order (REST API, reconciliation)."""
    return {
        "id": order.pk,
        "status": order.status,
        **{name: getattr(order, name) for name in ("accession_number", "study_instance_uid", *_ORDER_FIELDS)},
        "placer_order_number": order.placer_order_number or "",
        "steps": [
            {"sps_id": s.sps_id, "status": s.status, **{name: getattr(s, name) for name in _STEP_FIELDS}}
            for s in order.steps
        ],
        "history": [
            {
                "at": e.at.isoformat() if e.at else "",
                "source": e.source,
                "from": e.from_status,
                "to": e.to_status,
                "detail": e.detail,
            }
            for e in order.events
        ],
        "created_at": order.created_at.isoformat() if order.created_at else "",
        "updated_at": order.updated_at.isoformat() if order.updated_at else "",
    }


class Orders:
    """Order placement, changes and lifecycle over the RIS tables."""

    def __init__(self, engine: Engine, *, uid_prefix: str | None = None) -> None:
        self.engine = engine
        self.uid_prefix = uid_prefix

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # ---- lookup ---------------------------------------------------------------------------------------------

    def _open(self, session: Session, order_pk: int) -> Order:
        order = self._load(session, Order.pk == order_pk)
        if order is None:
            raise OrderNotFound(f"no order {order_pk}")
        return order

    @staticmethod
    def _load(session: Session, *conditions: Any) -> Order | None:
        return session.execute(
            select(Order).options(selectinload(Order.steps), selectinload(Order.events)).where(*conditions)
        ).scalar_one_or_none()

    def _existing(self, session: Session, placer: str, accession: str) -> Order | None:
        if placer:
            found = self._load(session, Order.placer_order_number == placer)
            if found is not None:
                return found
        if accession:
            return self._load(session, Order.accession_number == accession)
        return None

    def get(self, pk: int) -> Order:
        with self.session() as session:
            return self._open(session, pk)

    def find(self, *, placer: str = "", accession: str = "", study_instance_uid: str = "") -> Order | None:
        with self.session() as session:
            if study_instance_uid:
                return self._load(session, Order.study_instance_uid == study_instance_uid)
            return self._existing(session, placer.strip(), accession.strip())

    def search(
        self,
        *,
        accession: str = "",
        patient_id: str = "",
        status: str = "",
        patient_name: str = "",
        limit: int = 100,
        offset: int = 0,
    ) -> list[Order]:
        stmt = select(Order).options(selectinload(Order.steps), selectinload(Order.events))
        if accession:
            stmt = stmt.where(Order.accession_number == accession)
        if patient_id:
            stmt = stmt.where(or_(Order.patient_id == patient_id, Order.cccd == patient_id, Order.bhyt == patient_id))
        if status:
            wanted = [s.strip().upper() for s in status.split(",") if s.strip()]
            unknown = [s for s in wanted if s not in ORDER_STATUSES]
            if unknown:
                raise OrderError(f"unknown status {', '.join(unknown)}; known: {', '.join(ORDER_STATUSES)}")
            stmt = stmt.where(Order.status.in_(wanted))
        if patient_name:
            stmt = stmt.where(Order.patient_name_key.like(search_key(patient_name).replace("*", "%") + "%"))
        stmt = stmt.order_by(Order.pk.desc()).limit(limit).offset(offset)
        with self.session() as session:
            return list(session.execute(stmt).scalars())

    # ---- placement ------------------------------------------------------------------------------------------

    def place(self, data: OrderIn, *, source: str) -> tuple[Order, bool]:
        """Create the order, or update the one with the same placer order number / accession number.

        Returns (order, created). A changed order records which fields changed; an order already performed keeps
        its scheduling (steps are only replaced while every step is still SCHEDULED).
        """
        d = validate(data)
        with self.session() as session, session.begin():
            order = self._existing(session, d.placer_order_number, d.accession_number)
            if order is None:
                order = self._create(session, d, source)
                created = True
            else:
                self._update(session, order, d, source)
                created = False
        return self.get(order.pk), created

    def _create(self, session: Session, d: OrderIn, source: str) -> Order:
        accession = d.accession_number or new_accession_number()
        if self._load(session, Order.accession_number == accession) is not None:
            raise OrderConflict(f"accession number {accession} already belongs to another order")
        order = Order(
            accession_number=accession,
            study_instance_uid=d.study_instance_uid or generate_uid(prefix=self.uid_prefix),
            status=SCHEDULED,
            **{name: getattr(d, name) for name in _ORDER_FIELDS},
        )
        order.placer_order_number = d.placer_order_number or None
        order.patient_name_key = search_key(d.patient_name)
        order.requested_procedure_id = d.requested_procedure_id or accession
        session.add(order)
        session.flush()
        for i, step in enumerate(d.steps, 1):
            order.steps.append(_step(step, i, accession))
        order.events.append(OrderEvent(source=source, from_status="", to_status=SCHEDULED, detail="order placed"))
        return order

    def _update(self, session: Session, order: Order, d: OrderIn, source: str) -> None:
        if order.status in ENDED:
            raise OrderConflict(f"order {order.accession_number} is {order.status} and cannot be changed")
        changed = []
        for name in _ORDER_FIELDS:
            if name == "placer_order_number":
                continue
            new = getattr(d, name)
            if name == "requested_procedure_id" and not new:
                continue
            if getattr(order, name) != new:
                changed.append(name)
                setattr(order, name, new)
        if d.placer_order_number and order.placer_order_number != d.placer_order_number:
            changed.append("placer_order_number")
            order.placer_order_number = d.placer_order_number
        order.patient_name_key = search_key(order.patient_name)
        new_steps = [_step(step, i, order.accession_number) for i, step in enumerate(d.steps, 1)]
        old = [(s.sps_id, *(getattr(s, n) for n in _STEP_FIELDS)) for s in order.steps]
        new = [(s.sps_id, *(getattr(s, n) for n in _STEP_FIELDS)) for s in new_steps]
        if old != new:
            if any(s.status != SCHEDULED for s in order.steps):
                raise OrderConflict(f"order {order.accession_number} is already being performed; cannot reschedule")
            order.steps.clear()
            session.flush()
            order.steps.extend(new_steps)
            changed.append("steps")
        if changed:
            order.updated_at = utcnow()
            self._note(order, source, "changed: " + ", ".join(changed))

    # ---- lifecycle ------------------------------------------------------------------------------------------

    def end(self, order_pk: int, status: str, *, source: str, reason: str = "") -> Order:
        """Cancel (before it started) or discontinue (before it completed) an order."""
        if status not in ENDED:
            raise OrderError(f"an order ends as {CANCELLED} or {DISCONTINUED}, not {status}")
        with self.session() as session, session.begin():
            order = self._open(session, order_pk)
            if order.status == status:
                return order
            allowed = (SCHEDULED,) if status == CANCELLED else (SCHEDULED, IN_PROGRESS)
            if order.status not in allowed:
                raise OrderConflict(f"order {order.accession_number} is {order.status}; it cannot be {status}")
            self._record(order, status, source, reason)
            for step in order.steps:
                if step.status in (SCHEDULED, IN_PROGRESS):
                    step.status = status
        return self.get(order_pk)

    def advance(self, order_pk: int, status: str, *, source: str, detail: str = "") -> Order:
        """Move the order forward along the normal flow; a status it has already passed changes nothing."""
        if status not in _PROGRESS:
            raise OrderError(f"{status} is not a step of the normal flow")
        with self.session() as session, session.begin():
            order = self._open(session, order_pk)
            if order.status in ENDED:
                raise OrderConflict(f"order {order.accession_number} is {order.status}")
            if _PROGRESS[status] > _PROGRESS[order.status] or (status == REPORTED_FINAL and detail):
                self._record(order, status, source, detail)
        return self.get(order_pk)

    def link_study(self, order_pk: int, study_uid: str, *, source: str) -> Order:
        """Record that the order was performed as `study_uid` (the modality may have made its own UID), and that
        its images are available."""
        with self.session() as session, session.begin():
            order = self._open(session, order_pk)
            if order.status in ENDED:
                raise OrderConflict(f"order {order.accession_number} is {order.status}")
            if order.study_instance_uid != study_uid:
                other = self._load(session, Order.study_instance_uid == study_uid)
                if other is not None:
                    raise OrderConflict(f"study {study_uid} is already linked to order {other.accession_number}")
                self._note(order, source, f"study {study_uid} linked (worklist gave {order.study_instance_uid})")
                order.study_instance_uid = study_uid
            if _PROGRESS[IMAGES_AVAILABLE] > _PROGRESS[order.status]:
                self._record(order, IMAGES_AVAILABLE, source, f"images of study {study_uid} stored")
        return self.get(order_pk)

    @staticmethod
    def _note(order: Order, source: str, detail: str) -> None:
        """An event that changes no status (fields changed, study linked, patient updated or merged)."""
        order.events.append(OrderEvent(source=source, from_status=order.status, to_status=order.status, detail=detail))

    @staticmethod
    def _record(order: Order, status: str, source: str, detail: str) -> None:
        order.events.append(OrderEvent(source=source, from_status=order.status, to_status=status, detail=detail))
        order.status = status
        order.updated_at = utcnow()

    def set_step_status(self, order_pk: int, sps_ids: Sequence[str], status: str) -> None:
        with self.session() as session, session.begin():
            order = self._open(session, order_pk)
            for step in order.steps:
                if not sps_ids or step.sps_id in sps_ids:
                    step.status = status

    # ---- patient identity -----------------------------------------------------------------------------------

    def update_patient(
        self, patient_id: str, issuer: str, values: dict[str, str], *, source: str, detail: str = ""
    ) -> int:
        """Carry a demographics update (ADT^A08) to the patient's open and past orders. Returns orders changed."""
        allowed = {"patient_name", "patient_birth_date", "patient_sex", "cccd", "bhyt"}
        values = {k: v for k, v in values.items() if k in allowed}
        if "patient_name" in values:
            values["patient_name"] = nfc(values["patient_name"])
        with self.session() as session, session.begin():
            count = 0
            for order in self._of_patient(session, patient_id, issuer):
                changed = [k for k, v in values.items() if getattr(order, k) != v]
                if not changed:
                    continue
                for k in changed:
                    setattr(order, k, values[k])
                order.patient_name_key = search_key(order.patient_name)
                self._note(order, source, (detail or "patient updated") + ": " + ", ".join(changed))
                count += 1
        return count

    def merge_patient(self, survivor: tuple[str, str], merged: tuple[str, str], *, source: str) -> int:
        """Move the merged patient's orders to the surviving PatientID (ADT^A40). Returns orders moved."""
        with self.session() as session, session.begin():
            count = 0
            for order in self._of_patient(session, *merged):
                self._note(order, source, f"patient {merged[0]} merged into {survivor[0]}")
                order.patient_id, order.issuer_of_patient_id = survivor
                count += 1
        return count

    @staticmethod
    def _of_patient(session: Session, patient_id: str, issuer: str) -> list[Order]:
        """The patient's orders; orders placed without an issuer match any issuer."""
        return list(
            session.execute(
                select(Order).where(Order.patient_id == patient_id, Order.issuer_of_patient_id.in_({issuer, ""}))
            ).scalars()
        )


def _step(step: StepIn, index: int, accession: str) -> ProcedureStep:
    return ProcedureStep(
        sps_id=step.sps_id or f"{accession[-13:]}.{index}"[-16:],
        status=SCHEDULED,
        **{name: getattr(step, name) for name in _STEP_FIELDS},
    )
