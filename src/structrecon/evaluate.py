"""Compare reconstructed atomic structures with reference structures.

Two kinds of comparison are provided, following the evaluation protocols of
Fung et al. (2022) and Cobelli et al. (2022):

* per-structure recovery, measured as the root-mean-square deviation (RMSD)
  after the best rigid superposition and the best matching of like atoms
  (optionally allowing mirror images, since many invariant fingerprints cannot
  tell enantiomers apart): :func:`align`, :func:`structure_rmsd`;
* distributional agreement between two sets of structures, through pair-distance
  and bond-angle distributions: :func:`pair_distances`, :func:`bond_angles`,
  :func:`distribution_distance`, :func:`wasserstein`, :func:`compare_sets`,
  :func:`plot_distributions`.

Lengths are in Angstrom and angles in degrees throughout.
"""

from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass
from itertools import combinations_with_replacement, permutations

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols
from ase.geometry import complete_cell, find_mic, minkowski_reduce
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from scipy.stats import wasserstein_distance

from structrecon._errors import StructreconError
from structrecon.structures import kabsch as _kabsch

__all__ = [
    "Alignment",
    "align",
    "structure_rmsd",
    "pair_distances",
    "bond_angles",
    "distribution_distance",
    "wasserstein",
    "compare_sets",
    "plot_distributions",
]

_EXHAUSTIVE_LIMIT = 5040  # clusters with at most this many like-atom permutations: try all
_MAX_ITERATIONS = 50  # assignment/superposition rounds per starting orientation
_EXACT_RMSD = 1e-12  # Angstrom; below this a match is exact and the search stops
_CELL_TOLERANCE = 1e-6  # Angstrom; largest allowed difference between two cells
_PERIODIC_REFINEMENTS = 20  # assignment/translation rounds per trial translation


@dataclass(frozen=True)
class Alignment:
    """Best superposition of a candidate structure onto a reference structure.

    Attributes
    ----------
    rmsd : float
        Root-mean-square deviation between matched atoms after superposition,
        in Angstrom.
    permutation : numpy.ndarray
        Integer array of shape ``[N]``; ``permutation[i]`` is the index of the
        candidate atom matched to reference atom ``i`` (always of the same
        atomic number).
    rotation : numpy.ndarray
        Array of shape ``[3, 3]``, an orthogonal matrix ``R`` acting on column
        vectors (``R @ r``).  Its determinant is -1 when the candidate was
        reflected.  The identity for periodic structures.
    reflected : bool
        Whether ``rotation`` is improper (a mirror image was used).
    aligned_positions : numpy.ndarray
        Array of shape ``[N, 3]`` in Angstrom: the candidate positions after the
        permutation, rotation and translation, expressed in the reference's
        frame, so that row ``i`` lies next to reference atom ``i``.  For
        periodic structures each row is the periodic image nearest to the
        matching reference atom.
    """

    rmsd: float
    permutation: np.ndarray
    rotation: np.ndarray
    reflected: bool
    aligned_positions: np.ndarray


# ----------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------


def _check_atoms(atoms: object, name: str) -> Atoms:
    if not isinstance(atoms, Atoms):
        raise StructreconError(f"{name} must be an ase.Atoms object, got {type(atoms).__name__}")
    return atoms


def _check_pair(reference: object, candidate: object) -> tuple[Atoms, Atoms]:
    reference = _check_atoms(reference, "reference")
    candidate = _check_atoms(candidate, "candidate")
    if len(reference) == 0 or len(candidate) == 0:
        raise StructreconError(
            f"cannot align empty structures (reference has {len(reference)} atoms, "
            f"candidate has {len(candidate)})"
        )
    if not np.array_equal(np.sort(reference.numbers), np.sort(candidate.numbers)):
        raise StructreconError(
            "composition mismatch: reference is "
            f"{reference.get_chemical_formula()}, candidate is {candidate.get_chemical_formula()}"
        )
    return reference, candidate


def _is_periodic(atoms: Atoms) -> bool:
    return bool(np.any(atoms.pbc))


def _species_indices(numbers: np.ndarray) -> dict[int, np.ndarray]:
    return {int(z): np.flatnonzero(numbers == z) for z in np.unique(numbers)}


# ----------------------------------------------------------------------------
# Non-periodic alignment
# ----------------------------------------------------------------------------


def _assign(
    x: np.ndarray,
    y: np.ndarray,
    ref_species: dict[int, np.ndarray],
    cand_species: dict[int, np.ndarray],
) -> np.ndarray:
    """Hungarian matching of like atoms; returns ``perm`` with ``x[i] ~ y[perm[i]]``."""
    perm = np.empty(len(x), dtype=np.intp)
    for z, ref_idx in ref_species.items():
        cand_idx = cand_species[z]
        if len(ref_idx) == 1:
            perm[ref_idx[0]] = cand_idx[0]
            continue
        rows, cols = linear_sum_assignment(cdist(x[ref_idx], y[cand_idx], "sqeuclidean"))
        perm[ref_idx[rows]] = cand_idx[cols]
    return perm


def _like_atom_permutations(
    ref_species: dict[int, np.ndarray], cand_species: dict[int, np.ndarray], n: int
) -> np.ndarray:
    """All ``[P, N]`` permutations matching reference atoms to like candidate atoms."""
    per_species = [
        (ref_species[z], np.array(list(permutations(cand_species[z])), dtype=np.intp))
        for z in ref_species
    ]
    grids = np.meshgrid(*(np.arange(len(options)) for _, options in per_species), indexing="ij")
    perms = np.empty((grids[0].size, n), dtype=np.intp)
    for (ref_idx, options), grid in zip(per_species, grids):
        perms[:, ref_idx] = options[grid.ravel()]
    return perms


def _exhaustive(
    x: np.ndarray, y: np.ndarray, perms: np.ndarray, allow_reflection: bool
) -> tuple[float, np.ndarray, np.ndarray]:
    """Global optimum over all given permutations ``[P, N]`` of centred ``[N, 3]`` arrays.

    Uses ``min_R sum_i |x_i - R y_i|^2 = |x|^2 + |y|^2 - 2 (s1 + s2 +/- s3)`` with the
    singular values ``s`` of ``H = y^T x`` to rank the permutations, then a Kabsch step
    for the best one.
    """
    h = np.swapaxes(y[perms], 1, 2) @ x  # [P, 3, 3]
    squares = np.linalg.eigvalsh(np.swapaxes(h, 1, 2) @ h)  # ascending
    singular = np.sqrt(np.clip(squares, 0.0, None))
    third = singular[:, 0] if allow_reflection else np.sign(np.linalg.det(h)) * singular[:, 0]
    best = perms[int(np.argmax(singular[:, 1] + singular[:, 2] + third))]
    rotation = _kabsch(x, y[best], allow_reflection)
    rmsd = math.sqrt(np.sum((x - y[best] @ rotation.T) ** 2) / len(x))
    return rmsd, best, rotation


def _random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``[n, 3, 3]`` uniformly distributed proper rotations (from random unit quaternions)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, a, b, c = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (b * b + c * c), 2 * (a * b - c * w), 2 * (a * c + b * w)], -1),
            np.stack([2 * (a * b + c * w), 1 - 2 * (a * a + c * c), 2 * (b * c - a * w)], -1),
            np.stack([2 * (a * c - b * w), 2 * (b * c + a * w), 1 - 2 * (a * a + b * b)], -1),
        ],
        axis=1,
    )


def _starting_rotations(
    x: np.ndarray, y: np.ndarray, allow_reflection: bool, n_random: int, seed: int
) -> list[np.ndarray]:
    """Initial orientations: principal-axis matches (8 sign choices) and random rotations."""
    _, ex = np.linalg.eigh(x.T @ x)
    _, ey = np.linalg.eigh(y.T @ y)
    starts = []
    for signs in np.array(np.meshgrid([1.0, -1.0], [1.0, -1.0], [1.0, -1.0])).T.reshape(-1, 3):
        rotation = ex @ np.diag(signs) @ ey.T
        if allow_reflection or np.linalg.det(rotation) > 0.0:
            starts.append(rotation)
    if n_random > 0:
        mirror = np.diag([1.0, 1.0, -1.0])
        for rotation in _random_rotations(n_random, np.random.default_rng(seed)):
            starts.append(rotation)
            if allow_reflection:
                starts.append(rotation @ mirror)
    return starts


def _align_cluster(
    reference: Atoms,
    candidate: Atoms,
    allow_reflection: bool,
    n_random_starts: int,
    seed: int,
) -> Alignment:
    ref_pos = reference.positions
    cand_pos = candidate.positions
    ref_centre = ref_pos.mean(axis=0)
    x = ref_pos - ref_centre
    y = cand_pos - cand_pos.mean(axis=0)
    ref_species = _species_indices(reference.numbers)
    cand_species = _species_indices(candidate.numbers)
    n = len(x)

    best_rmsd = math.inf
    best_perm = np.arange(n)
    best_rotation = np.eye(3)
    seen: set[bytes] = set()
    for rotation in _starting_rotations(x, y, allow_reflection, n_random_starts, seed):
        perm = _assign(x, y @ rotation.T, ref_species, cand_species)
        if perm.tobytes() in seen:  # this assignment was already optimised from another start
            continue
        for _ in range(_MAX_ITERATIONS):
            rotation = _kabsch(x, y[perm], allow_reflection)
            moved = y @ rotation.T
            rmsd = math.sqrt(np.sum((x - moved[perm]) ** 2) / n)
            if rmsd < best_rmsd:
                best_rmsd, best_perm, best_rotation = rmsd, perm, rotation
            new_perm = _assign(x, moved, ref_species, cand_species)
            if np.array_equal(new_perm, perm):
                break
            key = new_perm.tobytes()
            if key in seen:  # this assignment was already optimised from another start
                break
            seen.add(perm.tobytes())
            perm = new_perm
        seen.add(perm.tobytes())
        if best_rmsd < _EXACT_RMSD:
            break

    n_perms = math.prod(math.factorial(len(idx)) for idx in ref_species.values())
    if best_rmsd >= _EXACT_RMSD and n_perms <= _EXHAUSTIVE_LIMIT:
        rmsd, perm, rotation = _exhaustive(
            x, y, _like_atom_permutations(ref_species, cand_species, n), allow_reflection
        )
        if rmsd < best_rmsd:
            best_rmsd, best_perm, best_rotation = rmsd, perm, rotation

    aligned = y[best_perm] @ best_rotation.T + ref_centre
    return _frozen_alignment(
        best_rmsd, best_perm, best_rotation, bool(np.linalg.det(best_rotation) < 0.0), aligned
    )


def _frozen_alignment(
    rmsd: float, perm: np.ndarray, rotation: np.ndarray, reflected: bool, aligned: np.ndarray
) -> Alignment:
    perm = np.array(perm, dtype=np.intp)
    rotation = np.array(rotation, dtype=float)
    aligned = np.array(aligned, dtype=float)
    for array in (perm, rotation, aligned):
        array.setflags(write=False)
    return Alignment(
        rmsd=float(rmsd),
        permutation=perm,
        rotation=rotation,
        reflected=reflected,
        aligned_positions=aligned,
    )


# ----------------------------------------------------------------------------
# Periodic alignment
# ----------------------------------------------------------------------------


def _check_periodic_pair(reference: Atoms, candidate: Atoms) -> None:
    if not np.array_equal(reference.pbc, candidate.pbc):
        raise StructreconError(
            f"periodicity mismatch: reference pbc is {reference.pbc.tolist()}, "
            f"candidate pbc is {candidate.pbc.tolist()}"
        )
    difference = np.max(np.abs(reference.cell.array - candidate.cell.array))
    if difference > _CELL_TOLERANCE:
        raise StructreconError(
            f"cells differ by up to {difference:.3g} Angstrom; periodic alignment needs equal cells"
        )
    lengths = np.linalg.norm(reference.cell.array, axis=1)
    if np.any(lengths[reference.pbc] <= 0.0) or (
        reference.pbc.all() and abs(np.linalg.det(reference.cell.array)) < 1e-12
    ):
        raise StructreconError("periodic structure has a degenerate cell")


def _mic_vectors(vectors: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """Minimum-image versions of ``[..., 3]`` displacement vectors (Angstrom)."""
    shape = vectors.shape
    mic, _ = find_mic(vectors.reshape(-1, 3), cell, pbc)
    return mic.reshape(shape)


class _Wrapper:
    """Cheap periodic wrapping in fractional coordinates of a Minkowski-reduced cell.

    Rounding the fractional coordinates of a displacement gives its minimum image
    whenever that image is shorter than half the smallest cell height, i.e. for
    every displacement that matters when matching nearby atoms; longer ones come
    out too long, never too short.
    """

    def __init__(self, cell: np.ndarray, pbc: np.ndarray) -> None:
        reduced, _ = minkowski_reduce(cell, pbc=pbc)
        self.cell = complete_cell(reduced)
        self.inverse = np.linalg.inv(self.cell)
        self.metric = self.cell @ self.cell.T
        self.pbc = np.asarray(pbc, dtype=bool)

    def fractional(self, vectors: np.ndarray) -> np.ndarray:
        """Fractional coordinates ``[..., 3]`` of Cartesian vectors ``[..., 3]``."""
        return vectors @ self.inverse

    def squared_lengths(self, fractional: list[np.ndarray], shift: np.ndarray) -> np.ndarray:
        """Squared wrapped lengths (Angstrom^2) of ``fractional - shift``.

        ``fractional`` holds the three fractional components as separate arrays of
        one shape; ``shift`` is a fractional vector ``[3]``.
        """
        wrapped = []
        for axis in range(3):
            component = fractional[axis] - shift[axis]
            if self.pbc[axis]:
                component -= np.rint(component)
            wrapped.append(component)
        metric = self.metric
        result = metric[0, 0] * wrapped[0] ** 2
        result += metric[1, 1] * wrapped[1] ** 2
        result += metric[2, 2] * wrapped[2] ** 2
        for a, b in ((0, 1), (0, 2), (1, 2)):
            if metric[a, b] != 0.0:
                result += 2.0 * metric[a, b] * wrapped[a] * wrapped[b]
        return result


def _align_periodic(reference: Atoms, candidate: Atoms) -> Alignment:
    _check_periodic_pair(reference, candidate)
    cell = reference.cell.array
    pbc = reference.pbc
    p = reference.positions
    q = candidate.positions
    n = len(p)
    ref_species = _species_indices(reference.numbers)
    cand_species = _species_indices(candidate.numbers)
    wrapper = _Wrapper(cell, pbc)
    # Fractional reference-candidate differences per species: 3 arrays [n_z, n_z].
    frac_p = wrapper.fractional(p)
    frac_q = wrapper.fractional(q)
    differences = {
        z: [
            np.subtract.outer(frac_p[ref_idx, axis], frac_q[cand_species[z], axis])
            for axis in range(3)
        ]
        for z, ref_idx in ref_species.items()
    }

    def costs(shift: np.ndarray) -> dict[int, np.ndarray]:
        fractional_shift = wrapper.fractional(shift)
        return {z: wrapper.squared_lengths(d, fractional_shift) for z, d in differences.items()}

    def assign(cost: dict[int, np.ndarray]) -> np.ndarray:
        perm = np.empty(n, dtype=np.intp)
        for z, ref_idx in ref_species.items():
            rows, cols = linear_sum_assignment(cost[z])
            perm[ref_idx[rows]] = cand_species[z][cols]
        return perm

    # Trial translations put one reference atom of the rarest species onto each
    # candidate atom of that species.  They are visited in order of a lower bound
    # on their assignment cost (sum of row minima), so that an exact match is met
    # first and ends the search; a trial whose assignment was already refined from
    # another trial is skipped.
    anchor_z = min(ref_species, key=lambda z: (len(ref_species[z]), z))
    anchor = ref_species[anchor_z][0]
    shifts = p[anchor] - q[cand_species[anchor_z]]
    bounds = [sum(float(c.min(axis=1).sum()) for c in costs(shift).values()) for shift in shifts]

    best_sumsq = math.inf
    best_perm = np.arange(n)
    best_residual = np.zeros((n, 3))
    seen: set[bytes] = set()
    for trial in np.argsort(bounds, kind="stable"):
        if best_sumsq < n * _EXACT_RMSD**2:
            break
        shift = shifts[trial]
        perm = assign(costs(shift))
        for _ in range(_PERIODIC_REFINEMENTS):
            if perm.tobytes() in seen:
                break
            seen.add(perm.tobytes())
            residual = _mic_vectors(p - (q[perm] + shift), cell, pbc)
            shift = shift + residual.mean(axis=0)
            residual = _mic_vectors(p - (q[perm] + shift), cell, pbc)
            sumsq = float(np.sum(residual**2))
            if sumsq < best_sumsq:
                best_sumsq, best_perm, best_residual = sumsq, perm, residual
            new_perm = assign(costs(shift))
            if np.array_equal(new_perm, perm):
                break
            perm = new_perm

    rmsd = math.sqrt(best_sumsq / n)
    return _frozen_alignment(rmsd, best_perm, np.eye(3), False, p - best_residual)


# ----------------------------------------------------------------------------
# Public alignment API
# ----------------------------------------------------------------------------


def align(
    reference: Atoms,
    candidate: Atoms,
    *,
    allow_reflection: bool = True,
    n_random_starts: int = 16,
    seed: int = 0,
) -> Alignment:
    """Superimpose ``candidate`` onto ``reference`` with the lowest RMSD.

    For clusters and molecules (no periodic direction) this minimises

    ``RMSD = sqrt(mean_i |r_ref_i - (R r_cand_perm(i) + t)|^2)``

    over orthogonal ``R`` (proper rotations, plus reflections when
    ``allow_reflection``), translations ``t`` and permutations ``perm`` that only
    exchange atoms of the same atomic number.  Both structures are centred on
    their centroids; from several starting orientations (principal-axis frames
    with all 8 axis-sign choices, and ``n_random_starts`` random rotations, each
    also mirrored when reflections are allowed) the method alternates a
    per-species Hungarian assignment on squared distances with an orthogonal
    Procrustes (Kabsch) superposition until the assignment stops changing, and
    keeps the best result.  Unless that result is already exact, small
    clusters with at most 5040 like-atom permutations are then also searched
    exhaustively (one Kabsch superposition per permutation), which guarantees
    the global optimum for them.  An exact copy (rotated, reflected, translated and
    permuted) is recovered to round-off.

    For periodic structures (some ``pbc`` true; both must have the same
    ``pbc`` and the same cell to 1e-6 Angstrom) no rotation is applied: trial
    translations bring one reference atom of the rarest species onto each
    candidate atom of that species, the assignment uses minimum-image squared
    distances, the translation is refined to the mean minimum-image
    displacement (alternating with the assignment), and the best result is
    returned with ``rotation`` equal to the identity; ``allow_reflection``,
    ``n_random_starts`` and ``seed`` are then unused.

    Parameters
    ----------
    reference, candidate : ase.Atoms
        Structures with ``N`` atoms each and the same composition; positions in
        Angstrom.
    allow_reflection : bool, optional
        Allow improper rotations (mirror images).  Default True.
    n_random_starts : int, optional
        Number of random starting rotations (clusters only).  Default 16.
    seed : int, optional
        Seed of the random starting rotations.  Default 0.

    Returns
    -------
    Alignment
        RMSD (Angstrom), permutation ``[N]``, rotation ``[3, 3]``, reflection
        flag and aligned candidate positions ``[N, 3]`` (Angstrom).

    Raises
    ------
    StructreconError
        If either structure is empty, the compositions differ, only one is
        periodic, or the periodic cells differ.
    """
    reference, candidate = _check_pair(reference, candidate)
    if n_random_starts < 0:
        raise StructreconError(f"n_random_starts must be >= 0, got {n_random_starts}")
    ref_periodic, cand_periodic = _is_periodic(reference), _is_periodic(candidate)
    if ref_periodic != cand_periodic:
        raise StructreconError(
            "cannot align a periodic structure with a non-periodic one "
            f"(reference pbc {reference.pbc.tolist()}, candidate pbc {candidate.pbc.tolist()})"
        )
    if ref_periodic:
        return _align_periodic(reference, candidate)
    return _align_cluster(reference, candidate, allow_reflection, n_random_starts, seed)


def structure_rmsd(reference: Atoms, candidate: Atoms, *, allow_reflection: bool = True) -> float:
    """RMSD in Angstrom after the best superposition; see :func:`align`.

    Parameters
    ----------
    reference, candidate : ase.Atoms
        Structures with the same composition (``N`` atoms each).
    allow_reflection : bool, optional
        Allow mirror images.  Default True.

    Returns
    -------
    float
        The minimal RMSD, in Angstrom.
    """
    return align(reference, candidate, allow_reflection=allow_reflection).rmsd


# ----------------------------------------------------------------------------
# Geometric distributions
# ----------------------------------------------------------------------------


def _displacements(atoms: Atoms) -> np.ndarray:
    """``[N, N, 3]`` vectors ``r_j - r_i`` (minimum image if periodic), Angstrom."""
    n = len(atoms)
    pos = atoms.positions
    vectors = pos[None, :, :] - pos[:, None, :]
    if _is_periodic(atoms) and n > 1:
        vectors = _mic_vectors(vectors, atoms.cell.array, atoms.pbc)
    return vectors


def pair_distances(atoms: Atoms, species: tuple[int, int] | None = None) -> np.ndarray:
    """Distances between all atom pairs ``i < j``.

    Parameters
    ----------
    atoms : ase.Atoms
        Structure with ``N`` atoms; minimum-image distances are used when any
        ``pbc`` is true.
    species : tuple of int, optional
        Atomic numbers ``(Z1, Z2)``; if given, keep only pairs whose unordered
        species pair is ``{Z1, Z2}``.

    Returns
    -------
    numpy.ndarray
        1-D float array of distances in Angstrom, of length ``N (N - 1) / 2``
        without ``species``, ordered by ``i`` then ``j``.
    """
    atoms = _check_atoms(atoms, "atoms")
    n = len(atoms)
    if n < 2:
        return np.zeros(0)
    vectors = _displacements(atoms)
    i, j = np.triu_indices(n, 1)
    distances = np.linalg.norm(vectors[i, j], axis=1)
    if species is not None:
        if len(species) != 2:
            raise StructreconError(f"species must be a pair of atomic numbers, got {species!r}")
        a, b = int(species[0]), int(species[1])
        zi, zj = atoms.numbers[i], atoms.numbers[j]
        distances = distances[((zi == a) & (zj == b)) | ((zi == b) & (zj == a))]
    return distances


def bond_angles(atoms: Atoms, *, cutoff: float | None = None) -> np.ndarray:
    """Angles ``j-i-k`` at every centre ``i`` over unordered neighbour pairs.

    Without ``cutoff`` every other atom is a neighbour, so for a molecule these
    are the angles of all atom triplets (``N (N-1) (N-2) / 2`` values).  For
    periodic structures only the minimum image of each neighbour is used, so a
    cutoff should stay below half the shortest cell height.  Neighbours that
    coincide with the centre (distance 0) are ignored.

    Parameters
    ----------
    atoms : ase.Atoms
        Structure with ``N`` atoms, positions in Angstrom.
    cutoff : float, optional
        Only atoms within this distance (Angstrom, inclusive) of the centre are
        neighbours.

    Returns
    -------
    numpy.ndarray
        1-D float array of angles in degrees, in ``[0, 180]``, ordered by
        centre ``i`` then neighbour pair ``j < k``.
    """
    atoms = _check_atoms(atoms, "atoms")
    if cutoff is not None and not cutoff > 0.0:
        raise StructreconError(f"cutoff must be a positive distance in Angstrom, got {cutoff}")
    n = len(atoms)
    if n < 3:
        return np.zeros(0)
    vectors = _displacements(atoms)
    lengths = np.linalg.norm(vectors, axis=2)
    angles = []
    for i in range(n):
        mask = lengths[i] > 0.0
        mask[i] = False
        if cutoff is not None:
            mask &= lengths[i] <= cutoff
        if np.count_nonzero(mask) < 2:
            continue
        units = vectors[i, mask] / lengths[i, mask, None]
        j, k = np.triu_indices(len(units), 1)
        cosines = np.einsum("ij,ij->i", units[j], units[k])
        angles.append(np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0))))
    return np.concatenate(angles) if angles else np.zeros(0)


def _sample(values: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=float).ravel()
    if values.size == 0:
        raise StructreconError(f"{name} is an empty sample")
    if not np.all(np.isfinite(values)):
        raise StructreconError(f"{name} contains non-finite values")
    return values


def distribution_distance(
    a: np.ndarray,
    b: np.ndarray,
    *,
    bins: int = 100,
    range: tuple[float, float] | None = None,  # noqa: A002 - public keyword
) -> float:
    """Histogram distance between two samples, from 0 (identical) to 1 (disjoint).

    Both samples are binned on shared bins and normalised to unit mass; the
    result is half the L1 distance between the two histograms (the total
    variation distance of the binned distributions).  When ``range`` is given,
    values below or above it are counted in an underflow and an overflow bin, so
    the result stays in ``[0, 1]``.

    Parameters
    ----------
    a, b : numpy.ndarray
        Samples (any shape, flattened), e.g. distances in Angstrom or angles in
        degrees.  Must be non-empty and finite.
    bins : int, optional
        Number of bins.  Default 100.
    range : tuple of float, optional
        ``(low, high)`` of the bins, in the samples' unit; by default the range
        covering both samples.

    Returns
    -------
    float
        Distance in ``[0, 1]``.
    """
    a = _sample(a, "first sample")
    b = _sample(b, "second sample")
    if int(bins) != bins or bins < 1:
        raise StructreconError(f"bins must be a positive integer, got {bins!r}")
    if range is None:
        low = min(a.min(), b.min())
        high = max(a.max(), b.max())
        if high <= low:
            low, high = low - 0.5, high + 0.5
    else:
        low, high = float(range[0]), float(range[1])
        if not high > low:
            raise StructreconError(f"range must satisfy low < high, got {range!r}")
    edges = np.concatenate(([-np.inf], np.linspace(low, high, int(bins) + 1), [np.inf]))
    p = np.histogram(a, bins=edges)[0] / a.size
    q = np.histogram(b, bins=edges)[0] / b.size
    return float(0.5 * np.abs(p - q).sum())


def wasserstein(a: np.ndarray, b: np.ndarray) -> float:
    """First Wasserstein (earth mover's) distance between two 1-D samples.

    Parameters
    ----------
    a, b : numpy.ndarray
        Non-empty finite samples (flattened), e.g. distances in Angstrom or
        angles in degrees.

    Returns
    -------
    float
        The distance, in the samples' unit.
    """
    return float(wasserstein_distance(_sample(a, "first sample"), _sample(b, "second sample")))


# ----------------------------------------------------------------------------
# Set comparison and plots
# ----------------------------------------------------------------------------


def _pair_label(a: int, b: int) -> str:
    return "-".join(sorted((chemical_symbols[a], chemical_symbols[b])))


def _species_pairs(structures: list[Atoms]) -> list[tuple[int, int]]:
    present = sorted({int(z) for atoms in structures for z in atoms.numbers})
    return list(combinations_with_replacement(present, 2))


def _check_set(structures: object, name: str) -> list[Atoms]:
    if isinstance(structures, Atoms) or not hasattr(structures, "__len__"):
        raise StructreconError(f"{name} must be a list of ase.Atoms")
    structures = list(structures)
    for index, atoms in enumerate(structures):
        _check_atoms(atoms, f"{name}[{index}]")
    return structures


def _check_sets(references: object, candidates: object) -> tuple[list[Atoms], list[Atoms]]:
    references = _check_set(references, "references")
    candidates = _check_set(candidates, "candidates")
    if not references:
        raise StructreconError("references is empty")
    if len(references) != len(candidates):
        raise StructreconError(
            f"got {len(references)} references but {len(candidates)} candidates; "
            "frames are compared pairwise"
        )
    return references, candidates


def _collect(structures: list[Atoms], function, *args) -> np.ndarray:
    parts = [function(atoms, *args) for atoms in structures]
    return np.concatenate(parts) if parts else np.zeros(0)


def _distances_or_nan(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    if a.size == 0 or b.size == 0:
        return math.nan, math.nan
    return distribution_distance(a, b), wasserstein(a, b)


def compare_sets(
    references: list[Atoms],
    candidates: list[Atoms],
    *,
    allow_reflection: bool = True,
) -> dict:
    """Compare reconstructed structures with their references, frame by frame and as sets.

    Parameters
    ----------
    references, candidates : list of ase.Atoms
        Equally long lists; ``candidates[i]`` is compared with ``references[i]``
        and must have the same composition.
    allow_reflection : bool, optional
        Allow mirror images in the per-frame RMSD.  Default True.

    Returns
    -------
    dict
        ``"rmsd"``: list of per-frame RMSDs (Angstrom);
        ``"rmsd_mean"``: their mean (Angstrom);
        ``"pair_distance_distance"`` and ``"angle_distance"``: histogram
        distances (:func:`distribution_distance`, in ``[0, 1]``) between the
        pooled pair distances, and between the pooled all-triplet bond angles,
        of the two sets;
        ``"pair_wasserstein"`` (Angstrom) and ``"angle_wasserstein"`` (degrees):
        the corresponding Wasserstein distances;
        ``"partial_pair_distance"``: dict mapping a species pair label such as
        ``"C-H"`` (symbols in alphabetical order) to the histogram distance of
        that partial pair-distance distribution.  Undefined values (no angles,
        or no pairs of a kind) are NaN or left out of the partial dict.
    """
    references, candidates = _check_sets(references, candidates)
    rmsds = [
        structure_rmsd(ref, cand, allow_reflection=allow_reflection)
        for ref, cand in zip(references, candidates)
    ]
    ref_pairs = _collect(references, pair_distances)
    cand_pairs = _collect(candidates, pair_distances)
    pair_hist, pair_w = _distances_or_nan(ref_pairs, cand_pairs)
    angle_hist, angle_w = _distances_or_nan(
        _collect(references, bond_angles), _collect(candidates, bond_angles)
    )
    partial = {}
    for a, b in _species_pairs(references + candidates):
        ref_part = _collect(references, pair_distances, (a, b))
        cand_part = _collect(candidates, pair_distances, (a, b))
        if ref_part.size and cand_part.size:
            partial[_pair_label(a, b)] = distribution_distance(ref_part, cand_part)
    return {
        "rmsd": rmsds,
        "rmsd_mean": float(np.mean(rmsds)),
        "pair_distance_distance": pair_hist,
        "angle_distance": angle_hist,
        "pair_wasserstein": pair_w,
        "angle_wasserstein": angle_w,
        "partial_pair_distance": partial,
    }


def _new_figure(n_panels: int, panel_size: tuple[float, float] = (4.0, 3.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(3, n_panels)
    nrows = math.ceil(n_panels / ncols)
    figure = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for axis in axes[n_panels:]:
        axis.set_visible(False)
    return figure, axes[:n_panels]


def _step_histograms(
    axis, samples: list[np.ndarray], labels: list[str], bins: int, span=None, first_colour=0
):
    present = [s for s in samples if s.size]
    if not present:
        axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes)
        return
    if span is None:
        low = min(s.min() for s in present)
        high = max(s.max() for s in present)
        if high <= low:
            low, high = low - 0.5, high + 0.5
    else:
        low, high = span
    edges = np.linspace(low, high, bins + 1)
    for index, (sample, label) in enumerate(zip(samples, labels)):
        if sample.size:
            colour = f"C{first_colour + index}"
            axis.hist(sample, bins=edges, histtype="step", density=True, label=label, color=colour)
    axis.legend(fontsize="small")


def plot_distributions(
    references: list[Atoms],
    candidates: list[Atoms],
    out_dir,
    *,
    labels: tuple[str, ...] = ("reference", "reconstructed"),
    starts: list[Atoms] | None = None,
) -> list[pathlib.Path]:
    """Plot pair-distance, bond-angle and RMSD distributions of two (or three) sets.

    Writes three PNG files into ``out_dir`` (created if needed):
    ``pair_distances.png`` (step histograms of all pair distances and of each
    partial species-pair distribution that has pairs, one panel each), ``angles.png``
    (all-triplet bond angles) and ``rmsd.png`` (per-frame RMSD to the
    references).  Figures are drawn with matplotlib's Agg canvas directly, so
    the global pyplot backend is neither needed nor changed.

    Parameters
    ----------
    references, candidates : list of ase.Atoms
        Equally long lists of structures (Angstrom); frame ``i`` of each is
        paired for the RMSD.
    out_dir : str or os.PathLike
        Output directory.
    labels : tuple of str, optional
        Legend labels of the references and candidates, and optionally a third
        label for ``starts`` (default ``"start"``).
    starts : list of ase.Atoms, optional
        A third set, e.g. the starting structures of the reconstruction,
        overlaid on every plot; must be as long as ``references``.

    Returns
    -------
    list of pathlib.Path
        The files written.
    """
    references, candidates = _check_sets(references, candidates)
    sets = [references, candidates]
    if starts is not None:
        _, starts = _check_sets(references, starts)
        sets.append(starts)
    labels = [str(label) for label in labels]
    if len(labels) < 2:
        raise StructreconError(f"labels needs at least two entries, got {len(labels)}")
    if len(sets) == 3 and len(labels) < 3:
        labels.append("start")
    labels = labels[: len(sets)]

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    partials = {}
    for a, b in _species_pairs([atoms for group in sets for atoms in group]):
        samples = [_collect(s, pair_distances, (a, b)) for s in sets]
        if any(sample.size for sample in samples):
            partials[_pair_label(a, b)] = samples
    figure, axes = _new_figure(1 + len(partials))
    _step_histograms(axes[0], [_collect(s, pair_distances) for s in sets], labels, 100)
    axes[0].set_title("all pairs")
    for axis, (label, samples) in zip(axes[1:], partials.items()):
        _step_histograms(axis, samples, labels, 60)
        axis.set_title(label)
    for axis in axes:
        axis.set_xlabel("distance (Angstrom)")
        axis.set_ylabel("density")
    written.append(out / "pair_distances.png")
    figure.savefig(written[-1], dpi=100)

    figure, axes = _new_figure(1, (6.0, 4.0))
    _step_histograms(axes[0], [_collect(s, bond_angles) for s in sets], labels, 90, (0.0, 180.0))
    axes[0].set_xlabel("angle (degrees)")
    axes[0].set_ylabel("density")
    axes[0].set_title("bond angles (all triplets)")
    written.append(out / "angles.png")
    figure.savefig(written[-1], dpi=100)

    figure, axes = _new_figure(1, (6.0, 4.0))
    rmsd_sets = [
        np.array([structure_rmsd(ref, other) for ref, other in zip(references, group)])
        for group in sets[1:]
    ]
    _step_histograms(axes[0], rmsd_sets, labels[1:], 30, first_colour=1)
    axes[0].set_xlabel("RMSD to reference (Angstrom)")
    axes[0].set_ylabel("density")
    axes[0].set_title("per-frame RMSD")
    written.append(out / "rmsd.png")
    figure.savefig(written[-1], dpi=100)
    return written
