"""Shared pieces of the reliability suite: the mode (CI or full), the summary it prints, and the error invariant."""

from __future__ import annotations

import os
import shutil
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from saliency_service.config import EMBEDDED_REPOSITORY

FULL = os.environ.get("RELIABILITY_FULL", "") not in ("", "0")
"""RELIABILITY_FULL=1: the full bounds (10,000 fuzzed requests, 60 s of load); otherwise the short CI run."""

# Statuses no request may ever get, whatever it holds.
FORBIDDEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


@dataclass
class Summary:
    """What the suite measured, printed at the end of the run (pytest's terminal summary)."""

    fuzz_codes: Counter[str] = field(default_factory=Counter)
    fuzz_by_rpc: Counter[str] = field(default_factory=Counter)
    fuzz_reasons: Counter[str] = field(default_factory=Counter)
    fuzz_violations: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, line: str) -> None:
        with self.lock:
            self.lines.append(line)

    def render(self) -> list[str]:
        out = [f"reliability suite, {'FULL' if FULL else 'CI'} mode"]
        total = sum(self.fuzz_codes.values())
        if total:
            out.append(f"fuzz: {total} malformed/random requests; violations (INTERNAL/UNKNOWN/no ErrorInfo): {len(self.fuzz_violations)}")
            out.append("  by rpc:    " + ", ".join(f"{k} {v}" for k, v in sorted(self.fuzz_by_rpc.items())))
            out.append("  by status: " + ", ".join(f"{k} {v}" for k, v in self.fuzz_codes.most_common()))
            out.append("  top reasons: " + ", ".join(f"{k} {v}" for k, v in self.fuzz_reasons.most_common(12)))
            out.extend(f"  VIOLATION {v}" for v in self.fuzz_violations[:20])
        out.extend(self.lines)
        out.extend(COVERED_ELSEWHERE)
        return out


COVERED_ELSEWHERE = [
    "covered elsewhere (run by `make test`, not repeated here):",
    "  truncated ONNX -> NOT READY, per-model health, ModelReady: tests/api/test_rpcs.py, test_oip.py, test_health_reflection_metrics.py",
    "  workers + max_queue full -> RESOURCE_EXHAUSTED SERVER_BUSY at once; Explain deadline; compute cap: tests/api/test_limits.py",
    "  one long request drained on SIGTERM (NOT_SERVING, new calls SHUTTING_DOWN), exit 0: tests/e2e/test_serve_process.py",
    "  bad TLS / token settings refused at start: tests/api/test_security.py; bad input per field: tests/api/test_bad_input.py",
]

SUMMARY = Summary()


def error_reason(error: grpc.RpcError) -> str:
    """The ErrorInfo reason the server attached to a failed call ('' when there is none)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


def make_repository(root: Path) -> Path:
    """`shapes`, plus `broken` (truncated ONNX) and `headless` (no model.pt2): two models that must be NOT READY."""
    shutil.copytree(EMBEDDED_REPOSITORY / "shapes", root / "shapes")
    for name in ("broken", "headless"):
        folder = root / name
        shutil.copytree(EMBEDDED_REPOSITORY / "shapes", folder)
        config = folder / "config.json"
        config.write_text(config.read_text().replace('"name": "shapes"', f'"name": "{name}"'))
    (root / "broken" / "model.onnx").write_bytes(b"truncated")
    (root / "headless" / "model.pt2").unlink()
    return root
