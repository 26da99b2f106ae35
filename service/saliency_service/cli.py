"""`saliency-service serve | export | evaluate | shapes-eval | lp-cam-prototypes`."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from saliency_service.core.errors import SaliencyError

log = logging.getLogger("saliency_service")


def _serve(args: argparse.Namespace) -> int:
    import prometheus_client
    import torch

    from saliency_service import logs
    from saliency_service.api.server import SaliencyServer
    from saliency_service.config import Settings

    settings = Settings.load(
        flags={"model_repository": args.model_repository, "port": args.port, "metrics_port": args.metrics_port, "host": args.host},
        env=os.environ,
        file=args.config,
    )
    logs.configure(settings.log_level, settings.log_format)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if settings.metrics_port:
        prometheus_client.start_http_server(settings.metrics_port)
        log.info("Prometheus metrics on port %d", settings.metrics_port)

    async def run() -> int:
        server = SaliencyServer(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        await stop.wait()
        log.info("shutdown requested: NOT_SERVING, draining in-flight requests for up to %.0f s", settings.grace_seconds)
        await server.stop()
        return 0

    return asyncio.run(run())


def _export(args: argparse.Namespace) -> int:
    import torch

    from saliency_service.core.models.export import export_model

    module_name, _, factory_name = args.module.partition(":")
    if not factory_name:
        raise SystemExit("--module must be 'package.module:factory' (a callable returning the nn.Module)")
    sys.path.insert(0, os.getcwd())
    module = getattr(importlib.import_module(module_name), factory_name)()
    if args.weights:
        module.load_state_dict(torch.load(args.weights, weights_only=True))
    labels = Path(args.labels_file).read_text().split() if args.labels_file else args.labels.split(",")
    channels, height, width = (int(v) for v in args.input_size.split(","))
    folder = export_model(
        module,
        torch.zeros(1, channels, height, width),
        args.repository,
        args.name,
        labels=labels,
        layers=[layer for layer in args.layers.split(",") if layer],
        mean=[float(v) for v in args.mean.split(",")],
        std=[float(v) for v in args.std.split(",")],
        version=args.version,
        overwrite=args.overwrite,
    )
    print(f"exported {args.name} to {folder}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from saliency_service.config import Settings
    from saliency_service.core.engine import Engine
    from saliency_service.core.images import ImageLimits
    from saliency_service.core.models.model import RuntimeOptions
    from saliency_service.core.models.repository import ModelRepository
    from saliency_service.evaluation import UnknownIds, evaluate
    from saliency_service.evaluation.arguments import plan_from
    from saliency_service.evaluation.local import EngineScorer

    settings = Settings.load(flags={"model_repository": args.model_repository}, env=os.environ, file=args.config)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    repository = ModelRepository(settings.model_repository, RuntimeOptions.from_settings(settings))
    repository.load_all()
    engine = Engine(repository, ImageLimits(max_images=max(args.batch, 1), max_pixels=settings.max_image_pixels))
    try:
        evaluate(EngineScorer(engine), plan_from(args), args.out)
    except UnknownIds as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out / 'table.csv'}, table.md and table.png")
    return 0


def _shapes_eval(args: argparse.Namespace) -> int:
    from saliency_service.shapes.report import run_report

    run_report(args.model_repository, n=args.n, seed_offset=args.seed_offset)
    return 0


def _lp_cam_prototypes(args: argparse.Namespace) -> int:
    import numpy as np

    from saliency_service.core.images import to_model_input
    from saliency_service.core.methods.lp_cam import build_prototypes, prototype_file
    from saliency_service.core.models.model import LoadedModel, RuntimeOptions
    from saliency_service.shapes.generator import LABELS, generate_batch, train_seeds

    folder = args.model_repository / args.model
    model = LoadedModel.load(folder, RuntimeOptions(prefer_cuda=False))
    if tuple(model.config.labels) != tuple(LABELS):
        raise SystemExit(
            f"lp-cam-prototypes draws its images from the shapes generator, so it serves models with the generator's labels "
            f"({', '.join(LABELS)}); model '{args.model}' has others: call saliency_service.core.methods.lp_cam.build_prototypes"
            "(model, images, layer, k, labels=...) on its training images"
        )
    layer: str = args.layer or model.config.default_layer or ""
    model.config.layer(layer)
    images, labels, _ = generate_batch(train_seeds(args.n, start=args.start))
    decoded = [np.asarray(image, dtype=np.float32) / 255.0 for image in images]
    prototypes = build_prototypes(model, to_model_input(decoded, model.config.input), layer, args.k, labels=labels, seed=args.seed)
    path = prototype_file(folder, layer)
    prototypes.save(path)
    classes = ", ".join(
        f"{label} {int((prototypes.classes == c).sum() - prototypes.context[prototypes.classes == c].sum())}"
        f"+{int(prototypes.context[prototypes.classes == c].sum())}"
        for c, label in enumerate(model.config.labels)
    )
    print(f"wrote {len(prototypes.prototypes)} prototypes (class+context per class: {classes}) to {path} ({path.stat().st_size} bytes)")
    return 0


def parser() -> argparse.ArgumentParser:
    from saliency_service.config import EMBEDDED_REPOSITORY
    from saliency_service.evaluation.arguments import add_evaluate_arguments

    root = argparse.ArgumentParser(prog="saliency-service", description="Explain, score and verbalize vision models over gRPC.")
    commands = root.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a model repository over gRPC")
    serve.add_argument(
        "--model-repository", type=Path, default=None, help=f"model repository folder (default: the embedded one, {EMBEDDED_REPOSITORY})"
    )
    serve.add_argument("--port", type=int, default=None, help="gRPC port (default 50051)")
    serve.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default 9090; 0 disables)")
    serve.add_argument("--host", default=None, help="bind address (default [::])")
    serve.add_argument("--config", type=Path, default=None, help="a TOML settings file (flags > SALIENCY_* environment > file > defaults)")
    serve.set_defaults(run=_serve)

    export = commands.add_parser("export", help="write a model-repository entry from a torch nn.Module")
    export.add_argument("--module", required=True, help="'package.module:factory', a callable returning the nn.Module")
    export.add_argument("--weights", help="a state dict to load (loaded with weights_only=True)")
    export.add_argument("--name", required=True)
    export.add_argument("--repository", required=True, type=Path)
    export.add_argument("--input-size", required=True, help="C,H,W, e.g. 3,224,224")
    export.add_argument("--labels", default="", help="comma-separated labels")
    export.add_argument("--labels-file", help="one label per line")
    export.add_argument("--layers", default="", help="comma-separated module paths that CAM methods may use, e.g. layer4")
    export.add_argument("--mean", default="0,0,0")
    export.add_argument("--std", default="1,1,1")
    export.add_argument("--version", default="1")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(run=_export)

    evaluate = commands.add_parser("evaluate", help="every method x every metric on held-out shapes images: a table (CSV, markdown, plot)")
    evaluate.add_argument(
        "--model-repository", type=Path, default=None, help=f"model repository folder (default: the embedded one, {EMBEDDED_REPOSITORY})"
    )
    evaluate.add_argument(
        "--config", type=Path, default=None, help="a TOML settings file (flags > SALIENCY_* environment > file > defaults)"
    )
    add_evaluate_arguments(evaluate)
    evaluate.set_defaults(run=_evaluate)

    report = commands.add_parser("shapes-eval", help="held-out accuracy and Grad-CAM localisation of the `shapes` model")
    report.add_argument("--model-repository", type=Path, default=EMBEDDED_REPOSITORY)
    report.add_argument("--n", type=int, default=1000, help="held-out images")
    report.add_argument("--seed-offset", type=int, default=0, help="added to the first held-out seed")
    report.set_defaults(run=_shapes_eval)

    lp_cam = commands.add_parser("lp-cam-prototypes", help="build LP-CAM's class and context prototypes for a model (shapes)")
    lp_cam.add_argument("--model-repository", type=Path, default=EMBEDDED_REPOSITORY)
    lp_cam.add_argument("--model", default="shapes", help="the model (its images come from the shapes generator)")
    lp_cam.add_argument("--layer", default="", help="a declared layer (default: the model's last)")
    lp_cam.add_argument("--n", type=int, default=600, help="training images generated (seeded)")
    lp_cam.add_argument("--start", type=int, default=0, help="index of the first training seed")
    lp_cam.add_argument("--k", type=int, default=12, help="k-means centres per class and pool")
    lp_cam.add_argument("--seed", type=int, default=0, help="k-means seed")
    lp_cam.set_defaults(run=_lp_cam_prototypes)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.run(args))
    except SaliencyError as error:
        print(f"error: {error.reason}: {error.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
