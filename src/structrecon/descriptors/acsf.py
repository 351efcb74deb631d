"""Behler-Parrinello atom-centred symmetry functions G2, G4 and G5.

Definitions (Behler, J. Chem. Phys. 134, 074106 (2011); Fung 2022 eqs. 1-2), with
the cosine cutoff f_c(r) = (cos(pi r / r_c) + 1) / 2 for r < r_c:

- G2_i = sum_j exp(-eta (r_ij - r_s)^2) f_c(r_ij)
- G4_i = 2^(1-zeta) sum_{j<k} (1 + lambda cos theta_ijk)^zeta
  exp(-eta (r_ij^2 + r_ik^2 + r_jk^2)) f_c(r_ij) f_c(r_ik) f_c(r_jk)
- G5_i = 2^(1-zeta) sum_{j<k} (1 + lambda cos theta_ijk)^zeta
  exp(-eta (r_ij^2 + r_ik^2)) f_c(r_ij) f_c(r_ik)

Each unordered neighbour pair j < k is counted once (the convention of dscribe and
of the StructRepGen code).  Species resolution: G2 per neighbour species, G4/G5
per unordered pair of neighbour species.  Feature order per atom:
``[G2 (species s, params), G4 (pair (s1 <= s2), params), G5 (pair, params)]``,
species and pairs in increasing atomic number, parameters in spec order.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, ClassVar

import numpy as np
import torch

from .._errors import StructreconError
from ..structures import lattice_shifts, neighbour_geometry
from ._spec import register_descriptor, spec_from_fields

__all__ = ["ACSFSpec", "acsf_fn", "cosine_cutoff"]


def cosine_cutoff(r: torch.Tensor, cutoff: float) -> torch.Tensor:
    """(cos(pi r / r_c) + 1) / 2 inside the cutoff, 0 outside."""
    inside = r < cutoff
    rc = torch.where(inside, r, torch.zeros_like(r))
    return torch.where(inside, 0.5 * (torch.cos(math.pi * rc / cutoff) + 1.0), torch.zeros_like(r))


def _powers(cos: torch.Tensor, zeta_lambda: np.ndarray) -> torch.Tensor:
    """2^(1-zeta) (1 + lambda cos)^zeta for each (zeta, lambda) row: [..., Q].

    Integer powers of two (the usual 1, 2, 4, 16, 64) come from repeated squaring,
    others from ``pow``; both have finite gradients where 1 + lambda cos = 0.
    """
    out = []
    cache: dict[tuple[float, float], torch.Tensor] = {}
    for zeta, lam in zeta_lambda:
        base = (1.0 + lam * cos).clamp_min(0.0)
        z = int(zeta)
        if z == zeta and z & (z - 1) == 0:
            value, power = base, 1
            while power < z:
                key = (lam, power * 2)
                if key not in cache:
                    cache[key] = value * value
                value, power = cache[key], power * 2
        else:
            value = torch.pow(base, float(zeta))
        out.append(value * 2.0 ** (1.0 - zeta))
    return torch.stack(out, dim=-1)


def _floats(name: str, values, width: int) -> tuple[tuple[float, ...], ...]:
    out = []
    for row in values:
        row = tuple(float(v) for v in (row if isinstance(row, (list, tuple)) else [row]))
        if len(row) != width:
            raise StructreconError(f"ACSF {name} entries need {width} numbers each, got {row}")
        out.append(row)
    return tuple(out)


@register_descriptor
@dataclasses.dataclass(frozen=True, kw_only=True)
class ACSFSpec:
    """Atom-centred symmetry functions.

    Parameters
    ----------
    cutoff : cutoff radius r_c, Angstrom.
    species : atomic numbers resolved (neighbour species channels), any order.
    g2 : (eta [1/A^2], r_s [A]) per radial function.
    g4 : (eta [1/A^2], zeta, lambda) per angular G4 function.
    g5 : (eta [1/A^2], zeta, lambda) per angular G5 function.
    """

    cutoff: float
    species: tuple[int, ...]
    g2: tuple[tuple[float, float], ...] = ()
    g4: tuple[tuple[float, float, float], ...] = ()
    g5: tuple[tuple[float, float, float], ...] = ()

    kind: ClassVar[str] = "acsf"

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "cutoff", float(self.cutoff))
        set_(self, "species", tuple(sorted({int(z) for z in self.species})))
        set_(self, "g2", _floats("g2", self.g2, 2))
        set_(self, "g4", _floats("g4", self.g4, 3))
        set_(self, "g5", _floats("g5", self.g5, 3))
        if not self.cutoff > 0:
            raise StructreconError(f"ACSF cutoff must be positive, got {self.cutoff}")
        if not self.species or min(self.species) < 1 or max(self.species) > 118:
            raise StructreconError(f"ACSF species must be atomic numbers 1-118, got {self.species}")
        if not (self.g2 or self.g4 or self.g5):
            raise StructreconError("ACSF needs at least one of g2, g4, g5")
        for name in ("g4", "g5"):
            for eta, zeta, lam in getattr(self, name):
                if lam not in (-1.0, 1.0) or zeta < 1 or eta < 0:
                    raise StructreconError(
                        f"ACSF {name} needs lambda in (-1, 1), zeta >= 1, eta >= 0; "
                        f"got {(eta, zeta, lam)}"
                    )
        for eta, _ in self.g2:
            if eta < 0:
                raise StructreconError(f"ACSF g2 eta must be >= 0, got {eta}")

    @property
    def n_pairs(self) -> int:
        """Number of unordered species pairs."""
        s = len(self.species)
        return s * (s + 1) // 2

    @property
    def n_features(self) -> int:
        """Features per atom."""
        return len(self.species) * len(self.g2) + self.n_pairs * (len(self.g4) + len(self.g5))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict form (lists, floats)."""
        return {
            "cutoff": self.cutoff,
            "species": list(self.species),
            "g2": [list(p) for p in self.g2],
            "g4": [list(p) for p in self.g4],
            "g5": [list(p) for p in self.g5],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ACSFSpec:
        """Read the dict form; g2/g4/g5 may also be grids (see :func:`expand_grid`)."""
        data = dict(data)
        for name in ("g2", "g4", "g5"):
            if isinstance(data.get(name), dict):
                data[name] = expand_grid(name, data[name])
        return spec_from_fields(cls, data)

    def build(self, numbers, cell=None, pbc=None):
        """See :func:`acsf_fn`."""
        return acsf_fn(self, numbers, cell, pbc)


def expand_grid(name: str, grid: dict[str, list[float]]) -> list[list[float]]:
    """Expand a parameter grid to an explicit list.

    G2 grids ``{eta, rs}`` run eta-major: index = i_eta * n_rs + i_rs.  G4/G5 grids
    ``{eta, zeta, lambda}`` follow the StructRepGen order:
    index = (i_zeta * n_lambda + i_lambda) * n_eta + i_eta.
    """
    if name == "g2":
        keys = ("eta", "rs")
        extra = set(grid) - set(keys)
        if extra or not set(keys) <= set(grid):
            raise StructreconError(f"ACSF g2 grid needs keys eta, rs; got {sorted(grid)}")
        return [[e, r] for e, r in itertools.product(grid["eta"], grid["rs"])]
    keys = ("eta", "zeta", "lambda")
    if set(grid) != set(keys):
        raise StructreconError(f"ACSF {name} grid needs keys eta, zeta, lambda; got {sorted(grid)}")
    return [
        [e, z, lam] for z, lam, e in itertools.product(grid["zeta"], grid["lambda"], grid["eta"])
    ]


def acsf_fn(spec: ACSFSpec, numbers, cell=None, pbc=None):
    """Return ``fn(positions [B, N, 3]) -> features [B, N, F]`` for one composition group.

    Parameters
    ----------
    spec : the ACSF specification.
    numbers : [N] atomic numbers (fixed for the group).
    cell : [3, 3] Angstrom, rows are lattice vectors, or None for a cluster; a
        tensor that requires grad makes the features differentiable in the cell.
    pbc : three booleans (None: no periodicity).

    The function is differentiable in the positions; dtype and device follow them.
    """
    numbers = np.asarray(numbers, dtype=np.int64)
    missing = sorted(set(numbers.tolist()) - set(spec.species))
    if missing:
        raise StructreconError(
            f"structure has element(s) {missing} that the ACSF spec does not resolve "
            f"(species {list(spec.species)})"
        )
    pbc_arr = np.zeros(3, dtype=bool) if pbc is None else np.asarray(pbc, dtype=bool)
    cell_np = cell.detach().cpu().numpy() if isinstance(cell, torch.Tensor) else cell
    shifts = lattice_shifts(cell_np, pbc_arr, spec.cutoff)
    n_atoms = len(numbers)
    n_species = len(spec.species)
    species_index = np.searchsorted(np.asarray(spec.species), numbers)
    onehot_atoms = np.eye(n_species)[species_index]  # [N, S]
    pair_rows, pair_cols = np.triu_indices(n_species)
    # clusters: G2 from the N(N-1)/2 unordered pairs, each added to both of its atoms
    # through a constant incidence matrix [N * S, n_pairs] (half the work of all slots)
    pair_i, pair_j = np.triu_indices(n_atoms, k=1)
    incidence = np.zeros((n_atoms, n_species, len(pair_i)))
    incidence[pair_i, species_index[pair_j], np.arange(len(pair_i))] = 1.0
    incidence[pair_j, species_index[pair_i], np.arange(len(pair_i))] = 1.0
    incidence = incidence.reshape(n_atoms * n_species, len(pair_i))
    g2 = np.asarray(spec.g2).reshape(-1, 2)
    g4 = np.asarray(spec.g4).reshape(-1, 3)
    g5 = np.asarray(spec.g5).reshape(-1, 3)
    cutoff = spec.cutoff

    def fn(positions: torch.Tensor) -> torch.Tensor:
        if positions.ndim != 3 or positions.shape[1:] != (n_atoms, 3):
            raise ValueError(f"positions must be [B, {n_atoms}, 3], got {tuple(positions.shape)}")
        dtype, device = positions.dtype, positions.device
        cell_t = None if cell is None else torch.as_tensor(cell, dtype=dtype, device=device)
        # a cell tensor that requires grad stays in the graph (strain derivatives)
        geo = neighbour_geometry(positions, cell_t, pbc_arr, shifts, cutoff)
        r = geo.distances  # [B, N, M]
        fc = cosine_cutoff(r, cutoff)  # invalid slots are at 2 r_c -> 0
        # species one-hot of each neighbour slot: [M, S]
        onehot = torch.as_tensor(onehot_atoms, dtype=dtype, device=device)[geo.neighbour]
        parts = []
        if len(g2):
            eta = torch.as_tensor(g2[:, 0], dtype=dtype, device=device)
            rs = torch.as_tensor(g2[:, 1], dtype=dtype, device=device)
            if shifts.shape[0] == 1:
                r_pair = r[:, pair_i, pair_j]  # [B, n_pairs]
                radial = torch.exp(-eta * (r_pair[..., None] - rs) ** 2)
                radial = radial * cosine_cutoff(r_pair, cutoff)[..., None]  # [B, n_pairs, P]
                inc = torch.as_tensor(incidence, dtype=dtype, device=device)
                g2_out = (inc @ radial).reshape(r.shape[0], n_atoms, n_species * len(g2))
                parts.append(g2_out)
            else:
                radial = torch.exp(-eta * (r[..., None] - rs) ** 2) * fc[..., None]  # [B,N,M,P]
                parts.append(torch.einsum("bimp,ms->bisp", radial, onehot).flatten(2))
        if len(g4) or len(g5):
            # non-neighbour slots get a zero unit vector, so their cos is 0, not 3
            unit = geo.vectors / r[..., None] * geo.valid[None, :, :, None]
            cos = torch.einsum("bijx,bikx->bijk", unit, unit).clamp(-1.0, 1.0)
            offdiag = 1.0 - torch.eye(r.shape[-1], dtype=dtype, device=device)
            for params, with_jk in ((g4, True), (g5, False)):
                if len(params):
                    parts.append(
                        _angular(params, r, fc, cos, geo, onehot, offdiag, with_jk, cutoff)
                    )
        feats = torch.cat(parts, dim=-1)
        return feats

    def _angular(params, r, fc, cos, geo, onehot, offdiag, with_jk, cutoff):
        dtype, device = r.dtype, r.device
        # unique angular (zeta, lambda) and radial eta values; params index into them
        zl, q_of = np.unique(params[:, 1:], axis=0, return_inverse=True)
        etas, u_of = np.unique(params[:, 0], return_inverse=True)
        ang = _powers(cos, zl) * offdiag[..., None]  # [B, N, M, M, Q], 2^(1-zeta) included
        eta = torch.as_tensor(etas, dtype=dtype, device=device)
        radial = torch.exp(-eta * r[..., None] ** 2) * fc[..., None]  # [B, N, M, U]
        rad_s = radial[..., None] * onehot[None, None, :, None, :]  # [B, N, M, U, S]
        if with_jk:
            # exp(-eta r_jk^2) f_c(r_jk) does not factorise: one angular slice per parameter
            d_jk = geo.vectors[:, :, None, :, :] - geo.vectors[:, :, :, None, :]
            r_jk = torch.linalg.norm(d_jk + (1.0 - offdiag)[..., None] * 2.0 * cutoff, dim=-1)
            e_jk = torch.exp(-eta * r_jk[..., None] ** 2) * cosine_cutoff(r_jk, cutoff)[..., None]
            ang_p = ang[..., q_of] * e_jk[..., u_of]  # [B, N, M, M, P]
            rad_p = rad_s[:, :, :, u_of]  # [B, N, M, P, S]
            half = torch.einsum("bijkp,bikps->bijps", ang_p, rad_p)
            full = torch.einsum("bijps,bijpt->bipst", half, rad_p)
        else:
            # G5 factorises: sum_jk A_q(jk) R_u(j) R_u(k), computed for every (q, u)
            half = torch.einsum("bijkq,bikus->bijqus", ang, rad_s)
            full = torch.einsum("bijqus,bijut->biqust", half, rad_s)
            full = full[:, :, q_of, u_of]  # [B, N, P, S, S]
        # unordered pairs: off-diagonal species pairs appear once in full[s, t];
        # like pairs are counted twice by the ordered sum
        pair = full[..., pair_rows, pair_cols]  # [B, N, P, n_pairs]
        like = torch.as_tensor(pair_rows == pair_cols, dtype=dtype, device=device)
        pair = pair * (1.0 - 0.5 * like)
        return pair.transpose(-1, -2).flatten(2)  # pair-major, then params

    fn.n_features = spec.n_features
    return fn
