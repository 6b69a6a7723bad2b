"""JSON REST for orders: `POST /api/orders` (place or update), `GET /api/orders` (search), `GET /api/orders/{id}`,
`POST /api/orders/{id}/cancel` and `/discontinue`. Every call goes through `Orders`, like HL7 and FHIR."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import SQLAlchemyError

from worklist.intake import overlay
from worklist.models import CANCELLED, DISCONTINUED, Order
from worklist.orders import OrderConflict, OrderError, OrderIn, OrderNotFound, Orders, order_dict


class StepModel(BaseModel):
    """A scheduled procedure step: what one modality is asked to do."""

    model_config = ConfigDict(extra="forbid")

    modality: str = Field(..., description="DICOM modality (CT, MR, DX, US...)", examples=["CT"])
    station_ae_title: str = Field("", description="Scheduled Station AE Title")
    start_date: str = Field("", description="YYYYMMDD (or YYYY-MM-DD)", examples=["20261122"])
    start_time: str = Field("", description="HHMM[SS]", examples=["0930"])
    sps_id: str = Field("", description="Scheduled Procedure Step ID; generated when empty")
    station_name: str = ""
    location: str = ""
    performing_physician_name: str = Field("", description="DICOM PN: Family^Given")
    description: str = ""


class OrderModel(BaseModel):
    """An order as the HIS places it. Identified by `placer_order_number`, else by `accession_number`: posting the
    same order again changes nothing; posting it changed updates it (fields left out keep their value; `steps`
    replace the order's steps)."""

    model_config = ConfigDict(extra="forbid")

    patient_id: str = Field(..., description="Hospital patient ID (PatientID)", examples=["BN0001"])
    patient_name: str = Field(..., description="DICOM PN: Family^Given", examples=["Nguyễn^Văn An"])
    issuer_of_patient_id: str = ""
    cccd: str = Field("", description="Citizen identity card number, 12 digits (validated)")
    bhyt: str = Field("", description="Health insurance card number, 15 characters (validated)")
    patient_birth_date: str = Field("", description="YYYYMMDD")
    patient_sex: str = Field("", description="M, F or O")
    placer_order_number: str = ""
    filler_order_number: str = ""
    accession_number: str = Field("", description="At most 16 characters; assigned by the RIS when empty")
    episode_id: str = Field("", description="Episode / visit key (MA_LK of the BHYT claim)")
    priority: str = Field("ROUTINE", description="STAT, HIGH, ROUTINE, MEDIUM or LOW")
    procedure_code: str = Field("", description="Service code (MA_DICH_VU)")
    procedure_code_scheme: str = ""
    procedure_description: str = ""
    requested_procedure_id: str = ""
    referring_physician_name: str = ""
    reason_for_study: str = ""
    study_instance_uid: str = Field("", description="Assigned by the RIS when empty")
    steps: list[StepModel] = Field(..., min_length=1)

    def over(self, existing: Order | None) -> OrderIn:
        """The order this body makes of `existing`: the fields it sends replace the order's, the others stay."""
        values = {name: getattr(self, name) for name in self.model_fields_set if name != "steps"}
        steps = [step.model_dump(exclude_unset=True) for step in self.steps]
        return overlay(existing, values, steps)


class EndModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", description="Why (kept in the order's history)")


def _http_error(exc: Exception) -> HTTPException:
    if isinstance(exc, OrderNotFound):
        return HTTPException(404, str(exc))
    if isinstance(exc, OrderConflict):
        return HTTPException(409, str(exc))
    if isinstance(exc, OrderError):
        return HTTPException(422, str(exc))
    return HTTPException(503, "database unavailable")


def router(orders: Orders, *, dependencies: Sequence[Any] = ()) -> APIRouter:
    api = APIRouter(prefix="/api/orders", tags=["Orders"], dependencies=list(dependencies))

    async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await run_in_threadpool(fn, *args, **kwargs)
        except (OrderError, SQLAlchemyError) as exc:
            raise _http_error(exc) from exc

    @api.post(
        "",
        summary="Place an order, or update the one with the same placer order number / accession number",
        responses={201: {"description": "Placed"}, 200: {"description": "Updated or unchanged"}},
    )
    async def place(body: OrderModel) -> JSONResponse:
        def run() -> tuple[Order, bool]:
            existing = orders.find(placer=body.placer_order_number, accession=body.accession_number)
            return orders.place(body.over(existing), source="api")

        order, created = await call(run)
        headers = {"Location": f"/api/orders/{order.pk}"}
        return JSONResponse(order_dict(order), status_code=201 if created else 200, headers=headers)

    @api.get("", summary="Search orders (newest first)")
    async def search(
        accession: str = Query("", description="Accession number"),
        patient_id: str = Query("", description="Hospital patient ID, CCCD or BHYT card number"),
        status: str = Query("", description="Comma-separated statuses (SCHEDULED, IN_PROGRESS, ...)"),
        patient_name: str = Query("", description="Name prefix, accent-insensitive (nguyen^van)"),
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0),
    ) -> JSONResponse:
        try:
            found = await run_in_threadpool(
                orders.search,
                accession=accession.strip(),
                patient_id=patient_id.strip(),
                status=status,
                patient_name=patient_name.strip(),
                limit=limit,
                offset=offset,
            )
        except OrderError as exc:
            raise HTTPException(400, str(exc)) from exc
        except SQLAlchemyError as exc:
            raise HTTPException(503, "database unavailable") from exc
        return JSONResponse([order_dict(o) for o in found])

    @api.get("/{order_id}", summary="One order with its steps and history")
    async def one(order_id: int) -> JSONResponse:
        return JSONResponse(order_dict(await call(orders.get, order_id)))

    @api.post("/{order_id}/cancel", summary="Cancel an order that has not started")
    async def cancel(order_id: int, body: EndModel | None = None) -> JSONResponse:
        reason = body.reason if body else ""
        return JSONResponse(order_dict(await call(orders.end, order_id, CANCELLED, source="api", reason=reason)))

    @api.post("/{order_id}/discontinue", summary="Discontinue an order that has not completed")
    async def discontinue(order_id: int, body: EndModel | None = None) -> JSONResponse:
        reason = body.reason if body else ""
        return JSONResponse(order_dict(await call(orders.end, order_id, DISCONTINUED, source="api", reason=reason)))

    return api
