"""The sorting activations and l2-norm pooling of 1-Lipschitz libraries, written as the libraries write
their ``forward`` (deel-torchlip 1.0.5's ``functional.py`` and ``modules/``, orthogonium 0.0.4's
``layers/custom_activations.py``), so that their exports are the ones users' files hold."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def torchlip_group_sort(input: torch.Tensor, group_size: int | None = None, dim: int = 1) -> torch.Tensor:
    """deel.torchlip.functional.group_sort."""
    if group_size is None or group_size > input.shape[dim]:
        group_size = input.shape[dim]
    if input.shape[dim] % group_size != 0:
        raise ValueError("The input size must be a multiple of the group size.")
    new_shape = input.shape[:dim] + (input.shape[dim] // group_size, group_size) + input.shape[dim + 1 :]
    if group_size == 2:
        resh_input = input.view(new_shape)
        a, b = (
            torch.min(resh_input, dim + 1, keepdim=True)[0],
            torch.max(resh_input, dim + 1, keepdim=True)[0],
        )
        return torch.cat([a, b], dim=dim + 1).view(input.shape)
    fv = input.reshape(new_shape)
    return torch.sort(fv, dim=dim + 1)[0].reshape(input.shape)


class TorchlipGroupSort(nn.Module):
    """deel.torchlip.GroupSort(group_size) (GroupSort2: 2, FullSort: None), k_coef_lip = 1."""

    def __init__(self, group_size: int | None = 2, k_coef_lip: float = 1.0) -> None:
        super().__init__()
        self.group_size, self._coefficient_lip = group_size, k_coef_lip

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torchlip_group_sort(input, self.group_size) * self._coefficient_lip


class TorchlipMaxMin(nn.Module):
    """deel.torchlip.MaxMin: cat(relu(x), relu(-x)) along the channels."""

    def __init__(self, dim: int | None = None, k_coef_lip: float = 1.0) -> None:
        super().__init__()
        self._dim, self._coefficient_lip = dim, k_coef_lip

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        dim = self._dim if self._dim is not None else (0 if len(input.shape) == 1 else 1)
        return torch.cat((F.relu(input), F.relu(-input)), dim=dim) * self._coefficient_lip


class OrthogoniumMaxMin(nn.Module):
    """orthogonium.layers.MaxMin: the max and the min of the two halves of an axis."""

    def __init__(self, axis: int = 1) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        a, b = z.split(z.shape[self.axis] // 2, self.axis)
        c, d = torch.max(a, b), torch.min(a, b)
        return torch.cat([c, d], dim=self.axis)


class ScaledL2NormPool2d(nn.LPPool2d):
    """deel.torchlip.ScaledL2NormPool2d: LPPool2d(2, kernel, stride) times k_coef_lip."""

    def __init__(self, kernel_size: int, stride: int | None = None, k_coef_lip: float = 1.0) -> None:
        super().__init__(2, kernel_size=kernel_size, stride=stride)
        self._coefficient_lip = k_coef_lip

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return nn.LPPool2d.forward(self, input) * self._coefficient_lip


class ScaledAdaptativeL2NormPool2d(nn.Module):
    """deel.torchlip.ScaledAdaptativeL2NormPool2d: the l2 norm of each channel, times k_coef_lip."""

    def __init__(self, k_coef_lip: float = 1.0) -> None:
        super().__init__()
        self._coefficient_lip = k_coef_lip

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.lp_pool2d(input, 2, input.shape[-2:]) * self._coefficient_lip


class Roll(nn.Module):
    """torch.roll: exporters write it as Slices concatenated back."""

    def __init__(self, shifts: int | tuple[int, ...], dims: int | tuple[int, ...]) -> None:
        super().__init__()
        self.shifts, self.dims = shifts, dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, self.shifts, self.dims)


ACTIVATIONS = {
    "GroupSort2": lambda: TorchlipGroupSort(2),
    "GroupSort4": lambda: TorchlipGroupSort(4),
    "FullSort": lambda: TorchlipGroupSort(None),
    "MaxMin": TorchlipMaxMin,
    "OrthogoniumMaxMin": OrthogoniumMaxMin,
    "L2NormPool": lambda: ScaledL2NormPool2d(2),
}


class Orthogonal(nn.Module):
    """An orthogonal linear map on the last axis (norm 1), then one of ``ACTIVATIONS``: weights for the
    state_dict + --model path, which needs some."""

    def __init__(self, activation: str = "GroupSort2", width: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        generator = torch.Generator().manual_seed(width)
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))
            self.fc.weight.copy_(q)
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))
