"""Returns helpers: MC return-to-go and the vectorised n-step layout against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from q_transformer_ros.replay.returns import discounted_returns, n_step_layout, n_step_rewards


def brute_layout(t: int, L: int, terminal: bool, n: int, gamma: float):
    """Walk forward step by step, the way one would by hand."""
    k, nxt = 0, t
    while k < n:
        if t + k == L - 1 and terminal:  # the terminal transition is taken: stop, no bootstrap
            return k + 1, L - 1, 0.0, True
        if t + k + 1 > L - 1:  # no next observation to move to
            break
        k += 1
        nxt = t + k
    return k, nxt, gamma ** k, False


def test_n_step_layout_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(300):
        L, n, term = int(rng.integers(1, 9)), int(rng.integers(1, 5)), bool(rng.integers(2))
        gamma = float(rng.uniform(0.5, 1.0))
        ts = np.arange(L if term else L - 1)
        if ts.size == 0:
            continue
        lay = n_step_layout(ts, np.full_like(ts, L), np.full(ts.shape, term), n, gamma)
        for j, t in enumerate(ts):
            n_eff, nxt, disc, hit = brute_layout(int(t), L, term, n, gamma)
            assert (lay.n_eff[j], lay.next_offset[j], bool(lay.terminal[j])) == (n_eff, nxt, hit), (L, n, term, t)
            assert lay.discount_to_next[j] == pytest.approx(disc, rel=1e-6)
    with pytest.raises(ValueError, match="not a sample"):
        n_step_layout(np.array([3]), np.array([4]), np.array([False]), 2, 0.9)


def test_discounted_returns_and_reward_windows():
    r = np.array([0.0, 0.5, 0.0, 1.0], np.float32)
    np.testing.assert_allclose(discounted_returns(r, 0.9), [1.179, 1.31, 0.9, 1.0], rtol=1e-6)
    np.testing.assert_allclose(discounted_returns(r, 1.0), [1.5, 1.5, 1.0, 1.0])
    out, mask = n_step_rewards(r, np.array([1, 3]), np.array([3, 1]), 3)
    np.testing.assert_array_equal(out, [[0.5, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert mask.tolist() == [[True, True, True], [True, False, False]]
