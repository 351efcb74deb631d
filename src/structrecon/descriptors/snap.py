"""SNAP bispectrum components, as LAMMPS ``compute sna/atom`` defines them.

Definitions (Thompson et al., J. Comput. Phys. 285, 316 (2015); Bartok et al.,
Phys. Rev. Lett. 104, 136403 (2010); summarised in Cobelli 2022 eq. 1 and Uhrin 2021
section II B).  For a centre atom i and a neighbour i' at displacement r, |r| = r, inside
the pair cutoff R_ii' = rcutfac (R_i + R_i'):

- the ball is mapped onto the 3-sphere by the polar angle
  theta0 = rfac0 pi (r - rmin0) / (R_ii' - rmin0); the neighbour is the SU(2) element with
  Cayley-Klein parameters a = cos theta0 - i (z/r) sin theta0, b = (y/r - i x/r) sin theta0;
- the neighbour density is expanded in Wigner matrices U^j (j = 0, 1/2, ..., twojmax/2):
  u^j = U^j(identity) + sum_i' f_c(r) w_i' U^j(a, b), with the switching function
  f_c(r) = (cos(pi (r - rmin0) / (R_ii' - rmin0)) + 1) / 2 (1 for r <= rmin0, and 1 for
  every neighbour inside the cutoff without ``switchflag``);
- Z^j_{j1 j2} = C^T (u^{j1} (x) u^{j2}) C couples two expansions with Clebsch-Gordan
  coefficients C, and B_{j1 j2 j} = sum_{m m'} conj(u^j_{m m'}) Z^j_{j1 j2, m m'}
  (Thompson 2015 eq. 5), minus the value B0 = 2j + 1 of an atom without neighbours
  (``bzeroflag``), divided by 2j + 1 with ``bnormflag``.

Components are the triples j2 <= j1 <= j <= twojmax/2 with j1 + j2 + j integral, in the
order of the LAMMPS documentation (j1 outer, then j2, then j; 55 for twojmax = 8).
Chemical resolution (LAMMPS ``chem``), quadratic terms and the inner switching function are
not implemented (LAMMPS defaults: off); without ``chem``, ``wselfallflag`` has no effect.

Implementation.  Labels are doubled (``j`` here is 2j) and matrix indices run 0..j as in
LAMMPS.  The Wigner matrices of every neighbour pair come from the recursion of Varshalovich,
Moskalev and Khersonskii (section 4.8.2) in j, as shifts and elementwise products of whole
[m, m'] blocks vectorised over pairs; only the columns m' <= j/2 are computed, the others
follow from U^j_{j-m, j-m'} = (-1)^(m-m') conj(U^j_{m m'}).  In clusters each unordered pair
is computed once (the reverse displacement gives the Hermitian conjugate).  The triple
product is contracted per j1 with one batched real matrix product over atoms,
W = u^{j1} S^T, where S stacks the Clebsch-Gordan-weighted, shifted rows of every u^{j2}
that pairs with u^{j1}; the components are then Re(W conj(u^j)) summed with CG weights by a
constant matrix.  Index tables are built once per ``twojmax`` in NumPy.  The cost is
dominated by that contraction, ~40k complex multiply-adds per atom for twojmax = 8, as
arrays of ~5.5k complex values per atom: float32 positions halve the memory traffic.

For clusters, ``fn.jacobian`` gives the whole Jacobian analytically, as LAMMPS
``snad/atom`` does (the Z-list route; see :func:`_jacobian_tables`), for Gauss-Newton
methods that need all of dB/dr at once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from fractions import Fraction
from typing import Any, ClassVar

import numpy as np
import torch

from .._errors import StructreconError
from ..structures import lattice_shifts, neighbour_geometry
from ._spec import register_descriptor, spec_from_fields

__all__ = ["BispectrumSpec", "bispectrum_fn", "bispectrum_triples"]

#: largest twojmax accepted (the work per atom grows as twojmax^5)
_MAX_TWOJMAX = 16
#: batches are evaluated in chunks whose largest intermediate array stays below this
_CHUNK_BYTES = 1 << 24
JACOBIAN_CHUNK_BYTES = 1 << 25


def bispectrum_triples(twojmax: int) -> list[tuple[int, int, int]]:
    """The (2 j1, 2 j2, 2 j) labels of the components, in LAMMPS order."""
    out = []
    for j1 in range(twojmax + 1):
        for j2 in range(j1 + 1):
            for j in range(j1 - j2, min(twojmax, j1 + j2) + 1, 2):
                if j >= j1:
                    out.append((j1, j2, j))
    return out


def _clebsch_gordan(j1: int, j2: int, j: int) -> np.ndarray:
    """C(j1 m1, j2 m2 | j m) for doubled labels, as a [j1 + 1, j2 + 1] array.

    Entry [m1, m2] (indices 0..j1, 0..j2, i.e. m = index - j/2) couples to
    m = m1 + m2 - (j1 + j2 - j) / 2; zero where that is outside 0..j.  Racah's formula
    (Varshalovich et al. 8.2.1), evaluated in exact rational arithmetic.
    """
    fac = math.factorial
    out = np.zeros((j1 + 1, j2 + 1))
    h = (j1 + j2 - j) // 2
    delta = Fraction(
        (j + 1) * fac(h) * fac((j1 - j2 + j) // 2) * fac((j2 - j1 + j) // 2),
        fac((j1 + j2 + j) // 2 + 1),
    )
    for m1 in range(j1 + 1):
        for m2 in range(j2 + 1):
            m = m1 + m2 - h
            if not 0 <= m <= j:
                continue
            a2, b2 = 2 * m1 - j1, 2 * m2 - j2
            total = Fraction(0)
            for k in range(h + 1):
                args = (h - k, j1 - m1 - k, m2 - k, (j - j2 + a2) // 2 + k, (j - j1 - b2) // 2 + k)
                if min(args) < 0:
                    continue
                den = fac(k)
                for n in args:
                    den *= fac(n)
                total += Fraction((-1) ** k, den)
            square = delta * fac(m1) * fac(j1 - m1) * fac(m2) * fac(j2 - m2)
            square *= fac(m) * fac(j - m) * total * total
            out[m1, m2] = math.copysign(math.sqrt(square), total) if total else 0.0
    return out


@dataclasses.dataclass(frozen=True)
class _Tables:
    """Index and coefficient tables for one twojmax (NumPy; see module docstring)."""

    twojmax: int
    n_left: int
    n_full: int
    full_offset: tuple[int, ...]
    layers: tuple  # per j >= 1: (coefficient of conj(a), of conj(b) [j+1, j//2+1], mirror signs)
    identity_left: np.ndarray  # [n_left], 1 on the diagonal elements
    expand_index: np.ndarray  # [n_full] into cat(left, conj(left))
    expand_sign: np.ndarray
    dagger_index: np.ndarray  # [n_left] into cat(left, conj(left)): left part of U^H
    dagger_sign: np.ndarray
    u1_index: np.ndarray  # per j1 [2 n1, 2 n1]: [[A, -B], [B, A]], concatenated over j1
    s_index: np.ndarray  # per j1 [2 n1, Q]: [Re S^T; Im S^T]
    s_coef: np.ndarray  # their Clebsch-Gordan factors
    g_index: np.ndarray  # per j1 [2 n1, Q]: G2
    blocks: tuple  # per j1: (n1, Q, m [2 n1 Q, K1]) weights of each W entry per component
    widest_block: int  # largest 2 n1 Q: real values per atom of the biggest intermediate
    bzero: np.ndarray  # [K] B of an atom without neighbours, 2j + 1
    j_of: np.ndarray  # [K] doubled j of each component


@functools.lru_cache(maxsize=8)
def _tables(twojmax: int) -> _Tables:
    half = [j // 2 for j in range(twojmax + 1)]
    left_offset = np.cumsum([0] + [(j + 1) * (half[j] + 1) for j in range(twojmax + 1)])
    full_offset = np.cumsum([0] + [(j + 1) ** 2 for j in range(twojmax + 1)])

    def left(j, ma, mb):  # index of a stored element (mb <= j // 2) within all layers
        return int(left_offset[j] + ma * (half[j] + 1) + mb)

    def full(j, ma, mb):
        return int(full_offset[j] + ma * (j + 1) + mb)

    def from_left(j, ma, mb):
        """Element (ma, mb) of layer j as (stored index within the layer, conj?, sign)."""
        if mb <= half[j]:
            return left(j, ma, mb) - int(left_offset[j]), False, 1.0
        sign = -1.0 if (ma - mb) % 2 else 1.0
        return left(j, j - ma, j - mb) - int(left_offset[j]), True, sign

    # recursion U^j[ma, mb] = sqrt((j - ma)/(j - mb)) conj(a) U^{j-1}[ma, mb]
    #                       - sqrt(ma/(j - mb)) conj(b) U^{j-1}[ma - 1, mb]   (mb <= j/2)
    # on the stored [ma, mb] blocks; for even j, column j/2 of layer j - 1 is the mirror of
    # its last stored column: U^{j-1}[a, j/2] = (-1)^(a - j/2) conj(U^{j-1}[j - 1 - a, j/2 - 1])
    layers = []
    for j in range(1, twojmax + 1):
        ma = np.arange(j + 1)[:, None]
        mb = np.arange(half[j] + 1)[None, :]
        coef_a = np.where(ma < j, np.sqrt(np.maximum(j - ma, 0) / (j - mb)), 0.0)
        coef_b = -np.sqrt(ma / (j - mb))
        mirror = None
        if j % 2 == 0:
            mirror = np.where((np.arange(j) - j // 2) % 2, -1.0, 1.0)
        layers.append((coef_a, coef_b, mirror))

    n_left = int(left_offset[-1])
    n_full = int(full_offset[-1])
    identity_left = np.zeros(n_left)
    expand_index = np.zeros(n_full, dtype=np.int64)
    expand_sign = np.zeros(n_full)
    dagger_index = np.zeros(n_left, dtype=np.int64)
    dagger_sign = np.zeros(n_left)
    for j in range(twojmax + 1):
        base = int(left_offset[j])
        for ma in range(j + 1):
            for mb in range(j + 1):
                i, c, s = from_left(j, ma, mb)
                expand_index[full(j, ma, mb)] = base + i + n_left * c
                expand_sign[full(j, ma, mb)] = s
            for mb in range(half[j] + 1):
                if ma == mb:
                    identity_left[left(j, ma, mb)] = 1.0
                # (U^H)[ma, mb] = conj(U[mb, ma])
                i, c, s = from_left(j, mb, ma)
                dagger_index[left(j, ma, mb)] = base + i + n_left * (not c)
                dagger_sign[left(j, ma, mb)] = s

    # contraction, per j1, in real arithmetic on r = [Re u, Im u, -Re u, -Im u] (element f
    # of u at 2 f and 2 f + 1, the negated copy 2 n_full further):
    #   rows q = (j2, j, mb, ma2) of the shifted, CG-weighted u^{j2}:
    #       S[q, mb1] = C(mb1, mb2 | mb) u^{j2}[ma2, mb2],  mb2 = mb + h - mb1;
    #   W = u^{j1} S^T as the real product [[A, -B], [B, A]] [Re S^T; Im S^T] = [Re W; Im W]
    #   (A, B: real and imaginary parts of u^{j1});
    #   B_{j1 j2 j} = sum of weight x C(ma1, ma2 | ma) Re(W[ma1, q] conj(g)), with
    #   g = u^j[ma, mb], ma = ma1 + ma2 - h, and G2 = [Re g; Im g] gathered per W entry.
    def re(f):
        return 2 * f

    def im(f):
        return 2 * f + 1

    neg = 2 * n_full
    triples = bispectrum_triples(twojmax)
    k_of = {t: k for k, t in enumerate(triples)}
    u1_index, s_index, s_coef, g_index, blocks = [], [], [], [], []
    for j1 in range(twojmax + 1):
        n1 = j1 + 1
        mine = [t for t in triples if t[0] == j1]
        k0 = k_of[mine[0]]
        rows = []  # (j2, j, mb, ma2, cg, h)
        for _, j2, j in mine:
            cg = _clebsch_gordan(j1, j2, j)
            h = (j1 + j2 - j) // 2
            rows += [(j2, j, mb, ma2, cg, h) for mb in range(half[j] + 1) for ma2 in range(j2 + 1)]
        q = len(rows)
        emb = np.zeros((2, n1, 2, n1), dtype=np.int64)
        for a in range(n1):
            for b in range(n1):
                f = full(j1, a, b)
                emb[0, a, 0, b], emb[0, a, 1, b] = re(f), neg + im(f)
                emb[1, a, 0, b], emb[1, a, 1, b] = im(f), re(f)
        u1_index += emb.ravel().tolist()
        for part in (re, im):
            for mb1 in range(n1):
                for j2, j, mb, ma2, cg, h in rows:
                    mb2 = mb + h - mb1
                    if 0 <= mb2 <= j2 and cg[mb1, mb2] != 0.0:
                        s_index.append(part(full(j2, ma2, mb2)))
                        s_coef.append(cg[mb1, mb2])
                    else:
                        s_index.append(0)
                        s_coef.append(0.0)
        g2 = np.zeros((2, n1, q), dtype=np.int64)
        m = np.zeros((2, n1, q, len(mine)))
        for ma1 in range(n1):
            for r, (j2, j, mb, ma2, cg, h) in enumerate(rows):
                ma = ma1 + ma2 - h
                if not 0 <= ma <= j or cg[ma1, ma2] == 0.0:
                    continue
                # weights of the m' <= j/2 half: the other half is the complex conjugate
                if 2 * mb < j or ma < mb:
                    weight = 2.0
                elif ma == mb:
                    weight = 1.0
                else:
                    continue
                g = full(j, ma, mb)
                g2[0, ma1, r], g2[1, ma1, r] = re(g), im(g)
                m[:, ma1, r, k_of[(j1, j2, j)] - k0] = weight * cg[ma1, ma2]
        g_index += g2.ravel().tolist()
        blocks.append((n1, q, m.reshape(2 * n1 * q, len(mine))))
    j_of = np.asarray([t[2] for t in triples])
    return _Tables(
        twojmax=twojmax,
        n_left=n_left,
        n_full=n_full,
        full_offset=tuple(int(v) for v in full_offset),
        layers=tuple(layers),
        identity_left=identity_left,
        expand_index=expand_index,
        expand_sign=expand_sign,
        dagger_index=dagger_index,
        dagger_sign=dagger_sign,
        u1_index=np.asarray(u1_index),
        s_index=np.asarray(s_index),
        s_coef=np.asarray(s_coef),
        g_index=np.asarray(g_index),
        blocks=tuple(blocks),
        widest_block=max(2 * n1 * q for n1, q, _ in blocks),
        bzero=(j_of + 1).astype(float),
        j_of=j_of,
    )


@dataclasses.dataclass(frozen=True)
class _JacobianTables:
    """Tables of the analytic Jacobian for one twojmax (NumPy; see :func:`_jacobian_tables`)."""

    groups: tuple  # per a: (a, s_index [Q, a+1], s_coef, z_index [nz_a, a+1], z_coef)
    full_offset: tuple  # start of each layer j in the full [m, m'] layout
    order: np.ndarray  # [n_z] computed entry of each needed Z entry, sorted by output layer c
    layers: tuple  # per c: (first entry, triples with output c, (c + 1)(c/2 + 1), left start)
    combine: np.ndarray  # [K, n_triples] factor of each sorted triple in each component
    fold_weight: np.ndarray  # [n_left] 2, or 1 on the middle column m' = j/2


@functools.lru_cache(maxsize=8)
def _jacobian_tables(twojmax: int) -> _JacobianTables:
    """Z^c_{ab} for the label triples the derivative needs, and how they combine.

    B_{j1 j2 j} = <u^j, Z^j_{j1 j2}> with Z^c_{ab} = C^T (u^a (x) u^b) C.  Its derivative
    along du (Thompson 2015; LAMMPS ``compute_dbidrj``) is Re <du, Y> with
    Y = Z^j_{j1 j2} on layer j, + (j + 1)/(j1 + 1) Z^{j1}_{j j2} on layer j1,
    + (j + 1)/(j2 + 1) Z^{j2}_{j j1} on layer j2.  Swapping a and b flips the sign of both
    Clebsch-Gordan factors, so Z^c_{ba} = Z^c_{ab}: each is computed with a <= b, the
    cheaper order (0.76x the multiply-adds of the first sum, 0.65x of the second).  Z,
    like u, is fixed by its columns m' <= c/2, and only those are computed: per a,
    W = u^a S^T (rows q = (b, c, m', ma2) of CG-weighted u^b) and
    Z^c_{ab}[m, m'] = sum_{ma1} C(ma1, ma2 | m) W[ma1, q], with ma2 = m + h - ma1.
    Because Y has u's mirror symmetry, Re <du, Y> over all elements is the sum over the
    stored columns with weight 2 (1 on the middle column).  The needed entries are
    sorted by output layer c, so that each layer's blocks are contracted with that layer
    of du in one product, and ``combine`` sums the triples into components.
    """
    triples = bispectrum_triples(twojmax)
    full_offset = np.cumsum([0] + [(j + 1) ** 2 for j in range(twojmax + 1)])
    half = [j // 2 for j in range(twojmax + 1)]
    left_offset = np.cumsum([0] + [(j + 1) * (half[j] + 1) for j in range(twojmax + 1)])
    need = set()
    for j1, j2, j in triples:
        need.update({(j1, j2, j), (j, j2, j1), (j, j1, j2)})
    computed = {(min(a, b), max(a, b), c) for a, b, c in need}
    groups, where = [], {}
    n_z = 0
    for a in range(twojmax + 1):
        mine = sorted(t for t in computed if t[0] == a)
        if not mine:
            continue
        n_a = a + 1
        rows = [
            (b, c, mb, ma2) for _, b, c in mine for mb in range(half[c] + 1) for ma2 in range(b + 1)
        ]
        row_of = {r: q for q, r in enumerate(rows)}
        n_q = len(rows)
        cgs = {(b, c): _clebsch_gordan(a, b, c) for _, b, c in mine}
        s_index = np.zeros((n_q, n_a), dtype=np.int64)
        s_coef = np.zeros((n_q, n_a))
        for q, (b, c, mb, ma2) in enumerate(rows):
            cg, h = cgs[(b, c)], (a + b - c) // 2
            for mb1 in range(n_a):
                mb2 = mb + h - mb1
                if 0 <= mb2 <= b and cg[mb1, mb2] != 0.0:
                    s_index[q, mb1] = full_offset[b] + ma2 * (b + 1) + mb2
                    s_coef[q, mb1] = cg[mb1, mb2]
        z_index, z_coef = [], []
        for _, b, c in mine:
            cg, h = cgs[(b, c)], (a + b - c) // 2
            for ma in range(c + 1):
                for mb in range(half[c] + 1):
                    where[(a, b, c, ma, mb)] = n_z
                    n_z += 1
                    index, coef = np.zeros(n_a, dtype=np.int64), np.zeros(n_a)
                    for ma1 in range(n_a):
                        ma2 = ma + h - ma1
                        if 0 <= ma2 <= b and cg[ma1, ma2] != 0.0:
                            index[ma1] = ma1 * n_q + row_of[(b, c, mb, ma2)]
                            coef[ma1] = cg[ma1, ma2]
                    z_index.append(index)
                    z_coef.append(coef)
        groups.append((a, s_index, s_coef, np.asarray(z_index), np.asarray(z_coef)))
    # needed entries sorted by output layer: the entries of one triple are its stored
    # [m, m'] block, taken from the computed Z^c_{min(a,b) max(a,b)}
    by_layer = sorted({(c, a, b) for a, b, c in need})
    order, layers, triple_of = [], [], {}
    for c in range(twojmax + 1):
        mine = [(a, b) for cc, a, b in by_layer if cc == c]
        size = (c + 1) * (half[c] + 1)
        layers.append((len(order), len(mine), size, int(left_offset[c])))
        for a, b in mine:
            triple_of[(a, b, c)] = len(triple_of)
            lo, hi = min(a, b), max(a, b)
            order += [
                where[(lo, hi, c, ma, mb)] for ma in range(c + 1) for mb in range(half[c] + 1)
            ]
    combine = np.zeros((len(triples), len(triple_of)))
    for k, (j1, j2, j) in enumerate(triples):
        combine[k, triple_of[(j1, j2, j)]] += 1.0
        combine[k, triple_of[(j, j2, j1)]] += (j + 1) / (j1 + 1)
        combine[k, triple_of[(j, j1, j2)]] += (j + 1) / (j2 + 1)
    fold_weight = np.concatenate(
        [
            np.where((2 * np.arange(half[j] + 1) == j)[None, :].repeat(j + 1, 0), 1.0, 2.0).ravel()
            for j in range(twojmax + 1)
        ]
    )
    return _JacobianTables(
        groups=tuple(groups),
        full_offset=tuple(int(v) for v in full_offset),
        order=np.asarray(order),
        layers=tuple(layers),
        combine=combine,
        fold_weight=fold_weight,
    )


def _flag(name: str, value) -> bool:
    if isinstance(value, (bool, np.bool_)) or value in (0, 1):
        return bool(value)
    raise StructreconError(f"bispectrum {name} must be true/false (or 0/1), got {value!r}")


@register_descriptor
@dataclasses.dataclass(frozen=True, kw_only=True)
class BispectrumSpec:
    """SNAP bispectrum components per atom (LAMMPS ``compute sna/atom``).

    Parameters
    ----------
    twojmax : band limit 2 j_max (LAMMPS ``twojmax``); l_max = twojmax / 2.
    rcutfac : scale of the pair cutoffs R_ii' = rcutfac (R_i + R_i'), dimensionless.
    species : atomic numbers (stored sorted; ``radii`` and ``weights`` follow them).
    radii : R per species, Angstrom (LAMMPS ``R_1 R_2 ...``).
    weights : neighbour weight w per species (LAMMPS ``w_1 w_2 ...``); the centre's own
        contribution has weight 1.
    rfac0 : distance-to-angle factor, 0 < rfac0 <= 1 (LAMMPS examples use 0.99363).
    rmin0 : inner distance of the angle map, Angstrom (LAMMPS default 0).
    switchflag : multiply neighbours by the cosine switching function (LAMMPS default 1).
    bzeroflag : subtract B0, the components of an atom without neighbours (LAMMPS default 1).
    bnormflag : divide B_{j1 j2 j} by 2j + 1 (LAMMPS default 0).
    """

    twojmax: int
    rcutfac: float
    species: tuple[int, ...]
    radii: tuple[float, ...]
    weights: tuple[float, ...]
    rfac0: float = 0.99363
    rmin0: float = 0.0
    switchflag: bool = True
    bzeroflag: bool = True
    bnormflag: bool = False

    kind: ClassVar[str] = "bispectrum"

    def __post_init__(self):
        set_ = object.__setattr__
        if isinstance(self.twojmax, bool) or int(self.twojmax) != self.twojmax:
            raise StructreconError(f"bispectrum twojmax must be an integer, got {self.twojmax!r}")
        set_(self, "twojmax", int(self.twojmax))
        if not 0 <= self.twojmax <= _MAX_TWOJMAX:
            raise StructreconError(
                f"bispectrum twojmax must be in 0..{_MAX_TWOJMAX}, got {self.twojmax}"
            )
        species = [int(z) for z in np.atleast_1d(self.species)]
        n = len(species)
        per_species = {}
        for name in ("radii", "weights"):
            values = [float(v) for v in np.atleast_1d(getattr(self, name))]
            if len(values) != n:
                raise StructreconError(
                    f"bispectrum {name} needs one value per species ({n}), got {len(values)}"
                )
            per_species[name] = values
        if not n or min(species) < 1 or max(species) > 118 or len(set(species)) != n:
            raise StructreconError(
                f"bispectrum species must be distinct atomic numbers 1-118, got {species}"
            )
        order = np.argsort(species)
        set_(self, "species", tuple(species[k] for k in order))
        set_(self, "radii", tuple(per_species["radii"][k] for k in order))
        set_(self, "weights", tuple(per_species["weights"][k] for k in order))
        for name in ("rcutfac", "rfac0", "rmin0"):
            set_(self, name, float(getattr(self, name)))
        for name in ("switchflag", "bzeroflag", "bnormflag"):
            set_(self, name, _flag(name, getattr(self, name)))
        if not (self.rcutfac > 0 and math.isfinite(self.rcutfac)):
            raise StructreconError(f"bispectrum rcutfac must be positive, got {self.rcutfac}")
        if not 0 < self.rfac0 <= 1:
            raise StructreconError(f"bispectrum rfac0 must be in (0, 1], got {self.rfac0}")
        if min(self.radii) <= 0 or not all(math.isfinite(w) for w in self.weights):
            raise StructreconError(
                f"bispectrum radii must be positive and weights finite, got radii "
                f"{list(self.radii)}, weights {list(self.weights)}"
            )
        smallest = 2 * self.rcutfac * min(self.radii)
        if not 0 <= self.rmin0 < smallest:
            raise StructreconError(
                f"bispectrum rmin0 must be in [0, {smallest:g}) (the smallest pair cutoff), "
                f"got {self.rmin0}"
            )

    @property
    def cutoff(self) -> float:
        """Largest pair cutoff rcutfac (R_i + R_j), Angstrom."""
        return 2.0 * self.rcutfac * max(self.radii)

    @property
    def n_features(self) -> int:
        """Number of components B_{j1 j2 j} per atom."""
        return len(bispectrum_triples(self.twojmax))

    @property
    def triples(self) -> list[tuple[int, int, int]]:
        """(2 j1, 2 j2, 2 j) of each component, in feature order."""
        return bispectrum_triples(self.twojmax)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict form (lists, floats, bools)."""
        return {
            "twojmax": self.twojmax,
            "rcutfac": self.rcutfac,
            "species": list(self.species),
            "radii": list(self.radii),
            "weights": list(self.weights),
            "rfac0": self.rfac0,
            "rmin0": self.rmin0,
            "switchflag": self.switchflag,
            "bzeroflag": self.bzeroflag,
            "bnormflag": self.bnormflag,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BispectrumSpec:
        """Inverse of :meth:`to_dict`; unknown keys are errors naming the valid ones."""
        return spec_from_fields(cls, dict(data))

    def build(self, numbers, cell=None, pbc=None):
        """See :func:`bispectrum_fn`."""
        return bispectrum_fn(self, numbers, cell, pbc)


class _Torch:
    """The tables as tensors of one dtype/device."""

    def __init__(self, tables: _Tables, dtype: torch.dtype, device):
        def real(a):
            return torch.as_tensor(a, dtype=dtype, device=device)

        def index(a):
            return torch.as_tensor(a, dtype=torch.long, device=device)

        self.layers = [
            (real(ca), real(cb), None if m is None else real(m)) for ca, cb, m in tables.layers
        ]
        self.identity_left = real(tables.identity_left)
        self.expand_index = index(tables.expand_index)
        self.expand_sign = real(tables.expand_sign)
        self.dagger_index = index(tables.dagger_index)
        self.dagger_sign = real(tables.dagger_sign)
        self.blocks, self.indices = [], []
        o_u = o_s = 0
        for n1, q, m in tables.blocks:
            nu, ns = 4 * n1 * n1, 2 * n1 * q
            self.blocks.append((n1, q, real(tables.s_coef[o_s : o_s + ns]), real(m)))
            self.indices += [
                index(tables.u1_index[o_u : o_u + nu]),
                index(tables.s_index[o_s : o_s + ns]),
                index(tables.g_index[o_s : o_s + ns]),
            ]
            o_u, o_s = o_u + nu, o_s + ns

    def expand(self, left: torch.Tensor) -> torch.Tensor:
        """All elements [..., n_full] of the matrices whose stored columns are ``left``."""
        both = torch.cat([left, left.conj()], dim=-1)
        return both.index_select(-1, self.expand_index) * self.expand_sign

    def dagger(self, left: torch.Tensor) -> torch.Tensor:
        """Stored columns [..., n_left] of the Hermitian conjugates of ``left``'s matrices."""
        both = torch.cat([left, left.conj()], dim=-1)
        return both.index_select(-1, self.dagger_index) * self.dagger_sign


class _TorchJacobian:
    """The Jacobian tables as tensors of one dtype/device.

    The second Clebsch-Gordan sum of :func:`_coupled` is a sparse linear map, applied as
    one product with a CSR matrix, ``couple``: it takes all groups' W to the needed Z
    entries, already sorted by output layer (1.4x faster on a CPU than gathering the
    [X, n_z, a + 1] terms, summing them, and sorting the result).
    """

    def __init__(self, tables: _JacobianTables, dtype: torch.dtype, device):
        import scipy.sparse as sp

        def real(a):
            return torch.as_tensor(a, dtype=dtype, device=device)

        def pairs(index):  # element index [...] -> its (Re, Im) columns [..., 2]
            index = np.asarray(index)
            return np.stack([2 * index, 2 * index + 1], -1)

        self.full_offset = tables.full_offset
        self.groups, sources, coefs = [], [], []
        w_start = 0
        for a, s_index, s_coef, z_index, z_coef in tables.groups:
            s_columns = torch.as_tensor(pairs(s_index).ravel(), device=device)
            self.groups.append((a, s_columns, real(s_coef)))
            sources += list(w_start + pairs(z_index))  # computed entry -> [a + 1, 2] W columns
            coefs += list(z_coef)
            w_start += 2 * (a + 1) * s_coef.shape[0]
        # needed entry e (real columns 2 e + p) <- W columns of its computed entry
        rows = np.concatenate([sources[z].ravel() for z in tables.order])
        cols = np.concatenate(
            [
                np.broadcast_to(pairs(e), sources[z].shape).ravel()
                for e, z in enumerate(tables.order)
            ]
        )
        vals = np.concatenate([np.repeat(coefs[z], 2) for z in tables.order])
        n_z = len(tables.order)
        matrix = sp.csr_matrix((vals, (rows, cols)), (w_start, 2 * n_z))
        matrix.eliminate_zeros()
        with warnings.catch_warnings():  # "CSR support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            self.couple = torch.sparse_csr_tensor(
                torch.as_tensor(matrix.indptr, device=device),
                torch.as_tensor(matrix.indices, device=device),
                real(matrix.data),
                size=matrix.shape,
                check_invariants=False,
            )
        self.layers = tables.layers
        self.combine = real(tables.combine)
        self.fold_weight = real(tables.fold_weight)


def _coupled(full: torch.Tensor, jt: _TorchJacobian) -> torch.Tensor:
    """Z [X, n_z * 2] (real view, entries sorted by output layer).

    The stored columns of every Z^c_{ab} the derivative needs (:func:`_jacobian_tables`),
    from the expansions ``full`` [X, n_full].
    """
    x = full.shape[0]
    offsets = jt.full_offset
    parts = torch.view_as_real(full).reshape(x, -1)
    w = []
    for a, s_index, s_coef in jt.groups:
        n_a = a + 1
        s = parts.index_select(1, s_index).view(x, *s_coef.shape, 2).mul_(s_coef[..., None])
        s = torch.view_as_complex(s)  # [X, Q, n_a]
        u_a = full[:, offsets[a] : offsets[a] + n_a * n_a].view(x, n_a, n_a)
        w.append(torch.view_as_real(torch.bmm(u_a, s.transpose(1, 2))).reshape(x, -1))
    return torch.cat(w, dim=1) @ jt.couple


def _wigner_left(ca: torch.Tensor, cb: torch.Tensor, layers) -> torch.Tensor:
    """Columns m' <= j/2 of U^j for j = 0..twojmax: [..., n_left] complex.

    ca, cb : [...] complex, conj(a) and conj(b) of each pair.  Each layer is built from
    the previous one by shifts (zero rows) and elementwise products, without gathers.
    """
    ca, cb = ca[..., None, None], cb[..., None, None]
    prev = torch.ones(ca.shape, dtype=ca.dtype, device=ca.device)  # [..., 1, 1]
    out = [prev.flatten(-2)]
    for coef_a, coef_b, mirror in layers:
        if mirror is not None:
            col = prev[..., -1].flip(-1).conj() * mirror
            prev = torch.cat([prev, col[..., None]], dim=-1)
        zero = torch.zeros_like(prev[..., :1, :])
        a_terms = torch.cat([prev, zero], dim=-2) * coef_a
        b_terms = torch.cat([zero, prev], dim=-2) * coef_b
        prev = torch.addcmul(a_terms * ca, b_terms, cb)
        out.append(prev.flatten(-2))
    return torch.cat(out, dim=-1)


def _wigner_left_derivative(ca, cb, d_ca, d_cb, layers):
    """:func:`_wigner_left` and its derivatives [..., D, n_left] along D directions.

    d_ca, d_cb : [..., D] derivatives of conj(a) and conj(b).  The recursion's product
    rule, layer by layer.
    """
    ca, cb = ca[..., None, None], cb[..., None, None]
    d_ca, d_cb = d_ca[..., None, None], d_cb[..., None, None]  # [..., D, 1, 1]
    prev = torch.ones(ca.shape, dtype=ca.dtype, device=ca.device)
    d_prev = torch.zeros(d_ca.shape, dtype=ca.dtype, device=ca.device)
    out, d_out = [prev.flatten(-2)], [d_prev.flatten(-2)]
    for coef_a, coef_b, mirror in layers:
        if mirror is not None:
            prev = torch.cat([prev, (prev[..., -1].flip(-1).conj() * mirror)[..., None]], dim=-1)
            col = d_prev[..., -1].flip(-1).conj() * mirror
            d_prev = torch.cat([d_prev, col[..., None]], dim=-1)
        zero = torch.zeros_like(prev[..., :1, :])
        a_terms = torch.cat([prev, zero], dim=-2) * coef_a
        b_terms = torch.cat([zero, prev], dim=-2) * coef_b
        d_zero = torch.zeros_like(d_prev[..., :1, :])
        d_a = torch.cat([d_prev, d_zero], dim=-2) * coef_a
        d_b = torch.cat([d_zero, d_prev], dim=-2) * coef_b
        a_terms, b_terms = a_terms[..., None, :, :], b_terms[..., None, :, :]
        d_prev = (
            d_a * ca[..., None, :, :] + a_terms * d_ca + d_b * cb[..., None, :, :] + b_terms * d_cb
        )
        prev = torch.addcmul(a_terms[..., 0, :, :] * ca, b_terms[..., 0, :, :], cb)
        out.append(prev.flatten(-2))
        d_out.append(d_prev.flatten(-2))
    return torch.cat(out, dim=-1), torch.cat(d_out, dim=-1)


class _Gather(torch.autograd.Function):
    """Column gathers ``source[:, index]`` for several index vectors.

    The backward accumulates into one buffer (autograd would zero-fill and add one buffer
    per gather); it is differentiable, so double backward works.  A forward-mode rule
    (``jvp``) and a generated vmap rule let ``torch.func`` transforms through, as the
    Levenberg-Marquardt polish's batched Jacobians (``vmap(jacfwd(...))``) need.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(source, *indices):
        return tuple(source.index_select(1, index) for index in indices)

    @staticmethod
    def setup_context(ctx, inputs, output):
        source, *indices = inputs
        ctx.shape = source.shape
        ctx.index_list = indices  # constant integer tensors, for the forward mode
        ctx.save_for_backward(*indices)

    @staticmethod
    def backward(ctx, *grads):
        indices = ctx.saved_tensors
        grad = grads[0].new_zeros(ctx.shape)
        for index, g in zip(indices, grads):
            if g is None:
                continue
            if torch.is_grad_enabled():  # double backward: keep the graph
                grad = grad.index_add(1, index, g)
            else:
                grad.index_add_(1, index, g)
        return (grad,) + (None,) * len(indices)

    @staticmethod
    def jvp(ctx, source_tangent, *index_tangents):
        return tuple(source_tangent.index_select(1, index) for index in ctx.index_list)


def _contract(full: torch.Tensor, tt: _Torch) -> torch.Tensor:
    """Bispectrum components from the expansions: [X, n_full] complex -> [X, K] real."""
    x = full.shape[0]
    parts = torch.view_as_real(full).reshape(x, -1)
    parts = torch.cat([parts, -parts], dim=1)  # [Re, Im, -Re, -Im] of every element
    gathered = _Gather.apply(parts, *tt.indices)
    out = []
    for k, (n1, q, s_coef, m) in enumerate(tt.blocks):
        u1, st, g = gathered[3 * k : 3 * k + 3]
        w = torch.bmm(u1.view(x, 2 * n1, 2 * n1), (st * s_coef).view(x, 2 * n1, q))
        out.append((w.view(x, -1) * g) @ m)  # Re(W conj(g)) x CG x half-weights
    return torch.cat(out, dim=-1)


def bispectrum_fn(spec: BispectrumSpec, numbers, cell=None, pbc=None):
    """Return ``fn(positions [B, N, 3]) -> bispectrum [B, N, K]`` for one composition group.

    Parameters
    ----------
    spec : the bispectrum specification.
    numbers : [N] atomic numbers (fixed for the group).
    cell : [3, 3] Angstrom, rows are lattice vectors, or None for a cluster.
    pbc : three booleans (None: no periodicity).

    The function is differentiable in the positions (Angstrom) and vectorised over the
    batch and the atoms; dtype and device follow the positions (float64 reproduces LAMMPS
    to ~1e-13 relative; float32 to ~1e-6).  Pairs of atoms that are not within their cutoff
    are computed (for clusters, every pair) and weighted by zero.
    """
    numbers = np.asarray(numbers, dtype=np.int64)
    missing = sorted(set(numbers.tolist()) - set(spec.species))
    if missing:
        raise StructreconError(
            f"structure has element(s) {missing} that the bispectrum spec does not resolve "
            f"(species {list(spec.species)})"
        )
    n_atoms = len(numbers)
    kind = np.searchsorted(np.asarray(spec.species), numbers)
    radius = np.asarray(spec.radii)[kind]  # [N]
    weight = np.asarray(spec.weights)[kind]  # [N]
    pbc_arr = np.zeros(3, dtype=bool) if pbc is None else np.asarray(pbc, dtype=bool)
    periodic = cell is not None and bool(pbc_arr.any())
    cell_np = cell.detach().cpu().numpy() if isinstance(cell, torch.Tensor) else cell
    shifts = lattice_shifts(cell_np if periodic else None, pbc_arr, spec.cutoff)
    tables = _tables(spec.twojmax)
    scale = 1.0 / (tables.j_of + 1.0) if spec.bnormflag else np.ones(len(tables.j_of))
    offset = tables.bzero * scale if spec.bzeroflag else np.zeros(len(tables.j_of))
    rfac0, rmin0, rcutfac = spec.rfac0, spec.rmin0, spec.rcutfac
    switch = spec.switchflag
    # clusters: unordered pairs i < j; U of the reverse pair is the Hermitian conjugate
    pair_i, pair_j = np.triu_indices(n_atoms, k=1)
    n_pairs = len(pair_i)
    pair_cut = rcutfac * (radius[pair_i] + radius[pair_j])
    uniform = float(weight[0]) if len(set(weight.tolist())) == 1 else None
    # pairs (clusters) or neighbour slots per structure (periodic; M <= N S), for chunking
    pairs_per_structure = n_pairs if not periodic else n_atoms * n_atoms * len(shifts)
    cache: dict = {}

    def constants(dtype, device):
        key = (dtype, device)
        if key not in cache:
            cache[key] = (
                _Torch(tables, dtype, device),
                torch.as_tensor(scale, dtype=dtype, device=device),
                torch.as_tensor(offset, dtype=dtype, device=device),
                torch.as_tensor(weight[pair_i], dtype=dtype, device=device),
                torch.as_tensor(weight[pair_j], dtype=dtype, device=device),
                torch.as_tensor(pair_cut, dtype=dtype, device=device),
                torch.as_tensor(pair_i, device=device),
                torch.as_tensor(pair_j, device=device),
                torch.as_tensor(radius * rcutfac, dtype=dtype, device=device),
                torch.as_tensor(weight, dtype=dtype, device=device),
            )
        return cache[key]

    def expansion(vec, r, rcut, valid, tt):
        """Wigner columns [..., n_left] complex and switching function [...] of each pair.

        vec : [..., 3] displacement neighbour - centre; r : [...] its length; rcut : [...]
        pair cutoffs; valid : [...] False for slots that are not pairs.  Pairs outside their
        cutoff get weight 0 and finite, zero gradients.
        """
        ca, cb, fc = parameters(vec, r, rcut, valid)
        return _wigner_left(ca, cb, tt.layers), fc

    def parameters(vec, r, rcut, valid, derivatives=False):
        """conj(a), conj(b) and f_c of each pair (see :func:`expansion`).

        With ``derivatives``, also their derivatives along vec [..., 3] (d conj(a),
        d conj(b) complex, d f_c real; zero for pairs outside their cutoff): closed
        form, where forward-mode autodiff took ~10% of the analytic Jacobian's time.
        """
        inside = valid & (r < rcut) & (r > 0)
        r_safe = torch.where(inside, r, 0.5 * rcut)
        unit = vec / r_safe[..., None]
        span = rcut - rmin0
        theta0 = (rfac0 * math.pi) * (r_safe - rmin0) / span
        cos0, sin0 = torch.cos(theta0), torch.sin(theta0)
        if rmin0 > 0:
            # LAMMPS's z0 = r / tan(theta0): below rmin0 both parameters change sign
            sign = torch.where(theta0 < 0, -1.0, 1.0).to(theta0.dtype)
            cos0, sin0 = cos0 * sign, sin0 * sign
        ca = torch.complex(cos0, sin0 * unit[..., 2])  # conj(a)
        cb = torch.complex(sin0 * unit[..., 1], sin0 * unit[..., 0])  # conj(b)
        if switch:
            fc = 0.5 * (torch.cos(math.pi * (r_safe - rmin0) / span) + 1.0)
            fc = torch.where(r_safe <= rmin0, torch.ones_like(fc), fc)
        else:
            fc = torch.ones_like(r_safe)
        fc = torch.where(inside, fc, torch.zeros_like(fc))
        if not derivatives:
            return ca, cb, fc
        rate = (rfac0 * math.pi / span)[..., None] * unit  # d theta0 / d vec
        eye = torch.eye(3, dtype=vec.dtype, device=vec.device)
        d_unit = (eye - unit[..., :, None] * unit[..., None, :]) / r_safe[..., None, None]
        d_cos, d_sin = -sin0[..., None] * rate, cos0[..., None] * rate

        def sin_times_unit(k):  # d (sin0 u_k)
            return d_sin * unit[..., k, None] + sin0[..., None] * d_unit[..., k, :]

        if switch:
            angle = math.pi * (r_safe - rmin0) / span
            d_fc = (-0.5 * torch.sin(angle) * math.pi / span)[..., None] * unit
            d_fc = torch.where((r_safe <= rmin0)[..., None], 0.0, d_fc)
        else:
            d_fc = torch.zeros_like(unit)
        mask = inside[..., None]
        d_ca = torch.complex(d_cos, sin_times_unit(2)) * mask
        d_cb = torch.complex(sin_times_unit(1), sin_times_unit(0)) * mask
        return ca, cb, fc, d_ca, d_cb, torch.where(mask, d_fc, 0.0)

    def fn(positions: torch.Tensor) -> torch.Tensor:
        if positions.ndim != 3 or positions.shape[1:] != (n_atoms, 3):
            raise ValueError(f"positions must be [B, {n_atoms}, 3], got {tuple(positions.shape)}")
        # batches in chunks whose largest intermediate stays under _CHUNK_BYTES: larger
        # arrays come from fresh memory maps on every call (page faults dominate on CPU)
        per_structure = positions.element_size() * max(
            2 * pairs_per_structure * tables.n_left, n_atoms * tables.widest_block
        )
        size = max(1, _CHUNK_BYTES // per_structure)
        if positions.shape[0] > size and positions.device.type == "cpu":
            return torch.cat([one_chunk(p) for p in positions.split(size)])
        return one_chunk(positions)

    def one_chunk(positions: torch.Tensor) -> torch.Tensor:
        dtype, device = positions.dtype, positions.device
        ctype = torch.complex128 if dtype == torch.float64 else torch.complex64
        (tt, scale_t, offset_t, w_first, w_second, cut, pi, pj, rad, wt) = constants(dtype, device)
        n_batch = positions.shape[0]
        n_left = tables.n_left
        # expansions u^j of every atom, [B, N, n_left] (stored columns m' <= j/2)
        if not periodic:
            total = torch.zeros((n_atoms, n_batch, n_left), dtype=ctype, device=device)
            if n_pairs:
                by_atom = positions.transpose(0, 1)  # [N, B, 3]
                vec = by_atom.index_select(0, pj) - by_atom.index_select(0, pi)  # [P, B, 3]
                r = torch.linalg.norm(vec, dim=-1)
                u, fc = expansion(vec, r, cut[:, None].expand_as(r), True, tt)  # [P, B, n_left]
                if uniform:  # one product u f, the common weight applied per atom
                    v = u * fc[..., None]
                    own = total.index_add(0, pi, v) * uniform  # centre i, neighbour j
                    rev = total.index_add(0, pj, v) * uniform  # centre j, neighbour i
                else:
                    own = total.index_add(0, pi, u * (fc * w_second[:, None])[..., None])
                    rev = total.index_add(0, pj, u * (fc * w_first[:, None])[..., None])
                total = own + tt.dagger(rev)  # U(r_i - r_j) = U(r_j - r_i)^H
            total = total.transpose(0, 1)
        else:
            cell_t = torch.as_tensor(cell, dtype=dtype, device=device)
            geo = neighbour_geometry(positions, cell_t, pbc_arr, shifts, spec.cutoff)
            rcut = (rad[:, None] + rad[geo.neighbour][None, :]).expand_as(geo.distances)
            u, fc = expansion(geo.vectors, geo.distances, rcut, geo.valid, tt)  # [B, N, M, n_left]
            total = (u * (fc * wt[geo.neighbour])[..., None]).sum(2)  # [B, N, n_left]
        total = (total + tt.identity_left).reshape(n_batch * n_atoms, n_left)
        comps = _contract(tt.expand(total), tt)  # from [B N, n_full]
        return (comps * scale_t - offset_t).reshape(n_batch, n_atoms, -1)

    def jacobian(positions: torch.Tensor, values: bool = True):
        """Components [B, N, K] and their analytic Jacobian [B, N, K, N, 3] (clusters).

        The derivative of each component in u (from the coupled expansions Z,
        :func:`_coupled`, as LAMMPS ``snad/atom`` does it) is contracted with the
        derivative of every neighbour's term of u; the centre's own column is minus the
        sum of its neighbours' columns.  About the cost of 5-10 forward passes (measured
        for twojmax 8), against 3N for forward differences.  Not differentiable (no
        graph is kept).  With ``values=False`` the components are not contracted (None
        is returned for them; ~8% of the time).
        """
        if periodic:
            raise StructreconError("the analytic bispectrum Jacobian is for clusters only")
        if positions.ndim != 3 or positions.shape[1:] != (n_atoms, 3):
            raise ValueError(f"positions must be [B, {n_atoms}, 3], got {tuple(positions.shape)}")
        # the largest arrays: the neighbour derivatives [N, N, 3, n_left] complex, and
        # their real and weighted copies
        per_structure = 8 * positions.element_size() * n_atoms * n_atoms * 3 * tables.n_left
        size = max(1, JACOBIAN_CHUNK_BYTES // per_structure)
        with torch.no_grad():
            parts = [jacobian_chunk(p, values) for p in positions.split(size)]
        jac = torch.cat([j for _, j in parts])
        return (torch.cat([v for v, _ in parts]) if values else None), jac

    def jacobian_chunk(positions: torch.Tensor, want_values: bool):
        dtype, device = positions.dtype, positions.device
        ctype = torch.complex128 if dtype == torch.float64 else torch.complex64
        (tt, scale_t, offset_t, w_first, w_second, cut, pi, pj, rad, wt) = constants(dtype, device)
        key = ("jacobian", dtype, device)
        if key not in cache:
            cache[key] = _TorchJacobian(_jacobian_tables(spec.twojmax), dtype, device)
        jt = cache[key]
        n_batch, n_left = positions.shape[0], tables.n_left
        x = n_batch * n_atoms
        total = torch.zeros((n_atoms, n_batch, n_left), dtype=ctype, device=device)
        # d u(centre) / d r(neighbour), stored columns [B, centre, neighbour, 3, n_left]
        deriv = torch.zeros((n_batch, n_atoms * n_atoms, 3, n_left), dtype=ctype, device=device)
        if n_pairs:
            by_atom = positions.transpose(0, 1)
            vec = by_atom.index_select(0, pj) - by_atom.index_select(0, pi)  # [P, B, 3]
            cut_b = cut[:, None].expand(vec.shape[:2])

            r = torch.linalg.norm(vec, dim=-1)
            ca, cb, fc, d_ca, d_cb, d_fc = parameters(vec, r, cut_b, True, derivatives=True)
            u, d_u = _wigner_left_derivative(ca, cb, d_ca, d_cb, tt.layers)
            fc = fc[..., None]
            g = u * fc  # f_c U, [P, B, n_left]; its derivative [B, P, 3, n_left]:
            d_term = (d_u * fc[..., None] + u[..., None, :] * d_fc[..., None]).transpose(0, 1)
            total = total.index_add(0, pi, g * w_second[:, None, None])
            total = total.index_add(0, pj, tt.dagger(g) * w_first[:, None, None])
            # centre i < j: d/d r_j of w_j g(r_j - r_i); centre j: d/d r_i of
            # w_i g(r_j - r_i)^H = -w_i (dg)^H; both are contracted with Z below, and
            # carry the fold weights of that contraction (see _jacobian_tables)
            fold = jt.fold_weight
            deriv[:, pi * n_atoms + pj] = d_term * (w_second[:, None, None] * fold)
            deriv[:, pj * n_atoms + pi] = tt.dagger(d_term) * (-w_first[:, None, None] * fold)
        total = (total.transpose(0, 1) + tt.identity_left).reshape(x, n_left)
        full = tt.expand(total)
        values = None
        if want_values:
            values = (_contract(full, tt) * scale_t - offset_t).reshape(n_batch, n_atoms, -1)
        # dB_k = Re <du, Y_k>, Y_k a combination of Z blocks (see _jacobian_tables); per
        # output layer c, contract its Z blocks with that layer of the neighbour derivatives
        z = _coupled(full, jt)
        d = torch.view_as_real(deriv).reshape(x, n_atoms * 3, n_left, 2)
        per_triple = []
        for first, count, size, left in jt.layers:
            if not count:
                continue
            d_c = d[:, :, left : left + size].reshape(x, n_atoms * 3, 2 * size).transpose(1, 2)
            cols = slice(2 * first, 2 * (first + count * size))
            part = z[:, cols].view(x, count, 2 * size) @ d_c  # [X, count, 3 N]
            per_triple.append(part.view(n_batch, n_atoms, count, -1))
        jac = jt.combine @ torch.cat(per_triple, dim=2)  # [B, N, K, 3 N]
        jac = jac.view(n_batch, n_atoms, -1, n_atoms, 3)
        centre = torch.arange(n_atoms, device=device)
        jac[:, centre, :, centre] = -jac.sum(dim=3).permute(1, 0, 2, 3)
        return values, jac * scale_t[:, None, None]

    fn.n_features = spec.n_features
    fn.jacobian = None if periodic else jacobian
    return fn
