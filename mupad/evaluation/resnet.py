"""ResNet-18 classifiers for the few-shot benchmark, randomly initialised.

`resnet18(num_classes)` returns torchvision's ResNet-18 when torchvision is importable and
otherwise `CompactResNet18`, our own implementation of the same architecture (He et al.
2016, "Deep Residual Learning"): the 7x7/2 convolution + 3x3/2 max-pool stem, four stages
of two BasicBlocks with 64-128-256-512 channels (the first block of stages 2-4 halves the
resolution and projects the shortcut with a 1x1 convolution + batch norm), global average
pooling and one linear layer. Parameter count and initialisation (Kaiming-normal fan-out
convolutions, unit batch-norm scales, zero shifts, PyTorch-default linear layer) match
torchvision, so numbers from either backend are comparable. Average pooling is adaptive,
so any input from 32 px up works (at 32 px the last stage sees a 1x1 map).
"""

from __future__ import annotations

import torch
from torch import nn

RESNET18_STAGE_WIDTHS = (64, 128, 256, 512)
RESNET18_BLOCKS_PER_STAGE = (2, 2, 2, 2)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or projected) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class CompactResNet18(nn.Module):
    """ResNet-18: images (B, 3, H, W) -> class logits (B, num_classes)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        stages, in_channels = [], 64
        for index, (width, blocks) in enumerate(
            zip(RESNET18_STAGE_WIDTHS, RESNET18_BLOCKS_PER_STAGE, strict=True)
        ):
            stride = 1 if index == 0 else 2
            layers = [BasicBlock(in_channels, width, stride)]
            layers += [BasicBlock(width, width, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            in_channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512, H/32, W/32)
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, num_classes)


def classifier_backend() -> str:
    """'torchvision' when torchvision's ResNet-18 is importable, else 'mupad'."""
    try:
        import torchvision.models  # noqa: F401
    except ImportError:
        return "mupad"
    return "torchvision"


def resnet18(num_classes: int) -> nn.Module:
    """A randomly initialised ResNet-18 (torchvision's if importable, else ours)."""
    try:
        from torchvision.models import resnet18 as torchvision_resnet18
    except ImportError:
        return CompactResNet18(num_classes)
    return torchvision_resnet18(weights=None, num_classes=num_classes)
