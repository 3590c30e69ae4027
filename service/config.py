"""Service settings from `AEGIS_*` environment variables (pydantic-settings); never read at import time.

`create_app(settings)` takes a `Settings` so that tests never touch the process environment. Environment variables:

    AEGIS_BUNDLE_DIR                 bundle folder (default: the embedded bundle at models/default)
    AEGIS_DEVICE                     cpu | cuda (ONNX Runtime execution provider)
    AEGIS_ON_MISSING_CUDA            fail | warn: what a service configured for cuda does when only CPU is available
    AEGIS_WORKERS                    server processes on this host, each with its own ONNX Runtime session
                                     (service/workers.py; keep workers x intra-op threads <= cores)
    AEGIS_INTRA_OP_THREADS           ONNX Runtime intra-op threads (0 = ONNX Runtime's default, all cores)
    AEGIS_PREPROCESS_THREADS         threads that decode and Cushion requests (0 = the CPU count)
    AEGIS_MAX_BATCH_SIZE             largest micro-batch sent to ONNX Runtime in one call
    AEGIS_MAX_BATCH_WAIT_SECONDS     how long the first request of a batch waits for company
    AEGIS_BATCH_SHAPES               auto | exact | buckets | max: pad micro-batches to few shapes (auto: max on CUDA)
    AEGIS_CUDNN_CONV_ALGO_SEARCH     HEURISTIC | EXHAUSTIVE | DEFAULT (the CUDA provider's option)
    AEGIS_MAX_QUEUE                  requests waiting for a batch before new ones get 503 + Retry-After
    AEGIS_REQUEST_TIMEOUT_SECONDS    per-request budget from the first byte; 503 + Retry-After when it runs out
    AEGIS_MAX_UPLOAD_BYTES           request body limit (413), sized for real DICOM files
    AEGIS_MAX_PIXELS                 decoded PNG/JPEG limit (413): the decompression-bomb guard, sized to the model
    AEGIS_MAX_DICOM_PIXELS           decoded DICOM limit (413): the largest detectors of the modality
    AEGIS_MAX_INFLIGHT_UPLOADS       requests reading their body at once; beyond: 503 + Retry-After
    AEGIS_MAX_INFLIGHT_DECODES       images waiting for or in decode + Cushion; beyond: 503 + Retry-After
    AEGIS_HTTP                       httptools (default, C parser) | h11 (pure Python); both bound head size and time
    AEGIS_MAX_HEADER_BYTES           request head limit (h11; 400 beyond)
    AEGIS_MAX_HEADER_COUNT           header lines per request (431 beyond)
    AEGIS_HEADER_TIMEOUT_SECONDS     a connection must deliver a complete request head within this (h11; then closed)
    AEGIS_KEEP_ALIVE_SECONDS         idle keep-alive connections are closed after this
    AEGIS_MAX_CONNECTIONS            open connections (and tasks) beyond which uvicorn answers 503
    AEGIS_API_KEYS                   comma-separated API keys (or a JSON list); each `KEY` or `KEY SCOPE`
    AEGIS_API_KEYS_FILE              a file with one API key per line, `KEY` or `KEY SCOPE` (# comments allowed)
    AEGIS_API_KEY_MIN_LENGTH         shorter keys refuse the start
    AEGIS_AUTH_DISABLED              true to serve without API keys (local use only; must be explicit; refused while
                                     keys are configured)
    AEGIS_DEFAULT_SCOPE              full | coarse: the answer of a key without a scope (and of every caller when auth
                                     is disabled); coarse = diagnosis and decision only, no scores
    AEGIS_AUTH_FAILURE_LIMIT, AEGIS_AUTH_FAILURE_WINDOW_SECONDS
                                     failed authentications per client address and window; beyond: 429 + Retry-After
    AEGIS_METRICS_ACCESS             key | open: /metrics on the API port behind an API key, or open
    AEGIS_METRICS_PORT               > 0: serve /metrics only on this port (no key), on AEGIS_METRICS_HOST
    AEGIS_DOCS_ACCESS                key | open | off: /docs, /redoc and /openapi.json
    AEGIS_BUNDLE_PUBLIC_KEY_FILE     Ed25519 public key (PEM): the bundle must carry a valid signature to start
    AEGIS_BUNDLE_SIGNATURE_FILE      the detached signature (default: bundle.sig in the bundle folder)
    AEGIS_DRAIN_SECONDS              after SIGTERM: seconds /readyz answers 503 while traffic still flows
    AEGIS_LOG_LEVEL                  DEBUG | INFO | WARNING | ERROR
    AEGIS_DICOMWEB_MAX_INSTANCES     most DICOM instances in one STOW-RS request (POST /v1/studies)
    AEGIS_DICOM_AE_TITLE             the DICOM node's AE title (python -m service.dicom_node)
    AEGIS_DICOM_HOST, AEGIS_DICOM_PORT
                                     where the node listens (default 0.0.0.0:11112)
    AEGIS_DICOM_ALLOWED_CALLING_AETS comma-separated AE titles allowed to associate (or a JSON list)
    AEGIS_DICOM_ALLOW_ANY_CALLING_AET
                                     true to accept any calling AE title (must be explicit, like AEGIS_AUTH_DISABLED)
    AEGIS_DICOM_METRICS_PORT         the node's Prometheus /metrics port (0 = none)
    AEGIS_RECORD_URL                 decision record database: sqlite:///FILE (default ./aegis-records.sqlite)
                                     or postgresql+psycopg://USER@HOST:PORT/DB (service/record/store.py)
    AEGIS_RECORD_PASSWORD_FILE       a file with the database password (a mounted secret), kept out of the URL
    AEGIS_RECORD_MIGRATE             true: upgrade the record's schema at start-up; false: refuse an old schema
    AEGIS_RECORD_RETENTION_DAYS      delete decisions older than this many days (0 = keep them all)
    AEGIS_RECORD_ENABLED             false: record nothing (benchmarks only)
    AEGIS_RECORD_QUEUE_SIZE, AEGIS_RECORD_BATCH_SIZE, AEGIS_RECORD_FLUSH_SECONDS, AEGIS_RECORD_RETENTION_CHECK_SECONDS
                                     the writer off the request path (service/record/writer.py)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1 << 20
DEFAULT_RECORD_URL = "sqlite:///aegis-records.sqlite"  # relative: next to where the service is started
Scope = Literal["full", "coarse"]
SCOPES: tuple[str, ...] = ("full", "coarse")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AEGIS_", extra="ignore", env_ignore_empty=True, frozen=True)

    bundle_dir: Path | None = Field(None, description="bundle folder; None = the embedded default bundle")
    device: Literal["cpu", "cuda"] = "cpu"
    on_missing_cuda: Literal["fail", "warn"] = Field(
        "fail", description="device=cuda but only the CPU provider is available: refuse to start, or warn and use CPU")
    workers: int = Field(1, ge=1, le=64, description="server processes (python -m service --workers N)")
    intra_op_threads: int = Field(0, ge=0, le=256)
    preprocess_threads: int = Field(0, ge=0, le=256, description="decode + Cushion threads (0 = CPU count)")

    max_batch_size: int = Field(32, ge=1, le=1024)
    max_batch_wait_seconds: float = Field(0.002, ge=0.0, le=1.0)
    batch_shapes: Literal["auto", "exact", "buckets", "max"] = Field(
        "auto", description="batch sizes ONNX Runtime sees (padding): auto = max on CUDA, exact on CPU")
    cudnn_conv_algo_search: Literal["HEURISTIC", "EXHAUSTIVE", "DEFAULT"] = "HEURISTIC"
    max_queue: int = Field(512, ge=1)
    request_timeout_seconds: float = Field(30.0, gt=0.0)
    retry_after_seconds: int = Field(1, ge=1, description="Retry-After sent with 503 overload answers")

    max_upload_bytes: int = Field(64 * MiB, ge=1024, description="a chest CR/DX DICOM is typically 5-30 MiB")
    # a 64-224 px model needs no more than a 4096 x 4096 photo or export; DICOM detectors reach ~4300 x 4300 (CR/DX)
    # and 4096 x 5120 (mammography). Both bound the memory of one decode (docs/security.md, "Memory per request").
    max_pixels: int = Field(4096 * 4096, ge=1, description="width x height of a decoded PNG or JPEG")
    max_dicom_pixels: int = Field(6000 * 6000, ge=1, description="rows x columns (x frames) of a DICOM image")
    max_inflight_uploads: int = Field(128, ge=1, description="requests reading their body at once")
    max_inflight_decodes: int = Field(64, ge=1, description="images waiting for or in decode + Cushion (their bytes)")

    http: Literal["h11", "httptools"] = Field(
        "httptools", description="the HTTP/1.1 parser: httptools (llhttp, C; ~0.2 ms less CPU per request, "
                                 "docs/benchmark.md) or h11 (pure Python); both bound the head's size and time")
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1 * MiB)
    max_header_count: int = Field(100, ge=8, le=10_000)
    header_timeout_seconds: float = Field(10.0, gt=0.0, le=600.0)
    keep_alive_seconds: int = Field(5, ge=1, le=600)
    max_connections: int = Field(1024, ge=1)

    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    api_keys_file: Path | None = None
    api_key_min_length: int = Field(16, ge=1)
    auth_disabled: bool = False
    default_scope: Scope = Field("full", description="answer detail for keys without a scope (and without auth)")
    auth_failure_limit: int = Field(10, ge=1, description="failed authentications per client and window")
    auth_failure_window_seconds: int = Field(60, ge=1)
    metrics_access: Literal["key", "open"] = "key"
    metrics_port: int = Field(0, ge=0, le=65535, description="> 0: /metrics only on this port, without a key")
    metrics_host: str = "127.0.0.1"
    docs_access: Literal["key", "open", "off"] = "key"

    bundle_public_key_file: Path | None = None
    bundle_signature_file: Path | None = None

    drain_seconds: float = Field(0.0, ge=0.0, le=600.0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    dicomweb_max_instances: int = Field(256, ge=1, description="DICOM instances in one STOW-RS request")
    dicom_ae_title: str = Field("AEGIS", min_length=1, max_length=16, pattern=r"^[\x20-\x5b\x5d-\x7e]*[^ ]$")
    dicom_host: str = "0.0.0.0"
    dicom_port: int = Field(11112, ge=0, le=65535, description="0 = any free port (tests)")
    dicom_allowed_calling_aets: Annotated[tuple[str, ...], NoDecode] = ()
    dicom_allow_any_calling_aet: bool = False
    dicom_metrics_port: int = Field(0, ge=0, le=65535)

    record_enabled: bool = True
    record_url: str = Field(DEFAULT_RECORD_URL, min_length=1)
    record_password_file: Path | None = None
    record_migrate: bool = True
    record_retention_days: float = Field(0.0, ge=0.0, description="0 = keep every decision")
    record_retention_check_seconds: float = Field(3600.0, gt=0.0)
    record_queue_size: int = Field(10_000, ge=1, description="decisions waiting for the writer; beyond: counted lost")
    record_batch_size: int = Field(256, ge=1)
    record_flush_seconds: float = Field(0.2, ge=0.0, le=60.0)

    @field_validator("api_keys", "dicom_allowed_calling_aets", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return tuple(json.loads(text))
            return tuple(k.strip() for k in text.split(",") if k.strip())
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value):
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _auth_is_explicit(self) -> Settings:
        if self.auth_disabled and (self.api_keys or self.api_keys_file is not None):
            raise ValueError("AEGIS_AUTH_DISABLED=true while API keys are configured (AEGIS_API_KEYS or "
                             "AEGIS_API_KEYS_FILE): remove one of the two; the service does not guess which you meant")
        if not self.auth_disabled and not self.api_keys and self.api_keys_file is None:
            raise ValueError("no API keys configured: set AEGIS_API_KEYS or AEGIS_API_KEYS_FILE, "
                             "or AEGIS_AUTH_DISABLED=true for local use without authentication")
        if self.api_keys_file is not None and not self.api_keys_file.is_file():
            raise ValueError(f"AEGIS_API_KEYS_FILE {self.api_keys_file} is not a file")
        if self.record_password_file is not None and not self.record_password_file.is_file():
            raise ValueError(f"AEGIS_RECORD_PASSWORD_FILE {self.record_password_file} is not a file")
        if self.bundle_public_key_file is not None and not self.bundle_public_key_file.is_file():
            raise ValueError(f"AEGIS_BUNDLE_PUBLIC_KEY_FILE {self.bundle_public_key_file} is not a file")
        if not self.auth_disabled and not self.scoped_api_keys():
            raise ValueError(f"AEGIS_API_KEYS_FILE {self.api_keys_file} holds no key and AEGIS_API_KEYS is empty")
        return self

    def scoped_api_keys(self) -> tuple[tuple[bytes, Scope], ...]:
        """Every accepted key (environment and file) with its scope, keys as bytes for `hmac.compare_digest`.
        Raises ValueError (never quoting a key) for a key that is too short, not printable ASCII, or whose scope is
        unknown. A UTF-8 byte order mark at the start of the file is dropped."""
        entries = [(f"AEGIS_API_KEYS entry {i + 1}", k.get_secret_value()) for i, k in enumerate(self.api_keys)]
        if self.api_keys_file is not None:
            text = self.api_keys_file.read_text(encoding="utf-8-sig")  # -sig: editors on Windows write a BOM
            entries += [(f"AEGIS_API_KEYS_FILE line {n}", line) for n, line in enumerate(text.splitlines(), 1)
                        if line.strip() and not line.strip().startswith("#")]
        return tuple(self._parse_key(where, entry) for where, entry in entries if entry.strip())

    def _parse_key(self, where: str, entry: str) -> tuple[bytes, Scope]:
        key, *rest = entry.split()
        if len(rest) > 1 or (rest and rest[0] not in SCOPES):
            raise ValueError(f"{where}: expected 'KEY' or 'KEY SCOPE' with SCOPE one of {', '.join(SCOPES)}")
        if not (key.isascii() and key.isprintable()):
            raise ValueError(f"{where}: an API key must be printable ASCII (a pasted character or encoding problem?)")
        if len(key) < self.api_key_min_length:
            raise ValueError(f"{where}: an API key must be at least {self.api_key_min_length} characters long "
                             "(generate one: python3 -c \"import secrets; print(secrets.token_urlsafe(32))\")")
        return key.encode("ascii"), (rest[0] if rest else self.default_scope)  # type: ignore[return-value]

    def all_api_keys(self) -> tuple[bytes, ...]:
        """Every accepted key, without its scope."""
        return tuple(key for key, _ in self.scoped_api_keys())
