"""Generate the Python stubs (pb2, pb2_grpc and their typed .pyi) from protos/ into a folder.

    python scripts/generate_protos.py [OUT]   # default: clients/python

The committed stubs are this script's output; tests/unit/test_generated_stubs.py fails when they are stale.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def _plugin(name: str) -> str:
    """mypy-protobuf's plugins live next to this interpreter, which need not be on PATH."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise SystemExit(f"{path} is missing: install the dev extra (mypy-protobuf)")
    return str(path)


def generate(out: Path) -> list[Path]:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    out.mkdir(parents=True, exist_ok=True)
    code = protoc.main(
        [
            "protoc",
            f"-I{PROTOS}",
            f"-I{well_known}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            *sources,
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    # Each folder of generated code is a package (saliency/, saliency/v1/).
    for source in sources:
        for folder in Path(source).parents:
            if folder != Path("."):
                init = out / folder / "__init__.py"
                if not init.exists():
                    init.write_text("")
    return sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in {".py", ".pyi"})


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "clients" / "python"
    for path in generate(target):
        print(path.relative_to(target))
