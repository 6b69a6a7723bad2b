"""Objects stored in Deflated Explicit VR Little Endian: metadata cached before a fix is not served, and frames of a
large one are cut while inflating, never holding the whole data set."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian

from pacs.synthetic import synthetic_uid
from storage.ingest import InvalidObject, read_header
from tests.conftest import StartServer
from tests.data import patient, write_ct
from tests.scu import multipart_parts, store_files
from tests.services import VnpacsService, reset_peak_rss, vm_hwm_bytes

OCTETS = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
MiB = 1024 * 1024


def _instance_url(server: VnpacsService, ds: Dataset) -> str:
    return (f"{server.base_url}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")  # fmt: skip


def _index(server: VnpacsService) -> sqlite3.Connection:
    return sqlite3.connect(Path(server.env["VNPACS_DATA_DIR"]) / "index.db")


def _cached_row(server: VnpacsService, sop_instance_uid: str, timeout: float = 15) -> tuple[str, str]:
    """(SHA-256, cached text) of a stored object once the metadata warmer has cached it."""
    db = _index(server)
    try:
        [sha] = db.execute("SELECT sha256 FROM instance WHERE sop_instance_uid = ?", (sop_instance_uid,)).fetchone()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = db.execute("SELECT json FROM metadata_cache WHERE sha256 = ?", (sha,)).fetchone()
            if row is not None:
                return sha, row[0]
            time.sleep(0.1)
    finally:
        db.close()
    raise AssertionError(f"metadata of {sop_instance_uid} not cached within {timeout} s")


def test_metadata_cached_in_an_older_format_is_recomputed_and_rewritten(
    embedded: VnpacsService, tmp_path: Path
) -> None:
    path = write_ct(tmp_path, who=patient("Lý^Thị Mai", "DFL-1"), study="deflated-cache", size=32)
    ds = dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    assert all(s.Status == 0 for s in store_files(embedded.dicom_port, [path]).values())
    sha, current = _cached_row(embedded, str(ds.SOPInstanceUID))

    # A row as the code before the deflate fix cached it: plain DICOM JSON, without the pixel data's bulk data URI.
    old = json.loads(current[current.index("{") :])
    del old["7FE00010"]
    old_text = json.dumps(old, ensure_ascii=False, separators=(",", ":"))
    with _index(embedded) as db:
        db.execute("UPDATE metadata_cache SET json = ? WHERE sha256 = ?", (old_text, sha))
    db.close()
    root = f"{embedded.base_url}/dicom-web"
    old_etag = '"' + hashlib.sha256(f"{root}|{sha}".encode()).hexdigest()[:32] + '"'

    url = _instance_url(embedded, ds)
    response = httpx.get(f"{url}/metadata", headers={"If-None-Match": old_etag}, timeout=30)
    assert response.status_code == 200, response.text  # a body from the older format is not revalidated
    assert response.headers["etag"] != old_etag
    [item] = response.json()
    assert item["7FE00010"] == {"vr": "OW", "BulkDataURI": f"{url}/bulkdata/7FE00010"}
    pixels = httpx.get(item["7FE00010"]["BulkDataURI"], headers=OCTETS, timeout=30)
    assert pixels.status_code == 200 and multipart_parts(pixels) == [ds.PixelData]

    with _index(embedded) as db:
        [rewritten] = db.execute("SELECT json FROM metadata_cache WHERE sha256 = ?", (sha,)).fetchone()
    db.close()
    assert rewritten != old_text and "7FE00010" in rewritten
    assert json.loads(rewritten[rewritten.index("{") :]) == json.loads(current[current.index("{") :])
    again = httpx.get(f"{url}/metadata", headers={"If-None-Match": response.headers["etag"]}, timeout=30)
    assert again.status_code == 304


def _large_deflated(path: Path, frames: int, size: int) -> tuple[Dataset, np.ndarray]:
    """A multi-frame 16-bit object in Deflated Explicit VR Little Endian, frames told apart by value and by a marker
    row; its header has sequences of undefined length (with items of undefined length) to be skipped."""
    pixels = np.empty((frames, size, size), dtype="<u2")
    pixels[:] = (np.arange(frames, dtype="<u2") * 37 + 100)[:, None, None]
    pixels[:, 0, :] = np.arange(size, dtype="<u2")
    pixels[np.arange(frames), 1, np.arange(frames)] = 4000
    uid = synthetic_uid("deflated-large", frames, size)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Word SC
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = synthetic_uid("deflated-large", "study")
    ds.SeriesInstanceUID = synthetic_uid("deflated-large", "series")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName, ds.PatientID, ds.Modality = "Hồ^Văn Lớn", "DFL-LARGE", "OT"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "121320", "DCM", "Uncompressed predecessor"
    reference = Dataset()
    reference.ReferencedSOPClassUID = ds.SOPClassUID
    reference.ReferencedSOPInstanceUID = synthetic_uid("deflated-large", "source")
    reference.PurposeOfReferenceCodeSequence = Sequence([code])
    reference.is_undefined_length_sequence_item = True
    ds.SourceImageSequence = Sequence([reference, reference])
    ds["SourceImageSequence"].is_undefined_length = True
    reference["PurposeOfReferenceCodeSequence"].is_undefined_length = True
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.tobytes()
    dcmwrite(path, ds, enforce_file_format=True)
    del ds.PixelData
    return ds, pixels


def test_a_late_frame_of_a_large_deflated_object_is_cut_while_inflating(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server("fs-sqlite")
    frames, size = 110, 1024
    inflated = frames * size * size * 2  # 220 MiB of pixel data, a few hundred kB deflated
    path = tmp_path / "large-deflated.dcm"
    ds, pixels = _large_deflated(path, frames, size)
    assert path.stat().st_size < inflated // 100
    boundary = "vnpacs-deflated"
    body = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes()
    body += f"\r\n--{boundary}--\r\n".encode()
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    # Storing it checks the whole deflate stream, inflating it once as it reads, never holding it.
    baseline = reset_peak_rss(server.pid)
    stow = httpx.post(f"{server.base_url}/dicom-web/studies", content=body, headers={"Content-Type": content_type},
                      timeout=120)  # fmt: skip
    assert stow.status_code == 200, stow.text
    growth = vm_hwm_bytes(server.pid) - baseline
    assert growth < 48 * MiB, f"peak RSS grew {growth / MiB:.0f} MiB storing a {inflated / MiB:.0f} MiB object"

    # The same object cut short is refused, and the complete copy stays the one served (checked frame by frame below).
    data = path.read_bytes()
    cut = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data[: len(data) * 2 // 3]
    cut += f"\r\n--{boundary}--\r\n".encode()
    refused = httpx.post(f"{server.base_url}/dicom-web/studies", content=cut, headers={"Content-Type": content_type},
                         timeout=120)  # fmt: skip
    assert refused.status_code == 409, refused.text
    assert "truncated" in refused.headers["Warning"]
    listed = httpx.get(f"{server.base_url}/dicom-web/studies/{ds.StudyInstanceUID}/instances", timeout=30).json()
    assert [i["00080018"]["Value"][0] for i in listed] == [ds.SOPInstanceUID]

    # Metadata (computed in the background once ingest is quiet) inflates the header, not the data set.
    baseline = reset_peak_rss(server.pid)
    _cached_row(server, str(ds.SOPInstanceUID))
    assert vm_hwm_bytes(server.pid) - baseline < 48 * MiB
    url = _instance_url(server, ds)
    [item] = httpx.get(f"{url}/metadata", timeout=30).json()
    assert item["7FE00010"]["BulkDataURI"] == f"{url}/bulkdata/7FE00010"

    baseline = reset_peak_rss(server.pid)
    started = time.monotonic()
    got = httpx.get(f"{url}/frames/105,3", headers=OCTETS, timeout=60)
    took = time.monotonic() - started
    assert got.status_code == 200, got.text
    assert b"Content-Type: application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1\r\n" in got.content[:200]
    assert multipart_parts(got) == [pixels[104].tobytes(), pixels[2].tobytes()]
    growth = vm_hwm_bytes(server.pid) - baseline
    assert growth < 48 * MiB, f"peak RSS grew {growth / MiB:.0f} MiB for 2 frames of a {inflated / MiB:.0f} MiB object"
    assert took < 20, f"{took:.1f} s"
    assert httpx.get(f"{url}/frames/{frames + 1}", headers=OCTETS, timeout=60).status_code == 404

    # Rendering cuts its frame the same way.
    baseline = reset_peak_rss(server.pid)
    width = frames * 37 + 100
    window = {"window": f"{width / 2},{width}", "accept": "image/png"}
    rendered = httpx.get(f"{url}/frames/{frames}/rendered", params=window, timeout=60)
    assert rendered.status_code == 200, rendered.text
    image = np.asarray(Image.open(io.BytesIO(rendered.content)), dtype=np.float64)
    expected = np.clip(pixels[frames - 1] / width, 0, 1) * 255
    assert image.shape == (size, size) and np.abs(image - expected).max() <= 1
    growth = vm_hwm_bytes(server.pid) - baseline
    assert growth < 96 * MiB, f"peak RSS grew {growth / MiB:.0f} MiB rendering a frame of {inflated / MiB:.0f} MiB"


def test_a_deflated_object_cut_short_is_refused_without_inflating_it_whole(tmp_path: Path) -> None:
    """Ingest reads a deflated object's header while inflating, then inflates the rest once to check it is all
    there: an object cut anywhere in its deflate stream is refused, a complete one reads as pydicom reads it."""
    path = tmp_path / "complete.dcm"
    ds, _ = _large_deflated(path, 8, 256)
    header = read_header(path)
    assert header.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    assert header.ds.SOPInstanceUID == ds.SOPInstanceUID
    assert str(header.ds.PatientName) == "Hồ^Văn Lớn"
    expected = dcmread(path, stop_before_pixels=True)
    assert len(header.ds.SourceImageSequence) == len(expected.SourceImageSequence) == 2
    data = path.read_bytes()
    for keep in (len(data) - 4, len(data) * 2 // 3):
        cut = tmp_path / f"cut-{keep}.dcm"
        cut.write_bytes(data[:keep])
        with pytest.raises(InvalidObject, match="truncated"):
            read_header(cut)
