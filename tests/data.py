"""Small synthetic objects with chosen attributes, built on the project's own generator."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from pydicom import dcmwrite

from pacs.synthetic import PatientInfo, make_ct_slice, synthetic_uid


def patient(name: str = "Nguyễn^Văn An", patient_id: str = "BN0001", **kw: Any) -> PatientInfo:
    values = {"birth_date": "19800101", "sex": "M", "cccd": "001080012345", "bhyt": "DN4010123456789"}
    values.update(kw)
    return PatientInfo(name=name, patient_id=patient_id, **values)


def write_ct(
    directory: Path,
    *,
    who: PatientInfo | None = None,
    study: str = "s1",
    series: str = "se1",
    index: int = 1,
    size: int = 64,
    **attrs: Any,
) -> Path:
    """Write one small CT slice; `attrs` override any DICOM keyword (StudyDate, AccessionNumber, Modality...)."""
    rng = random.Random(index)
    study_uid = synthetic_uid("test-study", study)
    series_uid = synthetic_uid("test-series", study, series)
    sop_uid = synthetic_uid("test-sop", study, series, index)
    ds = make_ct_slice(
        patient=who or patient(),
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        index=index,
        rows=size,
        cols=size,
        rng=rng,
    )
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{study}-{series}-{index}.dcm"
    dcmwrite(path, ds, enforce_file_format=True)
    return path
