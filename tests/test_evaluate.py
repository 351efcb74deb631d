"""Tests of structure comparison: alignment RMSD and geometric distributions."""

import itertools
import math

import numpy as np
import pytest
from ase import Atoms

from structrecon._errors import StructreconError
from structrecon.evaluate import (
    Alignment,
    align,
    bond_angles,
    compare_sets,
    distribution_distance,
    pair_distances,
    plot_distributions,
    structure_rmsd,
    wasserstein,
)


def _random_cluster(rng, numbers, box=4.0, min_distance=0.9):
    """Random positions in a cube with no two atoms closer than ``min_distance``."""
    positions = []
    while len(positions) < len(numbers):
        trial = rng.uniform(0.0, box, 3)
        if all(np.linalg.norm(trial - p) >= min_distance for p in positions):
            positions.append(trial)
    return Atoms(numbers=numbers, positions=np.array(positions))


def _orthogonal(rng, improper):
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    if (np.linalg.det(q) < 0) != improper:
        q[:, 0] *= -1.0
    return q


def _transformed_copy(atoms, rotation, translation, order):
    """Copy with positions ``R r + t`` whose atom ``k`` is original atom ``order[k]``."""
    positions = atoms.positions @ rotation.T + translation
    return Atoms(numbers=atoms.numbers[order], positions=positions[order])


def _kabsch_rmsd(x, y, allow_reflection):
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    u, _, vt = np.linalg.svd(y.T @ x)
    d = 1.0 if allow_reflection else np.sign(np.linalg.det(vt.T @ u.T))
    rotation = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return math.sqrt(np.mean(np.sum((x - y @ rotation.T) ** 2, axis=1)))


def _chiral_molecule():
    """Tetrahedral centre with four different substituents at different distances."""
    directions = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / math.sqrt(3)
    lengths = np.array([1.1, 1.4, 1.8, 2.0])
    positions = np.vstack([[0.0, 0.0, 0.0], directions * lengths[:, None]])
    return Atoms(numbers=[6, 1, 9, 17, 35], positions=positions)


def test_exact_recovery_of_rotated_reflected_translated_permuted_cluster():
    rng = np.random.default_rng(11)
    reference = _random_cluster(rng, [6] * 6 + [1] * 6)
    rotation = _orthogonal(rng, improper=True)
    order = rng.permutation(len(reference))
    candidate = _transformed_copy(reference, rotation, [3.0, -2.0, 7.5], order)

    result = align(reference, candidate)

    assert isinstance(result, Alignment)
    assert result.rmsd < 1e-8
    np.testing.assert_array_equal(result.permutation, np.argsort(order))
    assert result.reflected
    assert np.linalg.det(result.rotation) == pytest.approx(-1.0)
    np.testing.assert_allclose(result.rotation @ result.rotation.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(result.rotation, rotation.T, atol=1e-8)
    np.testing.assert_allclose(result.aligned_positions, reference.positions, atol=1e-8)
    np.testing.assert_array_equal(candidate.numbers[result.permutation], reference.numbers)


def test_exact_recovery_of_larger_single_species_cluster_with_proper_rotation():
    rng = np.random.default_rng(3)
    reference = _random_cluster(rng, [29] * 25, box=6.0)
    order = rng.permutation(len(reference))
    candidate = _transformed_copy(reference, _orthogonal(rng, improper=False), [1, 2, 3], order)

    result = align(reference, candidate, allow_reflection=False)

    assert result.rmsd < 1e-8
    assert not result.reflected
    np.testing.assert_array_equal(result.permutation, np.argsort(order))


def test_mirror_image_of_chiral_molecule_needs_reflection():
    reference = _chiral_molecule()
    mirror = reference.copy()
    mirror.positions[:, 0] *= -1.0

    assert structure_rmsd(reference, mirror, allow_reflection=False) > 0.1
    assert structure_rmsd(reference, mirror, allow_reflection=True) < 1e-8
    assert align(reference, mirror).reflected


def test_single_displaced_atom_gives_analytic_rmsd_bound():
    rng = np.random.default_rng(5)
    reference = _random_cluster(rng, [8] * 5 + [1] * 5, box=5.0, min_distance=1.2)
    candidate = reference.copy()
    direction = rng.normal(size=3)
    candidate.positions[4] += 0.3 * direction / np.linalg.norm(direction)

    rmsd = structure_rmsd(reference, candidate)

    # Best translation alone gives 0.3 * sqrt((1 - 1/N) / N); rotation can only lower it.
    translation_only = 0.3 * math.sqrt((1.0 - 1.0 / 10) / 10)
    assert 0.0 < rmsd <= translation_only + 1e-12
    assert rmsd > 0.5 * translation_only


@pytest.mark.parametrize("allow_reflection", [True, False])
def test_alignment_matches_brute_force_over_all_permutations(allow_reflection):
    rng = np.random.default_rng(7)
    numbers = np.array([1, 1, 1, 6, 6])
    for trial in range(6):
        reference = _random_cluster(rng, numbers, box=3.0, min_distance=0.8)
        if trial % 2:
            candidate = _random_cluster(rng, numbers, box=3.0, min_distance=0.8)
        else:
            candidate = reference.copy()
            candidate.positions += rng.normal(scale=0.4, size=(5, 3))
        candidate.positions = candidate.positions @ _orthogonal(rng, bool(trial % 3)).T

        brute = min(
            _kabsch_rmsd(reference.positions, candidate.positions[list(p)], allow_reflection)
            for p in itertools.permutations(range(5))
            if np.array_equal(numbers[list(p)], numbers)
        )
        result = align(reference, candidate, allow_reflection=allow_reflection)

        assert result.rmsd <= brute + 1e-9
        assert result.rmsd >= brute - 1e-9
        # The reported alignment reproduces the reported RMSD.
        deviation = result.aligned_positions - reference.positions
        assert math.sqrt(np.mean(np.sum(deviation**2, axis=1))) == pytest.approx(result.rmsd)


def test_composition_mismatch_and_empty_structures_raise():
    water = Atoms("H2O", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0]])
    methane_like = Atoms("CH2", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0]])
    with pytest.raises(StructreconError, match="H2O.*CH2"):
        align(water, methane_like)
    with pytest.raises(StructreconError, match="empty"):
        align(Atoms(), Atoms())
    with pytest.raises(StructreconError):
        structure_rmsd(water, water[:2])


def test_periodic_translated_permuted_wrapped_copy_gives_zero():
    rng = np.random.default_rng(2)
    cell = np.array([[7.0, 0.0, 0.0], [1.5, 8.0, 0.0], [0.5, -1.0, 9.0]])
    numbers = rng.choice([8, 14], size=12)
    reference = Atoms(numbers=numbers, scaled_positions=rng.uniform(size=(12, 3)), cell=cell)
    reference.pbc = True
    order = rng.permutation(12)
    candidate = Atoms(
        numbers=numbers[order],
        positions=(reference.positions + [3.3, -7.1, 12.2])[order],
        cell=cell,
        pbc=True,
    )
    candidate.wrap()

    result = align(reference, candidate)

    assert result.rmsd < 1e-8
    np.testing.assert_array_equal(result.permutation, np.argsort(order))
    np.testing.assert_array_equal(result.rotation, np.eye(3))
    assert not result.reflected
    np.testing.assert_allclose(result.aligned_positions, reference.positions, atol=1e-8)

    # A small rattle is recovered with the known correspondence.
    rattled = candidate.copy()
    rattled.rattle(0.05, seed=4)
    displacement = rattled.positions - candidate.positions
    displacement -= displacement.mean(axis=0)
    expected = math.sqrt(np.mean(np.sum(displacement**2, axis=1)))
    assert structure_rmsd(reference, rattled) == pytest.approx(expected, abs=1e-9)

    other_cell = candidate.copy()
    other_cell.set_cell(cell * 1.01)
    with pytest.raises(StructreconError, match="cell"):
        align(reference, other_cell)
    cluster = candidate.copy()
    cluster.pbc = False
    with pytest.raises(StructreconError, match="periodic"):
        align(reference, cluster)


def test_pair_distances_match_ase():
    rng = np.random.default_rng(8)
    cluster = _random_cluster(rng, [6, 6, 6, 1, 1, 8, 8])
    n = len(cluster)
    distances = pair_distances(cluster)
    assert distances.shape == (n * (n - 1) // 2,)
    i, j = np.triu_indices(n, 1)
    np.testing.assert_allclose(distances, cluster.get_all_distances()[i, j], atol=1e-12)
    assert pair_distances(cluster, (1, 6)).size == 2 * 3
    assert pair_distances(cluster, (6, 1)).size == 2 * 3
    assert pair_distances(cluster, (8, 8)).size == 1

    periodic = cluster.copy()
    periodic.set_cell([3.0, 3.5, 4.0])
    periodic.pbc = True
    np.testing.assert_allclose(
        pair_distances(periodic), periodic.get_all_distances(mic=True)[i, j], atol=1e-12
    )
    assert pair_distances(periodic).max() < pair_distances(cluster).max()


def test_bond_angles_of_water_like_triangle():
    angle = math.radians(104.5)
    water = Atoms(
        "OH2",
        positions=[[0, 0, 0], [0.96, 0, 0], [0.96 * math.cos(angle), 0.96 * math.sin(angle), 0]],
    )
    angles = np.sort(bond_angles(water))
    half = (180.0 - 104.5) / 2
    np.testing.assert_allclose(angles, [half, half, 104.5], atol=1e-10)
    np.testing.assert_allclose(bond_angles(water, cutoff=1.0), [104.5], atol=1e-10)
    assert bond_angles(water[:2]).size == 0

    rng = np.random.default_rng(1)
    cluster = _random_cluster(rng, [6] * 6)
    assert bond_angles(cluster).size == 6 * 5 * 4 // 2


def test_distribution_distance_and_wasserstein():
    rng = np.random.default_rng(0)
    a = rng.normal(size=500)
    assert distribution_distance(a, a.copy()) == 0.0
    assert distribution_distance(a, a + 100.0) == pytest.approx(1.0)
    assert distribution_distance([0.0, 0.0], [1.0, 1.0], bins=10) == pytest.approx(1.0)
    # Half of the mass moved to a disjoint region.
    assert distribution_distance([0.1, 0.1], [0.1, 0.9], bins=2, range=(0, 1)) == 0.5
    # Values outside an explicit range still count (overflow bin).
    assert distribution_distance([0.5], [5.0], range=(0.0, 1.0)) == pytest.approx(1.0)
    assert 0.0 < distribution_distance(a, rng.normal(size=500)) < 0.5

    assert wasserstein(a, a) == pytest.approx(0.0, abs=1e-12)
    assert wasserstein(a, a + 2.0) == pytest.approx(2.0)
    with pytest.raises(StructreconError):
        distribution_distance([], [1.0])
    with pytest.raises(StructreconError):
        distribution_distance([1.0], [2.0], range=(1.0, 1.0))


def test_compare_sets_reports_rmsd_and_distribution_distances():
    rng = np.random.default_rng(4)
    references = [_random_cluster(rng, [6, 6, 1, 1, 1]) for _ in range(3)]
    copies = [
        _transformed_copy(ref, _orthogonal(rng, True), rng.normal(size=3), rng.permutation(5))
        for ref in references
    ]
    result = compare_sets(references, copies)
    assert len(result["rmsd"]) == 3
    assert max(result["rmsd"]) < 1e-8
    assert result["pair_wasserstein"] == pytest.approx(0.0, abs=1e-9)
    assert result["angle_wasserstein"] == pytest.approx(0.0, abs=1e-6)
    # Round-off can move a value across a bin edge, so histograms agree only nearly.
    assert result["pair_distance_distance"] <= 0.1
    assert result["angle_distance"] <= 0.1
    assert set(result["partial_pair_distance"]) == {"C-C", "C-H", "H-H"}

    same = compare_sets(references, [ref.copy() for ref in references])
    assert max(same["rmsd"]) < 1e-12
    assert same["pair_distance_distance"] == 0.0
    assert same["angle_distance"] == 0.0
    assert all(v == 0.0 for v in same["partial_pair_distance"].values())

    shuffled = [_random_cluster(rng, [6, 6, 1, 1, 1], box=8.0) for _ in range(3)]
    different = compare_sets(references, shuffled)
    assert min(different["rmsd"]) > 0.1
    assert different["pair_distance_distance"] > 0.2
    assert different["pair_wasserstein"] > 0.3

    with pytest.raises(StructreconError):
        compare_sets(references, copies[:2])


def test_plot_distributions_writes_png_files(tmp_path):
    rng = np.random.default_rng(6)
    references = [_random_cluster(rng, [8, 1, 1, 6]) for _ in range(4)]
    candidates = [ref.copy() for ref in references]
    for atoms in candidates:
        atoms.rattle(0.1, seed=1)
    starts = [_random_cluster(rng, [8, 1, 1, 6], box=6.0) for _ in range(4)]

    out_dir = tmp_path / "plots" / "nested"
    paths = plot_distributions(references, candidates, out_dir, starts=starts)

    assert {p.name for p in paths} == {"pair_distances.png", "angles.png", "rmsd.png"}
    for path in paths:
        assert path.parent == out_dir
        data = path.read_bytes()
        assert len(data) > 1000
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
