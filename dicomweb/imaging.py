"""Pixels for people and for clients that cannot decode: single decoded frames, rendered JPEG/PNG, transcoding.

Transcoding writes any object in Explicit or Implicit VR Little Endian or Deflated Explicit VR Little Endian, and
re-encodes pixel data losslessly in RLE Lossless (pydicom's own encoder), JPEG 2000 Lossless and JPEG 2000
(reversible, via pylibjpeg-openjpeg) and JPEG-LS Lossless (pyjpegls). Lossy re-compression is not done: a lossy
syntax (JPEG baseline, JPEG-LS near-lossless, ...) gets a refusal naming the reason.

Rendering (decode, rescale, window, 8-bit, JPEG/PNG) is `storage.render`, shared with the reports' key images; its
names are re-exported here. Decoding uses pydicom's pixel handlers (pylibjpeg and pyjpegls codecs).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import get_encoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import (
    JPEG2000,
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from storage.render import (
    PIXEL_KEYWORDS,
    ImagingError,
    NoPixelData,
    RenderOptions,
    decoded_frame,
    decoded_frames,
    image_header,
    render,
)

__all__ = [
    "PIXEL_KEYWORDS",
    "ImagingError",
    "NoPixelData",
    "RenderOptions",
    "decoded_frame",
    "decoded_frames",
    "encoded_frames",
    "image_header",
    "native_frames",
    "render",
    "transcodable_syntaxes",
    "transcoded",
    "transcoded_to_explicit_le",
    "transcoding_problem",
]


def native_frames(path: Path, numbers: list[int]) -> list[bytes]:
    """Frames `numbers` decoded to little-endian native pixel bytes (what Explicit VR Little Endian would hold)."""
    arrays, _ = decoded_frames(path, numbers)
    return [np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"))).tobytes() for a in arrays]


# Uncompressed syntaxes any object can be written in; compressed ones get their pixel data re-encoded, losslessly.
NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
LOSSLESS = (RLELossless, JPEG2000Lossless, JPEG2000, JPEGLSLossless)
# JPEG 2000 (.91) allows reversible coding: the codestream is the lossless one, so pixels survive the trip.
ENCODE_AS = {JPEG2000: JPEG2000Lossless}
_SWAP = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


def transcoding_problem(syntax: str) -> str | None:
    """Why objects cannot be sent in transfer syntax `syntax`, or None when they can."""
    if syntax in NATIVE:
        return None
    uid = UID(syntax)
    if syntax not in AllTransferSyntaxes:
        return f"{syntax} is not a transfer syntax known here"
    if syntax == ExplicitVRBigEndian:
        return f"{uid.name} is retired and not produced"
    if syntax not in LOSSLESS:
        return f"no encoder into {uid.name} here (pixel data is only re-encoded losslessly)"
    encoder = get_encoder(ENCODE_AS.get(uid, uid))
    if not encoder.is_available:
        return f"the {uid.name} encoder is missing: {'; '.join(encoder.missing_dependencies)}"
    return None


def transcodable_syntaxes() -> list[str]:
    return [str(uid) for uid in (*NATIVE, *LOSSLESS) if transcoding_problem(uid) is None]


def _to_little_endian(ds: Dataset) -> None:
    """Big endian → little endian: pixel data decoded, other raw word values byte-swapped, encoding switched."""
    if "PixelData" in ds:
        array = ds.pixel_array
        ds.PixelData = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"))).tobytes()
    for elem in ds.iterall():
        width = _SWAP.get(elem.VR)
        if width and elem.tag != 0x7FE00010 and isinstance(elem.value, bytes) and len(elem.value) % width == 0:
            elem.value = np.frombuffer(elem.value, dtype=f">u{width}").astype(f"<u{width}").tobytes()
    ds.set_original_encoding(False, True)


def transcoded(path: Path, syntax: str) -> bytes:
    """The object re-encoded in transfer syntax `syntax`: decoded if compressed, then re-encoded losslessly.

    The SOP Instance UID stays (lossless conversions keep the instance's identity). Colour decoded from YBR
    (JPEG) comes out as RGB, with Photometric Interpretation updated to match.
    """
    problem = transcoding_problem(syntax)
    if problem:
        raise ImagingError(problem)
    target = UID(syntax)
    ds = dcmread(path)
    source = UID(ds.file_meta.TransferSyntaxUID)
    try:
        if source.is_compressed and "PixelData" in ds:
            ds.decompress(generate_instance_uid=False)
        elif not source.is_little_endian:
            _to_little_endian(ds)
        if target.is_compressed:
            if "PixelData" in ds:
                ds.compress(ENCODE_AS.get(target, target), generate_instance_uid=False)
            elif "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
                raise ImagingError("float pixel data cannot be encapsulated")
        ds.file_meta.TransferSyntaxUID = target
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
    except ImagingError:
        raise
    except Exception as exc:  # codec missing, corrupt data, values outside Bits Stored...
        raise ImagingError(f"cannot transcode to {target.name}: {exc}") from exc
    return out.getvalue()


def transcoded_to_explicit_le(path: Path) -> bytes:
    """The object in Explicit VR Little Endian, pixel data decoded: for clients that cannot decode."""
    return transcoded(path, ExplicitVRLittleEndian)


def encoded_frames(path: Path, numbers: list[int] | None, syntax: str) -> list[bytes]:
    """Frames `numbers` (1-based; None: all) decoded and re-encoded, each on its own, in compressed transfer syntax
    `syntax`."""
    problem = transcoding_problem(syntax)
    if problem:
        raise ImagingError(problem)
    target = UID(syntax)
    if not target.is_compressed:
        raise ImagingError(f"{target.name} is not a compressed transfer syntax")
    header = image_header(path)
    photometric = str(header.get("PhotometricInterpretation", ""))
    if photometric.startswith("YBR"):
        # Decoding yields RGB: re-encoded frames would no longer match the metadata the client reads them with.
        raise ImagingError(f"{photometric} frames cannot be re-encoded without changing their colour space")
    encoder = get_encoder(ENCODE_AS.get(target, target))
    options = as_pixel_options(header, number_of_frames=1, planar_configuration=0)
    if numbers is None:
        numbers = list(range(1, int(header.get("NumberOfFrames", 1) or 1) + 1))
    arrays, _ = decoded_frames(path, numbers)
    out = []
    for number, array in zip(numbers, arrays, strict=True):
        try:
            out.append(encoder.encode(array, **options))
        except Exception as exc:
            raise ImagingError(f"cannot encode frame {number} in {target.name}: {exc}") from exc
    return out
