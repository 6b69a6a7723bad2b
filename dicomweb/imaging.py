"""Pixels for people and for clients that cannot decode: single decoded frames, rendered JPEG/PNG, transcoding.

Transcoding writes any object in Explicit or Implicit VR Little Endian or Deflated Explicit VR Little Endian, and
re-encodes pixel data losslessly in RLE Lossless (pydicom's own encoder), JPEG 2000 Lossless and JPEG 2000
(reversible, via pylibjpeg-openjpeg) and JPEG-LS Lossless when pyjpegls is installed. Lossy re-compression is not
done: a lossy syntax (JPEG baseline, ...) gets a refusal naming the reason.

Rendering applies the modality LUT (rescale) and then the requested window or the file's own VOI (window or LUT);
without either it stretches the frame's range. Decoding uses pydicom's pixel handlers (pylibjpeg codecs).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_encoder, pixel_array
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

from storage import pixels


class ImagingError(ValueError):
    """The pixel data cannot be decoded or rendered (no pixels, unsupported codec, bad parameters)."""


class NoPixelData(ImagingError):
    """The object is not an image (a report, a document, a presentation state...)."""


PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class RenderOptions:
    media_type: str = "image/jpeg"
    quality: int = 90
    window: tuple[float, float, str] | None = None  # center, width, function
    viewport: tuple[int, int] | None = None  # fit inside, keeping the aspect ratio


def image_header(path: Path) -> Dataset:
    """The header up to the pixel data; NoPixelData if no pixel data follows it."""
    with open(path, "rb") as fp:
        header = dcmread(fp, stop_before_pixels=True)
        if header.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            found = any(k in dcmread(path, defer_size="1 KB") for k in PIXEL_KEYWORDS)  # fp is inflated elsewhere
        else:
            implicit, little = header.original_encoding
            found = pixels.element_header(fp, bool(implicit), bool(little)) is not None
    if not found:
        raise NoPixelData("the object has no pixel data")
    return header


def decoded_frame(path: Path, number: int) -> tuple[np.ndarray, Dataset]:
    """Frame `number` (1-based) decoded to a native array, with the header it was decoded under."""
    header = image_header(path)
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if not 1 <= number <= frames:
        raise IndexError(f"frame {number} out of 1..{frames}")
    try:
        return pixel_array(path, index=number - 1), header
    except Exception as exc:  # codec missing or corrupt data
        raise ImagingError(f"cannot decode frame {number}: {exc}") from exc


def native_frame_bytes(path: Path, number: int) -> bytes:
    """Frame `number` decoded to little-endian native pixel bytes (what Explicit VR Little Endian would hold)."""
    array, _ = decoded_frame(path, number)
    return np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"))).tobytes()


def _to_8bit(array: np.ndarray, header: Dataset, options: RenderOptions) -> np.ndarray:
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2"))
    if array.ndim == 3 and array.shape[-1] == 3:  # colour: already display values
        if array.dtype != np.uint8:
            array = (array / max(float(array.max()), 1.0) * 255).astype(np.uint8)
        return array
    values = apply_modality_lut(array, header).astype(np.float64)
    if options.window is not None:
        center, width, _ = options.window
        low, high = center - width / 2, center + width / 2
    elif "WindowCenter" in header or "VOILUTSequence" in header:
        values = apply_voi_lut(values, header).astype(np.float64)
        low, high = float(values.min()), float(values.max())
    else:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1
    scaled = np.clip((values - low) / (high - low), 0, 1) * 255
    if photometric == "MONOCHROME1":
        scaled = 255 - scaled
    return scaled.astype(np.uint8)


def render(path: Path, number: int, options: RenderOptions) -> bytes:
    array, header = decoded_frame(path, number)
    image = Image.fromarray(_to_8bit(array, header, options))
    if options.viewport is not None:
        image.thumbnail(options.viewport)
    out = io.BytesIO()
    if options.media_type == "image/png":
        image.save(out, format="PNG")
    elif options.media_type == "image/jpeg":
        image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).save(
            out, format="JPEG", quality=options.quality
        )
    else:
        raise ImagingError(f"cannot render {options.media_type}")
    return out.getvalue()


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


def encoded_frames(path: Path, numbers: list[int], syntax: str) -> list[bytes]:
    """Frames `numbers` (1-based) decoded and re-encoded, each on its own, in compressed transfer syntax `syntax`."""
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
    out = []
    for number in numbers:
        array, _ = decoded_frame(path, number)
        try:
            out.append(encoder.encode(array, **options))
        except Exception as exc:
            raise ImagingError(f"cannot encode frame {number} in {target.name}: {exc}") from exc
    return out
