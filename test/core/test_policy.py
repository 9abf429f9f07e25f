"""QTransformerPolicy: streaming equals full recomputation, checkpoint round trip, instruction handling,
and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from q_transformer_ros.core.checkpoint import save_checkpoint
from q_transformer_ros.core.model import ModelConfig, QTransformerNet
from q_transformer_ros.core.policy import Decision, PolicyInputError, QTransformerPolicy
from q_transformer_ros.contract import RobotContract

T = 16


def make_contract(**overrides) -> RobotContract:
    ref = {"topic": "/cmd", "msg_type": "std_msgs/msg/Float64MultiArray"}
    d = {
        "name": "test_arm",
        "frame_history": 3,
        "cameras": [{"name": "wrist", "topic": "/wrist", "height": 32, "width": 32},
                    {"name": "scene", "topic": "/scene", "height": 32, "width": 32}],
        "action_dims": [
            {"name": n, "low": -1.0, "high": 1.0, "bins": b, "source": {**ref, "field": f"data[{i}]"}, "target": {**ref, "field": f"data[{i}]"}}
            for i, (n, b) in enumerate([("x", 5), ("y", 8), ("grip", 2)])
        ],
        "instruction": {"topic": "/instruction"},
        "success": {"topic": "/success"},
    }
    d.update(overrides)
    return RobotContract.from_dict(d)


def make_policy(contract: RobotContract | None = None, seed: int = 0, compile_mode: str = "off", **model_overrides) -> QTransformerPolicy:
    contract = contract or make_contract()
    torch.manual_seed(seed)
    net = QTransformerNet(ModelConfig.preset("tiny", contract, text_dim=T, **model_overrides))
    for m in net.modules():  # FiLM starts at zero; give it weight so instructions matter in these tests
        if hasattr(m, "to_gamma_beta"):
            torch.nn.init.normal_(m.to_gamma_beta.weight, std=0.3)
    g = torch.Generator().manual_seed(seed + 1)
    cache = {t: torch.randn(T, generator=g) for t in ("pick the cube", "open the drawer", "push the button")}
    return QTransformerPolicy(contract, net, None, "cpu", cache, compile_mode=compile_mode)


def episode(steps: int, seed: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{c: rng.integers(0, 256, (3, 32, 32), dtype=np.uint8) for c in ("wrist", "scene")} for _ in range(steps)]


def window(frames: list[dict[str, np.ndarray]], end: int, history: int) -> dict[str, np.ndarray]:
    """The last ``history`` frames up to ``end`` (inclusive), padded at episode start with the first frame."""
    idx = [max(0, i) for i in range(end - history + 1, end + 1)]
    return {c: np.stack([frames[i][c] for i in idx]) for c in ("wrist", "scene")}


@pytest.mark.parametrize("overrides", [{}, {"dual_critics": True, "value_bins": 11, "dueling": True}])
def test_streaming_equals_full_recomputation(overrides) -> None:
    policy = make_policy(**overrides)
    frames = episode(5)
    policy.reset("pick the cube")
    for t, step in enumerate(frames):
        policy.push_frames(step)
        streamed = policy.decide()
        full = policy.act(window(frames, t, 3), "pick the cube")
        assert isinstance(streamed, Decision)
        np.testing.assert_array_equal(streamed.bins, full.bins)
        np.testing.assert_allclose(streamed.q_values, full.q_values, atol=1e-5)
        np.testing.assert_allclose(streamed.all_q, full.all_q, atol=1e-5)
        assert streamed.value == pytest.approx(full.value, abs=1e-5)
        # fewer frames than the history are padded the same way
        if t == 0:
            one = policy.act({c: v[None] for c, v in step.items()}, "pick the cube")
            np.testing.assert_array_equal(one.bins, streamed.bins)
    d = policy.decide(beam_width=3)
    assert d.action.dtype == np.float32 and d.action.shape == (3,)
    assert d.bins.dtype == np.int64 and np.all(d.bins < np.array([5, 8, 2]))
    np.testing.assert_allclose(d.action, policy.contract.bins_to_actions(d.bins))
    assert d.all_q.shape == (3, 8) and np.all(d.all_q[2, 2:] == 0)
    assert 0 <= d.value <= 1 and d.inference_time_s > 0


def test_instruction_change_clears_history_and_changes_output() -> None:
    policy = make_policy()
    frames = episode(4)
    policy.reset("pick the cube")
    for step in frames:
        policy.push_frames(step)
    assert policy.history_length == 3
    a = policy.decide()
    policy.reset("open the drawer")
    assert policy.history_length == 0
    with pytest.raises(PolicyInputError, match="before push_frames"):
        policy.decide()
    for step in frames:
        policy.push_frames(step)
    b = policy.decide()
    assert not np.allclose(a.all_q, b.all_q, atol=1e-4)
    values = policy.score_instructions(["pick the cube", "open the drawer", "push the button"])
    assert values.shape == (3,) and np.all((values >= 0) & (values <= 1))
    assert values[0] == pytest.approx(a.value, abs=1e-5) and values[1] == pytest.approx(b.value, abs=1e-5)
    assert policy.instruction == "open the drawer"  # scoring does not change the episode's instruction
    with pytest.raises(PolicyInputError, match="no cached embedding"):
        policy.reset("an instruction never seen")


def test_bad_input_errors_name_camera_and_shape() -> None:
    policy = make_policy()
    policy.reset(None)  # no instruction: the learned null embedding
    good = episode(1)[0]
    with pytest.raises(PolicyInputError, match=r"cameras \['wrist'\], contract 'test_arm' has \['scene', 'wrist'\]"):
        policy.push_frames({"wrist": good["wrist"]})
    with pytest.raises(PolicyInputError, match=r"camera 'scene': frame shape \(32, 32, 3\)"):
        policy.push_frames({"wrist": good["wrist"], "scene": good["scene"].transpose(1, 2, 0)})
    with pytest.raises(PolicyInputError, match="camera 'wrist': frame dtype float32"):
        policy.push_frames({"wrist": good["wrist"].astype(np.float32), "scene": good["scene"]})
    with pytest.raises(PolicyInputError, match=r"expected \(1..3, 3, 32, 32\)"):
        policy.act({c: np.stack([v] * 4) for c, v in good.items()})
    policy.push_frames(good)
    with torch.no_grad():
        policy.net.heads[0].out_b.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="non-finite"):
        policy.decide()


def test_model_contract_mismatch_is_rejected() -> None:
    contract = make_contract()
    other = make_contract(frame_history=2)
    net = QTransformerNet(ModelConfig.preset("tiny", other, text_dim=T))
    with pytest.raises(PolicyInputError, match="frame_history 2 vs contract 3"):
        QTransformerPolicy(contract, net, None, "cpu")


def test_from_checkpoint_round_trip(tmp_path) -> None:
    policy = make_policy(dueling=True)
    cache = policy._embeddings
    texts = sorted(cache)
    path = save_checkpoint(tmp_path / "checkpoint.pt", {
        "contract": policy.contract.to_dict(),
        "model_config": policy.cfg.to_dict(),
        "text_encoder": {"model_name": "ViT-B-32", "pretrained": None},
        "model": policy.net.state_dict(),
        "instruction_embeddings": {"texts": texts, "embeddings": torch.stack([cache[t] for t in texts])},
        "objective": "q_learning",
        "step": 7,
    })
    loaded = QTransformerPolicy.from_checkpoint(path, device="auto")
    assert loaded.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = QTransformerPolicy.from_checkpoint(tmp_path, device="cpu")  # a run directory works too
    frames = episode(3)
    for p in (policy, loaded):
        p.reset("push the button")
        for step in frames:
            p.push_frames(step)
    a, b = policy.decide(), loaded.decide()
    np.testing.assert_array_equal(a.bins, b.bins)
    np.testing.assert_allclose(a.all_q, b.all_q, atol=1e-6)
    # the text encoder is only a config until an unknown instruction needs it
    from q_transformer_ros.core.text_encoder import TextEncoderConfig

    assert isinstance(loaded._text_encoder, TextEncoderConfig)


def test_a_cloning_checkpoint_beam_searches_by_log_probability(tmp_path) -> None:
    """A checkpoint trained with objective 'bc' holds logits of a categorical per dim, not Q values: its
    beam must rank whole actions by summed log-probability (every decide path), a Q-Transformer's by Q."""
    policy = make_policy(seed=4)
    cache = policy._embeddings
    texts = sorted(cache)
    payload = {
        "contract": policy.contract.to_dict(), "model_config": policy.cfg.to_dict(),
        "text_encoder": {"model_name": "ViT-B-32", "pretrained": None}, "model": policy.net.state_dict(),
        "instruction_embeddings": {"texts": texts, "embeddings": torch.stack([cache[t] for t in texts])}, "step": 7,
    }
    bc = QTransformerPolicy.from_checkpoint(save_checkpoint(tmp_path / "bc.pt", {**payload, "objective": "bc"}), device="cpu")
    qt = QTransformerPolicy.from_checkpoint(save_checkpoint(tmp_path / "qt.pt", {**payload, "objective": "q_learning"}), device="cpu")
    assert (bc.beam_score, qt.beam_score) == ("log_prob", "q")
    frames = episode(3, seed=5)
    for p in (bc, qt):
        p.reset("push the button")
        for step in frames:
            p.push_frames(step)
    with torch.no_grad():
        state = bc.net.encode(bc._history_video(), *bc._resolve_text("push the button"), None)
        by_log_prob = bc.net.decode(state, beam_width=5, score="log_prob")[0][0].numpy()
        by_q = bc.net.decode(state, beam_width=5, score="q")[0][0].numpy()
    assert not np.array_equal(by_log_prob, by_q), "pick weights where the two rankings differ"
    for decide in (bc.decide, bc.decide_full):
        np.testing.assert_array_equal(decide(beam_width=5).bins, by_log_prob)
    np.testing.assert_array_equal(bc.act(window(frames, 2, 3), "push the button", beam_width=5).bins, by_log_prob)
    np.testing.assert_array_equal(qt.decide(beam_width=5).bins, by_q)
    # greedy decoding is the same rule for both: the per-dim argmax
    np.testing.assert_array_equal(bc.decide().bins, qt.decide().bins)
    # a margin compares values, which a cloning beam does not rank by: refused by name, on every path
    for call in (lambda: bc.decide(beam_width=5, beam_margin=0.05), lambda: bc.decide_full(beam_width=5, beam_margin=0.0),
                 lambda: bc.act(window(frames, 2, 3), "push the button", beam_width=5, beam_margin=0.05)):
        with pytest.raises(PolicyInputError, match="cloning checkpoint"):
            call()


def test_beam_margin_keeps_the_greedy_action_unless_the_beam_gains_more_than_it() -> None:
    """decide, decide_full and act: with a margin below the beam's value gain at this state the beam's
    action, above it the greedy action and value; the same on every path."""
    policy = make_policy(seed=4)
    frames = episode(3, seed=5)
    policy.reset("push the button")
    for step in frames:
        policy.push_frames(step)
    greedy, beam = policy.decide(), policy.decide(beam_width=5)
    gain = beam.value - greedy.value
    assert gain > 1e-4 and not np.array_equal(greedy.bins, beam.bins), "pick weights where the beam gains"
    paths = (lambda m: policy.decide(beam_width=5, beam_margin=m), lambda m: policy.decide_full(beam_width=5, beam_margin=m),
             lambda m: policy.act(window(frames, 2, 3), "push the button", beam_width=5, beam_margin=m))
    for path in paths:
        below, above = path(gain / 2), path(gain * 2)
        np.testing.assert_array_equal(below.bins, beam.bins)
        np.testing.assert_array_equal(above.bins, greedy.bins)
        assert above.value == pytest.approx(greedy.value, abs=1e-5) and below.value == pytest.approx(beam.value, abs=1e-5)
    with pytest.raises(PolicyInputError, match="must be a number"):
        policy.decide(beam_width=5, beam_margin="0.05")


def test_fixed_text_instruction_is_used_when_none_given() -> None:
    contract = make_contract(instruction={"topic": None, "fixed_text": "pick the cube"})
    policy = make_policy(contract)
    frames = episode(2)
    policy.reset(None)
    for step in frames:
        policy.push_frames(step)
    fixed = policy.decide()
    policy.reset("pick the cube")
    for step in frames:
        policy.push_frames(step)
    np.testing.assert_allclose(fixed.all_q, policy.decide().all_q, atol=1e-6)


def test_warmup_leaves_an_empty_history() -> None:
    policy = make_policy()
    policy.reset("pick the cube")
    assert policy.warmup() > 0
    assert policy.history_length == 0 and policy.instruction == "pick the cube"


# -- compiled decision steps (torch.compile; CPU here, CUDA graphs with "reduce-overhead" on a GPU) ------

def test_compiled_steps_match_eager_and_never_recompile() -> None:
    """The compiled streaming steps give the eager policy's bins and Q on the same weights and frames,
    through the padded start of an episode, an instruction change, ``act`` and new weights loaded in
    place; after the first decision nothing recompiles (the error_on_recompile patch would raise)."""
    eager, compiled = make_policy(), make_policy(compile_mode="default")  # same seed: same weights
    assert compiled.steps.compiled and not eager.steps.compiled
    frames = episode(6)
    compiled.warmup()  # compiles both steps once
    with torch._dynamo.config.patch(error_on_recompile=True):
        for instruction, steps in (("pick the cube", frames[:4]), (None, frames[4:]), ("open the drawer", frames[1:3])):
            for policy in (eager, compiled):
                policy.reset(instruction)
            for f in steps:
                a, b = (p.push_frames(f) or p.decide() for p in (eager, compiled))
                assert np.array_equal(a.bins, b.bins)
                np.testing.assert_allclose(b.all_q, a.all_q, atol=1e-5)
                np.testing.assert_allclose(b.q_values, a.q_values, atol=1e-5)
        video = window(frames, end=5, history=3)
        a, b = eager.act(video, "push the button"), compiled.act(video, "push the button")
        assert np.array_equal(a.bins, b.bins)
        np.testing.assert_allclose(b.all_q, a.all_q, atol=1e-5)
        # beam search stays eager on a compiled policy and still agrees
        a, b = eager.decide(beam_width=3), compiled.decide(beam_width=3)
        assert np.array_equal(a.bins, b.bins)
        # weights changed in place (a new checkpoint loaded into the same network) are used, not baked in
        before = compiled.act(video, "push the button")
        other = make_policy(seed=5).net.state_dict()
        for policy in (eager, compiled):
            policy.net.load_state_dict(other)
        a, b = eager.act(video, "push the button"), compiled.act(video, "push the button")
        assert np.array_equal(a.bins, b.bins)
        np.testing.assert_allclose(b.all_q, a.all_q, atol=1e-5)
        assert not np.allclose(b.all_q, before.all_q, atol=1e-3)


def test_compile_mode_is_checked_and_compiler_failures_name_the_step(monkeypatch) -> None:
    with pytest.raises(ValueError, match="compile mode 'fast'.*reduce-overhead"):
        make_policy(compile_mode="fast")
    import q_transformer_ros.core.decision_steps as steps_module

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("C++ compiler not found: g++")
        return run

    monkeypatch.setattr(steps_module.torch, "compile", broken_compile)
    policy = make_policy(compile_mode="max-autotune")
    with pytest.raises(steps_module.StepCompileError, match=r"mode 'max-autotune'\) of the policy's encode step failed on cpu: RuntimeError: C\+\+ compiler not found.*'off'"):
        policy.push_frames(episode(1)[0])


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
def test_every_compile_mode_is_accepted_by_torch_compile(mode) -> None:
    """Each mode's arguments (mode as inductor options + the guard filter) compile and run a small
    function on this machine (torch.compile rejects a mode given together with options)."""
    from q_transformer_ros.core.decision_steps import compile_kwargs

    fn = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2 + 1, **compile_kwargs(mode))
    x = torch.linspace(-2, 2, 7)
    torch.testing.assert_close(fn(x), torch.nn.functional.gelu(x) * 2 + 1)
