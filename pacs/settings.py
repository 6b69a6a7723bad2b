"""Settings: one object, built once from VNPACS_* environment variables and an optional TOML file, handed in."""

from __future__ import annotations

import difflib
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic_settings
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VNPACS_", extra="ignore")

    data_dir: Path = Field(Path("./data"), description="Folder of the embedded default: index, blobs, temp files")
    database_url: str = Field("", description="SQLAlchemy URL; empty = SQLite index.db in the data dir (WAL)")
    storage_url: str = Field(
        "",
        description="Blob store: a folder / file:// URL (default data_dir/blobs) or "
        "s3://BUCKET?endpoint=HOST:PORT&secure=false",
    )
    s3_access_key: str = ""
    s3_secret_key: str = ""
    ae_title: str = "VNPACS"
    dicom_host: str = "127.0.0.1"
    dicom_port: int = 11112
    http_host: str = "127.0.0.1"
    http_port: int = 8042
    allowed_aes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Calling AE titles allowed; empty = any"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed to call the HTTP API from a browser; empty = none"
    )
    auth: Literal["none", "token"] = Field("none", description="HTTP authentication: none (embedded) or token (JWT)")
    jwt_secret: str = Field("", description="HS256 secret for tokens (token mode)")
    jwks_url: str = Field("", description="OIDC issuer's JWKS URL for RS/ES-signed tokens (token mode)")
    jwt_issuer: str = Field("", description="Required `iss` claim, if set")
    jwt_audience: str = Field("", description="Required `aud` claim, if set")
    viewer_dir: Path | None = Field(None, description="OHIF dist folder; default: the one `make viewer` installs")
    duplicate_policy: Literal["keep-first", "replace"] = "keep-first"
    max_pdu: int = Field(4 * 1024 * 1024, description="Maximum PDU size we receive (bytes)")
    max_associations: int = 32
    dimse_processes: int = Field(
        0,
        ge=0,
        le=64,
        description="Processes accepting DICOM associations on the one port: 0 = one per core (at most 4), "
        "1 = the serve process only",
    )
    max_find_results: int = Field(10000, description="C-FIND matches above this are refused (0xA700); 0 = no cap")
    log_level: str = "INFO"
    node_id: str = Field(default_factory=socket.gethostname, description="Names this node's ingest journal")
    # ---- RIS (worklist/) ----
    hl7_host: str = Field("127.0.0.1", description="Address of the HL7 v2 MLLP listener (orders, ADT from the HIS)")
    hl7_port: int = Field(2575, description="Port of the HL7 v2 MLLP listener; 0 = no listener")
    his_oru_url: str = Field("", description="Where final reports go as ORU^R01: mllp://HOST:PORT; empty = nowhere")
    ascii_aes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Calling AE titles that get worklist answers in ASCII (diacritics removed, đ→d)",
    )
    commitment_aes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Storage commitment reports on a new association: AET=HOST:PORT entries (else remote AEs)",
    )
    broker_url: str = Field(
        "", description="Celery broker for outbound messages; empty = SQLAlchemy transport over SQLite in the data dir"
    )
    outbound_worker: bool = Field(
        True, description="Run the HIS delivery worker in this process (false when `vnpacs worker` processes run)"
    )
    signing_p12: Path | None = Field(None, description="PKCS#12 file (certificate + key) reports are signed with")
    signing_p12_password: str = ""
    signing_trust_roots: Path | None = Field(
        None, description="PEM bundle of CA certificates report signatures must chain to; empty = chain not checked"
    )
    signing_revocation: Literal["off", "soft-fail", "hard-fail", "require"] = Field(
        "off", description="Check report signers by OCSP/CRL (fetched) at signing and verification; off = not checked"
    )
    facility_name: str = Field("", description="Hospital name printed at the top of reports")
    public_url: str = Field("", description="Base URL the QR code on reports points to; default http://HTTP_HOST:PORT")

    @field_validator("allowed_aes", "cors_origins", "ascii_aes", "commitment_aes", mode="before")
    @classmethod
    def _split_aes(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.replace(";", ",").split(",") if v.strip()]
        return value

    @field_validator("ae_title")
    @classmethod
    def _check_aet(cls, value: str) -> str:
        value = value.strip()
        if not value or len(value) > 16:
            raise ValueError("AE title must be 1 to 16 characters")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Explicit arguments (the TOML file's values) win over nothing; the environment wins over the file.
        return env_settings, init_settings

    # ---- derived ---------------------------------------------------------------------------------------------

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'index.db').resolve()}"

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or str((self.data_dir / "blobs").resolve())

    @property
    def tmp_dir(self) -> Path:
        return (self.data_dir / "tmp").resolve()


class SettingsError(ValueError):
    """A settings file that cannot be used as written (unknown keys, not TOML)."""


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
    return f"{name} (did you mean {close[0]}?)" if close else name


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """VNPACS_* variables that name no setting: a misspelt one would otherwise be ignored without a word.

    Names are matched without regard to case, as the settings read them."""
    known = [f"VNPACS_{name.upper()}" for name in Settings.model_fields]
    return sorted(
        _suggest(key, known) for key in environ if key.upper().startswith("VNPACS_") and key.upper() not in known
    )


def load_settings(config: Path | None = None) -> Settings:
    """Settings from the environment, on top of a TOML file's `[vnpacs]` table (or top-level keys) if given.

    A key in the file that names no setting is an error (SettingsError), not silently ignored."""
    values: dict[str, Any] = {}
    if config is not None:
        try:
            with open(config, "rb") as fp:
                data = tomllib.load(fp)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"{config}: {exc}") from exc
        values = data.get("vnpacs", data)
        if not isinstance(values, dict):
            raise SettingsError(f"{config}: [vnpacs] must be a table")
        known = list(Settings.model_fields)
        unknown = sorted(_suggest(str(key), known) for key in values if str(key).lower() not in known)
        if unknown:
            raise SettingsError(f"{config}: unknown setting(s): {', '.join(unknown)}")
        values = {str(key).lower(): value for key, value in values.items()}
    try:
        return Settings(**values)
    except pydantic_settings.SettingsError as exc:  # an environment value its source could not parse
        raise SettingsError(str(exc)) from exc
