"""DIMSE status codes the RIS services answer with (PS3.7 Annex C, PS3.4 Annexes F, J and K).

Kept here rather than in pacs/status.py: worklist/ does not import pacs/.
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

SUCCESS = 0x0000

# C-FIND (Modality Worklist, PS3.4 K.4.1.1.4)
PENDING = 0xFF00
PENDING_WARNING = 0xFF01  # one or more optional matching keys not supported
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900

# Normalized services (N-CREATE, N-SET, N-ACTION, N-EVENT-REPORT; PS3.7 C.4)
NO_SUCH_ATTRIBUTE = 0x0105
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_SOP_INSTANCE = 0x0112
INVALID_ARGUMENT_VALUE = 0x0115
INVALID_OBJECT_INSTANCE = 0x0117
CLASS_INSTANCE_CONFLICT = 0x0119
MISSING_ATTRIBUTE = 0x0120
MISSING_ATTRIBUTE_VALUE = 0x0121
NO_SUCH_ACTION = 0x0123
RESOURCE_LIMITATION = 0x0213

# MPPS N-SET on a step already COMPLETED or DISCONTINUED (PS3.4 table F.7.2-2): status 0x0110 with this Error ID.
MPPS_MAY_NO_LONGER_BE_UPDATED = 0xA710
MPPS_MAY_NO_LONGER_BE_UPDATED_COMMENT = "Performed Procedure Step Object may no longer be updated"

ERROR_COMMENT_MAX = 64  # ErrorComment is LO


def failure(code: int, comment: str, error_id: int | None = None) -> Dataset:
    """A status dataset with its ErrorComment (LO: no backslash, 64 characters) and, if given, its Error ID."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment.replace("\\", "/")[:ERROR_COMMENT_MAX]
    if error_id is not None:
        ds.ErrorID = error_id
    return ds


def calling_ae(event: Any) -> str:
    """The calling AE title of a pynetdicom event's association, stripped."""
    value = event.assoc.requestor.ae_title
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip()
