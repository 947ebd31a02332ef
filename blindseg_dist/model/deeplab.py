"""DeepLabV3+ decoder, auxiliary head and projection heads (docs/METHOD.md, "Model").

Every conv followed by a BN has no bias, except the aux head's 3x3 conv (it has one in the released
network); the classifier convs and the projection heads have one. Module order inside each block
follows the released DeepV3Plus, so checkpoint keys map one to one (engine/interop.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ASPP", "DeepLabV3PlusDecoder", "AuxHead", "ProjectionHead", "upsample", "conv_bn_relu", "init_weights"]


def upsample(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize with align_corners=True (the convention of the whole model)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias) -> BN -> ReLU, 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Image pooling + 1x1 + three dilated 3x3 branches (256 ch each), concat, 1x1 projection."""

    def __init__(self, cin: int, rates: tuple[int, int, int], width: int = 256) -> None:
        super().__init__()
        self.pool = conv_bn_relu(cin, width)  # applied to the global average
        self.branches = nn.ModuleList([conv_bn_relu(cin, width)] + [conv_bn_relu(cin, width, 3, r) for r in rates])
        self.project = conv_bn_relu(width * (len(rates) + 2), width)

    def forward(self, x: Tensor) -> Tensor:
        pooled = upsample(self.pool(F.adaptive_avg_pool2d(x, 1)), x.shape[-2:])
        return self.project(torch.cat([pooled] + [branch(x) for branch in self.branches], dim=1))


class DeepLabV3PlusDecoder(nn.Module):
    """ASPP on the high-level features, fused with the low-level (1/4) features.

    forward(low, high) -> (logits at 1/4, dec0 (304 ch, 1/4), dec1 (256 ch, 1/4)).
    """

    def __init__(self, low_channels: int, high_channels: int, num_classes: int, output_stride: int) -> None:
        super().__init__()
        # 6/12/18 at OS16; scaled with the stride so the rates cover the same image extent.
        rates = tuple(max(1, r * 16 // output_stride) for r in (6, 12, 18))
        self.aspp = ASPP(high_channels, rates)
        self.low_proj = conv_bn_relu(low_channels, 48)
        self.fuse = nn.Sequential(conv_bn_relu(256 + 48, 256, 3), conv_bn_relu(256, 256, 3))
        self.classifier = nn.Conv2d(256, num_classes, 1)

    def forward(self, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        aspp = upsample(self.aspp(high), low.shape[-2:])
        dec0 = torch.cat([self.low_proj(low), aspp], dim=1)
        dec1 = self.fuse(dec0)
        return self.classifier(dec1), dec0, dec1


class AuxHead(nn.Module):
    """Training-only auxiliary classifier: 3x3 conv 512 (with bias, as released) -> BN -> ReLU ->
    Dropout2d(0.1) -> 1x1 conv (body indices 0, 1, 4 hold the weights)."""

    def __init__(self, cin: int, num_classes: int, width: int = 512) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 3, padding=1, bias=True),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.1),
            nn.Conv2d(width, num_classes, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class ProjectionHead(nn.Module):
    """Training-only embedding: 1x1 d->d -> ReLU -> 1x1 d->dim, then x / (||x||_2 + 1e-7) over channels."""

    def __init__(self, cin: int, dim: int = 256) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cin, 1), nn.ReLU(inplace=True), nn.Conv2d(cin, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        z = self.body(x)
        return z / (z.norm(dim=1, keepdim=True) + 1e-7)

    def rows(self, x: Tensor) -> Tensor:
        """The same head on feature rows (P, C) -> (P, dim): the 1x1 convs as matrix products.

        Equal to ``forward`` at those pixels; a 1x1 conv over a (P, C, 1, 1) batch runs 6-17x
        slower than the matrix product on the CPU (oneDNN treats every row as an image)."""
        c1, _, c2 = self.body
        z = F.linear(x, c1.weight.flatten(1), c1.bias).relu_()
        z = F.linear(z, c2.weight.flatten(1), c2.bias)
        return z / (z.norm(dim=1, keepdim=True) + 1e-7)


def init_weights(module: nn.Module) -> None:
    """The released head initialization: Kaiming-normal convs (fan_in, ReLU gain: std =
    sqrt(2 / (cin * k * k))), zero biases, BN weight 1 / bias 0. Applied to the whole decoder
    (ASPP included), the aux head and the projection heads; the backbone keeps torchvision's init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
