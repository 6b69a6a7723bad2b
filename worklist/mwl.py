"""Modality Worklist SCP (PS3.4 Annex K): C-FIND in the Modality Worklist Information Model over the RIS tables.

One answer per Scheduled Procedure Step that is SCHEDULED (or STARTED, when the query asks for that status) and
whose order is neither CANCELLED nor DISCONTINUED. Matching (PS3.4 C.2.2.2) goes through the query engine's
`condition()`: single values, `*`/`?` wildcards, lists, date and time ranges, accent- and case-insensitive patient
names. Items of the Scheduled Procedure Step Sequence match item by item.

Answers hold exactly the keys the request asked for (K.4.1.1.3.2: no others), every one of them present, empty
when the RIS does not know it; a zero-length sequence or an empty item returns the whole sequence. Text is UTF-8
with Specific Character Set ISO_IR 192 when any of it is not ASCII; calling AE titles listed as ASCII peers get
it without diacritics (đ/Đ → d/D) and without a Specific Character Set.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.valuerep import PersonName
from sqlalchemy import ColumnElement, Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from storage.query import Attr, QueryError, condition
from storage.text import search_key, to_ascii
from worklist import status
from worklist.identity import ISSUER_BHYT, ISSUER_CCCD, TYPE_BHYT, TYPE_CCCD
from worklist.models import ENDED, IN_PROGRESS, SCHEDULED, Order, ProcedureStep

log = logging.getLogger(__name__)

MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"
LOCAL_CODING_SCHEME = "99VNPACS"  # procedure codes placed without a coding scheme (a private designator, PS3.16)

# Scheduled Procedure Step Status (0040,0020) as the worklist says it, from the RIS step status.
_SPS_STATUS = {SCHEDULED: "SCHEDULED", IN_PROGRESS: "STARTED"}
_STEP_STATUS = {v: k for k, v in _SPS_STATUS.items()}
_TEXT_VRS = {"PN", "LO", "SH", "ST", "LT", "UT", "UC", "CS", "AE"}


def _attr(keyword: str, match: Any, column: Any, key_column: Any = None) -> Attr:
    return Attr(keyword, "STUDY", match, column, key_column)


# Matching keys inside the Scheduled Procedure Step Sequence item, and at the top level.
STEP_KEYS: dict[str, Attr] = {
    a.keyword: a
    for a in [
        _attr("Modality", "str", ProcedureStep.modality),
        _attr("ScheduledStationAETitle", "str", ProcedureStep.station_ae_title),
        _attr("ScheduledProcedureStepStartDate", "date", ProcedureStep.start_date),
        _attr("ScheduledProcedureStepStartTime", "time", ProcedureStep.start_time),
        _attr("ScheduledProcedureStepID", "str", ProcedureStep.sps_id),
        _attr("ScheduledStationName", "str", ProcedureStep.station_name),
        _attr("ScheduledProcedureStepLocation", "str", ProcedureStep.location),
    ]
}
ORDER_KEYS: dict[str, Attr] = {
    a.keyword: a
    for a in [
        _attr("PatientName", "key", Order.patient_name, Order.patient_name_key),
        _attr("PatientID", "str", Order.patient_id),
        _attr("IssuerOfPatientID", "str", Order.issuer_of_patient_id),
        _attr("PatientBirthDate", "date", Order.patient_birth_date),
        _attr("PatientSex", "str", Order.patient_sex),
        _attr("AccessionNumber", "str", Order.accession_number),
        _attr("RequestedProcedureID", "str", Order.requested_procedure_id),
        _attr("StudyInstanceUID", "uid", Order.study_instance_uid),
        _attr("AdmissionID", "str", Order.episode_id),
        _attr("RequestedProcedurePriority", "str", Order.priority),
        _attr("PlacerOrderNumberImagingServiceRequest", "str", Order.placer_order_number),
        _attr("FillerOrderNumberImagingServiceRequest", "str", Order.filler_order_number),
    ]
}
# Person names the RIS keeps without a search-key column: matched on the search key in Python, after the query.
STEP_NAMES = {"ScheduledPerformingPhysicianName": "performing_physician_name"}
ORDER_NAMES = {"ReferringPhysicianName": "referring_physician_name", "RequestingPhysician": "referring_physician_name"}


class WorklistQuery:
    """A parsed C-FIND identifier: SQL conditions, name filters applied in Python, keys nobody matches on."""

    def __init__(self, identifier: Dataset) -> None:
        self.conditions: list[ColumnElement[bool]] = []
        self.step_names: dict[str, str] = {}
        self.order_names: dict[str, str] = {}
        self.step_statuses = [SCHEDULED]
        self.unsupported: list[str] = []
        for elem in identifier:
            keyword = elem.keyword
            if keyword == "ScheduledProcedureStepSequence":
                items = elem.value or []
                for sub in items[0] if items else []:
                    self._key(sub, STEP_KEYS, STEP_NAMES, self.step_names)
                continue
            if keyword in ("SpecificCharacterSet", "TimezoneOffsetFromUTC"):
                continue
            self._key(elem, ORDER_KEYS, ORDER_NAMES, self.order_names)

    def _key(self, elem: DataElement, attrs: dict[str, Attr], names: dict[str, str], found: dict[str, str]) -> None:
        keyword = elem.keyword
        if elem.VR == "SQ":
            if any(_text(sub) for item in elem.value or [] for sub in item):
                self.unsupported.append(keyword)  # sequence matching on return-only sequences: not supported
            return
        value = _text(elem)
        if keyword == "ScheduledProcedureStepStatus":
            wanted = [v.strip().upper() for v in value.split("\\") if v.strip()]
            if wanted:
                self.step_statuses = [_STEP_STATUS[v] for v in wanted if v in _STEP_STATUS]
            return
        if keyword in attrs:
            cond = condition(attrs[keyword], value)
            if cond is not None:
                self.conditions.append(cond)
        elif keyword in names:
            if value.strip() not in ("", "*"):
                found[names[keyword]] = value
        elif value.strip() not in ("", "*"):
            self.unsupported.append(keyword or str(elem.tag))

    def accepts(self, order: Order, step: ProcedureStep) -> bool:
        return all(_name_matches(getattr(step, column), value) for column, value in self.step_names.items()) and all(
            _name_matches(getattr(order, column), value) for column, value in self.order_names.items()
        )


def _text(elem: DataElement) -> str:
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _name_matches(stored: str, wanted: str) -> bool:
    """Person-name matching on search keys (case- and accent-insensitive), with * and ? wildcards and lists."""
    have = search_key(stored or "")
    for alternative in wanted.split("\\"):
        key = search_key(alternative)
        if key in ("", "*"):
            return True
        pattern = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in key)
        if re.fullmatch(pattern, have, flags=re.DOTALL):
            return True
    return False


# ---- the full worklist item -----------------------------------------------------------------------------------


def _codes(order: Order) -> Sequence:
    if not order.procedure_code:
        return Sequence()
    item = Dataset()
    item.CodeValue = order.procedure_code
    item.CodingSchemeDesignator = order.procedure_code_scheme or LOCAL_CODING_SCHEME
    item.CodeMeaning = order.procedure_description or order.procedure_code
    return Sequence([item])


def _other_ids(order: Order) -> Sequence:
    items = []
    for value, issuer, type_code in ((order.cccd, ISSUER_CCCD, TYPE_CCCD), (order.bhyt, ISSUER_BHYT, TYPE_BHYT)):
        if not value:
            continue
        item = Dataset()
        item.PatientID = value
        item.IssuerOfPatientID = issuer
        item.TypeOfPatientID = "TEXT"
        qualifiers = Dataset()
        qualifiers.IdentifierTypeCode = type_code
        item.IssuerOfPatientIDQualifiersSequence = Sequence([qualifiers])
        items.append(item)
    return Sequence(items)


def _placed_at(order: Order) -> dt.datetime:
    at = order.created_at or dt.datetime.now(dt.UTC)
    if at.tzinfo is None:  # SQLite gives back naive UTC
        at = at.replace(tzinfo=dt.UTC)
    return at.astimezone()


def worklist_item(order: Order, step: ProcedureStep) -> Dataset:
    """Every attribute the RIS can answer for one scheduled procedure step (Type 1 and 2 keys of table K.6-1
    always present; unknown ones empty). A step placed without a start date or time gets the order's placement
    time, Type 1 asks for a value."""
    sps = Dataset()
    sps.ScheduledStationAETitle = step.station_ae_title
    sps.ScheduledProcedureStepStartDate = step.start_date or f"{_placed_at(order):%Y%m%d}"
    sps.ScheduledProcedureStepStartTime = step.start_time or f"{_placed_at(order):%H%M%S}"
    sps.Modality = step.modality
    sps.ScheduledPerformingPhysicianName = step.performing_physician_name
    sps.ScheduledProcedureStepDescription = step.description or order.procedure_description
    sps.ScheduledStationName = step.station_name
    sps.ScheduledProcedureStepLocation = step.location
    sps.ScheduledProtocolCodeSequence = _codes(order)
    sps.PreMedication = ""
    sps.ScheduledProcedureStepID = step.sps_id
    sps.RequestedContrastAgent = ""
    sps.ScheduledProcedureStepStatus = _SPS_STATUS.get(step.status, step.status)

    ds = Dataset()
    ds.ScheduledProcedureStepSequence = Sequence([sps])
    # Requested Procedure
    ds.RequestedProcedureID = order.requested_procedure_id
    ds.RequestedProcedureDescription = order.procedure_description
    ds.RequestedProcedureCodeSequence = _codes(order)
    ds.StudyInstanceUID = order.study_instance_uid
    ds.ReferencedStudySequence = Sequence()
    ds.RequestedProcedurePriority = order.priority
    ds.PatientTransportArrangements = ""
    ds.ReasonForTheRequestedProcedure = order.reason_for_study[:64]
    # Imaging Service Request
    ds.AccessionNumber = order.accession_number
    ds.RequestingPhysician = order.referring_physician_name
    ds.ReferringPhysicianName = order.referring_physician_name
    ds.PlacerOrderNumberImagingServiceRequest = order.placer_order_number or ""
    ds.FillerOrderNumberImagingServiceRequest = order.filler_order_number
    # Visit: the episode (MA_LK) is the Admission ID
    ds.AdmissionID = order.episode_id
    ds.CurrentPatientLocation = ""
    ds.ReferencedPatientSequence = Sequence()
    # Patient
    ds.PatientName = order.patient_name
    ds.PatientID = order.patient_id
    ds.IssuerOfPatientID = order.issuer_of_patient_id
    ds.OtherPatientIDsSequence = _other_ids(order)
    ds.PatientBirthDate = order.patient_birth_date
    ds.PatientSex = order.patient_sex
    ds.PatientWeight = None
    ds.ConfidentialityConstraintOnPatientDataDescription = ""
    ds.PatientState = ""
    ds.PregnancyStatus = None
    ds.MedicalAlerts = ""
    ds.Allergies = ""
    ds.SpecialNeeds = ""
    return ds


def select_keys(full: Dataset, request: Dataset) -> Dataset:
    """The attributes of `full` the request asked for, each present (empty when `full` lacks it); sequence keys
    with an item return their items with the item's keys only, an empty sequence or item returns it whole."""
    out = Dataset()
    for elem in request:
        if elem.keyword == "SpecificCharacterSet" or elem.tag.element == 0:
            continue
        have = full.get(elem.tag)
        if have is None:
            out.add(DataElement(elem.tag, elem.VR, Sequence() if elem.VR == "SQ" else None))
            continue
        wanted = elem.value if elem.VR == "SQ" else None
        if have.VR == "SQ" and wanted and len(wanted[0]) > 0:
            out.add(DataElement(elem.tag, "SQ", Sequence([select_keys(item, wanted[0]) for item in have.value])))
        else:
            out.add(copy.deepcopy(have))
    return out


def _walk_text(ds: Dataset) -> Iterator[DataElement]:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or []:
                yield from _walk_text(item)
        elif elem.VR in _TEXT_VRS and elem.value not in (None, ""):
            yield elem


def _values(elem: DataElement) -> list[Any]:
    return list(elem.value) if isinstance(elem.value, MultiValue | list) else [elem.value]


def needs_utf8(ds: Dataset) -> bool:
    return any(not str(v).isascii() for elem in _walk_text(ds) for v in _values(elem))


def to_ascii_dataset(ds: Dataset) -> None:
    """Rewrite every text value in ASCII (diacritics removed, đ/Đ → d/D), in place."""
    for elem in _walk_text(ds):
        values = [to_ascii(str(v)) for v in _values(elem)]
        if elem.VR == "PN":
            elem.value = [PersonName(v) for v in values] if len(values) > 1 else PersonName(values[0])
        else:
            elem.value = values if len(values) > 1 else values[0]


def answer(full: Dataset, request: Dataset, *, ascii_only: bool) -> Dataset:
    rsp = select_keys(full, request)
    if ascii_only:
        to_ascii_dataset(rsp)
    elif needs_utf8(rsp):
        rsp.SpecificCharacterSet = "ISO_IR 192"
    return rsp


# ---- the SCP ---------------------------------------------------------------------------------------------------


class ModalityWorklist:
    """The Modality Worklist C-FIND SCP over the RIS tables."""

    sop_class = MODALITY_WORKLIST_FIND

    def __init__(self, engine: Engine, *, ascii_aes: Iterable[str] = ()) -> None:
        self.engine = engine
        self.ascii_aes = {aet.strip() for aet in ascii_aes if aet.strip()}

    def matches(self, query: WorklistQuery) -> list[tuple[Order, ProcedureStep]]:
        stmt = (
            select(ProcedureStep, Order)
            .join(Order, ProcedureStep.order_pk == Order.pk)
            .where(Order.status.not_in(ENDED), ProcedureStep.status.in_(query.step_statuses), *query.conditions)
            .order_by(ProcedureStep.start_date, ProcedureStep.start_time, ProcedureStep.pk)
        )
        with Session(self.engine, expire_on_commit=False) as session:
            rows = session.execute(stmt).all()
            session.expunge_all()
        return [(order, step) for step, order in rows if query.accepts(order, step)]

    def find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        """pynetdicom C-FIND handler: pending answers, then success (or the failure status)."""
        calling = status.calling_ae(event)
        try:
            request = event.identifier
            query = WorklistQuery(request)
            rows = self.matches(query)
        except (QueryError, ValueError, TypeError) as exc:
            log.warning("worklist query from %s refused: %s", calling, exc)
            yield (
                status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                status.failure(status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc)),
            )
            return
        except SQLAlchemyError as exc:
            log.error("worklist query from %s failed, database unavailable: %s", calling, exc)
            yield status.OUT_OF_RESOURCES, status.failure(status.OUT_OF_RESOURCES, "database unavailable")
            return
        pending = status.PENDING_WARNING if query.unsupported else status.PENDING
        ascii_only = calling in self.ascii_aes
        log.info("worklist query from %s: %d item(s)", calling, len(rows))
        for order, step in rows:
            if event.is_cancelled:
                yield status.CANCEL, None
                return
            yield pending, answer(worklist_item(order, step), request, ascii_only=ascii_only)
        yield status.SUCCESS, None
