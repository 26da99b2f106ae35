"""The model repository: a folder with one sub-folder per model (Triton/KServe shape)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from saliency_service.core.errors import FailedPrecondition, NotFound, SaliencyError
from saliency_service.core.models.config import CONFIG_FILE, ModelConfig, valid_model_name
from saliency_service.core.models.model import LoadedModel, PassObserver, RuntimeOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelStatus:
    """A model's load state: ready with its loaded model, or not ready with the reason."""

    name: str
    ready: bool
    reason: str = ""
    model: LoadedModel | None = None
    config: ModelConfig | None = None


class ModelRepository:
    """Loads every model at start; a model that fails is NOT READY with a reason, the rest serve."""

    def __init__(self, root: Path, options: RuntimeOptions = RuntimeOptions(), observer: PassObserver | None = None) -> None:
        self.root = Path(root)
        self.options = options
        self.observer = observer
        self._models: dict[str, ModelStatus] = {}

    def load_all(self) -> list[ModelStatus]:
        if not self.root.is_dir():
            raise FailedPrecondition("REPOSITORY_MISSING", f"model repository {self.root} is not a folder", {"path": str(self.root)})
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            self._models[folder.name] = self._load(folder)
        return self.statuses()

    def _load(self, folder: Path) -> ModelStatus:
        name = folder.name
        if not valid_model_name(name):
            return ModelStatus(name, False, f"'{name}' is not a valid model name")
        if not (folder / CONFIG_FILE).is_file():
            return ModelStatus(name, False, f"{folder / CONFIG_FILE} is missing")
        try:
            model = LoadedModel.load(folder, self.options, self.observer)
        except SaliencyError as exc:
            log.warning("model %s is not ready: %s", name, exc.message)
            config = None
            try:
                config = ModelConfig.load(folder)
            except SaliencyError:
                pass
            return ModelStatus(name, False, exc.message, None, config)
        log.info(
            "model %s version %s ready (onnxruntime on %s; passes of at most %d items: %.1f MiB of activations per item, %.0f MiB a pass)",
            name,
            model.config.version,
            model.onnx.device,
            model.max_batch,
            model.item_bytes / 2**20,
            model.pass_budget / 2**20,
        )
        return ModelStatus(name, True, "", model, model.config)

    def statuses(self) -> list[ModelStatus]:
        return [self._models[name] for name in sorted(self._models)]

    def status(self, name: str) -> ModelStatus:
        if not valid_model_name(name) or name not in self._models:
            raise NotFound(
                "MODEL_NOT_FOUND",
                f"no model named '{name}' in the repository; available: {', '.join(sorted(self._models)) or 'none'}",
                {"model": name},
            )
        return self._models[name]

    def get(self, name: str) -> LoadedModel:
        """The ready model called `name`: NOT_FOUND if unknown, FAILED_PRECONDITION if not ready."""
        status = self.status(name)
        if status.model is None:
            raise FailedPrecondition("MODEL_NOT_READY", f"model '{name}' is not ready: {status.reason}", {"model": name})
        return status.model
