"""Reports against a running vnpacs: versions, FINAL immutability, amendments, the order following, and signatures
checked independently (OpenSSL for the CMS, pyHanko for the PDF, poppler for the Vietnamese text, the QR code
compared module by module with the one expected)."""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
import segno
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from PIL import Image
from pydicom import dcmread
from sqlalchemy import text

from pacs.app import migrate_schema
from pacs.synthetic import synthetic_uid
from storage.db import make_engine
from tests.conftest import StartServer
from tests.data import patient, write_ct
from tests.scu import store_files
from tests.services import LOOPBACK, VnpacsService, create_pg_database, start_vnpacs, wait_until
from worklist.orders import OrderIn, Orders, StepIn

P12_PASSWORD = "mật-khẩu-bác-sĩ"
CONCLUSION = "Không thấy tổn thương khu trú nhu mô phổi hai bên."
FINDINGS = "Nhu mô phổi hai bên sáng đều.\nKhông thấy tràn dịch, tràn khí màng phổi.\nTim không to."


# ---- a small PKI: a CA, a doctor's certificate with a CRL address, a CRL server ------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "VN"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bệnh viện Thử nghiệm"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _ca(cn: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key, now = _key(), dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


class CrlServer:
    """Serves the CA's current CRL over HTTP (what certificate validators fetch from the CRL distribution point)."""

    def __init__(self) -> None:
        self.crl = b""
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "application/pkix-crl")
                self.send_header("Content-Length", str(len(owner.crl)))
                self.end_headers()
                self.wfile.write(owner.crl)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self.httpd.server_address[1]}/ca.crl"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class Pki:
    folder: Path
    crl_server: CrlServer
    ca_key: rsa.RSAPrivateKey = field(init=False)
    ca: x509.Certificate = field(init=False)
    doctor: x509.Certificate = field(init=False)
    p12: Path = field(init=False)
    ca_pem: Path = field(init=False)
    other_ca_pem: Path = field(init=False)

    def __post_init__(self) -> None:
        self.ca_key, self.ca = _ca("CA Thử nghiệm vnpacs")
        doctor_key, now = _key(), dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
        self.doctor = (
            x509.CertificateBuilder()
            .subject_name(_name("BS. Trần Thị Bình"))
            .issuer_name(self.ca.subject)
            .public_key(doctor_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=90))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, True, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), critical=False)
            .add_extension(
                x509.CRLDistributionPoints(
                    [x509.DistributionPoint([x509.UniformResourceIdentifier(self.crl_server.url)], None, None, None)]
                ),
                critical=False,
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        self.p12 = self.folder / "doctor.p12"
        self.p12.write_bytes(
            pkcs12.serialize_key_and_certificates(
                b"doctor",
                doctor_key,
                self.doctor,
                [self.ca],
                serialization.BestAvailableEncryption(P12_PASSWORD.encode()),
            )
        )
        self.ca_pem = self.folder / "ca.pem"
        self.ca_pem.write_bytes(self.ca.public_bytes(serialization.Encoding.PEM))
        self.other_ca_pem = self.folder / "other-ca.pem"
        self.other_ca_pem.write_bytes(_ca("Một CA khác")[1].public_bytes(serialization.Encoding.PEM))
        self.publish_crl(revoked=False)

    def publish_crl(self, *, revoked: bool) -> None:
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ca.subject)
            .last_update(now)
            .next_update(now + dt.timedelta(days=1))
            .add_extension(x509.CRLNumber(2 if revoked else 1), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), critical=False)
        )
        if revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(self.doctor.serial_number).revocation_date(now).build()
            )
        crl = builder.sign(self.ca_key, hashes.SHA256())
        self.crl_server.crl = crl.public_bytes(serialization.Encoding.DER)

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "VNPACS_SIGNING_P12": str(self.p12),
            "VNPACS_SIGNING_P12_PASSWORD": P12_PASSWORD,
            "VNPACS_SIGNING_TRUST_ROOTS": str(self.ca_pem),
            "VNPACS_SIGNING_REVOCATION": "hard-fail",
            "VNPACS_FACILITY_NAME": "Bệnh viện Đa khoa Thử nghiệm",
            **extra,
        }


@contextlib.contextmanager
def make_pki(folder: Path) -> Iterator[Pki]:
    folder.mkdir(parents=True, exist_ok=True)
    server = CrlServer()
    try:
        yield Pki(folder, server)
    finally:
        server.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    with make_pki(tmp_path_factory.mktemp("pki")) as made:
        yield made


@pytest.fixture(scope="module")
def server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VnpacsService]:
    svc = start_vnpacs(pki.env(), tmp_path_factory.mktemp("reports"))
    try:
        yield svc
    finally:
        svc.stop()


# ---- helpers ----------------------------------------------------------------------------------------------------


def client(svc: VnpacsService) -> httpx.Client:
    return httpx.Client(base_url=svc.base_url, timeout=60)


def index_db(svc: VnpacsService) -> Path:
    return Path(svc.env["VNPACS_DATA_DIR"]) / "index.db"


def orders_of(svc: VnpacsService) -> Orders:
    return Orders(make_engine(f"sqlite:///{index_db(svc)}"))


def store_study(svc: VnpacsService, folder: Path, name: str, accession: str) -> str:
    """Store a two-slice CT study of a Vietnamese patient; its StudyInstanceUID."""
    who = patient("Nguyễn^Văn An", "BN0001", birth_date="19850312")
    paths = [write_ct(folder, who=who, study=name, index=i, AccessionNumber=accession) for i in (1, 2)]
    results = store_files(svc.dicom_port, paths)
    assert all(status.Status == 0 for status in results.values())
    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def place_order(svc: VnpacsService, study_uid: str, accession: str) -> int:
    order, _ = orders_of(svc).place(
        OrderIn(
            patient_id="BN0001",
            patient_name="Nguyễn^Văn An",
            patient_birth_date="19850312",
            patient_sex="M",
            accession_number=accession,
            placer_order_number=f"HIS-{accession}",
            procedure_code="CT.NGUC",
            procedure_description="CT ngực không tiêm thuốc cản quang",
            referring_physician_name="Lê^Văn Cường",
            study_instance_uid=study_uid,
            steps=[StepIn(modality="CT", station_ae_title="CT01")],
        ),
        source="test",
    )
    return order.pk


def ordered_study(svc: VnpacsService, folder: Path, name: str) -> tuple[str, int]:
    """An order placed by the HIS, then its study stored (the reconciler links them)."""
    accession = f"ACC{name.upper()}"[:16]
    uid = synthetic_uid("test-study", name)  # the study UID write_ct gives the study
    order_pk = place_order(svc, uid, accession)
    assert store_study(svc, folder, name, accession) == uid
    wait_until(lambda: order_status(svc, order_pk)[0] == "IMAGES_AVAILABLE", timeout=30, what="reconciliation")
    return uid, order_pk


def draft(http: httpx.Client, study_uid: str, **fields: Any) -> dict[str, Any]:
    body = {
        "study_instance_uid": study_uid,
        "findings": FINDINGS,
        "conclusion": CONCLUSION,
        "recommendation": "Theo dõi lâm sàng.",
        "author_name": "Trần^Thị Bình",
        "author_code": "BS00123",
        **fields,
    }
    resp = http.post("/api/reports", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()


def pdftotext(pdf: bytes, folder: Path, name: str) -> str:
    path = folder / f"{name}.pdf"
    path.write_bytes(pdf)
    return subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, check=True).stdout


def openssl_verify(content: bytes, signature: bytes, ca_pem: Path, folder: Path) -> subprocess.CompletedProcess[str]:
    (folder / "content.json").write_bytes(content)
    (folder / "sig.der").write_bytes(signature)
    return subprocess.run(
        [
            "openssl",
            "cms",
            "-verify",
            "-binary",
            "-inform",
            "DER",
            "-in",
            str(folder / "sig.der"),
            "-content",
            str(folder / "content.json"),
            "-CAfile",
            str(ca_pem),
            "-out",
            "/dev/null",
        ],
        capture_output=True,
        text=True,
    )


def pyhanko_status(pdf: bytes, ca: x509.Certificate) -> Any:
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation import validate_pdf_signature
    from pyhanko_certvalidator import ValidationContext

    signatures = PdfFileReader(BytesIO(pdf)).embedded_signatures
    assert len(signatures) == 1
    root = asn1_x509.Certificate.load(ca.public_bytes(serialization.Encoding.DER))
    return validate_pdf_signature(signatures[0], ValidationContext(trust_roots=[root]))


def qr_in_pdf(pdf: bytes, folder: Path) -> Image.Image:
    (folder / "qr.pdf").write_bytes(pdf)
    subprocess.run(["pdfimages", "-png", str(folder / "qr.pdf"), str(folder / "img")], check=True)
    images = sorted(folder.glob("img-*.png"))
    assert len(images) == 1, images
    return Image.open(images[0]).convert("L")


def assert_qr_encodes(image: Image.Image, url: str) -> None:
    """The image is exactly the QR code of `url` (segno, error level M, border 2): compared module by module."""
    expected = segno.make(url, error="m", micro=False)
    matrix = expected.matrix
    modules = len(matrix) + 4
    assert image.width == image.height and image.width % modules == 0
    scale = image.width // modules
    for row, bits in enumerate(matrix):
        for col, bit in enumerate(bits):
            pixel = image.getpixel(((col + 2) * scale + scale // 2, (row + 2) * scale + scale // 2))
            assert (pixel < 128) == bool(bit), f"QR module ({row}, {col}) differs"


def order_status(svc: VnpacsService, order_pk: int) -> tuple[str, list[tuple[str, str, str]]]:
    order = orders_of(svc).get(order_pk)
    return order.status, [(e.source, e.to_status, e.detail) for e in order.events]


# ---- tests ------------------------------------------------------------------------------------------------------


def test_draft_edit_preliminary_final_amend(server: VnpacsService, pki: Pki, tmp_path: Path) -> None:
    study_uid, order_pk = ordered_study(server, tmp_path / "dicom", "report-flow")
    assert order_status(server, order_pk)[0] == "IMAGES_AVAILABLE"
    with client(server) as http:
        report = draft(http, study_uid, conclusion="Chưa kết luận")
        rid = report["id"]
        assert report["status"] == "DRAFT" and report["order_id"] == order_pk  # found by study UID
        assert [v["version"] for v in report["versions"]] == [1]

        edited = http.put(f"/api/reports/{rid}", json={"conclusion": CONCLUSION}).json()
        assert edited["status"] == "DRAFT" and len(edited["versions"]) == 2
        assert edited["versions"][0]["conclusion"] == "Chưa kết luận"  # the first version is kept
        assert edited["versions"][1]["conclusion"] == CONCLUSION
        assert edited["versions"][1]["findings"] == FINDINGS  # unchanged fields carried over

        preview = http.get(f"/api/reports/{rid}/versions/2/pdf")
        assert preview.status_code == 200 and preview.headers["x-report-signed"] == "false"
        assert "BẢN NHÁP" in pdftotext(preview.content, tmp_path, "draft")
        assert http.get(f"/api/reports/{rid}/versions/2/signature").status_code == 404

        prelim = http.post(f"/api/reports/{rid}/preliminary").json()
        assert prelim["status"] == "PRELIMINARY" and prelim["current"]["version"] == 3
        assert order_status(server, order_pk)[0] == "REPORTED_PRELIMINARY"
        again = http.put(f"/api/reports/{rid}", json={"recommendation": "Chụp lại sau 3 tháng."}).json()
        assert again["status"] == "PRELIMINARY" and again["current"]["version"] == 4

        final = http.post(f"/api/reports/{rid}/final")
        assert final.status_code == 200, final.text
        final_json = final.json()
        current = final_json["current"]
        assert final_json["status"] == "FINAL" and current["version"] == 5 and current["signed"]
        assert "BS. Trần Thị Bình" in current["signer"] and len(current["content_sha256"]) == 64
        status, history = order_status(server, order_pk)
        assert status == "REPORTED_FINAL"
        assert ("report", "REPORTED_FINAL") in [(s, t) for s, t, _ in history]

        # FINAL is immutable.
        for method, path, body in [
            ("PUT", f"/api/reports/{rid}", {"conclusion": "sửa lén"}),
            ("POST", f"/api/reports/{rid}/preliminary", None),
            ("POST", f"/api/reports/{rid}/final", None),
        ]:
            resp = http.request(method, path, json=body)
            assert resp.status_code == 409, (path, resp.text)
        assert http.get(f"/api/reports/{rid}").json()["current"]["conclusion"] == CONCLUSION

        # The CMS signature, checked by OpenSSL against our CA; the same check fails on other bytes.
        content = http.get(f"/api/reports/{rid}/versions/5/content").content
        signature = http.get(f"/api/reports/{rid}/versions/5/signature")
        assert signature.headers["content-type"] == "application/pkcs7-signature"
        checked = openssl_verify(content, signature.content, pki.ca_pem, tmp_path)
        assert checked.returncode == 0 and "Verification successful" in checked.stderr, checked.stderr
        assert CONCLUSION in content.decode("utf-8") and b'"status":"FINAL"' in content
        forged = content.replace("Không thấy".encode(), "Có".encode(), 1)
        assert openssl_verify(forged, signature.content, pki.ca_pem, tmp_path).returncode != 0
        assert openssl_verify(content, signature.content, pki.other_ca_pem, tmp_path).returncode != 0

        # The PDF: PAdES signature checked by pyHanko, Vietnamese text by poppler, QR code by its modules.
        pdf = http.get(f"/api/reports/{rid}/versions/5/pdf")
        assert pdf.headers["content-type"] == "application/pdf" and pdf.headers["x-report-signed"] == "true"
        status_pdf = pyhanko_status(pdf.content, pki.ca)
        assert status_pdf.intact and status_pdf.valid and status_pdf.trusted, status_pdf.pretty_print_details()
        assert status_pdf.coverage.name == "ENTIRE_FILE"
        text = pdftotext(pdf.content, tmp_path, "final")
        for expected in [
            "PHIẾU KẾT QUẢ CHẨN ĐOÁN HÌNH ẢNH",
            "Bệnh viện Đa khoa Thử nghiệm",
            "NGUYỄN VĂN AN",
            "BN0001",
            "12/03/1985",
            "Nam",
            "ACCREPORT-FLOW",
            "CT ngực không tiêm thuốc cản quang",
            "Mô tả",
            "Tim không to.",
            "Kết luận",
            CONCLUSION,
            "Đề nghị",
            "Chụp lại sau 3 tháng.",
            "Trần Thị Bình",
            "BS00123",
            current["content_sha256"],
        ]:
            assert expected in text, expected
        viewer = f"{server.base_url}/viewer/viewer?StudyInstanceUIDs={study_uid}"
        assert_qr_encodes(qr_in_pdf(pdf.content, tmp_path), viewer)

        verdict = http.get(f"/api/reports/{rid}/verify").json()
        assert verdict["valid"] is True, verdict
        (checked_version,) = verdict["versions"]
        assert checked_version["cms"]["valid"] and checked_version["pdf"]["valid"]
        assert checked_version["content"]["matches"]
        assert checked_version["chain"] == {**checked_version["chain"], "checked": True, "trusted": True}
        assert checked_version["revocation"]["checked"] and checked_version["revocation"]["status"] == "good"
        assert not checked_version["development"]

        # Amendments need a reason, keep every version and are signed again.
        assert http.post(f"/api/reports/{rid}/amend", json={"conclusion": "x"}).status_code == 422
        assert http.post(f"/api/reports/{rid}/amend", json={"reason": "   "}).status_code == 422
        amended = http.post(
            f"/api/reports/{rid}/amend",
            json={"reason": "Bổ sung nốt mờ thùy dưới phổi phải", "conclusion": "Nốt mờ 4 mm thùy dưới phổi phải."},
        )
        assert amended.status_code == 200, amended.text
        body = amended.json()
        assert body["status"] == "AMENDED" and [v["status"] for v in body["versions"]] == [
            "DRAFT",
            "DRAFT",
            "PRELIMINARY",
            "PRELIMINARY",
            "FINAL",
            "AMENDED",
        ]
        assert body["versions"][4]["conclusion"] == CONCLUSION  # the final version is untouched
        assert body["current"]["reason"] == "Bổ sung nốt mờ thùy dưới phổi phải" and body["current"]["signed"]
        amended_text = pdftotext(http.get(f"/api/reports/{rid}/versions/6/pdf").content, tmp_path, "amended")
        assert "Nốt mờ 4 mm thùy dưới phổi phải." in amended_text and "lý do sửa đổi" in amended_text
        verdict = http.get(f"/api/reports/{rid}/verify").json()
        assert verdict["valid"] and [v["version"] for v in verdict["versions"]] == [5, 6]
        _, history = order_status(server, order_pk)
        assert [t for s, t, _ in history if s == "report"] == [
            "REPORTED_PRELIMINARY",
            "REPORTED_FINAL",
            "REPORTED_FINAL",
        ]
        assert http.put(f"/api/reports/{rid}", json={"conclusion": "x"}).status_code == 409

        found = http.get("/api/reports", params={"study": study_uid}).json()["items"]
        assert [r["id"] for r in found] == [rid] and found[0]["status"] == "AMENDED"
        assert [r["id"] for r in http.get("/api/reports", params={"order": order_pk}).json()["items"]] == [rid]
        assert http.get("/api/reports", params={"study": "1.2.3.999"}).json()["items"] == []


def test_verify_detects_tampering(server: VnpacsService, pki: Pki, tmp_path: Path) -> None:
    study_uid = store_study(server, tmp_path / "dicom", "report-tamper", "ACCTAMPER")
    with client(server) as http:
        rid = draft(http, study_uid)["id"]
        assert http.post(f"/api/reports/{rid}/final").status_code == 200
        assert http.get(f"/api/reports/{rid}/verify").json()["valid"] is True

        with sqlite3.connect(index_db(server)) as db:
            (signature,) = db.execute(
                "SELECT cms_signature FROM ris_report_version WHERE report_pk = ? AND version = 2", (rid,)
            ).fetchone()
            broken = signature[:-1] + bytes([signature[-1] ^ 0x01])  # the last byte of the signature value
            db.execute(
                "UPDATE ris_report_version SET cms_signature = ? WHERE report_pk = ? AND version = 2", (broken, rid)
            )
        verdict = http.get(f"/api/reports/{rid}/verify").json()
        assert verdict["valid"] is False and verdict["versions"][0]["cms"]["valid"] is False
        assert verdict["versions"][0]["pdf"]["valid"] is True  # the PDF is still good

        with sqlite3.connect(index_db(server)) as db:
            db.execute(
                "UPDATE ris_report_version SET cms_signature = ?, conclusion = ? WHERE report_pk = ? AND version = 2",
                (signature, "Bình thường.", rid),
            )
        verdict = http.get(f"/api/reports/{rid}/verify").json()
        assert verdict["valid"] is False
        assert verdict["versions"][0]["content"]["matches"] is False
        assert verdict["versions"][0]["cms"]["valid"] is False

        with sqlite3.connect(index_db(server)) as db:
            (pdf,) = db.execute(
                "SELECT pdf FROM ris_report_version WHERE report_pk = ? AND version = 2", (rid,)
            ).fetchone()
            db.execute(
                "UPDATE ris_report_version SET conclusion = ?, pdf = ? WHERE report_pk = ? AND version = 2",
                (CONCLUSION, pdf.replace(b"/Creator", b"/Crea7or", 1), rid),
            )
        verdict = http.get(f"/api/reports/{rid}/verify").json()
        assert verdict["versions"][0]["cms"]["valid"] is True and verdict["versions"][0]["content"]["matches"]
        assert verdict["versions"][0]["pdf"]["valid"] is False and verdict["valid"] is False


def test_bad_input(server: VnpacsService, tmp_path: Path) -> None:
    study_uid = store_study(server, tmp_path / "dicom", "report-bad", "ACCBAD")
    with client(server) as http:
        assert http.post("/api/reports", json={"conclusion": "x"}).status_code == 422  # no study UID
        assert http.post("/api/reports", json={"study_instance_uid": "not-a-uid"}).status_code == 422
        missing = http.post("/api/reports", json={"study_instance_uid": "1.2.840.999.1"})
        assert missing.status_code == 404 and "no stored study" in missing.json()["detail"]
        assert http.post("/api/reports", json={"study_instance_uid": study_uid, "order_id": 999999}).status_code == 404
        assert http.post("/api/reports", json={"study_instance_uid": study_uid, "colour": "x"}).status_code == 422
        assert (
            http.post("/api/reports", json={"study_instance_uid": study_uid, "author_code": "x" * 65}).status_code
            == 422
        )

        rid = draft(http, study_uid, conclusion="", author_code="")["id"]
        assert draft_conflict(http, study_uid) == 409  # one report per study and order
        refused = http.post(f"/api/reports/{rid}/final")
        assert refused.status_code == 422 and "kết luận" in refused.json()["detail"]
        assert http.post(f"/api/reports/{rid}/amend", json={"reason": "x"}).status_code == 409  # not FINAL yet
        assert http.get(f"/api/reports/{rid}").json()["versions"][-1]["version"] == 1  # nothing changed

        for method, path in [
            ("GET", "/api/reports/999999"),
            ("PUT", "/api/reports/999999"),
            ("POST", "/api/reports/999999/preliminary"),
            ("POST", "/api/reports/999999/final"),
            ("POST", "/api/reports/999999/amend"),
            ("GET", "/api/reports/999999/verify"),
            ("GET", "/api/reports/999999/versions/1/pdf"),
            ("GET", f"/api/reports/{rid}/versions/99/pdf"),
            ("GET", f"/api/reports/{rid}/versions/1/signature"),
            ("GET", f"/api/reports/{rid}/versions/1/content"),
        ]:
            body = {"reason": "x"} if path.endswith("amend") else {} if method == "PUT" else None
            resp = http.request(method, path, json=body)
            assert resp.status_code == 404, (method, path, resp.status_code, resp.text)
        verdict = http.get(f"/api/reports/{rid}/verify").json()
        assert verdict["valid"] is False and "not FINAL" in verdict["detail"]


def draft_conflict(http: httpx.Client, study_uid: str) -> int:
    return http.post("/api/reports", json={"study_instance_uid": study_uid, "conclusion": "x"}).status_code


def test_wrong_trust_root_and_revocation(start_server: StartServer, tmp_path: Path) -> None:
    with make_pki(tmp_path / "pki") as pki:
        svc = start_server("fs-sqlite", **pki.env())
        study_uid = store_study(svc, tmp_path / "dicom", "report-revoked", "ACCREVOKED")
        with client(svc) as http:
            rid = draft(http, study_uid)["id"]
            assert http.post(f"/api/reports/{rid}/final").status_code == 200
            verdict = http.get(f"/api/reports/{rid}/verify").json()
            assert verdict["valid"] and verdict["versions"][0]["revocation"]["status"] == "good"

            pki.publish_crl(revoked=True)
            verdict = http.get(f"/api/reports/{rid}/verify").json()
            assert verdict["valid"] is False, verdict
            assert verdict["versions"][0]["revocation"]["status"] == "revoked"
            assert verdict["versions"][0]["cms"]["valid"]  # the signature itself is intact
            other = draft(http, store_study(svc, tmp_path / "dicom", "report-revoked-2", "ACCREVOKED2"))["id"]
            refused = http.post(f"/api/reports/{other}/final")
            assert refused.status_code == 503 and "revoked" in refused.json()["detail"]
            assert http.get(f"/api/reports/{other}").json()["status"] == "DRAFT"
            pki.publish_crl(revoked=False)

        # The same server trusting another CA: the signature is intact but its chain is not trusted.
        svc.stop()
        svc.env["VNPACS_SIGNING_TRUST_ROOTS"] = str(pki.other_ca_pem)
        svc.start()
        with client(svc) as http:
            verdict = http.get(f"/api/reports/{rid}/verify").json()
            assert verdict["valid"] is False
            version = verdict["versions"][0]
            assert version["cms"]["valid"] and version["pdf"]["valid"]
            assert version["chain"]["checked"] and not version["chain"]["trusted"]
            refused = http.post(f"/api/reports/{other}/final")
            assert refused.status_code == 503 and "not trusted" in refused.json()["detail"]


def test_development_certificate_when_none_is_configured(embedded: VnpacsService, tmp_path: Path) -> None:
    study_uid = store_study(embedded, tmp_path / "dicom", "report-dev", "ACCDEV")
    with client(embedded) as http:
        rid = draft(http, study_uid)["id"]
        final = http.post(f"/api/reports/{rid}/final")
        assert final.status_code == 200, final.text
        assert "vnpacs development signer" in final.json()["current"]["signer"]
        verdict = http.get(f"/api/reports/{rid}/verify").json()
        version = verdict["versions"][0]
        assert verdict["valid"] and version["development"] is True
        assert any("self-signed, development only" in note for note in version["notes"])
        assert version["revocation"] == {**version["revocation"], "checked": False, "status": "not checked"}
        signing_dir = Path(embedded.env["VNPACS_DATA_DIR"]) / "signing"
        content = http.get(f"/api/reports/{rid}/versions/2/content").content
        signature = http.get(f"/api/reports/{rid}/versions/2/signature").content
        assert openssl_verify(content, signature, signing_dir / "development-ca.pem", tmp_path).returncode == 0


@pytest.fixture(params=["sqlite", "pg"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index.db'}"
        return
    request.getfixturevalue("postgres")
    database = create_pg_database()
    try:
        yield database.url
    finally:
        database.drop()


def test_final_hooks_run_after_commit(database_url: str, tmp_path: Path) -> None:
    """The on_final seam (the HIS feed hangs there): called once per FINAL / AMENDED version, after the commit;
    signatures read back from either database verify (timestamps and bytes round-trip exactly)."""
    from worklist.reports import Reports, ReportText
    from worklist.signing import SigningConfig

    migrate_schema(database_url)
    engine, observer = make_engine(database_url), make_engine(database_url)
    orders = Orders(engine)
    order, _ = orders.place(
        OrderIn(
            patient_id="BN7", patient_name="Phạm^Thị Hoa", placer_order_number="HIS-7", steps=[StepIn(modality="MR")]
        ),
        source="test",
    )
    reports = Reports(
        engine,
        orders,
        signing_config=SigningConfig(p12=None, development_dir=tmp_path / "signing"),
        viewer_url=lambda uid: f"https://pacs.example.vn/viewer/viewer?StudyInstanceUIDs={uid}",
    )
    seen: list[tuple[int, int, str]] = []

    def hook(report_pk: int, version_pk: int) -> None:
        with observer.connect() as conn:  # another connection: it sees only committed rows
            status = conn.execute(
                text("SELECT status FROM ris_report_version WHERE pk = :pk"), {"pk": version_pk}
            ).scalar_one()
        seen.append((report_pk, version_pk, status))

    def broken(report_pk: int, version_pk: int) -> None:
        raise RuntimeError("a failing hook does not undo the report")

    reports.on_final.extend([broken, hook])
    words = ReportText(conclusion="Không thấy bất thường.", author_name="Trần^Thị Bình", author_code="BS00123")
    report = reports.create(study_instance_uid=order.study_instance_uid, text=words)  # ordered, not yet stored
    assert report.order_pk == order.pk
    reports.preliminary(report.pk)
    assert seen == []
    final = reports.final(report.pk)
    amended = reports.amend(report.pk, "Sửa chính tả", ReportText(conclusion="Không thấy bất thường rõ."))
    assert seen == [
        (report.pk, final.versions[-1].pk, "FINAL"),
        (report.pk, amended.versions[-1].pk, "AMENDED"),
    ]
    assert orders.get(order.pk).status == "REPORTED_FINAL"
    verdict = reports.verify(report.pk)
    assert verdict["valid"] and [v["version"] for v in verdict["versions"]] == [3, 4], verdict
    engine.dispose()
    observer.dispose()
