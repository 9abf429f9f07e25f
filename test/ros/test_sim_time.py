"""Sim time through real ROS 2 and MuJoCo: ``sim_node`` publishes /clock and steps as soon as the
expert's commands answer its frame; the expert and the recorder follow /clock (``use_sim_time``); the
recorder's executor stalls 40 ms every 70 ms (a disk flush, a GC pause), so it takes the clock's jumps
before the commands that caused them.

Checked, on the bag -> ``convert_bag`` -> dataset path: the episode ran several times faster than the
control rate; the recorded frames are one control period apart in sim time; every stored step carries
the action the sim applied after that very frame (the sim's own step log, matched by the hand position
in the frame), none lost, the first one (the frame published with the reset) included. With the recorder logging at callback time instead, the stalls move commands
past the next frame; this is what the test would catch.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("metaworld")

from rclpy.parameter import Parameter  # noqa: E402

from q_transformer_ros.contract import load_contract  # noqa: E402
from q_transformer_ros.data.bag_reader import BagReader  # noqa: E402
from q_transformer_ros.data.convert import main as convert_main  # noqa: E402
from q_transformer_ros.replay.format import read_manifest  # noqa: E402
from q_transformer_ros.replay.reader import ReplayReader  # noqa: E402
from q_transformer_ros.ros.episode_driver import RosSession  # noqa: E402
from q_transformer_ros.ros.expert_node import ExpertNode  # noqa: E402
from q_transformer_ros.ros.sim_node import SimNode  # noqa: E402
from qtr_testing import REPO_ROOT, Spinner, ros_domain  # noqa: E402

pytestmark = pytest.mark.ros
DOMAIN_ID = 57  # this file's own DDS domain
STEPS = 40
TASK = "drawer-close-v3"


def small_contract(tmp_path: Path) -> Path:
    """The sim's contract with 32x32 frames (a 64x64 render costs ~25 ms a step)."""
    data = yaml.safe_load((REPO_ROOT / "config" / "contract_ee_arm.yaml").read_text())
    for cam in data["cameras"]:
        cam["height"] = cam["width"] = 32
    path = tmp_path / "contract.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path




def test_sim_time_episode_is_fast_and_pairs_every_frame_with_its_answer(tmp_path: Path) -> None:
    contract_path = small_contract(tmp_path)
    contract = load_contract(contract_path)
    period_ns = int(1e9 / contract.control_rate_hz)
    with ros_domain(DOMAIN_ID):
        sim = Spinner(SimNode(parameter_overrides=[
            Parameter("contract", value=str(contract_path)), Parameter("task", value=TASK),
            Parameter("reset_on_start", value=False), Parameter("publish_clock", value=True),
            Parameter("max_episode_steps", value=STEPS)]))
        expert = Spinner(ExpertNode(parameter_overrides=[
            Parameter("contract", value=str(contract_path)), Parameter("noise_std", value=0.6),
            Parameter("seed", value=3), Parameter("use_sim_time", value=True)]))
        recorder = {"output_dir": str(tmp_path / "bags"), "storage": "mcap", "stop_on_success": False,
                    "use_sim_time": True}
        try:
            with RosSession(contract, contract_path, DOMAIN_ID, recorder_params=recorder) as ros:
                assert ros.driver.service_ready("sim", 30) and ros.driver.service_ready("expert", 30)
                ros.driver.warm_up(TASK, 999)
                stalls = []
                ros.recorder.create_timer(0.07, lambda: (stalls.append(1), time.sleep(0.04)))
                out = ros.driver.run_episode(TASK, 1, record=True, max_steps=STEPS)
                step_log = list(sim.node.step_log)
            answered = sim.node.steps_answered
        finally:
            expert.stop()
            sim.stop()

    assert out.end_reason == "truncated" and out.steps == STEPS and out.bag
    assert len(stalls) >= 5, "the recorder's executor never stalled: the test proves nothing"
    # fast: the whole episode in well under its 4 s of robot time (steps answered, idle time skipped)
    assert out.duration_s < 0.6 * STEPS * period_ns / 1e9, f"{out.duration_s:.1f} s for {STEPS} steps"
    assert answered >= STEPS - 5

    with BagReader(out.bag) as bag:
        frame_t = np.array([t for _, t, _ in bag.messages([contract.cameras[0].topic])])
    gaps = np.diff(frame_t)
    assert abs(np.median(gaps) - period_ns) < 0.05 * period_ns, f"frame spacing {np.median(gaps) / 1e6:.1f} ms"

    dataset = tmp_path / "dataset"
    assert convert_main([out.bag, "--out", str(dataset), "--contract", str(contract_path), "--unlabeled", "failure",
                         "--no-progress"]) == 0
    manifest = read_manifest(dataset)
    assert len(manifest.episodes) == 1
    ep = ReplayReader(dataset).episode(0)
    names = [s.name for s in contract.state_inputs]
    hand = np.stack([ep.state[:, names.index(n)] for n in ("ee_x", "ee_y", "ee_z")], axis=1)
    # align the stored steps with the sim's steps by the hand position of each frame (the bag may start a
    # frame late, at the recorder's start, and end with the final frame, whose answer was never applied)
    log_hand = np.stack([pos for pos, _ in step_log]).astype(np.float32)
    log_action = np.stack([act for _, act in step_log])
    offsets = [k for k in range(-3, 4) if np.array_equal(
        hand[max(0, -k):max(0, -k) + 30], log_hand[max(0, k):max(0, k) + 30])]
    assert len(offsets) == 1, f"stored frames do not line up with the sim's steps (offsets {offsets})"
    k = offsets[0]
    assert k == 0, f"the bag starts {k} frame(s) into the episode: its first decision is lost"
    pairs = [(i, i + k) for i in range(len(hand)) if 0 <= i + k < len(step_log)]
    assert len(pairs) >= STEPS - 3 and all(np.array_equal(hand[i], log_hand[j]) for i, j in pairs)
    mw_index = [["dx", "dy", "dz", "gripper"].index(d.name) for d in contract.action_dims]  # sim order
    stored = np.asarray(ep.actions, dtype=np.float64)
    wrong = [i for i, j in pairs if not np.allclose(stored[i], log_action[j][mw_index], atol=1e-5)]
    assert not wrong, (f"{len(wrong)} of {len(pairs)} steps carry another step's command: {wrong} (offset {k}, "
                       f"stored {[stored[i].round(3).tolist() for i in wrong]}, sim {[log_action[j - 1:j + 2].round(3).tolist() for _, j in pairs if _ in wrong]}, n={len(hand)} log={len(step_log)})")
    distinct = np.mean(np.any(np.abs(np.diff(stored, axis=0)) > 1e-6, axis=1))
    assert distinct > 0.8, "consecutive commands are equal: a shifted pairing would go unnoticed"


def test_driver_counts_only_steps_sent_after_the_sims_reset(tmp_path: Path) -> None:
    """A sim on sim time keeps stepping the last episode until it handles the reset; those step messages
    are sent after the reset was requested and may be taken here after the reset was answered. The sim's
    ``~/task`` message (sent inside its reset) is the boundary, whichever order the messages arrive in.
    (Without it, the episode test above counted 41-42 steps for 40 now and then on a loaded machine.)"""
    import rclpy  # noqa: PLC0415
    from rclpy.context import Context  # noqa: PLC0415
    from std_msgs.msg import Bool, String  # noqa: PLC0415

    from q_transformer_ros.ros.episode_driver import EpisodeDriver  # noqa: PLC0415

    context = Context()
    rclpy.init(context=context, domain_id=DOMAIN_ID)
    driver = EpisodeDriver(load_contract(small_contract(tmp_path)), context=context)
    try:
        driver._begin_episode(record=False, keep_frames=False, max_steps=40)
        t0 = driver._reset_sent_ns
        at = lambda ms: {"source_timestamp": t0 + int(ms * 1e6)}  # noqa: E731
        driver._on_success(Bool(data=False), at(-5))  # the last episode, sent before the reset request
        driver._reset_answered()
        driver._on_success(Bool(data=False), at(1))  # the last episode, sent while the reset was on its way
        driver._on_success(Bool(data=False), at(3))  # this episode's first step, taken before the task message
        driver._on_task(String(data=TASK), at(2))  # the sim's reset
        driver._on_success(Bool(data=True), at(4))
        driver._on_success(Bool(data=False), at(1.5))  # a late one of the last episode
        assert driver._steps == 2 and driver._saw_success
    finally:
        driver.destroy_node()
        rclpy.try_shutdown(context=context)
