"""MILAD reconstruction (Uhrin 2021, section III): the model's moments, invariants and
Jacobians against the descriptor; Prony and peak finding on exact moments; positions and
species of small molecules recovered from their fingerprints, with one and with two
fingerprints; errors; negative controls."""

import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from structrecon import StructreconError
from structrecon.descriptors import FingerprintSpec, MiladSpec, describe, fingerprint_fn, preset
from structrecon.descriptors.milad import (
    centre_positions,
    load_invariants,
    moments_from_real,
    moments_to_real,
    zernike_moments,
)
from structrecon.evaluate import structure_rmsd
from structrecon.inversion import (
    STRATEGIES,
    MiladModel,
    MiladReconstruction,
    Repulsion,
    Target,
    get_strategy,
    invert,
)
from structrecon.inversion.milad import (
    _bond_assignment,
    _centring,
    _lewis_assignments,
    _lewis_ok,
    _pair_moves,
    _restraint_residuals,
    _restraints,
    _Run,
    _snap_weights,
    valence_compositions,
)
from structrecon.inversion.strategies import Problem

TOL = 1e-6


@pytest.fixture(scope="module")
def model():
    return MiladModel(MiladSpec(cutoff=5.0))


def centred(name):
    atoms = molecule(name)
    atoms.positions -= atoms.positions.mean(axis=0)
    atoms.info["name"] = name
    return atoms


def one_element(atoms):
    return Atoms([1] * len(atoms), positions=atoms.positions)


# -- the model against the descriptor --------------------------------------------------------


@pytest.mark.parametrize("feature", ["delta", "gaussian"])
def test_moments_and_gradients_match_the_descriptor(feature, rng):
    spec = MiladSpec(feature=feature, sigma=0.4 if feature == "gaussian" else 0.0)
    m = MiladModel(spec)
    x = torch.tensor(rng.normal(scale=1.5, size=(2, 7, 3)))
    w = torch.tensor(rng.uniform(1.0, 2.0, size=(2, 7)))
    y, dx, dw = m.moments(x, w, jac=True)
    ref = moments_to_real(zernike_moments(x, w, 7, 5.0, sigma=m.sigma))
    np.testing.assert_allclose(y, ref, atol=1e-13)
    jx = torch.autograd.functional.jacobian(lambda p: m.moments(p, w), x)
    jw = torch.autograd.functional.jacobian(lambda q: m.moments(x, q), w)
    np.testing.assert_allclose(dx, jx[[0, 1], :, [0, 1]], atol=1e-12)
    np.testing.assert_allclose(dw, jw[[0, 1], :, [0, 1]], atol=1e-12)


def test_invariants_and_jacobian_match_the_descriptor(model, rng):
    y = torch.tensor(rng.normal(scale=0.3, size=(3, model.n_moments)))
    inv = load_invariants(7)
    val, jac = model.invariants_of(y, jac=True)
    np.testing.assert_allclose(val, inv(moments_from_real(y)), rtol=1e-12, atol=1e-14)
    ref = torch.autograd.functional.jacobian(lambda v: inv(moments_from_real(v)), y)
    np.testing.assert_allclose(jac, ref[[0, 1, 2], :, [0, 1, 2]], rtol=1e-10, atol=1e-13)
    # the partial evaluation used when building up the orders
    part, jpart = model.invariants_of(y, jac=True, order=4)
    rows = model.max_orders <= 4
    np.testing.assert_allclose(part[:, rows], val[:, rows], atol=1e-15)
    np.testing.assert_allclose(jpart[:, rows], jac[:, rows], atol=1e-15)


def test_block_norms_and_radius_from_the_invariants(model, rng):
    x = torch.tensor(rng.normal(scale=1.2, size=(2, 6, 3)))
    w = torch.ones(2, 6, dtype=torch.float64)
    y = model.moments(x, w)
    phi = model.invariants_of(y)
    norms = torch.zeros(2, len(model.blocks), dtype=y.dtype).index_add(
        1, model.block_of, model.metric * y**2
    )
    np.testing.assert_allclose(model.block_norms(phi) ** 2, norms, rtol=1e-9, atol=1e-20)
    np.testing.assert_allclose(model.mean_square_radius(phi), (x**2).sum(-1).mean(-1), rtol=1e-10)
    np.testing.assert_allclose(model.total_weight(phi[:, 0]), [6.0, 6.0], rtol=1e-12)


def test_prony_recovers_points_and_weights_from_exact_moments(model, rng):
    n = 15
    x = torch.tensor(rng.uniform(-2.5, 2.5, size=(2, n, 3)))
    w = torch.tensor(rng.choice([1.1, 1.3, 1.5, 1.7, 1.9], size=(2, n)))
    y = model.moments(x, w)
    xp, wp = model.prony(y, n, torch.Generator().manual_seed(0))
    for b in range(2):
        d = torch.cdist(x[b], xp[b])
        match = d.argmin(dim=1)
        assert d.min(dim=1).values.max() < 1e-6
        np.testing.assert_allclose(wp[b][match], w[b], atol=1e-6)
    # negative control: Prony asked for fewer points than there are cannot fit them
    xs, _ = model.prony(y, n - 5, torch.Generator().manual_seed(0))
    assert torch.cdist(x[0], xs[0]).min(dim=1).values.max() > 0.05


def test_the_invariants_cannot_tell_the_sign_of_an_odd_order(model, rng):
    # every invariant of the shipped set has an even number of factors of each odd order
    # n, so flipping all moments of order 1, 3 or 5 (7 too: with the others, that is the
    # inversion) leaves all 117 unchanged; only one of the 8 such moment sets (up to
    # inversion) belongs to atoms, so the invariants-to-moments fit has 7 false twins
    n = 12
    x = torch.tensor(rng.uniform(-2.5, 2.5, size=(1, n, 3)))
    w = torch.tensor(rng.choice([1.1, 1.3, 1.5, 1.7, 1.9], size=(1, n)))
    y = model.moments(x, w)
    phi = model.invariants_of(y)
    gen = torch.Generator().manual_seed(0)

    def atoms_off(moments):  # how far Prony's atoms are from having these moments
        xp, wp = model.prony(moments, n, gen)
        return float((model.moments(xp, wp) - moments).abs().max() / moments.abs().max())

    assert atoms_off(y) < 1e-6
    for order in (1, 3, 5):
        flipped = torch.where(model.order == order, -y, y)
        assert torch.allclose(model.invariants_of(flipped), phi, rtol=1e-10, atol=1e-13)
        assert atoms_off(flipped) > 1e-2
    # controls: one block of an odd order, or an even order, does change them
    one_block = torch.where((model.order == 3) & (model.block_l[model.block_of] == 1), -y, y)
    even = torch.where(model.order == 2, -y, y)
    for other in (one_block, even):
        assert not torch.allclose(model.invariants_of(other), phi, rtol=1e-6, atol=1e-8)


def test_peaks_find_well_separated_atoms(model):
    # Algorithm 2 resolves atoms a few Angstrom apart (the n_max = 7 kernel is ~1 A wide)
    x = torch.tensor(
        [[[3.0, 0.0, 0.0], [-1.5, 2.6, 0.0], [-1.5, -2.6, 0.0], [0.0, 0.0, 3.0]]],
        dtype=torch.float64,
    )
    y = model.moments(x, torch.ones(1, 4, dtype=torch.float64))
    found, w = model.peaks(y, 4, r_exclude=0.55)
    spacing = 10.0 / 30  # the 31-point grid over the 10 A cube
    assert torch.cdist(x[0], found[0]).min(dim=1).values.max() < spacing
    np.testing.assert_allclose(w, 1.0)
    # negative control: atoms closer than the resolution merge into one peak
    close = torch.tensor([[[0.6, 0.0, 0.0], [-0.6, 0.0, 0.0]]], dtype=torch.float64)
    y = model.moments(close, torch.ones(1, 2, dtype=torch.float64))
    found, _ = model.peaks(y, 2, r_exclude=0.55)
    assert torch.cdist(close[0], found[0]).min(dim=1).values.max() > spacing


def test_snap_weights_keeps_the_total():
    allowed = torch.tensor([1.1, 1.3, 1.5, 1.7, 1.9], dtype=torch.float64)
    w = torch.tensor([[1.12, 1.38, 1.41, 1.88]], dtype=torch.float64)

    def snap(total):
        return _snap_weights(w, allowed, torch.tensor([total], dtype=torch.float64))

    np.testing.assert_allclose(snap(5.8), [[1.1, 1.3, 1.5, 1.9]])  # the nearest
    # totals that need a second-best choice: the atom that moves costs least
    np.testing.assert_allclose(snap(5.6), [[1.1, 1.3, 1.3, 1.9]])
    np.testing.assert_allclose(snap(6.0), [[1.1, 1.5, 1.5, 1.9]])


# -- reconstruction -----------------------------------------------------------------------------


def test_registered_and_options():
    assert STRATEGIES["milad"] is MiladReconstruction
    assert get_strategy("milad", trials=2, species="fit").species == "fit"
    with pytest.raises(StructreconError, match="species must be one of"):
        MiladReconstruction(species="maybe")
    with pytest.raises(StructreconError, match="has no option"):
        get_strategy("milad", lr=0.1)
    with pytest.raises(StructreconError, match="initial must be one of"):
        MiladReconstruction(initial="peaks")
    with pytest.raises(StructreconError, match="order_steps must be positive"):
        MiladReconstruction(order_steps=0)
    with pytest.raises(StructreconError, match="composition_runs must be >= 0"):
        MiladReconstruction(composition_runs=-1)


def one_run(atoms, spec, count, seed=0):
    """A :class:`_Run` with ``count`` copies of the molecule's fingerprint as targets."""
    fp = torch.as_tensor(describe(spec, [atoms])[0])
    problem = Problem(
        fn=fingerprint_fn(spec, atoms.numbers),
        targets=fp[None].repeat(count, 1),
        numbers=atoms.numbers,
        tol=TOL,
    )
    return _Run(MiladReconstruction(), problem, torch.Generator().manual_seed(seed))


def test_atoms_fitted_order_by_order_reach_the_target():
    atoms = centred("CH3CH2OCH3")
    run = one_run(atoms, preset("milad"), 6)
    rows = torch.arange(6)
    x, w = run.atoms_by_order(rows)
    score = run.score(x, w, rows)
    # all six end exactly at the target here (12 of 12 with twelve starts)
    hits = torch.nonzero(score < TOL).flatten()
    assert len(hits) >= 4
    for i in hits:
        found = Atoms([1] * len(atoms), positions=x[i].numpy())
        assert structure_rmsd(one_element(atoms), found) < 0.1
    # control: the random atoms they start from (same generator state) are far from it
    run.gen.manual_seed(0)
    r2 = run.model.mean_square_radius(run.phi)
    x0 = (
        torch.randn(6, len(atoms), 3, generator=run.gen, dtype=x.dtype)
        * (r2 / 3).sqrt()[:, None, None]
    )
    assert (run.score(x0, w, rows) > 1e-2).all()


def test_later_rounds_start_from_each_attempts_best_atoms(monkeypatch):
    atoms = centred("CH3OH")
    spec = preset("milad")
    fp = torch.as_tensor(describe(spec, [atoms])[0])
    problem = Problem(
        fn=fingerprint_fn(spec, atoms.numbers), targets=fp[None], numbers=atoms.numbers, tol=0.0
    )
    strategy = MiladReconstruction(trials=1, rounds=4, initial="random")
    run = _Run(strategy, problem, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    shapes = [torch.randn(1, len(atoms), 3, generator=gen, dtype=torch.float64) for _ in range(4)]
    rmsds = iter([1.0, 2.0, 0.5, 3.0])  # round 1 is worse than round 0, round 2 best
    starts, made = [], iter(shapes)

    def fit_moments(self, model, phi, generator, *, start=None):
        starts.append(start)
        return torch.zeros(phi.shape[0], model.n_moments, dtype=phi.dtype), torch.ones(1)

    monkeypatch.setattr(MiladReconstruction, "fit_moments", fit_moments)
    monkeypatch.setattr(run, "atoms_round", lambda y, tg: (next(made), run.given_w[None]))
    monkeypatch.setattr(run, "finish", lambda x, w, tg: (x, w))
    monkeypatch.setattr(
        run, "fingerprint_rmsd", lambda x, w, tg, **kw: torch.tensor([next(rmsds)], dtype=x.dtype)
    )
    out = run.outcome()

    def moments_of(x):
        return run.model.moments(x, run.given_w[None])

    assert starts[0] is None
    assert torch.equal(starts[1], moments_of(shapes[0]))
    # round 1 was worse, so round 2 starts from round 0's atoms again, not round 1's
    assert torch.equal(starts[2], moments_of(shapes[0]))
    assert not torch.allclose(starts[2], moments_of(shapes[1]))
    assert torch.equal(starts[3], moments_of(shapes[2]))
    assert out.fingerprint_rmsd[0] == 0.5 and np.allclose(out.positions[0], shapes[2][0])


def test_recentre_moves_attempts_into_the_fingerprints_frame():
    atoms = centred("CH3CH2OH")
    spec = FingerprintSpec(descriptor=MiladSpec(cutoff=5.0, centre="miniball"), pooling="none")
    import miniball

    centre, _ = miniball.get_bounding_ball(atoms.positions)
    atoms.positions -= centre  # the target, as the fingerprint sees it
    run = one_run(atoms, spec, 1)
    x = torch.tensor(atoms.positions + [0.05, -0.03, 0.02])[None]
    w = torch.ones(1, len(atoms), dtype=x.dtype)
    rows = torch.arange(1)
    # negative control: shifted, the invariants about the origin are off
    assert run.score(x, w, rows) > 1e-3
    moved = run.recentre(x)
    assert torch.allclose(moved, torch.tensor(atoms.positions)[None], atol=1e-9)
    assert run.score(moved, w, rows) < 1e-10


@pytest.mark.parametrize("name", ["NH3", "CH3OH", "CH3CH2OH"])
def test_positions_recovered(name):
    atoms = centred(name)
    fp = describe("milad", [atoms])[0]
    (res,) = invert(
        [Target(name=name, numbers=atoms.numbers, fingerprint=fp)],
        "milad",
        MiladReconstruction(),
        tol=TOL,
    )
    assert res.converged and res.fingerprint_rmsd < TOL
    # the fingerprint of what came back, computed afresh
    assert np.sqrt(np.mean((describe("milad", [res.atoms])[0] - fp) ** 2)) < TOL
    # positions only: every atom is alike
    assert structure_rmsd(one_element(atoms), one_element(res.atoms)) < 0.1


def test_species_recovered_from_one_fingerprint():
    atoms = centred("H2CO")
    spec = preset("milad-species")
    fp = describe(spec, [atoms])[0]
    shuffled = np.roll(atoms.numbers, 1)  # the composition given is not used but for N
    (res,) = invert(
        [Target(name="m", numbers=shuffled, fingerprint=fp)],
        spec,
        MiladReconstruction(species="fit"),
        tol=TOL,
    )
    assert res.converged
    assert sorted(res.atoms.numbers) == sorted(atoms.numbers)
    assert structure_rmsd(atoms, res.atoms) < 0.1
    assert np.sqrt(np.mean((describe(spec, [res.atoms])[0] - fp) ** 2)) < TOL


@pytest.mark.parametrize("runs", [4, 0])
def test_composition_runs_rescue_a_species_fit_that_ended_open(runs):
    # one attempt, one round, no walk and no bond candidates: the free-weights fit of
    # acetaldehyde ends open; rerun as each composition its total weight allows (a known
    # composition), it is solved - and without the reruns (the control) it stays open
    atoms = centred("CH3CHO")
    spec = preset("milad-species")
    fp = describe(spec, [atoms])[0]
    options = dict(rounds=1, trials=1, species_walk=0, bonds=False, composition_runs=runs)
    (res,) = invert(
        [Target(name="m", numbers=atoms.numbers, fingerprint=fp)],
        spec,
        MiladReconstruction(species="fit", **options),
        tol=TOL,
        seed=0,
    )
    if runs:
        assert res.converged
        assert sorted(res.atoms.numbers) == sorted(atoms.numbers)
        assert structure_rmsd(atoms, res.atoms) < 0.1
        assert np.sqrt(np.mean((describe(spec, [res.atoms])[0] - fp) ** 2)) < TOL
    else:
        assert not res.converged


def test_species_from_a_second_fingerprint():
    atoms = centred("CH3CH2OH")
    unit, species = preset("milad"), preset("milad-species")
    target = Target(
        name="e",
        numbers=atoms.numbers,
        fingerprint=describe(unit, [atoms])[0],
        species_fingerprint=describe(species, [atoms])[0],
    )
    (res,) = invert([target], unit, MiladReconstruction(), tol=TOL, species_spec=species)
    assert res.converged
    assert sorted(res.atoms.numbers) == sorted(atoms.numbers)
    assert structure_rmsd(atoms, res.atoms) < 0.1


def two_fingerprint_run(atoms, count):
    """A :class:`_Run` with ``count`` copies of the molecule's milad (positions) and
    milad-species (species) fingerprints as targets."""
    unit, species = preset("milad"), preset("milad-species")
    problem = Problem(
        fn=fingerprint_fn(unit, atoms.numbers),
        targets=torch.as_tensor(describe(unit, [atoms])[0])[None].repeat(count, 1),
        numbers=atoms.numbers,
        tol=TOL,
        species_fn=fingerprint_fn(species, atoms.numbers),
        species_targets=torch.as_tensor(describe(species, [atoms])[0])[None].repeat(count, 1),
    )
    return _Run(MiladReconstruction(), problem, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("exact_open", [True, False])
def test_species_after_the_rounds_weigh_every_attempts_best_positions(exact_open):
    # three attempts: the molecule's own positions, the same 0.05 A off, and one that never
    # produced atoms (infinite RMSD, skipped); the species come from the second
    # fingerprint for each, and the target takes the best - with the exact attempt
    # marked as never produced (the control), nothing reaches the tolerance
    atoms = centred("CH3CH2OH")
    x0 = torch.as_tensor(atoms.positions)[None]
    gen = torch.Generator().manual_seed(0)
    x_att = torch.cat([x0, x0 + 0.05 * torch.randn(x0.shape, generator=gen, dtype=x0.dtype)])
    x_att = torch.cat([x_att, torch.zeros_like(x0)])
    run = two_fingerprint_run(atoms, 1)
    att_rmsd = torch.tensor([math.inf if exact_open else 1e-15, 1e-3, math.inf])
    best_x, best_w = torch.zeros(1, len(atoms), 3, dtype=x0.dtype), run.given_w[None].clone()
    best_rmsd = torch.full((1,), math.inf, dtype=x0.dtype)
    run.species_after(x_att, att_rmsd, torch.zeros(3, dtype=torch.long), best_x, best_w, best_rmsd)
    assert torch.isfinite(best_rmsd[0])
    if exact_open:
        assert best_rmsd[0] > TOL
        return
    assert best_rmsd[0] < TOL
    got = [run.element[round(float(v), 9)] for v in best_w[0]]
    assert got == atoms.numbers.tolist()  # positions held in order, so elements in order
    assert torch.allclose(best_x[0], x0[0], atol=1e-3)


def test_species_polish_finishes_positions_the_species_fingerprint_sees_off():
    # the molecule 0.002 A off, elements right: open on the species fingerprint, and a long
    # polish against it finishes it; a row 0.5 A off (RMSD above 1e-2) is left alone
    atoms = centred("CH3CH2OCH3")
    species = preset("milad-species")
    run = two_fingerprint_run(atoms, 2)
    x0 = torch.as_tensor(atoms.positions)[None]
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn((2, *x0.shape[1:]), generator=gen, dtype=x0.dtype)
    x = x0 + torch.tensor([0.002, 0.5], dtype=x0.dtype)[:, None, None] * noise
    w = torch.as_tensor(species.descriptor.weights_for(atoms.numbers))[None].repeat(2, 1)
    tg = torch.arange(2)
    rmsd = run.fingerprint_rmsd(x, w, tg)
    assert TOL < rmsd[0] < 1e-2 and rmsd[1] > 1e-2
    xp, rp = run.species_polish(x, w, rmsd, tg)
    assert rp[0] < TOL
    assert structure_rmsd(atoms, Atoms(atoms.numbers, positions=xp[0].numpy())) < 0.01
    assert torch.equal(xp[1], x[1]) and rp[1] == rmsd[1]


@pytest.mark.parametrize("open_", [True, False])
def test_last_bonds_reads_the_elements_from_the_final_atoms(open_):
    # propane's atoms 0.05 A off carrying C H9 O (the same total weight: C + C = H + O,
    # a composition no molecule has); read from the graph of those atoms, the hydrogens
    # go on the eight atoms of fewest neighbours and the refit solves it - a target
    # marked done (the control) is left as it is
    atoms = centred("C3H8")
    spec = preset("milad-species")
    fp = torch.as_tensor(describe(spec, [atoms])[0])
    problem = Problem(
        fn=fingerprint_fn(spec, atoms.numbers), targets=fp[None], numbers=atoms.numbers, tol=TOL
    )
    run = _Run(MiladReconstruction(species="fit"), problem, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(4)
    x = torch.as_tensor(atoms.positions)[None]
    x = x + 0.05 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    wrong = atoms.numbers.copy()
    wrong[[0, 1]] = [8, 1]  # two carbons to oxygen and hydrogen
    assert sorted(wrong) != sorted(atoms.numbers)
    w = torch.as_tensor(spec.descriptor.weights_for(wrong))[None]
    assert torch.isclose(w.sum(), torch.as_tensor(spec.descriptor.weights_for(atoms.numbers)).sum())
    rmsd = run.fingerprint_rmsd(x, w, torch.arange(1))
    assert rmsd[0] > TOL
    best_x, best_w, best_rmsd = x.clone(), w.clone(), rmsd.clone()
    run.last_bonds(best_x, best_w, best_rmsd, torch.tensor([not open_]))
    if not open_:
        assert torch.equal(best_x, x) and torch.equal(best_w, w)
        return
    assert best_rmsd[0] < TOL
    got = sorted(run.element[round(float(v), 9)] for v in best_w[0])
    assert got == sorted(atoms.numbers)
    found = Atoms([run.element[round(float(v), 9)] for v in best_w[0]], positions=best_x[0].numpy())
    assert structure_rmsd(atoms, found) < 0.01


def test_discrete_weight_search_restores_snapped_noisy_weights():
    from types import SimpleNamespace

    from structrecon.inversion.milad import _Run

    atoms = centred("CH3CONH2")
    spec = preset("milad-species").descriptor
    model = MiladModel(spec)
    x = torch.tensor(atoms.positions)[None]
    truth = torch.tensor(spec.weights_for(atoms.numbers))[None]
    phi = model.invariants_of(model.moments(x, truth))
    allowed = torch.tensor(sorted(spec.weights), dtype=torch.float64)
    # continuous weights with noise, snapped: some atoms get the wrong element (the
    # greedy search restores about 9 in 10 such starts; this seed is one of them)
    g = torch.Generator().manual_seed(6)
    noisy = truth + 0.12 * torch.randn(truth.shape, generator=g, dtype=torch.float64)
    start = _snap_weights(noisy, allowed, truth.sum(1))
    assert int((start != truth).sum()) == 4  # negative control: four atoms start wrong
    found = _Run.discrete_weights(SimpleNamespace(allowed=allowed), model, x, start, phi)
    assert torch.equal(found, truth)


def test_pair_moves_are_every_weight_preserving_change_of_two_atoms():
    allowed = torch.tensor([1.1, 1.3, 1.5, 1.7, 1.9], dtype=torch.float64)
    rows = torch.tensor([[1.1, 1.3, 1.3, 1.7, 1.9], [1.5, 1.5, 1.1, 1.1, 1.9]], dtype=torch.float64)
    n = rows.shape[1]
    ia, ib = torch.triu_indices(n, n, offset=1)
    got, ok = _pair_moves(rows, ia, ib, allowed)  # both rows in one batch
    assert got.shape == (2, len(ia) * len(allowed), n) and ok.shape == got.shape[:2]
    for w, cands, mask in zip(rows, got, ok):
        # brute force over all assignments that differ from w in exactly two atoms
        want = set()
        for i in range(n):
            for j in range(i + 1, n):
                for a in allowed.tolist():
                    for b in allowed.tolist():
                        if a != w[i] and b != w[j] and abs(a + b - w[i] - w[j]) < 1e-9:
                            c = w.clone()
                            c[i], c[j] = a, b
                            want.add(tuple(round(v, 9) for v in c.tolist()))
        found = [tuple(round(v, 9) for v in c.tolist()) for c in cands[mask]]
        assert len(found) == len(set(found)) == len(want) > 0
        assert set(found) == want


@pytest.mark.parametrize("walk", [8, 0])
def test_species_walk_corrects_elements_the_positions_adapted_to(walk):
    atoms = centred("CH3CONH2")
    spec = preset("milad-species")
    fp = torch.as_tensor(describe(spec, [atoms])[0])
    problem = Problem(
        fn=fingerprint_fn(spec, atoms.numbers),
        targets=fp[None],
        numbers=atoms.numbers,
        tol=TOL,
        # the paper's repulsion: with the default r_min 0.9 the refit below lands in
        # another near miss, where the walk ends at other elements
        repulsion=Repulsion(r_min=0.55),
    )
    strategy = MiladReconstruction(species="fit", species_walk=walk)
    run = _Run(strategy, problem, torch.Generator().manual_seed(0))
    truth = torch.tensor(spec.descriptor.weights_for(atoms.numbers))[None]
    # two wrong elements, weight kept (a carbon made hydrogen, the oxygen made nitrogen:
    # 1.3 + 1.5 = 1.1 + 1.7), and the positions fitted to them
    wrong = truth.clone()
    carbon = int(np.nonzero(atoms.numbers == 6)[0][0])
    oxygen = int(np.nonzero(atoms.numbers == 8)[0][0])
    wrong[0, carbon], wrong[0, oxygen] = 1.1, 1.7
    rows = torch.zeros(1, dtype=torch.long)
    x, _ = run.refit(torch.tensor(atoms.positions)[None], wrong, rows, 300)
    before = run.score(x, wrong, rows)
    assert 1e-6 < before < 1e-2  # a near miss, within the walk's reach
    # a search with the positions held cannot see it: at the positions fitted to the
    # wrong elements, the right ones look worse
    assert run.score(x, truth, rows) > before
    x2, w2 = run.species_search(x.clone(), wrong.clone(), rows)
    if walk:
        assert torch.equal(w2, truth)
        # the walk's short refits leave the rest to the polish that follows
        _, after = run.refit(x2, w2, rows, 300)
        assert after < 1e-10
    else:  # control: without the walk nothing changes
        assert torch.equal(w2, wrong)


SPECIES_W = {1: 1.1, 6: 1.3, 8: 1.5, 7: 1.7, 9: 1.9}  # the milad-species preset's


@pytest.mark.parametrize("formula", ["C2H6O", "C2H5NO", "C9H20", "C7H10N2"])
def test_valence_compositions_against_brute_force(formula):
    counts = Atoms(formula).symbols.formula.count()
    z = {"H": 1, "C": 6, "O": 8, "N": 7, "F": 9}
    n = sum(counts.values())
    total = sum(SPECIES_W[z[e]] * c for e, c in counts.items())
    species, weights = list(SPECIES_W), list(SPECIES_W.values())
    valence = {1: 1, 6: 4, 8: 2, 7: 3, 9: 1}
    want = set()
    for c in np.ndindex(*(n + 1,) * 4):  # H, C, O, N; F takes the rest
        c = (*c, n - sum(c))
        if c[-1] < 0 or abs(np.dot(c, weights) - total) > 0.05:
            continue
        bonds = sum(ci * valence[zi] for ci, zi in zip(c, species))
        if bonds % 2 == 0 and bonds >= 2 * (n - 1):
            want.add(c)
    got = {tuple(c) for c in valence_compositions(n, total, species, weights).tolist()}
    assert got == want
    truth = tuple(counts.get(e, 0) for e in ("H", "C", "O", "N", "F"))
    assert truth in got
    if formula == "C9H20":
        # C7H21O weighs the same but has 51 valences, too few to connect 29 atoms
        assert abs(np.dot((21, 7, 1, 0, 0), weights) - total) < 1e-9
        assert got == {truth}
    # an element without a valence in the table: no candidates at all
    assert len(valence_compositions(n, total, species + [26], weights + [2.1])) == 0


def test_bond_assignment_puts_hydrogens_on_the_terminal_atoms():
    atoms = centred("C3H8")
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor(atoms.positions) + 0.1 * torch.randn(len(atoms), 3, generator=gen)
    truth = torch.tensor([SPECIES_W[z] for z in atoms.numbers], dtype=torch.float64)
    # fitted weights that do not tell the elements apart
    w_fit = 1.2 + 0.05 * torch.randn(len(atoms), generator=gen, dtype=torch.float64)
    composition = truth.sort().values
    got = _bond_assignment(x, w_fit, composition, light=8)
    assert torch.equal(got, truth)
    # control: by the fitted weights' rank alone, the elements come out wrong
    assert not torch.equal(_bond_assignment(x, w_fit, composition, light=0), truth)


@pytest.mark.parametrize("name", ["CH3CH2OH", "CH3CH2NH2", "CH3CH2OCH3", "C3H9N"])
def test_bond_assignment_by_valence_puts_oxygen_and_nitrogen_on_fewer_neighbours(name):
    atoms = centred(name)
    gen = torch.Generator().manual_seed(1)
    x = torch.tensor(atoms.positions) + 0.05 * torch.randn(len(atoms), 3, generator=gen)
    truth = torch.tensor([SPECIES_W[z] for z in atoms.numbers], dtype=torch.float64)
    # fitted weights with the heavy atoms' order reversed: the heteroatom lightest
    w_fit = truth.clone()
    heavy = torch.nonzero(truth > SPECIES_W[1]).flatten()
    w_fit[heavy] = truth[heavy].max() + truth[heavy].min() - truth[heavy]
    composition = truth.sort().values
    light = int((atoms.numbers == 1).sum())
    valence = [{1: 1, 6: 4, 7: 3, 8: 2}[z] for z in sorted(atoms.numbers, key=SPECIES_W.get)]
    assert torch.equal(_bond_assignment(x, w_fit, composition, light, valence), truth)
    # control: by the fitted weights' rank, the heavy elements come out wrong
    assert not torch.equal(_bond_assignment(x, w_fit, composition, light), truth)


RING6 = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (0, 5)]


@pytest.mark.parametrize(
    "excess, edges, ok",
    [
        ([1, 1], [(0, 1)], True),  # C=C
        ([2, 2], [(0, 1)], True),  # C#C
        ([3, 3], [(0, 1)], False),  # no quadruple bonds
        ([1, 0], [(0, 1)], False),  # a radical
        ([1, 1, 1, 1], [(0, 1), (1, 2), (2, 3)], True),  # butadiene
        ([1, 0, 1], [(0, 1), (1, 2)], False),  # free valences on atoms not bonded
        ([1, 2, 1], [(0, 1), (1, 2)], True),  # O=C=O
        ([1] * 6, RING6, True),  # benzene
        ([1] * 5, RING6[:4] + [(0, 4)], False),  # an odd ring: one left over
        ([-1, 1], [(0, 1)], False),  # more neighbours than valence
    ],
)
def test_lewis_ok_pairs_free_valences_into_multiple_bonds(excess, edges, ok):
    assert _lewis_ok(excess, edges) is ok


@pytest.mark.parametrize("name", ["CH3CONH2", "C5H5N", "HCOOCH3", "CH3CN", "C4H4O", "CH3COOH"])
def test_lewis_assignments_keep_the_molecule_and_drop_what_valences_forbid(name):
    atoms = centred(name)
    x = torch.tensor(atoms.positions)
    truth = torch.tensor([SPECIES_W[z] for z in atoms.numbers], dtype=torch.float64)
    composition = truth.sort().values
    light = int((atoms.numbers == 1).sum())
    valence = [{1: 1, 6: 4, 7: 3, 8: 2}[z] for z in sorted(atoms.numbers, key=SPECIES_W.get)]
    # fitted weights with the heavy atoms' order reversed: they tell hydrogens apart only
    w_fit = truth.clone()
    heavy = torch.nonzero(truth > SPECIES_W[1]).flatten()
    w_fit[heavy] = truth[heavy].max() + truth[heavy].min() - truth[heavy]
    got = _lewis_assignments(x, w_fit, composition, light, valence)
    assert any(torch.equal(row, truth) for row in got)
    # every row has the composition, and the hydrogens where the molecule has them
    assert torch.equal(got.sort(dim=1).values, composition.expand_as(got))
    assert bool((got[:, atoms.numbers == 1] == SPECIES_W[1]).all())
    # control: of all the ways to place the heavy elements, the valences rule some out
    heavy = [int(z) for z in atoms.numbers if z != 1]
    ways = math.factorial(len(heavy))
    for z in set(heavy):
        ways //= math.factorial(heavy.count(z))
    assert len(got) < ways


def test_finish_judges_attempts_in_the_fingerprints_frame():
    # a molecule reaching beyond the cutoff: moving the centre costs a lot of RMSD
    atoms = centred("C3H8")
    spec = FingerprintSpec(descriptor=MiladSpec(cutoff=2.0, centre="miniball"), pooling="none")
    atoms.positions = _centring(torch.tensor(atoms.positions)[None], "miniball")[0][0].numpy()
    gen = torch.Generator().manual_seed(1)
    x = torch.tensor(atoms.positions)[None] + 1e-5 * torch.randn(
        1, len(atoms), 3, generator=gen, dtype=torch.float64
    )
    fp = torch.as_tensor(describe(spec, [atoms])[0])
    w = torch.ones(1, len(atoms), dtype=x.dtype)
    rows = torch.zeros(1, dtype=torch.long)
    probe = one_run(atoms, spec, 1)
    score, framed = probe.score(x, w, rows), probe.fingerprint_rmsd(x, w, rows)
    assert framed > 1.05 * score  # the fingerprint's frame is the stricter here
    # a tolerance between the two: in the moments' frame the attempt looks done
    tol = float(20 * score * framed / (score + framed))
    problem = Problem(
        fn=fingerprint_fn(spec, atoms.numbers), targets=fp[None], numbers=atoms.numbers, tol=tol
    )
    run = _Run(MiladReconstruction(), problem, torch.Generator().manual_seed(0))
    assert score < 0.1 * tol < framed
    x2, w2 = run.finish(x.clone(), w.clone(), rows)
    assert run.fingerprint_rmsd(x2, w2, rows) < 1e-10
    # control: with the tolerance above both, the attempt is left as it is
    problem.tol = float(20 * framed)
    run = _Run(MiladReconstruction(), problem, torch.Generator().manual_seed(0))
    x3, _ = run.finish(x.clone(), w.clone(), rows)
    assert torch.equal(x3, x)


def ethanol_near_miss(off, seed, **options):
    """A species-fit run on ethanol and a round's state near it: atoms ``off`` A and
    weights 0.1 off, the weights' rank as elements, the positions refitted to those."""
    return near_miss("CH3CH2OH", off, seed, **options)


def near_miss(name, off, seed, *, reverse=False, **options):
    """As :func:`ethanol_near_miss` for molecule ``name``; ``reverse``: the fitted weights
    of the heavy atoms in reverse order (hydrogens still the lightest)."""
    atoms = centred(name)
    n = len(atoms)
    spec = preset("milad-species")
    fp = torch.as_tensor(describe(spec, [atoms])[0])
    problem = Problem(
        fn=fingerprint_fn(spec, atoms.numbers), targets=fp[None], numbers=atoms.numbers, tol=TOL
    )
    strategy = MiladReconstruction(species="fit", **options)
    run = _Run(strategy, problem, torch.Generator().manual_seed(0))
    rows = torch.zeros(1, dtype=torch.long)
    truth = torch.tensor([SPECIES_W[z] for z in atoms.numbers], dtype=torch.float64)[None]
    gen = torch.Generator().manual_seed(seed)
    x_fit = torch.tensor(atoms.positions)[None]
    x_fit = x_fit + off * torch.randn(1, n, 3, generator=gen, dtype=torch.float64)
    w_fit = truth + 0.1 * torch.randn(1, n, generator=gen, dtype=torch.float64)
    if reverse:
        heavy = torch.nonzero(truth[0] > SPECIES_W[1]).flatten()
        w_fit[0, heavy] = truth[0, heavy].max() + truth[0, heavy].min() - truth[0, heavy]
    w_rank = run.discretise(w_fit, rows)
    x, score = run.refit(x_fit, w_rank, rows, 300)
    return atoms, run, rows, truth, (x_fit, w_fit), (x, w_rank, score)


def test_bond_candidates_rescue_a_near_miss():
    atoms, run, rows, truth, (x_fit, w_fit), (x, w_rank, before) = ethanol_near_miss(0.1, 2)
    # control: the rank of the fitted weights (4 atoms wrong), positions refitted, a miss
    assert int(((w_rank - truth).abs() > 1e-9).sum()) == 4
    assert before > 1e-4
    x2, w2 = run.bond_candidates(x, w_rank, x_fit, w_fit, rows)
    assert torch.equal(w2, truth)
    assert run.score(x2, w2, rows) < 1e-6
    # the longer polish that ends a round takes it the rest of the way
    x3, after = run.refit(x2, w2, rows, 1000)
    assert after < 1e-10
    assert structure_rmsd(atoms, Atoms(atoms.numbers, positions=x3[0].numpy())) < 1e-4


@pytest.mark.parametrize("lewis", [24, 0])
def test_lewis_candidates_rescue_what_neighbour_counts_leave_ambiguous(lewis):
    # acetamide: the carbonyl C and the N both have three neighbours, and the fitted
    # weights put the heavier element on the wrong one; only the valences pairing up
    # into the C=O bond say which is which
    _, run, rows, truth, (x_fit, w_fit), (x, w_rank, before) = near_miss(
        "CH3CONH2", 0.05, 1, reverse=True, bond_lewis=lewis
    )
    assert not torch.equal(w_rank, truth)
    assert before > 1e-4
    x2, w2 = run.bond_candidates(x, w_rank, x_fit, w_fit, rows)
    if lewis:
        assert torch.equal(w2, truth)
        assert run.score(x2, w2, rows) < 1e-6
    else:  # control: the neighbour-count and weight-rank candidates stay wrong
        assert not torch.equal(w2, truth)
        assert run.score(x2, w2, rows) > 1e-5


@pytest.mark.parametrize("cycles", [2, 1])
def test_a_second_bond_cycle_reads_the_graph_of_the_refitted_atoms(cycles):
    # atoms 0.25 A off: the graph of these atoms puts some elements wrong
    _, run, rows, truth, (x_fit, w_fit), (x, w_rank, _) = ethanol_near_miss(
        0.25, 4, bond_cycles=cycles, bond_lewis=0
    )
    x2, w2 = run.bond_candidates(x, w_rank, x_fit, w_fit, rows)
    if cycles == 2:  # the graph of the refitted atoms is right
        assert torch.equal(w2, truth)
        assert run.score(x2, w2, rows) < 1e-8
    else:  # control: one cycle stops at the first graph's elements
        assert not torch.equal(w2, truth)
        assert run.score(x2, w2, rows) > 1e-5


def test_known_composition_with_species_weights_orders_the_atoms():
    atoms = centred("CH3OH")
    spec = preset("milad-species")
    fp = describe(spec, [atoms])[0]
    (res,) = invert(
        [Target(name="m", numbers=atoms.numbers, fingerprint=fp)],
        spec,
        MiladReconstruction(),
        tol=TOL,
    )
    assert res.converged
    assert list(res.atoms.numbers) == list(atoms.numbers)
    # atom i sits where an atom of numbers[i] is: like-atom permutations only
    assert structure_rmsd(atoms, res.atoms) < 0.1


def test_wrong_number_of_atoms_does_not_converge():
    # negative control: the fingerprint of water asked for as four atoms
    water = centred("H2O")
    fp = describe("milad", [water])[0]
    (res,) = invert(
        [Target(name="w", numbers=np.array([8, 1, 1, 1]), fingerprint=fp)],
        "milad",
        MiladReconstruction(trials=1, rounds=1),
        tol=TOL,
    )
    assert not res.converged and res.fingerprint_rmsd > 1e-3


def test_wrong_descriptor_is_a_one_line_error():
    atoms = centred("H2O")
    fp = describe("acsf", [atoms])[0]
    with pytest.raises(StructreconError, match="needs a MILAD fingerprint") as err:
        invert(
            [Target(name="w", numbers=atoms.numbers, fingerprint=fp)], "acsf", MiladReconstruction()
        )
    assert "\n" not in str(err.value)


def test_species_fit_needs_species_weights():
    atoms = centred("H2O")
    fp = describe("milad", [atoms])[0]
    with pytest.raises(StructreconError, match="weights elements differently") as err:
        invert(
            [Target(name="w", numbers=atoms.numbers, fingerprint=fp)],
            "milad",
            MiladReconstruction(species="fit"),
        )
    assert "\n" not in str(err.value)


def test_cli_species_options(tmp_path, capsys):
    import ase.io

    from structrecon.cli import main

    atoms = centred("H2O")
    ase.io.write(tmp_path / "w.extxyz", atoms)
    assert (
        main(
            [
                "describe",
                str(tmp_path / "w.extxyz"),
                "-d",
                "milad-species",
                "-o",
                str(tmp_path / "fp.npz"),
            ]
        )
        == 0
    )
    out = tmp_path / "out.extxyz"
    assert (
        main(
            [
                "invert",
                str(tmp_path / "fp.npz"),
                "-o",
                str(out),
                "--method",
                "milad",
                "--fit-species",
                "--tol",
                "1e-6",
                "--quiet",
            ]
        )
        == 0
    )
    got = ase.io.read(out)
    assert sorted(got.numbers) == [1, 1, 8] and got.info["converged"]
    code = main(
        ["invert", str(tmp_path / "fp.npz"), "-o", str(tmp_path / "x.extxyz"), "--fit-species"]
    )
    assert code != 0
    assert "need --method milad" in capsys.readouterr().err
    for flag in ("--no-bonds", "--no-restraints"):
        code = main(["invert", str(tmp_path / "fp.npz"), "-o", str(tmp_path / "x.extxyz"), flag])
        assert code != 0
        assert "need --method milad" in capsys.readouterr().err


def test_species_fingerprints_must_match_the_targets():
    from structrecon.fingerprints import FingerprintSet
    from structrecon.inversion import targets_from_fingerprints

    def fps(names, numbers):
        k = len(names)
        return FingerprintSet(
            spec=preset("milad-species"),
            names=names,
            numbers=[np.array(n) for n in numbers],
            cells=np.zeros((k, 3, 3)),
            pbc=np.zeros((k, 3), dtype=bool),
            fingerprints=np.zeros((k, 117)),
        )

    main = fps(["a", "b"], [[8, 1, 1], [7, 1, 1, 1]])
    targets = targets_from_fingerprints(
        main, species_fps=fps(["a", "b"], [[8, 1, 1], [7, 1, 1, 1]])
    )
    assert targets[1].species_fingerprint.shape == (117,)
    with pytest.raises(StructreconError, match="same structures"):
        targets_from_fingerprints(main, species_fps=fps(["a", "c"], [[8, 1, 1], [7, 1, 1, 1]]))
    with pytest.raises(StructreconError, match="same structures"):
        targets_from_fingerprints(main, species_fps=fps(["a", "b"], [[8, 1, 1], [6, 1, 1, 1]]))
    # a species spec without species fingerprints in the targets
    with pytest.raises(StructreconError, match="species fingerprint missing"):
        invert(
            targets_from_fingerprints(main),
            "milad",
            MiladReconstruction(),
            species_spec="milad-species",
        )


@pytest.mark.parametrize("centre", ["miniball", "centroid", "origin"])
def test_centring_jacobian_matches_central_differences(centre, rng):
    x = torch.tensor(rng.normal(scale=1.5, size=(2, 7, 3)))
    moved, jac = _centring(x, centre)
    assert torch.allclose(moved, centre_positions(x, centre))
    eps = 1e-6
    for b in range(2):
        num = torch.zeros(3, 7, 3, dtype=x.dtype)
        for a in range(7):
            for d in range(3):
                xp, xm = x[b].clone(), x[b].clone()
                xp[a, d] += eps
                xm[a, d] -= eps
                cp = xp - centre_positions(xp[None], centre)[0]  # the centre, in every row
                cm = xm - centre_positions(xm[None], centre)[0]
                num[:, a, d] = (cp[0] - cm[0]) / (2 * eps)
        assert torch.allclose(jac[b], num, atol=1e-7)
    if centre == "miniball":  # only the atoms on the sphere move the centre
        assert 2 <= int((jac[0].abs().sum(dim=(0, 2)) > 0).sum()) <= 4


def _bonds(atoms):
    """Pairs (i < j) closer than 1.2 times the sum of their covalent radii."""
    from ase.data import covalent_radii

    r = covalent_radii[atoms.numbers]
    d = atoms.get_all_distances()
    i, j = np.nonzero(np.triu(d < 1.2 * (r[:, None] + r[None, :]), k=1))
    return set(zip(i.tolist(), j.tolist()))


@pytest.mark.parametrize("name, n_bonds", [("C3H8", 10), ("C6H6", 12), ("CH3CH2OH", 8)])
def test_restraints_bond_the_molecule_at_chemical_lengths_and_angles(name, n_bonds):
    atoms = molecule(name)
    x = torch.tensor(atoms.positions)
    light = torch.tensor(atoms.numbers == 1)
    pairs, dist = _restraints(x, light, atoms.numbers)
    found = {tuple(sorted(p)) for p in pairs.tolist()}
    bonds = _bonds(atoms)
    assert len(bonds) == n_bonds
    assert bonds <= found
    # the other pairs are the ends of two bonds at an atom of 3 or 4 neighbours
    ends = set()
    for c in range(len(atoms)):
        others = sorted(a + b - c for a, b in bonds if c in (a, b))
        if len(others) in (3, 4):
            ends |= {(p, q) for k, p in enumerate(others) for q in others[k + 1 :]}
    assert found - bonds == ends
    # the molecule's own geometry is close to what they ask for
    off = ((x[pairs[:, 0]] - x[pairs[:, 1]]).norm(dim=-1) - dist).abs()
    is_bond = torch.tensor([tuple(sorted(p)) in bonds for p in pairs.tolist()])
    assert off[is_bond].max() < 0.04
    assert off[~is_bond].max() < 0.1
    # control: a stretched C-H bond is off by what it was stretched
    h = int(torch.nonzero(light)[0])
    c = next(b if a == h else a for a, b in bonds if h in (a, b))
    x2 = x.clone()
    x2[h] = x[c] + (x[h] - x[c]) * 1.4 / (x[h] - x[c]).norm()
    pairs2, dist2 = _restraints(x2, light, atoms.numbers)
    row = [k for k, p in enumerate(pairs2.tolist()) if sorted(p) == sorted([h, c])][0]
    assert float((x2[h] - x2[c]).norm() - dist2[row]) > 0.25
    # elements unknown: every bond to a hydrogen asks for the C-H length
    pairs3, dist3 = _restraints(x, light)
    assert torch.equal(pairs3, pairs)
    to_h = light[pairs3].any(-1) & torch.tensor(
        [tuple(sorted(p)) in bonds for p in pairs3.tolist()]
    )
    assert torch.all(dist3[to_h] == 1.09)


def test_restraint_residuals_jacobian(rng):
    x = torch.tensor(rng.normal(size=(2, 5, 3)), dtype=torch.float64, requires_grad=True)
    pairs = torch.tensor([[[0, 1], [2, 4], [1, 3]], [[4, 0], [3, 2], [0, 2]]])
    dist = torch.tensor(rng.uniform(1, 2, size=(2, 3)))
    scale = torch.tensor([[1.0, 0.5, 0.0], [2.0, 1.0, 1.0]], dtype=torch.float64)
    res, jac = _restraint_residuals(x, pairs, dist, scale)
    auto = torch.autograd.functional.jacobian(
        lambda y: _restraint_residuals(y, pairs, dist, scale)[0], x
    )  # [2, 3, 2, 5, 3]
    assert torch.allclose(jac, torch.stack([auto[b, :, b] for b in range(2)]), atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda y: _restraint_residuals(y, pairs, dist, scale)[0], (x,), eps=1e-6
    )
    assert torch.equal(jac[0, 2], torch.zeros(5, 3))  # a pair of scale 0 pulls nothing


@pytest.mark.parametrize("restrain", [True, False])
def test_restraints_finish_a_centrosymmetric_near_miss(restrain):
    # trans-butane is centrosymmetric: its odd-order moments vanish and the invariants
    # pin some displacements down only at second order, so a polish from 0.1 A off
    # stalls short of the target; chemical restraints hold the atoms where the
    # molecule has them while the polish finishes
    atoms = molecule("trans-butane")
    spec = preset("milad")
    atoms.positions = _centring(torch.tensor(atoms.positions)[None], "miniball")[0][0].numpy()
    fp = torch.as_tensor(describe(spec, [atoms])[0])
    problem = Problem(
        fn=fingerprint_fn(spec, atoms.numbers), targets=fp[None], numbers=atoms.numbers, tol=TOL
    )
    rows = torch.zeros(1, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor(atoms.positions)[None]
    x = x + 0.1 * torch.randn(1, len(atoms), 3, generator=gen, dtype=torch.float64)
    w = torch.ones(1, len(atoms), dtype=torch.float64)
    strategy = MiladReconstruction(restrain=restrain, restrain_round=0)
    run = _Run(strategy, problem, torch.Generator().manual_seed(0))
    x, _ = run.refit(x, w, rows, 300)
    x2, w2 = run.finish(x, w, rows)
    rmsd = float(run.fingerprint_rmsd(x2, w2, rows))
    if restrain:
        assert rmsd < TOL
        got = Atoms(atoms.numbers, positions=x2[0].numpy())
        assert structure_rmsd(one_element(atoms), one_element(got)) < 0.02
    else:  # control: the polish alone stalls
        assert rmsd > 5 * TOL


def scattered_atoms_run(count, rows):
    """``count`` scattered unit atoms (24: more than Prony recovers), centred as the
    milad preset takes them, and a run with ``rows`` copies of their fingerprint."""
    rng = np.random.default_rng(3)
    pts = []
    while len(pts) < count:
        p = rng.uniform(-3.5, 3.5, 3)
        if np.linalg.norm(p) < 3.8 and all(np.linalg.norm(p - q) > 1.2 for q in pts):
            pts.append(p)
    spec = preset("milad")
    x0 = _centring(torch.tensor(np.array(pts))[None], spec.descriptor.centre)[0]
    atoms = Atoms([1] * count, positions=x0[0].numpy())
    return atoms, x0, one_run(atoms, spec, rows)


def test_moment_polish_finishes_atoms_that_stalled_against_exact_moments():
    # 0.5 A off, the polish against the invariants stalls; a fit to the moments, where
    # they are exact, finishes the atoms
    atoms, x0, run = scattered_atoms_run(24, 2)
    rows = torch.arange(2)
    w = torch.ones(2, 24, dtype=torch.float64)
    y = run.model.moments(x0.repeat(2, 1, 1), w)
    # control: the second row's moments are 1e-3 off, so not exact
    gen = torch.Generator().manual_seed(1)
    y[1] += 1e-3 * torch.randn(y.shape[1], generator=gen, dtype=y.dtype)
    x = x0 + 0.5 * torch.randn(2, 24, 3, generator=gen, dtype=torch.float64)
    x, before = run.refit(x, w, rows, 300)
    assert (before > 100 * TOL).all()  # the polish against the invariants stalled
    x2, w2 = run.moment_polish(y, x, w, rows)
    after = run.score(x2, w2, rows)
    assert after[0] < 1e-3 * TOL
    got = Atoms(atoms.numbers, positions=x2[0].numpy())
    assert structure_rmsd(atoms, got) < 1e-6
    assert torch.equal(x2[1], x[1]) and torch.equal(w2, w)  # inexact moments: left alone


@pytest.mark.parametrize("with_start", [True, False])
def test_moment_polish_tries_the_atoms_whose_moments_started_the_fit(with_start):
    # the atoms from the moments: random ones fitted to the invariants (from this seed's,
    # unlike most, the fit to the exact moments does not finish them); those whose
    # moments started the moments fit: 0.05 A off, from which it does
    atoms, x0, run = scattered_atoms_run(24, 1)
    rows = torch.zeros(1, dtype=torch.long)
    w = torch.ones(1, 24, dtype=torch.float64)
    y = run.model.moments(x0, w)
    gen = torch.Generator().manual_seed(0)
    far = 2.0 * torch.randn(1, 24, 3, generator=gen, dtype=torch.float64)
    near = x0 + 0.05 * torch.randn(1, 24, 3, generator=gen, dtype=torch.float64)
    far, before = run.refit(far, w, rows, 300)
    assert before > 100 * TOL
    x2, w2 = run.moment_polish(y, far, w, rows, start=(near, w) if with_start else None)
    after = float(run.score(x2, w2, rows))
    if with_start:
        assert after < 1e-3 * TOL
        assert structure_rmsd(atoms, Atoms(atoms.numbers, positions=x2[0].numpy())) < 1e-6
    else:  # control: from the far atoms alone the fit does not get there
        assert after > 100 * TOL
