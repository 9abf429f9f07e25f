"""QTransformerNet: the bare Q-Transformer network (no preprocessing besides uint8 -> float).

Pipeline: camera frames -> FiLM-conditioned MaxViT -> TokenLearner (K tokens per frame) ->
+camera/time embeddings, plus one token per time step from the robot's state inputs (``proprio``:
the contract's ``state_inputs``, normalised, through an MLP) -> block-causal history transformer
(the "state" tokens of the Q-function) -> autoregressive action head(s) with cross-attention to the
state -> per-dim, per-bin Q logits. ("state" below is the transformer's output, the Q-function's
state; the robot's joint/pose readings are called ``proprio`` to keep the two apart.)

The split into ``encode_frames`` / ``encode_state`` / ``q_logits`` / ``decode`` exists for speed:
the policy encodes each new frame once and keeps its tokens (streaming), a decision then runs only
the history transformer and the head; the head decodes with a KV cache and computes the state's
cross-attention K/V once.

einops legend: ``b`` batch, ``c`` cameras, ``f`` frames (history), ``k`` TokenLearner tokens per
frame, ``d`` token width D, ``t`` text width T, ``s`` state tokens (f c k), ``n`` action dims,
``a`` action bins (A = max over dims), ``v`` value bins (HL-Gauss), ``q`` critics (1 or 2),
``w`` beams, ``h w`` image height/width (in ``(b, 3, h, w)``), ``p`` state inputs S.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from ..hl_gauss import support_for
from .action_head import ActionHead
from .config import ModelConfig
from .frame_dedup import unique_frames
from .maxvit import MaxViT
from .token_learner import TokenLearner
from .transformer import HistoryTransformer, block_causal_mask, sincos_embedding

BeamScore = Literal["q", "log_prob"]
"""How beam search ranks actions: by Q (a Q-Transformer) or by summed log-probability (a cloning network)."""


class QTransformerNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.null_text = nn.Parameter(torch.randn(cfg.text_dim) * 0.02)
        self.cond_net = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.vit = MaxViT(cfg, cond_dim=d)
        self.token_learner = TokenLearner(d, cfg.tokens_per_frame)
        self.camera_embed = nn.Parameter(torch.randn(cfg.num_cameras, d) * 0.02)
        self.proprio_net = (nn.Sequential(nn.Linear(cfg.state_dim, d), nn.SiLU(), nn.Linear(d, d))
                            if cfg.state_dim else None)
        self.register_buffer("time_embed", sincos_embedding(cfg.frame_history, d) * 0.1, persistent=False)
        self.history = HistoryTransformer(cfg, cond_dim=d)
        bins = torch.tensor(cfg.action_bins)
        bin_mask = torch.arange(cfg.max_bins)[None, :] < bins[:, None]
        self.register_buffer("bin_mask", bin_mask, persistent=False)
        """``(n, a)`` bool: True where bin a exists for dim n (dims with fewer bins than A)."""
        self.heads = nn.ModuleList(ActionHead(cfg, bin_mask) for _ in range(cfg.num_critics))
        self._mask_cache: dict[tuple[int, int, torch.device], Tensor] = {}
        if cfg.value_bins > 1:
            self.register_buffer("value_centers", support_for(cfg.value_bins).centers(), persistent=False)

    # -- conditioning -------------------------------------------------------------------------------
    def condition(self, text_embed: Tensor | None, text_mask: Tensor | None, batch: int) -> Tensor:
        """text ``(b, t)`` + mask ``(b,)`` (True = instruction given) -> FiLM condition ``(b, d)``.

        Rows without an instruction use the learned null embedding (classifier-free conditioning)."""
        null = self.null_text.expand(batch, -1)
        if text_embed is None:
            text = null
        else:
            if text_embed.shape != (batch, self.cfg.text_dim):
                raise ValueError(f"text_embed has shape {tuple(text_embed.shape)}, expected ({batch}, {self.cfg.text_dim})")
            text = text_embed.to(null.dtype)
            if text_mask is not None:
                text = torch.where(rearrange(text_mask.to(torch.bool), "b -> b 1"), text, null)
        return self.cond_net(text)

    # -- encoder ------------------------------------------------------------------------------------
    def normalize(self, images: Tensor) -> Tensor:
        """uint8 [0, 255] (or float [0, 1]) -> float in [-1, 1], done on the device."""
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        return images.to(self.null_text.dtype) * 2.0 - 1.0

    def encode_frames(self, images: Tensor, text_embed: Tensor | None, text_mask: Tensor | None = None) -> Tensor:
        """images ``(b, 3, h, w)`` uint8 or float in [0, 1], text ``(b, t)``, mask ``(b,)`` -> tokens ``(b, k, d)``."""
        h, w = self.cfg.image_size
        if images.ndim != 4 or images.shape[1:] != (3, h, w):
            raise ValueError(f"encode_frames: images have shape {tuple(images.shape)}, expected (batch, 3, {h}, {w})")
        cond = self.condition(text_embed, text_mask, images.shape[0])
        feats = self.vit(self.normalize(images), cond)
        return self.token_learner(feats)

    def encode_state(self, frame_tokens: Tensor, text_embed: Tensor | None, text_mask: Tensor | None = None,
                     proprio: Tensor | None = None) -> Tensor:
        """frame_tokens ``(b, f, c*k, d)`` (oldest frame first), robot state ``proprio`` ``(b, f, p)``
        (normalised; required exactly when ``state_dim`` > 0) -> state ``(b, f*(c*k [+1]), d)``,
        block-causal over f."""
        cfg = self.cfg
        b, f, ck, d = frame_tokens.shape
        if ck != cfg.tokens_per_step or d != cfg.embed_dim or not 1 <= f <= cfg.frame_history:
            raise ValueError(
                f"encode_state: frame_tokens have shape {tuple(frame_tokens.shape)}, expected "
                f"(batch, 1..{cfg.frame_history}, {cfg.tokens_per_step}, {cfg.embed_dim})"
            )
        time = self.time_embed[:f]
        x = rearrange(frame_tokens, "b f (c k) d -> b f c k d", c=cfg.num_cameras)
        x = x + rearrange(self.camera_embed, "c d -> 1 1 c 1 d") + rearrange(time, "f d -> 1 f 1 1 d")
        x = rearrange(x, "b f c k d -> b f (c k) d")
        if self.proprio_net is not None:
            if proprio is None or tuple(proprio.shape) != (b, f, cfg.state_dim):
                got = None if proprio is None else tuple(proprio.shape)
                raise ValueError(f"encode_state: proprio (robot state) has shape {got}, expected ({b}, {f}, {cfg.state_dim})")
            p = self.proprio_net(proprio.to(x.dtype)) + rearrange(time, "f d -> 1 f d")
            x = torch.cat((x, rearrange(p, "b f d -> b f 1 d")), dim=2)
        elif proprio is not None and proprio.shape[-1] != 0:
            raise ValueError(f"encode_state: proprio of shape {tuple(proprio.shape)} given to a model without state inputs")
        per_step = x.shape[2]
        x = rearrange(x, "b f t d -> b (f t) d")
        key = (f, per_step, x.device)
        mask = self._mask_cache.get(key)
        if mask is None:  # built once per (frames, tokens, device): constant, no need to rebuild per decision
            mask = self._mask_cache[key] = block_causal_mask(f, per_step, device=x.device)
        cond = self.condition(text_embed, text_mask, b)
        return self.history(x, cond, mask)

    share_repeated_frames = False
    """Set on a network whose batches repeat frames (``learner.make_target_network`` does: the target
    pass over [s_t; s_t+n] shares F - n frames per sample): under no-grad each distinct (frame,
    conditioning) is then encoded once (``frame_dedup``). Off by default: finding repeats costs 0.3-0.9 ms
    per call on CPU (2-64 images of 64², 6 of 224², 1 thread), a loss where there are none (a policy's ``act``)."""

    def encode(self, frames: Tensor, text_embed: Tensor | None, text_mask: Tensor | None = None,
               proprio: Tensor | None = None) -> Tensor:
        """frames ``(b, c, f, 3, h, w)`` (+ ``proprio`` ``(b, f, p)``) -> state ``(b, f*(c*k [+1]), d)``
        (full recomputation)."""
        cfg = self.cfg
        if frames.ndim != 6 or frames.shape[1] != cfg.num_cameras or frames.shape[3:] != (3, *cfg.image_size):
            raise ValueError(
                f"frames have shape {tuple(frames.shape)}, expected (batch, {cfg.num_cameras} cameras, frames, 3, "
                f"{cfg.image_size[0]}, {cfg.image_size[1]})"
            )
        b, c, f = frames.shape[:3]
        images = rearrange(frames, "b c f ch h w -> (b c f) ch h w")
        rep_text = None if text_embed is None else repeat(text_embed, "b t -> (b n) t", n=c * f)
        rep_mask = None if text_mask is None else repeat(text_mask, "b -> (b n)", n=c * f)
        distinct = unique_frames(images, rep_text, rep_mask) if self.share_repeated_frames and self._frames_independent() else None
        if distinct is not None:  # encode each distinct (frame, instruction) once, then fan the tokens out
            images, rep_text, rep_mask = distinct.images, distinct.text, distinct.mask
        chunk = self._encode_chunk(images)
        if chunk >= images.shape[0]:
            tokens = self.encode_frames(images, rep_text, rep_mask)
        else:
            tokens = torch.cat([
                self.encode_frames(images[i : i + chunk], None if rep_text is None else rep_text[i : i + chunk],
                                   None if rep_mask is None else rep_mask[i : i + chunk])
                for i in range(0, images.shape[0], chunk)
            ])
        if distinct is not None:
            tokens = tokens[distinct.inverse]
        tokens = rearrange(tokens, "(b c f) k d -> b f (c k) d", b=b, c=c)
        return self.encode_state(tokens, text_embed, text_mask, proprio)

    ENCODE_CHUNK_PIXELS = 2 * 224 * 224
    """Inference on CPU encodes at most this many pixels of images at once: MaxViT's full-resolution
    feature maps of a 6-frame 224² batch fall out of cache (measured ~12 % slower than 1-2 frames at
    a time). Images are independent in the encoder, so the result is the same."""

    def _frames_independent(self) -> bool:
        """True when an image's tokens depend on nothing else in the batch and no gradient is recorded
        (eval mode or no BatchNorm): then equal images may share one encoding (``frame_dedup``).
        With a gradient the duplicates would still be exact, but the sharing is not worth the gather."""
        return not torch.is_grad_enabled() and not (self.training and self.cfg.use_batchnorm)

    def _encode_chunk(self, images: Tensor) -> int:
        """How many images ``encode`` passes to ``encode_frames`` at once (all of them unless CPU inference)."""
        n = images.shape[0]
        if images.device.type != "cpu" or torch.is_grad_enabled() or (self.training and self.cfg.use_batchnorm):
            return n
        h, w = images.shape[-2:]
        return max(1, self.ENCODE_CHUNK_PIXELS // (h * w))

    # -- head ---------------------------------------------------------------------------------------
    def check_bins(self, action_bins: Tensor) -> None:
        n = self.cfg.num_action_dims
        if action_bins.ndim != 2 or action_bins.shape[1] != n:
            raise ValueError(f"action_bins have shape {tuple(action_bins.shape)}, expected (batch, {n})")
        limits = torch.tensor(self.cfg.action_bins, device=action_bins.device)
        if bool(((action_bins < 0) | (action_bins >= limits)).any()):
            raise ValueError(f"action_bins out of range: bins per dim are {self.cfg.action_bins}, got {action_bins.tolist()[:4]}...")

    def q_logits(self, state: Tensor, action_bins: Tensor) -> Tensor:
        """state ``(b, s, d)``, action_bins ``(b, n)`` long -> ``(q, b, n, a)`` or ``(q, b, n, a, v)``.

        Teacher-forced: output i is the Q (logit) of every bin of dim i given the data's bins of dims
        < i. Entries of invalid bins (``~bin_mask``) are meaningless: mask them."""
        self.check_bins(action_bins)
        return torch.stack([head(state, action_bins) for head in self.heads])

    def q_values(self, logits: Tensor) -> Tensor:
        """Logits ``(..., n, a)`` (sigmoid) or ``(..., n, a, v)`` (HL-Gauss) -> Q ``(..., n, a)`` in [0, 1], float32.

        Invalid bins are set to 0 (the minimum reward), so a plain max over bins is still correct;
        use ``bin_mask`` for an argmax."""
        q = self.logits_to_q(logits)
        if q.shape[-2:] != self.bin_mask.shape:
            raise ValueError(f"q_values: logits of shape {tuple(logits.shape)} do not end in (n, a[, v]) = {tuple(self.bin_mask.shape)}")
        return q.masked_fill(~self.bin_mask, 0.0)

    def logits_to_q(self, logits: Tensor) -> Tensor:
        """Elementwise: logits ``(..., a)`` or ``(..., a, v)`` -> Q ``(..., a)`` float32, no masking."""
        if self.cfg.value_bins == 1:
            return logits.float().sigmoid()
        return logits.float().softmax(dim=-1) @ self.value_centers.float()

    def forward(
        self,
        frames: Tensor,
        text_embed: Tensor | None,
        text_mask: Tensor | None,
        action_bins: Tensor,
        cond_drop_prob: float = 0.0,
        proprio: Tensor | None = None,
    ) -> Tensor:
        """frames ``(b, c, f, 3, h, w)`` uint8, text ``(b, t)``, mask ``(b,)``, bins ``(b, n)``, robot
        state ``proprio`` ``(b, f, p)`` normalised (models with ``state_dim`` > 0) -> logits
        ``(q, b, n, a[, v])``. With ``cond_drop_prob`` > 0 each row's instruction is replaced by the
        learned null embedding with that probability (classifier-free conditioning dropout)."""
        b = frames.shape[0]
        if cond_drop_prob > 0:
            keep = torch.rand(b, device=frames.device) >= cond_drop_prob
            text_mask = keep if text_mask is None else (text_mask.to(torch.bool) & keep)
        state = self.encode(frames, text_embed, text_mask, proprio)
        return self.q_logits(state, action_bins)

    # -- decoding -----------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, state: Tensor, beam_width: int = 1, score: BeamScore = "q",
               beam_margin: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """state ``(b, s, d)`` -> (bins ``(b, n)`` long, q_chosen ``(b, n)``, all_q ``(b, n, a)``).

        Dims are chosen one at a time: dim i's bin maximizes Q_i(s, a_<i, a_i) (min over critics when
        dual). ``beam_width`` > 1 keeps the best partial actions and returns the best whole one; width 1
        is greedy. What "best" means is ``score``:

        - ``'q'`` (a Q-Transformer): a partial action is ranked by its last chosen dim's Q, the whole
          action by the last dim's Q (the value of the whole action).
        - ``'log_prob'`` (a cloning network, whose logits are a categorical per dim): ranked by the
          summed log-probability of the chosen bins (mean over critic heads), so the beam looks for the
          most likely whole action of the data. Ranking cloning logits by the last dim's sigmoid, as
          ``'q'`` would, has no meaning.

        Self-attention K/V of the action tokens is cached; the state's cross-attention K/V is computed
        once. ``all_q`` holds the Q of every bin of dim i given the chosen bins of dims < i (invalid
        bins 0).

        ``beam_margin`` (score ``'q'`` only) guards the beam: per row, the beam's action is returned only
        when its value beats the greedy action's by more than the margin, else the greedy one (both from
        the same ``state``). Why: where the network overrates some action, the beam is the search that
        finds it, and its value then stays high on a failing attempt; a margin keeps the greedy action
        (and its value) unless the beam's gain is large (benchmarks/README.md, "Learning, session 12")."""
        cfg = self.cfg
        if not isinstance(beam_width, int) or beam_width < 1:
            raise ValueError(f"beam_width = {beam_width!r}: must be an integer >= 1")
        if score not in ("q", "log_prob"):
            raise ValueError(f"beam score = {score!r}: must be 'q' or 'log_prob'")
        if beam_margin is not None and beam_width > 1:
            return self._decode_guarded(state, beam_width, score, float(beam_margin))
        if score == "log_prob" and cfg.value_bins != 1:
            raise ValueError(f"beam score 'log_prob' needs scalar logits per bin (value_bins = 1), this model has "
                             f"value_bins = {cfg.value_bins}")
        b, width, n, a = state.shape[0], beam_width, cfg.num_action_dims, cfg.max_bins
        bw = b * width
        expand = (lambda t: repeat(t, "b ... -> (b w) ...", w=width)) if width > 1 else (lambda t: t)
        ctxs = [[(expand(k), expand(v)) for k, v in head.context(state)] for head in self.heads]
        tokens = [expand(head.start_token(state)) for head in self.heads]
        caches: list[list] = [[None] * len(head.layers) for head in self.heads]
        if width == 1:
            return self._decode_greedy(tokens, ctxs, caches)
        alive = torch.zeros(b, width, dtype=torch.bool, device=state.device)
        alive[:, 0] = True
        bins_hist = torch.zeros(bw, 0, dtype=torch.long, device=state.device)
        q_hist = torch.zeros(bw, 0, device=state.device)
        all_hist = torch.zeros(bw, 0, a, device=state.device)
        log_prob = torch.zeros(bw, 1, device=state.device)  # summed log-probability of each beam ('log_prob')
        for i in range(n):
            qs, log_probs = [], []
            invalid = ~self.bin_mask[i]
            for c, head in enumerate(self.heads):
                logits, caches[c] = head.step(tokens[c], i, ctxs[c], caches[c])
                qs.append(self.logits_to_q(logits))
                if score == "log_prob":
                    log_probs.append(logits.float().masked_fill(invalid, float("-inf")).log_softmax(dim=-1))
            q = torch.stack(qs).amin(dim=0).masked_fill(invalid, 0.0)  # (bw, a)
            if score == "q":
                scores = q.masked_fill(invalid, float("-inf"))
            else:
                scores = log_prob + torch.stack(log_probs).mean(dim=0)
            scores = rearrange(scores, "(b w) a -> b w a", w=width).masked_fill(~alive[..., None], float("-inf"))
            top, idx = rearrange(scores, "b w a -> b (w a)").topk(width, dim=-1)
            alive = torch.isfinite(top)
            if score == "log_prob":
                log_prob = rearrange(top, "b w -> (b w) 1")
            parent, chosen = idx // a, idx % a
            parent_flat = rearrange(parent + torch.arange(b, device=state.device)[:, None] * width, "b w -> (b w)")
            chosen = rearrange(chosen, "b w -> (b w)")
            caches = [[(k[parent_flat], v[parent_flat]) for k, v in cache] for cache in caches]
            q = q[parent_flat]
            bins_hist, q_hist, all_hist = bins_hist[parent_flat], q_hist[parent_flat], all_hist[parent_flat]
            bins_hist = torch.cat((bins_hist, chosen[:, None]), dim=1)
            q_hist = torch.cat((q_hist, q.gather(1, chosen[:, None])), dim=1)
            all_hist = torch.cat((all_hist, q[:, None]), dim=1)
            if i + 1 < n:
                tokens = [head.bin_token(i, chosen) for head in self.heads]
        pick = lambda t: rearrange(t, "(b w) ... -> b w ...", w=width)[:, 0]
        return pick(bins_hist), pick(q_hist), pick(all_hist)

    def _decode_guarded(self, state: Tensor, beam_width: int, score: BeamScore,
                        margin: float) -> tuple[Tensor, Tensor, Tensor]:
        """``decode`` with a ``beam_margin``: greedy and beam decoded from one state, chosen per row."""
        if score != "q":
            raise ValueError(f"beam_margin compares values (the last dim's Q), and beam score {score!r} does not "
                             "rank by them: a margin applies to a Q-Transformer's beam only")
        if margin != margin:  # NaN would never pick the beam, silently
            raise ValueError("beam_margin is NaN: must be a number (-1 = always the beam's action)")
        greedy = self.decode(state)
        beam = self.decode(state, beam_width=beam_width)
        take_beam = beam[1][:, -1] - greedy[1][:, -1] > margin  # (b,)
        return tuple(torch.where(rearrange(take_beam, "b -> b" + " 1" * (g.dim() - 1)), bm, g)
                     for bm, g in zip(beam, greedy))

    def _decode_greedy(self, tokens: list[Tensor], ctxs: list, caches: list[list]) -> tuple[Tensor, Tensor, Tensor]:
        """``decode`` with beam width 1: same choices and numbers, without the beam bookkeeping
        (per-step history concatenation, gathers by parent): the per-step results are collected in
        lists and stacked once."""
        n = self.cfg.num_action_dims
        invalid = ~self.bin_mask
        bins, q_chosen, all_q = [], [], []
        for i in range(n):
            q = None
            for c, head in enumerate(self.heads):
                logits, caches[c] = head.step(tokens[c], i, ctxs[c], caches[c])
                qc = self.logits_to_q(logits)
                q = qc if q is None else torch.minimum(q, qc)
            q = q.masked_fill(invalid[i], 0.0)  # (b, a)
            chosen = q.masked_fill(invalid[i], float("-inf")).argmax(dim=-1)
            bins.append(chosen)
            q_chosen.append(q.gather(1, chosen[:, None])[:, 0])
            all_q.append(q)
            if i + 1 < n:
                tokens = [head.bin_token(i, chosen) for head in self.heads]
        return torch.stack(bins, dim=1), torch.stack(q_chosen, dim=1), torch.stack(all_q, dim=1)
