"""Built-in client trunks written as plain ``nn.Module``s: what ``--model resnet:N`` builds.

The simulator batches them like any user module (``models.ModuleArch``); nothing here knows
about clients. A trunk maps an input [B, C, H, W] to an embedding [B, E]; the simulator adds
the heads.
"""
from __future__ import annotations

from torch import Tensor, nn

NORMS = ("gn", "bn")
# GroupNorm groups: 8 divides every stage width (16, 32, 64), so a group is 2-8 channels.
GN_GROUPS = 8


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.GroupNorm(GN_GROUPS, channels) if kind == "gn" else nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual; a stride-2 block halves the image and projects
    the shortcut with a 1x1 convolution (He et al.'s option B)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _norm(norm, c_out)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          _norm(norm, c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet of depth 6n + 2 (He et al. 2016, section 4.2): a 3x3 stem, three
    stages of n blocks with 16, 32, 64 channels (stride 2 at the start of stages 2 and 3),
    global average pooling -> [B, 64]. Any image of at least 1x1 after the two halvings works
    (8x8 digits, 28x28 Fashion-MNIST, 32x32 CIFAR)."""

    def __init__(self, depth: int, in_channels: int, norm: str = "gn"):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 >= 8 (8, 14, 20, ...), got {depth}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False),
                                  _norm(norm, 16), nn.ReLU())
        layers, c = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for b in range(blocks):
                layers.append(BasicBlock(c, width, 2 if stage > 0 and b == 0 else 1, norm))
                c = width
        self.stages = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x)).mean(dim=(-2, -1))  # global average pooling
