"""A tiny MLLP client and HL7 v2 message builders, as a HIS would send them."""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping

import hl7

VT, FS, CR = b"\x0b", b"\x1c", b"\r"


class MllpClient:
    """One TCP connection to an MLLP listener; `send` frames a message and waits for the framed answer."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = b""

    def send_raw(self, data: bytes) -> bytes:
        """Send bytes as they are (framing included) and return the next framed answer, unframed."""
        self.sock.sendall(data)
        while FS + CR not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; got {self.buffer!r}")
            self.buffer += chunk
        block, _, self.buffer = self.buffer.partition(FS + CR)
        assert block.startswith(VT), block
        return block[1:]

    def send(self, message: str | bytes, encoding: str = "utf-8") -> hl7.Message:
        data = message if isinstance(message, bytes) else message.encode(encoding)
        return hl7.parse(self.send_raw(VT + data + FS + CR).decode(encoding))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> MllpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def send(port: int, message: str | bytes, encoding: str = "utf-8") -> hl7.Message:
    with MllpClient(port) as client:
        return client.send(message, encoding)


def segment(name: str, fields: Mapping[int, str]) -> str:
    """`name|f1|f2|…` with the given 1-based fields set and the rest empty."""
    last = max(fields) if fields else 0
    return "|".join([name, *(fields.get(i, "") for i in range(1, last + 1))])


def msh(kind: str, control: str, *, version: str = "2.5.1", charset: str = "UNICODE UTF-8") -> str:
    """MSH from the HIS of Bệnh viện Bạch Mai to VNPACS."""
    return f"MSH|^~\\&|HIS|BVBM|VNPACS|BVBM|20261122080000||{kind}|{control}|P|{version}|||AL|NE|VNM|{charset}"


def message(*segments: str) -> str:
    return "\r".join(segments) + "\r"


def pid(
    patient_id: str,
    name: str = "Nguyễn^Văn An",
    *,
    issuer: str = "BVBM",
    cccd: str = "001085012345",
    bhyt: str = "DN4010123456789",
    birth: str = "19850312",
    sex: str = "M",
) -> str:
    ids = [f"{patient_id}^^^{issuer}&2.16.840.1.113883.2.24.1&ISO^PI"]
    if cccd:
        ids.append(f"{cccd}^^^BCA^NI")
    if bhyt:
        ids.append(f"{bhyt}^^^BHXH^SB")
    return segment("PID", {1: "1", 3: "~".join(ids), 5: name, 7: birth, 8: sex})


def order(
    kind: str,
    control: str,
    order_control: str,
    placer: str,
    patient: str,
    *,
    version: str = "2.5.1",
    charset: str = "UNICODE UTF-8",
    obr: Mapping[int, str] | None = None,
    orc: Mapping[int, str] | None = None,
    pv1: Mapping[int, str] | None = None,
    extra: Iterable[str] = (),
) -> str:
    """ORM^O01 / OMI^O23: MSH, PID, PV1, ORC, OBR (+ `extra` segments: TQ1, IPC, ZDS...)."""
    obr_fields = {1: "1", 2: placer, 4: "CT.NGUC^CT ngực không tiêm thuốc^BYT", 24: "CT", **(obr or {})}
    return message(
        msh(kind, control, version=version, charset=charset),
        patient,
        segment("PV1", {1: "1", 2: "O", 8: "BS01^Trần^Thị Bình", 19: "LK-" + placer, **(pv1 or {})}),
        segment("ORC", {1: order_control, 2: placer, **(orc or {})}),
        segment("OBR", obr_fields),
        *extra,
    )


def ack_code(ack: hl7.Message) -> str:
    return str(ack.segment("MSA").extract_field(1, 1))


def ack_text(ack: hl7.Message) -> str:
    return str(ack.segment("MSA").extract_field(1, 3))
