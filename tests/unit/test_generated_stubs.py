"""The committed stubs are exactly what scripts/generate_protos.py makes from protos/."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "clients" / "python"


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_protos.py"), str(tmp_path)], check=True, capture_output=True)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file() and p.suffix in {".py", ".pyi"})
    assert fresh, "the generator produced nothing"
    stale = [str(rel) for rel in fresh if not (COMMITTED / rel).exists() or (COMMITTED / rel).read_bytes() != (tmp_path / rel).read_bytes()]
    assert not stale, f"stale generated stubs {stale}: run `make protos` and commit the result"
    committed = sorted(p.relative_to(COMMITTED) for p in (COMMITTED / "saliency").rglob("*") if p.is_file() and p.suffix in {".py", ".pyi"})
    assert committed == fresh, "generated files were added or removed by hand"


def test_typed_stubs_exist_for_messages_and_service() -> None:
    for name in ("saliency_service_pb2.pyi", "saliency_service_pb2_grpc.pyi"):
        assert (COMMITTED / "saliency" / "v1" / name).is_file()
    assert importlib.util.find_spec("saliency.v1.saliency_service_pb2_grpc") is not None
