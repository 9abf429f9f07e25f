"""Smoke tests of the benchmark scripts (benchmarks/): each script's --quick mode runs our side in-process
through its main(argv) and writes sane numbers, so the scripts cannot rot unnoticed. No timed asserts.

The reference side (lucidrains/q-transformer in .venv-bench, made by scripts/setup_bench_env.sh) is only
exercised by the slow test at the bottom, and only when that venv exists.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH_DIR) not in sys.path:
    sys.path.append(str(BENCH_DIR))

import bench_decision_latency  # noqa: E402
import bench_storage  # noqa: E402
import bench_training  # noqa: E402
import common  # noqa: E402


def _run(module, argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[dict, str]:
    out_json = tmp_path / f"{module.__name__}.json"
    rc = module.main([*argv, "--no-reference", "--json-out", str(out_json)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "command:" in text and "torch threads" in text, text  # header: how it was run
    return json.loads(out_json.read_text()), text


def test_percentile_and_ratio_helpers() -> None:
    assert common.percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert common.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 99) == pytest.approx(4.96)
    st = common.stats_from_seconds([0.002, 0.001, 0.003])
    assert (st.n, st.p50_ms, st.min_ms) == (3, pytest.approx(2.0), pytest.approx(1.0))
    assert common.ratio(1.0, None) is None and common.ratio(1.0, 4.0) == 0.25


def test_decision_latency_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    data, text = _run(bench_decision_latency, ["--quick", "--onnx", "--repeats", "2"], tmp_path, capsys)
    for variant in ("ours", "ours_onnxruntime"):
        runs = data["results"]["small"][variant]
        assert len(runs) == 2
        for ours in runs:
            for key in ("full", "streaming", "decide"):
                assert ours[key]["n"] == 3 and len(ours[key]["samples_ms"]) == 3
                assert 0 < ours[key]["min_ms"] <= ours[key]["p50_ms"] <= ours[key]["p99_ms"]
            assert ours["streaming_matches_full"] is True
            assert ours["params"] > 100_000
    assert data["results"]["small"]["ours_onnxruntime"][0]["export_s"] > 0
    assert "ours streaming (push_frames+decide)" in text
    assert "ours streaming (push_frames+decide, onnxruntime)" in text and "ONNX export of the steps" in text
    assert "reference" not in data["results"]["small"]


def test_training_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, text = _run(bench_training, ["--quick"], tmp_path, capsys)
    ours = data["results"]["small"]["ours"]
    assert ours["steps"] == 2 and ours["batch_size"] == 4
    assert ours["samples_per_s"] > 0 and ours["step_s"] > 0
    assert ours["dataset_samples"] >= 2 * 5  # 2 episodes of 6 steps: at least 5 samples each
    assert "ours learning_step" in text


def test_storage_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, text = _run(bench_storage, ["--quick"], tmp_path, capsys)
    res = data["results"]["small"]
    arch = common.ARCHS["small"]
    frame_bytes = 3 * arch.image_size * arch.image_size  # one uint8 frame per step
    ours = res["ours"]
    # each frame stored once as uint8: at least one frame per step, far below a float32 frame stack
    assert frame_bytes <= ours["array_bytes_per_step"] < 1.2 * frame_bytes
    assert ours["bytes_per_step"] >= ours["array_bytes_per_step"]
    assert res["reference_formula_bytes_per_step"] == 3 * arch.frames * arch.image_size**2 * 4 + arch.num_actions * 8 + 5
    assert "reference Agent memmaps (formula)" in text


REF_PY = common.reference_python(None)


@pytest.mark.slow
@pytest.mark.skipif(REF_PY is None, reason="no .venv-bench (scripts/setup_bench_env.sh) on this machine")
def test_reference_worker_small() -> None:
    """The reference runs in its venv: a decision, the storage formula, and the patched QLearner path."""
    threads = 1
    lat = common.run_reference_worker(REF_PY, ["latency", "--config", "small", "--warmup", "0", "--iters", "1"], threads)
    assert lat["q_transformer"] == "0.5.0" and len(lat["last_bins"]) == 4 and lat["stats"]["n"] == 1
    st = common.run_reference_worker(REF_PY, ["storage", "--config", "small", "--episodes", "1", "--episode-len", "3"], threads)
    formula = bench_storage.reference_formula_bytes_per_step(common.ARCHS["small"])
    assert formula <= st["bytes_per_step"] < formula + 200  # + .npy headers only
    tr = common.run_reference_worker(REF_PY, ["train", "--config", "small", "--batch-size", "2", "--warmup-steps", "0",
                                              "--steps", "1", "--episodes", "1", "--episode-len", "3"], threads)
    assert tr["steps"] == 1 and tr["samples_per_s"] > 0


def test_decoding_rolls_out_each_width_on_the_runs_layouts_and_caches(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_decoding on a demo-shaped folder (an untrained checkpoint, the closed loop's eval.jsonl):
    every width meets the run's own layouts, the table has a row per width, and a rerun reads the cache."""
    import bench_decoding  # noqa: PLC0415

    from q_transformer_ros.contract import load_contract  # noqa: PLC0415
    from q_transformer_ros.core.checkpoint import save_untrained_checkpoint  # noqa: PLC0415
    from q_transformer_ros.e2e.report import EpisodeRecord, read_records, write_records  # noqa: PLC0415
    from q_transformer_ros.sim import agent_env  # noqa: PLC0415
    from q_transformer_ros.sim.tasks import TASK_INSTRUCTIONS  # noqa: PLC0415

    run = tmp_path / "demo_out"
    contract = load_contract(BENCH_DIR.parent / "config" / "contract_ee_arm.yaml")
    tasks = ["drawer-close-v3", "button-press-topdown-v3"]
    save_untrained_checkpoint(run / "train" / "checkpoint.pt", contract, text_dim=32,
                              text_encoder={"pretrained": None, "text_overrides": {"width": 32, "layers": 1, "heads": 2, "embed_dim": 32}},
                              instructions=[TASK_INSTRUCTIONS[t] for t in tasks])
    layouts = [("drawer-close-v3", 1000), ("button-press-topdown-v3", 1001), ("drawer-close-v3", 1003)]
    write_records(run / "eval.jsonl", [EpisodeRecord(task=t, seed=s, success=False) for t, s in layouts])
    write_records(run / "record.jsonl", [EpisodeRecord(task=t, seed=i, success=i % 2 == 0) for i, t in enumerate(tasks * 2)])

    assert bench_decoding.main([str(run), "--beam-widths", "1", "3", "--max-episode-steps", "4",
                                "--beam-margins", "0.05", "--margin-width", "3"]) == 0
    text = capsys.readouterr().out
    rows = [ln for ln in text.splitlines() if ln.startswith("| demo_out |")]
    assert [ln.split("|")[2].strip() for ln in rows] == ["1", "3", "3, margin 0.05"]
    assert all("/3 (" in ln for ln in rows), rows
    assert "the recorded data's success rate: demo_out 50 %" in text
    for stem in ("beam1", "beam3", "beam3_margin0.05"):
        episodes = read_records(run / "decoding" / f"qt_{stem}.jsonl")
        assert [(e.task, e.seed) for e in episodes] == layouts
        assert all(1 <= e.steps <= 4 and len(e.values) == e.steps for e in episodes)
    assert (run / "decoding" / "results.md").read_text().strip() in text

    def no_rollouts(*_a, **_k):  # noqa: ANN002, ANN003
        raise AssertionError("the cached episodes should have been read")

    monkeypatch.setattr(agent_env, "run_policy_episode", no_rollouts)
    assert bench_decoding.main([str(run), "--beam-widths", "3", "1", "--max-episode-steps", "4"]) == 0
    with pytest.raises(SystemExit, match="train_bc/checkpoint.pt"):
        bench_decoding.main([str(run), "--policy", "bc", "--beam-widths", "1"])
