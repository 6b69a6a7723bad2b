"""Reconciliation against the running server: studies link to orders on arrival; the ones that don't, or whose
patient disagrees, are listed and corrected (corrected objects served, originals kept, who/why recorded)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from storage.db import make_engine
from tests.data import patient, write_ct
from tests.scu import dataset_bytes, store_files
from tests.services import VnpacsService
from worklist.orders import OrderIn, Orders, StepIn


def orders_of(server: VnpacsService) -> Orders:
    """The order service on the server's own index database (the embedded SQLite, WAL: shared safely)."""
    return Orders(make_engine(f"sqlite:///{Path(server.env['VNPACS_DATA_DIR']) / 'index.db'}"))


def place(orders: Orders, placer: str, accession: str, name: str, patient_id: str) -> int:
    order, _ = orders.place(
        OrderIn(
            patient_id=patient_id,
            patient_name=name,
            patient_birth_date="19800101",
            patient_sex="M",
            placer_order_number=placer,
            accession_number=accession,
            procedure_description="CT sọ não",
            steps=[StepIn(modality="CT", station_ae_title="CT01")],
        ),
        source="test",
    )
    return order.pk


def wait_status(orders: Orders, pk: int, status: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    current = ""
    while time.monotonic() < deadline:
        current = orders.get(pk).status
        if current == status:
            return current
        time.sleep(0.1)
    return current


def qido_study(server: VnpacsService, study_uid: str) -> dict:  # type: ignore[type-arg]
    r = httpx.get(f"{server.base_url}/dicom-web/studies", params={"StudyInstanceUID": study_uid}, timeout=30)
    r.raise_for_status()
    (item,) = r.json()
    return item  # type: ignore[no-any-return]


def test_studies_link_to_orders_and_mismatches_are_corrected(embedded: VnpacsService, tmp_path: Path) -> None:
    orders = orders_of(embedded)
    matched = place(orders, "REC-1", "REC1", "Nguyễn^Văn An", "REC-P1")
    mismatched = place(orders, "REC-2", "REC2", "Lê^Văn Cường", "REC-P2")
    target = place(orders, "REC-3", "REC3", "Phạm^Thị Dung", "REC-P3")

    ok = [write_ct(tmp_path, who=patient("NGUYEN^VAN AN", "REC-P1"), study="rec-1", index=i, AccessionNumber="REC1")
          for i in (1, 2)]  # fmt: skip
    wrong = write_ct(tmp_path, who=patient("Le^Van Cuong", "TYPO-P2"), study="rec-2", AccessionNumber="REC2")
    orphan = [write_ct(tmp_path, who=patient("Pham^Thi Dung", "TMP-9"), study="rec-3", index=i, AccessionNumber="")
              for i in (1, 2)]  # fmt: skip
    results = store_files(embedded.dicom_port, [*ok, wrong, *orphan])
    assert all(s.Status == 0 for s in results.values())

    # Linked on arrival by accession number (accent-insensitive name, same ID: no problem to list).
    assert wait_status(orders, matched, "IMAGES_AVAILABLE") == "IMAGES_AVAILABLE"
    assert wait_status(orders, mismatched, "IMAGES_AVAILABLE") == "IMAGES_AVAILABLE"
    assert orders.get(target).status == "SCHEDULED"
    ok_uid = str(dcmread(ok[0]).StudyInstanceUID)
    assert orders.get(matched).study_instance_uid == ok_uid

    problems = httpx.get(f"{embedded.base_url}/api/reconciliation", timeout=30).json()["items"]
    by_uid = {p["study_instance_uid"]: p for p in problems}
    wrong_uid, orphan_uid = str(dcmread(wrong).StudyInstanceUID), str(dcmread(orphan[0]).StudyInstanceUID)
    assert ok_uid not in by_uid
    assert by_uid[wrong_uid]["problem"] == "patient-mismatch"
    assert by_uid[wrong_uid]["differences"] == [{"attribute": "PatientID", "study": "TYPO-P2", "order": "REC-P2"}]
    assert by_uid[orphan_uid]["problem"] == "no-order" and by_uid[orphan_uid]["order"] is None

    # Link the orphan study to its order: every object is rewritten to agree with the order.
    r = httpx.post(
        f"{embedded.base_url}/api/reconciliation/{orphan_uid}/link",
        json={"order_id": target, "reason": "kỹ thuật viên nhập sai mã bệnh nhân", "operator": "ktv.hoa"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["instances"] == 2 and r.json()["order"]["status"] == "IMAGES_AVAILABLE"
    study = qido_study(embedded, orphan_uid)
    assert study["00100010"]["Value"][0]["Alphabetic"] == "Phạm^Thị Dung"
    assert study["00100020"]["Value"] == ["REC-P3"] and study["00080050"]["Value"] == ["REC3"]
    assert orders.get(target).study_instance_uid == orphan_uid
    # The served objects carry the corrections, in UTF-8; pixel data untouched.
    served = httpx.get(
        f"{embedded.base_url}/dicom-web/studies/{orphan_uid}/series/{dcmread(orphan[0]).SeriesInstanceUID}"
        f"/instances/{dcmread(orphan[0]).SOPInstanceUID}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        timeout=30,
    )
    assert served.status_code == 200
    body = served.content
    assert "Phạm^Thị Dung".encode() in body and b"ISO_IR 192" in body
    assert dcmread(orphan[0]).PixelData in body

    # The originals stay recoverable, and the record says who and why.
    db = sqlite3.connect(Path(embedded.env["VNPACS_DATA_DIR"]) / "index.db")
    kept = db.execute(
        "SELECT blob_key, resolution FROM instance_conflict WHERE sop_instance_uid = ?",
        (str(dcmread(orphan[0]).SOPInstanceUID),),
    ).fetchall()
    assert len(kept) == 1 and kept[0][1] == "replaced"
    original = Path(embedded.env["VNPACS_DATA_DIR"]) / "blobs" / kept[0][0]
    assert dataset_bytes(original) == dataset_bytes(orphan[0])  # the dataset as sent, byte for byte
    history = httpx.get(f"{embedded.base_url}/api/studies/{orphan_uid}/corrections", timeout=30).json()["items"]
    assert len(history) == 1
    assert history[0]["who"] == "ktv.hoa (unauthenticated)" and history[0]["why"].startswith("kỹ thuật viên")
    assert history[0]["changes"]["PatientID"] == ["TMP-9", "REC-P3"] and history[0]["instances"] == 2

    # A direct correction of the mismatched study's patient ID clears it from the list.
    r = httpx.post(
        f"{embedded.base_url}/api/studies/{wrong_uid}/corrections",
        json={"changes": {"PatientID": "REC-P2", "PatientName": "Lê^Văn Cường"}, "reason": "sai mã"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    remaining = {p["study_instance_uid"] for p in httpx.get(f"{embedded.base_url}/api/reconciliation").json()["items"]}
    assert wrong_uid not in remaining and orphan_uid not in remaining


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/api/studies/1.2.3.999/corrections", {"changes": {"PatientID": "X"}, "reason": "r"}, 404),
        ("/api/studies/{uid}/corrections", {"changes": {"Modality": "MR"}, "reason": "r"}, 400),
        ("/api/studies/{uid}/corrections", {"changes": {"PatientBirthDate": "1980-01-01"}, "reason": "r"}, 400),
        ("/api/studies/{uid}/corrections", {"changes": {"PatientID": "X"}}, 422),
        ("/api/reconciliation/{uid}/link", {"order_id": 999999, "reason": "r"}, 404),
    ],
)
def test_bad_corrections_are_refused_and_change_nothing(
    embedded: VnpacsService,
    tmp_path: Path,
    path: str,
    body: dict,
    status: int,  # type: ignore[type-arg]
) -> None:
    f = write_ct(tmp_path, who=patient("Võ^Văn Em", "BAD-1"), study="rec-bad")
    assert store_files(embedded.dicom_port, [f])[f].Status == 0
    uid = str(dcmread(f).StudyInstanceUID)
    r = httpx.post(embedded.base_url + path.format(uid=uid), json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["detail"]
    assert qido_study(embedded, uid)["00100020"]["Value"] == ["BAD-1"]
