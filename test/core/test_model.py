"""QTransformerNet on the tiny preset: shapes of every variant, causality, KV-cache decoding, beams,
bin masking, null conditioning, and the size of the 'base' preset."""

from __future__ import annotations

import pytest
import torch

from q_transformer_ros.core.model import ModelConfig, QTransformerNet

T = 16  # text width used in these tests


def make_net(seed: int = 0, **overrides) -> QTransformerNet:
    torch.manual_seed(seed)
    kw = dict(text_dim=T, num_action_dims=3, action_bins=(5, 7, 4), frame_history=3, num_cameras=2)
    kw.update(overrides)
    return QTransformerNet(ModelConfig.preset("tiny", **kw)).eval()


def inputs(net: QTransformerNet, batch: int = 2, seed: int = 1):
    cfg = net.cfg
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (batch, cfg.num_cameras, cfg.frame_history, 3, *cfg.image_size), dtype=torch.uint8, generator=g)
    text = torch.randn(batch, cfg.text_dim, generator=g)
    mask = torch.ones(batch, dtype=torch.bool)
    bins = torch.stack([torch.randint(0, n, (batch,), generator=g) for n in cfg.action_bins], dim=1)
    return frames, text, mask, bins


VARIANTS = {
    "plain": {},
    "dueling": dict(dueling=True),
    "dual": dict(dual_critics=True),
    "hl_gauss": dict(value_bins=11),
    "all": dict(dueling=True, dual_critics=True, value_bins=11),
    "single_action": dict(num_action_dims=1, action_bins=(9,)),
    "one_cam_one_frame": dict(num_cameras=1, frame_history=1),
    "batchnorm": dict(use_batchnorm=True),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_shapes_and_ranges(name: str) -> None:
    net = make_net(**VARIANTS[name])
    cfg = net.cfg
    frames, text, mask, bins = inputs(net)
    logits = net(frames, text, mask, bins)
    shape = (cfg.num_critics, 2, cfg.num_action_dims, cfg.max_bins) + ((cfg.value_bins,) if cfg.value_bins > 1 else ())
    assert logits.shape == shape
    q = net.q_values(logits)
    assert q.shape == shape[:4]
    assert q.min() >= 0 and q.max() <= 1
    assert torch.all(q[:, :, ~net.bin_mask] == 0)  # invalid bins read as the minimum reward
    state = net.encode(frames, text, mask)
    assert state.shape == (2, cfg.frame_history * cfg.num_cameras * cfg.tokens_per_frame, cfg.embed_dim)
    out_bins, q_chosen, all_q = net.decode(state)
    assert out_bins.shape == q_chosen.shape == (2, cfg.num_action_dims) and out_bins.dtype == torch.long
    assert all_q.shape == (2, cfg.num_action_dims, cfg.max_bins)
    logits.float().sum().backward()  # differentiable end to end
    # every parameter takes part (DDP runs without find_unused_parameters)
    unused = [n for n, p in net.named_parameters() if p.grad is None]
    assert not unused, unused


def test_block_causal_history() -> None:
    """Changing the newest frame leaves the state tokens of earlier frames unchanged; changing the oldest does not."""
    net = make_net()
    cfg = net.cfg
    frames, text, mask, _ = inputs(net)
    per_step = cfg.tokens_per_step
    with torch.no_grad():
        base = net.encode(frames, text, mask)
        changed = frames.clone()
        changed[:, :, -1] = 255 - changed[:, :, -1]
        after = net.encode(changed, text, mask)
        early = slice(0, (cfg.frame_history - 1) * per_step)
        assert torch.allclose(base[:, early], after[:, early], atol=1e-6)
        assert not torch.allclose(base[:, -per_step:], after[:, -per_step:], atol=1e-4)
        changed = frames.clone()
        changed[:, :, 0] = 255 - changed[:, :, 0]
        assert not torch.allclose(base[:, -per_step:], net.encode(changed, text, mask)[:, -per_step:], atol=1e-4)


@pytest.mark.parametrize("name", ["plain", "dual", "hl_gauss", "all", "single_action"])
def test_teacher_forcing_matches_cached_decode(name: str) -> None:
    """Q from step-by-step decoding with the KV cache equals the teacher-forced head on the decoded bins,
    and each chosen bin is the argmax over that dim's valid bins."""
    net = make_net(**VARIANTS[name])
    frames, text, mask, _ = inputs(net, batch=3)
    with torch.no_grad():
        state = net.encode(frames, text, mask)
        bins, q_chosen, all_q = net.decode(state)
        q_tf = net.q_values(net.q_logits(state, bins)).amin(dim=0)
    assert torch.allclose(all_q, q_tf, atol=1e-5), (all_q - q_tf).abs().max()
    masked = q_tf.masked_fill(~net.bin_mask, -1)
    assert torch.equal(bins, masked.argmax(-1))
    assert torch.allclose(q_chosen, q_tf.gather(-1, bins[..., None])[..., 0], atol=1e-6)


def test_beam_width_one_is_greedy_and_wide_beam_is_no_worse() -> None:
    net = make_net(num_action_dims=2, action_bins=(6, 6))
    frames, text, mask, _ = inputs(net, batch=4)
    with torch.no_grad():
        state = net.encode(frames, text, mask)
        greedy = net.decode(state)
        beam1 = net.decode(state, beam_width=1)
        for a, b in zip(greedy, beam1):
            assert torch.equal(a, b)
        # width = bins of dim 0 makes the search exhaustive over 2 dims: it finds the best full action
        bins, q, _ = net.decode(state, beam_width=6)
        grid = torch.cartesian_prod(torch.arange(6), torch.arange(6))  # (36, 2)
        rep = state.repeat_interleave(36, dim=0)
        q_all = net.q_values(net.q_logits(rep, grid.repeat(4, 1)))[0, :, 1]  # (4*36, a): Q of dim 1
        last = q_all.gather(-1, grid.repeat(4, 1)[:, 1:])[:, 0].reshape(4, 36)
        best = last.max(dim=1).values
    assert torch.allclose(q[:, -1], best, atol=1e-5)
    assert torch.all(q[:, -1] >= greedy[1][:, -1] - 1e-6)


def test_beam_margin_acts_on_the_beam_only_where_its_value_beats_greedy_by_more_than_the_margin() -> None:
    """Per row: the beam's whole decision (bins, Q, all_q) where beam value - greedy value > margin, else
    the greedy one. A margin between two rows' gains splits the batch; -1 is the plain beam, +1 greedy."""
    net = make_net(seed=5, num_action_dims=3, action_bins=(6, 6, 6))
    frames, text, mask, _ = inputs(net, batch=16)
    with torch.no_grad():
        state = net.encode(frames, text, mask)
        greedy, beam = net.decode(state), net.decode(state, beam_width=4)
        gain = beam[1][:, -1] - greedy[1][:, -1]
        assert torch.all(gain >= -1e-6)
        assert (gain > 1e-4).sum() >= 2, "random weights should give the beam a gain on some rows"
        gains = gain[gain > 1e-4].sort().values
        margin = float((gains[0] + gains[-1]) / 2)  # some rows above it, some below
        guarded = net.decode(state, beam_width=4, beam_margin=margin)
        plain = net.decode(state, beam_width=4, beam_margin=-1.0)
        never = net.decode(state, beam_width=4, beam_margin=1.0)
        width_one = net.decode(state, beam_margin=margin)  # width 1: the margin has nothing to guard
    take = gain > margin
    assert 0 < int(take.sum()) < 16
    for g, b, got in zip(greedy, beam, guarded):
        assert torch.equal(got[take], b[take]) and torch.equal(got[~take], g[~take])
    for ref, got in [*zip(beam, plain), *zip(greedy, never), *zip(greedy, width_one)]:
        assert torch.equal(ref, got)


def test_beam_margin_refuses_a_cloning_beam_and_nan() -> None:
    net = make_net()
    frames, text, mask, _ = inputs(net)
    with torch.no_grad():
        state = net.encode(frames, text, mask)
        with pytest.raises(ValueError, match="log_prob"):
            net.decode(state, beam_width=2, score="log_prob", beam_margin=0.05)
        with pytest.raises(ValueError, match="NaN"):
            net.decode(state, beam_width=2, beam_margin=float("nan"))


@pytest.mark.parametrize("dual", [False, True])
def test_log_prob_beam_finds_the_most_likely_whole_action_of_a_cloning_network(dual: bool) -> None:
    """score='log_prob' (cloning): an exhaustive beam returns the action with the highest summed per-dim
    log-probability (mean over heads), which is not in general the one with the highest last-dim logit
    that score='q' returns. Dim 0 has an invalid bin, which no beam may take."""
    net = make_net(seed=3, num_action_dims=2, action_bins=(5, 6), dual_critics=dual)
    frames, text, mask, _ = inputs(net, batch=6)
    with torch.no_grad():
        state = net.encode(frames, text, mask)
        bins, _, _ = net.decode(state, beam_width=5, score="log_prob")
        grid = torch.cartesian_prod(torch.arange(5), torch.arange(6))  # (30, 2): every valid action
        logits = net.q_logits(state.repeat_interleave(30, dim=0), grid.repeat(6, 1))  # (k, 6*30, 2, a)
        log_p = logits.float().masked_fill(~net.bin_mask, float("-inf")).log_softmax(-1).mean(0)
        total = log_p.gather(-1, grid.repeat(6, 1)[..., None])[..., 0].sum(-1).reshape(6, 30)
        best = grid[total.argmax(dim=1)]
        by_q, _, _ = net.decode(state, beam_width=5, score="q")
    assert torch.equal(bins, best)
    assert torch.all(bins[:, 0] < 5)
    assert not torch.equal(by_q, bins), "the two scores should rank differently on random weights"


def test_log_prob_beam_refuses_value_bin_models_and_unknown_scores() -> None:
    net = make_net(value_bins=11)
    frames, text, mask, _ = inputs(net)
    with torch.no_grad():
        state = net.encode(frames, text, mask)
        with pytest.raises(ValueError, match="value_bins = 11"):
            net.decode(state, beam_width=2, score="log_prob")
        with pytest.raises(ValueError, match="'q' or 'log_prob'"):
            net.decode(state, beam_width=2, score="logit")


def test_bin_masking_never_picks_invalid_bins() -> None:
    """Dims with fewer bins than A: even when the invalid bins have the largest logits, decode skips them."""
    net = make_net(num_action_dims=3, action_bins=(2, 9, 3))
    for head in net.heads:
        with torch.no_grad():
            head.out_b[~net.bin_mask] = 50.0  # invalid bins would win an unmasked argmax
    frames, text, mask, _ = inputs(net, batch=5)
    with torch.no_grad():
        for width in (1, 3):
            bins, _, all_q = net.decode(net.encode(frames, text, mask), beam_width=width)
            assert torch.all(bins < torch.tensor([2, 9, 3]))
            assert torch.all(all_q[:, ~net.bin_mask] == 0)
    with pytest.raises(ValueError, match="out of range"):
        net.q_logits(net.encode(frames, text, mask), torch.tensor([[2, 0, 0]] * 5))


def test_null_embedding_and_conditioning_dropout() -> None:
    net = make_net()
    frames, text, mask, bins = inputs(net)
    with torch.no_grad():
        null_mask = net(frames, text, torch.zeros(2, dtype=torch.bool), bins)
        no_text = net(frames, None, None, bins)
        dropped = net(frames, text, mask, bins, cond_drop_prob=0.999999)
        with_text = net(frames, text, mask, bins)
        # make FiLM non-trivial (it is zero-initialized): the instruction must then change Q
        for m in net.modules():
            if hasattr(m, "to_gamma_beta"):
                torch.nn.init.normal_(m.to_gamma_beta.weight, std=0.5)
        changed = net(frames, text, mask, bins)
        changed_null = net(frames, None, None, bins)
    assert torch.allclose(null_mask, no_text, atol=1e-6)
    assert torch.allclose(dropped, no_text, atol=1e-6)
    assert not torch.allclose(changed, changed_null, atol=1e-4)
    assert with_text.shape == changed.shape


def test_config_validation_and_round_trip() -> None:
    cfg = ModelConfig.preset("tiny", text_dim=T, dueling=True, value_bins=21)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="action_bins"):
        ModelConfig.preset("tiny", num_action_dims=2, action_bins=(4,))
    with pytest.raises(ValueError, match="window_size"):
        ModelConfig.preset("tiny", image_size=(36, 36))
    with pytest.raises(ValueError, match="<model_config>: unknown key 'nope'"):
        ModelConfig.from_dict({**cfg.to_dict(), "nope": 1})
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("huge")
    # a contract-derived image size gets a fitting window: 128 px with 4 stages -> 4 px maps -> window 4
    assert ModelConfig.preset("base", image_size=(128, 128)).window_size == 4


def test_base_preset_size() -> None:
    """'base' is near the seed README config (56.5 M params): dim 64, depth (2, 2, 5, 2), 8 dims x 256 bins."""
    cfg = ModelConfig.preset("base", text_dim=512)
    net = QTransformerNet(cfg)  # ~4 s on CPU (the meta device would pull in torch._refs: slower)
    n = sum(p.numel() for p in net.parameters())
    print(f"base preset: {n / 1e6:.1f} M parameters")
    assert cfg.image_size == (224, 224) and cfg.embed_dim == 512
    assert 45e6 < n < 65e6
