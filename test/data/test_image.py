"""The one preprocessing path: channel order, resize, flip, depth scaling, and errors that name the problem."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image as PILImage

from q_transformer_ros.contract import CameraSpec
from q_transformer_ros.data.image import ImageError, frame_from_msg, image_msg_to_numpy, preprocess_frame

CAM = CameraSpec(name="front", topic="/front/image_raw", height=8, width=8)


def raw(arr: np.ndarray, encoding: str, step: int | None = None, bigendian: bool = False) -> SimpleNamespace:
    arr = np.ascontiguousarray(arr)
    h, w = arr.shape[:2]
    rows = arr.reshape(h, -1).view(np.uint8)
    if step is not None:
        rows = np.concatenate([rows, np.full((h, step - rows.shape[1]), 77, np.uint8)], axis=1)
    return SimpleNamespace(height=h, width=w, encoding=encoding, is_bigendian=int(bigendian), step=rows.shape[1],
                           data=rows.reshape(-1).tobytes())


def blocks(h: int, w: int, colors: np.ndarray) -> np.ndarray:
    """An (h, w, 3) image of 2x2 constant blocks: box-downscaling by 2 must give ``colors`` exactly."""
    return np.repeat(np.repeat(colors, 2, axis=0), 2, axis=1)[:h, :w]


def test_bgr_to_rgb_and_area_resize_exact() -> None:
    rng = np.random.default_rng(0)
    colors = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img_rgb = blocks(16, 16, colors)
    out = frame_from_msg(raw(img_rgb[..., ::-1], "bgr8", step=16 * 3 + 4), CAM)  # padded rows
    assert out.shape == (3, 8, 8) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, colors.transpose(2, 0, 1))


@pytest.mark.parametrize("encoding", ["rgba8", "bgra8"])
def test_alpha_dropped(encoding: str) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    src = rgb if encoding == "rgba8" else rgb[..., ::-1]
    rgba = np.concatenate([src, np.full((8, 8, 1), 9, np.uint8)], axis=-1)
    np.testing.assert_array_equal(frame_from_msg(raw(rgba, encoding), CAM), rgb.transpose(2, 0, 1))


def test_mono_replicated_and_flip() -> None:
    mono = np.arange(64, dtype=np.uint8).reshape(8, 8)
    cam = CameraSpec(name="c", topic="/c", height=8, width=8, flip_vertical=True)
    out = frame_from_msg(raw(mono[..., None], "mono8"), cam)
    for c in range(3):
        np.testing.assert_array_equal(out[c], mono[::-1])


def test_depth_16uc1_and_32fc1_quantized_over_max() -> None:
    cam = CameraSpec(name="d", topic="/d", height=2, width=2, depth=True, depth_max_m=2.0)
    mm = np.array([[0, 1000], [2000, 5000]], np.uint16)
    out = frame_from_msg(raw(mm[..., None], "16UC1", bigendian=False), cam)
    np.testing.assert_array_equal(out[0], np.array([[0, 128], [255, 255]], np.uint8))
    np.testing.assert_array_equal(out[1], out[0])
    big = raw(mm.astype(">u2")[..., None], "16UC1", bigendian=True)
    np.testing.assert_array_equal(frame_from_msg(big, cam), out)
    metres = np.array([[0.0, 1.0], [np.nan, 0.5]], np.float32)
    out_f = frame_from_msg(raw(metres[..., None], "32FC1"), cam)
    np.testing.assert_array_equal(out_f[0], np.array([[0, 128], [0, 64]], np.uint8))


def test_compressed_png_exact_and_jpeg_close() -> None:
    colors = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = blocks(16, 16, colors)
    for fmt, tol in (("png", 0), ("jpeg", 12)):
        buf = io.BytesIO()
        PILImage.fromarray(img).save(buf, format=fmt.upper(), quality=95, subsampling=0)
        msg = SimpleNamespace(format=fmt, data=np.frombuffer(buf.getvalue(), np.uint8))
        arr, enc = image_msg_to_numpy(msg)
        assert enc == "rgb8" and arr.shape == (16, 16, 3)
        out = frame_from_msg(msg, CAM).astype(int)
        assert np.abs(out - colors.transpose(2, 0, 1)).mean() <= tol


def test_upscale_bilinear_shape() -> None:
    cam = CameraSpec(name="c", topic="/c", height=16, width=24)
    out = preprocess_frame(np.full((8, 8, 3), 200, np.uint8), "rgb8", cam)
    assert out.shape == (3, 16, 24) and (out == 200).all()


def test_errors_name_camera_encoding_and_size() -> None:
    with pytest.raises(ImageError, match=r"camera 'front' \(/front/image_raw\).*'yuv422'.*4x2"):
        frame_from_msg(raw(np.zeros((2, 4, 2), np.uint8), "yuv422"), CAM)
    short = raw(np.zeros((4, 4, 3), np.uint8), "rgb8")
    short.data = short.data[:20]
    with pytest.raises(ImageError, match=r"'rgb8' image of 4x4 \(step 12\) needs 48 bytes, data has 20"):
        frame_from_msg(short, CAM)
    with pytest.raises(ImageError, match="depth camera got colour encoding 'rgb8'"):
        frame_from_msg(raw(np.zeros((4, 4, 3), np.uint8), "rgb8"), CameraSpec(name="d", topic="/d", depth=True))
    with pytest.raises(ImageError, match="cannot decode CompressedImage"):
        frame_from_msg(SimpleNamespace(format="jpeg", data=b"not a jpeg"), CAM)


def test_rclpy_and_rosbags_messages_give_the_same_frame() -> None:
    """Parity: the node's rclpy message and the converter's rosbags message -> identical arrays."""
    sensor_msgs = pytest.importorskip("sensor_msgs.msg")
    from q_transformer_ros.data.bag_reader import typestore_for

    img = np.random.default_rng(3).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    live = sensor_msgs.Image(height=12, width=10, encoding="bgr8", step=30, data=img.tobytes())
    store = typestore_for(None)
    bag_msg = store.deserialize_cdr(store.serialize_cdr(store.types["sensor_msgs/msg/Image"](
        header=store.types["std_msgs/msg/Header"](stamp=store.types["builtin_interfaces/msg/Time"](sec=0, nanosec=0),
                                                 frame_id=""),
        height=12, width=10, encoding="bgr8", is_bigendian=0, step=30, data=img.reshape(-1)), "sensor_msgs/msg/Image"),
        "sensor_msgs/msg/Image")
    np.testing.assert_array_equal(frame_from_msg(live, CAM), frame_from_msg(bag_msg, CAM))
