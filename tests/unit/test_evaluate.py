"""`evaluate`: the table's statistics, skip rules, outputs and command line (a fake scorer, then the real engine)."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from saliency_service.cli import main
from saliency_service.evaluation import CannotRun, Catalog, Plan, UnknownIds, evaluate
from saliency_service.evaluation.aggatt import aggatt_bins
from saliency_service.evaluation.run import ProgressFn, select
from saliency_service.evaluation.table import COLUMNS, rank_matrix, summarise
from saliency_service.shapes.generator import LABELS


class FakeScorer:
    """Values are the image index plus a per-(method, metric) offset; `mask_metric` needs masks, `foil_metric` a foil."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bool]] = []
        self.supplied: list[tuple[str, str, bool]] = []
        self.explained: list[tuple[str, int]] = []

    def catalog(self) -> Catalog:
        return Catalog(
            methods={"a": frozenset({"steps"}), "rise": frozenset({"masks"}), "b": frozenset()},
            metrics={"up": True, "down": False, "mask_metric": True, "foil_metric": True, "method_metric": False},
            labels={"shapes": LABELS},
        )

    def score(
        self,
        model: str,
        images: np.ndarray,
        method: str,
        metric: str,
        *,
        method_params: Mapping[str, Any],
        metric_params: Mapping[str, Any],
        masks: np.ndarray | None,
        seed: int,
        progress: ProgressFn,
        saliency: np.ndarray | None = None,
    ) -> list[float]:
        self.calls.append((method, metric, masks is not None))
        self.supplied.append((method, metric, saliency is not None))
        if metric == "method_metric" and saliency is not None:
            raise CannotRun("METHOD_REQUIRED_FOR_METRIC", "send the method")
        if saliency is not None:
            assert saliency.shape == (len(images), *images.shape[1:3])
        if metric == "foil_metric":
            raise CannotRun("FOIL_REQUIRED", "send a foil")
        if metric == "mask_metric" and masks is None:
            raise CannotRun("MASKS_REQUIRED", "send masks")
        if metric != "mask_metric" and masks is not None:
            raise CannotRun("MASKS_NOT_USED", "drop masks")
        progress("passes", len(images), len(images))
        return [float(i) + (10.0 if metric == "up" else 0.0) + len(method_params) for i in range(len(images))]

    def explain(self, model: str, images: np.ndarray, method: str, *, method_params: Mapping[str, Any], seed: int) -> list[np.ndarray]:
        self.explained.append((method, len(images)))
        return [np.ones(images.shape[1:3], np.float32) for _ in images]


def _read(path: Path) -> list[dict[str, str]]:
    with path.open() as file:
        reader = csv.DictReader(file)
        assert tuple(reader.fieldnames or ()) == COLUMNS
        return list(reader)


def test_fake_evaluation_writes_tables_and_lists_skipped(tmp_path: Path) -> None:
    scorer = FakeScorer()
    result = evaluate(scorer, Plan(n=5, batch=2, aggatt="up"), tmp_path, log=open(tmp_path / "log", "w"))
    rows = _read(tmp_path / "table.csv")
    metrics = ("down", "mask_metric", "method_metric", "up")
    assert {(r["method"], r["metric"]) for r in rows} == {(m, k) for m in ("a", "b", "rise") for k in metrics}
    for row in rows:
        assert float(row["ci_low"]) <= float(row["mean"]) <= float(row["ci_high"]) and row["n"] == "5"
    # rise gets the light default (masks=256): one parameter shifts its values (0, 1 | 0, 1 | 0 by batch) by 1.
    assert next(float(r["mean"]) for r in rows if r["method"] == "rise" and r["metric"] == "down") == pytest.approx(1.4)
    assert {(s.method, s.metric) for s in result.skipped} == {("a", "foil_metric"), ("b", "foil_metric"), ("rise", "foil_metric")}
    text = (tmp_path / "table.md").read_text()
    assert "| method | down ↓ | mask_metric ↑ | method_metric ↓ | up ↑ |" in text and "FOIL_REQUIRED: send a foil" in text
    assert "rise {masks=256}" in text and "bootstrap percentile" in text
    assert (tmp_path / "table.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.glob("aggatt_*.png")) == ["aggatt_a.png", "aggatt_b.png", "aggatt_rise.png"]
    # Masks are tried once per metric that takes none, then no longer sent.
    assert scorer.calls.count(("b", "up", True)) == 0 and scorer.calls.count(("a", "up", True)) == 1


def test_a_failure_after_the_first_batch_is_an_error(tmp_path: Path) -> None:
    class Flaky(FakeScorer):
        def score(self, model: str, images: np.ndarray, method: str, metric: str, **kwargs: Any) -> list[float]:
            if len(self.calls) >= 2:
                raise CannotRun("SOMETHING", "broke halfway")
            return super().score(model, images, method, metric, **kwargs)

    with pytest.raises(CannotRun):
        evaluate(Flaky(), Plan(n=4, batch=2, methods="b", metrics="down"), tmp_path, log=open(tmp_path / "log", "w"))


def test_select_names_the_available_ids() -> None:
    assert select("all", ["b", "a"], "method") == ["a", "b"]
    assert select("b, a,b", ["a", "b"], "method") == ["b", "a"]
    with pytest.raises(UnknownIds, match="unknown metric nope; available: a, b"):
        select("a,nope", ["a", "b"], "metric")


def test_summarise_is_seeded_and_counts_finite_values() -> None:
    values = [1.0, 2.0, 3.0, float("nan"), 10.0]
    row = summarise("m", "k", values, seed=3)
    assert row == summarise("m", "k", values, seed=3)
    assert (row.mean, row.n) == (4.0, 4) and row.ci_low <= 4.0 <= row.ci_high
    single = summarise("m", "k", [2.0], seed=0)
    assert (single.mean, single.ci_low, single.ci_high, single.n) == (2.0, 2.0, 2.0, 1)


def test_rank_matrix_respects_the_direction() -> None:
    grid = np.array([[1.0, 1.0], [3.0, 3.0], [np.nan, 2.0]])
    np.testing.assert_allclose(rank_matrix(grid, [True, False]), [[0.0, 1.0], [1.0, 0.0], [np.nan, 0.5]])


def test_aggatt_bins_sort_best_first_and_average_positive_maps() -> None:
    maps = np.stack([np.full((2, 2), float(i) - 1) for i in range(100)])
    bins = aggatt_bins(maps, np.arange(100.0))
    assert [b.count for b in bins] == [2, 3, 45, 45, 3, 2]
    np.testing.assert_allclose(bins[0].mean_map, 97.5)  # maps 98 and 99, minus 1
    np.testing.assert_allclose(bins[-1].mean_map, 0.0)  # maps 0 and 1: -1 and 0, clipped to 0


def test_cli_evaluate_on_the_shipped_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["evaluate", "--n", "4", "--batch", "2", "--methods", "saliency,grad_cam", "--metrics", "deletion,grid_pointing_game"]
    assert main([*args, "--metric-param", "deletion.step=2048", "--out", str(tmp_path)]) == 0
    rows = _read(tmp_path / "table.csv")
    assert [(r["method"], r["metric"], r["n"]) for r in rows] == [("saliency", "deletion", "4"), ("grad_cam", "deletion", "4")]
    assert all(float(r["ci_low"]) <= float(r["mean"]) <= float(r["ci_high"]) for r in rows)
    assert (tmp_path / "table.png").is_file() and "MODEL_HAS_NO_GRID" in (tmp_path / "table.md").read_text()
    err = capsys.readouterr().err
    assert "[1/4] saliency x deletion: 4/4 images" in err and "skipped (MODEL_HAS_NO_GRID" in err


def test_cli_evaluate_unknown_id_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--n", "2", "--methods", "saliency,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown method nope; available:" in err and "grad_cam" in err
    assert not (tmp_path / "table.csv").exists()


def test_maps_are_made_once_per_method_and_batch_and_sent_to_metrics_that_only_read_them(tmp_path: Path) -> None:
    scorer = FakeScorer()
    evaluate(scorer, Plan(n=4, batch=2, methods="a,b", metrics="up,down,method_metric"), tmp_path, log=open(tmp_path / "log", "w"))
    # Two batches per method, each explained once, whatever the number of metrics.
    assert scorer.explained == [("a", 2), ("a", 2), ("b", 2), ("b", 2)]
    final = {(method, metric): supplied for method, metric, supplied in scorer.supplied}
    assert final[("a", "up")] and final[("b", "down")], "metrics that read the map get the cached maps"
    assert not final[("a", "method_metric")] and not final[("b", "method_metric")], "a metric that re-explains gets the method"
    # The refusal is remembered: after its first call (refused, then refused again for the masks it takes
    # none of), method_metric never gets maps again: 3 calls for the first batch, 1 for each of the other 3.
    sent = [supplied for method, metric, supplied in scorer.supplied if metric == "method_metric"]
    assert sent == [True, False, False, False, False, False]
