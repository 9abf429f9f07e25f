"""The end-to-end demo's pieces at tiny size.

- the results table, calibration bins, GIF and plot from known inputs (no ROS);
- the demo's configuration checks and stage markers (a changed input redoes a stage);
- one short episode recorded THROUGH ROS (sim_node + expert_node as child processes, the recorder
  in-process) and converted into a dataset whose episode matches what the sim reported; a rerun skips
  both stages;
- (slow) the whole ``demo --quick`` run, closed loop included.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from q_transformer_ros.e2e.config import EVAL_SEED_OFFSET, DemoConfig
from q_transformer_ros.e2e.report import (
    EpisodeRecord, calibration_bins, format_table, plot_value_vs_success, read_records, summarize, write_gif,
    write_records,
)

DOMAIN_RECORD = 81
DOMAIN_QUICK = 82


def _ep(task: str, success: bool, values: list[float] = (), seed: int = 0) -> EpisodeRecord:
    return EpisodeRecord(task=task, seed=seed, success=success, values=list(values))


# ---------------------------------------------------------------------------------------------
# report from known inputs
# ---------------------------------------------------------------------------------------------

def test_summary_table_from_known_inputs() -> None:
    data = [_ep("a", True), _ep("a", True), _ep("a", False), _ep("a", False), _ep("b", True)]
    qt = [_ep("a", True, [0.8, 0.6]), _ep("a", False, [0.2]), _ep("b", False, [0.4, 0.2]), _ep("b", False, [])]
    bc = [_ep("a", False), _ep("b", True)]
    rows = summarize(data, {"QT": qt, "BC": bc}, ["a", "b"])
    assert [r.task for r in rows] == ["a", "b", "overall"]
    a, b, overall = rows
    assert a.data_episodes == 4 and a.data_success == pytest.approx(0.5)
    assert b.data_success == pytest.approx(1.0)
    assert a.eval_success == {"QT": pytest.approx(0.5), "BC": pytest.approx(0.0)}
    assert b.eval_success["BC"] == pytest.approx(1.0) and b.eval_episodes == {"QT": 2, "BC": 1}
    assert a.value_success == pytest.approx(0.7) and a.value_failure == pytest.approx(0.2)
    assert math.isnan(b.value_success)  # no successful QT episode on b
    assert b.value_failure == pytest.approx(0.3)  # the episode without values does not count
    # overall pools episodes, it does not average the task rates
    assert overall.data_success == pytest.approx(3 / 5)
    assert overall.eval_success["QT"] == pytest.approx(1 / 4)
    assert overall.value_failure == pytest.approx((0.2 + 0.3) / 2)
    text = format_table(rows)
    lines = text.splitlines()
    assert "QT closed loop" in lines[0] and "BC closed loop" in lines[0]
    row_a = next(ln for ln in lines if ln.startswith("a "))
    assert " 50% n=4" in row_a and "0.700" in row_a and "0.200" in row_a
    row_all = next(ln for ln in lines if ln.startswith("overall"))
    assert " 60% n=5" in row_all and " 25% [ 5- 70] n=4" in row_all  # 1 of 4: Wilson 95 % 4.6-69.9 %


def test_value_auroc_per_task_shows_a_value_that_only_ranks_tasks() -> None:
    """A value that puts an easy task's episodes above a hard one's, but does not tell successes from
    failures within either, has a pooled AUROC above chance and 0.5 in each task: the table shows both."""
    qt = [_ep("easy", True, [0.9]), _ep("easy", True, [0.8]), _ep("easy", False, [0.85]),
          _ep("hard", True, [0.3]), _ep("hard", False, [0.35]), _ep("hard", False, [0.2])]
    easy, hard, overall = summarize([], {"QT": qt}, ["easy", "hard"])
    assert (easy.value_auroc, hard.value_auroc) == (0.5, 0.5)
    assert overall.value_auroc == pytest.approx(6 / 9)
    lines = format_table([easy, hard, overall]).splitlines()
    assert lines[0].split()[-1] == "AUROC"
    assert next(ln for ln in lines if ln.startswith("overall")).split()[-1] == "0.667"
    assert next(ln for ln in lines if ln.startswith("easy")).split()[-1] == "0.500"
    only_successes = summarize([], {"QT": qt[:2]}, ["easy"])[0]
    assert math.isnan(only_successes.value_auroc)


def test_wilson_interval_and_value_auroc() -> None:
    from q_transformer_ros.e2e.report import value_auroc, wilson_interval

    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson_interval(3, 10)
    assert (lo, hi) == (pytest.approx(0.1078, abs=1e-3), pytest.approx(0.6032, abs=1e-3))
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    assert value_auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert value_auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert value_auroc([0.5, 0.5], [True, False]) == 0.5
    assert math.isnan(value_auroc([0.5, float("nan")], [True, False]))


def test_auroc_interval_narrows_with_episodes_and_matches_hanley_mcneil() -> None:
    from q_transformer_ros.e2e.report import auroc_interval, format_calibration

    # Hanley & McNeil's formula by hand: A = 0.75, 40 and 40 cases, Q1 = 0.6, Q2 = 0.6429
    # -> SE^2 = (0.1875 + 39 * 0.0375 + 39 * 0.0804) / 1600, SE = 0.0547
    lo, hi = auroc_interval(0.75, 40, 40)
    assert (hi - lo) / 2 / 1.96 == pytest.approx(0.0547, abs=2e-4)
    small, large = auroc_interval(0.75, 10, 10), auroc_interval(0.75, 100, 100)
    assert small[1] - small[0] > hi - lo > large[1] - large[0]
    assert auroc_interval(1.0, 5, 5) == (1.0, 1.0) and all(math.isnan(x) for x in auroc_interval(0.7, 0, 5))
    eps = [_ep("a", ok, [v]) for v, ok in zip([0.9, 0.8, 0.3, 0.7, 0.2], [True, True, False, True, False])]
    text = format_calibration(eps)
    assert "value AUROC (success vs failure): 1.000 [1.00-1.00] (Hanley-McNeil 95 %)" in text


def test_value_window_judges_every_episode_over_the_same_early_stretch() -> None:
    """The failure that plays out as real closed loops do: its value rises with the success's early on,
    then the policy stalls beside the goal until the step budget runs out, its value high there. The
    whole-episode mean ranks the failure above the success (it has more late, high steps); the value
    over the first half of the budget ranks them right, and the report shows both numbers."""
    from q_transformer_ros.e2e.report import format_calibration, value_window

    assert value_window(120) == 60 and value_window(1) == 1
    with pytest.raises(ValueError, match="max_episode_steps 0"):
        value_window(0)
    budget = 12
    success = _ep("a", True, [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97])  # succeeds at step 7
    failure = _ep("a", False, [0.4, 0.5, 0.6, 0.7, 0.8, 0.85] + [0.99] * 6)  # stalls, runs to the budget
    window = value_window(budget)
    assert failure.mean_value > success.mean_value
    assert success.early_value(window) > failure.early_value(window)
    assert success.early_value(window) == pytest.approx(np.mean(success.values[:6]))
    assert success.early_value(None) == success.mean_value and math.isnan(_ep("a", True).early_value(window))
    with pytest.raises(ValueError, match="window 0"):
        success.early_value(0)
    row = summarize([], {"QT": [success, failure]}, ["a"], window)[0]
    assert row.value_auroc == 1.0 and row.value_success == pytest.approx(success.early_value(window))
    assert summarize([], {"QT": [success, failure]}, ["a"])[0].value_auroc == 0.0  # whole episodes
    text = format_calibration([success, failure], window)
    assert "value AUROC (success vs failure): 1.000" in text
    assert "over whole episodes instead of the first 6 decisions: 0.000" in text


def test_calibration_bins() -> None:
    bins = calibration_bins([0.05, 0.1, 0.5, 0.95, 1.0, float("nan")], [False, True, True, True, True, True], bins=5)
    assert [n for _, _, n, _ in bins] == [2, 0, 1, 0, 2]  # NaN dropped, 1.0 in the last bin
    assert bins[0][3] == pytest.approx(0.5) and math.isnan(bins[1][3]) and bins[4][3] == pytest.approx(1.0)


def test_records_round_trip_gif_and_plot(tmp_path: Path) -> None:
    recs = [_ep("a", True, [0.5, 0.7], seed=3), EpisodeRecord("b", 4, False, steps=9, noise=0.5, source="x")]
    write_records(tmp_path / "r.jsonl", recs)
    back = read_records(tmp_path / "r.jsonl")
    assert back == recs and back[0].mean_value == pytest.approx(0.6)
    (tmp_path / "bad.jsonl").write_text('{"task": "a"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_records(tmp_path / "bad.jsonl")

    import imageio.v2 as imageio

    frames = [np.full((16, 16, 3), i * 20, dtype=np.uint8) for i in range(5)]
    gif = write_gif(frames, tmp_path / "ep.gif", values=[0.0, 0.5, 1.0], scale=2)
    read = imageio.mimread(gif)
    assert len(read) == 5 and read[0].shape[:2] == (32 + 6, 32)
    assert read[-1][-3, -1, 1] > 150 and read[0][-3, -1, 1] < 100  # value bar full at the end, empty at the start
    plot = plot_value_vs_success({"QT": recs}, tmp_path / "v.png", window=1)
    assert plot is not None and plot.stat().st_size > 1000
    assert plot_value_vs_success({"QT": [_ep("a", True)]}, tmp_path / "none.png") is None  # no values: no plot


# ---------------------------------------------------------------------------------------------
# configuration and stage markers
# ---------------------------------------------------------------------------------------------

def test_config_checks_and_plans(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="drawer-opn-v3"):
        DemoConfig(out=tmp_path, tasks=("drawer-opn-v3",))
    with pytest.raises(ValueError, match="episodes_per_task"):
        DemoConfig(out=tmp_path, episodes_per_task=0)
    with pytest.raises(ValueError, match="domain_id"):
        DemoConfig(out=tmp_path, domain_id=300)
    cfg = DemoConfig(out=tmp_path, tasks=("reach-v3", "push-v3"), episodes_per_task=3, noise_levels=(0.0, 1.0), eval_episodes=2,
                     operators=("expert",))
    plan = cfg.record_plan()
    assert len(plan) == 6 and plan[:3] == [("reach-v3", 0, 0.0), ("reach-v3", 1, 1.0), ("reach-v3", 2, 0.0)]
    assert plan[3] == ("push-v3", 0, 0.0)
    assert {s for _, s in cfg.eval_plan()}.isdisjoint({s for _, s, _ in plan})
    mixed = DemoConfig(out=tmp_path, tasks=("reach-v3",), episodes_per_task=6, noise_levels=(0.0, 1.0),
                       operators=("expert", "wrong_target", "stop_short"))
    assert [mixed.operator_for(s) for _, s, _ in mixed.record_plan()] == ["expert", "wrong_target", "stop_short"] * 2
    assert [n for _, _, n in mixed.record_plan()] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # every style at every noise
    with pytest.raises(ValueError, match="operators"):
        DemoConfig(out=tmp_path, operators=("sloppy",))
    assert min(s for _, s in cfg.eval_plan()) == EVAL_SEED_OFFSET
    from q_transformer_ros.contract import load_contract

    derived = load_contract(cfg.run_contract())  # image_size 32: a copy of the contract in the run folder
    base = load_contract(cfg.contract)
    assert cfg.run_contract().parent == tmp_path and [(c.height, c.width) for c in derived.cameras] == [(32, 32)]
    assert derived.action_dims == base.action_dims and derived.fingerprint() != base.fingerprint()
    assert cfg.with_(image_size=None).run_contract() == cfg.contract
    with pytest.raises(ValueError, match="image_size"):
        DemoConfig(out=tmp_path, image_size=40)
    with pytest.raises(ValueError, match="conservative_weight"):
        DemoConfig(out=tmp_path, conservative_weight=-1)
    with pytest.raises(ValueError, match="keep_still_steps"):
        DemoConfig(out=tmp_path, keep_still_steps=-1)
    from q_transformer_ros.core.trainer import config_from_args
    from q_transformer_ros.e2e.stages import train_argv

    trained = config_from_args(train_argv(cfg.with_(conservative_weight=0.25), tmp_path / "d", tmp_path / "t"))
    assert trained.learner["conservative_weight"] == 0.25 and trained.steps == cfg.train_steps


def test_demo_main_rejects_bad_arguments(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from q_transformer_ros.demo import main

    assert main(["--out", str(tmp_path), "--tasks", "no-such-task-v3"]) == 2
    assert "no-such-task-v3" in capsys.readouterr().err


def test_stage_key_changes_redo_downstream(tmp_path: Path) -> None:
    from q_transformer_ros.e2e import stages as st

    cfg = DemoConfig.quick(out=tmp_path)
    st.write_marker(cfg, "record", st.stage_key(cfg, "record"), 1.0, {})
    convert_key = st.stage_key(cfg, "convert")
    assert convert_key != st.stage_key(cfg.with_(keep_still_steps=None), "convert")
    st.write_marker(cfg, "convert", convert_key, 1.0, {})
    train_key = st.stage_key(cfg, "train")
    assert train_key != st.stage_key(cfg.with_(train_steps=cfg.train_steps + 1), "train")
    eval_key = st.stage_key(cfg, "eval")  # the decoding changes the closed loop, not training
    assert eval_key != st.stage_key(cfg.with_(beam_width=1), "eval")
    assert train_key == st.stage_key(cfg.with_(beam_width=1), "train")
    assert eval_key != st.stage_key(cfg.with_(beam_margin=-1.0), "eval")
    with pytest.raises(ValueError, match="beam_width"):
        cfg.with_(beam_width=0)
    with pytest.raises(ValueError, match="beam_margin"):
        cfg.with_(beam_margin=float("nan"))
    st.write_marker(cfg, "record", st.stage_key(cfg, "record"), 1.0, {})  # record redone: new output id
    assert st.stage_key(cfg, "convert") != convert_key
    st.clear_stage(cfg, "convert")
    assert st.read_marker(cfg, "convert") is None


# ---------------------------------------------------------------------------------------------
# through ROS
# ---------------------------------------------------------------------------------------------

def _need_ros() -> None:
    pytest.importorskip("rclpy")
    pytest.importorskip("metaworld")


def test_train_stage_trains_cloning_alongside_on_cpu(tmp_path: Path) -> None:
    """With compare_bc on CPU the cloning run trains in a child process at the same time (its own log),
    one thread each on a 2-core split; both checkpoints come out, and a rerun resumes (nothing to do)."""
    from q_transformer_ros.contract import load_contract
    from q_transformer_ros.e2e import stages as st
    from q_transformer_ros.replay import ReplayWriter
    from q_transformer_ros.replay.testing import random_episode

    cfg = DemoConfig.quick(out=tmp_path / "run", compare_bc=True, train_steps=3, progress=False, torch_threads=1)
    contract = load_contract(cfg.run_contract())
    rng = np.random.default_rng(0)
    with ReplayWriter(cfg.dataset_dir, contract) as w:
        w.add_episodes([random_episode(contract, 6, rng, success=bool(i % 2), instruction="close the drawer",
                                       source_id=f"e{i}") for i in range(3)])
    st.train(cfg)
    assert cfg.checkpoint.exists() and cfg.checkpoint_bc.exists()
    log = (cfg.logs_dir / "train_bc.log").read_text()
    assert "1 torch thread" in log, log[-2000:]
    bc_steps = [json.loads(ln)["step"] for ln in (cfg.train_bc_dir / "metrics.jsonl").read_text().splitlines() if ln]
    assert bc_steps[-1] == 3


def _fake_loops(monkeypatch: pytest.MonkeyPatch, bc_fails: bool) -> dict[str, int]:
    """Replace the ROS closed loop by one that meets the other loop at a barrier, so it returns only if
    both loops run at the same time; with ``bc_fails`` the cloning loop raises once both are running and
    the Q-Transformer's waits for the cancellation."""
    import threading  # noqa: PLC0415

    from q_transformer_ros.e2e import stages as st  # noqa: PLC0415

    both = threading.Barrier(2, timeout=20)
    domains: dict[str, int] = {}

    def fake(cfg, run, bar_position, t0):  # noqa: ANN001
        label = run.label
        domains[label] = run.domain_id
        domains[label + " beam"] = run.beam_width
        domains[label + " margin"] = run.beam_margin
        run.connected.set()
        both.wait()
        if bc_fails and label.endswith("BC"):
            raise st.StageError("eval: policy_node of BC died")
        if bc_fails:
            deadline = time.monotonic() + 20
            while not run.cancel and time.monotonic() < deadline:
                time.sleep(0.01)
            raise st.LoopCancelled(f"eval: {label} stopped because the other closed loop failed")
        rec = EpisodeRecord(task="drawer-close-v3", seed=EVAL_SEED_OFFSET, success=not label.endswith("BC"),
                            steps=3, values=[0.5] * 3, source=label)
        write_records(run.log, [rec])
        run.done = [rec]

    monkeypatch.setattr(st, "closed_loop", fake)
    return domains


def test_eval_runs_qt_and_bc_loops_side_by_side_in_two_domains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The eval stage runs the cloning closed loop next to the Q-Transformer's (a loop is latency-bound),
    each in its own ROS domain; a failure of one stops the other and is the error reported."""
    from q_transformer_ros.e2e import stages as st

    cfg = DemoConfig.quick(out=tmp_path / "run", compare_bc=True, progress=False, domain_id=DOMAIN_QUICK)
    for ckpt in (cfg.checkpoint, cfg.checkpoint_bc):
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"not read by the fake loop")
    domains = _fake_loops(monkeypatch, bc_fails=False)
    out = st.evaluate(cfg)  # the barrier would time out (BrokenBarrierError) if the loops ran one after the other
    # both decode with the config's beam width (the policy picks what cloning's beam ranks by): a fair
    # comparison; the margin guards a beam ranked by values, the Q-Transformer's
    assert domains == {"closed loop": DOMAIN_QUICK, "closed loop BC": DOMAIN_QUICK + 1,
                       "closed loop beam": cfg.beam_width, "closed loop BC beam": cfg.beam_width,
                       "closed loop margin": cfg.beam_margin, "closed loop BC margin": None}
    assert cfg.beam_width > 1 and cfg.beam_margin == 0.05
    assert (out["episodes"], out["successes"], out["bc_successes"]) == (1, 1, 0)
    assert set(out["loops"]) == {"closed loop", "closed loop BC"}

    _fake_loops(monkeypatch, bc_fails=True)
    with pytest.raises(st.StageError, match="policy_node of BC died"):
        st.evaluate(cfg)
    assert DemoConfig.quick(out=tmp_path / "x", domain_id=232).bc_domain_id == 231  # stays a valid domain


def test_record_one_episode_through_ros_and_convert(tmp_path: Path) -> None:
    _need_ros()
    from q_transformer_ros.core.replay_dataset import ReplayDataset
    from q_transformer_ros.demo import run
    from q_transformer_ros.e2e import stages as st

    cfg = DemoConfig.quick(out=tmp_path / "run", episodes_per_task=1, max_episode_steps=12, domain_id=DOMAIN_RECORD,
                           progress=False)
    run(cfg, ("record", "convert"))
    recs = read_records(cfg.record_log)
    assert len(recs) == 1
    rec = recs[0]
    assert (rec.task, rec.seed, rec.noise) == ("drawer-close-v3", 0, 0.0)
    assert (Path(rec.source) / "metadata.yaml").is_file(), rec.source
    assert 10 <= rec.steps <= 12  # the sim's own step count (one success message per step)

    data = st.dataset_records(cfg)
    assert len(data) == 1
    assert data[0].task == "drawer-close-v3" and data[0].success == rec.success
    assert 8 <= data[0].steps <= 12, data[0].steps  # converter steps at the contract rate from bag times
    ds = ReplayDataset(cfg.dataset_dir)
    sample = ds[len(ds) - 1]
    actions = np.stack([ds[i]["actions"].numpy() for i in range(len(ds))])
    assert np.abs(actions).max() > 0.05, "no expert commands reached the bag"
    assert sample["frames"].float().std() > 10, "blank camera frames"
    if ds.contract.state_dim:  # the arm's state went sim -> recorder -> converter with every step
        state = np.asarray(ds.episode(0).state)
        assert state.shape == (len(ds.episode(0).actions), ds.contract.state_dim) and np.isfinite(state).all()
        names = [s.name for s in ds.contract.state_inputs]
        assert np.ptp(state[:, names.index("ee_z")]) > 0 or np.ptp(state[:, names.index("ee_x")]) > 0, "the hand never moved"
        assert (state >= ds.contract.state_low - 0.1).all() and (state <= ds.contract.state_high + 0.1).all()

    before = {s: st.read_marker(cfg, s)["output_id"] for s in ("record", "convert")}
    bags = sorted(cfg.bags_dir.iterdir())
    timings = run(cfg, ("record", "convert"))  # resumable: both stages are skipped
    assert timings == {}
    assert {s: st.read_marker(cfg, s)["output_id"] for s in ("record", "convert")} == before
    assert sorted(cfg.bags_dir.iterdir()) == bags
    # a fresh config object for the same run folder (what a rerun of the command builds) skips too
    again = DemoConfig.quick(out=tmp_path / "run", episodes_per_task=1, max_episode_steps=12, domain_id=DOMAIN_RECORD,
                             progress=False)
    assert run(again, ("record", "convert")) == {}


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _need_ros()
    from q_transformer_ros.demo import main

    out = tmp_path / "quick"
    assert main(["--quick", "--out", str(out), "--domain-id", str(DOMAIN_QUICK), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "QT closed loop" in text and "overall" in text
    evals = read_records(out / "eval.jsonl")
    assert len(evals) == 1 and evals[0].seed >= EVAL_SEED_OFFSET and evals[0].steps >= 1
    assert evals[0].values and all(0.0 <= v <= 1.0 for v in evals[0].values)
    assert (out / "closed_loop.gif").stat().st_size > 0 and (out / "train" / "checkpoint.pt").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["rows"][-1]["task"] == "overall"
