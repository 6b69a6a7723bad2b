"""Checks that the synthetic generator is valid DICOM, deterministic, Vietnamese-correct and fast."""

from __future__ import annotations

import random
import unicodedata
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from pacs.synthetic import (
    generate_ct_studies,
    make_mr_slice,
    make_multiframe,
    make_patient,
    vietnamese_name,
)


def test_vietnamese_names_are_nfc_pn() -> None:
    rng = random.Random(0)
    for _ in range(200):
        name = vietnamese_name(rng)
        family, given = name.split("^")
        assert unicodedata.is_normalized("NFC", name)
        assert family and len(given.split(" ")) == 2


def test_patient_identifiers_have_vietnamese_formats() -> None:
    p = make_patient(random.Random(1))
    assert len(p.cccd) == 12 and p.cccd.isdigit()
    assert p.cccd[4:6] == p.birth_date[2:4]
    assert len(p.bhyt) == 15 and p.bhyt[:2].isalpha() and p.bhyt[2:].isdigit()


def test_generated_files_roundtrip(tmp_path: Path) -> None:
    paths = generate_ct_studies(tmp_path / "a", studies=2, series_per_study=2, slices=3, seed=7)
    again = generate_ct_studies(tmp_path / "b", studies=2, series_per_study=2, slices=3, seed=7)
    assert len(paths) == 12
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    ds = pydicom.dcmread(paths[4])
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == CTImageStorage
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    # The UTF-8 bytes of the name are in the file and decode back to the same NFC text.
    assert str(ds.PatientName).encode("utf-8") in paths[4].read_bytes()
    assert unicodedata.is_normalized("NFC", str(ds.PatientName))
    issuers = {item.IssuerOfPatientID: item.PatientID for item in ds.OtherPatientIDsSequence}
    assert len(issuers["VN-CCCD"]) == 12 and len(issuers["VN-BHYT"]) == 15
    arr = ds.pixel_array
    assert arr.dtype == np.int16 and arr.shape == (512, 512) and arr.std() > 100
    assert len({pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}) == 12
    studies = {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in paths}
    assert len(studies) == 2


def test_mr_slice_is_unsigned() -> None:
    rng = random.Random(0)
    ds = make_mr_slice(
        patient=make_patient(rng),
        study_uid="1.2.3",
        series_uid="1.2.3.9",
        sop_uid="1.2.3.9.1",
        index=0,
        rows=64,
        cols=64,
        rng=rng,
    )
    assert ds.Modality == "MR" and ds.PixelRepresentation == 0 and ds.pixel_array.dtype == np.uint16


def test_multiframe_is_streamed_and_readable(tmp_path: Path) -> None:
    path = make_multiframe(tmp_path / "mf.dcm", target_bytes=3_000_000, rows=128, cols=128)
    ds = pydicom.dcmread(path)
    frames = int(ds.NumberOfFrames)
    assert frames == round(3_000_000 / (128 * 128 * 2))
    assert ds.pixel_array.shape == (frames, 128, 128)
    assert path.stat().st_size > frames * 128 * 128 * 2
