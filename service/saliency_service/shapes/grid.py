"""`shapes_grid`: the DiFull setting (METRICS.md §5) built from the shipped `shapes` model, no training.

The input is a 2x2 grid of 128x128 shapes images (256x256). Each cell is cropped at the input and runs
through its own copy of the shapes trunk, so no pixel of one cell can influence another cell's logits;
the logits are the four cells' logits concatenated (labels `top_left/circle`, ..., cell-major).

The per-cell activations of `layer2` and `layer3` are stitched back into one grid-shaped map (the paper's
"computed per cell and stitched back together") and declared as layers, so CAM methods see a map that
covers the whole input. Each cell's next stage reads only its own quadrant of the stitched map.

python -m saliency_service.shapes.grid [--repository DIR]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import cast

import torch
from torch import nn

from saliency_service.config import EMBEDDED_REPOSITORY
from saliency_service.core.models.config import TORCH_FILE, GridSpec
from saliency_service.core.models.export import export_model
from saliency_service.shapes.generator import IMAGE_SIZE, LABELS
from saliency_service.shapes.network import MEAN, STD, ShapesNet

NAME = "shapes_grid"
ROWS = COLS = 2
CELLS: tuple[str, ...] = ("top_left", "top_right", "bottom_left", "bottom_right")
"""Cell names, row-major."""
GRID_LABELS: tuple[str, ...] = tuple(f"{cell}/{label}" for cell in CELLS for label in LABELS)
LAYERS = ("layer2", "layer3")
DESCRIPTION = (
    "DiFull grid of the shapes model: a 2x2 grid of 128x128 shapes images (256x256), each cell classified by its own "
    "copy of the shapes trunk; labels <cell>/<class>."
)


class Stitch(nn.Module):
    """Lays per-cell maps (row-major list of B x C x h x w) out as one B x C x (rows*h) x (cols*w) map.

    A module of its own so that the stitched map is a declared layer (hooks and probes attach here).
    """

    def __init__(self, cols: int) -> None:
        super().__init__()
        self.cols = cols

    def forward(self, cells: list[torch.Tensor]) -> torch.Tensor:
        rows = [torch.cat(cells[start : start + self.cols], dim=3) for start in range(0, len(cells), self.cols)]
        return torch.cat(rows, dim=2)


def _split(grid: torch.Tensor, rows: int, cols: int) -> list[torch.Tensor]:
    """The inverse of `Stitch`: row-major cells of a B x C x H x W map."""
    height, width = grid.shape[2] // rows, grid.shape[3] // cols
    return [grid[:, :, r * height : (r + 1) * height, c * width : (c + 1) * width] for r in range(rows) for c in range(cols)]


class GridNet(nn.Module):
    """rows x cols copies of a ShapesNet, one per cell; logits concatenated cell-major."""

    def __init__(self, trunk: ShapesNet, rows: int = ROWS, cols: int = COLS) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        self.cells = nn.ModuleList(copy.deepcopy(trunk) for _ in range(rows * cols))
        self.layer2 = Stitch(cols)
        self.layer3 = Stitch(cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        crops = _split(x, self.rows, self.cols)
        nets = [cast(ShapesNet, net) for net in self.cells]
        # ShapesNet.features step by step, so the stitched maps sit between the stages. Each cell removes
        # its own mean colour, as the trunk does for a whole image.
        early = [
            net.layer2(net.layer1(net.stem(crop - crop.mean(dim=(2, 3), keepdim=True)))) for net, crop in zip(nets, crops, strict=True)
        ]
        stitched2 = _split(self.layer2(early), self.rows, self.cols)
        late = [net.layer3(part) for net, part in zip(nets, stitched2, strict=True)]
        stitched3 = _split(self.layer3(late), self.rows, self.cols)
        return torch.cat([net.classify(part) for net, part in zip(nets, stitched3, strict=True)], dim=1)


def shipped_shapes(repository: Path = EMBEDDED_REPOSITORY) -> ShapesNet:
    """The trained `shapes` weights, read back from the repository's torch program."""
    program = torch.export.load(str(repository / "shapes" / TORCH_FILE))
    # The exporter wraps the module as `model`; the program's state dict keeps that prefix.
    state = {key.removeprefix("model."): value for key, value in program.state_dict.items()}
    trunk = ShapesNet(len(LABELS))
    trunk.load_state_dict(state)
    return trunk.eval()


def export_shapes_grid(repository: Path = EMBEDDED_REPOSITORY, version: str = "1") -> Path:
    """Write the `shapes_grid` entry next to `shapes` in `repository`."""
    return export_model(
        GridNet(shipped_shapes(repository)).eval(),
        torch.zeros(1, 3, ROWS * IMAGE_SIZE, COLS * IMAGE_SIZE),
        repository,
        NAME,
        labels=GRID_LABELS,
        layers=LAYERS,
        mean=MEAN,
        std=STD,
        version=version,
        description=DESCRIPTION,
        overwrite=True,
        grid=GridSpec(ROWS, COLS),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=EMBEDDED_REPOSITORY)
    parser.add_argument("--version", default="1")
    args = parser.parse_args()
    print(f"exported to {export_shapes_grid(args.repository, args.version)}")


if __name__ == "__main__":
    main()
