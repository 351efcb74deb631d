"""ACSF values against dscribe and the StructRepGen reference vectors; gradients;
invariances with a negative control."""

import dataclasses

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from conftest import PT10, random_rotation

from structrecon.descriptors import ACSFSpec, FingerprintSpec, describe, fingerprint_fn, preset

G2 = [[0.5, 1.0], [2.0, 1.5], [0.05, 0.0]]
G4 = [[0.1, 1, 1], [0.3, 2, -1], [0.02, 4, 1]]
G5 = [[0.1, 1, 1], [0.2, 4, -1], [0.05, 16, 1]]


def dscribe_columns(species, n_g2, n_g4, n_g5):
    """Column indices of our layout inside dscribe's ACSF output.

    dscribe (2.x documentation): per neighbour species (increasing Z) the block
    [G1, G2 params]; then per species pair (Z_i >= Z_j, i outer) the block
    [G3 params (none here), G4 params, G5 params].
    """
    s = len(species)
    block = 1 + n_g2
    g2 = [k * block + 1 + p for k in range(s) for p in range(n_g2)]
    pair_offset = {}
    col = s * block
    for i in range(s):
        for j in range(i + 1):
            pair_offset[(j, i)] = col
            col += n_g4 + n_g5
    pairs = [(a, b) for a in range(s) for b in range(a, s)]
    g4 = [pair_offset[p] + q for p in pairs for q in range(n_g4)]
    g5 = [pair_offset[p] + n_g4 + q for p in pairs for q in range(n_g5)]
    return g2, g4, g5


def ours(atoms, spec, dtype=torch.float64):
    cell = atoms.cell.array if atoms.pbc.any() else None
    fn = spec.build(atoms.numbers, cell, atoms.pbc)
    return fn(torch.tensor(atoms.positions[None], dtype=dtype))[0].double().numpy()


@pytest.mark.parametrize(
    "atoms",
    [
        molecule("CH3CH2OH"),
        molecule("C6H6"),
        bulk("NaCl", "rocksalt", a=5.64),  # periodic, cutoff > half the cell
        bulk("Si", "diamond", a=5.43) * (1, 1, 2),
    ],
    ids=["ethanol", "benzene", "NaCl", "Si"],
)
def test_matches_dscribe(atoms):
    from dscribe.descriptors import ACSF

    species = sorted(set(atoms.numbers.tolist()))
    ds = ACSF(
        r_cut=5.0,
        g2_params=G2,
        g4_params=G4,
        g5_params=G5,
        species=species,
        periodic=bool(atoms.pbc.any()),
    )
    ref = ds.create(atoms)
    spec = ACSFSpec(cutoff=5.0, species=species, g2=G2, g4=G4, g5=G5)
    got = ours(atoms, spec)
    g2, g4, g5 = dscribe_columns(species, len(G2), len(G4), len(G5))
    np.testing.assert_allclose(got, ref[:, g2 + g4 + g5], rtol=1e-10, atol=1e-12)
    assert np.abs(ref[:, g4 + g5]).max() > 1e-3  # the comparison is not vacuous


def test_acsf_fung_matches_structrepgen_reference():
    frames = __import__("ase.io").io.read(PT10 / "reference_structures.extxyz", ":")
    for a in frames:
        a.pbc = False  # the reference code uses no periodic images
    ref = np.loadtxt(PT10 / "reference_x.csv", delimiter=",")
    got = describe("acsf-fung", frames)
    assert got.shape == (6, 380)
    # the reference was computed in float32: ~1.6e-6 absolute is its precision
    np.testing.assert_allclose(got, ref, atol=5e-6, rtol=0)


def test_neighbour_images_against_vesin():
    """Sum of cutoff functions over all images (dense shifts) = over vesin's pair list."""
    from vesin import NeighborList

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.1, seed=3)
    cutoff = 7.3  # more than the cell: several image shells
    spec = ACSFSpec(cutoff=cutoff, species=[29], g2=[[0.0, 0.0]])
    got = ours(atoms, spec)[:, 0]
    i, d = NeighborList(cutoff=cutoff, full_list=True).compute(
        points=atoms.positions, box=atoms.cell.array, periodic=True, quantities="id"
    )
    # numpy reduction of f_c over vesin's pairs
    fc = 0.5 * (np.cos(np.pi * d / cutoff) + 1.0)
    expected = np.bincount(i, weights=fc, minlength=len(atoms))
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def small_spec(pooling="maxmin"):
    desc = ACSFSpec(cutoff=4.0, species=[1, 8], g2=G2, g4=G4, g5=G5)
    return FingerprintSpec(descriptor=desc, pooling=pooling)


@pytest.mark.parametrize("pooling", ["maxmin", "sum-species", "mean"])
def test_gradcheck_cluster(pooling, rng):
    numbers = [8, 1, 1, 8, 1]
    fn = fingerprint_fn(small_spec(pooling), numbers)
    x = torch.tensor(rng.normal(size=(2, 5, 3)) * 1.2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)


def test_gradcheck_periodic_positions_and_cell(rng):
    atoms = bulk("Si", "diamond", a=5.43)
    spec = ACSFSpec(cutoff=4.0, species=[14], g2=G2, g4=G4, g5=G5)
    pos = torch.tensor(atoms.positions[None] + rng.normal(size=(1, 2, 3)) * 0.1, requires_grad=True)
    cell = torch.tensor(atoms.cell.array, requires_grad=True)

    def f(p, c):
        return spec.build(atoms.numbers, c, atoms.pbc)(p)

    assert torch.autograd.gradcheck(f, (pos, cell), eps=1e-6, atol=1e-6)


def test_gradient_matches_central_differences(rng):
    numbers = [8, 1, 1, 8, 1, 1]
    fn = fingerprint_fn(small_spec("sum-species"), numbers)
    x0 = rng.normal(size=(1, 6, 3)) * 1.3
    w = torch.tensor(rng.normal(size=fn.n_features))
    x = torch.tensor(x0, requires_grad=True)
    (fn(x)[0] @ w).backward()
    h = 1e-5
    fd = np.zeros_like(x0)
    for idx in np.ndindex(x0.shape):
        xp, xm = x0.copy(), x0.copy()
        xp[idx] += h
        xm[idx] -= h
        fd[idx] = float(fn(torch.tensor(xp))[0] @ w - fn(torch.tensor(xm))[0] @ w) / (2 * h)
    np.testing.assert_allclose(x.grad.numpy(), fd, rtol=1e-6, atol=1e-8)


def test_invariances_with_negative_control(rng, dtype):
    atoms = molecule("CH3CH2OH")
    spec = FingerprintSpec(
        descriptor=ACSFSpec(cutoff=5.0, species=[1, 6, 8], g2=G2, g4=G4, g5=G5),
        pooling="maxmin",
    )
    base = describe(spec, [atoms], dtype=dtype)[0]
    moved = atoms.copy()
    moved.positions = atoms.positions @ random_rotation(rng, reflect=True).T + rng.normal(size=3)
    hydrogens = np.flatnonzero(atoms.numbers == 1)
    perm = np.arange(len(atoms))
    perm[hydrogens] = rng.permutation(hydrogens)
    moved = moved[perm]
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(
        describe(spec, [moved], dtype=dtype)[0], base, atol=tol * 10, rtol=tol
    )
    # negative control: a small distortion must change the fingerprint
    bent = atoms.copy()
    bent.positions[0] += [0.05, -0.03, 0.02]
    assert np.abs(describe(spec, [bent], dtype=dtype)[0] - base).max() > 1e-3


def test_per_atom_features_permute_with_atoms(rng):
    atoms = molecule("CH4")
    spec = ACSFSpec(cutoff=5.0, species=[1, 6], g2=G2, g5=G5)
    perm = np.array([0, 3, 1, 4, 2])
    np.testing.assert_allclose(ours(atoms[perm], spec), ours(atoms, spec)[perm], atol=1e-12)


def test_float32_close_to_float64():
    atoms = molecule("C6H6")
    spec = preset("acsf")
    f64 = describe(spec, [atoms], dtype=torch.float64)
    f32 = describe(spec, [atoms], dtype=torch.float32)
    np.testing.assert_allclose(f32, f64, rtol=1e-4, atol=1e-5)


def test_preset_sizes():
    spec = preset("acsf-fung")
    assert spec.descriptor.n_features == 190 and spec.n_features == 380
    # dropping G5 removes exactly the 50 angular values per atom
    assert dataclasses.replace(spec.descriptor, g5=()).n_features == 140


def test_far_atom_in_cluster_is_an_error():
    from structrecon import StructreconError

    atoms = Atoms("Pt3", positions=[[0, 0, 0], [2.5, 0, 0], [30.0, 0, 0]])
    with pytest.raises(StructreconError, match="outside the 20.0 A cutoff"):
        describe("acsf-fung", [atoms])
