"""Modality Performed Procedure Step SCP (PS3.4 Annex F): N-CREATE and N-SET, and the order follows.

N-CREATE (status IN PROGRESS) is checked against table F.7.2-1: a Type 1 attribute absent → 0x0120 Missing
Attribute, present but empty → 0x0121 Missing Attribute Value; a Type 2 attribute absent → 0x0120; a status other
than IN PROGRESS → 0x0106 Invalid Attribute Value; an instance already created → 0x0111 Duplicate SOP Instance.
The attributes are kept as DICOM JSON in `ris_mpps`. The orders named by the Scheduled Step Attributes Sequence
(AccessionNumber, else StudyInstanceUID; ScheduledProcedureStepID picks the steps) move to IN_PROGRESS. An MPPS
that names no known order and no accession number (the IHE "unscheduled" case) is accepted and kept unlinked;
one naming an accession number the RIS never issued is refused (0x0106).

N-SET: an unknown instance → 0x0112; a step already COMPLETED or DISCONTINUED → 0x0110 Processing Failure with
Error ID 0xA710 and the comment of table F.7.2-2; attributes N-SET may not change → 0x0105 No Such Attribute;
COMPLETED or DISCONTINUED without the final-state attributes (end date and time, at least one performed series with
its Series Instance UID) → 0x0120 / 0x0121. On COMPLETED the steps performed become COMPLETED, on DISCONTINUED they
become DISCONTINUED; once no step of an order is left to perform, the order becomes COMPLETED (if any step was
completed) or DISCONTINUED (Orders.advance / Orders.end, source "mpps").
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from worklist import status
from worklist.models import (
    COMPLETED,
    DISCONTINUED,
    ENDED,
    IN_PROGRESS,
    SCHEDULED,
    Order,
    PerformedStep,
    utcnow,
)
from worklist.orders import OrderError, Orders

log = logging.getLogger(__name__)

MODALITY_PERFORMED_PROCEDURE_STEP = "1.2.840.10008.3.1.2.3.3"
MPPS_IN_PROGRESS = "IN PROGRESS"
MPPS_COMPLETED = "COMPLETED"
MPPS_DISCONTINUED = "DISCONTINUED"
MPPS_STATUSES = (MPPS_IN_PROGRESS, MPPS_COMPLETED, MPPS_DISCONTINUED)

# PS3.4 table F.7.2-1, N-CREATE requirement types (SCU/SCP).
CREATE_TYPE1 = (
    "ScheduledStepAttributesSequence",
    "PerformedProcedureStepID",
    "PerformedStationAETitle",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "PerformedProcedureStepStatus",
    "Modality",
)
CREATE_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "ReferencedPatientSequence",
    "PerformedStationName",
    "PerformedLocation",
    "PerformedProcedureStepDescription",
    "PerformedProcedureTypeDescription",
    "ProcedureCodeSequence",
    "PerformedProcedureStepEndDate",
    "PerformedProcedureStepEndTime",
    "StudyID",
    "PerformedProtocolCodeSequence",
    "PerformedSeriesSequence",
)
SCHEDULED_STEP_TYPE1 = ("StudyInstanceUID",)
SCHEDULED_STEP_TYPE2 = (
    "ReferencedStudySequence",
    "AccessionNumber",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "ScheduledProcedureStepID",
    "ScheduledProcedureStepDescription",
    "ScheduledProtocolCodeSequence",
)
# "Not allowed" in N-SET.
SET_NOT_ALLOWED = (
    "ScheduledStepAttributesSequence",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientSex",
    "ReferencedPatientSequence",
    "AdmissionID",
    "IssuerOfAdmissionIDSequence",
    "ServiceEpisodeID",
    "IssuerOfServiceEpisodeIDSequence",
    "ServiceEpisodeDescription",
    "PerformedProcedureStepID",
    "PerformedStationAETitle",
    "PerformedStationName",
    "PerformedLocation",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "Modality",
    "StudyID",
)
FINAL_TYPE1 = ("PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime", "PerformedSeriesSequence")


class MppsError(Exception):
    """A request the SCP refuses: `code` is the DIMSE status, `comment` the Error Comment."""

    def __init__(self, code: int, comment: str, error_id: int | None = None) -> None:
        super().__init__(comment)
        self.code = code
        self.comment = comment
        self.error_id = error_id

    def status(self) -> Dataset:
        return status.failure(self.code, self.comment, self.error_id)


def _empty(value: Any) -> bool:
    return value is None or value == "" or (hasattr(value, "__len__") and len(value) == 0)


def _require(ds: Dataset, type1: tuple[str, ...], type2: tuple[str, ...], where: str = "") -> None:
    for keyword in type1:
        if keyword not in ds:
            raise MppsError(status.MISSING_ATTRIBUTE, f"{where}{keyword} missing")
        if _empty(ds[keyword].value):
            raise MppsError(status.MISSING_ATTRIBUTE_VALUE, f"{where}{keyword} is empty")
    for keyword in type2:
        if keyword not in ds:
            raise MppsError(status.MISSING_ATTRIBUTE, f"{where}{keyword} missing")


def check_create(ds: Dataset) -> None:
    """PS3.4 F.7.2.1: the N-CREATE attribute list, or MppsError."""
    _require(ds, CREATE_TYPE1, CREATE_TYPE2)
    for i, item in enumerate(ds.ScheduledStepAttributesSequence, 1):
        _require(item, SCHEDULED_STEP_TYPE1, SCHEDULED_STEP_TYPE2, f"ScheduledStepAttributesSequence[{i}] ")
    value = str(ds.PerformedProcedureStepStatus).strip().upper()
    if value != MPPS_IN_PROGRESS:
        raise MppsError(
            status.INVALID_ATTRIBUTE_VALUE, f"PerformedProcedureStepStatus must be IN PROGRESS, not {value}"
        )


def check_set(mods: Dataset, merged: Dataset) -> str:
    """PS3.4 F.7.2.2: the N-SET modification list; returns the new status."""
    refused = [keyword for keyword in SET_NOT_ALLOWED if keyword in mods]
    if refused:
        raise MppsError(status.NO_SUCH_ATTRIBUTE, f"N-SET may not change {', '.join(refused)}")
    value = str(merged.get("PerformedProcedureStepStatus", "") or "").strip().upper()
    if value not in MPPS_STATUSES:
        raise MppsError(status.INVALID_ATTRIBUTE_VALUE, f"PerformedProcedureStepStatus {value!r} is not valid")
    if value != MPPS_IN_PROGRESS:
        _require(merged, FINAL_TYPE1, ())
        for i, item in enumerate(merged.PerformedSeriesSequence, 1):
            _require(item, ("SeriesInstanceUID",), (), f"PerformedSeriesSequence[{i}] ")
    return value


@dataclass
class ScheduledRef:
    accession: str
    study_instance_uid: str
    sps_id: str


def scheduled_refs(ds: Dataset) -> list[ScheduledRef]:
    return [
        ScheduledRef(
            str(item.get("AccessionNumber", "") or "").strip(),
            str(item.get("StudyInstanceUID", "") or "").strip(),
            str(item.get("ScheduledProcedureStepID", "") or "").strip(),
        )
        for item in ds.get("ScheduledStepAttributesSequence") or []
    ]


@dataclass
class Performed:
    """The orders an MPPS performs, with the SPS IDs it names in each."""

    orders: dict[int, Order] = field(default_factory=dict)
    sps_ids: dict[int, set[str]] = field(default_factory=dict)


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


class PerformedProcedureSteps:
    """The MPPS N-CREATE / N-SET SCP; orders move through `Orders` (source "mpps")."""

    sop_class = MODALITY_PERFORMED_PROCEDURE_STEP

    def __init__(self, orders: Orders) -> None:
        self.orders = orders

    # ---- orders ---------------------------------------------------------------------------------------------

    def resolve(self, ds: Dataset) -> Performed:
        """The orders the Scheduled Step Attributes Sequence names: by AccessionNumber, else StudyInstanceUID."""
        found = Performed()
        for ref in scheduled_refs(ds):
            order = self.orders.find(accession=ref.accession) if ref.accession else None
            if order is None and ref.study_instance_uid:
                order = self.orders.find(study_instance_uid=ref.study_instance_uid)
            if order is None:
                continue
            found.orders[order.pk] = order
            ids = found.sps_ids.setdefault(order.pk, set())
            if ref.sps_id:
                ids.add(ref.sps_id)
        return found

    @staticmethod
    def _steps(order: Order, named: set[str], modality: str, statuses: tuple[str, ...]) -> list[str]:
        """The SPS IDs of `order` this MPPS performs: those it names, else those of its modality, else all;
        only steps whose status is in `statuses`."""
        steps = [s for s in order.steps if s.sps_id in named] or [s for s in order.steps if s.modality == modality]
        steps = steps or list(order.steps)
        return [s.sps_id for s in steps if s.status in statuses]

    def _started(self, performed: Performed, ds: Dataset, detail: str) -> None:
        modality = _text(ds, "Modality")
        for pk, order in performed.orders.items():
            try:
                if order.status in ENDED:
                    log.warning("MPPS for order %s, which is %s", order.accession_number, order.status)
                    continue
                sps = self._steps(order, performed.sps_ids[pk], modality, (SCHEDULED,))
                if sps:
                    self.orders.set_step_status(pk, sps, IN_PROGRESS)
                self.orders.advance(pk, IN_PROGRESS, source="mpps", detail=detail)
            except OrderError as exc:
                log.warning("order %s not moved to IN_PROGRESS: %s", order.accession_number, exc)

    def _ended(self, performed: Performed, ds: Dataset, mpps_status: str, detail: str) -> None:
        modality = _text(ds, "Modality")
        step_status = COMPLETED if mpps_status == MPPS_COMPLETED else DISCONTINUED
        for pk in performed.orders:
            try:
                order = self.orders.get(pk)
                if order.status in ENDED:
                    log.warning("MPPS %s for order %s, which is %s", mpps_status, order.accession_number, order.status)
                    continue
                sps = self._steps(order, performed.sps_ids[pk], modality, (SCHEDULED, IN_PROGRESS))
                if sps:
                    self.orders.set_step_status(pk, sps, step_status)
                order = self.orders.get(pk)
                if any(s.status in (SCHEDULED, IN_PROGRESS) for s in order.steps):
                    continue  # other steps of the order are still to be performed
                if any(s.status == COMPLETED for s in order.steps):
                    self.orders.advance(pk, COMPLETED, source="mpps", detail=detail)
                else:
                    reason = _discontinuation_reason(ds)
                    self.orders.end(
                        pk, DISCONTINUED, source="mpps", reason=f"{detail}{': ' + reason if reason else ''}"
                    )
            except OrderError as exc:
                log.warning("order %s not moved after MPPS %s: %s", pk, mpps_status, exc)

    # ---- N-CREATE -------------------------------------------------------------------------------------------

    def n_create(self, event: Any) -> tuple[Any, Dataset | None]:
        calling = status.calling_ae(event)
        uid = str(event.request.AffectedSOPInstanceUID or "").strip()
        reply: Dataset | None = None
        if not uid:
            uid = generate_uid()
            reply = Dataset()
            reply.AffectedSOPInstanceUID = uid
        try:
            ds = event.attribute_list
            check_create(ds)
            self._create(uid, ds, calling)
        except MppsError as exc:
            log.warning("MPPS N-CREATE %s from %s refused: %s", uid, calling, exc.comment)
            return exc.status(), None
        except SQLAlchemyError as exc:
            log.error("MPPS N-CREATE %s from %s failed, database unavailable: %s", uid, calling, exc)
            return MppsError(status.PROCESSING_FAILURE, "database unavailable, retry later").status(), None
        return status.SUCCESS, reply

    def _create(self, uid: str, ds: Dataset, calling: str) -> None:
        performed = self.resolve(ds)
        first = next(iter(performed.orders), None)
        if first is None:
            unknown = [r.accession for r in scheduled_refs(ds) if r.accession]
            if unknown:
                # An accession the RIS never issued is a typo at the console, not an unscheduled exam (which
                # carries no accession): refuse it so the technologist picks the worklist item instead.
                raise MppsError(status.INVALID_ATTRIBUTE_VALUE, f"unknown accession number {unknown[0]}")
        with self.orders.session() as session, session.begin():
            if session.execute(select(PerformedStep.pk).where(PerformedStep.sop_instance_uid == uid)).first():
                raise MppsError(status.DUPLICATE_SOP_INSTANCE, f"MPPS {uid} already exists")
            session.add(
                PerformedStep(
                    sop_instance_uid=uid,
                    order_pk=first,
                    status=MPPS_IN_PROGRESS,
                    calling_ae=calling[:16],
                    attributes=_to_json(ds),
                )
            )
            try:
                session.flush()
            except IntegrityError as exc:  # the same instance created concurrently
                raise MppsError(status.DUPLICATE_SOP_INSTANCE, f"MPPS {uid} already exists") from exc
        if not performed.orders:
            refs = ", ".join(r.accession or r.study_instance_uid for r in scheduled_refs(ds))
            log.info("MPPS %s from %s names no known order (%s): kept unscheduled", uid, calling, refs)
            return
        self._started(performed, ds, f"MPPS {uid} IN PROGRESS from {calling}")

    # ---- N-SET ----------------------------------------------------------------------------------------------

    def n_set(self, event: Any) -> tuple[Any, Dataset | None]:
        calling = status.calling_ae(event)
        uid = str(event.request.RequestedSOPInstanceUID or "").strip()
        try:
            mods = event.modification_list
            merged, new_status = self._set(uid, mods)
        except MppsError as exc:
            log.warning("MPPS N-SET %s from %s refused: %s", uid, calling, exc.comment)
            return exc.status(), None
        except SQLAlchemyError as exc:
            log.error("MPPS N-SET %s from %s failed, database unavailable: %s", uid, calling, exc)
            return MppsError(status.PROCESSING_FAILURE, "database unavailable, retry later").status(), None
        if new_status != MPPS_IN_PROGRESS:
            self._ended(self.resolve(merged), merged, new_status, f"MPPS {uid} {new_status} from {calling}")
        return status.SUCCESS, None

    def _set(self, uid: str, mods: Dataset) -> tuple[Dataset, str]:
        with self.orders.session() as session, session.begin():
            row = session.execute(
                select(PerformedStep).where(PerformedStep.sop_instance_uid == uid).with_for_update()
            ).scalar_one_or_none()
            if row is None:
                raise MppsError(status.NO_SUCH_SOP_INSTANCE, f"no MPPS {uid}")
            if row.status != MPPS_IN_PROGRESS:
                raise MppsError(
                    status.PROCESSING_FAILURE,
                    status.MPPS_MAY_NO_LONGER_BE_UPDATED_COMMENT,
                    status.MPPS_MAY_NO_LONGER_BE_UPDATED,
                )
            merged = Dataset.from_json(row.attributes)
            mods.decode()
            for elem in mods:
                if elem.keyword != "SpecificCharacterSet":
                    merged[elem.tag] = elem
            new_status = check_set(mods, merged)
            merged.PerformedProcedureStepStatus = new_status
            row.attributes = _to_json(merged)
            row.status = new_status
            row.updated_at = utcnow()
        return merged, new_status


def _discontinuation_reason(ds: Dataset) -> str:
    for item in ds.get("PerformedProcedureStepDiscontinuationReasonCodeSequence") or []:
        meaning = str(item.get("CodeMeaning", "") or "")
        if meaning:
            return meaning
    return ""


def _to_json(ds: Dataset) -> str:
    """DICOM JSON of the attributes, text decoded to Unicode (so the stored character set is ISO_IR 192)."""
    ds.decode()
    data = ds.to_json_dict()
    data["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
    return json.dumps(data, ensure_ascii=False)
