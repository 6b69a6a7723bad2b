"""Modality Worklist SCP against DCMTK findscu -W and pynetdicom, on a real `vnpacs serve` (embedded default)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.mllp import ack_code, ack_text, order, pid, segment, send
from tests.ris_scu import (
    SPS_KEYS,
    TOP_KEYS,
    cancel,
    dump2dcm,
    findscu_worklist,
    get_order,
    mpps_association,
    mpps_attributes,
    mwl_find,
    n_create,
    order_in,
    place,
    worklist_identifier,
)
from tests.services import VnpacsService, start_vnpacs
from worklist.models import CANCELLED, IN_PROGRESS


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VnpacsService]:
    svc = start_vnpacs({"VNPACS_ASCII_AES": "ASCIIMOD,OLDCT"}, tmp_path_factory.mktemp("mwl"))
    try:
        yield svc
    finally:
        svc.stop()


def assert_every_return_key(rsp: Dataset) -> None:
    missing = [k for k in TOP_KEYS if k not in rsp]
    item = rsp.ScheduledProcedureStepSequence[0]
    missing += [f"SPS>{k}" for k in SPS_KEYS if k not in item]
    assert not missing, missing


# ---- DCMTK findscu -W -------------------------------------------------------------------------------------------

# Built like DCMTK's examples/wlistqry/*.dump: every Type 1 and 2 return key of PS3.4 table K.6-1, zero length,
# with matching values on the Scheduled Procedure Step's modality and station and on the date.
WLISTQRY = """\
#
# Worklist query
#
(0008,0005) CS [ISO_IR 192]                             # SpecificCharacterSet
(0008,0050) SH []                                       # AccessionNumber
(0008,0090) PN []                                       # ReferringPhysicianName
(0008,1110) SQ (Sequence with explicit length #=0)      # ReferencedStudySequence
(fffe,e0dd) na (SequenceDelimitationItem for re-encod.) # SequenceDelimitationItem
(0008,1120) SQ (Sequence with explicit length #=0)      # ReferencedPatientSequence
(fffe,e0dd) na (SequenceDelimitationItem for re-encod.) # SequenceDelimitationItem
(0010,0010) PN []                                       # PatientName
(0010,0020) LO [{patient_id}]                           # PatientID
(0010,0021) LO []                                       # IssuerOfPatientID
(0010,0030) DA []                                       # PatientBirthDate
(0010,0040) CS []                                       # PatientSex
(0010,1002) SQ (Sequence with explicit length #=0)      # OtherPatientIDsSequence
(fffe,e0dd) na (SequenceDelimitationItem for re-encod.) # SequenceDelimitationItem
(0010,1030) DS []                                       # PatientWeight
(0010,2000) LO []                                       # MedicalAlerts
(0010,2110) LO []                                       # Allergies
(0010,21c0) US []                                       # PregnancyStatus
(0020,000d) UI []                                       # StudyInstanceUID
(0032,1032) PN []                                       # RequestingPhysician
(0032,1060) LO []                                       # RequestedProcedureDescription
(0032,1064) SQ                                          # RequestedProcedureCodeSequence
  (fffe,e000) na                                          # Item
    (0008,0100) SH []                                       # CodeValue
    (0008,0102) SH []                                       # CodingSchemeDesignator
    (0008,0104) LO []                                       # CodeMeaning
  (fffe,e00d) na (ItemDelimitationItem for re-encoding)   # ItemDelimitationItem
(fffe,e0dd) na (SequenceDelimitationItem for re-encod.) # SequenceDelimitationItem
(0038,0010) LO []                                       # AdmissionID
(0038,0050) LO []                                       # SpecialNeeds
(0038,0300) LO []                                       # CurrentPatientLocation
(0038,0500) LO []                                       # PatientState
(0040,0100) SQ                                          # ScheduledProcedureStepSequence
  (fffe,e000) na                                          # Item
    (0008,0060) CS [{modality}]                             # Modality
    (0032,1070) LO []                                       # RequestedContrastAgent
    (0040,0001) AE [{station}]                              # ScheduledStationAETitle
    (0040,0002) DA [{date}]                                 # ScheduledProcedureStepStartDate
    (0040,0003) TM []                                       # ScheduledProcedureStepStartTime
    (0040,0006) PN []                                       # ScheduledPerformingPhysicianName
    (0040,0007) LO []                                       # ScheduledProcedureStepDescription
    (0040,0008) SQ (Sequence with explicit length #=0)      # ScheduledProtocolCodeSequence
    (fffe,e0dd) na (SequenceDelimitationItem for re-encod.) # SequenceDelimitationItem
    (0040,0009) SH []                                       # ScheduledProcedureStepID
    (0040,0010) SH []                                       # ScheduledStationName
    (0040,0011) SH []                                       # ScheduledProcedureStepLocation
    (0040,0012) LO []                                       # PreMedication
    (0040,0020) CS []                                       # ScheduledProcedureStepStatus
  (fffe,e00d) na (ItemDelimitationItem for re-encoding)   # ItemDelimitationItem
(fffe,e0dd) na (SequenceDelimitationItem for re-encod.) # SequenceDelimitationItem
(0040,1001) SH []                                       # RequestedProcedureID
(0040,1003) SH []                                       # RequestedProcedurePriority
(0040,1004) LO []                                       # PatientTransportArrangements
(0040,3001) LO []                                       # ConfidentialityConstraintOnPatientDataDescription
"""


def test_findscu_worklist_query_file_returns_every_key_in_utf8(server: VnpacsService, tmp_path: Path) -> None:
    order = place(server, order_in("MWL-DCMTK-1", patient_id="BN-DCMTK", station="CT01", date="20261122"))
    place(server, order_in("MWL-DCMTK-2", patient_id="BN-DCMTK", modality="MR", station="MR01"))
    place(server, order_in("MWL-DCMTK-3", patient_id="BN-DCMTK", date="20261123"))
    query = dump2dcm(
        WLISTQRY.format(patient_id="BN-DCMTK", modality="CT", station="CT01", date="20261122"), tmp_path / "q.dcm"
    )
    responses = findscu_worklist(server.dicom_port, tmp_path / "rsp", query=query)
    assert len(responses) == 1, [r.AccessionNumber for r in responses]
    rsp = responses[0]
    assert_every_return_key(rsp)
    assert rsp.SpecificCharacterSet == "ISO_IR 192"
    assert str(rsp.PatientName) == "Nguyễn^Văn An"
    assert rsp.AccessionNumber == "MWL-DCMTK-1"
    assert rsp.StudyInstanceUID == order.study_instance_uid
    assert rsp.RequestedProcedureID == "MWL-DCMTK-1"
    assert rsp.RequestedProcedureDescription == "Chụp CT ngực không tiêm thuốc"
    assert str(rsp.ReferringPhysicianName) == "Lê^Văn Cường"
    assert rsp.AdmissionID == "LK-MWL-DCMTK-1"
    assert rsp.IssuerOfPatientID == "BV-BACHMAI"
    assert {(i.PatientID, i.IssuerOfPatientID) for i in rsp.OtherPatientIDsSequence} == {
        ("001085012345", "BCA"),
        ("DN4010123456789", "BHXH"),
    }
    code = rsp.RequestedProcedureCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("18.0041.0001", "BYT-DVKT")
    sps = rsp.ScheduledProcedureStepSequence[0]
    assert (sps.Modality, sps.ScheduledStationAETitle, sps.ScheduledProcedureStepStartDate) == (
        "CT",
        "CT01",
        "20261122",
    )
    assert sps.ScheduledProcedureStepID == order.steps[0].sps_id
    assert str(sps.ScheduledPerformingPhysicianName) == "Trần^Thị Bình"
    assert sps.ScheduledStationName == "CT Phòng 1"
    assert sps.ScheduledProcedureStepStatus == "SCHEDULED"
    # Type 2 keys the RIS does not know come back empty, never missing.
    assert rsp.PatientTransportArrangements == "" and rsp.PregnancyStatus is None and sps.PreMedication == ""
    # Nothing that was not asked for (PS3.4 K.4.1.1.3.2).
    assert "ReasonForTheRequestedProcedure" not in rsp and "PlacerOrderNumberImagingServiceRequest" not in rsp


def test_findscu_keys_match_on_the_scheduled_procedure_step(server: VnpacsService, tmp_path: Path) -> None:
    place(server, order_in("MWL-K-CT", patient_id="BN-KEYS", station="CT02", date="20261201", time="080000"))
    place(server, order_in("MWL-K-CT2", patient_id="BN-KEYS", station="CT02", date="20261201", time="140000"))
    place(server, order_in("MWL-K-MR", patient_id="BN-KEYS", modality="MR", station="MR02", date="20261201"))

    def keys(*extra: str) -> list[str]:
        args = ["-k", "PatientID=BN-KEYS", "-k", "AccessionNumber", "-k", "PatientName", "-k", "SpecificCharacterSet"]
        for key in extra:
            args += ["-k", key]
        return args

    ct = findscu_worklist(server.dicom_port, tmp_path / "ct", *keys("ScheduledProcedureStepSequence[0].Modality=CT"))
    assert sorted(r.AccessionNumber for r in ct) == ["MWL-K-CT", "MWL-K-CT2"]
    morning = findscu_worklist(
        server.dicom_port,
        tmp_path / "morning",
        *keys(
            "ScheduledProcedureStepSequence[0].ScheduledStationAETitle=CT02",
            "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20261201",
            "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime=0700-1200",
        ),
    )
    assert [r.AccessionNumber for r in morning] == ["MWL-K-CT"]
    assert str(morning[0].PatientName) == "Nguyễn^Văn An" and morning[0].SpecificCharacterSet == "ISO_IR 192"
    mr = findscu_worklist(
        server.dicom_port, tmp_path / "mr", *keys("ScheduledProcedureStepSequence[0].ScheduledStationAETitle=MR02")
    )
    assert [r.AccessionNumber for r in mr] == ["MWL-K-MR"]


def test_order_placed_by_hl7_comes_back_with_every_key_in_utf8_and_in_ascii(
    server: VnpacsService, tmp_path: Path
) -> None:
    study_uid = "1.2.840.113619.2.55.3.604688119.971.1700000000.777"
    msg = order(
        "OMI^O23^OMI_O23",
        "MSG-MWL-HL7",
        "NW",
        "HIS-MWL-HL7",
        pid("BN-MWL-HL7", "Đỗ^Thị Hằng", cccd="079301000001", birth="20010101", sex="F"),
        obr={24: "", 34: "KTV01&Lý&Thu Hà"},
        extra=[
            segment("TQ1", {1: "1", 7: "20261205083000+0700", 9: "R"}),
            segment("IPC", {1: "ACC-MWL-HL7", 2: "RP-MWL-HL7", 3: study_uid, 4: "SPS-MWL-HL7", 5: "CT", 9: "CT_HL7"}),
        ],
    )
    ack = send(server.hl7_port, msg)
    assert ack_code(ack) == "AA", ack_text(ack)

    query = dump2dcm(
        WLISTQRY.format(patient_id="BN-MWL-HL7", modality="CT", station="CT_HL7", date="20261205"), tmp_path / "q.dcm"
    )
    [rsp] = findscu_worklist(server.dicom_port, tmp_path / "utf8", query=query)
    assert_every_return_key(rsp)
    assert rsp.SpecificCharacterSet == "ISO_IR 192"
    assert (str(rsp.PatientName), rsp.PatientSex, rsp.PatientBirthDate) == ("Đỗ^Thị Hằng", "F", "20010101")
    assert (rsp.AccessionNumber, rsp.RequestedProcedureID, rsp.StudyInstanceUID) == (
        "ACC-MWL-HL7",
        "RP-MWL-HL7",
        study_uid,
    )
    assert rsp.AdmissionID == "LK-HIS-MWL-HL7"
    assert str(rsp.ReferringPhysicianName) == "Trần^Thị Bình"
    assert {i.PatientID for i in rsp.OtherPatientIDsSequence} == {"079301000001", "DN4010123456789"}
    assert rsp.RequestedProcedureCodeSequence[0].CodeValue == "CT.NGUC"
    sps = rsp.ScheduledProcedureStepSequence[0]
    assert (sps.ScheduledProcedureStepID, sps.ScheduledStationAETitle, sps.ScheduledProcedureStepStartTime) == (
        "SPS-MWL-HL7",
        "CT_HL7",
        "083000",
    )
    assert str(sps.ScheduledPerformingPhysicianName) == "Lý^Thu Hà"

    [ascii_rsp] = findscu_worklist(server.dicom_port, tmp_path / "ascii", query=query, calling="OLDCT")
    assert_every_return_key(ascii_rsp)
    assert "SpecificCharacterSet" not in ascii_rsp
    assert str(ascii_rsp.PatientName) == "Do^Thi Hang"
    assert ascii_rsp.RequestedProcedureDescription == "CT nguc khong tiem thuoc"
    assert str(ascii_rsp.ScheduledProcedureStepSequence[0].ScheduledPerformingPhysicianName) == "Ly^Thu Ha"


# ---- pynetdicom -------------------------------------------------------------------------------------------------


def test_every_return_key_present_for_a_pynetdicom_query(server: VnpacsService) -> None:
    order = place(server, order_in("MWL-PY-ALL", patient_id="BN-PY-ALL"))
    matches, final = mwl_find(server.dicom_port, worklist_identifier(PatientID="BN-PY-ALL"))
    assert final == 0 and len(matches) == 1
    assert_every_return_key(matches[0])
    assert matches[0].StudyInstanceUID == order.study_instance_uid
    assert matches[0].SpecificCharacterSet == "ISO_IR 192"


def test_patient_name_matching_is_accent_and_case_insensitive(server: VnpacsService) -> None:
    place(server, order_in("MWL-NAME-1", patient_id="BN-NAME-1", name="Đặng^Thị Hoà", station="US01"))
    place(server, order_in("MWL-NAME-2", patient_id="BN-NAME-2", name="Nguyễn^Văn Đức", station="US01"))

    def names(query: str) -> list[str]:
        matches, final = mwl_find(
            server.dicom_port, worklist_identifier({"ScheduledStationAETitle": "US01"}, PatientName=query)
        )
        assert final == 0
        return sorted(str(m.PatientName) for m in matches)

    assert names("dang*") == ["Đặng^Thị Hoà"]
    assert names("ĐẶNG^THỊ HOÀ") == ["Đặng^Thị Hoà"]
    assert names("DANG^THI HOA") == ["Đặng^Thị Hoà"]
    assert names("*duc") == ["Nguyễn^Văn Đức"]
    assert names("ng?yen*") == ["Nguyễn^Văn Đức"]
    assert names("") == ["Nguyễn^Văn Đức", "Đặng^Thị Hoà"]
    assert names("tran*") == []


def test_date_range_station_and_physician_matching(server: VnpacsService) -> None:
    for accession, date, station in [
        ("MWL-D-1", "20261130", "DX01"),
        ("MWL-D-2", "20261201", "DX01"),
        ("MWL-D-3", "20261203", "DX01"),
        ("MWL-D-4", "20261201", "DX02"),
    ]:
        place(server, order_in(accession, patient_id="BN-DATES", modality="DX", station=station, date=date))

    def accessions(**sps: str) -> list[str]:
        matches, final = mwl_find(server.dicom_port, worklist_identifier(sps, PatientID="BN-DATES"))
        assert final == 0
        return sorted(m.AccessionNumber for m in matches)

    assert accessions(ScheduledProcedureStepStartDate="20261201-20261202") == ["MWL-D-2", "MWL-D-4"]
    assert accessions(ScheduledProcedureStepStartDate="-20261201") == ["MWL-D-1", "MWL-D-2", "MWL-D-4"]
    assert accessions(ScheduledProcedureStepStartDate="20261202-") == ["MWL-D-3"]
    assert accessions(ScheduledStationAETitle="DX02") == ["MWL-D-4"]
    assert accessions(ScheduledStationAETitle="DX01", ScheduledProcedureStepStartDate="20261201") == ["MWL-D-2"]
    assert accessions(Modality="CT") == []
    assert accessions(ScheduledPerformingPhysicianName="tran^thi*") == ["MWL-D-1", "MWL-D-2", "MWL-D-3", "MWL-D-4"]
    assert accessions(ScheduledPerformingPhysicianName="le*") == []


def test_accession_study_uid_and_requested_procedure_matching(server: VnpacsService) -> None:
    first = place(server, order_in("MWL-ID-1", patient_id="BN-IDS"))
    place(server, order_in("MWL-ID-2", patient_id="BN-IDS", requested_procedure_id="RP-42"))

    def accessions(**top: str) -> list[str]:
        matches, final = mwl_find(server.dicom_port, worklist_identifier(**top))
        assert final == 0
        return sorted(m.AccessionNumber for m in matches)

    assert accessions(AccessionNumber="MWL-ID-1") == ["MWL-ID-1"]
    assert accessions(StudyInstanceUID=first.study_instance_uid) == ["MWL-ID-1"]
    assert accessions(RequestedProcedureID="RP-42") == ["MWL-ID-2"]
    assert accessions(AccessionNumber="MWL-ID-*", PatientID="BN-IDS") == ["MWL-ID-1", "MWL-ID-2"]


def test_ascii_mode_for_listed_calling_aes(server: VnpacsService) -> None:
    place(server, order_in("MWL-ASCII", patient_id="BN-ASCII", name="Đặng^Thị Hoà", physician="Đỗ^Đức Long"))
    identifier = worklist_identifier(PatientID="BN-ASCII")
    matches, final = mwl_find(server.dicom_port, identifier, calling="ASCIIMOD")
    assert final == 0 and len(matches) == 1
    rsp = matches[0]
    assert "SpecificCharacterSet" not in rsp
    assert str(rsp.PatientName) == "Dang^Thi Hoa"
    assert str(rsp.ScheduledProcedureStepSequence[0].ScheduledPerformingPhysicianName) == "Do^Duc Long"
    assert rsp.RequestedProcedureDescription == "Chup CT nguc khong tiem thuoc"
    assert_every_return_key(rsp)
    # The bytes on the wire were ASCII: pydicom decoded them without a character set.
    assert all(str(v).isascii() for v in (rsp.PatientName, rsp.ReferringPhysicianName, rsp.RequestingPhysician))
    # Another AE gets UTF-8 for the same item.
    utf8, _ = mwl_find(server.dicom_port, identifier, calling="NEWCT")
    assert str(utf8[0].PatientName) == "Đặng^Thị Hoà" and utf8[0].SpecificCharacterSet == "ISO_IR 192"


def test_only_scheduled_steps_of_live_orders(server: VnpacsService) -> None:
    live = place(server, order_in("MWL-ST-LIVE", patient_id="BN-STATUS"))
    started = place(server, order_in("MWL-ST-STARTED", patient_id="BN-STATUS"))
    cancelled = place(server, order_in("MWL-ST-CANCEL", patient_id="BN-STATUS"))
    cancel(server, cancelled.pk, "patient left")
    with mpps_association(server.dicom_port) as assoc:
        attrs = mpps_attributes(started.accession_number, started.study_instance_uid, started.steps[0].sps_id)
        assert n_create(assoc, attrs, generate_uid()).Status == 0
    assert get_order(server, cancelled.pk).status == CANCELLED
    assert get_order(server, started.pk).status == IN_PROGRESS

    def accessions(sps: dict[str, str] | None = None) -> list[str]:
        matches, final = mwl_find(server.dicom_port, worklist_identifier(sps, PatientID="BN-STATUS"))
        assert final == 0
        return sorted(m.AccessionNumber for m in matches)

    assert accessions() == [live.accession_number]
    assert accessions({"ScheduledProcedureStepStatus": "STARTED"}) == [started.accession_number]
    assert accessions({"ScheduledProcedureStepStatus": "SCHEDULED\\STARTED"}) == sorted(
        [live.accession_number, started.accession_number]
    )


def test_answers_hold_exactly_the_requested_keys(server: VnpacsService) -> None:
    place(server, order_in("MWL-KEYS", patient_id="BN-ONLY"))
    ds = Dataset()
    ds.PatientID = "BN-ONLY"
    ds.AccessionNumber = ""
    ds.ScheduledProcedureStepSequence = []  # zero items: universal, the whole sequence comes back
    matches, final = mwl_find(server.dicom_port, ds)
    assert final == 0 and len(matches) == 1
    rsp = matches[0]
    assert {e.keyword for e in rsp} == {
        "SpecificCharacterSet",
        "PatientID",
        "AccessionNumber",
        "ScheduledProcedureStepSequence",
    }
    item = rsp.ScheduledProcedureStepSequence[0]
    assert all(k in item for k in SPS_KEYS)

    item_query = Dataset()
    item_query.Modality = "CT"
    item_query.ScheduledProcedureStepID = ""
    ds.ScheduledProcedureStepSequence = [item_query]
    ds.PatientName = ""
    matches, _ = mwl_find(server.dicom_port, ds)
    item = matches[0].ScheduledProcedureStepSequence[0]
    assert {e.keyword for e in item} == {"Modality", "ScheduledProcedureStepID"}
    assert item.ScheduledProcedureStepID == "MWL-KEYS.1"


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_malformed_date_range_is_refused(server: VnpacsService) -> None:
    matches, final = mwl_find(
        server.dicom_port, worklist_identifier({"ScheduledProcedureStepStartDate": "2026-11-22"}, PatientID="X")
    )
    assert matches == [] and final == 0xA900
