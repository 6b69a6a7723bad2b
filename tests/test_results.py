"""End to end, as a hospital runs it: HIS order by HL7 → worklist → MPPS → storescu → IMAGES_AVAILABLE → signed
FINAL report → ORU^R01 at the HIS (down at first: the retry queue proves itself) → XML4 rows and FHIR resources."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import hl7
import httpx
from pydicom.uid import generate_uid

from tests.conftest import StartServer
from tests.data import patient, write_ct
from tests.mllp import FS, VT, ack_code, ack_text, order, pid, send
from tests.ris_scu import mpps_association, mpps_attributes, mpps_final, mwl_find, n_create, n_set, worklist_identifier
from tests.scu import dcmtk_env
from tests.services import LOOPBACK, VnpacsService, free_ports

CONCLUSION = "Nốt mờ thùy trên phổi phải, đường kính 8 mm. Đề nghị chụp lại sau 3 tháng."


class HisListener:
    """The HIS's result interface: an MLLP server that records what it receives and answers AA."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[str] = []
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, self.port))
        sock.listen()
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while FS + b"\r" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                text = data.split(VT, 1)[-1].split(FS, 1)[0].decode("utf-8")
                self.received.append(text)
                control = hl7.parse(text).segment("MSH").extract_field(1, 10)
                ack = f"MSH|^~\\&|HIS|BVBM|VNPACS|BVBM|20261122||ACK^R01|A{control}|P|2.5\rMSA|AA|{control}\r"
                conn.sendall(VT + ack.encode() + FS + b"\r")

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()


def wait_for(what: str, check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def the_order(server: VnpacsService, accession: str) -> dict[str, Any]:
    (found,) = httpx.get(f"{server.base_url}/api/orders", params={"accession": accession}).json()
    return found  # type: ignore[no-any-return]


def test_order_to_report_to_his(start_server: StartServer, tmp_path: Path) -> None:
    (his_port,) = free_ports(1)
    server = start_server("fs-sqlite", VNPACS_HIS_ORU_URL=f"mllp://{LOOPBACK}:{his_port}")
    base = server.base_url

    # 1. The HIS orders a CT by HL7.
    ack = send(server.hl7_port, order("ORM^O01^ORM_O01", "E2E-MSG-1", "NW", "E2E-1", pid("BN-E2E", "Hoàng^Văn Đức"),
                                      obr={18: "E2EACC1", 24: "CT"}))  # fmt: skip
    assert ack_code(ack) == "AA", ack_text(ack)
    placed = the_order(server, "E2EACC1")
    assert placed["status"] == "SCHEDULED" and placed["episode_id"] == "LK-E2E-1"

    # 2. The modality reads its worklist.
    items, final = mwl_find(server.dicom_port, worklist_identifier({"Modality": "CT"}, AccessionNumber="E2EACC1"))
    assert final == 0 and len(items) == 1
    item = items[0]
    assert str(item.PatientName) == "Hoàng^Văn Đức" and item.PatientID == "BN-E2E"
    study_uid = str(item.StudyInstanceUID)
    sps_id = str(item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID)

    # 3. MPPS: the exam starts.
    mpps_uid = generate_uid()
    with mpps_association(server.dicom_port) as assoc:
        created = n_create(assoc, mpps_attributes("E2EACC1", study_uid, sps_id, name="Hoàng^Văn Đức",
                                                  patient_id="BN-E2E"), mpps_uid)  # fmt: skip
        assert created.Status == 0
    assert the_order(server, "E2EACC1")["status"] == "IN_PROGRESS"

    # 4. The images go in with DCMTK's storescu, carrying what the worklist gave.
    who = patient("Hoàng^Văn Đức", "BN-E2E", cccd="", bhyt="")
    files = [write_ct(tmp_path, who=who, study="e2e", index=i, AccessionNumber="E2EACC1", StudyInstanceUID=study_uid)
             for i in (1, 2, 3)]  # fmt: skip
    stored = subprocess.run(["/usr/bin/storescu", "-aec", "VNPACS", LOOPBACK, str(server.dicom_port), *map(str, files)],
                            capture_output=True, text=True, timeout=60, env=dcmtk_env())  # fmt: skip
    assert stored.returncode == 0, stored.stderr
    with mpps_association(server.dicom_port) as assoc:
        assert n_set(assoc, mpps_final("COMPLETED"), mpps_uid).Status == 0
    wait_for("IMAGES_AVAILABLE", lambda: the_order(server, "E2EACC1")["status"] == "IMAGES_AVAILABLE")
    statuses = [h["to"] for h in the_order(server, "E2EACC1")["history"]]
    # The images arrived before MPPS said COMPLETED: the order never steps back.
    assert statuses == ["SCHEDULED", "IN_PROGRESS", "IMAGES_AVAILABLE"]

    # 5. The radiologist reports and signs FINAL while the HIS is down.
    r = httpx.post(f"{base}/api/reports", json={
        "study_instance_uid": study_uid, "findings": "Phổi phải có nốt mờ.", "conclusion": CONCLUSION,
        "author_name": "Phạm^Minh Đức", "author_code": "BS0042"}, timeout=30)  # fmt: skip
    assert r.status_code == 201, r.text
    report_id = r.json()["id"]
    r = httpx.post(f"{base}/api/reports/{report_id}/final", json={}, timeout=60)
    assert r.status_code == 200, r.text
    assert the_order(server, "E2EACC1")["status"] == "REPORTED_FINAL"
    failing = wait_for("a failed delivery", lambda: [m for m in httpx.get(f"{base}/api/outbound").json()["items"]
                                                     if m["attempts"] >= 1])  # fmt: skip
    assert failing[0]["status"] == "PENDING" and "cannot reach the HIS" in failing[0]["last_error"]

    # 6. The HIS comes back: the retry delivers the ORU^R01.
    his = HisListener(his_port)
    his.start()
    try:
        wait_for("the ORU at the HIS", lambda: his.received, timeout=40)
    finally:
        his.stop()
    oru = hl7.parse(his.received[0])
    assert str(oru.segment("MSH").extract_field(1, 9, 1, 1)) == "ORU"
    assert str(oru.segment("MSH").extract_field(1, 18)) == "UNICODE UTF-8"
    assert str(oru.segment("PID").extract_field(1, 3, 1, 1)) == "BN-E2E"
    assert str(oru.segment("OBR").extract_field(1, 18)) == "E2EACC1"
    assert str(oru.segment("OBR").extract_field(1, 25)) == "F"
    texts = {str(s.extract_field(1, 3, 1, 1)): str(s.extract_field(1, 5)) for s in oru.segments("OBX")}
    assert texts["IMPRESSION"] == CONCLUSION and texts["FINDINGS"] == "Phổi phải có nốt mờ."
    assert study_uid in texts["STUDY"]
    sent = wait_for("SENT", lambda: [m for m in httpx.get(f"{base}/api/outbound").json()["items"]
                                     if m["status"] == "SENT"])  # fmt: skip
    assert sent[0]["attempts"] >= 2 and "MSA|AA" in sent[0]["ack"]

    # 7. XML4 for the insurance claim, FHIR for the EMR.
    r = httpx.get(f"{base}/api/orders/{placed['id']}/xml4")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
    (row,) = ET.fromstring(r.content).find("DSACH_CHI_TIET_CLS")  # type: ignore[union-attr]
    fields = {child.tag: child.text or "" for child in row}
    assert fields["MA_LK"] == "LK-E2E-1" and fields["STT"] == "1" and fields["MA_DICH_VU"] == "CT.NGUC"
    assert fields["KET_LUAN"] == CONCLUSION and fields["MA_BS_DOC_KQ"] == "BS0042"
    assert len(fields["NGAY_KQ"]) == 12 and fields["NGAY_KQ"].isdigit()
    assert list(fields) == ["MA_LK", "STT", "MA_DICH_VU", "MA_CHI_SO", "TEN_CHI_SO", "GIA_TRI", "DON_VI_DO",
                            "MO_TA", "KET_LUAN", "NGAY_KQ", "MA_BS_DOC_KQ", "DU_PHONG"]  # fmt: skip
    report = httpx.get(f"{base}/fhir/DiagnosticReport/{report_id}").json()
    assert report["status"] == "final" and report["conclusion"] == CONCLUSION
    assert report["basedOn"][0]["identifier"]["value"] == "E2EACC1"
    study = httpx.get(f"{base}/fhir/ImagingStudy/{study_uid}").json()
    assert study["numberOfInstances"] == 3 and study["numberOfSeries"] == 1
    assert study["series"][0]["modality"]["code"] == "CT"
    assert study["endpoint"][0]["display"] == f"DICOMweb {base}/dicom-web"
    # Behind a reverse proxy the EMR is given the address it reaches, not the server's internal one.
    proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "pacs.benhvien.vn", "X-Forwarded-Prefix": "/pacs"}
    study = httpx.get(f"{base}/fhir/ImagingStudy/{study_uid}", headers=proxied).json()
    assert study["endpoint"][0]["display"] == "DICOMweb https://pacs.benhvien.vn/pacs/dicom-web"
    forwarded = {"Forwarded": 'for=10.0.0.9;proto=https;host="ris.benhvien.vn"'}
    found = httpx.get(f"{base}/fhir/ImagingStudy", params={"patient": "BN-E2E"}, headers=forwarded).json()
    assert found["entry"][0]["resource"]["endpoint"][0]["display"] == "DICOMweb https://ris.benhvien.vn/dicom-web"
    found = httpx.get(f"{base}/fhir/ImagingStudy", params={"patient": "BN-E2E"}).json()
    assert found["total"] == 1 and found["entry"][0]["resource"]["id"] == study_uid
    assert httpx.get(f"{base}/fhir/DiagnosticReport/999999").status_code == 404


def test_owed_messages_survive_a_restart_on_redis_and_postgresql(start_server: StartServer, tmp_path: Path) -> None:
    """Scale-out configuration: Celery on Redis, index on PostgreSQL. The server stops while a report is owed to
    the HIS; after the restart a separate `vnpacs worker` delivers it, once."""
    (his_port,) = free_ports(1)
    queue = f"redis://{LOOPBACK}:6379/{int(time.time()) % 14 + 1}"
    server = start_server("fs-pg", VNPACS_HIS_ORU_URL=f"mllp://{LOOPBACK}:{his_port}", VNPACS_BROKER_URL=queue)
    base = server.base_url
    ack = send(server.hl7_port, order("ORM^O01^ORM_O01", "RS-MSG-1", "NW", "RS-1", pid("BN-RS", "Vũ^Thị Lan"),
                                      obr={18: "RSACC1"}))  # fmt: skip
    assert ack_code(ack) == "AA", ack_text(ack)
    f = write_ct(tmp_path, who=patient("Vũ^Thị Lan", "BN-RS", cccd="", bhyt=""), study="rs", AccessionNumber="RSACC1")
    stored = subprocess.run(["/usr/bin/storescu", "-aec", "VNPACS", LOOPBACK, str(server.dicom_port), str(f)],
                            capture_output=True, text=True, timeout=60, env=dcmtk_env())  # fmt: skip
    assert stored.returncode == 0, stored.stderr
    wait_for("IMAGES_AVAILABLE", lambda: the_order(server, "RSACC1")["status"] == "IMAGES_AVAILABLE")
    study_uid = the_order(server, "RSACC1")["study_instance_uid"]
    r = httpx.post(f"{base}/api/reports", json={"study_instance_uid": study_uid, "conclusion": "Bình thường.",
                                                "author_name": "Lê^Văn Tâm", "author_code": "BS0007"})  # fmt: skip
    assert r.status_code == 201, r.text
    assert httpx.post(f"{base}/api/reports/{r.json()['id']}/final", json={}, timeout=60).status_code == 200
    wait_for("a failed delivery", lambda: [m for m in httpx.get(f"{base}/api/outbound").json()["items"]
                                           if m["attempts"] >= 1])  # fmt: skip

    # The node comes back without its in-process worker; a dedicated `vnpacs worker` process delivers instead.
    server.stop()
    server.env["VNPACS_OUTBOUND_WORKER"] = "false"
    his = HisListener(his_port)
    his.start()
    worker = subprocess.Popen([sys.executable, "-m", "pacs", "worker"], env=server.env, cwd=server.cwd,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        server.start()
        wait_for("the ORU after the restart", lambda: his.received, timeout=40)
        time.sleep(3)  # a duplicate would arrive within the retry delays
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        his.stop()
    assert len(his.received) == 1
    assert "Bình thường." in his.received[0]
    (message,) = httpx.get(f"{server.base_url}/api/outbound").json()["items"]
    assert message["status"] == "SENT"
