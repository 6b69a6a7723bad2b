"""Vietnamese patient identifiers: CCCD (citizen identity card) and BHYT (health insurance card) numbers.

CCCD: 12 digits = 3-digit province code, a century/sex digit (0/1 → 1900s male/female, 2/3 → 2000s, 4/5 → 2100s, ...),
the last two digits of the birth year, and 6 random digits. BHYT card: 15 characters = 2-letter beneficiary group, a
benefit level digit (1-5), a 2-digit province code, and the 10-digit social insurance number.
"""

from __future__ import annotations

import re

# Province and city codes used by CCCD numbers (Circular 07/2016/TT-BCA, the 63 provinces before the 2025 merger,
# which keep their codes on cards already issued).
_PROVINCE_CODES = (
    "001 002 004 006 008 010 011 012 014 015 017 019 020 022 024 025 026 027 030 031 033 034 035 036 037 038 040 042 "
    "044 045 046 048 049 051 052 054 056 058 060 062 064 066 067 068 070 072 074 075 077 079 080 082 083 084 086 087 "
    "089 091 092 093 094 095 096 "
)
CCCD_PROVINCES = frozenset(_PROVINCE_CODES.split())
_BHYT = re.compile(r"^[A-Z]{2}[1-5]\d{2}\d{10}$")

# Identifier type codes (HL7 table 0203) used by the national FHIR draft guide and in PID-3.
TYPE_CCCD = "NI"
TYPE_BHYT = "SB"
TYPE_HOSPITAL = "PI"
ISSUER_CCCD = "BCA"  # Bộ Công an issues the CCCD
ISSUER_BHYT = "BHXH"  # Bảo hiểm xã hội Việt Nam issues the BHYT card


class IdentifierError(ValueError):
    """An identifier that cannot be right; the message says why (in English, for logs and ACKs)."""


def validate_cccd(value: str, *, birth_date: str = "", sex: str = "") -> str:
    """The CCCD number, stripped; raises IdentifierError if it is malformed or contradicts birth year or sex."""
    number = value.strip().replace(" ", "")
    if len(number) != 12 or not number.isdigit():
        raise IdentifierError(f"CCCD must be 12 digits, got {value!r}")
    if number[:3] not in CCCD_PROVINCES:
        raise IdentifierError(f"CCCD {number}: {number[:3]} is not a province code")
    code = int(number[3])
    century = 1900 + 100 * (code // 2)
    if century > 2100:
        raise IdentifierError(f"CCCD {number}: century digit {code} is out of range")
    year = century + int(number[4:6])
    if len(birth_date) >= 4 and birth_date[:4].isdigit() and int(birth_date[:4]) != year:
        raise IdentifierError(f"CCCD {number} encodes birth year {year}, the patient was born in {birth_date[:4]}")
    card_sex = "F" if code % 2 else "M"
    if sex.upper() in ("M", "F") and sex.upper() != card_sex:
        raise IdentifierError(f"CCCD {number} encodes sex {card_sex}, the patient's sex is {sex.upper()}")
    return number


def validate_bhyt(value: str) -> str:
    """The BHYT card number, upper-cased; raises IdentifierError if it is malformed."""
    number = value.strip().replace(" ", "").upper()
    if len(number) != 15:
        raise IdentifierError(f"BHYT card number must be 15 characters, got {value!r}")
    if not _BHYT.match(number):
        raise IdentifierError(
            f"BHYT card number {number} must be 2 letters, a benefit level 1-5, a 2-digit province and 10 digits"
        )
    if number[3:5] == "00":
        raise IdentifierError(f"BHYT card number {number}: 00 is not a province code")
    return number
