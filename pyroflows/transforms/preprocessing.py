"""Fixed (parameter-free) maps between a model's internal scale and the user's scale.

:class:`Standardize` and :class:`SupportMap` hold their statistics in buffers: they move
with the flow, are saved in its ``state_dict``, and no optimiser changes them. They sit at
the data end of a flow (``Flow.data_transforms``) so ``log_prob`` is on the user's scale,
log-determinant included. Both directions are cheap.

Precision: the buffers are float64 whatever ``.to(dtype)`` / ``.float()`` is applied to the
flow (device moves still apply), and both maps compute in float64 and return their results
in the dtype of their input. A float32 flow can therefore score float64 data exactly on the
user's scale (`FlowDistribution.log_prob` runs these maps on the float64 values and only
then casts to the flow's dtype): a column such as ``1.7e9 + 100 * noise`` keeps its spread,
which float32 would round to multiples of 128.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ContextFree, check_event

__all__ = ["Standardize", "SupportMap"]


_F64 = torch.float64


class _Fixed(ContextFree):
    """A parameter-free map whose floating buffers stay float64 (see the module docstring)."""

    def get_config(self) -> dict[str, Any]:
        """Only the size: the statistics or bounds are buffers in the state dict."""
        return {"input_dim": self.input_dim}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> _Fixed:
        return cls.placeholder(config["input_dim"])

    @classmethod
    def placeholder(cls, input_dim: int) -> _Fixed:
        """The identity on ``input_dim`` features, to load a saved state into."""
        raise NotImplementedError

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (torch's signature)
        # ``.to(device)`` moves the buffers; a dtype change must not round the statistics.
        for key, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[key] = buf.to(moved.device) if buf.is_floating_point() else moved
        return self


def _vector_pair(
    name_a: str, a: Tensor | Sequence[float], name_b: str, b: Tensor | Sequence[float]
) -> tuple[Tensor, Tensor]:
    """``a`` and ``b`` as float64 vectors of one length ``D >= 1``, or a `ValueError`."""
    a = torch.as_tensor(a, dtype=_F64).flatten()
    b = torch.as_tensor(b, dtype=_F64).flatten()
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(
            f"{name_a} and {name_b} need the same shape (D,), got {a.shape}, {b.shape}"
        )
    return a, b


class Standardize(_Fixed):
    """Fixed affine map ``x = loc + scale * u`` (so ``u`` is the standardised ``x``).

    Takes no context: inside a conditional flow it ignores the one it is given (`ContextFree`).

    Args:
        loc: per-feature location, shape ``(D,)``.
        scale: per-feature positive scale, shape ``(D,)``.

    Example:
        >>> import torch
        >>> data = torch.tensor([[1.0, 10.0], [3.0, 10.0]])
        >>> s = Standardize.from_data(data)
        >>> s.inv(data)  # the zero-variance column is centred, not divided by 0
        tensor([[-1.,  0.],
                [ 1.,  0.]])
    """

    def __init__(self, loc: Tensor | Sequence[float], scale: Tensor | Sequence[float]):
        super().__init__()
        loc, scale = _vector_pair("loc", loc, "scale", scale)
        if not bool(torch.isfinite(loc).all() & torch.isfinite(scale).all() & (scale > 0).all()):
            raise ValueError("loc must be finite and scale finite and positive")
        self.input_dim = loc.numel()
        self.register_buffer("loc", loc)
        self.register_buffer("scale", scale)

    @classmethod
    def identity(cls, input_dim: int) -> Standardize:
        """A placeholder (``loc = 0``, ``scale = 1``), e.g. to load a saved state into."""
        return cls(torch.zeros(input_dim), torch.ones(input_dim))

    placeholder = identity

    @classmethod
    def from_data(cls, data: Tensor, eps: float = 1e-12) -> Standardize:
        """Mean and standard deviation of ``data`` (shape ``(N, D)``), computed in float64.

        A column is treated as constant, and keeps scale 1 instead of blowing up, only when
        its standard deviation is 0 or below ``eps`` times its mean's magnitude (constant up
        to float64 rounding); a `UserWarning` names such columns. Any other spread, however
        small in absolute terms (say 5e-9 around 0), is standardised.
        """
        if data.dim() != 2 or data.shape[0] < 1:
            raise ValueError(f"expected data of shape (N, D) with N >= 1, got {tuple(data.shape)}")
        data = data.to(_F64)
        # Moments of data / max|column| then rescaled: no overflow for values near 1e308.
        size = data.abs().amax(0).clamp_min(torch.finfo(_F64).tiny)
        unit = data / size
        loc, std = unit.mean(0) * size, unit.std(0, unbiased=False) * size
        bad = (~torch.isfinite(loc) | ~torch.isfinite(std)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"column(s) {bad} hold NaN or Inf, or too large to standardise")
        degenerate = (std == 0) | (std <= eps * loc.abs())
        if bool(degenerate.any()):
            warnings.warn(
                f"column(s) {degenerate.nonzero().flatten().tolist()} are constant (standard "
                "deviation 0 or below 1e-12 of the mean): centred, not scaled",
                UserWarning,
                stacklevel=2,
            )
        return cls(loc, torch.where(degenerate, torch.ones_like(std), std))

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}"

    def _log_scale(self, like: Tensor) -> Tensor:
        return self.scale.log().sum().to(like.dtype).expand(like.shape[:-1])

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_event(x, self.input_dim)
        y = torch.addcmul(self.loc, self.scale, x.to(_F64))
        return y.to(x.dtype), self._log_scale(x)

    def inv_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_event(y, self.input_dim)
        return ((y.to(_F64) - self.loc) / self.scale).to(y.dtype), -self._log_scale(y)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self._log_scale(x)


class SupportMap(_Fixed):
    """Per-feature bijection from the real line onto a declared support.

    For each feature, with bounds ``(lower, upper)`` (``-inf``/``inf`` for none):

    * no bounds: identity;
    * lower only: ``x = lower + scale * softplus(u / scale)``;
    * upper only: ``x = upper - scale * softplus(u / scale)``;
    * both: ``x = lower + (upper - lower) * sigmoid(u)``.

    A one-sided map is the identity (shifted) for values many ``scale`` from the bound and
    logarithmic close to it, so ``scale`` sets where it bends. With ``scale = inf`` (the
    default) it is logarithmic everywhere: ``x = lower + exp(u)``, the limit of a large
    scale up to an affine change of ``u``. `fit` picks the scale from the data
    (`SupportMap.fitted`): a logarithm stretches values just above a bound into a long tail
    when the data sit far from it, which costs likelihood.

    The inverse of a value outside the support gives ``u = 0`` with log-det ``-inf``, so the
    flow's density there is exactly zero (``log_prob = -inf``).

    Takes no context: inside a conditional flow it ignores the one it is given (`ContextFree`).

    Args:
        lower: per-feature lower bounds, ``-inf`` where unbounded.
        upper: per-feature upper bounds, ``inf`` where unbounded.
        scale: per-feature bend of the one-sided maps, positive, ``inf`` for the logarithm
            (default: ``inf`` for every feature; unused for other features).

    Example:
        >>> import torch
        >>> m = SupportMap([0.0, -math.inf], [math.inf, math.inf])  # first feature positive
        >>> m(torch.tensor([0.0, -3.0]))
        tensor([ 1., -3.])
        >>> soft = SupportMap([0.0], [math.inf], scale=[1.0])
        >>> round(float(soft(torch.tensor([20.0]))), 6)  # far from the bound: the identity
        20.0
    """

    def __init__(
        self,
        lower: Tensor | Sequence[float],
        upper: Tensor | Sequence[float],
        scale: Tensor | Sequence[float] | None = None,
    ):
        super().__init__()
        lower, upper = _vector_pair("lower", lower, "upper", upper)
        if scale is None:
            scale = torch.full_like(lower, math.inf)
        lower, scale = _vector_pair("lower", lower, "scale", scale)
        if bool(torch.isnan(lower).any() | torch.isnan(upper).any()):
            raise ValueError("bounds must not be NaN (use -inf / inf for no bound)")
        if not bool((lower < upper).all()) or bool(
            (lower == math.inf).any() | (upper == -math.inf).any()
        ):
            raise ValueError(
                f"need lower < upper for every feature, got {lower.tolist()}, {upper.tolist()}"
            )
        if not bool((scale > 0).all()):  # NaN fails too
            raise ValueError(f"scale must be positive (inf: logarithmic), got {scale.tolist()}")
        self.input_dim = lower.numel()
        self.register_buffer("lower", lower)
        self.register_buffer("upper", upper)
        self.register_buffer("scale", scale)

    @classmethod
    def unbounded(cls, input_dim: int) -> SupportMap:
        """The identity on ``input_dim`` features (e.g. to load a saved state into)."""
        return cls(torch.full((input_dim,), -math.inf), torch.full((input_dim,), math.inf))

    placeholder = unbounded

    @staticmethod
    def upgrade_state(state: dict[str, Tensor], prefix: str = "") -> None:
        """Give a state saved before one-sided scales existed (model files of format <= 3,
        older ``state_dict``s) its implied ``scale = inf`` (logarithmic maps), in place."""
        if f"{prefix}lower" in state and f"{prefix}scale" not in state:
            state[f"{prefix}scale"] = torch.full_like(state[f"{prefix}lower"], math.inf)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        self.upgrade_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def fitted(self, x: Tensor) -> SupportMap:
        """The same bounds with the scale of each one-sided feature chosen for the rows ``x``.

        Among ``inf`` (the logarithm) and multiples ``2^k, k = -4..4``, of the median distance
        of the column to its bound, the scale whose map makes the column most nearly normal:
        the largest Gaussian log-likelihood of the mapped values, log-det included (the
        one-dimensional analogue of choosing a Box-Cox power). Rows outside the support are
        refused by `fit` before this is called; other features keep their scale.
        """
        check_event(x, self.input_dim)
        x = x.detach().to(device=self.lower.device, dtype=_F64).reshape(-1, self.input_dim)
        lower_only, upper_only, _ = self._kinds()
        scale = self.scale.clone()
        for i in torch.nonzero(lower_only | upper_only).flatten().tolist():
            bound = self.lower[i] if lower_only[i] else self.upper[i]
            scale[i] = _best_scale((x[:, i] - bound).abs())
        return type(self)(self.lower, self.upper, scale)

    def extra_repr(self) -> str:
        text = f"lower={self.lower.tolist()}, upper={self.upper.tolist()}"
        return (
            text if bool(torch.isinf(self.scale).all()) else f"{text}, scale={self.scale.tolist()}"
        )

    def _kinds(self) -> tuple[Tensor, Tensor, Tensor]:
        has_lo, has_hi = torch.isfinite(self.lower), torch.isfinite(self.upper)
        return has_lo & ~has_hi, ~has_lo & has_hi, has_lo & has_hi

    def _finite_bounds(self) -> tuple[Tensor, Tensor]:
        # Replace infinite bounds by 0 so unused branches stay finite (no NaN gradients).
        lo = torch.where(torch.isfinite(self.lower), self.lower, torch.zeros_like(self.lower))
        hi = torch.where(torch.isfinite(self.upper), self.upper, torch.zeros_like(self.upper))
        return lo, hi

    def call_and_ladj(self, u: Tensor) -> tuple[Tensor, Tensor]:
        check_event(u, self.input_dim)
        x, ladj = self._forward(u.to(_F64))
        return x.to(u.dtype), ladj.to(u.dtype)

    def inv_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_event(x, self.input_dim)
        u, ladj = self._inverse(x.to(_F64))
        return u.to(x.dtype), ladj.to(x.dtype)

    def _forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        lower_only, upper_only, both = self._kinds()
        lo, hi = self._finite_bounds()
        width = torch.where(both, hi - lo, torch.ones_like(hi))
        gap, gap_ladj = _gap(u, self.scale)  # the distance to the one bound
        x = torch.where(lower_only, lo + gap, u)
        x = torch.where(upper_only, hi - gap, x)
        x = torch.where(both, lo + width * torch.sigmoid(u), x)
        ladj = torch.where(lower_only | upper_only, gap_ladj, torch.zeros_like(u))
        ladj = torch.where(both, width.log() + F.logsigmoid(u) + F.logsigmoid(-u), ladj)
        return x, ladj.sum(-1)

    def _inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        lower_only, upper_only, both = self._kinds()
        lo, hi = self._finite_bounds()
        width = torch.where(both, hi - lo, torch.ones_like(hi))
        inside = (x > self.lower) & (x < self.upper)
        safe = torch.where(inside, x, torch.where(both, lo + 0.5 * width, lo + 1.0))
        gap_lo = torch.where(lower_only | both, safe - lo, torch.ones_like(safe))
        gap_hi = torch.where(upper_only | both, hi - safe, torch.ones_like(safe))
        v, gap_ladj = _gap_inverse(torch.where(upper_only, gap_hi, gap_lo), self.scale)
        u = torch.where(lower_only | upper_only, v, safe)
        u = torch.where(both, gap_lo.log() - gap_hi.log(), u)
        # log|du/dx|: the one-sided map's, or log(width) - log(gap_lo) - log(gap_hi) for two.
        ladj = torch.where(lower_only | upper_only, gap_ladj, torch.zeros_like(u))
        ladj = torch.where(both, width.log() - gap_lo.log() - gap_hi.log(), ladj)
        ladj = torch.where(inside, ladj, torch.full_like(ladj, -math.inf))
        u = torch.where(inside, u, torch.zeros_like(u))
        return u, ladj.sum(-1)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.call_and_ladj(x)[1]


def _gap(v: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """A one-sided map's distance to its bound, ``g(v) = s softplus(v / s)`` (``exp(v)`` for
    ``s = inf``), and ``log g'(v)``."""
    log = torch.isinf(scale)
    s = torch.where(log, torch.ones_like(scale), scale)  # finite in the unused branch
    soft = s * F.softplus(v / s)
    return torch.where(log, v.exp(), soft), torch.where(log, v, F.logsigmoid(v / s))


def _gap_inverse(gap: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """``v = g^-1(gap)`` for `_gap` and ``log |dv/dgap|``; ``gap > 0``."""
    log = torch.isinf(scale)
    s = torch.where(log, torch.ones_like(scale), scale)
    y = gap / s
    # log(expm1(y)) and -log(1 - exp(-y)), each in its accurate form on either side.
    big = y > 20.0
    log_expm1 = torch.where(
        big, y + torch.log1p(-torch.exp(-y)), torch.expm1(y.clamp(max=20.0)).log()
    )
    small = y < math.log(2.0)
    log1mexp = torch.where(small, torch.log(-torch.expm1(-y)), torch.log1p(-torch.exp(-y)))
    return (
        torch.where(log, gap.log(), s * log_expm1),
        torch.where(log, -gap.log(), -log1mexp),
    )


def _best_scale(gap: Tensor) -> float:
    """The one-sided scale (see `SupportMap.fitted`) that makes ``gap > 0`` most nearly normal."""
    gap = gap[torch.isfinite(gap) & (gap > 0)]
    if len(gap) < 2:
        return math.inf
    median = float(gap.median())
    candidates = [math.inf] + [median * 2.0**k for k in range(-4, 5)]

    def score(s: float) -> float:
        v, ladj = _gap_inverse(gap, torch.full_like(gap, s))
        sd = v.std()
        if not bool(sd > 0):
            return -math.inf
        return float(-torch.log(sd) + ladj.mean())  # mean Gaussian log-likelihood + constant

    return max(candidates, key=score)
