"""DICOM JSON (PS3.18 Annex F) for query results: tags as 8 hex digits, VRs, PN as Alphabetic, numbers as numbers."""

from __future__ import annotations

from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

_NUMERIC_STRING = {"IS", "DS"}
_BINARY_NUMBERS = {"US", "UL", "SS", "SL", "FL", "FD", "UV", "SV"}


def tag_hex(keyword: str) -> str | None:
    tag = tag_for_keyword(keyword)
    return None if tag is None else f"{tag:08X}"


def _number(text: str, vr: str) -> int | float | None:
    try:
        return int(text) if vr == "IS" else float(text)
    except ValueError:
        return None


def element(keyword: str, value: Any) -> tuple[str, dict[str, Any]] | None:
    """(tag, DICOM JSON attribute) for one keyword and value from the query engine; None if not a DICOM keyword."""
    tag = tag_hex(keyword)
    if tag is None:
        return None
    vr = dictionary_VR(keyword)
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
    for keyword, value in {**row, **(extra or {})}.items():
        pair = element(keyword, value)
        if pair is not None:
            out[pair[0]] = pair[1]
    return dict(sorted(out.items()))
