"""ModelConfig: every size and switch of the Q-Transformer network in one validated dataclass.

Why one dataclass: the trainer writes it into every checkpoint (``to_dict``) and the policy rebuilds
the exact same network from it (``from_dict``); presets derive the robot-dependent fields (image
size, cameras, frame history, action dims and bins) from the robot contract so they cannot drift.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

from q_transformer_ros.config_io import dataclass_from_dict

PRESET_NAMES = ("tiny", "small", "base")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and switches of :class:`QTransformerNet`. Validated on construction."""

    image_size: tuple[int, int] = (32, 32)
    """(height, width) of every camera frame the network sees (all cameras share one size)."""
    num_cameras: int = 1
    """Number of cameras; each is encoded by the same MaxViT, tokens of one time step concatenated."""
    frame_history: int = 2
    """Number of most recent frames per camera (F) the history transformer sees."""
    num_action_dims: int = 2
    """Number of action dimensions N decoded autoregressively (1 = single-action mode)."""
    action_bins: tuple[int, ...] = (8, 8)
    """Bins per action dim; the head has A = max(action_bins) outputs and masks the rest (``bin_mask``)."""
    text_dim: int = 512
    """Width T of the instruction embedding (the text encoder's output dim)."""
    state_dim: int = 0
    """Robot-state inputs S (the contract's ``state_inputs``, normalised): one state token per time
    step in the history transformer. 0: cameras only."""
    dim: int = 16
    """Channels of the first MaxViT stage; stage s has ``dim * 2**s`` channels, the last one is the
    token width D used by the history transformer and the action head."""
    dim_conv_stem: int | None = None
    """Channels of the convolutional stem (None = ``dim``)."""
    depth: tuple[int, ...] = (1, 1)
    """MaxViT blocks per stage; each stage halves the resolution."""
    heads: int = 2
    """Attention heads (MaxViT, history transformer and action head)."""
    dim_head: int = 8
    """Width of one attention head (multiple of 4: MaxViT uses 2-D axial rotary embeddings)."""
    vit_scaled_heads: bool = True
    """MaxViT attention heads per stage = ``stage_channels // dim_head`` (at least 1), as in the MaxViT
    paper, so attention width matches the stage width. False: ``heads`` in every stage (the seed's
    choice: 8 x 64 = 512-wide attention even on the 64-channel, 56x56 first stage, ~8x the work)."""
    window_size: int = 4
    """MaxViT block/grid window side; every stage's feature map side must be a multiple of it."""
    mbconv_expansion_rate: float = 4.0
    """Hidden channel multiplier of the MBConv inverted bottleneck."""
    mbconv_shrinkage_rate: float = 0.25
    """Squeeze-excitation bottleneck ratio in MBConv."""
    use_batchnorm: bool = False
    """True: BatchNorm2d in MBConv (as the seed). False (default): per-pixel channel RMSNorm, which
    behaves the same for batch 1 at the robot and under DDP (no running statistics to sync)."""
    tokens_per_frame: int = 8
    """TokenLearner output tokens K per camera frame."""
    transformer_depth: int = 1
    """Layers of the block-causal history transformer over F*C*K tokens."""
    head_depth: int = 2
    """Layers of the autoregressive action head (causal self-attn + cross-attn to the state + FF)."""
    ff_mult: float = 4.0
    """Hidden multiplier of the transformer feed-forward layers."""
    dueling: bool = False
    """Dueling head: Q = V(s, a_<i) + A(s, a_<i, a_i) - mean over valid bins of A."""
    dual_critics: bool = False
    """Two action heads (critics) on a shared encoder; decisions and targets use the minimum."""
    value_bins: int = 1
    """1: one logit per bin, Q = sigmoid. >1: HL-Gauss categorical over ``value_bins`` bins on [0, 1]."""
    cond_drop_prob: float = 0.2
    """Probability the trainer drops the instruction (replaced by the learned null embedding) per sample."""
    dropout: float = 0.1
    """Dropout in attention / feed-forward layers (training only)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", tuple(self.image_size))
        object.__setattr__(self, "action_bins", tuple(self.action_bins))
        object.__setattr__(self, "depth", tuple(self.depth))
        self.validate()

    # -- validation -------------------------------------------------------------------------------
    def _bad(self, key: str, why: str) -> ValueError:
        return ValueError(f"ModelConfig.{key} = {getattr(self, key)!r}: {why}")

    def validate(self) -> None:
        if len(self.image_size) != 2 or not all(_is_int(v) and v >= 8 for v in self.image_size):
            raise self._bad("image_size", "must be (height, width), integers >= 8")
        for key in ("num_cameras", "frame_history", "num_action_dims", "text_dim", "dim", "heads",
                    "dim_head", "window_size", "tokens_per_frame", "value_bins"):
            v = getattr(self, key)
            if not _is_int(v) or v < 1:
                raise self._bad(key, "must be an integer >= 1")
        if not _is_int(self.state_dim) or self.state_dim < 0:
            raise self._bad("state_dim", "must be an integer >= 0")
        for key in ("transformer_depth", "head_depth"):
            v = getattr(self, key)
            if not _is_int(v) or v < 1:
                raise self._bad(key, "must be an integer >= 1")
        if self.dim_conv_stem is not None and (not _is_int(self.dim_conv_stem) or self.dim_conv_stem < 1):
            raise self._bad("dim_conv_stem", "must be None or an integer >= 1")
        if len(self.action_bins) != self.num_action_dims:
            raise self._bad("action_bins", f"needs one entry per action dim (num_action_dims = {self.num_action_dims})")
        if not all(_is_int(b) and b >= 2 for b in self.action_bins):
            raise self._bad("action_bins", "every entry must be an integer >= 2")
        if not self.depth or not all(_is_int(d) and d >= 1 for d in self.depth):
            raise self._bad("depth", "must be a non-empty tuple of integers >= 1 (blocks per MaxViT stage)")
        if self.dim_head % 4:
            raise self._bad("dim_head", "must be a multiple of 4 (2-D axial rotary embedding)")
        if self.value_bins == 1:
            pass
        elif self.value_bins < 3:
            raise self._bad("value_bins", "use 1 (sigmoid Q) or >= 3 HL-Gauss value bins")
        for key in ("mbconv_expansion_rate", "ff_mult"):
            if not getattr(self, key) > 0:
                raise self._bad(key, "must be > 0")
        if not 0 < self.mbconv_shrinkage_rate <= 1:
            raise self._bad("mbconv_shrinkage_rate", "must be in (0, 1]")
        for key in ("cond_drop_prob", "dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise self._bad(key, "must be in [0, 1)")
        for key in ("use_batchnorm", "dueling", "dual_critics", "vit_scaled_heads"):
            if not isinstance(getattr(self, key), bool):
                raise self._bad(key, "must be true or false")
        for side, size in zip(("height", "width"), self.image_size):
            for s, res in enumerate(self.stage_resolutions(size)):
                if res < 1 or res % self.window_size:
                    raise self._bad(
                        "image_size",
                        f"{side} {size} gives a {res}-pixel feature map at MaxViT stage {s} (stem /2, each stage /2), "
                        f"which is not a multiple of window_size {self.window_size}; choose image sizes divisible by "
                        f"{2 ** (len(self.depth) + 1) * self.window_size} or another window_size / depth",
                    )

    # -- derived ----------------------------------------------------------------------------------
    def stage_resolutions(self, size: int) -> list[int]:
        """Feature-map side after each MaxViT stage for an input side ``size``."""
        out, res = [], size / 2
        for _ in self.depth:
            res = res / 2
            out.append(int(res) if res == int(res) else 0)
        return out

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return tuple(self.dim * 2**s for s in range(len(self.depth)))

    def vit_heads(self, stage: int) -> int:
        """Attention heads of MaxViT stage ``stage``."""
        if not self.vit_scaled_heads:
            return self.heads
        return max(1, self.stage_dims[stage] // self.dim_head)

    @property
    def embed_dim(self) -> int:
        """Token width D (channels of the last MaxViT stage)."""
        return self.stage_dims[-1]

    @property
    def max_bins(self) -> int:
        """A: width of the per-dim output (the largest bin count)."""
        return max(self.action_bins)

    @property
    def num_critics(self) -> int:
        return 2 if self.dual_critics else 1

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one time step: cameras x TokenLearner tokens."""
        return self.num_cameras * self.tokens_per_frame

    @property
    def history_tokens_per_step(self) -> int:
        """Tokens of one time step in the history transformer: the frame tokens, plus the state token."""
        return self.tokens_per_step + (1 if self.state_dim else 0)

    # -- serialization ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("image_size", "action_bins", "depth"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "<model_config>") -> "ModelConfig":
        return dataclass_from_dict(cls, data, where)

    def replace(self, **overrides: Any) -> "ModelConfig":
        return replace(self, **overrides)

    # -- presets ----------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, contract: Any | None = None, text_dim: int = 512, **overrides: Any) -> "ModelConfig":
        """A named size, with robot fields taken from ``contract`` (a RobotContract) when given.

        ``tiny``: CPU tests (dim 16, 2 stages, window 4; 32x32 or 64x64 images).
        ``small``: laptop/CPU training on 64..128 px images (dim 32, 3 stages).
        ``base``: near the seed's README config (dim 64, depth (2, 2, 5, 2), window 7, 8 heads of 64,
        history depth 1, head depth 2): about 50 M parameters for 224x224 and 8 dims x 256 bins.
        When the contract's image size does not fit the preset's window, the largest window <= the
        preset's that divides every stage's feature map is chosen (an explicit ``window_size``
        override is kept as given, and validated).
        """
        if name not in PRESET_NAMES:
            raise ValueError(f"ModelConfig.preset: unknown preset {name!r}; choose one of {PRESET_NAMES}")
        base: dict[str, Any] = {
            "tiny": dict(dim=16, depth=(1, 1), heads=2, dim_head=8, window_size=4, tokens_per_frame=4,
                         transformer_depth=1, head_depth=1, dropout=0.0, image_size=(32, 32)),
            "small": dict(dim=32, depth=(1, 2, 1), heads=4, dim_head=16, window_size=4, tokens_per_frame=8,
                          transformer_depth=2, head_depth=2, dropout=0.1, image_size=(64, 64)),
            "base": dict(dim=64, depth=(2, 2, 5, 2), heads=8, dim_head=64, window_size=7, tokens_per_frame=8,
                         transformer_depth=1, head_depth=2, dropout=0.1, image_size=(224, 224),
                         action_bins=(256,) * 8, num_action_dims=8, frame_history=6),
        }[name]
        base["text_dim"] = text_dim
        if contract is not None:
            sizes = {(c.height, c.width) for c in contract.cameras}
            if len(sizes) != 1:
                raise ValueError(
                    f"contract '{contract.name}': cameras have different sizes {sorted(sizes)}; the model needs one "
                    f"size for all cameras (set cameras[*].height/width equal)"
                )
            base.update(image_size=sizes.pop(), num_cameras=len(contract.cameras),
                        frame_history=contract.frame_history, num_action_dims=contract.num_action_dims,
                        action_bins=tuple(contract.action_bins), state_dim=contract.state_dim)
        base.update(overrides)
        if "window_size" not in overrides:
            base["window_size"] = _fit_window(base["image_size"], len(base["depth"]), base["window_size"])
        return cls(**base)


def _fit_window(image_size: tuple[int, int], stages: int, nominal: int) -> int:
    """Largest window <= nominal dividing both last-stage feature-map sides (so any power-of-two
    multiple image size works); falls back to the nominal (and a clear validation error)."""
    h, w = image_size
    f = 2 ** (stages + 1)
    if h % f or w % f:
        return nominal
    hs, ws = h // f, w // f
    for win in range(nominal, 0, -1):
        if hs % win == 0 and ws % win == 0:
            return win
    return nominal
