"""A real learning check: a small model trained on the bundled H&E tiles learns their velocity field.

Held-out: fixed noisy crops from tiles the model never sees (one tile per class is held out).
The trained model must beat both its own initialisation and the best data-blind predictor.
"""

import torch

from mupad.conditions import Conditions, ConditionStream
from mupad.config import ModelConfig, TrainConfig
from mupad.data.tiles import TileSet, bundled_kather_dir, load_tile_folder, random_crops
from mupad.models import SiT
from mupad.precision import resolve_precision
from mupad.training.loop import TrainBatch, Trainer
from mupad.transport.losses import make_noisy_batch, velocity_loss


def split(tiles: TileSet) -> tuple[TileSet, TileSet]:
    held = torch.zeros(len(tiles), dtype=torch.bool)
    for label in range(len(tiles.class_names)):
        held[(tiles.labels == label).nonzero()[0]] = True

    def subset(rows):
        return TileSet(tiles.images[rows], tiles.labels[rows], tiles.class_names,
                       tuple(p for p, r in zip(tiles.paths, rows) if r))

    return subset(~held), subset(held)


def test_small_model_learns_real_he_tiles(tmp_path):
    train_tiles, test_tiles = split(load_tile_folder(bundled_kather_dir()))
    class_tokens = torch.randn(8, 2, 16, generator=torch.Generator().manual_seed(0))

    def batches(step, generator):
        images, index = random_crops(train_tiles, 32, 16, generator)
        labels = train_tiles.labels[index]
        return TrainBatch(images, Conditions.build(text=ConditionStream.from_tokens(class_tokens[labels])))

    torch.manual_seed(0)
    model = SiT(ModelConfig(in_channels=3, patch_size=4, hidden_size=96, depth=3, num_heads=4,
                            text_dim=16, sample_size=32))
    images, index = random_crops(test_tiles, 32, 64, torch.Generator().manual_seed(1))
    cond = Conditions.build(text=ConditionStream.from_tokens(class_tokens[test_tiles.labels[index]]))
    noisy = make_noisy_batch(images, torch.Generator().manual_seed(2))

    def held_out_loss() -> float:
        with torch.no_grad():
            return velocity_loss(model(noisy.x_t, noisy.t, cond).velocity, noisy.target).mean().item()

    # The best predictor that ignores x_t: E[eps - x0] = -mean(x0); its loss is ~Var + 1.
    blind = velocity_loss(-images.mean(0, keepdim=True).expand_as(images), noisy.target).mean().item()
    before = held_out_loss()
    config = TrainConfig(steps=80, batch_size=16, learning_rate=2e-3, warmup_steps=10,
                         precision=resolve_precision("auto"), checkpoint_every=80, ema_decay=0.99)
    Trainer(model, config, tmp_path, batches, progress=False).train()
    after = held_out_loss()
    assert after < 0.6 * before, (before, after)
    assert after < 0.8 * blind, (blind, after)
