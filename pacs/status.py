"""DIMSE status codes we answer with, named in one place (PS3.4 Annexes B and C, PS3.7 Annex C)."""

from __future__ import annotations

SUCCESS = 0x0000
PENDING = 0xFF00
PENDING_WARNING = 0xFF01  # C-FIND: optional keys not supported
CANCEL = 0xFE00

# Storage
INVALID_SOP_INSTANCE = 0x0117  # the dataset's SOP Instance UID is not the request's
OUT_OF_RESOURCES = 0xA700  # database or blob store unavailable
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000  # undecodable, truncated, missing required UIDs

# Query / Retrieve
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000
OUT_OF_RESOURCES_MATCHES = 0xA700
OUT_OF_RESOURCES_SUBOPERATIONS = 0xA702
MOVE_DESTINATION_UNKNOWN = 0xA801

ERROR_COMMENT_MAX = 64  # ErrorComment is LO

# Normalized services (N-CREATE / N-SET / N-ACTION: MPPS, Storage Commitment), PS3.7 Annex C
NO_SUCH_SOP_CLASS = 0x0118
