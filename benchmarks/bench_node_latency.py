"""Camera-to-command latency, CPU and memory of the policy node, over real DDS, for minutes.

The node runs as its own process (``python -m q_transformer_ros.ros.policy_node``), exactly as on a
robot; this script plays the robot: it publishes camera frames at ``--rate`` Hz (header stamp = publish
time) and an instruction, and records every command. Measured:

- camera-to-command: command arrival here minus the capture stamp of the newest frame the decision
  used. With the package's Decision message (colcon build) that frame is known exactly
  (decision stamp minus its ``frame_age_s``); without it, it is the newest frame published before the
  decision's stamp (accurate to the DDS transport time, well under a millisecond on one host).
- tick-to-command: command arrival minus the decision's stamp (model time plus publishing).
- model decide(): the policy's own time per decision, history transformer + action head (Decision
  message only); the new frame's encoding (``push_frames``) is inside tick-to-command, not here.
- CPU of the node process (percent of one core) and its RSS at the first command, at the end and the
  slope over the run (flat memory = no leak).

    python benchmarks/bench_node_latency.py --seconds 180            # tiny random model, ee_arm contract
    python benchmarks/bench_node_latency.py --checkpoint runs/x/checkpoint.pt --seconds 300
    python benchmarks/bench_node_latency.py --compile-mode default --seconds 120   # compiled steps

Prints a table; never asserts on timings.
"""

from __future__ import annotations

import argparse
import bisect
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class Args:
    seconds: float
    rate: float
    width: int
    height: int
    checkpoint: str | None
    contract: str
    preset: str
    device: str
    domain_id: int
    compile_mode: str


def parse_args(argv: list[str] | None) -> Args:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=180.0, help="measured duration after the first command")
    p.add_argument("--rate", type=float, default=30.0, help="camera frame rate (Hz)")
    p.add_argument("--width", type=int, default=640, help="published camera width (the node resizes)")
    p.add_argument("--height", type=int, default=480, help="published camera height")
    p.add_argument("--checkpoint", default=None, help="checkpoint to run; default: a tiny random model is made")
    p.add_argument("--contract", default=str(REPO / "config" / "contract_ee_arm.yaml"), help="contract for the made model")
    p.add_argument("--preset", default="tiny", choices=("tiny", "small", "base"), help="model size for the made model")
    p.add_argument("--device", default="cpu", help="device parameter of the node")
    p.add_argument("--domain-id", type=int, default=49, help="ROS_DOMAIN_ID for this run")
    p.add_argument("--compile-mode", default="off", help="compile_mode parameter of the node (off, default, reduce-overhead, ...)")
    a = p.parse_args(argv)
    return Args(a.seconds, a.rate, a.width, a.height, a.checkpoint, a.contract, a.preset, a.device, a.domain_id, a.compile_mode)


BENCH_INSTRUCTION = "pick up the block"


def make_checkpoint(contract_path: str, preset: str, out: Path) -> Path:
    """A checkpoint of a randomly initialised network (latency does not depend on the weights), with the
    benchmark's instruction embedding cached in it, as the trainer caches the training instructions."""
    from q_transformer_ros.core.checkpoint import save_untrained_checkpoint  # noqa: PLC0415
    from q_transformer_ros.contract import load_contract  # noqa: PLC0415

    return save_untrained_checkpoint(out, load_contract(contract_path), preset=preset, instructions=[BENCH_INSTRUCTION])


# ------------------------------------------------------------------------------------------------
# /proc sampling of the node process
# ------------------------------------------------------------------------------------------------
def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentiles(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return float("nan"), float("nan"), float("nan")
    a = np.asarray(values) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.max())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["ROS_DOMAIN_ID"] = str(args.domain_id)
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"

    import rclpy  # noqa: PLC0415
    from rclpy.executors import SingleThreadedExecutor  # noqa: PLC0415
    from rclpy.node import Node  # noqa: PLC0415
    from sensor_msgs.msg import Image  # noqa: PLC0415
    from std_msgs.msg import String  # noqa: PLC0415

    from q_transformer_ros.core.checkpoint import checkpoint_contract, load_checkpoint  # noqa: PLC0415
    from q_transformer_ros.data.messages import write_field  # noqa: PLC0415
    from q_transformer_ros.ros.conversions import group_outputs, message_class  # noqa: PLC0415
    from q_transformer_ros.ros.policy_node import load_interfaces  # noqa: PLC0415
    from q_transformer_ros.ros.qos import COMMAND_QOS, DIAGNOSTIC_QOS, INSTRUCTION_QOS, SENSOR_QOS  # noqa: PLC0415

    tmp = tempfile.TemporaryDirectory(prefix="bench_node_")
    ckpt = Path(args.checkpoint) if args.checkpoint else make_checkpoint(args.contract, args.preset, Path(tmp.name) / "model.pt")
    contract = checkpoint_contract(load_checkpoint(ckpt, map_location="cpu"), where=str(ckpt))
    DecisionMsg, _ = load_interfaces()

    cmd = [sys.executable, "-m", "q_transformer_ros.ros.policy_node", "--ros-args",
           "-p", f"checkpoint:={ckpt}", "-p", f"device:={args.device}",
           "-p", f"compile_mode:={args.compile_mode}", "--log-level", "warn"]
    t_launch = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])))

    rclpy.init()
    node = Node("bench_robot")
    lock = threading.Lock()
    published: dict[str, list[int]] = {cam.name: [] for cam in contract.cameras}  # capture stamps (ns)
    commands: list[tuple[int, int]] = []  # (decision stamp ns, arrival ns) of the first output topic
    decisions: dict[int, tuple[float, float, bool]] = {}  # stamp -> (newest frame age, inference s, commanded)
    clock = node.get_clock()

    outputs = group_outputs(contract)
    first = outputs[0]
    if not hasattr(message_class(first.msg_type)(), "header"):
        print(f"note: first output {first.topic} has no header; latency uses arrival order only", file=sys.stderr)

    def on_command(msg) -> None:
        now = clock.now().nanoseconds
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec if hasattr(msg, "header") else now
        with lock:
            commands.append((stamp, now))

    def on_decision(msg) -> None:
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        with lock:
            decisions[stamp] = (max(msg.frame_age_s) if len(msg.frame_age_s) else float("nan"),
                                float(msg.inference_time_s), bool(msg.commanded))

    node.create_subscription(message_class(first.msg_type), first.topic, on_command, COMMAND_QOS)
    if DecisionMsg is not None:
        node.create_subscription(DecisionMsg, "/policy_node/decision", on_decision, DIAGNOSTIC_QOS)
    cam_pubs = {cam.name: node.create_publisher(message_class(cam.msg_type), cam.topic, SENSOR_QOS) for cam in contract.cameras}
    instr_pub = node.create_publisher(String, contract.instruction.topic or "/instruction", INSTRUCTION_QOS)
    rgb = np.random.default_rng(0).integers(0, 255, (args.height, args.width, 3), dtype=np.uint8).tobytes()

    # the contract's state inputs (mid-range values), one message per topic, each frame tick: the node
    # stops on a missing or stale state input exactly as on a missing camera
    state_topics: dict[str, list] = {}
    for spec in contract.state_inputs:
        state_topics.setdefault(spec.source.topic, []).append(spec)
    state_pubs = {topic: node.create_publisher(message_class(specs[0].source.msg_type), topic, SENSOR_QOS)
                  for topic, specs in state_topics.items()}

    def publish_state() -> None:
        for topic, specs in state_topics.items():
            msg = message_class(specs[0].source.msg_type)()
            for spec in specs:
                write_field(msg, spec.source, (spec.low + spec.high) / 2)
            if hasattr(msg, "header"):
                msg.header.stamp = clock.now().to_msg()
            state_pubs[topic].publish(msg)

    def publish_frames() -> None:
        publish_state()
        for name, pub in cam_pubs.items():
            msg = Image(height=args.height, width=args.width, encoding="rgb8", step=args.width * 3, data=rgb)
            now = clock.now()
            msg.header.stamp = now.to_msg()
            pub.publish(msg)
            with lock:
                published[name].append(now.nanoseconds)

    node.create_timer(1.0 / args.rate, publish_frames)
    instr_pub.publish(String(data=BENCH_INSTRUCTION))
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()

    # wait for the first command (model load + warm-up), then measure
    while not commands:
        if proc.poll() is not None:
            print(f"policy node exited with code {proc.returncode} before the first command", file=sys.stderr)
            return 1
        limit_s = 300 if args.compile_mode == "off" else 1200  # compiling takes minutes on a CPU
        if time.monotonic() - t_launch > limit_s:
            print(f"no command within {limit_s} s", file=sys.stderr)
            proc.terminate()
            return 1
        time.sleep(0.05)
    t_first = time.monotonic() - t_launch
    cpu0, rss0, t0 = _cpu_seconds(proc.pid), _rss_mb(proc.pid), time.monotonic()
    with lock:
        n_cmd0 = len(commands)
    rss_samples: list[tuple[float, float]] = [(0.0, rss0)]
    try:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=int(args.seconds), desc="measuring", unit="s", mininterval=10, leave=False)
    except ImportError:
        bar = None
    while time.monotonic() - t0 < args.seconds:
        time.sleep(1.0)
        rss_samples.append((time.monotonic() - t0, _rss_mb(proc.pid)))
        if bar is not None:
            bar.update(1)
        if proc.poll() is not None:
            print(f"policy node died with code {proc.returncode}", file=sys.stderr)
            return 1
    if bar is not None:
        bar.close()
    elapsed = time.monotonic() - t0
    cpu = (_cpu_seconds(proc.pid) - cpu0) / elapsed * 100
    rss1 = _rss_mb(proc.pid)
    proc.terminate()
    proc.wait(timeout=10)
    executor.shutdown(timeout_sec=2)
    node.destroy_node()
    rclpy.try_shutdown()

    with lock:
        cmds = commands[n_cmd0:]
        decs = dict(decisions)
        pubs = {k: list(v) for k, v in published.items()}
    cam_to_cmd, tick_to_cmd, infer = [], [], []
    exact = DecisionMsg is not None and bool(decs)
    newest_pub = sorted(pubs[contract.cameras[0].name])
    for stamp, arrival in cmds:
        tick_to_cmd.append((arrival - stamp) / 1e9)
        if exact and stamp in decs:
            age, inf_s, _ = decs[stamp]
            cam_to_cmd.append((arrival - stamp) / 1e9 + age)
            infer.append(inf_s)
        elif not exact:
            k = bisect.bisect_right(newest_pub, stamp) - 1
            if k >= 0:
                cam_to_cmd.append((arrival - newest_pub[k]) / 1e9)
    ts, rs = np.array(rss_samples).T
    slope = float(np.polyfit(ts, rs, 1)[0] * 60) if len(ts) > 2 else float("nan")

    print()
    print(f"policy node latency: contract '{contract.name}', {args.width}x{args.height} rgb8 at {args.rate:g} Hz "
          f"-> {contract.control_rate_hz:g} Hz commands, device {args.device}, compile_mode {args.compile_mode}, "
          f"{elapsed:.0f} s, {len(cmds)} commands")
    print(f"checkpoint {ckpt}{'' if args.checkpoint else f' (random {args.preset} model)'}; "
          f"camera-to-command {'exact (Decision.frame_age_s)' if exact else 'from publish stamps (no Decision msg)'}")
    print()
    print(f"| {'metric':<32} | {'p50':>9} | {'p99':>9} | {'max':>9} |")
    print(f"|{'-' * 34}|{'-' * 11}|{'-' * 11}|{'-' * 11}|")
    for name, vals in (("camera-to-command (ms)", cam_to_cmd), ("tick-to-command (ms)", tick_to_cmd),
                       ("model decide() (ms)", infer)):
        if vals:
            p50, p99, mx = percentiles(vals)
            print(f"| {name:<32} | {p50:>9.1f} | {p99:>9.1f} | {mx:>9.1f} |")
    print()
    expected = elapsed * contract.control_rate_hz
    print(f"| {'resource':<32} | {'value':>33} |")
    print(f"|{'-' * 34}|{'-' * 35}|")
    print(f"| {'start to first command (s)':<32} | {t_first:>33.2f} |")
    print(f"| {'commands / expected':<32} | {f'{len(cmds)} / {expected:.0f}':>33} |")
    print(f"| {'node CPU (% of one core)':<32} | {cpu:>33.1f} |")
    print(f"| {'node RSS at first command (MB)':<32} | {rss0:>33.1f} |")
    print(f"| {'node RSS at end (MB)':<32} | {rss1:>33.1f} |")
    print(f"| {'node RSS max (MB)':<32} | {rs.max():>33.1f} |")
    print(f"| {'RSS slope (MB/min)':<32} | {slope:>33.3f} |")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
