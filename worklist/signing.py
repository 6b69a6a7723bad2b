"""Signing reports with an X.509 certificate and key (PKCS#12), and verifying what was signed.

Two signatures cover each FINAL or AMENDED report version:

- a detached CMS (PKCS#7) SignedData, DER, over the version's canonical bytes (`canonical_bytes`): UTF-8 JSON with
  sorted keys and no insignificant whitespace. Anyone can check it with
  `openssl cms -verify -binary -inform DER -in sig.der -content canonical.json -CAfile ca.pem`;
- the report's PDF signed PAdES baseline B-B with pyHanko (an invisible signature over the whole file).

The key comes from `VNPACS_SIGNING_P12` (and `VNPACS_SIGNING_P12_PASSWORD`). Without it, a development certificate
(a self-signed development CA and a signer certificate it issued) is created in `DATA_DIR/signing` on first use, and
every verification of a signature it made says "self-signed, development only".

Verification checks the CMS signature against the stored canonical bytes, the PDF signature, the certificate chain
to the trust roots in `VNPACS_SIGNING_TRUST_ROOTS` (a PEM bundle; the development CA in development mode) and, when
`VNPACS_SIGNING_REVOCATION` is not `off`, revocation by OCSP/CRL fetched from the addresses in the certificates.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from asn1crypto import cms as asn1_cms
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7, pkcs12
from cryptography.x509.oid import NameOID

REVOCATION_MODES = ("off", "soft-fail", "hard-fail", "require")
DEVELOPMENT_NOTE = "self-signed, development only: set VNPACS_SIGNING_P12 to a real certificate"
DEVELOPMENT_P12 = "development-signer.p12"
DEVELOPMENT_CA = "development-ca.pem"
DEVELOPMENT_ORGANIZATION = "vnpacs development"


class SigningUnavailable(RuntimeError):
    """Reports cannot be signed now (no usable key, certificate not trusted or revoked); `str()` says why."""


@dataclass(frozen=True)
class SigningConfig:
    """What signing needs from the settings (worklist does not import pacs)."""

    p12: Path | None
    password: str = ""
    trust_roots: Path | None = None
    revocation: str = "off"
    development_dir: Path | None = None  # where the development certificate lives when p12 is None

    def __post_init__(self) -> None:
        if self.revocation not in REVOCATION_MODES:
            raise ValueError(f"signing revocation mode must be one of {', '.join(REVOCATION_MODES)}")


@dataclass
class SigningKey:
    """A loaded signing certificate and key, in the forms `cryptography` and pyHanko each want."""

    key: Any
    certificate: x509.Certificate
    chain: list[x509.Certificate]
    p12: bytes
    password: bytes | None
    development: bool
    trust_roots: list[x509.Certificate] = field(default_factory=list)

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()

    @property
    def common_name(self) -> str:
        names = self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else self.subject


# ---- canonical form ---------------------------------------------------------------------------------------------


def canonical_bytes(content: dict[str, Any]) -> bytes:
    """The bytes a CMS signature covers: UTF-8 JSON, keys sorted, no spaces, non-ASCII kept as UTF-8 (NFC text)."""
    return json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


def utc_text(moment: dt.datetime) -> str:
    """A timestamp as the canonical form writes it: UTC, whole seconds, `Z` (naive values are taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- keys ---------------------------------------------------------------------------------------------------------


def _load_pem_bundle(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningUnavailable(f"cannot read the signing trust roots {path}: {exc.strerror}") from exc
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise SigningUnavailable(f"{path} is not a PEM bundle of certificates") from exc
    return certs


def trust_roots(config: SigningConfig) -> list[x509.Certificate]:
    """The configured trust roots (empty when none are configured and not in development mode)."""
    roots = _load_pem_bundle(config.trust_roots) if config.trust_roots else []
    if config.p12 is None and config.development_dir is not None:
        ca = config.development_dir / DEVELOPMENT_CA
        if ca.exists():
            roots += _load_pem_bundle(ca)
    return roots


def load_signing_key(config: SigningConfig) -> SigningKey:
    """The configured PKCS#12, or the development one (created on first use); SigningUnavailable if unusable."""
    development = config.p12 is None
    if development:
        if config.development_dir is None:
            raise SigningUnavailable("no signing certificate configured: set VNPACS_SIGNING_P12")
        path = ensure_development_p12(config.development_dir)
        password: bytes | None = None
    else:
        assert config.p12 is not None
        path = config.p12
        password = config.password.encode() if config.password else None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningUnavailable(f"cannot read the signing PKCS#12 {path}: {exc.strerror}") from exc
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(data, password)
    except ValueError as exc:
        raise SigningUnavailable(f"cannot open the signing PKCS#12 {path}: wrong password or not PKCS#12") from exc
    if key is None or cert is None:
        raise SigningUnavailable(f"the signing PKCS#12 {path} holds no private key and certificate")
    if not isinstance(key, rsa.RSAPrivateKey) and not hasattr(key, "curve"):
        raise SigningUnavailable(f"the signing key in {path} must be RSA or EC")
    return SigningKey(
        key=key,
        certificate=cert,
        chain=list(extra),
        p12=data,
        password=password,
        development=development,
        trust_roots=trust_roots(config),
    )


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "VN"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEVELOPMENT_ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fp:
        fp.write(data)
        fp.flush()
        os.fsync(fp.fileno())
    os.replace(tmp, path)


def ensure_development_p12(folder: Path) -> Path:
    """A development CA and signer certificate in `folder` (created once, kept): never for clinical use."""
    p12_path = folder / DEVELOPMENT_P12
    with _locked(folder):
        if p12_path.exists():
            return p12_path
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ca_name = _name("vnpacs development CA (not for clinical use)")
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("vnpacs development signer (not for clinical use)"))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1825))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, True, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        p12 = pkcs12.serialize_key_and_certificates(
            b"vnpacs-development", key, cert, [ca], serialization.NoEncryption()
        )
        _write_atomic(folder / DEVELOPMENT_CA, ca.public_bytes(serialization.Encoding.PEM))
        _write_atomic(p12_path, p12)
    return p12_path


# ---- signing ------------------------------------------------------------------------------------------------------


def sign_cms(key: SigningKey, data: bytes) -> bytes:
    """A detached CMS SignedData (DER) over `data`, SHA-256, carrying the signer's certificate and its chain."""
    builder = pkcs7.PKCS7SignatureBuilder().set_data(data).add_signer(key.certificate, key.key, hashes.SHA256())
    for cert in key.chain:
        builder = builder.add_certificate(cert)
    options = [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary]
    return builder.sign(serialization.Encoding.DER, options)


def sign_pdf(key: SigningKey, pdf: bytes, *, reason: str, location: str = "", name: str = "") -> bytes:
    """`pdf` signed PAdES baseline B-B (ETSI.CAdES.detached, SHA-256) by `key`, as an incremental update."""
    from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
    from pyhanko.sign import fields, signers

    signer = signers.SimpleSigner.load_pkcs12_data(key.p12, other_certs=[], passphrase=key.password)
    meta = signers.PdfSignatureMetadata(
        field_name="ChuKySo",
        md_algorithm="sha256",
        subfilter=fields.SigSeedSubFilter.PADES,
        reason=reason,
        location=location or None,
        name=name or None,
    )
    writer = IncrementalPdfFileWriter(BytesIO(pdf), strict=False)
    out = BytesIO()
    signers.PdfSigner(meta, signer=signer).sign_pdf(writer, output=out)
    return out.getvalue()


def _asn1(cert: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))


def _validation_context(config: SigningConfig, roots: list[x509.Certificate], others: list[x509.Certificate]) -> Any:
    from pyhanko_certvalidator import ValidationContext

    checking = config.revocation != "off"
    return ValidationContext(
        trust_roots=[_asn1(c) for c in roots],  # an empty list: never the operating system's TLS roots
        other_certs=[_asn1(c) for c in others],
        allow_fetching=checking,
        revocation_mode=config.revocation if checking else "soft-fail",
    )


def check_signing_key(key: SigningKey, config: SigningConfig) -> None:
    """Before signing: the certificate is within its validity and, when trust roots (and revocation) are
    configured, chains to them and is not revoked. SigningUnavailable says what is wrong."""
    now = dt.datetime.now(dt.UTC)
    if not key.certificate.not_valid_before_utc <= now <= key.certificate.not_valid_after_utc:
        raise SigningUnavailable(
            f"the signing certificate {key.subject} is not valid now "
            f"({key.certificate.not_valid_before_utc:%Y-%m-%d} to {key.certificate.not_valid_after_utc:%Y-%m-%d})"
        )
    if not key.trust_roots:
        return
    from pyhanko_certvalidator import CertificateValidator
    from pyhanko_certvalidator.errors import PathBuildingError, PathValidationError, RevokedError

    context = _validation_context(config, key.trust_roots, key.chain)
    validator = CertificateValidator(_asn1(key.certificate), [_asn1(c) for c in key.chain], context)

    async def run() -> None:
        try:
            await validator.async_validate_usage({"non_repudiation"})
        finally:
            await context.aclose()

    try:
        asyncio.run(run())
    except RevokedError as exc:
        raise SigningUnavailable(f"the signing certificate {key.subject} is revoked: {exc}") from exc
    except (PathBuildingError, PathValidationError) as exc:
        raise SigningUnavailable(f"the signing certificate {key.subject} is not trusted: {exc}") from exc
    except Exception as exc:  # key usage and other certvalidator errors
        raise SigningUnavailable(f"the signing certificate {key.subject} cannot sign reports: {exc}") from exc


# ---- verification -------------------------------------------------------------------------------------------------


def _problem(status: Any) -> str:
    indic = getattr(status, "trust_problem_indic", None)
    if getattr(status, "revoked", False):
        details = status.revocation_details
        when = f" on {details.revocation_date:%Y-%m-%d %H:%M}Z" if details and details.revocation_date else ""
        return f"certificate revoked{when}"
    if indic is not None:
        return str(getattr(indic, "name", indic))
    return ""


def _path_text(status: Any) -> str:
    path = getattr(status, "validation_path", None)
    if path is None:
        return ""
    try:
        return " → ".join(c.subject.human_friendly for c in path.iter_certs(include_root=True))
    except Exception:
        return ""


def _is_development(cert: asn1_x509.Certificate) -> bool:
    return bool(cert.subject.native.get("organization_name") == DEVELOPMENT_ORGANIZATION)


async def _verify(
    config: SigningConfig,
    roots: list[x509.Certificate],
    canonical: bytes,
    cms_der: bytes,
    pdf: bytes,
) -> dict[str, Any]:
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation import (
        SignatureCoverageLevel,
        async_validate_detached_cms,
        async_validate_pdf_signature,
    )

    context = _validation_context(config, roots, [])
    result: dict[str, Any] = {}
    cms_status = None
    try:
        try:
            info = asn1_cms.ContentInfo.load(cms_der)
            signed_data = info["content"]
            cms_status = await async_validate_detached_cms(canonical, signed_data, signer_validation_context=context)
            result["cms"] = {
                "intact": bool(cms_status.intact),
                "valid": bool(cms_status.intact and cms_status.valid),
                "signer": cms_status.signing_cert.subject.human_friendly,
                "detail": "" if cms_status.intact and cms_status.valid else "signature does not match the content",
            }
        except Exception as exc:
            result["cms"] = {"intact": False, "valid": False, "signer": "", "detail": f"unreadable CMS: {exc}"}
        pdf_status = None
        try:
            reader = PdfFileReader(BytesIO(pdf), strict=False)
            signatures = reader.embedded_signatures
            if len(signatures) != 1:
                raise ValueError(f"{len(signatures)} signatures in the PDF, expected 1")
            pdf_status = await async_validate_pdf_signature(signatures[0], signer_validation_context=context)
            whole = pdf_status.coverage == SignatureCoverageLevel.ENTIRE_FILE
            ok = bool(pdf_status.intact and pdf_status.valid and whole)
            result["pdf"] = {
                "intact": bool(pdf_status.intact),
                "valid": ok,
                "signer": pdf_status.signing_cert.subject.human_friendly,
                "coverage": pdf_status.coverage.name if pdf_status.coverage else "",
                "detail": ""
                if ok
                else ("the signature does not cover the whole file" if not whole else "signature does not match"),
            }
        except Exception as exc:
            result["pdf"] = {"intact": False, "valid": False, "signer": "", "coverage": "", "detail": str(exc)}
    finally:
        await context.aclose()

    # The chain and revocation, judged on the CMS signature (the PDF's signer must be the same certificate).
    status = cms_status if cms_status is not None else pdf_status
    checking = config.revocation != "off"
    if status is None:
        result["chain"] = {"checked": False, "trusted": False, "path": "", "detail": "no readable signature"}
    elif not roots:
        result["chain"] = {
            "checked": False,
            "trusted": False,
            "path": "",
            "detail": "not checked: no trust roots configured (VNPACS_SIGNING_TRUST_ROOTS)",
        }
    else:
        # The chain on its own (a content mismatch is reported by cms/pdf, not as a trust problem).
        trusted = status.validation_path is not None and status.trust_problem_indic is None and not status.revoked
        result["chain"] = {
            "checked": True,
            "trusted": trusted,
            "path": _path_text(status),
            "detail": "" if trusted else (_problem(status) or "no path to a configured trust root"),
        }
    if not checking:
        result["revocation"] = {"checked": False, "mode": "off", "status": "not checked", "detail": ""}
    elif status is None or not roots:
        result["revocation"] = {
            "checked": False,
            "mode": config.revocation,
            "status": "not checked",
            "detail": "revocation is checked along a chain to the configured trust roots",
        }
    else:
        revoked = bool(status.revoked)
        state = "revoked" if revoked else ("good" if result["chain"]["trusted"] else "unknown")
        result["revocation"] = {
            "checked": True,
            "mode": config.revocation,
            "status": state,
            "detail": _problem(status) if state != "good" else "",
        }
    result["development"] = status is not None and _is_development(status.signing_cert)
    if (
        cms_status is not None
        and pdf_status is not None
        and cms_status.signing_cert.dump() != pdf_status.signing_cert.dump()
    ):
        result["pdf"]["valid"] = False
        result["pdf"]["detail"] = "the PDF was signed by another certificate than the CMS signature"
    return result


def verify(config: SigningConfig, *, canonical: bytes, cms_der: bytes, pdf: bytes) -> dict[str, Any]:
    """Check one signed version: CMS over `canonical`, PDF signature, chain, revocation. The `valid` key is the
    bottom line: both signatures intact, and trusted and not revoked wherever those were checked."""
    try:
        roots = trust_roots(config)
    except SigningUnavailable as exc:
        roots = []
        roots_error = str(exc)
    else:
        roots_error = ""
    result = asyncio.run(_verify(config, roots, canonical, cms_der, pdf))
    if roots_error:  # configured but unusable: nothing can be trusted
        result["chain"] = {"checked": True, "trusted": False, "path": "", "detail": roots_error}
    chain, revocation = result["chain"], result["revocation"]
    development = bool(result.pop("development", False))
    result["development"] = development
    notes = []
    if development:
        notes.append(DEVELOPMENT_NOTE)
    if not chain["checked"]:
        notes.append("certificate chain not checked")
    if not revocation["checked"]:
        notes.append("revocation not checked")
    result["notes"] = notes
    result["valid"] = bool(
        result["cms"]["valid"]
        and result["pdf"]["valid"]
        and (chain["trusted"] or not chain["checked"])
        and (revocation["status"] == "good" or not revocation["checked"])
    )
    return result
