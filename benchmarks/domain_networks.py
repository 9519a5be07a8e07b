"""Networks that are Lipschitz only on a bounded input domain: gating, attention, division and exp.

Each is a small PyTorch network written the way torchvision / timm write the block (no timm or torchvision
import), with random weights from a fixed seed, in eval mode:

- ``efficientnet``: EfficientNet-B0-style CNN of MBConv blocks (1x1 expand, depthwise conv, squeeze-and-excitation
  with SiLU and a sigmoid gate, 1x1 project, residual where the shapes allow), SiLU throughout;
- ``mobilenetv3``: MobileNetV3-style inverted residuals with hardswish / ReLU and a hardsigmoid SE gate;
- ``regnety``: RegNetY-style bottleneck blocks (1x1, grouped 3x3, SE with a sigmoid gate, 1x1) with residual
  shortcuts and BatchNorm whose running statistics and affine parameters are randomised, so the residual
  branches are not at their init scale;
- ``swiglu``: transformer feed-forward blocks ``x + W3(silu(W1 LN(x)) * W2 LN(x))`` on a 1x64 vector;
- ``vit``: a small ViT (4x4 patch-embedding conv, class token, position embedding, pre-norm blocks of multi-head
  self-attention ``softmax(Q K^T / sqrt(d)) V`` and a GELU MLP, final LayerNorm, linear head on the class token);
- ``divexp``: a CNN with a softsign normalisation ``x / (1 + |x|)``, an exp gate ``x * exp(-relu(conv(x)))`` and
  an RMS normalisation over channels ``x / sqrt(mean(x^2) + eps)``.

Inputs are 1x3x32x32 images (1x64 for ``swiglu``). ``export(name, folder)`` writes ``folder/NAME.onnx`` with
the TorchScript exporter (``dynamo=False``), opset 17. ``benchmarks/domains.py`` runs lipcheck on them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SEED = 0
NUM_CLASSES = 10


def _divisible(v: float, divisor: int = 8) -> int:
    """torchvision's _make_divisible: round to a multiple of divisor, not below 90% of v."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNAct(nn.Sequential):
    """torchvision's Conv2dNormActivation: conv (no bias), BatchNorm, optional activation."""

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: Callable[[], nn.Module] | None = nn.SiLU,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: x * gate(fc2(act(fc1(avgpool(x)))))."""

    def __init__(
        self,
        channels: int,
        squeeze: int,
        act: Callable[[], nn.Module] = nn.ReLU,
        gate: Callable[[], nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.act = act()
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.fc2(self.act(self.fc1(self.avgpool(x)))))
        return x * scale


# ---------------------------------------------------------------------------------------------- (a) EfficientNet


class MBConv(nn.Module):
    """torchvision's EfficientNet MBConv: expand 1x1, depthwise kxk, SE (SiLU, sigmoid), project 1x1 (no act)."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int) -> None:
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        hidden = _divisible(cin * expand)
        layers: list[nn.Module] = []
        if hidden != cin:
            layers.append(ConvBNAct(cin, hidden, 1, act=nn.SiLU))
        layers += [
            ConvBNAct(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU),
            SqueezeExcitation(hidden, max(1, cin // 4), act=nn.SiLU, gate=nn.Sigmoid),
            ConvBNAct(hidden, cout, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res else out


class EfficientNetSmall(nn.Module):
    # (expand, kernel, stride, in, out, repeats), a narrow EfficientNet-B0 table
    SETTING = [(1, 3, 1, 16, 8, 1), (6, 3, 2, 8, 16, 2), (6, 5, 2, 16, 24, 2), (6, 3, 1, 24, 32, 1)]

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNAct(3, 16, 3, 2, act=nn.SiLU)]
        for expand, k, stride, cin, cout, repeats in self.SETTING:
            for i in range(repeats):
                layers.append(MBConv(cin if i == 0 else cout, cout, expand, k, stride if i == 0 else 1))
        layers.append(ConvBNAct(32, 64, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ---------------------------------------------------------------------------------------------- (b) MobileNetV3


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV3 InvertedResidual: expand, depthwise, SE (ReLU, hardsigmoid), project."""

    def __init__(self, cin: int, k: int, hidden: int, cout: int, use_se: bool, hswish: bool, stride: int) -> None:
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        act = nn.Hardswish if hswish else nn.ReLU
        layers: list[nn.Module] = []
        if hidden != cin:
            layers.append(ConvBNAct(cin, hidden, 1, act=act))
        layers.append(ConvBNAct(hidden, hidden, k, stride, groups=hidden, act=act))
        if use_se:
            layers.append(SqueezeExcitation(hidden, _divisible(hidden // 4), act=nn.ReLU, gate=nn.Hardsigmoid))
        layers.append(ConvBNAct(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res else out


class MobileNetV3Small(nn.Module):
    # (in, kernel, expanded, out, SE, hardswish, stride), the first rows of MobileNetV3-Small
    SETTING = [
        (16, 3, 16, 16, True, False, 2),
        (16, 3, 72, 24, False, False, 2),
        (24, 3, 88, 24, False, False, 1),
        (24, 5, 96, 40, True, True, 2),
        (40, 5, 120, 40, True, True, 1),
    ]

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNAct(3, 16, 3, 2, act=nn.Hardswish)]
        layers += [InvertedResidual(*row) for row in self.SETTING]
        layers.append(ConvBNAct(40, 240, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(240, 128), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ---------------------------------------------------------------------------------------------- (c) RegNetY


class ResBottleneckYBlock(nn.Module):
    """torchvision's RegNet ResBottleneckBlock with SE (RegNetY): 1x1, grouped 3x3, SE, 1x1 (no act), shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int = 8, se_ratio: float = 0.25) -> None:
        super().__init__()
        groups = cout // group_width
        self.proj = ConvBNAct(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None
        self.f = nn.Sequential(
            ConvBNAct(cin, cout, 1, act=nn.ReLU),
            ConvBNAct(cout, cout, 3, stride, groups=groups, act=nn.ReLU),
            SqueezeExcitation(cout, max(1, int(round(se_ratio * cin))), act=nn.ReLU, gate=nn.Sigmoid),
            ConvBNAct(cout, cout, 1, act=None),
        )
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(shortcut + self.f(x))


class RegNetYSmall(nn.Module):
    DEPTHS = (1, 2, 2)
    WIDTHS = (24, 48, 96)

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        blocks: list[nn.Module] = [ConvBNAct(3, 16, 3, 2, act=nn.ReLU)]
        cin = 16
        for depth, width in zip(self.DEPTHS, self.WIDTHS, strict=True):
            for i in range(depth):
                blocks.append(ResBottleneckYBlock(cin, width, 2 if i == 0 else 1))
                cin = width
        self.trunk = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.trunk(x)), 1))


# ---------------------------------------------------------------------------------------------- (d) SwiGLU


class SwiGLU(nn.Module):
    """timm's SwiGLU / LLaMA feed-forward: fc2(silu(w1 x) * w2 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.w1(x)) * self.w2(x))


class SwiGLUBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class SwiGLUNet(nn.Module):
    def __init__(self, dim: int = 64, hidden: int = 128, depth: int = 2, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.blocks = nn.Sequential(*[SwiGLUBlock(dim, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x))))


# ---------------------------------------------------------------------------------------------- (e) ViT


class Attention(nn.Module):
    """timm's Attention (the non-fused path): qkv linear, softmax(q k^T * scale) v, output projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTSmall(nn.Module):
    def __init__(
        self, img: int = 32, patch: int = 8, dim: int = 48, depth: int = 2, heads: int = 3, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        num_patches = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # B, N, C
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# ---------------------------------------------------------------------------------------------- (f) division, exp


class Softsign(nn.Module):
    """x / (1 + |x|), written out (exports as Abs, Add, Div)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / (1 + x.abs())


class ExpGate(nn.Module):
    """x * exp(-relu(conv(x))): a gate in (0, 1] computed with Exp."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.exp(-F.relu(self.conv(x)))


class ChannelRMSNorm(nn.Module):
    """x / sqrt(mean_c(x^2) + eps) * gamma: a division by a data-dependent norm."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps) * self.weight


class DivExpNet(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 16, 3, 2, act=Softsign)
        self.gate = ExpGate(16)
        self.conv = ConvBNAct(16, 32, 3, 2, act=None)
        self.norm = ChannelRMSNorm(32)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(self.gate(self.stem(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------------------------------------- build, export


def torchvision_init(model: nn.Module) -> None:
    """torchvision's init for these CNNs: convs kaiming-normal (fan-out), conv biases zero; linears uniform
    +-1/sqrt(out_features), zero bias (EfficientNet's; torchvision's MobileNetV3 and RegNet use normal(0, 0.01),
    which leaves the head near zero). PyTorch's default conv init shrinks the signal layer by layer."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                r = 1.0 / m.out_features**0.5
                nn.init.uniform_(m.weight, -r, r)
                nn.init.zeros_(m.bias)


def randomise_batchnorm(model: nn.Module, shape: tuple[int, ...], batches: int = 4, batch: int = 32) -> None:
    """BatchNorm as after training, but random: affine scale in [0.5, 1.5] and shift in [-0.1, 0.1]; running
    statistics calibrated on uniform [0, 1] inputs (train-mode passes, cumulative average), then perturbed
    (mean moved by up to 0.2 standard deviations, variance scaled by [0.7, 1.3]). Untrained BatchNorm is the
    identity up to eps, which with these inits lets the signal vanish through the gated blocks (EfficientNet's
    Jacobian norm ~1e-6) and leaves residual branches at their init scale; calibrated statistics keep every
    branch at unit scale, so the residual branches and the gates matter."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        return
    with torch.no_grad():
        for m in norms:
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.1, 0.1)
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the calibration passes
        model.train()
        for _ in range(batches):
            model(torch.rand(batch, *shape[1:]))
        model.eval()
        for m in norms:
            m.momentum = 0.1
            std = m.running_var.sqrt()
            m.running_mean.add_(0.2 * std * (2 * torch.rand_like(std) - 1))
            m.running_var.mul_(0.7 + 0.6 * torch.rand_like(std))


FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "efficientnet": EfficientNetSmall,
    "mobilenetv3": MobileNetV3Small,
    "regnety": RegNetYSmall,
    "swiglu": SwiGLUNet,
    "vit": ViTSmall,
    "divexp": DivExpNet,
}
NAMES = list(FACTORIES)
# these get torchvision's init; the others PyTorch's default init
TORCHVISION_INIT = {"efficientnet", "mobilenetv3", "regnety"}


def input_shape(name: str) -> tuple[int, ...]:
    return (1, 64) if name == "swiglu" else (1, 3, 32, 32)


def build(name: str, seed: int = SEED) -> nn.Module:
    """The network ``name`` with weights from ``torch.manual_seed(seed)`` (torchvision's init for the CNNs,
    BatchNorm randomised and calibrated), in eval mode."""
    torch.manual_seed(seed)
    model = FACTORIES[name]()
    if name in TORCHVISION_INIT:
        torchvision_init(model)
    randomise_batchnorm(model, input_shape(name))
    return model.eval()


def export(name: str, folder: Path | str, seed: int = SEED) -> Path:
    """Write ``folder/NAME.onnx`` (TorchScript exporter, opset 17, static input shape); return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.onnx"
    partial = folder / f"{name}.partial.onnx"
    model = build(name, seed)
    x = torch.rand(*input_shape(name), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.onnx.export(
            model,
            (x,),
            str(partial),
            input_names=["input"],
            output_names=["logits"],
            opset_version=17,
            dynamo=False,
        )
    partial.replace(path)
    return path


def param_count(name: str) -> int:
    return sum(p.numel() for p in build(name).parameters())


if __name__ == "__main__":
    for n in NAMES:
        m = build(n)
        with torch.no_grad():
            y = m(torch.rand(*input_shape(n)))
        print(f"{n:14s} params {param_count(n):7d}  out {tuple(y.shape)}  |y| {float(y.norm()):.3g}")
