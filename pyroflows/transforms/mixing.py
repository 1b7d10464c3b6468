"""Mixing layers: permutations, LU-decomposed linear maps, ActNorm and `Precondition`.

These layers take no context (given one, they ignore it, so they sit inside conditional
flows). Both directions are cheap. Fixed indices are buffers, so ``.to(device)`` and
``state_dict`` carry them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_int
from .base import ContextFree, check_event

__all__ = ["Permute", "Reverse", "LULinear", "ActNorm", "Precondition"]


def _row_scale(*terms: Tensor) -> Tensor:
    """A power of two per row, at least 1 and within a factor 2 of the row's largest magnitude.

    Dividing by it before a dense solve and multiplying after is exact (powers of two) and
    keeps inputs near the dtype's largest value from overflowing to ``inf - inf = NaN``
    inside the solve; the result then overflows to ``inf`` at worst, which scores ``-inf``.
    """
    size = torch.stack([t.abs().expand_as(terms[0]) for t in terms]).amax(0).amax(-1, True)
    return torch.exp2(torch.floor(torch.log2(size.clamp_min(1.0))))


class Permute(ContextFree):
    """Reorder features: ``y = x[..., permutation]``. Volume preserving, both ways cheap.

    Takes no context: inside a conditional flow it ignores the one it is given (`ContextFree`).

    Args:
        permutation: a permutation of ``range(D)``.

    Example:
        >>> import torch
        >>> from pyroflows import Permute
        >>> Permute([2, 0, 1])(torch.tensor([10.0, 20.0, 30.0]))
        tensor([30., 10., 20.])
    """

    def __init__(self, permutation: Sequence[int] | Tensor):
        super().__init__()
        perm = torch.as_tensor(permutation, dtype=torch.long).flatten()
        if sorted(perm.tolist()) != list(range(len(perm))) or len(perm) == 0:
            raise ValueError(f"not a permutation of range(n): {perm.tolist()}")
        self.input_dim = len(perm)
        self.register_buffer("permutation", perm)
        self.register_buffer("inverse_permutation", torch.argsort(perm))

    def extra_repr(self) -> str:
        return f"permutation={self.permutation.tolist()}"

    def get_config(self) -> dict[str, Any]:
        return {"permutation": self.permutation.tolist()}

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_event(x, self.input_dim)
        return x.index_select(-1, self.permutation), x.new_zeros(x.shape[:-1])

    def inv_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_event(y, self.input_dim)
        return y.index_select(-1, self.inverse_permutation), y.new_zeros(y.shape[:-1])

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return x.new_zeros(x.shape[:-1])


class Reverse(Permute):
    """Reverse the order of the features.

    Args:
        input_dim: size ``D`` of the vectors.
    """

    def __init__(self, input_dim: int):
        super().__init__(torch.arange(input_dim - 1, -1, -1))

    def get_config(self) -> dict[str, Any]:
        return {"input_dim": self.input_dim}


class LULinear(ContextFree):
    """Invertible linear map ``y = W x + b`` with ``W = P L U`` (Kingma & Dhariwal, 2018).

    ``P`` is a fixed permutation (a buffer), ``L`` unit lower triangular, ``U`` upper
    triangular with a positive diagonal ``exp(log_diag)``. Initialised to the identity. The
    forward map is a matrix product, the inverse two triangular solves; the log-det is
    ``sum(log_diag)``.

    Takes no context: inside a conditional flow it ignores the one it is given (`ContextFree`).

    Args:
        input_dim: size ``D`` of the vectors.
        permutation: the fixed permutation ``P`` as indices (default identity).
    """

    def __init__(self, input_dim: int, permutation: Sequence[int] | Tensor | None = None):
        super().__init__()
        input_dim = check_int("input_dim", input_dim)
        self.input_dim = input_dim
        perm = torch.arange(input_dim) if permutation is None else torch.as_tensor(permutation)
        if sorted(perm.tolist()) != list(range(input_dim)):
            raise ValueError(f"not a permutation of range({input_dim}): {perm.tolist()}")
        self.register_buffer("permutation", perm.long())
        self.register_buffer("inverse_permutation", torch.argsort(perm.long()))
        # Only the free entries are parameters: strictly lower / strictly upper triangles.
        self.register_buffer("lower_index", torch.tril_indices(input_dim, input_dim, -1))
        self.register_buffer("upper_index", torch.triu_indices(input_dim, input_dim, 1))
        num_off_diagonal = input_dim * (input_dim - 1) // 2
        self.lower = nn.Parameter(torch.zeros(num_off_diagonal))
        self.upper = nn.Parameter(torch.zeros(num_off_diagonal))
        self.log_diag = nn.Parameter(torch.zeros(input_dim))
        self.bias = nn.Parameter(torch.zeros(input_dim))

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}"

    def get_config(self) -> dict[str, Any]:
        return {"input_dim": self.input_dim, "permutation": self.permutation.tolist()}

    def _factors(self) -> tuple[Tensor, Tensor]:
        d = self.input_dim
        lower = torch.eye(d, dtype=self.lower.dtype, device=self.lower.device)
        lower = lower.index_put(tuple(self.lower_index), self.lower)
        upper = torch.diag(self.log_diag.exp()).index_put(tuple(self.upper_index), self.upper)
        return lower, upper

    def weight(self) -> Tensor:
        """The matrix ``W = P L U``."""
        lower, upper = self._factors()
        return (lower @ upper).index_select(0, self.permutation)

    def _ladj(self, x: Tensor) -> Tensor:
        return self.log_diag.sum().expand(x.shape[:-1])

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_event(x, self.input_dim)
        return nn.functional.linear(x, self.weight(), self.bias), self._ladj(x)

    def inv_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_event(y, self.input_dim)
        lower, upper = self._factors()
        # Rows r = y - b solve x (P L U)^T = r, i.e. x U^T L^T = r P (rows scaled by c).
        c = _row_scale(y, self.bias)
        r = (y / c - self.bias / c).index_select(-1, self.inverse_permutation)
        rows = r.reshape(-1, self.input_dim)
        t = torch.linalg.solve_triangular(lower.T, rows, upper=True, left=False, unitriangular=True)
        x = torch.linalg.solve_triangular(upper.T, t, upper=False, left=False)
        return x.reshape(y.shape) * c, -self._ladj(y)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self._ladj(x)


class ActNorm(ContextFree):
    """Learnable elementwise affine map ``y = loc + exp(log_scale) * x`` (ActNorm-style).

    Starts as the identity. `initialize` sets it from data so that the inverse map
    standardises that data, as Glow's data-dependent initialisation does.

    Takes no context: inside a conditional flow it ignores the one it is given (`ContextFree`).

    Args:
        input_dim: size ``D`` of the vectors.
    """

    def __init__(self, input_dim: int):
        super().__init__()
        input_dim = check_int("input_dim", input_dim)
        self.input_dim = input_dim
        self.loc = nn.Parameter(torch.zeros(input_dim))
        self.log_scale = nn.Parameter(torch.zeros(input_dim))

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}"

    def get_config(self) -> dict[str, Any]:
        return {"input_dim": self.input_dim}

    @torch.no_grad()
    def initialize(self, y: Tensor, eps: float = 1e-6) -> ActNorm:
        """Set ``loc``/``log_scale`` to the mean and log-std of ``y`` (shape ``(N, D)``).

        A column with zero variance gets scale ``eps`` rather than a log-scale of ``-inf``.
        Returns ``self``.
        """
        check_event(y, self.input_dim, "data")
        flat = y.reshape(-1, self.input_dim)
        if flat.shape[0] < 2:
            raise ValueError("ActNorm.initialize needs at least 2 rows of data")
        self.loc.copy_(flat.mean(0))
        self.log_scale.copy_(flat.std(0).clamp_min(eps).log())
        return self

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_event(x, self.input_dim)
        return self.loc + self.log_scale.exp() * x, self.log_scale.sum().expand(x.shape[:-1])

    def inv_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_event(y, self.input_dim)
        x = (y - self.loc) * torch.exp(-self.log_scale)
        return x, -self.log_scale.sum().expand(y.shape[:-1])

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.log_scale.sum().expand(x.shape[:-1])


class Precondition(ContextFree):
    """Affine map through a fixed linear preconditioner: ``y = loc + L (shift + s * x)``.

    ``loc`` and ``L`` are fixed buffers (e.g. the mode and a square root of the inverse
    Hessian there, as `pyroflows.infer.AutoFlow` sets them); the learnable ``shift`` and
    ``s = exp(log_scale)`` correct them. ``L`` is a lower-triangular matrix ``(D, D)`` or,
    for large problems, a diagonal given as a vector ``(D,)``. The inverse is one triangular
    solve; the log-det is ``sum(log_scale) + sum(log diag L)``.

    Takes no context: inside a conditional flow it ignores the one it is given (`ContextFree`).

    Args:
        loc: the fixed centre ``(D,)``.
        scale: ``L``: a lower-triangular ``(D, D)`` matrix with a positive diagonal, or a
            positive vector ``(D,)`` (a diagonal ``L``).
        init_scale: the starting value of ``s`` (every coordinate).

    Example:
        >>> import torch
        >>> from pyroflows import Precondition
        >>> layer = Precondition(torch.zeros(2), torch.tensor([[2.0, 0.0], [1.0, 0.5]]))
        >>> layer(torch.tensor([1.0, 1.0]))
        tensor([2.0000, 1.5000], grad_fn=<AddBackward0>)
    """

    def __init__(self, loc: Tensor, scale: Tensor, init_scale: float = 1.0):
        super().__init__()
        loc, scale = torch.as_tensor(loc), torch.as_tensor(scale)
        if loc.dim() != 1 or loc.numel() < 1:
            raise ValueError(f"loc must be a vector (D,), got shape {tuple(loc.shape)}")
        dim = loc.numel()
        if scale.shape not in ((dim,), (dim, dim)):
            raise ValueError(
                f"scale must have shape ({dim},) or ({dim}, {dim}), got {tuple(scale.shape)}"
            )
        diagonal = scale if scale.dim() == 1 else scale.diagonal()
        if not bool(torch.isfinite(scale).all() & (diagonal > 0).all()):
            raise ValueError("scale must be finite with a positive diagonal")
        if scale.dim() == 2 and bool((scale.triu(1) != 0).any()):
            raise ValueError("a matrix scale must be lower triangular")
        if not (init_scale > 0 and math.isfinite(init_scale)):
            raise ValueError(f"init_scale must be positive, got {init_scale!r}")
        self.input_dim = dim
        self.register_buffer("loc", loc.detach().clone())
        self.register_buffer("scale", scale.detach().clone())
        self.shift = nn.Parameter(torch.zeros(dim, dtype=loc.dtype))
        self.log_scale = nn.Parameter(torch.full((dim,), math.log(init_scale), dtype=loc.dtype))

    def extra_repr(self) -> str:
        form = "diagonal" if self.scale.dim() == 1 else "triangular"
        return f"input_dim={self.input_dim}, scale={form}"

    def get_config(self) -> dict[str, Any]:
        """Only the shape: ``loc``, ``L`` and the learned parts are in the state dict."""
        return {"input_dim": self.input_dim, "diagonal": self.scale.dim() == 1}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Precondition:
        dim = config["input_dim"]
        scale = torch.ones(dim) if config["diagonal"] else torch.eye(dim)
        return cls(torch.zeros(dim), scale)

    def _ladj(self, x: Tensor) -> Tensor:
        diagonal = self.scale if self.scale.dim() == 1 else self.scale.diagonal()
        return (self.log_scale.sum() + diagonal.log().sum()).expand(x.shape[:-1])

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_event(x, self.input_dim)
        w = self.shift + self.log_scale.exp() * x
        y = self.loc + (w * self.scale if self.scale.dim() == 1 else w @ self.scale.T)
        return y, self._ladj(x)

    def inv_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_event(y, self.input_dim)
        c = _row_scale(y, self.loc, self.shift)  # rows scaled by c: no inf - inf in the solve
        r = y / c - self.loc / c
        if self.scale.dim() == 1:
            w = r / self.scale
        else:
            rows = r.reshape(-1, self.input_dim)
            w = torch.linalg.solve_triangular(self.scale.T, rows, upper=True, left=False)
            w = w.reshape(y.shape)
        return (w - self.shift / c) * torch.exp(-self.log_scale) * c, -self._ladj(y)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self._ladj(x)
