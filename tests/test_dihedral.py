"""The 8 flips/quarter turns: a group action, applied alike to images and their token grids,
and the shard loader's `dihedral` option keeping the teacher grid aligned with the target."""

from __future__ import annotations

import pytest
import torch

from mupad.data.dihedral import DihedralDraw, DihedralError, apply_dihedral, draw_dihedral
from mupad.data.shards import ShardWriter, write_manifest
from mupad.data.streaming import ShardBatches, ShardedDataset
from mupad.training.loop import step_generator


def _all_elements(batch: int = 8) -> DihedralDraw:
    codes = torch.arange(batch) % 8
    return DihedralDraw(flips=codes >= 4, turns=codes % 4)


def test_the_eight_elements_are_distinct_permutations_and_match_rot90_and_flip():
    image = torch.arange(3 * 5 * 5, dtype=torch.float32).view(1, 3, 5, 5).repeat(8, 1, 1, 1)
    out = apply_dihedral(image, _all_elements())
    assert len({tuple(o.flatten().tolist()) for o in out}) == 8
    assert torch.equal(out[0], image[0])
    assert torch.equal(out[1], torch.rot90(image[0], 1, dims=(1, 2)))
    assert torch.equal(out[6], torch.rot90(image[0].flip(2), 2, dims=(1, 2)))
    # Pixel values are only moved, never changed.
    assert torch.equal(out.flatten(1).sort(dim=1).values, image.flatten(1).sort(dim=1).values)


def test_an_image_and_its_token_grid_stay_aligned():
    # 4x4 blocks of a 16 px image <-> a 4x4 grid whose cell holds the block's value.
    grid = torch.randn(8, 4, 4, 3)  # (B, h, w, D)
    image = grid.permute(0, 3, 1, 2).repeat_interleave(4, 2).repeat_interleave(4, 3)
    draw = draw_dihedral(8, torch.Generator().manual_seed(0))
    moved_image = apply_dihedral(image, draw)
    moved_grid = apply_dihedral(grid, draw, dims=(1, 2))
    block_means = moved_image.unfold(2, 4, 4).unfold(3, 4, 4).mean(dim=(-1, -2))  # (B, D, 4, 4)
    torch.testing.assert_close(block_means.permute(0, 2, 3, 1), moved_grid)


def test_draws_are_uniform_deterministic_and_checked():
    draws = [draw_dihedral(4000, torch.Generator().manual_seed(s)) for s in (1, 1)]
    assert torch.equal(draws[0].turns, draws[1].turns) and torch.equal(draws[0].flips, draws[1].flips)
    codes = draws[0].flips.long() * 4 + draws[0].turns
    counts = torch.bincount(codes, minlength=8).float()
    assert (counts / 4000 - 0.125).abs().max() < 0.03
    assert set(draw_dihedral(100, torch.Generator(), turns_allowed=2).turns.tolist()) <= {0, 2}
    with pytest.raises(DihedralError, match="square"):
        apply_dihedral(torch.zeros(8, 3, 4, 6), _all_elements())
    with pytest.raises(DihedralError, match="turns_allowed"):
        draw_dihedral(2, torch.Generator(), turns_allowed=3)


def test_shard_batches_turn_target_pixels_and_teacher_grid_together(tmp_path):
    with ShardWriter(tmp_path, "r", 8) as writer:
        for i in range(6):
            g = torch.Generator().manual_seed(i)
            cells = torch.randint(0, 256, (3, 2, 2), generator=g, dtype=torch.uint8)  # 2x2 grid
            image = cells.repeat_interleave(4, 1).repeat_interleave(4, 2)  # (3, 8, 8)
            patches = cells.float().div(127.5).sub(1.0).permute(1, 2, 0).reshape(4, 3)
            tokens = torch.cat([patches.mean(0, keepdim=True), patches])  # (1 + 4, 3)
            writer.add({"image": image, "teacher": tokens})
    write_manifest(tmp_path)
    dataset = ShardedDataset(tmp_path, seed=0)
    plain = ShardBatches(dataset, 6, latent_key=None, teacher_key="teacher", pixels_key="image")
    turned = ShardBatches(
        dataset, 6, latent_key=None, teacher_key="teacher", pixels_key="image", dihedral=True
    )
    a = plain(0, step_generator(0, 0))
    b = turned(0, step_generator(0, 0))
    assert not torch.equal(a.x0, b.x0)  # some sample was turned
    assert torch.equal(b.x0, b.pixels)
    cells = b.x0.unfold(2, 4, 4).unfold(3, 4, 4).mean(dim=(-1, -2))  # (B, 3, 2, 2)
    torch.testing.assert_close(cells.flatten(2).transpose(1, 2), b.teacher.patches)
    assert torch.equal(a.teacher.cls, b.teacher.cls)
    assert torch.equal(turned(0, step_generator(0, 0)).x0, b.x0)  # deterministic per step
