"""Results for the EMR and the insurer: FHIR DiagnosticReport and ImagingStudy, and the BHYT XML4 rows.

Built from the RIS tables (orders, report versions) and the index (studies, series, instances); validated with
fhir.resources (R4B models, identical to R4 for these resources) before they leave.
"""

from __future__ import annotations

import base64
import datetime as dt
import xml.etree.ElementTree as ET
from typing import Any

from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.imagingstudy import ImagingStudy
from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from storage.models import Instance, Patient, Series, Study
from worklist import key_images as keyimg
from worklist.fhir import DCM, DICOM_UID, typed_identifier
from worklist.identity import TYPE_BHYT, TYPE_CCCD, TYPE_HOSPITAL
from worklist.models import VIETNAM, Order, Report, ReportVersion

SIGNED_STATUSES = ("FINAL", "AMENDED")


def latest_signed(report: Report) -> ReportVersion | None:
    signed = [v for v in report.versions if v.status in SIGNED_STATUSES]
    return signed[-1] if signed else None


def _patient_identifiers(patient_id: str, cccd: str = "", bhyt: str = "") -> list[dict[str, Any]]:
    ids = [typed_identifier(TYPE_HOSPITAL, patient_id)]
    if cccd:
        ids.append(typed_identifier(TYPE_CCCD, cccd))
    if bhyt:
        ids.append(typed_identifier(TYPE_BHYT, bhyt))
    return ids


def _iso(value: dt.datetime | None) -> str | None:
    return value.astimezone(VIETNAM).isoformat(timespec="seconds") if value else None


# ---- FHIR DiagnosticReport ------------------------------------------------------------------------------------


def _key_image_media(report: Report, version: ReportVersion, base_url: str) -> list[dict[str, Any]]:
    """The version's key images as contained Media resources (R4: DiagnosticReport.media.link is a Reference to
    Media), each with the SOP Instance UID as identifier and the JPEG endpoint as its content URL."""
    out = []
    for i, image in enumerate(keyimg.loads(version.key_images), 1):
        media: dict[str, Any] = {
            "resourceType": "Media",
            "id": f"key-image-{i}",
            "status": "completed",
            "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{image.sop_instance_uid}"}],
            "content": {
                "contentType": "image/jpeg",
                "url": f"{base_url}/api/reports/{report.pk}/versions/{version.version}/key-images/{i}.jpg",
                "title": f"Ảnh chính {i}",
            },
        }
        if image.frame is not None:
            media["note"] = [{"text": f"Khung hình {image.frame}"}]
        out.append(media)
    return out


def diagnostic_report(report: Report, order: Order | None, *, base_url: str = "") -> dict[str, Any]:
    """The report as a FHIR DiagnosticReport: its latest signed version (final, or amended), else the latest.

    Key images are contained Media resources referenced from `media` (with the comment "Ảnh chính n")."""
    version = latest_signed(report) or report.versions[-1]
    status = {"DRAFT": "registered", "PRELIMINARY": "preliminary", "FINAL": "final", "AMENDED": "amended"}
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": str(report.pk),
        "status": status.get(version.status, "registered"),
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}
                ]
            }
        ],
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}],
            "text": (order.procedure_description if order else "") or "Chẩn đoán hình ảnh",
        },
        "conclusion": version.conclusion or None,
        "issued": _iso(version.signed_at or version.created_at),
        "imagingStudy": [{"identifier": {"system": DICOM_UID, "value": f"urn:oid:{report.study_instance_uid}"}}],
        "identifier": [{"system": "urn:vnpacs:report", "value": f"{report.pk}.{version.version}"}],
    }
    if order is not None:
        resource["subject"] = {
            "identifier": _patient_identifiers(order.patient_id, order.cccd, order.bhyt)[0],
            "display": order.patient_name.replace("^", " "),
        }
        resource["basedOn"] = [{"identifier": typed_identifier("ACSN", order.accession_number)}]
        if order.episode_id:
            resource["encounter"] = {"identifier": {"value": order.episode_id}}
    if version.author_name or version.author_code:
        resource["resultsInterpreter"] = [
            {"identifier": {"value": version.author_code}, "display": version.author_name.replace("^", " ")}
        ]
    text = f"Mô tả:\n{version.findings}\n\nKết luận:\n{version.conclusion}\n"
    if version.recommendation:
        text += f"\nĐề nghị:\n{version.recommendation}\n"
    forms: list[dict[str, Any]] = [
        {"contentType": "text/plain; charset=utf-8", "language": "vi", "data": base64.b64encode(text.encode()).decode()}
    ]
    if version.pdf:
        forms.append({"contentType": "application/pdf", "title": "Phiếu kết quả (ký số)", "size": len(version.pdf)})
    resource["presentedForm"] = forms
    media = _key_image_media(report, version, base_url.rstrip("/"))
    if media:
        resource["contained"] = media
        resource["media"] = [{"comment": m["content"]["title"], "link": {"reference": f"#{m['id']}"}} for m in media]
    resource = {k: v for k, v in resource.items() if v is not None}
    return DiagnosticReport.model_validate(resource).model_dump(mode="json", exclude_none=True)


def load_report(session: Session, pk: int) -> tuple[Report, Order | None] | None:
    report = session.execute(
        select(Report).options(selectinload(Report.versions)).where(Report.pk == pk)
    ).scalar_one_or_none()
    if report is None or not report.versions:
        return None
    order = None
    if report.order_pk is not None:
        order = session.execute(
            select(Order).options(selectinload(Order.steps)).where(Order.pk == report.order_pk)
        ).scalar_one_or_none()
    return report, order


# ---- FHIR ImagingStudy -----------------------------------------------------------------------------------------


def imaging_study(session: Session, study_uid: str, *, base_url: str) -> dict[str, Any] | None:
    """The stored study as a FHIR ImagingStudy (series and instance counts from the index), or None."""
    row = session.execute(
        select(Study, Patient)
        .join(Patient, Study.patient_pk == Patient.pk)
        .where(Study.study_instance_uid == study_uid)
    ).first()
    if row is None:
        return None
    study, patient = row
    series_rows = session.execute(
        select(Series, func.count(Instance.pk))
        .join(Instance, Instance.series_pk == Series.pk)
        .where(Series.study_pk == study.pk)
        .group_by(Series.pk)
        .order_by(Series.series_number, Series.pk)
    ).all()
    total = sum(count for _, count in series_rows)
    started = None
    if study.study_date:
        t = (study.study_time or "000000").split(".")[0].ljust(6, "0")
        started = dt.datetime.strptime(study.study_date + t[:6], "%Y%m%d%H%M%S").replace(tzinfo=VIETNAM).isoformat()
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": study_uid,
        "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{study_uid}"}],
        "status": "available",
        "subject": {
            "identifier": typed_identifier(TYPE_HOSPITAL, patient.patient_id),
            "display": patient.patient_name.replace("^", " "),
        },
        "numberOfSeries": len(series_rows),
        "numberOfInstances": total,
        "endpoint": [{"display": f"DICOMweb {base_url}/dicom-web"}],
        "series": [
            {
                "uid": s.series_instance_uid,
                "number": s.series_number,
                "modality": {"system": DCM, "code": s.modality or "OT"},
                "description": s.series_description or None,
                "numberOfInstances": count,
            }
            for s, count in series_rows
        ],
    }
    if study.accession_number:
        resource["identifier"].append(typed_identifier("ACSN", study.accession_number))
    if started:
        resource["started"] = started
    if study.study_description:
        resource["description"] = study.study_description
    validated = ImagingStudy.model_validate({k: v for k, v in resource.items() if v is not None})
    return validated.model_dump(mode="json", exclude_none=True)  # type: ignore[no-any-return]


# ---- BHYT XML4 (QĐ 130/QĐ-BYT, table 4: paraclinical results) --------------------------------------------------

XML4_FIELDS = (
    "MA_LK",
    "STT",
    "MA_DICH_VU",
    "MA_CHI_SO",
    "TEN_CHI_SO",
    "GIA_TRI",
    "DON_VI_DO",
    "MO_TA",
    "KET_LUAN",
    "NGAY_KQ",
    "MA_BS_DOC_KQ",
    "DU_PHONG",
)


def xml4_rows(session: Session, episode_id: str) -> list[dict[str, str]]:
    """One row per signed imaging result of the episode (MA_LK), in order of signing."""
    orders = session.execute(select(Order).where(Order.episode_id == episode_id).order_by(Order.pk)).scalars()
    rows: list[tuple[dt.datetime, dict[str, str]]] = []
    for order in orders:
        reports = session.execute(
            select(Report).options(selectinload(Report.versions)).where(Report.order_pk == order.pk)
        ).scalars()
        for report in reports:
            version = latest_signed(report)
            if version is None:
                continue
            when = (version.signed_at or version.created_at).astimezone(VIETNAM)
            rows.append(
                (
                    when,
                    {
                        "MA_LK": episode_id[:100],
                        "MA_DICH_VU": order.procedure_code[:15],
                        "MA_CHI_SO": "",
                        "TEN_CHI_SO": "",
                        "GIA_TRI": "",
                        "DON_VI_DO": "",
                        "MO_TA": version.findings,
                        "KET_LUAN": version.conclusion,
                        "NGAY_KQ": when.strftime("%Y%m%d%H%M"),
                        "MA_BS_DOC_KQ": version.author_code,
                        "DU_PHONG": "",
                    },
                )
            )
    rows.sort(key=lambda r: r[0])
    return [{"STT": str(i), **row} for i, (_, row) in enumerate(rows, 1)]


def xml4_document(rows: list[dict[str, str]]) -> bytes:
    """The XML4 table (CHITIEU_CHITIET_DICHVUCANLAMSANG) in UTF-8, fields in the order of the decision."""
    root = ET.Element("CHITIEU_CHITIET_DICHVUCANLAMSANG")
    listing = ET.SubElement(root, "DSACH_CHI_TIET_CLS")
    for row in rows:
        item = ET.SubElement(listing, "CHI_TIET_CLS")
        for name in XML4_FIELDS:
            ET.SubElement(item, name).text = row.get(name, "")
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="utf-8", xml_declaration=False)
