"""MILAD: rotation invariants of 3D Zernike moments of a whole cluster.

Batched and differentiable in positions and weights.  Uhrin, *Through the eyes of a
descriptor* (MILAD), section II, and the ``milad`` package's conventions:

- density f(x) = sum_i w_i delta(x - x_i / R) (eq. 4), or normalised Gaussians of width
  sigma / R (eq. 6), of the positions scaled by the cutoff radius R into the unit ball;
- geometric moments m_stu = int x^s y^t z^u f(x) dx (eqs. 3, 5), s + t + u <= n_max;
- Zernike moments Omega_nl^m = (3 / 4 pi) sum_stu conj(chi_nlm^stu) m_stu (eqs. 28-31,
  Novotni and Klein's change of basis), layout (n, l, m) from
  :func:`zernike_indices` (n, then l, then m ascending; 120 moments for n_max = 7),
  complex; a real density has Omega^-m = (-1)^m conj(Omega^m);
- reconstruction f~(x) = sum_nlm Omega_nl^m Z_nl^m(x) (eq. 14), :func:`density_from_moments`;
- invariants: an algebraically independent set of Clebsch-Gordan couplings up to
  correlation order 4 (eqs. 19-22, section II C 2), 117 up to n = 7, shipped as
  ``structrecon/data/milad_invariants_n7.json`` (made by
  ``scripts/generate_milad_invariants.py``) and evaluated as sparse polynomials,
  :class:`MomentInvariants`.

Moments agree with ``milad.zernike.from_deltas`` / ``from_gaussians`` (0.3.1) to rounding
error; 78 of the 117 invariants are the same polynomials as in ``milad``'s own set (the
rest is a different but equivalent independent choice; see tests/test_milad.py).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import math
from typing import Any, ClassVar

import numpy as np
import torch

from .._errors import StructreconError
from ._spec import register_descriptor, spec_from_fields
from ._zernike import (
    NORMALISATION,
    gaussian_power_coefficients,
    monomial_exponents,
    n_max_of,
    zernike_coefficients,
    zernike_indices,
)

__all__ = [
    "CENTRES",
    "INVARIANT_SETS",
    "MiladSpec",
    "MomentInvariants",
    "centre_positions",
    "density_from_moments",
    "geometric_moments",
    "load_invariants",
    "milad_fn",
    "moments_from_real",
    "moments_to_real",
    "zernike_basis",
    "zernike_indices",
    "zernike_moments",
]

#: ways of placing the origin of the moments (see :func:`centre_positions`)
CENTRES = ("centroid", "miniball", "origin")
#: named invariant sets shipped in structrecon/data -> (file, largest n)
INVARIANT_SETS = {"n7": ("milad_invariants_n7.json", 7)}
FEATURES = ("delta", "gaussian")


# -- moments ------------------------------------------------------------------------------


def _weights_like(weights, positions: torch.Tensor) -> torch.Tensor:
    """Weights broadcast to [B, N] in the positions' dtype/device (None: all ones)."""
    if weights is None:
        return positions.new_ones(positions.shape[:2])
    w = torch.as_tensor(weights, dtype=positions.dtype, device=positions.device)
    if w.shape not in ((positions.shape[1],), tuple(positions.shape[:2])):
        raise ValueError(
            f"weights must be [N] or [B, N] for positions {tuple(positions.shape)}, "
            f"got {tuple(w.shape)}"
        )
    return w.expand(positions.shape[:2])


def _powers(x: torch.Tensor, order: int) -> torch.Tensor:
    """[..., 3] -> [..., 3, order + 1] powers x^0 .. x^order."""
    powers = [torch.ones_like(x)]
    for _ in range(order):
        powers.append(powers[-1] * x)
    return torch.stack(powers, dim=-1)


def _monomials(powers: torch.Tensor, order: int) -> torch.Tensor:
    """[..., 3, order + 1] coordinate powers -> [..., M] monomials x^s y^t z^u."""
    exps = torch.as_tensor(monomial_exponents(order), device=powers.device)
    return powers[..., 0, exps[:, 0]] * powers[..., 1, exps[:, 1]] * powers[..., 2, exps[:, 2]]


@functools.lru_cache(maxsize=None)
def _moment_gather(order: int):
    """(s, t) pairs with s + t <= order, and for each monomial its slot in [pairs, u]."""
    pairs = [(s, t) for s in range(order + 1) for t in range(order + 1 - s)]
    slot = {st: k for k, st in enumerate(pairs)}
    flat = [slot[(s, t)] * (order + 1) + u for s, t, u in monomial_exponents(order)]
    return np.array(pairs), np.array(flat)


def geometric_moments(
    positions: torch.Tensor,
    weights=None,
    order: int = 7,
    scale: float = 1.0,
    *,
    sigma=None,
) -> torch.Tensor:
    """Geometric moments m_stu of weighted deltas or Gaussians (Uhrin eqs. 3, 5, 6).

    Parameters
    ----------
    positions : [B, N, 3], same length unit as ``scale`` (Angstrom).
    weights : [N] or [B, N] feature weights w_i, or None for all ones.
    order : largest s + t + u.
    scale : radius mapped onto the unit ball (the cutoff, Angstrom); positions and sigma
        are divided by it.
    sigma : None for delta functions; else the Gaussian width (scalar, [N] or [B, N]),
        same unit as positions.  Each Gaussian is normalised to integrate to w_i.

    Returns
    -------
    [B, M] moments, monomials in the order of ``_zernike.monomial_exponents(order)``.
    Differentiable in positions, weights and sigma.
    """
    if positions.ndim != 3 or positions.shape[-1] != 3:
        raise ValueError(f"positions must be [B, N, 3], got {tuple(positions.shape)}")
    w = _weights_like(weights, positions)
    powers = _powers(positions / scale, order)  # [B, N, 3, K]
    if sigma is not None:
        s = torch.as_tensor(sigma, dtype=positions.dtype, device=positions.device) / scale
        s = s.expand(positions.shape[:2]) if s.ndim else s
        d = torch.as_tensor(gaussian_power_coefficients(order).copy(), dtype=positions.dtype)
        d = d.to(positions.device)
        # E[(mu + s X)^k] = sum_p mu^p D[p, k] s^(k - p), X standard normal
        lag = torch.arange(order + 1, device=positions.device)
        lag = (lag[None, :] - lag[:, None]).clamp_min(0)  # [p, k] -> k - p
        s_pow = _powers(s.reshape(*s.shape, 1).expand(*s.shape, 3), order)[..., 0, :]
        a = d * s_pow[..., lag]  # [..., p, k] (D is zero where k < p)
        if a.ndim == 2:
            powers = powers @ a
        else:
            powers = torch.einsum("bndp,bnpk->bndk", powers, a)
    # sum_i w_i x^s y^t z^u as a batched matrix product over atoms: [(s, t), N] @ [N, u]
    pairs, flat = _moment_gather(order)
    pairs = torch.as_tensor(pairs, device=positions.device)
    xy = powers[:, :, 0, pairs[:, 0]] * powers[:, :, 1, pairs[:, 1]] * w[..., None]  # [B, N, P]
    full = torch.bmm(xy.transpose(1, 2), powers[:, :, 2, :])  # [B, P, order + 1]
    return full.flatten(1)[:, torch.as_tensor(flat, device=positions.device)]


@functools.lru_cache(maxsize=16)
def _change_of_basis(n_max: int, dtype: torch.dtype, device: str):
    """(3 / 4 pi) conj(chi)^T split into real and imaginary parts: two [M, K] tensors."""
    chi = zernike_coefficients(n_max)
    w = NORMALISATION * np.conj(chi).T
    return (
        torch.as_tensor(w.real.copy(), dtype=dtype, device=device),
        torch.as_tensor(w.imag.copy(), dtype=dtype, device=device),
    )


def zernike_moments(
    positions: torch.Tensor,
    weights=None,
    n_max: int = 7,
    scale: float = 1.0,
    *,
    sigma=None,
) -> torch.Tensor:
    """3D Zernike moments Omega_nl^m (Uhrin eq. 30) of weighted deltas or Gaussians.

    Parameters
    ----------
    positions : [B, N, 3], relative to the origin of the expansion (no centring here).
    weights : [N] or [B, N] weights, or None for all ones.
    n_max : largest order n.
    scale : radius mapped onto the unit ball (the cutoff, Angstrom).
    sigma : None (deltas) or the Gaussian width, same unit as positions.

    Returns
    -------
    [B, K] complex moments, K = len(zernike_indices(n_max)) (120 for n_max = 7), layout
    (n, l, m) as :func:`zernike_indices`; complex128 for float64 positions.  The basis is
    orthonormal only inside the unit ball: keep the atoms within ``scale`` of the origin.
    Differentiable in positions and weights (and sigma).
    """
    geo = geometric_moments(positions, weights, n_max, scale, sigma=sigma)
    w_re, w_im = _change_of_basis(n_max, geo.dtype, str(geo.device))
    return torch.complex(geo @ w_re, geo @ w_im)


def zernike_basis(points: torch.Tensor, n_max: int = 7, scale: float = 1.0) -> torch.Tensor:
    """Zernike polynomials Z_nl^m at points: [..., 3] -> [..., K] complex (Uhrin eq. 28).

    ``points`` in the same unit as ``scale`` (they are divided by it).
    """
    powers = _powers(points / scale, n_max)
    chi = zernike_coefficients(n_max)
    mono = _monomials(powers, n_max)
    re = mono @ torch.as_tensor(chi.real.T.copy(), dtype=mono.dtype, device=mono.device)
    im = mono @ torch.as_tensor(chi.imag.T.copy(), dtype=mono.dtype, device=mono.device)
    return torch.complex(re, im)


def density_from_moments(
    moments: torch.Tensor, points: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Density reconstructed from moments, f~(x) = Re sum_nlm Omega_nl^m Z_nl^m(x) (eq. 14).

    Parameters
    ----------
    moments : [B, K] (or [K]) complex Zernike moments; n_max follows from K.
    points : [P, 3] or [B, P, 3] points, same unit as ``scale``.
    scale : the radius used for the moments.

    Returns
    -------
    [B, P] (or [P]) density in unit-ball coordinates (divide by scale^3 for per A^3);
    the grid for peak finding (Uhrin Algorithm 2).  Differentiable.  Only points within
    ``scale`` of the origin are meaningful (the polynomials grow fast outside; ``milad``
    sets them to zero): mask the rest.
    """
    single = moments.ndim == 1
    moments = moments[None] if single else moments
    points = torch.as_tensor(points, dtype=moments.real.dtype, device=moments.device)
    z = zernike_basis(points, n_max_of(moments.shape[-1]), scale)  # [P, K] or [B, P, K]
    if z.ndim == 2:
        out = moments.real @ z.real.T - moments.imag @ z.imag.T
    else:
        out = torch.einsum("bk,bpk->bp", moments.real, z.real) - torch.einsum(
            "bk,bpk->bp", moments.imag, z.imag
        )
    return out[0] if single else out


@functools.lru_cache(maxsize=None)
def _real_layout(n_moments: int):
    """Index arrays for the real coordinates of the moments of a real density."""
    idx = zernike_indices(n_max_of(n_moments))
    pos = {x: k for k, x in enumerate(idx)}
    zero = [pos[x] for x in idx if x[2] == 0]
    plus = [pos[x] for x in idx if x[2] > 0]
    minus = [pos[(n, ell, -m)] for (n, ell, m) in idx if m > 0]
    sign = [(-1) ** m for (_, _, m) in idx if m > 0]
    return zero, plus, minus, sign


def moments_to_real(moments: torch.Tensor) -> torch.Tensor:
    """[..., K] complex moments -> [..., K] real coordinates.

    At the slot of (n, l, 0): Re Omega^0; of (n, l, m > 0): Re Omega^m; of (n, l, -m):
    Im Omega^m.  For moments of a real density this loses nothing
    (:func:`moments_from_real` inverts it) -- the free variables of a moments fit.
    """
    zero, plus, minus, _ = _real_layout(moments.shape[-1])
    out = moments.real.clone()
    out[..., minus] = moments.imag[..., plus]
    out[..., zero] = moments.real[..., zero]
    return out


def moments_from_real(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`moments_to_real`: real coordinates -> complex moments.

    The result has Omega^-m = (-1)^m conj(Omega^m).  Differentiable.
    """
    zero, plus, minus, sign = _real_layout(x.shape[-1])
    s = torch.as_tensor(sign, dtype=x.dtype, device=x.device)
    re = torch.zeros_like(x)
    im = torch.zeros_like(x)
    re = re.index_copy(-1, torch.as_tensor(zero, device=x.device), x[..., zero])
    re = re.index_copy(-1, torch.as_tensor(plus, device=x.device), x[..., plus])
    im = im.index_copy(-1, torch.as_tensor(plus, device=x.device), x[..., minus])
    re = re.index_copy(-1, torch.as_tensor(minus, device=x.device), s * x[..., plus])
    im = im.index_copy(-1, torch.as_tensor(minus, device=x.device), -s * x[..., minus])
    return torch.complex(re, im)


# -- invariants -----------------------------------------------------------------------------


class MomentInvariants:
    """Rotation invariants of Zernike moments, each a sparse polynomial of the moments.

    ``inv(moments [B, K] complex) -> [B, F]`` real, differentiable (vectorised
    gather-multiply-sum per correlation order).  The moments must be those of a real
    density (Omega^-m = (-1)^m conj(Omega^m)); each conjugate pair of terms is evaluated
    once as twice its real part.

    Attributes
    ----------
    name : the set's name (``"n7"``).
    n_max : largest moment order used; the input needs K = len(zernike_indices(n_max)).
    labels : per invariant, its label (see ``_zernike.invariant_polynomial``).
    degrees : per invariant, the correlation order nu (1-4).
    max_orders : per invariant, the largest n of its moments.
    terms : per invariant, list of (coefficient, moment indices).
    """

    def __init__(self, name: str, n_max: int, labels, max_orders, terms):
        self.name = name
        self.n_max = int(n_max)
        self.labels = [tuple(int(v) for v in lab) for lab in labels]
        self.degrees = [lab[0] for lab in self.labels]
        self.max_orders = [int(v) for v in max_orders]
        self.terms = [[(float(c), tuple(int(i) for i in idx)) for c, idx in t] for t in terms]
        self.n_moments = len(zernike_indices(self.n_max))
        self._groups = self._compile()
        self._cache: dict = {}  # evaluation tensors per (dtype, device)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"MomentInvariants(name={self.name!r}, n_max={self.n_max}, n={len(self)})"

    def _compile(self):
        """Per correlation order: (indices [T, nu], coefficients [T], output slot [T])."""
        idx = zernike_indices(self.n_max)
        pos = {x: k for k, x in enumerate(idx)}
        mirror = [pos[(n, ell, -m)] for (n, ell, m) in idx]
        groups: dict[int, list] = {}
        for out, (nu, terms) in enumerate(zip(self.degrees, self.terms)):
            table = {tuple(sorted(i)): c for c, i in terms}
            for key, coef in table.items():
                if max(key) >= self.n_moments:
                    raise ValueError(f"invariant {self.labels[out]} uses moments beyond n_max")
                twin = tuple(sorted(mirror[i] for i in key))
                if twin == key:
                    groups.setdefault(nu, []).append((key, coef, out))
                elif key < twin:
                    other = table.get(twin)
                    if other is not None and abs(other - coef) <= 1e-9 * abs(coef):
                        groups.setdefault(nu, []).append((key, coef + other, out))
                    else:  # no conjugate partner: keep both terms as they are
                        groups.setdefault(nu, []).append((key, coef, out))
                        if other is not None:
                            groups[nu].append((twin, other, out))
                elif twin not in table:
                    groups.setdefault(nu, []).append((key, coef, out))
        return {
            nu: (
                np.array([k for k, _, _ in rows], dtype=np.int64).reshape(len(rows), nu),
                np.array([c for _, c, _ in rows]),
                np.array([o for _, _, o in rows], dtype=np.int64),
            )
            for nu, rows in sorted(groups.items())
        }

    def __call__(self, moments: torch.Tensor) -> torch.Tensor:
        """Invariants of moments [B, K] (K as n_max) -> [B, F] real."""
        if moments.ndim != 2 or moments.shape[-1] != self.n_moments:
            raise ValueError(
                f"moments must be [B, {self.n_moments}] (n_max = {self.n_max}), "
                f"got {tuple(moments.shape)}"
            )
        re, im = moments.real.contiguous(), moments.imag.contiguous()
        out = re.new_zeros(re.shape[0], len(self))
        for nu, (idx, coef, slot) in self._tensors(re.dtype, re.device).items():
            a, b = re.index_select(1, idx[0]), im.index_select(1, idx[0])
            for p in range(1, nu):
                c, d = re.index_select(1, idx[p]), im.index_select(1, idx[p])
                if p == nu - 1:
                    a = a * c - b * d  # only the real part of the last product
                else:
                    a, b = a * c - b * d, a * d + b * c
            out = out.index_add(1, slot, a * coef)
        return out

    def _tensors(self, dtype: torch.dtype, device: torch.device):
        key = (dtype, str(device))
        if key not in self._cache:
            self._cache[key] = {
                nu: (
                    [torch.as_tensor(col.copy(), device=device) for col in idx.T],
                    torch.as_tensor(coef, dtype=dtype, device=device),
                    torch.as_tensor(slot, device=device),
                )
                for nu, (idx, coef, slot) in self._groups.items()
            }
        return self._cache[key]


@functools.lru_cache(maxsize=None)
def _read_invariant_file(name: str):
    if name not in INVARIANT_SETS:
        raise StructreconError(
            f"unknown MILAD invariant set '{name}'; valid: {', '.join(INVARIANT_SETS)}"
        )
    filename, n_max = INVARIANT_SETS[name]
    text = importlib.resources.files("structrecon.data").joinpath(filename).read_text()
    data = json.loads(text)
    if [tuple(x) for x in data["moments"]] != list(zernike_indices(n_max)):
        raise ValueError(f"{filename}: moment layout differs from zernike_indices({n_max})")
    return data


@functools.lru_cache(maxsize=None)
def load_invariants(n_max: int = 7, name: str = "n7") -> MomentInvariants:
    """The shipped independent invariant set ``name``, restricted to moments up to n_max.

    The set is ordered by the largest n it uses, so its part up to any n_max is itself
    algebraically independent and complete: K(n_max) - 3 invariants (117 for n_max = 7).
    Cached; the returned object is shared.
    """
    data = _read_invariant_file(name)
    if not 0 <= n_max <= data["n_max"]:
        raise StructreconError(
            f"MILAD invariant set '{name}' goes up to n_max = {data['n_max']}, got {n_max}"
        )
    keep = [inv for inv in data["invariants"] if inv["max_order"] <= n_max]
    return MomentInvariants(
        name,
        n_max,
        [inv["label"] for inv in keep],
        [inv["max_order"] for inv in keep],
        [inv["terms"] for inv in keep],
    )


# -- centring --------------------------------------------------------------------------------


def _circumcentre(points: torch.Tensor) -> torch.Tensor:
    """Centre of the smallest sphere through points [k, 3] within their affine hull."""
    if points.shape[0] == 1:
        return points[0]
    a = points[1:] - points[0]
    d = 0.5 * (a * a).sum(-1)
    return points[0] + torch.linalg.pinv(a) @ d


def miniball_support(pos: torch.Tensor) -> torch.Tensor:
    """Indices of the atoms pos [N, 3] on their smallest enclosing sphere (``miniball``).

    ``miniball`` shuffles the points with a generator it seeds once per process, and its
    centre then differs in the last bits from run to run; here it gets a fixed one, so
    that a run is the same in every process.
    """
    import miniball

    x = pos.detach().double().cpu().numpy()
    c, r2 = miniball.get_bounding_ball(x, rng=np.random.default_rng(0))
    dist2 = ((x - c) ** 2).sum(-1)
    return torch.as_tensor(np.flatnonzero(dist2 >= r2 * (1 - 1e-9) - 1e-12), device=pos.device)


def centre_positions(positions: torch.Tensor, centre: str = "centroid") -> torch.Tensor:
    """Translate each structure so that its centre is the origin: [B, N, 3] -> [B, N, 3].

    ``centroid``: the mean position (unweighted; smooth, so the invariants stay
    differentiable).  ``miniball``: the centre of the smallest enclosing sphere (the
    paper's QM9 set-up, Uhrin section IV A), found with the ``miniball`` package and
    recomputed differentiably as the circumcentre of the atoms on that sphere (one call
    per structure; the gradient is exact away from changes of those atoms).  ``origin``:
    no translation (the caller chose the frame).
    """
    if centre == "centroid":
        return positions - positions.mean(dim=1, keepdim=True)
    if centre == "origin":
        return positions
    if centre == "miniball":
        try:
            import miniball  # noqa: F401 - a clear error here if it is missing
        except ImportError:  # pragma: no cover - optional dependency
            raise StructreconError(
                "MILAD centre 'miniball' needs the miniball package (pip install miniball)"
            ) from None
        centres = [_circumcentre(pos[miniball_support(pos)]) for pos in positions]
        return positions - torch.stack(centres)[:, None, :]
    raise StructreconError(f"unknown MILAD centre '{centre}'; valid: {', '.join(CENTRES)}")


# -- spec -------------------------------------------------------------------------------------


@register_descriptor
@dataclasses.dataclass(frozen=True, kw_only=True)
class MiladSpec:
    """MILAD: rotation invariants of the Zernike moments of a whole cluster (global).

    Parameters
    ----------
    n_max : largest Zernike order n (<= 7 with the shipped invariant set ``n7``).
    cutoff : radius R of the sphere mapped onto the unit ball, Angstrom; positions are
        divided by it (``milad``'s ``descriptor(cutoff=R)``).  Atoms farther than R from
        the centre are kept (``milad`` drops them) but the basis is orthonormal only
        inside, so choose R to hold the structure.
    feature : ``delta`` (eq. 4) or ``gaussian`` (eq. 6, normalised to the weight).
    sigma : Gaussian width, Angstrom (``gaussian`` only).
    species : atomic numbers with a weight each; empty means any element, weight 1.
    weights : weight w_i per entry of ``species`` (given in the same order); empty means
        all 1 (positions only).
    centre : origin of the moments, one of :data:`CENTRES` (see
        :func:`centre_positions`); ``centroid`` (default) keeps the fingerprint smooth and
        translation invariant; ``miniball`` is the paper's set-up; ``origin`` uses the
        positions as given.
    invariants : name of the independent invariant set (:data:`INVARIANT_SETS`).

    ``build`` returns ``fn(positions [B, N, 3], weights=None) -> [B, 1, F]``, a global
    descriptor (pool with ``none``); ``weights`` ([N] or [B, N]) replaces the species
    weights, e.g. as free variables when recovering species.
    """

    n_max: int = 7
    cutoff: float = 5.0
    feature: str = "delta"
    sigma: float = 0.0
    species: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()
    centre: str = "centroid"
    invariants: str = "n7"

    kind: ClassVar[str] = "milad"

    def __post_init__(self):
        set_ = object.__setattr__
        if isinstance(self.n_max, bool) or int(self.n_max) != self.n_max:
            raise StructreconError(f"MILAD n_max must be an integer, got {self.n_max!r}")
        set_(self, "n_max", int(self.n_max))
        set_(self, "cutoff", float(self.cutoff))
        set_(self, "sigma", float(self.sigma))
        species = [int(z) for z in self.species]
        weights = [float(w) for w in self.weights]
        if weights and len(weights) != len(species):
            raise StructreconError(
                f"MILAD weights ({len(weights)}) must match species ({len(species)}) one to one"
            )
        if len(set(species)) != len(species):
            raise StructreconError(f"MILAD species must be distinct, got {species}")
        if species and (min(species) < 1 or max(species) > 118):
            raise StructreconError(f"MILAD species must be atomic numbers 1-118, got {species}")
        order = np.argsort(species, kind="stable")
        set_(self, "species", tuple(species[i] for i in order))
        set_(self, "weights", tuple(weights[i] for i in order) if weights else ())
        if self.invariants not in INVARIANT_SETS:
            raise StructreconError(
                f"unknown MILAD invariant set '{self.invariants}'; "
                f"valid: {', '.join(INVARIANT_SETS)}"
            )
        largest = INVARIANT_SETS[self.invariants][1]
        if not 0 <= self.n_max <= largest:
            raise StructreconError(
                f"MILAD n_max must be 0-{largest} for invariant set '{self.invariants}', "
                f"got {self.n_max}"
            )
        if not self.cutoff > 0:
            raise StructreconError(f"MILAD cutoff must be positive, got {self.cutoff}")
        if self.feature not in FEATURES:
            raise StructreconError(
                f"unknown MILAD feature '{self.feature}'; valid: {', '.join(FEATURES)}"
            )
        if self.feature == "gaussian" and not self.sigma > 0:
            raise StructreconError(f"MILAD gaussian features need sigma > 0, got {self.sigma}")
        if self.feature == "delta" and self.sigma != 0:
            raise StructreconError("MILAD sigma is only used with feature 'gaussian'")
        if any(not (math.isfinite(w) and w > 0) for w in self.weights):
            raise StructreconError(f"MILAD weights must be positive, got {list(self.weights)}")
        if self.centre not in CENTRES:
            raise StructreconError(
                f"unknown MILAD centre '{self.centre}'; valid: {', '.join(CENTRES)}"
            )

    @property
    def n_features(self) -> int:
        """Number of invariants (117 for n_max = 7)."""
        return len(load_invariants(self.n_max, self.invariants))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict form (lists, floats)."""
        return {
            "n_max": self.n_max,
            "cutoff": self.cutoff,
            "feature": self.feature,
            "sigma": self.sigma,
            "species": list(self.species),
            "weights": list(self.weights),
            "centre": self.centre,
            "invariants": self.invariants,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MiladSpec:
        """Inverse of :meth:`to_dict`; unknown keys are errors naming the valid ones."""
        return spec_from_fields(cls, data)

    def weights_for(self, numbers) -> np.ndarray:
        """Weight of each atom: [N] float64 (error for an element without a weight)."""
        numbers = np.asarray(numbers, dtype=np.int64)
        if not self.species:
            return np.ones(len(numbers))
        missing = sorted(set(numbers.tolist()) - set(self.species))
        if missing:
            raise StructreconError(
                f"structure has element(s) {missing} that the MILAD spec does not weight "
                f"(species {list(self.species)})"
            )
        if not self.weights:
            return np.ones(len(numbers))
        table = dict(zip(self.species, self.weights))
        return np.array([table[int(z)] for z in numbers])

    def reach(self, positions) -> float:
        """The largest distance of an atom from this spec's centre, Angstrom.

        ``positions`` [N, 3].  Beyond ``cutoff`` the Zernike basis is not orthonormal,
        and reconstruction (``invert --method milad``) assumes every atom inside.
        """
        x = torch.as_tensor(np.asarray(positions, dtype=float))[None]
        return float(centre_positions(x, self.centre)[0].norm(dim=-1).max())

    def build(self, numbers, cell=None, pbc=None):
        """See :func:`milad_fn`."""
        return milad_fn(self, numbers, cell, pbc)


def milad_fn(spec: MiladSpec, numbers, cell=None, pbc=None):
    """Return ``fn(positions [B, N, 3], weights=None) -> invariants [B, 1, F]``.

    Parameters
    ----------
    spec : the MILAD specification.
    numbers : [N] atomic numbers (fixed for the group).
    cell, pbc : clusters only; a periodic structure is an error.

    The function centres each structure (``spec.centre``), divides by the cutoff, takes
    the Zernike moments of the weighted features and evaluates the invariants; it is
    differentiable in positions and weights, vectorised over B (``miniball`` centring
    calls the package once per structure).  Attributes: ``n_features``; ``weights``
    ([N] numpy, the species weights); ``invariants`` (:class:`MomentInvariants`);
    ``moments(positions, weights=None) -> [B, K]`` complex, the centred, scaled moments
    that ``fn`` takes the invariants of.
    """
    if pbc is not None and np.any(np.asarray(pbc, dtype=bool)):
        raise StructreconError("MILAD describes clusters only; got a periodic structure")
    numbers = np.asarray(numbers, dtype=np.int64)
    n_atoms = len(numbers)
    species_weights = spec.weights_for(numbers)
    invariants = load_invariants(spec.n_max, spec.invariants)
    sigma = spec.sigma if spec.feature == "gaussian" else None

    def moments(positions: torch.Tensor, weights=None) -> torch.Tensor:
        if positions.ndim != 3 or positions.shape[1:] != (n_atoms, 3):
            raise ValueError(f"positions must be [B, {n_atoms}, 3], got {tuple(positions.shape)}")
        w = species_weights if weights is None else weights
        x = centre_positions(positions, spec.centre)
        return zernike_moments(x, w, spec.n_max, spec.cutoff, sigma=sigma)

    def fn(positions: torch.Tensor, weights=None) -> torch.Tensor:
        return invariants(moments(positions, weights))[:, None, :]

    fn.n_features = len(invariants)
    fn.weights = species_weights
    fn.invariants = invariants
    fn.moments = moments
    return fn
