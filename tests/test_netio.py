"""The packed C-STORE response and File Meta Information are byte-identical to what pynetdicom itself encodes."""

from __future__ import annotations

import io

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pynetdicom import dimse_messages, dsutils
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from pacs import netio

netio.apply()

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def _pynetdicom_command_set(rsp: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    fragments = [pdv.presentation_data_value_list[0][1] for pdv in message.encode_msg(1, 131072)]
    return b"".join(fragment[1:] for fragment in fragments)


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "status_code", "comment"),
    [
        (CT, "1.2.3.4", 0x0000, None),  # even-length UIDs
        (MR, "1.2.3.45", 0xA700, "storage unavailable, retry later"),  # odd-length instance UID, even comment
        ("1.2", "1.23", 0xC000, "odd"),  # odd comment padded with a space
        (CT, "1.2.826.0.1.3680043.8.498.1", 0xB000, None),
    ],
)
def test_store_response_packed_as_pynetdicom_encodes_it(
    sop_class: str, sop_instance: str, status_code: int, comment: str | None
) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status_code
    if comment:
        rsp.ErrorComment = comment
    assert netio.encode_store_response(rsp) == _pynetdicom_command_set(rsp)


def test_store_response_with_offending_element_left_to_pynetdicom() -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 1
    rsp.AffectedSOPClassUID = CT
    rsp.AffectedSOPInstanceUID = "1.2.3"
    rsp.Status = 0xA900
    rsp.OffendingElement = [0x00080016]
    assert netio.encode_store_response(rsp) is None


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "transfer_syntax"),
    [
        (CT, "1.2.3.4.5", "1.2.840.10008.1.2.1"),
        (MR, "1.2.3.45", "1.2.840.10008.1.2"),
        (CT, "1.2.3", "1.2.840.10008.1.2.4.50"),
    ],
)
def test_spooled_file_meta_packed_as_pydicom_writes_it(sop_class: str, sop_instance: str, transfer_syntax: str) -> None:
    expected = DicomBytesIO()
    write_file_meta_info(
        expected,
        dsutils.create_file_meta(
            sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=transfer_syntax
        ),
    )
    packed = io.BytesIO()
    dimse_messages.write_file_meta_info(
        packed,
        dimse_messages.create_file_meta(
            sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=transfer_syntax
        ),
    )
    assert packed.getvalue() == expected.getvalue()
