"""HTTP API of results for the EMR and the insurer: the HIS outbox, FHIR DiagnosticReport / ImagingStudy, XML4."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import Patient, Study
from worklist.fhir import FhirError, fhir_response, outcome
from worklist.models import Order, OutboundMessage, Report
from worklist.outbound import Outbound, outbound_dict
from worklist.results import diagnostic_report, imaging_study, load_report, xml4_document, xml4_rows


def _bundle(resources: list[dict[str, Any]]) -> Response:
    return fhir_response(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(resources),
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
        }
    )


def _not_found(what: str) -> Response:
    return outcome(FhirError(404, "not-found", what))


def router(
    outbound: Outbound,
    *,
    public_root: Callable[[Request], str],
    dependencies: Sequence[Any] = (),
) -> APIRouter:
    """`public_root` gives the server's URL as the client sees it (behind a reverse proxy too): ImagingStudy's
    DICOMweb endpoint is built from it, and DiagnosticReport's key-image links when the outbox has no public URL."""
    api = APIRouter(dependencies=list(dependencies))
    engine = outbound.engine

    # ---- the HIS outbox ---------------------------------------------------------------------------------------

    @api.get("/api/outbound", tags=["results"], summary="Messages owed or sent to the HIS (ORU^R01), newest first")
    def outbox(status: str = "", limit: int = 100) -> dict[str, Any]:
        stmt = select(OutboundMessage).order_by(OutboundMessage.pk.desc()).limit(min(max(limit, 1), 1000))
        if status:
            stmt = stmt.where(OutboundMessage.status == status.upper())
        with Session(engine) as session:
            return {"items": [outbound_dict(r) for r in session.execute(stmt).scalars()]}

    @api.post("/api/outbound/{pk}/resend", tags=["results"], summary="Send a message to the HIS again")
    def resend(pk: int) -> dict[str, Any]:
        try:
            outbound.resend(pk)
        except KeyError as exc:
            raise HTTPException(404, f"no outbound message {pk}") from exc
        return {"id": pk, "status": "PENDING"}

    # ---- BHYT XML4 ---------------------------------------------------------------------------------------------

    @api.get("/api/orders/{pk}/xml4", tags=["results"], summary="XML4 rows (QĐ 130) of the order's episode (MA_LK)")
    def xml4(pk: int, format: str = "xml") -> Response:
        with Session(engine) as session:
            order = session.get(Order, pk)
            if order is None:
                raise HTTPException(404, f"no order {pk}")
            if not order.episode_id:
                raise HTTPException(409, f"order {pk} has no episode (MA_LK): the HIS did not send a visit number")
            rows = xml4_rows(session, order.episode_id)
        if format == "json":
            return JSONResponse({"MA_LK": order.episode_id, "rows": rows})
        return Response(xml4_document(rows), media_type="application/xml; charset=utf-8")

    # ---- FHIR --------------------------------------------------------------------------------------------------

    @api.get("/fhir/DiagnosticReport/{pk}", tags=["fhir"], summary="A report as a FHIR DiagnosticReport")
    def read_report(request: Request, pk: str) -> Response:
        if not pk.isdigit():
            return _not_found(f"no DiagnosticReport {pk}")
        with Session(engine) as session:
            found = load_report(session, int(pk))
            if found is None:
                return _not_found(f"no DiagnosticReport {pk}")
            return fhir_response(diagnostic_report(*found, base_url=outbound.public_url or public_root(request)))

    @api.get("/fhir/DiagnosticReport", tags=["fhir"], summary="Search reports by study, accession or patient")
    def search_reports(request: Request) -> Response:
        params = request.query_params
        stmt = select(Report.pk).outerjoin(Order, Report.order_pk == Order.pk).order_by(Report.pk)
        if study := params.get("study"):
            stmt = stmt.where(Report.study_instance_uid == study.removeprefix("urn:oid:"))
        if accession := params.get("based-on:identifier") or params.get("accession"):
            stmt = stmt.where(Order.accession_number == accession.split("|")[-1])
        if patient := params.get("subject:identifier") or params.get("patient"):
            stmt = stmt.where(Order.patient_id == patient.split("|")[-1])
        with Session(engine) as session:
            found = [load_report(session, pk) for pk in session.execute(stmt.limit(100)).scalars()]
            base = outbound.public_url or public_root(request)
            return _bundle([diagnostic_report(*f, base_url=base) for f in found if f is not None])

    @api.get("/fhir/ImagingStudy/{uid}", tags=["fhir"], summary="A stored study as a FHIR ImagingStudy")
    def read_study(uid: str, request: Request) -> Response:
        with Session(engine) as session:
            resource = imaging_study(session, uid, base_url=public_root(request))
        return fhir_response(resource) if resource is not None else _not_found(f"no ImagingStudy {uid}")

    @api.get("/fhir/ImagingStudy", tags=["fhir"], summary="Search stored studies by patient identifier or accession")
    def search_studies(request: Request) -> Response:
        params = request.query_params
        stmt = select(Study.study_instance_uid).join(Patient, Study.patient_pk == Patient.pk).order_by(Study.pk)
        if patient := params.get("subject:identifier") or params.get("patient"):
            stmt = stmt.where(Patient.patient_id == patient.split("|")[-1])
        if identifier := params.get("identifier"):
            value = identifier.split("|")[-1]
            stmt = stmt.where(
                (Study.accession_number == value) | (Study.study_instance_uid == value.removeprefix("urn:oid:"))
            )
        if not (params.get("subject:identifier") or params.get("patient") or params.get("identifier")):
            raise HTTPException(400, "search ImagingStudy by patient (subject:identifier) or identifier")
        with Session(engine) as session:
            uids = list(session.execute(stmt.limit(100)).scalars())
            resources = [imaging_study(session, uid, base_url=public_root(request)) for uid in uids]
        return _bundle([r for r in resources if r is not None])

    return api
