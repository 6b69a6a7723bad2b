"""HL7 v2 from the HIS over a real MLLP socket to the running server: orders, ADT updates and merges, bad input."""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import StartServer
from tests.data import patient, write_ct
from tests.mllp import MllpClient, ack_code, ack_text, message, msh, order, pid, segment, send
from tests.scu import store_files
from tests.services import VnpacsService

PN, PATIENT_ID, BIRTH_DATE = "00100010", "00100020", "00100030"


def orders(server: VnpacsService, **params: Any) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.base_url}/api/orders", params=params, timeout=30)
    assert response.status_code == 200, response.text
    return list(response.json())


def by_placer(server: VnpacsService, placer: str) -> dict[str, Any]:
    found = [o for o in orders(server, limit=1000) if o["placer_order_number"] == placer]
    assert len(found) == 1, found
    return found[0]


def studies(server: VnpacsService, **params: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.base_url}/dicom-web/studies", params=params, timeout=30)
    assert response.status_code in (200, 204), response.text
    return list(response.json()) if response.status_code == 200 else []


def err(ack: Any) -> str:
    return str(ack.segment("ERR"))


def test_new_order_is_placed_with_the_ihe_field_mapping(embedded: VnpacsService) -> None:
    msg = order(
        "ORM^O01^ORM_O01",
        "MSG-NEW-1",
        "NW",
        "HIS-NEW-1",
        pid("BN-NEW-1"),
        obr={
            3: "RIS-F1",
            16: "BS02^Phạm^Minh Đức",
            20: "SPS-NEW-1",
            27: "^^^202611220930^^S",
            31: "^Ho kéo dài, sốt",
            34: "KTV01&Lý&Thu Hà",
        },
    )
    ack = send(embedded.hl7_port, msg)
    assert ack_code(ack) == "AA", ack_text(ack)
    assert str(ack.segment("MSA").extract_field(1, 2)) == "MSG-NEW-1"  # MSA-2 echoes MSH-10
    assert str(ack.segment("MSH").extract_field(1, 9, 1, 1)) == "ACK"
    assert str(ack.segment("MSH").extract_field(1, 18)) == "UNICODE UTF-8"
    o = by_placer(embedded, "HIS-NEW-1")
    assert ack_text(ack) == f"order {o['accession_number']} placed"
    assert o["status"] == "SCHEDULED" and len(o["accession_number"]) <= 16 and o["study_instance_uid"]
    assert (o["patient_id"], o["issuer_of_patient_id"]) == ("BN-NEW-1", "BVBM")  # PID-3 PI with its authority
    assert (o["cccd"], o["bhyt"]) == ("001085012345", "DN4010123456789")  # PID-3 NI and SB
    assert (o["patient_name"], o["patient_birth_date"], o["patient_sex"]) == ("Nguyễn^Văn An", "19850312", "M")
    assert o["episode_id"] == "LK-HIS-NEW-1"  # PV1-19 → MA_LK
    assert o["referring_physician_name"] == "Trần^Thị Bình"  # PV1-8 wins over OBR-16
    assert o["filler_order_number"] == "RIS-F1"
    assert (o["procedure_code"], o["procedure_description"], o["procedure_code_scheme"]) == (
        "CT.NGUC",
        "CT ngực không tiêm thuốc",
        "BYT",
    )
    assert o["priority"] == "STAT"  # OBR-27.6 S
    assert o["reason_for_study"] == "Ho kéo dài, sốt"
    [step] = o["steps"]
    assert (step["modality"], step["sps_id"], step["start_date"], step["start_time"]) == (
        "CT",
        "SPS-NEW-1",
        "20261122",
        "0930",
    )
    assert step["performing_physician_name"] == "Lý^Thu Hà"  # OBR-34 technician
    assert step["description"] == "CT ngực không tiêm thuốc"


def test_the_same_message_twice_is_accepted_and_changes_nothing(embedded: VnpacsService) -> None:
    msg = order("ORM^O01", "MSG-DUP-1", "NW", "HIS-DUP-1", pid("BN-DUP-1"))
    with MllpClient(embedded.hl7_port) as client:  # both on one connection, as a HIS resends
        first, second = client.send(msg), client.send(msg)
    assert ack_code(first) == ack_code(second) == "AA"
    assert ack_text(second).endswith("unchanged")
    o = by_placer(embedded, "HIS-DUP-1")
    assert len(o["history"]) == 1
    assert len(orders(embedded, patient_id="BN-DUP-1")) == 1


def test_change_updates_the_order_and_keeps_its_history(embedded: VnpacsService) -> None:
    placed = send(embedded.hl7_port, order("ORM^O01", "MSG-XO-1", "NW", "HIS-XO-1", pid("BN-XO-1")))
    assert ack_code(placed) == "AA"
    before = by_placer(embedded, "HIS-XO-1")
    change = order(
        "ORM^O01",
        "MSG-XO-2",
        "XO",
        "HIS-XO-1",
        pid("BN-XO-1"),
        obr={4: "CT.NGUC.CQ^CT ngực có tiêm thuốc cản quang^BYT", 27: "^^^202611241400^^R"},
    )
    ack = send(embedded.hl7_port, change)
    assert ack_code(ack) == "AA", ack_text(ack)
    after = by_placer(embedded, "HIS-XO-1")
    assert after["id"] == before["id"] and after["accession_number"] == before["accession_number"]
    assert after["study_instance_uid"] == before["study_instance_uid"]
    assert after["procedure_description"] == "CT ngực có tiêm thuốc cản quang"
    assert (after["steps"][0]["start_date"], after["steps"][0]["start_time"]) == ("20261124", "1400")
    assert after["history"][-1]["source"] == "hl7" and "procedure_code" in after["history"][-1]["detail"]
    # SC (status changed) is taken as a change too; a change of an order the RIS does not have is an error.
    sc = send(embedded.hl7_port, change.replace("|XO|", "|SC|").replace("MSG-XO-2", "MSG-XO-3"))
    assert ack_code(sc) == "AA"
    unknown = send(embedded.hl7_port, change.replace("HIS-XO-1", "HIS-XO-NONE"))
    assert ack_code(unknown) == "AE" and "no order" in ack_text(unknown)
    assert "204" in err(unknown)


def test_cancel_and_discontinue(embedded: VnpacsService) -> None:
    for placer in ("HIS-CA-1", "HIS-DC-1"):
        assert ack_code(send(embedded.hl7_port, order("ORM^O01", placer, "NW", placer, pid("BN-CA-1")))) == "AA"
    cancel = order("ORM^O01", "MSG-CA-1", "CA", "HIS-CA-1", pid("BN-CA-1"), orc={16: "^Bệnh nhân từ chối"})
    ack = send(embedded.hl7_port, cancel)
    assert ack_code(ack) == "AA", ack_text(ack)
    cancelled = by_placer(embedded, "HIS-CA-1")
    assert cancelled["status"] == "CANCELLED" and {s["status"] for s in cancelled["steps"]} == {"CANCELLED"}
    assert cancelled["history"][-1]["detail"] == "Bệnh nhân từ chối"
    assert ack_code(send(embedded.hl7_port, cancel)) == "AA"  # sent again: nothing more happens
    assert len(by_placer(embedded, "HIS-CA-1")["history"]) == len(cancelled["history"])
    # A cancelled order cannot be changed.
    change = order("ORM^O01", "MSG-CA-2", "XO", "HIS-CA-1", pid("BN-CA-1"), obr={24: "MR"})
    refused = send(embedded.hl7_port, change)
    assert ack_code(refused) == "AE" and "CANCELLED" in ack_text(refused)
    assert by_placer(embedded, "HIS-CA-1")["steps"][0]["modality"] == "CT"
    dc = send(embedded.hl7_port, order("OMI^O23^OMI_O23", "MSG-DC-1", "DC", "HIS-DC-1", pid("BN-CA-1")))
    assert ack_code(dc) == "AA"
    assert by_placer(embedded, "HIS-DC-1")["status"] == "DISCONTINUED"
    unknown = send(embedded.hl7_port, cancel.replace("HIS-CA-1", "HIS-CA-NONE"))
    assert ack_code(unknown) == "AE" and "no order with placer order number HIS-CA-NONE" in ack_text(unknown)
    assert str(unknown.segment("ERR").extract_field(1, 3, 1, 1)) == "204"


def test_omi_with_tq1_and_ipc_gives_one_step_per_ipc(embedded: VnpacsService) -> None:
    study_uid = "1.2.840.113619.2.55.3.604688119.971.1700000000.123"
    msg = order(
        "OMI^O23^OMI_O23",
        "MSG-OMI-1",
        "NW",
        "HIS-OMI-1",
        pid("BN-OMI-1", "Võ^Thị Hồng", cccd="079301000001", birth="20010101", sex="F", bhyt=""),
        version="2.8",
        obr={24: "", 18: "IGNORED-18"},
        extra=[
            segment("TQ1", {1: "1", 7: "20261201143000+0700", 9: "A"}),
            segment("IPC", {1: "ACC-OMI-1", 2: "RP-OMI-1", 3: study_uid, 4: "SPS-OMI-1", 5: "CT", 9: "CT_AE_01"}),
            segment("IPC", {1: "ACC-OMI-1", 2: "RP-OMI-1", 3: study_uid, 4: "SPS-OMI-2", 5: "MR", 9: "MR_AE_01"}),
        ],
    )
    ack = send(embedded.hl7_port, msg)
    assert ack_code(ack) == "AA", ack_text(ack)
    o = by_placer(embedded, "HIS-OMI-1")
    assert o["accession_number"] == "ACC-OMI-1"  # IPC-1 wins over OBR-18
    assert (o["study_instance_uid"], o["requested_procedure_id"]) == (study_uid, "RP-OMI-1")
    assert o["priority"] == "HIGH"  # TQ1-9 A (ASAP)
    assert o["patient_sex"] == "F" and o["cccd"] == "079301000001" and o["bhyt"] == ""
    assert [
        (s["sps_id"], s["modality"], s["station_ae_title"], s["start_date"], s["start_time"]) for s in o["steps"]
    ] == [
        ("SPS-OMI-1", "CT", "CT_AE_01", "20261201", "143000"),
        ("SPS-OMI-2", "MR", "MR_AE_01", "20261201", "143000"),
    ]


def test_omg_o19_placer_order_of_version_2_5_1(embedded: VnpacsService) -> None:
    """IHE RAD-2 in HL7 2.5.1 places orders as OMG^O19 (ORC, TQ1, OBR)."""
    tq1 = segment("TQ1", {1: "1", 7: "202612051000", 9: "R"})
    msg = order("OMG^O19^OMG_O19", "MSG-OMG-1", "NW", "HIS-OMG-1", pid("BN-OMG-1"), obr={24: "US"}, extra=[tq1])
    # TQ1 belongs before OBR in OMG; the order group takes it wherever it stands after ORC.
    ack = send(embedded.hl7_port, msg)
    assert ack_code(ack) == "AA", ack_text(ack)
    o = by_placer(embedded, "HIS-OMG-1")
    assert [(s["modality"], s["start_date"], s["start_time"]) for s in o["steps"]] == [("US", "20261205", "1000")]


def test_version_2_3_with_zds_and_accession_in_obr_18(embedded: VnpacsService) -> None:
    study_uid = "1.2.392.200036.9116.2.6.1.48.1214245415.1700000001.1"
    msg = order(
        "ORM^O01",
        "MSG-23-1",
        "NW",
        "HIS-23-1",
        pid("BN-23-1"),
        version="2.3",
        charset="",
        obr={18: "ACC-23-1", 19: "RP-23-1"},
        extra=[segment("ZDS", {1: f"{study_uid}^100^Application^DICOM"})],
    )
    ack = send(embedded.hl7_port, msg)
    assert ack_code(ack) == "AA", ack_text(ack)
    o = by_placer(embedded, "HIS-23-1")
    assert (o["accession_number"], o["study_instance_uid"], o["requested_procedure_id"]) == (
        "ACC-23-1",
        study_uid,
        "RP-23-1",
    )
    # Errors are answered in the message's version: ERR-1 (code and location) before 2.5.
    bad = send(embedded.hl7_port, msg.replace("HIS-23-1", "HIS-23-2").replace("ACC-23-1", "A" * 17))
    assert ack_code(bad) == "AE" and "16" in ack_text(bad)
    assert str(bad.segment("ERR").extract_field(1, 1, 1, 1)) == "OBR"
    assert str(bad.segment("ERR").extract_field(1, 1, 1, 4, 1)) == "102"


def test_invalid_cccd_is_refused_and_nothing_is_stored(embedded: VnpacsService) -> None:
    for cccd, why in [("00108501234", "12 digits"), ("001185012345", "sex"), ("001084012345", "birth year")]:
        msg = order("ORM^O01", "MSG-BAD-1", "NW", "HIS-BAD-1", pid("BN-BAD-1", cccd=cccd))
        ack = send(embedded.hl7_port, msg)
        assert ack_code(ack) == "AE" and why in ack_text(ack)
        assert str(ack.segment("ERR").extract_field(1, 2, 1, 1)) == "PID"
        assert str(ack.segment("ERR").extract_field(1, 2, 1, 3)) == "3"
        assert str(ack.segment("ERR").extract_field(1, 4)) == "E"
    no_patient_id = order("ORM^O01", "MSG-BAD-2", "NW", "HIS-BAD-1", segment("PID", {1: "1", 5: "Ai^Đó"}))
    ack = send(embedded.hl7_port, no_patient_id)
    assert ack_code(ack) == "AE" and "PID-3" in ack_text(ack)
    no_modality = order("ORM^O01", "MSG-BAD-3", "NW", "HIS-BAD-1", pid("BN-BAD-1"), obr={24: ""})
    ack = send(embedded.hl7_port, no_modality)
    assert ack_code(ack) == "AE" and "modality" in ack_text(ack)
    assert orders(embedded, patient_id="BN-BAD-1") == []


def test_malformed_and_unsupported_messages_are_rejected(embedded: VnpacsService) -> None:
    good = order("ORM^O01", "MSG-AR-OK", "NW", "HIS-AR-1", pid("BN-AR-1"))
    with MllpClient(embedded.hl7_port) as client:
        garbage = client.send(b"this is not HL7 at all")
        assert ack_code(garbage) == "AR" and "MSH" in ack_text(garbage)
        unsupported = client.send(good.replace("ORM^O01", "ORU^R01"))
        assert ack_code(unsupported) == "AR" and "ORU^R01" in ack_text(unsupported)
        assert str(unsupported.segment("ERR").extract_field(1, 3, 1, 1)) == "200"
        event = client.send(good.replace("ORM^O01", "ADT^A04"))
        assert ack_code(event) == "AR" and str(event.segment("ERR").extract_field(1, 3, 1, 1)) == "201"
        old = client.send(good.replace("|2.5.1|", "|2.2|"))
        assert ack_code(old) == "AR" and "version" in ack_text(old)
        assert str(old.segment("ERR").extract_field(1, 3, 1, 1)) == "203"
        charset = client.send(good.replace("UNICODE UTF-8", "KLINGON"))
        assert ack_code(charset) == "AR" and "character set" in ack_text(charset)
        not_utf8 = client.send(good.replace("Nguyễn", "Nguy\udcff\udcfen").encode("utf-8", "surrogateescape"))
        assert ack_code(not_utf8) == "AR" and "UTF-8" in ack_text(not_utf8)
        unframed = hl7_parse(client.send_raw(b"MSH|^~\\&|no start byte\x1c\r"))
        assert ack_code(unframed) == "AR"
        control = client.send(good.replace("|NW|", "|ZZ|"))
        assert ack_code(control) == "AE" and "order control" in ack_text(control)
        # The connection is still good, and nothing of the above was stored.
        assert orders(embedded, patient_id="BN-AR-1") == []
        assert ack_code(client.send(good)) == "AA"
    assert len(orders(embedded, patient_id="BN-AR-1")) == 1


def hl7_parse(raw: bytes) -> Any:
    import hl7

    return hl7.parse(raw.decode())


def test_vietnamese_names_in_utf8_and_other_character_sets(embedded: VnpacsService) -> None:
    decomposed = unicodedata.normalize("NFD", "Đặng^Thị Ngọc Hường")
    assert decomposed != "Đặng^Thị Ngọc Hường"
    msg = order("ORM^O01", "MSG-UTF-1", "NW", "HIS-UTF-1", pid("BN-UTF-1", decomposed, cccd="", bhyt=""))
    assert ack_code(send(embedded.hl7_port, msg)) == "AA"
    o = by_placer(embedded, "HIS-UTF-1")
    assert o["patient_name"] == "Đặng^Thị Ngọc Hường"  # stored NFC
    assert [x["id"] for x in orders(embedded, patient_name="dang^thi ngoc")] == [o["id"]]  # accent-insensitive
    # No MSH-18: UTF-8 all the same.
    plain = order(
        "ORM^O01", "MSG-UTF-2", "NW", "HIS-UTF-2", pid("BN-UTF-2", "Bùi^Quốc Việt", cccd="", bhyt=""), charset=""
    )
    assert ack_code(send(embedded.hl7_port, plain)) == "AA"
    assert by_placer(embedded, "HIS-UTF-2")["patient_name"] == "Bùi^Quốc Việt"
    # ISO 8859-1 (a Western European HIS): decoded by MSH-18, answered in the same character set.
    latin = order(
        "ORM^O01",
        "MSG-LAT-1",
        "NW",
        "HIS-LAT-1",
        pid("BN-LAT-1", "Müller^José", cccd="", bhyt=""),
        charset="8859/1",
        obr={4: "CT.NGUC^CT thorax^BYT"},
        pv1={8: "BS09^Lefèvre^Noël"},
    )
    ack = send(embedded.hl7_port, latin.encode("latin-1"), encoding="latin-1")
    assert ack_code(ack) == "AA" and str(ack.segment("MSH").extract_field(1, 18)) == "8859/1"
    assert by_placer(embedded, "HIS-LAT-1")["patient_name"] == "Müller^José"


def test_a08_updates_the_orders_and_the_stored_studies(embedded: VnpacsService, tmp_path: Path) -> None:
    who = patient("Lê^Văn Cũ", "BN-A08-1")  # stored with IssuerOfPatientID VNPACS-SYNTH
    stored = store_files(embedded.dicom_port, [write_ct(tmp_path, who=who, study="a08", AccessionNumber="X-A08")])
    assert all(s.Status == 0 for s in stored.values())
    assert ack_code(send(embedded.hl7_port, order("ORM^O01", "A08-O", "NW", "HIS-A08-1", pid_a08("Lê^Văn Cũ")))) == "AA"
    [study] = studies(embedded, PatientID="BN-A08-1")
    assert study[PN]["Value"] == [{"Alphabetic": "Lê^Văn Cũ"}]
    update = message(msh("ADT^A08^ADT_A01", "MSG-A08-1"), pid_a08("Lê^Văn Mới", birth="19800202"), "PV1|1|O")
    ack = send(embedded.hl7_port, update)
    assert ack_code(ack) == "AA", ack_text(ack)
    assert "1 order(s) and 1 stored patient record(s)" in ack_text(ack)
    [study] = studies(embedded, PatientID="BN-A08-1")
    assert study[PN]["Value"] == [{"Alphabetic": "Lê^Văn Mới"}]
    assert study[BIRTH_DATE]["Value"] == ["19800202"]
    assert [s[PATIENT_ID]["Value"] for s in studies(embedded, PatientName="le^van moi")] == [["BN-A08-1"]]
    o = by_placer(embedded, "HIS-A08-1")
    assert (o["patient_name"], o["patient_birth_date"]) == ("Lê^Văn Mới", "19800202")
    assert "ADT^A08" in o["history"][-1]["detail"]
    # An A08 with an invalid CCCD changes nothing.
    bad = message(msh("ADT^A08", "MSG-A08-2"), pid_a08("Lê^Văn Sai", cccd="001180012345"), "PV1|1|O")
    ack = send(embedded.hl7_port, bad)
    assert ack_code(ack) == "AE" and "CCCD" in ack_text(ack)
    assert studies(embedded, PatientID="BN-A08-1")[0][PN]["Value"] == [{"Alphabetic": "Lê^Văn Mới"}]
    assert by_placer(embedded, "HIS-A08-1")["patient_name"] == "Lê^Văn Mới"
    # A patient the RIS has never seen: accepted, nothing to change.
    stranger = message(msh("ADT^A08", "MSG-A08-3"), pid("BN-A08-NONE", "Ai^Đó", cccd="", bhyt=""))
    ack = send(embedded.hl7_port, stranger)
    assert ack_code(ack) == "AA" and "0 order(s) and 0 stored" in ack_text(ack)


def pid_a08(name: str, *, cccd: str = "001080012345", birth: str = "19800101") -> str:
    return pid("BN-A08-1", name, issuer="VNPACS-SYNTH", cccd=cccd, birth=birth)


def test_a40_merges_orders_and_stored_studies(embedded: VnpacsService, tmp_path: Path) -> None:
    old = patient("Hoàng^Văn Cũ", "BN-A40-OLD")
    path = write_ct(tmp_path, who=old, study="a40", AccessionNumber="X-A40")
    assert all(s.Status == 0 for s in store_files(embedded.dicom_port, [path]).values())
    old_pid = pid("BN-A40-OLD", "Hoàng^Văn Cũ", issuer="VNPACS-SYNTH", cccd="001080012345", birth="19800101")
    assert ack_code(send(embedded.hl7_port, order("ORM^O01", "A40-O", "NW", "HIS-A40-1", old_pid))) == "AA"
    merge = message(
        msh("ADT^A40^ADT_A39", "MSG-A40-1"),
        pid("BN-A40-NEW", "Hoàng^Văn Mới", issuer="VNPACS-SYNTH", cccd="001080012345", birth="19800101"),
        segment("MRG", {1: "BN-A40-OLD^^^VNPACS-SYNTH^PI"}),
    )
    ack = send(embedded.hl7_port, merge)
    assert ack_code(ack) == "AA", ack_text(ack)
    assert "BN-A40-OLD merged into BN-A40-NEW" in ack_text(ack)
    assert studies(embedded, PatientID="BN-A40-OLD") == []
    [study] = studies(embedded, PatientID="BN-A40-NEW")
    assert study[PN]["Value"] == [{"Alphabetic": "Hoàng^Văn Mới"}]
    o = by_placer(embedded, "HIS-A40-1")
    assert (o["patient_id"], o["patient_name"]) == ("BN-A40-NEW", "Hoàng^Văn Mới")
    assert orders(embedded, patient_id="BN-A40-OLD") == []
    assert ack_code(send(embedded.hl7_port, merge)) == "AA"  # again: nothing left to move
    assert len(studies(embedded, PatientID="BN-A40-NEW")) == 1
    no_mrg = message(msh("ADT^A40", "MSG-A40-2"), pid("BN-A40-NEW", "Hoàng^Văn Mới", cccd="", bhyt=""))
    ack = send(embedded.hl7_port, no_mrg)
    assert ack_code(ack) == "AE" and "MRG" in ack_text(ack)


def test_orders_and_a08_on_postgresql(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server("fs-pg")
    who = patient("Phan^Thị Cũ", "BN-PG-1")
    assert all(s.Status == 0 for s in store_files(server.dicom_port, [write_ct(tmp_path, who=who)]).values())
    pg_pid = pid("BN-PG-1", "Phan^Thị Cũ", issuer="VNPACS-SYNTH", cccd="001080012345", birth="19800101")
    msg = order("ORM^O01", "MSG-PG-1", "NW", "HIS-PG-1", pg_pid)
    with MllpClient(server.hl7_port) as client:
        assert [ack_code(client.send(msg)) for _ in range(2)] == ["AA", "AA"]
        update = message(msh("ADT^A08", "MSG-PG-2"), pg_pid.replace("Phan^Thị Cũ", "Phan^Thị Mới"))
        assert ack_code(client.send(update)) == "AA"
        cancel = msg.replace("|NW|", "|CA|")
        assert ack_code(client.send(cancel)) == "AA"
    [o] = orders(server, patient_id="BN-PG-1")
    assert (o["status"], o["patient_name"]) == ("CANCELLED", "Phan^Thị Mới")
    [study] = studies(server, PatientID="BN-PG-1")
    assert study[PN]["Value"] == [{"Alphabetic": "Phan^Thị Mới"}]
