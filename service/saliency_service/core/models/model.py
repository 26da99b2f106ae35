"""A loaded model: the seam through which every method and metric reaches the artifacts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saliency_service.core.errors import FailedPrecondition
from saliency_service.core.models.config import ModelConfig
from saliency_service.core.models.onnx_runner import OnnxRunner
from saliency_service.core.models.torch_runner import TorchRunner

PassObserver = Callable[[str, str, int], None]
"""Called as observer(model_name, "forward" | "backward", batch_size) after each pass."""


@dataclass(frozen=True)
class RuntimeOptions:
    max_batch: int = 256
    threads: int = 0
    prefer_cuda: bool = True


class LoadedModel:
    """ONNX for forward passes, the torch program for gradients; both give the same logits."""

    def __init__(
        self,
        config: ModelConfig,
        onnx: OnnxRunner,
        program: TorchRunner,
        observer: PassObserver | None = None,
        folder: Path | None = None,
    ) -> None:
        self.config = config
        self.onnx = onnx
        self.program = program
        self.folder = folder
        """The model's folder in the repository, where per-model method data (e.g. LP-CAM prototypes) lives."""
        self._observe = observer or (lambda model, kind, batch: None)

    @classmethod
    def load(cls, folder: Path, options: RuntimeOptions = RuntimeOptions(), observer: PassObserver | None = None) -> LoadedModel:
        config = ModelConfig.load(folder)
        for name in (config.onnx_file, config.torch_file):
            if not (folder / name).is_file():
                raise FailedPrecondition("MODEL_FILE_MISSING", f"{folder / name} does not exist", {"path": str(folder / name)})
        onnx = OnnxRunner(folder / config.onnx_file, max_batch=options.max_batch, threads=options.threads, prefer_cuda=options.prefer_cuda)
        program = TorchRunner(folder / config.torch_file, [layer.shape for layer in config.layers])
        model = cls(config, onnx, program, observer, folder)
        model.check_agreement()
        return model

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def max_batch(self) -> int:
        """Items per forward or backward pass; larger batches are split into chunks of this size."""
        return self.onnx.max_batch

    def check_agreement(self, batch: int = 2, seed: int = 0) -> float:
        """Run both artifacts on the same input; raise if logits or layer shapes disagree."""
        spec = self.config.input
        x = np.random.default_rng(seed).standard_normal((batch, spec.channels, spec.height, spec.width)).astype(np.float32)
        try:
            outputs = self.onnx.run(x, [self.config.onnx_logits_output, *(layer.onnx_output for layer in self.config.layers)])
            with torch.no_grad():
                torch_logits, activations = self.program.forward(torch.from_numpy(x), self.program.zero_probes(batch))
        except Exception as exc:
            raise FailedPrecondition(
                "MODEL_RUN_FAILED", f"model '{self.name}' failed on a test input: {exc}", {"model": self.name}
            ) from None
        onnx_logits = outputs[0]
        if onnx_logits.shape != (batch, self.config.num_classes):
            raise FailedPrecondition(
                "MODEL_OUTPUT_MISMATCH",
                f"model '{self.name}' returns logits of shape {onnx_logits.shape}, config has {self.config.num_classes} labels",
                {"model": self.name},
            )
        for layer, onnx_act, torch_act in zip(self.config.layers, outputs[1:], activations, strict=True):
            if onnx_act.shape[1:] != layer.shape or tuple(torch_act.shape[1:]) != layer.shape:
                raise FailedPrecondition(
                    "MODEL_OUTPUT_MISMATCH", f"layer '{layer.name}' shape differs from its config {layer.shape}", {"model": self.name}
                )
        difference = float(np.abs(onnx_logits - torch_logits.numpy()).max())
        if difference > self.config.logits_tolerance:
            raise FailedPrecondition(
                "ARTIFACTS_DISAGREE",
                f"model '{self.name}': ONNX and torch logits differ by {difference:.3g} (> {self.config.logits_tolerance})",
                {"model": self.name, "difference": difference},
            )
        return difference

    # ---- forward passes (onnxruntime) ----

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits for a normalised N x C x H x W batch."""
        (logits,) = self.onnx.run(x, [self.config.onnx_logits_output])
        self._observe(self.name, "forward", len(x))
        return logits

    def forward(self, x: np.ndarray, layers: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits and the activations of the named declared layers."""
        specs = [self.config.layer(name) for name in layers]
        logits, *activations = self.onnx.run(x, [self.config.onnx_logits_output, *(spec.onnx_output for spec in specs)])
        self._observe(self.name, "forward", len(x))
        return logits, {spec.name: act for spec, act in zip(specs, activations, strict=True)}

    # ---- gradients (torch program) ----

    def input_gradient(self, x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and d(sum_b sum_k weights[b,k] * logits[b,k]) / dx, in chunks of max_batch."""
        logits_parts, grad_parts = [], []
        step = self.max_batch
        for start in range(0, len(x), step):
            xs = x[start : start + step].detach().clone().requires_grad_(True)
            with torch.enable_grad():
                logits, _ = self.program.forward(xs, self.program.zero_probes(len(xs)))
                (grad,) = torch.autograd.grad((logits * weights[start : start + step]).sum(), xs)
            self._observe(self.name, "backward", len(xs))
            logits_parts.append(logits.detach())
            grad_parts.append(grad)
        return torch.cat(logits_parts), torch.cat(grad_parts)

    def layer_gradient(self, x: torch.Tensor, weights: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, the layer's activation, and the objective's gradient with respect to it."""
        index = self.config.layer(layer).probe_index
        logits_parts, act_parts, grad_parts = [], [], []
        step = self.max_batch
        for start in range(0, len(x), step):
            xs = x[start : start + step].detach()
            probes = self.program.zero_probes(len(xs))
            probes[index].requires_grad_(True)
            with torch.enable_grad():
                logits, activations = self.program.forward(xs, probes)
                (grad,) = torch.autograd.grad((logits * weights[start : start + step]).sum(), probes[index])
            self._observe(self.name, "backward", len(xs))
            logits_parts.append(logits.detach())
            act_parts.append(activations[index].detach())
            grad_parts.append(grad)
        return torch.cat(logits_parts), torch.cat(act_parts), torch.cat(grad_parts)

    def logits_with_delta(self, x: torch.Tensor, layer: str, delta: torch.Tensor) -> torch.Tensor:
        """Logits when `delta` (same shape as the layer's activation) is added to the layer's output.

        This is how perturbations at a layer (Ablation-CAM's zeroed channels) run without re-exporting:
        the program's probe for that layer carries the delta. No gradients; chunked by max_batch.
        """
        index = self.config.layer(layer).probe_index
        parts = []
        step = self.max_batch
        with torch.no_grad():
            for start in range(0, len(x), step):
                xs = x[start : start + step]
                probes = self.program.zero_probes(len(xs))
                probes[index] = delta[start : start + step].to(probes[index].dtype)
                logits, _ = self.program.forward(xs, probes)
                self._observe(self.name, "forward", len(xs))
                parts.append(logits)
        return torch.cat(parts)

    def run_onnx(self, x: np.ndarray, outputs: Sequence[str]) -> list[np.ndarray]:
        """The ONNX graph's named outputs as they are (no reshaping), for the Open Inference Protocol."""
        results = self.onnx.run(x, outputs)
        self._observe(self.name, "forward", len(x))
        return results
