"""Synthetic Vietnamese-hospital DICOM data for tests, benchmarks and demos.

Everything here is generated, never derived from real patients, so the files
can be committed, shared and pushed at any PACS without privacy concerns.
Output is deterministic for a given seed so benchmarks and tests reproduce.
"""

from __future__ import annotations

import io
import random
import struct
import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from functools import lru_cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
)

__all__ = [
    "PatientInfo",
    "StudyInfo",
    "generate_ct_studies",
    "make_ct_slice",
    "make_mr_slice",
    "make_multiframe",
    "make_patient",
    "make_study_info",
    "synthetic_uid",
    "vietnamese_name",
]

CHARSET = "ISO_IR 192"
IMPLEMENTATION_VERSION = "VNPACS_SYNTH_1"
_UID_NAMESPACE = uuid.UUID("8a4b7c52-6d1e-5f0a-9c3b-2e7d4f6a1b90")


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Weighted roughly by real frequency: Nguyễn alone is ~38 % of the population.
FAMILY_NAMES = (
    ("Nguyễn",) * 12
    + ("Trần",) * 4
    + ("Lê",) * 3
    + ("Phạm",) * 2
    + _words("Hoàng Huỳnh Phan Vũ Võ Đặng Bùi Đỗ Hồ Ngô Dương Lý Đinh Trương Lâm Mai Trịnh Đoàn Cao Tạ")
)
MALE_MIDDLE = _words("Văn Hữu Đức Minh Quốc Thanh Công Xuân Đình Quang")
FEMALE_MIDDLE = _words("Thị Ngọc Thu Minh Thanh Kim Thúy Bảo Mỹ Hồng")
MALE_GIVEN = _words(
    "An Bình Cường Dũng Đạt Hải Hùng Huy Khánh Long Nam Phúc Quân Sơn Tài Thắng Toàn Trung Tuấn Việt Vinh"
)
FEMALE_GIVEN = _words(
    "An Anh Chi Dung Giang Hà Hạnh Hương Lan Linh Mai Ngân Nhung Oanh Phương Quỳnh Thảo Trang Tuyết Vy Yến"
)
INSTITUTIONS = (
    "Bệnh viện Bạch Mai",
    "Bệnh viện Chợ Rẫy",
    "Bệnh viện Hữu nghị Việt Đức",
    "Bệnh viện Trung ương Huế",
    "Bệnh viện Đại học Y Dược TP.HCM",
    "Bệnh viện Đa khoa tỉnh Nghệ An",
    "Bệnh viện Đà Nẵng",
    "Bệnh viện Nhân dân 115",
)
# (code used in CCCD, code used in BHYT) for a few provinces: Hà Nội, Hải Phòng,
# Nghệ An, Thừa Thiên Huế, Đà Nẵng, TP.HCM, Cần Thơ.
PROVINCES = (
    ("001", "01"),
    ("031", "31"),
    ("040", "40"),
    ("046", "46"),
    ("048", "48"),
    ("079", "79"),
    ("092", "92"),
)
BHYT_GROUPS = ("DN", "HC", "HT", "TE", "GD", "HS", "SV", "CN", "NO", "XB")


@dataclass(frozen=True)
class CtProtocol:
    """Study-level wording and geometry for one kind of CT examination."""

    description: str
    body_part: str
    series: tuple[str, ...]
    window: tuple[int, int]
    fov_mm: float
    thickness_mm: float


CT_PROTOCOLS = (
    CtProtocol(
        "CT sọ não không tiêm thuốc",
        "HEAD",
        ("Sọ não 5mm", "Sọ não 1.25mm cửa sổ xương"),
        (40, 80),
        230.0,
        5.0,
    ),
    CtProtocol(
        "CT ngực liều thấp tầm soát ung thư phổi",
        "CHEST",
        ("Phổi 1.25mm", "Trung thất 5mm"),
        (-600, 1500),
        350.0,
        1.25,
    ),
    CtProtocol(
        "CT bụng có tiêm thuốc cản quang",
        "ABDOMEN",
        ("Thì động mạch", "Thì tĩnh mạch cửa"),
        (50, 350),
        380.0,
        2.5,
    ),
    CtProtocol("CT cột sống thắt lưng", "LSPINE", ("Cửa sổ xương", "Cửa sổ mô mềm"), (400, 1800), 200.0, 2.0),
)
MR_PROTOCOLS = (
    ("MRI sọ não có tiêm thuốc đối quang từ", "HEAD", ("T1 SE AX", "T2 TSE AX", "FLAIR AX")),
    ("MRI cột sống cổ", "CSPINE", ("T2 TSE SAG", "T1 TSE SAG")),
    ("MRI khớp gối phải", "KNEE", ("PD FS COR", "T1 TSE COR")),
)


@dataclass(frozen=True)
class PatientInfo:
    """Demographics shared by every instance of one synthetic patient."""

    name: str
    patient_id: str
    birth_date: str  # DICOM DA, YYYYMMDD
    sex: str  # "M" or "F"
    cccd: str  # 12-digit citizen identity card number
    bhyt: str  # 15-character health insurance card number


@dataclass(frozen=True)
class StudyInfo:
    """Study-level attributes that must be identical in every slice of a study."""

    date: str
    time: str
    accession: str
    study_id: str
    description: str
    institution: str
    referring: str
    body_part: str
    series_descriptions: tuple[str, ...]
    window: tuple[int, int] = (40, 400)
    fov_mm: float = 350.0
    thickness_mm: float = 5.0
    manufacturer: str = "VNPACS SYNTHETIC"


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def vietnamese_name(rng: random.Random, sex: str | None = None) -> str:
    """Return a DICOM PN such as ``Nguyễn^Văn An`` (family^middle given), NFC-normalised.

    Vietnamese order is family, middle, given; DICOM has no middle-name slot
    that Vietnamese users expect, so middle and given share the given-name
    component, which is how Vietnamese RIS/HIS systems export names.
    """
    if sex is None:
        sex = rng.choice("MF")
    family = rng.choice(FAMILY_NAMES)
    if sex == "F":
        middle, given = rng.choice(FEMALE_MIDDLE), rng.choice(FEMALE_GIVEN)
    else:
        middle, given = rng.choice(MALE_MIDDLE), rng.choice(MALE_GIVEN)
    return _nfc(f"{family}^{middle} {given}")


def _cccd(rng: random.Random, province: str, sex: str, birth_year: int) -> str:
    """12 digits: province (3), sex/century (1), birth year (2), serial (6)."""
    century = 0 if birth_year < 2000 else 2
    sex_century = century + (1 if sex == "F" else 0)
    return f"{province}{sex_century}{birth_year % 100:02d}{rng.randrange(10**6):06d}"


def _bhyt(rng: random.Random, province: str) -> str:
    """15 characters: group (2 letters), benefit level (1), province (2), serial (10)."""
    return f"{rng.choice(BHYT_GROUPS)}{rng.randint(1, 5)}{province}{rng.randrange(10**10):010d}"


def make_patient(rng: random.Random) -> PatientInfo:
    """Draw a plausible adult or child patient with consistent CCCD/sex/birth year."""
    sex = rng.choice("MF")
    birth = date(1935, 1, 1) + timedelta(days=rng.randrange(365 * 88))
    cccd_province, bhyt_province = rng.choice(PROVINCES)
    return PatientInfo(
        name=vietnamese_name(rng, sex),
        patient_id=f"BN{rng.randrange(10**8):08d}",
        birth_date=birth.strftime("%Y%m%d"),
        sex=sex,
        cccd=_cccd(rng, cccd_province, sex, birth.year),
        bhyt=_bhyt(rng, bhyt_province),
    )


def make_study_info(rng: random.Random, modality: str = "CT") -> StudyInfo:
    """Draw study-level attributes; call once per study and pass to every slice."""
    day = date(2024, 1, 1) + timedelta(days=rng.randrange(700))
    hh, mm, ss = rng.randrange(7, 20), rng.randrange(60), rng.randrange(60)
    accession = f"{modality}{day:%y%m%d}{rng.randrange(10**4):04d}"
    referring = vietnamese_name(rng)
    institution = rng.choice(INSTITUTIONS)
    if modality == "MR":
        desc, part, series = rng.choice(MR_PROTOCOLS)
        return StudyInfo(
            day.strftime("%Y%m%d"),
            f"{hh:02d}{mm:02d}{ss:02d}",
            accession,
            f"{rng.randrange(10**6)}",
            _nfc(desc),
            _nfc(institution),
            referring,
            part,
            tuple(_nfc(s) for s in series),
            (600, 1200),
            240.0,
            4.0,
        )
    proto = rng.choice(CT_PROTOCOLS)
    return StudyInfo(
        day.strftime("%Y%m%d"),
        f"{hh:02d}{mm:02d}{ss:02d}",
        accession,
        f"{rng.randrange(10**6)}",
        _nfc(proto.description),
        _nfc(institution),
        referring,
        proto.body_part,
        tuple(_nfc(s) for s in proto.series),
        proto.window,
        proto.fov_mm,
        proto.thickness_mm,
    )


@lru_cache(maxsize=256)
def _study_info_for_uid(study_uid: str, modality: str) -> StudyInfo:
    """Stable study attributes when the caller passes only UIDs (slices of a study agree)."""
    return make_study_info(random.Random(study_uid), modality)


def synthetic_uid(*parts: object) -> str:
    """Deterministic ``2.25.<uuid5>`` UID from its parts, so a seed reproduces the same data set.

    pydicom's generate_uid ignores entropy sources when prefix is None, hence uuid5.
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(map(str, parts))).int}"


# --------------------------------------------------------------------------- pixels

_NOISE_SPAN = 24  # noise is clipped to ±_NOISE_SPAN stored units


@lru_cache(maxsize=8)
def _ct_bases(rows: int, cols: int) -> tuple[npt.NDArray[np.int16], ...]:
    """A few head-like phantoms (stored values, HU + 1024) at different z levels.

    Building ellipses costs ~10 ms per image, so they are built once and the
    per-slice work is just picking one and adding a window of a noise pool.
    """
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    y = (y - rows / 2) / (rows / 2)
    x = (x - cols / 2) / (cols / 2)
    bases = []
    for scale in (0.72, 0.80, 0.86, 0.90, 0.92, 0.90, 0.85, 0.76):
        hu = np.full((rows, cols), -1000.0, dtype=np.float32)
        r_outer = (x / (0.78 * scale)) ** 2 + (y / (0.92 * scale)) ** 2
        r_inner = (x / (0.72 * scale)) ** 2 + (y / (0.86 * scale)) ** 2
        hu[r_outer <= 1.0] = 900.0  # skull
        hu[r_inner <= 1.0] = 35.0  # brain
        ventricles = ((x - 0.12) / 0.07) ** 2 + (y / 0.22) ** 2 <= 1.0
        ventricles |= ((x + 0.12) / 0.07) ** 2 + (y / 0.22) ** 2 <= 1.0
        hu[ventricles & (r_inner <= 1.0)] = 8.0
        grey = ((x / (0.66 * scale)) ** 2 + (y / (0.80 * scale)) ** 2 > 1.0) & (r_inner <= 1.0)
        hu[grey] = 42.0
        table = (y > 0.96) & (np.abs(x) < 0.7)
        hu[table] = 200.0
        stored = np.clip(hu + 1024.0, _NOISE_SPAN, 2047 - _NOISE_SPAN)
        bases.append(stored.astype(np.int16))
    return tuple(bases)


def _noise(size: int) -> npt.NDArray[np.float64]:
    """Gaussian noise with slack so a random window of `size` elements is a cheap view."""
    gen = np.random.default_rng(20240601)
    return np.clip(gen.normal(0.0, 8.0, size + 65536), -_NOISE_SPAN, _NOISE_SPAN)


@lru_cache(maxsize=8)
def _signed_noise(size: int) -> npt.NDArray[np.int16]:
    return _noise(size).astype(np.int16)


@lru_cache(maxsize=8)
def _unsigned_noise(size: int) -> npt.NDArray[np.uint16]:
    return (_noise(size) + _NOISE_SPAN).astype(np.uint16)


def _ct_pixels(rows: int, cols: int, index: int, rng: random.Random) -> npt.NDArray[np.int16]:
    bases = _ct_bases(rows, cols)
    base = bases[(index // 4) % len(bases)]
    pool = _signed_noise(rows * cols)
    off = rng.randrange(65536)
    return base + pool[off : off + rows * cols].reshape(rows, cols)


@lru_cache(maxsize=8)
def _mr_bases(rows: int, cols: int) -> tuple[npt.NDArray[np.uint16], ...]:
    """MR-like magnitude images: dark background, bright fat ring, mid-grey brain."""
    bases = []
    for ct in _ct_bases(rows, cols)[::2]:
        mr = np.zeros(ct.shape, dtype=np.float32)
        mr[ct > 1500] = 1800.0  # skull/scalp fat
        mr[(ct > 1000) & (ct <= 1500)] = 900.0  # brain
        mr[(ct > 1024) & (ct < 1040)] = 1400.0  # CSF bright on T2
        bases.append(np.clip(mr, 0, 4095 - 2 * _NOISE_SPAN).astype(np.uint16))
    return tuple(bases)


def _mr_pixels(rows: int, cols: int, index: int, rng: random.Random) -> npt.NDArray[np.uint16]:
    bases = _mr_bases(rows, cols)
    base = bases[(index // 4) % len(bases)]
    pool = _unsigned_noise(rows * cols)
    off = rng.randrange(65536)
    return base + pool[off : off + rows * cols].reshape(rows, cols)


# --------------------------------------------------------------------------- datasets


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    return meta


def _other_ids(patient: PatientInfo) -> DicomSequence:
    """CCCD and BHYT numbers as Other Patient IDs, as Vietnamese HIS integrations send them."""
    items = []
    for value, issuer in ((patient.cccd, "VN-CCCD"), (patient.bhyt, "VN-BHYT")):
        item = Dataset()
        item.PatientID = value
        item.IssuerOfPatientID = issuer
        item.TypeOfPatientID = "TEXT"
        items.append(item)
    return DicomSequence(items)


def _base_dataset(
    *,
    modality: str,
    sop_class: str,
    patient: PatientInfo,
    study: StudyInfo,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    series_description: str,
    index: int,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid)
    ds.SpecificCharacterSet = CHARSET
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study.date
    ds.StudyTime = study.time
    ds.SeriesTime = f"{study.time[:4]}{(int(study.time[4:6]) + series_number) % 60:02d}"
    ds.ContentTime = ds.AcquisitionTime = f"{ds.SeriesTime}.{index % 1000:03d}"
    ds.AccessionNumber = study.accession
    ds.Modality = modality
    ds.Manufacturer = study.manufacturer
    ds.InstitutionName = study.institution
    ds.ReferringPhysicianName = study.referring
    ds.StudyDescription = study.description
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = "Synthetic"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = "VNPACS-SYNTH"
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    age = int(study.date[:4]) - int(patient.birth_date[:4])
    ds.PatientAge = f"{max(age, 0):03d}Y"
    ds.OtherPatientIDsSequence = _other_ids(patient)
    ds.BodyPartExamined = study.body_part
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    ds.FrameOfReferenceUID = synthetic_uid("for", study_uid)
    ds.PositionReferenceIndicator = ""
    return ds


def _add_geometry(ds: Dataset, study: StudyInfo, rows: int, cols: int, index: int) -> None:
    spacing = study.fov_mm / cols
    z = -index * study.thickness_mm
    ds.ImagePositionPatient = [round(-study.fov_mm / 2, 3), round(-study.fov_mm / 2, 3), round(z, 3)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = study.thickness_mm
    ds.SpacingBetweenSlices = study.thickness_mm
    ds.SliceLocation = round(z, 3)
    ds.PixelSpacing = [round(spacing, 6), round(spacing, 6)]


def _add_pixels(
    ds: Dataset, arr: npt.NDArray[np.int16] | npt.NDArray[np.uint16], *, bits_stored: int, signed: bool
) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.add_new(0x7FE00010, "OW", arr.tobytes())


def make_ct_slice(
    *,
    patient: PatientInfo,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    index: int,
    rows: int = 512,
    cols: int = 512,
    rng: random.Random,
    study: StudyInfo | None = None,
    series_number: int = 1,
    series_description: str | None = None,
) -> Dataset:
    """One axial CT slice (CT Image Storage, signed 12-bit in int16) ready for dcmwrite.

    `study` defaults to attributes derived from `study_uid`, so slices of one
    study agree even when callers only pass UIDs.
    """
    study = study or _study_info_for_uid(study_uid, "CT")
    desc = series_description or study.series_descriptions[(series_number - 1) % len(study.series_descriptions)]
    ds = _base_dataset(
        modality="CT",
        sop_class=CTImageStorage,
        patient=patient,
        study=study,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        series_number=series_number,
        series_description=desc,
        index=index,
    )
    ds.KVP = 120
    ds.XRayTubeCurrent = 250
    ds.ConvolutionKernel = "STANDARD"
    ds.DataCollectionDiameter = 500
    ds.ReconstructionDiameter = study.fov_mm
    _add_geometry(ds, study, rows, cols, index)
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = study.window
    _add_pixels(ds, _ct_pixels(rows, cols, index, rng), bits_stored=12, signed=True)
    return ds


def make_mr_slice(
    *,
    patient: PatientInfo,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    index: int,
    rows: int = 512,
    cols: int = 512,
    rng: random.Random,
    study: StudyInfo | None = None,
    series_number: int = 1,
    series_description: str | None = None,
) -> Dataset:
    """One MR slice (MR Image Storage, unsigned 12-bit in uint16); same contract as CT."""
    study = study or _study_info_for_uid(study_uid, "MR")
    desc = series_description or study.series_descriptions[(series_number - 1) % len(study.series_descriptions)]
    ds = _base_dataset(
        modality="MR",
        sop_class=MRImageStorage,
        patient=patient,
        study=study,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        series_number=series_number,
        series_description=desc,
        index=index,
    )
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = 500 if "T1" in desc else 4000
    ds.EchoTime = 12 if "T1" in desc else 95
    ds.EchoTrainLength = 1
    ds.MagneticFieldStrength = 1.5
    ds.ImagingFrequency = 63.87
    _add_geometry(ds, study, rows, cols, index)
    ds.WindowCenter, ds.WindowWidth = study.window
    _add_pixels(ds, _mr_pixels(rows, cols, index, rng), bits_stored=12, signed=False)
    return ds


def generate_ct_studies(
    out_dir: Path,
    *,
    studies: int = 10,
    series_per_study: int = 2,
    slices: int = 100,
    rows: int = 512,
    cols: int = 512,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write `studies` × `series_per_study` × `slices` CT Part 10 files under `out_dir`.

    Layout is ``study_NNN/series_NN/NNNN.dcm``. `progress` is called after each
    file with the number of files written so far. Same seed, same bytes.
    """
    rng = random.Random(seed)
    paths: list[Path] = []
    for s in range(studies):
        patient = make_patient(rng)
        study = make_study_info(rng, "CT")
        study_uid = synthetic_uid(seed, "study", s)
        for se in range(series_per_study):
            series_uid = synthetic_uid(seed, "series", s, se)
            series_dir = out_dir / f"study_{s:03d}" / f"series_{se:02d}"
            series_dir.mkdir(parents=True, exist_ok=True)
            for i in range(slices):
                ds = make_ct_slice(
                    patient=patient,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    sop_uid=synthetic_uid(seed, "sop", s, se, i),
                    index=i,
                    rows=rows,
                    cols=cols,
                    rng=rng,
                    study=study,
                    series_number=se + 1,
                )
                path = series_dir / f"{i:04d}.dcm"
                dcmwrite(path, ds, enforce_file_format=True)
                paths.append(path)
                if progress is not None:
                    progress(len(paths))
    return paths


def make_multiframe(path: Path, *, target_bytes: int, rows: int = 512, cols: int = 512) -> Path:
    """Write one Multi-frame Grayscale Word SC instance with ~`target_bytes` of pixel data.

    Frames are streamed to disk one at a time after a header serialised by
    pydicom, so a 1 GB instance needs only one frame in memory. That is the
    point: it lets tests check the server's own peak memory, not ours.
    """
    frame_bytes = rows * cols * 2
    frames = max(1, round(target_bytes / frame_bytes))
    total = frames * frame_bytes
    if total >= 0xFFFFFFFF:
        raise ValueError("native Pixel Data longer than 4 GiB cannot be encoded")
    rng = random.Random(f"multiframe-{target_bytes}")
    patient = make_patient(rng)
    study = make_study_info(rng, "CT")
    study_uid = synthetic_uid("mf", target_bytes, "study")
    sop_uid = synthetic_uid("mf", target_bytes, "sop", rows, cols)
    sop_class = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    ds = _base_dataset(
        modality="OT",
        sop_class=sop_class,
        patient=patient,
        study=study,
        study_uid=study_uid,
        series_uid=synthetic_uid("mf", target_bytes, "series"),
        sop_uid=sop_uid,
        series_number=1,
        series_description="Ảnh đa khung lớn (kiểm thử)",
        index=0,
    )
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ConversionType = "WSD"
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063  # FrameTime
    ds.FrameTime = 100.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    header = io.BytesIO()
    dcmwrite(header, ds, enforce_file_format=True)
    bases = _mr_bases(rows, cols)
    pool = _unsigned_noise(rows * cols)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fh.write(header.getvalue())
        # Explicit VR little endian: tag, "OW", 2 reserved bytes, 32-bit length.
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, total))
        for i in range(frames):
            off = rng.randrange(65536)
            frame = bases[i % len(bases)] + pool[off : off + rows * cols].reshape(rows, cols)
            fh.write(frame.tobytes())
    return path
