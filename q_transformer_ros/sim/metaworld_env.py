"""A small, ROS-free wrapper around one Meta-World 3.x task: seeded resets, 4-d actions, fast upright
camera images and the task's scripted expert.

Why a wrapper and not ``gymnasium.make('Meta-World/MT1')``:

- **Seeds that mean something.** Meta-World's benchmark classes pre-draw 50 goal/object layouts; we
  want "seed 17" to be one reproducible layout of any task, for held-out evaluation. So the env is
  built directly and ``reset(seed)`` seeds the env's own generator before drawing the layout
  (``seeded_rand_vec``), with the goal observable (the scripted experts read it from the
  observation).
- **Rendering at robot-camera sizes, fast, on CPU.** One ``mujoco.Renderer`` per image size, with
  shadows, reflections, skybox, haze and multisampling off: on a 2-core machine with Mesa's llvmpipe
  this is ~10x faster than Meta-World's default render path (shadow maps of 4096^2 dominate it).
- **Upright images.** Several Meta-World cameras (``corner`` ...) are rolled 180 degrees: their
  image "up" points at the floor. A vertical flip alone would mirror the scene, so every image whose
  camera up-vector points down is rotated 180 degrees, computed from the camera pose, not a list.
- **A clear error when there is no GL.** Without EGL (or with ``MUJOCO_GL`` unset/wrong) MuJoCo
  fails deep inside PyOpenGL; :class:`RenderError` says which variable to set and what to install.

Observation (39 floats, Meta-World's layout): ``[0:3]`` hand position (m), ``[3]`` gripper opening,
``[4:11]`` first object position + quaternion, ``[11:18]`` second object, ``[18:36]`` the same 18
values one step earlier, ``[36:39]`` goal position.

Action (4 floats in [-1, 1]): ``dx, dy, dz`` move the hand's mocap target by ``action * 1 cm`` per
step (one step = 5 physics substeps of 2.5 ms), ``gripper`` -1 opens, +1 closes.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # must precede the first `import mujoco` (headless GL)

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from q_transformer_ros.sim.tasks import TASK_INSTRUCTIONS, instruction_for

OBS_DIM = 39
"""Length of Meta-World's (goal-observable) observation vector."""
ACTION_DIM = 4
"""dx, dy, dz, gripper."""
CAMERAS = ("topview", "corner", "corner2", "corner3", "corner4", "behindGripper", "gripperPOV")
"""Cameras every Meta-World v3 scene defines."""
DEFAULT_CAMERA = "corner"
"""The camera used when none is named: sees the table, the arm and the objects from the front left."""


class RenderError(RuntimeError):
    """MuJoCo could not render offscreen; the message names MUJOCO_GL and what to install."""


class SimStep(NamedTuple):
    """What one ``MetaWorldEnv.step`` returns."""

    obs: np.ndarray
    """(39,) float64 Meta-World observation after the step."""
    success: bool
    """Meta-World's success flag for the task after the step."""


@dataclass
class SimConfig:
    """How the simulator is built and rendered."""

    task: str = "drawer-open-v3"
    """Meta-World v3 task name, e.g. ``drawer-open-v3`` (see ``tasks.TASK_INSTRUCTIONS``)."""
    cameras: tuple[str, ...] = (DEFAULT_CAMERA,)
    """Meta-World camera names ``render_all`` returns, in order."""
    height: int = 64
    """Default image height in pixels."""
    width: int = 64
    """Default image width in pixels."""
    max_episode_steps: int = 150
    """Steps after which an episode is over (``truncated``); stepping further raises."""
    fast_render: bool = True
    """Shadows, reflections, skybox, haze and multisampling off (~10x faster on CPU GL)."""
    upright: bool = True
    """Rotate images of cameras whose up-vector points down by 180 degrees."""

    def __post_init__(self) -> None:
        if self.task not in TASK_INSTRUCTIONS:
            raise ValueError(f"SimConfig.task = {self.task!r}: unknown Meta-World task; known: {sorted(TASK_INSTRUCTIONS)}")
        self.cameras = tuple(self.cameras)
        if not self.cameras:
            raise ValueError("SimConfig.cameras = (): name at least one camera")
        for cam in self.cameras:
            if cam not in CAMERAS:
                raise ValueError(f"SimConfig.cameras: unknown Meta-World camera {cam!r}; cameras are {CAMERAS}")
        for key in ("height", "width"):
            v = getattr(self, key)
            if not isinstance(v, int) or not 8 <= v <= 1024:
                raise ValueError(f"SimConfig.{key} = {v!r}: must be an integer in [8, 1024]")
        if not isinstance(self.max_episode_steps, int) or self.max_episode_steps < 1:
            raise ValueError(f"SimConfig.max_episode_steps = {self.max_episode_steps!r}: must be an integer >= 1")


def _import_mujoco() -> Any:
    try:
        import mujoco  # noqa: PLC0415 - after MUJOCO_GL is set
    except Exception as e:  # noqa: BLE001 - mujoco raises RuntimeError/ImportError for a bad MUJOCO_GL
        raise RenderError(_gl_hint(e)) from e
    return mujoco


def _gl_hint(error: BaseException) -> str:
    gl = os.environ.get("MUJOCO_GL")
    return (
        f"MuJoCo cannot render offscreen with MUJOCO_GL={gl!r} ({type(error).__name__}: {error}). "
        "Set the environment variable MUJOCO_GL before Python starts to a backend that works here: "
        "MUJOCO_GL=egl (headless; needs the Debian packages libegl1 libegl-mesa0 libgl1-mesa-dri: "
        "`apt-get install -y libegl1 libegl-mesa0 libgl1-mesa-dri`) or MUJOCO_GL=osmesa (needs libosmesa6)."
    )


def _release_gl_context() -> None:
    """Make no EGL context current in this thread.

    Why: an EGL context may be current in one thread only. ``mujoco.Renderer`` makes its context
    current when created and on every render, and leaves it so; a ROS executor may then call
    ``render`` from another thread (EGL_BAD_ACCESS). Releasing after each use lets any thread render.
    """
    if os.environ.get("MUJOCO_GL") != "egl":
        return
    from mujoco import egl  # noqa: PLC0415

    if egl.EGL_DISPLAY is not None:
        egl.EGL.eglMakeCurrent(egl.EGL_DISPLAY, egl.EGL.EGL_NO_SURFACE, egl.EGL.EGL_NO_SURFACE, egl.EGL.EGL_NO_CONTEXT)


class MetaWorldEnv:
    """One Meta-World task with seeded layouts, 4-d actions and fast upright camera images."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        mujoco = _import_mujoco()
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS  # noqa: PLC0415 - heavy, after MUJOCO_GL

        self._mujoco = mujoco
        env = ALL_V3_ENVIRONMENTS[self.config.task]()
        # Goal observable (MT setting: the scripted experts need it), layouts drawn from the env's own
        # seeded generator at every reset (so reset(seed) is reproducible), task "set" without a
        # pre-drawn Task object.
        env._partially_observable = False
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        if "sawyer_observation_space" in env.__dict__:  # cached_property computed for the other mode
            del env.sawyer_observation_space
        env._set_task_called = True
        env.max_path_length = max(env.max_path_length, self.config.max_episode_steps)
        self._env = env
        self._renderers: dict[tuple[int, int], Any] = {}
        self._cam_ids = {name: mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_CAMERA, name) for name in CAMERAS}
        self.obs: np.ndarray = np.zeros(OBS_DIM)
        """The latest observation."""
        self.steps = 0
        """Steps taken in the current episode."""
        self.success = False
        """Success flag after the latest step (False right after reset)."""
        self.seed: int | None = None
        """Seed of the current episode's layout."""
        self.last_info: dict[str, Any] = {}
        """Meta-World's info dict of the latest step (dense reward terms, grasp flags...)."""

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def make(cls, task_name: str, seed: int = 0, **config: Any) -> "MetaWorldEnv":
        """Build the env for ``task_name`` (other SimConfig fields as keywords) and reset it with ``seed``."""
        env = cls(SimConfig(task=task_name, **config))
        env.reset(seed)
        return env

    # -- episode --------------------------------------------------------------------------------
    @property
    def task_name(self) -> str:
        return self.config.task

    @property
    def instruction(self) -> str:
        """The fixed sentence for this task, e.g. 'open the drawer'."""
        return instruction_for(self.config.task)

    @property
    def truncated(self) -> bool:
        """True once the episode has used ``max_episode_steps`` steps."""
        return self.steps >= self.config.max_episode_steps

    def set_max_episode_steps(self, steps: int) -> None:
        """Change the episode limit (takes effect now; no rebuild of the simulator)."""
        if not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"MetaWorldEnv.set_max_episode_steps: steps = {steps!r} must be an integer >= 1")
        self.config.max_episode_steps = int(steps)
        self._env.max_path_length = max(self._env.max_path_length, int(steps))

    def reset(self, seed: int) -> np.ndarray:
        """Start an episode whose object/goal layout is drawn from ``seed``; returns the observation."""
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"MetaWorldEnv.reset: seed = {seed!r} must be an integer >= 0")
        self._env.seed(int(seed))
        obs, _ = self._env.reset()
        self.obs = np.asarray(obs, dtype=np.float64)
        self.steps, self.success, self.seed, self.last_info = 0, False, int(seed), {}
        return self.obs.copy()

    def step(self, action: np.ndarray) -> SimStep:
        """Apply one 4-d action (clipped to [-1, 1]) for one control step."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"MetaWorldEnv.step: action has shape {action.shape}, expected ({ACTION_DIM},) = dx, dy, dz, gripper")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"MetaWorldEnv.step: action {action.tolist()} is not finite")
        if self.truncated:
            raise RuntimeError(
                f"MetaWorldEnv.step: episode of task {self.task_name} (seed {self.seed}) is over after "
                f"{self.steps} steps (max_episode_steps); call reset(seed)"
            )
        obs, _reward, _term, _trunc, info = self._env.step(np.clip(action, -1.0, 1.0).astype(np.float32))
        self.obs = np.asarray(obs, dtype=np.float64)
        self.steps += 1
        self.success = bool(info.get("success", 0.0))
        self.last_info = dict(info)
        return SimStep(self.obs.copy(), self.success)

    # -- state ----------------------------------------------------------------------------------
    @property
    def ee_position(self) -> np.ndarray:
        """(3,) hand (tool centre) position in metres, world frame."""
        return np.asarray(self._env.tcp_center, dtype=np.float64).copy()

    @property
    def gripper_opening(self) -> float:
        """Meta-World's normalized finger distance (obs[3]): ~1 open, ~0 closed."""
        return float(self.obs[3])

    @property
    def sim_time_s(self) -> float:
        """Simulated time of this episode in seconds (steps x 12.5 ms)."""
        return self.steps * float(self._env.dt)

    # -- rendering ------------------------------------------------------------------------------
    def _renderer(self, height: int, width: int) -> Any:
        key = (height, width)
        r = self._renderers.get(key)
        if r is None:
            mujoco, model = self._mujoco, self._env.model
            if self.config.fast_render:
                model.vis.quality.offsamples = 0
            model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), width)
            model.vis.global_.offheight = max(int(model.vis.global_.offheight), height)
            try:
                r = mujoco.Renderer(model, height, width)
            except Exception as e:  # noqa: BLE001 - EGL/OSMesa failures surface as many types
                raise RenderError(_gl_hint(e)) from e
            _release_gl_context()
            if self.config.fast_render:
                flags = mujoco.mjtRndFlag
                for flag in (flags.mjRND_SHADOW, flags.mjRND_REFLECTION, flags.mjRND_SKYBOX, flags.mjRND_HAZE):
                    r.scene.flags[flag] = 0
            self._renderers[key] = r
        return r

    def _is_rolled(self, camera: str) -> bool:
        """True when the camera's image-up axis points below the horizon (the image is upside-down)."""
        xmat = self._env.data.cam_xmat[self._cam_ids[camera]].reshape(3, 3)
        return bool(xmat[2, 1] < 0.0)  # column 1 = camera y (image up) in world; row 2 = its z part

    def render(self, camera: str | None = None, height: int | None = None, width: int | None = None) -> np.ndarray:
        """uint8 (H, W, 3) RGB image of ``camera`` (default: the first configured), upright."""
        camera = camera or self.config.cameras[0]
        if camera not in self._cam_ids:
            raise ValueError(f"MetaWorldEnv.render: unknown camera {camera!r}; cameras are {CAMERAS}")
        h, w = height or self.config.height, width or self.config.width
        r = self._renderer(int(h), int(w))
        try:
            r.update_scene(self._env.data, camera=camera)
            image = r.render()
        except Exception as e:  # noqa: BLE001
            raise RenderError(_gl_hint(e)) from e
        finally:
            _release_gl_context()
        if self.config.upright and self._is_rolled(camera):
            image = image[::-1, ::-1]
        return np.ascontiguousarray(image, dtype=np.uint8)

    def render_all(self) -> dict[str, np.ndarray]:
        """{camera: uint8 (H, W, 3)} for every configured camera."""
        return {cam: self.render(cam) for cam in self.config.cameras}

    # -- expert ---------------------------------------------------------------------------------
    def expert(self, noise_std: float = 0.0, seed: int | None = None) -> "ScriptedExpert":
        """This task's scripted policy with Gaussian action noise (see ScriptedExpert)."""
        return ScriptedExpert(self.task_name, noise_std=noise_std, seed=seed)

    def close(self) -> None:
        """Free the GL contexts (explicitly: at interpreter exit EGL may already be gone)."""
        for r in self._renderers.values():
            try:
                if r._gl_context is not None:  # free() must run in the thread where it is current
                    r._gl_context.make_current()
                r.close()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
        self._renderers.clear()
        self._env.close()

    def __enter__(self) -> "MetaWorldEnv":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class ScriptedExpert:
    """Meta-World's hand-written policy for a task plus Gaussian action noise, like a teleoperator.

    Why noise on a closed-loop expert: the recorded data must hold good, mediocre and failed
    episodes for offline RL to have something to rank. The scripted policies re-plan from the
    observation every step, so small noise mostly slows them down; large noise (std >= 1) makes them
    fail on the harder tasks. Actions are clipped to [-1, 1] after the noise.
    """

    task_name: str
    """Meta-World task name; selects ``metaworld.policies.ENV_POLICY_MAP[task_name]``."""
    noise_std: float = 0.0
    """Standard deviation of the Gaussian noise added to every action dim (action units)."""
    seed: int | None = None
    """Seed of the noise generator (None: fresh entropy)."""
    _policy: Any = field(init=False, repr=False)
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from metaworld.policies import ENV_POLICY_MAP  # noqa: PLC0415

        if self.task_name not in ENV_POLICY_MAP:
            raise ValueError(f"ScriptedExpert.task_name = {self.task_name!r}: no scripted policy; known: {sorted(ENV_POLICY_MAP)}")
        if not (np.isfinite(self.noise_std) and self.noise_std >= 0):
            raise ValueError(f"ScriptedExpert.noise_std = {self.noise_std!r}: must be finite and >= 0")
        self._policy = ENV_POLICY_MAP[self.task_name]()
        self._rng = np.random.default_rng(self.seed)

    def clean_action(self, obs: np.ndarray) -> np.ndarray:
        """The scripted policy's action for ``obs`` (39,), clipped to [-1, 1], without noise."""
        obs = np.asarray(obs, dtype=np.float64)
        if obs.shape != (OBS_DIM,):
            raise ValueError(f"ScriptedExpert({self.task_name}): observation has shape {obs.shape}, expected ({OBS_DIM},)")
        with warnings.catch_warnings():  # the policies warn whenever their gains saturate the clip
            warnings.simplefilter("ignore", UserWarning)
            action = np.asarray(self._policy.get_action(obs), dtype=np.float64)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Noisy action (4,) float32 in [-1, 1] for ``obs``."""
        action = self.clean_action(obs).astype(np.float64)
        if self.noise_std > 0:
            action = action + self._rng.normal(0.0, self.noise_std, size=ACTION_DIM)
        return np.clip(action, -1.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# mapping a robot contract onto the simulator (shared by the sim node, the expert node and the
# Agent adapter, so the three agree)
# ---------------------------------------------------------------------------------------------

ACTION_NAMES = ("dx", "dy", "dz", "gripper")
"""Meta-World's action dims in its own order; a contract must name its dims with these names."""


def contract_action_order(dim_names: Sequence[str], where: str = "contract") -> list[int]:
    """For each Meta-World action dim (dx, dy, dz, gripper), its index in the contract's dims.

    ``sim_action = contract_action[order]`` and ``contract_action[order] = sim_action``.
    """
    names = list(dim_names)
    missing = [n for n in ACTION_NAMES if n not in names]
    if missing or len(names) != len(ACTION_NAMES):
        raise ValueError(
            f"{where}: action dims {names} do not fit Meta-World; the sim needs exactly the dims "
            f"{list(ACTION_NAMES)} (any order), missing {missing}"
        )
    return [names.index(n) for n in ACTION_NAMES]


def resolve_cameras(contract_cameras: Sequence[str], overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """{contract camera name: Meta-World camera}: an override, else the same name if Meta-World has
    that camera, else ``DEFAULT_CAMERA``."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(contract_cameras))
    if unknown:
        raise ValueError(f"camera map names cameras {unknown} that the contract does not have ({list(contract_cameras)})")
    out = {}
    for name in contract_cameras:
        mw = overrides.get(name) or (name if name in CAMERAS else DEFAULT_CAMERA)
        if mw not in CAMERAS:
            raise ValueError(f"camera map: contract camera {name!r} -> {mw!r} is no Meta-World camera; cameras are {CAMERAS}")
        out[name] = mw
    return out


SIM_STATE_INPUTS: dict[str, Callable[["MetaWorldEnv"], float]] = {
    "ee_x": lambda env: float(env.ee_position[0]),
    "ee_y": lambda env: float(env.ee_position[1]),
    "ee_z": lambda env: float(env.ee_position[2]),
    "gripper": lambda env: env.gripper_opening,
}
"""The arm state the sim knows, by contract state-input name (what sim_node publishes as ROS messages:
the end-effector position and the gripper opening)."""


def sim_state_reader(state_names: Sequence[str], where: str = "contract") -> Callable[["MetaWorldEnv"], np.ndarray | None]:
    """A function env -> float32 (S,) state in the contract's order (None for a contract without state);
    a state input the sim cannot provide is an error naming it."""
    names = list(state_names)
    unknown = [n for n in names if n not in SIM_STATE_INPUTS]
    if unknown:
        raise ValueError(f"{where}: state inputs {unknown} are not provided by the Meta-World sim; it provides "
                         f"{sorted(SIM_STATE_INPUTS)}")
    if not names:
        return lambda env: None
    getters = [SIM_STATE_INPUTS[n] for n in names]
    return lambda env: np.array([g(env) for g in getters], dtype=np.float32)
