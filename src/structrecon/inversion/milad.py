"""Training-free MILAD reconstruction: moments from invariants, then atoms from moments.

Uhrin, *Through the eyes of a descriptor* (MILAD), section III, with these choices:

- (a) moments from the invariants (Algorithm 1): Levenberg-Marquardt, built up order by
  order n' = 1 ... n_max with random retries of each new order.  The l = 0 moments are
  invariants and the power spectrum fixes the norm of every (n, l) block, so only the
  blocks' directions are free, fitted to the other invariants scaled by the norms of their
  blocks (scale-free; a 2 A molecule in a 5 A ball has order-7 moments ~1e-4).
- (b) atoms from the moments, two ways side by side: peak finding on the density
  reconstructed on a 31^3 grid (eq. 14, Algorithm 2), and multivariate Prony on the
  moment matrices (exact for exact moments of up to 20 atoms in general position; for
  more atoms, the rest after the strongest peaks, and "Prony hops" that keep a random
  subset of the fitted atoms and redo the others).  Then Levenberg-Marquardt of the atoms
  against the moments.
- (c) the atoms against the invariants with the repulsion of eqs. 35-36: first with each
  invariant divided by its natural size (the product of its blocks' norms), then as is;
  a longer polish for attempts that are close (symmetric molecules converge slowly).
- (d) alternation (Fig. 4): later rounds start the moments fit from the moments of the
  atoms found; ``trials`` attempts per target run as one batch until the fingerprint
  RMSD falls below the problem's tolerance.

Species (sections III B, IV A): the atoms' weights as free variables, mapped to the
nearest allowed element weight keeping the total that the zeroth moment fixes, and
re-polished; or from a second fingerprint: positions against a unit-weight fingerprint,
then the weights against the species fingerprint with the positions fixed, then a polish.

Everything runs batched over targets, attempts, retries and candidates, with analytic
Jacobians: the invariants are sparse polynomials of the moments, and each atom's moments
are polynomials of its coordinates.  All fits work in the frame of the moments (no
centring inside); a result is judged with the fingerprint function itself, which centres
as its spec says.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from .._errors import StructreconError
from ..descriptors._zernike import (
    NORMALISATION,
    gaussian_power_coefficients,
    monomial_exponents,
    zernike_coefficients,
)
from ..descriptors.milad import (
    MiladSpec,
    _circumcentre,
    load_invariants,
    miniball_support,
    moments_from_real,
    moments_to_real,
    zernike_basis,
    zernike_indices,
)
from .losses import Repulsion

if TYPE_CHECKING:  # strategies imports this module
    from .strategies import Outcome, Problem

__all__ = ["MiladReconstruction", "MiladModel", "batched_lm"]

SPECIES_MODES = ("given", "fit")
INITIAL_MODES = ("auto", "orders", "random")
# the default repulsion radius of the milad method, Angstrom (the paper: 0.55)
MOLECULAR_R_MIN = 0.9
_LOG = logging.getLogger(__name__)
# species fit: the most atoms for which an open target is rerun per composition (Prony's
# range at n_max = 7; beyond it the known-composition run did worse than the fit on QM9)
COMPOSITION_ATOMS = 20
# covalent valences (neutral, the common state) of the elements organic molecules are made
# of, for the bonding-graph element candidates of a species fit
VALENCES = {1: 1, 5: 3, 6: 4, 7: 3, 8: 2, 9: 1, 14: 4, 15: 3, 16: 2, 17: 1, 35: 1, 53: 1}
# Angstrom: atoms closer than this count as bonded (C-C single bonds are 1.54)
BOND_LENGTH = 1.6
# Angstrom: heavy-atom bond lengths tried for the Lewis-structure candidates (atoms found
# 0.1-0.3 A off stretch some bonds past 1.6; two carbons of a QM9 cage, qm9_36645, are
# 1.83 apart and not bonded)
LEWIS_LENGTHS = (1.6, 1.7, 1.8)


# -- the model: moments, invariants, densities, with Jacobians ----------------------------


class MiladModel:
    """Tables of one MILAD spec for reconstruction, in one dtype.

    Parameters
    ----------
    spec : the :class:`MiladSpec` (its centring is not applied here: positions are taken
        relative to the origin of the moments).
    grid : points per side of the cubic grid used for peak finding (Uhrin: 31).
    dtype : float dtype of all tables.

    Moments are handled as real coordinates ``y`` [B, K] (:func:`moments_to_real`);
    ``K = 120`` for n_max = 7.
    """

    def __init__(self, spec: MiladSpec, *, grid: int = 31, dtype=torch.float64):
        self.spec = spec
        self.dtype = dtype
        self.n_max = spec.n_max
        self.scale = spec.cutoff
        self.sigma = spec.sigma if spec.feature == "gaussian" else None
        idx = zernike_indices(self.n_max)
        self.n_moments = k = len(idx)
        self.order = torch.tensor([n for n, _, _ in idx])  # n of each real coordinate
        # geometric moments -> real coordinates of the Zernike moments: y = m @ C
        omega_of_m = NORMALISATION * np.conj(zernike_coefficients(self.n_max))  # [K, M]
        c = moments_to_real(torch.as_tensor(omega_of_m.T.copy()))  # [M, K]
        self._c = c.to(dtype)
        self._exps = torch.as_tensor(np.array(monomial_exponents(self.n_max)))
        # real coordinates -> complex moments: omega = y @ L
        lmat = moments_from_real(torch.eye(k, dtype=dtype))
        self._lr, self._li = lmat.real.contiguous(), lmat.imag.contiguous()
        if self.sigma is not None:
            d = torch.as_tensor(gaussian_power_coefficients(self.n_max).copy(), dtype=dtype)
            s = self.sigma / self.scale
            lag = torch.arange(self.n_max + 1)
            lag = (lag[None, :] - lag[:, None]).clamp_min(0)
            self._gauss = d * s ** lag.to(dtype)  # [p, k]: E[(u + s X)^k] = sum_p u^p A[p, k]
        else:
            self._gauss = None
        # invariants as raw polynomial terms: value = Re sum_t c_t prod_p omega[i_tp]
        self.invariants = inv = load_invariants(self.n_max, spec.invariants)
        self.n_invariants = f = len(inv)
        self.max_orders = torch.tensor(inv.max_orders)
        # d omega_k = dy[a_k] sa_k + i dy[b_k] sb_k: a gradient g (complex) on omega_k adds
        # Re(g) sa_k to y[a_k] and -Im(g) sb_k to y[b_k] (real density: see moments_to_real)
        pos = {x: i for i, x in enumerate(idx)}
        ya = np.array([pos[(n, ell, abs(m))] for n, ell, m in idx])
        yb = np.array([pos[(n, ell, -abs(m))] for n, ell, m in idx])
        sa = np.array([1.0 if m >= 0 else (-1.0) ** m for _, _, m in idx])
        sb = np.array([0.0 if m == 0 else (1.0 if m > 0 else -((-1.0) ** m)) for _, _, m in idx])
        mirror = [pos[(n, ell, -m)] for n, ell, m in idx]
        groups: dict[int, list] = {}
        fixed = []
        for out, terms in enumerate(inv.terms):
            if len(terms) == 1 and len(terms[0][1]) == 1 and terms[0][0] == 1.0:
                fixed.append((out, terms[0][1][0]))  # the invariant is a moment (l = 0)
            table: dict = {}
            for coef, ids in terms:
                key = tuple(sorted(ids))
                table[key] = table.get(key, 0.0) + coef
            for key, coef in table.items():
                # a term and its mirror (all m negated) have equal real parts for a real
                # density (sum m = 0): keep one of each pair with twice the coefficient
                twin = tuple(sorted(mirror[i] for i in key))
                if twin != key and twin in table and abs(table[twin] - coef) <= 1e-12 * abs(coef):
                    if key > twin:
                        continue
                    coef = 2 * coef
                groups.setdefault(len(key), []).append((key, coef, out))
        self._terms = {}
        self._order_count = {}  # nu -> [number of terms of invariants with max n <= n']
        for nu, rows in sorted(groups.items()):
            rows.sort(key=lambda r: inv.max_orders[r[2]])
            ids = np.array([r[0] for r in rows]).reshape(len(rows), nu)
            out = np.array([r[2] for r in rows])
            orders = np.array([inv.max_orders[r[2]] for r in rows])
            self._order_count[nu] = [int((orders <= o).sum()) for o in range(self.n_max + 1)]
            self._terms[nu] = (
                torch.as_tensor(ids),
                torch.tensor([r[1] for r in rows], dtype=dtype),
                torch.as_tensor(out),
                torch.as_tensor(out[:, None] * k + ya[ids]),  # [T, nu] slots for Re
                torch.as_tensor(out[:, None] * k + yb[ids]),  # [T, nu] slots for Im
                torch.as_tensor(sa[ids], dtype=dtype),
                torch.as_tensor(sb[ids], dtype=dtype),
            )
        self.fixed_invariants = torch.tensor([q[0] for q in fixed], dtype=torch.long)
        self.fixed_moments = torch.tensor([q[1] for q in fixed], dtype=torch.long)
        # (n, l) blocks of the moments: block id per real coordinate, the metric that makes
        # |y_b|^2_M = sum_m |omega_nl^m|^2, and per block l >= 1 its power-spectrum invariant
        blocks = sorted({(n, ell) for n, ell, _ in idx})
        bid = {b: i for i, b in enumerate(blocks)}
        self.blocks = blocks
        self.block_of = torch.tensor([bid[(n, ell)] for n, ell, _ in idx])
        self.metric = torch.tensor([1.0 if m == 0 else 2.0 for _, _, m in idx], dtype=dtype)
        self.block_l = torch.tensor([ell for _, ell in blocks])
        # blocks of each invariant's factors (every term of an invariant has the same ones)
        self.inv_blocks = [
            [bid[idx[i][:2]] for i in terms[0][1]] if terms else [] for terms in inv.terms
        ]
        probe_y = torch.randn(3, k, dtype=dtype, generator=torch.Generator().manual_seed(0))
        probe_v = self.invariants_of(probe_y)
        norms = torch.zeros(3, len(blocks), dtype=dtype).index_add(
            1, self.block_of, self.metric * probe_y**2
        )
        self.power = torch.full((len(blocks),), -1, dtype=torch.long)  # invariant index
        self.power_scale = torch.zeros(len(blocks), dtype=dtype)  # phi = scale |c_nl|^2
        for i, lab in enumerate(inv.labels):
            if lab[0] == 2 and len(set(self.inv_blocks[i])) == 1:
                b = self.inv_blocks[i][0]
                self.power[b] = i
                self.power_scale[b] = (probe_v[0, i] / norms[0, b]).item()
        self.is_power = torch.zeros(f, dtype=torch.bool)
        self.is_power[self.power[self.power >= 0]] = True
        self.is_power[self.fixed_invariants] = True
        width = max(len(b) for b in self.inv_blocks)
        self._inv_block_table = torch.tensor(
            [b + [len(blocks)] * (width - len(b)) for b in self.inv_blocks]
        )  # padded with a dummy block of norm 1
        self.grid_size = grid
        # single atoms at the origin and on the sphere of radius scale / 2 (for the radius)
        probe = torch.tensor([[0.0, 0.0, 0.0], [0.5 * self.scale, 0.0, 0.0]], dtype=dtype)
        self._probe = self.atom_basis(probe, grad=False)

    @functools.cached_property
    def _grid_tables(self):
        """Tables of Algorithm 2, built when first needed.

        The grid (points of a cubic grid inside the ball) [P, 3], the map from moments to
        the density there [K, P], each point's single-atom moments [P, K] and a unit
        atom's own density at its point [P].
        """
        ax = torch.linspace(-self.scale, self.scale, self.grid_size, dtype=self.dtype)
        pts = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), dim=-1).reshape(-1, 3)
        pts = pts[pts.norm(dim=-1) < self.scale]
        z = zernike_basis(pts, self.n_max, self.scale)  # [P, K] complex
        density = self._lr @ z.real.T - self._li @ z.imag.T  # f = y @ density
        basis = self.atom_basis(pts, grad=False)
        return pts, density, basis, (basis * density.T).sum(-1)

    @property
    def grid(self) -> torch.Tensor:
        """Points of the peak-finding grid inside the ball, [P, 3] Angstrom."""
        return self._grid_tables[0]

    # -- positions -> moments ----------------------------------------------------------------

    def atom_basis(self, x: torch.Tensor, *, grad: bool = True):
        """Moments of one unit-weight atom at each point, and their gradients.

        x [..., 3] Angstrom -> (rc [..., K], drc [..., 3, K] per Angstrom), real coordinates,
        in the model's dtype; only rc without ``grad``.
        """
        u = x.to(self.dtype) / self.scale
        n = self.n_max
        pw = [torch.ones_like(u)]
        for _ in range(n):
            pw.append(pw[-1] * u)
        pw = torch.stack(pw, dim=-1)  # [..., 3, n + 1]
        k = torch.arange(n + 1, dtype=x.dtype, device=x.device)
        dpw = torch.cat([torch.zeros_like(pw[..., :1]), pw[..., :-1]], dim=-1) * k / self.scale
        if self._gauss is not None:
            pw, dpw = pw @ self._gauss, dpw @ self._gauss
        e = self._exps
        m0, m1, m2 = pw[..., 0, e[:, 0]], pw[..., 1, e[:, 1]], pw[..., 2, e[:, 2]]
        d0, d1, d2 = dpw[..., 0, e[:, 0]], dpw[..., 1, e[:, 1]], dpw[..., 2, e[:, 2]]
        mono = m0 * m1 * m2
        if not grad:
            return mono @ self._c
        dmono = torch.stack([d0 * m1 * m2, m0 * d1 * m2, m0 * m1 * d2], dim=-2)
        return mono @ self._c, dmono @ self._c

    def moments(self, x: torch.Tensor, w: torch.Tensor, *, jac: bool = False):
        """Real moment coordinates of weighted atoms (Uhrin eq. 30, no centring).

        x [B, N, 3] Angstrom, w [B, N] -> y [B, K]; with ``jac`` also dy/dx [B, K, N, 3]
        and dy/dw [B, K, N].
        """
        rc, drc = self.atom_basis(x)
        y = torch.einsum("bn,bnk->bk", w, rc)
        if not jac:
            return y
        dx = (w[:, :, None, None] * drc).permute(0, 3, 1, 2)
        return y, dx, rc.transpose(1, 2)

    # -- moments -> invariants ---------------------------------------------------------------

    def invariants_of(self, y: torch.Tensor, *, jac: bool = False, order: int | None = None):
        """Invariants of real moment coordinates y [B, K] -> [B, F] (and d/dy [B, F, K]).

        With ``order``, only the invariants whose moments have n <= order are evaluated
        (the others come back as zeros).

        The Jacobian is assembled term by term (leave-one-out products of the factors of
        each monomial), scattered straight into the real coordinates.  Internally the
        batch is the last dimension, so that gathers and scatters move whole rows.
        """
        b, k = y.shape
        f = self.n_invariants
        re = (y @ self._lr).T.contiguous()  # [K, B]
        im = (y @ self._li).T.contiguous()
        val = y.new_zeros(f, b)
        jflat = y.new_zeros(f * k, b) if jac else None
        for nu, tables in self._terms.items():
            count = self._order_count[nu][self.n_max if order is None else order]
            if count == 0:
                continue
            idx, coef, out, slot_a, slot_b, sa, sb = (t[:count] for t in tables)
            fr = [re.index_select(0, idx[:, p]) for p in range(nu)]  # [T, B]
            fi = [im.index_select(0, idx[:, p]) for p in range(nu)]
            pre = [(fr[0], fi[0])]  # pre[p] = prod_{q <= p}
            for p in range(1, nu):
                a, bb = pre[-1]
                pre.append((a * fr[p] - bb * fi[p], a * fi[p] + bb * fr[p]))
            val.index_add_(0, out, coef[:, None] * pre[-1][0])
            if not jac:
                continue
            suf = [None] * nu  # suf[p] = prod_{q > p}
            if nu > 1:
                suf[nu - 2] = (fr[nu - 1], fi[nu - 1])
                for p in range(nu - 3, -1, -1):
                    a, bb = suf[p + 1]
                    suf[p] = (a * fr[p + 1] - bb * fi[p + 1], a * fi[p + 1] + bb * fr[p + 1])
            for p in range(nu):
                if nu == 1:
                    lr, li = torch.ones_like(fr[0]), torch.zeros_like(fr[0])
                elif p == 0:
                    lr, li = suf[0]
                elif p == nu - 1:
                    lr, li = pre[p - 1]
                else:
                    (a, bb), (c, d) = pre[p - 1], suf[p]
                    lr, li = a * c - bb * d, a * d + bb * c
                jflat.index_add_(0, slot_a[:, p], lr * (coef * sa[:, p])[:, None])
                jflat.index_add_(0, slot_b[:, p], li * (-coef * sb[:, p])[:, None])
        if not jac:
            return val.T
        return val.T, jflat.reshape(f, k, b).permute(2, 0, 1)

    # -- densities, peaks and Prony --------------------------------------------------------

    def density(self, y: torch.Tensor) -> torch.Tensor:
        """Reconstructed density (eq. 14) on :attr:`grid`: y [B, K] -> [B, P]."""
        return y @ self._grid_tables[1]

    def total_weight(self, phi0: torch.Tensor) -> torch.Tensor:
        """Sum of the weights from the zeroth moment (the first invariant): [B] -> [B]."""
        return phi0 / self._probe[0, 0]

    def mean_square_radius(self, phi: torch.Tensor) -> torch.Tensor:
        """Weighted mean r^2 (Angstrom^2) from the l = 0 moments n = 0, 2: phi [B, F] -> [B].

        Omega_200 = sum_i w_i (alpha r_i^2 + beta); the invariants (1, 0) and (1, 2) are
        those moments.  NaN where the set lacks them.
        """
        slots = {int(m): int(i) for i, m in zip(self.fixed_invariants, self.fixed_moments)}
        k200 = zernike_indices(self.n_max).index((2, 0, 0)) if self.n_max >= 2 else -1
        if 0 not in slots or k200 not in slots:
            return torch.full(phi.shape[:1], math.nan, dtype=phi.dtype)
        total = self.total_weight(phi[:, slots[0]])
        beta = self._probe[0, k200]
        alpha = (self._probe[1, k200] - beta) / 0.25
        return (phi[:, slots[k200]] / total - beta) / alpha * self.scale**2

    def block_norms(self, phi: torch.Tensor) -> torch.Tensor:
        """Norms of the (n, l) moment blocks from the invariants: [B, F] -> [B, blocks].

        l = 0 blocks are invariants themselves, the others' squared norms are their
        power spectrum (up to a constant); norms below 1e-7 of the largest are zero.
        """
        b = phi.shape[0]
        rho = torch.zeros(b, len(self.blocks), dtype=phi.dtype)
        has = self.power >= 0
        rho[:, has] = (phi[:, self.power[has]] / self.power_scale[has]).clamp_min(0).sqrt()
        rho[:, self.block_of[self.fixed_moments]] = phi[:, self.fixed_invariants].abs()
        return torch.where(rho > 1e-7 * rho.amax(dim=1, keepdim=True), rho, torch.zeros_like(rho))

    def invariant_scales(self, phi: torch.Tensor) -> torch.Tensor:
        """Natural size of each invariant: the product of its blocks' norms, [B, F]."""
        rho = self.block_norms(phi)
        padded = torch.cat([rho, torch.ones(rho.shape[0], 1, dtype=rho.dtype)], dim=1)
        return padded[:, self._inv_block_table].prod(dim=-1)

    def peaks(self, y, n_atoms: int, *, r_exclude: float, w_range=(1.0, 1.0)):
        """Uhrin Algorithm 2: N atoms from moments by peak finding, batched.

        y [B, K] moments -> (positions [B, N, 3] Angstrom, weights [B, N]).  At each step
        the highest grid point is taken, the signal of an atom of the estimated weight
        (peak height over a unit atom's own height, clipped to ``w_range``) is subtracted
        and the grid points within ``r_exclude`` of it are blanked.
        """
        b = y.shape[0]
        grid, density, basis, own = self._grid_tables
        dens = y @ density
        free = torch.ones_like(dens, dtype=torch.bool)
        rows = torch.arange(b)
        pos, wts = [], []
        for _ in range(n_atoms):
            q = torch.where(free, dens, torch.full_like(dens, -math.inf)).argmax(dim=1)
            w = (dens[rows, q] / own[q]).clamp(*w_range)
            dens = dens - w[:, None] * (basis[q] @ density)
            p = grid[q]
            free &= (grid[None, :, :] - p[:, None, :]).norm(dim=-1) > r_exclude
            free |= ~free.any(dim=1, keepdim=True)  # nothing left: allow all points again
            pos.append(p)
            wts.append(w)
        return torch.stack(pos, dim=1), torch.stack(wts, dim=1)

    @property
    def prony_atoms(self) -> int:
        """Most atoms :meth:`prony` recovers exactly (0: not available for this spec)."""
        return 0 if self.sigma is not None or self.n_max < 7 else len(self._prony[0])

    def prony(self, y, n_atoms: int, generator):
        """Atoms and weights from delta moments by multivariate Prony (moment matrices).

        With monomials v(u) of degree <= 3 (20 of them) and geometric moments
        m = sum_i w_i u_i^a (u = x / R; from the Zernike moments by the inverse change of
        basis), H = [m_(a+b)] = V^T W V and H_d = [m_(a+b+e_d)] = V^T W diag(u_d) V need
        moments up to degree 7.  For N <= 20 points in general position H has rank N; in
        the basis of its top N eigenvectors, Lambda^-1/2 U^T H_d U Lambda^-1/2 are
        symmetric matrices with the common eigenvectors Q and eigenvalues u_d,i, and
        sqrt(w_i) = (Q^T Lambda^1/2 U^T)_i0.  Exact for exact moments; with approximate
        moments an approximation.  Batched: y [B, K] -> (x [B, N, 3], w [B, N]).
        Points are pulled inside the ball and non-finite ones replaced by the origin.
        """
        cols, shifted, c_inv = self._prony
        n = min(n_atoms, len(cols))
        g = y @ c_inv  # geometric moments of the unit-ball coordinates
        h = g[:, cols]
        lam, vec = torch.linalg.eigh(h)
        lam, vec = lam[:, -n:].clamp_min(1e-300), vec[:, :, -n:]
        isq = lam.rsqrt()
        mats = [isq[:, :, None] * (vec.mT @ g[:, s] @ vec) * isq[:, None, :] for s in shifted]
        c = torch.randn(3, generator=generator, dtype=y.dtype)
        _, q = torch.linalg.eigh(c[0] * mats[0] + c[1] * mats[1] + c[2] * mats[2])
        u = torch.stack([torch.einsum("bki,bkl,bli->bi", q, s, q) for s in mats], dim=-1)
        w = torch.einsum("bki,bk->bi", q, lam.sqrt() * vec[:, 0, :]) ** 2
        u = torch.nan_to_num(u, nan=0.0, posinf=0.0, neginf=0.0)
        r = u.norm(dim=-1, keepdim=True)
        u = torch.where(r > 0.98, u * 0.98 / r.clamp_min(1e-12), u)
        return u * self.scale, torch.nan_to_num(w, nan=1.0)

    @functools.cached_property
    def _prony(self):
        exps = monomial_exponents(self.n_max)
        pos = {e: i for i, e in enumerate(exps)}
        basis = [e for e in exps if sum(e) <= 3]

        def table(shift):
            return torch.tensor(
                [
                    [pos[tuple(a + b + s for a, b, s in zip(ea, eb, shift))] for eb in basis]
                    for ea in basis
                ]
            )

        cols = table((0, 0, 0))
        shifted = [table(e) for e in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]
        return cols, shifted, torch.linalg.inv(self._c)


@functools.lru_cache(maxsize=8)
def _model(spec: MiladSpec, grid: int) -> MiladModel:
    """Models are immutable once built: one per (spec, grid), float64."""
    return MiladModel(spec, grid=grid, dtype=torch.float64)


# -- batched Levenberg-Marquardt ------------------------------------------------------------


def batched_lm(
    fun,
    v: torch.Tensor,
    *,
    steps: int,
    damping: float = 1e-3,
    cost_tol: float = 0.0,
    patience: int = 10,
    progress: float = 0.5,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Levenberg-Marquardt on many independent least-squares problems at once.

    Parameters
    ----------
    fun : ``fun(v [b, D], rows [b]) -> (residuals [b, M], Jacobian [b, M, D])``; ``rows``
        are the indices of the problems in ``v`` (to pick their targets).
    v : [B, D] starting points.
    steps : iterations.
    damping : initial damping lambda, with Marquardt's scaling by diag(J^T J).  A step
        that lowers a problem's squared residual is taken and its lambda divided by 3,
        else lambda is multiplied by 4.
    cost_tol : a problem whose squared residual falls below this is done.
    patience, progress : a problem whose squared residual has not fallen below
        ``progress`` times its value ``patience`` iterations earlier has stalled (a wrong
        basin, or converged as far as rounding allows) and stops.
    bounds : optional (low [D], high [D]) the variables are clipped to after each step.

    Returns
    -------
    v [B, D] and the squared residual [B].  Only the problems still running are
    evaluated, so the cost falls as problems finish.
    """
    v = v.clone()
    rows = torch.arange(v.shape[0])
    r, j = fun(v, rows)
    cost = (r**2).sum(-1)
    lam = torch.full_like(cost, damping)
    alive = torch.isfinite(cost) & (cost > cost_tol)
    past = [cost.clone()]
    for it in range(steps):
        idx = torch.nonzero(alive).flatten()
        if idx.numel() == 0:
            break
        jl = j[idx]
        jtj = jl.mT @ jl
        grad = (jl.mT @ r[idx, :, None])[..., 0]
        diag = torch.diagonal(jtj, dim1=1, dim2=2)
        diag = diag.clamp_min(1e-9 * diag.mean(-1, keepdim=True) + 1e-30)
        step, info = torch.linalg.solve_ex(jtj + torch.diag_embed(lam[idx, None] * diag), -grad)
        v_new = v[idx] + torch.nan_to_num(step)
        if bounds is not None:
            v_new = torch.maximum(torch.minimum(v_new, bounds[1]), bounds[0])
        r_new, j_new = fun(v_new, idx)
        cost_new = (r_new**2).sum(-1)
        ok = torch.isfinite(cost_new) & (cost_new < cost[idx]) & (info == 0)
        take = idx[ok]
        v[take] = v_new[ok]
        r[take] = r_new[ok]
        j[take] = j_new[ok]
        cost[take] = cost_new[ok]
        lam[idx] = torch.where(ok, lam[idx] / 3.0, lam[idx] * 4.0).clamp(1e-15, 1e12)
        past.append(cost.clone())
        alive &= (cost > cost_tol) & (lam < 1e12)
        if it + 1 >= patience:
            alive &= ~(cost > progress * past[-1 - patience])
    return v, cost


# -- pieces of the strategy -----------------------------------------------------------------


def _milad_spec(fn, what: str) -> MiladSpec:
    spec = getattr(getattr(fn, "spec", None), "descriptor", None)
    if not isinstance(spec, MiladSpec):
        kind = getattr(spec, "kind", type(spec).__name__)
        raise StructreconError(
            f"method 'milad' needs a MILAD fingerprint ({what} is '{kind}'); "
            "use the milad or milad-species preset or a milad spec"
        )
    return spec


def _repulsion(rep: Repulsion, x: torch.Tensor, pairs):
    """Uhrin eq. 35 summed over pairs i < j as one residual, and its gradient.

    x [B, N, 3] -> (E [B, 1], dE/dx [B, 1, N, 3]).  Smooth: E and dE/dr vanish at r_min.
    """
    i, j = pairs
    d = x[:, i] - x[:, j]  # [B, P, 3]
    r = d.norm(dim=-1).clamp_min(1e-9)
    s, rm, p = rep.sigma, rep.r_min, rep.n
    k1 = p * s**p / rm ** (p + 1)
    k2 = -((s / rm) ** p) - k1 * rm
    inside = r < rm
    rs = torch.where(inside, r, torch.full_like(r, rm))
    e = torch.where(inside, 4 * rep.epsilon * ((s / rs) ** p + k1 * rs + k2), 0.0)
    de = torch.where(inside, 4 * rep.epsilon * (-p * s**p / rs ** (p + 1) + k1), 0.0)
    g = (de / r)[..., None] * d  # dE_ij / dx_i; the negative for x_j
    grad = torch.zeros_like(x).index_add(1, i, g).index_add(1, j, -g)
    return e.sum(-1, keepdim=True), grad[:, None]


# bond lengths and angles of the chemical restraints (Angstrom, degrees): a bond to a
# hydrogen, a bond between two heavy atoms of four neighbours each (sp3), and the angle
# at an atom of four (tetrahedral) or three (trigonal) neighbours
RESTRAINT_XH = {6: 1.09, 7: 1.01, 8: 0.96}  # by the heavy atom, where it is known
RESTRAINT_XH_ANY = 1.09
RESTRAINT_SP3 = 1.53
RESTRAINT_ANGLES = {4: 109.47, 3: 120.0}
# a heavy-heavy bond of another kind keeps its length, within these limits
RESTRAINT_HEAVY = (1.2, 1.55)
# the steps of the restraints' weight (the last is followed by a plain polish)
RESTRAINT_WEIGHTS = (1.0, 0.1, 0.01)
# heavy atoms closer than this are bonded (a distorted attempt's bonds stretch)
RESTRAINT_BOND = 1.75
# the elements the restraints know
RESTRAINED = {1, 6, 7, 8, 9}


def _restraints(x: torch.Tensor, light: torch.Tensor, numbers=None):
    """Chemical restraints for atoms x [N, 3] whose ``light`` [N] (bool) are hydrogens.

    Each hydrogen is bonded to its nearest heavy atom, heavy atoms closer than
    ``RESTRAINT_BOND`` to each other; each bond gets a length (to a hydrogen:
    ``RESTRAINT_XH`` by the heavy atom's element where ``numbers`` [N] gives it, else
    ``RESTRAINT_XH_ANY``; ``RESTRAINT_SP3`` between two heavy atoms of four neighbours;
    otherwise its own, clipped to ``RESTRAINT_HEAVY``), and the two ends of two bonds
    at an atom of four or three neighbours the distance of the ideal angle between
    them.  Returns pairs [P, 2] and target distances [P].
    """
    n = x.shape[0]
    d = torch.cdist(x, x)
    heavy = torch.nonzero(~light).flatten()
    bonds = []
    if heavy.numel():
        for h in torch.nonzero(light).flatten().tolist():
            bonds.append([h, int(heavy[d[h, heavy].argmin()])])
        near = d[heavy][:, heavy] < RESTRAINT_BOND
        for a, b in torch.nonzero(torch.triu(near, diagonal=1)).tolist():
            bonds.append([int(heavy[a]), int(heavy[b])])
    if not bonds:
        return torch.zeros(0, 2, dtype=torch.long), x.new_zeros(0)
    bonds = torch.tensor(bonds)
    degree = torch.bincount(bonds.flatten(), minlength=n)
    lo, hi = RESTRAINT_HEAVY
    length = d[bonds[:, 0], bonds[:, 1]].clamp(lo, hi)
    to_h = light[bonds].any(-1)
    sp3 = (degree[bonds] == 4).all(-1)
    xh = torch.full_like(length, RESTRAINT_XH_ANY)
    if numbers is not None:
        heavy_end = torch.where(light[bonds[:, 0]], bonds[:, 1], bonds[:, 0])
        for z, r in RESTRAINT_XH.items():
            xh[torch.as_tensor(np.asarray(numbers))[heavy_end] == z] = r
    length = torch.where(to_h, xh, torch.where(sp3, RESTRAINT_SP3, length))
    pairs, target = [bonds], [length]
    for centre, angle in RESTRAINT_ANGLES.items():
        for c in torch.nonzero(degree == centre).flatten().tolist():
            mine = torch.nonzero((bonds == c).any(-1)).flatten()
            ends = bonds[mine].sum(-1) - c  # the other end of each bond
            i, j = torch.triu_indices(len(mine), len(mine), offset=1)
            ra, rb = length[mine[i]], length[mine[j]]
            cos = math.cos(math.radians(angle))
            pairs.append(torch.stack([ends[i], ends[j]], -1))
            target.append((ra**2 + rb**2 - 2 * ra * rb * cos).sqrt())
    return torch.cat(pairs), torch.cat(target)


def _restraint_residuals(x, pairs, dist, scale):
    """Residuals scale * (|x_i - x_j| - dist), one per pair, and their Jacobian.

    x [B, N, 3], pairs [B, P, 2], dist and scale [B, P] -> ([B, P], [B, P, N, 3]).
    """
    b, n, _ = x.shape
    ar = torch.arange(b)[:, None]
    diff = x[ar, pairs[..., 0]] - x[ar, pairs[..., 1]]  # [B, P, 3]
    length = diff.norm(dim=-1).clamp_min(1e-9)
    unit = scale[..., None] * diff / length[..., None]
    jac = x.new_zeros(b, pairs.shape[1], n, 3)
    rows = torch.arange(pairs.shape[1])[None]
    jac[ar, rows, pairs[..., 0]] += unit
    jac[ar, rows, pairs[..., 1]] -= unit
    return scale * (length - dist), jac


def _centring(x: torch.Tensor, centre: str, *, with_jac: bool = True):
    """Atoms x [B, N, 3] moved to a MILAD centre, and the centre's Jacobian.

    Returns the moved atoms and dc/dx [B, 3, N, 3].  ``miniball``: the circumcentre of
    the atoms on the smallest enclosing sphere (as :func:`centre_positions`), whose
    derivative involves those atoms only (a structure whose centre cannot be found is
    not moved); ``centroid``: the mean; ``origin``: no move.  Without ``with_jac`` the
    Jacobian comes back as zeros.
    """
    b, n, _ = x.shape
    jac = x.new_zeros(b, 3, n, 3)
    if centre == "origin":
        return x, jac
    if centre == "centroid":
        jac[:] = torch.eye(3, dtype=x.dtype)[None, :, None, :] / n
        return x - x.mean(dim=1, keepdim=True), jac
    moved = x.clone()
    for i in range(b):  # one at a time: a degenerate structure stays where it is
        try:
            support = miniball_support(x[i])
            centre_i = _circumcentre(x[i, support])
            jac_i = torch.func.jacrev(_circumcentre)(x[i, support]) if with_jac else None
        except (ArithmeticError, ValueError, RuntimeError, np.linalg.LinAlgError):
            continue
        if torch.isfinite(centre_i).all() and (jac_i is None or torch.isfinite(jac_i).all()):
            moved[i] = x[i] - centre_i
            if with_jac:
                jac[i][:, support] = jac_i
    return moved, jac


def _snap_weights(w: torch.Tensor, allowed: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Map continuous weights [B, N] to allowed values [S], keeping each row's total.

    Nearest allowed value first; then, while a row's total is off by more than half the
    smallest gap, the atom whose move to the neighbouring allowed value (in the needed
    direction) costs least moves.
    """
    allowed = allowed.sort().values
    k = (w[..., None] - allowed).abs().argmin(-1)  # [B, N]
    if len(allowed) < 2:
        return allowed[k]
    gap = (allowed[1:] - allowed[:-1]).min()
    for _ in range(2 * len(allowed) * w.shape[1]):
        diff = total - allowed[k].sum(-1)
        up = diff > 0
        k_new = torch.where(up[:, None], k + 1, k - 1)
        valid = (k_new >= 0) & (k_new < len(allowed))
        k_new = k_new.clamp(0, len(allowed) - 1)
        cost = (w - allowed[k_new]) ** 2 - (w - allowed[k]) ** 2
        cost = torch.where(valid, cost, torch.full_like(cost, math.inf))
        best, pick = cost.min(-1)
        rows = torch.nonzero((diff.abs() > 0.5 * gap) & torch.isfinite(best)).flatten()
        if rows.numel() == 0:
            break
        k[rows, pick[rows]] = k_new[rows, pick[rows]]
    return allowed[k]


def _pair_moves(w, ia, ib, allowed):
    """Every change of two atoms' elements that keeps their summed weight.

    w [B, N]: element weights; ia, ib [P]: the atom pairs; allowed [S]: the element
    weights.  Candidate p * S + s puts allowed[s] on atom ia[p] and the rest of the
    pair's weight on atom ib[p].  Returns the candidates [B, P * S, N] and a mask
    [B, P * S]: the rest is an element and the move changes something.
    """
    s_count = len(allowed)
    pa, pb = ia.repeat_interleave(s_count), ib.repeat_interleave(s_count)
    a = allowed.repeat(len(ia))  # atom pa's new weight
    hit = (((w[:, pa] + w[:, pb] - a)[..., None]) - allowed).abs().min(dim=-1)
    ok = (hit.values < 1e-9) & ((a - w[:, pa]).abs() > 1e-9)
    out = w[:, None].repeat(1, len(a), 1)
    ar = torch.arange(len(a))
    out[:, ar, pa] = a
    out[:, ar, pb] = allowed[hit.indices]
    return out, ok


def valence_compositions(n: int, total: float, species, weights) -> np.ndarray:
    """Element counts [C, S] of n atoms with summed weight ``total`` that a molecule can have.

    The weights must sum to ``total`` within a quarter of the smallest gap between them,
    and a connected, neutral, closed-shell molecule with the usual valences needs their
    valences to sum to an even number, at least twice n - 1 (enough bonds to connect
    the atoms).  Columns follow ``species``.  Empty when an element has no entry in
    ``VALENCES``.
    """
    species, weights = list(species), np.asarray(weights, dtype=float)
    if not species or any(z not in VALENCES for z in species):
        return np.zeros((0, len(species)), dtype=int)
    val = np.array([VALENCES[z] for z in species])
    gaps = np.diff(np.unique(weights))
    tol = 0.25 * (gaps.min() if len(gaps) else 1.0)
    out = []

    def walk(i, left, w_left, counts):
        if i == len(species) - 1:
            if abs(left * weights[i] - w_left) < tol:
                out.append(counts + [left])
            return
        rest = weights[i + 1 :]
        for c in range(left + 1):
            w = w_left - c * weights[i]
            m = left - c  # the rest must fit between m * their lightest and heaviest
            if m * rest.min() - tol <= w <= m * rest.max() + tol:
                walk(i + 1, m, w, counts + [c])

    walk(0, n, float(total), [])
    comps = np.array(out, dtype=int).reshape(-1, len(species))
    bonds = comps @ val
    return comps[(bonds % 2 == 0) & (bonds >= 2 * (n - 1))]


def _fewest_neighbours_first(x, w):
    """Atoms x [N, 3] by neighbour count: (degree [N], order [N]).

    degree: neighbours within ``BOND_LENGTH``; order: the atoms, fewest neighbours
    first, ties broken by the lower fitted weight w [N].
    """
    degree = (torch.cdist(x, x) < BOND_LENGTH).sum(-1) - 1
    span = (w.max() - w.min()).clamp_min(1e-12)
    return degree, (degree + 0.5 * (w - w.min()) / span).argsort()


def _bond_assignment(x, w, weights_sorted, light, valence=None):
    """Element weights [N] for atoms x [N, 3] from a composition's sorted weights [N].

    The ``light`` lightest go to the atoms with the fewest neighbours within
    ``BOND_LENGTH`` (ties: the lower fitted weight w [N]), the rest by w's rank.  With
    ``valence`` (the valence of each entry of ``weights_sorted``) the rest go by
    neighbour count first: the atoms of fewest neighbours get the elements of lowest
    valence (O before N before C), and within atoms of one count, by w's rank.
    """
    degree, order = _fewest_neighbours_first(x, w)
    out = torch.empty_like(w)
    out[order[:light]] = weights_sorted[:light]
    rest = order[light:]
    heavy = weights_sorted[light:]
    if valence is None:
        out[rest[w[rest].argsort()]] = heavy
        return out
    by_valence = heavy[torch.as_tensor(np.lexsort((heavy.numpy(), np.asarray(valence)[light:])))]
    rest = rest[degree[rest].argsort(stable=True)]  # fewest neighbours first
    start = 0
    for k in degree[rest].unique().tolist():
        group = rest[degree[rest] == k]
        mine = by_valence[start : start + len(group)].sort().values
        out[group[w[group].argsort()]] = mine
        start += len(group)
    return out


def _lewis_ok(excess, edges, budget: int = 20000) -> bool:
    """Whether double and triple bonds can use up every atom's free valence exactly.

    ``excess``: each atom's valence minus its neighbours; ``edges``: the bonded pairs
    (a, b), each of which can take one or two more bonds.  A depth-first search over
    the first atom with free valence left (at most ``budget`` calls; False beyond).
    """
    excess = tuple(int(e) for e in excess)
    if sum(excess) % 2 or min(excess, default=0) < 0:
        return False
    adj = [[] for _ in excess]
    for e, (a, b) in enumerate(edges):
        adj[a].append((b, e))
        adj[b].append((a, e))
    failed = set()
    calls = 0

    def solve(exc, extra):
        nonlocal calls
        calls += 1
        if calls > budget or (exc, extra) in failed:
            return False
        i = next((k for k, v in enumerate(exc) if v > 0), None)
        if i is None:
            return True
        for j, e in adj[i]:
            if exc[j] > 0 and extra[e] < 2:
                ex, ed = list(exc), list(extra)
                ex[i], ex[j], ed[e] = ex[i] - 1, ex[j] - 1, ed[e] + 1
                if solve(tuple(ex), tuple(ed)):
                    return True
        failed.add((exc, extra))
        return False

    return solve(excess, (0,) * len(edges))


def _lewis_assignments(x, w, weights_sorted, light, valence, *, limit: int = 20000):
    """Element weights [M, N] for atoms x [N, 3] whose valences admit a Lewis structure.

    The ``light`` lightest entries of the composition ``weights_sorted`` [N] (a terminal
    element) go to the atoms of fewest neighbours, as in :func:`_bond_assignment`, each
    bonded to its nearest other atom; the rest are spread over the other atoms in every
    way in which each atom's valence (``valence`` [N], per entry) covers its neighbours
    and the free valences pair up into double and triple bonds along the bonding graph
    (:func:`_lewis_ok`), for each heavy-atom bond length in ``LEWIS_LENGTHS``; at most
    ``limit`` assignments are tried per length.  Rows are distinct, nearest the fitted
    weights w [N] first.
    """
    n = x.shape[0]
    d = torch.cdist(x, x)
    terminal, heavy = _fewest_neighbours_first(x, w)[1].split([light, n - light])
    if len(heavy) == 0:
        return weights_sorted.new_zeros(0, n)
    kinds = sorted(set(zip(weights_sorted[light:].tolist(), valence[light:])))
    wanted = [sum(1 for v in weights_sorted[light:].tolist() if v == k[0]) for k in kinds]
    attached = torch.zeros(len(heavy), dtype=torch.long)
    if light:
        nearest = d[terminal][:, heavy].argmin(dim=1)
        attached.index_add_(0, nearest, torch.ones_like(nearest))
    dh = d[heavy][:, heavy]
    found = set()
    for length in LEWIS_LENGTHS:
        bonded = (dh < length) & ~torch.eye(len(heavy), dtype=torch.bool)
        edges = torch.nonzero(torch.triu(bonded, diagonal=1)).tolist()
        deg = (attached + bonded.sum(-1)).tolist()
        pick, left, tried = [0] * len(heavy), list(wanted), 0

        def walk(i):
            nonlocal tried
            if tried >= limit:
                return
            if i == len(heavy):
                tried += 1
                if _lewis_ok([kinds[k][1] - deg[a] for a, k in enumerate(pick)], edges):
                    found.add(tuple(pick))
                return
            for k, (_, val) in enumerate(kinds):
                if left[k] and val >= deg[i]:
                    pick[i] = k
                    left[k] -= 1
                    walk(i + 1)
                    left[k] += 1

        walk(0)
    if not found:
        return weights_sorted.new_zeros(0, n)
    out = torch.empty(len(found), n, dtype=weights_sorted.dtype)
    out[:, terminal] = weights_sorted[:light]
    table = torch.tensor([k[0] for k in kinds], dtype=weights_sorted.dtype)
    out[:, heavy] = table[torch.tensor(sorted(found))]
    return out[(out - w).pow(2).sum(-1).argsort()]


def _match_order(w_found: torch.Tensor, w_wanted: torch.Tensor) -> torch.Tensor:
    """Permutation p with w_found[p] matching w_wanted by rank: [N] long."""
    a = w_found.argsort(stable=True)
    b = w_wanted.argsort(stable=True)
    perm = torch.empty_like(a)
    perm[b] = a
    return perm


# -- the strategy ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class MiladReconstruction:
    """Uhrin 2021 section III: moments from invariants, atoms from moments, alternated.

    Parameters
    ----------
    trials : independent attempts per target (Uhrin: 3), run as one batch; a target is
        done as soon as one attempt reaches the problem's ``tol``.
    rounds : alternations of the moments and atoms fits per attempt (Fig. 4); a round
        after the first starts the moments fit from the moments of the best atoms the
        attempt has found so far, by fingerprint RMSD (but see ``initial``).  Rounds
        run only for targets still open, so more of them cost time only on failures:
        on the paper's 77 QM9 molecules (positions) 8 rounds solved two that 4 did not
        (README).
    retries : random restarts of each new moment order, fitted side by side, the best
        kept (Algorithm 1's max_retries).
    moment_steps, atom_steps, polish_steps : Levenberg-Marquardt iterations for the
        moments (per order), the atoms against the moments, and the atoms against the
        invariants (the last also ends a run that has stalled for ``patience`` steps).
    patience : iterations without a 10% drop of the squared residual after which a polish
        stops.
    grid : grid points per side for peak finding (Uhrin: 31).
    species : ``given`` - the problem's composition (weights from the spec; with unequal
        weights the atoms' weights are fitted, then the composition's weights assigned by
        rank and the positions re-polished); ``fit`` - species unknown: weights are free
        variables, mapped to the nearest element weight of the spec (keeping the total
        that the zeroth moment fixes), re-polished, corrected by a walk over element
        assignments (see ``species_walk``), and the elements come back in the
        outcome.  With a species fingerprint in the problem (``species_targets``),
        positions come from the main (unit-weight) fingerprint and species from the
        second, whatever this option says.
    prony_hops, prony_subsets : for more than 20 atoms, rounds of Prony hops and the
        random subsets tried in each (see :meth:`_Run.prony_hops`).
    bonds, bond_comps, bond_cycles : with unequal weights, also try element assignments
        read off the bonding graph (see :meth:`_Run.bond_candidates`), for at most
        ``bond_comps`` compositions, read again from the refitted atoms up to
        ``bond_cycles`` times; ``bonds=False`` maps weights to elements by weight alone.
        ``bond_valence`` adds, where a composition's heavy elements differ in valence,
        the assignment that gives the heavy atoms of fewest neighbours the elements of
        lowest valence.  ``bond_lewis``: for attempts within invariant RMSD 1e-2, also
        up to this many assignments whose valences admit a Lewis structure on the
        bonding graph (see :func:`_lewis_assignments`; 0 turns them off).  With species
        ``fit``, targets still open after the rounds get these candidates once more,
        read from their final atoms (see :meth:`_Run.last_bonds`).
    restrain, restrain_round : with unit weights (positions; the positions of two
        fingerprints), for molecules of H, C, N, O and F, attempts that end round
        ``restrain_round`` or a later one unsolved are also polished with chemical
        restraints on their bonds and angles (see :meth:`_Run.restrained`).  It costs
        seconds per round, so the first round, which solves most molecules, goes
        without.  On QM9 it gained two molecules in positions mode and none with
        species weights fitted (README).
    species_walk, walk_fast, walk_steps, walk_keep : species ``fit`` only: at most
        ``species_walk`` moves of a greedy walk over element assignments, each
        candidate judged after ``walk_fast`` position-refit steps, the best
        ``walk_keep`` after ``walk_steps`` more (see :meth:`_Run.species_search`);
        0 turns the walk off.
    composition_runs : species ``fit`` only, molecules of at most ``COMPOSITION_ATOMS``
        atoms: a target still open after the rounds is run again as a known composition
        (``species='given'``) for each of at most this many compositions its weights
        allow (see :meth:`_Run.composition_runs`), nearest its best attempt's weights
        first; 0 turns it off.
    initial : where the first round's moments fit starts.  ``random``: random directions
        of the moment blocks (Algorithm 1 as the paper).  ``orders``: random atoms fitted
        to the invariants order by order, n' = 2 ... n_max (coarse to fine,
        ``order_steps`` Levenberg-Marquardt iterations each), whose moments start
        Algorithm 1 (see :meth:`_Run.atoms_by_order`).  ``auto`` (default): ``orders``
        for more atoms than Prony recovers (20 at n_max = 7); for fewer, ``random``,
        and the second round (for targets still open) starts from atoms fitted order by
        order instead of the atoms of the first.  On QM9 ``random`` succeeds up to 22
        atoms in about half the time of ``orders``, but not always; beyond, ``orders``
        succeeds on most molecules where ``random`` fails (README).

    Atoms come from the moments two ways, fitted side by side: peaks (Algorithm 2) and,
    for delta features, multivariate Prony on the moment matrices (exact for exact
    moments of up to 20 atoms in general position; for more atoms the remainder after
    subtracting the strongest peaks).  Where the moments fit is exact but the atoms are
    not, they are fitted to the moments at length (see :meth:`_Run.moment_polish`).  The
    repulsion of eqs. 35-36 is the problem's, or the paper's (epsilon 0.1, sigma 1, n 2)
    with r_min = ``MOLECULAR_R_MIN`` (0.9 Angstrom, where the paper has 0.55: no
    covalent bond but H2's is shorter, and on QM9 the near misses sat at the paper's
    limit; README); r_min is also the blanking radius of the peak finder.
    """

    trials: int = 3
    rounds: int = 8
    retries: int = 2
    moment_steps: int = 30
    atom_steps: int = 30
    polish_steps: int = 300
    patience: int = 30
    grid: int = 31
    species: str = "given"
    prony_hops: int = 4
    prony_subsets: int = 8
    initial: str = "auto"
    order_steps: int = 100
    species_walk: int = 8
    walk_fast: int = 10
    walk_steps: int = 50
    walk_keep: int = 32
    bonds: bool = True
    bond_comps: int = 8
    bond_cycles: int = 2
    bond_valence: bool = True
    bond_lewis: int = 24
    restrain: bool = True
    restrain_round: int = 1
    composition_runs: int = 4

    name = "milad"

    def __post_init__(self):
        for field_name in (
            "trials",
            "rounds",
            "retries",
            "moment_steps",
            "atom_steps",
            "polish_steps",
            "patience",
            "grid",
            "prony_subsets",
            "order_steps",
            "walk_fast",
            "walk_steps",
            "walk_keep",
            "bond_comps",
            "bond_cycles",
        ):
            if not getattr(self, field_name) > 0:
                raise StructreconError(f"milad: {field_name} must be positive")
        if self.prony_hops < 0:
            raise StructreconError("milad: prony_hops must be >= 0")
        if self.species_walk < 0:
            raise StructreconError("milad: species_walk must be >= 0")
        if self.restrain_round < 0:
            raise StructreconError("milad: restrain_round must be >= 0")
        if self.bond_lewis < 0:
            raise StructreconError("milad: bond_lewis must be >= 0")
        if self.composition_runs < 0:
            raise StructreconError("milad: composition_runs must be >= 0")
        if self.species not in SPECIES_MODES:
            raise StructreconError(
                f"milad: species must be one of {', '.join(SPECIES_MODES)}, got {self.species!r}"
            )
        if self.initial not in INITIAL_MODES:
            raise StructreconError(
                f"milad: initial must be one of {', '.join(INITIAL_MODES)}, got {self.initial!r}"
            )

    # -- moments from invariants -----------------------------------------------------------

    def fit_moments(self, model: MiladModel, phi, generator, *, start=None):
        """Algorithm 1, batched: moments [B, K] whose invariants are phi [B, F].

        The l = 0 moments are invariants themselves and the power spectrum fixes the norm
        rho_nl of every other (n, l) block, so each block is written as rho_nl times a
        unit vector (a free vector, normalised) and only the directions are fitted, to the
        remaining invariants divided by the product of the norms of their blocks (all of
        order one, whatever the size of the structure).  Blocks whose norm vanishes (by
        symmetry) are zero.  The fit is built up by order n' = 1 ... n_max; at each order
        ``retries`` copies, all but the first with new random directions for the blocks
        of order n', are fitted side by side and the best is kept.  ``start``: moments
        [B, K] whose directions start the fit (default random).

        Returns moments [B, K] and the RMSD of the scaled invariants [B].
        """
        b = phi.shape[0]
        k = model.n_moments
        dtype = phi.dtype
        nb = len(model.blocks)
        block_of = model.block_of
        rho = model.block_norms(phi)
        scale = model.invariant_scales(phi)  # [B, F]
        wt = torch.where((scale > 0) & ~model.is_power, 1.0 / scale.clamp_min(1e-300), 0.0)
        amp = rho[:, block_of] / model.metric.sqrt()  # [B, K]
        base = torch.zeros(b, k, dtype=dtype)
        base[:, model.fixed_moments] = phi[:, model.fixed_invariants]
        directional = model.block_l[block_of] > 0  # [K]
        if start is None:
            v = torch.randn(b, k, generator=generator, dtype=dtype)
        else:
            v = start * model.metric.sqrt()
            v = v + 1e-9 * torch.randn(b, k, generator=generator, dtype=dtype)

        def assemble(vv, rows):
            nrm = torch.zeros(vv.shape[0], nb + 1, dtype=dtype).index_add(1, block_of, vv**2)
            nrm = nrm.sqrt().clamp_min(1e-150)[:, block_of]
            unit = vv / nrm
            return torch.where(directional, amp[rows] * unit, base[rows]), unit, nrm

        reps = self.retries
        rows_all = torch.arange(b)
        for order in range(1, model.n_max + 1):
            inv_rows = torch.nonzero(model.max_orders <= order).flatten()
            cols = torch.nonzero(directional & (model.order <= order)).flatten()
            new = directional & (model.order == order)
            if cols.numel() == 0 or not (wt[:, inv_rows] > 0).any():
                continue
            cand = v.repeat_interleave(reps, dim=0)
            redo = (torch.arange(b * reps) % reps != 0)[:, None] & new[None, :]
            cand = torch.where(
                redo, torch.randn(cand.shape, generator=generator, dtype=dtype), cand
            )
            src = rows_all.repeat_interleave(reps)

            def fun(vc, idx, cand=cand, inv_rows=inv_rows, cols=cols, order=order, src=src):
                vv = cand[idx].clone()
                vv[:, cols] = vc
                rows = src[idx]
                y, unit, nrm = assemble(vv, rows)
                val, jac = model.invariants_of(y, jac=True, order=order)
                w = wt[rows][:, inv_rows]
                res = w * (val[:, inv_rows] - phi[rows][:, inv_rows])
                jy = jac[:, inv_rows] * w[:, :, None] * (amp[rows] / nrm)[:, None, :]
                jy = torch.where(directional, jy, torch.zeros_like(jy))
                # d unit / d v = (I - unit unit^T) / |v| within each block
                proj = torch.zeros(*jy.shape[:2], nb + 1, dtype=dtype).index_add(
                    2, block_of, jy * unit[:, None, :]
                )
                jv = jy - proj[:, :, block_of] * unit[:, None, :]
                return res, jv[:, :, cols]

            vc, cost = batched_lm(
                fun, cand[:, cols], steps=self.moment_steps, cost_tol=1e-26 * len(inv_rows)
            )
            cand[:, cols] = vc
            best = torch.nan_to_num(cost, nan=math.inf).reshape(b, reps).argmin(dim=1)
            v = cand.reshape(b, reps, k)[rows_all, best]
        y, _, _ = assemble(v, rows_all)
        val = model.invariants_of(y)
        n_used = (wt > 0).sum(dim=1).clamp_min(1)
        return y, (((wt * (val - phi)) ** 2).sum(dim=1) / n_used).sqrt()

    # -- atoms against moments or invariants -------------------------------------------------

    def fit_atoms(
        self,
        model,
        x,
        w,
        target,
        *,
        kind,
        rep,
        steps,
        fit_w=False,
        fix_x=False,
        w_bounds=None,
        patience=None,
        weights=None,
        centre=None,
        restraints=None,
    ):
        """Atoms (and optionally weights) against moments or invariants, Uhrin eq. 36.

        x [B, N, 3] Angstrom, w [B, N]; target [B, K] moments (``kind='moments'``) or
        [B, F] invariants (``kind='invariants'``).  Residuals: the target's, plus the
        summed repulsion (eq. 35) as one more.  ``fit_w`` frees the weights (clipped to
        ``w_bounds``); ``fix_x`` keeps the positions.  ``centre`` (a MILAD centring):
        the moments are those of the atoms moved to that centre, as the fingerprint
        takes them (see :func:`_centring`).  ``restraints``: (pairs [B, P, 2], distances
        [B, P], mask [B, P], weight) - one residual weight * (|x_i - x_j| - distance) per
        pair where mask is true (see :func:`_restraints`).  Returns x, w and the squared
        residual [B].
        """
        b, n, _ = x.shape
        pairs = torch.triu_indices(n, n, offset=1)
        nx = 0 if fix_x else 3 * n
        use_rep = rep is not None and n > 1 and not fix_x

        def unpack(v, idx):
            xx = x[idx] if fix_x else v[:, :nx].reshape(-1, n, 3)
            return xx, (v[:, nx:] if fit_w else w[idx])

        def fun(v, idx):
            xx, ww = unpack(v, idx)
            if centre is not None and not fix_x:
                xx, dcentre = _centring(xx, centre)
            y, dx, dw = model.moments(xx, ww, jac=True)
            if centre is not None and not fix_x:  # dy/dx - (sum_i dy/dx_i) dc/dx
                dx = dx - torch.einsum("bkc,bcnd->bknd", dx.sum(dim=2), dcentre)
            if kind == "moments":
                res, jy = y - target[idx], None
            else:
                val, jy = model.invariants_of(y, jac=True)
                res = val - target[idx]
                if weights is not None:
                    res = res * weights[idx]
                    jy = jy * weights[idx][:, :, None]
            blocks = []
            if not fix_x:
                jx = dx.reshape(len(idx), -1, nx)
                blocks.append(jx if jy is None else jy @ jx)
            if fit_w:
                blocks.append(dw if jy is None else jy @ dw)
            jac = torch.cat(blocks, dim=-1)
            if restraints is not None and not fix_x:
                rp, rd, rm, mu = restraints
                er, jr = _restraint_residuals(xx, rp[idx], rd[idx], mu * rm[idx].to(xx.dtype))
                jr = jr.reshape(len(idx), -1, nx)
                if fit_w:
                    jr = torch.cat([jr, jr.new_zeros(len(idx), jr.shape[1], n)], dim=-1)
                res = torch.cat([res, er], dim=-1)
                jac = torch.cat([jac, jr], dim=1)
            if use_rep:
                e, de = _repulsion(rep, xx, pairs)
                de = de.reshape(len(idx), 1, nx)
                if fit_w:
                    de = torch.cat([de, de.new_zeros(len(idx), 1, n)], dim=-1)
                res = torch.cat([res, e], dim=-1)
                jac = torch.cat([jac, de], dim=1)
            return res, jac

        parts = [] if fix_x else [x.reshape(b, -1)]
        if fit_w:
            parts.append(w)
        bounds = None
        if fit_w and w_bounds is not None:
            lo = torch.full((nx + n,), -math.inf, dtype=x.dtype)
            hi = torch.full((nx + n,), math.inf, dtype=x.dtype)
            lo[nx:], hi[nx:] = w_bounds
            bounds = (lo, hi)
        v, cost = batched_lm(
            fun,
            torch.cat(parts, dim=-1),
            steps=steps,
            cost_tol=1e-28,
            bounds=bounds,
            patience=patience or self.patience,
            progress=0.9,
        )
        xx, ww = unpack(v, torch.arange(b))
        return xx, ww, cost

    # -- run -------------------------------------------------------------------------------

    def run(self, problem: Problem, generator: torch.Generator) -> Outcome:
        """Invert all targets of ``problem`` (MILAD fingerprints only)."""
        return _Run(self, problem, generator).outcome()


class _Run:
    """The state of one :meth:`MiladReconstruction.run`."""

    def __init__(self, strategy: MiladReconstruction, problem: Problem, generator):
        self.s = strategy
        self.problem = problem
        self.gen = generator
        spec = _milad_spec(problem.fn, "the fingerprint")
        species_fn = getattr(problem, "species_fn", None)
        species_targets = getattr(problem, "species_targets", None)
        self.two = species_fn is not None and species_targets is not None
        self.spec2 = _milad_spec(species_fn, "the species fingerprint") if self.two else None
        if problem.cell is not None and any(problem.pbc):
            raise StructreconError("method 'milad' reconstructs clusters only")
        self.dtype = dtype = torch.float64
        self.numbers = np.asarray(problem.numbers)
        self.n = len(self.numbers)
        self.spec = spec
        self.model = _model(spec, strategy.grid)
        self.rep = problem.repulsion or Repulsion(r_min=MOLECULAR_R_MIN)
        self.phi = problem.targets.to(dtype)
        self.phi2 = species_targets.to(dtype) if self.two else None
        self.fit_mode = strategy.species == "fit" and not self.two
        self.allowed = None
        if strategy.species == "fit" or self.two:
            s = self.spec2 if self.two else spec
            if len(set(s.weights)) < 2:
                raise StructreconError(
                    "method 'milad' can only recover species from a fingerprint that weights "
                    "elements differently (e.g. the milad-species preset)"
                )
            self.allowed = torch.tensor(sorted(s.weights), dtype=dtype)
            self.element = {round(w, 9): z for z, w in zip(s.species, s.weights)}
        self.given_w = torch.as_tensor(spec.weights_for(self.numbers), dtype=dtype)
        uniform = bool((self.given_w == self.given_w[0]).all())
        self.uniform = uniform
        self.fit_w = self.fit_mode or not uniform
        if self.fit_mode:
            lo, hi = float(self.allowed.min()), float(self.allowed.max())
        else:
            lo, hi = float(self.given_w.min()), float(self.given_w.max())
        pad = 0.5 * (hi - lo) / max(len(self.allowed) if self.allowed is not None else 1, 1)
        self.w_bounds = (lo - pad, hi + pad)
        self.total_w = self.model.total_weight(self.phi[:, self.model.fixed_invariants[0]])
        # the polish first weights each invariant by 1 / its natural size (the product of
        # its blocks' norms, floored at 1e-4 of the largest), so that the fine detail of
        # the high orders counts as much as the overall shape, then runs unweighted
        scales = self.model.invariant_scales(self.phi)
        self.inv_weights = 1.0 / torch.maximum(scales, 1e-4 * scales.amax(dim=1, keepdim=True))
        self.eval_fn = spec.build(self.numbers)
        # the round whose moments fit starts from atoms fitted order by order (or None)
        self.order_round = {"orders": 0, "random": None}.get(strategy.initial)
        if strategy.initial == "auto":
            self.order_round = 0 if self.n > (self.model.prony_atoms or 20) else 1
        self.eval_fn2 = self.spec2.build(self.numbers) if self.two else None
        self._comps = {}
        self.round = 0

    def start_weights(self, count):
        if self.fit_mode:
            pick = torch.randint(len(self.allowed), (count, self.n), generator=self.gen)
            return self.allowed[pick]
        return self.given_w[None].repeat(count, 1)

    def atoms_by_order(self, tg):
        """Atoms [L, N, 3] fitted to the invariants order by order from random atoms.

        Algorithm 1 from random directions rarely finds the moments of a QM9 molecule:
        its per-order systems have many spurious minima (on a 25-atom molecule, with the
        moments of orders < n exact and held, 0 of 256 random starts of order 4 reached
        the solution).  Fitting atoms instead keeps every candidate a set of atoms:
        first to the invariants of order <= 2 (overall size and shape), then <= 3, ...,
        <= n_max, each invariant scaled by its natural size, with the repulsion.  On QM9
        molecules of 12 and 18 atoms 31 and 57 of 64 such runs end exactly at the
        target; beyond 22 atoms none does, but some end within 0.1-0.3 A, and the moments
        fit started from their moments, then Prony hops, finish them.  (One fit against
        all orders at once from the same atoms does about as well on molecules of 10-14
        atoms, worse on 18.)  Atoms start Gaussian with the target's mean square radius
        (from the l = 0 moments), at the mean weight; with species unknown the weights
        are fitted along (of 8 QM9 molecules of 20-29 atoms missed with them held at
        the mean, 3 succeeded then; README).
        """
        s, model, n = self.s, self.model, self.n
        phi = self.phi[tg]
        count = len(tg)
        r2 = model.mean_square_radius(phi)
        r2 = torch.where(torch.isfinite(r2) & (r2 > 0), r2, (model.scale / 3) ** 2)
        x = torch.randn(count, n, 3, generator=self.gen, dtype=self.dtype)
        x = x * (r2 / 3).sqrt()[:, None, None]
        if self.uniform and not self.fit_mode:
            w = self.given_w[None].repeat(count, 1)
        else:
            w = (self.total_w[tg] / n)[:, None].repeat(1, n)
        for order in range(2, model.n_max + 1):
            upto = (model.max_orders <= order).to(self.dtype)
            x, w, _ = s.fit_atoms(
                model,
                x,
                w,
                phi,
                kind="invariants",
                rep=self.rep,
                steps=s.order_steps,
                weights=self.inv_weights[tg] * upto,
                fit_w=self.fit_mode,
                w_bounds=self.w_bounds,
            )
        return x, w

    def score(self, x, w, tg):
        """Invariants' RMSD [B] in the frame of the moments (for picking candidates)."""
        return self.moments_score(self.model.moments(x, w), tg)

    def moments_score(self, y, tg):
        """Invariants' RMSD [B] of moments y [B, K] against the targets tg."""
        with torch.no_grad():
            rmsd = (self.model.invariants_of(y) - self.phi[tg]).pow(2).mean(-1).sqrt()
        return torch.nan_to_num(rmsd, nan=math.inf)

    def fingerprint_rmsd(self, x, w, tg, *, second: bool = True):
        """Fingerprint RMSD [B] by the fingerprint functions themselves (with centring).

        With two fingerprints, the larger of the two RMSDs (``second=False``: the main
        one's alone).
        """
        out = torch.full((x.shape[0],), math.inf, dtype=x.dtype)
        w_eval = w if self.fit_w else None
        with torch.no_grad():
            for i in range(x.shape[0]):  # one at a time: centring may fail on a degenerate one
                try:
                    wi = None if w_eval is None else w_eval[i : i + 1]
                    pred = self.eval_fn(x[i : i + 1], wi)[0, 0]
                    r = (pred - self.phi[tg[i]]).pow(2).mean().sqrt()
                    if self.two and second:
                        pred2 = self.eval_fn2(x[i : i + 1], w[i : i + 1])[0, 0]
                        r = torch.maximum(r, (pred2 - self.phi2[tg[i]]).pow(2).mean().sqrt())
                except (ArithmeticError, ValueError, RuntimeError, np.linalg.LinAlgError):
                    continue
                out[i] = r
        return torch.nan_to_num(out, nan=math.inf)

    def atoms_round(self, y, tg):
        """Candidates from moments y [L, K] (peaks, Prony), fitted; the best per row."""
        s, model, n = self.s, self.model, self.n
        count = y.shape[0]
        w_range = self.w_bounds if self.fit_w else (float(self.given_w[0]),) * 2
        xs, ws = [], []
        xp, wp = model.peaks(y, n, r_exclude=self.rep.r_min, w_range=w_range)
        xs.append(xp)
        ws.append(wp)
        if model.prony_atoms:
            if n <= model.prony_atoms:
                xq, wq = model.prony(y, n, self.gen)
            else:  # the strongest peaks, and Prony on what they leave
                xq, wq = self.prony_rest(y, xp, wp, torch.arange(n - model.prony_atoms))
            xs.append(xq)
            ws.append(wq.clamp(*w_range))
        c = len(xs)
        x = torch.stack(xs, dim=1).reshape(count * c, n, 3)
        w = torch.stack(ws, dim=1).reshape(count * c, n)
        if not self.fit_w:
            w = self.given_w[None].repeat(count * c, 1)
        kw = dict(rep=self.rep, fit_w=self.fit_w, w_bounds=self.w_bounds)
        yc = y.repeat_interleave(c, 0)
        if self.fit_w:
            # weights held (peaks: all at the mean weight, from the zeroth moment; Prony:
            # its own) while the atoms settle against the moments
            w = w.clone()
            w[0::c] = (self.total_w[tg] / n)[:, None]
            x, w, cost = s.fit_atoms(
                model, x, w, yc, kind="moments", steps=s.atom_steps, rep=self.rep
            )
        else:
            x, w, cost = s.fit_atoms(model, x, w, yc, kind="moments", steps=s.atom_steps, **kw)
        # keep the better candidate of each row against the moments
        ar = torch.arange(count)
        best = torch.nan_to_num(cost, nan=math.inf).reshape(count, c).argmin(dim=1)
        x = x.reshape(count, c, n, 3)[ar, best]
        w = w.reshape(count, c, n)[ar, best]
        cost = cost.reshape(count, c)[ar, best]
        if model.prony_atoms and n > model.prony_atoms:
            x, w, cost = self.prony_hops(y, x, w, cost, **kw)
        if self.fit_w:  # positions first with the nearest allowed weights
            w = self.discretise(w, tg)
            x, w, _ = s.fit_atoms(
                model,
                x,
                w,
                self.phi[tg],
                kind="invariants",
                steps=s.polish_steps,
                weights=self.inv_weights[tg],
                rep=self.rep,
            )
        x, w, _ = s.fit_atoms(
            model,
            x,
            w,
            self.phi[tg],
            kind="invariants",
            steps=s.polish_steps,
            weights=self.inv_weights[tg],
            **kw,
        )
        x, w, _ = s.fit_atoms(
            model, x, w, self.phi[tg], kind="invariants", steps=s.polish_steps, **kw
        )
        x_fit, w_fit = x, w
        if self.fit_mode:  # the weights once more, with the positions held
            w = self.weights_for(model, x, w, self.phi[tg])
        if self.fit_w:
            w = self.discretise(w, tg)
            x, w, _ = s.fit_atoms(
                model, x, w, self.phi[tg], kind="invariants", steps=s.polish_steps, rep=self.rep
            )
            if s.bonds:
                x, w = self.bond_candidates(x, w, x_fit, w_fit, tg)
        if self.fit_mode:
            x, w = self.species_search(x, w, tg)
        return x, w

    def compositions(self, t):
        """Candidate compositions of target t: sorted element weights [C, N], light, valence.

        ``light[c]``: how many of row c's lightest weights belong to a terminal element
        (valence 1), 0 when the lightest element is not terminal; ``valence[c]``: the
        valence of each entry of row c (None where an element has none in ``VALENCES``).
        """
        if t in self._comps:
            return self._comps[t]
        s = self.spec
        order = np.argsort(s.weights)
        w_sorted = np.asarray(s.weights)[order]
        v_sorted = [VALENCES.get(s.species[i]) for i in order]
        terminal = v_sorted[0] == 1 if len(order) else False
        if not self.fit_mode:
            rank = self.given_w.argsort()
            rows = self.given_w[rank][None]
            valence = [[VALENCES.get(int(self.numbers[i])) for i in rank.tolist()]]
        else:
            comps = valence_compositions(self.n, float(self.total_w[t]), s.species, s.weights)
            rows = torch.tensor(
                np.stack([np.repeat(w_sorted, c[order]) for c in comps])
                if len(comps)
                else np.zeros((0, self.n)),
                dtype=self.dtype,
            )
            valence = [[v for v, k in zip(v_sorted, c[order]) for _ in range(k)] for c in comps]
        light = [int((r == float(w_sorted[0])).sum()) if terminal else 0 for r in rows]
        self._comps[t] = (rows, light, valence)
        return self._comps[t]

    def bond_candidates(self, x, w, x_fit, w_fit, tg):
        """Element assignments from the bonding graph, positions refitted; the best kept.

        Near a molecule (0.1-0.3 A) the weights fitted along with the positions barely
        tell the elements apart: on a C9H18 with moments 1e-3 off, their rank put 6-10
        of 27 atoms on the wrong element, and the polish from there stalled.  The graph
        does better: hydrogens are the atoms with the fewest neighbours.  For each
        composition a connected molecule with the usual valences can have (at most
        ``bond_comps``, nearest the fitted weights; with species given, the given one),
        the lightest terminal element goes to the atoms of fewest neighbours, the rest by
        fitted weight; each candidate's positions are refitted ``polish_steps`` steps
        and the best replaces the attempt's if it matches the invariants better.  Where
        the graph of the refitted atoms assigns otherwise, that is refitted too, up to
        ``bond_cycles`` refits in all.  With ``bond_valence``, each composition whose
        heavy elements differ in valence also gets the assignment by valence against
        neighbour count (see :func:`_bond_assignment`), and attempts within invariant
        RMSD 1e-2 get up to ``bond_lewis`` more: the assignments whose valences admit a
        Lewis structure on the graph (see :func:`_lewis_assignments`; read once, not
        again from the refitted atoms).  On the paper's 77 QM9 molecules, species from
        one fingerprint went from 62 to 68 solved, to 70 with the valence candidates and
        the last polish judged in the fingerprint's frame, and to 72 with the Lewis
        candidates (README).
        """
        s = self.s
        current = self.score(x, w, tg)
        cands, owners, comps = [], [], []
        for r in range(x.shape[0]):
            rows, light, valence = self.compositions(int(tg[r]))
            if len(rows) == 0:
                continue
            fitted = w_fit[r].sort().values
            near = (rows - fitted).pow(2).sum(-1).argsort()[: s.bond_comps]
            found, lewis = [], []
            for c in near.tolist():
                args = [(rows[c], light[c])]
                val = valence[c]
                if s.bond_valence and None not in val and len(set(val[light[c] :])) > 1:
                    args.append((rows[c], light[c], val))
                found += [(_bond_assignment(x_fit[r], w_fit[r], *a), a) for a in args]
                if s.bond_lewis and None not in val and current[r] < 1e-2:
                    more = _lewis_assignments(x_fit[r], w_fit[r], rows[c], light[c], val)
                    lewis += [(wc, None) for wc in more]  # not read again
            lewis.sort(key=lambda item: float((item[0] - w_fit[r]).pow(2).sum()))
            for wc, a in found + lewis[: s.bond_lewis]:
                if (wc - w[r]).abs().max() > 1e-9 and not any(
                    o == r and torch.equal(wc, k) for o, k in zip(owners, cands)
                ):
                    cands.append(wc)
                    owners.append(r)
                    comps.append(a)
        if not cands:
            return x, w
        x, w = x.clone(), w.clone()
        wc, own, xc = torch.stack(cands), torch.tensor(owners), x_fit[torch.tensor(owners)]
        for cycle in range(s.bond_cycles):
            xc, rc = self.refit(xc, wc, tg[own], s.polish_steps)
            for r in own.unique().tolist():
                mine = torch.nonzero(own == r).flatten()
                j = mine[rc[mine].argmin()]
                if rc[j] < current[r]:
                    x[r], w[r], current[r] = xc[j], wc[j], rc[j]
            if cycle == s.bond_cycles - 1:
                break
            # the graph of the refitted atoms, where it differs: another cycle
            again = [
                wc[i] if comps[i] is None else _bond_assignment(xc[i], w_fit[own[i]], *comps[i])
                for i in range(len(own))
            ]
            changed = [i for i in range(len(own)) if (again[i] - wc[i]).abs().max() > 1e-9]
            if not changed:
                break
            idx = torch.tensor(changed)
            wc, own, xc = torch.stack([again[i] for i in changed]), own[idx], xc[idx]
            comps = [comps[i] for i in changed]
        return x, w

    def species_search(self, x, w, tg):
        """Species unknown: a greedy walk over element assignments, positions refitted.

        The joint fit of positions and weights often stops with the atoms 0.05-0.3 A
        from the molecule but half the elements wrong, the positions adapted to them: on
        four such QM9 molecules, the right elements put on the atoms found polish to the
        exact molecule, yet at the positions found they look far worse than the wrong
        ones, and a linearised position response does not rank them either.  So each
        candidate is judged after a short refit of the positions: from the best attempt
        of each target (when within invariant RMSD 1e-2), every move of two atoms that
        keeps their summed weight is refitted ``walk_fast`` Levenberg-Marquardt steps,
        the ``walk_keep`` best ``walk_steps`` more, and the best taken if it lowers the
        residual; up to ``species_walk`` moves.  On those four molecules the walk
        recovered one (differing in 9 elements), and brought the others from 5-10
        differing elements to 4-8.
        """
        s, n = self.s, self.n
        if s.species_walk == 0:
            return x, w
        current = self.score(x, w, tg)
        rows = []
        for t in tg.unique():
            mine = torch.nonzero(tg == t).flatten()
            best = mine[current[mine].argmin()]
            if 0.1 * self.problem.tol < current[best] < 1e-2:
                rows.append(int(best))
        if not rows:
            return x, w
        ia, ib = torch.triu_indices(n, n, offset=1)
        allowed = self.allowed
        for _ in range(s.species_walk):
            cands, owners = [], []
            for r in rows:
                c, ok = _pair_moves(w[r : r + 1], ia, ib, allowed)
                c = c[0, ok[0]]
                cands.append(c)
                owners.append(torch.full((len(c),), r))
            wc, own = torch.cat(cands), torch.cat(owners)
            if len(wc) == 0:
                break
            xc, rc = self.refit(x[own], wc, tg[own], s.walk_fast)
            keep = []
            for r in rows:
                mine = torch.nonzero(own == r).flatten()
                keep.append(mine[rc[mine].argsort()[: s.walk_keep]])
            keep = torch.cat(keep)
            xk, rk = self.refit(xc[keep], wc[keep], tg[own[keep]], s.walk_steps)
            moved = []
            for r in rows:
                mine = torch.nonzero(own[keep] == r).flatten()
                j = mine[rk[mine].argmin()]
                if rk[j] < current[r]:
                    x[r], w[r], current[r] = xk[j], wc[keep[j]], rk[j]
                    if rk[j] > 0.1 * self.problem.tol:
                        moved.append(r)
            _LOG.debug("species walk: %d of %d moved", len(moved), len(rows))
            rows = moved
            if not rows:
                break
        return x, w

    def refit(self, x, w, tg, steps):
        """Positions refitted with weights w held: -> x, invariants' RMSD [B]."""
        x, w, _ = self.s.fit_atoms(
            self.model,
            x,
            w,
            self.phi[tg],
            kind="invariants",
            rep=self.rep,
            steps=steps,
            patience=steps,
        )
        return x, self.score(x, w, tg)

    def moment_polish(self, y, x, w, tg, start=None):
        """Attempts whose moments are exact but whose atoms are not: a long fit to them.

        Beyond the atoms Prony recovers (20), the atoms come from peaks and Prony on what
        the strongest peaks leave, fitted to the moments for ``atom_steps`` steps; on a
        C9H20 of QM9 that left them 0.01 in moment RMSD from moments exact to 3e-10, and
        the polish against the invariants then stalled at fingerprint RMSD 5e-4, 0.03 A
        off.  Rows whose moments y [B, K] reproduce the invariants within 1e-2 of the
        tolerance, and whose atoms do not, are fitted to the moments for ten times the
        polish steps and then polished against the invariants; kept where the invariants'
        RMSD falls.  ``start``: the atoms and weights (x0, w0) whose moments started the
        moments fit, tried the same way beside x: when the fit made exact the moments of
        atoms already close (a C8H18O 0.03 A off), those atoms are nearer to them than
        what the peaks and Prony find (which stalled at moment RMSD 9e-3 there).  The
        weights of each candidate are held.
        """
        s, model = self.s, self.model
        exact = self.moments_score(y, tg)
        rmsd = self.score(x, w, tg)
        sel = torch.nonzero(
            (exact < 1e-2 * self.problem.tol) & (rmsd > 1e-2 * self.problem.tol)
        ).flatten()
        if sel.numel() == 0:
            return x, w
        xs, ws = [x[sel]], [w[sel]]
        if start is not None:
            xs.append(start[0][sel])
            ws.append(start[1][sel])
        c = len(xs)
        xs = torch.stack(xs, dim=1).flatten(0, 1)
        ws = torch.stack(ws, dim=1).flatten(0, 1)
        rows = sel.repeat_interleave(c)
        xs, _, _ = s.fit_atoms(
            model,
            xs,
            ws,
            y[rows],
            kind="moments",
            rep=self.rep,
            steps=10 * s.polish_steps,
            patience=10 * s.patience,
        )
        xs, _, _ = s.fit_atoms(
            model, xs, ws, self.phi[tg[rows]], kind="invariants", rep=self.rep, steps=s.polish_steps
        )
        got = self.score(xs, ws, tg[rows]).reshape(-1, c)
        best = got.argmin(dim=1)
        pick = torch.arange(len(sel)) * c + best
        better = got.gather(1, best[:, None])[:, 0] < rmsd[sel]
        x, w = x.clone(), w.clone()
        x[sel[better]] = xs[pick[better]]
        w[sel[better]] = ws[pick[better]]
        return x, w

    def finish(self, x, w, tg):
        """Attempts close to a solution (RMSD < 1e-2) but not there: a longer polish.

        Near symmetric structures the invariants change only at second order in the
        symmetry-breaking displacements, and the polish slows down (ANCHORS, Uhrin): it
        gets ten times the steps and patience.  The fits work in the frame of the
        moments, where an attempt can match the invariants to 1e-7 and still sit 0.01 A
        off along a flat direction; the fingerprint re-centres it (e.g. on its smallest
        bounding sphere), which moves it to another frame and costs up to 1e-4 of RMSD
        (0.06 for a molecule reaching beyond the cutoff, where the moments grow fast).
        So a second polish, for attempts then within 1e-4, fits the atoms as the
        fingerprint takes them, moved to the spec's centre (with the centre's
        derivative), and the result is centred.  Which attempts qualify, and whether the
        result is better, is judged in the fingerprint's frame: a C9H4 reaching 5.5 A
        from its centre came out of every round at invariant RMSD 3e-8 in the moments'
        frame, its atoms within 0.02 A and its elements right, and 0.02-0.7 as the
        fingerprint took it.
        """
        s = self.s
        rmsd = self.score(x, w, tg)
        framed = self.score(self.recentre(x), w, tg)  # as the fingerprint takes them
        near = torch.nonzero((rmsd < 1e-2) & (framed > 0.1 * self.problem.tol)).flatten()
        if near.numel():
            xn, wn = x[near], w[near]
            kw = dict(
                kind="invariants",
                steps=10 * s.polish_steps,
                patience=10 * s.patience,
                rep=self.rep,
            )
            xn, wn, _ = s.fit_atoms(self.model, xn, wn, self.phi[tg[near]], **kw)
            # in the fingerprint's frame: those close enough (in the moments' frame) for
            # the frame to matter
            close = torch.nonzero(self.score(xn, wn, tg[near]) < 1e-4).flatten()
            xn = self.recentre(xn)
            if close.numel():
                xc, wc, _ = s.fit_atoms(
                    self.model,
                    xn[close],
                    wn[close],
                    self.phi[tg[near[close]]],
                    centre=self.spec.centre,
                    **kw,
                )
                xn[close], wn[close] = self.recentre(xc), wc
            better = self.score(xn, wn, tg[near]) < framed[near]
            x[near[better]], w[near[better]] = xn[better], wn[better]
        if s.restrain and self.uniform and not self.fit_mode and self.round >= s.restrain_round:
            x = self.restrained(x, w, tg)
        return x, w

    def light_atoms(self, x, w):
        """The hydrogens of attempt x [N, 3] (unit weights): bool [N], or None.

        As many as the composition has, on the atoms of fewest neighbours; None unless
        every element is one of ``RESTRAINED`` and there is a hydrogen.
        """
        if not set(self.numbers.tolist()) <= RESTRAINED:
            return None
        light = torch.zeros(self.n, dtype=torch.bool)
        light[_fewest_neighbours_first(x, w)[1][: int((self.numbers == 1).sum())]] = True
        return light if light.any() else None

    def restrained(self, x, w, tg):
        """Attempts within fingerprint RMSD 1 of a target still open: restrained polish.

        Near a molecule the invariants can leave the atoms almost free along some
        directions (a C8H18 reaching past the cutoff: 26 of 75 singular values below
        1e-8 of the largest), and a polish from 0.1-0.4 A off ends at fingerprint RMSD
        1e-5 to 1e-3 with C-H bonds of 0.8-1.25 A.  Chemistry pins those directions:
        the atoms are fitted to the invariants (as the fingerprint centres them) with
        :func:`_restraints` as more residuals, their weight stepped down
        (``RESTRAINT_WEIGHTS``, the restraints read again from the atoms at each step),
        then polished without them; the result is kept where its fingerprint RMSD is
        lower.  Molecules of H, C, N, O, F only.
        """
        s = self.s
        rmsd = self.fingerprint_rmsd(x, w, tg, second=False)  # the positions' fingerprint
        solved = torch.isin(tg, tg[rmsd < self.problem.tol])  # another attempt did it
        sel = torch.nonzero(~solved & (rmsd < 1.0)).flatten()
        found = {int(i): self.light_atoms(x[i], w[i]) for i in sel}
        sel = torch.tensor([i for i in sel.tolist() if found[i] is not None], dtype=torch.long)
        if sel.numel() == 0:
            return x
        xs, ws, phi = self.recentre(x[sel]), w[sel], self.phi[tg[sel]]
        kw = dict(
            kind="invariants",
            rep=self.rep,
            steps=s.polish_steps,
            patience=s.polish_steps,
            centre=self.spec.centre,
        )
        for mu in RESTRAINT_WEIGHTS:
            made = [_restraints(xs[k], found[i]) for k, i in enumerate(sel.tolist())]
            size = max(max(len(t) for _, t in made), 1)
            pairs = torch.zeros(len(sel), size, 2, dtype=torch.long)
            pairs[..., 1] = 1
            dist = xs.new_ones(len(sel), size)
            mask = torch.zeros(len(sel), size, dtype=torch.bool)
            for k, (pk, dk) in enumerate(made):
                pairs[k, : len(dk)], dist[k, : len(dk)], mask[k, : len(dk)] = pk, dk, True
            xs, _, _ = s.fit_atoms(
                self.model, xs, ws, phi, restraints=(pairs, dist, mask, mu), **kw
            )
        xs, _, _ = s.fit_atoms(self.model, xs, ws, phi, **kw)
        xs = self.recentre(xs)
        better = self.fingerprint_rmsd(xs, ws, tg[sel], second=False) < rmsd[sel]
        x = x.clone()
        x[sel[better]] = xs[better]
        return x

    def recentre(self, x):
        """Attempts x [B, N, 3] moved into the frame the fingerprint centres them in.

        An attempt whose centring fails (e.g. a degenerate one) stays as it is.
        """
        return _centring(x, self.spec.centre, with_jac=False)[0]

    def prony_rest(self, y, x, w, keep):
        """Keep atoms ``keep`` ([L, k] or [k]) of x, w; the others by Prony on the rest.

        The moments the kept atoms leave are handed to :meth:`MiladModel.prony`:
        -> x [L, N, 3], w [L, N].
        """
        model = self.model
        count = y.shape[0]
        keep = keep.expand(count, -1) if keep.ndim == 1 else keep
        ar = torch.arange(count)[:, None]
        xk, wk = x[ar, keep], w[ar, keep]
        xq, wq = model.prony(y - model.moments(xk, wk), self.n - keep.shape[1], self.gen)
        return torch.cat([xk, xq], 1), torch.cat([wk, wq], 1)

    def prony_hops(self, y, x, w, cost, *, rep, fit_w, w_bounds):
        """More atoms than Prony recovers: hops that redo all but a random subset.

        Random subsets of N - 20 fitted atoms are kept, the others found by Prony on the
        moments the kept ones leave, and refitted; what lowers the residual is kept.
        """
        s, model, n = self.s, self.model, self.n
        k = n - model.prony_atoms
        reps = s.prony_subsets
        for _ in range(s.prony_hops):
            open_ = torch.nonzero(cost > 1e-20).flatten()
            if open_.numel() == 0:
                break
            m = open_.numel()
            keep = torch.rand(m * reps, n, generator=self.gen).argsort(dim=1)[:, :k]
            yo = y[open_].repeat_interleave(reps, 0)
            xo = x[open_].repeat_interleave(reps, 0)
            wo = w[open_].repeat_interleave(reps, 0)
            xn, wn = self.prony_rest(yo, xo, wo, keep)
            if not fit_w:
                wn = wo
            else:
                wn = wn.clamp(*w_bounds)
            xn, wn, cn = s.fit_atoms(
                model,
                xn,
                wn,
                yo,
                kind="moments",
                steps=s.atom_steps,
                rep=rep,
                fit_w=fit_w,
                w_bounds=w_bounds,
            )
            cn = torch.nan_to_num(cn, nan=math.inf).reshape(m, reps)
            cbest, pick = cn.min(dim=1)
            ar = torch.arange(m)
            better = cbest < cost[open_]
            idx = open_[better]
            x[idx] = xn.reshape(m, reps, n, 3)[ar, pick][better]
            w[idx] = wn.reshape(m, reps, n)[ar, pick][better]
            cost[idx] = cbest[better]
        return x, w, cost

    def discretise(self, w, rows):
        """Continuous weights -> element weights (species fit) or the composition's."""
        if self.fit_mode:
            return _snap_weights(w, self.allowed, self.total_w[rows])
        order = w.argsort(dim=1)
        sorted_w = self.given_w.sort().values.expand_as(w).contiguous()
        return torch.empty_like(w).scatter_(1, order, sorted_w)

    def weights_for(self, model, x, w, phi):
        """Weights [B, N] for fixed positions x [B, N, 3] against invariants phi [B, F].

        A weights-only fit (N unknowns, cheap) from w and from ``4 * retries - 1`` random
        element weights, the best kept: even with the positions fixed it has local minima
        (e.g. the weights of a near-symmetric molecule mirrored).
        """
        s = self.s
        b, n, _ = x.shape
        starts = 4 * s.retries
        w0 = self.allowed[torch.randint(len(self.allowed), (b * starts, n), generator=self.gen)]
        w0[::starts] = w
        bounds = (float(self.allowed.min()) - 0.1, float(self.allowed.max()) + 0.1)
        _, w, cost = s.fit_atoms(
            model,
            x.repeat_interleave(starts, 0),
            w0,
            phi.repeat_interleave(starts, 0),
            kind="invariants",
            rep=None,
            steps=s.polish_steps,
            fit_w=True,
            fix_x=True,
            w_bounds=bounds,
        )
        best = torch.nan_to_num(cost, nan=math.inf).reshape(b, starts).argmin(dim=1)
        return w.reshape(b, starts, n)[torch.arange(b), best]

    def discrete_weights(self, model, x, w, phi, *, sweeps=None):
        """Greedy search over element weights with the positions x [B, N, 3] held.

        From element weights w [B, N], each sweep tries every change of one atom's element
        and every move of two atoms that keeps their summed weight (a swap, or one up and
        one down), and takes the candidate that lowers the squared residual of the
        invariants phi [B, F] most (unscaled: from snapped noisy weights it restored 45 of
        50 cases on three molecules, against 32 with the residuals scaled by the blocks'
        norms); it stops when none does.  The moments are linear in the weights, so a
        candidate costs one matrix product and the invariants: thousands of candidates
        per sweep are cheap.  Returns the weights.
        """
        b, n = w.shape
        allowed = self.allowed
        s_count = len(allowed)
        rc = model.atom_basis(x, grad=False)  # [B, N, K]
        one_atom = torch.arange(n).repeat_interleave(s_count)
        one_value = allowed.repeat(n)
        ia, ib = torch.triu_indices(n, n, offset=1)

        def cost(cand):  # cand [B, C, N] -> [B, C]
            y = torch.einsum("bcn,bnk->bck", cand, rc)
            val = model.invariants_of(y.reshape(-1, y.shape[-1])).reshape(b, cand.shape[1], -1)
            res = ((val - phi[:, None]) ** 2).sum(-1)
            return torch.nan_to_num(res, nan=math.inf)

        w = w.clone()
        current = cost(w[:, None])[:, 0]
        for _ in range(sweeps or 2 * n):
            ones = w[:, None].repeat(1, len(one_atom), 1)
            ones[:, torch.arange(len(one_atom)), one_atom] = one_value
            pairs, ok = _pair_moves(w, ia, ib, allowed)
            c_one = cost(ones)
            c_pair = torch.where(ok, cost(pairs), math.inf)
            c, k = torch.cat([c_one, c_pair], dim=1).min(dim=1)
            better = c < current * (1 - 1e-9)
            if not better.any():
                break
            cand = torch.cat([ones, pairs], dim=1)
            w[better] = cand[better, k[better]]
            current = torch.where(better, c, current)
        return w

    def species_second(self, x, tg):
        """Weights against the species fingerprint with positions fixed, snapped, polished.

        The polish fits the positions to the species fingerprint alone, in the frame of
        the moments, which can undo the last digits the positions got from the main
        fingerprint in its own frame (a 25-atom QM9 molecule came back 2.5e-5 A from
        the truth at fingerprint RMSD 5e-5); the polished positions are kept only where
        they lower the larger of the two fingerprint RMSDs.  Returns x, w and that RMSD [B].
        """
        model2 = _model(self.spec2, self.s.grid)
        n = x.shape[1]
        total = model2.total_weight(self.phi2[tg][:, model2.fixed_invariants[0]])
        w = self.weights_for(model2, x, (total / n)[:, None].repeat(1, n), self.phi2[tg])
        w = _snap_weights(w, self.allowed, total)
        w = self.discrete_weights(model2, x, w, self.phi2[tg])
        xp, w, _ = self.s.fit_atoms(
            model2, x, w, self.phi2[tg], kind="invariants", rep=self.rep, steps=self.s.polish_steps
        )
        rmsd, rmsd_p = self.fingerprint_rmsd(x, w, tg), self.fingerprint_rmsd(xp, w, tg)
        better = rmsd_p < rmsd
        return torch.where(better[:, None, None], xp, x), w, torch.minimum(rmsd, rmsd_p)

    def last_bonds(self, best_x, best_w, best_rmsd, done):
        """Species fit, targets open after the rounds: elements from their best atoms' graph.

        The element assignments of :meth:`bond_candidates` are read in each round from the
        atoms fitted with free weights, before the walk and the last polish move them.
        A C9H20 of 29 atoms (QM9) ended its rounds as C5H22O2 (the same total weight, a
        composition no molecule has) at fingerprint RMSD 9e-5, its atoms 0.12 A from the
        molecule; hydrogens on the 20 atoms of fewest neighbours of those final atoms, and
        a 300-step polish, solve it (1e-14).  So the best atoms of each open target get the
        same candidates once more, read from themselves (centred as the fingerprint takes
        them), and the result is kept where the fingerprint RMSD falls.  Updates best_x
        [T, N, 3], best_w [T, N] and best_rmsd [T] in place.
        """
        t_open = torch.nonzero(~done & torch.isfinite(best_rmsd)).flatten()
        if t_open.numel() == 0:
            return
        x, w = self.recentre(best_x[t_open]), best_w[t_open]
        xb, wb = self.bond_candidates(x, w, x, w, t_open)  # it copies before it writes
        xb, wb = self.finish(xb, wb, t_open)
        rmsd = self.fingerprint_rmsd(xb, wb, t_open)
        better = rmsd < best_rmsd[t_open]
        up = t_open[better]
        best_x[up], best_w[up], best_rmsd[up] = xb[better], wb[better], rmsd[better]

    def species_after(self, x_att, att_rmsd, att_target, best_x, best_w, best_rmsd):
        """Two fingerprints: species for each attempt's best positions, the best per target.

        The rounds fit the positions to the main fingerprint alone, exactly as positions
        mode does (same steps, same random numbers), so two fingerprints solve the
        positions whenever one does; then :meth:`species_second` gives the atoms of every
        attempt (its best positions) their weights from the species fingerprint, and each
        target takes the attempt with the lowest of the larger of the two RMSDs.  (Weights
        fitted in every round and attempts judged on both fingerprints, as before session
        22, missed 3 of 77 QM9 molecules of 18-27 atoms whose positions one fingerprint
        solves.)  Updates best_x [T, N, 3], best_w [T, N] and best_rmsd [T] in place.
        """
        rows = torch.nonzero(torch.isfinite(att_rmsd)).flatten()
        if rows.numel() == 0:
            return
        x, w, rmsd = self.species_second(x_att[rows], att_target[rows])
        x, rmsd = self.species_polish(x, w, rmsd, att_target[rows])
        best_rmsd.fill_(math.inf)
        for a, r in enumerate(rows.tolist()):
            t = int(att_target[r])
            if rmsd[a] < best_rmsd[t]:
                best_rmsd[t], best_x[t], best_w[t] = rmsd[a], x[a], w[a]

    def species_polish(self, x, w, rmsd, tg):
        """Two fingerprints, attempts close (RMSD < 1e-2) but open: a long polish.

        Positions that meet the main fingerprint's tolerance can still sit 0.01 A off
        along a direction it hardly sees, which the species fingerprint, weighing the
        atoms unequally, sees more: a C9H20 of 29 atoms (QM9) came out of its rounds at
        RMSD 1.8e-7 on the main fingerprint and 4.7e-4 on the species one, its elements
        right.  The positions are fitted to the species fingerprint (weights held) with
        ten times the polish steps and patience, and kept where the larger of the two
        RMSDs falls (there: 4e-12).  Targets another attempt solved are skipped.  x [B, N,
        3], w [B, N], rmsd [B], tg [B] -> x, rmsd.
        """
        s = self.s
        solved = torch.isin(tg, tg[rmsd < self.problem.tol])  # by another attempt
        near = torch.nonzero(~solved & (rmsd < 1e-2)).flatten()
        if near.numel() == 0:
            return x, rmsd
        model2 = _model(self.spec2, s.grid)
        xp, wp, _ = s.fit_atoms(
            model2,
            x[near],
            w[near],
            self.phi2[tg[near]],
            kind="invariants",
            rep=self.rep,
            steps=10 * s.polish_steps,
            patience=10 * s.patience,
        )
        rp = self.fingerprint_rmsd(xp, wp, tg[near])
        better = rp < rmsd[near]
        x, rmsd = x.clone(), rmsd.clone()
        x[near[better]], rmsd[near[better]] = xp[better], rp[better]
        return x, rmsd

    def composition_runs(self, t, x, w, rmsd):
        """Species fit, target t open: rerun as each of a few known compositions.

        With the weights free the landscape is harder than with them known: a C7H5N of
        13 atoms (a chain, QM9) ended at fingerprint RMSD 0.28 as C8H4O (the same total
        weight) after 8 rounds of 3 attempts, while the same run given C7H5N solves it
        in its first round.  So each composition the total weight and valences allow
        (:meth:`compositions`), nearest the best attempt's sorted weights first, at most
        ``composition_runs`` of them, gets a run of its own with ``species='given'`` and
        the same options; the first that reaches the tolerance ends the search, and the
        best result is kept (atoms x [N, 3], weights w [N], fingerprint RMSD).
        """
        rows = self.compositions(t)[0]
        if len(rows) == 0:
            return x, w, rmsd
        near = (rows - w.sort().values).pow(2).sum(-1).argsort()[: self.s.composition_runs]
        strategy = replace(self.s, species="given")
        for c in near.tolist():
            numbers = np.array([self.element[round(float(v), 9)] for v in rows[c]])
            problem = replace(
                self.problem,
                targets=self.problem.targets[t : t + 1],
                numbers=numbers,
                starts=None,
                species_fn=None,
                species_targets=None,
            )
            got = _Run(strategy, problem, self.gen).outcome()
            rmsd_c = float(got.fingerprint_rmsd[0])
            _LOG.debug("composition %s: fingerprint %.1e", numbers.tolist(), rmsd_c)
            if rmsd_c < rmsd:  # atom i carries numbers[i]'s weight
                x, rmsd = got.positions[0], rmsd_c
                w = torch.as_tensor(self.spec.weights_for(numbers), dtype=self.dtype)
            if rmsd < self.problem.tol:
                break
        return x, w, rmsd

    def outcome(self) -> Outcome:
        from .strategies import Outcome

        s, model, n, dtype = self.s, self.model, self.n, self.dtype
        t_count, k_att = self.problem.n_targets, s.trials
        att_target = torch.arange(t_count).repeat_interleave(k_att)
        best_x = torch.zeros(t_count, n, 3, dtype=dtype)
        best_w = self.given_w[None].repeat(t_count, 1)
        best_rmsd = torch.full((t_count,), math.inf, dtype=dtype)
        done = torch.zeros(t_count, dtype=torch.bool)
        x_cur = torch.zeros(t_count * k_att, n, 3, dtype=dtype)
        w_cur = self.start_weights(t_count * k_att)
        # each attempt's best fingerprint RMSD so far: later rounds start from its best
        # atoms, not from its last ones
        att_rmsd = torch.full((t_count * k_att,), math.inf, dtype=dtype)
        for rnd in range(s.rounds):
            self.round = rnd
            live = torch.nonzero(~done[att_target]).flatten()
            if live.numel() == 0:
                break
            tg = att_target[live]
            start = None  # the atoms whose moments start the moments fit
            if rnd == self.order_round:
                start = self.atoms_by_order(tg)
            elif rnd > 0:
                start = (x_cur[live], w_cur[live])
            y0 = None if start is None else model.moments(*start)
            y, moment_rmsd = s.fit_moments(model, self.phi[tg], self.gen, start=y0)
            x, w = self.atoms_round(y, tg)
            x, w = self.moment_polish(y, x, w, tg, start=start)
            x, w = self.finish(x, w, tg)
            # with two fingerprints the rounds solve the positions alone (species after)
            rmsd = self.fingerprint_rmsd(x, w, tg, second=False)
            up = rmsd < att_rmsd[live]
            x_cur[live[up]], w_cur[live[up]] = x[up], w[up]
            att_rmsd[live[up]] = rmsd[up]
            _LOG.debug(
                "round %d: moments %s, fingerprint %s",
                rnd,
                np.array2string(moment_rmsd.numpy(), formatter={"float_kind": "{:.1e}".format}),
                np.array2string(rmsd.numpy(), formatter={"float_kind": "{:.1e}".format}),
            )
            for a in range(live.numel()):
                t = int(tg[a])
                if rmsd[a] < best_rmsd[t]:
                    best_rmsd[t], best_x[t], best_w[t] = rmsd[a], x[a], w[a]
            done |= best_rmsd < self.problem.tol
        if self.two:
            self.species_after(x_cur, att_rmsd, att_target, best_x, best_w, best_rmsd)
        if self.fit_mode and s.bonds and not done.all():
            self.last_bonds(best_x, best_w, best_rmsd, done)
            done |= best_rmsd < self.problem.tol
        if self.fit_mode and s.composition_runs and n <= COMPOSITION_ATOMS:
            for t in torch.nonzero(~done).flatten().tolist():
                best_x[t], best_w[t], best_rmsd[t] = self.composition_runs(
                    t, best_x[t], best_w[t], best_rmsd[t]
                )
        numbers = None
        if self.fit_mode or self.two:
            numbers = np.array(
                [[self.element.get(round(float(v), 9), 0) for v in row] for row in best_w]
            )
        elif not self.uniform:  # atom i must carry numbers[i]'s weight
            for t in range(t_count):
                best_x[t] = best_x[t][_match_order(best_w[t], self.given_w)]
        rmsd = best_rmsd.double().numpy()
        return Outcome(
            positions=best_x,
            loss=rmsd**2,
            fingerprint_rmsd=rmsd,
            trials=np.full(t_count, k_att),
            history=[[] for _ in range(t_count)],
            numbers=numbers,
        )
