"""HL7 v2 from the HIS over MLLP: orders (ORM^O01, OMI^O23, OMG^O19), demographics updates (ADT^A08), merges
(ADT^A40).

Versions 2.3 to 2.8. Fields are mapped the way the IHE Radiology Technical Framework maps them for order placement,
scheduling and patient update (RAD-2, RAD-4, RAD-12, RAD-13); the table is in README ("HIS integration"). Every
message is answered with an original-mode ACK: AA when it was applied (or had already been), AE when it could not be
(invalid CCCD, unknown order, a change the order's state forbids, a missing field) and AR when it is not a message we
take (unsupported type or version, unparseable, unknown character set), with the reason in MSA-3 and an ERR segment.

Messages are decoded by MSH-18 (UTF-8 when empty) and applied one at a time, in arrival order, through `Orders`
(idempotent on the placer order number, then the accession number) and, for ADT, the index of stored studies.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import hl7
from hl7.mllp.streams import CARRIAGE_RETURN, END_BLOCK, START_BLOCK, MLLPStreamReader
from sqlalchemy import Engine

from storage import patients as index_patients
from worklist.identity import (
    ISSUER_BHYT,
    ISSUER_CCCD,
    TYPE_BHYT,
    TYPE_CCCD,
    TYPE_HOSPITAL,
    IdentifierError,
    validate_bhyt,
    validate_cccd,
)
from worklist.intake import overlay
from worklist.models import CANCELLED, DISCONTINUED
from worklist.orders import OrderConflict, OrderError, OrderNotFound, Orders

log = logging.getLogger(__name__)

VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2")
MESSAGES = (("ORM", "O01"), ("OMI", "O23"), ("OMG", "O19"), ("ADT", "A08"), ("ADT", "A40"))
ORDER_CONTROLS = {"NW": "new", "XO": "change", "SC": "change", "CA": "cancel", "DC": "discontinue"}
# HL7 table 0211 (MSH-18) → Python codec. Empty means the default, UTF-8 (what Vietnamese HIS send).
CHARSETS = {
    "": "utf-8",
    "ASCII": "utf-8",  # a superset: a mislabelled UTF-8 message still decodes
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    **{f"8859/{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)},
}
# HL7 table 0357, the codes this listener answers with.
ERRORS = {
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "207": "Application internal error",
}
# Priority (TQ1-9, OBR-27.6, ORC-7.6; HL7 table 0027) → DICOM Requested Procedure Priority.
PRIORITIES = {"S": "STAT", "A": "HIGH", "P": "HIGH", "T": "HIGH", "R": "ROUTINE", "C": "ROUTINE"}
# Administrative sex (PID-8; HL7 table 0001) → DICOM PatientSex.
SEXES = {"M": "M", "F": "F", "O": "O", "A": "O", "U": "", "N": "", "": ""}
HOSPITAL_ID_TYPES = (TYPE_HOSPITAL, "MR", "PT", "")  # PID-3 repetitions taken as PatientID, in this order
NULL = '""'  # HL7's explicit null: clear the value


class Nack(Exception):
    """A message we answer with AE or AR; `error` is an HL7 table 0357 code, `where` (segment, field) the culprit."""

    def __init__(self, code: str, text: str, error: str = "207", where: tuple[str, int] = ("", 0)) -> None:
        super().__init__(text)
        self.code, self.text, self.error, self.where = code, text, error, where


# ---- reading fields -----------------------------------------------------------------------------------------


def get(seg: hl7.Segment | None, f: int, c: int = 1, s: int = 1, r: int = 1) -> str:
    """SEG-f.c.s of repetition r, unescaped and stripped; "" when absent."""
    if seg is None:
        return ""
    try:
        return str(seg.extract_field(1, f, r, c, s)).strip()
    except (IndexError, KeyError):
        return ""


def repetitions(seg: hl7.Segment | None, f: int) -> int:
    if seg is None or f >= len(seg):
        return 0
    value = seg(f)
    if len(value) and isinstance(value[0], hl7.Repetition):
        return len(value)
    return 1 if str(value) else 0


def first(*values: str) -> str:
    return next((v for v in values if v), "")


def person_name(family: str, given: str, middle: str = "", suffix: str = "", prefix: str = "") -> str:
    """HL7 name parts → DICOM PN (family^given^middle^prefix^suffix), trailing empty components dropped."""
    if family == NULL:
        return NULL
    return "^".join((family, given, middle, prefix, suffix)).rstrip("^")


def xpn(seg: hl7.Segment | None, f: int) -> str:
    """An XPN field (PID-5): the legal name (type L) when several are sent, else the first."""
    chosen = 1
    for r in range(1, repetitions(seg, f) + 1):
        if get(seg, f, 7, r=r).upper() == "L":
            chosen = r
            break
    return person_name(*(get(seg, f, c, r=chosen) for c in (1, 2, 3, 4, 5)))


def xcn(seg: hl7.Segment | None, f: int) -> str:
    """An XCN field (PV1-8, OBR-16, ORC-12): ID^family^given^middle^suffix^prefix."""
    return person_name(*(get(seg, f, c) for c in (2, 3, 4, 5, 6)))


def cnn(seg: hl7.Segment | None, f: int) -> str:
    """An NDL field (OBR-34 technician): its first component is a CNN, ID&family&given&middle&suffix&prefix."""
    return person_name(*(get(seg, f, 1, s) for s in (2, 3, 4, 5, 6)))


def timestamp(value: str, where: tuple[str, int]) -> tuple[str, str]:
    """A TS/DTM value → (YYYYMMDD, HHMM[SS]); the time zone is dropped (the hospital's local time is meant)."""
    if not value or value == NULL:
        return "", ""
    digits = value.split("+")[0]
    if len(digits) > 8 and "-" in digits[8:]:
        digits = digits[:8] + digits[8:].split("-")[0]
    date, time = digits[:8], digits[8:].split(".")[0]
    try:
        if len(date) != 8 or not date.isdigit():
            raise ValueError(value)
        dt.datetime.strptime(date, "%Y%m%d")
        if time and (not time.isdigit() or len(time) not in (2, 4, 6)):
            raise ValueError(value)
    except ValueError as exc:
        raise Nack("AE", f"{where[0]}-{where[1]} is not a date/time: {value!r}", "102", where) from exc
    return date, time


def birth_date(value: str) -> str:
    """PID-7 → YYYYMMDD; a year or year-month only (elderly patients) is not a DICOM date and is left out."""
    if value == NULL:
        return ""
    digits = value.split("+")[0].split("-")[0]
    if len(digits) in (4, 6) and digits.isdigit():
        return ""
    return timestamp(value, ("PID", 7))[0]


def escape_delimiters(text: str) -> str:
    """HL7 escape sequences for the delimiters (v2.5 2.7): \\E\\ \\F\\ \\S\\ \\T\\ \\R\\."""
    for char, seq in (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        text = text.replace(char, seq)
    return text


def _escape(text: str) -> str:
    return escape_delimiters(" ".join(text.split()))


# ---- the patient ----------------------------------------------------------------------------------------------


@dataclass
class PatientIds:
    patient_id: str
    issuer: str
    cccd: str = ""
    bhyt: str = ""


def identifiers(seg: hl7.Segment | None, f: int, what: str) -> PatientIds:
    """A CX list (PID-3, MRG-1) by identifier type code: PI (else MR, PT, untyped) → PatientID with the assigning
    authority as issuer; NI → CCCD; SB → BHYT card number."""
    found: dict[str, tuple[str, str]] = {}
    for r in range(1, repetitions(seg, f) + 1):
        value = get(seg, f, 1, r=r)
        if not value:
            continue
        kind = get(seg, f, 5, r=r).upper()
        issuer = first(get(seg, f, 4, 1, r=r), get(seg, f, 4, 2, r=r))
        found.setdefault(kind, (value, issuer))
    hospital = next((found[k] for k in HOSPITAL_ID_TYPES if k in found), None)
    if hospital is None:
        name = seg[0][0] if seg is not None else what
        raise Nack("AE", f"{name}-{f} has no hospital patient ID (identifier type PI)", "101", (str(name), f))
    return PatientIds(
        hospital[0],
        hospital[1],
        found.get(TYPE_CCCD, ("", ""))[0],
        found.get(TYPE_BHYT, ("", ""))[0],
    )


def demographics(pid: hl7.Segment) -> dict[str, str]:
    """Order fields from PID that the message carries (an empty field is "not sent"; `""` clears)."""
    values: dict[str, str] = {}
    name = xpn(pid, 5)
    if name:
        values["patient_name"] = "" if name == NULL else name
    born = get(pid, 7)
    if born:
        values["patient_birth_date"] = birth_date(born)
    sex = get(pid, 8).upper()
    if sex:
        if sex != NULL and sex not in SEXES:
            raise Nack("AE", f"PID-8 sex {sex!r} is not in HL7 table 0001", "103", ("PID", 8))
        values["patient_sex"] = SEXES.get(sex, "")
    return values


# ---- the intake -----------------------------------------------------------------------------------------------


@dataclass
class _OrderGroup:
    orc: hl7.Segment
    obr: hl7.Segment | None = None
    tq1: hl7.Segment | None = None
    zds: hl7.Segment | None = None
    ipcs: list[hl7.Segment] = field(default_factory=list)


def _where_in_order(message: str) -> tuple[str, tuple[str, int]]:
    """An OrderError's message → (HL7 error code, the field it is about), for the ERR segment."""
    text = message.lower()
    for words, where in (
        (("cccd", "bhyt", "patient id"), ("PID", 3)),
        (("patient name",), ("PID", 5)),
        (("birth",), ("PID", 7)),
        (("sex",), ("PID", 8)),
        (("accession",), ("OBR", 18)),
        (("placer order",), ("ORC", 2)),
        (("priority",), ("TQ1", 9)),
        (("station ae",), ("IPC", 9)),
        (("start",), ("TQ1", 7)),
        (("study instance uid",), ("IPC", 3)),
        (("procedure step", "modality"), ("OBR", 24)),
    ):
        if any(w in text for w in words):
            return ("101" if " no " in f" {text}" else "102"), where
    return "207", ("", 0)


class Hl7Intake:
    """Turns one HL7 v2 message (bytes, without MLLP framing) into its ACK (bytes), applying it on the way."""

    def __init__(self, orders: Orders, engine: Engine, *, application: str = "VNPACS") -> None:
        self.orders = orders
        self.engine = engine
        self.application = application

    # ---- entry ----

    def handle(self, raw: bytes) -> bytes:
        raw = raw.lstrip(b"\xef\xbb\xbf \t\r\n")
        label, encoding, msg = "", "utf-8", None
        try:
            label = charset_label(raw)
            if label not in CHARSETS:
                raise Nack("AR", f"character set {label!r} (MSH-18) is not supported", "103", ("MSH", 18))
            encoding = CHARSETS[label]
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as exc:
                raise Nack(
                    "AR", f"the message is not valid {label or 'UTF-8'} (byte {exc.start})", "102", ("MSH", 18)
                ) from exc
            text = text.replace("\r\n", "\r").replace("\n", "\r")
            try:
                msg = hl7.parse(text)
                msg.segment("MSH")
            except Exception as exc:
                raise Nack("AR", f"the message cannot be parsed: {exc}", "100", ("MSH", 0)) from exc
            summary = self.apply(msg)
            code, detail, error, where = "AA", summary, "", ("", 0)
        except Nack as nack:
            code, detail, error, where = nack.code, nack.text, nack.error, nack.where
        except Exception as exc:  # the database is down...: AE, the HIS sends the message again later
            log.exception("HL7 message failed")
            code, detail, error, where = "AE", f"application error: {exc.__class__.__name__}", "207", ("", 0)
        log.info("HL7 %s: %s %s", describe(msg), code, detail)
        return self.ack(msg, code, detail, error, where, label).encode(encoding, "replace")

    def apply(self, msg: hl7.Message) -> str:
        msh = msg.segment("MSH")
        kind, event, version = get(msh, 9, 1).upper(), get(msh, 9, 2).upper(), get(msh, 12, 1)
        if version not in VERSIONS:
            raise Nack("AR", f"HL7 version {version!r} is not supported ({VERSIONS[0]} to 2.8)", "203", ("MSH", 12))
        if (kind, event) not in MESSAGES:
            known = kind in {k for k, _ in MESSAGES}
            raise Nack(
                "AR",
                f"message type {kind}^{event} is not supported (ORM^O01, OMI^O23, OMG^O19, ADT^A08, ADT^A40)",
                "201" if known else "200",
                ("MSH", 9),
            )
        if kind in ("ORM", "OMI", "OMG"):
            return self.order_message(msg)
        if event == "A08":
            return self.update_patient(msg)
        return self.merge_patients(msg)

    # ---- orders ----

    def order_message(self, msg: hl7.Message) -> str:
        pid = _one(msg, "PID")
        pv1 = _one(msg, "PV1", required=False)
        groups: list[_OrderGroup] = []
        for seg in msg:
            sid = str(seg[0][0])
            if sid == "ORC":
                groups.append(_OrderGroup(seg))
            elif sid in ("OBR", "TQ1", "ZDS", "IPC"):
                if not groups:
                    raise Nack("AE", f"{sid} before any ORC segment", "100", (sid, 0))
                group = groups[-1]
                if sid == "IPC":
                    group.ipcs.append(seg)
                elif getattr(group, sid.lower()) is None:
                    setattr(group, sid.lower(), seg)
        if not groups:
            raise Nack("AE", "the message has no ORC segment", "100", ("ORC", 0))
        return "; ".join(self.order_group(pid, pv1, group) for group in groups)

    def order_group(self, pid: hl7.Segment, pv1: hl7.Segment | None, g: _OrderGroup) -> str:
        control = get(g.orc, 1).upper()
        if control not in ORDER_CONTROLS:
            raise Nack(
                "AE",
                f"order control {control!r} is not supported ({', '.join(ORDER_CONTROLS)})",
                "103",
                ("ORC", 1),
            )
        ipc = g.ipcs[0] if g.ipcs else None
        placer = first(get(g.orc, 2), get(g.obr, 2))
        accession = first(get(ipc, 1), get(g.obr, 18))
        if not placer and not accession:
            raise Nack("AE", "the order has no placer order number (ORC-2) nor accession (OBR-18)", "101", ("ORC", 2))
        existing = self.orders.find(placer=placer, accession=accession)
        who = f"placer order number {placer}" if placer else f"accession {accession}"
        if control in ("CA", "DC"):
            if existing is None:
                raise Nack("AE", f"no order with {who} to {ORDER_CONTROLS[control]}", "204", ("ORC", 2))
            status = CANCELLED if control == "CA" else DISCONTINUED
            reason = first(get(g.orc, 16, 2), get(g.orc, 16, 1))
            try:
                self.orders.end(existing.pk, status, source="hl7", reason=reason)
            except OrderNotFound as exc:
                raise Nack("AE", str(exc), "204", ("ORC", 2)) from exc
            except OrderConflict as exc:
                raise Nack("AE", str(exc), "207", ("ORC", 1)) from exc
            return f"order {existing.accession_number} {status}"
        if existing is None and control != "NW":
            raise Nack("AE", f"no order with {who} to change", "204", ("ORC", 2))
        values, steps = self.order_values(pid, pv1, g)
        try:
            data = overlay(existing, values, steps)
            order, created = self.orders.place(data, source="hl7")
        except OrderConflict as exc:
            raise Nack("AE", str(exc), "207", ("ORC", 1)) from exc
        except OrderError as exc:
            error, where = _where_in_order(str(exc))
            raise Nack("AE", str(exc), error, where) from exc
        if created:
            done = "placed"
        else:
            done = "updated" if existing is None or len(order.events) > len(existing.events) else "unchanged"
        return f"order {order.accession_number} {done}"

    def order_values(
        self, pid: hl7.Segment, pv1: hl7.Segment | None, g: _OrderGroup
    ) -> tuple[dict[str, str], list[dict[str, str]] | None]:
        """Order fields and steps the message carries (IHE RAD-2/RAD-4 mapping)."""
        ids = identifiers(pid, 3, "PID")
        obr, ipc = g.obr, g.ipcs[0] if g.ipcs else None
        values: dict[str, str] = {
            "patient_id": ids.patient_id,
            "issuer_of_patient_id": ids.issuer,
            **demographics(pid),
        }
        carried = {
            "cccd": ids.cccd,
            "bhyt": ids.bhyt,
            "placer_order_number": first(get(g.orc, 2), get(obr, 2)),
            "filler_order_number": first(get(g.orc, 3), get(obr, 3)),
            "accession_number": first(get(ipc, 1), get(obr, 18)),
            "episode_id": get(pv1, 19),
            "procedure_code": first(get(obr, 4, 1), get(obr, 44, 1)),
            "procedure_description": first(get(obr, 4, 2), get(obr, 44, 2)),
            "procedure_code_scheme": first(get(obr, 4, 3), get(obr, 44, 3))
            if get(obr, 4, 1) or get(obr, 44, 1)
            else "",
            "requested_procedure_id": first(get(ipc, 2), get(obr, 19)),
            "referring_physician_name": first(xcn(pv1, 8), xcn(obr, 16), xcn(g.orc, 12)),
            "reason_for_study": "; ".join(
                first(get(obr, 31, 2, r=r), get(obr, 31, 1, r=r)) for r in range(1, repetitions(obr, 31) + 1)
            ).strip("; "),
            "study_instance_uid": first(get(ipc, 3), get(g.zds, 1)),
        }
        priority = first(get(g.tq1, 9), get(obr, 27, 6), get(g.orc, 7, 6), get(obr, 5)).upper()
        if priority:
            carried["priority"] = PRIORITIES.get(priority, priority)
        for name, value in carried.items():
            if value:
                values[name] = "" if value == NULL else value
        start = first(get(g.tq1, 7), get(obr, 27, 4), get(g.orc, 7, 4), get(obr, 36))
        where = ("TQ1", 7) if get(g.tq1, 7) else ("OBR", 27)
        date, time = timestamp(start, where)
        common = {
            "start_date": date,
            "start_time": time,
            "performing_physician_name": cnn(obr, 34),
            "description": first(get(obr, 4, 2), get(obr, 44, 2)),
        }
        modality = get(obr, 24)
        steps: list[dict[str, str]] | None = None
        if g.ipcs:
            steps = []
            for seg in g.ipcs:
                step = {
                    **common,
                    "modality": first(get(seg, 5, 1), modality),
                    "sps_id": first(get(seg, 4), get(obr, 20)),
                    "station_name": get(seg, 7),
                    "location": get(seg, 8),
                    "station_ae_title": get(seg, 9),
                }
                steps.append({k: v for k, v in step.items() if v})
        elif modality or get(obr, 20) or date:
            step = {**common, "modality": modality, "sps_id": get(obr, 20)}
            steps = [{k: v for k, v in step.items() if v}]
        return values, steps

    # ---- patients ----

    def patient_update(self, pid: hl7.Segment) -> tuple[PatientIds, dict[str, str]]:
        """PatientID, issuer and the validated demographics a PID carries (for ADT)."""
        ids = identifiers(pid, 3, "PID")
        values = demographics(pid)
        try:
            if ids.cccd:
                values["cccd"] = validate_cccd(
                    ids.cccd, birth_date=values.get("patient_birth_date", ""), sex=values.get("patient_sex", "")
                )
            if ids.bhyt:
                values["bhyt"] = validate_bhyt(ids.bhyt)
        except IdentifierError as exc:
            raise Nack("AE", str(exc), "102", ("PID", 3)) from exc
        if values.get("patient_name") == "":
            raise Nack("AE", "PID-5 cannot clear the patient's name", "101", ("PID", 5))
        return ids, values

    def carry_to_index(self, ids: PatientIds, values: Mapping[str, str]) -> int:
        other = [
            (values[k], issuer, "TEXT") for k, issuer in (("cccd", ISSUER_CCCD), ("bhyt", ISSUER_BHYT)) if k in values
        ]
        return index_patients.update_patient(
            self.engine,
            ids.patient_id,
            ids.issuer,
            name=values.get("patient_name"),
            birth_date=values.get("patient_birth_date"),
            sex=values.get("patient_sex"),
            identifiers=other,
        )

    def update_patient(self, msg: hl7.Message) -> str:
        ids, values = self.patient_update(_one(msg, "PID"))
        orders = self.orders.update_patient(ids.patient_id, ids.issuer, values, source="hl7", detail="ADT^A08")
        stored = self.carry_to_index(ids, values)
        return f"patient {ids.patient_id}: {orders} order(s) and {stored} stored patient record(s) updated"

    def merge_patients(self, msg: hl7.Message) -> str:
        pairs: list[tuple[hl7.Segment, hl7.Segment]] = []
        pid = None
        for seg in msg:
            sid = str(seg[0][0])
            if sid == "PID":
                pid = seg
            elif sid == "MRG":
                if pid is None:
                    raise Nack("AE", "MRG before any PID segment", "100", ("MRG", 0))
                pairs.append((pid, seg))
        if not pairs:
            raise Nack("AE", "ADT^A40 needs a PID and an MRG segment", "100", ("MRG", 0))
        done = []
        for pid, mrg in pairs:
            survivor, values = self.patient_update(pid)
            merged = identifiers(mrg, 1, "MRG")
            if (merged.patient_id, merged.issuer) == (survivor.patient_id, survivor.issuer):
                raise Nack("AE", f"MRG-1 names the surviving patient {survivor.patient_id} itself", "102", ("MRG", 1))
            keys = ((survivor.patient_id, survivor.issuer), (merged.patient_id, merged.issuer))
            orders = self.orders.merge_patient(keys[0], keys[1], source="hl7")
            studies = index_patients.merge_patients(self.engine, survivor=keys[0], merged=keys[1])
            self.orders.update_patient(survivor.patient_id, survivor.issuer, values, source="hl7", detail="ADT^A40")
            self.carry_to_index(survivor, values)
            counts = f"{orders} order(s), {studies} study(ies)"
            done.append(f"patient {merged.patient_id} merged into {survivor.patient_id}: {counts}")
        return "; ".join(done)

    # ---- the answer ----

    def ack(self, msg: hl7.Message | None, code: str, text: str, error: str, where: tuple[str, int], label: str) -> str:
        if msg is None:
            return fallback_ack(self.application, code, text, error, where)
        msh = msg.segment("MSH")
        ack = msg.create_ack(code, application=first(get(msh, 5), self.application), facility=get(msh, 6))
        ack_msh = ack.segment("MSH")
        if not get(msh, 12, 1):
            ack_msh.assign_field("2.5", 12)
        if label:
            ack_msh.assign_field(label, 18)
        if text:
            ack.segment("MSA").assign_field(_escape(text)[:1000], 3)
        out = str(ack)
        if code != "AA":
            out += err_segment(get(msh, 12, 1), error, where, text)
        return out


def err_segment(version: str, error: str, where: tuple[str, int], text: str) -> str:
    """ERR in the shape of the message's version: ERR-1 (ELD) before 2.5; ERR-2/3/4/8 from 2.5 on."""
    error = error or "207"
    name = ERRORS.get(error, "")
    segment, position = where
    location = f"{segment}^1^{position}" if segment and position else f"{segment}^1" if segment else ""
    if version[:3] in ("2.3", "2.4"):
        return f"ERR|{location}^{error}&{name}&HL70357\r"
    return f"ERR||{location}|{error}^{name}^HL70357|E||||{_escape(text)[:1000]}\r"


def fallback_ack(application: str, code: str, text: str, error: str, where: tuple[str, int]) -> str:
    """The ACK for bytes that are not an HL7 message (no MSH to answer from): v2.5, MSA-2 empty."""
    now = dt.datetime.now().strftime("%Y%m%d%H%M%S")
    control = uuid.uuid4().hex[:20].upper()
    return (
        f"MSH|^~\\&|{_escape(application)}||||{now}||ACK|{control}|P|2.5\r"
        f"MSA|{code}||{_escape(text)[:1000]}\r" + err_segment("2.5", error, where, text)
    )


def charset_label(raw: bytes) -> str:
    """MSH-18 read from the raw bytes (it says how to decode the rest); raises Nack if there is no MSH."""
    head = raw.split(b"\r", 1)[0].split(b"\n", 1)[0]
    if not head.startswith(b"MSH") or len(head) < 8:
        raise Nack("AR", "not an HL7 v2 message: it does not start with an MSH segment", "100", ("MSH", 0))
    fields = head.split(head[3:4])
    label = fields[17] if len(fields) > 17 else b""
    label = label.split(head[5:6])[0]  # first repetition
    return label.decode("ascii", "replace").strip().upper()


def describe(msg: hl7.Message | None) -> str:
    if msg is None:
        return "(unparsed)"
    msh = msg.segment("MSH")
    return f"{get(msh, 9, 1)}^{get(msh, 9, 2)} {get(msh, 10)} from {get(msh, 3)}/{get(msh, 4)}"


def _one(msg: hl7.Message, sid: str, *, required: bool = True) -> hl7.Segment | None:
    try:
        return msg.segment(sid)
    except KeyError:
        if required:
            raise Nack("AE", f"the message has no {sid} segment", "100", (sid, 0)) from None
        return None


# ---- MLLP listener -------------------------------------------------------------------------------------------


class MllpListener:
    """An MLLP server (HL7 v2 minimal lower layer protocol) on its own thread and event loop.

    Each connection may send many messages; each gets its ACK on the same connection. Messages from all
    connections are applied one at a time (one worker thread), in the order they arrived.
    """

    def __init__(
        self,
        handle: Callable[[bytes], bytes],
        host: str,
        port: int,
        *,
        max_bytes: int = 16 * 1024 * 1024,
        idle_timeout: float = 600.0,
    ) -> None:
        self.handle = handle
        self.host, self.port = host, port
        self.max_bytes = max_bytes
        self.idle_timeout = idle_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hl7-apply")
        self._clients: set[asyncio.Task[None]] = set()
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hl7-mllp", daemon=True)
        self._thread.start()
        self._started.wait(30)
        if self._error is not None:
            raise self._error
        log.info("HL7 MLLP listener on %s:%d", self.host, self.port)

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        def factory() -> asyncio.StreamReaderProtocol:
            reader = MLLPStreamReader(limit=self.max_bytes, loop=loop)
            return asyncio.StreamReaderProtocol(reader, self._client, loop=loop)

        try:
            self._server = loop.run_until_complete(
                loop.create_server(factory, self.host, self.port, reuse_address=True)
            )
        except BaseException as exc:
            self._error = exc
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        loop = asyncio.get_running_loop()
        peer = writer.get_extra_info("peername")
        try:
            while True:
                try:
                    block = await asyncio.wait_for(reader.readuntil(END_BLOCK + CARRIAGE_RETURN), self.idle_timeout)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    break
                except asyncio.LimitOverrunError:
                    log.warning("HL7 message from %s longer than %d bytes; connection closed", peer, self.max_bytes)
                    break
                start = block.find(START_BLOCK)
                if start < 0 or block[:start].strip():
                    ack = fallback_ack("VNPACS", "AR", "MLLP block without its start byte <VT>", "100", ("", 0))
                    writer.write(START_BLOCK + ack.encode() + END_BLOCK + CARRIAGE_RETURN)
                else:
                    message = block[start + 1 : -2]
                    answer = await loop.run_in_executor(self._worker, self.handle, message)
                    writer.write(START_BLOCK + answer + END_BLOCK + CARRIAGE_RETURN)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._clients.discard(task)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.wait(list(self._clients), timeout=5)

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._worker.shutdown(wait=True, cancel_futures=True)
