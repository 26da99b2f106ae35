from __future__ import annotations

from pathlib import Path

import pytest

from saliency_service.config import EMBEDDED_REPOSITORY, Settings
from saliency_service.core.errors import InvalidArgument, NotFound
from saliency_service.core.params import ParamSpec, resolve_params

SPECS = (
    ParamSpec("steps", "int", 50, "steps", minimum=1, maximum=1024),
    ParamSpec("sigma", "float", 0.1, "noise", minimum=0.0),
    ParamSpec("rule", "string", "a", "rule", choices=("a", "b")),
    ParamSpec("center", "bool", False, "centre"),
)


def test_defaults_filled_and_values_coerced() -> None:
    assert resolve_params(SPECS, {}, "m") == {"steps": 50, "sigma": 0.1, "rule": "a", "center": False}
    resolved = resolve_params(SPECS, {"steps": 32.0, "sigma": 1, "rule": "b", "center": True}, "m")
    assert resolved == {"steps": 32, "sigma": 1.0, "rule": "b", "center": True}
    assert isinstance(resolved["steps"], int)


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        ({"steps": 0}, "PARAMETER_OUT_OF_RANGE"),
        ({"steps": 2000}, "PARAMETER_OUT_OF_RANGE"),
        ({"steps": 2.5}, "INVALID_PARAMETER"),
        ({"steps": "many"}, "INVALID_PARAMETER"),
        ({"steps": True}, "INVALID_PARAMETER"),
        ({"sigma": float("nan")}, "INVALID_PARAMETER"),
        ({"sigma": -1.0}, "PARAMETER_OUT_OF_RANGE"),
        ({"rule": "c"}, "INVALID_PARAMETER"),
        ({"center": 1}, "INVALID_PARAMETER"),
    ],
)
def test_bad_values_are_invalid_argument_naming_the_parameter(given: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolve_params(SPECS, given, "method 'm'")
    assert caught.value.reason == reason
    assert next(iter(given)) in caught.value.message
    assert caught.value.metadata["parameter"] == next(iter(given))


def test_unknown_parameter_is_not_found_listing_known_ones() -> None:
    with pytest.raises(NotFound) as caught:
        resolve_params(SPECS, {"stepz": 3}, "method 'm'")
    assert caught.value.reason == "UNKNOWN_PARAMETER"
    assert "steps" in caught.value.message


def test_settings_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    file = tmp_path / "settings.toml"
    file.write_text('port = 1111\nworkers = 3\nlog_format = "text"\n')
    settings = Settings.load(flags={"port": 3333, "metrics_port": None}, env={"SALIENCY_PORT": "2222", "SALIENCY_WORKERS": "5"}, file=file)
    assert settings.port == 3333
    assert settings.workers == 5
    assert settings.log_format == "text"
    assert settings.metrics_port == 9090
    assert Settings.load().model_repository == EMBEDDED_REPOSITORY


def test_settings_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="port"):
        Settings.load(env={"SALIENCY_PORT": "fifty"})
    file = tmp_path / "s.toml"
    file.write_text("prot = 1\n")
    with pytest.raises(InvalidArgument, match="prot"):
        Settings.load(file=file)
    with pytest.raises(InvalidArgument, match="prefer_cuda"):
        Settings.load(env={"SALIENCY_PREFER_CUDA": "maybe"})
