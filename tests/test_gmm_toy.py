"""End to end on a toy: train a small time-conditioned MLP velocity on a 2-D Gaussian
mixture with our noisy batches and loss, then sample with our ODE and SDE samplers and
check that the mixture comes back (component weights and means), and that conditional
sampling with classifier-free guidance lands on the requested component."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mupad.conditions import Conditions, ConditionStream, Modality
from mupad.config import GuidanceConfig, SampleConfig
from mupad.transport import euler_maruyama_sde, euler_ode, make_noisy_batch, sample, velocity_loss

WEIGHTS = torch.tensor([0.5, 0.3, 0.2])  # (K,)
MEANS = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])  # (K, 2)
STD = 0.3
TRAIN_STEPS = 1000
BATCH = 512


pytestmark = pytest.mark.usefixtures("one_thread")


def draw_mixture(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n points (n, 2) from the mixture and their component labels (n,)."""
    labels = torch.multinomial(WEIGHTS, n, replacement=True, generator=generator)
    return MEANS[labels] + STD * torch.randn(n, 2, generator=generator), labels


class MLPVelocity(nn.Module):
    """v(x, t, cond) for 2-D points; `cond` may carry the component label as a one-hot
    "text" token whose presence flag gates it (absent = unconditional)."""

    def __init__(self, hidden: int = 96, num_freqs: int = 6, conditional: bool = False):
        super().__init__()
        self.conditional = conditional
        self.register_buffer("freqs", torch.arange(1, num_freqs + 1).float() * math.pi)
        width = 2 + 2 * num_freqs + (len(WEIGHTS) if conditional else 0)
        self.net = nn.Sequential(
            nn.Linear(width, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditions | None = None):
        phase = t[:, None].float() * self.freqs  # (B, F)
        features = [x, phase.sin(), phase.cos()]
        if self.conditional:
            onehot = torch.zeros(x.shape[0], len(WEIGHTS))
            stream = cond.get(Modality.TEXT) if cond is not None else None
            if stream is not None:
                onehot = stream.tokens[:, 0, :] * stream.present[:, None].float()  # (B, K)
            features.append(onehot)
        return self.net(torch.cat(features, dim=1))


def label_conditions(labels: torch.Tensor) -> Conditions:
    onehot = nn.functional.one_hot(labels, len(WEIGHTS)).float()  # (B, K)
    return Conditions.build(text=ConditionStream.from_tokens(onehot))


def train(model: MLPVelocity, seed: int, condition_dropout: float = 0.0) -> MLPVelocity:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, TRAIN_STEPS)
    for _ in range(TRAIN_STEPS):
        x0, labels = draw_mixture(BATCH, generator)
        cond = None
        if model.conditional:
            cond = label_conditions(labels).dropout(condition_dropout, generator=generator)
        batch = make_noisy_batch(x0, generator=generator)
        loss = velocity_loss(model(batch.x_t, batch.t, cond), batch.target).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def assign(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest component (n,) and distance to it (n,)."""
    distance = torch.cdist(x, MEANS)  # (n, K)
    nearest = distance.min(dim=1)
    return nearest.indices, nearest.values


@pytest.fixture(scope="module")
def unconditional_model() -> MLPVelocity:
    return train(MLPVelocity(), seed=0)


@pytest.mark.parametrize("sampler", ["euler", "sde"])
def test_mixture_is_recovered(unconditional_model, sampler):
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    if sampler == "euler":
        x = euler_ode(unconditional_model, noise, None, 100)
    else:
        x = euler_maruyama_sde(unconditional_model, noise, None, 250,
                               generator=torch.Generator().manual_seed(2))
    component, distance = assign(x)
    weights = torch.bincount(component, minlength=len(WEIGHTS)).float() / len(x)
    assert (weights - WEIGHTS).abs().max().item() < 0.08, weights
    for k in range(len(WEIGHTS)):
        members = x[component == k]
        assert (members.mean(0) - MEANS[k]).norm().item() < 0.2, (k, members.mean(0))
        assert 0.2 < members.std(0).mean().item() < 0.45, (k, members.std(0))
    assert (distance > 4 * STD).float().mean().item() < 0.05  # few points between modes


def test_guided_conditional_sampling_lands_on_the_requested_component():
    model = train(MLPVelocity(conditional=True), seed=3, condition_dropout=0.2)
    n = 600
    labels = torch.arange(len(WEIGHTS)).repeat_interleave(n)  # (3n,)
    noise = torch.randn(len(labels), 2, generator=torch.Generator().manual_seed(4))
    cond = label_conditions(labels)
    config = SampleConfig(sampler="sde", num_steps=100, guidance=GuidanceConfig())  # 2.5 -> 0
    x = sample(model, noise, cond, config)
    component, _ = assign(x)
    accuracy = (component == labels).float().mean().item()
    assert accuracy > 0.97, accuracy
    # The same model with every condition absent is the unconditional mixture.
    x_free = sample(model, noise, cond.without([Modality.TEXT]), config)
    weights = torch.bincount(assign(x_free)[0], minlength=len(WEIGHTS)).float() / len(x_free)
    assert (weights - WEIGHTS).abs().max().item() < 0.08, weights
