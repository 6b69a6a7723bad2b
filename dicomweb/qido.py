"""QIDO-RS (PS3.18 10.6): searches for studies, series and instances, answered by the same engine as C-FIND."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydicom.datadict import keyword_for_tag
from sqlalchemy.exc import SQLAlchemyError

from dicomweb import dicomjson
from dicomweb.urls import base_url
from storage.ingest import Archive
from storage.query import ATTRIBUTES, Level, QueryError, find

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
_CONTROL = {"includefield", "limit", "offset", "fuzzymatching"}
_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")

# PS3.18 Table 10.6.3-3: attributes returned by default at each level, plus what OHIF's lists read.
DEFAULTS: dict[Level, list[str]] = {
    "STUDY": [
        "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName", "PatientName",
        "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription",
        "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    ],
    "SERIES": [
        "Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber", "SeriesDate", "SeriesTime",
        "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    ],
    "IMAGE": [
        "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated", "NumberOfFrames",
    ],
}  # fmt: skip


def _keyword(name: str) -> str:
    """A query parameter name as a DICOM keyword: keywords pass, tags (00100010, 0010,0010) are looked up."""
    match = _TAG.match(name)
    if match:
        keyword = keyword_for_tag(int(match.group(1) + match.group(2), 16))
        if not keyword:
            raise HTTPException(400, f"unknown attribute tag {name}")
        return keyword
    return name


def _int_param(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HTTPException(400, f"{name} must be a whole number, got {raw!r}") from None
    if value < 0:
        raise HTTPException(400, f"{name} must not be negative")
    return value


def router(archive: Archive, ae_title: str) -> APIRouter:
    api = APIRouter(tags=["QIDO-RS"])

    def search(request: Request, level: Level, fixed: dict[str, str]) -> JSONResponse:
        filters: dict[str, str] = {}
        include: list[str] = []
        include_all = False
        for name, value in request.query_params.multi_items():
            if name == "includefield":
                for field in value.split(","):
                    field = field.strip()
                    if field == "all":
                        include_all = True
                    elif field:
                        include.append(_keyword(field))
            elif name not in _CONTROL:
                filters[_keyword(name)] = value
        filters.update(fixed)
        limit = min(_int_param(request, "limit", DEFAULT_LIMIT), MAX_LIMIT)
        offset = _int_param(request, "offset", 0)
        fuzzy = request.query_params.get("fuzzymatching", "false").lower() == "true"
        keys = list(DEFAULTS[level])
        if include_all:
            keys += [k for k, a in ATTRIBUTES.items() if a.level in _levels_up_to(level)]
        keys += include + list(filters)
        if level != "STUDY":
            keys.append("StudyInstanceUID")
        if level == "IMAGE":
            keys.append("SeriesInstanceUID")
        keys = list(dict.fromkeys(k for k in keys if k in ATTRIBUTES))
        try:
            with archive.engine.connect() as conn:
                result = find(conn, level, filters, keys, limit=limit, offset=offset, fuzzy=fuzzy)
        except QueryError as exc:
            raise HTTPException(400, str(exc)) from exc
        except SQLAlchemyError as exc:
            raise HTTPException(503, "database unavailable") from exc
        root = base_url(request)
        body = []
        for row in result.rows:
            extra: dict[str, Any] = {"RetrieveURL": _retrieve_url(root, level, row), "InstanceAvailability": "ONLINE"}
            extra["RetrieveAETitle"] = ae_title
            if any(isinstance(v, str) and not v.isascii() for v in row.values()):
                extra["SpecificCharacterSet"] = "ISO_IR 192"
            body.append(dicomjson.dataset(row, extra))
        headers = {}
        warnings = []
        if result.truncated:
            warnings.append('299 vnpacs "There are additional results that can be requested"')
        if result.unsupported:
            warnings.append(f'299 vnpacs "Matching not supported, ignored: {", ".join(result.unsupported)}"')
        if warnings:
            headers["Warning"] = ", ".join(warnings)
        return JSONResponse(body, media_type="application/dicom+json", headers=headers)

    @api.get("/studies", summary="Search for studies")
    def studies(request: Request) -> JSONResponse:
        return search(request, "STUDY", {})

    @api.get("/series", summary="Search for series")
    def all_series(request: Request) -> JSONResponse:
        return search(request, "SERIES", {})

    @api.get("/studies/{study}/series", summary="Search for a study's series")
    def study_series(request: Request, study: str) -> JSONResponse:
        return search(request, "SERIES", {"StudyInstanceUID": study})

    @api.get("/instances", summary="Search for instances")
    def all_instances(request: Request) -> JSONResponse:
        return search(request, "IMAGE", {})

    @api.get("/studies/{study}/instances", summary="Search for a study's instances")
    def study_instances(request: Request, study: str) -> JSONResponse:
        return search(request, "IMAGE", {"StudyInstanceUID": study})

    @api.get("/studies/{study}/series/{series}/instances", summary="Search for a series' instances")
    def series_instances(request: Request, study: str, series: str) -> JSONResponse:
        return search(request, "IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": series})

    return api


def _levels_up_to(level: Level) -> set[str]:
    order = ["PATIENT", "STUDY", "SERIES", "IMAGE"]
    return set(order[: order.index(level) + 1])


def _retrieve_url(root: str, level: Level, row: dict[str, Any]) -> str:
    url = f"{root}/studies/{row['StudyInstanceUID']}"
    if level in ("SERIES", "IMAGE"):
        url += f"/series/{row['SeriesInstanceUID']}"
    if level == "IMAGE":
        url += f"/instances/{row['SOPInstanceUID']}"
    return url
