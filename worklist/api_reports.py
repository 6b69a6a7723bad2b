"""HTTP API of reports: `/api/reports` (write, sign, read versions, PDF, CMS signature, verify)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from fastapi import APIRouter, Body, HTTPException, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from worklist.key_images import KeyImageUnavailable
from worklist.report_pdf import FontMissing
from worklist.reports import (
    ReportConflict,
    ReportError,
    ReportNotFound,
    Reports,
    ReportText,
    report_dict,
)
from worklist.signing import SigningUnavailable

T = TypeVar("T")


class KeyImageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sop_instance_uid: str = Field(..., min_length=1, max_length=64, description="An instance of the report's study")
    frame: int | None = Field(None, ge=1, description="Frame number (1-based) of a multi-frame instance")


class ReportTextIn(BaseModel):
    """Report text; a field left out keeps the previous version's value."""

    model_config = ConfigDict(extra="forbid")

    findings: str | None = Field(None, description="Mô tả: what the images show")
    conclusion: str | None = Field(None, description="Kết luận")
    recommendation: str | None = Field(None, description="Đề nghị")
    author_name: str | None = Field(None, description="Reading doctor's name")
    author_code: str | None = Field(None, description="Reading doctor's code (MA_BS_DOC_KQ)")
    key_images: list[KeyImageIn] | None = Field(
        None, description="Key images (ảnh chính) marked on the study; [] removes them, left out keeps them"
    )

    def text(self) -> ReportText:
        return ReportText(**self.model_dump(include=set(ReportText.__dataclass_fields__)))


class ReportCreateIn(ReportTextIn):
    study_instance_uid: str = Field("", description="The study reported on (required unless order_id is given)")
    order_id: int | None = Field(None, description="The order; found by study (or its accession) when left out")


class AmendIn(ReportTextIn):
    reason: str = Field(..., min_length=1, description="Why the final report is amended (required)")


def _fail(exc: Exception) -> NoReturn:
    if isinstance(exc, ReportNotFound):
        raise HTTPException(404, str(exc)) from exc
    if isinstance(exc, ReportConflict):
        raise HTTPException(409, str(exc)) from exc
    if isinstance(exc, ReportError):
        raise HTTPException(422, str(exc)) from exc
    if isinstance(exc, SigningUnavailable | FontMissing):
        raise HTTPException(503, f"reports cannot be signed now: {exc}") from exc
    if isinstance(exc, KeyImageUnavailable):
        raise HTTPException(503, str(exc)) from exc
    raise exc


def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return fn(*args, **kwargs)
    except (ReportError, SigningUnavailable, FontMissing, KeyImageUnavailable) as exc:
        _fail(exc)


def router(reports: Reports, *, dependencies: Sequence[Any] = ()) -> APIRouter:
    api = APIRouter(prefix="/api/reports", tags=["reports"], dependencies=list(dependencies))

    @api.post("", status_code=201, summary="Start a report (DRAFT) for a study or order")
    def create(body: ReportCreateIn) -> dict[str, Any]:
        report = _call(
            reports.create, study_instance_uid=body.study_instance_uid, order_pk=body.order_id, text=body.text()
        )
        return report_dict(report)

    @api.get("", summary="Reports of a study or order")
    def search(
        study: str = Query("", description="StudyInstanceUID"),
        order: int | None = Query(None, description="Order id"),
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0),
    ) -> dict[str, Any]:
        found = reports.search(study_instance_uid=study, order_pk=order, limit=limit, offset=offset)
        return {"items": [report_dict(r, versions=False) for r in found]}

    @api.get("/{report_id}", summary="A report with every version")
    def get(report_id: int) -> dict[str, Any]:
        return report_dict(_call(reports.get, report_id))

    @api.put("/{report_id}", summary="Save changes as a new version (DRAFT or PRELIMINARY only; FINAL gets 409)")
    def edit(report_id: int, body: ReportTextIn) -> dict[str, Any]:
        return report_dict(_call(reports.edit, report_id, body.text()))

    @api.post(
        "/{report_id}/preliminary", summary="Make the report PRELIMINARY (the order becomes REPORTED_PRELIMINARY)"
    )
    def preliminary(report_id: int, body: ReportTextIn | None = Body(None)) -> dict[str, Any]:
        return report_dict(_call(reports.preliminary, report_id, body.text() if body else None))

    @api.post("/{report_id}/final", summary="Sign the report FINAL (CMS + PAdES); immutable afterwards")
    def final(report_id: int, body: ReportTextIn | None = Body(None)) -> dict[str, Any]:
        return report_dict(_call(reports.final, report_id, body.text() if body else None))

    @api.post("/{report_id}/amend", summary="Amend a FINAL report: a new signed AMENDED version with a reason")
    def amend(report_id: int, body: AmendIn) -> dict[str, Any]:
        return report_dict(_call(reports.amend, report_id, body.reason, body.text()))

    @api.get("/{report_id}/versions/{number}/pdf", summary="The PDF (signed for FINAL/AMENDED, else a preview)")
    def pdf(report_id: int, number: int) -> Response:
        data, signed = _call(reports.pdf, report_id, number)
        return Response(
            data,
            media_type="application/pdf",
            headers={
                "Content-Disposition": f'inline; filename="report-{report_id}-v{number}.pdf"',
                "X-Report-Signed": "true" if signed else "false",
            },
        )

    @api.get("/{report_id}/versions/{number}/key-images/{index}.jpg", summary="Key image `index` (1-based) as JPEG")
    def key_image(report_id: int, number: int, index: int) -> Response:
        return Response(
            _call(reports.key_image, report_id, number, index),
            media_type="image/jpeg",
            headers={"Cache-Control": "private, max-age=3600"},
        )

    @api.get("/{report_id}/versions/{number}/signature", summary="The detached CMS signature (DER)")
    def signature(report_id: int, number: int) -> Response:
        return Response(
            _call(reports.signature, report_id, number),
            media_type="application/pkcs7-signature",
            headers={"Content-Disposition": f'attachment; filename="report-{report_id}-v{number}.p7s"'},
        )

    @api.get("/{report_id}/versions/{number}/content", summary="The canonical bytes the CMS signature covers")
    def content(report_id: int, number: int) -> Response:
        return Response(
            _call(reports.canonical, report_id, number),
            media_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="report-{report_id}-v{number}.json"'},
        )

    @api.get("/{report_id}/verify", summary="Check signatures, certificate chain and (when configured) revocation")
    def verify(report_id: int, version: int | None = Query(None, ge=1)) -> dict[str, Any]:
        return _call(reports.verify, report_id, version)

    return api
