"""Frames for people: one frame decoded, rescaled (modality LUT), windowed, made 8-bit and encoded as JPEG or PNG.

The one rendering implementation: DICOMweb's /rendered and /thumbnail (`dicomweb.imaging`) and the reports' key
images (`worklist`) both use it. Rendering applies the modality LUT (rescale) and then the requested window or the
file's own VOI (window or LUT); without either it stretches the frame's range. Decoding uses pydicom's pixel
handlers (pylibjpeg codecs).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from storage import pixels


class ImagingError(ValueError):
    """The pixel data cannot be decoded or rendered (no pixels, unsupported codec, bad parameters)."""


class NoPixelData(ImagingError):
    """The object is not an image (a report, a document, a presentation state...)."""


PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
PIXEL_DATA = 0x7FE00010


@dataclass(frozen=True)
class RenderOptions:
    media_type: str = "image/jpeg"
    quality: int = 90
    window: tuple[float, float, str] | None = None  # center, width, function
    viewport: tuple[int, int] | None = None  # fit inside, keeping the aspect ratio


def image_header(path: Path) -> Dataset:
    """The header up to the pixel data; NoPixelData if no pixel data follows it."""
    with open(path, "rb") as fp:
        if pixels.transfer_syntax(fp) == DeflatedExplicitVRLittleEndian:
            header, tag = pixels.inflated_header(path)  # only the header is inflated
            found = tag is not None
        else:
            header = dcmread(fp, stop_before_pixels=True)
            implicit, little = header.original_encoding
            found = pixels.element_header(fp, bool(implicit), bool(little)) is not None
    if not found:
        raise NoPixelData("the object has no pixel data")
    return header


def decoded_frames(path: Path, numbers: list[int]) -> tuple[Iterator[np.ndarray], Dataset]:
    """Frames `numbers` (1-based, checked before any is decoded) decoded one by one to native arrays as they are
    iterated, with the header they are decoded under."""
    header = image_header(path)
    frames = int(header.get("NumberOfFrames", 1) or 1)
    for number in numbers:
        if not 1 <= number <= frames:
            raise IndexError(f"frame {number} out of 1..{frames}")
    if header.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return _inflated_arrays(path, numbers, header), header

    def decode() -> Iterator[np.ndarray]:
        for number in numbers:
            try:
                yield pixel_array(path, index=number - 1)
            except Exception as exc:  # codec missing or corrupt data
                raise ImagingError(f"cannot decode frame {number}: {exc}") from exc

    return decode(), header


# What a frame cut from native pixel data needs to be decoded on its own.
_IMAGE_PIXEL_KEYWORDS = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit",
                         "PixelRepresentation", "PhotometricInterpretation", "PlanarConfiguration")  # fmt: skip


def _inflated_arrays(path: Path, numbers: list[int], header: Dataset) -> Iterator[np.ndarray]:
    """Frames of a deflated object: cut from its pixel data as it is inflated (pixels.inflated_frames), then each
    decoded on its own; pixel data that is not whole bytes per frame (1-bit, YBR_FULL_422, float) is inflated whole
    and decoded by pydicom, as before."""
    whole = (
        int(header.get("BitsAllocated", 0) or 0) % 8
        or header.get("PhotometricInterpretation") == "YBR_FULL_422"
        or pixels.inflated_header(path)[1] != PIXEL_DATA
    )
    if whole:
        source = dcmread(path)
        for number in numbers:
            try:
                yield pixel_array(source, index=number - 1)
            except Exception as exc:  # corrupt data
                raise ImagingError(f"cannot decode frame {number}: {exc}") from exc
        return
    try:
        natives = pixels.inflated_frames(path, numbers)
    except pixels.PixelDataError as exc:
        raise ImagingError(f"cannot decode frames {numbers}: {exc}") from exc
    for number, data in zip(numbers, natives, strict=True):
        frame = Dataset()
        for keyword in _IMAGE_PIXEL_KEYWORDS:
            if keyword in header:
                setattr(frame, keyword, header[keyword].value)
        frame.NumberOfFrames = 1
        frame.PixelData = data
        frame.file_meta = FileMetaDataset()
        frame.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        try:
            yield pixel_array(frame)
        except Exception as exc:  # corrupt data
            raise ImagingError(f"cannot decode frame {number}: {exc}") from exc


def decoded_frame(path: Path, number: int) -> tuple[np.ndarray, Dataset]:
    """Frame `number` (1-based) decoded to a native array, with the header it was decoded under."""
    arrays, header = decoded_frames(path, [number])
    return next(arrays), header


def to_8bit(array: np.ndarray, header: Dataset, options: RenderOptions) -> np.ndarray:
    """Display values 0..255: colour scaled as is; grey rescaled, then windowed (requested, else the file's VOI,
    else the frame's range), MONOCHROME1 inverted."""
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
    """Frame `number` (1-based) of the stored file at `path` as a JPEG or PNG image."""
    array, header = decoded_frame(path, number)
    image = Image.fromarray(to_8bit(array, header, options))
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
