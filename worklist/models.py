"""The RIS tables: orders from the HIS/EMR, their scheduled procedure steps, MPPS, reports, outbound messages.

They live beside the index (same database) but belong to `worklist/`, with their own Alembic history
(`worklist_alembic_version`). Studies are linked by StudyInstanceUID / AccessionNumber, never by a foreign key into
the index, so the archive keeps working without the RIS.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from storage.models import NAMING, PN, UID, utcnow

# The hospital's wall clock: what HL7, DICOM dates, XML4 and the reports mean by local time (Việt Nam, UTC+7).
VIETNAM = dt.timezone(dt.timedelta(hours=7), "ICT")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


# Order lifecycle (IHE SWF order status as the RIS sees it).
SCHEDULED = "SCHEDULED"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"
IMAGES_AVAILABLE = "IMAGES_AVAILABLE"
REPORTED_PRELIMINARY = "REPORTED_PRELIMINARY"
REPORTED_FINAL = "REPORTED_FINAL"
CANCELLED = "CANCELLED"
DISCONTINUED = "DISCONTINUED"
ORDER_STATUSES = (
    SCHEDULED,
    IN_PROGRESS,
    COMPLETED,
    IMAGES_AVAILABLE,
    REPORTED_PRELIMINARY,
    REPORTED_FINAL,
    CANCELLED,
    DISCONTINUED,
)
ENDED = (CANCELLED, DISCONTINUED)


class Order(Base):
    """An imaging order (one requested procedure) placed by the HIS/EMR, with the patient as the order gave it."""

    __tablename__ = "ris_order"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    accession_number: Mapped[str] = mapped_column(String(16), unique=True)
    placer_order_number: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    filler_order_number: Mapped[str] = mapped_column(String(64), default="")
    episode_id: Mapped[str] = mapped_column(String(100), default="", index=True)  # MA_LK (visit / episode)
    status: Mapped[str] = mapped_column(String(24), default=SCHEDULED, index=True)
    priority: Mapped[str] = mapped_column(String(16), default="ROUTINE")
    # Patient as ordered
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    cccd: Mapped[str] = mapped_column(String(12), default="", index=True)
    bhyt: Mapped[str] = mapped_column(String(15), default="", index=True)
    patient_name: Mapped[str] = mapped_column(PN, default="")
    patient_name_key: Mapped[str] = mapped_column(PN, default="", index=True)
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")
    # Requested procedure
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    requested_procedure_id: Mapped[str] = mapped_column(String(16), default="")
    procedure_code: Mapped[str] = mapped_column(String(64), default="")  # MA_DICH_VU
    procedure_code_scheme: Mapped[str] = mapped_column(String(64), default="")
    procedure_description: Mapped[str] = mapped_column(String(64), default="")
    referring_physician_name: Mapped[str] = mapped_column(PN, default="")
    reason_for_study: Mapped[str] = mapped_column(String(1024), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    steps: Mapped[list[ProcedureStep]] = relationship(
        back_populates="order", cascade="all, delete-orphan", order_by="ProcedureStep.pk"
    )
    events: Mapped[list[OrderEvent]] = relationship(
        back_populates="order", cascade="all, delete-orphan", order_by="OrderEvent.pk"
    )


class ProcedureStep(Base):
    """A Scheduled Procedure Step: what the worklist gives one modality."""

    __tablename__ = "ris_procedure_step"
    __table_args__ = (UniqueConstraint("order_pk", "sps_id"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    order_pk: Mapped[int] = mapped_column(ForeignKey("ris_order.pk", ondelete="CASCADE"), index=True)
    sps_id: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=SCHEDULED, index=True)
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)
    station_ae_title: Mapped[str] = mapped_column(String(16), default="", index=True)
    station_name: Mapped[str] = mapped_column(String(16), default="")
    location: Mapped[str] = mapped_column(String(16), default="")
    start_date: Mapped[str] = mapped_column(String(8), default="", index=True)
    start_time: Mapped[str] = mapped_column(String(16), default="")
    performing_physician_name: Mapped[str] = mapped_column(PN, default="")
    description: Mapped[str] = mapped_column(String(64), default="")

    order: Mapped[Order] = relationship(back_populates="steps")


class OrderEvent(Base):
    """Every change of an order: when, from where (hl7, fhir, api, mpps, ingest, user), what."""

    __tablename__ = "ris_order_event"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    order_pk: Mapped[int] = mapped_column(ForeignKey("ris_order.pk", ondelete="CASCADE"), index=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    source: Mapped[str] = mapped_column(String(16))
    from_status: Mapped[str] = mapped_column(String(24), default="")
    to_status: Mapped[str] = mapped_column(String(24), default="")
    detail: Mapped[str] = mapped_column(Text, default="")

    order: Mapped[Order] = relationship(back_populates="events")


class PerformedStep(Base):
    """A Modality Performed Procedure Step (N-CREATE / N-SET), kept as the DICOM JSON the modality sent."""

    __tablename__ = "ris_mpps"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    order_pk: Mapped[int | None] = mapped_column(ForeignKey("ris_order.pk", ondelete="SET NULL"), nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)  # IN PROGRESS, COMPLETED, DISCONTINUED
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    attributes: Mapped[str] = mapped_column(Text)  # DICOM JSON
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Report(Base):
    """A radiology report for one study (and its order, when there is one); its text lives in versions."""

    __tablename__ = "ris_report"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    order_pk: Mapped[int | None] = mapped_column(ForeignKey("ris_order.pk", ondelete="SET NULL"), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="DRAFT")  # DRAFT PRELIMINARY FINAL AMENDED
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    versions: Mapped[list[ReportVersion]] = relationship(
        back_populates="report", cascade="all, delete-orphan", order_by="ReportVersion.version"
    )


class ReportVersion(Base):
    """One immutable version of a report; a FINAL version may carry its CMS signature and signed PDF."""

    __tablename__ = "ris_report_version"
    __table_args__ = (UniqueConstraint("report_pk", "version"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_pk: Mapped[int] = mapped_column(ForeignKey("ris_report.pk", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    findings: Mapped[str] = mapped_column(Text, default="")  # mô tả
    conclusion: Mapped[str] = mapped_column(Text, default="")  # kết luận
    recommendation: Mapped[str] = mapped_column(Text, default="")  # đề nghị
    author_name: Mapped[str] = mapped_column(PN, default="")
    author_code: Mapped[str] = mapped_column(String(64), default="")  # MA_BS_DOC_KQ
    reason: Mapped[str] = mapped_column(Text, default="")  # why an amendment was made
    # JSON [{"sop_instance_uid", "frame"}] (worklist.key_images); NULL when the version has none.
    key_images: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    content_sha256: Mapped[str] = mapped_column(String(64), default="")
    signed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    signer: Mapped[str] = mapped_column(String(512), default="")  # certificate subject
    cms_signature: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # DER, detached
    pdf: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # PAdES-signed PDF

    report: Mapped[Report] = relationship(back_populates="versions")


class OutboundMessage(Base):
    """A message owed to the HIS (ORU^R01 ...): kept until delivered, retried with backoff, resendable."""

    __tablename__ = "ris_outbound"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # hl7-oru
    destination: Mapped[str] = mapped_column(String(255))  # host:port
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="PENDING", index=True)  # PENDING SENT FAILED
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    report_version_pk: Mapped[int | None] = mapped_column(
        ForeignKey("ris_report_version.pk", ondelete="SET NULL"), nullable=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    ack: Mapped[str] = mapped_column(Text, default="")
    # A delivery in flight holds the row until then, so concurrent workers never send it twice.
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Correction(Base):
    """An attribute correction of stored objects: who, why, what changed, and the originals kept recoverable."""

    __tablename__ = "ris_correction"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    who: Mapped[str] = mapped_column(String(128))
    why: Mapped[str] = mapped_column(Text)
    changes: Mapped[str] = mapped_column(Text)  # JSON {keyword: [old, new]}
    originals: Mapped[str] = mapped_column(Text)  # JSON [{sop_instance_uid, blob_key, sha256}]
    instances: Mapped[int] = mapped_column(BigInteger, default=0)
