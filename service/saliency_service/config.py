"""One typed Settings object, built once in main from flags > environment > file > defaults."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from saliency_service.core.errors import InvalidArgument

EMBEDDED_REPOSITORY = Path(__file__).resolve().parent / "model_repository"
ENV_PREFIX = "SALIENCY_"


@dataclass(frozen=True)
class Settings:
    """Every knob of the server. Environment: SALIENCY_<FIELD> (e.g. SALIENCY_PORT=50052)."""

    model_repository: Path = EMBEDDED_REPOSITORY
    host: str = "[::]"
    port: int = 50051
    metrics_port: int = 9090
    """0 disables the Prometheus endpoint."""
    workers: int = 2
    """Threads that run torch/onnxruntime work; the asyncio front never blocks on them."""
    torch_threads: int = 0
    """0: torch's default."""
    onnx_threads: int = 0
    """0: onnxruntime's default."""
    onnx_max_batch: int = 256
    """Items per forward or backward pass at most; lowered per model until a pass fits pass_memory_mb."""
    pass_memory_mb: int = 0
    """Memory one forward or backward pass may use, in MiB; 0: a quarter of what the process may use (its cgroup
    limit, else the machine's RAM), or of the GPU's. A batch larger than fits is split into passes that fit."""
    prefer_cuda: bool = True
    """onnxruntime on its CUDA provider when that loads, and the torch program on the same GPU when torch has CUDA."""
    float16: bool = False
    """Run the ONNX graphs in half precision (inputs and outputs stay float32; gradients stay float32 in torch)."""
    max_message_bytes: int = 32 * 1024 * 1024
    max_batch_images: int = 64
    max_image_pixels: int = 4096 * 4096
    grace_seconds: float = 20.0
    max_queue: int = 16
    """Requests that may wait for a worker; beyond workers + max_queue, RESOURCE_EXHAUSTED at once."""
    max_pass_items: int = 2_000_000
    """Items one request may send through the model (forward and backward); 0: no cap."""
    tls_cert_file: str = ""
    """PEM certificate chain; with tls_key_file, the port serves TLS only."""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    """PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS)."""
    auth_token_file: str = ""
    """File with accepted bearer tokens, one per line: when set, SaliencyService and the Open Inference
    Protocol require `authorization: Bearer <token>` (health and reflection stay open for probes)."""
    log_level: str = "INFO"
    log_format: str = "json"
    """"json" (one object per line) or "text"."""

    def __post_init__(self) -> None:
        """Refuse values the server cannot run with, naming the setting, before anything starts."""
        for name, low, high in _RANGES:
            value = getattr(self, name)
            if not low <= value <= high:
                bound = f">= {low}" if high == _NO_MAX else f"in {low}..{high}"
                raise InvalidArgument("INVALID_SETTINGS", f"setting '{name}' must be {bound}, got {value!r}", {"setting": name})
        if self.log_format not in ("json", "text"):
            raise InvalidArgument("INVALID_SETTINGS", f"setting 'log_format' must be 'json' or 'text', got {self.log_format!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise InvalidArgument(
                "INVALID_SETTINGS", f"setting 'log_level' must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {self.log_level!r}"
            )

    @classmethod
    def load(cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None, file: Path | None = None) -> Settings:
        """Merge the sources; later sources win: defaults < file (TOML) < environment < flags."""
        values: dict[str, Any] = {}
        if file is not None:
            try:
                values.update(tomllib.loads(Path(file).read_text()))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise InvalidArgument("INVALID_SETTINGS", f"cannot read settings file {file}: {exc}") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidArgument("INVALID_SETTINGS", f"unknown settings {unknown} in {file}; known: {sorted(known)}")
        for name in known:
            raw = (env or {}).get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = raw
        values.update({k: v for k, v in (flags or {}).items() if v is not None})
        return cls(**{name: _coerce(name, value) for name, value in values.items()})


_NO_MAX = float("inf")
_RANGES: tuple[tuple[str, float, float], ...] = (
    ("port", 0, 65535),
    ("metrics_port", 0, 65535),
    ("workers", 1, _NO_MAX),
    ("torch_threads", 0, _NO_MAX),
    ("onnx_threads", 0, _NO_MAX),
    ("onnx_max_batch", 1, _NO_MAX),
    ("pass_memory_mb", 0, _NO_MAX),
    ("max_message_bytes", 1, _NO_MAX),
    ("max_batch_images", 1, _NO_MAX),
    ("max_image_pixels", 1, _NO_MAX),
    ("grace_seconds", 0, _NO_MAX),
    ("max_queue", 0, _NO_MAX),
    ("max_pass_items", 0, _NO_MAX),
)


def _coerce(name: str, value: Any) -> Any:
    kind = {f.name: f.type for f in dataclasses.fields(Settings)}[name]
    try:
        if kind == "Path":
            return Path(value)
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in {"1", "0", "true", "false", "yes", "no"}:
                    raise ValueError(value)
                return value.lower() in {"1", "true", "yes"}
            return bool(value)
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise InvalidArgument("INVALID_SETTINGS", f"setting '{name}' must be {kind}, got {value!r}") from None
