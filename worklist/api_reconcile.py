"""HTTP API of reconciliation and corrections: `/api/reconciliation`, `/api/studies/{uid}/corrections`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from storage.correct import CorrectionError, StudyNotFound, correct_study
from storage.ingest import Archive, IngestError, StorageUnavailable
from worklist.orders import OrderConflict, OrderError, OrderNotFound, Orders
from worklist.reconcile import corrections, order_patient_changes, record_correction, unreconciled


class CorrectionIn(BaseModel):
    reason: str = Field(..., min_length=1, description="Why the study is corrected (kept in the audit record)")
    changes: dict[str, str] = Field(..., description="DICOM keyword → new value (PatientName, PatientID, ...)")
    operator: str = Field("", description="Who asks, when the server runs without authentication")


class LinkIn(BaseModel):
    order_id: int
    reason: str = Field(..., min_length=1)
    operator: str = ""


def _who(request: Request, operator: str) -> str:
    user = getattr(request.state, "user", None)
    subject = getattr(user, "subject", "") or "anonymous"
    if subject == "anonymous" and operator.strip():
        return f"{operator.strip()} (unauthenticated)"
    return str(subject)


def router(orders: Orders, archive: Archive, tmp_dir: Path, *, dependencies: Sequence[Any] = ()) -> APIRouter:
    api = APIRouter(tags=["reconciliation"], dependencies=list(dependencies))

    @api.get("/api/reconciliation", summary="Studies that match no order or disagree with their order's patient")
    def list_problems(days: int = 30, limit: int = 100) -> dict[str, Any]:
        if not 1 <= limit <= 1000 or days < 1:
            raise HTTPException(400, "limit must be 1-1000 and days at least 1")
        return {"items": [p.as_dict() for p in unreconciled(orders, days=days, limit=limit)]}

    def _correct(study_uid: str, changes: dict[str, str], who: str, why: str) -> dict[str, Any]:
        try:
            done = correct_study(archive, study_uid, changes, tmp_dir)
        except StudyNotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        except CorrectionError as exc:
            raise HTTPException(400, str(exc)) from exc
        except StorageUnavailable as exc:
            raise HTTPException(503, exc.message) from exc
        except IngestError as exc:
            raise HTTPException(422, exc.message) from exc
        record_correction(
            orders,
            study_uid,
            who=who,
            why=why,
            changes=done.changes,
            originals=done.originals,
            instances=done.instances,
        )
        return {"study_instance_uid": study_uid, "instances": done.instances, "changes": done.changes}

    @api.post("/api/studies/{study_uid}/corrections", summary="Correct patient/study attributes of a stored study")
    async def correct(study_uid: str, body: CorrectionIn, request: Request) -> dict[str, Any]:
        return await run_in_threadpool(_correct, study_uid, body.changes, _who(request, body.operator), body.reason)

    @api.get("/api/studies/{study_uid}/corrections", summary="Corrections made to a study: who, when, why, what")
    def history(study_uid: str) -> dict[str, Any]:
        return {"items": corrections(orders, study_uid)}

    @api.post("/api/reconciliation/{study_uid}/link", summary="Link a study to an order, correcting it to match")
    async def link(study_uid: str, body: LinkIn, request: Request) -> dict[str, Any]:
        try:
            order = orders.get(body.order_id)
        except OrderNotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        other = orders.find(study_instance_uid=study_uid)
        if other is not None and other.pk != order.pk:
            raise HTTPException(409, f"study {study_uid} is already linked to order {other.accession_number}")
        who = _who(request, body.operator)
        result = await run_in_threadpool(_correct, study_uid, order_patient_changes(order), who, body.reason)
        try:
            linked = orders.link_study(order.pk, study_uid, source="reconciliation")
        except OrderConflict as exc:
            raise HTTPException(409, str(exc)) from exc
        except OrderError as exc:
            raise HTTPException(400, str(exc)) from exc
        return {**result, "order": {"id": linked.pk, "status": linked.status}}

    return api
