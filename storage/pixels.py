"""Where the pixel data sits in a stored Part 10 file, and single frames read from it without decoding the rest."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.uid import DeflatedExplicitVRLittleEndian

PIXEL_TAGS = ((0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009))
UNDEFINED = 0xFFFFFFFF


class PixelDataError(ValueError):
    """No usable pixel data (none, or a layout frames cannot be cut from)."""


def element_header(fp: BinaryIO, implicit: bool, little: bool) -> tuple[int, int] | None:
    """If fp sits on a Pixel Data element: (offset of its value, its length, 0xFFFFFFFF if encapsulated)."""
    start = fp.tell()
    head = fp.read(12)
    if len(head) < 8:
        return None
    endian = "<" if little else ">"
    if struct.unpack(endian + "HH", head[:4]) not in PIXEL_TAGS:
        return None
    # Like pydicom, look at the element itself: some writers encode this one element implicitly.
    if not implicit and head[4:6].isalpha() and head[4:6].isupper():
        return start + 12, struct.unpack(endian + "I", head[8:12])[0]
    return start + 8, struct.unpack(endian + "I", head[4:8])[0]


@dataclass(frozen=True)
class PixelLayout:
    transfer_syntax_uid: str
    offset: int  # first byte of the Pixel Data value
    length: int  # UNDEFINED when encapsulated
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    number_of_frames: int
    little_endian: bool

    @property
    def encapsulated(self) -> bool:
        return self.length == UNDEFINED

    @property
    def frame_bytes(self) -> int:
        return self.rows * self.columns * self.samples_per_pixel * self.bits_allocated // 8


def layout(path: Path) -> PixelLayout:
    """Where the pixel data of the file at `path` is; not for a deflated object (see `inflated_frames`)."""
    with open(path, "rb") as fp:
        ds = dcmread(fp, stop_before_pixels=True, defer_size="64 KB")
        ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
        if ts == DeflatedExplicitVRLittleEndian:
            raise PixelDataError("frames cannot be cut from a deflated file without inflating it")
        implicit, little = ds.original_encoding
        found = element_header(fp, bool(implicit), bool(little))
    if found is None:
        raise PixelDataError("the object has no pixel data")
    return _layout(ds, ts, found[0], found[1], bool(little))


def _layout(ds: Dataset, ts: str, offset: int, length: int, little: bool) -> PixelLayout:
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        info = PixelLayout(
            transfer_syntax_uid=ts,
            offset=offset,
            length=length,
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            samples_per_pixel=int(ds.get("SamplesPerPixel", 1) or 1),
            bits_allocated=int(ds.BitsAllocated),
            number_of_frames=max(frames, 1),
            little_endian=little,
        )
    except (AttributeError, ValueError, TypeError) as exc:
        raise PixelDataError(f"incomplete image attributes: {exc}") from exc
    if not info.encapsulated and info.bits_allocated % 8:
        raise PixelDataError("frames of 1-bit pixel data are not byte aligned")
    return info


def inflated_frames(path: Path, numbers: list[int] | None) -> list[bytes]:
    """Frames `numbers` (1-based; None: all) of a Deflated Explicit VR Little Endian object, as native bytes.

    That syntax deflates the whole data set, not the pixel data, which is native little endian inside: the data set
    is inflated (in memory, there is no seeking in a deflate stream) and the frames cut from its pixel data value.
    """
    ds = dcmread(path)
    keyword = next((k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
    if keyword is None:
        raise PixelDataError("the object has no pixel data")
    data = ds[keyword].value
    if not isinstance(data, bytes) or ds[keyword].is_undefined_length:
        raise PixelDataError("the deflated object's pixel data is not native")
    info = _layout(ds, str(ds.file_meta.TransferSyntaxUID), 0, len(data), True)
    fp = io.BytesIO(data)
    return [read_frame(fp, info, n) for n in numbers or range(1, info.number_of_frames + 1)]


def read_frame(fp: BinaryIO, info: PixelLayout, number: int) -> bytes:
    """Frame `number` (1-based) as stored: native bytes, or the compressed frame's fragments joined."""
    if not 1 <= number <= info.number_of_frames:
        raise IndexError(f"frame {number} out of 1..{info.number_of_frames}")
    if info.encapsulated:
        fp.seek(info.offset)
        return get_frame(fp, number - 1, number_of_frames=info.number_of_frames)  # type: ignore[arg-type]
    size = info.frame_bytes
    fp.seek(info.offset + (number - 1) * size)
    data = fp.read(size)
    if len(data) != size:
        raise PixelDataError("pixel data shorter than its frames")
    return data
