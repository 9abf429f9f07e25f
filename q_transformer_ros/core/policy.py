"""QTransformerPolicy: the one Python API the ROS node, the demo and users share.

Two ways to decide:

* streaming (robots): ``reset(instruction)`` once per episode, then each control step
  ``push(Observation(frames={camera: uint8 (3, H, W)}, state=...))`` and ``decide()``
  (``push_frames(frames)`` for contracts without state inputs). Each frame is encoded once (MaxViT +
  TokenLearner, FiLM-conditioned on the current instruction) and its tokens go into a ring buffer of
  ``frame_history`` steps; a decision only runs the history transformer over the cached tokens and
  the autoregressive head. An instruction change calls ``reset`` (the cached tokens were conditioned
  on the old instruction). At episode start the history is padded by repeating the first frame,
  exactly as the replay dataset pads.
* full recomputation: ``act({camera: uint8 (F, 3, H, W)}, instruction, state=(F, S))`` encodes
  everything from scratch (no history kept). The streaming path gives the same bins and Q (tested).

Robot state inputs (``contract.state_inputs``) arrive raw, in the sources' units, and are normalised
here with the checkpoint's contract (``RobotContract.normalize_state``), exactly as the dataset reader
normalises them for training.

Instruction embeddings come from the checkpoint's cache when present; an unknown instruction is
embedded by the text encoder, built lazily from the checkpoint's text-encoder config, so a robot whose
instructions were all seen in training never loads the text model.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from q_transformer_ros.core.decision_steps import DecisionSteps
from q_transformer_ros.core.model import ModelConfig, QTransformerNet
from q_transformer_ros.core.model.network import BeamScore
from q_transformer_ros.contract import RobotContract
from q_transformer_ros.observation import Observation, ObservationError, check_state


class PolicyInputError(ValueError):
    """Frames or instructions that do not match the contract; the message names camera, shape, value."""


@dataclass(frozen=True)
class Decision:
    """One decision of the policy."""

    action: np.ndarray
    """Continuous action ``(D,)`` float32 at the chosen bins' centres (contract ranges)."""
    bins: np.ndarray
    """Chosen bin per action dim ``(D,)`` int64."""
    q_values: np.ndarray
    """Q of the chosen bin of each dim given the chosen bins before it ``(D,)`` float32."""
    value: float
    """Predicted success probability of the whole action: Q of the last dim's chosen bin."""
    all_q: np.ndarray
    """Q of every bin of every dim ``(D, A)`` float32 given the chosen earlier bins (invalid bins 0)."""
    inference_time_s: float
    """Wall time of the decision (for ``decide``: history transformer + head; for ``act``: everything)."""


def load_checkpoint_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict (validated by core.checkpoint; ``torch.load(weights_only=True)``)."""
    from q_transformer_ros.core.checkpoint import load_checkpoint

    return load_checkpoint(path, map_location=map_location)


def resolve_device(device: str | torch.device) -> torch.device:
    """``'auto'`` -> cuda when available, else cpu."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_model_matches_contract(cfg: ModelConfig, contract: RobotContract, where: str) -> None:
    """Raise PolicyInputError when the network cannot serve this robot (cameras, sizes, action dims)."""
    sizes = {(c.height, c.width) for c in contract.cameras}
    problems = []
    if cfg.num_cameras != len(contract.cameras):
        problems.append(f"num_cameras {cfg.num_cameras} vs contract cameras {[c.name for c in contract.cameras]}")
    if sizes != {tuple(cfg.image_size)}:
        problems.append(f"image_size {tuple(cfg.image_size)} vs contract camera sizes {sorted(sizes)}")
    if cfg.num_action_dims != contract.num_action_dims or tuple(cfg.action_bins) != tuple(contract.action_bins):
        problems.append(
            f"num_action_dims/action_bins {cfg.num_action_dims}/{tuple(cfg.action_bins)} vs contract "
            f"{contract.num_action_dims}/{tuple(contract.action_bins)}"
        )
    if cfg.frame_history != contract.frame_history:
        problems.append(f"frame_history {cfg.frame_history} vs contract {contract.frame_history}")
    if cfg.state_dim != contract.state_dim:
        problems.append(f"state_dim {cfg.state_dim} vs contract state inputs {[s.name for s in contract.state_inputs]}")
    if problems:
        raise PolicyInputError(f"{where}: model config does not match contract '{contract.name}': " + "; ".join(problems))


BACKENDS = ("torch", "onnxruntime")


class QTransformerPolicy:
    """Wraps a QTransformerNet for one robot contract: input checks, instruction embedding, streaming
    frame cache, decoding, bins -> continuous actions."""

    def __init__(
        self,
        contract: RobotContract,
        net: QTransformerNet,
        text_encoder: Any | None = None,
        device: str | torch.device = "auto",
        instruction_cache: Mapping[str, Tensor] | None = None,
        *,
        objective: str = "q_learning",
        use_bf16: bool = True,
        compile_mode: str = "off",
    ):
        """``text_encoder``: an InstructionEncoder, a TextEncoderConfig (built on first unknown
        instruction) or None (only cached instructions / no instruction). ``use_bf16``: bf16 autocast
        on CUDA (the CPU path always runs float32). ``compile_mode``: "off" (eager) or a torch.compile
        mode for the fixed-shape streaming steps (``decision_steps``; compiled on the first call, i.e.
        in ``warmup``; "reduce-overhead" replays CUDA graphs on a GPU)."""
        check_model_matches_contract(net.cfg, contract, where="QTransformerPolicy")
        self.contract = contract
        self.cfg: ModelConfig = net.cfg
        self.device = resolve_device(device)
        self.net = net.to(self.device).eval()
        self.objective = objective
        self.beam_score: BeamScore = "log_prob" if objective == "bc" else "q"
        """How ``beam_width`` > 1 ranks actions: a cloning checkpoint's outputs are per-dim categoricals, so its
        beam looks for the most likely whole action; a Q-Transformer's for the highest last-dim Q."""
        self.use_bf16 = use_bf16 and self.device.type == "cuda"
        self.steps = DecisionSteps(self.net, compile_mode)
        self._text_encoder = text_encoder
        self._embeddings: dict[str, Tensor] = {}
        for text, emb in (instruction_cache or {}).items():
            self._embeddings[text] = self._check_embedding(torch.as_tensor(emb), f"instruction_cache[{text!r}]")
        self.camera_names = [c.name for c in contract.cameras]
        self._tokens: deque[Tensor] = deque(maxlen=self.cfg.frame_history)
        self._frames: deque[Tensor] = deque(maxlen=self.cfg.frame_history)
        self._proprio: deque[Tensor] = deque(maxlen=self.cfg.frame_history)
        """Normalised state inputs ``(S,)`` of the kept time steps (empty without state inputs)."""
        self._pending: Tensor | None = None
        """Frames ``(c, 3, h, w)`` pushed but not yet encoded: with a fused backend (``OnnxSteps.fused``)
        the next ``decide`` encodes them and decides in one run; another ``push`` encodes them first."""
        self.instruction: str | None = None
        self._text: tuple[Tensor, Tensor] = self._as_step_inputs(*self._resolve_text(None))
        """Current instruction as (text ``(1, T)``, mask ``(1,)``): the form every step takes."""

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "auto",
        *,
        loader: Callable[..., dict[str, Any]] = load_checkpoint_file,
        use_bf16: bool = True,
        compile_mode: str = "off",
        backend: str = "torch",
        onnx_providers: Sequence[str] = ("CPUExecutionProvider",),
        reexport: bool = False,
    ) -> "QTransformerPolicy":
        """Rebuild contract, network, instruction cache and (lazy) text encoder from a checkpoint.

        ``backend``: "torch" (eager or ``compile_mode``) or "onnxruntime": the two streaming steps run
        from ONNX files next to the checkpoint (``core.onnx_backend``), exported now when missing, stale
        (another checkpoint payload) or ``reexport``; ``onnx_providers`` e.g. ("CUDAExecutionProvider",
        "CPUExecutionProvider"). Beam search, ``act`` and instruction scoring stay on torch."""
        if backend not in BACKENDS:
            raise PolicyInputError(f"backend {backend!r}: choose one of {BACKENDS}")
        where = str(path)
        ckpt = loader(path, map_location="cpu")
        for key in ("contract", "model_config", "model"):
            if key not in ckpt:
                raise PolicyInputError(f"{where}: checkpoint lacks key '{key}'")
        contract = RobotContract.from_dict(ckpt["contract"], where=f"{where}:contract")
        cfg = ModelConfig.from_dict(ckpt["model_config"], where=f"{where}:model_config")
        check_model_matches_contract(cfg, contract, where=where)
        net = QTransformerNet(cfg)
        try:
            net.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as e:
            raise PolicyInputError(f"{where}: 'model' weights do not fit the model_config: {str(e).splitlines()[0]} ...") from None
        text_encoder = None
        if ckpt.get("text_encoder"):
            from q_transformer_ros.core.text_encoder import TextEncoderConfig

            text_encoder = TextEncoderConfig.from_dict(ckpt["text_encoder"], where=f"{where}:text_encoder")
        cache: dict[str, Tensor] = {}
        emb = ckpt.get("instruction_embeddings") or {}
        texts, vectors = emb.get("texts", []), emb.get("embeddings")
        if texts:
            if vectors is None or vectors.ndim != 2 or vectors.shape[0] != len(texts):
                raise PolicyInputError(
                    f"{where}: instruction_embeddings has {len(texts)} texts but embeddings of shape "
                    f"{None if vectors is None else tuple(vectors.shape)}"
                )
            cache = {t: vectors[i] for i, t in enumerate(texts)}
        policy = cls(contract, net, text_encoder, device, cache, objective=str(ckpt.get("objective", "q_learning")),
                     use_bf16=use_bf16, compile_mode=compile_mode)
        if backend == "onnxruntime":
            policy.use_onnx(path, ckpt.get("payload_sha256", ""), onnx_providers, reexport=reexport)
        return policy

    def use_onnx(self, checkpoint: str | Path, checkpoint_digest: str = "",
                 providers: Sequence[str] = ("CPUExecutionProvider",), reexport: bool = False) -> None:
        """Run the streaming steps with onnxruntime from the ONNX files next to ``checkpoint`` (exported
        first when missing or made from another checkpoint payload)."""
        from q_transformer_ros.core.onnx_backend import OnnxSteps, check_providers, export_onnx, onnx_paths, read_metadata

        providers = check_providers(providers)  # before any export work: a missing provider is the user's first error
        files = onnx_paths(checkpoint)
        needed = files.needed(self.cfg.frame_history)
        fresh = all(f.is_file() for f in needed) and not reexport
        if fresh and checkpoint_digest:
            fresh = all(read_metadata(f).get("checkpoint_payload_sha256") == checkpoint_digest for f in needed)
        if not fresh:
            export_onnx(self, files, checkpoint_digest)
        self.steps = OnnxSteps(files, providers)

    @property
    def backend(self) -> str:
        """"torch" or "onnxruntime": what runs the streaming steps."""
        return "onnxruntime" if getattr(self.steps, "mode", "") == "onnxruntime" else "torch"

    def set_compile_mode(self, mode: str) -> None:
        """Switch the streaming steps to another compile mode (see ``decision_steps.COMPILE_MODES``); a
        compiled mode compiles on the next call (``warmup``)."""
        self.steps = DecisionSteps(self.net, mode)

    # -- instructions ---------------------------------------------------------------------------------
    def _check_embedding(self, emb: Tensor, what: str) -> Tensor:
        if emb.shape != (self.cfg.text_dim,):
            raise PolicyInputError(f"{what}: embedding has shape {tuple(emb.shape)}, the model expects ({self.cfg.text_dim},)")
        return emb.float()

    @property
    def text_encoder(self) -> Any:
        """The InstructionEncoder (built now if only its config was given)."""
        from q_transformer_ros.core.text_encoder import InstructionEncoder, TextEncoderConfig

        if isinstance(self._text_encoder, TextEncoderConfig):
            self._text_encoder = InstructionEncoder(self._text_encoder)
        return self._text_encoder

    def embed_instruction(self, text: str) -> Tensor:
        """``(T,)`` embedding of an instruction: checkpoint cache first, then the text encoder."""
        if not isinstance(text, str):
            raise PolicyInputError(f"instruction must be a str or None, got {text!r}")
        if text not in self._embeddings:
            if self._text_encoder is None:
                raise PolicyInputError(
                    f"instruction {text!r} has no cached embedding and no text encoder is configured "
                    f"(known instructions: {sorted(self._embeddings)[:10]})"
                )
            self._embeddings[text] = self._check_embedding(self.text_encoder.embed([text])[0], f"instruction {text!r}")
        return self._embeddings[text]

    def is_embedded(self, text: str) -> bool:
        """Whether ``text`` needs no text-encoder work (its embedding is cached): callers with a control
        loop embed unknown instructions elsewhere first (``embed_instruction`` may build the text model)."""
        return text in self._embeddings

    def _resolve_text(self, instruction: str | None) -> tuple[Tensor | None, Tensor]:
        """-> (text (1, T) or None, mask (1,)). None uses the contract's fixed text, else the null embedding."""
        if instruction is None:
            instruction = self.contract.instruction.fixed_text
        if instruction is None:
            return None, torch.zeros(1, dtype=torch.bool, device=self.device)
        emb = self.embed_instruction(instruction).to(self.device)
        return rearrange(emb, "t -> 1 t"), torch.ones(1, dtype=torch.bool, device=self.device)

    def _as_step_inputs(self, text: Tensor | None, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(text or None, mask) -> (text ``(1, T)``, mask ``(1,)``) for ``DecisionSteps``: "no instruction"
        becomes zeros with mask False (the same null embedding), so every instruction has one input shape."""
        if text is None:
            text = torch.zeros(1, self.cfg.text_dim, device=self.device)
        return DecisionSteps.step_inputs(text, mask)

    # -- input checks ---------------------------------------------------------------------------------
    def _frames_tensor(self, frames: Mapping[str, np.ndarray], with_time: bool) -> Tensor:
        """{camera: uint8 (3, H, W) or (F, 3, H, W)} -> uint8 tensor (C, 3, H, W) or (C, F, 3, H, W)."""
        if not isinstance(frames, Mapping):
            raise PolicyInputError(f"frames must be a dict {{camera name: array}}, got {type(frames).__name__}")
        got, want = sorted(frames), sorted(self.camera_names)
        if got != want:
            raise PolicyInputError(f"frames have cameras {got}, contract '{self.contract.name}' has {want}")
        h, w = self.cfg.image_size
        out = []
        for cam in self.camera_names:
            arr = np.asarray(frames[cam])
            shape_ok = arr.ndim == (4 if with_time else 3) and arr.shape[-3:] == (3, h, w)
            if with_time and shape_ok and not 1 <= arr.shape[0] <= self.cfg.frame_history:
                shape_ok = False
            if not shape_ok:
                expect = f"(1..{self.cfg.frame_history}, 3, {h}, {w})" if with_time else f"(3, {h}, {w})"
                raise PolicyInputError(f"camera '{cam}': frame shape {arr.shape}, expected {expect} (channels first, RGB)")
            if arr.dtype != np.uint8:
                raise PolicyInputError(f"camera '{cam}': frame dtype {arr.dtype}, expected uint8 (use data.image.preprocess_frame)")
            out.append(torch.from_numpy(np.ascontiguousarray(arr)))
        if with_time and len({t.shape[0] for t in out}) != 1:
            raise PolicyInputError(f"cameras have different frame counts: {[t.shape[0] for t in out]}")
        return torch.stack(out).to(self.device, non_blocking=True)

    def _amp(self) -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_bf16 else nullcontext()

    # -- streaming ------------------------------------------------------------------------------------
    def reset(self, instruction: str | None = None) -> None:
        """Start an episode (or switch instruction): clear the frame history and set the instruction."""
        self._text = self._as_step_inputs(*self._resolve_text(instruction))
        self.instruction = instruction
        self._tokens.clear()
        self._pending = None
        self._frames.clear()
        self._proprio.clear()

    @property
    def history_length(self) -> int:
        """Frames pushed since the last reset, capped at ``frame_history``."""
        return min(len(self._tokens) + (self._pending is not None), self.cfg.frame_history)

    @torch.inference_mode()
    def push(self, obs: Observation) -> None:
        """Add one time step: its frames (each camera's frame is encoded once) and state inputs."""
        images = self._frames_tensor(obs.frames, with_time=False)  # (c, 3, h, w)
        proprio = self._proprio_tensor(obs.state, with_time=False)
        self._encode_pending()
        if getattr(self.steps, "fused", False) and self._tokens:
            self._pending = images  # encoded together with the next decision
        else:
            self._encode(images)
        self._frames.append(images)
        if proprio is not None:
            self._proprio.append(proprio)

    def _encode(self, images: Tensor) -> None:
        with self._amp():
            tokens = self.steps.encode(images, *self._text)
        self._append_tokens(tokens)

    def _append_tokens(self, tokens: Tensor) -> None:
        """One time step's frame tokens ``(c, k, d)`` into the history, as ``(c*k, d)`` float."""
        self._tokens.append(rearrange(tokens.float(), "c k d -> (c k) d"))

    def _encode_pending(self) -> None:
        if self._pending is not None:
            images, self._pending = self._pending, None
            self._encode(images)

    def _previous_tokens(self) -> Tensor:
        """The cached tokens a new time step's decision sees before its own: the last ``frame_history - 1``
        of them, padded like ``_padded`` pads the whole history, ``(1, f - 1, c*k, d)``."""
        kept = list(self._tokens)[-(self.cfg.frame_history - 1):]
        return rearrange(torch.stack([kept[0]] * (self.cfg.frame_history - 1 - len(kept)) + kept), "f ck d -> 1 f ck d")

    def push_frames(self, frames: Mapping[str, np.ndarray]) -> None:
        """``push`` for contracts without state inputs: ``{camera: uint8 (3, H, W)}``."""
        self.push(Observation(frames=frames))

    def _proprio_tensor(self, state: np.ndarray | None, with_time: bool) -> Tensor | None:
        """Raw state ``(S,)`` (or ``(F, S)``) -> normalised float tensor on the device; None without state inputs."""
        try:
            check_state(state, self.contract, where="policy input")
        except ObservationError as e:
            raise PolicyInputError(str(e)) from None
        if not self.cfg.state_dim:
            return None
        arr = np.asarray(state)
        if arr.ndim != (2 if with_time else 1):
            expect = f"(F, {self.cfg.state_dim})" if with_time else f"({self.cfg.state_dim},)"
            raise PolicyInputError(f"state has shape {arr.shape}, expected {expect}")
        return torch.from_numpy(self.contract.normalize_state(arr)).to(self.device)

    def _history_proprio(self) -> Tensor | None:
        """The kept state inputs padded like the frames: ``(1, f, S)``, or None without state inputs."""
        if not self.cfg.state_dim:
            return None
        return rearrange(torch.stack(self._padded(self._proprio)), "f p -> 1 f p")

    def _padded(self, items: deque) -> list[Tensor]:
        return [items[0]] * (self.cfg.frame_history - len(items)) + list(items)

    @torch.inference_mode()
    def decide(self, beam_width: int = 1, beam_margin: float | None = None) -> Decision:
        """Decide from the cached frame tokens (history transformer + autoregressive head only). With a fused
        backend the newest frame is encoded here, in the same run (``inference_time_s`` then includes it).

        ``beam_width`` > 1 decodes with beam search (ranked as ``beam_score`` says). ``beam_margin`` (a
        Q-Transformer's only) guards it: the beam's action only when its value beats the greedy action's by
        more than the margin, else the greedy action; None = always the beam's."""
        self._check_beam_margin(beam_margin)
        if not self._tokens and self._pending is None:
            raise PolicyInputError("decide() called before push_frames(): no frames since the last reset()")
        start = time.perf_counter()
        if self._pending is not None and beam_width == 1 and getattr(self.steps, "fused", False):
            images, self._pending = self._pending, None
            with self._amp():
                tokens, bins, q, all_q = self.steps.encode_decide(images, self._previous_tokens(), *self._text,
                                                                  self._history_proprio())
            self._append_tokens(tokens)
            return self._decision(bins, q, all_q, start)
        self._encode_pending()
        tokens = rearrange(torch.stack(self._padded(self._tokens)), "f ck d -> 1 f ck d")
        proprio = self._history_proprio()
        with self._amp():
            if beam_width == 1:
                bins, q, all_q = self.steps.decide(tokens, *self._text, proprio)
            else:  # beam search: eager (its shapes depend on the width)
                state = self.net.encode_state(tokens, *self._text, proprio)
                bins, q, all_q = self.net.decode(state, beam_width=beam_width, score=self.beam_score,
                                                 beam_margin=beam_margin)
        return self._decision(bins, q, all_q, start)

    def _check_beam_margin(self, beam_margin: float | None) -> None:
        if beam_margin is None:
            return
        if self.beam_score != "q":
            raise PolicyInputError("beam_margin compares the values of the beam's and the greedy action; this is a "
                                   "cloning checkpoint, whose beam ranks by log-probability: leave beam_margin unset")
        if not isinstance(beam_margin, (int, float)) or isinstance(beam_margin, bool) or beam_margin != beam_margin:
            raise PolicyInputError(f"beam_margin = {beam_margin!r}: must be a number (values lie in [0, 1]; "
                                   "-1 = always the beam's action)")

    def _history_video(self) -> Tensor:
        """The kept frames, padded to ``frame_history``, as one batch ``(1, c, f, 3, h, w)``."""
        return rearrange(torch.stack(self._padded(self._frames)), "f c ch h w -> 1 c f ch h w")

    @torch.inference_mode()
    def decide_full(self, beam_width: int = 1, beam_margin: float | None = None) -> Decision:
        """Decide by re-encoding the kept frame history (full recomputation; same inputs and decoding as
        ``decide``)."""
        self._check_beam_margin(beam_margin)
        if not self._frames:
            raise PolicyInputError("decide_full() called before push_frames(): no frames since the last reset()")
        start = time.perf_counter()
        video = self._history_video()
        text, mask = self._resolve_text(self.instruction)
        with self._amp():
            state = self.net.encode(video, text, mask, self._history_proprio())
            bins, q, all_q = self.net.decode(state, beam_width=beam_width, score=self.beam_score,
                                             beam_margin=beam_margin)
        return self._decision(bins, q, all_q, start)

    # -- full recomputation ---------------------------------------------------------------------------
    @torch.inference_mode()
    def act(self, frames: Mapping[str, np.ndarray], instruction: str | None = None, beam_width: int = 1,
            state: np.ndarray | None = None, beam_margin: float | None = None) -> Decision:
        """Decide from ``{camera: uint8 (F, 3, H, W)}`` and raw ``state`` ``(F, S)`` (oldest first; fewer
        than frame_history steps are padded by repeating the first). Stateless: the streaming history is
        not touched. Decoding as in ``decide``."""
        self._check_beam_margin(beam_margin)
        start = time.perf_counter()
        video = self._frames_tensor(frames, with_time=True)  # (c, f, 3, h, w)
        proprio = self._proprio_tensor(state, with_time=True)  # (f, p) or None
        f = video.shape[1]
        if proprio is not None and proprio.shape[0] != f:
            raise PolicyInputError(f"state has {proprio.shape[0]} time steps, frames have {f}")
        if f < self.cfg.frame_history:
            video = torch.cat([video[:, :1].expand(-1, self.cfg.frame_history - f, -1, -1, -1), video], dim=1)
            if proprio is not None:
                proprio = torch.cat([proprio[:1].expand(self.cfg.frame_history - f, -1), proprio])
        proprio = None if proprio is None else rearrange(proprio, "f p -> 1 f p")
        text, mask = self._resolve_text(instruction)
        with self._amp():
            if self.steps.compiled and beam_width == 1:  # the compiled steps, one time step at a time
                step_text = self._as_step_inputs(text, mask)
                per_step = [rearrange(self.steps.encode(video[:, i].contiguous(), *step_text).float(), "c k d -> (c k) d") for i in range(video.shape[1])]
                bins, q, all_q = self.steps.decide(rearrange(torch.stack(per_step), "f ck d -> 1 f ck d"), *step_text,
                                                   proprio)
            else:
                state = self.net.encode(rearrange(video, "c f ch h w -> 1 c f ch h w"), text, mask, proprio)
                bins, q, all_q = self.net.decode(state, beam_width=beam_width, score=self.beam_score,
                                                 beam_margin=beam_margin)
        return self._decision(bins, q, all_q, start)

    @torch.inference_mode()
    def score_instructions(self, instructions: Sequence[str]) -> np.ndarray:
        """Predicted success (greedy action's value) of the current frame history under each instruction."""
        if not self._frames:
            raise PolicyInputError("score_instructions() called before push_frames(): no frames since the last reset()")
        if isinstance(instructions, str) or not instructions:
            raise PolicyInputError(f"score_instructions takes a non-empty list of strings, got {instructions!r}")
        video = self._history_video()
        text = torch.stack([self.embed_instruction(t) for t in instructions]).to(self.device)
        b = len(instructions)
        proprio = self._history_proprio()
        with self._amp():
            state = self.net.encode(video.expand(b, -1, -1, -1, -1, -1), text, torch.ones(b, dtype=torch.bool, device=self.device),
                                    None if proprio is None else proprio.expand(b, -1, -1))
            _, q, _ = self.net.decode(state)
        values = q[:, -1].float().cpu().numpy()
        if not np.all(np.isfinite(values)):
            raise RuntimeError(f"score_instructions: non-finite values {values} (model weights or inputs contain NaN/inf)")
        return values

    # -- output ---------------------------------------------------------------------------------------
    def _decision(self, bins: Tensor, q: Tensor, all_q: Tensor, start: float) -> Decision:
        bins_np = bins[0].cpu().numpy().astype(np.int64)
        q_np = q[0].float().cpu().numpy()
        all_np = all_q[0].float().cpu().numpy()
        if not (np.all(np.isfinite(q_np)) and np.all(np.isfinite(all_np))):
            raise RuntimeError(f"policy produced non-finite Q values {q_np} (model weights or inputs contain NaN/inf)")
        return Decision(
            action=self.contract.bins_to_actions(bins_np),
            bins=bins_np,
            q_values=q_np.astype(np.float32),
            value=float(q_np[-1]),
            all_q=all_np.astype(np.float32),
            inference_time_s=time.perf_counter() - start,
        )

    @torch.inference_mode()
    def warmup(self, steps: int = 2) -> float:
        """Run a few decisions on black frames so kernels/allocations are ready before the first real
        command; restores an empty history. Returns the last decision's time in seconds."""
        instruction = self.instruction
        h, w = self.cfg.image_size
        black = {cam: np.zeros((3, h, w), dtype=np.uint8) for cam in self.camera_names}
        mid = (self.contract.state_low + self.contract.state_high) / 2 if self.cfg.state_dim else None
        last = 0.0
        for _ in range(max(1, steps)):
            self.push(Observation(frames=black, state=mid))
            last = self.decide().inference_time_s
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.reset(instruction)
        return last
