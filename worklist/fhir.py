"""FHIR R4 orders: `ServiceRequest` create, update, read and search under `/fhir`, validated with fhir.resources.

The R4B models of fhir.resources are used: ServiceRequest, Patient, Bundle and OperationOutcome are the same in R4
and R4B. The patient is a contained Patient (`subject.reference = "#p1"`) or a logical reference by identifier to a
patient the RIS already has an order for. Identifiers use the national draft guide's types from
http://terminology.hl7.org/CodeSystem/v2-0203: PI (hospital patient ID), NI (CCCD), SB (BHYT card); the order's
identifiers are PLAC (placer order number), FILL (filler) and ACSN (accession number), and the Study Instance UID is
`urn:dicom:uid` / `urn:oid:…`. Modalities are `orderDetail` codings in the DICOM system (one step each).

Status: `active` schedules (or updates) the order; `revoked` and `entered-in-error` cancel it (discontinue it once
started). Errors are OperationOutcomes: 400 for what is not a valid ServiceRequest, 422 for what breaks the RIS's
rules (an invalid CCCD, no modality...), 404 and 409 as usual.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.servicerequest import ServiceRequest
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from worklist.identity import TYPE_BHYT, TYPE_CCCD, TYPE_HOSPITAL
from worklist.intake import overlay
from worklist.models import (
    CANCELLED,
    COMPLETED,
    DISCONTINUED,
    IMAGES_AVAILABLE,
    IN_PROGRESS,
    REPORTED_FINAL,
    REPORTED_PRELIMINARY,
    SCHEDULED,
    VIETNAM,
    Order,
)
from worklist.orders import OrderConflict, OrderError, OrderNotFound, Orders

FHIR_JSON = "application/fhir+json"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
DICOM_UID = "urn:dicom:uid"

# Order status → ServiceRequest.status, and back for searches.
STATUS_OUT = {
    SCHEDULED: "active",
    IN_PROGRESS: "active",
    COMPLETED: "active",
    IMAGES_AVAILABLE: "active",
    REPORTED_PRELIMINARY: "active",
    REPORTED_FINAL: "completed",
    CANCELLED: "revoked",
    DISCONTINUED: "revoked",
}
STATUS_SEARCH = {
    "active": [SCHEDULED, IN_PROGRESS, COMPLETED, IMAGES_AVAILABLE, REPORTED_PRELIMINARY],
    "completed": [REPORTED_FINAL],
    "revoked": [CANCELLED, DISCONTINUED],
}
ENDING = ("revoked", "entered-in-error")
INTENTS = ("order", "original-order", "reflex-order", "filler-order", "instance-order")
PRIORITY_IN = {"routine": "ROUTINE", "urgent": "HIGH", "asap": "HIGH", "stat": "STAT"}
PRIORITY_OUT = {"STAT": "stat", "HIGH": "urgent", "ROUTINE": "routine", "MEDIUM": "routine", "LOW": "routine"}
GENDER_IN = {"male": "M", "female": "F", "other": "O", "unknown": ""}
GENDER_OUT = {"M": "male", "F": "female", "O": "other"}


class FhirError(Exception):
    """Answered as an OperationOutcome with `status`; `code` is the FHIR issue type."""

    def __init__(self, status: int, code: str, text: str, expression: Sequence[str] = ()) -> None:
        super().__init__(text)
        self.status, self.code, self.text, self.expression = status, code, text, list(expression)


def fhir_response(content: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(body, status_code=status, media_type=FHIR_JSON, headers=headers)


def outcome(error: FhirError) -> Response:
    issue: dict[str, Any] = {"severity": "error", "code": error.code, "diagnostics": error.text}
    if error.expression:
        issue["expression"] = error.expression
    resource = OperationOutcome.model_validate({"resourceType": "OperationOutcome", "issue": [issue]})
    return fhir_response(json.loads(resource.model_dump_json()), error.status)


# ---- reading a ServiceRequest ---------------------------------------------------------------------------------


def parse(body: bytes, content_type: str) -> ServiceRequest:
    """The request body as a validated ServiceRequest, or FhirError 400/415."""
    media = content_type.split(";")[0].strip().lower()
    if media and media not in (FHIR_JSON, "application/json", "application/json+fhir"):
        raise FhirError(415, "not-supported", f"content type {media} is not FHIR JSON; send {FHIR_JSON}")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FhirError(400, "structure", f"the body is not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("resourceType") != "ServiceRequest":
        kind = data.get("resourceType") if isinstance(data, dict) else type(data).__name__
        raise FhirError(400, "invalid", f"expected a ServiceRequest resource, got {kind!r}", ["resourceType"])
    try:
        return ServiceRequest.model_validate(data)
    except ValidationError as exc:
        problems = [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()]
        text = "; ".join(f"{where}: {msg}" for where, msg in problems[:10])
        raise FhirError(400, "structure", f"not a valid ServiceRequest: {text}", [w for w, _ in problems[:10]]) from exc


def _type_code(identifier: Any) -> str:
    kind = identifier.type
    if kind is None:
        return ""
    for coding in kind.coding or []:
        if coding.code and (coding.system in (None, V2_0203)):
            return str(coding.code).upper()
    return ""


def _date(value: Any) -> str:
    if isinstance(value, dt.datetime | dt.date):
        return value.strftime("%Y%m%d")
    text = str(value or "")
    return text.replace("-", "") if len(text) == 10 else ""  # a year or year-month is not a DICOM date


def _start(value: Any) -> tuple[str, str]:
    if isinstance(value, dt.datetime):
        return value.strftime("%Y%m%d"), value.strftime("%H%M%S")
    return _date(value), ""


def _patient_values(patient: Patient) -> dict[str, str]:
    values: dict[str, str] = {}
    for identifier in patient.identifier or []:
        code, value = _type_code(identifier), (identifier.value or "").strip()
        if not value:
            continue
        if code in (TYPE_HOSPITAL, "MR") and "patient_id" not in values:
            values["patient_id"] = value
            assigner = identifier.assigner.display if identifier.assigner is not None else None
            values["issuer_of_patient_id"] = (assigner or "").strip()
        elif code == TYPE_CCCD:
            values["cccd"] = value
        elif code == TYPE_BHYT:
            values["bhyt"] = value
    if "patient_id" not in values:
        raise FhirError(422, "required", "the Patient has no hospital identifier (type PI)", ["Patient.identifier"])
    names = patient.name or []
    name = next((n for n in names if n.use == "official"), names[0] if names else None)
    if name is not None:
        given = " ".join(g for g in name.given or [] if g)
        if name.family:
            values["patient_name"] = f"{name.family}^{given}".rstrip("^")
        elif name.text:
            values["patient_name"] = name.text
    if patient.birthDate is not None:
        values["patient_birth_date"] = _date(patient.birthDate)
    if patient.gender:
        values["patient_sex"] = GENDER_IN.get(patient.gender, "")
    return values


def _known_patient(orders: Orders, identifier: Any) -> dict[str, str]:
    """Demographics of a patient referenced by identifier, from the newest order the RIS has for them."""
    value = (identifier.value or "").strip() if identifier is not None else ""
    if not value:
        raise FhirError(422, "required", "subject needs a contained Patient (#id) or an identifier", ["subject"])
    found = orders.search(patient_id=value, limit=1)
    if not found:
        raise FhirError(
            422,
            "not-found",
            f"patient {value} is not known to the RIS; send the Patient as a contained resource",
            ["subject.identifier"],
        )
    o = found[0]
    return {
        "patient_id": o.patient_id,
        "issuer_of_patient_id": o.issuer_of_patient_id,
        "cccd": o.cccd,
        "bhyt": o.bhyt,
        "patient_name": o.patient_name,
        "patient_birth_date": o.patient_birth_date,
        "patient_sex": o.patient_sex,
    }


def order_values(orders: Orders, sr: ServiceRequest) -> tuple[dict[str, str], list[dict[str, str]] | None]:
    """Order fields and steps a ServiceRequest carries (the ones it does not carry keep their value)."""
    if sr.intent not in INTENTS:
        raise FhirError(
            422, "business-rule", f"intent {sr.intent!r} is not an order ({', '.join(INTENTS)})", ["intent"]
        )
    values: dict[str, str] = {}
    for identifier in sr.identifier or []:
        code, value = _type_code(identifier), (identifier.value or "").strip()
        if identifier.system == DICOM_UID:
            values["study_instance_uid"] = value.removeprefix("urn:oid:")
        elif code == "PLAC":
            values["placer_order_number"] = value
        elif code == "FILL":
            values["filler_order_number"] = value
        elif code == "ACSN":
            values["accession_number"] = value
    reference = sr.subject.reference or ""
    if reference.startswith("#"):
        contained = [r for r in sr.contained or [] if getattr(r, "id", None) == reference[1:]]
        if not contained or not isinstance(contained[0], Patient):
            raise FhirError(422, "invalid", f"subject {reference} is not a contained Patient", ["subject"])
        values.update(_patient_values(contained[0]))
    elif reference:
        raise FhirError(
            422, "not-supported", "subject must be a contained Patient (#id) or a reference by identifier", ["subject"]
        )
    else:
        values.update(_known_patient(orders, sr.subject.identifier))
    if sr.priority:
        values["priority"] = PRIORITY_IN.get(sr.priority, sr.priority.upper())
    if sr.code is not None:
        coding = sr.code.coding[0] if sr.code.coding else None
        if coding is not None:
            values["procedure_code"] = coding.code or ""
            values["procedure_code_scheme"] = coding.system or ""
        description = sr.code.text or (coding.display if coding is not None else "")
        if description:
            values["procedure_description"] = description
    if sr.encounter is not None:
        episode = sr.encounter.identifier.value if sr.encounter.identifier is not None else sr.encounter.display
        if episode:
            values["episode_id"] = episode
    if sr.requester is not None and sr.requester.display:
        values["referring_physician_name"] = sr.requester.display
    reasons = [r.text or next((c.display or c.code or "" for c in r.coding or []), "") for r in sr.reasonCode or []]
    if any(reasons):
        values["reason_for_study"] = "; ".join(r for r in reasons if r)
    start = sr.occurrenceDateTime or (sr.occurrencePeriod.start if sr.occurrencePeriod is not None else None)
    date, time = _start(start)
    modalities = [c.code for d in sr.orderDetail or [] for c in d.coding or [] if c.system == DCM and c.code]
    steps = None
    if modalities:
        steps = [{"modality": m, **({"start_date": date, "start_time": time} if date else {})} for m in modalities]
    return values, steps


# ---- writing a ServiceRequest ---------------------------------------------------------------------------------


def typed_identifier(code: str, value: str, **extra: Any) -> dict[str, Any]:
    """An Identifier with its HL7 v2-0203 type (PI, NI, SB, ACSN, PLAC, FILL)."""
    return {"type": {"coding": [{"system": V2_0203, "code": code}]}, "value": value, **extra}


def _instant(value: dt.datetime) -> str:
    """A FHIR instant: the database keeps UTC (SQLite hands it back without its zone)."""
    return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).isoformat()


def to_fhir(order: Order) -> dict[str, Any]:
    family, _, given = order.patient_name.partition("^")
    given = given.split("^")[0]
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": "p1",
        "identifier": [
            typed_identifier(
                TYPE_HOSPITAL,
                order.patient_id,
                **({"assigner": {"display": order.issuer_of_patient_id}} if order.issuer_of_patient_id else {}),
            )
        ],
        "name": [{"use": "official", "family": family, "text": f"{family} {given}".strip()}],
    }
    if given:
        patient["name"][0]["given"] = given.split()
    if order.cccd:
        patient["identifier"].append(typed_identifier(TYPE_CCCD, order.cccd))
    if order.bhyt:
        patient["identifier"].append(typed_identifier(TYPE_BHYT, order.bhyt))
    if order.patient_sex in GENDER_OUT:
        patient["gender"] = GENDER_OUT[order.patient_sex]
    if len(order.patient_birth_date) == 8:
        b = order.patient_birth_date
        patient["birthDate"] = f"{b[:4]}-{b[4:6]}-{b[6:]}"
    identifiers = [typed_identifier("ACSN", order.accession_number)]
    if order.placer_order_number:
        identifiers.insert(0, typed_identifier("PLAC", order.placer_order_number))
    if order.filler_order_number:
        identifiers.append(typed_identifier("FILL", order.filler_order_number))
    identifiers.append({"system": DICOM_UID, "value": f"urn:oid:{order.study_instance_uid}"})
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": str(order.pk),
        "contained": [patient],
        "identifier": identifiers,
        "status": STATUS_OUT.get(order.status, "unknown"),
        "intent": "order",
        "priority": PRIORITY_OUT.get(order.priority, "routine"),
        "subject": {"reference": "#p1", "display": order.patient_name},
        "orderDetail": [{"coding": [{"system": DCM, "code": s.modality}]} for s in order.steps],
    }
    if order.updated_at:
        resource["meta"] = {"lastUpdated": _instant(order.updated_at)}
    if order.procedure_code or order.procedure_description:
        coding: dict[str, Any] = {}
        if order.procedure_code:
            coding["code"] = order.procedure_code
            if ":" in order.procedure_code_scheme and " " not in order.procedure_code_scheme:  # a URI
                coding["system"] = order.procedure_code_scheme
            if order.procedure_description:
                coding["display"] = order.procedure_description
        resource["code"] = {**({"coding": [coding]} if coding else {}), "text": order.procedure_description or None}
        if resource["code"]["text"] is None:
            del resource["code"]["text"]
    if order.episode_id:
        resource["encounter"] = {"identifier": {"value": order.episode_id}}
    if order.referring_physician_name:
        resource["requester"] = {"display": order.referring_physician_name}
    if order.reason_for_study:
        resource["reasonCode"] = [{"text": order.reason_for_study}]
    if order.created_at:
        resource["authoredOn"] = _instant(order.created_at)
    step = order.steps[0] if order.steps else None
    if step is not None and step.start_date:
        d, t = step.start_date, (step.start_time.split(".")[0] + "0000")[:6] if step.start_time else ""
        if t:
            when = dt.datetime.strptime(d + t, "%Y%m%d%H%M%S").replace(tzinfo=VIETNAM)
            resource["occurrenceDateTime"] = when.isoformat()
        else:
            resource["occurrenceDateTime"] = f"{d[:4]}-{d[4:6]}-{d[6:]}"
    return json.loads(ServiceRequest.model_validate(resource).model_dump_json())


# ---- the service ----------------------------------------------------------------------------------------------


def _order_error(exc: Exception) -> FhirError:
    if isinstance(exc, OrderNotFound):
        return FhirError(404, "not-found", str(exc))
    if isinstance(exc, OrderConflict):
        return FhirError(409, "conflict", str(exc))
    if isinstance(exc, OrderError):
        return FhirError(422, "business-rule", str(exc))
    return FhirError(503, "transient", "database unavailable")


def upsert(orders: Orders, sr: ServiceRequest, target: Order | None) -> tuple[Order, bool]:
    """Apply a ServiceRequest: to `target` (PUT) or to the order its identifiers name (POST)."""
    values, steps = order_values(orders, sr)
    placer, accession = values.get("placer_order_number", ""), values.get("accession_number", "")
    existing = orders.find(placer=placer, accession=accession) if placer or accession else None
    if target is not None:
        if existing is not None and existing.pk != target.pk:
            raise FhirError(409, "conflict", f"the identifiers name another order ({existing.pk})", ["identifier"])
        existing = target
        values.setdefault("placer_order_number", target.placer_order_number or "")
        values["accession_number"] = target.accession_number
    elif not placer and not accession:
        raise FhirError(
            422, "required", "the ServiceRequest needs a PLAC (placer) or ACSN (accession) identifier", ["identifier"]
        )
    if sr.status in ENDING:
        if existing is None:
            raise FhirError(422, "business-rule", f"no order to mark {sr.status}", ["status"])
        ending = CANCELLED if existing.status == SCHEDULED else DISCONTINUED
        return orders.end(existing.pk, ending, source="fhir", reason=f"ServiceRequest {sr.status}"), False
    if sr.status != "active":
        raise FhirError(
            422,
            "business-rule",
            f"status {sr.status!r} is not taken: send active to schedule, revoked to cancel",
            ["status"],
        )
    return orders.place(overlay(existing, values, steps), source="fhir")


def router(orders: Orders, *, dependencies: Sequence[Any] = ()) -> APIRouter:
    api = APIRouter(prefix="/fhir", tags=["FHIR"], dependencies=list(dependencies))

    async def guarded(fn: Any, *args: Any) -> Any:
        try:
            return await run_in_threadpool(fn, *args)
        except (OrderError, SQLAlchemyError) as exc:
            raise _order_error(exc) from exc

    def load(order_id: str) -> Order:
        if not order_id.isdigit():
            raise FhirError(404, "not-found", f"no ServiceRequest {order_id}")
        try:
            return orders.get(int(order_id))
        except OrderNotFound as exc:
            raise FhirError(404, "not-found", f"no ServiceRequest {order_id}") from exc

    @api.post("/ServiceRequest", summary="Create (or, by PLAC/ACSN identifier, update) an order")
    async def create(request: Request) -> Response:
        try:
            sr = parse(await request.body(), request.headers.get("content-type", ""))
            order, created = await guarded(upsert, orders, sr, None)
        except FhirError as error:
            return outcome(error)
        location = f"{request.url_for('read_service_request', order_id=str(order.pk))}"
        return fhir_response(to_fhir(order), 201 if created else 200, {"Location": location})

    @api.put("/ServiceRequest/{order_id}", summary="Update an order")
    async def update(order_id: str, request: Request) -> Response:
        try:
            sr = parse(await request.body(), request.headers.get("content-type", ""))
            if sr.id is not None and sr.id != order_id:
                raise FhirError(400, "invalid", f"resource id {sr.id} differs from the URL's {order_id}", ["id"])
            target = await guarded(load, order_id)
            order, _ = await guarded(upsert, orders, sr, target)
        except FhirError as error:
            return outcome(error)
        return fhir_response(to_fhir(order))

    @api.get("/ServiceRequest/{order_id}", summary="Read an order", name="read_service_request")
    async def read(order_id: str) -> Response:
        try:
            order = await guarded(load, order_id)
        except FhirError as error:
            return outcome(error)
        return fhir_response(to_fhir(order))

    @api.get("/ServiceRequest", summary="Search orders: identifier, subject:Patient.identifier, status, _count")
    async def search(request: Request) -> Response:
        params = request.query_params
        try:
            found = await guarded(
                find,
                orders,
                params.get("identifier", ""),
                params.get("subject:Patient.identifier", params.get("patient.identifier", "")),
                params.get("status", ""),
                params.get("_count", "100"),
                params.get("_offset", "0"),
            )
        except FhirError as error:
            return outcome(error)
        base = str(request.url_for("read_service_request", order_id="0"))[:-1]
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "link": [{"relation": "self", "url": str(request.url)}],
            "entry": [{"fullUrl": f"{base}{o.pk}", "resource": to_fhir(o), "search": {"mode": "match"}} for o in found],
        }
        if not params.get("_offset") and len(found) < int(params.get("_count", "100")):
            bundle["total"] = len(found)
        return fhir_response(json.loads(Bundle.model_validate(bundle).model_dump_json()))

    return api


def _token(value: str) -> tuple[str, str]:
    """A FHIR token search value: `system|value` or `value`."""
    system, bar, code = value.partition("|")
    return (system, code) if bar else ("", value)


def find(orders: Orders, identifier: str, patient: str, status: str, count: str, offset: str) -> list[Order]:
    try:
        limit, skip = int(count), int(offset)
    except ValueError as exc:
        raise FhirError(400, "invalid", "_count and _offset must be integers") from exc
    if not 0 < limit <= 1000 or skip < 0:
        raise FhirError(400, "invalid", "_count must be 1 to 1000 and _offset not negative")
    statuses: list[str] = []
    for s in (x.strip() for x in status.split(",") if x.strip()):
        if s not in STATUS_SEARCH and s not in ("draft", "on-hold", "entered-in-error", "unknown"):
            raise FhirError(400, "invalid", f"unknown ServiceRequest status {s!r}", ["status"])
        statuses += STATUS_SEARCH.get(s, [])
    if status and not statuses:
        return []
    patient_id = _token(patient)[1].strip()
    if identifier:
        system, value = _token(identifier)
        value = value.strip()
        if system == DICOM_UID:
            hit = orders.find(study_instance_uid=value.removeprefix("urn:oid:"))
        else:
            hit = orders.find(placer=value) or orders.find(accession=value)
        hits = [hit] if hit is not None else []
        if statuses:
            hits = [o for o in hits if o.status in statuses]
        if patient_id:
            hits = [o for o in hits if patient_id in (o.patient_id, o.cccd, o.bhyt)]
        return hits[skip : skip + limit]
    return orders.search(patient_id=patient_id, status=",".join(statuses), limit=limit, offset=skip)
