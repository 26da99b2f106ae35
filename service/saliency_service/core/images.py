"""Decode, validate, resize and normalise input images; resize maps back to the caller's size."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from saliency_service.core.errors import InvalidArgument, ResourceExhausted
from saliency_service.core.models.config import InputSpec
from saliency_service.core.types import EncodedImage, ImageInput, RawTensor

# We enforce our own pixel cap before decoding; PIL's global bomb check would raise its own error type.
Image.MAX_IMAGE_PIXELS = None

_DTYPES: dict[str, np.dtype[Any]] = {"uint8": np.dtype(np.uint8), "float32": np.dtype("<f4")}


@dataclass(frozen=True)
class ImageLimits:
    max_images: int = 64
    max_pixels: int = 4096 * 4096


def check_batch(images: Sequence[object], limits: ImageLimits, what: str = "images") -> None:
    if not images:
        raise InvalidArgument("NO_IMAGES", f"the request has no {what}; send at least one")
    if len(images) > limits.max_images:
        raise ResourceExhausted(
            "BATCH_TOO_LARGE",
            f"the request has {len(images)} {what}; the server accepts at most {limits.max_images} per request (max_batch_images)",
            {"limit": limits.max_images, "count": len(images)},
        )


def decode_image(image: ImageInput, index: int, limits: ImageLimits) -> np.ndarray:
    """Return an H x W x 3 float32 RGB image in [0, 1], or raise with the image's index."""
    where = {"image_index": index}
    if isinstance(image, EncodedImage):
        if not image.data:
            raise InvalidArgument("IMAGE_EMPTY", f"image {index} has no bytes", where)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(image.data)) as opened:
                    _check_pixels(opened.width, opened.height, index, limits)
                    rgb = np.asarray(opened.convert("RGB"), dtype=np.uint8)
        except (InvalidArgument, ResourceExhausted):
            raise
        except Exception as exc:  # PIL raises many unrelated types for corrupt data
            raise InvalidArgument(
                "IMAGE_UNDECODABLE", f"image {index} could not be decoded ({type(exc).__name__}: {exc}); send PNG or JPEG bytes", where
            ) from None
        decoded: np.ndarray = rgb.astype(np.float32) / 255.0
        return decoded
    return _raw_image(image, index, limits)


def _raw_image(image: RawTensor, index: int, limits: ImageLimits) -> np.ndarray:
    where = {"image_index": index}
    dtype = _DTYPES.get(image.dtype)
    if dtype is None:
        raise InvalidArgument("UNSUPPORTED_DTYPE", f"image {index} has dtype {image.dtype or 'unspecified'}; use uint8 or float32", where)
    shape = tuple(image.shape)
    if len(shape) != 3 or shape[2] != 3 or shape[0] < 1 or shape[1] < 1:
        raise InvalidArgument(
            "INVALID_SHAPE", f"image {index} has shape {list(shape)}; an image tensor must be [height, width, 3] (RGB)", where
        )
    _check_pixels(shape[1], shape[0], index, limits)
    expected = shape[0] * shape[1] * 3 * dtype.itemsize
    if len(image.data) != expected:
        raise InvalidArgument(
            "TENSOR_SIZE_MISMATCH",
            f"image {index}: shape {list(shape)} of {image.dtype} needs {expected} bytes, got {len(image.data)}",
            where,
        )
    array = np.frombuffer(image.data, dtype=dtype).reshape(shape)
    if dtype == np.uint8:
        scaled: np.ndarray = array.astype(np.float32) / 255.0
        return scaled
    if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
        raise InvalidArgument("VALUE_OUT_OF_RANGE", f"image {index}: float32 pixels must be finite and within [0, 1]", where)
    return array.astype(np.float32)


def _check_pixels(width: int, height: int, index: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise ResourceExhausted(
            "IMAGE_TOO_LARGE",
            f"image {index} is {width}x{height} = {width * height} pixels; "
            f"the server accepts at most {limits.max_pixels} (max_image_pixels)",
            {"image_index": index, "limit": limits.max_pixels},
        )


def to_model_input(images: Sequence[np.ndarray], spec: InputSpec) -> np.ndarray:
    """Resize each H x W x 3 [0,1] image to the model's size and normalise: B x 3 x h x w float32."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    batch = [
        (resize_chw(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), spec.height, spec.width) - mean) / std
        for image in images
    ]
    return torch.stack(batch).numpy()


def resize_chw(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of a C x H x W tensor, antialiased when shrinking."""
    if tuple(tensor.shape[-2:]) == (height, width):
        return tensor
    shrinking = tensor.shape[-2] > height or tensor.shape[-1] > width
    return F.interpolate(tensor[None], size=(height, width), mode="bilinear", align_corners=False, antialias=shrinking)[0]


def resize_map(saliency: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an H x W map to height x width, float32."""
    return resize_chw(torch.from_numpy(np.ascontiguousarray(saliency, dtype=np.float32))[None], height, width)[0].numpy()


def decode_map(tensor: RawTensor, index: int, limits: ImageLimits) -> np.ndarray:
    """Validate a caller-supplied saliency map: float32 [height, width], finite."""
    where = {"map_index": index}
    if tensor.dtype != "float32":
        raise InvalidArgument(
            "UNSUPPORTED_DTYPE", f"saliency map {index} has dtype {tensor.dtype or 'unspecified'}; maps must be float32", where
        )
    shape = tuple(tensor.shape)
    if len(shape) != 2 or min(shape) < 1:
        raise InvalidArgument("INVALID_SHAPE", f"saliency map {index} has shape {list(shape)}; a map must be [height, width]", where)
    _check_pixels(shape[1], shape[0], index, limits)
    if len(tensor.data) != shape[0] * shape[1] * 4:
        raise InvalidArgument(
            "TENSOR_SIZE_MISMATCH",
            f"saliency map {index}: shape {list(shape)} of float32 needs {shape[0] * shape[1] * 4} bytes, got {len(tensor.data)}",
            where,
        )
    data = np.frombuffer(tensor.data, dtype="<f4").reshape(shape)
    if not np.isfinite(data).all():
        raise InvalidArgument("VALUE_OUT_OF_RANGE", f"saliency map {index} has NaN or infinite values", {"map_index": index})
    return data.astype(np.float32)


def decode_mask(tensor: RawTensor, index: int, limits: ImageLimits, what: str = "mask") -> np.ndarray:
    """Validate a caller-supplied mask: float32 or uint8 [height, width]; True where it is nonzero."""
    where = {f"{what.replace(' ', '_')}_index": index}
    itemsize = {"float32": 4, "uint8": 1}.get(tensor.dtype)
    if itemsize is None:
        raise InvalidArgument(
            "UNSUPPORTED_DTYPE", f"{what} {index} has dtype {tensor.dtype or 'unspecified'}; masks must be uint8 or float32", where
        )
    shape = tuple(tensor.shape)
    if len(shape) != 2 or min(shape) < 1:
        raise InvalidArgument("INVALID_SHAPE", f"{what} {index} has shape {list(shape)}; a mask must be [height, width]", where)
    _check_pixels(shape[1], shape[0], index, limits)
    if len(tensor.data) != shape[0] * shape[1] * itemsize:
        raise InvalidArgument(
            "TENSOR_SIZE_MISMATCH",
            f"{what} {index}: shape {list(shape)} of {tensor.dtype} needs {shape[0] * shape[1] * itemsize} bytes, got {len(tensor.data)}",
            where,
        )
    data = np.frombuffer(tensor.data, dtype="<f4" if itemsize == 4 else np.uint8).reshape(shape)
    if itemsize == 4 and not np.isfinite(data).all():
        raise InvalidArgument("VALUE_OUT_OF_RANGE", f"{what} {index} has NaN or infinite values", where)
    mask: np.ndarray = data != 0
    return mask


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A bool mask at another resolution: the bilinear resize of its 0/1 values, kept where at least one half."""
    if mask.shape == (height, width):
        return mask
    resized: np.ndarray = resize_map(mask.astype(np.float32), height, width) >= 0.5
    return resized


BLUR_SIZE = 11
BLUR_SIGMA = 5.0


def gaussian_blur(x: torch.Tensor) -> torch.Tensor:
    """RISE's blur: 11x11 Gaussian, sigma 5, per channel, zero padding 5, in normalised space."""
    offsets = torch.arange(BLUR_SIZE, dtype=torch.float64) - BLUR_SIZE // 2
    profile = torch.exp(-(offsets**2) / (2 * BLUR_SIGMA**2))
    profile = profile / profile.sum()
    channels = x.shape[1]
    kernel = torch.outer(profile, profile).to(x).expand(channels, 1, BLUR_SIZE, BLUR_SIZE)
    return F.conv2d(x, kernel, padding=BLUR_SIZE // 2, groups=channels)
