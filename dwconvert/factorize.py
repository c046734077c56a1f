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

import contextlib
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
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


@dataclass
class Whitening:
    """Lower Cholesky factors of a conv's input second moments, in float64.

    With whitening, a factorization minimises the error of the layer's output on
    the calibration data instead of the error of its kernel: for an input patch
    covariance ``C = L L^T`` the output error of a kernel change ``D`` is
    ``||D L||``. ``dw-pw`` uses one ``k2 x k2`` factor per input channel (exact
    for each channel's contribution); ``pw-dw`` and ``cp`` approximate each
    group's ``(Mg*k2)^2`` covariance by a Kronecker product of a channel and a
    tap covariance, ``C ~ C_channel (x) C_tap / trace``.

    Attributes:
        patch: ``(M, k2, k2)``, per input channel.
        channel: ``(g, Mg, Mg)``, per group, summed over taps.
        spatial: ``(g, k2, k2)``, per group, summed over its channels.
        trace: ``(g,)``, the trace of each group's full patch covariance.
        out_energy: the summed squared layer output, to make errors relative.
    """

    patch: torch.Tensor
    channel: torch.Tensor
    spatial: torch.Tensor
    trace: torch.Tensor
    out_energy: float

    @classmethod
    def from_moments(cls, patch: torch.Tensor, channel: torch.Tensor, out_energy: float,
                     patch_sum: torch.Tensor | None = None, count: int = 0,
                     ridge: float = 1e-3) -> Whitening:
        """Build from summed second moments ``patch (M, k2, k2)``, ``channel (g, Mg, Mg)``.

        With the summed patches ``patch_sum (M, k2)`` over ``count`` positions, the
        moments are centred first: the response to the mean patch is a constant
        that a bias can absorb, and would otherwise dominate the fit of inputs
        that are mostly positive (after a ReLU).
        """
        g = channel.shape[0]
        m, k2, _ = patch.shape
        if patch_sum is not None and count > 0:
            mean = patch_sum / count  # (M, k2)
            patch = patch - count * mean[:, :, None] * mean[:, None, :]
            mg = mean.reshape(g, m // g, k2)
            channel = channel - count * torch.einsum("gms,gns->gmn", mg, mg)
        spatial = patch.reshape(g, m // g, k2, k2).sum(dim=1)
        trace = channel.diagonal(dim1=1, dim2=2).sum(dim=1).clamp_min(1e-300)
        return cls(_cholesky(patch, ridge), _cholesky(channel, ridge), _cholesky(spatial, ridge),
                   trace, float(out_energy))


def _cholesky(cov: torch.Tensor, ridge: float) -> torch.Tensor:
    # Regularise by a fraction of the mean eigenvalue, so dead inputs stay invertible;
    # centring can leave a constant input's variance slightly negative, so the ridge
    # grows until the factorization succeeds.
    d = cov.shape[-1]
    cov = (cov + cov.transpose(-2, -1)) / 2
    diag = cov.diagonal(dim1=-2, dim2=-1)
    scale = diag.clamp_min(0).mean(dim=-1).clamp_min(1e-12)
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    for boost in (1.0, 10.0, 100.0, 1e3, 1e4):
        chol, info = torch.linalg.cholesky_ex(cov + (ridge * boost * scale)[..., None, None] * eye)
        if not info.any():
            return chol
    raise ValueError("input statistics are not positive definite even with a large ridge; "
                     "are the calibration images finite and varied?")


def _right_unwhiten(x: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    # x L^{-1}: undo a whitening applied on the right
    return torch.linalg.solve_triangular(chol, x, upper=False, left=False)


def _left_unwhiten(x: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    # L^{-T} x: undo a whitening L^T applied on the left
    return torch.linalg.solve_triangular(chol.transpose(-2, -1), x, upper=True)


def output_error(delta: torch.Tensor, groups: int, whitening: Whitening) -> float:
    """Estimated relative output error of a kernel change ``delta`` ``(N, Mg, kh, kw)``.

    Uses the Kronecker model of each group's patch covariance, so it counts the
    interaction of all input channels (the per-channel factors do not).
    """
    n, mg = delta.shape[:2]
    d = delta.to(torch.float64).reshape(groups, n // groups, mg, -1)  # (g, Ng, Mg, k2)
    lc, ls = whitening.channel, whitening.spatial
    white = torch.einsum("gmi,gnms,gsj->gnij", lc, d, ls)
    sq = (white.pow(2).sum(dim=(1, 2, 3)) / whitening.trace).sum()
    return float((sq / whitening.out_energy).sqrt()) if whitening.out_energy > 0 else 0.0


def _svd_problem(form: str, weight: torch.Tensor, groups: int,
                 whitening: Whitening | None):
    """The batch of matrices whose truncated SVDs give ``form``, and the error norm.

    Returns ``(mats, norm2)``: ``(M, Ng, k2)`` for ``dw-pw`` or ``(N, Mg, k2)`` for
    ``pw-dw`` (whitened if asked), and the squared norm that makes errors relative.
    """
    w = weight.detach().to(torch.float64)
    n, mg, kh, kw = w.shape
    if form == "dw-pw":
        mats = _per_input_channel(w, groups)
        if whitening is not None:
            mats = mats @ whitening.patch
    elif form == "pw-dw":
        mats = w.reshape(n, mg, kh * kw)
        if whitening is not None:
            per_out = n // groups
            lc = whitening.channel.repeat_interleave(per_out, dim=0)  # (N, Mg, Mg)
            ls = whitening.spatial.repeat_interleave(per_out, dim=0)  # (N, k2, k2)
            scale = whitening.trace.repeat_interleave(per_out).sqrt()[:, None, None]
            mats = lc.transpose(1, 2) @ mats @ ls / scale
    else:
        raise ValueError(f"the SVD forms are dw-pw and pw-dw, not {form!r}")
    norm2 = whitening.out_energy if whitening is not None else float(w.pow(2).sum())
    return mats, norm2


def _truncation_error(s: torch.Tensor, rank: int, norm2: float) -> float:
    # s: (C, q) singular values of every channel's matrix
    if norm2 <= 0:
        return 0.0
    return float((s[:, rank:].pow(2).sum() / norm2).sqrt())


def _split_singular_values(u, s, vh, rank):
    # Share sqrt(S) between both factors so neither grows large in low precision.
    root = s[..., :rank].sqrt()
    return u[..., :rank] * root.unsqueeze(-2), vh[..., :rank, :] * root.unsqueeze(-1)


def singular_values(form: str, weight: torch.Tensor, groups: int,
                    whitening: Whitening | None = None) -> torch.Tensor:
    """Singular values of each per-channel matrix of an SVD form, shape ``(C, q)``."""
    mats, _ = _svd_problem(form, weight, groups, whitening)
    return torch.linalg.svdvals(mats)


def svd_dw_pw(weight: torch.Tensor, groups: int, rank: int,
              whitening: Whitening | None = None) -> Decomposition:
    """Factor a kernel into depthwise then pointwise weights (per input channel).

    Returns:
        weights ``(dw, pw)`` of shapes ``(M*r, 1, kh, kw)`` and ``(N, Mg*r, 1, 1)``;
        the pointwise layer has ``groups`` groups.
    """
    n, mg, kh, kw = weight.shape
    ng, m = n // groups, mg * groups
    mats, norm2 = _svd_problem("dw-pw", weight, groups, whitening)  # (M, Ng, k2)
    u, s, vh = torch.linalg.svd(mats, full_matrices=False)
    left, right = _split_singular_values(u, s, vh, rank)  # (M, Ng, r), (M, r, k2)
    if whitening is not None:
        right = _right_unwhiten(right, whitening.patch)

    # (M, r, k2) -> dw (M*r, 1, kh, kw): output channel m*r + j of the depthwise conv
    dw = right.reshape(m * rank, 1, kh, kw)
    # (M, Ng, r) -> (g, Ng, Mg, r) -> pw (N, Mg*r, 1, 1)
    pw = left.reshape(groups, mg, ng, rank).permute(0, 2, 1, 3).reshape(n, mg * rank, 1, 1)
    result = Decomposition("dw-pw", rank, (dw.contiguous(), pw.contiguous()),
                           _truncation_error(s, rank, norm2))
    if whitening is not None:
        # The per-channel spectra ignore how channels' errors add up; use the full model.
        result.error = output_error(weight.detach().to(torch.float64)
                                    - reconstruct(result, groups), groups, whitening)
    return result


def svd_pw_dw(weight: torch.Tensor, groups: int, rank: int,
              whitening: Whitening | None = None) -> Decomposition:
    """Factor a kernel into pointwise then grouped spatial weights (per output channel).

    Returns:
        weights ``(pw, dw)`` of shapes ``(N*r, Mg, 1, 1)`` (``groups`` groups) and
        ``(N, r, kh, kw)`` (``N`` groups).
    """
    n, mg, kh, kw = weight.shape
    mats, norm2 = _svd_problem("pw-dw", weight, groups, whitening)  # (N, Mg, k2)
    u, s, vh = torch.linalg.svd(mats, full_matrices=False)
    left, right = _split_singular_values(u, s, vh, rank)  # (N, Mg, r), (N, r, k2)
    if whitening is not None:
        per_out = n // groups
        root = whitening.trace.repeat_interleave(per_out).pow(0.25)[:, None, None]
        left = _left_unwhiten(left, whitening.channel.repeat_interleave(per_out, dim=0)) * root
        right = _right_unwhiten(right, whitening.spatial.repeat_interleave(per_out, dim=0)) * root

    # (N, Mg, r) -> pw (N*r, Mg, 1, 1): output channel n*r + j of the pointwise conv
    pw = left.transpose(1, 2).reshape(n * rank, mg, 1, 1)
    dw = right.reshape(n, rank, kh, kw)
    return Decomposition("pw-dw", rank, (pw.contiguous(), dw.contiguous()),
                         _truncation_error(s, rank, norm2))


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
        return _cp_kernel(self.a, self.b, self.c)


def _cp_kernel(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``sum_r a[..n,r] b[..m,r] c[..s,r]`` as one matmul: ``(..., Ng, Mg, k2)``.

    The Khatri-Rao product of ``b`` and ``c`` (``R x Mg*k2``) is the only
    intermediate; a three-way einsum would build an ``Ng x Mg x R`` tensor first.
    """
    mg, k2 = b.shape[-2], c.shape[-2]
    kr = b.transpose(-2, -1)[..., :, :, None] * c.transpose(-2, -1)[..., :, None, :]
    kernel = a @ kr.reshape(*kr.shape[:-2], mg * k2)
    return kernel.reshape(*kernel.shape[:-1], mg, k2)


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
    whitening: Whitening | None = None,
) -> CPFactors:
    """Rank-``rank`` CP decomposition of each group's kernel by TensorLy's ALS.

    With ``whitening`` the decomposition is fitted in the whitened space (the
    channel and tap modes multiplied by the Cholesky factors), so that it
    minimises the estimated output error, and the factors are mapped back.
    At or above :func:`full_rank` the exact construction of :func:`cp_exact` is
    returned instead, since ALS would only approximate it.
    """
    return _cp(weight, groups, rank, n_iter_max, tol, seed, whitening)[0]


def _cp(weight, groups, rank, n_iter_max, tol, seed, whitening):
    """CP factors and the squared fitting error (whitened if asked), and its norm."""
    shape = KernelShape.of(weight, groups)
    t = _grouped_3way(weight, groups)  # (g, Ng, Mg, k2)
    if rank >= full_rank("cp", shape):
        norm2 = whitening.out_energy if whitening is not None else float(t.pow(2).sum())
        return cp_exact(weight, groups), 0.0, norm2

    import tensorly as tl
    from tensorly.decomposition import parafac

    if whitening is not None:
        # (g, Ng, Mg, k2) x_channel Lc^T x_tap Ls^T / sqrt(trace)
        scale = whitening.trace.sqrt()[:, None, None, None]
        t = torch.einsum("gnms,gmi,gsj->gnij", t, whitening.channel, whitening.spatial) / scale
    factors, sq_error = [], 0.0
    with tl.backend_context("pytorch"), _lean_mttkrp(), warnings.catch_warnings():
        # The SVD initialisation fills ranks above a mode's size at random, and says so.
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        for group_kernel in t:  # (Ng, Mg, k2), one decomposition per group
            init = _svd_init(group_kernel, rank, seed)
            cp = parafac(group_kernel, rank, n_iter_max=n_iter_max, init=init, tol=tol,
                         random_state=seed, normalize_factors=False)
            a, b, c = cp.factors
            a = a * cp.weights  # fold the CP weights into the output factor
            # In place: no more kernel-sized temporaries than the reconstruction.
            sq_error += float(_cp_kernel(a, b, c).sub_(group_kernel).pow_(2).sum())
            factors.append((a, b, c))
    a, b, c = (torch.stack(f) for f in zip(*factors))
    if whitening is not None:
        a = a * whitening.trace.sqrt()[:, None, None]
        b = _left_unwhiten(b, whitening.channel)
        c = _left_unwhiten(c, whitening.spatial)
    norm2 = whitening.out_energy if whitening is not None else float(t.pow(2).sum())
    a, b, c = _balance(a, b, c)
    return CPFactors(a, b, c), sq_error, norm2


def _mttkrp(tensor: torch.Tensor, cp_tensor, mode: int) -> torch.Tensor:
    """``unfold(tensor, mode) @ khatri_rao(other factors)`` of a 3-way kernel, lean.

    TensorLy forms the Khatri-Rao product of the two other factors: for the tap
    mode that is ``(Ng*Mg, R)``, several times the kernel. Here, for
    ``tensor (Ng, Mg, k2)`` and factors ``A (Ng, R)``, ``B (Mg, R)``, ``C (k2, R)``,
    every intermediate is at most ``max(Ng*Mg, Mg*k2 * min(R, Ng))`` entries:
    ``X = A^T T`` over the output mode, in chunks of at most ``Ng`` ranks.
    """
    weights, (a, b, c) = cp_tensor
    if weights is not None:
        a = a * weights
    ng, mg, k2 = tensor.shape
    if mode == 0:
        kr = (b[:, None, :] * c[None, :, :]).reshape(mg * k2, -1)  # (Mg*k2, R)
        return tensor.reshape(ng, mg * k2) @ kr
    flat = tensor.reshape(ng, mg * k2)
    parts = []
    for lo in range(0, a.shape[1], max(1, ng)):
        hi = min(a.shape[1], lo + max(1, ng))
        x = (a[:, lo:hi].T @ flat).reshape(hi - lo, mg, k2)  # (r, Mg, k2)
        if mode == 1:
            parts.append((x * c[:, lo:hi].T[:, None, :]).sum(dim=2).T)  # (Mg, r)
        else:
            parts.append((x * b[:, lo:hi].T[:, :, None]).sum(dim=1).T)  # (k2, r)
    return torch.cat(parts, dim=1)


@contextlib.contextmanager
def _lean_mttkrp():
    """Make TensorLy's ALS use :func:`_mttkrp` for 3-way tensors while inside.

    TensorLy dispatches ``unfolding_dot_khatri_rao`` to its current tenalg backend;
    the backend's own method is put back on exit (not safe across threads).
    """
    import tensorly.tenalg as tenalg

    backend = tenalg.current_backend()
    original = backend.unfolding_dot_khatri_rao

    def lean(tensor, cp_tensor, mode):
        if tensor.ndim == 3 and isinstance(tensor, torch.Tensor):
            return _mttkrp(tensor, cp_tensor, mode)
        return original(tensor, cp_tensor, mode)

    tenalg.register_backend_method("unfolding_dot_khatri_rao", lean)
    try:
        yield
    finally:
        tenalg.register_backend_method("unfolding_dot_khatri_rao", original)


def _svd_init(t: torch.Tensor, rank: int, seed: int):
    """TensorLy's SVD initialisation of CP, from the Gram matrix of each mode.

    For an ``(Ng, Mg, k2)`` kernel, TensorLy's ``init="svd"`` takes an economy SVD
    of each unfolding, e.g. ``Mg x Ng*k2``, which for a 1024-channel 3x3 conv needs
    more than a gigabyte and minutes. The leading left singular vectors of an
    unfolding ``X`` are the leading eigenvectors of ``X X^T``, a matrix the size of
    one mode (at most ``max(Ng, Mg)`` squared), built without copying ``X``. As in
    TensorLy: the first factor is scaled by the singular values, signs make each
    column's largest entry positive, and ranks above a mode's size are filled with
    uniform random columns.
    """
    from tensorly.cp_tensor import CPTensor

    rng = np.random.RandomState(seed)
    # (Ng, Ng), (Mg, Mg), (k2, k2)
    grams = (torch.einsum("nms,pms->np", t, t), torch.einsum("nms,nps->mp", t, t),
             torch.einsum("nms,nmp->sp", t, t))
    factors = []
    for mode, gram in enumerate(grams):
        values, vectors = torch.linalg.eigh(gram)  # ascending
        values, vectors = values.flip(0)[:rank], vectors.flip(1)[:, :rank]
        signs = torch.sign(vectors.gather(0, vectors.abs().argmax(0, keepdim=True)))
        vectors = vectors * torch.where(signs == 0, 1.0, signs)
        if mode == 0:
            vectors = vectors * values.clamp_min(0).sqrt()
        if vectors.shape[1] < rank:
            extra = torch.from_numpy(rng.random_sample((gram.shape[0], rank - vectors.shape[1])))
            vectors = torch.cat([vectors, extra.to(vectors)], dim=1)
        factors.append(vectors)
    return CPTensor((torch.ones(rank, dtype=t.dtype, device=t.device), factors))


def _balance(a, b, c):
    # Give each rank-1 term's three vectors the same norm: the product is
    # unchanged and no factor overflows when cast to half precision.
    # Shapes (g, Ng, R), (g, Mg, R), (g, k2, R); norms over the middle dim.
    norms = [f.norm(dim=-2, keepdim=True).clamp_min(1e-300) for f in (a, b, c)]
    common = (norms[0] * norms[1] * norms[2]).pow(1 / 3)
    return tuple(f * (common / nrm) for f, nrm in zip((a, b, c), norms))


def decompose(form: str, weight: torch.Tensor, groups: int, rank: int, *,
              cp_iters: int = 100, seed: int = 0,
              whitening: Whitening | None = None) -> Decomposition:
    """Factorize ``weight`` (``(N, Mg, kh, kw)``, ``groups`` groups) in ``form`` at ``rank``.

    ``rank`` is clamped to :func:`full_rank`; at full rank every form is exact.
    Without ``whitening`` the decomposition minimises the kernel's error and
    ``error`` is the relative weight error; with it, the decomposition minimises
    the estimated output error and ``error`` is that estimate, relative to the
    layer's output on the calibration data.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    shape = KernelShape.of(weight, groups)
    rank = min(rank, full_rank(form, shape))
    if form == "dw-pw":
        return svd_dw_pw(weight, groups, rank, whitening)
    if form == "pw-dw":
        return svd_pw_dw(weight, groups, rank, whitening)
    if form == "cp":
        factors, sq_error, norm2 = _cp(weight, groups, rank, cp_iters, 1e-6, seed, whitening)
        error = (sq_error / norm2) ** 0.5 if norm2 > 0 else 0.0
        return Decomposition("cp", factors.rank, factors.to_weights(shape.kernel_size), error)
    raise ValueError(f"unknown form {form!r}: expected one of {', '.join(FORMS)}")


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """``||W - W_approx|| / ||W||`` in the Frobenius norm (0 for an all-zero kernel)."""
    w = weight.detach().to(torch.float64).reshape(approx.shape)
    approx = approx.detach().to(torch.float64)
    norm = w.norm()
    if norm == 0:
        return float((approx - w).norm())
    return float((w - approx).norm() / norm)


def svd_truncation_errors(form: str, weight: torch.Tensor, groups: int,
                          whitening: Whitening | None = None) -> torch.Tensor:
    """Relative error of an SVD form at every rank ``1..q``, shape ``(q,)``.

    Computed from the singular values alone: the error at rank ``r`` is the energy
    of the discarded values of all channels (weight error, or with ``whitening``
    the estimated output error).
    """
    mats, norm2 = _svd_problem(form, weight, groups, whitening)
    s2 = torch.linalg.svdvals(mats).pow(2)  # (C, q)
    if norm2 <= 0:
        return torch.zeros(s2.shape[1], dtype=torch.float64)
    discarded = s2.sum() - s2.cumsum(dim=1).sum(dim=0)  # kept up to rank r, all channels
    return (discarded.clamp_min(0) / norm2).sqrt()


def error_curve(form: str, weight: torch.Tensor, groups: int, max_rank: int, *,
                cp_ranks: Sequence[int] | None = None, cp_iters: int = 10, seed: int = 0,
                whitening: Whitening | None = None) -> list[float]:
    """Relative error at every rank ``1..max_rank`` (index ``r - 1``).

    The weight error, or with ``whitening`` the estimated output error. Exact for
    the SVD forms. For ``cp`` the error is measured only at ``cp_ranks`` (four
    geometrically spaced ranks by default), with ``cp_iters`` ALS iterations each,
    and interpolated linearly in between, from error 1 at rank 0 to error 0 at
    the full rank: ALS is the expensive step of a conversion.
    """
    if max_rank < 1:
        return []
    if form == "dw-pw" and whitening is not None:
        return [decompose(form, weight, groups, r, whitening=whitening).error
                for r in range(1, max_rank + 1)]
    if form != "cp":
        errors = svd_truncation_errors(form, weight, groups, whitening)
        return [float(errors[min(r, len(errors)) - 1]) for r in range(1, max_rank + 1)]

    if cp_ranks is None:
        cp_ranks = [round(max_rank ** (i / 3)) for i in range(4)]
    points = sorted({min(max(1, int(r)), max_rank) for r in cp_ranks})
    measured = []
    for rank in points:
        _, sq_error, norm2 = _cp(weight, groups, rank, cp_iters, 1e-6, seed, whitening)
        measured.append((sq_error / norm2) ** 0.5 if norm2 > 0 else 0.0)
    # Keep the curve non-increasing: ALS from a different start can do worse at a higher rank.
    for i in range(1, len(measured)):
        measured[i] = min(measured[i], measured[i - 1])
    full = full_rank("cp", KernelShape.of(weight, groups))
    xs, ys = [0, *points, max(full, points[-1] + 1)], [1.0, *measured, 0.0]
    return [_interpolate(xs, ys, r) for r in range(1, max_rank + 1)]


def _interpolate(xs: list[int], ys: list[float], x: int) -> float:
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[0] if x < xs[0] else ys[-1]


def reconstruct(decomposition: Decomposition, groups: int) -> torch.Tensor:
    """The ``(N, Mg, kh, kw)`` kernel that a decomposition's layer weights compute."""
    form, weights, r = decomposition.form, decomposition.weights, decomposition.rank
    if form == "dw-pw":
        dw, pw = weights  # (M*r, 1, kh, kw), (N, Mg*r, 1, 1)
        kh, kw = dw.shape[-2:]
        n, mg = pw.shape[0], pw.shape[1] // r
        a = pw.reshape(groups, n // groups, mg, r)
        b = dw.reshape(groups, mg, r, kh * kw)
        return torch.einsum("gnmj,gmjs->gnms", a, b).reshape(n, mg, kh, kw)
    if form == "pw-dw":
        pw, dw = weights  # (N*r, Mg, 1, 1), (N, r, kh, kw)
        n, _, kh, kw = dw.shape
        mg = pw.shape[1]
        return torch.einsum("njm,njs->nms", pw.reshape(n, r, mg),
                            dw.reshape(n, r, kh * kw)).reshape(n, mg, kh, kw)
    if form == "cp":
        pw_in, dw, pw_out = weights  # (g*R, Mg, 1, 1), (g*R, 1, kh, kw), (N, R, 1, 1)
        kh, kw = dw.shape[-2:]
        n, mg = pw_out.shape[0], pw_in.shape[1]
        a = pw_out.reshape(groups, n // groups, r)
        b = pw_in.reshape(groups, r, mg).transpose(1, 2)
        c = dw.reshape(groups, r, kh * kw).transpose(1, 2)
        return _cp_kernel(a, b, c).reshape(n, mg, kh, kw)
    raise ValueError(f"unknown form {form!r}: expected one of {', '.join(FORMS)}")
