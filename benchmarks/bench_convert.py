"""Conversion speed vs. the limit: a bare rosbags read (+ deserialize) of the same bag.

Writes a synthetic rosbag2 (raw rgb8 camera + JPEG camera at different rates, TwistStamped and
Float64MultiArray commands, JointState, instruction, success), then times, in the same run:
  1. rosbags AnyReader: read every message (raw bytes only);
  2. rosbags AnyReader: read + deserialize every message (what any converter must at least do);
  3. convert_bag's run_conversion (one worker) into a fresh dataset;
  4. with --bags N > 1: N copies converted with 1 worker and with --workers.
Prints steps/s, MB/s (bag bytes on disk per second) and the time ratio to (2).

    .venv/bin/python benchmarks/bench_convert.py [--seconds 20] [--height 240 --width 320] [--storage mcap]
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from q_transformer_ros.data.bag_reader import typestore_for
from q_transformer_ros.data.bag_writer import BagWriter
from q_transformer_ros.contract import parse_contract
from q_transformer_ros.data.convert import ConvertConfig, run_conversion

NS = 1_000_000_000


def contract(size: int):
    ref = lambda topic, typ, field: {"topic": topic, "msg_type": typ, "field": field}  # noqa: E731
    return parse_contract({
        "name": "bench", "control_rate_hz": 10.0, "frame_history": 2, "max_frame_age_s": 0.5,
        "cameras": [
            {"name": "front", "topic": "/front/image_raw", "height": size, "width": size},
            {"name": "wrist", "topic": "/wrist/compressed", "msg_type": "sensor_msgs/msg/CompressedImage",
             "height": size, "width": size},
        ],
        "instruction": {"topic": "/instruction"}, "success": {"topic": "/success"},
        "action_dims": [
            {"name": "vx", "low": -1, "high": 1, "bins": 32, "source": ref("/cmd", "geometry_msgs/msg/TwistStamped", "twist.linear.x"),
             "target": ref("/cmd", "geometry_msgs/msg/TwistStamped", "twist.linear.x")},
            {"name": "vy", "low": -1, "high": 1, "bins": 32, "source": ref("/cmd", "geometry_msgs/msg/TwistStamped", "twist.linear.y"),
             "target": ref("/cmd", "geometry_msgs/msg/TwistStamped", "twist.linear.y")},
            {"name": "grip", "low": 0, "high": 1, "bins": 32, "source": ref("/grip", "std_msgs/msg/Float64MultiArray", "data[0]"),
             "target": ref("/grip", "std_msgs/msg/Float64MultiArray", "data[0]")},
            {"name": "elbow", "low": -0.2, "high": 0.2, "bins": 32, "mode": "delta",
             "source": {**ref("/joint_states", "sensor_msgs/msg/JointState", "position[0]"), "joint": "elbow"},
             "target": {**ref("/joint_states", "sensor_msgs/msg/JointState", "position[0]"), "joint": "elbow"}},
        ],
    })


def write_bag(path: Path, seconds: float, h: int, w: int, storage: str, seed: int = 0) -> None:
    ts = typestore_for(None)
    T = ts.types
    rng = np.random.default_rng(seed)
    hdr = lambda t: T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=t // NS, nanosec=t % NS), frame_id="")  # noqa: E731
    # a few distinct base images, shifted per frame: realistic-size JPEGs without encoding cost per frame
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    jpegs = []
    for i in range(8):
        buf = io.BytesIO()
        PILImage.fromarray(np.roll(base, i * 7, axis=1)).save(buf, format="JPEG", quality=85)
        jpegs.append(np.frombuffer(buf.getvalue(), np.uint8))
    events = []
    for k in range(int(seconds * 30)):
        events.append((int(k * NS / 30) + 3_000_000, "front", k))
    for k in range(int(seconds * 15)):
        events.append((int(k * NS / 15) + 5_000_000, "wrist", k))
    for k in range(int(seconds * 10)):
        events.append((int(k * NS / 10) + 1_000_000, "cmd", k))
    for k in range(int(seconds * 100)):
        events.append((int(k * NS / 100), "joints", k))
    events.sort()
    with BagWriter(path, storage=storage) as bw:
        for topic, typ in [("/instruction", "std_msgs/msg/String"), ("/front/image_raw", "sensor_msgs/msg/Image"),
                           ("/wrist/compressed", "sensor_msgs/msg/CompressedImage"), ("/cmd", "geometry_msgs/msg/TwistStamped"),
                           ("/grip", "std_msgs/msg/Float64MultiArray"), ("/joint_states", "sensor_msgs/msg/JointState"),
                           ("/success", "std_msgs/msg/Bool")]:
            bw.add_topic(topic, typ)
        bw.write("/instruction", 0, T["std_msgs/msg/String"](data="pick the cube"))
        V = T["geometry_msgs/msg/Vector3"]
        for t, kind, k in events:
            t += NS
            if kind == "front":
                data = np.roll(base, k % w, axis=1).reshape(-1)
                bw.write("/front/image_raw", t, T["sensor_msgs/msg/Image"](header=hdr(t), height=h, width=w, encoding="rgb8",
                                                                           is_bigendian=0, step=3 * w, data=data))
            elif kind == "wrist":
                bw.write("/wrist/compressed", t, T["sensor_msgs/msg/CompressedImage"](header=hdr(t), format="jpeg", data=jpegs[k % 8]))
            elif kind == "cmd":
                tw = T["geometry_msgs/msg/Twist"](linear=V(x=float(np.sin(k / 10)), y=0.1, z=0.0), angular=V(x=0.0, y=0.0, z=0.0))
                bw.write("/cmd", t, T["geometry_msgs/msg/TwistStamped"](header=hdr(t), twist=tw))
                bw.write("/grip", t, T["std_msgs/msg/Float64MultiArray"](
                    layout=T["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0), data=np.array([0.5])))
            else:
                bw.write("/joint_states", t, T["sensor_msgs/msg/JointState"](
                    header=hdr(t), name=["elbow"], position=np.array([k * 1e-3]), velocity=np.zeros(0), effort=np.zeros(0)))
        bw.write("/success", NS + int(seconds * NS), T["std_msgs/msg/Bool"](data=True))


def bag_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bare_read(path: Path, deserialize: bool) -> float:
    from rosbags.highlevel import AnyReader

    t = time.perf_counter()
    with AnyReader([path], default_typestore=typestore_for(None)) as reader:
        for conn, _, raw in reader.messages():
            if deserialize:
                reader.deserialize(raw, conn.msgtype)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0, help="episode length of the synthetic bag")
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--size", type=int, default=128, help="contract camera size (square)")
    p.add_argument("--storage", default="mcap", choices=["mcap", "sqlite3"])
    p.add_argument("--bags", type=int, default=2, help="copies for the multi-bag rows (0/1 = skip)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2, help="best of N timings")
    args = p.parse_args(argv)

    import q_transformer_ros.core.replay_dataset  # noqa: F401  (torch import outside the timings)

    c = contract(args.size)
    tmp = Path(tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        bag = tmp / "bag_0"
        write_bag(bag, args.seconds, args.height, args.width, args.storage)
        mb = bag_bytes(bag) / 1e6
        steps_expected = int(args.seconds * c.control_rate_hz)
        rows = []
        t_raw = min(bare_read(bag, False) for _ in range(args.repeat))
        t_des = min(bare_read(bag, True) for _ in range(args.repeat))
        t_conv, steps = float("inf"), 0
        for i in range(args.repeat):
            out = tmp / f"ds_{i}"
            t = time.perf_counter()
            reports = run_conversion([bag], out, ConvertConfig(contract=c), workers=1, progress=False)
            t_conv = min(t_conv, time.perf_counter() - t)
            steps = sum(r.steps for r in reports)
        rows.append(("rosbags read (raw bytes)", 1, t_raw, steps_expected, mb))
        rows.append(("rosbags read + deserialize", 1, t_des, steps_expected, mb))
        rows.append(("convert_bag, 1 worker", 1, t_conv, steps, mb))
        if args.bags > 1:
            copies = [bag] + [write_or_copy(bag, tmp / f"bag_{i}", args, i) for i in range(1, args.bags)]
            t_des_n = sum(min(bare_read(b, True) for _ in range(1)) for b in copies)
            rows.append((f"rosbags read + deserialize, {args.bags} bags", args.bags, t_des_n, steps_expected * args.bags, mb * args.bags))
            for workers in sorted({1, args.workers}):
                out = tmp / f"ds_multi_{workers}"
                t = time.perf_counter()
                reports = run_conversion(copies, out, ConvertConfig(contract=c), workers=workers, progress=False)
                dt = time.perf_counter() - t
                rows.append((f"convert_bag, {args.bags} bags, {workers} worker(s)", args.bags, dt,
                             sum(r.steps for r in reports), mb * args.bags))
        print(f"bag: {args.seconds:g} s, {args.height}x{args.width} rgb8 @30 Hz + JPEG @15 Hz, commands @10 Hz, "
              f"joints @100 Hz; {mb:.1f} MB ({args.storage}); contract {args.size}x{args.size}, 10 Hz steps")
        header = f"{'what':<44} {'bags':>4} {'time s':>8} {'steps':>6} {'steps/s':>9} {'MB/s':>8} {'time / read+deser':>18}"
        print(header)
        print("-" * len(header))
        for name, nb, dt, st, size in rows:
            ref = t_des * nb
            print(f"{name:<44} {nb:>4} {dt:>8.3f} {st:>6} {st / dt:>9.1f} {size / dt:>8.1f} {dt / ref:>18.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def write_or_copy(bag: Path, dest: Path, args: argparse.Namespace, seed: int) -> Path:
    """A different recording (other seed) of the same size, so re-run detection does not skip it."""
    write_bag(dest, args.seconds, args.height, args.width, args.storage, seed=seed)
    return dest


if __name__ == "__main__":
    sys.exit(main())
