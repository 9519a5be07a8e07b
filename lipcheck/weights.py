"""Per-tensor certified norms, for files that hold weights but no architecture (a bare state_dict).

Without the graph there is no network bound; each weight still has a certified operator norm that
holds whatever the layer's stride, padding, dilation or input size: 2-D tensors as matrices,
3-D to 5-D tensors as convolutions (the size-independent bound of the stride-1 convolution, which
dominates every strided, padded or dilated use of the kernel, and its adjoint, the transposed conv).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from lipcheck.ops.conv import Conv
from lipcheck.ops.linear import MatMul
from lipcheck.report import LayerResult
from lipcheck.spectral import ConvGeometry, conv_operator_norm, dense_sigma_max


def layer_name(key: str) -> str:
    """'layer1.0.conv1.weight' -> 'layer1.0.conv1' (the module's qualified name)."""
    return key[: -len(".weight")] if key.endswith(".weight") else key


def weight_norms(tensors: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> list[LayerResult]:
    """One certified row per floating-point weight of rank 2 to 5, in the file's order."""
    rows: list[LayerResult] = []
    for key, tensor in tensors.items():
        if not tensor.is_floating_point() or not 2 <= tensor.dim() <= 5 or tensor.numel() == 0:
            continue
        weight = tensor.detach().to(device=device, dtype=torch.float64)
        if weight.dim() == 2:
            found = dense_sigma_max(weight)
            op, method = MatMul.name, found.method
        else:
            d = weight.dim() - 2
            geometry = ConvGeometry(stride=(1,) * d, dilation=(1,) * d, pads=(0,) * (2 * d), groups=1, input_size=None)
            found = conv_operator_norm(weight, geometry)
            op, method = Conv.name, f"any stride/padding/size: {found.method.removeprefix('size-independent: ')}"
        rows.append(
            LayerResult(
                name=layer_name(key),
                op=op,
                input_shape=None,
                output_shape=None,
                lipschitz=float(found.value),
                method=method,
                certified=True,
                exact=bool(found.exact) and weight.dim() == 2,
                running=math.nan,
            )
        )
    return rows
