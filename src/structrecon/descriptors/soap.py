"""SOAP power spectrum (nu = 2) with featomic's conventions, batched and differentiable.

Definitions (Bartok, Kondor, Csanyi, PRB 87, 184201 (2013); Uhrin 2021 section II B,
eqs. 10 and 20; the conventions of featomic's ``SoapPowerSpectrum``):

- neighbour density of atom i, one channel per neighbour species a:
  rho_i^a(r) = sum_{j in a} f_c(r_ij) g(r - r_ij) (+ w_c g(r) for the centre itself,
  in its own species channel), with the L2-normalised Gaussian
  g(r) = (pi sigma^2)^(-3/4) exp(-r^2 / (2 sigma^2));
- smoothing ``ShiftedCosine``: f_c(r) = 1 for r <= r_c - d,
  (1 + cos(pi (r - r_c + d) / d)) / 2 up to r_c, 0 beyond;
- GTO radial basis R_n(r) ~ r^n exp(-r^2 / (2 sigma_n^2)), n = 0 .. max_radial,
  sigma_n = r_c max(sqrt(n), 1) / (max_radial + 1), made orthonormal on [0, inf)
  with the symmetric (Loewdin) S^(-1/2) of their overlap matrix;
- real orthonormal spherical harmonics Y_lm, m = -l .. l;
- expansion (Uhrin eq. 10): c^a_nlm(i) = <R_n Y_lm | rho_i^a>. For one neighbour at
  distance r this is I_nl(r) Y_lm(r_hat), with the radial integral (closed form through
  Kummer's 1F1, Bartok 2013; featomic's ``SoapRadialIntegralGto``)
  I_nl(r) = sum_k W_nk (pi / sigma^2)^(3/4) exp(-c r^2) (c r)^l
  Gamma(a_k) / Gamma(l + 3/2) (c + b_k)^(-a_k) 1F1(a_k; l + 3/2; c^2 r^2 / (c + b_k)),
  c = 1 / (2 sigma^2), b_k = 1 / (2 sigma_k^2), a_k = (k + l + 3) / 2, W = S^(-1/2);
- power spectrum (Uhrin eq. 20, real harmonics):
  p^{ab}_{l n1 n2}(i) = s_ab (-1)^l / sqrt(2l + 1) sum_m c^a_{n1 lm} c^b_{n2 lm},
  for neighbour species pairs a <= b, with s_ab = sqrt(2) for a != b (the (b, a) block
  is folded in) and 1 for a = b.

Feature order per atom: species pair (a <= b, increasing atomic numbers, a-major), then
l, n1, n2 -- featomic's ``keys_to_properties(["neighbor_1_type", "neighbor_2_type"])``
layout with properties ``(l, n_1, n_2)``.  Pairs with a species absent from the
structure are exactly zero.

The radial integrals are tabulated once per spec (the series of 1F1 summed in log space
in float64) and interpolated by quintic Hermite splines (values, first and second
derivatives at the knots, 20 knots per sigma), so values agree with featomic's exact
(``spline_accuracy=None``) evaluation to ~1e-12 and autograd position gradients with
featomic's to ~1e-10, relative to the largest value (featomic's default splines,
``spline_accuracy=1e-8``, are themselves ~1e-8 off).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.special import gammaln

from .._errors import StructreconError
from ..structures import lattice_shifts, neighbour_geometry
from ._spec import register_descriptor, spec_from_fields

__all__ = ["SoapSpec", "gto_orthonormalization", "radial_integral", "soap_fn"]

#: knot spacing of the radial-integral splines, in units of the density width sigma
_KNOTS_PER_SIGMA = 20
#: batches are evaluated in chunks whose largest intermediate has at most this many elements
_CHUNK_ELEMENTS = 500_000


@register_descriptor
@dataclasses.dataclass(frozen=True, kw_only=True)
class SoapSpec:
    """SOAP power spectrum, per atom, matching featomic's ``SoapPowerSpectrum``.

    Parameters
    ----------
    cutoff : cutoff radius r_c, Angstrom (featomic ``Cutoff(radius)``).
    cutoff_width : width d of the shifted-cosine smoothing, Angstrom, 0 < d <= r_c
        (featomic ``ShiftedCosine(width)``).
    density_width : width sigma of the Gaussian atomic density, Angstrom
        (featomic ``Gaussian(width)``).
    max_radial : largest radial index n; there are ``max_radial + 1`` GTO functions
        (featomic ``Gto(max_radial)``).
    max_angular : largest angular channel l (featomic ``TensorProduct(max_angular)``).
    species : atomic numbers resolved as neighbour channels, any order (stored sorted).
    center_weight : weight of the centre atom's own Gaussian in its density (featomic
        ``center_atom_weight``, default 1).

    featomic's optional radial scaling of the density is not supported (none is used).
    """

    cutoff: float
    cutoff_width: float
    density_width: float
    max_radial: int
    max_angular: int
    species: tuple[int, ...]
    center_weight: float = 1.0

    kind: ClassVar[str] = "soap"

    def __post_init__(self):
        set_ = object.__setattr__
        for name in ("cutoff", "cutoff_width", "density_width", "center_weight"):
            set_(self, name, float(getattr(self, name)))
        for name in ("max_radial", "max_angular"):
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise StructreconError(f"SOAP {name} must be an integer >= 0, got {value!r}")
            set_(self, name, int(value))
        set_(self, "species", tuple(sorted({int(z) for z in self.species})))
        if not self.cutoff > 0:
            raise StructreconError(f"SOAP cutoff must be positive, got {self.cutoff}")
        if not 0 < self.cutoff_width <= self.cutoff:
            raise StructreconError(
                f"SOAP cutoff_width must be in (0, cutoff={self.cutoff}], got {self.cutoff_width}"
            )
        if not self.density_width > 0:
            raise StructreconError(f"SOAP density_width must be positive, got {self.density_width}")
        if not self.species or min(self.species) < 1 or max(self.species) > 118:
            raise StructreconError(f"SOAP species must be atomic numbers 1-118, got {self.species}")
        if self.max_radial > 20 or self.max_angular > 12:
            raise StructreconError(
                f"SOAP supports max_radial <= 20 and max_angular <= 12, got "
                f"{self.max_radial} and {self.max_angular}"
            )
        if self.cutoff / self.density_width > 60:
            raise StructreconError(
                "SOAP cutoff / density_width must be <= 60, got "
                f"{self.cutoff / self.density_width:g}"
            )

    @property
    def n_pairs(self) -> int:
        """Number of unordered neighbour species pairs (a <= b)."""
        s = len(self.species)
        return s * (s + 1) // 2

    @property
    def n_features(self) -> int:
        """Features per atom: pairs x (max_angular + 1) x (max_radial + 1)^2."""
        return self.n_pairs * (self.max_angular + 1) * (self.max_radial + 1) ** 2

    def to_dict(self) -> dict[str, Any]:
        """Plain dict form (lists, floats, ints)."""
        return {
            "cutoff": self.cutoff,
            "cutoff_width": self.cutoff_width,
            "density_width": self.density_width,
            "max_radial": self.max_radial,
            "max_angular": self.max_angular,
            "species": list(self.species),
            "center_weight": self.center_weight,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SoapSpec:
        """Read the dict form; unknown keys are errors naming the valid ones."""
        return spec_from_fields(cls, dict(data))

    def build(self, numbers, cell=None, pbc=None):
        """See :func:`soap_fn`."""
        return soap_fn(self, numbers, cell, pbc)

    def feature_labels(self) -> list[tuple[int, int, int, int, int]]:
        """(Z_a, Z_b, l, n1, n2) of each per-atom feature, in order."""
        nr = self.max_radial + 1
        return [
            (a, b, deg, n1, n2)
            for i, a in enumerate(self.species)
            for b in self.species[i:]
            for deg in range(self.max_angular + 1)
            for n1 in range(nr)
            for n2 in range(nr)
        ]


# ----------------------------------------------------------------------------------------
# radial basis and radial integrals (numpy, float64, once per spec)


def _gto_widths(max_radial: int, cutoff: float) -> np.ndarray:
    """sigma_n = r_c max(sqrt(n), 1) / (max_radial + 1), Angstrom: [max_radial + 1]."""
    n = np.arange(max_radial + 1)
    return cutoff * np.maximum(np.sqrt(n), 1.0) / (max_radial + 1)


def gto_orthonormalization(max_radial: int, cutoff: float) -> np.ndarray:
    """Matrix W with orthonormal R_n = sum_k W_nk r^k exp(-r^2 / (2 sigma_k^2)).

    W = S^(-1/2) diag(N), with N_k the L2 normalisation of the k-th primitive GTO on
    [0, inf) (weight r^2) and S the overlap matrix of the normalised primitives.
    Returns [max_radial + 1, max_radial + 1] float64.
    """
    sigma = _gto_widths(max_radial, cutoff)
    n = np.arange(max_radial + 1)
    log_norm = 0.5 * (np.log(2.0) - (2 * n + 3) * np.log(sigma) - gammaln(n + 1.5))
    b = 0.5 / sigma**2
    a = 0.5 * (n[:, None] + n[None, :] + 3)
    log_overlap = (
        gammaln(a)
        - np.log(2.0)
        - a * np.log(b[:, None] + b[None, :])
        + log_norm[:, None]
        + log_norm[None, :]
    )
    eigval, eigvec = np.linalg.eigh(np.exp(log_overlap))
    if eigval.min() <= 1e-12 * eigval.max():
        raise StructreconError(
            f"SOAP GTO overlap matrix is singular for max_radial={max_radial}; use fewer "
            "radial functions"
        )
    return (eigvec / np.sqrt(eigval)) @ eigvec.T * np.exp(log_norm)[None, :]


def radial_integral(spec: SoapSpec, r) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact radial integrals I_nl(r) and their first two r-derivatives.

    Sums the power series of exp(-c r^2) r^l 1F1(a; l + 3/2; c^2 r^2 / (c + b_k)) in
    r^(l + 2t) term by term in log space (all terms positive, so no cancellation),
    then orthonormalises over the primitive index k (see the module docstring).

    Parameters
    ----------
    spec : the SOAP spec (cutoff, density width, max_radial, max_angular).
    r : [P] distances, Angstrom, >= 0.

    Returns
    -------
    values, first and second derivatives (per Angstrom), each [P, max_radial + 1,
    max_angular + 1] float64.
    """
    r = np.atleast_1d(np.asarray(r, dtype=float))
    order = np.argsort(r)
    out = [np.zeros((len(r), spec.max_radial + 1, spec.max_angular + 1)) for _ in range(3)]
    # chunks of increasing r, each summed to the number of terms its largest r needs
    chunk = 16
    for start in range(0, len(r), chunk):
        idx = order[start : start + chunk]
        for dst, src in zip(out, _primitive_integrals(spec, r[idx])):
            dst[idx] = src
    w = gto_orthonormalization(spec.max_radial, spec.cutoff)
    return tuple(np.einsum("nk,pkl->pnl", w, x) for x in out)


def _primitive_integrals(spec: SoapSpec, r: np.ndarray):
    """Radial integrals of the primitive GTOs and two r-derivatives: 3 x [P, K, L]."""
    n_rad, n_ang = spec.max_radial + 1, spec.max_angular + 1
    c = 0.5 / spec.density_width**2
    b = 0.5 / _gto_widths(spec.max_radial, spec.cutoff) ** 2  # [K] primitive constants
    z_max = c * c * float(r.max()) ** 2 / (c + b.min())
    n_terms = int(z_max + 12.0 * math.sqrt(z_max) + 40)
    prim = np.arange(n_rad)[:, None, None]
    ell = np.arange(n_ang)[None, :, None]
    t = np.arange(n_terms)[None, None, :]
    a = 0.5 * (prim + ell + 3)
    # log A_{k l t}: coefficient of r^(l + 2t) exp(-c r^2) for primitive k
    log_coef = (
        0.75 * math.log(math.pi / spec.density_width**2)
        + ell * math.log(c)
        - a * np.log(c + b)[:, None, None]
        + gammaln(a + t)
        - gammaln(ell + 1.5 + t)
        - gammaln(t + 1.0)
        + t * np.log(c * c / (c + b))[:, None, None]
    )  # [K, L, T]
    power = ell + 2 * t  # [1, L, T]
    positive = r > 0
    log_r = np.log(np.where(positive, r, 1.0))[:, None, None, None]  # [P, 1, 1, 1]
    base = log_coef[None] - c * r[:, None, None, None] ** 2  # [P, K, L, T]

    # terms A_t r^p exp(-c r^2), p = l + 2t; derivatives bring p / r and p (p - 1) / r^2
    terms = np.exp(base + power * log_r)  # [P, K, L, T]
    inv_r = 1.0 / np.where(positive, r, 1.0)[:, None, None]
    s0 = terms.sum(-1)
    s1 = (terms * power).sum(-1) * inv_r
    s2 = (terms * (power * (power - 1))).sum(-1) * inv_r**2
    rr = r[:, None, None]
    values = s0
    first = s1 - 2 * c * rr * s0
    second = s2 - 2 * c * (2 * rr * s1 + s0) + 4 * c * c * rr * rr * s0
    if not positive.all():
        # r = 0: only the lowest powers survive (r^-1, r^-2 come with zero factors)
        a0, a1 = np.exp(log_coef[:, :, 0]), np.exp(log_coef[:, :, 1])  # [K, L]
        v0, d0, s0_ = (np.zeros((n_rad, n_ang)) for _ in range(3))
        v0[:, 0] = a0[:, 0]
        s0_[:, 0] = 2 * a1[:, 0] - 2 * c * a0[:, 0]
        if n_ang > 1:
            d0[:, 1] = a0[:, 1]
        if n_ang > 2:
            s0_[:, 2] = 2 * a0[:, 2]
        values[~positive], first[~positive], second[~positive] = v0, d0, s0_
    return values, first, second


@functools.lru_cache(maxsize=16)
def _spline_table(
    cutoff: float, density_width: float, max_radial: int, max_angular: int
) -> tuple[np.ndarray, float]:
    """Quintic Hermite power coefficients of I_nl on [0, r_c]: ([K, 6, l * n], h)."""
    spec = SoapSpec(
        cutoff=cutoff,
        cutoff_width=cutoff,
        density_width=density_width,
        max_radial=max_radial,
        max_angular=max_angular,
        species=(1,),
    )
    n_intervals = max(16, int(math.ceil(_KNOTS_PER_SIGMA * cutoff / density_width)))
    h = cutoff / n_intervals
    knots = np.linspace(0.0, cutoff, n_intervals + 1)
    f, d, s = (x.transpose(0, 2, 1).reshape(len(knots), -1) for x in radial_integral(spec, knots))
    f0, f1 = f[:-1], f[1:]
    d0, d1 = h * d[:-1], h * d[1:]
    s0, s1 = h * h * s[:-1], h * h * s[1:]
    coef = np.stack(
        [
            f0,
            d0,
            0.5 * s0,
            -10 * f0 - 6 * d0 - 1.5 * s0 + 0.5 * s1 - 4 * d1 + 10 * f1,
            15 * f0 + 8 * d0 + 1.5 * s0 - s1 + 7 * d1 - 15 * f1,
            -6 * f0 - 3 * d0 - 0.5 * s0 + 0.5 * s1 - 3 * d1 + 6 * f1,
        ],
        axis=1,
    )
    return coef, h


# ----------------------------------------------------------------------------------------
# torch pieces


def _shifted_cosine(r: torch.Tensor, cutoff: float, width: float) -> torch.Tensor:
    """Shifted-cosine smoothing (featomic ``ShiftedCosine``): 1, then a half cosine."""
    x = ((r - (cutoff - width)) / width).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * x))


def _real_spherical_harmonics(unit: torch.Tensor, lmax: int) -> torch.Tensor:
    """Real orthonormal spherical harmonics of unit vectors: [..., 3] -> [..., (lmax+1)^2].

    Index l^2 + l + m for m = -l .. l; Y_l,m>0 ~ cos(m phi), Y_l,m<0 ~ sin(|m| phi),
    without the Condon-Shortley phase.  Built from Re/Im (x + i y)^m and the
    z-polynomials d^m P_l / dz^m, so everything is a polynomial in the unit vector.
    """
    x, y, z = unit.unbind(-1)
    cos_m = [torch.ones_like(x)]
    sin_m = [torch.zeros_like(x)]
    for _ in range(lmax):
        c, s = cos_m[-1], sin_m[-1]
        cos_m.append(x * c - y * s)
        sin_m.append(x * s + y * c)
    # q[l][m] = d^m P_l / dz^m
    q = [[None] * (lmax + 1) for _ in range(lmax + 1)]
    for m in range(lmax + 1):
        q[m][m] = torch.full_like(z, float(np.prod(np.arange(1, 2 * m, 2))))
        if m + 1 <= lmax:
            q[m + 1][m] = (2 * m + 1) * z * q[m][m]
        for deg in range(m + 2, lmax + 1):
            q[deg][m] = ((2 * deg - 1) * z * q[deg - 1][m] - (deg + m - 1) * q[deg - 2][m]) / (
                deg - m
            )
    out = []
    for deg in range(lmax + 1):
        for m in range(-deg, deg + 1):
            am = abs(m)
            norm = math.sqrt(
                (2 * deg + 1)
                / (4 * math.pi)
                * math.exp(gammaln(deg - am + 1) - gammaln(deg + am + 1))
            )
            if m == 0:
                out.append(norm * q[deg][0])
            else:
                trig = cos_m[am] if m > 0 else sin_m[am]
                out.append(math.sqrt(2.0) * norm * q[deg][am] * trig)
    return torch.stack(out, dim=-1)


def _spline_eval(r: torch.Tensor, coef: torch.Tensor, h: float) -> torch.Tensor:
    """Evaluate the quintic splines at r (clamped to the table): [...] -> [..., F]."""
    n_int = coef.shape[0]
    t = r / h
    idx = t.detach().floor().clamp(0, n_int - 1)
    u = (t - idx)[..., None]
    c = coef.index_select(0, idx.long().flatten()).reshape(*r.shape, *coef.shape[1:])
    out = c[..., 5, :]
    for p in (4, 3, 2, 1, 0):
        out = out * u + c[..., p, :]
    return out


def soap_fn(spec: SoapSpec, numbers, cell=None, pbc=None):
    """Return ``fn(positions [B, N, 3]) -> SOAP power spectra [B, N, F]``.

    Parameters
    ----------
    spec : the SOAP specification.
    numbers : [N] atomic numbers (fixed for the composition group).
    cell : [3, 3] Angstrom, rows are lattice vectors, or None for a cluster.
    pbc : three booleans (None: no periodicity).

    Clusters use each unordered pair once (Y_lm(-r) = (-1)^l Y_lm(r)); periodic cells
    use the (atom, shift) slots of :func:`structrecon.structures.neighbour_geometry`.
    The function is differentiable in the positions; dtype and device follow them.
    """
    numbers = np.asarray(numbers, dtype=np.int64)
    missing = sorted(set(numbers.tolist()) - set(spec.species))
    if missing:
        raise StructreconError(
            f"structure has element(s) {missing} that the SOAP spec does not resolve "
            f"(species {list(spec.species)})"
        )
    pbc_arr = np.zeros(3, dtype=bool) if pbc is None else np.asarray(pbc, dtype=bool)
    cell_np = cell.detach().cpu().numpy() if isinstance(cell, torch.Tensor) else cell
    shifts = lattice_shifts(cell_np, pbc_arr, spec.cutoff)
    periodic = shifts.shape[0] > 1
    n_atoms = len(numbers)
    n_rad, n_ang = spec.max_radial + 1, spec.max_angular + 1
    n_lm = n_ang * n_ang
    coef_np, h = _spline_table(spec.cutoff, spec.density_width, spec.max_radial, spec.max_angular)
    ell = np.arange(n_ang)
    l_of_lm = np.repeat(ell, 2 * ell + 1)

    # neighbour species present in the structure; the others give exactly zero features
    present = sorted(set(numbers.tolist()))
    n_present = len(present)
    local = np.searchsorted(np.asarray(present), numbers)  # [N] index into present
    # the centre's own Gaussian: w_c I_n0(0) Y_00 in its species channel (l = 0)
    center = np.zeros((n_atoms, n_present, n_lm, n_rad))
    i0 = radial_integral(spec, np.zeros(1))[0][0, :, 0]
    center[np.arange(n_atoms), local, 0, :] = spec.center_weight * i0 / math.sqrt(4 * math.pi)

    # power spectrum: per l one batched product over atoms of [m, (species, n)] blocks,
    # then a gather of the (a <= b) species blocks into featomic's (pair, l, n1, n2)
    # order (pairs with an absent species point at an appended zero), and the sqrt(2)
    # of the cross-species pairs.
    width = n_present * n_rad
    factors = [(-1.0) ** deg / math.sqrt(2 * deg + 1) for deg in ell]
    gather = np.full((spec.n_pairs, n_ang, n_rad, n_rad), n_ang * width * width)
    scale = np.zeros((spec.n_pairs, 1))
    pair_list = [(a, b) for i, a in enumerate(spec.species) for b in spec.species[i:]]
    n1, n2 = np.meshgrid(np.arange(n_rad), np.arange(n_rad), indexing="ij")
    for q, (za, zb) in enumerate(pair_list):
        if za in present and zb in present:
            sa, sb = present.index(za), present.index(zb)
            for deg in ell:
                gather[q, deg] = (deg * width + sa * n_rad + n1) * width + sb * n_rad + n2
            scale[q] = 1.0 if sa == sb else math.sqrt(2.0)

    if not periodic:
        pair_i, pair_j = np.triu_indices(n_atoms, k=1)
        fwd = pair_i * n_present + local[pair_j]  # row (centre i, species of j)
        rev = pair_j * n_present + local[pair_i]  # row (centre j, species of i)
    cache: dict[tuple, dict] = {}

    def constants(dtype, device):
        key = (dtype, device)
        if key not in cache:
            as_t = lambda x: torch.as_tensor(x, dtype=dtype, device=device)  # noqa: E731
            as_i = lambda x: torch.as_tensor(x, dtype=torch.long, device=device)  # noqa: E731
            cache[key] = {
                "coef": as_t(coef_np),
                "l_of_lm": as_i(l_of_lm),
                "parity": as_t((-1.0) ** l_of_lm)[:, None],
                "center": as_t(center),
                "gather": as_i(gather.ravel()),
                "scale": as_t(scale),
                "onehot": as_t(np.eye(n_present)[local]),
            }
            if not periodic:
                cache[key]["fwd"], cache[key]["rev"] = as_i(fwd), as_i(rev)
        return cache[key]

    def fn(positions: torch.Tensor) -> torch.Tensor:
        if positions.ndim != 3 or positions.shape[1:] != (n_atoms, 3):
            raise ValueError(f"positions must be [B, {n_atoms}, 3], got {tuple(positions.shape)}")
        dtype, device = positions.dtype, positions.device
        k = constants(dtype, device)
        neighbour = None
        if periodic:
            cell_t = torch.as_tensor(cell, dtype=dtype, device=device)
            geo = neighbour_geometry(positions, cell_t, pbc_arr, shifts, spec.cutoff)
            vec, r, neighbour = geo.vectors, geo.distances, geo.neighbour  # [B, N, M, ...]
        else:
            vec = positions[:, pair_j] - positions[:, pair_i]  # [B, P, 3], r_j - r_i
            r = torch.linalg.norm(vec, dim=-1)
        inside = r < spec.cutoff
        r_in = torch.where(inside, r, torch.zeros_like(r))
        fc = torch.where(
            inside, _shifted_cosine(r_in, spec.cutoff, spec.cutoff_width), torch.zeros_like(r)
        )
        ylm = _real_spherical_harmonics(vec / r[..., None], spec.max_angular)  # [..., lm]
        # largest intermediates per structure: pair expansion x, products of the couplings
        per_structure = max(r[0].numel() * n_lm * n_rad, n_atoms * n_ang * width * width)
        chunk = max(1, _CHUNK_ELEMENTS // per_structure)
        if positions.shape[0] <= chunk:
            return _expand_and_couple(r_in, fc, ylm, neighbour, k)
        # the heavy part in chunks of the batch keeps every intermediate small
        # (cache-resident, and below the size at which each allocation is a fresh,
        # page-faulting mmap); split (not slicing) keeps the backward one concatenation
        parts = zip(r_in.split(chunk), fc.split(chunk), ylm.split(chunk))
        return torch.cat([_expand_and_couple(*p, neighbour, k) for p in parts], dim=0)

    def _expand_and_couple(r_in, fc, ylm, neighbour, k):
        """Density coefficients c_anlm of every atom, then their power spectrum."""
        n_batch = r_in.shape[0]
        radial = _spline_eval(r_in, k["coef"], h) * fc[..., None]  # [..., L * n], l-major
        radial = radial.unflatten(-1, (n_ang, n_rad)).index_select(-2, k["l_of_lm"])
        x = (radial * ylm[..., None]).flatten(-2)  # [..., lm * n]: one neighbour's c_nlm
        if periodic:
            dens = torch.einsum("bimk,ms->bisk", x, k["onehot"][neighbour])
            dens = dens.reshape(n_batch, n_atoms, n_present, n_lm, n_rad)
        else:
            zeros = x.new_zeros(n_batch, n_atoms * n_present, n_lm * n_rad)
            # centre i sees r_ij, centre j sees -r_ij: Y_lm(-r) = (-1)^l Y_lm(r)
            dens = zeros.index_add(1, k["fwd"], x).reshape(n_batch, n_atoms, n_present, n_lm, n_rad)
            rev = zeros.index_add(1, k["rev"], x).reshape(n_batch, n_atoms, n_present, n_lm, n_rad)
            dens = dens + rev * k["parity"]
        dens = (dens + k["center"]).reshape(n_batch * n_atoms, n_present, n_lm, n_rad)
        # p_l = C_l^T (f_l C_l) for C_l = [m, (species, n)], f_l = (-1)^l / sqrt(2l + 1)
        blocks = dens.transpose(1, 2).reshape(-1, n_lm, width).split(list(2 * ell + 1), dim=1)
        full = [(cl.transpose(1, 2) @ (cl * f)).flatten(1) for cl, f in zip(blocks, factors)]
        full = torch.cat(full + [full[0].new_zeros(1, 1).expand(full[0].shape[0], 1)], dim=1)
        power = full.index_select(1, k["gather"]).reshape(
            n_batch, n_atoms, spec.n_pairs, n_ang * n_rad * n_rad
        )
        return (power * k["scale"]).reshape(n_batch, n_atoms, spec.n_features)

    fn.n_features = spec.n_features
    return fn
