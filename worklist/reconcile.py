"""Reconciliation: stored studies linked to their orders, and the list of those that are not (or disagree).

A study is linked by the StudyInstanceUID the worklist gave, else by its AccessionNumber; the order then becomes
IMAGES_AVAILABLE. Linking runs in a background thread fed by the archive's ingest listener, so C-STORE never waits on
the RIS. Studies that match no order, or whose patient data disagree with their order's, are listed on demand and
can be corrected (attribute editing that writes corrected objects and keeps the originals, recorded with who/why).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, select
from sqlalchemy.orm import aliased

from storage.ingest import IngestResult
from storage.models import Patient, Study
from storage.text import search_key
from worklist.models import ENDED, Correction, Order
from worklist.orders import OrderError, Orders

log = logging.getLogger(__name__)


class Reconciler:
    """Links stored studies to orders in the background (an Archive listener plus a worker thread)."""

    RECHECK_SECONDS = 10.0  # a study with no order yet is looked at again at most this often
    REMEMBERED = 100_000  # studies remembered; past that the memory starts afresh

    def __init__(self, orders: Orders) -> None:
        self.orders = orders
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        # Study UID → when it was last looked at; math.inf once linked (never again).
        self._seen: dict[str, float] = {}
        self._thread: threading.Thread | None = None

    # Archive listener: called on the storing thread, must return at once.
    def notice(self, result: IngestResult) -> None:
        uid = result.study_instance_uid
        now = time.monotonic()
        if now - self._seen.get(uid, -math.inf) < self.RECHECK_SECONDS:
            return
        if len(self._seen) >= self.REMEMBERED:
            self._seen.clear()
        self._seen[uid] = now
        self._queue.put((uid, result.accession_number))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self.link(*item)
            except Exception:  # the database may be down; the next object of the study tries again
                log.exception("reconciling study %s failed", item[0])
                self._seen.pop(item[0], None)

    def link(self, study_uid: str, accession: str) -> Order | None:
        """Link `study_uid` to its order if there is one; returns the order."""
        order = self.orders.find(study_instance_uid=study_uid)
        if order is None and accession:
            order = self.orders.find(accession=accession)
        if order is None or order.status in ENDED:
            return None
        linked = self.orders.link_study(order.pk, study_uid, source="ingest")
        self._seen[study_uid] = math.inf
        return linked


@dataclass
class Problem:
    study_instance_uid: str
    accession_number: str
    study_date: str
    patient: dict[str, str]
    problem: str  # no-order | patient-mismatch
    order: dict[str, Any] | None
    differences: list[dict[str, str]]

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _differences(patient: Any, order: Order) -> list[dict[str, str]]:
    diffs = []
    pairs = [
        ("PatientID", patient.patient_id, order.patient_id),
        ("PatientName", patient.patient_name, order.patient_name),
        ("PatientBirthDate", patient.patient_birth_date, order.patient_birth_date),
        ("PatientSex", patient.patient_sex, order.patient_sex),
    ]
    for keyword, stored, ordered in pairs:
        if not stored or not ordered:
            continue
        same = search_key(stored) == search_key(ordered) if keyword == "PatientName" else stored == ordered
        if not same:
            diffs.append({"attribute": keyword, "study": stored, "order": ordered})
    return diffs


def unreconciled(orders: Orders, *, days: int = 30, limit: int = 100) -> list[Problem]:
    """Studies received in the last `days` that match no order, or whose patient data disagree with it."""
    since = dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
    by_uid = aliased(Order)
    by_accession = aliased(Order)
    stmt = (
        select(Study, Patient, by_uid, by_accession)
        .join(Patient, Study.patient_pk == Patient.pk)
        .outerjoin(by_uid, by_uid.study_instance_uid == Study.study_instance_uid)
        .outerjoin(
            by_accession,
            and_(Study.accession_number != "", by_accession.accession_number == Study.accession_number),
        )
        .where(Study.created_at >= since)
        .order_by(Study.created_at.desc())
    )
    problems: list[Problem] = []
    with orders.session() as session:
        for study, patient, order_uid, order_acc in session.execute(stmt):
            order = order_uid or order_acc
            patient_view = {
                "PatientID": patient.patient_id,
                "PatientName": patient.patient_name,
                "PatientBirthDate": patient.patient_birth_date,
                "PatientSex": patient.patient_sex,
            }
            if order is None:
                kind, diffs, order_view = "no-order", [], None
            else:
                diffs = _differences(patient, order)
                if not diffs:
                    continue
                kind = "patient-mismatch"
                order_view = {
                    "id": order.pk,
                    "accession_number": order.accession_number,
                    "status": order.status,
                    "PatientID": order.patient_id,
                    "PatientName": order.patient_name,
                }
            problems.append(
                Problem(
                    study.study_instance_uid,
                    study.accession_number,
                    study.study_date,
                    patient_view,
                    kind,
                    order_view,
                    diffs,
                )
            )
            if len(problems) >= limit:
                break
    return problems


def order_patient_changes(order: Order) -> dict[str, str]:
    """The attribute values that make a study agree with `order`."""
    changes = {
        "PatientID": order.patient_id,
        "IssuerOfPatientID": order.issuer_of_patient_id,
        "PatientName": order.patient_name,
        "AccessionNumber": order.accession_number,
    }
    if order.patient_birth_date:
        changes["PatientBirthDate"] = order.patient_birth_date
    if order.patient_sex:
        changes["PatientSex"] = order.patient_sex
    return changes


def record_correction(
    orders: Orders,
    study_uid: str,
    *,
    who: str,
    why: str,
    changes: dict[str, tuple[str, str]],
    originals: list[dict[str, str]],
    instances: int,
) -> Correction:
    if not why.strip():
        raise OrderError("a correction needs a reason")
    with orders.session() as session, session.begin():
        row = Correction(
            study_instance_uid=study_uid,
            who=who[:128],
            why=why.strip(),
            changes=json.dumps({k: list(v) for k, v in changes.items()}, ensure_ascii=False),
            originals=json.dumps(originals),
            instances=instances,
        )
        session.add(row)
    return row


def corrections(orders: Orders, study_uid: str) -> list[dict[str, Any]]:
    with orders.session() as session:
        rows = session.execute(
            select(Correction).where(Correction.study_instance_uid == study_uid).order_by(Correction.pk)
        ).scalars()
        return [
            {
                "id": r.pk,
                "at": r.at.isoformat() if r.at else "",
                "who": r.who,
                "why": r.why,
                "changes": json.loads(r.changes),
                "originals": json.loads(r.originals),
                "instances": r.instances,
            }
            for r in rows
        ]
