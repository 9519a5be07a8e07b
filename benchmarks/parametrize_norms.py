"""Per-layer certified norms after training with spectral normalization: lipcheck's parametrize vs torch's.

    PYTHONPATH=. python benchmarks/parametrize_norms.py [--steps 20] [--lr 1e-3] [--iterations 1] [--exact-sigma]

Trains tests/test_parametrize.py's SmallCNN (Adam, random regression data) three ways and prints
lipcheck's certified norm of every conv and the Linear of the saved model:
- parametrize(), baked with the exact sigma (what remove_parametrizations() does by default);
- parametrize(), baked with the running power-iteration estimate (what the model computed in training;
  with --exact-sigma, trained with sigma computed exactly at every forward instead);
- torch.nn.utils.parametrizations.spectral_norm (reshaped kernels), baked likewise.
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.utils import parametrize as torch_parametrize
from torch.nn.utils.parametrizations import spectral_norm

from lipcheck.rewrite.parametrize import parametrize, remove_parametrizations
from tests.test_parametrize import IMAGE, SmallCNN, certified_norms, train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--iterations", type=int, default=1, help="power-iteration steps per forward")
    parser.add_argument("--exact-sigma", action="store_true", help="parametrize(exact_sigma=True)")
    args = parser.parse_args()

    rows = {}
    for exact in (True, False):
        model = parametrize(
            SmallCNN(), torch.randn(IMAGE), n_power_iterations=args.iterations, exact_sigma=args.exact_sigma
        )
        train(model, args.steps, args.lr)
        rows[f"lipcheck parametrize, exact={exact}"] = certified_norms(remove_parametrizations(model, exact=exact))
    reference = SmallCNN()
    layers = (reference.conv1, reference.conv2, reference.conv3, reference.fc)
    for layer in layers:
        spectral_norm(layer, n_power_iterations=args.iterations)
    train(reference, args.steps, args.lr)
    for layer in layers:
        torch_parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    rows["torch spectral_norm"] = certified_norms(reference)

    names = list(next(iter(rows.values())))
    print(f"{'certified norm after training':<36}" + "".join(f"{name:>9}" for name in names))
    for label, norms in rows.items():
        print(f"{label:<36}" + "".join(f"{norms[name]:>9.4f}" for name in names))


if __name__ == "__main__":
    main()
