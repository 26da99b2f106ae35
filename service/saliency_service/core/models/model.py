"""A loaded model: the seam through which every method and metric reaches the artifacts."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from saliency_service.core.errors import FailedPrecondition
from saliency_service.core.models.config import LayerSpec, ModelConfig, TokenGrid
from saliency_service.core.models.memory import activation_bytes, default_budget, fitted_batch
from saliency_service.core.models.onnx_runner import OnnxRunner
from saliency_service.core.models.torch_runner import TorchRunner

if TYPE_CHECKING:
    from saliency_service.config import Settings

PassObserver = Callable[[str, str, int], None]
"""Called as observer(model_name, "forward" | "backward", batch_size) after each pass."""


def tokens_to_grid_np(activation: np.ndarray, tokens: TokenGrid) -> np.ndarray:
    """B x (prefix + h*w) x D tokens -> B x D x h x w: prefix tokens dropped, patches row-major on the grid."""
    (h, w), batch = tokens.grid, activation.shape[0]
    patches = activation[:, tokens.prefix :, :].reshape(batch, h, w, activation.shape[2])
    return np.ascontiguousarray(patches.transpose(0, 3, 1, 2))


def tokens_to_grid(activation: torch.Tensor, tokens: TokenGrid) -> torch.Tensor:
    """The torch twin of `tokens_to_grid_np` (used for activations and their gradients alike)."""
    (h, w), batch = tokens.grid, activation.shape[0]
    return activation[:, tokens.prefix :, :].reshape(batch, h, w, activation.shape[2]).permute(0, 3, 1, 2).contiguous()


def grid_to_tokens(grid: torch.Tensor, tokens: TokenGrid) -> torch.Tensor:
    """B x D x h x w -> B x (prefix + h*w) x D, the inverse of `tokens_to_grid`; prefix tokens get zeros."""
    batch, dim, h, w = grid.shape
    if (h, w) != tuple(tokens.grid):
        raise ValueError(f"a {h}x{w} map does not match the layer's {tokens.grid[0]}x{tokens.grid[1]} token grid")
    patches = grid.permute(0, 2, 3, 1).reshape(batch, h * w, dim)
    return torch.cat([patches.new_zeros((batch, tokens.prefix, dim)), patches], dim=1)


def _as_seen_np(spec: LayerSpec, activation: np.ndarray) -> np.ndarray:
    return activation if spec.tokens is None else tokens_to_grid_np(activation, spec.tokens)


def _as_seen(spec: LayerSpec, activation: torch.Tensor) -> torch.Tensor:
    return activation if spec.tokens is None else tokens_to_grid(activation, spec.tokens)


CPU_GRADIENT_BATCH = 8
"""Items per torch forward-and-backward pass on the CPU. Smaller chunks than the memory allows run faster there
(measured on a 2-core AMD EPYC, Integrated Gradients with 50 steps at batch 1, medians of 4-7 alternated calls:
ResNet-18 in chunks of 124 / 25 / 16 / 8 / 4: 3.48 / 3.08 / 2.83-3.23 / 2.94-3.08 / 3.31 s; ResNet-50 in chunks of
29 / 16 / 8 / 4 / 2: 9.23 / 8.04 / 6.48-7.47 / 6.93 / 7.67 s). On a GPU a pass takes `max_batch`, as large as fits."""

FLOAT16_TOLERANCE = 1e-2
"""With `RuntimeOptions.float16`, how far the half-precision ONNX logits may stray from torch's float32 ones,
relative to the largest logit (half precision keeps about three decimal digits, and errors add up over layers)."""


@dataclass(frozen=True)
class RuntimeOptions:
    max_batch: int = 256
    threads: int = 0
    prefer_cuda: bool = True
    """Run onnxruntime on its CUDA provider when it loads, and the torch program on the same GPU when torch has CUDA."""
    float16: bool = False
    """Run the ONNX graph in half precision (`OnnxRunner`); the torch program (gradients) stays float32."""
    pass_memory_bytes: int = 0
    """Memory one pass may use; `max_batch` is lowered at load until a pass fits (`memory.py`). 0: a quarter of the
    memory the process may use, or of the GPU's."""

    @classmethod
    def from_settings(cls, settings: Settings) -> RuntimeOptions:
        """How the server's settings load each model: onnxruntime's batch and threads, the GPU, half precision."""
        return cls(
            max_batch=settings.onnx_max_batch,
            threads=settings.onnx_threads,
            prefer_cuda=settings.prefer_cuda,
            float16=settings.float16,
            pass_memory_bytes=settings.pass_memory_mb * 2**20,
        )


def torch_device(onnx: OnnxRunner) -> str:
    """Where the torch program runs: on the GPU when onnxruntime runs there and this torch build has CUDA, else the CPU."""
    return "cuda" if onnx.device == "cuda" and torch.cuda.is_available() else "cpu"


class LoadedModel:
    """ONNX for forward passes, the torch program for gradients; both give the same logits.

    On a GPU (`RuntimeOptions.prefer_cuda`) both run on it. Callers hand tensors over on the CPU as before:
    each gradient call moves its inputs to the model's `device`, runs forward and backward there, and
    returns its results on the device the caller's `x` was on. `logits_tensor` keeps a batch made on the
    device there (I/O binding).

    Every layer activation, gradient and delta crosses this seam as B x C x h x w (`LayerSpec.shape`).
    A transformer's token layer (B x (prefix + h*w) x D in the artifacts, `LayerSpec.tokens`) is shown
    as B x D x h x w with its prefix (class/register) tokens dropped (METHODS.md §9), so every CAM
    method works on it unchanged; the artifacts and `program` keep the raw token layout.
    """

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
        self.item_bytes = 0
        """Bytes of the tensors one item's torch forward makes (`fit_passes`); 0 until measured."""
        self.pass_budget = 0
        """Memory one pass may use (`fit_passes`); 0 until set."""

    @classmethod
    def load(cls, folder: Path, options: RuntimeOptions = RuntimeOptions(), observer: PassObserver | None = None) -> LoadedModel:
        config = ModelConfig.load(folder)
        for name in (config.onnx_file, config.torch_file):
            if not (folder / name).is_file():
                raise FailedPrecondition("MODEL_FILE_MISSING", f"{folder / name} does not exist", {"path": str(folder / name)})
        onnx = OnnxRunner(
            folder / config.onnx_file,
            max_batch=options.max_batch,
            threads=options.threads,
            prefer_cuda=options.prefer_cuda,
            float16=options.float16,
        )
        program = TorchRunner(folder / config.torch_file, [layer.raw_shape for layer in config.layers], device=torch_device(onnx))
        model = cls(config, onnx, program, observer, folder)
        model.check_agreement()
        model.fit_passes(options.max_batch, options.pass_memory_bytes)
        return model

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def device(self) -> torch.device:
        """Where the torch program runs and `logits_tensor` works: the GPU both runtimes share, else the CPU."""
        return self.program.device

    @property
    def max_batch(self) -> int:
        """Items per forward or backward pass; larger batches are split into chunks of this size."""
        return self.onnx.max_batch

    @property
    def gradient_batch(self) -> int:
        """Items per torch pass that records gradients: `max_batch`, and on the CPU at most `CPU_GRADIENT_BATCH`."""
        return self.max_batch if self.device.type != "cpu" else min(self.max_batch, CPU_GRADIENT_BATCH)

    def fit_passes(self, max_batch: int, budget: int = 0) -> int:
        """Set `max_batch` to the largest chunk, at most `max_batch`, whose pass fits `budget` bytes (0: the default).

        One item's torch forward is watched for the tensors it makes (`memory.activation_bytes`); a pass of n items
        is taken to need `memory.PASS_OVERHEAD` x n x that. Returns the chunk size.
        """
        spec = self.config.input
        x = torch.zeros((1, spec.channels, spec.height, spec.width), device=self.device)
        self.item_bytes = activation_bytes(lambda one: self.program.forward(one, self.program.zero_probes(1)), x)
        self.pass_budget = budget or default_budget(self.device)
        self.onnx.max_batch = fitted_batch(max_batch, self.pass_budget, self.item_bytes)
        return self.onnx.max_batch

    def check_agreement(self, batch: int = 2, seed: int = 0) -> float:
        """Run both artifacts on the same input; raise if logits or layer shapes disagree."""
        spec = self.config.input
        x = np.random.default_rng(seed).standard_normal((batch, spec.channels, spec.height, spec.width)).astype(np.float32)
        try:
            outputs = self.onnx.run(x, [self.config.onnx_logits_output, *(layer.onnx_output for layer in self.config.layers)])
            with torch.no_grad():
                torch_logits, activations = self.program.forward(torch.from_numpy(x).to(self.device), self.program.zero_probes(batch))
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
            if onnx_act.shape[1:] != layer.raw_shape or tuple(torch_act.shape[1:]) != layer.raw_shape:
                raise FailedPrecondition(
                    "MODEL_OUTPUT_MISMATCH", f"layer '{layer.name}' shape differs from its config {layer.raw_shape}", {"model": self.name}
                )
        reference = torch_logits.cpu().numpy()
        difference = float(np.abs(onnx_logits - reference).max())
        tolerance = self.config.logits_tolerance
        if self.onnx.float16:
            tolerance = max(tolerance, FLOAT16_TOLERANCE * float(np.abs(reference).max()))
        if difference > tolerance:
            raise FailedPrecondition(
                "ARTIFACTS_DISAGREE",
                f"model '{self.name}': ONNX and torch logits differ by {difference:.3g} (> {tolerance:.3g})",
                {"model": self.name, "difference": difference},
            )
        return difference

    # ---- randomised copies (model randomisation, METRICS.md §4) ----

    def parameter_layers(self) -> list[str]:
        """The torch program's modules that own parameters, by path, input side first."""
        return self.program.parameter_layers()

    def with_reinitialized(self, layers: Sequence[str], seed: int) -> LoadedModel:
        """A copy of this model whose named parameter layers are re-initialised (`TorchRunner.reinitialized`).

        This model and its artifacts are untouched. The ONNX graph holds the trained weights, so the
        copy runs its forward passes (`logits`, `forward`, `run_onnx`) through its own torch program too:
        predictions, activations and gradients all come from the same randomised weights.
        """
        return _TorchForwardModel(self.config, self.onnx, self.program.reinitialized(layers, seed), self._observe, self.folder)

    # ---- forward passes (onnxruntime) ----

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits for a normalised N x C x H x W batch."""
        (logits,) = self.onnx.run(x, [self.config.onnx_logits_output])
        self._observe(self.name, "forward", len(x))
        return logits

    def logits_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """`logits` for a normalised N x C x H x W tensor, as a float32 tensor on `x`'s device (onnxruntime I/O binding)."""
        logits, _ = self.forward_tensors(x, [])
        return logits

    def forward(self, x: np.ndarray, layers: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits and the activations of the named declared layers, each B x C x h x w (token layers reshaped)."""
        specs = [self.config.layer(name) for name in layers]
        logits, *activations = self.onnx.run(x, [self.config.onnx_logits_output, *(spec.onnx_output for spec in specs)])
        self._observe(self.name, "forward", len(x))
        return logits, {spec.name: _as_seen_np(spec, act) for spec, act in zip(specs, activations, strict=True)}

    def forward_tensors(self, x: torch.Tensor, layers: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`forward` for a tensor: logits and activations as float32 tensors on `x`'s device (I/O binding)."""
        specs = [self.config.layer(name) for name in layers]
        logits, *activations = self.onnx.run_tensors(
            x,
            [self.config.onnx_logits_output, *(spec.onnx_output for spec in specs)],
            [(self.config.num_classes,), *(spec.raw_shape for spec in specs)],
        )
        self._observe(self.name, "forward", len(x))
        return logits, {spec.name: _as_seen(spec, act) for spec, act in zip(specs, activations, strict=True)}

    def predict(self, x: np.ndarray, layers: Sequence[str]) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        """The prediction pass: logits in host memory, and the named layers' activations left on the model's device
        for the methods that start from them (`forward_tensors`)."""
        logits, activations = self.forward_tensors(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device), layers)
        return logits.cpu().numpy(), activations

    # ---- gradients (torch program) ----

    def input_gradient(self, x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and d(sum_b sum_k weights[b,k] * logits[b,k]) / dx, in chunks of `gradient_batch`."""
        origin = x.device
        x, weights = x.to(self.device), weights.to(self.device)
        logits_parts, grad_parts = [], []
        step = self.gradient_batch
        for start in range(0, len(x), step):
            xs = x[start : start + step].detach().clone().requires_grad_(True)
            with torch.enable_grad():
                logits, _ = self.program.forward(xs, self.program.zero_probes(len(xs)))
                (grad,) = torch.autograd.grad((logits * weights[start : start + step]).sum(), xs)
            self._observe(self.name, "backward", len(xs))
            logits_parts.append(logits.detach())
            grad_parts.append(grad)
        return torch.cat(logits_parts).to(origin), torch.cat(grad_parts).to(origin)

    def has_head(self, layer: str) -> bool:
        """Whether torch can differentiate from this layer's activation without the trunk (`TorchRunner.head`)."""
        spec = self.config.layer(layer)
        return spec.tokens is None and self.program.head(spec.probe_index) is not None

    def layer_gradient(
        self, x: torch.Tensor, weights: torch.Tensor, layer: str, activation: np.ndarray | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, the layer's activation, and the objective's gradient with respect to it (both B x C x h x w).

        With `activation` (the layer's output for `x` from an onnxruntime pass, as `forward` returns it) and
        a layer that has a head (only the rest of the network after it, see `TorchRunner.head`), torch runs
        only that head, forward and backward: no second pass through the trunk. Without `activation`, a layer
        with a head gets it from an onnxruntime pass first: a trunk forward with no autograd tape, and on this
        CPU faster than torch's (measured on ResNet-18 at batch 1: Grad-CAM 1.3x the forward pass this way,
        2.5x through torch's trunk).
        """
        if activation is None and self.has_head(layer):
            _, outputs = self.forward_tensors(x, [layer])
            activation = outputs[layer]
        if activation is None or len(activation) != len(x) or not self.has_head(layer):
            logits, activations, gradients = self.layers_gradient(x, weights, [layer])
            return logits, activations[layer], gradients[layer]
        head = self.program.head(self.config.layer(layer).probe_index)
        assert head is not None  # has_head said so
        logits_parts, grad_parts = [], []
        step = self.max_batch
        seen = torch.as_tensor(activation, dtype=torch.float32)
        on_device, weights = seen.to(self.device), weights.to(self.device)
        for start in range(0, len(seen), step):
            part = on_device[start : start + step].clone().requires_grad_(True)
            with torch.enable_grad():
                logits = self.program.run_head(head, part)
                (grad,) = torch.autograd.grad((logits * weights[start : start + step]).sum(), part)
            self._observe(self.name, "backward", len(part))
            logits_parts.append(logits.detach())
            grad_parts.append(grad)
        return torch.cat(logits_parts).to(x.device), seen.to(x.device), torch.cat(grad_parts).to(x.device)

    def layers_gradient(
        self, x: torch.Tensor, weights: torch.Tensor, layers: Sequence[str], deltas: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Logits, and each layer's activation and gradient (B x C x h x w), from one backward pass per chunk.

        `deltas` (optional, per layer, B x C x h x w) are added to those layers' outputs first, so the
        gradient is taken at a moved activation (layer-space Integrated Gradients walks a path this way);
        the activations returned are the unmoved ones.
        """
        specs = [self.config.layer(layer) for layer in layers]
        origin = x.device
        x, weights = x.to(self.device), weights.to(self.device)
        deltas = {name: delta.to(self.device) for name, delta in (deltas or {}).items()}
        logits_parts: list[torch.Tensor] = []
        act_parts: dict[str, list[torch.Tensor]] = {spec.name: [] for spec in specs}
        grad_parts: dict[str, list[torch.Tensor]] = {spec.name: [] for spec in specs}
        step = self.gradient_batch
        for start in range(0, len(x), step):
            xs = x[start : start + step].detach()
            probes = self.program.zero_probes(len(xs))
            for spec in specs:
                if spec.name in deltas:
                    part = deltas[spec.name][start : start + step].to(probes[spec.probe_index].dtype)
                    probes[spec.probe_index] = part if spec.tokens is None else grid_to_tokens(part, spec.tokens)
                probes[spec.probe_index].requires_grad_(True)
            with torch.enable_grad():
                logits, activations = self.program.forward(xs, probes)
                grads = torch.autograd.grad((logits * weights[start : start + step]).sum(), [probes[spec.probe_index] for spec in specs])
            self._observe(self.name, "backward", len(xs))
            logits_parts.append(logits.detach())
            for spec, grad in zip(specs, grads, strict=True):
                activation = activations[spec.probe_index].detach() - probes[spec.probe_index].detach()
                act_parts[spec.name].append(_as_seen(spec, activation))
                grad_parts[spec.name].append(_as_seen(spec, grad))
        return (
            torch.cat(logits_parts).to(origin),
            {name: torch.cat(parts).to(origin) for name, parts in act_parts.items()},
            {name: torch.cat(parts).to(origin) for name, parts in grad_parts.items()},
        )

    def logits_with_delta(self, x: torch.Tensor, layer: str, delta: torch.Tensor) -> torch.Tensor:
        """Logits when `delta` (B x C x h x w, as `forward` shows the layer) is added to the layer's output.

        This is how perturbations at a layer (Ablation-CAM's zeroed channels) run without re-exporting:
        the program's probe for that layer carries the delta. For a token layer the delta is mapped
        back to tokens and prefix tokens get zero delta. No gradients; chunked by max_batch.
        """
        spec = self.config.layer(layer)
        index = spec.probe_index
        origin = x.device
        x, delta = x.to(self.device), delta.to(self.device)
        parts = []
        step = self.max_batch
        with torch.no_grad():
            for start in range(0, len(x), step):
                xs = x[start : start + step]
                probes = self.program.zero_probes(len(xs))
                part = delta[start : start + step].to(probes[index].dtype)
                probes[index] = part if spec.tokens is None else grid_to_tokens(part, spec.tokens)
                logits, _ = self.program.forward(xs, probes)
                self._observe(self.name, "forward", len(xs))
                parts.append(logits)
        return torch.cat(parts).to(origin)

    def run_onnx(self, x: np.ndarray, outputs: Sequence[str]) -> list[np.ndarray]:
        """The ONNX graph's named outputs as they are (no reshaping), for the Open Inference Protocol."""
        results = self.onnx.run(x, outputs)
        self._observe(self.name, "forward", len(x))
        return results


class _TorchForwardModel(LoadedModel):
    """A LoadedModel whose forward passes run through its torch program instead of onnxruntime.

    Made by `LoadedModel.with_reinitialized`, whose program no longer matches the ONNX graph; the
    ONNX runner is kept only for its batch size. Outputs are looked up by their ONNX names.
    """

    def _outputs(self, x: np.ndarray, outputs: Sequence[str]) -> list[np.ndarray]:
        by_name = {spec.onnx_output: spec.probe_index for spec in self.config.layers}
        parts: list[list[np.ndarray]] = [[] for _ in outputs]
        step = self.max_batch
        with torch.no_grad():
            for start in range(0, len(x), step):
                xs = torch.from_numpy(np.ascontiguousarray(x[start : start + step], dtype=np.float32)).to(self.device)
                logits, activations = self.program.forward(xs, self.program.zero_probes(len(xs)))
                for j, name in enumerate(outputs):
                    value = logits if name == self.config.onnx_logits_output else activations[by_name[name]]
                    parts[j].append(value.cpu().numpy())
        return [np.concatenate(chunks) for chunks in parts]

    def logits(self, x: np.ndarray) -> np.ndarray:
        (logits,) = self._outputs(x, [self.config.onnx_logits_output])
        self._observe(self.name, "forward", len(x))
        return logits

    def forward_tensors(self, x: torch.Tensor, layers: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, activations = self.forward(x.detach().cpu().numpy(), layers)
        return torch.from_numpy(logits).to(x.device), {name: torch.from_numpy(act).to(x.device) for name, act in activations.items()}

    def forward(self, x: np.ndarray, layers: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        specs = [self.config.layer(name) for name in layers]
        logits, *activations = self._outputs(x, [self.config.onnx_logits_output, *(spec.onnx_output for spec in specs)])
        self._observe(self.name, "forward", len(x))
        return logits, {spec.name: _as_seen_np(spec, act) for spec, act in zip(specs, activations, strict=True)}

    def run_onnx(self, x: np.ndarray, outputs: Sequence[str]) -> list[np.ndarray]:
        results = self._outputs(x, outputs)
        self._observe(self.name, "forward", len(x))
        return results
