"""DICOM JSON (PS3.18 Annex F) for query results: tags as 8 hex digits, VRs, PN as Alphabetic, numbers as numbers."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

_NUMERIC_STRING = {"IS", "DS"}
_BINARY_NUMBERS = {"US", "UL", "SS", "SL", "FL", "FD", "UV", "SV"}
_INTEGERS = {"IS", "US", "UL", "SS", "SL", "UV", "SV"}
# Text VRs the fast path serves: a backslash separates values, as in the general path.
_TEXT = {"AE", "AS", "CS", "DA", "DT", "LO", "SH", "TM", "UI", "UR", "UC"}


@lru_cache(maxsize=4096)
def _tag_and_vr(keyword: str) -> tuple[str, str] | None:
    """Looked up once per keyword: pydicom's dictionary lookups dominated the cost of large QIDO answers."""
    tag = tag_for_keyword(keyword)
    return None if tag is None else (f"{tag:08X}", dictionary_VR(tag))


def tag_hex(keyword: str) -> str | None:
    found = _tag_and_vr(keyword)
    return None if found is None else found[0]


def _number(text: str, vr: str) -> int | float | None:
    try:
        return int(text) if vr == "IS" else float(text)
    except ValueError:
        return None


def element(keyword: str, value: Any) -> tuple[str, dict[str, Any]] | None:
    """(tag, DICOM JSON attribute) for one keyword and value from the query engine; None if not a DICOM keyword."""
    found = _tag_and_vr(keyword)
    if found is None:
        return None
    tag, vr = found
    # Fast paths for the single text and integer values that make up almost all of a QIDO answer.
    if type(value) is str and vr in _TEXT:
        return tag, ({"vr": vr, "Value": value.split("\\")} if value else {"vr": vr})
    if type(value) is int and vr in _INTEGERS:
        return tag, {"vr": vr, "Value": [value]}
    attribute: dict[str, Any] = {"vr": vr}
    if value is None or value == "" or value == []:
        return tag, attribute
    values = value if isinstance(value, list) else [value]
    if vr == "PN":
        attribute["Value"] = [{"Alphabetic": str(v)} for v in values]
    elif vr == "SQ":
        items = []
        for item in values:
            converted = {}
            for k, v in item.items():
                pair = element(k, v)
                if pair is not None:
                    converted[pair[0]] = pair[1]
            items.append(converted)
        attribute["Value"] = items
    elif vr in _NUMERIC_STRING:
        numbers = [_number(str(v), vr) if not isinstance(v, int | float) else v for v in values]
        attribute["Value"] = [n for n in numbers if n is not None]
    elif vr in _BINARY_NUMBERS:
        attribute["Value"] = [int(v) if vr not in ("FL", "FD") else float(v) for v in values]
    else:
        multi: list[str] = []
        for v in values:
            multi.extend(str(v).split("\\") if vr != "UI" or "\\" in str(v) else [str(v)])
        attribute["Value"] = multi
    if not attribute.get("Value"):
        attribute.pop("Value", None)
    return tag, attribute


def dataset(row: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One result as a DICOM JSON object, attributes in tag order."""
    out: dict[str, dict[str, Any]] = {}
    for values in (row, extra or {}):
        for keyword, value in values.items():
            pair = element(keyword, value)
            if pair is not None:
                out[pair[0]] = pair[1]
    return dict(sorted(out.items()))
