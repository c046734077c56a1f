"""Weight maths of the three factorized forms: pure functions on conv kernels.

Notation, for a conv weight of shape ``(N, Mg, kh, kw)`` with ``g`` groups:
``M = Mg * g`` input channels, ``N = Ng * g`` output channels, ``k2 = kh * kw``.
Every function works in float64 and returns float64 factors; the caller casts
them to the layer's dtype. Groups are handled by batching: a group never mixes
with another one.

Forms:
    ``dw-pw``: per input channel ``m``, ``W[:, m]`` (an ``Ng x k2`` matrix) is
        truncated to rank ``r`` by SVD. Depthwise ``(M*r, 1, kh, kw)`` then
        pointwise ``(N, Mg*r, 1, 1)`` with ``groups=g``.
    ``pw-dw``: per output channel ``n``, ``W[n]`` (an ``Mg x k2`` matrix) is
        truncated to rank ``r``. Pointwise ``(N*r, Mg, 1, 1)`` with ``groups=g``
        then grouped spatial ``(N, r, kh, kw)`` with ``groups=N``.
    ``cp``: per group, a rank-``R`` CP decomposition of the ``(Ng, Mg, k2)``
        kernel gives pointwise ``(g*R, Mg, 1, 1)``, depthwise ``(g*R, 1, kh, kw)``
        and pointwise ``(N, R, 1, 1)``, the last two 1x1 layers with ``groups=g``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

FORMS = ("dw-pw", "pw-dw", "cp")


@dataclass(frozen=True)
class KernelShape:
    """The sizes of a conv kernel that the factorized forms depend on."""

    out_channels: int
    in_channels: int
    kernel_size: tuple[int, int]
    groups: int

    @classmethod
    def of(cls, weight: torch.Tensor, groups: int) -> KernelShape:
        n, mg, kh, kw = weight.shape
        return cls(n, mg * groups, (kh, kw), groups)

    @property
    def k2(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.groups


def full_rank(form: str, shape: KernelShape) -> int:
    """The smallest rank at which ``form`` reproduces the kernel exactly.

    For ``cp`` this is the rank of the cheapest of the three exact trivial
    decompositions (see :func:`cp_exact`), an upper bound on the true CP rank.
    """
    mg, ng, k2 = shape.in_per_group, shape.out_per_group, shape.k2
    if form == "dw-pw":
        return min(ng, k2)
    if form == "pw-dw":
        return min(mg, k2)
    if form == "cp":
        return min(mg * k2, ng * k2, ng * mg)
    raise ValueError(f"unknown form {form!r}: expected one of {', '.join(FORMS)}")


def _per_input_channel(weight: torch.Tensor, groups: int) -> torch.Tensor:
    # (N, Mg, kh, kw) -> (M, Ng, k2): one Ng x k2 matrix per input channel
    n, mg, kh, kw = weight.shape
    ng = n // groups
    w = weight.reshape(groups, ng, mg, kh * kw).permute(0, 2, 1, 3)
    return w.reshape(groups * mg, ng, kh * kw)


@dataclass
class Decomposition:
    """A kernel factorized in one form.

    Attributes:
        form: one of :data:`FORMS`.
        rank: the rank used (after clamping to the form's full rank).
        weights: float64 conv weights of the new layers, in the order they run.
        error: relative weight error ``||W - W_r|| / ||W||``.
    """

    form: str
    rank: int
    weights: tuple[torch.Tensor, ...]
    error: float


def _truncation_error(s: torch.Tensor, rank: int) -> float:
    # s: (C, q) singular values of every channel's matrix
    total = s.pow(2).sum()
    if total == 0:
        return 0.0
    return float((s[:, rank:].pow(2).sum() / total).sqrt())


def _split_singular_values(u, s, vh, rank):
    # Share sqrt(S) between both factors so neither grows large in low precision.
    root = s[..., :rank].sqrt()
    return u[..., :rank] * root.unsqueeze(-2), vh[..., :rank, :] * root.unsqueeze(-1)


def singular_values(form: str, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Singular values of each per-channel matrix of an SVD form, shape ``(C, q)``."""
    w = weight.detach().to(torch.float64)
    if form == "dw-pw":
        mats = _per_input_channel(w, groups)
    elif form == "pw-dw":
        mats = w.flatten(2)
    else:
        raise ValueError(f"singular values exist for dw-pw and pw-dw only, not {form!r}")
    return torch.linalg.svdvals(mats)


def svd_dw_pw(weight: torch.Tensor, groups: int, rank: int) -> Decomposition:
    """Factor a kernel into depthwise then pointwise weights (per input channel).

    Returns:
        weights ``(dw, pw)`` of shapes ``(M*r, 1, kh, kw)`` and ``(N, Mg*r, 1, 1)``;
        the pointwise layer has ``groups`` groups.
    """
    n, mg, kh, kw = weight.shape
    ng, m = n // groups, mg * groups
    mats = _per_input_channel(weight.detach().to(torch.float64), groups)  # (M, Ng, k2)
    u, s, vh = torch.linalg.svd(mats, full_matrices=False)
    left, right = _split_singular_values(u, s, vh, rank)  # (M, Ng, r), (M, r, k2)

    # (M, r, k2) -> dw (M*r, 1, kh, kw): output channel m*r + j of the depthwise conv
    dw = right.reshape(m * rank, 1, kh, kw)
    # (M, Ng, r) -> (g, Ng, Mg, r) -> pw (N, Mg*r, 1, 1)
    pw = left.reshape(groups, mg, ng, rank).permute(0, 2, 1, 3).reshape(n, mg * rank, 1, 1)
    return Decomposition("dw-pw", rank, (dw.contiguous(), pw.contiguous()),
                         _truncation_error(s, rank))


def svd_pw_dw(weight: torch.Tensor, groups: int, rank: int) -> Decomposition:
    """Factor a kernel into pointwise then grouped spatial weights (per output channel).

    Returns:
        weights ``(pw, dw)`` of shapes ``(N*r, Mg, 1, 1)`` (``groups`` groups) and
        ``(N, r, kh, kw)`` (``N`` groups).
    """
    n, mg, kh, kw = weight.shape
    mats = weight.detach().to(torch.float64).reshape(n, mg, kh * kw)  # (N, Mg, k2)
    u, s, vh = torch.linalg.svd(mats, full_matrices=False)
    left, right = _split_singular_values(u, s, vh, rank)  # (N, Mg, r), (N, r, k2)

    # (N, Mg, r) -> pw (N*r, Mg, 1, 1): output channel n*r + j of the pointwise conv
    pw = left.transpose(1, 2).reshape(n * rank, mg, 1, 1)
    dw = right.reshape(n, rank, kh, kw)
    return Decomposition("pw-dw", rank, (pw.contiguous(), dw.contiguous()),
                         _truncation_error(s, rank))


@dataclass
class CPFactors:
    """Per-group CP factors of a kernel, ``W[g, n, m, s] = sum_r A[g,n,r] B[g,m,r] C[g,s,r]``.

    Shapes: ``A (g, Ng, R)``, ``B (g, Mg, R)``, ``C (g, k2, R)``.
    """

    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def to_weights(self, kernel_size: tuple[int, int]):
        """Return ``(pw_in, dw, pw_out)`` conv weights.

        Shapes: ``(g*R, Mg, 1, 1)``, ``(g*R, 1, kh, kw)``, ``(N, R, 1, 1)``.
        """
        g, ng, r = self.a.shape
        mg = self.b.shape[1]
        pw_in = self.b.transpose(1, 2).reshape(g * r, mg, 1, 1)
        dw = self.c.transpose(1, 2).reshape(g * r, 1, *kernel_size)
        pw_out = self.a.reshape(g * ng, r, 1, 1)
        return pw_in.contiguous(), dw.contiguous(), pw_out.contiguous()

    def reconstruct(self) -> torch.Tensor:
        """The kernel these factors stand for, shape ``(g, Ng, Mg, k2)``."""
        return torch.einsum("gnr,gmr,gsr->gnms", self.a, self.b, self.c)


def _grouped_3way(weight: torch.Tensor, groups: int) -> torch.Tensor:
    # (N, Mg, kh, kw) -> (g, Ng, Mg, k2)
    n, mg, kh, kw = weight.shape
    return weight.detach().to(torch.float64).reshape(groups, n // groups, mg, kh * kw)


def cp_exact(weight: torch.Tensor, groups: int) -> CPFactors:
    """An exact CP decomposition built from identity factors, at :func:`full_rank`.

    One of three constructions, whichever needs the fewest rank-1 terms:
    one term per (input channel, tap), per (output channel, tap) or per
    (output channel, input channel).
    """
    t = _grouped_3way(weight, groups)  # (g, Ng, Mg, k2)
    g, ng, mg, k2 = t.shape
    eye = {size: torch.eye(size, dtype=t.dtype, device=t.device) for size in {ng, mg, k2}}
    choice = min((mg * k2, "ms"), (ng * k2, "ns"), (ng * mg, "nm"))[1]
    if choice == "ms":
        # term (m, s): A = W[:, m, s], B = e_m, C = e_s
        a = t.reshape(g, ng, mg * k2)
        b = eye[mg].repeat_interleave(k2, dim=1).expand(g, mg, mg * k2)
        c = eye[k2].repeat(1, mg).expand(g, k2, mg * k2)
    elif choice == "ns":
        # term (n, s): A = e_n, B = W[n, :, s], C = e_s
        a = eye[ng].repeat_interleave(k2, dim=1).expand(g, ng, ng * k2)
        b = t.permute(0, 2, 1, 3).reshape(g, mg, ng * k2)
        c = eye[k2].repeat(1, ng).expand(g, k2, ng * k2)
    else:
        # term (n, m): A = e_n, B = e_m, C = W[n, m, :]
        a = eye[ng].repeat_interleave(mg, dim=1).expand(g, ng, ng * mg)
        b = eye[mg].repeat(1, ng).expand(g, mg, ng * mg)
        c = t.permute(0, 3, 1, 2).reshape(g, k2, ng * mg)
    return CPFactors(a.contiguous(), b.contiguous(), c.contiguous())


def cp_als(
    weight: torch.Tensor,
    groups: int,
    rank: int,
    *,
    n_iter_max: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
) -> CPFactors:
    """Rank-``rank`` CP decomposition of each group's kernel by TensorLy's ALS.

    At or above :func:`full_rank` the exact construction of :func:`cp_exact` is
    returned instead, since ALS would only approximate it.
    """
    shape = KernelShape.of(weight, groups)
    if rank >= full_rank("cp", shape):
        return cp_exact(weight, groups)

    import tensorly as tl
    from tensorly.decomposition import parafac

    t = _grouped_3way(weight, groups)
    factors = []
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        # The SVD initialisation fills ranks above a mode's size at random, and says so.
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        for group_kernel in t:  # (Ng, Mg, k2), one decomposition per group
            cp = parafac(
                group_kernel,
                rank,
                n_iter_max=n_iter_max,
                init="svd",
                tol=tol,
                random_state=seed,
                normalize_factors=False,
            )
            a, b, c = cp.factors
            a = a * cp.weights  # fold the CP weights into the output factor
            factors.append(_balance(a, b, c))
    a, b, c = (torch.stack(f) for f in zip(*factors))
    return CPFactors(a, b, c)


def _balance(a, b, c):
    # Give each rank-1 term's three vectors the same norm: the product is
    # unchanged and no factor overflows when cast to half precision.
    norms = [f.norm(dim=0).clamp_min(1e-300) for f in (a, b, c)]
    common = (norms[0] * norms[1] * norms[2]).pow(1 / 3)
    return tuple(f * (common / nrm) for f, nrm in zip((a, b, c), norms))


def decompose(form: str, weight: torch.Tensor, groups: int, rank: int, *,
              cp_iters: int = 100, seed: int = 0) -> Decomposition:
    """Factorize ``weight`` (``(N, Mg, kh, kw)``, ``groups`` groups) in ``form`` at ``rank``.

    ``rank`` is clamped to :func:`full_rank`; at full rank every form is exact.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    shape = KernelShape.of(weight, groups)
    rank = min(rank, full_rank(form, shape))
    if form == "dw-pw":
        return svd_dw_pw(weight, groups, rank)
    if form == "pw-dw":
        return svd_pw_dw(weight, groups, rank)
    if form == "cp":
        factors = cp_als(weight, groups, rank, n_iter_max=cp_iters, seed=seed)
        error = relative_error(weight, factors.reconstruct())
        return Decomposition("cp", factors.rank, factors.to_weights(shape.kernel_size), error)
    raise ValueError(f"unknown form {form!r}: expected one of {', '.join(FORMS)}")


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """``||W - W_approx|| / ||W||`` in the Frobenius norm (0 for an all-zero kernel)."""
    w = weight.detach().to(torch.float64).reshape(approx.shape)
    norm = w.norm()
    if norm == 0:
        return float((approx - w).norm())
    return float((w - approx).norm() / norm)


def svd_truncation_errors(form: str, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Relative weight error of an SVD form at every rank ``1..q``, shape ``(q,)``.

    Computed from the singular values alone: the error at rank ``r`` is the energy
    of the discarded values of all channels.
    """
    s2 = singular_values(form, weight, groups).pow(2)  # (C, q)
    total = s2.sum()
    if total == 0:
        return torch.zeros(s2.shape[1], dtype=torch.float64)
    discarded = total - s2.cumsum(dim=1).sum(dim=0)  # kept up to rank r, all channels
    return (discarded.clamp_min(0) / total).sqrt()


def error_curve(form: str, weight: torch.Tensor, groups: int, max_rank: int, *,
                grid: int = 8, cp_iters: int = 25, seed: int = 0) -> list[float]:
    """Relative weight error at every rank ``1..max_rank`` (index ``r - 1``).

    Exact for the SVD forms. For ``cp`` the error is measured at about ``grid``
    ranks spaced geometrically (with ``cp_iters`` ALS iterations each, fewer than
    a final decomposition uses) and interpolated in between.
    """
    if max_rank < 1:
        return []
    if form != "cp":
        errors = svd_truncation_errors(form, weight, groups)
        return [float(errors[min(r, len(errors)) - 1]) for r in range(1, max_rank + 1)]

    points = sorted({round(max_rank ** (i / max(grid - 1, 1))) for i in range(grid)})
    measured = []
    for rank in points:
        factors = cp_als(weight, groups, rank, n_iter_max=cp_iters, seed=seed)
        measured.append(relative_error(weight, factors.reconstruct()))
    # Keep the curve non-increasing: ALS from a different start can do worse at a higher rank.
    for i in range(1, len(measured)):
        measured[i] = min(measured[i], measured[i - 1])
    return [_interpolate(points, measured, r) for r in range(1, max_rank + 1)]


def _interpolate(xs: list[int], ys: list[float], x: int) -> float:
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[0] if x < xs[0] else ys[-1]
