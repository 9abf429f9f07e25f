"""DrQ random shift: shapes kept, whole-image shifts with replicated edges, one shift per sample and
camera across its history, identity at 0, and a training run with it resumes exactly."""

from __future__ import annotations

import torch

from q_transformer_ros.core.augment import random_shift


def test_random_shift_moves_whole_images_and_replicates_edges() -> None:
    torch.manual_seed(0)
    b, c, f, h, w, pad = 16, 2, 3, 12, 10, 3
    base = torch.arange(h * w, dtype=torch.int32).reshape(1, 1, 1, 1, h, w)
    frames = base.expand(b, c, f, 3, h, w).clone()
    frames[:, :, 1] += 1000  # frames of a history differ
    out = random_shift(frames, pad)
    assert out.shape == frames.shape and out.dtype == frames.dtype
    shifts = set()
    for i in range(b):
        for j in range(c):
            img = out[i, j, 0, 0]
            dy, dx = int(img[h // 2, w // 2] // w - h // 2), int(img[h // 2, w // 2] % w - w // 2)
            assert abs(dy) <= pad and abs(dx) <= pad
            rows = (torch.arange(h) + dy).clamp(0, h - 1)
            cols = (torch.arange(w) + dx).clamp(0, w - 1)
            torch.testing.assert_close(img, base[0, 0, 0, 0][rows][:, cols])
            for t in range(f):  # the same shift for every frame and channel of the history
                torch.testing.assert_close(out[i, j, t], frames[i, j, t][:, rows][:, :, cols])
            shifts.add((dy, dx))
    assert len(shifts) > 5
    assert random_shift(frames, 0) is frames


def test_training_with_augmentation_resumes_exactly(tmp_path) -> None:
    from test_trainer import args, make_dataset  # noqa: PLC0415

    from q_transformer_ros.core.trainer import config_from_args, train

    ds = make_dataset(tmp_path / "ds")
    common = ["--steps", "4", "--batch-size", "4", "--set", "augment_shift_px=2", "--set", "checkpoint_every=2"]
    straight = train(config_from_args(args(ds, tmp_path / "a", *common)))
    half = train(config_from_args(args(ds, tmp_path / "b", *common[:1], "2", *common[2:])))
    assert half.step == 2
    resumed = train(config_from_args(args(ds, tmp_path / "b", *common)))
    assert resumed.param_checksum == straight.param_checksum
