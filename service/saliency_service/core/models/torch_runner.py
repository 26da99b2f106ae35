"""Gradients through a `torch.export` program, loaded without executing code from the file.

The program's signature is `forward(x, probes) -> (logits, *activations)`: each declared layer's
output has a zero probe added and is also returned. The gradient of an objective with respect to a
probe is the gradient with respect to that layer's activation, and autograd walks only the head,
so no hooks are installed at request time and concurrent requests share one module safely.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

from saliency_service.core.errors import FailedPrecondition

# Tensors stored as raw bytes are safe; anything pickled could run code when loaded.
_SAFE_CONSTANT_PREFIX = "tensor_"


def vet_pt2_archive(path: Path) -> None:
    """Refuse a .pt2 archive that would make torch unpickle anything other than plain tensors."""
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith(("_weights_config.json", "_constants_config.json")):
                    config = json.loads(archive.read(name)).get("config", {})
                    for fqn, meta in config.items():
                        path_name = str(meta.get("path_name", ""))
                        if meta.get("use_pickle"):
                            raise FailedPrecondition(
                                "UNSAFE_MODEL_FILE", f"{path}: '{fqn}' is stored as a pickle; refusing to load it", {"path": str(path)}
                            )
                        if name.endswith("_constants_config.json") and not path_name.startswith(_SAFE_CONSTANT_PREFIX):
                            raise FailedPrecondition(
                                "UNSAFE_MODEL_FILE",
                                f"{path}: constant '{fqn}' is a custom object; refusing to load it",
                                {"path": str(path)},
                            )
                elif "/sample_inputs/" in name:
                    # torch falls back to a full unpickle when weights_only fails: make sure it cannot.
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
    except FailedPrecondition:
        raise
    except Exception as exc:
        raise FailedPrecondition("TORCH_LOAD_FAILED", f"{path} is not a valid torch export archive: {exc}", {"path": str(path)}) from None


class TorchRunner:
    """A frozen, probe-instrumented program: no parameter gradients, shared by all requests."""

    def __init__(self, path: Path, layer_shapes: Sequence[tuple[int, ...]], *, device: str = "cpu") -> None:
        vet_pt2_archive(path)
        try:
            program = torch.export.load(str(path))
            module = program.module()
        except Exception as exc:
            raise FailedPrecondition("TORCH_LOAD_FAILED", f"cannot load torch program {path}: {exc}", {"path": str(path)}) from None
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        self.module = module.to(device)
        self.device = device
        self.layer_shapes = [tuple(shape) for shape in layer_shapes]

    def zero_probes(self, batch: int) -> list[torch.Tensor]:
        return [torch.zeros((batch, *shape), device=self.device) for shape in self.layer_shapes]

    def forward(self, x: torch.Tensor, probes: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits, *activations = self.module(x, tuple(probes))
        return logits, list(activations)
