"""Radiology reports: DRAFT → PRELIMINARY → FINAL → AMENDED, every version kept, FINAL immutable, signed versions.

Each save is a new version (`ris_report_version`); nothing is ever updated in place. FINAL and AMENDED versions are
signed when they are made: a detached CMS signature over the version's canonical bytes (`canonical_content`) and a
PAdES-signed PDF (see `worklist.signing`). The order follows the report (REPORTED_PRELIMINARY, REPORTED_FINAL), and
the `on_final` hooks run once a FINAL or AMENDED version is committed (the HIS result feed hangs there).

A version may carry key images (`worklist.key_images`): instances of the report's study the doctor marks; they are
carried forward like the text, signed with it, shown on the PDF and served as JPEG.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from storage.models import Patient, Series, Study
from storage.text import nfc
from worklist import key_images as keyimg
from worklist import report_pdf, signing
from worklist.models import REPORTED_FINAL, REPORTED_PRELIMINARY, Order, Report, ReportVersion, utcnow
from worklist.orders import OrderError, Orders

log = logging.getLogger(__name__)

DRAFT, PRELIMINARY, FINAL, AMENDED = "DRAFT", "PRELIMINARY", "FINAL", "AMENDED"
REPORT_STATUSES = (DRAFT, PRELIMINARY, FINAL, AMENDED)
EDITABLE = (DRAFT, PRELIMINARY)
SIGNED = (FINAL, AMENDED)
CANONICAL_FORMAT = "vnpacs-report/1"
MAX_TEXT = 65536

FinalHook = Callable[[int, int], None]
"""Called with (report pk, version pk) after a FINAL or AMENDED version is committed."""


class ReportError(ValueError):
    """Input that cannot make a valid report; `str()` says why."""


class ReportNotFound(ReportError):
    pass


class ReportConflict(ReportError):
    """A change the report's state does not allow (editing a FINAL report...)."""


@dataclass
class ReportText:
    """The parts of a report a doctor writes; None keeps what the previous version had."""

    findings: str | None = None  # mô tả
    conclusion: str | None = None  # kết luận
    recommendation: str | None = None  # đề nghị
    author_name: str | None = None
    author_code: str | None = None  # MA_BS_DOC_KQ
    key_images: list[Any] | None = None  # [{"sop_instance_uid", "frame"}] or KeyImage; [] removes them


_TEXT_FIELDS = [f.name for f in fields(ReportText) if f.name != "key_images"]
_LIMITS = {"author_name": 324, "author_code": 64}


def _clean(text: ReportText) -> dict[str, str]:
    """The given fields, NFC and stripped, checked for length."""
    out = {}
    for name in _TEXT_FIELDS:
        value = getattr(text, name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ReportError(f"{name} must be text")
        value = nfc(value.replace("\r\n", "\n").strip())
        limit = _LIMITS.get(name, MAX_TEXT)
        if len(value) > limit:
            raise ReportError(f"{name} is longer than {limit} characters")
        out[name] = value
    return out


def _uid(value: str) -> str:
    value = value.strip()
    if len(value) > 64 or not value.replace(".", "").isdigit() or value.startswith(".") or ".." in value:
        raise ReportError(f"study_instance_uid {value!r} is not a UID")
    return value


def canonical_content(report: Report, version: ReportVersion) -> dict[str, Any]:
    """What a version's CMS signature covers, from stored columns only (so it can be rebuilt to verify)."""
    assert version.signed_at is not None
    content: dict[str, Any] = {
        "format": CANONICAL_FORMAT,
        "report_id": report.pk,
        "version": version.version,
        "status": version.status,
        "study_instance_uid": report.study_instance_uid,
        "findings": version.findings,
        "conclusion": version.conclusion,
        "recommendation": version.recommendation,
        "author": {"name": version.author_name, "code": version.author_code},
        "reason": version.reason,
        "signed_at": signing.utc_text(version.signed_at),
    }
    if version.key_images:  # only then: versions without key images canonicalise exactly as they always did
        content["key_images"] = [k.as_dict() for k in keyimg.loads(version.key_images)]
    return content


def _iso(value: dt.datetime | None) -> str:
    if value is None:
        return ""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def version_dict(report: Report, v: ReportVersion) -> dict[str, Any]:
    base = f"/api/reports/{report.pk}/versions/{v.version}"
    signed = v.cms_signature is not None
    return {
        "version": v.version,
        "status": v.status,
        "findings": v.findings,
        "conclusion": v.conclusion,
        "recommendation": v.recommendation,
        "author_name": v.author_name,
        "author_code": v.author_code,
        "reason": v.reason,
        "key_images": [
            {**k.as_dict(), "url": f"{base}/key-images/{i}.jpg"} for i, k in enumerate(keyimg.loads(v.key_images), 1)
        ],
        "created_at": _iso(v.created_at),
        "signed": signed,
        "signed_at": _iso(v.signed_at),
        "signer": v.signer,
        "content_sha256": v.content_sha256,
        "pdf_url": f"{base}/pdf",
        "signature_url": f"{base}/signature" if signed else "",
        "content_url": f"{base}/content" if signed else "",
    }


def report_dict(report: Report, *, versions: bool = True) -> dict[str, Any]:
    """The JSON view of a report: its state, its latest version and (optionally) every version."""
    out: dict[str, Any] = {
        "id": report.pk,
        "study_instance_uid": report.study_instance_uid,
        "order_id": report.order_pk,
        "status": report.status,
        "created_at": _iso(report.created_at),
        "updated_at": _iso(report.updated_at),
        "current": version_dict(report, report.versions[-1]) if report.versions else None,
        "version_count": len(report.versions),
    }
    if versions:
        out["versions"] = [version_dict(report, v) for v in report.versions]
    return out


class Reports:
    """Report writing, signing and verification over the RIS tables."""

    def __init__(
        self,
        engine: Engine,
        orders: Orders,
        *,
        signing_config: signing.SigningConfig,
        viewer_url: Callable[[str], str],
        facility_name: str = "",
        key_images: keyimg.KeyImages | None = None,
    ) -> None:
        self.engine = engine
        self.key_images = key_images
        self.orders = orders
        self.signing_config = signing_config
        self.viewer_url = viewer_url
        self.facility_name = facility_name
        self.on_final: list[FinalHook] = []
        self._key: signing.SigningKey | None = None
        self._key_lock = threading.Lock()

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # ---- lookup ---------------------------------------------------------------------------------------------

    @staticmethod
    def _load(session: Session, pk: int) -> Report | None:
        return session.execute(
            select(Report).options(selectinload(Report.versions)).where(Report.pk == pk)
        ).scalar_one_or_none()

    def get(self, pk: int) -> Report:
        with self.session() as session:
            report = self._load(session, pk)
        if report is None:
            raise ReportNotFound(f"no report {pk}")
        return report

    def search(
        self, *, study_instance_uid: str = "", order_pk: int | None = None, limit: int = 100, offset: int = 0
    ) -> list[Report]:
        stmt = select(Report).options(selectinload(Report.versions))
        if study_instance_uid:
            stmt = stmt.where(Report.study_instance_uid == study_instance_uid.strip())
        if order_pk is not None:
            stmt = stmt.where(Report.order_pk == order_pk)
        stmt = stmt.order_by(Report.pk.desc()).limit(limit).offset(offset)
        with self.session() as session:
            return list(session.execute(stmt).scalars())

    def version(self, pk: int, number: int) -> tuple[Report, ReportVersion]:
        report = self.get(pk)
        for v in report.versions:
            if v.version == number:
                return report, v
        raise ReportNotFound(f"report {pk} has no version {number}")

    # ---- writing --------------------------------------------------------------------------------------------

    def create(self, *, study_instance_uid: str = "", order_pk: int | None = None, text: ReportText) -> Report:
        """A DRAFT report (version 1) for a stored or ordered study; the order is found by study UID (or the
        stored study's accession number) when it is not given."""
        values = _clean(text)
        order: Order | None = None
        if order_pk is not None:
            try:
                order = self.orders.get(order_pk)
            except OrderError as exc:
                raise ReportNotFound(str(exc)) from exc
        if not study_instance_uid.strip():
            if order is None:
                raise ReportError("study_instance_uid is required (or an order id)")
            study_instance_uid = order.study_instance_uid
        uid = _uid(study_instance_uid)
        with self.session() as session:
            study = session.execute(select(Study).where(Study.study_instance_uid == uid)).scalar_one_or_none()
        if order is None:
            order = self.orders.find(study_instance_uid=uid)
            if order is None and study is not None and study.accession_number:
                order = self.orders.find(accession=study.accession_number)
        if study is None and (order is None or order.study_instance_uid != uid):
            raise ReportNotFound(f"no stored study and no order with StudyInstanceUID {uid}")
        images = self._key_images(uid, text.key_images)
        if images is not None:
            values["key_images"] = images
        with self.session() as session, session.begin():
            existing = session.execute(
                select(Report.pk).where(
                    Report.study_instance_uid == uid,
                    (Report.order_pk == order.pk) if order is not None else Report.order_pk.is_(None),
                )
            ).scalar_one_or_none()
            if existing is not None:
                raise ReportConflict(f"study {uid} already has report {existing}: edit or amend it")
            report = Report(study_instance_uid=uid, order_pk=order.pk if order else None, status=DRAFT)
            report.versions.append(ReportVersion(version=1, status=DRAFT, **values))
            session.add(report)
        return self.get(report.pk)

    def edit(self, pk: int, text: ReportText) -> Report:
        """A new version with the changes, in the same state (DRAFT or PRELIMINARY only)."""
        report = self.get(pk)
        if report.status not in EDITABLE:
            raise ReportConflict(f"report {pk} is {report.status} and cannot be edited; amend it with a reason instead")
        return self._new_version(pk, report.status, text)

    def preliminary(self, pk: int, text: ReportText | None = None) -> Report:
        return self._new_version(pk, PRELIMINARY, text or ReportText())

    def final(self, pk: int, text: ReportText | None = None) -> Report:
        return self._new_version(pk, FINAL, text or ReportText())

    def amend(self, pk: int, reason: str, text: ReportText | None = None) -> Report:
        reason = nfc((reason or "").strip())
        if not reason:
            raise ReportError("an amendment needs a reason")
        if len(reason) > MAX_TEXT:
            raise ReportError(f"reason is longer than {MAX_TEXT} characters")
        return self._new_version(pk, AMENDED, text or ReportText(), reason=reason)

    _ALLOWED = {
        DRAFT: (DRAFT,),
        PRELIMINARY: (DRAFT, PRELIMINARY),
        FINAL: (DRAFT, PRELIMINARY),
        AMENDED: (FINAL, AMENDED),
    }

    def _new_version(self, pk: int, status: str, text: ReportText, *, reason: str = "") -> Report:
        values = _clean(text)
        report = self.get(pk)
        if report.status not in self._ALLOWED[status]:
            if status == AMENDED:
                raise ReportConflict(f"report {pk} is {report.status}; only a FINAL report is amended")
            raise ReportConflict(f"report {pk} is {report.status} and cannot become {status}")
        if status == PRELIMINARY and report.status == PRELIMINARY and not values and text.key_images is None:
            raise ReportConflict(f"report {pk} is already PRELIMINARY")
        latest = report.versions[-1]
        content: dict[str, Any] = {name: getattr(latest, name) for name in _TEXT_FIELDS}
        content["key_images"] = latest.key_images
        content.update(values)
        images = self._key_images(report.study_instance_uid, text.key_images)
        if text.key_images is not None:
            content["key_images"] = images
        if status in SIGNED:
            missing = [
                label
                for label, name in (
                    ("conclusion (kết luận)", "conclusion"),
                    ("author_name", "author_name"),
                    ("author_code (MA_BS_DOC_KQ)", "author_code"),
                )
                if not content[name]
            ]
            if missing:
                raise ReportError(f"a {status} report needs {', '.join(missing)}")
        version = ReportVersion(version=latest.version + 1, status=status, reason=reason, **content)
        if status in SIGNED:
            self._sign(report, version)
        try:
            with self.session() as session, session.begin():
                current = self._load(session, pk)
                if current is None:
                    raise ReportNotFound(f"no report {pk}")
                if current.status != report.status or current.versions[-1].version != latest.version:
                    raise ReportConflict(f"report {pk} changed meanwhile (now {current.status}); reload and retry")
                current.versions.append(version)
                current.status = status
                current.updated_at = utcnow()
        except IntegrityError as exc:
            raise ReportConflict(f"report {pk} changed meanwhile; reload and retry") from exc
        self._after_commit(report, version)
        return self.get(pk)

    def _key_images(self, study_instance_uid: str, raw: list[Any] | None) -> str | None:
        """The column value for key images given as input (None when not given), each checked against the index."""
        if raw is None:
            return None
        try:
            images = keyimg.parse(raw)
            with self.session() as session:
                keyimg.check(session, study_instance_uid, images)
        except keyimg.KeyImageError as exc:
            raise ReportError(str(exc)) from exc
        return keyimg.dumps(images)

    def key_image(self, pk: int, number: int, index: int) -> bytes:
        """Key image `index` (1-based) of version `number` as JPEG."""
        _, version = self.version(pk, number)
        images = keyimg.loads(version.key_images)
        if not 1 <= index <= len(images):
            raise ReportNotFound(f"report {pk} version {number} has no key image {index} (it has {len(images)})")
        if self.key_images is None:
            raise keyimg.KeyImageUnavailable("key images are not rendered by this service (no blob store)")
        try:
            return self.key_images.jpeg(images[index - 1])
        except keyimg.KeyImageError as exc:
            raise ReportNotFound(str(exc)) from exc

    def _after_commit(self, report: Report, version: ReportVersion) -> None:
        if report.order_pk is not None and version.status in (PRELIMINARY, *SIGNED):
            target = REPORTED_PRELIMINARY if version.status == PRELIMINARY else REPORTED_FINAL
            detail = f"report {report.pk} version {version.version} {version.status.lower()}"
            if version.signer:
                detail += f", signed by {version.signer}"
            try:
                self.orders.advance(report.order_pk, target, source="report", detail=detail)
            except OrderError as exc:  # a cancelled order: the report stands, the order keeps its state
                log.warning("order %s not advanced for report %s: %s", report.order_pk, report.pk, exc)
        if version.status in SIGNED:
            for hook in list(self.on_final):
                try:
                    hook(report.pk, version.pk)
                except Exception:
                    log.exception("report hook %r failed for report %s version %s", hook, report.pk, version.pk)

    # ---- signing --------------------------------------------------------------------------------------------

    def signing_key(self) -> signing.SigningKey:
        """The signing key, loaded once (the development one created on first use); SigningUnavailable if none."""
        with self._key_lock:
            if self._key is None:
                self._key = signing.load_signing_key(self.signing_config)
                if self._key.development:
                    log.warning(
                        "reports are signed with a self-signed development certificate (%s): "
                        "set VNPACS_SIGNING_P12 for legally valid signatures",
                        self.signing_config.development_dir,
                    )
            return self._key

    def _sign(self, report: Report, version: ReportVersion) -> None:
        key = self.signing_key()
        signing.check_signing_key(key, self.signing_config)
        version.signed_at = utcnow().replace(microsecond=0)
        version.signer = key.subject
        canonical = signing.canonical_bytes(canonical_content(report, version))
        version.content_sha256 = hashlib.sha256(canonical).hexdigest()
        version.cms_signature = signing.sign_cms(key, canonical)
        document = self.document(report, version, signer=key.common_name)
        reason = "Kết quả chính thức" if version.status == FINAL else f"Sửa đổi kết quả: {version.reason}"
        version.pdf = signing.sign_pdf(
            key, report_pdf.render(document), reason=reason[:200], location=self.facility_name, name=key.common_name
        )

    # ---- documents ------------------------------------------------------------------------------------------

    def document(self, report: Report, version: ReportVersion, *, signer: str = "") -> report_pdf.ReportDocument:
        """What the PDF of `version` shows: the report text and the patient and exam, from the order (as the HIS
        gave them), else from the stored study."""
        doc = report_pdf.ReportDocument(
            report_id=report.pk,
            version=version.version,
            status=version.status,
            study_instance_uid=report.study_instance_uid,
            viewer_url=self.viewer_url(report.study_instance_uid),
            facility_name=self.facility_name,
            findings=version.findings,
            conclusion=version.conclusion,
            recommendation=version.recommendation,
            author_name=version.author_name,
            author_code=version.author_code,
            reason=version.reason,
            signed_at=version.signed_at,
            signer=signer,
            content_sha256=version.content_sha256,
        )
        images = keyimg.loads(version.key_images)
        if images and self.key_images is not None:
            for i, image in enumerate(images, 1):
                try:
                    doc.key_images.append((f"Ảnh chính {i}", self.key_images.jpeg(image)))
                except keyimg.KeyImageError as exc:
                    raise ReportError(str(exc)) from exc
        with self.session() as session:
            row = session.execute(
                select(Study, Patient)
                .join(Patient, Patient.pk == Study.patient_pk)
                .where(Study.study_instance_uid == report.study_instance_uid)
            ).first()
            modalities = []
            if row is not None:
                modalities = sorted(
                    {
                        m
                        for m in session.execute(select(Series.modality).where(Series.study_pk == row[0].pk)).scalars()
                        if m
                    }
                )
            order = None
            if report.order_pk is not None:
                order = session.execute(
                    select(Order).options(selectinload(Order.steps)).where(Order.pk == report.order_pk)
                ).scalar_one_or_none()
        if row is not None:
            study, patient = row
            doc.patient_name, doc.patient_id = patient.patient_name, patient.patient_id
            doc.birth_date, doc.sex = patient.patient_birth_date, patient.patient_sex
            doc.accession_number, doc.study_date = study.accession_number, study.study_date
            doc.procedure, doc.referring_physician = study.study_description, study.referring_physician_name
            doc.modality = ", ".join(modalities)
        if order is not None:
            doc.patient_name = order.patient_name or doc.patient_name
            doc.patient_id = order.patient_id or doc.patient_id
            doc.birth_date = order.patient_birth_date or doc.birth_date
            doc.sex = order.patient_sex or doc.sex
            doc.accession_number = order.accession_number or doc.accession_number
            doc.procedure = order.procedure_description or doc.procedure
            doc.referring_physician = order.referring_physician_name or doc.referring_physician
            doc.clinical_reason = order.reason_for_study
            if not doc.modality:
                doc.modality = ", ".join(sorted({s.modality for s in order.steps})) if order.steps else ""
        return doc

    def pdf(self, pk: int, number: int) -> tuple[bytes, bool]:
        """(PDF, signed): the stored signed PDF of a FINAL/AMENDED version, or an unsigned preview of another."""
        report, version = self.version(pk, number)
        if version.pdf is not None:
            return version.pdf, True
        return report_pdf.render(self.document(report, version)), False

    def canonical(self, pk: int, number: int) -> bytes:
        """The exact bytes a signed version's CMS signature covers."""
        report, version = self.version(pk, number)
        if version.signed_at is None or version.cms_signature is None:
            raise ReportNotFound(f"report {pk} version {number} is {version.status} and not signed")
        return signing.canonical_bytes(canonical_content(report, version))

    def signature(self, pk: int, number: int) -> bytes:
        _, version = self.version(pk, number)
        if version.cms_signature is None:
            raise ReportNotFound(f"report {pk} version {number} is {version.status} and not signed")
        return version.cms_signature

    # ---- verification ---------------------------------------------------------------------------------------

    def verify(self, pk: int, number: int | None = None) -> dict[str, Any]:
        """Every signed version (or version `number`): content hash, CMS, PDF, chain, revocation."""
        report = self.get(pk)
        chosen = [v for v in report.versions if v.cms_signature is not None or v.pdf is not None]
        if number is not None:
            chosen = [v for v in report.versions if v.version == number]
            if not chosen:
                raise ReportNotFound(f"report {pk} has no version {number}")
        results = []
        for v in chosen:
            entry: dict[str, Any] = {"version": v.version, "status": v.status, "signer": v.signer}
            entry["signed_at"] = _iso(v.signed_at)
            if v.cms_signature is None or v.pdf is None or v.signed_at is None:
                entry.update(valid=False, detail=f"version {v.version} ({v.status}) is not signed")
                results.append(entry)
                continue
            canonical = signing.canonical_bytes(canonical_content(report, v))
            digest = hashlib.sha256(canonical).hexdigest()
            entry["content"] = {"sha256": digest, "recorded_sha256": v.content_sha256}
            entry["content"]["matches"] = digest == v.content_sha256
            entry.update(signing.verify(self.signing_config, canonical=canonical, cms_der=v.cms_signature, pdf=v.pdf))
            entry["valid"] = bool(entry["valid"] and entry["content"]["matches"])
            results.append(entry)
        return {
            "report_id": report.pk,
            "status": report.status,
            "valid": bool(results) and all(r["valid"] for r in results),
            "detail": "" if results else "no signed version (the report is not FINAL yet)",
            "versions": results,
        }
