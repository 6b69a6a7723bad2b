"""Key images against a running vnpacs: marked on report versions, checked against the study, signed, shown on the
PDF, served as JPEG, sent to the HIS inside the ORU^R01 (ED OBX, Base64 JPEG, plus an RP link) and in FHIR."""

from __future__ import annotations

import base64
import json
from io import BytesIO
from pathlib import Path
from typing import Any

import hl7
import httpx
import numpy as np
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from PIL import Image
from pydicom import dcmread

from tests.conftest import StartServer
from tests.data import patient, write_ct
from tests.mllp import ack_code, ack_text, order, pid, send
from tests.scu import store_files
from tests.services import LOOPBACK, VnpacsService, free_ports
from tests.test_reports import openssl_verify, pdftotext
from tests.test_results import HisListener, the_order, wait_for

SIZE = 96
CONCLUSION = "Nốt mờ đáy phổi trái, kích thước 12 mm."
AUTHOR = {"author_name": "Phạm^Minh Đức", "author_code": "BS0042"}


def expected_display(path: Path) -> np.ndarray:
    """What a viewer shows for a stored CT slice, computed here from the file alone: rescale to HU, the file's linear
    VOI window (PS3.3 C.11.2.1.2.1), the result stretched to 0..255 (as /rendered does)."""
    ds = dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    windowed = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    low, high = windowed.min(), windowed.max()
    return (windowed - low) / max(high - low, 1e-9) * 255


def ed_images(message: str) -> dict[str, bytes]:
    """The ED OBX of an ORU^R01 by sub-ID: `^IM^JPEG^Base64^<data>` decoded."""
    out = {}
    for obx in hl7.parse(message).segments("OBX"):
        if str(obx[2]) == "ED":
            source, kind, subtype, encoding, data = str(obx[5]).split("^")
            assert (source, kind, subtype, encoding) == ("", "IM", "JPEG", "Base64")
            assert str(obx[3]) == "KEYIMAGE^Ảnh chính^L"
            out[str(obx[4])] = base64.b64decode(data, validate=True)
    return out


def rp_links(message: str) -> dict[str, str]:
    return {
        str(obx[4]): str(obx[5]).split("^")[0]
        for obx in hl7.parse(message).segments("OBX")
        if str(obx[2]) == "RP" and str(obx[3]).startswith("KEYIMAGE")
    }


def development_ca(server: VnpacsService) -> Path:
    return Path(server.env["VNPACS_DATA_DIR"]) / "signing" / "development-ca.pem"


def test_key_images_signed_and_sent_to_the_his(start_server: StartServer, tmp_path: Path) -> None:
    (his_port,) = free_ports(1)
    his = HisListener(his_port)
    his.start()
    server = start_server("fs-sqlite", VNPACS_HIS_ORU_URL=f"mllp://{LOOPBACK}:{his_port}")
    base = server.base_url
    try:
        _scenario(server, base, his, tmp_path)
    finally:
        his.stop()


def _scenario(server: VnpacsService, base: str, his: HisListener, tmp_path: Path) -> None:
    ack = send(server.hl7_port, order("ORM^O01^ORM_O01", "KI-MSG-1", "NW", "KI-1", pid("BN-KI", "Đặng^Thu Hà"),
                                      obr={18: "KIACC1", 24: "CT"}))  # fmt: skip
    assert ack_code(ack) == "AA", ack_text(ack)
    who = patient("Đặng^Thu Hà", "BN-KI", cccd="", bhyt="")
    files = [write_ct(tmp_path / "ki", who=who, study="ki", index=i, size=SIZE, AccessionNumber="KIACC1")
             for i in (1, 2, 3)]  # fmt: skip
    other = write_ct(tmp_path / "other", who=who, study="other", index=1, size=SIZE, AccessionNumber="KIOTHER")
    assert all(s.Status == 0 for s in store_files(server.dicom_port, [*files, other]).values())
    wait_for("IMAGES_AVAILABLE", lambda: the_order(server, "KIACC1")["status"] == "IMAGES_AVAILABLE")
    heads = [dcmread(f, stop_before_pixels=True) for f in files]
    study_uid = str(heads[0].StudyInstanceUID)
    uids = [str(h.SOPInstanceUID) for h in heads]
    other_uid = str(dcmread(other, stop_before_pixels=True).SOPInstanceUID)

    with httpx.Client(base_url=base, timeout=60) as http:
        # Input that does not name images of this study is refused, and nothing is written.
        body: dict[str, Any] = {"study_instance_uid": study_uid, "conclusion": CONCLUSION, **AUTHOR}
        for wrong, why in (
            ([{"sop_instance_uid": "1.2.3.4.5.6.7.8.9"}], "not a stored instance"),
            ([{"sop_instance_uid": other_uid}], "another study"),
            ([{"sop_instance_uid": uids[0], "frame": 2}], "out of 1..1"),
            ([{"sop_instance_uid": uids[0]}, {"sop_instance_uid": uids[0]}], "twice"),
        ):
            r = http.post("/api/reports", json={**body, "key_images": wrong})
            assert r.status_code == 422 and why in r.text, (wrong, r.text)
        assert http.post("/api/reports", json={**body, "key_images": [{"sop_instance_uid": uids[0], "frame": 0}]}
                         ).status_code == 422  # fmt: skip
        assert http.get("/api/reports", params={"study": study_uid}).json()["items"] == []

        # A draft with two key images; an edit without key_images carries them forward, a bad one changes nothing.
        marked = [{"sop_instance_uid": uids[2], "frame": 1}, {"sop_instance_uid": uids[0], "frame": None}]
        r = http.post("/api/reports", json={**body, "findings": "Đáy phổi trái có nốt mờ.", "key_images": marked})
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        assert [{k: v for k, v in item.items() if k != "url"} for item in r.json()["current"]["key_images"]] == marked
        assert http.put(f"/api/reports/{rid}", json={"key_images": [{"sop_instance_uid": "9.9.9"}]}).status_code == 422
        r = http.put(f"/api/reports/{rid}", json={"recommendation": "Chụp lại sau 3 tháng."})
        assert r.status_code == 200 and r.json()["version_count"] == 2
        assert len(r.json()["current"]["key_images"]) == 2
        r = http.post(f"/api/reports/{rid}/final", json={})
        assert r.status_code == 200, r.text
        final = r.json()["current"]
        assert final["version"] == 3 and [k["sop_instance_uid"] for k in final["key_images"]] == [uids[2], uids[0]]
        assert final["key_images"][0]["url"] == f"/api/reports/{rid}/versions/3/key-images/1.jpg"

        # The ORU^R01 at the HIS: one ED OBX per key image whose Base64 is the JPEG of that instance.
        oru = wait_for("the ORU at the HIS", lambda: his.received, timeout=40)[0]
        images = ed_images(oru)
        assert sorted(images) == ["1", "2"]
        for sub_id, path in (("1", files[2]), ("2", files[0])):
            jpeg = images[sub_id]
            picture = Image.open(BytesIO(jpeg))
            assert picture.format == "JPEG" and picture.size == (SIZE, SIZE) and picture.mode == "L"
            shown = np.asarray(picture, dtype=np.float64)
            expected = expected_display(path)
            assert abs(shown.mean() - expected.mean()) < 2.0, (shown.mean(), expected.mean())
            assert np.corrcoef(shown.ravel(), expected.ravel())[0, 1] > 0.98
            # The same instance rendered by DICOMweb: the same picture.
            ds = dcmread(path, stop_before_pixels=True)
            url = (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                   f"/instances/{ds.SOPInstanceUID}/rendered")  # fmt: skip
            rendered = http.get(url, headers={"Accept": "image/jpeg"})
            assert rendered.status_code == 200
            assert abs(np.asarray(Image.open(BytesIO(rendered.content)), dtype=np.float64).mean() - shown.mean()) < 1
            # The report's key-image endpoint serves exactly the JPEG the HIS got; the RP OBX points at it.
            served = http.get(f"/api/reports/{rid}/versions/3/key-images/{sub_id}.jpg")
            assert served.status_code == 200 and served.headers["content-type"] == "image/jpeg"
            assert served.content == jpeg
            link = rp_links(oru)[sub_id]
            assert link.endswith(f"/api/reports/{rid}/versions/3/key-images/{sub_id}.jpg")
            assert httpx.get(link, timeout=30).content == jpeg
        assert not np.array_equal(
            np.asarray(Image.open(BytesIO(images["1"]))), np.asarray(Image.open(BytesIO(images["2"])))
        )
        assert http.get(f"/api/reports/{rid}/versions/3/key-images/3.jpg").status_code == 404
        assert http.get(f"/api/reports/{rid}/versions/1/key-images/1.jpg").status_code == 200  # drafts have them too

        # Signed: the key images are in the canonical content, which OpenSSL verifies against the signature.
        content = http.get(f"/api/reports/{rid}/versions/3/content").content
        assert json.loads(content)["key_images"] == marked
        signature = http.get(f"/api/reports/{rid}/versions/3/signature").content
        assert openssl_verify(content, signature, development_ca(server), tmp_path).returncode == 0
        forged = content.replace(uids[2].encode(), uids[1].encode())
        assert openssl_verify(forged, signature, development_ca(server), tmp_path).returncode != 0
        assert http.get(f"/api/reports/{rid}/verify").json()["valid"]

        # The signed PDF shows them, captioned.
        pdf = http.get(f"/api/reports/{rid}/versions/3/pdf").content
        text = pdftotext(pdf, tmp_path, "ki")
        assert "Ảnh chính 1" in text and "Ảnh chính 2" in text

        # FHIR: contained Media referenced from DiagnosticReport.media, valid R4(B), pointing at the same JPEGs.
        report = http.get(f"/fhir/DiagnosticReport/{rid}").json()
        DiagnosticReport.model_validate(report)
        assert [m["comment"] for m in report["media"]] == ["Ảnh chính 1", "Ảnh chính 2"]
        contained = {f"#{c['id']}": c for c in report["contained"]}
        for entry, uid, sub_id in zip(report["media"], (uids[2], uids[0]), ("1", "2"), strict=True):
            media = contained[entry["link"]["reference"]]
            assert media["resourceType"] == "Media" and media["identifier"][0]["value"] == f"urn:oid:{uid}"
            assert media["content"]["contentType"] == "image/jpeg"
            assert httpx.get(media["content"]["url"], timeout=30).content == images[sub_id]

        # An amendment that removes them: signed without them, and the corrected result reaches the HIS without ED.
        r = http.post(f"/api/reports/{rid}/amend", json={"reason": "Bỏ ảnh chính", "key_images": []})
        assert r.status_code == 200 and r.json()["current"]["key_images"] == []
        corrected = wait_for("the corrected ORU", lambda: his.received[1:], timeout=40)[0]
        assert ed_images(corrected) == {} and rp_links(corrected) == {}
        assert "key_images" not in json.loads(http.get(f"/api/reports/{rid}/versions/4/content").content)
        assert http.get(f"/api/reports/{rid}/verify").json()["valid"]


def test_reports_without_key_images_sign_as_before(start_server: StartServer, tmp_path: Path) -> None:
    """A version without key images canonicalises exactly as before key images existed (same keys, no new one), so
    signatures made before still verify; OpenSSL checks it."""
    server = start_server("fs-sqlite")
    path = write_ct(tmp_path, who=patient("Lê^Văn Tâm", "BN-NK", cccd="", bhyt=""), study="nk", size=32)
    assert all(s.Status == 0 for s in store_files(server.dicom_port, [path]).values())
    study_uid = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        r = http.post("/api/reports", json={"study_instance_uid": study_uid, "conclusion": "Bình thường.", **AUTHOR})
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        assert r.json()["current"]["key_images"] == []
        assert http.post(f"/api/reports/{rid}/final", json={}).status_code == 200
        content = http.get(f"/api/reports/{rid}/versions/2/content").content
        assert set(json.loads(content)) == {
            "format", "report_id", "version", "status", "study_instance_uid", "findings", "conclusion",
            "recommendation", "author", "reason", "signed_at",
        }  # fmt: skip
        signature = http.get(f"/api/reports/{rid}/versions/2/signature").content
        assert openssl_verify(content, signature, development_ca(server), tmp_path).returncode == 0
        assert http.get(f"/api/reports/{rid}/verify").json()["valid"]
        assert http.get(f"/api/reports/{rid}/versions/2/key-images/1.jpg").status_code == 404
        assert "Ảnh chính" not in pdftotext(http.get(f"/api/reports/{rid}/versions/2/pdf").content, tmp_path, "nk")
        assert "media" not in http.get(f"/fhir/DiagnosticReport/{rid}").json()
