"""Where the pixel data sits in a stored Part 10 file, and single frames read from it without decoding the rest."""

from __future__ import annotations

import io
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag
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


# Inflated bytes kept behind the read position: pydicom steps back over an element header it peeked at, or to the
# start of an undefined-length value it tried to read as fragments, never far.
INFLATE_WINDOW = 1024 * 1024
_INFLATE_CHUNK = 256 * 1024  # deflated bytes read, and inflated bytes made, at a time


class InflatedStream:
    """The data set of a Deflated Explicit VR Little Endian file, inflated while it is read (raw deflate, PS3.5 A.5).

    File-like enough for pydicom's data set reader: read() and tell(), seek() forward (inflating and dropping what is
    passed over) and back into the last `window` bytes. There is no seeking in a deflate stream, so this is how a
    frame near the end of a large object is reached holding a few MB, not the whole data set.
    """

    def __init__(self, raw: BinaryIO, window: int = INFLATE_WINDOW) -> None:
        self.raw = raw
        self.window = window
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = bytearray()
        self._start = 0  # stream position of the buffer's first byte
        self._pos = 0
        self._ended = False

    def _more(self) -> bytes:
        """The next inflated bytes, at most _INFLATE_CHUNK of them; b"" at the end of the stream."""
        while not self._ended:
            if self._inflater.eof:  # bytes after the end of the deflate stream (padding) are not data
                break
            pending = self._inflater.unconsumed_tail
            if not pending:
                pending = self.raw.read(_INFLATE_CHUNK)
                if not pending:
                    break
            try:
                out = self._inflater.decompress(pending, _INFLATE_CHUNK)
            except zlib.error as exc:
                raise PixelDataError(f"the deflated data set is corrupt: {exc}") from exc
            if out:
                return out
        self._ended = True
        return b""

    def _fill(self, end: int, keep_from: int) -> None:
        """Inflate until the buffer reaches stream position `end` (or the stream ends), dropping on the way what
        lies more than a window before `keep_from`."""
        floor = keep_from - self.window
        while self._start + len(self._buffer) < end:
            chunk = self._more()
            if not chunk:
                break
            if self._start + len(self._buffer) + len(chunk) <= floor:  # passed over whole: never buffered
                self._start += len(self._buffer) + len(chunk)
                self._buffer.clear()
                continue
            self._buffer += chunk
            self._trim(floor)

    def _trim(self, floor: int) -> None:
        if floor - self._start > self.window:  # in large steps: each drop moves what stays
            drop = floor - self._start
            del self._buffer[:drop]
            self._start += drop

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:  # the rest: unbounded, as asked
            self._fill(sys.maxsize, self._pos)
            size = max(self._start + len(self._buffer) - self._pos, 0)
        self._fill(self._pos + size, self._pos)
        at = self._pos - self._start
        data = bytes(self._buffer[at : at + size])
        self._pos += len(data)
        self._trim(self._pos - self.window)
        return data

    def tell(self) -> int:
        return self._pos

    def drain(self) -> int:
        """Inflate the rest of the stream, keeping none of it; returns the data set's length. Raises PixelDataError
        when the deflate stream stops before its end (a truncated object)."""
        end = self._start + len(self._buffer)
        self._buffer.clear()
        while chunk := self._more():
            end += len(chunk)
        if not self._inflater.eof:
            raise PixelDataError("the deflated data set is truncated")
        self._start = self._pos = end
        return end

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("a deflate stream has no known end to seek from")
        if offset < self._start:
            raise io.UnsupportedOperation(f"cannot seek back to {offset}: the stream is only kept from {self._start}")
        self._fill(offset, offset)
        self._pos = offset
        return offset


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return (tag.group, tag.element) in PIXEL_TAGS


def _past_file_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group != 2


def transfer_syntax(fp: BinaryIO) -> str:
    """The transfer syntax in the File Meta Information of the Part 10 file `fp`, whose position is kept."""
    at = fp.tell()
    try:
        read_preamble(fp, force=True)
        meta = read_dataset(fp, False, True, stop_when=_past_file_meta)
    finally:
        fp.seek(at)
    return str(meta.get("TransferSyntaxUID", ""))


def inflated_header(path: Path, defer_size: str | None = None) -> tuple[Dataset, int | None]:
    """The header of a deflated object up to its pixel data, with `file_meta`, and the tag of its pixel data element
    (None: there is none); only the header is inflated."""
    with open(path, "rb") as raw:
        header, stream = _inflating(raw, defer_size)
        fp = cast(BinaryIO, stream)
        start = fp.tell()
        if element_header(fp, False, True) is None:
            return header, None
        fp.seek(start)
        group, element = struct.unpack("<HH", fp.read(4))
        return header, group << 16 | element


def checked_deflated_header(raw: BinaryIO, defer_size: str | None = None) -> Dataset:
    """The header of the deflated Part 10 file `raw` (at its start), after inflating the whole data set once,
    holding none of it, to check that it is complete: the deflate stream ends, the pixel data is all there."""
    header, stream = _inflating(raw, defer_size)
    fp = cast(BinaryIO, stream)
    found = element_header(fp, False, True)
    total = stream.drain()
    if found is not None and found[1] != UNDEFINED and found[0] + found[1] > total:
        raise PixelDataError(f"truncated Pixel Data: {total - found[0]} of {found[1]} bytes present")
    return header


def _inflating(raw: BinaryIO, defer_size: str | None) -> tuple[Dataset, InflatedStream]:
    """The header of the deflated Part 10 file `raw`, and its data set stream left on the element after it."""
    read_preamble(raw, force=True)
    meta = read_dataset(raw, False, True, stop_when=_past_file_meta)
    stream = InflatedStream(raw)
    header = read_dataset(cast(BinaryIO, stream), False, True, stop_when=_at_pixel_data, defer_size=defer_size)
    header.file_meta = FileMetaDataset(meta)
    header.set_original_encoding(False, True, header._character_set)
    return header, stream


def inflated_frames(path: Path, numbers: list[int] | None) -> list[bytes]:
    """Frames `numbers` (1-based; None: all) of a Deflated Explicit VR Little Endian object, as native bytes.

    That syntax deflates the whole data set, not the pixel data, which is native little endian inside. The data set
    is inflated as it is read, up to the pixel data and then over it to the frames asked for (in file order, each
    passed over once), so a frame is cut from an object of any size holding the frames and a few MB more.
    """
    with open(path, "rb") as raw:
        header, stream = _inflating(raw, "64 KB")
        found = element_header(cast(BinaryIO, stream), False, True)
        if found is None:
            raise PixelDataError("the object has no pixel data")
        info = _layout(header, DeflatedExplicitVRLittleEndian, found[0], found[1], True)
        if info.encapsulated:
            raise PixelDataError("the deflated object's pixel data is not native")
        wanted = list(numbers or range(1, info.number_of_frames + 1))
        for number in wanted:
            if not 1 <= number <= info.number_of_frames:
                raise IndexError(f"frame {number} out of 1..{info.number_of_frames}")
        size = info.frame_bytes
        frames: dict[int, bytes] = {}
        for number in sorted(set(wanted)):
            if number * size > info.length:
                raise PixelDataError("pixel data shorter than its frames")
            stream.seek(info.offset + (number - 1) * size)
            frames[number] = stream.read(size)
            if len(frames[number]) != size:
                raise PixelDataError("pixel data shorter than its frames")
    return [frames[n] for n in wanted]


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
