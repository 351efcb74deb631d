"""Exact building blocks of the MILAD descriptor (private).

3D Zernike polynomials in Cartesian form, Clebsch-Gordan coefficients, and rotation
invariants of Zernike moments as sparse polynomials.

Everything here is NumPy / pure Python and is computed once (cached); the differentiable,
batched functions that use these tables live in :mod:`structrecon.descriptors.milad`.

Conventions (Uhrin, *Through the eyes of a descriptor*, section II, eqs. 27-31; Novotni and
Klein 2004):

- Zernike indices (n, l, m): 0 <= l <= n, n - l even, -l <= m <= l; the moment layout is
  n ascending, then l ascending, then m ascending (:func:`zernike_indices`); 120 entries
  up to n = 7.
- Z_nl^m(x) = (-i)^m sqrt(4 pi / 3) R_nl(|x|) Y_l^m(x / |x|), with Y_l^m the orthonormal
  spherical harmonics with the Condon-Shortley phase and R_nl(r) = r^l p(r^2) the radial
  polynomials orthonormal with weight r^2 on [0, 1], leading coefficient positive.  Then
  (3 / 4 pi) <Z_nl^m, Z_n'l'^m'> = delta over the unit ball (eq. 29).  The factor (-i)^m
  is the phase of Novotni and Klein's harmonic polynomials (a rotation by pi/2 about z of
  the textbook Y_l^m); it is kept so that moments agree with theirs and with the
  ``milad`` package.  Rotation invariants do not depend on it (their terms have
  sum m = 0).
- Moments of a density f: Omega_nl^m = (3 / 4 pi) sum_i w_i conj(Z_nl^m(x_i)) for weighted
  delta functions (eq. 30); real densities give Omega^-m = (-1)^m conj(Omega^m).
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import numpy as np

__all__ = [
    "clebsch_gordan",
    "gaussian_power_coefficients",
    "invariant_polynomial",
    "monomial_exponents",
    "zernike_coefficients",
    "zernike_indices",
]

#: normalisation of the Zernike moments, Omega = (3 / 4 pi) <f | Z> (Uhrin eq. 30)
NORMALISATION = 3.0 / (4.0 * math.pi)


@functools.lru_cache(maxsize=None)
def zernike_indices(n_max: int) -> tuple[tuple[int, int, int], ...]:
    """All (n, l, m) with n <= n_max, l <= n, n - l even, |m| <= l; n, then l, then m ascending."""
    return tuple(
        (n, l, m)
        for n in range(n_max + 1)
        for l in range(n % 2, n + 1, 2)  # noqa: E741
        for m in range(-l, l + 1)
    )


@functools.lru_cache(maxsize=None)
def n_max_of(n_moments: int) -> int:
    """The n_max whose :func:`zernike_indices` has ``n_moments`` entries."""
    for n_max in range(64):
        count = len(zernike_indices(n_max))
        if count == n_moments:
            return n_max
        if count > n_moments:
            break
    raise ValueError(f"{n_moments} is not a number of Zernike moments up to some n_max")


@functools.lru_cache(maxsize=None)
def monomial_exponents(order: int) -> tuple[tuple[int, int, int], ...]:
    """Exponents (s, t, u) of the monomials x^s y^t z^u with s + t + u <= order.

    Degree ascending; within a degree s descending, then t descending.
    """
    return tuple(
        (s, t, d - s - t)
        for d in range(order + 1)
        for s in range(d, -1, -1)
        for t in range(d - s, -1, -1)
    )


# -- polynomials in (x, y, z) as dicts {(s, t, u): complex coefficient} --------------------


def _poly_mul(a: dict, b: dict) -> dict:
    out: dict = {}
    for ka, va in a.items():
        for kb, vb in b.items():
            key = (ka[0] + kb[0], ka[1] + kb[1], ka[2] + kb[2])
            out[key] = out.get(key, 0) + va * vb
    return out


def _poly_pow(a: dict, power: int) -> dict:
    out = {(0, 0, 0): Fraction(1)}
    for _ in range(power):
        out = _poly_mul(out, a)
    return out


_R2 = {(2, 0, 0): Fraction(1), (0, 2, 0): Fraction(1), (0, 0, 2): Fraction(1)}


def _solid_harmonic(l: int, m: int) -> dict:  # noqa: E741
    """r^l P_l^m(cos theta) e^{i m phi} for m >= 0 (no Condon-Shortley phase), exact.

    With P_l(t) = 2^-l sum_mu (-1)^mu C(l, mu) C(2l - 2mu, l) t^(l - 2mu) and
    (1 - t^2)^(m/2) e^{i m phi} r^m = (x + i y)^m:
    r^l P_l^m e^{i m phi} = (x + i y)^m sum_mu c_mu z^(l - 2mu - m) r^(2 mu).
    Coefficients are pairs of Fractions (real, imaginary).
    """
    xiy = {(1, 0, 0): (Fraction(1), Fraction(0)), (0, 1, 0): (Fraction(0), Fraction(1))}

    def cmul(a, b):
        out: dict = {}
        for ka, (ar, ai) in a.items():
            for kb, (br, bi) in b.items():
                key = (ka[0] + kb[0], ka[1] + kb[1], ka[2] + kb[2])
                r0, i0 = out.get(key, (Fraction(0), Fraction(0)))
                out[key] = (r0 + ar * br - ai * bi, i0 + ar * bi + ai * br)
        return out

    power = {(0, 0, 0): (Fraction(1), Fraction(0))}
    for _ in range(m):
        power = cmul(power, xiy)
    rest: dict = {}
    for mu in range((l - m) // 2 + 1):
        coef = Fraction(
            (-1) ** mu
            * math.comb(l, mu)
            * math.comb(2 * l - 2 * mu, l)
            * math.factorial(l - 2 * mu),
            2**l * math.factorial(l - 2 * mu - m),
        )
        for key, val in _poly_pow(_R2, mu).items():
            key = (key[0], key[1], key[2] + l - 2 * mu - m)
            r0, _ = rest.get(key, (Fraction(0), Fraction(0)))
            rest[key] = (r0 + coef * val, Fraction(0))
    return cmul(power, rest)


def _radial_coefficients(n: int, l: int) -> list[float]:  # noqa: E741
    """a_nu with R_nl(r) = r^l sum_nu a_nu r^(2 nu) and int_0^1 R_nl^2 r^2 dr = 1.

    Gram-Schmidt in exact arithmetic on 1, u, u^2, ... (u = r^2) with the inner product
    int_0^1 r^(2l + 2) p(r^2) q(r^2) dr; leading coefficient positive.
    """
    k = (n - l) // 2

    def inner(p, q):
        return sum(
            pa * qb * Fraction(1, 2 * l + 3 + 2 * a + 2 * b)
            for a, pa in enumerate(p)
            for b, qb in enumerate(q)
        )

    basis: list[list[Fraction]] = []
    for degree in range(k + 1):
        v = [Fraction(0)] * degree + [Fraction(1)]
        for b in basis:
            c = inner(v, b) / inner(b, b)
            v = [vi - c * (b[i] if i < len(b) else 0) for i, vi in enumerate(v)]
        basis.append(v)
    p = basis[k]
    norm = math.sqrt(inner(p, p))
    return [float(c) / norm for c in p]


@functools.lru_cache(maxsize=None)
def zernike_coefficients(n_max: int) -> np.ndarray:
    """chi: [K, M] complex, Z_nl^m(x) = sum_j chi[k, j] x^s_j y^t_j z^u_j.

    Rows follow :func:`zernike_indices`, columns :func:`monomial_exponents` (order n_max).
    The Cartesian form of Uhrin eq. 28 (Novotni and Klein's convention, see the module
    docstring); Zernike moments are Omega = (3 / 4 pi) conj(chi) @ m (eq. 30), with m the
    geometric moments (eq. 5).  Read-only array.
    """
    columns = {e: j for j, e in enumerate(monomial_exponents(n_max))}
    rows = zernike_indices(n_max)
    chi = np.zeros((len(rows), len(columns)), dtype=complex)
    for row, (n, l, m) in enumerate(rows):  # noqa: E741
        am = abs(m)
        harmonic = _solid_harmonic(l, am)
        y_norm = math.sqrt(
            (2 * l + 1) / (4 * math.pi) * math.factorial(l - am) / math.factorial(l + am)
        )
        # sqrt(4 pi / 3) Y normalisation, Condon-Shortley (-1)^|m|, Novotni-Klein (-i)^|m|
        prefactor = math.sqrt(4 * math.pi / 3) * y_norm * (-1) ** am * (-1j) ** am
        for nu, a_nu in enumerate(_radial_coefficients(n, l)):
            for kr, vr in _poly_pow(_R2, nu).items():
                for kh, (hr, hi) in harmonic.items():
                    key = (kr[0] + kh[0], kr[1] + kh[1], kr[2] + kh[2])
                    value = prefactor * a_nu * float(vr) * complex(float(hr), float(hi))
                    if m < 0:  # Z^-m = (-1)^m conj(Z^m)
                        value = (-1) ** am * np.conj(value)
                    chi[row, columns[key]] += value
    chi.setflags(write=False)
    return chi


@functools.lru_cache(maxsize=None)
def gaussian_power_coefficients(order: int) -> np.ndarray:
    """D: [order + 1, order + 1] with E[(mu + sigma X)^k] = sum_p D[p, k] mu^p sigma^(k - p).

    X standard normal: D[p, k] = C(k, p) (k - p - 1)!! for k - p even, else 0.  These are
    the 1D moments of a normalised Gaussian (Uhrin eq. 6); a 3D isotropic Gaussian's
    geometric moments are products of three of them.
    """
    out = np.zeros((order + 1, order + 1))
    for k in range(order + 1):
        for p in range(k + 1):
            if (k - p) % 2 == 0:
                double_factorial = math.prod(range(k - p - 1, 0, -2)) if k - p > 1 else 1
                out[p, k] = math.comb(k, p) * double_factorial
    out.setflags(write=False)
    return out


# -- Clebsch-Gordan coupling and invariants --------------------------------------------------


@functools.lru_cache(maxsize=None)
def clebsch_gordan(j1: int, m1: int, j2: int, m2: int, j: int, m: int) -> float:
    """<j1 m1, j2 m2 | j m> for integer angular momenta (Racah's formula, exact then sqrt)."""
    if (
        m1 + m2 != m
        or not abs(j1 - j2) <= j <= j1 + j2
        or abs(m1) > j1
        or abs(m2) > j2
        or abs(m) > j
    ):
        return 0.0
    f = math.factorial
    prefactor = Fraction(
        (2 * j + 1) * f(j + j1 - j2) * f(j - j1 + j2) * f(j1 + j2 - j), f(j1 + j2 + j + 1)
    )
    prefactor *= f(j + m) * f(j - m) * f(j1 - m1) * f(j1 + m1) * f(j2 - m2) * f(j2 + m2)
    total = Fraction(0)
    for k in range(j1 + j2 - j + 1):
        args = (k, j1 + j2 - j - k, j1 - m1 - k, j2 + m2 - k, j - j2 + m1 + k, j - j1 - m2 + k)
        if min(args) >= 0:
            total += Fraction((-1) ** k, math.prod(f(a) for a in args))
    sign = 1.0 if total >= 0 else -1.0
    return sign * math.sqrt(prefactor * total * total)


def _moment_vector(n: int, l: int) -> dict:  # noqa: E741
    """The spherical tensor c_nl as {k: {(index,): coefficient}}."""
    return {k: {((n, l, k),): 1.0} for k in range(-l, l + 1)}


def _composite(n: int, l1: int, l2: int, j: int) -> dict:
    """Composite complex moment form c_n(l1, l2)_j^k of Uhrin eq. 19, as {k: polynomial}."""
    out = {}
    for k in range(-j, j + 1):
        terms: dict = {}
        for m in range(max(-l1, k - l2), min(l1, k + l2) + 1):
            coef = clebsch_gordan(l1, m, l2, k - m, j, k)
            if coef:
                key = tuple(sorted([(n, l1, m), (n, l2, k - m)]))
                terms[key] = terms.get(key, 0.0) + coef
        out[k] = terms
    return out


def _couple(a: dict, b: dict, j: int) -> dict:
    """(a x b)_0^0 = sum_k (-1)^(j - k) / sqrt(2j + 1) a^k b^-k (Uhrin eqs. 20-22)."""
    poly: dict = {}
    scale = 1.0 / math.sqrt(2 * j + 1)
    for k in range(-j, j + 1):
        for ka, va in a[k].items():
            for kb, vb in b[-k].items():
                key = tuple(sorted(ka + kb))
                poly[key] = poly.get(key, 0.0) + (-1) ** (j - k) * scale * va * vb
    return {key: v for key, v in poly.items() if abs(v) > 1e-13}


def invariant_polynomial(label: tuple[int, ...]) -> dict:
    """Rotation invariant named by ``label`` as {sorted tuple of (n, l, m): coefficient}.

    Labels (nu = correlation order, Uhrin eqs. 19-22):

    - ``(1, n)``: c_n0^0 (n even);
    - ``(2, n, l)``: c_n(l, l)_0^0, the power spectrum (eq. 20);
    - ``(3, n1, l1, l2, j, n2)``: c_n1(l1, l2)_j c_n2 (eq. 21), the bispectrum;
    - ``(4, n1, l1, l2, j, n2, l3, l4)``: c_n1(l1, l2)_j c_n2(l3, l4)_j (eq. 22).

    An empty dict means the invariant vanishes identically.
    """
    nu, params = label[0], tuple(label[1:])
    if nu == 1:
        (n,) = params
        return {((n, 0, 0),): 1.0}
    if nu == 2:
        n, l = params  # noqa: E741
        return _couple(_moment_vector(n, l), _moment_vector(n, l), l)
    if nu == 3:
        n1, l1, l2, j, n2 = params
        return _couple(_composite(n1, l1, l2, j), _moment_vector(n2, j), j)
    if nu == 4:
        n1, l1, l2, j, n2, l3, l4 = params
        return _couple(_composite(n1, l1, l2, j), _composite(n2, l3, l4, j), j)
    raise ValueError(f"invariant labels have correlation order 1-4, got {label}")
