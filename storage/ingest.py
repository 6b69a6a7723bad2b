"""The one ingest path: C-STORE, STOW-RS and `vnpacs import` all store objects through `Archive.ingest_file`.

Order of work for one object: parse the header only, validate, hash, write the blob durably, commit the index row,
then report success. A crash between the blob and the index leaves an orphan blob (found by `vnpacs verify`), never
an index row without its bytes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import hashlib
import io
import logging
import os
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, cast

from pydicom import dcmread
from pydicom.charset import convert_encodings, decode_bytes, default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_16, EXPLICIT_VR_LENGTH_32
from pydicom.values import TEXT_VR_DELIMS
from sqlalchemy import Connection, Engine, delete, exists, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from storage.blobstore import BlobStore, BlobStoreError, blob_key_for
from storage.db import DatabaseError
from storage.models import (
    BlobDeletion,
    Instance,
    InstanceConflict,
    Patient,
    PatientIdentifier,
    Series,
    Study,
    utcnow,
)
from storage.pixels import (
    PIXEL_TAGS,
    UNDEFINED,
    PixelDataError,
    checked_deflated_header,
    element_header,
    transfer_syntax,
)
from storage.query import StoredObject
from storage.text import nfc, search_key

log = logging.getLogger(__name__)

DuplicatePolicy = Literal["keep-first", "replace"]
Outcome = Literal["stored", "duplicate", "conflict"]


class IngestError(Exception):
    """An object was not stored; `kind` tells the protocol adapters which standard status to answer."""

    kind = "invalid"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidObject(IngestError):
    """Undecodable, truncated, or missing what every stored object needs (DIMSE 0xC000 range, HTTP 400)."""

    kind = "invalid"


class SOPClassMismatch(IngestError):
    """The dataset does not match the SOP Class / Instance it was sent as (DIMSE 0xA900, HTTP 409)."""

    kind = "mismatch"


class SOPInstanceMismatch(IngestError):
    """The dataset's SOP Instance UID is not the one it was sent as (DIMSE 0x0117 invalid SOP instance, HTTP 409)."""

    kind = "mismatch"


class StorageUnavailable(IngestError):
    """Database or blob store unreachable: a failure, never a false success (DIMSE 0xA700, HTTP 503)."""

    kind = "unavailable"


@dataclass(frozen=True)
class IngestResult:
    outcome: Outcome
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    sha256: str
    size: int
    message: str = ""
    accession_number: str = ""


@dataclass
class _Header:
    ds: Dataset
    transfer_syntax_uid: str
    sha256: str
    size: int


# One BaseTag object per tag number for the elements ingest reads: a dataset's dict then finds the key it is asked
# for by identity, where a lookup with an equal but distinct BaseTag calls BaseTag.__eq__, a Python method.
_TAGS: dict[int, BaseTag] = {}
_TAGS_MAX = 8192  # tags seen in received objects (private ones included) are kept up to this many


def _tag(tag: int) -> BaseTag:
    key = _TAGS.get(tag)
    if key is None:
        key = BaseTag(tag)
        if len(_TAGS) < _TAGS_MAX:
            _TAGS[tag] = key
    return key


@functools.cache
def _tag_vr(keyword: str) -> tuple[BaseTag | None, str]:
    """The tag and dictionary VR of `keyword` (a fixed set, from this module's code)."""
    tag = tag_for_keyword(keyword)
    return (_tag(tag), dictionary_VR(tag)) if tag is not None else (None, "")


def _encoding(ds: Dataset) -> list[str]:
    encoding: list[str] | None = ds.__dict__.get("_vn_encoding")
    if encoding is None:
        encoding = convert_encodings(ds.get("SpecificCharacterSet"))
        ds.__dict__["_vn_encoding"] = encoding
    return encoding


def _get(ds: Dataset, keyword: str) -> Any:
    """`ds.get(keyword)` for a plain (non-sequence) attribute, converted without caching it in the dataset.

    pydicom's own conversion looks the character set up again for every element it converts; ingest reads a few
    dozen attributes of every object, so the encoding is looked up once per dataset and passed in.
    """
    tag, vr = _tag_vr(keyword)
    if tag is None or vr == "SQ":
        return ds.get(keyword)
    raw = ds.get_item(tag)
    if raw is None:
        return None
    if not isinstance(raw, RawDataElement):
        return raw.value
    return convert_raw_data_element(raw, encoding=_encoding(ds), ds=ds).value


# String VRs whose index text comes straight from the element's bytes, decoded as pydicom decodes them: the default
# repertoire ones (pydicom: `convert_string`, `convert_UI`), and the ones in the Specific Character Set
# (`convert_text`, `convert_single_string`; multi-valued ones split after decoding, each value right-stripped).
# tests/test_ingest.py checks the result equals pydicom's conversion for every attribute of every corpus file.
_DEFAULT_REPERTOIRE_VRS = frozenset({"AS", "CS", "DA", "DT", "TM", "UI"})
_MULTI_TEXT_VRS = frozenset({"SH", "LO", "UC"})
_SINGLE_TEXT_VRS = frozenset({"ST", "LT", "UT"})


def _raw_text(ds: Dataset, keyword: str) -> str | None:
    """The text of a plain string attribute from its raw bytes, values joined by a backslash; None when the element
    is not a raw string element of its dictionary VR (pydicom's conversion then decides)."""
    tag, vr = _tag_vr(keyword)
    if tag is None:
        return None
    raw = ds.get_item(tag)
    if raw is None:
        return ""
    if not isinstance(raw, RawDataElement) or (raw.VR is not None and vr != raw.VR):
        return None
    value = raw.value
    if not isinstance(value, bytes):
        return None
    if vr in _DEFAULT_REPERTOIRE_VRS:
        return value.decode(default_encoding)
    if vr in _MULTI_TEXT_VRS:
        decoded = decode_bytes(value, _encoding(ds), TEXT_VR_DELIMS)
        return "\\".join(v.rstrip("\0 ") for v in decoded.split("\\"))
    if vr in _SINGLE_TEXT_VRS:
        return decode_bytes(value, _encoding(ds), TEXT_VR_DELIMS)
    return None


def _str_slow(ds: Dataset, keyword: str, limit: int = 64) -> str:
    """`_str` through pydicom's element conversion."""
    try:
        value = _get(ds, keyword)
    except Exception:  # a malformed value of an optional attribute must not refuse the object
        return ""
    if value is None or value == "":
        return ""
    if isinstance(value, list | tuple) or value.__class__.__name__ == "MultiValue":
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return nfc(text.replace("\x00", "").strip())[:limit]


def _str(ds: Dataset, keyword: str, limit: int = 64) -> str:
    """A text value as stored in the index: decoded, NFC, multi-values joined by a backslash, bounded."""
    try:
        text = _raw_text(ds, keyword)
    except Exception:  # undecodable bytes: pydicom's conversion decides (and replaces what it cannot decode)
        text = None
    if text is None:
        return _str_slow(ds, keyword, limit)
    return nfc(text.replace("\x00", "").strip())[:limit]


def _time(ds: Dataset, keyword: str) -> str:
    return _str(ds, keyword, 16).replace(":", "")


def _int_slow(ds: Dataset, keyword: str) -> int | None:
    """`_int` through pydicom's element conversion."""
    try:
        value = _get(ds, keyword)
        if value is None or value == "":
            return None
        if isinstance(value, list | tuple) or value.__class__.__name__ == "MultiValue":
            value = value[0]
        number = int(value)
    except Exception:
        return None
    return number if -(2**31) <= number < 2**31 else None


def _int(ds: Dataset, keyword: str) -> int | None:
    """The first value of an integer attribute (IS or US), None when absent, empty or not an integer."""
    tag, vr = _tag_vr(keyword)
    raw = ds.get_item(tag) if tag is not None else None
    if raw is None:
        return None  # absent (or no such keyword): what pydicom's conversion would answer, without a second lookup
    if isinstance(raw, RawDataElement) and isinstance(raw.value, bytes) and (raw.VR is None or vr == raw.VR):
        value = raw.value
        if not value:
            return None
        if vr == "US" and len(value) == 2:
            return int.from_bytes(value, "little" if raw.is_little_endian else "big")
        if vr == "IS":
            text = value.split(b"\\", 1)[0].strip(b" \x00")
            digits = text[1:] if text[:1] in (b"+", b"-") else text
            if digits.isdigit():  # ASCII digits only (bytes); anything else goes to pydicom
                number = int(text)
                return number if -(2**31) <= number < 2**31 else None
    return _int_slow(ds, keyword)


_UID_CHARS = "0123456789."


def _check_uid(ds: Dataset, keyword: str) -> str:
    value = _str(ds, keyword, 128)
    if not value:
        raise InvalidObject(f"missing {keyword}")
    if len(value) > 64 or value.strip(_UID_CHARS):  # anything but ASCII digits and dots left
        raise InvalidObject(f"invalid {keyword} {value!r}")
    return value


# --------------------------------------------------------------------------------------------------------------
# Header parsing and integrity
# --------------------------------------------------------------------------------------------------------------


def _hash_file(fp: BinaryIO) -> tuple[str, int]:
    fp.seek(0)
    digest = hashlib.file_digest(fp, "sha256")  # type: ignore[arg-type]
    return digest.hexdigest(), fp.tell()


def _check_pixel_data_extent(fp: BinaryIO, size: int, little: bool, element: tuple[int, int]) -> None:
    """Check that the bytes of the Pixel Data element, whose (value offset, length) a header-only read found, are all
    there. Header-only parsing never touches pixel data, so this is what catches a truncated image without loading
    it. Encapsulated pixel data (undefined length) is walked in `fp`, item by item, without reading the items."""
    value_start, length = element
    endian = "<" if little else ">"
    if length != UNDEFINED:
        if value_start + length > size:
            raise InvalidObject(f"truncated Pixel Data: {size - value_start} of {length} bytes present")
        return
    # Encapsulated: walk the items to the sequence delimiter without reading them.
    pos = value_start
    while True:
        fp.seek(pos)
        item = fp.read(8)
        if len(item) < 8:
            raise InvalidObject("truncated encapsulated Pixel Data (no sequence delimiter)")
        g, e, item_len = struct.unpack(endian + "HHI", item)
        if (g, e) == (0xFFFE, 0xE0DD):
            return
        if (g, e) != (0xFFFE, 0xE000) or item_len == UNDEFINED:
            raise InvalidObject("malformed encapsulated Pixel Data item")
        pos += 8 + item_len
        if pos > size:
            raise InvalidObject("truncated encapsulated Pixel Data fragment")


# Bytes read at once for the header parse: enough for the header of nearly every image, which pydicom then parses
# from memory instead of issuing a system call for each of its many small reads, seeks and tells.
HEAD_BYTES = 64 * 1024


# Explicit VRs with a 4-byte length and with a 2-byte one (PS3.5 7.1.2), as pydicom's reader tells them apart.
_LONG_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)
_SHORT_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_16)
_ENCODINGS: dict[str, tuple[bool, bool]] = {ImplicitVRLittleEndian: (True, True), ExplicitVRBigEndian: (False, False)}


def _file_meta(head: bytes) -> tuple[FileMetaDataset, int] | None:
    """The File Meta Information of a Part 10 object that has its preamble and prefix, parsed from `head` as pydicom
    parses it (the elements kept raw), and the offset of the data set; None for anything pydicom reads specially
    (no preamble, an implicit VR or truncated group, a Command Set after it)."""
    end = len(head)
    if end < 144 or head[128:132] != b"DICM":
        return None
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    pos = 132
    while pos + 8 <= end:
        group, elem = struct.unpack_from("<HH", head, pos)
        if group != 2:
            break
        vr = head[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > end:
                return None
            (length,) = struct.unpack_from("<I", head, pos + 8)
            start = pos + 12
        elif vr in _SHORT_VRS:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            start = pos + 8
        else:
            return None
        if length == UNDEFINED or start + length > end:
            return None
        tag = _tag(0x00020000 | elem)
        elements[tag] = RawDataElement(tag, vr.decode(), length, head[start : start + length], start, False, True)
        pos = start + length
    if not elements or pos + 8 > end or struct.unpack_from("<H", head, pos)[0] == 0x0000:
        return None
    return FileMetaDataset(elements), pos


_PIXEL_DATA_TAGS = frozenset(group << 16 | elem for group, elem in PIXEL_TAGS)


def _at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    """Where dcmread(stop_before_pixels=True) stops."""
    return tag in _PIXEL_DATA_TAGS


_EXPLICIT_LE_HEADER = struct.Struct("<HH2sH").unpack_from
_IMPLICIT_LE_HEADER = struct.Struct("<HHL").unpack_from
_LE_LENGTH = struct.Struct("<L").unpack_from
_VR_NAMES = {vr: vr.decode() for vr in _LONG_VRS | _SHORT_VRS}
_LONG_VR_NAMES = frozenset(vr.decode() for vr in _LONG_VRS)


def _raw_elements_le(head: bytes, pos: int, implicit: bool) -> tuple[dict[BaseTag, RawDataElement], int] | None:
    """The data set's elements in `head` from `pos` up to its Pixel Data (or the end), little endian, as
    pydicom's `read_dataset(stop_when=_at_pixels)` reads them into raw elements, and where it stopped; None for
    anything it reads otherwise (an undefined length, an unknown VR, a VR encoding other than the transfer
    syntax's, an element cut short), which is then left to pydicom. One loop over the bytes in memory instead of
    pydicom's general reader: half the time of the header parse. tests/test_ingest.py checks the result equals
    dcmread's for every corpus file."""
    end = len(head)
    if pos + 6 <= end:
        # pydicom's check of the first element: valid VR letters mean explicit VR, whatever the transfer syntax says.
        looks_explicit = 0x40 < head[pos + 4] < 0x5B and 0x40 < head[pos + 5] < 0x5B
        if looks_explicit == implicit:
            return None
    elements: dict[BaseTag, RawDataElement] = {}
    names, long_vrs, pixels, tags = _VR_NAMES, _LONG_VR_NAMES, _PIXEL_DATA_TAGS, _TAGS
    vr: str | None = None
    while pos < end:
        if pos + 8 > end:
            return None
        if implicit:
            group, elem, length = _IMPLICIT_LE_HEADER(head, pos)
            at = pos + 8
        else:
            group, elem, raw_vr, length = _EXPLICIT_LE_HEADER(head, pos)
            vr = names.get(raw_vr)
            if vr is None:
                return None
            at = pos + 8
            if vr in long_vrs:
                if pos + 12 > end:
                    return None
                (length,) = _LE_LENGTH(head, pos + 8)
                at = pos + 12
        tag = group << 16 | elem
        if tag in pixels:
            break
        if tag == 0xFFFEE00D or length == UNDEFINED or at + length > end:
            return None
        key = tags.get(tag)
        if key is None:
            key = _tag(tag)
        value = head[at : at + length] if length else cast(bytes | None, empty_value_for_VR(vr, raw=True))
        elements[key] = RawDataElement(key, vr, length, value, at, implicit, True)
        pos = at + length
    return elements, pos


def _parse_head_fast(head: bytes) -> tuple[Dataset, io.BytesIO] | None:
    """`dcmread(stop_before_pixels=True)` of `head`, for the common case, without pydicom's conversion of every File
    Meta element and its FileDataset; the data set itself is read by pydicom's `read_dataset` as dcmread reads it.
    tests/test_ingest.py checks the result equals dcmread's for every corpus file."""
    meta = _file_meta(head)
    if meta is None:
        return None
    file_meta, pos = meta
    ts_element = file_meta.get_item(0x00020010)
    if ts_element is None or not isinstance(ts_element.value, bytes):
        return None
    transfer_syntax = ts_element.value.decode("ascii", "replace").rstrip("\0 ")
    if transfer_syntax == DeflatedExplicitVRLittleEndian or transfer_syntax in PrivateTransferSyntaxes:
        return None
    implicit, little = _ENCODINGS.get(transfer_syntax, (False, True))
    mem = io.BytesIO(head)
    raw = _raw_elements_le(head, pos, implicit) if little else None
    if raw is not None:
        elements, stop = raw
        mem.seek(stop)
        ds = Dataset(elements)  # type: ignore[arg-type]  # raw elements, as read_dataset builds it
    else:
        mem.seek(pos)
        ds = read_dataset(mem, implicit, little, stop_when=_at_pixels, defer_size="1 MB")
    ds.file_meta = file_meta
    ds.set_original_encoding(implicit, little, ds._character_set)  # as dcmread: the transfer syntax's, not the guess
    return ds, mem


def _parse_head(head: bytes, size: int) -> tuple[Dataset, io.BytesIO] | None:
    """The header parsed from the object's first bytes, if they hold all of it: the whole object, or a prefix in
    which parsing stopped on the Pixel Data element's header. None means: parse the file itself."""
    try:
        parsed = _parse_head_fast(head)
        if parsed is None:
            mem = io.BytesIO(head)
            parsed = dcmread(mem, stop_before_pixels=True, defer_size="1 MB"), mem
        ds, mem = parsed
    except Exception:  # a header longer than the prefix, or a broken object: the file parse decides which
        return None
    if len(head) < size:
        pos = mem.tell()
        implicit, little = ds.original_encoding
        if pos + 12 > len(head) or little is None:
            return None
        if struct.unpack("<HH" if little else ">HH", head[pos : pos + 4]) not in PIXEL_TAGS:
            return None
    return ds, mem


def _deflated(fp: BinaryIO) -> bool:
    """Whether the Part 10 file `fp` says Deflated Explicit VR Little Endian (False if it cannot be told)."""
    try:
        return transfer_syntax(fp) == DeflatedExplicitVRLittleEndian
    except Exception:  # not a Part 10 file: the parse that follows says why
        return False
    finally:
        fp.seek(0)


def read_header(path: Path, known_digest: tuple[str, int] | None = None, known_head: bytes | None = None) -> _Header:
    """Parse a Part 10 file up to its pixel data, check it is complete, and hash it (unless hashed on arrival).

    `known_head` is the object's first bytes as received (`HEAD_BYTES` of them, or all of a smaller object), with
    `known_digest`: a header that ends in them is parsed and checked without opening the file, unless its pixel data
    is encapsulated (the fragments are walked in the file)."""
    if known_digest is not None and known_head is not None and len(known_head) == min(known_digest[1], HEAD_BYTES):
        parsed = _parse_head(known_head, known_digest[1])
        if parsed is not None:
            ds, mem = parsed
            element = _pixel_element(ds, mem)
            if element is None or element[1] != UNDEFINED:  # encapsulated: its fragments are walked in the file
                return _checked_header(ds, mem, *known_digest, element)
    try:
        with open(path, "rb") as fp:
            if known_digest is not None and known_digest[1] == os.fstat(fp.fileno()).st_size:
                sha256, size = known_digest
            else:
                sha256, size = _hash_file(fp)
            parsed = _parse_head(os.pread(fp.fileno(), HEAD_BYTES, 0), size)
            if parsed is not None:
                ds, mem = parsed
                fp.seek(mem.tell())  # on the Pixel Data element, if any, for the extent check below
            else:
                fp.seek(0)
                try:
                    if _deflated(fp):  # inflated as it is read, never whole in memory
                        ds = checked_deflated_header(fp, defer_size="1 MB")
                    else:
                        ds = dcmread(fp, stop_before_pixels=True, defer_size="1 MB")
                except PixelDataError as exc:
                    raise InvalidObject(str(exc)) from exc
                except (InvalidDicomError, EOFError, ValueError, KeyError, struct.error, OSError) as exc:
                    raise InvalidObject(f"not a decodable DICOM Part 10 object: {exc}") from exc
                except Exception as exc:  # pydicom raises a variety of errors on corrupt input
                    raise InvalidObject(f"not a decodable DICOM object: {exc.__class__.__name__}: {exc}") from exc
            return _checked_header(ds, fp, sha256, size, _pixel_element(ds, fp))
    except OSError as exc:
        raise InvalidObject(f"cannot read object: {exc}") from exc


def _pixel_element(ds: Dataset, fp: BinaryIO) -> tuple[int, int] | None:
    """The Pixel Data element `fp` sits on after a header-only parse of `ds`, as (value offset, length; UNDEFINED
    when encapsulated), read in the encoding pydicom found (which a broken file's meta may misstate). None when
    there is none, and when its bytes cannot be told: an encoding pydicom could not determine, or a deflated object,
    whose bytes in `fp` are compressed (the inflating parse read them all)."""
    implicit, little = ds.original_encoding
    file_meta = getattr(ds, "file_meta", None)
    deflated = file_meta is not None and file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    if implicit is None or little is None or deflated:
        return None
    return element_header(fp, implicit, little)


def _checked_header(ds: Dataset, fp: BinaryIO, sha256: str, size: int, element: tuple[int, int] | None) -> _Header:
    """The parsed header, once its transfer syntax is known and its Pixel Data `element` (see `_pixel_element`; read
    from `fp`) is all there."""
    file_meta = getattr(ds, "file_meta", None)
    ts_value = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not ts_value:
        raise InvalidObject("no Transfer Syntax UID in the File Meta Information")
    if element is not None:
        _check_pixel_data_extent(fp, size, bool(ds.original_encoding[1]), element)
    return _Header(ds=ds, transfer_syntax_uid=str(UID(str(ts_value))), sha256=sha256, size=size)


# --------------------------------------------------------------------------------------------------------------
# The archive: ingest and lookups shared by every protocol
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Caches:
    """UID → primary key, filled only after a commit so a rolled-back row is never cached."""

    patients: dict[tuple[str, str], int] = field(default_factory=dict)
    studies: dict[str, int] = field(default_factory=dict)
    series: dict[str, int] = field(default_factory=dict)

    def clear(self) -> None:
        self.patients.clear()
        self.studies.clear()
        self.series.clear()


class Journal:
    """In-flight blob writes of one process, so a restart can remove blobs whose index row never committed.

    A line is appended (unbuffered, no fsync: it only has to survive a killed process) before each blob write and
    after its commit. Each process holds an exclusive lock on its own journal file; `Archive.recover` reads the
    journals whose owners are gone and deletes the blobs that were started, never finished, and that no index row
    references. Nothing acknowledged is touched, and `vnpacs verify` finds no orphan after a crash.
    """

    ROTATE_BYTES = 8 * 1024 * 1024

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._inflight: dict[str, int] = {}
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._fd)
            raise RuntimeError(f"journal {path} is in use by another vnpacs process") from exc
        self._size = os.fstat(self._fd).st_size

    @staticmethod
    def pending_in(path: Path) -> set[str]:
        started: dict[str, int] = {}
        try:
            text = path.read_text("ascii", "replace")
        except FileNotFoundError:
            return set()
        for line in text.splitlines():
            op, _, key = line.partition(" ")
            if op == "+":
                started[key] = started.get(key, 0) + 1
            elif op == "-" and key in started:
                started[key] -= 1
                if started[key] <= 0:
                    del started[key]
        return set(started)

    def journals(self) -> tuple[list[Path], list[Path]]:
        """(journals whose process is gone, ours included; journals of live processes) in this folder."""
        dead, live = [self.path], []
        for other in sorted(self.path.parent.glob("*.log")):
            if other == self.path:
                continue
            fd = os.open(other, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live.append(other)
                continue
            finally:
                os.close(fd)
            dead.append(other)
        return dead, live

    def _write(self, line: str) -> None:
        data = line.encode("ascii")
        os.write(self._fd, data)
        self._size += len(data)

    def begin(self, key: str) -> None:
        with self._lock:
            self._inflight[key] = self._inflight.get(key, 0) + 1
            self._write(f"+ {key}\n")

    def end(self, key: str) -> None:
        with self._lock:
            count = self._inflight.get(key, 0) - 1
            if count <= 0:
                self._inflight.pop(key, None)
            else:
                self._inflight[key] = count
            self._write(f"- {key}\n")
            if self._size > self.ROTATE_BYTES:
                os.ftruncate(self._fd, 0)
                self._size = 0
                for key_, n in self._inflight.items():
                    for _ in range(n):
                        self._write(f"+ {key_}\n")

    def reset(self) -> None:
        with self._lock:
            self._inflight.clear()
            os.ftruncate(self._fd, 0)
            self._size = 0

    def close(self, *, remove: bool = False) -> None:
        with self._lock:
            if remove and not self._inflight:
                self.path.unlink(missing_ok=True)
            os.close(self._fd)


@dataclass
class _IndexJob:
    ds: Dataset
    row: dict[str, Any]
    study_uid: str
    series_uid: str
    bytes_at: Path  # the object's bytes, readable until the commit: its blob can be written again if deleted
    replace: bool = False
    outcome: Outcome | None = None
    error: BaseException | None = None


class _GroupCommitter:
    """Group commit: objects arriving together on concurrent associations share one transaction and one flush.

    The first waiting thread becomes the leader and indexes everything queued so far; the others wait for it and
    then read their own outcome. A lone association sees a batch of one, as before.
    """

    def __init__(self, run_batch: Callable[[list[_IndexJob]], None]) -> None:
        self._run_batch = run_batch
        self._cond = threading.Condition()
        self._queue: list[_IndexJob] = []
        self._busy = False

    def submit(self, job: _IndexJob) -> Outcome:
        batch: list[_IndexJob] | None = None
        with self._cond:
            self._queue.append(job)
            while job.outcome is None and job.error is None:
                if not self._busy:
                    self._busy = True
                    batch, self._queue = self._queue, []
                    break
                self._cond.wait()
        if batch is not None:
            try:
                self._run_batch(batch)
            except BaseException as exc:  # a bug must not leave waiters hanging
                for other in batch:
                    if other.outcome is None and other.error is None:
                        other.error = exc
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        if job.error is not None:
            raise job.error
        assert job.outcome is not None
        return job.outcome


_CONFLICT_FIELDS = (
    "sop_instance_uid",
    "sop_class_uid",
    "transfer_syntax_uid",
    "blob_key",
    "size",
    "sha256",
    "received_at",
    "calling_ae",
    "source",
)


# SQL text, its positional parameters' names, and the bind conversion of `received_at`.
_DriverInsert = tuple[str, tuple[str, ...], Callable[[Any], Any] | None]


def _sqlite_deleted_keys(keys: list[str]) -> str:
    """SQLite: the blob keys among `keys` (bound as parameters) that a deleter has noted in blob_deletion."""
    return f"SELECT blob_key FROM blob_deletion WHERE blob_key IN ({','.join('?' * len(keys))})"


class _TakeGeneralPath(Exception):
    """`Archive._index_cached` found a case it leaves to `_index_many` (and rolled back)."""


class _SQLiteWriteLock:
    """One SQLite writer at a time: a thread lock within the process, an flock on a file beside the database across
    processes (both wake the next writer at once, unlike SQLite's sleeping busy handler)."""

    def __init__(self, database: str | None) -> None:
        self._thread_lock = threading.Lock()
        self._path = f"{database}.writelock" if database and database != ":memory:" else None
        self._fd: int | None = None

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        if self._path is None:
            return
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError:
            # Without the file lock SQLite's own locking still keeps writes correct, only slower to hand over.
            log.warning("cannot lock %s; SQLite's busy handler serialises writers instead", self._path)

    def __exit__(self, *exc: object) -> None:
        try:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


class Archive:
    """The archive core: one blob store, one index, one ingest path."""

    def __init__(
        self,
        engine: Engine,
        blobs: BlobStore,
        *,
        duplicate_policy: DuplicatePolicy = "keep-first",
        journal: Journal | None = None,
    ):
        self.engine = engine
        self.blobs = blobs
        self.journal = journal
        self.duplicate_policy = duplicate_policy
        self._caches = _Caches()
        self._cache_lock = threading.Lock()
        # SQLite has one writer at a time and its busy handler waits by sleeping (1, 2, 5, 10 ms...): queue writers
        # on a lock instead, so the next one starts the moment the previous commit ends; across processes sharing
        # the database file (DIMSE worker processes, `vnpacs import`) too.
        self._write_lock: contextlib.AbstractContextManager[Any] = (
            _SQLiteWriteLock(engine.url.database) if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        )
        dialect = engine.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert  # type: ignore[assignment]
        self._insert = dialect_insert
        # Built once: the per-instance statement is then only bound and executed (SQLAlchemy caches its SQL).
        self._insert_instance = dialect_insert(Instance).on_conflict_do_nothing(index_elements=["sop_instance_uid"])
        self._committer = _GroupCommitter(self._index_batch)
        # The group-commit leader's own connection, kept between batches: checking one out of the pool, resetting
        # it on return and SQLAlchemy's per-connection setup cost more than the INSERT itself. Only the leader
        # uses it (one batch at a time); it is dropped on any database error and opened again for the next batch.
        self._leader_conn: Connection | None = None
        self._postgres = dialect == "postgresql"
        # The instance INSERT as SQLite's driver takes it, for `_index_cached`; None: that path is not taken.
        self._driver_insert = self._compile_driver_insert() if dialect == "sqlite" else None
        # Called after each durable store (outside the index transaction); they must return quickly.
        self.listeners: list[Callable[[IngestResult], None]] = []

    def invalidate(self) -> None:
        """Forget cached keys, e.g. after a deletion or a correction changed the index."""
        with self._cache_lock:
            self._caches.clear()

    # ---- ingest ---------------------------------------------------------------------------------------------

    def ingest_file(
        self,
        path: Path,
        *,
        calling_ae: str = "",
        source: str = "import",
        adopt: bool = False,
        expected_sop_class_uid: str | None = None,
        expected_sop_instance_uid: str | None = None,
        known_digest: tuple[str, int] | None = None,
        known_head: bytes | None = None,
        replace_existing: bool = False,
    ) -> IngestResult:
        """Store one Part 10 file. Returns only once bytes and index row are durable; raises IngestError.

        `known_digest` is the (SHA-256, size) computed while the object was received, if it was; `known_head` its
        first bytes as received (see `read_header`).
        `replace_existing` serves this object instead of a different one stored under its SOP Instance UID, whatever
        the duplicate policy (attribute corrections); the earlier copy is kept aside, as always.
        """
        header = read_header(path, known_digest, known_head)
        ds = header.ds
        sop_class = _check_uid(ds, "SOPClassUID")
        sop_instance = _check_uid(ds, "SOPInstanceUID")
        study_uid = _check_uid(ds, "StudyInstanceUID")
        series_uid = _check_uid(ds, "SeriesInstanceUID")
        if expected_sop_class_uid is not None and expected_sop_class_uid != sop_class:
            raise SOPClassMismatch(
                f"dataset SOP Class UID {sop_class} does not match the request's {expected_sop_class_uid}"
            )
        if expected_sop_instance_uid is not None and expected_sop_instance_uid != sop_instance:
            raise SOPInstanceMismatch(
                f"dataset SOP Instance UID {sop_instance} does not match the request's {expected_sop_instance_uid}"
            )
        meta_sop = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "")
        if meta_sop and meta_sop != sop_instance:
            # The dataset is authoritative; the bytes are kept as received, so only note the inconsistency.
            log.warning("File Meta SOP Instance UID %s differs from the dataset's %s", meta_sop, sop_instance)

        key = blob_key_for(header.sha256)
        if self.journal is not None:
            self.journal.begin(key)
        # On failure the journal entry stays open: the blob may be an orphan, which the next start removes unless
        # a later, successful store of the same object references it.
        outcome = self._store(
            ds,
            header,
            path,
            key,
            adopt,
            calling_ae,
            source,
            sop_class,
            sop_instance,
            study_uid,
            series_uid,
            replace_existing,
        )
        if self.journal is not None:
            self.journal.end(key)
        message = {
            "stored": "",
            "duplicate": "identical object already stored",
            "conflict": "earlier object under this SOP Instance UID kept aside (replaced)"
            if replace_existing
            else f"different object under this SOP Instance UID kept (policy {self.duplicate_policy})",
        }[outcome]
        if outcome == "conflict":
            log.warning("SOP Instance %s received again with different bytes: %s", sop_instance, message)
        result = IngestResult(
            outcome=outcome,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            transfer_syntax_uid=header.transfer_syntax_uid,
            sha256=header.sha256,
            size=header.size,
            message=message,
            accession_number=_str(ds, "AccessionNumber", 16),
        )
        self.notify(result)
        return result

    def notify(self, result: IngestResult) -> None:
        """Tell the listeners of a durable store (also for stores made by this server's DIMSE worker processes)."""
        for listener in self.listeners:
            try:
                listener(result)
            except Exception:  # a listener's failure must not turn a durable store into an error
                log.exception("ingest listener %r failed", listener)

    def _store(
        self,
        ds: Dataset,
        header: _Header,
        path: Path,
        key: str,
        adopt: bool,
        calling_ae: str,
        source: str,
        sop_class: str,
        sop_instance: str,
        study_uid: str,
        series_uid: str,
        replace: bool = False,
    ) -> Outcome:
        # An adopted file may be moved into the store, where a deleter could remove it before the commit: the
        # descriptor keeps its bytes readable (through /proc) for `_guard_blobs` until then.
        kept = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if adopt else None
        try:
            try:
                self.blobs.put_file(key, path, header.size, adopt=adopt)
            except BlobStoreError as exc:
                raise StorageUnavailable(f"blob store: {exc}") from exc
            row = self._instance_row(ds, header, key, calling_ae, source, sop_class, sop_instance)
            bytes_at = Path(f"/proc/self/fd/{kept}") if kept is not None else path
            return self._committer.submit(_IndexJob(ds, row, study_uid, series_uid, bytes_at, replace))
        finally:
            if kept is not None:
                os.close(kept)

    def _leader_connection(self) -> Connection:
        conn = self._leader_conn
        if conn is None or conn.closed or conn.invalidated:
            conn = self._leader_conn = self.engine.connect()
        return conn

    def _drop_leader_connection(self) -> None:
        conn, self._leader_conn = self._leader_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _index_batch(self, jobs: list[_IndexJob]) -> None:
        """Index a batch of objects in one transaction; on an integrity error, one by one after a cache reset."""
        outcomes = self._index_cached(jobs)
        if outcomes is not None:
            for job, outcome in zip(jobs, outcomes, strict=True):
                job.outcome = outcome
            return
        try:
            try:
                outcomes = self._index_many(jobs)
            except SQLAlchemyError as exc:
                if getattr(exc, "connection_invalidated", False):
                    # The kept connection died while idle (a database restart): once more on a fresh one.
                    self._drop_leader_connection()
                elif _sqlstate(exc) not in _RETRYABLE:
                    raise  # an integrity error leaves the connection usable; any other drops it below
                # A deadlock or serialisation failure with another node's transaction: rolled back, so once more.
                outcomes = self._index_many(jobs)
        except IntegrityError:
            # A cached parent row was deleted by another node: forget the caches and index each object alone.
            self.invalidate()
            for job in jobs:
                try:
                    job.outcome = self._index_many([job])[0]
                except SQLAlchemyError as exc:
                    self.invalidate()
                    job.error = StorageUnavailable(f"index refused the object: {_short(exc)}")
            return
        except SQLAlchemyError as exc:
            self._drop_leader_connection()
            self.invalidate()
            for job in jobs:
                job.error = StorageUnavailable(f"database: {exc.__class__.__name__}: {_short(exc)}")
            return
        for job, outcome in zip(jobs, outcomes, strict=True):
            job.outcome = outcome

    def _index_cached(self, jobs: list[_IndexJob]) -> list[Outcome] | None:
        """SQLite, the common case: every object new, in a series whose rows are known. The transaction of
        `_index_many` for that case, at the driver level: BEGIN IMMEDIATE, the deleted-blob check, one INSERT each,
        COMMIT, in about a quarter of the time SQLAlchemy's statement machinery takes around the same statements.

        None, having changed nothing, whenever anything else may be needed: a patient, study or series not cached
        yet, an object indexed already (a duplicate or a conflict), a blob a deleter removed, any database error.
        `_index_many` then runs the batch as before and reports what went wrong. A COMMIT that failed after it
        reached the disk is harmless there too: the rows are found again as identical duplicates."""
        if self._driver_insert is None:
            return None
        caches = self._caches
        series_pks = []
        for job in jobs:
            series_pk = caches.series.get(job.series_uid)
            patient_key = (_str(job.ds, "PatientID"), _str(job.ds, "IssuerOfPatientID"))
            if series_pk is None or job.study_uid not in caches.studies or patient_key not in caches.patients:
                return None
            series_pks.append(series_pk)
        try:
            driver = self._leader_connection().connection.driver_connection
        except SQLAlchemyError:
            return None
        if driver is None:
            return None
        sql, columns, received_at = self._driver_insert
        keys = sorted({job.row["blob_key"] for job in jobs})
        guard = _sqlite_deleted_keys(keys) + " LIMIT 1"
        with self._write_lock:
            cursor = driver.cursor()
            try:
                cursor.execute("BEGIN IMMEDIATE")
                try:
                    if cursor.execute(guard, keys).fetchone() is not None:
                        raise _TakeGeneralPath
                    for job, series_pk in zip(jobs, series_pks, strict=True):
                        row = {**job.row, "series_pk": series_pk}
                        if received_at is not None:
                            row["received_at"] = received_at(row["received_at"])
                        cursor.execute(sql, tuple(row[column] for column in columns))
                        if cursor.rowcount != 1:
                            raise _TakeGeneralPath
                    cursor.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(Exception):
                        cursor.execute("ROLLBACK")
                    raise
            except _TakeGeneralPath:
                return None
            except Exception as exc:  # the driver's own errors: `_index_many` meets them again and reports them
                log.debug("driver-level index commit fell back to SQLAlchemy: %s", exc)
                return None
            finally:
                cursor.close()
        return ["stored"] * len(jobs)

    def _compile_driver_insert(self) -> _DriverInsert | None:
        """The instance INSERT of `_index_many` (every column but the key: what `_instance_row` and the series key
        fill), compiled by SQLAlchemy for the engine's driver, with its positional parameter order and the DateTime
        conversion SQLAlchemy applies to `received_at`; None if it does not compile to one positional parameter per
        column (then `_index_many` does all the indexing)."""
        dialect = self.engine.dialect
        wanted = [column.key for column in Instance.__table__.c if column.key != "pk"]
        compiled = self._insert_instance.compile(dialect=dialect, column_keys=wanted)
        columns = tuple(compiled.positiontup or ())
        if not compiled.positional or set(columns) != set(wanted):
            return None
        column_type = Instance.__table__.c.received_at.type
        received_at = column_type.dialect_impl(dialect).bind_processor(dialect)
        return str(compiled), columns, received_at

    def _instance_row(
        self,
        ds: Dataset,
        header: _Header,
        key: str,
        calling_ae: str,
        source: str,
        sop_class: str,
        sop_instance: str,
    ) -> dict[str, Any]:
        return {
            "sop_instance_uid": sop_instance,
            "sop_class_uid": sop_class,
            "instance_number": _int(ds, "InstanceNumber"),
            "content_date": _str(ds, "ContentDate", 8),
            "content_time": _time(ds, "ContentTime"),
            "rows": _int(ds, "Rows"),
            "columns": _int(ds, "Columns"),
            "number_of_frames": _int(ds, "NumberOfFrames"),
            "bits_allocated": _int(ds, "BitsAllocated"),
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "specific_character_set": _str(ds, "SpecificCharacterSet", 128),
            "blob_key": key,
            "size": header.size,
            "sha256": header.sha256,
            "received_at": utcnow(),
            "calling_ae": calling_ae[:16],
            "source": source[:16],
        }

    def _index_many(self, jobs: list[_IndexJob]) -> list[Outcome]:
        caches = self._caches
        patients: dict[tuple[str, str], int] = {}
        studies: dict[str, int] = {}
        series: dict[str, int] = {}
        outcomes: list[Outcome | None] = [None] * len(jobs)
        conn = self._leader_connection()
        # Rows are locked in one order (patient, study, series) by every writer on every node, so two batches
        # filling the same series in different orders cannot deadlock on the series rows the count triggers update.
        keyed = sorted(
            (((_str(job.ds, "PatientID"), _str(job.ds, "IssuerOfPatientID")), job.study_uid, job.series_uid), n)
            for n, job in enumerate(jobs)
        )
        with self._write_lock, conn.begin():
            self._guard_blobs(conn, jobs)
            for (patient_key, _, _), n in keyed:
                job = jobs[n]
                ds = job.ds
                patient_pk = caches.patients.get(patient_key) or patients.get(patient_key)
                if patient_pk is None:
                    patient_pk = patients[patient_key] = self._upsert_patient(conn, ds, patient_key)
                study_pk = caches.studies.get(job.study_uid) or studies.get(job.study_uid)
                if study_pk is None:
                    study_pk = studies[job.study_uid] = self._upsert(
                        conn, Study, "study_instance_uid", job.study_uid, _study_values(ds, patient_pk)
                    )
                series_pk = caches.series.get(job.series_uid) or series.get(job.series_uid)
                if series_pk is None:
                    series_pk = series[job.series_uid] = self._upsert(
                        conn, Series, "series_instance_uid", job.series_uid, _series_values(ds, study_pk)
                    )
                row = {**job.row, "series_pk": series_pk}
                inserted = conn.execute(self._insert_instance, row).rowcount
                outcomes[n] = "stored" if inserted else self._duplicate(conn, row, job.replace)
        # Only now, after the commit: a rolled-back row must never be cached.
        with self._cache_lock:
            if max(len(caches.patients), len(caches.studies), len(caches.series)) > 200_000:
                caches.clear()
            caches.patients.update(patients)
            caches.studies.update(studies)
            caches.series.update(series)
        assert all(outcome is not None for outcome in outcomes)  # every job was indexed, in its own slot
        return cast(list[Outcome], outcomes)

    # ---- blobs deleted while the same bytes are being stored ------------------------------------------------

    def _lock_keys(self, conn: Connection, keys: list[str], *, shared: bool) -> None:
        """PostgreSQL: advisory locks on blob keys, taken in one order everywhere (no deadlock between deleters
        and commits). Shared ones (index commits) last until the transaction ends; exclusive ones (deleters) are
        session locks, held across their commit until `_remove_unreferenced_blobs` releases them. SQLite needs none:
        its writers already queue on `_write_lock`."""
        if not self._postgres or not keys:
            return
        ids = sorted({_lock_id(key) for key in keys})
        function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_lock"
        conn.exec_driver_sql(f"SELECT {function}(k) FROM unnest(%s::bigint[]) AS k", (ids,))

    def _guard_blobs(self, conn: Connection, jobs: list[_IndexJob]) -> None:
        """Inside an index commit, before its rows: write again any blob of this batch that a deleter removed after
        it was written (the same bytes stored by a crashed process and now recovered, or an object deleted as a
        correction while a modality sends it again). The lock makes each deleter's check-and-delete happen either
        wholly before this (its row is then visible here) or wholly after (this commit's rows then keep the blob)."""
        keys = sorted({job.row["blob_key"] for job in jobs})
        self._lock_keys(conn, keys, shared=True)
        # Driver-level SQL: this runs in every commit, and SQLAlchemy's statement machinery costs several times
        # the lookup itself (about 200 µs against 30).
        if self._postgres:
            sql, params = "SELECT blob_key FROM blob_deletion WHERE blob_key = ANY(%s)", (keys,)
        else:
            sql, params = _sqlite_deleted_keys(keys), tuple(keys)
        deleted = {row[0] for row in conn.exec_driver_sql(sql, params)}
        for job in jobs:
            key = job.row["blob_key"]
            if key not in deleted:
                continue
            try:
                if not self.blobs.exists(key):
                    log.warning("blob %s was deleted while its object was being stored: writing it again", key)
                    self.blobs.put_file(key, job.bytes_at, job.row["size"])
            except BlobStoreError as exc:
                raise StorageUnavailable(f"blob store: {exc}") from exc
            deleted.discard(key)

    def _remove_unreferenced_blobs(self, keys: set[str]) -> tuple[list[str], list[str]]:
        """Delete the blobs among `keys` that no index row references; returns (keys deleted, keys that could not
        be deleted).

        For each chunk: lock the keys (so no commit of them runs meanwhile), note them as deleted and commit that
        note, check the references, delete, unlock. The note is committed before any blob goes, so a commit after a
        crash of this process in the middle still sees it. Raises StorageUnavailable when the index cannot be
        reached; a blob that cannot be deleted is left as an orphan (`vnpacs verify` lists it).
        """
        removed: list[str] = []
        failed: list[str] = []
        ordered = sorted(keys)
        for start in range(0, len(ordered), 256):
            chunk = ordered[start : start + 256]
            try:
                with self._write_lock, self.engine.connect() as conn:
                    try:
                        self._lock_keys(conn, chunk, shared=False)
                        referenced = set(
                            conn.execute(select(Instance.blob_key).where(Instance.blob_key.in_(chunk))).scalars()
                        )
                        referenced |= set(
                            conn.execute(
                                select(InstanceConflict.blob_key).where(InstanceConflict.blob_key.in_(chunk))
                            ).scalars()
                        )
                        doomed = [key for key in chunk if key not in referenced]
                        if doomed:
                            now = utcnow()
                            conn.execute(delete(BlobDeletion).where(BlobDeletion.blob_key.in_(doomed)))
                            conn.execute(insert(BlobDeletion), [{"blob_key": k, "deleted_at": now} for k in doomed])
                            conn.execute(delete(BlobDeletion).where(BlobDeletion.deleted_at < now - _DELETION_MEMORY))
                        conn.commit()
                        for key in doomed:
                            try:
                                self.blobs.delete(key)
                            except BlobStoreError as exc:
                                log.error("cannot remove unreferenced blob %s, left as an orphan: %s", key, exc)
                                failed.append(key)
                                continue
                            removed.append(key)
                    finally:
                        if self._postgres:
                            try:
                                conn.rollback()
                                conn.exec_driver_sql("SELECT pg_advisory_unlock_all()")
                                conn.commit()
                            except SQLAlchemyError:
                                conn.invalidate()  # a closed session holds no lock
            except SQLAlchemyError as exc:
                raise StorageUnavailable(f"database: {exc.__class__.__name__}: {_short(exc)}") from exc
        return removed, failed

    def _upsert(self, conn: Connection, model: Any, uid_column: str, uid: str, values: dict[str, Any]) -> int:
        column = getattr(model, uid_column)
        stmt = (
            self._insert(model).values({uid_column: uid, **values}).on_conflict_do_nothing(index_elements=[uid_column])
        )
        result = conn.execute(stmt)
        if result.rowcount and result.inserted_primary_key:
            return int(result.inserted_primary_key[0])
        return int(conn.execute(select(model.pk).where(column == uid)).scalar_one())

    def _upsert_patient(self, conn: Connection, ds: Dataset, patient_key: tuple[str, str]) -> int:
        values = _patient_values(ds, patient_key)
        stmt = (
            self._insert(Patient)
            .values(values)
            .on_conflict_do_nothing(index_elements=["patient_id", "issuer_of_patient_id"])
        )
        result = conn.execute(stmt)
        if result.rowcount and result.inserted_primary_key:
            pk = int(result.inserted_primary_key[0])
        else:
            pk = int(
                conn.execute(
                    select(Patient.pk).where(
                        Patient.patient_id == patient_key[0], Patient.issuer_of_patient_id == patient_key[1]
                    )
                ).scalar_one()
            )
        for value, issuer, type_of_id in _other_ids(ds):
            conn.execute(
                self._insert(PatientIdentifier)
                .values(patient_pk=pk, value=value, issuer=issuer, type_of_patient_id=type_of_id)
                .on_conflict_do_nothing(index_elements=["patient_pk", "value", "issuer"])
            )
        return pk

    def _duplicate(self, conn: Connection, row: dict[str, Any], replace: bool = False) -> Outcome:
        existing = conn.execute(
            select(Instance.pk, *[getattr(Instance, f) for f in _CONFLICT_FIELDS]).where(
                Instance.sop_instance_uid == row["sop_instance_uid"]
            )
        ).one()
        if existing.sha256 == row["sha256"]:
            return "duplicate"
        kept_aside: Mapping[str, Any]
        if replace or self.duplicate_policy == "replace":
            # The newcomer is served; the earlier copy is kept aside.
            kept_aside, resolution = dict(existing._mapping), "replaced"
            conn.execute(update(Instance).where(Instance.pk == existing.pk).values(**row))
        else:
            kept_aside, resolution = row, "kept-first"
        conn.execute(
            insert(InstanceConflict).values(**{f: kept_aside[f] for f in _CONFLICT_FIELDS}, resolution=resolution)
        )
        return "conflict"

    def reindex_study(self, study_uid: str, ds: Dataset) -> None:
        """Bring a study's index rows (study, and its patient) in line with `ds`, the header of one of its objects
        after an attribute correction; a patient left with no study is removed."""
        patient_key = (_str(ds, "PatientID"), _str(ds, "IssuerOfPatientID"))
        with self._write_lock, self.engine.begin() as conn:
            old_patient = conn.execute(
                select(Study.patient_pk).where(Study.study_instance_uid == study_uid)
            ).scalar_one_or_none()
            if old_patient is None:
                raise IngestError(f"no study {study_uid}")
            patient_pk = self._upsert_patient(conn, ds, patient_key)
            conn.execute(update(Patient).where(Patient.pk == patient_pk).values(**_patient_values(ds, patient_key)))
            values = {k: v for k, v in _study_values(ds, patient_pk).items() if k != "created_at"}
            conn.execute(update(Study).where(Study.study_instance_uid == study_uid).values(**values))
            if old_patient != patient_pk:
                conn.execute(
                    delete(PatientIdentifier).where(
                        PatientIdentifier.patient_pk == old_patient,
                        ~exists().where(Study.patient_pk == old_patient),
                    )
                )
                conn.execute(
                    delete(Patient).where(Patient.pk == old_patient, ~exists().where(Study.patient_pk == old_patient))
                )
        self.invalidate()

    # ---- deletion -------------------------------------------------------------------------------------------

    def delete(self, objects: list[StoredObject]) -> int:
        """Remove objects (a correction): index rows first, in one transaction, then their blobs.

        Copies kept aside under the same SOP Instance UIDs go too; series, studies and patients left empty are
        removed. A blob that cannot be deleted stays as an orphan for `vnpacs verify`. Returns the number removed.
        """
        if not objects:
            return 0
        uids = [o.sop_instance_uid for o in objects]
        keys: set[str] = set()
        try:
            with self._write_lock, self.engine.begin() as conn:
                for start in range(0, len(uids), 500):
                    part = uids[start : start + 500]
                    keys |= set(
                        conn.execute(select(Instance.blob_key).where(Instance.sop_instance_uid.in_(part))).scalars()
                    )
                    keys |= set(
                        conn.execute(
                            select(InstanceConflict.blob_key).where(InstanceConflict.sop_instance_uid.in_(part))
                        ).scalars()
                    )
                    conn.execute(delete(InstanceConflict).where(InstanceConflict.sop_instance_uid.in_(part)))
                    conn.execute(delete(Instance).where(Instance.sop_instance_uid.in_(part)))
                conn.execute(delete(Series).where(~exists().where(Instance.series_pk == Series.pk)))
                conn.execute(delete(Study).where(~exists().where(Series.study_pk == Study.pk)))
                conn.execute(
                    delete(PatientIdentifier).where(~exists().where(Study.patient_pk == PatientIdentifier.patient_pk))
                )
                conn.execute(delete(Patient).where(~exists().where(Study.patient_pk == Patient.pk)))
        except SQLAlchemyError as exc:
            raise StorageUnavailable(f"database: {exc.__class__.__name__}: {_short(exc)}") from exc
        finally:
            self.invalidate()
        # A blob still referenced by another row (identical bytes elsewhere, or sent again meanwhile) stays.
        self._remove_unreferenced_blobs(keys)
        return len(set(uids))

    # ---- health ---------------------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise StorageUnavailable unless both the index and the blob store answer."""
        from storage.db import check as check_db

        try:
            check_db(self.engine)
            self.blobs.check()
        except (DatabaseError, BlobStoreError) as exc:
            raise StorageUnavailable(str(exc)) from exc

    def recover(self) -> list[str]:
        """After a crash: delete blobs whose write began but whose index row never committed. Returns their keys.

        A blob is spared when the same object is in flight in a live process on this node (serve and import share
        the data folder). Another node storing the very same bytes meanwhile is covered by the deletion protocol
        (`_remove_unreferenced_blobs`, `_guard_blobs`): its commit writes the blob again if this deleted it.
        """
        if self.journal is None:
            return []
        dead, live = self.journal.journals()
        pending: set[str] = set()
        for path in dead:
            pending |= Journal.pending_in(path)
        for path in live:
            pending -= Journal.pending_in(path)
        removed, failed = self._remove_unreferenced_blobs(pending)
        if failed:
            return removed  # the journals stay as they are: the next start tries again
        self.journal.reset()
        for path in dead:
            if path != self.journal.path:
                path.unlink(missing_ok=True)
        return removed


# How long a deleted blob's key is remembered: far longer than any write waits for its index commit.
_DELETION_MEMORY = dt.timedelta(days=1)

# PostgreSQL: deadlock_detected and serialization_failure roll the transaction back; running it again is safe.
_RETRYABLE = frozenset({"40P01", "40001"})


def _sqlstate(exc: SQLAlchemyError) -> str | None:
    return getattr(getattr(exc, "orig", None), "sqlstate", None)


def _lock_id(key: str) -> int:
    """A blob key as a PostgreSQL advisory lock id (signed 64 bits)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


def _short(exc: SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).splitlines()[0][:200]


def _other_ids(ds: Dataset) -> list[tuple[str, str, str]]:
    """(value, issuer, type) for each Other Patient ID: the sequence first, then the retired multi-valued form."""
    ids: list[tuple[str, str, str]] = []
    try:
        for item in ds.get("OtherPatientIDsSequence") or []:
            value = _str(item, "PatientID")
            if value:
                ids.append((value, _str(item, "IssuerOfPatientID"), _str(item, "TypeOfPatientID", 16)))
        legacy = ds.get((0x0010, 0x1000))
        if legacy is not None and legacy.value:
            values = legacy.value if isinstance(legacy.value, list | tuple) else str(legacy.value).split("\\")
            for value in values:
                value = str(value).strip()
                if value and value not in {i[0] for i in ids}:
                    ids.append((value[:64], "", ""))
    except Exception:
        return ids
    return ids


def _patient_values(ds: Dataset, patient_key: tuple[str, str]) -> dict[str, Any]:
    name = _str(ds, "PatientName", 324)
    return {
        "patient_id": patient_key[0],
        "issuer_of_patient_id": patient_key[1],
        "patient_name": name,
        "patient_name_key": search_key(name),
        "patient_birth_date": _str(ds, "PatientBirthDate", 8),
        "patient_birth_time": _time(ds, "PatientBirthTime"),
        "patient_sex": _str(ds, "PatientSex", 16),
        "other_patient_ids": "\\".join(i[0] for i in _other_ids(ds)),
    }


def _study_values(ds: Dataset, patient_pk: int) -> dict[str, Any]:
    referring = _str(ds, "ReferringPhysicianName", 324)
    description = _str(ds, "StudyDescription")
    return {
        "patient_pk": patient_pk,
        "study_date": _str(ds, "StudyDate", 8),
        "study_time": _time(ds, "StudyTime"),
        "accession_number": _str(ds, "AccessionNumber", 16),
        "issuer_of_accession_number": _str(
            ds.get("IssuerOfAccessionNumberSequence", [Dataset()])[0]
            if ds.get("IssuerOfAccessionNumberSequence")
            else Dataset(),
            "LocalNamespaceEntityID",
        ),
        "study_id": _str(ds, "StudyID", 16),
        "referring_physician_name": referring,
        "referring_physician_name_key": search_key(referring),
        "study_description": description,
        "study_description_key": search_key(description),
        "patient_age": _str(ds, "PatientAge", 4),
        "patient_size": _str(ds, "PatientSize", 16),
        "patient_weight": _str(ds, "PatientWeight", 16),
        "institution_name": _str(ds, "InstitutionName"),
        "created_at": utcnow(),
    }


def _series_values(ds: Dataset, study_pk: int) -> dict[str, Any]:
    return {
        "study_pk": study_pk,
        "modality": _str(ds, "Modality", 16),
        "series_number": _int(ds, "SeriesNumber"),
        "series_description": _str(ds, "SeriesDescription"),
        "series_date": _str(ds, "SeriesDate", 8),
        "series_time": _time(ds, "SeriesTime"),
        "body_part_examined": _str(ds, "BodyPartExamined", 16),
        "performed_procedure_step_start_date": _str(ds, "PerformedProcedureStepStartDate", 8),
        "performed_procedure_step_start_time": _time(ds, "PerformedProcedureStepStartTime"),
        "station_name": _str(ds, "StationName", 16),
        "manufacturer": _str(ds, "Manufacturer"),
        "institution_name": _str(ds, "InstitutionName"),
        "created_at": utcnow(),
    }
