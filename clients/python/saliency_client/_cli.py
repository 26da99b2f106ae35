"""The `saliency` command: explain an image to a PNG overlay, score maps, evaluate, list models, list methods."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ._client import SaliencyClient
from ._errors import SaliencyError
from ._overlay import overlay
from ._progress import ProgressBar
from ._types import Explanation, MethodInfo, ParameterInfo

_DEFAULT_SERVER = "localhost:50051"


def _parse_param(text: str) -> tuple[str, Any]:
    """`key=value`, the value read as JSON when it parses (`32`, `true`, `[1, 2]`), else as text."""
    key, separator, raw = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def _parse_target(text: str) -> int | str:
    """A class index when the text is an integer, else a label."""
    try:
        return int(text)
    except ValueError:
        return text


def _parser() -> argparse.ArgumentParser:
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--server",
        default=os.environ.get("SALIENCY_SERVER", _DEFAULT_SERVER),
        help=f"HOST:PORT of the service (default: $SALIENCY_SERVER or {_DEFAULT_SERVER})",
    )
    connection.add_argument("--timeout", type=float, default=60.0, help="seconds per call (default: 60)")

    parser = argparse.ArgumentParser(prog="saliency", description="Client of the saliency service.")
    commands = parser.add_subparsers(dest="command", required=True)

    explain = commands.add_parser(
        "explain", parents=[connection], help="explain an image's prediction, write an overlay and a verbalization"
    )
    explain.add_argument("image", help="image file (any format Pillow reads)")
    explain.add_argument("--model", default="shapes")
    explain.add_argument("--method", default="grad_cam")
    explain.add_argument("--out", default="overlay.png", help="overlay PNG to write (default: overlay.png)")
    explain.add_argument("--target", type=_parse_target, default=None, help="class label or index (default: predicted)")
    explain.add_argument("--layer", default=None, help="layer for CAM methods (default: the model's)")
    explain.add_argument(
        "--param",
        type=_parse_param,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method parameter; the value is JSON when it parses (steps=32, center=true), else text",
    )

    score = commands.add_parser(
        "score", parents=[connection], help="score a method's maps of images by a metric, with a progress bar on stderr"
    )
    score.add_argument("images", nargs="+", help="image files (any format Pillow reads)")
    score.add_argument("--model", default="shapes")
    score.add_argument("--method", default="grad_cam")
    score.add_argument("--metric", default="deletion")
    score.add_argument("--target", type=_parse_target, default=None, help="class label or index (default: predicted)")
    score.add_argument("--layer", default=None, help="layer for CAM methods (default: the model's)")
    score.add_argument("--mask", action="append", default=[], help="ground-truth mask image per image (nonzero on the object)")
    score.add_argument("--seed", type=int, default=0)
    score.add_argument("--param", type=_parse_param, action="append", default=[], metavar="KEY=VALUE", help="metric parameter")
    score.add_argument("--method-param", type=_parse_param, action="append", default=[], metavar="KEY=VALUE", help="method parameter")
    score.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = commands.add_parser(
        "evaluate",
        parents=[connection],
        help="every method x every metric on held-out shapes images through the server: table.csv, table.md, table.png",
    )
    _add_evaluate_arguments(evaluate)

    commands.add_parser("models", parents=[connection], help="list the models and whether they are ready")
    commands.add_parser("methods", parents=[connection], help="list methods, metrics and templates with parameters")
    return parser


def _explain(client: SaliencyClient, args: argparse.Namespace) -> None:
    try:
        with Image.open(args.image) as picture:
            image = np.asarray(picture.convert("RGB"), dtype=np.uint8)
    except OSError as error:
        raise _UsageError(f"cannot read image {args.image}: {error}") from error
    params = dict(args.param)
    [explanation] = client.explain(args.model, image, args.method, args.target, params, layer=args.layer)
    Image.fromarray(overlay(image, explanation.saliency)).save(args.out, format="PNG")
    [verbalization] = client.verbalize(args.model, image, args.method, args.target, method_params=params, layer=args.layer)
    print(verbalization.text)
    print(
        f"target: {explanation.label} (index {explanation.target}) p={_probability(explanation, explanation.target):.3f}; "
        f"predicted: {explanation.predicted_label} p={_probability(explanation, explanation.predicted):.3f}; "
        f"overlay: {args.out}"
    )


def _read_image(path: str, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as picture:
            return np.asarray(picture.convert(mode))
    except OSError as error:
        raise _UsageError(f"cannot read image {path}: {error}") from error


def _score(client: SaliencyClient, args: argparse.Namespace) -> None:
    images = [_read_image(path, "RGB") for path in args.images]
    masks = [_read_image(path, "L") for path in args.mask] or None
    bar = None if args.no_progress else ProgressBar(f"{args.method} x {args.metric}")
    try:
        results = client.score(
            args.model,
            images,
            args.method,
            args.metric,
            args.target,
            dict(args.param),
            method_params=dict(args.method_param),
            layer=args.layer,
            masks=masks,
            seed=args.seed,
            progress=bar,
        )
    finally:
        if bar is not None:
            bar.close()
    direction = "higher" if results and results[0].higher_is_better else "lower"
    for path, result in zip(args.images, results, strict=True):
        print(f"{path}: {result.metric} = {result.value:.6g} ({direction} is better; target {result.label})")


def _add_evaluate_arguments(command: argparse.ArgumentParser) -> None:
    """The service's evaluation options; the command then needs the saliency_service package (same distribution)."""
    try:
        from saliency_service.evaluation.arguments import add_evaluate_arguments
    except ImportError:  # pragma: no cover - a client installed without the service package
        command.set_defaults(evaluation_missing=True)
        return
    add_evaluate_arguments(command)


def _evaluate(client: SaliencyClient, args: argparse.Namespace) -> None:
    if getattr(args, "evaluation_missing", False):
        raise _UsageError("`saliency evaluate` needs the saliency_service package (the shapes generator and the table writer)")
    from saliency_service.evaluation import UnknownIds, evaluate
    from saliency_service.evaluation.arguments import plan_from
    from saliency_service.evaluation.remote import ClientScorer

    bar = ProgressBar()
    try:
        evaluate(ClientScorer(client), plan_from(args), args.out, progress=bar)
    except UnknownIds as error:
        raise _UsageError(str(error)) from None
    print(f"wrote {args.out / 'table.csv'}, table.md and table.png")


def _probability(explanation: Explanation, index: int) -> float:
    probabilities = explanation.probabilities
    return float(probabilities[index]) if 0 <= index < probabilities.size else float("nan")


def _models(client: SaliencyClient) -> None:
    rows = [("NAME", "VERSION", "READY", "REASON")]
    rows += [(m.name, m.version, "yes" if m.ready else "no", m.reason) for m in client.list_models()]
    name_width = max(len(row[0]) for row in rows)
    version_width = max(len(row[1]) for row in rows)
    for name, version, ready, reason in rows:
        print(f"{name:<{name_width}}  {version:<{version_width}}  {ready:<5}  {reason}".rstrip())


def _describe_parameter(parameter: ParameterInfo) -> str:
    text = f"{parameter.name}: {parameter.type} = {json.dumps(parameter.default)}"
    if parameter.minimum is not None or parameter.maximum is not None:
        low = "" if parameter.minimum is None else f"{parameter.minimum:g}"
        high = "" if parameter.maximum is None else f"{parameter.maximum:g}"
        text += f" in [{low}, {high}]"
    if parameter.choices:
        text += f" one of {{{', '.join(parameter.choices)}}}"
    return f"{text}  {parameter.description}".rstrip()


def _describe_entry(entry: MethodInfo) -> str:
    notes = []
    if entry.family:
        notes.append(entry.family)
    if entry.uses_layer:
        notes.append("uses a layer")
    if entry.higher_is_better is not None:
        notes.append("higher is better" if entry.higher_is_better else "lower is better")
    head = f"  {entry.name}" + (f" ({', '.join(notes)})" if notes else "")
    lines = [f"{head}: {entry.description}" if entry.description else head]
    lines += [f"      {_describe_parameter(p)}" for p in entry.parameters]
    return "\n".join(lines)


def _methods(client: SaliencyClient) -> None:
    catalog = client.list_methods()
    for title, entries in (("methods", catalog.methods), ("metrics", catalog.metrics), ("templates", catalog.templates)):
        print(f"{title}:")
        for entry in entries:
            print(_describe_entry(entry))


class _UsageError(Exception):
    """A local problem (an unreadable image) reported like a failed call, without a traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `saliency` command; 0 on success, 1 on an error (printed as `error: CODE REASON: message`)."""
    args = _parser().parse_args(argv)
    try:
        with SaliencyClient(args.server, timeout=args.timeout) as client:
            if args.command == "explain":
                _explain(client, args)
            elif args.command == "score":
                _score(client, args)
            elif args.command == "evaluate":
                _evaluate(client, args)
            elif args.command == "models":
                _models(client)
            else:
                _methods(client)
    except (SaliencyError, _UsageError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
