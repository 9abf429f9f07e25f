"""Both install paths work: colcon (ROS face: msg/srv, lib/ executables, share/, ament index) and
`pip install .` (ROS-free library + console scripts); core/ and data/ import without ROS; the
generated Decision message and ScoreInstructions service round-trip over real Fast DDS.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from qtr_testing import INSTALL_SITE_PACKAGES, REPO_ROOT, ros_subprocess_env

PACKAGE_DIR = REPO_ROOT / "q_transformer_ros"

# `ros2 run q_transformer_ros <exe>` -> module whose main() it calls (also the pip console scripts).
EXECUTABLES = {
    "train": "q_transformer_ros.core.trainer",
    "convert_bag": "q_transformer_ros.data.convert",
    "lerobot_import": "q_transformer_ros.data.lerobot_import",
    "lerobot_export": "q_transformer_ros.data.lerobot_export",
    "record": "q_transformer_ros.ros.recorder",
    "policy_node": "q_transformer_ros.ros.policy_node",
    "sim_node": "q_transformer_ros.ros.sim_node",
    "expert_node": "q_transformer_ros.ros.expert_node",
    "demo": "q_transformer_ros.demo",
}
# Executables whose `--help` must work without ROS (argparse front ends of the ROS-free core).
ROS_FREE_EXECUTABLES = ("train", "convert_bag", "lerobot_import", "lerobot_export")
# Python packages that exist only in a ROS install: the ROS-free core must import none of them.
ROS_ONLY_MODULES = (
    "rclpy", "rosidl_runtime_py", "rpyutils", "ament_index_python", "cv_bridge", "launch", "launch_ros",
    "std_msgs", "sensor_msgs", "geometry_msgs", "trajectory_msgs", "std_srvs", "builtin_interfaces",
    "diagnostic_msgs", "lifecycle_msgs",
)
BLOCK_ROS = "import sys\nfor _m in %r:\n    sys.modules[_m] = None\n" % (ROS_ONLY_MODULES,)


def source_modules(*subpackages: str) -> list[str]:
    """Dotted names of every module in the source tree under the given subpackages (or all of it)."""
    roots = [PACKAGE_DIR / s for s in subpackages] if subpackages else [PACKAGE_DIR]
    names = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(REPO_ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join(parts))
    return names


def source_py_files() -> list[Path]:
    """Every .py file of the package, relative to the repo root (what both installs must carry)."""
    return sorted(
        p.relative_to(REPO_ROOT) for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts
    )


def run(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, cwd=cwd, timeout=timeout, capture_output=True, text=True)


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


# -------------------------------------------------------------------------------------------------
# (a) ROS-free core
# -------------------------------------------------------------------------------------------------

def test_core_and_data_import_without_ros(tmp_path: Path, venv_python: Path) -> None:
    """Every module under core/, data/ and control/ imports with rclpy and all ROS message packages blocked."""
    modules = source_modules("core", "data", "control", "replay") + ["q_transformer_ros.contract", "q_transformer_ros.observation"]
    assert "q_transformer_ros.replay.writer" in modules, f"walk of {PACKAGE_DIR} found {modules}"
    script = BLOCK_ROS + textwrap.dedent(f"""
        import importlib, json, traceback
        failures = {{}}
        for name in {modules!r}:
            try:
                importlib.import_module(name)
            except BaseException:
                failures[name] = traceback.format_exc(limit=6)
        import q_transformer_ros
        print(json.dumps({{"failures": failures, "path": list(q_transformer_ros.__path__),
                          "rclpy_loaded": sys.modules.get("rclpy") is not None}}))
    """)
    # Source tree first on sys.path, no colcon overlay: exactly what a pip-only machine sees.
    env = {k: v for k, v in ros_subprocess_env().items() if k not in ("PYTHONPATH",)}
    proc = run([str(venv_python), "-c", script], env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, describe(proc)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["path"] == [str(PACKAGE_DIR)], report["path"]
    assert not report["rclpy_loaded"]
    assert report["failures"] == {}, "\n\n".join(f"{k}:\n{v}" for k, v in report["failures"].items())


# Which of the package's own modules each layer may import (ast-checked, lazy imports included).
# contract is the leaf; replay (numpy dataset format) sits on it; data/ and core/ both import those
# two downward and never each other; control/ runs the core with the pairing rule of data/.
LAYER_MAY_IMPORT = {
    "contract": set(),
    "config_io": set(),
    "observation": {"contract"},
    "replay": {"contract"},
    "data": {"contract", "observation", "replay", "config_io"},
    "core": {"contract", "observation", "replay", "config_io"},
    "control": {"contract", "observation", "replay", "core", "data"},  # data.sync: the one pairing rule, live side
}


def imported_package_layers(path: Path) -> set[str]:
    """The q_transformer_ros.<layer> names a source file imports, at any depth of the file."""
    import ast

    layers = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "q_transformer_ros" and len(parts) > 1:
                layers.add(parts[1])
    return layers


def test_layers_import_only_downward() -> None:
    """contract is a leaf, replay imports only it, and data/ and core/ never import each other."""
    violations = []
    for layer, allowed in LAYER_MAY_IMPORT.items():
        root = PACKAGE_DIR / layer
        files = sorted(root.rglob("*.py")) if root.is_dir() else [PACKAGE_DIR / f"{layer}.py"]
        assert files and files[0].is_file(), f"layer {layer} not found under {PACKAGE_DIR}"
        for path in files:
            bad = imported_package_layers(path) - allowed - {layer}
            if bad:
                violations.append(f"{path.relative_to(REPO_ROOT)} imports {sorted(bad)}")
    assert not violations, "\n".join(violations)


def test_top_level_init_is_empty() -> None:
    """rosidl generates an empty q_transformer_ros/__init__.py into the same folder; ours must match."""
    assert (PACKAGE_DIR / "__init__.py").read_text().strip() == ""


# -------------------------------------------------------------------------------------------------
# (b) colcon install tree
# -------------------------------------------------------------------------------------------------

def test_colcon_install_layout(install_prefix: Path) -> None:
    """What `ros2 run`/`ros2 launch` look for: lib/<pkg>/<exe>, share/<pkg>/{package.xml,launch,config}."""
    share = install_prefix / "share" / "q_transformer_ros"
    assert (share / "package.xml").is_file()
    for folder in ("launch", "config"):
        src = sorted(p.name for p in (REPO_ROOT / folder).iterdir() if p.is_file())
        assert src, f"{REPO_ROOT / folder} is empty"
        installed = sorted(p.name for p in (share / folder).iterdir() if p.is_file())
        assert installed == src, f"{share / folder}: {installed} != source {src}"
    assert list((share / "launch").glob("*.launch.py")), f"no *.launch.py in {share / 'launch'}"
    for interface in ("msg/Decision.msg", "msg/InstructionScore.msg", "srv/ScoreInstructions.srv"):
        assert (share / interface).is_file(), share / interface

    lib = install_prefix / "lib" / "q_transformer_ros"
    for exe, module in EXECUTABLES.items():
        path = lib / exe
        assert path.is_file(), f"missing executable {path}"
        assert path.stat().st_mode & 0o111, f"{path} is not executable"
        text = path.read_text()
        interpreter = text.splitlines()[0].removeprefix("#!").split()[0]
        assert Path(interpreter).exists(), f"{path}: shebang interpreter {interpreter} does not exist"
        assert f"from {module} import main" in text, f"{path} does not launch {module}"


def test_ament_index_registration(install_prefix: Path) -> None:
    index = install_prefix / "share" / "ament_index" / "resource_index"
    assert (index / "packages" / "q_transformer_ros").is_file()
    interfaces = (index / "rosidl_interfaces" / "q_transformer_ros").read_text().split()
    for name in ("msg/Decision.idl", "msg/InstructionScore.idl", "srv/ScoreInstructions.idl"):
        assert name in interfaces, f"{name} not in the rosidl_interfaces index: {interfaces}"


def test_installed_python_modules_match_source(install_prefix: Path) -> None:
    """Every module (subpackage __init__.py included) sits next to the generated msg/srv, up to date."""
    stale, missing = [], []
    for rel in source_py_files():
        installed = INSTALL_SITE_PACKAGES / rel
        if not installed.is_file():
            missing.append(str(rel))
        elif installed.read_bytes() != (REPO_ROOT / rel).read_bytes():
            stale.append(str(rel))
    for sub in ("msg", "srv"):
        assert (INSTALL_SITE_PACKAGES / "q_transformer_ros" / sub / "__init__.py").is_file()
    assert not missing, f"not installed (run bash scripts/colcon_build.sh): {missing}"
    assert not stale, f"install tree is stale (run bash scripts/colcon_build.sh): {stale}"


GENERATED_CHECK = textwrap.dedent("""
    import json
    import q_transformer_ros
    import q_transformer_ros.contract
    from q_transformer_ros.msg import Decision, InstructionScore
    from q_transformer_ros.srv import ScoreInstructions
    d = Decision(instruction="pick", bins=[3, 255], action=[0.5, -1.0], dim_names=["x", "g"],
                 q_values=[0.25, 0.75], value=0.75, inference_time_s=0.01,
                 frame_age_s=[0.02], camera_names=["wrist"], commanded=True)
    try:
        Decision(bins=[1.5])
        bad_type_rejected = False
    except (AssertionError, TypeError, ValueError):
        bad_type_rejected = True
    req = ScoreInstructions.Request(instructions=["a", "b"])
    res = ScoreInstructions.Response(success=True, instructions=["a"], values=[0.5])
    print(json.dumps({
        "path": list(q_transformer_ros.__path__),
        "decision_fields": sorted(Decision.get_fields_and_field_types().items()),
        "score_fields": sorted(InstructionScore.get_fields_and_field_types().items()),
        "request_fields": sorted(ScoreInstructions.Request.get_fields_and_field_types().items()),
        "response_fields": sorted(ScoreInstructions.Response.get_fields_and_field_types().items()),
        "bins": list(d.bins), "commanded": d.commanded, "bad_type_rejected": bad_type_rejected,
        "req": list(req.instructions), "res_values": list(res.values),
    }))
""")


def test_generated_interfaces_in_colcon_environment(install_prefix: Path, repo_root: Path) -> None:
    """`source scripts/ros_env.sh` gives one q_transformer_ros package with our modules AND msg/srv."""
    proc = run(["bash", "-c", 'source scripts/ros_env.sh && cd / && exec python -c "$0"', GENERATED_CHECK],
               cwd=repo_root, env=ros_subprocess_env())
    assert proc.returncode == 0, describe(proc)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["path"] == [str(INSTALL_SITE_PACKAGES / "q_transformer_ros")]
    assert dict(map(tuple, report["decision_fields"])) == {
        "header": "std_msgs/Header", "instruction": "string", "bins": "sequence<int32>",
        "action": "sequence<float>", "dim_names": "sequence<string>", "q_values": "sequence<float>",
        "value": "float", "inference_time_s": "float", "frame_age_s": "sequence<float>",
        "camera_names": "sequence<string>", "frame_stamps": "sequence<builtin_interfaces/Time>",
        "commanded": "boolean", "stop_reason": "string",
        "state_names": "sequence<string>", "state": "sequence<double>", "state_age_s": "sequence<float>",
        "state_stamps": "sequence<builtin_interfaces/Time>",
    }
    assert dict(map(tuple, report["score_fields"])) == {"instruction": "string", "value": "float"}
    assert dict(map(tuple, report["request_fields"])) == {"instructions": "sequence<string>"}
    assert dict(map(tuple, report["response_fields"])) == {
        "success": "boolean", "message": "string", "instructions": "sequence<string>",
        "values": "sequence<float>", "stamp": "builtin_interfaces/Time",
    }
    assert report["bins"] == [3, 255] and report["commanded"] is True
    assert report["bad_type_rejected"], "Decision accepted a float in an int32[] field"
    assert report["req"] == ["a", "b"] and report["res_values"] == [0.5]


@pytest.mark.parametrize("exe", ROS_FREE_EXECUTABLES)
def test_installed_executable_runs(exe: str, install_prefix: Path) -> None:
    """lib/q_transformer_ros/<exe> runs as `ros2 run` would start it (directly, by its shebang)."""
    proc = run([str(install_prefix / "lib" / "q_transformer_ros" / exe), "--help"],
               env=ros_subprocess_env(), cwd=Path("/"))
    assert proc.returncode == 0, describe(proc)
    assert "usage" in proc.stdout.lower(), proc.stdout


@pytest.mark.parametrize("exe", ["record", "expert_node", "sim_node", "policy_node"])
def test_ros_executable_help_prints_usage_without_starting_a_node(exe: str, install_prefix: Path) -> None:
    proc = run([str(install_prefix / "lib" / "q_transformer_ros" / exe), "--help"],
               env=ros_subprocess_env(), cwd=Path("/"))
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.startswith(f"usage: {exe}"), proc.stdout[:300]


def test_executables_run_by_name_after_sourcing_ros_env() -> None:
    """`source scripts/ros_env.sh` puts the package's executables on PATH, as the README uses them."""
    proc = run(["bash", "-c", f"source {REPO_ROOT}/scripts/ros_env.sh && convert_bag --help && train --help "
                              f"&& record --help && command -v policy_node"], env=None, cwd=Path("/"))
    assert proc.returncode == 0, describe(proc)
    assert "usage: convert_bag" in proc.stdout and "usage: record" in proc.stdout


def test_symlink_install_gives_runnable_executables(tmp_path: Path) -> None:
    """`colcon build --symlink-install` (how most ROS developers build): the launchers it links to keep
    their run bit, and they run."""
    build, install = tmp_path / "build", tmp_path / "install"
    proc = run(["bash", str(REPO_ROOT / "scripts" / "colcon_build.sh"), "--symlink-install",
                "--build-base", str(build), "--install-base", str(install)], env=None, cwd=REPO_ROOT)
    assert proc.returncode == 0, describe(proc)
    lib = install / "q_transformer_ros" / "lib" / "q_transformer_ros"
    for exe in EXECUTABLES:
        path = lib / exe
        assert path.is_symlink() or path.is_file(), f"{path} missing"
        assert os.access(path, os.X_OK), f"{path} (-> {path.resolve()}) is not executable"
    for exe in ("convert_bag", "record"):
        proc = run([str(lib / exe), "--help"], env=ros_subprocess_env(), cwd=Path("/"))
        assert proc.returncode == 0 and "usage" in proc.stdout, describe(proc)


@pytest.fixture(scope="module")
def launcher_targets(install_prefix: Path) -> dict[str, str]:
    """Import every launcher's module once in the colcon environment: {module: "" or the error}."""
    code = textwrap.dedent(f"""
        import importlib, json, traceback
        out = {{}}
        for module in {sorted(set(EXECUTABLES.values()))!r}:
            try:
                m = importlib.import_module(module)
                out[module] = "" if callable(getattr(m, "main", None)) else f"{{module}} has no main()"
            except BaseException:
                out[module] = traceback.format_exc(limit=4)
        print(json.dumps(out))
    """)
    proc = run([sys.executable, "-c", code], env=ros_subprocess_env(PYTHONSAFEPATH="1"), cwd=Path("/"))
    assert proc.returncode == 0, describe(proc)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("exe", sorted(EXECUTABLES))
def test_executable_target_module_exists(exe: str, launcher_targets: dict[str, str]) -> None:
    """Each launcher's module is installed and has a main() (imported in the colcon environment)."""
    module = EXECUTABLES[exe]
    assert launcher_targets[module] == "", f"`ros2 run q_transformer_ros {exe}` -> {module}:\n{launcher_targets[module]}"


# -------------------------------------------------------------------------------------------------
# (c) pip path
# -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pip_target(tmp_path_factory: pytest.TempPathFactory, venv_python: Path) -> Path:
    """`pip install --no-deps --target` of a copy of the tree (keeps build/ and egg-info out of the repo)."""
    work = tmp_path_factory.mktemp("pip")
    src = work / "src"
    shutil.copytree(REPO_ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "install", "log", "__pycache__", "*.egg-info", "runs", "out", ".whl"))
    target = work / "target"
    proc = run([str(venv_python), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                "--disable-pip-version-check", "--no-cache-dir", "--target", str(target), str(src)],
               env=ros_subprocess_env(), timeout=600)
    assert proc.returncode == 0, describe(proc)
    return target


def pip_env(target: Path) -> dict[str, str]:
    env = ros_subprocess_env(PYTHONSAFEPATH="1")
    env["PYTHONPATH"] = str(target)  # no colcon overlay: the pip install only
    return env


def test_pip_install_carries_every_module(pip_target: Path) -> None:
    missing = [str(rel) for rel in source_py_files() if not (pip_target / rel).is_file()]
    assert not missing, f"`pip install .` leaves out (missing __init__.py? setup.py packages?): {missing}"
    assert not (pip_target / "q_transformer_ros" / "msg").exists(), "generated msg/ leaked into the wheel"
    assert not (pip_target / "test").exists(), "tests leaked into the wheel"
    share = pip_target / "share" / "q_transformer_ros"
    assert (share / "package.xml").is_file() and list((share / "config").glob("*.yaml"))


def test_pip_install_without_ros(pip_target: Path, venv_python: Path) -> None:
    """With ROS blocked: core/ and data/ import from the pip install, console scripts are declared for
    every executable, and the ROS-free ones (`train`, `convert_bag`) answer --help."""
    from importlib.metadata import PathDistribution

    dist_info = next(pip_target.glob("q_transformer_ros-*.dist-info"))
    eps = {ep.name: ep.value for ep in PathDistribution(dist_info).entry_points if ep.group == "console_scripts"}
    # Console scripts go through q_transformer_ros.cli, which imports the node modules lazily so a
    # machine without rclpy gets a one-line hint instead of an ImportError traceback.
    assert eps == {exe: f"q_transformer_ros.cli:{exe}" for exe in EXECUTABLES}
    import q_transformer_ros.cli as cli

    for exe, module in EXECUTABLES.items():
        assert module in (getattr(cli, exe).__doc__ or ""), exe
    for exe in EXECUTABLES:
        assert (pip_target / "bin" / exe).is_file(), f"console script {exe} not installed"

    modules = source_modules("core", "data")
    scripts = {exe: str(pip_target / "bin" / exe) for exe in ROS_FREE_EXECUTABLES}
    script = BLOCK_ROS + textwrap.dedent(f"""
        import contextlib, importlib, io, json, runpy, traceback
        for name in {modules!r}:
            importlib.import_module(name)
        import q_transformer_ros
        helps = {{}}
        for exe, path in {scripts!r}.items():
            sys.argv = [exe, "--help"]
            buf = io.StringIO()
            code = None
            try:
                with contextlib.redirect_stdout(buf):
                    runpy.run_path(path, run_name="__main__")
            except SystemExit as exc:
                code = exc.code
            except BaseException:
                code = traceback.format_exc(limit=6)
            helps[exe] = [code, buf.getvalue()]
        print(json.dumps({{"path": list(q_transformer_ros.__path__), "helps": helps}}))
    """)
    proc = run([str(venv_python), "-c", script], env=pip_env(pip_target), cwd=pip_target)
    assert proc.returncode == 0, describe(proc)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["path"] == [str(pip_target / "q_transformer_ros")]
    for exe, (code, out) in report["helps"].items():
        assert code in (0, None), f"{exe} --help without ROS: exit {code}"
        assert "usage" in out.lower(), f"{exe} --help printed: {out!r}"


def test_pip_policy_node_without_rclpy_says_so(pip_target: Path, venv_python: Path) -> None:
    """On a machine without ROS the node's entry point exits non-zero with a message, not a traceback."""
    script = BLOCK_ROS + textwrap.dedent(f"""
        import runpy
        sys.argv = ["policy_node"]
        runpy.run_path({str(pip_target / "bin" / "policy_node")!r}, run_name="__main__")
    """)
    proc = run([str(venv_python), "-c", script], env=pip_env(pip_target), cwd=pip_target, timeout=120)
    assert proc.returncode != 0, describe(proc)
    assert "rclpy" in (proc.stderr + proc.stdout), describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)


# -------------------------------------------------------------------------------------------------
# Real DDS round trip of our own interfaces
# -------------------------------------------------------------------------------------------------

ROUND_TRIP = textwrap.dedent("""
    import json, time
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from q_transformer_ros.msg import Decision
    from q_transformer_ros.srv import ScoreInstructions

    rclpy.init()
    node = rclpy.create_node("qtr_packaging_round_trip")
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    received = []
    node.create_subscription(Decision, "qtr_test/decision", received.append, qos)
    pub = node.create_publisher(Decision, "qtr_test/decision", qos)

    def score(request, response):
        response.success = True
        response.instructions = list(request.instructions)
        response.values = [len(s) / 10.0 for s in request.instructions]
        response.stamp = node.get_clock().now().to_msg()
        return response

    node.create_service(ScoreInstructions, "qtr_test/score", score)
    client = node.create_client(ScoreInstructions, "qtr_test/score")

    sent = Decision(instruction="open the drawer", bins=[0, 17, 255], action=[-1.0, 0.25, 1.0],
                    dim_names=["x", "y", "gripper"], q_values=[0.5, 0.625, 0.75], value=0.75,
                    inference_time_s=0.125, frame_age_s=[0.03125, 0.0625], camera_names=["front", "wrist"],
                    commanded=False)
    sent.header.frame_id = "base_link"
    sent.header.stamp = node.get_clock().now().to_msg()
    deadline = time.monotonic() + 20.0
    while not received and time.monotonic() < deadline:
        pub.publish(sent)
        rclpy.spin_once(node, timeout_sec=0.1)
    assert client.wait_for_service(timeout_sec=10.0), "ScoreInstructions service never appeared"
    future = client.call_async(ScoreInstructions.Request(instructions=["pick", "open the drawer"]))
    rclpy.spin_until_future_complete(node, future, timeout_sec=10.0)
    response = future.result()
    got = received[0] if received else None
    print(json.dumps({
        "received": got is not None,
        "equal": got == sent if got is not None else False,
        "bins": list(got.bins) if got is not None else None,
        "frame_id": got.header.frame_id if got is not None else None,
        "response": None if response is None else
            [response.success, list(response.instructions), [round(v, 4) for v in response.values]],
    }))
    node.destroy_node()
    rclpy.try_shutdown()
""")


@pytest.mark.ros
def test_decision_and_score_service_over_fast_dds(install_prefix: Path) -> None:
    proc = run([sys.executable, "-c", ROUND_TRIP], env=ros_subprocess_env(domain_id=71, PYTHONSAFEPATH="1"),
               cwd=Path("/"), timeout=120)
    assert proc.returncode == 0, describe(proc)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["received"], "Decision never arrived over Fast DDS"
    assert report["equal"], report
    assert report["bins"] == [0, 17, 255] and report["frame_id"] == "base_link"
    assert report["response"] == [True, ["pick", "open the drawer"], [0.4, 1.5]]
