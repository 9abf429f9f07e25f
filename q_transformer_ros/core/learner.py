"""Q-Transformer learning: autoregressive Bellman targets, MC lower bound, conservative term, BC baseline.

The math (Chebotar et al. 2023, sec. 4), with the fixes the reference implementation lacks:

* Each action dim i of the action a = (a_0 .. a_{N-1}) has its own Q-value Q(s, a_{<i}, a_i), predicted
  by a head that is teacher-forced on the data's bins, so one forward gives Q for every bin of every
  dim given the data's prefix.
* Dims i < N-1 target the TARGET network's max over the next dim's valid bins, given the data's prefix
  a_{<=i}:  y_i = max_b Q'(s_t, a_{<=i}, b).
* The last dim targets the n-step return plus the discounted bootstrap from dim 0 at s_{t+n}:
  y_{N-1} = sum_{k<n} gamma^k r_{t+k} + discount_to_next * max_b Q'(s_{t+n}, b), where the dataset sets
  ``discount_to_next`` = gamma^{n_eff}, or 0 when the episode terminated within the n steps (a time-limit
  truncation is NOT a terminal: it still bootstraps). The reference drops the reward from its MSE target.
* Both target evaluations come from ONE target-network forward: s_t and s_{t+n} are concatenated along
  the batch (the reference runs the target network twice).
* With dual critics the target takes the element-wise min over critics before the max over bins.
* Every target is bounded below by that sample's own Monte-Carlo return-to-go (the reference uses one
  scalar for the whole batch).
* Conservative regularization: the Q of each valid bin NOT taken in the data is pushed toward the
  minimum reward: per (critic, sample, dim) the MEAN over non-taken valid bins of (Q - min_reward)^2,
  then averaged over critics, samples and dims. This is the paper's expectation under a uniform
  distribution over non-data actions; averaging (not summing) over bins keeps its scale independent
  of the number of bins, so weight 1 (the paper's) balances it against the TD term for any bin count.
  It is always a squared error on Q in [0, 1], whatever the TD loss is.
* TD loss on the taken bin: MSE (default), binary cross-entropy (Q is a sigmoid, targets in [0, 1]), or
  HL-Gauss cross-entropy when the model predicts value-bin logits.

einops legend: ``k`` critics, ``b`` batch, ``n`` action dims, ``a`` bins per dim (padded to the max;
``bin_mask`` (n, a) marks real bins), ``v`` HL-Gauss value bins, ``s`` n-step reward steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from q_transformer_ros.config_io import dataclass_from_dict
from q_transformer_ros.core.batch import TrainingBatch
from q_transformer_ros.core.hl_gauss import support_for

Objective = Literal["q_learning", "bc"]
TDLoss = Literal["mse", "bce", "hl_gauss"]
TargetUpdate = Literal["ema", "copy"]


@dataclass
class LearnerConfig:
    """What one learning step computes (no optimizer settings: those live in TrainConfig)."""

    objective: Objective = "q_learning"
    """'q_learning' (the paper) or 'bc' (behaviour cloning: cross-entropy over each dim's bins given the
    data's prefix, same architecture; a baseline)."""
    discount: float = 0.98
    """gamma for summing the n-step rewards; the trainer sets it from the contract. The bootstrap discount
    comes per sample from the dataset (``discount_to_next``)."""
    td_loss: TDLoss = "mse"
    """Loss on the taken bin: 'mse' or 'bce' on Q = sigmoid(logit), or 'hl_gauss' (needs a model with
    value_bins > 1)."""
    conservative_weight: float = 1.0
    """Weight of the conservative term (paper: 1). 0 disables it."""
    min_reward: float = 0.0
    """Value non-taken bins are pushed toward (the minimum reward)."""
    max_reward: float = 1.0
    """Upper end of the Q range; bce/hl_gauss targets are clamped into [min_reward, max_reward]."""
    mc_lower_bound: bool = True
    """Clip every target from below by the sample's Monte-Carlo return-to-go."""
    bc_weight: float = 0.0
    """Weight of an auxiliary cloning term for 'q_learning': cross-entropy of the data's bin over each
    dim's Q logits (models with value_bins = 1). It pulls the taken bin above the others, the same
    direction as the conservative term, with cross-entropy's scale-free gradient (as TD3+BC regularises
    an offline actor). 0 (default): the paper's objective."""
    target_update: TargetUpdate = "ema"
    """'ema': target <- (1 - tau) target + tau online every step; 'copy': hard copy every
    ``target_copy_every`` steps."""
    target_ema_tau: float = 0.005
    """EMA rate tau for ``target_update='ema'``."""
    target_copy_every: int = 100
    """Steps between hard copies for ``target_update='copy'``."""
    cond_drop_prob: float = 0.1
    """Probability of replacing the instruction by the learned null embedding in the ONLINE forward
    (classifier-free conditioning dropout); the target network never drops."""
    hl_gauss_sigma_ratio: float = 0.75
    """HL-Gauss Gaussian std as a fraction of one value bin's width."""

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"LearnerConfig.{key} = {getattr(self, key)!r}: {why}")

        if self.objective not in ("q_learning", "bc"):
            raise bad("objective", "must be 'q_learning' or 'bc'")
        if not 0.0 < self.discount <= 1.0:
            raise bad("discount", "must be in (0, 1]")
        if self.td_loss not in ("mse", "bce", "hl_gauss"):
            raise bad("td_loss", "must be 'mse', 'bce' or 'hl_gauss'")
        if not self.conservative_weight >= 0.0:
            raise bad("conservative_weight", "must be >= 0")
        if not self.bc_weight >= 0.0:
            raise bad("bc_weight", "must be >= 0")
        if not self.min_reward < self.max_reward:
            raise bad("min_reward", f"must be < max_reward ({self.max_reward})")
        if self.target_update not in ("ema", "copy"):
            raise bad("target_update", "must be 'ema' or 'copy'")
        if not 0.0 < self.target_ema_tau <= 1.0:
            raise bad("target_ema_tau", "must be in (0, 1]")
        if not (isinstance(self.target_copy_every, int) and self.target_copy_every >= 1):
            raise bad("target_copy_every", "must be an integer >= 1")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise bad("cond_drop_prob", "must be in [0, 1)")
        if not self.hl_gauss_sigma_ratio > 0:
            raise bad("hl_gauss_sigma_ratio", "must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "LearnerConfig") -> "LearnerConfig":
        return dataclass_from_dict(cls, data, where)


# ---------------------------------------------------------------------------------------------
# pure tensor functions (unit-tested against hand-computed values)
# ---------------------------------------------------------------------------------------------

def masked_max(q: Tensor, valid: Tensor) -> Tensor:
    """Max over the last axis, only over entries where ``valid`` (broadcastable to ``q``) is True.

    q: (..., a); valid: (..., a) bool -> (...)."""
    return q.masked_fill(~valid, float("-inf")).amax(dim=-1)


def n_step_return(rewards: Tensor, discount: float, reward_mask: Tensor | None = None) -> Tensor:
    """sum_k gamma^k r_{t+k}: rewards (b, s) -> (b,). ``reward_mask`` (b, s) zeroes steps past the
    episode end (the dataset pads with zeros as well; the mask makes that explicit)."""
    if reward_mask is not None:
        rewards = rewards * reward_mask.to(rewards.dtype)
    powers = discount ** torch.arange(rewards.shape[-1], device=rewards.device, dtype=rewards.dtype)
    return rewards @ powers


def bellman_targets(
    q_next_dims: Tensor,
    q_bootstrap: Tensor,
    bin_mask: Tensor,
    rewards: Tensor,
    discount: float,
    discount_to_next: Tensor,
    mc_return: Tensor | None = None,
    reward_mask: Tensor | None = None,
) -> Tensor:
    """Autoregressive Bellman targets for every dim, shape (b, n).

    q_next_dims: (b, n, a) target-net Q at s_t, teacher-forced on the data's bins (dim j's row is
        conditioned on a_{<j}); critics already reduced (min).
    q_bootstrap: (b, a) target-net Q of dim 0 at s_{t+n}.
    bin_mask: (n, a) bool, True for real bins.
    rewards: (b, s) the n rewards r_t .. r_{t+n-1}.
    discount_to_next: (b,) gamma^{n_eff}, 0 where the episode terminated within the n steps.
    mc_return: (b,) per-sample Monte-Carlo return-to-go; when given every target is max(target, mc).
    """
    bin_mask = bin_mask.to(torch.bool)
    inner = masked_max(q_next_dims[:, 1:], bin_mask[1:])  # (b, n-1): dim i <- max over dim i+1
    boot = masked_max(q_bootstrap, bin_mask[0])  # (b,)
    last = n_step_return(rewards, discount, reward_mask) + discount_to_next.to(boot.dtype) * boot
    targets = torch.cat([inner, rearrange(last, "b -> b 1")], dim=1)
    if mc_return is not None:
        targets = torch.maximum(targets, rearrange(mc_return.to(targets.dtype), "b -> b 1"))
    return targets


def take_bins(x: Tensor, action_bins: Tensor) -> Tensor:
    """Pick the data's bin from per-bin values: x (k, b, n, a, ...) with bins (b, n) -> (k, b, n, ...)."""
    k = x.shape[0]
    idx = repeat(action_bins, "b n -> k b n 1", k=k)
    if x.ndim == 5:  # (k, b, n, a, v)
        idx = repeat(idx, "k b n 1 -> k b n 1 v", v=x.shape[-1])
    return x.gather(3, idx).squeeze(3)


def conservative_penalty(q: Tensor, action_bins: Tensor, bin_mask: Tensor, min_reward: float = 0.0) -> Tensor:
    """Mean over (critic, sample, dim) of the mean over non-taken valid bins of (Q - min_reward)^2.

    q: (k, b, n, a) in [0, 1]; action_bins (b, n); bin_mask (n, a). Rows with no non-taken valid bin
    (a dim with one bin) contribute nothing."""
    n_bins = q.shape[-1]
    taken = F.one_hot(action_bins, n_bins).to(torch.bool)  # (b, n, a)
    others = bin_mask.to(torch.bool).unsqueeze(0) & ~taken  # (b, n, a)
    sq = (q.float() - min_reward) ** 2 * others.unsqueeze(0)
    count = others.sum(-1)  # (b, n)
    per_row = sq.sum(-1) / count.clamp_min(1)  # (k, b, n)
    has = (count > 0).expand_as(per_row)
    return per_row[has].mean() if has.any() else q.new_zeros(())


def td_loss(
    pred: Tensor,
    target: Tensor,
    kind: TDLoss,
    *,
    q_range: tuple[float, float] = (0.0, 1.0),
    hl_gauss_sigma_ratio: float = 0.75,
) -> Tensor:
    """TD loss on the taken bin, averaged over critics, samples and dims.

    pred: (k, b, n) Q values in [0, 1] for 'mse'/'bce', or (k, b, n, v) value-bin logits for 'hl_gauss'.
    target: (b, n), shared by all critics."""
    target = target.float()
    if kind == "mse":
        return ((pred.float() - target.unsqueeze(0)) ** 2).mean()
    lo, hi = q_range
    target = target.clamp(lo, hi)
    if kind == "bce":
        p = ((pred.float() - lo) / (hi - lo)).clamp(1e-6, 1 - 1e-6)
        t = ((target - lo) / (hi - lo)).expand_as(p)
        return F.binary_cross_entropy(p, t)
    if kind == "hl_gauss":
        if pred.ndim != 4:
            raise ValueError(f"td_loss 'hl_gauss' needs value-bin logits (k, b, n, v), got shape {tuple(pred.shape)}")
        support = support_for(pred.shape[-1], lo, hi, hl_gauss_sigma_ratio)
        return support.loss(pred, target.unsqueeze(0).expand(pred.shape[:-1])).mean()
    raise ValueError(f"td_loss kind = {kind!r}: must be 'mse', 'bce' or 'hl_gauss'")


def bc_loss(logits: Tensor, action_bins: Tensor, bin_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Behaviour cloning: cross-entropy over each dim's valid bins given the data's prefix.

    logits: (k, b, n, a) (every critic head is trained); returns (loss, accuracy of the argmax)."""
    if logits.ndim != 4:
        raise ValueError(f"objective 'bc' needs scalar logits (k, b, n, a), got shape {tuple(logits.shape)} "
                         "(a model with value_bins > 1 cannot be trained with BC)")
    masked = logits.float().masked_fill(~bin_mask.to(torch.bool), float("-inf"))
    k = logits.shape[0]
    flat = rearrange(masked, "k b n a -> (k b n) a")
    labels = rearrange(repeat(action_bins, "b n -> k b n", k=k), "k b n -> (k b n)")
    loss = F.cross_entropy(flat, labels)
    acc = (flat.argmax(-1) == labels).float().mean()
    return loss, acc


# ---------------------------------------------------------------------------------------------
# target network
# ---------------------------------------------------------------------------------------------

def make_target_network(online: nn.Module) -> nn.Module:
    """A frozen deep copy of the (unwrapped) online network, in eval mode (no dropout noise in targets)."""
    import copy

    target = copy.deepcopy(unwrap(online))
    target.requires_grad_(False)
    target.eval()
    if hasattr(target, "share_repeated_frames"):  # its batches are [s_t; s_t+n]: F - n frames repeat per sample
        target.share_repeated_frames = True
    return target


@torch.no_grad()
def update_target_network(online: nn.Module, target: nn.Module, step: int, cfg: LearnerConfig) -> bool:
    """Apply the configured target update after optimizer step ``step`` (1-based); True if it changed.

    Buffers (e.g. batch-norm statistics) are copied as they are."""
    online = unwrap(online)
    if cfg.target_update == "copy":
        if step % cfg.target_copy_every != 0:
            return False
        target.load_state_dict(online.state_dict())
        return True
    tau = cfg.target_ema_tau
    t_params = [p for p in target.parameters()]
    o_params = [p.detach() for p in online.parameters()]
    torch._foreach_lerp_(t_params, o_params, tau)
    for tb, ob in zip(target.buffers(), online.buffers()):
        tb.copy_(ob)
    return True


def unwrap(net: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel (or torch.compile) wrapper."""
    while True:
        inner = getattr(net, "module", None)
        if inner is None:
            inner = getattr(net, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return net
        net = inner


# ---------------------------------------------------------------------------------------------
# the learning step
# ---------------------------------------------------------------------------------------------

def instruction_conditioning(
    instruction_index: Tensor, text_embeddings: Tensor | None, text_dim: int
) -> tuple[Tensor, Tensor]:
    """Look the batch's instructions up in the table: (b,) indices (-1 = none) -> text (b, t), mask (b,).

    Rows without an instruction get zeros and mask False (the model substitutes its null embedding)."""
    b = instruction_index.shape[0]
    mask = instruction_index >= 0
    if text_embeddings is None or text_embeddings.shape[0] == 0:
        if mask.any():
            raise ValueError("batch has instruction_index >= 0 but no instruction embeddings were given")
        return torch.zeros(b, text_dim, device=instruction_index.device), mask
    if int(instruction_index.max()) >= text_embeddings.shape[0]:
        raise ValueError(
            f"instruction_index {int(instruction_index.max())} out of range for an instruction table of "
            f"{text_embeddings.shape[0]} entries"
        )
    text = text_embeddings[instruction_index.clamp_min(0)]
    text = text * rearrange(mask, "b -> b 1").to(text.dtype)
    return text, mask


def _text_dim(net: nn.Module) -> int:
    cfg = getattr(net, "config", None) or getattr(net, "cfg", None)
    return int(getattr(cfg, "text_dim", 0) or 0)


def learning_step(
    batch: TrainingBatch,
    online_net: nn.Module,
    target_net: nn.Module | None,
    text_embeddings: Tensor | None,
    cfg: LearnerConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One loss evaluation: returns the scalar loss (to backpropagate) and detached metrics.

    batch: a :class:`~q_transformer_ros.core.batch.TrainingBatch` on the model's device (a full ``Batch``
    is one too; the trainer passes ``batch.training_view()``): ``frames`` / ``next_frames`` uint8
    (b, c, f, 3, h, w), ``action_bins`` int64 (b, n), ``rewards`` / ``reward_mask`` (b, s),
    ``discount_to_next`` (b,), ``mc_return`` (b,), ``instruction_index`` int64 (b,), and for models with
    state inputs ``state`` / ``next_state`` float (b, f, p) (normalised robot state over the two windows).
    online_net may be DDP-wrapped (its forward is called through the wrapper so gradients sync);
    target_net is the bare target model (unused for 'bc')."""
    bare = unwrap(online_net)
    bin_mask = bare.bin_mask.to(torch.bool)  # (n, a)
    action_bins = batch.action_bins.long()
    text, text_mask = instruction_conditioning(batch.instruction_index.long(), text_embeddings, _text_dim(bare))

    proprio = batch.state
    with_state = {} if proprio is None else {"proprio": proprio}  # networks without state inputs take none
    logits = online_net(batch.frames, text, text_mask, action_bins, cond_drop_prob=cfg.cond_drop_prob,
                        **with_state)
    metrics: dict[str, Tensor] = {}

    if cfg.objective == "bc":
        loss, acc = bc_loss(logits, action_bins, bin_mask)
        metrics["losses/bc_loss"] = loss.detach()
        metrics["bc/accuracy"] = acc.detach()
        metrics["losses/loss"] = loss.detach()
        return loss, metrics

    if target_net is None:
        raise ValueError("objective 'q_learning' needs a target network")
    has_value_bins = logits.ndim == 5
    if has_value_bins != (cfg.td_loss == "hl_gauss"):
        raise ValueError(
            f"LearnerConfig.td_loss = {cfg.td_loss!r} does not fit the model's output shape {tuple(logits.shape)}: "
            "use 'hl_gauss' exactly when the model has value_bins > 1"
        )
    q = bare.q_values(logits)  # (k, b, n, a) in [0, 1]

    with torch.no_grad():
        b = action_bins.shape[0]
        frames2 = torch.cat([batch.frames, batch.next_frames], dim=0)
        # dim 0 at s_{t+n} does not depend on the bins fed to the head; reuse the data's bins
        bins2 = torch.cat([action_bins, action_bins], dim=0)
        if proprio is not None:
            with_state = {"proprio": torch.cat([proprio, batch.next_state], dim=0)}
        t_logits = target_net(frames2, torch.cat([text, text]), torch.cat([text_mask, text_mask]), bins2,
                              cond_drop_prob=0.0, **with_state)
        q_t = target_net.q_values(t_logits).float().amin(dim=0)  # (2b, n, a) min over critics
        q_now, q_next_state = q_t[:b], q_t[b:]
        targets = bellman_targets(
            q_now,
            q_next_state[:, 0],
            bin_mask,
            batch.rewards.float(),
            cfg.discount,
            batch.discount_to_next.float(),
            batch.mc_return.float() if cfg.mc_lower_bound else None,
            batch.reward_mask,
        )

    pred = take_bins(logits, action_bins) if cfg.td_loss == "hl_gauss" else take_bins(q, action_bins)
    td = td_loss(pred, targets, cfg.td_loss, q_range=(cfg.min_reward, cfg.max_reward),
                 hl_gauss_sigma_ratio=cfg.hl_gauss_sigma_ratio)
    loss = td
    if cfg.conservative_weight > 0:
        cons = conservative_penalty(q, action_bins, bin_mask, cfg.min_reward)
        loss = loss + cfg.conservative_weight * cons
    else:
        cons = torch.zeros((), device=q.device)
    if cfg.bc_weight > 0:
        if has_value_bins:
            raise ValueError("learner.bc_weight > 0 needs scalar Q logits (a model with value_bins = 1)")
        aux, aux_acc = bc_loss(logits, action_bins, bin_mask)
        loss = loss + cfg.bc_weight * aux
        metrics["losses/bc_loss"] = aux.detach()
        metrics["bc/accuracy"] = aux_acc.detach()

    q_taken = take_bins(q, action_bins).detach()
    metrics["losses/td_loss"] = td.detach()
    metrics["losses/conservative_loss"] = cons.detach()
    metrics["losses/loss"] = loss.detach()
    metrics["q/mean_q"] = q_taken.mean()
    metrics["q/mean_q_last_dim"] = q_taken[..., -1].mean()
    metrics["q/mean_target"] = targets.mean()
    metrics["q/mean_target_last_dim"] = targets[:, -1].mean()
    return loss, metrics
