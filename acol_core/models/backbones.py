"""Feature extractors: `tiny` (CPU tests), `vgg16` (ACoL's), `resnet50` (wsolevaluation's).

Every backbone maps N×in_channels×H×W to an N×out_channels×(H/stride)×(W/stride) feature map. The
big two keep torchvision's module names so torchvision checkpoints load (see `pretrained.py`).

Examples:
    >>> import torch
    >>> net = Vgg16Backbone(in_channels=1)
    >>> net(torch.zeros(1, 1, 224, 224)).shape
    torch.Size([1, 512, 28, 28])
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["Backbone", "Bottleneck", "ResNet50Backbone", "TinyBackbone", "Vgg16Backbone"]


class Backbone(nn.Module):
    """Base class: a feature extractor plus what heads and the checkpoint loader need to know.

    Attributes:
        in_channels: input channel count.
        out_channels: channels of the feature map.
        stride: input size / feature map size.
        first_conv_key: state-dict key of the first conv weight (adapted when channel counts differ).
        ignored_prefixes: checkpoint key prefixes that are not part of the backbone (classifiers).
        default_head_width, default_head_depth: head size used when a model does not say.
    """

    in_channels: int
    out_channels: int
    stride: int
    first_conv_key: str
    ignored_prefixes: tuple[str, ...] = ()
    default_head_width: int = 1024
    default_head_depth: int = 2

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        if int(in_channels) < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels!r}")
        self.in_channels = int(in_channels)


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class TinyBackbone(Backbone):
    """Four conv-BN-ReLU blocks with 2×2 max-pools between them: stride 8, `widths[-1]` channels."""

    first_conv_key = "block1.0.weight"
    default_head_width = 128
    default_head_depth = 1

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__(in_channels)
        if len(widths) != 4:
            raise ValueError(f"tiny needs 4 block widths, got {widths!r}")
        chans = (self.in_channels, *widths)
        for i in range(4):
            self.add_module(f"block{i + 1}", _conv_bn_relu(chans[i], chans[i + 1]))
        self.pool = nn.MaxPool2d(2)
        self.out_channels = widths[-1]
        self.stride = 8

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.block1(x))
        x = self.pool(self.block2(x))
        x = self.pool(self.block3(x))
        return self.block4(x)


# torchvision vgg16 "D" config; ACoL drops pool4 (index 23) and pool5 (index 30).
_VGG16_CFG: tuple[int | str, ...] = (
    *(64, 64, "M", 128, 128, "M", 256, 256, 256, "M"),
    *(512, 512, 512, "M", 512, 512, 512, "M"),
)
_VGG16_DROPPED = {23, 30}


class Vgg16Backbone(Backbone):
    """VGG16 conv layers without pool4/pool5: stride 8, 512 channels (28×28 maps at 224 input).

    Layers keep torchvision's indices (`features.0` .. `features.30`; pool4 at 23 and pool5 at 30 are
    `nn.Identity`) so torchvision vgg16 checkpoints map key for key.
    """

    first_conv_key = "features.0.weight"
    ignored_prefixes = ("classifier.",)

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__(in_channels)
        layers: list[nn.Module] = []
        channels = self.in_channels
        for item in _VGG16_CFG:
            if item == "M":
                # Identity rather than nothing, so `features[i]` indexes like torchvision too.
                layers.append(nn.Identity() if len(layers) in _VGG16_DROPPED else nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU(inplace=True)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.out_channels = 512
        self.stride = 8
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3×3 conv), same attribute names."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50Backbone(Backbone):
    """ResNet-50 with layer4 at stride 1 (wsolevaluation's): stride 16, 2048 channels.

    Module names follow torchvision (`conv1`, `bn1`, `layer1`..`layer4`) so its checkpoints map; the
    stride change does not alter any weight shape.
    """

    first_conv_key = "conv1.weight"
    ignored_prefixes = ("fc.",)

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__(in_channels)
        self.conv1 = nn.Conv2d(self.in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 64, 3, stride=1)
        self.layer2 = self._make_layer(256, 128, 4, stride=2)
        self.layer3 = self._make_layer(512, 256, 6, stride=2)
        self.layer4 = self._make_layer(1024, 512, 3, stride=1)
        self.out_channels = 2048
        self.stride = 16
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_layer(in_channels: int, width: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [Bottleneck(in_channels, width, stride)]
        layers += [Bottleneck(width * Bottleneck.expansion, width) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
