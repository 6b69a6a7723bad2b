"""Test-side helpers for the RIS DIMSE services: orders placed on a running server's database, pynetdicom MWL,
MPPS and Storage Commitment SCUs, DCMTK findscu -W."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import N_ACTION
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    StorageCommitmentPushModel,
)

from storage.db import make_engine
from tests.scu import c_find, dcmtk_env
from tests.services import LOOPBACK, VnpacsService
from worklist.models import Order, PerformedStep
from worklist.orders import OrderIn, Orders, StepIn

# Every Type 1 and Type 2 return key of PS3.4 table K.6-1 (and the Type 3 ones the RIS fills).
SPS_KEYS = [
    "ScheduledStationAETitle",
    "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartTime",
    "Modality",
    "ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepDescription",
    "ScheduledStationName",
    "ScheduledProcedureStepLocation",
    "ScheduledProtocolCodeSequence",
    "PreMedication",
    "ScheduledProcedureStepID",
    "RequestedContrastAgent",
    "ScheduledProcedureStepStatus",
]
TOP_KEYS = [
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "RequestedProcedureCodeSequence",
    "StudyInstanceUID",
    "ReferencedStudySequence",
    "RequestedProcedurePriority",
    "PatientTransportArrangements",
    "AccessionNumber",
    "RequestingPhysician",
    "ReferringPhysicianName",
    "AdmissionID",
    "CurrentPatientLocation",
    "ReferencedPatientSequence",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientSex",
    "PatientWeight",
    "ConfidentialityConstraintOnPatientDataDescription",
    "PatientState",
    "PregnancyStatus",
    "MedicalAlerts",
    "Allergies",
    "SpecialNeeds",
]


def database_url(server: VnpacsService) -> str:
    return server.env.get("VNPACS_DATABASE_URL") or f"sqlite:///{Path(server.env['VNPACS_DATA_DIR']) / 'index.db'}"


@contextmanager
def orders_of(server: VnpacsService) -> Iterator[Orders]:
    """The order service on the running server's own database (SQLite WAL or PostgreSQL)."""
    engine = make_engine(database_url(server))
    try:
        yield Orders(engine)
    finally:
        engine.dispose()


def order_in(
    accession: str,
    *,
    patient_id: str = "BN0001",
    name: str = "Nguyễn^Văn An",
    modality: str = "CT",
    station: str = "CT01",
    date: str = "20261122",
    time: str = "090000",
    physician: str = "Trần^Thị Bình",
    **changes: Any,
) -> OrderIn:
    data = OrderIn(
        patient_id=patient_id,
        patient_name=name,
        issuer_of_patient_id="BV-BACHMAI",
        cccd="001085012345",
        bhyt="DN4010123456789",
        patient_birth_date="19850312",
        patient_sex="M",
        accession_number=accession,
        placer_order_number=f"HIS-{accession}",
        episode_id=f"LK-{accession}",
        procedure_code="18.0041.0001",
        procedure_code_scheme="BYT-DVKT",
        procedure_description="Chụp CT ngực không tiêm thuốc",
        referring_physician_name="Lê^Văn Cường",
        reason_for_study="Ho kéo dài",
        priority="ROUTINE",
        steps=[
            StepIn(
                modality=modality,
                station_ae_title=station,
                start_date=date,
                start_time=time,
                station_name="CT Phòng 1",
                location="Tầng 2",
                performing_physician_name=physician,
                description="CT ngực",
            )
        ],
    )
    for key, value in changes.items():
        setattr(data, key, value)
    return data


def place(server: VnpacsService, data: OrderIn) -> Order:
    """Place the order through the server's own JSON API (`POST /api/orders`); the order as stored."""
    body = {f.name: getattr(data, f.name) for f in fields(OrderIn) if f.name != "steps"}
    body["steps"] = [asdict(step) for step in data.steps]
    rsp = httpx.post(f"{server.base_url}/api/orders", json=body, timeout=30)
    assert rsp.status_code == 201, rsp.text
    return get_order(server, rsp.json()["id"])


def cancel(server: VnpacsService, pk: int, reason: str) -> None:
    rsp = httpx.post(f"{server.base_url}/api/orders/{pk}/cancel", json={"reason": reason}, timeout=30)
    assert rsp.status_code == 200, rsp.text


def get_order(server: VnpacsService, pk: int) -> Order:
    with orders_of(server) as orders:
        return orders.get(pk)


def performed_steps(server: VnpacsService) -> dict[str, PerformedStep]:
    from sqlalchemy import select

    with orders_of(server) as orders, orders.session() as session:
        return {row.sop_instance_uid: row for row in session.execute(select(PerformedStep)).scalars()}


# ---- Modality Worklist -----------------------------------------------------------------------------------------


def worklist_identifier(sps: dict[str, Any] | None = None, **top: Any) -> Dataset:
    """A worklist query asking for every return key; `sps` and `top` set matching values."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    item = Dataset()
    for keyword in SPS_KEYS:
        setattr(item, keyword, Sequence() if keyword.endswith("Sequence") else None)
    for keyword, value in (sps or {}).items():
        setattr(item, keyword, value)
    ds.ScheduledProcedureStepSequence = Sequence([item])
    for keyword in TOP_KEYS:
        setattr(ds, keyword, Sequence() if keyword.endswith("Sequence") else None)
    for keyword, value in top.items():
        setattr(ds, keyword, value)
    return ds


def mwl_find(port: int, identifier: Dataset, *, calling: str = "MODALITY") -> tuple[list[Dataset], int]:
    return c_find(port, identifier, model=ModalityWorklistInformationFind, calling=calling)


def findscu_worklist(
    port: int, out: Path, *options: str, query: Path | None = None, calling: str = "FINDSCU"
) -> list[Dataset]:
    """DCMTK `findscu -W` (Modality Worklist) with `-k` options and/or a query file; responses extracted to files
    and read back."""
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["/usr/bin/findscu", "-W", "-aet", calling, "-aec", "VNPACS", "-X", "-od", str(out), *options,
         LOOPBACK, str(port), *([str(query)] if query else [])],
        capture_output=True, text=True, timeout=60, env=dcmtk_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [dcmread(p, force=True) for p in sorted(out.glob("rsp*.dcm"))]


def dump2dcm(dump: str, path: Path) -> Path:
    source = path.with_suffix(".dump")
    source.write_text(dump, encoding="utf-8")
    result = subprocess.run(
        ["/usr/bin/dump2dcm", "--write-dataset", str(source), str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return path


# ---- MPPS ------------------------------------------------------------------------------------------------------


def mpps_attributes(
    accession: str,
    study_uid: str,
    sps_id: str,
    *,
    name: str = "Nguyễn^Văn An",
    patient_id: str = "BN0001",
    modality: str = "CT",
    status: str = "IN PROGRESS",
) -> Dataset:
    """An N-CREATE attribute list with every Type 1 and Type 2 attribute of PS3.4 table F.7.2-1."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    item = Dataset()
    item.StudyInstanceUID = study_uid
    item.ReferencedStudySequence = Sequence()
    item.AccessionNumber = accession
    item.RequestedProcedureID = accession
    item.RequestedProcedureDescription = "Chụp CT ngực"
    item.ScheduledProcedureStepID = sps_id
    item.ScheduledProcedureStepDescription = "CT ngực"
    item.ScheduledProtocolCodeSequence = Sequence()
    ds.ScheduledStepAttributesSequence = Sequence([item])
    ds.PatientName = name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19850312"
    ds.PatientSex = "M"
    ds.ReferencedPatientSequence = Sequence()
    ds.PerformedProcedureStepID = "PPS" + accession[-13:]
    ds.PerformedStationAETitle = "CT01"
    ds.PerformedStationName = "CT Phòng 1"
    ds.PerformedLocation = "Tầng 2"
    ds.PerformedProcedureStepStartDate = "20261122"
    ds.PerformedProcedureStepStartTime = "091500"
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepDescription = "CT ngực"
    ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = Sequence()
    ds.PerformedProcedureStepEndDate = None
    ds.PerformedProcedureStepEndTime = None
    ds.Modality = modality
    ds.StudyID = ""
    ds.PerformedProtocolCodeSequence = Sequence()
    ds.PerformedSeriesSequence = Sequence()
    return ds


def mpps_final(status: str = "COMPLETED", *, images: list[tuple[str, str]] | None = None) -> Dataset:
    """An N-SET modification list ending the step, with one performed series."""
    mods = Dataset()
    mods.SpecificCharacterSet = "ISO_IR 192"
    mods.PerformedProcedureStepStatus = status
    mods.PerformedProcedureStepEndDate = "20261122"
    mods.PerformedProcedureStepEndTime = "093000"
    series = Dataset()
    series.PerformingPhysicianName = ""
    series.ProtocolName = "CT ngực"
    series.OperatorsName = ""
    series.SeriesInstanceUID = generate_uid()
    series.SeriesDescription = ""
    series.RetrieveAETitle = ""
    refs = []
    for sop_class, sop_uid in images or []:
        ref = Dataset()
        ref.ReferencedSOPClassUID = sop_class
        ref.ReferencedSOPInstanceUID = sop_uid
        refs.append(ref)
    series.ReferencedImageSequence = Sequence(refs)
    series.ReferencedNonImageCompositeSOPInstanceSequence = Sequence()
    mods.PerformedSeriesSequence = Sequence([series])
    return mods


@contextmanager
def mpps_association(port: int, *, calling: str = "CT01") -> Iterator[Any]:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate(LOOPBACK, port, ae_title="VNPACS")
    assert assoc.is_established
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def n_create(assoc: Any, ds: Dataset, uid: str) -> Dataset:
    status, _ = assoc.send_n_create(ds, ModalityPerformedProcedureStep, uid)
    return status


def n_set(assoc: Any, mods: Dataset, uid: str) -> Dataset:
    status, _ = assoc.send_n_set(mods, ModalityPerformedProcedureStep, uid)
    return status


# ---- Storage Commitment ---------------------------------------------------------------------------------------


def commitment_request(transaction: str, refs: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction
    items = []
    for sop_class, uid in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    ds.ReferencedSOPSequence = Sequence(items)
    return ds


class ReportReceiver:
    """Collects N-EVENT-REPORTs (event type, event information, the sending AE and association role)."""

    def __init__(self, answer: int = 0x0000) -> None:
        self.answer = answer
        self.reports: list[tuple[int, Dataset, str]] = []
        self.roles: list[tuple[str, bool | None, bool | None]] = []  # (abstract syntax, as SCU, as SCP) accepted
        self.arrived = threading.Event()

    def handler(self, event: Any) -> tuple[int, None]:
        info = event.event_information
        self.reports.append((int(event.event_type), info, str(event.assoc.requestor.ae_title).strip()))
        self.arrived.set()
        return self.answer, None

    def wait(self, timeout: float = 30.0) -> tuple[int, Dataset, str]:
        assert self.arrived.wait(timeout), "no N-EVENT-REPORT arrived"
        return self.reports[0]


def request_commitment(
    port: int,
    refs: list[tuple[str, str]],
    *,
    calling: str,
    wait: bool,
    transaction: str | None = None,
    answer: int = 0x0000,
) -> tuple[Dataset, str, ReportReceiver]:
    """N-ACTION; with `wait` the association stays open until the report arrives on it (answered with `answer`),
    else it is released as soon as the N-ACTION response is in (the report may then come on it or on a new one)."""
    receiver = ReportReceiver(answer)
    transaction = transaction or generate_uid()
    assoc = _commitment_association(port, calling, receiver)
    try:
        status, _ = assoc.send_n_action(
            commitment_request(transaction, refs), 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1"
        )
        if wait and status.Status == 0:
            receiver.wait()
    finally:
        assoc.release()
    return status, transaction, receiver


def request_commitment_and_leave(port: int, refs: list[tuple[str, str]], *, calling: str) -> tuple[str, ReportReceiver]:
    """N-ACTION immediately followed by A-RELEASE, without waiting for the response: the association is surely
    gone when the report is ready, so it has to come on a new association."""
    receiver = ReportReceiver()
    transaction = generate_uid()
    assoc = _commitment_association(port, calling, receiver)
    context = assoc._get_valid_context(StorageCommitmentPushModel, "", "scu")
    syntax = context.transfer_syntax[0]
    request = N_ACTION()
    request.MessageID = 1
    request.RequestedSOPClassUID = StorageCommitmentPushModel
    request.RequestedSOPInstanceUID = "1.2.840.10008.1.20.1.1"
    request.ActionTypeID = 1
    request.ActionInformation = BytesIO(
        encode(commitment_request(transaction, refs), syntax.is_implicit_VR, syntax.is_little_endian)
    )
    assoc.dimse.send_msg(request, context.context_id)
    assoc.release()
    return transaction, receiver


def _commitment_association(port: int, calling: str, receiver: ReportReceiver) -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(LOOPBACK, port, ae_title="VNPACS", evt_handlers=[(evt.EVT_N_EVENT_REPORT, receiver.handler)])
    assert assoc.is_established
    return assoc


@contextmanager
def commitment_scu_listener(aet: str, port: int) -> Iterator[ReportReceiver]:
    """A Storage Commitment SCU's listener: accepts the SCP role the report sender proposes."""
    receiver = ReportReceiver()
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    server = ae.start_server((LOOPBACK, port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, receiver.handler)])

    def on_accepted(event: Any) -> None:
        for cx in event.assoc.accepted_contexts:
            receiver.roles.append((str(cx.abstract_syntax), cx.as_scu, cx.as_scp))

    server.bind(evt.EVT_ACCEPTED, on_accepted)
    try:
        yield receiver
    finally:
        server.shutdown()


def reference_pairs(ds: Dataset, keyword: str) -> list[tuple[str, str]]:
    return [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID)) for i in ds.get(keyword) or []]


def failures(ds: Dataset) -> dict[str, int]:
    return {str(i.ReferencedSOPInstanceUID): int(i.FailureReason) for i in ds.get("FailedSOPSequence") or []}
