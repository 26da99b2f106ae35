"""The command-line options of an evaluation, shared by `saliency-service evaluate` and `saliency evaluate`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from saliency_service.evaluation.run import Plan


def plan_from(args: argparse.Namespace) -> Plan:
    """The evaluation plan from the arguments `add_evaluate_arguments` declares (shared with the client's command)."""

    def grouped(pairs: Sequence[tuple[str, str, object]]) -> dict[str, dict[str, object]]:
        result: dict[str, dict[str, object]] = {}
        for owner, key, value in pairs:
            result.setdefault(owner, {})[key] = value
        return result

    return Plan(
        model=args.model,
        methods=args.methods,
        metrics=args.metrics,
        n=args.n,
        seed=args.seed,
        batch=args.batch,
        method_params=grouped(args.method_param),
        metric_params=grouped(args.metric_param),
        aggatt=args.aggatt,
    )


def _owned_param(text: str) -> tuple[str, str, object]:
    """`owner.key=value` (e.g. rise.masks=512); the value is JSON when it parses, else text."""
    name, separator, raw = text.partition("=")
    owner, dot, key = name.partition(".")
    if not separator or not dot or not owner or not key:
        raise argparse.ArgumentTypeError(f"expected owner.key=value (e.g. rise.masks=512), got {text!r}")
    try:
        value: object = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return owner, key, value


def add_evaluate_arguments(command: argparse.ArgumentParser) -> None:
    """The options of `saliency-service evaluate` and `saliency evaluate`."""
    command.add_argument("--model", default="shapes", help="shapes, or shapes_grid (default: shapes)")
    command.add_argument("--methods", default="all", help="'all' or a comma list of method ids")
    command.add_argument("--metrics", default="all", help="'all' or a comma list of metric ids")
    command.add_argument("--n", type=int, default=200, help="held-out images (default: 200)")
    command.add_argument("--out", type=Path, required=True, help="folder for table.csv, table.md, table.png")
    command.add_argument("--seed", type=int, default=0, help="seed of the methods, metrics and bootstrap (default: 0)")
    command.add_argument("--batch", type=int, default=25, help="images per Score call (default: 25)")
    command.add_argument(
        "--method-param",
        type=_owned_param,
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="override a method parameter (the defaults are light for rise, integrated_gradients and occlusion)",
    )
    command.add_argument("--metric-param", type=_owned_param, action="append", default=[], metavar="METRIC.KEY=VALUE")
    command.add_argument(
        "--aggatt",
        default="auto",
        help="metric whose values bin the AggAtt maps (aggatt_<method>.png); 'auto': grid_pointing_game on shapes_grid; '' off",
    )
