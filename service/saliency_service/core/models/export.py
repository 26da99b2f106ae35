"""Turn any `torch.nn.Module` into a model-repository entry: config + ONNX + torch program."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.models.config import (
    ONNX_FILE,
    TORCH_FILE,
    DynamicBatching,
    GridSpec,
    InputSpec,
    LayerSpec,
    ModelConfig,
    TokenGrid,
    valid_model_name,
)
from saliency_service.core.models.model import LoadedModel
from saliency_service.core.models.onnx_runner import OnnxRunner
from saliency_service.core.models.torch_runner import TorchRunner

_MAX_BATCH = 4096


class _LayerOutputs(nn.Module):
    """Returns (logits, *declared layer outputs); with probes, adds probe i to layer i's output.

    Hooks live only for the duration of one traced call (export time); the exported graphs have
    none, so nothing is installed on a model at request time.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.layers = list(layers)

    def run(self, x: torch.Tensor, probes: Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        outputs: dict[str, torch.Tensor] = {}
        handles = []
        for index, name in enumerate(self.layers):

            def hook(module: nn.Module, args: object, output: torch.Tensor, name: str = name, index: int = index) -> torch.Tensor:
                if probes is not None:
                    output = output + probes[index]
                outputs[name] = output
                return output

            handles.append(self.model.get_submodule(name).register_forward_hook(hook))
        try:
            logits = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        return (logits, *(outputs[name] for name in self.layers))


class _Probed(_LayerOutputs):
    def forward(self, x: torch.Tensor, probes: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return self.run(x, probes)


class _Plain(_LayerOutputs):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.run(x, None)


# When neither patch size nor prefix is given, a token layer's grid is inferred only if exactly one
# patch size that divides the input leaves between 0 and this many prefix tokens.
_MAX_INFERRED_PREFIX = 16


def token_grid(
    layer: str, tokens: int, height: int, width: int, patch_size: int | tuple[int, int] | None = None, prefix_tokens: int | None = None
) -> TokenGrid:
    """The grid (h, w) and prefix count of a token layer with `tokens` tokens on a `height` x `width` input.

    With `patch_size`: h = height / patch, w = width / patch, prefix = tokens - h*w. With only
    `prefix_tokens`: the tokens - prefix patches must tile the input with square patches (a perfect
    square for a square input). With neither: the one patch size that divides the input and leaves
    0..16 prefix tokens. Anything ambiguous or inconsistent is an InvalidArgument naming the fix.
    """
    if patch_size is not None:
        ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else (int(patch_size[0]), int(patch_size[1]))
        if ph <= 0 or pw <= 0 or height % ph or width % pw:
            raise InvalidArgument("INVALID_PATCH_SIZE", f"patch size {(ph, pw)} does not tile the {height}x{width} input")
        grid = (height // ph, width // pw)
        prefix = tokens - grid[0] * grid[1]
        if prefix < 0 or (prefix_tokens is not None and prefix != prefix_tokens):
            raise InvalidArgument(
                "TOKEN_GRID_MISMATCH",
                f"layer '{layer}' has {tokens} tokens; patch size {(ph, pw)} on a {height}x{width} input gives a "
                f"{grid[0]}x{grid[1]} grid, which leaves {prefix} prefix tokens"
                + (f", not {prefix_tokens}" if prefix_tokens is not None else ""),
            )
        return TokenGrid(grid=grid, prefix=prefix)
    candidates = []
    for patch in range(1, min(height, width) + 1):
        if height % patch or width % patch:
            continue
        grid = (height // patch, width // patch)
        prefix = tokens - grid[0] * grid[1]
        if (prefix_tokens is None and 0 <= prefix <= _MAX_INFERRED_PREFIX) or prefix == prefix_tokens:
            candidates.append(TokenGrid(grid=grid, prefix=prefix))
    if len(candidates) != 1:
        found = ", ".join(f"{c.grid[0]}x{c.grid[1]} grid + {c.prefix} prefix" for c in candidates) or "no square-patch grid"
        raise InvalidArgument(
            "TOKEN_GRID_UNKNOWN",
            f"cannot infer the token grid of layer '{layer}' ({tokens} tokens, {height}x{width} input): {found}; "
            "pass patch_size (and prefix_tokens) to export_model",
        )
    return candidates[0]


def _onnx_output_name(index: int, layer: str) -> str:
    return f"layer{index}_" + re.sub(r"[^A-Za-z0-9_]", "_", layer)


def export_model(
    module: nn.Module,
    example_input: torch.Tensor,
    repository: str | Path,
    name: str,
    *,
    labels: Sequence[str],
    layers: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    version: str = "1",
    description: str = "",
    tolerance: float = 1e-3,
    overwrite: bool = False,
    patch_size: int | tuple[int, int] | None = None,
    prefix_tokens: int | None = None,
    default_layer: str | None = None,
    dynamic_batching: DynamicBatching | None = None,
    grid: GridSpec | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """Write `repository/name/` with config.json, model.onnx and model.pt2; return the folder.

    `example_input` is one normalised batch (N x 3 x H x W) that fixes the input size; `layers` are
    module paths (e.g. ``["layer4"]``) that CAM methods may use. The entry is loaded back and its
    ONNX and torch logits are checked to agree with each other and with `module` within `tolerance`.

    A declared layer may output N x C x h x w (convolutional) or N x tokens x D (a transformer's
    token sequence, batch first). For token layers the config records the patch grid and the number
    of prefix tokens (class/register tokens), from `patch_size` when given (the grid is the input
    size over the patch size, the prefix what remains), else inferred from the token count (see
    `token_grid`); `prefix_tokens` pins the prefix count when the input size alone is ambiguous.
    Methods then see such a layer as D x h x w (METHODS.md §9). `default_layer` (one of `layers`)
    is the layer CAM methods use when a request names none; by default the last of `layers`.
    `dynamic_batching` lets the server merge concurrent Explain requests for the model. `grid`
    declares a grid model (cell-major labels, one trunk copy per cell; `GridSpec`). `groups` names
    groups of labels (coarse classes) for the group-granularity metrics.
    """
    if not valid_model_name(name):
        raise InvalidArgument("INVALID_MODEL_NAME", f"'{name}' is not a valid model name (lower-case letters, digits, '_', '-', '.')")
    if example_input.ndim != 4 or example_input.shape[1] != 3:
        raise InvalidArgument("INVALID_EXAMPLE_INPUT", f"example_input must be N x 3 x H x W, got {tuple(example_input.shape)}")
    known = dict(module.named_modules())
    missing = [layer for layer in layers if layer not in known or layer == ""]
    if missing:
        raise InvalidArgument("UNKNOWN_LAYER", f"module has no submodule(s) {missing}")
    if default_layer is not None and default_layer not in layers:
        raise InvalidArgument("UNKNOWN_LAYER", f"default_layer '{default_layer}' is not one of the declared layers {list(layers)}")
    repository = Path(repository)
    target = repository / name
    if target.exists() and not overwrite:
        raise InvalidArgument("MODEL_EXISTS", f"{target} exists; pass overwrite=True to replace it")

    module = module.eval()
    # A batch of 2 keeps the exporters from specialising the batch dimension to 1.
    x = example_input[:1].detach().float().repeat(2, 1, 1, 1)
    with torch.no_grad():
        reference, *activations = _Plain(module, layers).run(x, None)
    if reference.ndim != 2 or reference.shape[1] != len(labels):
        raise InvalidArgument("LABELS_MISMATCH", f"module returns {tuple(reference.shape)} logits but {len(labels)} labels were given")
    shapes = [tuple(int(d) for d in act.shape[1:]) for act in activations]
    if any(len(shape) not in (2, 3) for shape in shapes):
        raise InvalidArgument(
            "UNSUPPORTED_LAYER",
            f"declared layers must output N x C x h x w or N x tokens x D tensors; got {dict(zip(layers, shapes, strict=True))}",
        )
    height, width = int(x.shape[2]), int(x.shape[3])
    specs = []
    for i, (layer, shape) in enumerate(zip(layers, shapes, strict=True)):
        tokens = None if len(shape) == 3 else token_grid(layer, shape[0], height, width, patch_size, prefix_tokens)
        seen = shape if tokens is None else (shape[1], *tokens.grid)
        specs.append(LayerSpec(name=layer, onnx_output=_onnx_output_name(i, layer), probe_index=i, shape=seen, tokens=tokens))  # type: ignore[arg-type]

    config = ModelConfig(
        name=name,
        version=version,
        description=description,
        input=InputSpec(height=height, width=width, mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std)),
        labels=tuple(labels),
        layers=tuple(specs),
        logits_tolerance=tolerance,
        cam_layer=default_layer,
        dynamic_batching=dynamic_batching,
        grid=grid,
        groups={name: tuple(members) for name, members in (groups or {}).items()},
    )

    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=repository))
    try:
        batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
        probes = tuple(torch.zeros((2, *shape)) for shape in shapes)
        program = torch.export.export(
            _Probed(module, layers).eval(), (x, probes), dynamic_shapes={"x": {0: batch}, "probes": tuple({0: batch} for _ in probes)}
        )
        torch.export.save(program, str(staging / TORCH_FILE))
        onnx_program = torch.onnx.export(
            _Plain(module, layers).eval(),
            (x,),
            None,
            dynamo=True,
            external_data=False,
            input_names=["input"],
            output_names=["logits", *(layer.onnx_output for layer in config.layers)],
            dynamic_shapes={"x": {0: "batch"}},
            verbose=False,
        )
        assert onnx_program is not None
        onnx_program.save(str(staging / ONNX_FILE))
        final = staging.parent / name
        # Load through the same path the server uses; this also checks ONNX against torch.
        config.save(staging)
        loaded = _load_staged(staging, config)
        served = loaded.logits(x.numpy())
        difference = float(np.abs(served - reference.numpy()).max())
        if difference > tolerance:
            raise InvalidArgument("EXPORT_MISMATCH", f"exported logits differ from the module's by {difference:.3g} (> {tolerance})")
        if final.exists():
            shutil.rmtree(final)
        staging.chmod(0o755)
        staging.rename(final)
        return final
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _load_staged(staging: Path, config: ModelConfig) -> LoadedModel:
    """Load a staged entry whose folder name is still temporary."""
    model = LoadedModel(
        config,
        OnnxRunner(staging / config.onnx_file, prefer_cuda=False),
        TorchRunner(staging / config.torch_file, [layer.raw_shape for layer in config.layers]),
    )
    model.check_agreement()
    return model
