"""The per-model config file (`config.json`): what the artifacts are and how to feed them.

JSON, not pickle or Python: reading a config never executes anything.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from saliency_service.core.errors import FailedPrecondition, NotFound

CONFIG_FILE = "config.json"
ONNX_FILE = "model.onnx"
TORCH_FILE = "model.pt2"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


MAX_DYNAMIC_BATCH = 1024
MAX_QUEUE_DELAY_US = 1_000_000


def _token_grid(raw: Any) -> TokenGrid | None:
    """A layer's optional "tokens" entry: {"grid": [h, w], "prefix": p}; absent or null for a convolutional layer."""
    if raw is None:
        return None
    return TokenGrid(grid=(int(raw["grid"][0]), int(raw["grid"][1])), prefix=int(raw["prefix"]))


def valid_model_name(name: str) -> bool:
    """Model names are folder names: lower-case, no path separators, cannot escape the repository."""
    return bool(_NAME.match(name)) and ".." not in name


@dataclass(frozen=True)
class InputSpec:
    """The image the model takes: N x channels x height x width, scaled to [0,1] then normalised."""

    height: int
    width: int
    channels: int = 3
    layout: str = "NCHW"
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    resize: str = "bilinear"


@dataclass(frozen=True)
class TokenGrid:
    """How a transformer's token layer (N x tokens x D) maps onto an image grid (METHODS.md §9).

    The first `prefix` tokens (class, distillation, register tokens) have no position; the remaining
    `grid[0] * grid[1]` tokens are the patches in row-major order (timm/ViT convention).
    """

    grid: tuple[int, int]
    prefix: int

    @property
    def tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class GridSpec:
    """A grid model (the DiFull setting, METRICS.md §5): the input is `rows` x `cols` equal cells, each
    classified by its own copy of a trunk, so no pixel of one cell can reach another cell's logits.

    Labels are cell-major: with k = labels / cells classes per cell, label i belongs to cell i // k, and
    cells are numbered row-major (cell c covers rows c // cols and columns c % cols of the grid).
    """

    rows: int
    cols: int

    @property
    def cells(self) -> int:
        return self.rows * self.cols

    def cell_of(self, label: int, num_labels: int) -> tuple[int, int]:
        """The (row, col) of the cell whose head owns `label`."""
        cell = label // (num_labels // self.cells)
        return cell // self.cols, cell % self.cols


@dataclass(frozen=True)
class LayerSpec:
    """A layer that CAM methods may use, named by its module path in the source model.

    `onnx_output` is the extra graph output that carries its activation; `probe_index` is the
    position of its zero probe among the torch program's probe inputs.

    `shape` is what methods (and clients, via ListModels) see: C x h x w. For a convolutional
    layer that is the activation itself. For a token layer (`tokens` set) the artifacts output
    N x (prefix + h*w) x D; methods see D x h x w (prefix tokens dropped, patches reshaped
    row-major to the grid, embedding dims as channels), and `raw_shape` is (prefix + h*w, D).
    """

    name: str
    onnx_output: str
    probe_index: int
    shape: tuple[int, int, int]
    tokens: TokenGrid | None = None

    @property
    def raw_shape(self) -> tuple[int, ...]:
        """The activation's shape in the artifacts (per item): C x h x w, or tokens x D for a token layer."""
        if self.tokens is None:
            return self.shape
        return (self.tokens.tokens, self.shape[0])


@dataclass(frozen=True)
class DynamicBatching:
    """Merge concurrent Explain requests for this model that make maps the same way (Triton's names).

    A request waits `max_queue_delay_microseconds` for others to join it; then its group waits its turn in
    the worker pool's queue like any job, and others still join it until a worker takes it. A merged call
    holds at most `max_batch_size` images. Methods give each image the map it would get alone (the method
    contract tests this), so merging changes nothing but the cost.
    """

    max_batch_size: int
    max_queue_delay_microseconds: int = 2000


@dataclass(frozen=True)
class ModelConfig:
    name: str
    version: str
    input: InputSpec
    labels: tuple[str, ...]
    layers: tuple[LayerSpec, ...]
    task: str = "classification"
    description: str = ""
    onnx_file: str = ONNX_FILE
    torch_file: str = TORCH_FILE
    onnx_logits_output: str = "logits"
    # Max |logit difference| allowed between the ONNX and torch artifacts, checked at load.
    logits_tolerance: float = 1e-3
    extra: dict[str, Any] = field(default_factory=dict)
    # The layer CAM methods use when a request names none; None: the last declared layer.
    cam_layer: str | None = None
    # None: every request runs on its own.
    dynamic_batching: DynamicBatching | None = None
    # A grid model's cell layout (`grid_pointing_game`); None for an ordinary classifier.
    grid: GridSpec | None = None
    # Named groups of labels (RFxG's granularity: a coarse class such as "dog" over its breeds); empty: none.
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def group_of(self, class_index: int) -> tuple[str, tuple[int, ...]] | None:
        """The first group holding this class: its name and its members' indices; None when it is in none."""
        label = self.labels[class_index]
        for name, members in self.groups.items():
            if label in members:
                return name, tuple(self.labels.index(member) for member in members)
        return None

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def default_layer(self) -> str | None:
        """`cam_layer` when set, else the last declared layer: the usual choice for CNNs (for a class-token ViT an
        earlier block's norm1 often localises better, METHODS.md §9)."""
        if self.cam_layer is not None:
            return self.cam_layer
        return self.layers[-1].name if self.layers else None

    def layer(self, name: str) -> LayerSpec:
        for spec in self.layers:
            if spec.name == name:
                return spec
        raise NotFound(
            "UNKNOWN_LAYER",
            f"model '{self.name}' declares no layer '{name}'; declared layers: {', '.join(s.name for s in self.layers) or 'none'}",
            {"model": self.name, "layer": name},
        )

    def class_index(self, label: str) -> int:
        try:
            return self.labels.index(label)
        except ValueError:
            raise NotFound(
                "UNKNOWN_LABEL",
                f"model '{self.name}' has no label '{label}'; labels: {', '.join(self.labels)}",
                {"model": self.name, "label": label},
            ) from None

    def to_json(self) -> str:
        raw = asdict(self)
        for layer in raw["layers"]:
            # Convolutional layers are written exactly as before token layers existed.
            if layer["tokens"] is None:
                del layer["tokens"]
        for optional in ("cam_layer", "dynamic_batching", "grid", "groups"):
            if not raw[optional]:
                del raw[optional]
        return json.dumps(raw, indent=2) + "\n"

    def save(self, folder: Path) -> None:
        (folder / CONFIG_FILE).write_text(self.to_json())

    @classmethod
    def load(cls, folder: Path) -> ModelConfig:
        """Read and validate `folder/config.json`; any problem is a FailedPrecondition with the reason."""
        path = folder / CONFIG_FILE
        try:
            raw = json.loads(path.read_text())
            config = cls(
                name=str(raw["name"]),
                version=str(raw["version"]),
                input=InputSpec(**{**raw["input"], "mean": tuple(raw["input"]["mean"]), "std": tuple(raw["input"]["std"])}),
                labels=tuple(str(label) for label in raw["labels"]),
                layers=tuple(
                    LayerSpec(
                        name=str(layer["name"]),
                        onnx_output=str(layer["onnx_output"]),
                        probe_index=int(layer["probe_index"]),
                        shape=(int(layer["shape"][0]), int(layer["shape"][1]), int(layer["shape"][2])),
                        tokens=_token_grid(layer.get("tokens")),
                    )
                    for layer in raw["layers"]
                ),
                dynamic_batching=DynamicBatching(**raw["dynamic_batching"]) if raw.get("dynamic_batching") is not None else None,
                **{
                    k: raw[k]
                    for k in (
                        "task",
                        "description",
                        "onnx_file",
                        "torch_file",
                        "onnx_logits_output",
                        "logits_tolerance",
                        "extra",
                        "cam_layer",
                    )
                    if k in raw
                },
                grid=GridSpec(rows=int(raw["grid"]["rows"]), cols=int(raw["grid"]["cols"])) if raw.get("grid") is not None else None,
                groups={str(name): tuple(str(label) for label in members) for name, members in raw.get("groups", {}).items()},
            )
        except FileNotFoundError:
            raise FailedPrecondition("MODEL_CONFIG_MISSING", f"{path} does not exist", {"path": str(path)}) from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise FailedPrecondition("MODEL_CONFIG_INVALID", f"{path} is not a valid model config: {exc!r}", {"path": str(path)}) from None
        config.check(folder)
        return config

    def check(self, folder: Path) -> None:
        problems = []
        if not valid_model_name(self.name):
            problems.append(f"name '{self.name}' is not a valid model name")
        if self.name != folder.name:
            problems.append(f"name '{self.name}' does not match its folder '{folder.name}'")
        if not self.labels or len(set(self.labels)) != len(self.labels):
            problems.append("labels must be non-empty and unique")
        if self.input.layout != "NCHW" or self.input.channels != 3:
            problems.append("only NCHW RGB inputs are supported")
        if len(self.input.mean) != self.input.channels or len(self.input.std) != self.input.channels or min(self.input.std) <= 0:
            problems.append("mean/std need one value per channel and std > 0")
        for name in (self.onnx_file, self.torch_file):
            if "/" in name or "\\" in name or name.startswith("."):
                problems.append(f"artifact file name '{name}' must be a plain file name")
        if sorted(layer.probe_index for layer in self.layers) != list(range(len(self.layers))):
            problems.append("layer probe indices must be 0..n-1")
        batching = self.dynamic_batching
        if batching is not None and not (
            isinstance(batching.max_batch_size, int)
            and isinstance(batching.max_queue_delay_microseconds, int)
            and 1 <= batching.max_batch_size <= MAX_DYNAMIC_BATCH
            and 0 <= batching.max_queue_delay_microseconds <= MAX_QUEUE_DELAY_US
        ):
            problems.append(
                f"dynamic_batching needs an integer max_batch_size in 1..{MAX_DYNAMIC_BATCH} and an integer "
                f"max_queue_delay_microseconds in 0..{MAX_QUEUE_DELAY_US}, got {batching}"
            )
        if self.cam_layer is not None and self.cam_layer not in {layer.name for layer in self.layers}:
            problems.append(f"cam_layer '{self.cam_layer}' is not a declared layer")
        for group, members in self.groups.items():
            unknown = [label for label in members if label not in self.labels]
            if not members or unknown or len(set(members)) != len(members):
                problems.append(f"group '{group}' must list distinct labels of the model (unknown: {unknown or 'none'})")
        if self.grid is not None:
            cells = self.grid.rows * self.grid.cols
            if min(self.grid.rows, self.grid.cols) <= 0 or len(self.labels) % cells:
                problems.append(f"grid {self.grid.rows}x{self.grid.cols} must be positive and divide the {len(self.labels)} labels evenly")
            elif self.input.height % self.grid.rows or self.input.width % self.grid.cols:
                problems.append(f"grid {self.grid.rows}x{self.grid.cols} must divide the {self.input.height}x{self.input.width} input")
        for layer in self.layers:
            if min(layer.shape) <= 0:
                problems.append(f"layer '{layer.name}' has an empty shape {layer.shape}")
            if layer.tokens is not None:
                if layer.tokens.prefix < 0 or min(layer.tokens.grid) <= 0:
                    problems.append(
                        f"layer '{layer.name}': token grid {layer.tokens.grid} and prefix {layer.tokens.prefix} must be positive"
                    )
                elif tuple(layer.shape[1:]) != tuple(layer.tokens.grid):
                    problems.append(f"layer '{layer.name}': shape {layer.shape} does not match its token grid {layer.tokens.grid}")
        if problems:
            raise FailedPrecondition("MODEL_CONFIG_INVALID", f"{folder / CONFIG_FILE}: " + "; ".join(problems), {"path": str(folder)})
