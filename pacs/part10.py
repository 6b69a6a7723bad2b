"""Give a bare dataset (no preamble, no File Meta) a Part 10 wrapper for import, keeping its bytes unchanged."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)


def _is_part10(path: Path) -> bool:
    with open(path, "rb") as fp:
        head = fp.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


@contextlib.contextmanager
def as_part10(path: Path, tmp_dir: Path) -> Iterator[Path]:
    """Yield `path` if it is Part 10, else a temporary Part 10 file holding its dataset bytes as they are.

    Anything that is not a dataset pydicom can read is yielded unchanged, so ingest rejects it with its reason.
    """
    if _is_part10(path):
        yield path
        return
    try:
        ds = dcmread(path, force=True, stop_before_pixels=True, defer_size="1 MB")
        sop_class = UID(str(ds.SOPClassUID))
        sop_instance = UID(str(ds.SOPInstanceUID))
        implicit, little = ds.original_encoding
    except Exception:
        yield path
        return
    if implicit:
        ts = ImplicitVRLittleEndian
    else:
        ts = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    header = BytesIO()
    header.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(header, meta)  # type: ignore[arg-type]
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=tmp_dir, suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
            out.write(header.getvalue())
            while chunk := src.read(1024 * 1024):
                out.write(chunk)
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
