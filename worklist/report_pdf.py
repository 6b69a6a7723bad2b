"""The report as a PDF for clinicians: Vietnamese text in an embedded Unicode font, a QR code linking to the study.

The font is DejaVu Sans from Debian's fonts-dejavu-core (`FONT`, `FONT_BOLD`); fpdf2 embeds the subset it uses, with
a ToUnicode map, so the text can be searched and extracted (`pdftotext`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

from worklist.models import VIETNAM

if TYPE_CHECKING:
    from fpdf import FPDF

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
FONT_BOLD = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
TITLE = "PHIẾU KẾT QUẢ CHẨN ĐOÁN HÌNH ẢNH"

SEX = {"M": "Nam", "F": "Nữ", "O": "Khác"}
STATUS = {
    "DRAFT": "BẢN NHÁP — chưa ký, không có giá trị",
    "PRELIMINARY": "KẾT QUẢ SƠ BỘ — chưa ký",
    "FINAL": "Kết quả chính thức",
    "AMENDED": "Kết quả đã sửa đổi",
}


class FontMissing(RuntimeError):
    pass


@dataclass
class ReportDocument:
    """Everything printed on the report."""

    report_id: int
    version: int
    status: str
    study_instance_uid: str
    viewer_url: str
    facility_name: str = ""
    patient_name: str = ""
    patient_id: str = ""
    birth_date: str = ""  # YYYYMMDD
    sex: str = ""
    accession_number: str = ""
    procedure: str = ""
    modality: str = ""
    study_date: str = ""  # YYYYMMDD
    referring_physician: str = ""
    clinical_reason: str = ""
    findings: str = ""
    conclusion: str = ""
    recommendation: str = ""
    author_name: str = ""
    author_code: str = ""
    reason: str = ""  # of an amendment
    signed_at: dt.datetime | None = None
    signer: str = ""  # common name of the signing certificate
    content_sha256: str = ""
    key_images: list[tuple[str, bytes]] = field(default_factory=list)  # (caption, JPEG)


def person_name(value: str) -> str:
    """A DICOM PN (`Nguyễn^Văn An`, first component group) as written on paper: `Nguyễn Văn An`."""
    alphabetic = value.split("=")[0]
    return " ".join(part.strip() for part in alphabetic.split("^") if part.strip())


def dmy(value: str) -> str:
    """YYYYMMDD → dd/mm/yyyy (as given when it is not a full date)."""
    if len(value) >= 8 and value[:8].isdigit():
        return f"{value[6:8]}/{value[4:6]}/{value[0:4]}"
    return value


def _check_fonts() -> None:
    for path in (FONT, FONT_BOLD):
        if not path.is_file():
            raise FontMissing(
                f"the report font {path} is missing: install Debian's fonts-dejavu-core "
                "(apt-get install fonts-dejavu-core)"
            )


def _qr_png(url: str) -> BytesIO:
    import segno

    out = BytesIO()
    segno.make(url, error="m", micro=False).save(out, kind="png", scale=4, border=2)
    out.seek(0)
    return out


KEY_IMAGE_WIDTH = 38.0  # mm; four to a row


def _key_images(pdf: FPDF, images: list[tuple[str, bytes]], width: float) -> None:
    """The key images, small, four to a row, each captioned, under the heading "Ảnh chính"."""
    from fpdf.enums import XPos, YPos
    from PIL import Image

    pdf.set_font("DejaVu", "B", 11)
    pdf.cell(width, 7, "Ảnh chính", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    per_row = max(1, int((width + 4) // (KEY_IMAGE_WIDTH + 4)))
    for start in range(0, len(images), per_row):
        row = images[start : start + per_row]
        heights = []
        for _, jpeg in row:
            with Image.open(BytesIO(jpeg)) as im:
                heights.append(KEY_IMAGE_WIDTH * im.height / max(im.width, 1))
        tallest = min(max(heights), KEY_IMAGE_WIDTH * 1.5)
        if pdf.get_y() + tallest + 5 > pdf.page_break_trigger:
            pdf.add_page()
        top = pdf.get_y()
        for i, ((caption, jpeg), h) in enumerate(zip(row, heights, strict=True)):
            x = pdf.l_margin + i * (KEY_IMAGE_WIDTH + 4)
            w = KEY_IMAGE_WIDTH * min(1.0, tallest / h)
            pdf.image(BytesIO(jpeg), x=x, y=top, w=w, h=min(h, tallest))
            pdf.set_xy(x, top + tallest + 0.5)
            pdf.set_font("DejaVu", "", 7)
            pdf.cell(KEY_IMAGE_WIDTH, 3.5, caption, align="C")
        pdf.set_xy(pdf.l_margin, top + tallest + 5)
    pdf.ln(2)


def render(doc: ReportDocument) -> bytes:
    """The report as an unsigned PDF (A4)."""
    from fpdf import FPDF
    from fpdf.enums import XPos, YPos

    _check_fonts()
    moment = doc.signed_at or dt.datetime.now(dt.UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    local = moment.astimezone(VIETNAM)

    pdf = FPDF(orientation="P", unit="mm", format="A4")
    pdf.set_creation_date(moment)
    pdf.set_title(f"{TITLE} — {person_name(doc.patient_name)}")
    pdf.set_author(person_name(doc.author_name))
    pdf.set_creator("vnpacs")
    pdf.set_lang("vi")
    pdf.set_margins(18, 15, 18)
    pdf.set_auto_page_break(True, margin=18)
    pdf.add_font("DejaVu", "", str(FONT))
    pdf.add_font("DejaVu", "B", str(FONT_BOLD))
    pdf.add_page()
    width = pdf.w - pdf.l_margin - pdf.r_margin
    qr_size = 30.0
    top = pdf.get_y()

    # Heading, with the QR code at the top right.
    pdf.image(_qr_png(doc.viewer_url), x=pdf.w - pdf.r_margin - qr_size, y=top, w=qr_size, h=qr_size)
    pdf.set_font("DejaVu", "B", 10)
    pdf.multi_cell(width - qr_size - 4, 5, doc.facility_name or "", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font("DejaVu", "", 8)
    pdf.multi_cell(width - qr_size - 4, 4, f"Số phiếu: {doc.report_id}-{doc.version}", new_x=XPos.LMARGIN)
    pdf.set_xy(pdf.w - pdf.r_margin - qr_size, top + qr_size)
    pdf.cell(qr_size, 4, "Quét để xem ảnh", align="C")
    pdf.set_xy(pdf.l_margin, top + qr_size + 6)
    pdf.set_font("DejaVu", "B", 15)
    pdf.cell(width, 9, TITLE, align="C", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font("DejaVu", "", 9)
    status = STATUS.get(doc.status, doc.status)
    if doc.status == "AMENDED" and doc.reason:
        status += f" (lý do sửa đổi: {doc.reason})"
    pdf.multi_cell(width, 5, f"({status}, phiên bản {doc.version})", align="C", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(3)

    # Patient and examination.
    rows = [
        ("Họ và tên", person_name(doc.patient_name).upper(), "Giới tính", SEX.get(doc.sex, doc.sex)),
        ("Mã người bệnh", doc.patient_id, "Ngày sinh", dmy(doc.birth_date)),
        ("Số chỉ định (Accession)", doc.accession_number, "Ngày chụp", dmy(doc.study_date)),
        ("Kỹ thuật", doc.procedure, "Thiết bị", doc.modality),
    ]
    label_w, half = 42.0, width / 2
    for left_label, left, right_label, right in rows:
        y = pdf.get_y()
        pdf.set_font("DejaVu", "", 9)
        pdf.cell(label_w, 6, f"{left_label}:")
        pdf.set_font("DejaVu", "B", 9)
        pdf.cell(half + 12 - label_w, 6, left)
        pdf.set_font("DejaVu", "", 9)
        pdf.cell(22, 6, f"{right_label}:")
        pdf.set_font("DejaVu", "B", 9)
        pdf.cell(0, 6, right, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.set_y(y + 6)
    for label, value in (("Bác sĩ chỉ định", person_name(doc.referring_physician)), ("Chẩn đoán", doc.clinical_reason)):
        if value:
            pdf.set_font("DejaVu", "", 9)
            pdf.cell(label_w, 6, f"{label}:")
            pdf.multi_cell(width - label_w, 6, value, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(2)
    pdf.line(pdf.l_margin, pdf.get_y(), pdf.w - pdf.r_margin, pdf.get_y())
    pdf.ln(3)

    # The report itself.
    for heading, text, bold in (
        ("Mô tả", doc.findings, False),
        ("Kết luận", doc.conclusion, True),
        ("Đề nghị", doc.recommendation, False),
    ):
        pdf.set_font("DejaVu", "B", 11)
        pdf.cell(width, 7, heading, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.set_font("DejaVu", "B" if bold else "", 10)
        pdf.multi_cell(width, 5.5, text.strip() or "—", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.ln(2)

    if doc.key_images:
        _key_images(pdf, doc.key_images, width)

    # Date and doctor, on the right.
    pdf.ln(4)
    block_x, block_w = pdf.l_margin + width / 2, width / 2
    pdf.set_x(block_x)
    pdf.set_font("DejaVu", "", 10)
    when = f"{local:%H:%M}, ngày {local.day:02d} tháng {local.month:02d} năm {local.year}"
    pdf.cell(block_w, 6, when, align="C", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_x(block_x)
    pdf.set_font("DejaVu", "B", 10)
    pdf.cell(block_w, 6, "Bác sĩ đọc kết quả", align="C", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(4)
    pdf.set_x(block_x)
    pdf.set_font("DejaVu", "", 9)
    signed = f"Đã ký số: {doc.signer}" if doc.signer else "Chưa ký số"
    pdf.multi_cell(block_w, 5, signed, align="C", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(2)
    pdf.set_x(block_x)
    pdf.set_font("DejaVu", "B", 10)
    pdf.cell(block_w, 6, person_name(doc.author_name), align="C", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    if doc.author_code:
        pdf.set_x(block_x)
        pdf.set_font("DejaVu", "", 9)
        pdf.cell(block_w, 5, f"Mã bác sĩ: {doc.author_code}", align="C", new_x=XPos.LMARGIN, new_y=YPos.NEXT)

    # Identification of what was signed.
    pdf.ln(6)
    pdf.set_font("DejaVu", "", 7)
    pdf.set_text_color(90, 90, 90)
    lines = [f"Study Instance UID: {doc.study_instance_uid}"]
    if doc.content_sha256:
        lines.append(f"Mã kiểm tra nội dung (SHA-256): {doc.content_sha256}")
    for line in lines:
        pdf.multi_cell(width, 3.5, line, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    return bytes(pdf.output())
