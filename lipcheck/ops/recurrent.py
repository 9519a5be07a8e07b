"""Recurrent layers: RNN, GRU, LSTM, unrolled over a known sequence length with constant weights.

Each rule bounds one step's sensitivities as a nonnegative matrix M_t: (||dx_t||, ||dh_{t-1}||,
||dc_{t-1}||) -> (||dh_t||, ||dc_t||) (norm bounds, at every state the recurrence can reach). Chaining
them gives, for each output step t and input step s, a bound N[t, s] >= ||d y_t / d x_s||; the operator
norm of a block matrix is at most the spectral norm of the matrix of its block norms, so ||N|| bounds
X -> Y, and the largest row norm of N bounds X -> Y_h (whichever step ``sequence_lens`` stops at).
Directions are concatenated outputs of the same input: sqrt(L_forward^2 + L_reverse^2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lipcheck.ops.base import EvalContext, LocalBound, Op, RuleContext, UnsupportedVariant, register, unbounded
from lipcheck.spectral import dense_sigma_max


@dataclass(frozen=True)
class _Activation:
    function: Callable[[torch.Tensor], torch.Tensor]
    slope: float  # sup |f'|
    low: float  # the range of f
    high: float
    at_zero: float = 0.0  # f(0), for sup |f(v)| over |v| <= r when the range is unbounded


# the activations without parameters (those with alpha/beta are refused: see ``_check``)
_ACTIVATIONS = {
    "relu": _Activation(torch.relu, 1.0, 0.0, math.inf),
    "tanh": _Activation(torch.tanh, 1.0, -1.0, 1.0),
    "sigmoid": _Activation(torch.sigmoid, 0.25, 0.0, 1.0),
    "softsign": _Activation(F.softsign, 1.0, -1.0, 1.0),
    "softplus": _Activation(F.softplus, 1.0, 0.0, math.inf, math.log(2.0)),
}
MARGIN = 1 + 1e-6  # float32 evaluation and the float64 sums of the bound
DENSE_STEPS = 2048  # longer sequences: the Schur bound on the matrix of block norms
BILINEAR = "the input multiplies the weights W/R (bilinear: not globally Lipschitz)"


def _magnitude(act: _Activation, radius: float = math.inf) -> float:
    """sup |f(v)| over |v| <= radius."""
    bound = max(abs(act.low), abs(act.high))
    return min(bound, abs(act.at_zero) + act.slope * radius)


class _Recurrent(Op):
    """Shared by RNN, GRU, LSTM: attributes, layouts, directions, sequence lengths."""

    gates = 1
    defaults: tuple[str, ...] = ("Tanh",)
    attributes = {"direction": "forward", "layout": 0, "clip": None, "activations": None, "linear_before_reset": 0}

    # -- attributes
    def directions(self, attrs: object) -> int:
        return 2 if _text(attrs, "direction") == "bidirectional" else 1

    def activations(self, ctx: EvalContext | RuleContext) -> list[list[_Activation]]:
        """Per direction, the activation functions (f, g, h as the op has them)."""
        self.check(ctx.node)
        names = ctx.attrs["activations"]
        count = self.directions(ctx.attrs)
        listed = [_decode(n) for n in names] if names else list(self.defaults) * count
        k = len(self.defaults)
        # the schema's default lists two directions' worth: a forward node reads the first k
        chosen = [listed[d * k : (d + 1) * k] if len(listed) >= (d + 1) * k else listed[:k] for d in range(count)]
        return [[_ACTIVATIONS[n.lower()] for n in names_d] for names_d in chosen]

    def check(self, node: object) -> None:
        attrs = getattr(node, "attrs", {})
        for key in ("activation_alpha", "activation_beta"):
            if attrs.get(key):
                raise UnsupportedVariant(f"{type(self).__name__}({key})")
        if int(attrs.get("input_forget") or 0):
            raise UnsupportedVariant(f"{type(self).__name__}(input_forget)")
        names = attrs.get("activations") or []
        for name in names:
            if _decode(name).lower() not in _ACTIVATIONS:
                raise UnsupportedVariant(f"{type(self).__name__}(activation={_decode(name)})")
        direction = _text(attrs, "direction") or "forward"
        if direction not in ("forward", "reverse", "bidirectional"):
            raise UnsupportedVariant(f"{type(self).__name__}(direction={direction})")
        if names and len(names) < len(self.defaults):
            raise UnsupportedVariant(f"{type(self).__name__}({len(names)} activations)")

    # -- evaluation
    def evaluate(self, ctx: EvalContext, *inputs: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        x, w, r = (t for t in inputs[:3] if t is not None)
        layout = int(ctx.attrs["layout"])
        if layout:
            x = x.transpose(0, 1)
        x = x.to(ctx.dtype)
        b, lens, h0, c0, p = (list(inputs[3:]) + [None] * 5)[:5]
        hidden = r.shape[-1]
        ys, hs, cs = [], [], []
        for d, acts in enumerate(self.activations(ctx)):
            reverse = _text(ctx.attrs, "direction") == "reverse" or d == 1
            start_h = _initial(h0, d, layout, x, hidden)
            start_c = _initial(c0, d, layout, x, hidden)
            bias = None if b is None else b[d].to(x.dtype)
            peep = None if p is None else p[d].to(x.dtype)
            weights = (w[d].to(x.dtype), r[d].to(x.dtype), bias, peep)
            y, h, c = self.run(ctx, x, weights, (start_h, start_c), acts, (lens, reverse, None))
            ys.append(y)
            hs.append(h)
            cs.append(c)
        y_all, h_all, c_all = torch.stack(ys, 1), torch.stack(hs, 0), torch.stack(cs, 0)  # [T, D, B, H], [D, B, H]
        if layout:
            y_all, h_all, c_all = y_all.permute(2, 0, 1, 3), h_all.transpose(0, 1), c_all.transpose(0, 1)
        return (y_all, h_all, c_all)[: max(len(ctx.node.outputs), 1)]

    def run(
        self,
        ctx: EvalContext,
        x: torch.Tensor,
        weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
        state: tuple[torch.Tensor, torch.Tensor],
        acts: list[_Activation],
        how: tuple[torch.Tensor | None, bool, float | None],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One direction over the sequence: Y [T, B, H], the last h and c."""
        w, r, bias, peep = weights
        lens, reverse, _ = how
        size = r.shape[-1] * self.gates
        wb = bias[:size] if bias is not None else torch.zeros(size, dtype=x.dtype, device=x.device)
        rb = bias[size:] if bias is not None else torch.zeros(size, dtype=x.dtype, device=x.device)
        projected = x @ w.T + wb  # [T, B, G*H]
        h, c = state
        steps = x.shape[0]
        outputs: list[torch.Tensor] = [h] * steps
        for t in reversed(range(steps)) if reverse else range(steps):
            new_h, new_c = self.cell(projected[t], h, c, (r, rb, peep), acts, ctx)
            if lens is not None:
                live = (t < lens.to(x.device)).reshape(-1, 1)
                new_h, new_c = torch.where(live, new_h, h), torch.where(live, new_c, c)
                outputs[t] = torch.where(live, new_h, torch.zeros_like(new_h))
            else:
                outputs[t] = new_h
            h, c = new_h, new_c
        return torch.stack(outputs, 0), h, c

    def cell(
        self,
        xw: torch.Tensor,
        h: torch.Tensor,
        c: torch.Tensor,
        recurrence: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
        acts: list[_Activation],
        ctx: EvalContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # -- the rule
    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        weights_variable = ctx.is_variable(1) or ctx.is_variable(2)
        if ctx.is_variable(0) and weights_variable:
            return unbounded(BILINEAR)
        if weights_variable or any(ctx.is_variable(i) for i in (3, 7)):
            raise UnsupportedVariant(f"{ctx.node.op}(variable weights)")
        shape = ctx.shape(0)
        steps = None if shape is None or len(shape) != 3 else shape[int(ctx.attrs["layout"])]
        if steps is None:
            reason = f"{ctx.node.op}: not globally Lipschitz over unbounded sequence length (give --input-shape)"
            return unbounded(reason, "unknown length")
        found: list[tuple[float, float, float]] = []
        for d, acts in enumerate(self.activations(ctx)):
            bound = self.direction_bound(ctx, d, acts, int(steps))
            if isinstance(bound, LocalBound):
                return bound
            found.append(bound)
        per_output = [math.sqrt(sum(f[k] ** 2 for f in found)) * MARGIN for k in range(3)]
        used = [lip for k, lip in enumerate(per_output) if ctx.output_used(k)] or per_output
        value = max(used)
        together = math.sqrt(ctx.input_lipschitz[0] ** 2 + (ctx.input_lipschitz[5] ** 2 if ctx.is_variable(5) else 0))
        method = f"{ctx.node.op} unrolled over {steps} steps (block norms of the step Jacobians)"
        outputs = tuple(lip * together for lip in per_output[: len(ctx.node.outputs)])
        return LocalBound(value, method, output_lipschitz=value * together, outputs_lipschitz=outputs)

    def direction_bound(
        self, ctx: RuleContext, d: int, acts: list[_Activation], steps: int
    ) -> tuple[float, float, float] | LocalBound:
        """(Y, Y_h, Y_c) bounds of one direction, or a verdict."""
        recurrence = self.recurrence(ctx, d, acts)
        if isinstance(recurrence, LocalBound):
            return recurrence
        matrices = [recurrence(t) for t in range(steps)]
        if not all(np.isfinite(m).all() for m in matrices):
            return unbounded(f"{ctx.node.op}: gate products with an unbounded activation range")
        return _block_norms(matrices, ctx.is_variable(5))

    def recurrence(self, ctx: RuleContext, d: int, acts: list[_Activation]) -> Callable[[int], np.ndarray] | LocalBound:
        """t -> the step matrix M_t (2 x 3: rows h, c; columns x, h, c), or a verdict."""
        raise NotImplementedError


def _block_norms(matrices: list[np.ndarray], initial_h: bool) -> tuple[float, float, float]:
    """(||N_h||, largest row norm of N_h, of N_c) for N [T, sources]: sources are the T input steps, then
    h_0 when it is variable. N is kept for an exact spectral norm up to DENSE_STEPS steps; beyond, the
    rows stream into the Schur bound ||N|| <= sqrt(||N||_1 ||N||_inf)."""
    steps = len(matrices)
    sources = steps + int(initial_h)
    state = np.zeros((2, sources))
    if initial_h:
        state[0, steps] = 1.0
    dense = np.zeros((steps, sources)) if steps <= DENSE_STEPS else None
    columns, widest_row, row_h, row_c = np.zeros(sources), 0.0, 0.0, 0.0
    for t, m in enumerate(matrices):
        state = m[:, 1:] @ state
        state[:, t] = m[:, 0]
        row_h = max(row_h, float(np.sqrt((state[0] ** 2).sum())))
        row_c = max(row_c, float(np.sqrt((state[1] ** 2).sum())))
        if dense is not None:
            dense[t] = state[0]
        else:
            columns += state[0]
            widest_row = max(widest_row, float(state[0].sum()))
    if dense is not None:
        spectral = dense_sigma_max(torch.from_numpy(dense)).value if dense.size else 0.0
    else:
        spectral = math.sqrt(float(columns.max()) * widest_row) * MARGIN
    return spectral, row_h * MARGIN, row_c * MARGIN


def _text(attrs: object, key: str) -> str:
    value = attrs.get(key) if hasattr(attrs, "get") else None
    return _decode(value) if value is not None else ""


def _decode(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _initial(value: torch.Tensor | None, d: int, layout: int, x: torch.Tensor, hidden: int) -> torch.Tensor:
    if value is None:
        return torch.zeros(x.shape[1], hidden, dtype=x.dtype, device=x.device)
    return (value[:, d] if layout else value[d]).to(x.dtype)


def _clip(ctx: EvalContext) -> float | None:
    clip = ctx.attrs["clip"]
    return None if clip is None else float(clip)


def _grow(start: float, rate: float, add: float, t: int) -> float:
    """b_t for b_0 = start, b_k = rate b_{k-1} + add (a state's elementwise bound after t steps), rounded up."""
    if rate == 1.0:
        return (start + t * add) * MARGIN
    return (rate**t * start + add * (1 - rate**t) / (1 - rate)) * MARGIN


def _clipped(z: torch.Tensor, clip: float | None) -> torch.Tensor:
    return z if clip is None else z.clamp(-clip, clip)


class _Weights:
    """A direction's constant weights as the rule reads them: gate blocks and their spectral norms."""

    def __init__(self, ctx: RuleContext, d: int, gates: int):
        self.w, self.r = ctx.tensor(1)[d], ctx.tensor(2)[d]
        self.hidden = self.r.shape[-1]
        self.gates = gates
        bias = ctx.tensor(3)[d] if ctx.has_input(3) else torch.zeros(2 * gates * self.hidden, dtype=torch.float64)
        self.rb = bias[gates * self.hidden :]
        peep = ctx.tensor(7)[d] if ctx.has_input(7) else torch.zeros(3 * self.hidden, dtype=torch.float64)
        self.p = peep

    def block(self, matrix: torch.Tensor, k: int) -> torch.Tensor:
        return matrix[k * self.hidden : (k + 1) * self.hidden]

    def norm_w(self, k: int) -> float:
        return dense_sigma_max(self.block(self.w, k)).value

    def norm_r(self, k: int) -> float:
        return dense_sigma_max(self.block(self.r, k)).value


@register
class RNN(_Recurrent):
    """Simple RNN h_t = f(W x_t + R h_{t-1} + b) unrolled: norm of the Toeplitz matrix of s||W|| (s||R||)^(t-s).

    One step: ||dh_t|| <= s||W|| ||dx_t|| + s||R|| ||dh_{t-1}||, s = sup|f'| (clip only lowers it).
    """

    gates = 1
    defaults = ("Tanh",)

    def cell(self, xw, h, c, recurrence, acts, ctx):
        r, rb, _ = recurrence
        return acts[0].function(_clipped(xw + h @ r.T + rb, _clip(ctx))), c

    def recurrence(self, ctx: RuleContext, d: int, acts: list[_Activation]) -> Callable[[int], np.ndarray] | LocalBound:
        weights = _Weights(ctx, d, 1)
        s = acts[0].slope
        step = np.array([[s * weights.norm_w(0), s * weights.norm_r(0), 0.0], [0.0, 0.0, 0.0]])
        return lambda t: step


def _bounded_gates(ctx: RuleContext, acts: list[_Activation]) -> LocalBound | None:
    """GRU and LSTM multiply gate values with states and candidates: both need bounded ranges."""
    if not all(math.isfinite(_magnitude(a)) for a in acts[:2]):
        return unbounded(f"{ctx.node.op}: gate products with an activation of unbounded range")
    return None


@register
class GRU(_Recurrent):
    """GRU unrolled over a known length: step Jacobian norms from slopes and ranges, |h_t| <= max(|h_0|, 1).

    h_t = (1 - z) n + z h_{t-1}, so dh_t = dz (h_{t-1} - n) + (1 - z) dn + z dh_{t-1}, with |z| <= Z,
    |1 - z| <= U, |n| <= G (ranges of f and g), |h_{t-1}| <= H_{t-1} (a convex combination when z is in
    [0, 1]: H_t = max(H_{t-1}, G); else H_t = U G + Z H_{t-1}). With s_f, s_g the slopes:
    ||dz|| <= s_f (||W_z|| dx + ||R_z|| dh), ||dr|| the same, and the candidate's pre-activation moves by
    ||W_h|| dx + K ||dr|| + Z ||R_h|| dh, where K = ||R_h|| H_{t-1} (reset before the product:
    R_h (dr h)) or |R_h|_inf H_{t-1} + max|Rb_h| (linear_before_reset: dr (R_h h + Rb_h)). So
    ||dh_t|| <= (H_{t-1} + G) ||dz|| + U s_g (...) + Z ||dh_{t-1}||. A variable initial h is multiplied by
    the gate z: not globally Lipschitz.
    """

    gates = 3
    defaults = ("Sigmoid", "Tanh")

    def cell(self, xw, h, c, recurrence, acts, ctx):
        r, rb, _ = recurrence
        f, g, clip = acts[0].function, acts[1].function, _clip(ctx)
        size = r.shape[-1]
        hr = h @ r[: 2 * size].T + rb[: 2 * size]
        z = f(_clipped(xw[:, :size] + hr[:, :size], clip))
        reset = f(_clipped(xw[:, size : 2 * size] + hr[:, size:], clip))
        if int(ctx.attrs["linear_before_reset"]):
            pre = xw[:, 2 * size :] + reset * (h @ r[2 * size :].T + rb[2 * size :])
        else:
            pre = xw[:, 2 * size :] + (reset * h) @ r[2 * size :].T + rb[2 * size :]
        return (1 - z) * g(_clipped(pre, clip)) + z * h, c

    def recurrence(self, ctx: RuleContext, d: int, acts: list[_Activation]) -> Callable[[int], np.ndarray] | LocalBound:
        if ctx.is_variable(5):
            return unbounded("GRU: the update gate multiplies a variable initial_h (not globally Lipschitz)")
        verdict = _bounded_gates(ctx, acts)
        if verdict is not None:
            return verdict
        wt = _Weights(ctx, d, 3)
        f, g = acts
        z_max, g_max = _magnitude(f), _magnitude(g)
        u_max = max(abs(1 - f.low), abs(1 - f.high))
        start = float(ctx.tensor(5).abs().max()) if ctx.has_input(5) else 0.0
        convex = f.low >= 0 and f.high <= 1
        wz, wr, wh = (wt.norm_w(k) for k in range(3))
        rz, rr, rh = (wt.norm_r(k) for k in range(3))
        rh_rows = float(wt.block(wt.r, 2).abs().sum(1).max())  # the inf -> inf norm of R_h
        rbh = float(wt.rb[2 * wt.hidden :].abs().max()) if wt.hidden else 0.0
        lbr = bool(int(ctx.attrs["linear_before_reset"]))

        def step(t: int) -> np.ndarray:
            before = (max(start, g_max) * MARGIN if t else start) if convex else _grow(start, z_max, u_max * g_max, t)
            k = rh_rows * before + rbh if lbr else rh * before
            dn_x = g.slope * (wh + k * f.slope * wr)
            dn_h = g.slope * (k * f.slope * rr + rh * z_max)
            a = (before + g_max) * f.slope * wz + u_max * dn_x
            b = (before + g_max) * f.slope * rz + u_max * dn_h + z_max
            return np.array([[a, b, 0.0], [0.0, 0.0, 0.0]])

        return step


@register
class LSTM(_Recurrent):
    """LSTM unrolled over a known length: step Jacobian norms from slopes and ranges, |c_t| <= |c_0| + t.

    c_t = f c_{t-1} + i g, h_t = o h(c_t) with gates i, f, o of range |.| <= F, slope s_f (peepholes P
    add P c to their pre-activations), |g| <= G, slope s_g, so |c_t| <= C_t = F C_{t-1} + F G. Then
    dc_t = df c_{t-1} + f dc_{t-1} + di g + i dg:
    ||dc_t|| <= s_f C_{t-1} (||W_f|| dx + ||R_f|| dh + |P_f| dc) + F dc + s_f G (||W_i|| dx + ||R_i|| dh +
    |P_i| dc) + F s_g (||W_c|| dx + ||R_c|| dh), and dh_t = do h(c_t) + o h'(c_t) dc_t:
    ||dh_t|| <= s_f M (||W_o|| dx + ||R_o|| dh + |P_o| ||dc_t||) + F s_h ||dc_t||, M = sup |h| on
    [-C_t, C_t]. A variable initial c is multiplied by the forget gate: not globally Lipschitz.
    """

    gates = 4
    defaults = ("Sigmoid", "Tanh", "Tanh")

    def cell(self, xw, h, c, recurrence, acts, ctx):
        r, rb, peep = recurrence
        f, g, out, clip = acts[0].function, acts[1].function, acts[2].function, _clip(ctx)
        size = r.shape[-1]
        pre = xw + h @ r.T + rb
        p_i, p_o, p_f = (peep[k * size : (k + 1) * size] for k in range(3)) if peep is not None else (0.0, 0.0, 0.0)
        i = f(_clipped(pre[:, :size] + p_i * c, clip))
        forget = f(_clipped(pre[:, 2 * size : 3 * size] + p_f * c, clip))
        cell = forget * c + i * g(_clipped(pre[:, 3 * size :], clip))
        o = f(_clipped(pre[:, size : 2 * size] + p_o * cell, clip))
        return o * out(cell), cell

    def recurrence(self, ctx: RuleContext, d: int, acts: list[_Activation]) -> Callable[[int], np.ndarray] | LocalBound:
        if ctx.is_variable(6):
            return unbounded("LSTM: the forget gate multiplies a variable initial_c (not globally Lipschitz)")
        verdict = _bounded_gates(ctx, acts)
        if verdict is not None:
            return verdict
        wt = _Weights(ctx, d, 4)
        f, g, out = acts
        gate_max, g_max = _magnitude(f), _magnitude(g)
        start = float(ctx.tensor(6).abs().max()) if ctx.has_input(6) else 0.0
        wi, wo, wf, wc = (wt.norm_w(k) for k in range(4))
        ri, ro, rf, rc = (wt.norm_r(k) for k in range(4))
        p_i, p_o, p_f = (float(wt.block(wt.p, k).abs().max()) if wt.hidden else 0.0 for k in range(3))

        def step(t: int) -> np.ndarray:
            before = _grow(start, gate_max, gate_max * g_max, t)
            after = _grow(start, gate_max, gate_max * g_max, t + 1)
            a_c = f.slope * (before * wf + g_max * wi) + gate_max * g.slope * wc
            b_ch = f.slope * (before * rf + g_max * ri) + gate_max * g.slope * rc
            b_cc = gate_max + f.slope * (before * p_f + g_max * p_i)
            h_max = _magnitude(out, after)
            k = f.slope * h_max * p_o + gate_max * out.slope
            row_h = [f.slope * h_max * wo + k * a_c, f.slope * h_max * ro + k * b_ch, k * b_cc]
            return np.array([row_h, [a_c, b_ch, b_cc]])

        return step
