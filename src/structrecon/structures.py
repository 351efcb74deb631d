"""Structures as tensors, and the geometry every descriptor is built on.

A *composition group* is a set of structures with the same atomic numbers in the
same order, the same cell and the same periodicity: trials and targets of one
inversion.  Inside a group only the positions change, so descriptors are built
once per group (see :func:`structrecon.descriptors.fingerprint_fn`) and then
evaluated on a batch of positions ``[B, N, 3]``.

Periodic images are handled densely: every neighbour *slot* is an (atom, lattice
shift) pair, and the cutoff function removes slots out of range.  This keeps the
whole computation a differentiable tensor expression in the positions (and the
cell) with no neighbour-list rebuilds during an optimisation; the set of shifts
only depends on the cell and the cutoff.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ._errors import StructreconError

__all__ = [
    "Geometry",
    "PointGroup",
    "Rotor",
    "atoms_groups",
    "group_key",
    "kabsch",
    "lattice_shifts",
    "neighbour_geometry",
    "point_group",
    "rotatable_bonds",
    "rotate_about_bond",
]


def lattice_shifts(cell: np.ndarray | None, pbc, cutoff: float) -> np.ndarray:
    """Integer lattice shifts needed to see every image within ``cutoff``.

    Parameters
    ----------
    cell : [3, 3] array, Angstrom (rows are lattice vectors), or None for a cluster.
    pbc : three booleans.
    cutoff : float, Angstrom.

    Returns
    -------
    [S, 3] int array; the first row is the zero shift.  Positions are wrapped
    into the cell before use, so one extra shell on each side is included.
    """
    pbc = np.asarray(pbc if pbc is not None else [False] * 3, dtype=bool)
    if cell is None or not pbc.any():
        return np.zeros((1, 3), dtype=np.int64)
    cell = np.asarray(cell, dtype=float)
    volume = abs(np.linalg.det(cell))
    if volume < 1e-8:
        raise StructreconError("periodic structure has a cell of zero volume")
    ranges = []
    for d in range(3):
        if not pbc[d]:
            ranges.append([0])
            continue
        a, b = cell[(d + 1) % 3], cell[(d + 2) % 3]
        width = volume / np.linalg.norm(np.cross(a, b))
        n = int(math.ceil(cutoff / width)) + 1
        ranges.append(range(-n, n + 1))
    shifts = sorted(itertools.product(*ranges), key=lambda s: (s != (0, 0, 0), s))
    return np.asarray(shifts, dtype=np.int64)


@dataclass(frozen=True)
class Geometry:
    """Neighbour geometry of a batch, for one composition group.

    Attributes
    ----------
    vectors : [B, N, M, 3] displacement r_j + shift - r_i for slot m = (j, shift), Angstrom.
    distances : [B, N, M], Angstrom; slots that are not neighbours hold ``2 * cutoff``.
    valid : [N, M] bool, False for an atom paired with itself at zero shift.
    neighbour : [M] long, the atom index j of each slot.

    For periodic structures M counts only the slots within the cutoff of some atom
    in the batch; for clusters M = N.
    """

    vectors: torch.Tensor
    distances: torch.Tensor
    valid: torch.Tensor
    neighbour: torch.Tensor


def neighbour_geometry(
    positions: torch.Tensor,
    cell: torch.Tensor | None,
    pbc,
    shifts: np.ndarray,
    cutoff: float,
) -> Geometry:
    """Displacements and distances to every neighbour slot.

    Parameters
    ----------
    positions : [B, N, 3], Angstrom.
    cell : [3, 3] (rows are lattice vectors) or None for a cluster.
    pbc : three booleans.
    shifts : [S, 3] integer shifts from :func:`lattice_shifts`.
    cutoff : float, Angstrom; used only to fill non-neighbour slots.
    """
    n_atoms = positions.shape[1]
    n_shifts = shifts.shape[0]
    if n_shifts > 1:
        pbc_t = torch.as_tensor(np.asarray(pbc, dtype=bool), device=positions.device)
        frac = positions @ torch.linalg.inv(cell)
        # wrap periodic directions into [0, 1); floor carries no gradient
        frac = torch.where(pbc_t, frac - torch.floor(frac).detach(), frac)
        positions = frac @ cell
        shift_vec = torch.as_tensor(shifts, dtype=positions.dtype, device=positions.device) @ cell
        # [B, N(i), S, N(j), 3] -> slots ordered (shift, j)
        vec = (
            positions[:, None, None, :, :]
            + shift_vec[None, None, :, None, :]
            - positions[:, :, None, None, :]
        )
        vec = vec.reshape(positions.shape[0], n_atoms, n_shifts * n_atoms, 3)
        # keep only the slots (j, shift) within the cutoff of some centre in some
        # structure of the batch; the others contribute exactly zero.  Indices are
        # chosen without gradient, so this is a neighbour list rebuilt at every call.
        with torch.no_grad():
            near = torch.linalg.norm(vec.detach(), dim=-1) < cutoff
            keep = torch.nonzero(near.any(dim=0).any(dim=0)).flatten()
        keep = torch.unique(torch.cat([torch.arange(n_atoms, device=keep.device), keep]))
        vec = vec[:, :, keep]
    else:
        vec = positions[:, None, :, :] - positions[:, :, None, :]
        keep = torch.arange(n_atoms, device=positions.device)
    neighbour = keep % n_atoms
    # slot m is atom j = m % N at shift m // N; the self slot is j == i at shift 0
    valid = ~(keep[None, :] == torch.arange(n_atoms, device=keep.device)[:, None])
    # distances with a safe value for the self slot, so gradients stay finite
    safe = torch.where(valid[None, :, :, None], vec, torch.full_like(vec, 2.0 * cutoff))
    distances = torch.linalg.norm(safe, dim=-1)
    distances = torch.where(valid[None], distances, torch.full_like(distances, 2.0 * cutoff))
    return Geometry(vectors=safe, distances=distances, valid=valid, neighbour=neighbour)


def atoms_groups(frames) -> dict[tuple, list[int]]:
    """Group frame indices by (atomic numbers, cell, pbc), preserving order."""
    groups: dict[tuple, list[int]] = {}
    for k, atoms in enumerate(frames):
        key = group_key(atoms.numbers, atoms.cell.array if atoms.pbc.any() else None, atoms.pbc)
        groups.setdefault(key, []).append(k)
    return groups


def group_key(numbers, cell, pbc) -> tuple:
    """Hashable key of a composition group."""
    pbc = tuple(bool(p) for p in np.asarray(pbc if pbc is not None else [False] * 3))
    cell_key = None
    if cell is not None and any(pbc):
        cell_key = tuple(np.round(np.asarray(cell, dtype=float).ravel(), 8))
    return (tuple(int(z) for z in numbers), cell_key, pbc)


@dataclass(frozen=True)
class Rotor:
    """A rotatable bond b-c: turning ``moving`` about the axis b -> c changes one torsion.

    ``moving`` is a boolean mask [N] (the smaller side, c's side when equal);
    ``period`` is 360 / k degrees when c carries k >= 2 identical terminal atoms and nothing
    else (CH3, NH2, CF3), else 360.
    """

    b: int
    c: int
    moving: np.ndarray
    period: float


def rotatable_bonds(numbers, positions, *, scale: float = 1.2) -> list[Rotor]:
    """Rotatable bonds of a molecule from atomic numbers and positions only.

    Bonds join atoms closer than ``scale`` times the sum of their covalent radii (ASE's
    table).  A bond is rotatable when both ends have another neighbour and it is not in a
    ring (its removal disconnects the molecule).  Largest moving side first.
    """
    from ase.data import covalent_radii

    numbers = np.asarray(numbers)
    x = np.asarray(positions, dtype=float)
    n = len(numbers)
    radii = covalent_radii[numbers]
    dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
    bonded = (dist < scale * (radii[:, None] + radii[None])) & ~np.eye(n, dtype=bool)
    neighbours = [np.flatnonzero(bonded[i]) for i in range(n)]
    rotors = []
    for b, c in zip(*np.nonzero(np.triu(bonded))):
        if len(neighbours[b]) < 2 or len(neighbours[c]) < 2:
            continue
        side = np.zeros(n, dtype=bool)  # atoms reached from c without crossing b-c
        side[c] = True
        stack = [c]
        while stack:
            i = stack.pop()
            for j in neighbours[i]:
                if not side[j] and not (i == c and j == b):
                    side[j] = True
                    stack.append(j)
        if side[b]:
            continue  # in a ring
        if side.sum() > n - side.sum():
            b, c, side = c, b, ~side
        others = [j for j in neighbours[c] if j != b]
        terminal = all(len(neighbours[j]) == 1 for j in others)
        same = len({int(numbers[j]) for j in others}) == 1
        period = 360.0 / len(others) if terminal and same and len(others) >= 2 else 360.0
        rotors.append(Rotor(int(b), int(c), side, period))
    return sorted(rotors, key=lambda r: -int(r.moving.sum()))


def rotate_about_bond(x: torch.Tensor, rotor: Rotor, degrees: torch.Tensor) -> torch.Tensor:
    """Positions [B, N, 3] with the rotor's moving side turned by ``degrees`` [B]."""
    axis = x[:, rotor.c] - x[:, rotor.b]
    axis = axis / torch.linalg.norm(axis, dim=-1, keepdim=True)
    theta = torch.deg2rad(degrees.to(x.dtype))[:, None, None]
    rel = x - x[:, rotor.c : rotor.c + 1]
    k = axis[:, None, :].expand_as(rel)
    # Rodrigues: v cos + (k x v) sin + k (k . v)(1 - cos)
    turned = (
        rel * torch.cos(theta)
        + torch.linalg.cross(k, rel) * torch.sin(theta)
        + k * (k * rel).sum(-1, keepdim=True) * (1 - torch.cos(theta))
    )
    mask = torch.as_tensor(rotor.moving, device=x.device)[None, :, None]
    return torch.where(mask, turned + x[:, rotor.c : rotor.c + 1], x)


# ----------------------------------------------------------------------------
# Point groups of molecules and the symmetry images of a distortion
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PointGroup:
    """The symmetry operations of a (nearly) symmetric molecule about its centroid.

    ``rotations[g] @ positions[i] == positions[perms[g, i]]`` for every operation g
    (proper and improper; the identity included), with ``positions`` the molecule
    symmetrised and centred.  An operation acts on a distortion d of the molecule,
    x = positions + d, by ``(g d)[perms[g, i]] = rotations[g] @ d[i]``: x and
    positions + g d are images of each other, so any invariant fingerprint of the two
    is the same.
    """

    rotations: np.ndarray  # [G, 3, 3]
    perms: np.ndarray  # [G, N]
    positions: np.ndarray  # [N, 3]

    @property
    def order(self) -> int:
        """Number of operations."""
        return len(self.rotations)

    @functools.cached_property
    def actions(self) -> np.ndarray:
        """The operations as matrices [G, 3N, 3N] on flattened distortions."""
        g, n = self.perms.shape
        d = np.zeros((g, n, 3, n, 3))
        for k in range(g):
            d[k, self.perms[k], :, np.arange(n), :] = self.rotations[k]
        return d.reshape(g, 3 * n, 3 * n)

    @functools.cached_property
    def components(self) -> list[np.ndarray]:
        """Projectors [3N, 3N] onto the isotypic components the group moves.

        The distortions of a symmetric molecule split into isotypic components, one
        per irreducible representation of the group.  Found without character
        tables: the group average of a random symmetric matrix has the irreducible
        subspaces as eigenspaces, and their characters sort them into components.
        The totally symmetric component, which every operation fixes, is left out.
        """
        acts = self.actions
        m = np.random.default_rng(0).standard_normal(acts.shape[1:])
        mean = np.einsum("gab,bc,gdc->ad", acts, m + m.T, acts) / self.order
        w, v = np.linalg.eigh(mean)
        gaps = np.flatnonzero(np.diff(w) > 1e-6 * max(1.0, np.abs(w).max())) + 1
        kinds: dict[tuple, list[np.ndarray]] = {}
        for block in np.split(v, gaps, axis=1):
            chi = np.einsum("ai,gab,bi->g", block, acts, block) / block.shape[1]
            kinds.setdefault(tuple(np.round(chi, 3)), []).append(block)
        out = []
        for chi, blocks in kinds.items():
            if not np.allclose(chi, 1.0):
                basis = np.concatenate(blocks, axis=1)
                out.append(basis @ basis.T)
        return out

    def images(self, x: np.ndarray, *, min_change: float = 1e-3) -> np.ndarray:
        """Partial symmetry images [C, N, 3] of a structure x [N, 3] near the molecule.

        x is aligned on ``positions`` (rotation only) and its distortion d split
        into isotypic components; each image applies one operation to one component
        and leaves the others.  Distortions of a symmetric molecule are pinned by an
        invariant fingerprint only up to such moves at second order (the amplitude
        of each component, not its phase or sign), so a local optimiser can stop in
        the wrong one.  Images that are whole images of x, or x itself, are dropped,
        as are duplicates (within ``min_change`` Angstrom).
        """
        y = np.asarray(x, dtype=float) - np.mean(x, axis=0)
        rotation = kabsch(self.positions, y, allow_reflection=False)
        d = (y @ rotation.T - self.positions).reshape(-1)
        acts = self.actions
        seen = list(acts @ d)  # x and its whole images
        out = []
        for proj in self.components:
            part = proj @ d
            for act in acts:
                c = d + act @ part - part
                if all(np.abs(c - s).max() > min_change for s in seen):
                    seen.append(c)
                    out.append(c)
        n = len(self.positions)
        return self.positions + np.reshape(out, (len(out), n, 3))


def kabsch(x: np.ndarray, y: np.ndarray, allow_reflection: bool) -> np.ndarray:
    """Orthogonal ``R`` minimising ``sum_i |x_i - R y_i|^2`` for centred ``[N, 3]`` arrays."""
    u, _, vt = np.linalg.svd(y.T @ x)
    rotation = vt.T @ u.T
    if not allow_reflection and np.linalg.det(rotation) < 0.0:
        rotation = vt.T @ np.diag([1.0, 1.0, -1.0]) @ u.T
    return rotation


def _frame(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Orthonormal frame (columns) from a and the part of b orthogonal to it."""
    e1 = a / np.linalg.norm(a)
    e2 = b - (b @ e1) * e1
    e2 = e2 / np.linalg.norm(e2)
    return np.stack([e1, e2, np.cross(e1, e2)], axis=1)


def point_group(numbers, positions, *, tol: float = 0.02) -> PointGroup:
    """Point group of a molecule: every orthogonal map that permutes like atoms.

    Operations are found by mapping a frame of two atoms (the one furthest from the
    centroid and the one furthest off its axis) onto every pair of like atoms at the
    same distances, proper and improper, and keeping the maps that send every atom
    within ``tol`` Angstrom of a like atom, one to one.  The molecule is then
    symmetrised (averaged over the group) and the rotations refitted to it, so the
    operations hold to rounding.  Linear molecules and single atoms, whose groups are
    continuous, get the identity only.
    """
    numbers = np.asarray(numbers)
    x = np.asarray(positions, dtype=float)
    x = x - x.mean(axis=0)
    n = len(x)
    r = np.linalg.norm(x, axis=1)
    a = int(np.argmax(r))
    off = np.linalg.norm(np.cross(x, x[a]), axis=1)
    b = int(np.argmax(off))
    if r[a] < tol or off[b] < tol * r[a]:
        return PointGroup(np.eye(3)[None], np.arange(n)[None], x)
    frame = _frame(x[a], x[b])
    d_ab = np.linalg.norm(x[a] - x[b])
    like = numbers[:, None] == numbers[None]
    found = {}
    for a2 in np.flatnonzero((numbers == numbers[a]) & (np.abs(r - r[a]) < tol)):
        for b2 in np.flatnonzero((numbers == numbers[b]) & (np.abs(r - r[b]) < tol)):
            if a2 == b2 or abs(np.linalg.norm(x[a2] - x[b2]) - d_ab) > tol:
                continue
            image = _frame(x[a2], x[b2])
            for sign in (1.0, -1.0):
                rot = image @ np.diag([1.0, 1.0, sign]) @ frame.T
                dist = np.linalg.norm((x @ rot.T)[:, None] - x[None], axis=-1)
                dist[~like] = np.inf
                perm = dist.argmin(axis=1)
                if dist[np.arange(n), perm].max() < tol and len(set(perm)) == n:
                    found[(*perm, sign * np.linalg.det(frame) * np.linalg.det(image))] = (rot, perm)
    rots = np.stack([v[0] for v in found.values()])
    perms = np.stack([v[1] for v in found.values()])
    for _ in range(5):  # symmetrise, refit the rotations (keeping proper / improper)
        x = np.mean([x[p] @ rot for rot, p in zip(rots, perms)], axis=0)
        for k, p in enumerate(perms):
            u, _, vt = np.linalg.svd(x[p].T @ x)
            if np.linalg.det(u @ vt) * np.linalg.det(rots[k]) < 0:
                u[:, -1] *= -1
            rots[k] = u @ vt
    return PointGroup(rots, perms, x)
