"""Grid pointing game (Rao, Böhle, Schiele, "Towards Better Understanding Attribution Methods", CVPR 2022;
DiFull setting; METRICS.md §5).

On a grid model (`ModelConfig.grid`: the input is rows x cols cells, each classified by its own copy of a
trunk) the target's head can only see its own cell. The score is the share of positive attribution that
falls inside that cell: L = sum_cell max(A, 0) / sum max(A, 0), 0 when the total is <= 1e-7. A method
that attributes only what can influence the output scores 1; a uniform map scores 1 / cells.
"""

from __future__ import annotations

import numpy as np

from saliency_service.core.errors import FailedPrecondition
from saliency_service.core.metrics.base import METRICS, MetricInput, MetricValue, ScoreMetric

EMPTY_TOTAL = 1e-7


def cell_shares(saliency: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """B x (rows*cols) share of each item's positive attribution per cell (row-major); 0 for an all-non-positive map."""
    batch, height, width = saliency.shape
    positive = np.maximum(saliency.astype(np.float64), 0.0)
    per_cell = positive.reshape(batch, rows, height // rows, cols, width // cols).sum(axis=(2, 4)).reshape(batch, rows * cols)
    total = per_cell.sum(axis=1, keepdims=True)
    shares: np.ndarray = np.where(total > EMPTY_TOTAL, per_cell / np.where(total > EMPTY_TOTAL, total, 1.0), 0.0)
    return shares


@METRICS.register("grid_pointing_game")
class GridPointingGame(ScoreMetric):
    description = (
        "DiFull grid pointing game: on a grid model (e.g. shapes_grid), the share of positive attribution inside the cell "
        "whose head owns the target class (1 is perfect; a uniform map scores 1/cells)."
    )
    higher_is_better = True

    def score(self, request: MetricInput) -> list[MetricValue]:
        config = request.model.config
        if config.grid is None:
            raise FailedPrecondition(
                "MODEL_HAS_NO_GRID",
                f"grid_pointing_game needs a grid model (a `grid` entry in its config, e.g. shapes_grid); model '{config.name}' has none",
                {"model": config.name, "metric": self.name},
            )
        grid = config.grid
        shares = cell_shares(request.saliency, grid.rows, grid.cols)
        values = []
        for item, target in enumerate(np.asarray(request.targets, dtype=np.int64)):
            row, col = grid.cell_of(int(target), config.num_classes)
            values.append(
                MetricValue(
                    value=float(shares[item, row * grid.cols + col]),
                    components={f"cell_{cell}": float(share) for cell, share in enumerate(shares[item])},
                )
            )
        return values
