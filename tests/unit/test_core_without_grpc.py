"""core/ never imports grpc or generated code: import it in a process where both are unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_core_imports_without_grpc() -> None:
    script = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"grpc", "grpc_status", "grpc_health", "grpc_reflection", "saliency"}:
                    raise ImportError(f"blocked: {name}")
                return None
        sys.meta_path.insert(0, Block())
        import saliency_service.core.engine, saliency_service.core.methods, saliency_service.core.metrics
        import saliency_service.core.verbalize, saliency_service.core.models.export
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {"grpc", "saliency"})
        assert not loaded, loaded
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
