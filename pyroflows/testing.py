"""Property checks for flow layers, usable on your own transforms.

Each ``check_*`` function takes a `FlowTransform` (a conditioned
layer) or a `FlowModule` and raises `AssertionError` with
a readable message when the property fails. `LAYERS` is the registry of every layer
pyroflows exports, in the configurations the test suite runs them through; add your own
`LayerSpec` to run the same checks on a new layer.

Example:
    >>> import torch
    >>> from pyroflows.testing import LAYERS, check_round_trip, randomize_
    >>> spec = LAYERS["coupling_spline"]
    >>> layer = randomize_(spec.build(4, 0)).double()
    >>> check_round_trip(layer.condition(None), spec.sample((7, 4), dtype=torch.float64))
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .transformers import (
    Additive,
    Affine,
    BoundedRationalQuadraticSpline,
    CircularRationalQuadraticSpline,
    RationalQuadraticSpline,
)
from .transforms import (
    ActNorm,
    Autoregressive,
    Coupling,
    FlowModule,
    FlowTransform,
    Inverse,
    LULinear,
    Permute,
    Precondition,
    Reverse,
    Standardize,
    SupportMap,
)

__all__ = [
    "LayerSpec",
    "LAYERS",
    "randomize_",
    "batch_jacobian",
    "check_shapes",
    "check_round_trip",
    "check_log_det",
    "check_fused",
    "check_jacobian_structure",
    "check_state_dict_round_trip",
]


def _tol(dtype: torch.dtype) -> float:
    return 1e-8 if dtype == torch.float64 else 1e-3


def _close(name: str, actual: Tensor, expected: Tensor, atol: float) -> None:
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    actual, expected = actual.detach(), expected.detach()
    err = (actual - expected).abs()
    scale = expected.abs().clamp_min(1.0)
    if not bool(torch.isfinite(actual).all()):
        raise AssertionError(f"{name}: non-finite values")
    worst = float((err / scale).max()) if err.numel() else 0.0
    if worst > atol:
        raise AssertionError(f"{name}: max relative error {worst:.3g} exceeds {atol:.1g}")


@torch.no_grad()
def randomize_(module: nn.Module, scale: float = 0.3, seed: int | None = 0) -> nn.Module:
    """Fill every parameter of ``module`` with ``N(0, scale^2)`` noise, in place.

    Layers start as the identity (zero-initialised last layers); randomising makes the
    property checks non-trivial. Returns ``module``.
    """
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    for p in module.parameters():
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float64, device="cpu")
        noise = noise * scale
        p.copy_(noise.to(p))
    return module


@dataclass(frozen=True)
class LayerSpec:
    """How to build and feed one layer configuration.

    Attributes:
        build: ``build(input_dim, context_dim) -> FlowModule``; ``context_dim`` is 0 when
            ``conditional`` is ``False``.
        conditional: whether the layer takes a context.
        low: inputs for the checks are drawn uniformly in ``(low, high)`` ...
        high: ... (most layers act on the real line and use a wide range).
        spline: the transformer is a spline (extra spline checks apply).
        starts_as_identity: a freshly built layer is the identity map.
    """

    build: Callable[[int, int], FlowModule]
    conditional: bool = True
    low: float = -6.0
    high: float = 6.0
    spline: bool = False
    starts_as_identity: bool = True

    def sample(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> Tensor:
        """Inputs inside the layer's domain, drawn reproducibly."""
        generator = torch.Generator().manual_seed(seed)
        u = torch.rand(shape, generator=generator, dtype=torch.float64, device="cpu")
        margin = 0.01 * (self.high - self.low)
        x = self.low + margin + (self.high - self.low - 2 * margin) * u
        return x.to(dtype=dtype, device=device)


def _ar(transformer, invert: bool, residual: bool = False) -> Callable[[int, int], FlowModule]:
    def build(input_dim: int, context_dim: int) -> FlowModule:
        order = torch.randperm(input_dim, generator=torch.Generator().manual_seed(1), device="cpu")
        return Autoregressive(
            input_dim,
            transformer,
            context_dim=context_dim,
            hidden_dims=(16, 16),
            order=order,
            invert=invert,
            residual=residual,
        )

    return build


def _coupling(transformer) -> Callable[[int, int], FlowModule]:
    def build(input_dim: int, context_dim: int) -> FlowModule:
        mask = torch.arange(input_dim) % 2 == 1
        return Coupling(
            input_dim, transformer, context_dim=context_dim, hidden_dims=(16, 16), mask=mask
        )

    return build


#: Every exported layer, in the configurations the property tests run.
LAYERS: dict[str, LayerSpec] = {
    "coupling_affine": LayerSpec(_coupling(Affine())),
    "coupling_additive": LayerSpec(_coupling(Additive())),
    "coupling_spline": LayerSpec(_coupling(RationalQuadraticSpline(6, bound=4.0)), spline=True),
    "coupling_bounded_spline": LayerSpec(
        _coupling(BoundedRationalQuadraticSpline(5, low=-1.0, high=2.0)),
        low=-1.0,
        high=2.0,
        spline=True,
    ),
    "coupling_circular_spline": LayerSpec(
        _coupling(CircularRationalQuadraticSpline(5)), low=-math.pi, high=math.pi, spline=True
    ),
    "maf_affine": LayerSpec(_ar(Affine(), invert=True)),
    "iaf_affine": LayerSpec(_ar(Affine(), invert=False)),
    "maf_spline": LayerSpec(_ar(RationalQuadraticSpline(6, bound=4.0), invert=True), spline=True),
    "iaf_spline": LayerSpec(_ar(RationalQuadraticSpline(6, bound=4.0), invert=False), spline=True),
    "maf_affine_residual": LayerSpec(_ar(Affine(), invert=True, residual=True)),
    "inverse_coupling_spline": LayerSpec(
        lambda d, c: Inverse(_coupling(RationalQuadraticSpline(6, bound=4.0))(d, c)), spline=True
    ),
    "inverse_iaf_affine": LayerSpec(lambda d, c: Inverse(_ar(Affine(), invert=False)(d, c))),
    "permute": LayerSpec(
        lambda d, c: Permute(
            torch.randperm(d, generator=torch.Generator().manual_seed(2), device="cpu")
        ),
        conditional=False,
        starts_as_identity=False,
    ),
    "reverse": LayerSpec(lambda d, c: Reverse(d), conditional=False, starts_as_identity=False),
    "lu_linear": LayerSpec(lambda d, c: LULinear(d), conditional=False),
    "lu_linear_permuted": LayerSpec(
        lambda d, c: LULinear(
            d, torch.randperm(d, generator=torch.Generator().manual_seed(3), device="cpu")
        ),
        conditional=False,
        starts_as_identity=False,
    ),
    "act_norm": LayerSpec(lambda d, c: ActNorm(d), conditional=False),
    "precondition": LayerSpec(
        lambda d, c: Precondition(
            torch.linspace(-1.0, 1.0, d),
            torch.eye(d) * torch.linspace(0.5, 2.0, d) + 0.3 * torch.ones(d, d).tril(-1),
            init_scale=0.7,
        ),
        conditional=False,
        starts_as_identity=False,
    ),
    "precondition_diagonal": LayerSpec(
        lambda d, c: Precondition(torch.linspace(-1.0, 1.0, d), torch.linspace(0.5, 2.0, d)),
        conditional=False,
        starts_as_identity=False,
    ),
    "standardize": LayerSpec(
        lambda d, c: Standardize(torch.linspace(-1.0, 1.0, d), torch.linspace(0.5, 2.0, d)),
        conditional=False,
        starts_as_identity=False,
    ),
    # Feature kinds cycle through: lower bound only, upper only, both, none.
    "support_map": LayerSpec(
        lambda d, c: SupportMap(
            [(-7.0, -math.inf, -7.0, -math.inf)[i % 4] for i in range(d)],
            [(math.inf, 7.0, 7.0, math.inf)[i % 4] for i in range(d)],
        ),
        conditional=False,
        starts_as_identity=False,
    ),
    # The same kinds with finite one-sided scales (softplus maps instead of logarithms).
    "support_map_scaled": LayerSpec(
        lambda d, c: SupportMap(
            [(-7.0, -math.inf, -7.0, -math.inf)[i % 4] for i in range(d)],
            [(math.inf, 7.0, 7.0, math.inf)[i % 4] for i in range(d)],
            [(0.5, 2.0, 1.0, 1.0)[i % 4] for i in range(d)],
        ),
        conditional=False,
        starts_as_identity=False,
    ),
}


def batch_jacobian(f: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Jacobians of a row-wise map: shape ``x.shape + (D,)``, entry ``[..., i, j] = dy_i/dx_j``.

    Assumes rows (all but the last dimension) are transformed independently.
    """
    d = x.shape[-1]
    flat = x.reshape(-1, d).detach()

    def summed(v: Tensor) -> Tensor:
        return f(v.reshape(x.shape)).reshape(-1, d).sum(0)

    jac = torch.autograd.functional.jacobian(summed, flat)  # (D, N, D)
    return jac.permute(1, 0, 2).reshape(x.shape + (d,))


def check_shapes(t: FlowTransform, x: Tensor, batch_shape: tuple[int, ...] | None = None) -> None:
    """Outputs have the input's shape (broadcast with ``batch_shape``); log-dets drop the event."""
    expected = (
        x.shape
        if batch_shape is None
        else torch.broadcast_shapes(x.shape[:-1], batch_shape) + x.shape[-1:]
    )
    for name, (out, ladj) in (("forward", t.call_and_ladj(x)), ("inverse", t.inv_and_ladj(x))):
        if out.shape != expected:
            raise AssertionError(f"{name} output shape {tuple(out.shape)} != {tuple(expected)}")
        if ladj.shape != expected[:-1]:
            raise AssertionError(
                f"{name} log-det shape {tuple(ladj.shape)} != {tuple(expected[:-1])}"
            )
        if out.dtype != x.dtype or out.device != x.device:
            raise AssertionError(
                f"{name} output on {out.dtype}/{out.device}, input {x.dtype}/{x.device}"
            )


def check_round_trip(t: FlowTransform, x: Tensor, atol: float | None = None) -> None:
    """``inverse(forward(x)) == x`` and ``forward(inverse(x)) == x``, log-dets cancel.

    Calls the fused methods directly, so no cache can make it pass trivially.
    """
    atol = _tol(x.dtype) if atol is None else atol
    y, ladj = t.call_and_ladj(x)
    x2, ladj_inv = t.inv_and_ladj(y)
    _close("inverse(forward(x))", x2, x.expand_as(x2), atol)
    _close("forward log-det + inverse log-det", ladj + ladj_inv, torch.zeros_like(ladj), atol)
    z, _ = t.inv_and_ladj(x)
    x3, _ = t.call_and_ladj(z)
    _close("forward(inverse(x))", x3, x.expand_as(x3), atol)


def check_log_det(t: FlowTransform, x: Tensor, atol: float | None = None) -> None:
    """Log-dets equal ``slogdet`` of the autograd Jacobian, in both directions."""
    atol = _tol(x.dtype) if atol is None else atol
    for name, fused in (("forward", t.call_and_ladj), ("inverse", t.inv_and_ladj)):
        out, ladj = fused(x)
        x_b = x.expand_as(out)
        jac = batch_jacobian(lambda v, fused=fused: fused(v)[0], x_b)
        sign, logabsdet = torch.linalg.slogdet(jac)
        if bool((sign == 0).any()):
            raise AssertionError(f"{name}: singular Jacobian")
        _close(f"{name} log-det vs slogdet(Jacobian)", ladj, logabsdet, atol)


def check_fused(t: FlowTransform, x: Tensor, atol: float | None = None) -> None:
    """The fused calls agree with ``t(x)``, ``t.inv(y)`` and ``log_abs_det_jacobian``."""
    atol = _tol(x.dtype) if atol is None else atol
    y, ladj = t.call_and_ladj(x)
    _close("t(x)", t(x), y, atol)
    _close("log_abs_det_jacobian(x, y)", t.log_abs_det_jacobian(x, y), ladj, atol)
    x2, ladj_inv = t.inv_and_ladj(y)
    _close("t.inv(y)", t.inv(y), x2, atol)
    _close("t.inv.log_abs_det_jacobian(y, x)", t.inv.log_abs_det_jacobian(y, x2), ladj_inv, atol)


def check_jacobian_structure(layer: FlowModule, t: FlowTransform, x: Tensor) -> None:
    """The zeros a layer's structure promises in its Jacobian (``x`` of shape ``(N, D)``).

    Coupling: identity rows for pass-through features; autoregressive: triangular in its
    order; permutations: the permutation matrix; elementwise maps (`ActNorm`, `Standardize`,
    `SupportMap`, diagonal `Precondition`): diagonal; `Precondition`: lower triangular;
    `LULinear`: the same matrix at every input. An unknown layer type is an error, so a new
    layer must state its structure here.
    """
    base = layer.layer if isinstance(layer, Inverse) else layer
    jac = batch_jacobian(t._call, x.expand_as(t._call(x)))
    d = x.shape[-1]
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    if isinstance(base, Permute):
        perm = base.inverse_permutation if isinstance(layer, Inverse) else base.permutation
        if not torch.equal(jac, eye.index_select(0, perm).expand_as(jac)):
            raise AssertionError("permutation: the Jacobian is not the permutation matrix")
    elif isinstance(base, ActNorm | Standardize | SupportMap) or (
        isinstance(base, Precondition) and base.scale.dim() == 1
    ):
        if bool((jac * (1 - eye) != 0).any()):
            raise AssertionError("elementwise map: the Jacobian is not diagonal")
    elif isinstance(base, Precondition):
        if bool((jac.triu(1) != 0).any()):
            raise AssertionError("precondition: the Jacobian is not lower triangular")
    elif isinstance(base, LULinear):
        if not torch.allclose(jac, jac[:1].expand_as(jac)):
            raise AssertionError("LU-linear: the Jacobian changes with the input")
    elif not isinstance(base, Coupling | Autoregressive):
        raise AssertionError(f"no Jacobian structure is known for {type(base).__name__}")
    if isinstance(base, Coupling):
        idx = base.idx_id
        rows = jac.index_select(-2, idx)
        if not torch.equal(rows, eye.index_select(0, idx).expand_as(rows)):
            raise AssertionError("coupling: pass-through rows of the Jacobian are not identity")
    elif isinstance(base, Autoregressive):
        order = base.order.to(jac.device)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(d, device=rank.device)
        later = rank[None, :] > rank[:, None]  # [i, j]: j comes after i
        if bool((jac[..., later] != 0).any()):
            raise AssertionError("autoregressive: output depends on later features")


def check_state_dict_round_trip(
    make: Callable[[], nn.Module], module: nn.Module, score: Callable[[nn.Module], Tensor]
) -> None:
    """A fresh module loaded from ``module.state_dict()`` (via bytes) reproduces ``score``."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh = make()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    expected, actual = score(module), score(fresh)
    if not torch.equal(expected, actual):
        raise AssertionError("state_dict round trip changed the output")
