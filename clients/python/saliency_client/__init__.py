"""Typed Python client of the saliency service: explain, score and verbalize vision models' predictions.

    from saliency_client import SaliencyClient, overlay

    with SaliencyClient("localhost:50051") as client:
        [explanation] = client.explain("shapes", image, method="grad_cam")  # image: HxWx3 uint8
        print(explanation.label, explanation.probabilities[explanation.target])
        heatmap = overlay(image, explanation.saliency)

`AsyncSaliencyClient` offers the same methods as coroutines. Failed calls raise a `SaliencyError`
subclass carrying the gRPC code, the server's UPPER_SNAKE reason, the message and metadata.
"""

from ._client import AsyncSaliencyClient, SaliencyClient
from ._codec import ImageLike
from ._errors import (
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SaliencyError,
    UnauthenticatedError,
    UnavailableError,
)
from ._overlay import overlay
from ._types import (
    Explanation,
    Fact,
    InputInfo,
    LayerInfo,
    MethodCatalog,
    MethodInfo,
    ModelInfo,
    ParameterInfo,
    Progress,
    Provenance,
    ScoreResult,
    Verbalization,
)

__all__ = [
    "AsyncSaliencyClient",
    "CancelledError",
    "DeadlineExceededError",
    "Explanation",
    "Fact",
    "FailedPreconditionError",
    "ImageLike",
    "InputInfo",
    "InternalError",
    "InvalidArgumentError",
    "LayerInfo",
    "MethodCatalog",
    "MethodInfo",
    "ModelInfo",
    "NotFoundError",
    "ParameterInfo",
    "PermissionDeniedError",
    "Progress",
    "Provenance",
    "ResourceExhaustedError",
    "SaliencyClient",
    "SaliencyError",
    "ScoreResult",
    "UnauthenticatedError",
    "UnavailableError",
    "Verbalization",
    "overlay",
]

# Public classes report the package, not the private module, as their home (as httpx does).
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = __name__
del _name, _obj
