"""MILAD: Zernike moments and invariants against the milad package; orthonormality of the
basis; independence of the 117 invariants; gradients; invariances with negative controls;
the shipped data file and the spec."""

import json

import numpy as np
import pytest
import torch
from ase.build import molecule
from conftest import random_rotation

from structrecon import StructreconError
from structrecon.descriptors import (
    FingerprintSpec,
    MiladSpec,
    density_from_moments,
    describe,
    geometric_moments,
    load_invariants,
    preset,
    zernike_basis,
    zernike_indices,
    zernike_moments,
)
from structrecon.descriptors._zernike import (
    clebsch_gordan,
    invariant_polynomial,
    monomial_exponents,
)
from structrecon.descriptors.milad import (
    MomentInvariants,
    centre_positions,
    moments_from_real,
    moments_to_real,
)

R = 5.0  # cutoff radius, Angstrom (the paper's QM9 setting)


def milad_package():
    """The reference package; with dscribe 2.x it needs ``Descriptor`` re-exported."""
    try:
        import dscribe.descriptors as dd
        from dscribe.descriptors.descriptor import Descriptor

        dd.Descriptor = Descriptor
    except ImportError:
        pass
    return pytest.importorskip("milad")


def as_milad_vector(moms):
    """milad ZernikeMoments -> our (n, l, m) layout."""
    return np.array([moms[idx] for idx in zernike_indices(moms.n_max)])


def generic_moments(rng, n_max=7, size=()):
    """Random moments of a real density (c^-m = (-1)^m conj c^m), as real coordinates."""
    k = len(zernike_indices(n_max))
    return torch.tensor(rng.normal(size=size + (k,)))


def poly_of(terms, layout):
    """{sorted tuple of (n, l, m): coefficient} from (coefficient, indices) terms."""
    return {tuple(sorted(tuple(layout[i]) for i in idx)): c for c, idx in terms}


# -- moments --------------------------------------------------------------------------------


def test_zernike_and_geometric_moments_match_milad(rng):
    milad = milad_package()
    pos = rng.normal(size=(7, 3)) * 1.4  # Angstrom, inside the 5 A sphere
    w = rng.uniform(1.0, 2.0, size=7)
    x = torch.tensor(pos[None])
    ours = zernike_moments(x, torch.tensor(w), 7, R)[0].numpy()
    ref = as_milad_vector(milad.zernike.from_deltas(7, pos / R, w))
    assert np.abs(ref).max() > 0.1 and np.abs(ref.imag).max() > 0.01  # not vacuous
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    geo = geometric_moments(x, torch.tensor(w), 7, R)[0].numpy()
    ref_geo = milad.geometric.from_deltas(7, pos / R, w).array
    expected = np.array([ref_geo[s, t, u] for s, t, u in monomial_exponents(7)])
    np.testing.assert_allclose(geo, expected, rtol=1e-13, atol=1e-15)


def test_gaussian_moments_match_milad(rng):
    milad = milad_package()
    pos = rng.normal(size=(5, 3)) * 1.2
    w = rng.uniform(1.0, 2.0, size=5)
    sigma = 0.6  # Angstrom; milad takes it in unit-ball units
    ours = zernike_moments(torch.tensor(pos[None]), torch.tensor(w), 7, R, sigma=sigma)
    ref = as_milad_vector(milad.zernike.from_gaussians(7, pos / R, sigma / R, w))
    np.testing.assert_allclose(ours[0].numpy(), ref, rtol=0, atol=1e-12)
    # the Gaussians really differ from deltas at this width
    deltas = zernike_moments(torch.tensor(pos[None]), torch.tensor(w), 7, R)
    assert (ours - deltas).abs().max() > 1e-3


def test_basis_is_orthonormal_over_the_unit_ball():
    """(3 / 4 pi) int_{|x| <= 1} Z_a conj(Z_b) dx = delta_ab (Uhrin eq. 29), by a product
    quadrature that is exact for these polynomials (degree <= 14 in each direction)."""
    r, wr = np.polynomial.legendre.leggauss(12)
    r, wr = 0.5 * (r + 1), 0.5 * wr
    ct, wt = np.polynomial.legendre.leggauss(12)
    phi = np.arange(24) * 2 * np.pi / 24
    rr, cc, pp = np.meshgrid(r, ct, phi, indexing="ij")
    st = np.sqrt(1 - cc**2)
    pts = np.stack([rr * st * np.cos(pp), rr * st * np.sin(pp), rr * cc], -1).reshape(-1, 3)
    weights = (wr[:, None, None] * r[:, None, None] ** 2 * wt[None, :, None]).repeat(24, 2)
    weights = weights.reshape(-1) * 2 * np.pi / 24
    z = zernike_basis(torch.tensor(pts), 7).numpy()  # [P, K]
    gram = 3 / (4 * np.pi) * (z.T * weights) @ z.conj()
    np.testing.assert_allclose(gram, np.eye(z.shape[1]), atol=1e-11)


def test_density_from_moments_matches_milad_and_peaks_at_the_atom(rng):
    milad = milad_package()
    pos = rng.normal(size=(4, 3)) * 0.25
    ours = zernike_moments(torch.tensor(pos[None]), None, 7)[0]
    points = rng.uniform(-0.8, 0.8, size=(6, 3))
    got = density_from_moments(ours, torch.tensor(points)).numpy()
    ref_moms = milad.zernike.from_deltas(7, pos, 1.0)
    # (milad's single-point value_at returns 0; its grid path is used)
    query = ref_moms.create_reconstruction_query(points, 7)
    expected = ref_moms.reconstruct(query, zero_outside_domain=False)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    # one atom: the reconstructed density on a grid is largest next to it (Algorithm 2)
    atom = torch.tensor([[[1.1, -0.7, 0.4]]], dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-4.5, 4.5, 31)] * 3, indexing="ij"), -1)
    grid = grid.reshape(-1, 3).double()
    grid = grid[grid.norm(dim=1) <= R]  # the expansion only means something in the ball
    values = density_from_moments(zernike_moments(atom, None, 7, R), grid, R)[0]
    assert torch.linalg.norm(grid[values.argmax()] - atom[0, 0]) < 0.35


def test_real_coordinates_round_trip(rng):
    x = generic_moments(rng, size=(3,))
    c = moments_from_real(x)
    idx = zernike_indices(7)
    pos = {t: k for k, t in enumerate(idx)}
    for (n, ell, m), k in pos.items():
        torch.testing.assert_close(c[:, pos[(n, ell, -m)]], (-1) ** m * c[:, k].conj())
    torch.testing.assert_close(moments_to_real(c), x)
    # moments of atoms are moments of a real density: the same holds for them
    atoms = zernike_moments(torch.tensor(rng.normal(size=(2, 5, 3))), None, 7, R)
    torch.testing.assert_close(moments_from_real(moments_to_real(atoms)), atoms)


# -- invariants ---------------------------------------------------------------------------


def test_invariants_match_milad(rng):
    """Our 117 against milad's own 117 (``cmfs7indep_0``, same paper, same conventions).

    The two sets are both algebraically independent selections from the same family of
    Clebsch-Gordan couplings (eqs. 19-22) but choose differently where many candidates
    qualify.  So: (1) every invariant that is the same polynomial in both sets (matched
    here by its terms, 78 of them) must have the same value, milad's value coming from
    its own pipeline (atoms -> cutoff scaling -> moments -> invariants); (2) the other
    invariants must carry the same information: at generic moments, the Jacobian of
    ours and milad's stacked has rank 117, i.e. each of milad's invariants is locally a
    function of ours and vice versa (milad's Jacobian by central differences of its
    evaluation).
    """
    milad = milad_package()
    from milad.play import asetools

    atoms = molecule("CH3CH2OH")
    # milad's species mapping onto (1, 2): H, C, O -> 7/6, 3/2, 11/6
    desc = milad.descriptor(species={"map": {"numbers": [1, 6, 8], "range": (1.0, 2.0)}}, cutoff=R)
    import miniball

    centre, _ = miniball.get_bounding_ball(atoms.positions)
    atoms.positions -= centre  # the paper's set-up: the smallest enclosing sphere's centre
    ref = desc(asetools.ase2milad(atoms))
    spec = MiladSpec(cutoff=R, species=(1, 6, 8), weights=(7 / 6, 1.5, 11 / 6), centre="miniball")
    moved = atoms.positions + np.array([0.3, -1.0, 2.0])  # our centring undoes this
    ours = spec.build(atoms.numbers)(torch.tensor(moved[None]))[0, 0].numpy()

    layout = zernike_indices(7)
    inv = load_invariants()
    ours_polys = [poly_of(t, layout) for t in inv.terms]
    matched = []
    for k, theirs in enumerate(desc.invariants):
        q = {}
        for c, term in zip(theirs.prefactors, theirs.terms):
            key = tuple(sorted(tuple(int(v) for v in t) for t in term))
            q[key] = q.get(key, 0) + c
        for j, p in enumerate(ours_polys):
            if p.keys() == q.keys() and all(abs(p[t] - q[t]) < 1e-12 for t in p):
                matched.append((j, k))
    assert len(matched) == 78
    j, k = np.array(matched).T
    assert np.abs(ref[k]).max() > 1e-2
    np.testing.assert_allclose(ours[j], ref[k], rtol=1e-9, atol=1e-12)

    # (2) same information.  milad's polynomials, evaluated by our evaluator (checked
    # against milad's own evaluation here), differentiated exactly by autograd.
    theirs = MomentInvariants(
        "milad",
        7,
        [(inv.weight,) for inv in desc.invariants],
        [7] * len(desc.invariants),
        [
            [
                (float(c), [layout.index(tuple(int(v) for v in t)) for t in term])
                for c, term in zip(inv.prefactors, inv.terms)
            ]
            for inv in desc.invariants
        ],
    )
    x0 = generic_moments(rng)
    moms = milad.zernike.ZernikeMoments(7)
    for (n, ell, m), value in zip(layout, moments_from_real(x0).numpy()):
        moms.array[n, ell, m] = value
    own = np.asarray(desc.invariants(moms)).real
    np.testing.assert_allclose(theirs(moments_from_real(x0)[None])[0].numpy(), own, rtol=1e-10)
    np.testing.assert_allclose(inv(moments_from_real(x0)[None])[0].numpy()[j], own[k], rtol=1e-10)

    def jacobian(f):
        return torch.autograd.functional.jacobian(lambda v: f(moments_from_real(v)[None])[0], x0)

    def rank(rows):
        s = torch.linalg.svdvals(rows / rows.norm(dim=1, keepdim=True))
        return int((s > 1e-10 * s[0]).sum()), s

    jac_ours, jac_theirs = jacobian(inv), jacobian(theirs)
    r_ours, _ = rank(jac_ours)
    r_theirs, _ = rank(jac_theirs)
    r_both, s = rank(torch.cat([jac_ours, jac_theirs]))
    assert r_ours == r_both == 117  # milad's invariants add nothing to ours
    # milad's own 117 have rank 113 on real densities: four of them (rows 52, 80, 111,
    # 114 of cmfs7indep_0.txt) are functions of the others
    assert r_theirs == 113
    assert s[116] > 1e-8 and s[117] < 1e-13  # a clear gap


def independence_rank(rows):
    """Rank and singular values of d(invariants)/d(real moment coordinates)."""
    s = torch.linalg.svdvals(rows / rows.norm(dim=1, keepdim=True))
    return int((s > 1e-8 * s[0]).sum()), s


def test_117_invariants_are_independent_with_negative_control(rng):
    inv = load_invariants()
    assert len(inv) == 117
    x = generic_moments(rng)
    jac = torch.autograd.functional.jacobian(lambda v: inv(moments_from_real(v)[None])[0], x)
    rank, s = independence_rank(jac)
    assert rank == 117 and s[-1] > 1e-4  # 120 moment coordinates - 3 rotations

    layout = zernike_indices(7)
    position = {t: k for k, t in enumerate(layout)}

    def extra(label):
        poly = invariant_polynomial(label)
        terms = [(c, [position[t] for t in key]) for key, c in poly.items()]
        one = MomentInvariants("extra", 7, [label], [7], [terms])
        return torch.autograd.functional.jacobian(lambda v: one(moments_from_real(v)[None])[0], x)

    # negative control: a further invariant (a coupling the selection dropped) and a
    # product of two of ours are dependent: the rank stays 117
    dropped = extra((4, 2, 2, 2, 2, 2, 2, 2))
    assert dropped.abs().max() > 1e-3
    product = (
        jac[5] * inv(moments_from_real(x)[None])[0, 9]
        + jac[9] * inv(moments_from_real(x)[None])[0, 5]
    )
    for row in (dropped, product[None]):
        rank, s = independence_rank(torch.cat([jac, row.reshape(1, -1)]))
        assert rank == 117 and s[-1] < 1e-10
    # ...while a non-invariant (a raw moment coordinate) raises it to 118
    rank, _ = independence_rank(torch.cat([jac, torch.eye(len(x))[7:8].double()]))
    assert rank == 118


def test_invariant_subsets_per_n_max():
    """Ordered by largest order: the part up to n_max is complete for n_max, K - 3."""
    for n_max in range(2, 8):
        inv = load_invariants(n_max)
        assert len(inv) == len(zernike_indices(n_max)) - 3
        assert max(inv.max_orders) == n_max


def test_data_file():
    from importlib.resources import files

    data = json.loads(files("structrecon.data").joinpath("milad_invariants_n7.json").read_text())
    assert len(data["invariants"]) == 117
    assert [tuple(m) for m in data["moments"]] == list(zernike_indices(7))
    labels = [tuple(inv["label"]) for inv in data["invariants"]]
    assert len(set(labels)) == 117
    # Uhrin Table I, algebraically independent invariants of moments with n >= 2
    paper = {2: 3, 3: 13, 4: 28, 5: 49, 6: 77, 7: 113}
    assert {int(k): v["algebraic"] for k, v in data["table_i"].items()} == paper
    high = [inv for inv in data["invariants"] if min(i for _, idx in inv["terms"] for i in idx) > 3]
    assert len(high) == 113
    # the stored polynomials are the couplings their labels name
    layout = zernike_indices(7)
    for inv in data["invariants"][::10]:
        expected = invariant_polynomial(tuple(inv["label"]))
        got = poly_of(inv["terms"], layout)
        assert got.keys() == expected.keys()
        assert all(abs(got[t] - expected[t]) < 1e-12 for t in got)


def test_clebsch_gordan_against_sympy(rng):
    cg_sympy = pytest.importorskip("sympy.physics.quantum.cg").CG
    for _ in range(25):
        j1, j2 = rng.integers(0, 5, size=2)
        j = int(rng.integers(abs(j1 - j2), j1 + j2 + 1))
        m1, m2 = int(rng.integers(-j1, j1 + 1)), int(rng.integers(-j2, j2 + 1))
        expected = float(cg_sympy(j1, m1, j2, m2, j, m1 + m2).doit()) if abs(m1 + m2) <= j else 0
        assert abs(clebsch_gordan(int(j1), m1, int(j2), m2, j, m1 + m2) - expected) < 1e-13


# -- descriptor -----------------------------------------------------------------------------


def test_invariances_with_negative_controls(rng, dtype):
    atoms = molecule("CH3CH2OH")
    spec = preset("milad-species")
    base = describe(spec, [atoms], dtype=dtype)[0]
    moved = atoms.copy()
    rot = random_rotation(rng, reflect=True)
    moved.positions = atoms.positions @ rot.T + rng.normal(size=3)
    hydrogens = np.flatnonzero(atoms.numbers == 1)
    perm = np.arange(len(atoms))
    perm[hydrogens] = rng.permutation(hydrogens)
    moved = moved[perm]
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(describe(spec, [moved], dtype=dtype)[0], base, rtol=tol, atol=tol)
    # negative controls: the raw moments change under the rotation, and a small
    # distortion changes the invariants
    fn = spec.descriptor.build(atoms.numbers)
    m0 = fn.moments(torch.tensor(atoms.positions[None]))
    m1 = fn.moments(torch.tensor(atoms.positions[None] @ rot.T))
    assert (m0 - m1).abs().max() > 1e-2
    bent = atoms.copy()
    bent.positions[0] += [0.05, -0.03, 0.02]
    assert np.abs(describe(spec, [bent], dtype=dtype)[0] - base).max() > 1e-4


@pytest.mark.parametrize("centre", ["miniball", "origin"])
def test_other_centres(rng, centre):
    atoms = molecule("CH3CH2OH")
    fn = MiladSpec(centre=centre).build(atoms.numbers)
    x = torch.tensor(atoms.positions[None] - atoms.positions.mean(0))
    shifted = fn(x + torch.tensor([0.4, 0.1, -0.3]))
    changed = (shifted - fn(x)).abs().max()
    if centre == "miniball":
        assert changed < 1e-10  # translation invariant
        c = centre_positions(x, "miniball")[0].numpy()
        r = np.linalg.norm(c, axis=1)
        assert np.sum(r > r.max() - 1e-9) >= 2  # on the smallest enclosing sphere
    else:
        assert changed > 1e-3  # the origin is the caller's: translation shows


def test_gradcheck_positions_and_weights(rng):
    spec = MiladSpec(cutoff=3.0, species=(1, 8), weights=(1.1, 1.5))
    fn = spec.build([8, 1, 1, 8])
    x = torch.tensor(rng.normal(size=(2, 4, 3)) * 0.8, requires_grad=True)
    w = torch.tensor(rng.uniform(1, 2, size=(2, 4)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, q: fn(p, q), (x, w), eps=1e-6, atol=1e-7)
    gauss = MiladSpec(cutoff=3.0, feature="gaussian", sigma=0.4).build([8, 1, 1, 8])
    assert torch.autograd.gradcheck(lambda p, q: gauss(p, q), (x, w), eps=1e-6, atol=1e-7)


def test_gradient_matches_central_differences_miniball(rng):
    fn = MiladSpec(centre="miniball").build([6, 6, 8, 1, 1])
    x0 = rng.normal(size=(1, 5, 3)) * 1.2
    proj = torch.tensor(rng.normal(size=117))
    x = torch.tensor(x0, requires_grad=True)
    (fn(x)[0, 0] @ proj).backward()
    h = 1e-6
    fd = np.zeros_like(x0)
    for idx in np.ndindex(x0.shape):
        xp, xm = x0.copy(), x0.copy()
        xp[idx] += h
        xm[idx] -= h
        fd[idx] = float(fn(torch.tensor(xp))[0, 0] @ proj - fn(torch.tensor(xm))[0, 0] @ proj)
    np.testing.assert_allclose(x.grad.numpy(), fd / (2 * h), rtol=1e-6, atol=1e-8)
    assert np.abs(x.grad.numpy().sum(axis=1)).max() < 1e-8  # translation: forces sum to 0


def test_batch_matches_single(rng):
    fn = preset("milad").descriptor.build([6, 6, 1, 1, 1, 1])
    x = torch.tensor(rng.normal(size=(3, 6, 3)))
    whole = fn(x)
    for b in range(3):
        torch.testing.assert_close(fn(x[b : b + 1])[0], whole[b], rtol=1e-13, atol=1e-13)


def test_spec_round_trip_presets_and_errors():
    spec = preset("milad-species")
    assert spec.pooling == "none" and spec.n_features == 117
    table = dict(zip(spec.descriptor.species, spec.descriptor.weights))
    assert table == {1: 1.1, 6: 1.3, 7: 1.7, 8: 1.5, 9: 1.9}  # the paper's text, O 1.5, N 1.7
    assert FingerprintSpec.from_json(spec.to_json()) == spec
    assert preset("milad").descriptor.weights_for([26, 1]).tolist() == [1.0, 1.0]
    assert MiladSpec(n_max=4).n_features == len(zernike_indices(4)) - 3
    with pytest.raises(StructreconError, match="clusters only"):
        spec.descriptor.build([1, 1], np.eye(3) * 5, [True, True, True])
    with pytest.raises(StructreconError, match="does not weight"):
        spec.descriptor.build([1, 17])
    with pytest.raises(StructreconError, match="unknown 'milad' descriptor option"):
        MiladSpec.from_dict({"nmax": 7})
    for bad, match in [
        ({"n_max": 8}, "n_max must be 0-7"),
        ({"cutoff": 0}, "cutoff must be positive"),
        ({"feature": "gaussian"}, "sigma > 0"),
        ({"sigma": 0.3}, "only used with feature 'gaussian'"),
        ({"species": (1, 6), "weights": (1.0,)}, "one to one"),
        ({"centre": "middle"}, "unknown MILAD centre"),
        ({"invariants": "n9"}, "unknown MILAD invariant set"),
    ]:
        with pytest.raises(StructreconError, match=match):
            MiladSpec(**bad)
