"""The onnxruntime backend: exported streaming steps decide exactly like torch (greedy bins equal, Q within
1e-4) through an episode with instruction changes; files carry the contract; stale files are re-exported;
a missing provider is a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from q_transformer_ros.core.checkpoint import save_untrained_checkpoint  # noqa: E402
from q_transformer_ros.replay.testing import tiny_contract  # noqa: E402
from q_transformer_ros.core.onnx_backend import OnnxBackendError, onnx_paths, read_metadata  # noqa: E402
from q_transformer_ros.core.policy import QTransformerPolicy  # noqa: E402
from q_transformer_ros.contract import RobotContract  # noqa: E402

INSTRUCTIONS = ["open the drawer", "close the drawer"]
TEXT = {"pretrained": None, "text_overrides": {"width": 32, "layers": 1, "heads": 2, "embed_dim": 32}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.set_num_threads(1)
    contract = tiny_contract(size=32, num_dims=3, bins=16, frame_history=3, num_cameras=2)
    path = tmp_path_factory.mktemp("onnx") / "model.pt"
    save_untrained_checkpoint(path, contract, text_encoder=TEXT, text_dim=32, instructions=INSTRUCTIONS)
    # spread the head's outputs so that greedy bins differ from frame to frame (a fresh network is flat)
    ckpt = torch.load(path, weights_only=True)
    for key in [k for k in ckpt["model"] if k.endswith("out_w")]:
        ckpt["model"][key] = ckpt["model"][key] * 50
    from q_transformer_ros.core.checkpoint import save_checkpoint

    save_checkpoint(path, ckpt)
    return path


def test_onnxruntime_decides_like_torch_through_an_episode(checkpoint) -> None:
    ref = QTransformerPolicy.from_checkpoint(checkpoint, device="cpu")
    ort = QTransformerPolicy.from_checkpoint(checkpoint, device="cpu", backend="onnxruntime")
    assert ref.backend == "torch" and ort.backend == "onnxruntime"
    # frame history 3: a decision after a new frame runs encode + decide as one graph
    assert ort.steps.fused and onnx_paths(checkpoint).step.is_file()
    rng = np.random.default_rng(0)
    qs = []
    for policy_step in range(24):
        if policy_step in (0, 9, 17):  # episode start and two instruction changes (history cleared)
            instruction = INSTRUCTIONS[(policy_step // 9) % 2]
            ref.reset(instruction)
            ort.reset(instruction)
        for _ in range(2 if policy_step in (4, 12) else 1):  # now and then two frames before a decision
            frames = {cam: rng.integers(0, 256, (3, 32, 32), dtype=np.uint8) for cam in ref.camera_names}
            ref.push_frames(frames)
            ort.push_frames(frames)
        assert ort.history_length == ref.history_length
        a, b = ref.decide(), ort.decide()
        np.testing.assert_array_equal(a.bins, b.bins, err_msg=f"step {policy_step}")
        np.testing.assert_allclose(a.all_q, b.all_q, atol=1e-4, rtol=0, err_msg=f"step {policy_step}")
        np.testing.assert_allclose(a.action, b.action, atol=0, rtol=0)
        qs.append(a.all_q)
    spread = np.ptp(np.stack(qs), axis=0).max()
    assert spread > 100 * 1e-4, f"Q barely varies over the episode ({spread:.2e}): the parity check would prove little"


def test_files_carry_the_contract_and_stale_files_are_reexported(checkpoint, tmp_path) -> None:
    files = onnx_paths(checkpoint)
    QTransformerPolicy.from_checkpoint(checkpoint, device="cpu", backend="onnxruntime")
    meta = read_metadata(files.decide)
    contract = RobotContract.from_dict(__import__("json").loads(meta["contract"]))
    assert contract.fingerprint() == QTransformerPolicy.from_checkpoint(checkpoint, device="cpu").contract.fingerprint()
    assert meta["step"] == "decide" and len(meta["checkpoint_payload_sha256"]) == 64
    assert set(__import__("json").loads(meta["instruction_embeddings"])) == set(INSTRUCTIONS)
    # another checkpoint at the same path (new weights): the files are exported again
    other = tmp_path / "model.pt"
    save_untrained_checkpoint(other, contract, text_encoder=TEXT, text_dim=32, instructions=INSTRUCTIONS, seed=1)
    first = QTransformerPolicy.from_checkpoint(other, device="cpu", backend="onnxruntime")
    digest = read_metadata(onnx_paths(other).encode)["checkpoint_payload_sha256"]
    save_untrained_checkpoint(other, contract, text_encoder=TEXT, text_dim=32, instructions=INSTRUCTIONS, seed=2)
    QTransformerPolicy.from_checkpoint(other, device="cpu", backend="onnxruntime")
    assert read_metadata(onnx_paths(other).encode)["checkpoint_payload_sha256"] != digest
    assert first.backend == "onnxruntime"


def test_missing_provider_is_a_clear_error(checkpoint) -> None:
    with pytest.raises(OnnxBackendError, match="TensorrtExecutionProvider.*not available here; available"):
        QTransformerPolicy.from_checkpoint(checkpoint, device="cpu", backend="onnxruntime",
                                           onnx_providers=("TensorrtExecutionProvider",))
    with pytest.raises(Exception, match="backend 'tensorflow'"):
        QTransformerPolicy.from_checkpoint(checkpoint, device="cpu", backend="tensorflow")
