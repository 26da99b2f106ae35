"""The `saliency` command's score and evaluate subcommands against the in-process server."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saliency_client._cli import main
from saliency_service.shapes.generator import Sample


def test_score_prints_values_and_a_progress_bar(
    address: str, samples: list[Sample], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = []
    for i, sample in enumerate(samples[:2]):
        paths.append(tmp_path / f"image{i}.png")
        Image.fromarray(sample.image).save(paths[-1])
    argv = ["score", *map(str, paths), "--server", address, "--method", "saliency", "--metric", "deletion", "--param", "step=1024"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{paths[0]}: deletion = ") and "lower is better" in lines[0]
    # The bar is redrawn in place on stderr as progress streams in, and ends full.
    assert "\rsaliency x deletion [" in captured.err and "perturbation passes 34/34" in captured.err


def test_score_with_an_unknown_metric_is_an_error(
    address: str, samples: list[Sample], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "image.png"
    Image.fromarray(samples[0].image).save(path)
    assert main(["score", str(path), "--server", address, "--metric", "nope"]) == 1
    assert "unknown metric 'nope'" in capsys.readouterr().err


def test_evaluate_through_the_server(address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["evaluate", "--server", address, "--n", "2", "--methods", "saliency", "--metrics", "deletion,insertion"]
    assert main([*argv, "--metric-param", "deletion.step=2048", "--metric-param", "insertion.step=2048", "--out", str(tmp_path)]) == 0
    with (tmp_path / "table.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(r["method"], r["metric"], r["n"]) for r in rows] == [("saliency", "deletion", "2"), ("saliency", "insertion", "2")]
    assert all(np.isfinite(float(r["mean"])) for r in rows)
    err = capsys.readouterr().err
    assert "perturbation passes" in err and "[2/2] saliency x insertion: 2/2 images" in err
    assert "step=2048" in (tmp_path / "table.md").read_text()
