"""The demo's five stages: record (through ROS) -> convert -> train -> closed loop (through ROS) -> report.

Each stage reads the previous stage's output from the run folder, writes its own output atomically
and then a done-marker ``stages/<stage>.json`` holding a *key* (everything its output depends on,
including the upstream stage's output id) and a fresh output id. A rerun skips a stage whose marker
key still matches, so a crash costs only the unfinished stage; recording and the closed loop also
resume episode by episode. ``--force`` removes a stage's output, which changes its output id and so
redoes every stage after it.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from q_transformer_ros.e2e.config import STAGES, DemoConfig
from q_transformer_ros.e2e.processes import NodeGroup
from q_transformer_ros.e2e.report import (
    EpisodeRecord, format_calibration, format_table, plot_value_vs_success, read_records, summarize, value_window,
    write_gif, write_records, write_text_atomic,
)


class StageError(RuntimeError):
    """A stage failed; the message names the stage, the file or node, and what to look at."""


class LoopCancelled(StageError):
    """A closed loop of the eval stage stopped because the loop beside it failed."""


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# markers
# ---------------------------------------------------------------------------------------------

def read_marker(cfg: DemoConfig, stage: str) -> dict[str, Any] | None:
    path = cfg.marker(stage)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None  # a marker is written atomically; an unreadable one means: redo the stage


def write_marker(cfg: DemoConfig, stage: str, key: dict[str, Any], seconds: float, info: dict[str, Any]) -> str:
    output_id = uuid.uuid4().hex[:12]
    write_text_atomic(cfg.marker(stage), json.dumps(
        {"stage": stage, "key": key, "output_id": output_id, "seconds": round(seconds, 1), "info": info}, indent=1))
    return output_id


def upstream_id(cfg: DemoConfig, stage: str) -> str | None:
    m = read_marker(cfg, stage)
    return None if m is None else m.get("output_id")


def stage_key(cfg: DemoConfig, stage: str) -> dict[str, Any]:
    """What the stage's output depends on."""
    contract = cfg.contract.read_text()
    if stage == "record":
        key = {"tasks": list(cfg.tasks), "episodes_per_task": cfg.episodes_per_task, "noise": list(cfg.noise_levels),
               "max_episode_steps": cfg.max_episode_steps, "contract": contract}
        if cfg.operators != ("expert",):
            key["operators"] = list(cfg.operators)
        return key
    if stage == "convert":
        key = {"record": upstream_id(cfg, "record")}
        if cfg.keep_still_steps is not None:
            key["keep_still_steps"] = cfg.keep_still_steps
        return key
    if stage == "train":
        return {"convert": upstream_id(cfg, "convert"), "steps": cfg.train_steps, "batch": cfg.batch_size,
                "preset": cfg.model_preset, "objective": cfg.objective, "text": cfg.text_encoder_weights,
                "seed": cfg.seed, "extra": list(cfg.extra_train_args), "device": cfg.device, "bc": cfg.compare_bc,
                "conservative_weight": cfg.conservative_weight}
    if stage == "eval":
        key = {"train": upstream_id(cfg, "train"), "episodes": cfg.eval_episodes, "tasks": list(cfg.tasks),
               "max_episode_steps": cfg.max_episode_steps}
        if cfg.beam_width != 1:
            key["beam_width"] = cfg.beam_width
            key["beam_margin"] = cfg.beam_margin
        return key
    return {}


def clear_stage(cfg: DemoConfig, stage: str) -> None:
    """Remove a stage's outputs and marker."""
    paths = {
        "record": [cfg.bags_dir, cfg.record_log],
        "convert": [cfg.dataset_dir, cfg.out / "convert_report.json"],
        "train": [cfg.train_dir],
        "eval": [cfg.eval_log, cfg.out / "closed_loop.gif"],
        "report": [cfg.out / "report.md", cfg.out / "report.json", cfg.out / "value_vs_success.png"],
    }[stage]
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    cfg.marker(stage).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# ROS plumbing shared by record and eval
# ---------------------------------------------------------------------------------------------

def _wait_services(ros: Any, nodes: NodeGroup, names: list[str], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    for name in names:
        while not ros.driver.service_ready(name, 0.5):
            nodes.check_alive()
            if time.monotonic() > deadline:
                raise StageError(f"{name} node did not offer its services within {timeout_s:.0f} s; see {cfg_logs_hint(nodes)}")


def cfg_logs_hint(nodes: NodeGroup) -> str:
    return ", ".join(str(n.log_path) for n in nodes.nodes)


def _sim_params(cfg: DemoConfig) -> dict[str, Any]:
    return {"contract": str(cfg.contract.resolve()), "reset_on_start": False, "max_episode_steps": cfg.max_episode_steps,
            "task": cfg.tasks[0], "publish_clock": cfg.sim_time}


def _clock_params(cfg: DemoConfig) -> dict[str, Any]:
    """Parameters of every node that follows the sim's clock (all but sim_node and the demo's driver)."""
    return {"use_sim_time": True} if cfg.sim_time else {}


def _progress(total: int, initial: int, desc: str, enabled: bool, position: int = 0) -> Any:
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(total=total, initial=initial, desc=desc, unit="ep", dynamic_ncols=True, disable=not enabled,
                position=position)


# ---------------------------------------------------------------------------------------------
# 1. record
# ---------------------------------------------------------------------------------------------

def record(cfg: DemoConfig) -> dict[str, Any]:
    """Scripted expert (+ noise) drives the sim node; the recorder writes one MCAP bag per episode."""
    from q_transformer_ros.contract import load_contract  # noqa: PLC0415

    plan = cfg.record_plan()
    have = {(r.task, r.seed, r.noise): r for r in read_records(cfg.record_log)
            if r.source and Path(r.source).exists() and r.operator == cfg.operator_for(r.seed)}
    done = [have[k] for k in plan if k in have]
    todo = [k for k in plan if k not in have]
    if done:
        _say(f"record: {len(done)} of {len(plan)} episodes already recorded in {cfg.bags_dir}, {len(todo)} to go")
    if todo:
        from q_transformer_ros.ros.episode_driver import RosSession  # noqa: PLC0415 - rclpy only when needed

        contract = load_contract(cfg.contract)
        logs = cfg.logs_dir
        recorder = {"output_dir": str(cfg.bags_dir.resolve()), "storage": "mcap", "stop_on_success": False,
                    **_clock_params(cfg)}
        with NodeGroup() as nodes, RosSession(contract, cfg.contract, cfg.domain_id, recorder_params=recorder) as ros:
            nodes.start("sim_node", "q_transformer_ros.ros.sim_node", _sim_params(cfg), logs / "record_sim_node.log", cfg.domain_id)
            nodes.start("expert_node", "q_transformer_ros.ros.expert_node",
                        {"contract": str(cfg.contract.resolve()), "seed": cfg.seed, "noise_std": 0.0,
                         **_clock_params(cfg)},
                        logs / "record_expert_node.log", cfg.domain_id)
            _say(f"record: sim_node + expert_node started (ROS_DOMAIN_ID={cfg.domain_id}, logs in {logs}); "
                 f"recorder in this process -> {cfg.bags_dir}")
            _wait_services(ros, nodes, ["sim", "expert"])
            waited = ros.driver.warm_up(todo[0][0], 999, alive=nodes.check_alive)
            _say(f"record: expert -> sim loop connected after {waited:.1f} s")
            bar = _progress(len(plan), len(done), "record", cfg.progress)
            try:
                for task, seed, noise in todo:
                    nodes.check_alive()
                    operator = cfg.operator_for(seed)
                    ros.driver.set_parameters("expert", {"noise_std": float(noise), "operator": operator})
                    ros.recorder.prefix = f"{task}_seed{seed:03d}_noise{noise:g}" + (
                        "" if operator == "expert" else f"_{operator}")
                    out = ros.driver.run_episode(task, seed, record=True, max_steps=cfg.max_episode_steps)
                    done.append(EpisodeRecord(task=task, seed=seed, success=out.success, noise=float(noise),
                                              steps=out.steps, source=out.bag or "", operator=operator))
                    done.sort(key=lambda r: plan.index((r.task, r.seed, r.noise)))
                    write_records(cfg.record_log, done)
                    bar.set_postfix(task=task, last=out.end_reason, success=f"{sum(r.success for r in done)}/{len(done)}")
                    bar.update(1)
            finally:
                bar.close()
    ok = sum(r.success for r in done)
    _say(f"record: {len(done)} episodes, {ok} successful, bags in {cfg.bags_dir}")
    return {"episodes": len(done), "successes": ok}


# ---------------------------------------------------------------------------------------------
# 2. convert
# ---------------------------------------------------------------------------------------------

def convert(cfg: DemoConfig) -> dict[str, Any]:
    """The bags of the record log -> a replay dataset (one transaction per bag; the converter's own table)."""
    from q_transformer_ros.data.convert import main as convert_main  # noqa: PLC0415

    records = read_records(cfg.record_log)
    bags = [r.source for r in records if r.source]
    if not bags:
        raise StageError(f"convert: no recorded bags listed in {cfg.record_log}; run the record stage")
    if cfg.dataset_dir.exists():
        shutil.rmtree(cfg.dataset_dir)  # rebuilt from exactly the listed bags
    argv = [*bags, "--out", str(cfg.dataset_dir), "--contract", str(cfg.contract), "--unlabeled", "failure",
            "--workers", str(cfg.convert_workers), "--report-json", str(cfg.out / "convert_report.json")]
    if cfg.keep_still_steps is not None:
        from q_transformer_ros.contract import load_contract  # noqa: PLC0415

        if load_contract(cfg.contract).state_dim:
            argv += ["--keep-still-steps", str(cfg.keep_still_steps)]
        else:
            _say(f"convert: contract {cfg.contract} has no state inputs: every still step is kept")
    if not cfg.progress:
        argv.append("--no-progress")
    rc = convert_main(argv)
    if rc != 0:
        raise StageError(f"convert: convert_bag exited with status {rc} (bags listed in {cfg.record_log})")
    data = dataset_records(cfg)
    _say(f"convert: dataset {cfg.dataset_dir}: {len(data)} episodes, {sum(e.steps for e in data)} steps, "
         f"{sum(e.success for e in data)} successful")
    return {"episodes": len(data), "steps": sum(e.steps for e in data)}


def dataset_records(cfg: DemoConfig) -> list[EpisodeRecord]:
    """The converted dataset's episodes (task from the instruction text)."""
    from q_transformer_ros.replay.format import read_manifest  # noqa: PLC0415
    from q_transformer_ros.sim.tasks import task_for_instruction  # noqa: PLC0415

    if not (cfg.dataset_dir / "manifest.json").exists():
        return []
    m = read_manifest(cfg.dataset_dir)
    out = []
    for ep in m.episodes:
        text = m.instructions[ep.instruction_index] if ep.instruction_index is not None and ep.instruction_index >= 0 else ""
        try:
            task = task_for_instruction(text)
        except KeyError:
            task = f"? ({text})"
        out.append(EpisodeRecord(task=task, seed=-1, success=bool(ep.success), steps=int(ep.length), source=ep.source_id or ""))
    return out


# ---------------------------------------------------------------------------------------------
# 3. train
# ---------------------------------------------------------------------------------------------

def train_argv(cfg: DemoConfig, dataset: Path, out: Path, objective: str | None = None) -> list[str]:
    """``train`` flags for this config (shared with the learning benchmark)."""
    argv = ["--dataset", str(dataset), "--out", str(out), "--steps", str(cfg.train_steps),
            "--batch-size", str(cfg.batch_size), "--model-preset", cfg.model_preset,
            "--objective", objective or cfg.objective,
            "--device", cfg.device, "--seed", str(cfg.seed),
            "--checkpoint-every", str(max(50, cfg.train_steps // 5)),
            "--set", f"warmup_steps={min(100, max(1, cfg.train_steps // 10))}",
            "--set", f"log_every={max(1, min(20, cfg.train_steps // 10))}",
            "--set", f"threads={cfg.torch_threads}",  # 0: the trainer picks (cores not already busy)
            "--set", f"learner.conservative_weight={cfg.conservative_weight}"]
    if cfg.text_encoder_weights:
        argv += ["--set", f"text_encoder.pretrained={cfg.text_encoder_weights}"]
    else:
        argv += ["--set", "text_encoder.text_overrides={width: 128, layers: 2, heads: 2}"]
    if not cfg.progress:
        argv.append("--no-progress")
    return argv + list(cfg.extra_train_args)


def train(cfg: DemoConfig) -> dict[str, Any]:
    """Train on the converted dataset (resumes from train/checkpoint.pt after a crash); with
    ``compare_bc`` also behaviour cloning into train_bc/ (same data, network, steps, seed).

    On CPU the cloning run trains at the same time in a child process (log in ``logs/train_bc.log``),
    the free cores split between the two. Why: the tiny model gains only ~15 % from a second thread
    (310 vs 270 samples/s on 2 cores), so two 1-thread runs side by side finish in the time of the
    longer one (session 8: 530 s instead of 858 s one after the other)."""
    from q_transformer_ros.core.trainer import auto_threads  # noqa: PLC0415
    from q_transformer_ros.core.trainer import main as train_main  # noqa: PLC0415

    if not (cfg.dataset_dir / "manifest.json").exists():
        raise StageError(f"train: no dataset at {cfg.dataset_dir}; run the convert stage")
    runs = [(cfg.objective, cfg.train_dir, cfg.checkpoint)]
    if cfg.compare_bc and cfg.objective != "bc":
        runs.append(("bc", cfg.train_bc_dir, cfg.checkpoint_bc))
    side: tuple[str, Path, Path, subprocess.Popen, Path] | None = None
    if len(runs) == 2 and cfg.device == "cpu":
        threads = cfg.torch_threads or max(1, auto_threads() // 2)
        cfg = cfg.with_(torch_threads=threads)
        objective, folder, checkpoint = runs.pop()
        log_path = cfg.logs_dir / f"train_{objective}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = train_argv(cfg.with_(progress=False), cfg.dataset_dir, folder, objective)
        with log_path.open("ab") as log:
            proc = subprocess.Popen([sys.executable, "-P", "-m", "q_transformer_ros.core.trainer", *argv],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        side = (objective, folder, checkpoint, proc, log_path)
        _say(f"train: objective {objective} -> {folder}, alongside ({threads} thread(s) each; log {log_path})")
    try:
        for objective, folder, checkpoint in runs:
            _say(f"train: objective {objective} -> {folder}")
            rc = train_main(train_argv(cfg, cfg.dataset_dir, folder, objective))
            if rc != 0 or not checkpoint.exists():
                raise StageError(f"train: the trainer ({objective}) exited with status {rc} (output folder {folder})")
            _say(f"train: checkpoint {checkpoint}; curves {folder / 'metrics.png'}")
        if side is not None:
            objective, folder, checkpoint, proc, log_path = side
            if proc.poll() is None:
                _say(f"train: waiting for {objective} ({log_path})")
            rc = proc.wait()
            side = None
            if rc != 0 or not checkpoint.exists():
                raise StageError(f"train: the trainer ({objective}) exited with status {rc} (output folder {folder}); "
                                 f"see {log_path}")
            _say(f"train: checkpoint {checkpoint}; curves {folder / 'metrics.png'}")
    finally:
        if side is not None and side[3].poll() is None:  # the main run failed or was interrupted
            side[3].terminate()
            try:
                side[3].wait(timeout=30)
            except subprocess.TimeoutExpired:
                side[3].kill()
    return {"last_metrics": _last_metrics(cfg.train_dir / "metrics.jsonl")}


def _last_metrics(path: Path) -> dict[str, float]:
    if not path.exists():
        return {}
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


# ---------------------------------------------------------------------------------------------
# 4. closed loop
# ---------------------------------------------------------------------------------------------

def evaluate(cfg: DemoConfig) -> dict[str, Any]:
    """policy_node (the trained checkpoint) drives sim_node on held-out seeds, through ROS topics; with
    ``compare_bc`` the cloning checkpoint drives the same seeds at the same time, with its own sim_node
    and policy_node in the next ROS domain (``cfg.bc_domain_id``).

    Why side by side: one closed loop is bound by its latency (frame -> decision -> command -> sim step),
    not by the CPU. Measured on the 2-core VM (session 9, tiny model, policy nodes at one torch thread):
    one loop kept the cores ~115 % busy out of 200 %."""
    if not cfg.checkpoint.exists():
        raise StageError(f"eval: no checkpoint at {cfg.checkpoint}; run the train stage")
    loops = [LoopRun("closed loop", cfg.checkpoint, cfg.eval_log, cfg.domain_id, keep_frames=True,
                     beam_width=cfg.beam_width, beam_margin=cfg.beam_margin)]
    if cfg.compare_bc and cfg.checkpoint_bc.exists():
        loops.append(LoopRun("closed loop BC", cfg.checkpoint_bc, cfg.eval_bc_log, cfg.bc_domain_id, keep_frames=False,
                             beam_width=cfg.beam_width))
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(loops), thread_name_prefix="closed-loop") as pool:
        futures = []
        for position, run in enumerate(loops):
            futures.append(pool.submit(_run_loop, cfg, run, position, t0, loops))
            run.connected.wait()  # the next loop starts its nodes once this one is connected (or failed)
        errors = [f.exception() for f in futures]
    failed = sorted((e for e in errors if e is not None), key=lambda e: isinstance(e, LoopCancelled))
    if failed:
        raise failed[0]  # the failure itself, not the other loop's "stopped because ..."
    done, films = loops[0].done, [f for f in loops[0].films if f[1]]
    gif = cfg.out / "closed_loop.gif"
    if films:
        rec, frames = next((f for f in films if f[0].success), films[0])
        write_gif(frames, gif, rec.values, fps=cfg_rate(cfg), scale=max(1, 128 // max(1, frames[0].shape[1])))
        _say(f"eval: GIF of {rec.task} seed {rec.seed} ({'success' if rec.success else 'failure'}) -> {gif}")
    ok = sum(r.success for r in done)
    _say(f"eval: {ok}/{len(done)} closed-loop episodes successful ({cfg.eval_log})")
    out: dict[str, Any] = {"episodes": len(done), "successes": ok,
                           "loops": {r.label: [round(r.started_s, 2), round(r.ended_s, 2)] for r in loops}}
    if len(loops) == 2:
        bc = loops[1].done
        out["bc_successes"] = sum(r.success for r in bc)
        _say(f"eval: behaviour cloning {out['bc_successes']}/{len(bc)} closed-loop episodes successful ({cfg.eval_bc_log})")
    return out


@dataclass
class LoopRun:
    """One closed loop of the eval stage: what it runs, and (filled in) what came out and when."""

    label: str
    checkpoint: Path
    log: Path
    domain_id: int
    keep_frames: bool
    beam_width: int = 1
    """The policy node's ``beam_width`` (1 = greedy)."""
    beam_margin: float | None = None
    """The policy node's ``beam_margin`` (None: always the beam's action). A cloning checkpoint's node
    ignores it, and says so in its log."""
    connected: threading.Event = field(default_factory=threading.Event)
    """Set once the loop's nodes answer (or it failed): the next loop may start its nodes."""
    cancel: bool = False
    """Set when another loop failed: this one stops before its next episode."""
    done: list[EpisodeRecord] = field(default_factory=list)
    films: list[tuple[EpisodeRecord, list[Any]]] = field(default_factory=list)
    started_s: float = 0.0
    ended_s: float = 0.0
    """Seconds since the stage began when the loop's first and last episode ran (for the report, and to
    see that the loops overlapped)."""


def _run_loop(cfg: DemoConfig, run: LoopRun, position: int, t0: float, all_runs: list[LoopRun]) -> None:
    """Thread body: ``closed_loop`` for ``run``; a failing loop makes the others stop after their episode."""
    try:
        closed_loop(cfg, run, position, t0)
    except BaseException:
        for other in all_runs:
            other.cancel = True
        raise
    finally:
        run.connected.set()


def closed_loop(cfg: DemoConfig, run: LoopRun, bar_position: int, t0: float) -> None:
    """Run ``run.checkpoint`` in a policy_node against sim_node (ROS domain ``run.domain_id``) on every seed
    of the eval plan not yet in ``run.log`` (resumable). Fills in ``run``: all records of the plan, the
    frames of the episodes run now, when the loop connected and ended; stops before an episode once
    ``run.cancel`` is set (another loop failed)."""
    from q_transformer_ros.contract import load_contract  # noqa: PLC0415

    checkpoint, log, label, keep_frames, domain = run.checkpoint, run.log, run.label, run.keep_frames, run.domain_id
    plan = cfg.eval_plan()
    have = {(r.task, r.seed): r for r in read_records(log)}
    done = [have[k] for k in plan if k in have]
    todo = [k for k in plan if k not in have]
    if done:
        _say(f"eval: {len(done)} of {len(plan)} {label} episodes already done, {len(todo)} to go")
    run.done, run.films = done, []
    if not todo:
        return
    from q_transformer_ros.ros.episode_driver import RosSession  # noqa: PLC0415

    contract = load_contract(cfg.contract)
    logs = cfg.logs_dir
    tag = "eval" if log == cfg.eval_log else log.stem
    with NodeGroup() as nodes, RosSession(contract, cfg.contract, domain, with_decisions=True) as ros:
        nodes.start("sim_node", "q_transformer_ros.ros.sim_node", _sim_params(cfg), logs / f"{tag}_sim_node.log", domain)
        nodes.start("policy_node", "q_transformer_ros.ros.policy_node",
                    {"checkpoint": str(checkpoint.resolve()), "device": cfg.device, "enable_on_start": False,
                     "beam_width": run.beam_width, "beam_margin": -1.0 if run.beam_margin is None else run.beam_margin,
                     **_clock_params(cfg)},
                    logs / f"{tag}_policy_node.log", domain)
        decoding = ("greedy" if run.beam_width == 1 else f"beam width {run.beam_width}"
                    + ("" if run.beam_margin is None else f", margin {run.beam_margin:g}"))
        _say(f"eval: sim_node + policy_node ({checkpoint}, {decoding}) started (ROS_DOMAIN_ID={domain}, logs in {logs})")
        if not ros.decisions_available:
            _say("eval: WARNING: q_transformer_ros/Decision is not built (scripts/colcon_build.sh): "
                 "no predicted values will be reported")
        _wait_services(ros, nodes, ["sim", "policy"])
        waited = ros.driver.warm_up(todo[0][0], 999, policy=True, alive=nodes.check_alive)
        _say(f"eval: {label}: policy -> sim loop connected after {waited:.1f} s")
        run.started_s = time.monotonic() - t0
        run.connected.set()
        bar = _progress(len(plan), len(done), label, cfg.progress, position=bar_position)
        try:
            for task, seed in todo:
                if run.cancel:
                    raise LoopCancelled(f"eval: {label} stopped because the other closed loop failed")
                nodes.check_alive()
                out = ros.driver.run_episode(task, seed, policy=True, keep_frames=keep_frames,
                                             max_steps=cfg.max_episode_steps)
                rec = EpisodeRecord(task=task, seed=seed, success=out.success, steps=out.steps,
                                    values=[round(v, 5) for v in out.values], source=label)
                done.append(rec)
                done.sort(key=lambda r: plan.index((r.task, r.seed)))
                write_records(log, done)
                run.films.append((rec, out.frames))
                bar.set_postfix(task=task, last=out.end_reason, value=f"{rec.mean_value:.3f}",
                                success=f"{sum(r.success for r in done)}/{len(done)}")
                bar.update(1)
        finally:
            bar.close()
            run.ended_s = time.monotonic() - t0


def cfg_rate(cfg: DemoConfig) -> float:
    from q_transformer_ros.contract import load_contract  # noqa: PLC0415

    return float(load_contract(cfg.contract).control_rate_hz)


# ---------------------------------------------------------------------------------------------
# 5. report
# ---------------------------------------------------------------------------------------------

def report(cfg: DemoConfig) -> dict[str, Any]:
    """Table (data / closed-loop success, value on success vs failure), calibration, plots, timings."""
    data = dataset_records(cfg) or read_records(cfg.record_log)
    evals = read_records(cfg.eval_log)
    policies = {"QT": evals}
    if cfg.compare_bc and cfg.eval_bc_log.exists():
        policies["BC"] = read_records(cfg.eval_bc_log)
    window = value_window(cfg.max_episode_steps)
    rows = summarize(data, policies, cfg.tasks, window)
    table = format_table(rows)
    calib = format_calibration(evals, window)
    timings = {s: (read_marker(cfg, s) or {}).get("seconds") for s in STAGES if s != "report"}
    plot = plot_value_vs_success({"QT": evals}, cfg.out / "value_vs_success.png", window) if evals else None
    files = {
        "bags": cfg.bags_dir, "dataset": cfg.dataset_dir, "checkpoint": cfg.checkpoint,
        "training curves": cfg.train_dir / "metrics.png", "closed-loop episodes": cfg.eval_log,
        "value vs success plot": plot, "closed-loop GIF": cfg.out / "closed_loop.gif", "node logs": cfg.logs_dir,
    }
    bc_note = ("; BC: behaviour cloning, same data, network, steps, seeds and decoding"
               + (" (its beam ranks by log-probability, QT's by Q)." if cfg.beam_width > 1 else "."))
    lines = ["# Q-Transformer end-to-end demo", "",
             f"tasks {', '.join(cfg.tasks)}; {cfg.episodes_per_task} recorded episodes per task (noise std "
             f"{', '.join(f'{x:g}' for x in cfg.noise_levels)}; operators {', '.join(cfg.operators)}), "
             f"{cfg.train_steps} training steps ({cfg.model_preset}), "
             f"{cfg.eval_episodes} closed-loop episodes per task on held-out seeds"
             + (f", decoded with beam width {cfg.beam_width} (QT acts on the beam's action only when its value "
                f"beats the greedy action's by more than {cfg.beam_margin:g})" if cfg.beam_width > 1
                else ", decoded greedily")
             + (bc_note if "BC" in policies else "."), "",
             "```", table, "```", "",
             f"Calibration of the closed-loop predicted value (V|success, V|failure, AUROC: each episode's mean "
             f"over its first {window} decisions, half the step budget, so that failures' extra steps do not "
             "weigh in):", "",
             "```", calib, "```", "", "Stage wall times (s): " +
             ", ".join(f"{s} {t:.0f}" for s, t in timings.items() if isinstance(t, (int, float))), "", "Files:", ""]
    lines += [f"- {k}: {v}" for k, v in files.items() if v is not None and Path(v).exists()]
    write_text_atomic(cfg.out / "report.md", "\n".join(lines) + "\n")
    write_text_atomic(cfg.out / "report.json", json.dumps(_nan_safe({
        "rows": [r.__dict__ for r in rows], "value_window": window, "timings_s": timings, "config": cfg.to_dict()}),
        indent=1))
    print("\n" + table + "\n\n" + calib + "\n", flush=True)
    for k, v in files.items():
        if v is not None and Path(v).exists():
            print(f"  {k:<22} {v}")
    _say(f"report: {cfg.out / 'report.md'}")
    return {"rows": len(rows)}


def _nan_safe(x: Any) -> Any:
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_safe(v) for v in x]
    return x


STAGE_FUNCTIONS: dict[str, Callable[[DemoConfig], dict[str, Any]]] = {
    "record": record, "convert": convert, "train": train, "eval": evaluate, "report": report,
}
