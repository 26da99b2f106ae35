"""An in-process server on port 0, on its own thread and event loop, serving the shipped `shapes`
model plus a deliberately broken model; tests talk to it with the real client."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from saliency_client import SaliencyClient
from saliency_service.api.server import SaliencyServer
from saliency_service.config import EMBEDDED_REPOSITORY, Settings
from saliency_service.shapes.generator import HELDOUT_SEED_OFFSET, Sample, generate

torch.set_num_threads(1)
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
MAX_BATCH_IMAGES = 8


@dataclass
class RunningServer:
    server: SaliencyServer
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def call(self, coroutine: object) -> object:
        """Run a coroutine on the server's loop (e.g. to stop it)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)  # type: ignore[arg-type]


def start_server(settings: Settings) -> RunningServer:
    loop = asyncio.new_event_loop()
    server = SaliencyServer(settings)
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as exc:  # surfaced to the test below
            failure.append(exc)
            started.set()
            return
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="test-server", daemon=True)
    thread.start()
    started.wait(timeout=120)
    if failure:
        raise failure[0]
    return RunningServer(server, loop, thread)


def stop_server(running: RunningServer) -> None:
    running.call(running.server.stop(grace=1.0))
    running.loop.call_soon_threadsafe(running.loop.stop)
    running.thread.join(timeout=30)


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    shutil.copytree(EMBEDDED_REPOSITORY / "shapes", root / "shapes")
    shutil.copytree(EMBEDDED_REPOSITORY / "vit_shapes", root / "vit_shapes")
    broken = root / "broken"
    shutil.copytree(EMBEDDED_REPOSITORY / "shapes", broken)
    (broken / "config.json").write_text((broken / "config.json").read_text().replace('"name": "shapes"', '"name": "broken"'))
    (broken / "model.onnx").write_bytes(b"truncated")
    return root


@pytest.fixture(scope="session")
def running(model_repository: Path) -> Iterator[RunningServer]:
    settings = Settings(
        model_repository=model_repository,
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        workers=2,
        max_message_bytes=MAX_MESSAGE_BYTES,
        max_batch_images=MAX_BATCH_IMAGES,
        grace_seconds=1.0,
    )
    server = start_server(settings)
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def address(running: RunningServer) -> str:
    return running.address


@pytest.fixture()
def client(address: str) -> Iterator[SaliencyClient]:
    with SaliencyClient(address, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def samples() -> list[Sample]:
    """Held-out generated images the model never saw in training."""
    return [generate(HELDOUT_SEED_OFFSET + 500_000 + i) for i in range(6)]


@pytest.fixture(scope="session")
def image(samples: list[Sample]) -> np.ndarray:
    return samples[0].image
