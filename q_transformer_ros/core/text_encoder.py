"""Instruction encoder: a frozen open_clip text tower with a per-string embedding cache.

Why open_clip and not a hub text model: open_clip's CLIP tokenizers ship their vocabulary inside the
wheel and its weights can come from a plain local file, so a robot or a training cluster without
internet can still embed instructions. Weights come from (a) nothing (``pretrained=None``: a random
but seeded, hence reproducible, text tower: for tests and text-free set-ups), (b) a local
open_clip / OpenAI checkpoint file, or (c) an open_clip hub tag that is already in the local cache
(``allow_download=True`` lets open_clip fetch it).

Only the text tower is kept (the vision tower is dropped), and instructions are few, so every
unique string is embedded once and cached. ``key`` names model + weights; datasets store cached
embeddings under it, so embeddings from different encoders are never mixed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class TextEncoderConfig:
    """Which open_clip text tower to use and where its weights come from."""

    model_name: str = "ViT-B-32"
    """open_clip model name (``open_clip.list_models()``); must use a CLIP BPE tokenizer (no HF tokenizer)."""
    pretrained: str | None = None
    """None: random init (seeded); a path to a local weights file; or an open_clip hub tag such as
    ``laion2b_s34b_b79k`` / ``openai`` (from the local cache unless ``allow_download``)."""
    cache_dir: str | None = None
    """Cache directory for hub tags (open_clip's default when None)."""
    allow_download: bool = False
    """Let open_clip download a hub tag that is not cached. Off by default: robots and CI are offline."""
    seed: int = 0
    """Seed of the random init when ``pretrained`` is None (same seed -> same embeddings -> same key)."""
    text_overrides: dict[str, Any] = field(default_factory=dict)
    """Overrides of the model's ``text_cfg`` for random init only, e.g. ``{"width": 64, "layers": 1,
    "heads": 2}`` for a tiny text tower that builds in milliseconds in tests; ``embed_dim`` may be
    overridden here too (the output dim T)."""

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"TextEncoderConfig.model_name = {self.model_name!r}: must be a non-empty string")
        if self.pretrained is not None and (not isinstance(self.pretrained, str) or not self.pretrained):
            raise ValueError(f"TextEncoderConfig.pretrained = {self.pretrained!r}: must be None, a file path or a hub tag")
        if self.text_overrides and self.pretrained is not None:
            raise ValueError(
                f"TextEncoderConfig.text_overrides = {self.text_overrides!r}: only allowed with pretrained=None "
                f"(pretrained weights fix the architecture)"
            )
        if not isinstance(self.seed, int):
            raise ValueError(f"TextEncoderConfig.seed = {self.seed!r}: must be an integer")

    @property
    def is_local_file(self) -> bool:
        p = self.pretrained
        return p is not None and (os.sep in p or p.startswith(".") or Path(p).suffix in (".pt", ".pth", ".bin", ".safetensors"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "<text_encoder>") -> "TextEncoderConfig":
        try:
            return cls(**dict(data))
        except TypeError as e:
            raise ValueError(f"{where}: bad text encoder config {dict(data)!r}: {e}") from None


def _file_id(path: Path) -> str:
    """Cheap content id of a weights file: size + sha256 of the first MiB."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        h.update(fh.read(1 << 20))
    return f"{path.stat().st_size}-{h.hexdigest()[:12]}"


def _cached_hub_file(open_clip: Any, cfg: TextEncoderConfig) -> Path:
    """The local file of an open_clip hub tag, looked up without any network access."""
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    pcfg = get_pretrained_cfg(cfg.model_name, cfg.pretrained)
    if not pcfg:
        raise ValueError(
            f"TextEncoderConfig.pretrained = {cfg.pretrained!r}: not a local file and not an open_clip tag of "
            f"{cfg.model_name} (tags: {list_pretrained_tags_by_model(cfg.model_name)})"
        )
    tried: list[str] = []
    hub = pcfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            hit = try_to_load_from_cache(repo, name, cache_dir=cfg.cache_dir)
            tried.append(f"hf:{repo}/{name}")
            if isinstance(hit, str):
                return Path(hit)
    url = pcfg.get("url", "")
    if url:
        root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path("~/.cache/clip").expanduser()
        local = root / os.path.basename(url)
        tried.append(str(local))
        if local.is_file():
            return local
    raise FileNotFoundError(
        f"open_clip weights '{cfg.model_name}'/'{cfg.pretrained}' are not in the local cache (looked for {tried}); "
        f"give a local weights file path as TextEncoderConfig.pretrained, or set allow_download: true on a machine "
        f"with internet"
    )


class InstructionEncoder:
    """Frozen open_clip text tower; ``embed(texts) -> (N, T)`` float32 on CPU, L2-normalized, cached."""

    def __init__(self, cfg: TextEncoderConfig | None = None, device: str | torch.device = "cpu"):
        import open_clip  # heavy import kept local: the model code does not need it

        self.cfg = cfg = cfg or TextEncoderConfig()
        self.device = torch.device(device)
        model_cfg = open_clip.get_model_config(cfg.model_name)
        if model_cfg is None:
            raise ValueError(f"TextEncoderConfig.model_name = {cfg.model_name!r}: not an open_clip model (see open_clip.list_models())")
        text_cfg = dict(model_cfg["text_cfg"])
        if text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name"):
            raise ValueError(
                f"TextEncoderConfig.model_name = {cfg.model_name!r}: uses a Hugging Face tokenizer/model, which needs "
                f"the hub; choose a CLIP-tokenizer model such as ViT-B-32"
            )
        if cfg.pretrained is None:
            self.tower = self._random_tower(model_cfg, text_cfg)
            weights = f"random-seed{cfg.seed}"
            if cfg.text_overrides:
                blob = repr(sorted(cfg.text_overrides.items())).encode()
                weights += "-" + hashlib.sha256(blob).hexdigest()[:8]
        else:
            self.tower, weights = self._pretrained_tower(open_clip)
        self.tower.eval().requires_grad_(False).to(self.device)
        self.context_length = int(text_cfg.get("context_length", 77))
        self.tokenizer = open_clip.get_tokenizer(cfg.model_name)
        self.key = f"open_clip/{cfg.model_name}/{weights}"
        self._cache: dict[str, Tensor] = {}
        with torch.no_grad():
            self.dim = int(self._encode(["probe"]).shape[-1])

    # -- construction -------------------------------------------------------------------------------
    def _random_tower(self, model_cfg: dict, text_cfg: dict) -> torch.nn.Module:
        from open_clip.model import _build_text_tower

        overrides = dict(self.cfg.text_overrides)
        embed_dim = int(overrides.pop("embed_dim", model_cfg["embed_dim"]))
        text_cfg.update(overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            return _build_text_tower(embed_dim, text_cfg, quick_gelu=bool(model_cfg.get("quick_gelu", False)))

    def _pretrained_tower(self, open_clip: Any) -> tuple[torch.nn.Module, str]:
        cfg = self.cfg
        if cfg.is_local_file:
            path = Path(cfg.pretrained).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"text encoder weights file not found: {path} (TextEncoderConfig.pretrained for model {cfg.model_name})"
                )
            weights = f"file-{_file_id(path)}"
            try:
                model = open_clip.create_model(cfg.model_name, pretrained=str(path))
            except Exception as e:  # open_clip raises RuntimeError/KeyError for a wrong file
                raise RuntimeError(f"{path}: cannot load as open_clip '{cfg.model_name}' weights: {e}") from None
        else:
            weights = f"hub-{cfg.pretrained}"
            if cfg.allow_download:
                try:
                    model = open_clip.create_model(cfg.model_name, pretrained=cfg.pretrained, cache_dir=cfg.cache_dir)
                except Exception as e:
                    raise RuntimeError(f"open_clip hub weights '{cfg.model_name}'/'{cfg.pretrained}' failed to load: {e}") from None
            else:
                path = _cached_hub_file(open_clip, cfg)
                model = open_clip.create_model(cfg.model_name, pretrained=str(path))
        if hasattr(model, "visual"):
            del model.visual  # only the text tower is used
        return _TextOnly(model), weights

    # -- embedding ----------------------------------------------------------------------------------
    def _encode(self, texts: Sequence[str]) -> Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        out = self.tower(tokens)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return F.normalize(out.float(), dim=-1).cpu()

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> Tensor:
        """Instructions -> ``(N, T)`` float32 (CPU). Each unique string is encoded once per encoder."""
        if isinstance(texts, str):
            raise TypeError("InstructionEncoder.embed takes a list of strings, got a single str")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"InstructionEncoder.embed: texts[{i}] = {t!r} is not a str")
        new = sorted({t for t in texts if t not in self._cache})
        if new:
            for t, e in zip(new, self._encode(new)):
                self._cache[t] = e
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self._cache[t] for t in texts])

    @property
    def cache_size(self) -> int:
        return len(self._cache)


class _TextOnly(torch.nn.Module):
    """A full open_clip model reduced to ``encode_text`` (the vision tower deleted)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens)
