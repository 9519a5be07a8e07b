"""Network definitions for the benchmarks, in plain torch (no torchvision, no download).

* ``resnet18`` / ``resnet50``: torchvision-style ResNet v1.5 (BasicBlock [2, 2, 2, 2] or Bottleneck
  [3, 4, 6, 3] with expansion 4; stride on the 3x3 conv; 1x1 downsample convs carrying the stride);
  the constructor and its initialisation follow torchvision's (kaiming-normal fan-out convs, unit
  BatchNorm), so ``torch.manual_seed`` fixes the weights.
* ``regnet``: a RegNetX-200MF-like network (stem 32, widths 24/56/152/368, depths 1/1/4/7, group
  width 8, bottleneck ratio 1): grouped 3x3 convs, the shape of a "deep and narrow" net.

``randomise_batchnorm`` gives BatchNorm non-trivial running statistics and affine parameters (eval
mode), so folding does something and residual branches carry weight; ``export`` writes an ONNX file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def _conv(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv(inplanes, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet: 7x7/2 stem, 3x3/2 max pool, four stages, global average pool, Linear."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], depths: list[int], num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.inplanes = 64
        self.layer1 = self._stage(block, 64, depths[0])
        self.layer2 = self._stage(block, 128, depths[1], stride=2)
        self.layer3 = self._stage(block, 256, depths[2], stride=2)
        self.layer4 = self._stage(block, 512, depths[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


class XBlock(nn.Module):
    """RegNetX's block: 1x1, grouped 3x3 (stride here), 1x1, each with BatchNorm; ReLU after the sum."""

    def __init__(self, c_in: int, c_out: int, stride: int, group_width: int):
        super().__init__()
        self.a = nn.Sequential(_conv(c_in, c_out, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))
        groups = c_out // group_width
        self.b = nn.Sequential(_conv(c_out, c_out, 3, stride, groups), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))
        self.c = nn.Sequential(_conv(c_out, c_out, 1), nn.BatchNorm2d(c_out))
        self.proj = None
        if stride != 1 or c_in != c_out:
            self.proj = nn.Sequential(_conv(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.proj is None else self.proj(x)
        return self.relu(self.c(self.b(self.a(x))) + identity)


class RegNet(nn.Module):
    """RegNetX-200MF-like: stem 3x3/2 to 32 channels, four stages (first block strided), pool, Linear."""

    def __init__(
        self,
        widths: tuple[int, ...] = (24, 56, 152, 368),
        depths: tuple[int, ...] = (1, 1, 4, 7),
        group_width: int = 8,
        num_classes: int = 1000,
    ):
        super().__init__()
        self.stem = nn.Sequential(_conv(3, 32, 3, 2), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        c_in = 32
        for width, depth in zip(widths, depths, strict=True):
            for i in range(depth):
                blocks.append(XBlock(c_in, width, 2 if i == 0 else 1, group_width))
                c_in = width
        self.trunk = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(c_in, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(self.stem(x)))


def regnet() -> RegNet:
    return RegNet()


def randomise_batchnorm(model: nn.Module) -> None:
    """Moderately random BatchNorm statistics and affine parameters (eval mode): mean in [-0.1, 0.1],
    variance and scale in [0.5, 1.5], shift in [-0.1, 0.1]. Untrained BatchNorm is the identity up to
    eps, which leaves residual branches at their init scale and folding with nothing to do."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)


FACTORIES: dict[str, Callable[[], nn.Module]] = {"resnet18": resnet18, "resnet50": resnet50, "regnet": regnet}


def build(name: str, seed: int = 0, random_bn: bool = True) -> nn.Module:
    """The network ``name`` with weights from ``torch.manual_seed(seed)``, in eval mode."""
    torch.manual_seed(seed)
    model = FACTORIES[name]().eval()
    if random_bn:
        randomise_batchnorm(model)
    return model


def export(model: nn.Module, size: int, path: Path) -> Path:
    """ONNX (opset 17, the TorchScript exporter) at input 1x3xSIZExSIZE; written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.onnx")
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, size, size),),
        str(partial),
        input_names=["input"],
        output_names=["logits"],
        opset_version=17,
        dynamo=False,
    )
    partial.replace(path)
    return path
