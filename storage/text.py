"""Vietnamese-aware text normalisation: NFC storage, accent-insensitive search keys, ASCII fallback."""

from __future__ import annotations

import unicodedata

# Unicode decomposition does not split đ/Đ into d + a combining mark, so it needs its own mapping.
_SPECIAL = str.maketrans({"đ": "d", "Đ": "D", "ð": "d", "Ð": "D"})


def nfc(value: str) -> str:
    """Precomposed Unicode (TCVN 6909:2001 asks for NFC)."""
    return unicodedata.normalize("NFC", value)


def strip_diacritics(value: str) -> str:
    """Remove Vietnamese (and other Latin) diacritics, mapping đ/Đ to d/D."""
    decomposed = unicodedata.normalize("NFD", value.translate(_SPECIAL))
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def search_key(value: str) -> str:
    """The key person names are matched on: no diacritics, case-folded, trailing spaces removed.

    "Nguyễn^Văn An" → "nguyen^van an", so a query for "nguyen*" or "NGUYEN^VAN AN" finds it.
    """
    return strip_diacritics(value).casefold().strip().rstrip("^= ")


def to_ascii(value: str) -> str:
    """Text for peers that cannot show UTF-8: diacritics removed, anything else non-ASCII replaced by '?'."""
    return strip_diacritics(value).encode("ascii", "replace").decode("ascii")


def is_ascii(value: str) -> bool:
    return value.isascii()
