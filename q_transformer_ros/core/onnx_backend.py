"""ONNX export of the two streaming steps, and an onnxruntime backend that runs them.

Why: robots rarely run PyTorch eager in production: an x86 robot PC runs onnxruntime (or OpenVINO), a
Jetson-class arm TensorRT. A streaming decision is two fixed-shape computations (``decision_steps``):
``encode`` one time step's camera frames into tokens, and ``decide`` from the cached tokens (history
transformer + greedy autoregressive head, the argmax loop over action dims unrolled). Both export
whole, with fixed shapes, to ONNX; onnxruntime then runs each as one graph, without Python or
PyTorch's per-op dispatch (on the 2-core CPU VM, tiny node model: encode 2.2 -> 0.8 ms, decide 1.1 ->
0.2 ms against eager torch).

Files: ``<checkpoint stem>.encode.onnx`` and ``<checkpoint stem>.decide.onnx`` next to the checkpoint, and
for models with a frame history ``<checkpoint stem>.step.onnx``: both in one graph, which the policy runs
when a decision follows a new frame (``OnnxSteps.encode_decide``).
Each carries as metadata the robot contract, the model and text-encoder configs, the cached
instruction embeddings and the checkpoint's payload sha256, so a stale pair (the checkpoint changed)
is detected and re-exported by ``QTransformerPolicy.from_checkpoint(..., backend="onnxruntime")``, and
other runtimes can read everything they need from the files. The policy itself still loads the
checkpoint: beam search, full recomputation (``act``) and instruction scoring stay on torch.

    python -m q_transformer_ros.core.onnx_backend runs/a/checkpoint.pt     # export, print the paths
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from q_transformer_ros.core.decision_steps import decide_step, encode_step

META_PREFIX = "q_transformer_ros."
ONNX_OPSET = 20
"""Opset 20 has a native Gelu: the MaxViT's 18 erf-GELUs become one kernel each instead of five, and
onnxruntime runs the small config's encode step ~10 % faster (CPU time, 1 thread, 2.9 -> 2.6 ms) with
the same outputs (max difference 1e-6). Int8 dynamic quantisation was measured and is not used: MatMul-only
int8 gained nothing, Conv+MatMul int8 (ConvInteger) ran 2x slower, at 0.5-1.6 % token error."""
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


class OnnxBackendError(RuntimeError):
    """The onnxruntime backend cannot run: missing package or provider, bad or stale files."""


@dataclass(frozen=True)
class OnnxFiles:
    encode: Path
    decide: Path
    step: Path
    """Both in one graph (``encode_decide``): written for models with a frame history of 2 or more."""

    def needed(self, frame_history: int) -> tuple[Path, ...]:
        """The files a model with this frame history exports and loads."""
        return (self.encode, self.decide) + ((self.step,) if frame_history >= 2 else ())


def onnx_paths(checkpoint: str | Path) -> OnnxFiles:
    """Where the exported steps of ``checkpoint`` live (next to it)."""
    checkpoint = Path(checkpoint)
    stem = checkpoint.name[: -len(checkpoint.suffix)] if checkpoint.suffix else checkpoint.name
    return OnnxFiles(checkpoint.with_name(f"{stem}.encode.onnx"), checkpoint.with_name(f"{stem}.decide.onnx"),
                     checkpoint.with_name(f"{stem}.step.onnx"))


class _Encode(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        return encode_step(self.net, images, text, mask)


class _Decide(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, tokens: Tensor, text: Tensor, mask: Tensor,
                proprio: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        return decide_step(self.net, tokens, text, mask, proprio)


class _EncodeDecide(nn.Module):
    """One streaming decision in one graph: encode the new time step's frames, append their tokens to the
    cached ones of the previous ``frame_history - 1`` steps, decide. Why: run as two onnxruntime sessions,
    encode and decide evict each other's weights and buffers from the caches at every decision (small
    config, 1 thread: 2.9-3.15 ms alternating against 2.1 + 0.4 ms apart); one graph ran it in 2.6 ms with
    identical outputs (benchmarks/README.md, "onnxruntime backend, session 7")."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: Tensor, previous: Tensor, text: Tensor, mask: Tensor,
                proprio: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        tokens = encode_step(self.net, images, text, mask)  # (c, k, d)
        c, k, d = tokens.shape
        history = torch.cat([previous, tokens.reshape(1, 1, c * k, d)], dim=1)
        bins, q, all_q = decide_step(self.net, history, text, mask, proprio)
        return tokens, bins, q, all_q


def example_inputs(policy: Any) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Inputs of the two steps at the policy's fixed shapes (what the exported graphs take)."""
    cfg = policy.cfg
    h, w = cfg.image_size
    images = torch.zeros(len(policy.camera_names), 3, h, w, dtype=torch.uint8)
    text, mask = (t.cpu() for t in policy._as_step_inputs(None, torch.zeros(1, dtype=torch.bool)))
    with torch.inference_mode():
        tokens = encode_step(policy.net.cpu(), images, text, mask)
    flat = tokens.reshape(-1, tokens.shape[-1])
    history = torch.stack([flat] * cfg.frame_history)[None]
    decide_args: tuple[Tensor, ...] = (history, text, mask)
    if cfg.state_dim:  # models with state inputs take the normalised state history as a 4th input
        decide_args += (torch.zeros(1, cfg.frame_history, cfg.state_dim),)
    return (images, text, mask), decide_args


def export_onnx(policy: Any, files: OnnxFiles, checkpoint_digest: str = "") -> OnnxFiles:
    """Export ``policy``'s streaming steps (CPU, float32) to ``files``, each written atomically."""
    import onnx

    net = policy.net
    device = next(net.parameters()).device
    net.cpu().eval()
    try:
        enc_args, dec_args = example_inputs(policy)
        meta = {
            "contract": json.dumps(policy.contract.to_dict()),
            "model_config": json.dumps(policy.cfg.to_dict()),
            "text_encoder": json.dumps(_text_encoder_dict(policy)),
            "instruction_embeddings": json.dumps({t: e.float().cpu().tolist() for t, e in policy._embeddings.items()}),
            "objective": policy.objective,
            "checkpoint_payload_sha256": checkpoint_digest,
        }
        steps = [
            ("encode", _Encode(net).eval(), enc_args, ["images", "text", "mask"], ["tokens"]),
            ("decide", _Decide(net).eval(), dec_args, ["tokens", "text", "mask", "proprio"][:len(dec_args)],
             ["bins", "q_chosen", "all_q"]),
        ]
        if policy.cfg.frame_history < 2:
            files.step.unlink(missing_ok=True)  # another model's fused step must not be loaded with this one
        else:
            step_args = (enc_args[0], dec_args[0][:, 1:].contiguous(), *dec_args[1:])
            steps.append(("step", _EncodeDecide(net).eval(), step_args,
                          ["images", "previous", "text", "mask", "proprio"][:len(step_args)],
                          ["tokens", "bins", "q_chosen", "all_q"]))
        for step, module, args, names, outputs in steps:
            path = getattr(files, step)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            try:
                with torch.inference_mode(False), torch.no_grad():
                    program = torch.onnx.export(module, args, input_names=names, output_names=outputs,
                                                dynamo=True, opset_version=ONNX_OPSET, verbose=False)
                model = program.model_proto
                for key, value in {**meta, "step": step}.items():
                    entry = model.metadata_props.add()
                    entry.key, entry.value = META_PREFIX + key, value
                onnx.save_model(model, str(tmp))
                os.replace(tmp, path)
            except Exception as e:  # noqa: BLE001
                raise OnnxBackendError(f"ONNX export of the '{step}' step failed: {type(e).__name__}: "
                                       f"{(str(e).strip().splitlines() or [''])[0][:300]}") from e
            finally:
                if tmp.exists():
                    tmp.unlink()
    finally:
        net.to(device)
    return files


def _text_encoder_dict(policy: Any) -> dict[str, Any]:
    enc = policy._text_encoder
    if enc is None:
        return {}
    cfg = getattr(enc, "cfg", enc)
    return cfg.to_dict() if hasattr(cfg, "to_dict") else {}


def read_metadata(path: str | Path) -> dict[str, str]:
    """The q_transformer_ros metadata of an exported step (without loading the graph's weights)."""
    import onnx

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001
        raise OnnxBackendError(f"{path}: not a readable ONNX file: {type(e).__name__}: {e}") from None
    return {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}


def check_providers(providers: Sequence[str]) -> list[str]:
    """The requested onnxruntime execution providers, or a clear error naming what is missing."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise OnnxBackendError(f"backend 'onnxruntime' needs the onnxruntime package (pip install onnxruntime, "
                               f"or onnxruntime-gpu for CUDA/TensorRT): {e}") from None
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing or not providers:
        raise OnnxBackendError(f"onnxruntime execution provider(s) {missing or list(providers)} not available here; "
                               f"available: {available} (CUDA/TensorRT need the onnxruntime-gpu package and the "
                               f"CUDA/TensorRT libraries)")
    return list(providers)


class OnnxSteps:
    """``encode`` and ``decide`` run by onnxruntime; the same interface as ``DecisionSteps``."""

    compiled = False

    def __init__(self, files: OnnxFiles, providers: Sequence[str] = DEFAULT_PROVIDERS, threads: int | None = None):
        import onnxruntime as ort

        self.files = files
        self.providers = check_providers(providers)
        self.mode = "onnxruntime"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
        options.inter_op_num_threads = 1
        self._sessions = {}
        for step in ("encode", "decide", "step"):
            path = getattr(files, step)
            if step == "step" and not path.is_file():
                continue  # a model without a frame history exports no fused step
            if not path.is_file():
                raise OnnxBackendError(f"{path}: exported '{step}' step not found (export_onnx first)")
            try:
                self._sessions[step] = ort.InferenceSession(str(path), options, providers=self.providers)
            except Exception as e:  # noqa: BLE001
                raise OnnxBackendError(f"{path}: onnxruntime cannot load it: {type(e).__name__}: {e}") from None
        self._inputs = {s: [i.name for i in sess.get_inputs()] for s, sess in self._sessions.items()}
        self.fused = "step" in self._sessions
        """True when ``encode_decide`` runs a new frame and the decision as one graph."""

    def _run(self, step: str, *args: Tensor) -> list[np.ndarray]:
        feeds = {name: a.detach().cpu().numpy() for name, a in zip(self._inputs[step], args)}
        return self._sessions[step].run(None, feeds)

    def encode(self, images: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        (tokens,) = self._run("encode", images, text.float(), mask)
        return torch.from_numpy(tokens)

    def decide(self, tokens: Tensor, text: Tensor, mask: Tensor,
               proprio: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        args = (tokens.float(), text.float(), mask) + (() if proprio is None else (proprio.float(),))
        if len(args) != len(self._inputs["decide"]):
            raise OnnxBackendError(f"{self.files.decide}: the exported decide step takes inputs "
                                   f"{self._inputs['decide']}, got {len(args)} (a stale export? re-export it)")
        bins, q, all_q = self._run("decide", *args)
        return torch.from_numpy(bins), torch.from_numpy(q), torch.from_numpy(all_q)

    def encode_decide(self, images: Tensor, previous: Tensor, text: Tensor, mask: Tensor,
                      proprio: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``encode`` of the new time step and ``decide`` on ``previous`` ``(1, f - 1, c*k, d)`` plus its
        tokens, in one run: (new tokens ``(c, k, d)``, bins, q_chosen, all_q)."""
        args = (images, previous.float(), text.float(), mask) + (() if proprio is None else (proprio.float(),))
        if len(args) != len(self._inputs["step"]):
            raise OnnxBackendError(f"{self.files.step}: the exported step takes inputs {self._inputs['step']}, "
                                   f"got {len(args)} (a stale export? re-export it)")
        tokens, bins, q, all_q = self._run("step", *args)
        return torch.from_numpy(tokens), torch.from_numpy(bins), torch.from_numpy(q), torch.from_numpy(all_q)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m q_transformer_ros.core.onnx_backend CHECKPOINT``: export the steps next to it."""
    p = argparse.ArgumentParser(prog="export_onnx", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    args = p.parse_args(argv)
    from q_transformer_ros.core.checkpoint import CheckpointError
    from q_transformer_ros.core.policy import QTransformerPolicy

    try:
        t0 = time.perf_counter()
        policy = QTransformerPolicy.from_checkpoint(args.checkpoint, device="cpu", backend="onnxruntime",
                                                    reexport=True)
    except (CheckpointError, OnnxBackendError) as e:
        print(f"export_onnx: error: {e}", file=sys.stderr)
        return 1
    files = policy.steps.files
    for path in files.needed(policy.cfg.frame_history):
        print(f"export_onnx: {path}")
    print(f"export_onnx: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
