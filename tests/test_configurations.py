"""The four storage configurations {filesystem, S3} × {SQLite, PostgreSQL} store, find, retrieve and verify alike."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from tests.conftest import CONFIGURATIONS, StartServer
from tests.data import patient, write_ct
from tests.scu import (
    c_find,
    c_get,
    dataset_bytes,
    multipart_parts,
    run_dcmtk,
    storage_corpus,
    store_files,
    study_identifier,
)


def _sample() -> list[Path]:
    """A spread of the corpus, distinct SOP Instance UIDs: uncompressed, JPEG, JPEG 2000, big endian, multi-frame."""
    wanted = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "ExplVR_BigEnd.dcm", "emri_small.dcm",
              "JPEG-LL.dcm", "MR2_J2KR.dcm", "SC_rgb_jpeg_dcmtk.dcm"]  # fmt: skip
    by_name = {c.path.name: c.path for c in storage_corpus()}
    return [by_name[n] for n in wanted if n in by_name]


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_configuration_stores_finds_retrieves_and_verifies(
    configuration: str, start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(configuration, VNPACS_DIMSE_PROCESSES="2")  # as deployed: a process per core
    port = server.dicom_port
    sample = _sample()
    assert len(sample) >= 6
    vn = write_ct(tmp_path, who=patient("Hoàng^Thị Yến", f"CFG-{configuration}"), study=f"cfg-{configuration}")
    via_dcmtk = run_dcmtk("storescu", "-aec", "VNPACS", "127.0.0.1", str(port), str(vn))
    assert via_dcmtk.returncode == 0, via_dcmtk.stderr
    statuses = store_files(port, sample)
    assert all(s.Status == 0 for s in statuses.values()), {p.name: hex(s.Status) for p, s in statuses.items()}

    matches, final = c_find(port, study_identifier("STUDY", PatientName="hoang^thi yen", PatientID=""))
    assert final == 0 and [m.PatientID for m in matches] == [f"CFG-{configuration}"]

    pairs = []
    for path in sample:
        ds = dcmread(path, stop_before_pixels=True)
        pairs.append((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
    uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sample]
    got, final = c_get(port, study_identifier("IMAGE", SOPInstanceUID=uids), pairs, tmp_path / "get")
    assert final == 0
    for uid, path in zip(uids, sample, strict=True):
        assert dataset_bytes(got[uid]) == dataset_bytes(path), path.name

    # WADO-RS gives back the same stored bytes, from the filesystem (memory maps) or S3 (streamed buffers).
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    study = dcmread(vn, stop_before_pixels=True).StudyInstanceUID
    response = httpx.get(f"{server.base_url}/dicom-web/studies/{study}", headers={"Accept": accept}, timeout=60)
    assert response.status_code == 200
    [part] = multipart_parts(response)
    (tmp_path / "wado.dcm").write_bytes(part)
    assert dataset_bytes(tmp_path / "wado.dcm") == dataset_bytes(vn)

    verify = subprocess.run([sys.executable, "-m", "pacs", "verify"], env=server.env, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "missing blobs: 0, hash mismatches: 0, orphan blobs: 0" in verify.stdout


def test_s3_stores_a_large_object_in_parts_and_returns_it_intact(start_server: StartServer, tmp_path: Path) -> None:
    from pacs.synthetic import make_multiframe

    server = start_server("s3-sqlite")
    big = make_multiframe(tmp_path / "big.dcm", target_bytes=40 * 1024 * 1024, rows=256, cols=256)  # > 16 MiB parts
    sent = run_dcmtk("storescu", "-aec", "VNPACS", "127.0.0.1", str(server.dicom_port), str(big), timeout=300)
    assert sent.returncode == 0, sent.stderr
    ds = dcmread(big, stop_before_pixels=True)
    got, final = c_get(server.dicom_port, study_identifier("IMAGE", SOPInstanceUID=str(ds.SOPInstanceUID)),
                       [(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))], tmp_path / "get")  # fmt: skip
    assert final == 0
    assert dataset_bytes(got[str(ds.SOPInstanceUID)]) == dataset_bytes(big)

    # WADO-RS streams it from S3 in buffers of a few MB: the same bytes, whatever the buffer boundaries.
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    response = httpx.get(f"{server.base_url}/dicom-web/studies/{ds.StudyInstanceUID}", headers={"Accept": accept},
                         timeout=120)  # fmt: skip
    assert response.status_code == 200
    [part] = multipart_parts(response)
    (tmp_path / "wado.dcm").write_bytes(part)
    assert dataset_bytes(tmp_path / "wado.dcm") == dataset_bytes(big)
