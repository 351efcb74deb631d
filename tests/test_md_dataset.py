"""MD-17-like dataset builder (GFN2-xTB through tblite) and ``validate --calculator gfn2``."""

import json

import numpy as np
import pytest

from structrecon._errors import StructreconError
from structrecon.data import md_dataset
from structrecon.data.md_dataset import MDSettings, md_frames, statistical_inefficiency

# short MD for the tests: 100 + 200 steps before sampling, spacing measured (>= 40 steps)
SHORT = dict(equilibration=100, pilot=200)
N_FRAMES = 4


def _raw_gfn2():
    """tblite's own ASE calculator, independent of the code under test."""
    tblite_ase = pytest.importorskip("tblite.ase")
    return tblite_ase.TBLite(method="GFN2-xTB", verbosity=0)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Ethanol built once through the command line (the cache the other tests reuse)."""
    pytest.importorskip("tblite")
    pytest.importorskip("rdkit")
    out = tmp_path_factory.mktemp("md17")
    argv = ["--molecules", "ethanol", "--frames", str(N_FRAMES), "--out", str(out), "--quiet"]
    argv += ["--equilibration", "100", "--pilot", "200"]
    assert md_dataset.main(argv) == 0
    return out


def test_frames_composition_energies_forces(built):
    from ase.geometry import get_distances

    relaxed, frames = md_frames(
        "ethanol", N_FRAMES, settings=MDSettings(**SHORT), directory=built, progress=False
    )
    assert len(frames) == N_FRAMES
    assert relaxed.get_chemical_formula() == "C2H6O"
    manifest = md_dataset._read_manifest(built)["molecules"]["ethanol"]
    spacing = manifest["spacing_steps"]
    assert spacing >= 40
    steps = [f.info["md_step"] for f in frames]
    assert np.all(np.diff(steps) == spacing)
    e_relaxed = relaxed.get_potential_energy()
    calc = _raw_gfn2()
    for frame in frames:
        assert list(frame.numbers) == list(relaxed.numbers)
        e, f = frame.get_potential_energy(), frame.get_forces()
        assert np.isfinite(e) and f.shape == (9, 3) and np.all(np.isfinite(f))
        assert e > e_relaxed  # 500 K frames lie above the minimum they started from
        # the stored energy and forces belong to the stored positions
        check = frame.copy()
        check.calc = calc
        assert check.get_potential_energy() == pytest.approx(e, abs=1e-5)
        # (SCF restarted from the previous step vs from scratch: ~3e-4 eV/A apart; one MD
        # step later the forces differ by ~0.1 eV/A)
        np.testing.assert_allclose(check.get_forces(), f, atol=1e-3)
        # still one intact molecule: no atom closer than 0.8 A, every atom bonded (< 1.7 A)
        _, d = get_distances(frame.positions)
        d[np.diag_indices(9)] = np.inf
        assert d.min() > 0.8 and np.all(d.min(axis=1) < 1.7)
    # the frames move: RMS displacement between consecutive frames well above zero
    pos = np.stack([f.positions - f.positions.mean(0) for f in frames])
    assert np.sqrt(((pos[1:] - pos[:-1]) ** 2).mean()) > 0.05


def test_start_is_the_lowest_minimum_the_md_reaches(built):
    entry = md_dataset._read_manifest(built)["molecules"]["ethanol"]
    assert entry["lowest_frame_minimum_minus_start_eV"] >= -1e-3


def test_conformers_include_hydrogen_bonded_salicylic_acid():
    pytest.importorskip("rdkit")
    confs = md_dataset._conformers(md_dataset.MOLECULES["salicylic_acid"], 8, 0)
    # SMILES order OC(=O)c1ccccc1O: O0 acid OH, O2 carbonyl, O9 phenol; H15 on O9
    assert [confs[0].symbols[i] for i in (0, 2, 9, 15)] == ["O", "O", "O", "H"]
    assert any(c.get_distance(15, 2) < 2.2 for c in confs)


def test_relaxed_start_has_small_forces_under_gfn2(built):
    relaxed, _ = md_frames(
        "ethanol", N_FRAMES, settings=MDSettings(**SHORT), directory=built, progress=False
    )
    check = relaxed.copy()
    check.calc = _raw_gfn2()
    fmax = np.linalg.norm(check.get_forces(), axis=1).max()
    assert fmax <= MDSettings().fmax * 1.01
    # negative control: a displaced geometry is far from converged
    check.positions[0, 0] += 0.05
    assert np.linalg.norm(check.get_forces(), axis=1).max() > 100 * MDSettings().fmax


def test_cache_is_reused_and_invalidated(built, monkeypatch):
    files = sorted(p for p in built.iterdir() if p.suffix in (".extxyz", ".json"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    _, before = md_frames(
        "ethanol", N_FRAMES, settings=MDSettings(**SHORT), directory=built, progress=False
    )

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(md_dataset, "_build_one", no_build)
    relaxed, frames = md_frames(
        "ethanol", 2, settings=MDSettings(**SHORT), directory=built, progress=False
    )
    assert len(frames) == 2
    np.testing.assert_array_equal(frames[1].positions, before[1].positions)
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    # a different setting, more frames, overwrite, or a damaged file: rebuild
    for kwargs in (
        dict(settings=MDSettings(**SHORT, seed=1)),
        dict(n_frames=N_FRAMES + 1),
        dict(overwrite=True),
    ):
        kw = dict(n_frames=N_FRAMES, settings=MDSettings(**SHORT), directory=built)
        kw.update(kwargs)
        with pytest.raises(AssertionError, match="rebuilt"):
            md_frames("ethanol", progress=False, **kw)
    with open(built / "ethanol.extxyz", "a") as fh:
        fh.write("\n")
    try:
        with pytest.raises(AssertionError, match="rebuilt"):
            md_frames("ethanol", N_FRAMES, settings=MDSettings(**SHORT), directory=built)
    finally:
        text = (built / "ethanol.extxyz").read_text()
        (built / "ethanol.extxyz").write_text(text[:-1])


def test_same_seed_same_frames(built, tmp_path):
    """A shorter build with the same settings is the head of the longer one."""
    _, long = md_frames(
        "ethanol", N_FRAMES, settings=MDSettings(**SHORT), directory=built, progress=False
    )
    _, short = md_frames(
        "ethanol", 2, settings=MDSettings(**SHORT), directory=tmp_path, progress=False
    )
    for a, b in zip(short, long[:2]):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-8)


def test_cli_reports_cached(built, capsys):
    argv = ["--molecules", "ethanol", "--frames", "3", "--out", str(built), "--quiet"]
    assert md_dataset.main(argv + ["--equilibration", "100", "--pilot", "200"]) == 0
    assert "cached" in capsys.readouterr().out


def test_bad_input_one_line_errors(tmp_path, capsys):
    with pytest.raises(StructreconError, match="unknown molecule 'caffeine'; valid: benzene"):
        md_frames("caffeine", directory=tmp_path)
    assert md_dataset.main(["--molecules", "ethanol", "caffeine", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "caffeine" in err and "aspirin" in err
    assert not list(tmp_path.iterdir())  # nothing built before the names were checked
    for bad in (dict(temperature=-1.0), dict(friction=0.0), dict(pilot=5), dict(seed=-1)):
        with pytest.raises(StructreconError):
            MDSettings(**bad)
    with pytest.raises(StructreconError, match="valid: temperature"):
        MDSettings.from_dict({"temprature": 300})
    assert MDSettings.from_dict(MDSettings().to_dict()) == MDSettings()
    assert md_dataset.main(["--molecules", "benzene", "--frames", "0", "--out", str(tmp_path)]) == 1


def test_molecules_match_md17_formulas():
    pytest.importorskip("rdkit")
    from rdkit import Chem
    from rdkit.Chem.rdMolDescriptors import CalcMolFormula

    md17 = {  # formulas of the MD-17 molecules (Chmiela et al. 2017)
        "benzene": "C6H6",
        "ethanol": "C2H6O",
        "malonaldehyde": "C3H4O2",
        "uracil": "C4H4N2O2",
        "toluene": "C7H8",
        "naphthalene": "C10H8",
        "salicylic_acid": "C7H6O3",
        "aspirin": "C9H8O4",
    }
    assert set(md_dataset.MOLECULES) == set(md17)
    for name, smiles in md_dataset.MOLECULES.items():
        assert CalcMolFormula(Chem.MolFromSmiles(smiles)) == md17[name], name


def test_statistical_inefficiency_ar1():
    """AR(1), x_t = phi x_{t-1} + noise: g = (1 + phi) / (1 - phi) exactly."""
    rng = np.random.default_rng(0)
    n, k = 50_000, 4
    for phi in (0.0, 0.8):
        x = np.zeros((n, k))
        eps = rng.standard_normal((n, k))
        for t in range(1, n):
            x[t] = phi * x[t - 1] + eps[t]
        g, window = statistical_inefficiency(x)
        assert g == pytest.approx((1 + phi) / (1 - phi), rel=0.1)
        assert window < n // 2 - 1
    with pytest.raises(StructreconError):
        statistical_inefficiency(np.ones((100, 3)))


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("STRUCTRECON_CACHE", str(tmp_path / "c"))
    assert md_dataset.default_directory() == tmp_path / "c" / "md17"
    monkeypatch.delenv("STRUCTRECON_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert md_dataset.cache_root() == tmp_path / "x" / "structrecon"


# --------------------------------------------------------------------------------------
# GFN2-xTB calculator and validate --calculator gfn2


def test_gfn2_calculator_pins_openmp_threads(monkeypatch):
    tblite_ase = pytest.importorskip("tblite.ase")
    from ase.build import molecule

    from structrecon.data.pt_dataset import _openmp_runtime, get_calculator

    calc = get_calculator("gfn2", threads=1)  # loads tblite (and its OpenMP runtime)
    lib = _openmp_runtime()
    if lib is None:
        pytest.skip("no known OpenMP runtime loaded")
    seen = []
    original = tblite_ase.TBLite.calculate

    def spy(self, *args, **kwargs):
        seen.append(lib.omp_get_max_threads())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tblite_ase.TBLite, "calculate", spy)
    before = lib.omp_get_max_threads()
    lib.omp_set_num_threads(3)
    try:
        atoms = molecule("H2O")
        atoms.calc = calc
        atoms.get_potential_energy()
        assert seen == [1]
        assert lib.omp_get_max_threads() == 3  # restored for whoever else uses OpenMP
        raw = molecule("H2O")
        raw.calc = tblite_ase.TBLite(method="GFN2-xTB", verbosity=0)
        raw.get_potential_energy()
        assert seen[-1] == 3  # negative control: the unpinned calculator sees 3
        assert raw.get_potential_energy() == pytest.approx(atoms.get_potential_energy())
    finally:
        lib.omp_set_num_threads(before)


def test_validate_gfn2_on_tiny_file(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tblite")
    import ase.io
    from ase import Atoms
    from ase.build import bulk

    from structrecon.cli import main
    from structrecon.data import pt_dataset

    # a 1-atom bulk cell keeps the test fast (the default 64-atom one takes minutes)
    monkeypatch.setitem(pt_dataset.BULK_REPEAT, "gfn2", 1)
    monkeypatch.setenv("STRUCTRECON_CACHE", str(tmp_path / "cache"))
    pt_dataset._bulk_energy.cache_clear()
    try:
        cluster = Atoms("Pt3", positions=[[0, 0, 0], [2.6, 0, 0], [1.3, 2.2, 0]])
        cluster.center(vacuum=6.0)
        cluster.info["name"] = "pt3"
        path = tmp_path / "pt3.extxyz"
        ase.io.write(path, cluster)
        argv = ["validate", str(path), "--calculator", "gfn2", "--target", "2"]
        assert main(argv) == 0
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 2 and out[0].startswith("pt3\t") and "calculator gfn2" in out[1]
        e_form = float(out[0].split("\t")[1])
        # E_bulk is at least as low as tblite's own energy of the cell at other lattice
        # constants inside the searched bracket (ASE's 3.92 A +- 10%)
        key = pt_dataset._bulk_cache_key("Pt", "gfn2", 1)
        stored = json.loads((tmp_path / "cache" / "bulk_energies.json").read_text())[key]
        assert 3.92 * 0.9 <= stored["a"] <= 3.92 * 1.1
        for a in (3.92, 4.1, stored["a"] - 0.05):
            cell = bulk("Pt", "fcc", a=a)
            cell.calc = _raw_gfn2()
            assert stored["energy"] <= cell.get_potential_energy() + 1e-6
        # the printed E_form is (E_cluster - N E_bulk) / N with tblite's own E_cluster
        raw = cluster.copy()
        raw.calc = _raw_gfn2()
        expected = (raw.get_potential_energy() - 3 * stored["energy"]) / 3
        assert e_form == pytest.approx(expected, abs=1e-4)
        # second call: read from the disk cache, same answer
        pt_dataset._bulk_energy.cache_clear()

        def no_calculator(*args, **kwargs):
            raise AssertionError("bulk energy recomputed although cached")

        monkeypatch.setattr(pt_dataset, "get_calculator", no_calculator)
        assert pt_dataset.bulk_energy("Pt", "gfn2") == stored["energy"]
    finally:
        pt_dataset._bulk_energy.cache_clear()
