"""Camera frames -> model input: the ONE preprocessing path for bag frames and live frames.

Why one function: a policy trained on converted bags must see live frames built exactly the same way
(channel order, resize filter, flip, depth scaling). The converter and the policy node both call
``frame_from_msg`` (or ``image_msg_to_numpy`` + ``preprocess_frame``), and a parity test compares them.

Messages are duck-typed: anything with the ``sensor_msgs/Image`` fields (``height``, ``width``,
``encoding``, ``is_bigendian``, ``step``, ``data``) or the ``sensor_msgs/CompressedImage`` fields
(``format``, ``data``) works, so rosbags message objects and rclpy messages take the same path. Only
numpy and Pillow are used (no cv_bridge, no OpenCV).

Axis legend: h, w image rows/columns, c channels.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from einops import rearrange, repeat
from PIL import Image as PILImage

from q_transformer_ros.contract import CameraSpec


class ImageError(ValueError):
    """A frame that cannot be turned into model input; the message names camera/topic, encoding and size."""


# encoding -> (numpy dtype, channels); multi-byte types get their byte order from is_bigendian.
RAW_ENCODINGS: dict[str, tuple[str, int]] = {
    "rgb8": ("u1", 3),
    "bgr8": ("u1", 3),
    "rgba8": ("u1", 4),
    "bgra8": ("u1", 4),
    "mono8": ("u1", 1),
    "8UC1": ("u1", 1),
    "8UC3": ("u1", 3),  # OpenCV convention: BGR
    "mono16": ("u2", 1),
    "16UC1": ("u2", 1),
    "32FC1": ("f4", 1),
}
COLOR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "8UC1", "8UC3")
DEPTH_ENCODINGS = ("16UC1", "mono16", "32FC1")


def _where(camera: CameraSpec | None, where: str | None) -> str:
    if where:
        return where
    if camera is not None:
        return f"camera '{camera.name}' ({camera.topic})"
    return "image"


def _raw_image_to_numpy(msg: Any, where: str) -> tuple[np.ndarray, str]:
    encoding = str(msg.encoding)
    if encoding not in RAW_ENCODINGS:
        raise ImageError(
            f"{where}: unknown image encoding {encoding!r} (size {msg.width}x{msg.height}); "
            f"supported: {sorted(RAW_ENCODINGS)}"
        )
    kind, channels = RAW_ENCODINGS[encoding]
    dtype = np.dtype(kind).newbyteorder(">" if msg.is_bigendian else "<") if kind != "u1" else np.dtype("u1")
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    row_bytes = width * channels * dtype.itemsize
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    if height <= 0 or width <= 0:
        raise ImageError(f"{where}: empty image ({width}x{height}, encoding {encoding!r})")
    if step < row_bytes:
        raise ImageError(
            f"{where}: step {step} bytes is less than width {width} x {channels} channel(s) x "
            f"{dtype.itemsize} byte(s) = {row_bytes} for encoding {encoding!r}"
        )
    if buf.size < step * (height - 1) + row_bytes:
        raise ImageError(
            f"{where}: {encoding!r} image of {width}x{height} (step {step}) needs {step * height} bytes, "
            f"data has {buf.size}"
        )
    rows = np.lib.stride_tricks.as_strided(buf, shape=(height, row_bytes), strides=(step, 1))
    arr = np.ascontiguousarray(rows).view(dtype)
    arr = rearrange(arr, "h (w c) -> h w c", c=channels)
    return arr, encoding


def _compressed_image_to_numpy(msg: Any, where: str) -> tuple[np.ndarray, str]:
    fmt = str(msg.format)
    data = bytes(np.frombuffer(msg.data, dtype=np.uint8))
    fmt_l = fmt.lower()
    if "compresseddepth" in fmt_l:
        # compressed_depth_image_transport: 12-byte config header, then a PNG of the 16-bit depth.
        data = data[12:]
    if not any(k in fmt_l for k in ("jpeg", "jpg", "png")) and fmt_l.strip() != "":
        raise ImageError(f"{where}: unknown CompressedImage format {fmt!r}; supported: jpeg, png, compressedDepth png")
    try:
        img = PILImage.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises several types for corrupt data
        raise ImageError(f"{where}: cannot decode CompressedImage (format {fmt!r}, {len(data)} bytes): {e}") from None
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(img, dtype=np.uint16)[..., None], "16UC1"
    if mode == "I":
        return np.asarray(img).astype(np.uint16)[..., None], "16UC1"
    if mode in ("L", "1"):
        return np.asarray(img.convert("L"))[..., None], "mono8"
    if mode == "RGBA":
        return np.asarray(img), "rgba8"
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img), "rgb8"


def image_msg_to_numpy(msg: Any, where: str | None = None) -> tuple[np.ndarray, str]:
    """A ``sensor_msgs/Image`` or ``CompressedImage`` (rosbags or rclpy object) -> ``(array (h, w, c), encoding)``.

    The array keeps the message's pixel type (uint8, uint16, float32); channel order is what the
    returned encoding says (bgr8 stays BGR here; ``preprocess_frame`` makes RGB).
    """
    where = where or "image"
    if hasattr(msg, "format") and not hasattr(msg, "encoding"):
        return _compressed_image_to_numpy(msg, where)
    if hasattr(msg, "encoding") and hasattr(msg, "step"):
        return _raw_image_to_numpy(msg, where)
    raise ImageError(
        f"{where}: expected a sensor_msgs/Image or sensor_msgs/CompressedImage, got {type(msg).__name__}"
    )


def _resize(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an (h, w) or (h, w, 3) uint8 array: area (box) filter when shrinking, bilinear when growing."""
    if plane.shape[0] == height and plane.shape[1] == width:
        return plane
    shrinking = plane.shape[0] >= height and plane.shape[1] >= width
    resample = PILImage.Resampling.BOX if shrinking else PILImage.Resampling.BILINEAR
    return np.asarray(PILImage.fromarray(plane).resize((width, height), resample=resample))


def preprocess_frame(
    image: np.ndarray, encoding: str, camera: CameraSpec, where: str | None = None
) -> np.ndarray:
    """Decoded image ``(h, w, c)`` -> model input uint8 ``(3, H, W)`` RGB at the camera's size.

    Colour: BGR/BGRA reordered to RGB, alpha dropped, mono replicated to 3 channels.
    Depth (``camera.depth``): 16UC1/mono16 millimetres or 32FC1 metres; NaN/inf/negative -> 0,
    scaled so ``camera.depth_max_m`` maps to 255 (clipped), replicated to 3 channels.
    Then resized (area when shrinking, bilinear when growing) and flipped if ``flip_vertical``.
    """
    where = _where(camera, where)
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ImageError(f"{where}: expected an (h, w, c) image, got shape {image.shape} (encoding {encoding!r})")
    h, w, c = image.shape
    expected = RAW_ENCODINGS.get(encoding)
    if expected is None:
        raise ImageError(f"{where}: unknown image encoding {encoding!r} (size {w}x{h}); supported: {sorted(RAW_ENCODINGS)}")
    if c != expected[1]:
        raise ImageError(f"{where}: encoding {encoding!r} has {expected[1]} channel(s), image of {w}x{h} has {c}")

    if camera.depth:
        if encoding not in DEPTH_ENCODINGS:
            raise ImageError(f"{where}: depth camera got colour encoding {encoding!r} ({w}x{h}); expected one of {DEPTH_ENCODINGS}")
        metres = image[..., 0].astype(np.float32)
        if encoding != "32FC1":
            metres *= 1e-3
        metres = np.nan_to_num(metres, nan=0.0, posinf=0.0, neginf=0.0)
        scaled = np.clip(metres / float(camera.depth_max_m), 0.0, 1.0) * 255.0
        plane = _resize(np.rint(scaled).astype(np.uint8), camera.height, camera.width)
        rgb = repeat(plane, "h w -> h w c", c=3)
    else:
        if encoding not in COLOR_ENCODINGS:
            raise ImageError(
                f"{where}: colour camera got depth encoding {encoding!r} ({w}x{h}); set depth: true in the contract "
                f"for depth cameras"
            )
        if image.dtype != np.uint8:
            raise ImageError(f"{where}: encoding {encoding!r} needs uint8 pixels, got {image.dtype} ({w}x{h})")
        if c == 1:
            rgb = repeat(_resize(image[..., 0], camera.height, camera.width), "h w -> h w c", c=3)
        else:
            if encoding in ("bgr8", "bgra8", "8UC3"):
                image = image[..., 2::-1]
            else:
                image = image[..., :3]
            rgb = _resize(np.ascontiguousarray(image), camera.height, camera.width)
    if camera.flip_vertical:
        rgb = rgb[::-1]
    return np.ascontiguousarray(rearrange(rgb, "h w c -> c h w"))


def frame_from_msg(msg: Any, camera: CameraSpec, where: str | None = None) -> np.ndarray:
    """An image message -> uint8 ``(3, H, W)`` model input for ``camera`` (the converter's and node's path)."""
    where = _where(camera, where)
    array, encoding = image_msg_to_numpy(msg, where)
    return preprocess_frame(array, encoding, camera, where)
