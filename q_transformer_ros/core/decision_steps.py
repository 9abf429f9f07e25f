"""The two fixed-shape steps of a streaming decision, as functions ``torch.compile`` can capture whole.

Why: at robot batch size (one decision, a few cameras) a decision is hundreds of tiny kernels, and
eager PyTorch pays Python and dispatcher cost for each (5-60 us per op on the 2-core development VM:
small bench config, ``decide`` 14.7 ms, one 64² frame 20 ms). Compiled with ``fullgraph=True`` and
fixed shapes, the same math runs as a few fused kernels (4.6 and 9.4 ms there, CPU, mode "default");
on CUDA, mode "reduce-overhead" also replays the step as a CUDA graph.

Both steps have one input shape per policy, so each compiles once: the history is always padded to
``frame_history`` frames, and the instruction is always a tensor (zeros with mask False means "no
instruction", which ``QTransformerNet.condition`` maps to the learned null embedding, exactly as
``None`` does). A reset or an instruction change therefore never recompiles.

einops legend: ``c`` cameras, ``f`` frames, ``k`` tokens per camera frame, ``d`` width, ``t`` text width.
"""

from __future__ import annotations

import types
from typing import Any, Callable

import einops
import numpy as np
import torch
from einops import repeat
from torch import Tensor, nn

from q_transformer_ros.core.model import QTransformerNet

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``off`` runs eagerly; the others are ``torch.compile`` modes. "reduce-overhead" and "max-autotune" use
CUDA graphs on a GPU (on CPU they compile like "default")."""

_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class StepCompileError(RuntimeError):
    """torch.compile could not build a decision step; the message says which step, mode and device."""


def encode_step(net: QTransformerNet, images: Tensor, text: Tensor, mask: Tensor) -> Tensor:
    """One time step's camera frames ``(c, 3, h, w)`` uint8 + instruction ``(1, t)``, mask ``(1,)`` ->
    frame tokens ``(c, k, d)`` (FiLM-conditioned MaxViT + TokenLearner)."""
    c = images.shape[0]
    return net.encode_frames(images, repeat(text, "1 t -> c t", c=c), repeat(mask, "1 -> c", c=c))


def decide_step(net: QTransformerNet, tokens: Tensor, text: Tensor, mask: Tensor,
                proprio: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Cached frame tokens ``(1, f, c*k, d)`` + instruction (+ normalised robot state ``(1, f, p)``) ->
    greedy (bins, q_chosen, all_q), as ``decode``."""
    return net.decode(net.encode_state(tokens, text, mask, proprio))


class DecisionSteps:
    """``encode`` and ``decide`` of one network, eager (mode "off") or compiled.

    Compilation happens on the first call of each step (the policy's ``warmup``). Outputs of compiled
    steps are cloned: a CUDA graph reuses its output memory on the next replay, and the policy keeps
    frame tokens in its history."""

    def __init__(self, net: QTransformerNet, mode: str = "off"):
        self.net = net
        self.mode = check_compile_mode(mode)
        self.compiled = mode != "off"
        self._ready = {"encode": False, "decide": False}
        self._encode: Callable[..., Any] = lambda images, text, mask: encode_step(net, images, text, mask)
        self._decide: Callable[..., Any] = (
            lambda tokens, text, mask, proprio=None: decide_step(net, tokens, text, mask, proprio))
        if self.compiled:
            _register_einops_types()
            kwargs = compile_kwargs(mode)
            self._encode = torch.compile(_own_code(self._encode), **kwargs)
            self._decide = torch.compile(_own_code(self._decide), **kwargs)

    def encode(self, images: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        return self._run("encode", self._encode, images, text, mask)

    def decide(self, tokens: Tensor, text: Tensor, mask: Tensor,
               proprio: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        if proprio is None:
            return self._run("decide", self._decide, tokens, text, mask)
        return self._run("decide", self._decide, tokens, text, mask, proprio)

    def _run(self, name: str, fn: Callable[..., Any], *args: Tensor) -> Any:
        if not self.compiled:
            return fn(*args)
        if self._uses_cuda_graphs(args[0]):
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: no output is reused
        if self._ready[name]:
            out = fn(*args)
        else:
            try:
                out = fn(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure: say which step, mode and how to go on
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise StepCompileError(
                    f"torch.compile (mode '{self.mode}') of the policy's {name} step failed on "
                    f"{args[0].device}: {type(e).__name__}: {first}. On CPU the compiler needs a C++ compiler "
                    f"(g++) and the Python headers; compile mode 'off' runs the same model eagerly."
                ) from e
            self._ready[name] = True
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()

    @staticmethod
    def step_inputs(text: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Copies of instruction text ``(1, t)`` and mask ``(1,)`` made in inference mode, as the frames and
        tokens are: the compiled step guards on each input's dispatch keys, and a tensor made outside
        inference mode (e.g. by ``reset`` called from a ROS callback) would otherwise recompile it."""
        with torch.inference_mode():
            return text.clone(), mask.clone()

    def _uses_cuda_graphs(self, example: Tensor) -> bool:
        return example.device.type == "cuda" and self.mode in _CUDA_GRAPH_MODES


def check_compile_mode(mode: str) -> str:
    """``mode`` if it is one of ``COMPILE_MODES``, else a ValueError that lists them."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    return mode


def compile_kwargs(mode: str) -> dict[str, Any]:
    """``torch.compile`` arguments of a step in ``mode``: one whole graph, fixed shapes, and the
    ``input_and_state_guards`` filter. torch.compile takes either a mode or options, so the mode is
    given as its inductor options."""
    if check_compile_mode(mode) == "off":
        raise ValueError("compile mode 'off' runs eagerly: there are no torch.compile arguments for it")
    import torch._inductor  # noqa: PLC0415 - not imported by "import torch"

    options: dict[str, Any] = dict(torch._inductor.list_mode_options(mode))
    if hasattr(torch.compiler, "keep_tensor_guards_unsafe"):  # guard_filter_fn exists (torch >= 2.8)
        options["guard_filter_fn"] = input_and_state_guards
    return dict(fullgraph=True, dynamic=False, options=options)


_STATE_GUARDS = frozenset({"GRAD_MODE", "GLOBAL_STATE", "DETERMINISTIC_ALGORITHMS", "TORCH_FUNCTION_STATE",
                           "DEFAULT_DEVICE", "AUTOGRAD_SAVED_TENSORS_HOOKS"})


def input_and_state_guards(entries: list[Any]) -> list[bool]:
    """``guard_filter_fn`` for the steps: keep the guards on the inputs and buffers (shape, dtype, device,
    strides) and on global state (grad mode, autocast, ...); drop the ~3,000 guards on module attributes,
    parameters and Python globals (einops internals among them).

    Why: checking every guard cost ~0.9 ms per call on the 2-core VM (small config; a step is 5-10 ms),
    the 140 parameter guards alone ~0.45 ms. Safe here because a policy never changes its network's
    structure, device or dtype after building the steps (weights may change in place: they are read at
    every call), and each ``DecisionSteps`` compiles its own code objects (``_own_code``), so no other
    network's compiled graph can match a call."""
    return [e.guard_type in _STATE_GUARDS or (e.guard_type == "TENSOR_MATCH" and not isinstance(e.value, nn.Parameter))
            for e in entries]


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of ``fn`` with a code object of its own: torch.compile keeps its cache per code object, so
    two ``DecisionSteps`` (two networks) never share cache entries, whatever the guards."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _register_einops_types() -> None:
    """Make einops cache its backend for every tensor type this process passes it, before compiling.

    torch.compile traces into einops and guards on the size of einops' type -> backend cache; the
    cache grows the first time einops sees a new type (an ``nn.Parameter``, a numpy array elsewhere in
    the node), which would recompile a step mid-run."""
    for example in (torch.zeros(1), nn.Parameter(torch.zeros(1)), np.zeros(1)):
        einops.rearrange(example, "a -> a")
