"""Fixed (parameter-free) maps between a model's internal scale and the user's scale.

:class:`Standardize` and :class:`SupportMap` hold their statistics in buffers: they move
with the flow, are saved in its ``state_dict``, and no optimiser changes them. They sit at
the data end of a flow (``Flow.data_transforms``) so ``log_prob`` is on the user's scale,
log-determinant included. Both directions are cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import FlowModule, FlowTransform, check_event

__all__ = ["Standardize", "SupportMap"]


class _Fixed(FlowModule):
    def condition(self, context: Tensor | None = None) -> FlowTransform:
        return self


class Standardize(_Fixed):
    """Fixed affine map ``x = loc + scale * u`` (so ``u`` is the standardised ``x``).

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
        loc = torch.as_tensor(loc, dtype=torch.get_default_dtype()).flatten()
        scale = torch.as_tensor(scale, dtype=loc.dtype).flatten()
        if loc.shape != scale.shape or loc.numel() == 0:
            raise ValueError(
                f"loc and scale need the same shape (D,), got {loc.shape}, {scale.shape}"
            )
        if not bool(torch.isfinite(loc).all() & torch.isfinite(scale).all() & (scale > 0).all()):
            raise ValueError("loc must be finite and scale finite and positive")
        self.input_dim = loc.numel()
        self.register_buffer("loc", loc)
        self.register_buffer("scale", scale)

    @classmethod
    def identity(cls, input_dim: int) -> Standardize:
        """A placeholder (``loc = 0``, ``scale = 1``), e.g. to load a saved state into."""
        return cls(torch.zeros(input_dim), torch.ones(input_dim))

    @classmethod
    def from_data(cls, data: Tensor, eps: float = 1e-8) -> Standardize:
        """Mean and standard deviation of ``data`` (shape ``(N, D)``).

        A column whose standard deviation is below ``eps`` times its magnitude (constant up
        to rounding) keeps scale 1 instead of blowing up.
        """
        if data.dim() != 2 or data.shape[0] < 1:
            raise ValueError(f"expected data of shape (N, D) with N >= 1, got {tuple(data.shape)}")
        data = data.double()
        loc = data.mean(0)
        std = data.std(0, unbiased=False)
        degenerate = std <= eps * loc.abs().clamp_min(1.0)
        scale = torch.where(degenerate, torch.ones_like(std), std)
        return cls(loc.float(), scale.float())

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}"

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_event(x, self.input_dim)
        return self.loc + self.scale * x, self.scale.log().sum().expand(x.shape[:-1])

    def inv_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_event(y, self.input_dim)
        return (y - self.loc) / self.scale, -self.scale.log().sum().expand(y.shape[:-1])

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.scale.log().sum().expand(x.shape[:-1])


class SupportMap(_Fixed):
    """Per-feature bijection from the real line onto a declared support.

    For each feature, with bounds ``(lower, upper)`` (``-inf``/``inf`` for none):

    * no bounds: identity;
    * lower only: ``x = lower + exp(u)``;
    * upper only: ``x = upper - exp(u)``;
    * both: ``x = lower + (upper - lower) * sigmoid(u)``.

    The inverse of a value outside the support gives ``u = 0`` with log-det ``-inf``, so the
    flow's density there is exactly zero (``log_prob = -inf``).

    Args:
        lower: per-feature lower bounds, ``-inf`` where unbounded.
        upper: per-feature upper bounds, ``inf`` where unbounded.

    Example:
        >>> import torch
        >>> m = SupportMap([0.0, -math.inf], [math.inf, math.inf])  # first feature positive
        >>> m(torch.tensor([0.0, -3.0]))
        tensor([ 1., -3.])
    """

    def __init__(self, lower: Tensor | Sequence[float], upper: Tensor | Sequence[float]):
        super().__init__()
        lower = torch.as_tensor(lower, dtype=torch.get_default_dtype()).flatten()
        upper = torch.as_tensor(upper, dtype=lower.dtype).flatten()
        if lower.shape != upper.shape or lower.numel() == 0:
            raise ValueError(
                f"lower and upper need the same shape (D,), got {lower.shape}, {upper.shape}"
            )
        if bool(torch.isnan(lower).any() | torch.isnan(upper).any()):
            raise ValueError("bounds must not be NaN (use -inf / inf for no bound)")
        if not bool((lower < upper).all()) or bool(
            (lower == math.inf).any() | (upper == -math.inf).any()
        ):
            raise ValueError(
                f"need lower < upper for every feature, got {lower.tolist()}, {upper.tolist()}"
            )
        self.input_dim = lower.numel()
        self.register_buffer("lower", lower)
        self.register_buffer("upper", upper)

    @classmethod
    def unbounded(cls, input_dim: int) -> SupportMap:
        """The identity on ``input_dim`` features (e.g. to load a saved state into)."""
        return cls(torch.full((input_dim,), -math.inf), torch.full((input_dim,), math.inf))

    def extra_repr(self) -> str:
        return f"lower={self.lower.tolist()}, upper={self.upper.tolist()}"

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
        lower_only, upper_only, both = self._kinds()
        lo, hi = self._finite_bounds()
        width = torch.where(both, hi - lo, torch.ones_like(hi))
        x = torch.where(lower_only, lo + u.exp(), u)
        x = torch.where(upper_only, hi - u.exp(), x)
        x = torch.where(both, lo + width * torch.sigmoid(u), x)
        ladj = torch.where(lower_only | upper_only, u, torch.zeros_like(u))
        ladj = torch.where(both, width.log() + F.logsigmoid(u) + F.logsigmoid(-u), ladj)
        return x, ladj.sum(-1)

    def inv_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_event(x, self.input_dim)
        lower_only, upper_only, both = self._kinds()
        lo, hi = self._finite_bounds()
        width = torch.where(both, hi - lo, torch.ones_like(hi))
        inside = (x > self.lower) & (x < self.upper)
        safe = torch.where(inside, x, torch.where(both, lo + 0.5 * width, lo + 1.0))
        gap_lo = torch.where(lower_only | both, safe - lo, torch.ones_like(safe))
        gap_hi = torch.where(upper_only | both, hi - safe, torch.ones_like(safe))
        u = torch.where(lower_only, gap_lo.log(), safe)
        u = torch.where(upper_only, gap_hi.log(), u)
        u = torch.where(both, gap_lo.log() - gap_hi.log(), u)
        # log|du/dx|: -log(gap) for one bound, log(width) - log(gap_lo) - log(gap_hi) for two.
        ladj = torch.where(lower_only, -gap_lo.log(), torch.zeros_like(u))
        ladj = torch.where(upper_only, -gap_hi.log(), ladj)
        ladj = torch.where(both, width.log() - gap_lo.log() - gap_hi.log(), ladj)
        ladj = torch.where(inside, ladj, torch.full_like(ladj, -math.inf))
        u = torch.where(inside, u, torch.zeros_like(u))
        return u, ladj.sum(-1)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.call_and_ladj(x)[1]
