"""Small PyTorch networks for the PyTorch frontend's tests (importable, for --model)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ParityNet(nn.Module):
    """Conv/BN/ReLU, a residual add, max and average pooling, a concat, LeakyReLU, Hardtanh, Linear:
    every activation is a single ONNX op, so ONNX and PyTorch give the very same bound."""

    def __init__(self, width: int = 6, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(2)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.side = nn.Conv2d(width, 2, 1)
        self.act = nn.LeakyReLU(0.1)
        self.avg = nn.AvgPool2d(2)
        self.fc = nn.Linear((2 * width + 2) * 2 * 2, classes)
        torch.manual_seed(7)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.normal_(0, 0.3)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.normal_(1, 0.3)
                bn.bias.normal_(0, 0.2)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = y + self.bn2(self.conv2(y))
        y = self.pool(y)
        y = torch.cat([self.down(y), self.side(self.pool(y))], dim=1)
        y = F.hardtanh(self.act(y))
        y = self.avg(y)
        return self.fc(torch.flatten(y, 1))


class FunctionalForms(nn.Module):
    """The same layers written as functional calls, tensor methods and operators."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.w2 = nn.Parameter(torch.randn(4, 8 * 4 * 4) * 0.1)
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.w1, padding=1)
        y = torch.relu(y) + F.relu(-y).mul(0.5)
        y = F.avg_pool2d(y, 2).sigmoid()
        y = y.view(y.shape[0], -1)
        y = torch.add(F.linear(y, self.w2), 1.0)
        z = torch.cat([y.tanh(), torch.sigmoid(y)], dim=1)
        z = z.reshape(-1, 2, 4).permute(0, 2, 1).flatten(1)
        return self.lin(z[:, :4]) - z[:, 4:].clamp(-1, 1)


class WithCummax(nn.Module):
    """torch.cummax has no lipcheck mapping."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(self.fc(x), dim=-1).values


def make_parity_net(width: int = 6, classes: int = 5) -> ParityNet:
    return ParityNet(width, classes)


def broken_factory() -> nn.Module:
    raise RuntimeError("the factory failed on purpose")


def not_a_module() -> int:
    return 42


class SmallCNN(nn.Module):
    """A conv, a transposed conv and a linear layer: the architecture of the spectral_norm state_dicts below."""

    def __init__(self, padding_mode: str = "zeros") -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)  # square channels: spectral_norm's dim 1 must be known
        self.fc = nn.Linear(4 * 16 * 16, 5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        y = F.max_pool2d(F.relu(self.up(y)), 2)
        return self.fc(y.flatten(1))


def spectral_normed_cnn() -> SmallCNN:
    """SmallCNN with torch's spectral_norm on every layer, a few training steps so that u and v are not fresh."""
    from torch.nn.utils.parametrizations import spectral_norm

    model = SmallCNN()
    for layer in (model.conv, model.up, model.fc):
        spectral_norm(layer)
    model.train()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 3, 16, 16, generator=generator))
    return model.eval()


def weight_normed_cnn() -> SmallCNN:
    from torch.nn.utils.parametrizations import weight_norm

    model = SmallCNN()
    for layer in (model.conv, model.up, model.fc):
        weight_norm(layer)
    with torch.no_grad():
        model.conv.parametrizations.weight.original0.mul_(1.7)  # g no longer the weight's own norm
    return model.eval()


def circular_cnn() -> SmallCNN:
    return SmallCNN("circular")


def reflect_cnn() -> SmallCNN:
    return SmallCNN("reflect")


class PowerIteration(nn.Module):
    """A stateful forward (as orthogonium's power iteration): it writes into its buffer ``u`` at every call."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.fc = nn.Linear(4, 4)
        self.register_buffer("u", torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc.weight
        v = F.normalize(w.t() @ self.u, dim=0).detach()
        u = F.normalize(w @ v, dim=0).detach()
        self.u.copy_(u)
        return F.linear(x, w / torch.dot(u, w @ v), self.fc.bias)


class PowerIterationAssigned(PowerIteration):
    """The same, assigning a new buffer (``self.u = ...``) instead of writing into it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc.weight
        v = F.normalize(w.t() @ self.u, dim=0).detach()
        self.u = F.normalize(w @ v, dim=0).detach()
        return F.linear(x, w / torch.dot(self.u, w @ v), self.fc.bias)


class GroupSortNet(nn.Module):
    """Sorting pairs (GroupSort, as 1-Lipschitz networks do), by torch.sort."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(x).view(-1, 4, 2).sort(dim=-1)[0].view(-1, 8)
        y = torch.relu(self.fc2(y)) + y
        return self.fc3(torch.tanh(y) * 2)


class CummaxNet(GroupSortNet):
    """A running max: one op without a mapping, used by several after it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(x).view(-1, 4, 2).cummax(dim=-1)[0].view(-1, 8)
        y = torch.relu(self.fc2(y)) + y
        return self.fc3(torch.tanh(y) * 2)
