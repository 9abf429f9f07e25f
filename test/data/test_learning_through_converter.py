"""Learning through the converter: bags recorded with closed-loop timing -> ``convert_bag`` -> ``train``
-> ``QTransformerPolicy``: the greedy action is the optimal one in every state.

Task: the step camera shows one of four colours; each colour has one right action (2 dims x 2 bins).
A right action shows the next colour (four in a row is a success); a wrong one ends the episode as a
failure (the success topic says False). So Q*(colour, right) > 0 = Q*(colour, wrong), and the greedy
action of each colour state is known. The operator is right 75 % of the time.

Timing as a closed loop records it: a frame each period with +-20 % jitter, the command 60 % of a
period later with +-20 % jitter of its own (so it often lands after the next frame), and the outcome
message right after the frame that shows it. A converter that pairs frames with the next command
(the old step clock) teaches the network to answer each colour with a random colour's action.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from bag_factory import NS, BagScript, bool_msg, f64_msg, image_msg, string_msg
from q_transformer_ros.core.replay_dataset import ReplayDataset
from q_transformer_ros.core.policy import QTransformerPolicy
from q_transformer_ros.core.trainer import TrainConfig, train
from q_transformer_ros.data.convert import main as convert_main

SIZE = 16
P = NS // 10
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (220, 220, 30)}
RIGHT = {"red": (0, 1), "green": (1, 0), "blue": (1, 1), "yellow": (0, 0)}
STEPS_TO_SUCCESS = 4
INSTRUCTION = "answer each colour"

CONTRACT = {
    "name": "colours", "control_rate_hz": 10.0, "frame_history": 1, "discount": 0.9, "max_frame_age_s": 0.3,
    "stop_behaviour": "hold",
    "cameras": [{"name": "cam", "topic": "/cam/image_raw", "msg_type": "sensor_msgs/msg/Image",
                 "height": SIZE, "width": SIZE}],
    "instruction": {"topic": "/instruction"}, "success": {"topic": "/success"},
    "action_dims": [
        {"name": "a", "low": -1.0, "high": 1.0, "bins": 2,
         "source": {"topic": "/cmd", "msg_type": "std_msgs/msg/Float64MultiArray", "field": "data[0]"},
         "target": {"topic": "/cmd", "msg_type": "std_msgs/msg/Float64MultiArray", "field": "data[0]"}},
        {"name": "b", "low": -1.0, "high": 1.0, "bins": 2,
         "source": {"topic": "/cmd", "msg_type": "std_msgs/msg/Float64MultiArray", "field": "data[1]"},
         "target": {"topic": "/cmd", "msg_type": "std_msgs/msg/Float64MultiArray", "field": "data[1]"}},
    ],
}


def colour_image(colour: str) -> np.ndarray:
    """(H, W, 3) rgb8, a plain colour (the converter resizes nothing: camera size = image size)."""
    img = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    img[:] = np.array(COLOURS[colour], dtype=np.uint8)
    return img


def record_episode(path: Path, rng: np.random.Generator) -> bool:
    """One episode as a bag with closed-loop timing; returns its success."""
    s = BagScript()
    t0 = 1 * NS
    s.add("/instruction", "std_msgs/msg/String", t0, string_msg(INSTRUCTION))
    tick, success = t0 + P // 3, False
    for k in range(STEPS_TO_SUCCESS + 1):
        frame_t = tick + int(rng.uniform(-0.2, 0.2) * P)
        colour = str(rng.choice(list(COLOURS))) if k < STEPS_TO_SUCCESS else "red"
        img = colour_image(colour) if k < STEPS_TO_SUCCESS else np.full((SIZE, SIZE, 3), 128, np.uint8)
        s.add("/cam/image_raw", "sensor_msgs/msg/Image", frame_t, image_msg(img, "rgb8", frame_t))
        if k == STEPS_TO_SUCCESS:  # the frame that shows the success
            success = True
            break
        right = rng.random() < 0.75
        bins = RIGHT[colour] if right else tuple(1 - b for b in RIGHT[colour]) if rng.random() < 0.5 else \
            (RIGHT[colour][0], 1 - RIGHT[colour][1])
        command_t = frame_t + int((0.6 + rng.uniform(-0.2, 0.2)) * P)
        s.add("/cmd", "std_msgs/msg/Float64MultiArray", command_t, f64_msg([-0.5 + bins[0], -0.5 + bins[1]]))
        tick += P
        if not right:  # the next frame shows the failure
            frame_t = max(tick + int(rng.uniform(-0.2, 0.2) * P), command_t + NS // 1000)
            s.add("/cam/image_raw", "sensor_msgs/msg/Image", frame_t,
                  image_msg(np.zeros((SIZE, SIZE, 3), np.uint8), "rgb8", frame_t))
            s.add("/success", "std_msgs/msg/Bool", frame_t + NS // 2000, bool_msg(False))
            break
    if success:
        s.add("/success", "std_msgs/msg/Bool", frame_t + NS // 2000, bool_msg(True))
    s.write(path)
    return success


def test_greedy_action_is_optimal_in_every_state_after_bags_convert_train(tmp_path, one_thread) -> None:
    rng = np.random.default_rng(0)
    bags = tmp_path / "bags"
    outcomes = [record_episode(bags / f"ep_{i:03d}", rng) for i in range(80)]
    assert 15 <= sum(outcomes) <= 40
    contract_file = tmp_path / "contract.yaml"
    contract_file.write_text(yaml.safe_dump(CONTRACT))
    assert convert_main([str(bags), "--out", str(tmp_path / "ds"), "--contract", str(contract_file),
                         "--no-progress"]) == 0
    ds = ReplayDataset(tmp_path / "ds")
    assert ds.num_episodes == 80 and sum(ds.episode(i).success for i in range(80)) == sum(outcomes)

    torch.manual_seed(0)
    result = train(TrainConfig(
        dataset=[str(tmp_path / "ds")], out=str(tmp_path / "run"), model_preset="tiny",
        model_overrides={"dim": 8, "depth": (1,), "dim_head": 4, "heads": 2, "tokens_per_frame": 2,
                         "window_size": 4, "dropout": 0.0},
        text_encoder={"pretrained": None, "text_overrides": {"width": 32, "layers": 1, "heads": 2, "embed_dim": 32}},
        learner={"conservative_weight": 0.0, "target_update": "ema", "target_ema_tau": 0.2},
        cond_drop_prob=0.0, batch_size=32, lr=1e-2, weight_decay=0.0, warmup_steps=5, min_lr_ratio=1.0,
        steps=250, checkpoint_every=1000, log_every=50, device="cpu", progress=False,
    ))
    policy = QTransformerPolicy.from_checkpoint(Path(result.checkpoint), device="cpu")
    wrong = []
    for colour, right in RIGHT.items():
        policy.reset(INSTRUCTION)
        policy.push_frames({"cam": colour_image(colour).transpose(2, 0, 1).copy()})
        decision = policy.decide()
        if tuple(int(b) for b in decision.bins) != right:
            wrong.append((colour, tuple(decision.bins), right, np.round(decision.q_values, 2).tolist()))
    assert wrong == [], f"greedy action wrong in {len(wrong)} of {len(RIGHT)} states: {wrong}"
