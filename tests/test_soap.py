"""SOAP power spectrum: values and position gradients against featomic, radial integrals
against quadrature, gradcheck, invariances with a negative control, dtypes, specs."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from conftest import random_rotation

from structrecon import StructreconError
from structrecon.descriptors import FingerprintSpec, SoapSpec, describe, fingerprint_fn, preset
from structrecon.descriptors import soap as soap_module

SPEC = SoapSpec(
    cutoff=4.5,
    cutoff_width=0.7,
    density_width=0.35,
    max_radial=5,
    max_angular=4,
    species=[1, 6, 7, 8],
)


def featomic_reference(atoms, spec, gradients=False, spline_accuracy=None):
    """featomic's SoapPowerSpectrum in our per-atom layout.

    Returns values [N, F] and, with ``gradients``, the Jacobian [N, F, N, 3] from
    featomic's own "positions" gradients.  ``spline_accuracy=None`` evaluates the
    radial integral exactly (no splines).
    """
    featomic = pytest.importorskip("featomic")
    from featomic.basis import Gto, TensorProduct
    from featomic.cutoff import Cutoff, ShiftedCosine
    from featomic.density import Gaussian
    from metatensor import Labels

    calc = featomic.SoapPowerSpectrum(
        cutoff=Cutoff(spec.cutoff, ShiftedCosine(width=spec.cutoff_width)),
        density=Gaussian(width=spec.density_width, center_atom_weight=spec.center_weight),
        basis=TensorProduct(
            max_angular=spec.max_angular,
            radial=Gto(max_radial=spec.max_radial),
            spline_accuracy=spline_accuracy,
        ),
    )
    desc = calc.compute(atoms, gradients=["positions"] if gradients else None)
    pairs = [(a, b) for i, a in enumerate(spec.species) for b in spec.species[i:]]
    desc = desc.keys_to_samples("center_type").keys_to_properties(
        Labels(["neighbor_1_type", "neighbor_2_type"], np.array(pairs, dtype=np.int32))
    )
    block = desc.block(0)
    assert block.properties.names == ["neighbor_1_type", "neighbor_2_type", "l", "n_1", "n_2"]
    labels = [tuple(int(v) for v in row) for row in block.properties.values]
    assert labels == spec.feature_labels()
    atom = np.asarray(block.samples.column("atom"))
    n = len(atoms)
    values = np.zeros((n, spec.n_features))
    values[atom] = block.values
    if not gradients:
        return values
    grad = block.gradient("positions")
    jac = np.zeros((n, spec.n_features, n, 3))
    for (sample, _, j), g in zip(grad.samples.values, grad.values):
        jac[atom[sample], :, j, :] += np.asarray(g).T
    return values, jac


def ours(atoms, spec, dtype=torch.float64, requires_grad=False):
    cell = atoms.cell.array if atoms.pbc.any() else None
    fn = spec.build(atoms.numbers, cell, atoms.pbc)
    pos = torch.tensor(atoms.positions[None], dtype=dtype, requires_grad=requires_grad)
    return fn(pos)[0], pos


def two_species_cell():
    """Rock salt, doubled, rattled and sheared: cutoff beyond half the cell."""
    atoms = bulk("NaCl", "rocksalt", a=5.64) * (1, 1, 2)
    rng = np.random.default_rng(7)
    atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
    atoms.set_cell(atoms.cell.array + rng.normal(scale=0.1, size=(3, 3)), scale_atoms=False)
    return atoms


CELL_SPEC = SoapSpec(
    cutoff=5.0, cutoff_width=1.0, density_width=0.4, max_radial=4, max_angular=3, species=[11, 17]
)

CASES = {
    "ethanol": (molecule("CH3CH2OH"), SPEC),
    "acetamide": (molecule("CH3CONH2"), SPEC),
    "NaCl": (two_species_cell(), CELL_SPEC),
}


@pytest.mark.parametrize("name", list(CASES))
def test_values_match_featomic(name):
    atoms, spec = CASES[name]
    ref = featomic_reference(atoms, spec)
    got = ours(atoms, spec)[0].numpy()
    assert got.shape == ref.shape == (len(atoms), spec.n_features)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10 * scale)
    # several species pairs (like and cross) are non-zero: the comparison is not vacuous
    assert (np.abs(ref).reshape(len(atoms), spec.n_pairs, -1).max(axis=(0, 2)) > 0).sum() >= 3
    # featomic's default splined radial integral agrees to its spline accuracy (1e-8)
    splined = featomic_reference(atoms, spec, spline_accuracy=1e-8)
    np.testing.assert_allclose(got, splined, rtol=0, atol=1e-7 * scale)


@pytest.mark.parametrize("name", ["ethanol", "NaCl"])
def test_position_gradients_match_featomic(name):
    atoms, spec = CASES[name]
    ref, jac = featomic_reference(atoms, spec, gradients=True)
    got, pos = ours(atoms, spec, requires_grad=True)
    rng = np.random.default_rng(3)
    for _ in range(2):
        w = rng.normal(size=got.shape)
        (g,) = torch.autograd.grad((got * torch.tensor(w)).sum(), pos, retain_graph=True)
        expected = np.einsum("if,ifjx->jx", w, jac)
        np.testing.assert_allclose(
            g[0].numpy(), expected, rtol=0, atol=1e-9 * np.abs(expected).max()
        )
    assert np.abs(jac).max() > 1e-2  # not vacuous


def test_radial_integral_against_quadrature():
    """I_nl(r) = (pi s^2)^(-3/4) 4 pi int x^2 R_n(x) exp(-c (r^2 + x^2)) i_l(2 c r x) dx.

    Independent of featomic: scipy quadrature of the defining integral.
    """
    from scipy.integrate import quad
    from scipy.special import ive

    spec = SoapSpec(
        cutoff=4.0, cutoff_width=0.5, density_width=0.5, max_radial=3, max_angular=3, species=[1]
    )
    c = 0.5 / spec.density_width**2
    w = soap_module.gto_orthonormalization(spec.max_radial, spec.cutoff)
    sigma = spec.cutoff * np.maximum(np.sqrt(np.arange(4)), 1) / 4

    def basis(n, x):
        return sum(w[n, k] * x**k * np.exp(-0.5 * (x / sigma[k]) ** 2) for k in range(4))

    def scaled_bessel(deg, t):  # exp(-t) i_l(t)
        if t == 0:
            return 1.0 if deg == 0 else 0.0
        return np.sqrt(np.pi / (2 * t)) * ive(deg + 0.5, t)

    # the orthonormalised GTOs are orthonormal on [0, inf) with weight r^2
    overlap = [
        [quad(lambda x: x * x * basis(n, x) * basis(m, x), 0, 40, limit=200)[0] for m in range(4)]
        for n in range(4)
    ]
    np.testing.assert_allclose(overlap, np.eye(4), atol=1e-10)
    r_values = np.array([0.0, 0.7, 2.3, 3.9])
    got = soap_module.radial_integral(spec, r_values)[0]
    for k, r in enumerate(r_values):
        for deg in range(4):
            for n in range(4):
                val = quad(
                    lambda x: (
                        x
                        * x
                        * basis(n, x)
                        * np.exp(-c * (x - r) ** 2)
                        * scaled_bessel(deg, 2 * c * r * x)
                    ),
                    0,
                    15,
                    epsabs=1e-14,
                    epsrel=1e-12,
                    limit=200,
                )[0]
                val *= 4 * np.pi / (np.pi * spec.density_width**2) ** 0.75
                assert got[k, n, deg] == pytest.approx(val, abs=1e-10)


def test_gradcheck_cluster(rng):
    spec = SoapSpec(
        cutoff=3.0, cutoff_width=0.8, density_width=0.5, max_radial=2, max_angular=2, species=[1, 8]
    )
    fn = spec.build([8, 1, 1, 8])
    x = torch.tensor(rng.normal(size=(2, 4, 3)) * 0.9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_periodic_positions_and_cell(rng):
    atoms = bulk("NaCl", "rocksalt", a=4.0)
    spec = SoapSpec(
        cutoff=3.2,
        cutoff_width=0.8,
        density_width=0.5,
        max_radial=2,
        max_angular=2,
        species=[11, 17],
    )
    x = atoms.positions[None] + rng.normal(size=(1, 2, 3)) * 0.1
    x = torch.tensor(x, requires_grad=True)
    cell = torch.tensor(atoms.cell.array, requires_grad=True)

    def f(p, c):
        return spec.build(atoms.numbers, c, atoms.pbc)(p)

    assert torch.autograd.gradcheck(f, (x, cell), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradient_matches_central_differences(rng):
    fn = fingerprint_fn(preset("soap"), molecule("CH3CH2OH").numbers)
    x0 = molecule("CH3CH2OH").positions[None] + rng.normal(size=(1, 9, 3)) * 0.05
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
    np.testing.assert_allclose(x.grad.numpy(), fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())


def test_invariances_with_negative_control(rng, dtype):
    atoms = molecule("CH3CH2OH")
    spec = preset("soap")
    base = describe(spec, [atoms], dtype=dtype)[0]
    moved = atoms.copy()
    moved.positions = atoms.positions @ random_rotation(rng, reflect=True).T + rng.normal(size=3)
    hydrogens = np.flatnonzero(atoms.numbers == 1)
    perm = np.arange(len(atoms))
    perm[hydrogens] = rng.permutation(hydrogens)
    assert (perm != np.arange(len(atoms))).any()
    moved = moved[perm]
    scale = np.abs(base).max()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(
        describe(spec, [moved], dtype=dtype)[0], base, rtol=0, atol=tol * scale
    )
    # per-atom features follow the permutation
    per_atom = ours(atoms, spec.descriptor, dtype)[0].double().numpy()
    np.testing.assert_allclose(
        ours(moved, spec.descriptor, dtype)[0].double().numpy(), per_atom[perm], atol=tol * scale
    )
    # negative controls: a small distortion, and swapping the positions of unlike atoms,
    # must change the fingerprint
    bent = atoms.copy()
    bent.positions[0] += [0.05, -0.03, 0.02]
    assert np.abs(describe(spec, [bent], dtype=dtype)[0] - base).max() > 1e-3 * scale
    swapped = atoms.copy()
    oxygen, carbon = int(np.flatnonzero(atoms.numbers == 8)[0]), 0
    swapped.positions[[oxygen, carbon]] = atoms.positions[[carbon, oxygen]]
    assert np.abs(describe(spec, [swapped], dtype=dtype)[0] - base).max() > 1e-2 * scale


def test_float32_close_to_float64():
    atoms = molecule("C6H6")
    spec = preset("soap")
    f64 = describe(spec, [atoms], dtype=torch.float64)
    f32 = describe(spec, [atoms], dtype=torch.float32)
    np.testing.assert_allclose(f32, f64, rtol=0, atol=2e-6 * np.abs(f64).max())


def test_batch_chunks_and_structures_are_independent(monkeypatch, rng):
    """A batch of different structures, split into several chunks, = one by one."""
    monkeypatch.setattr(soap_module, "_CHUNK_ELEMENTS", 1)  # one structure per chunk
    atoms = molecule("CH3CONH2")
    fn = SPEC.build(atoms.numbers)
    pos = torch.tensor(atoms.positions[None] + rng.normal(size=(3, len(atoms), 3)) * 0.1)
    pos.requires_grad_(True)
    batch = fn(pos)
    single = torch.cat([fn(p[None]) for p in pos])
    torch.testing.assert_close(batch, single, rtol=0, atol=1e-14)
    (g_batch,) = torch.autograd.grad(batch.square().sum(), pos)
    (g_single,) = torch.autograd.grad(single.square().sum(), pos)
    torch.testing.assert_close(g_batch, g_single, rtol=0, atol=1e-12)
    assert (batch[0] - batch[1]).abs().max() > 1e-3


def test_molecule_in_large_box_equals_cluster():
    """Dense periodic slots (no image in range) = the cluster's unique pairs."""
    atoms = molecule("CH3CH2OH")
    boxed = atoms.copy()
    boxed.set_cell(np.eye(3) * 14.0)
    boxed.pbc = True
    boxed.center()
    cluster = Atoms(atoms.numbers, boxed.positions)
    np.testing.assert_allclose(
        ours(boxed, SPEC)[0].numpy(), ours(cluster, SPEC)[0].numpy(), rtol=0, atol=1e-13
    )


def test_absent_species_give_zero_pairs():
    atoms = molecule("H2O")
    got = ours(atoms, SPEC)[0].numpy()
    labels = SPEC.feature_labels()
    absent = [k for k, (a, b, *_) in enumerate(labels) if a in (6, 7) or b in (6, 7)]
    assert np.all(got[:, absent] == 0)
    present = [k for k in range(len(labels)) if k not in set(absent)]
    assert np.abs(got[:, present]).max() > 0.1


def test_spec_round_trip_and_errors(tmp_path):
    spec = preset("soap")
    assert spec.descriptor.n_features == 15 * 5 * 49 and spec.n_features == 5 * 15 * 5 * 49
    assert FingerprintSpec.from_json(spec.to_json()) == spec
    path = tmp_path / "soap.toml"
    path.write_text(spec.to_toml())
    assert FingerprintSpec.from_toml(path) == spec
    assert SoapSpec.from_dict(spec.descriptor.to_dict()) == spec.descriptor
    assert eval(repr(spec.descriptor), {"SoapSpec": SoapSpec}) == spec.descriptor
    data = spec.descriptor.to_dict()
    with pytest.raises(StructreconError, match="valid: .*cutoff_width"):
        SoapSpec.from_dict({**data, "nmax": 4})
    with pytest.raises(StructreconError, match="cutoff_width"):
        SoapSpec.from_dict({**data, "cutoff_width": 6.0})
    with pytest.raises(StructreconError, match="max_radial"):
        SoapSpec.from_dict({**data, "max_radial": -1})
    with pytest.raises(StructreconError, match="density_width"):
        SoapSpec.from_dict({**data, "density_width": 0})
    with pytest.raises(StructreconError, match=r"element\(s\) \[17\]"):
        spec.descriptor.build([6, 17])
