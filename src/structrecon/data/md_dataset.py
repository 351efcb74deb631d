"""MD-17-like targets: Langevin MD at 500 K with GFN2-xTB for the eight MD-17 molecules.

Cobelli, Cahalane and Sanvito (2022) invert the bispectra of 120 configurations per
molecule taken from MD-17 (ab initio MD at 500 K, Chmiela et al. 2017), starting each
inversion from the first relaxed geometry of the trajectory.  Those trajectories are
DFT data; here comparable targets are generated, never downloaded:

1. **Start**: ``n_conformers`` ETKDG conformers from the molecule's SMILES (RDKit, fixed
   seed) and all rotamers of the first about its rotatable bonds (O-H rotors included),
   each relaxed with GFN2-xTB (``tblite``; BFGS to 0.05 eV/A); the lowest is tightened
   to ``fmax`` (BFGS, 1e-3 eV/A by default) and centred at its centre of mass.
2. **MD**: Langevin dynamics (ASE ``Langevin``, ``temperature`` 500 K, time step 0.5 fs,
   friction 0.01 / fs, centre of mass fixed with ``FixCom``) from Maxwell-Boltzmann
   velocities; ``equilibration`` steps are discarded.
3. **Spacing rule** (measured per molecule): a pilot run of ``pilot`` steps records all
   N(N-1)/2 interatomic distances and the potential energy at every step.  For each, the
   statistical inefficiency g = 1 + 2 sum_{t=1}^{W} rho(t) is summed up to the first
   window W >= 5 g(W) (Sokal's automatic window), rho(t) being the normalised
   autocorrelation function (for the distances, the mean of their normalised ACFs);
   kept frames are ``max(min_spacing, ceil(g_distances), ceil(g_energy))`` steps apart (a
   fixed ``spacing`` overrides the rule).  The distances alone are not enough: their
   ACFs oscillate with the bond vibrations and nearly cancel (g ~ 5 steps for benzene),
   while the energy in each vibration, seen in the potential energy, persists for
   ~1/friction.  See :func:`statistical_inefficiency`.
4. **Production**: ``n_frames`` frames, one every ``spacing`` steps after the pilot, each
   with its GFN2-xTB energy (eV) and forces (eV/A) as the frame's calculator results, i.e.
   ``energy=`` in the extxyz comment line and a ``forces`` column (ASE reads them back into
   ``atoms.calc``: ``atoms.get_potential_energy()``, ``atoms.get_forces()``).

Per molecule ``DIR/<name>.extxyz`` (frames) and ``DIR/<name>_relaxed.extxyz`` (the relaxed
start) are written, and ``DIR/manifest.json`` records settings, the measured spacing,
timings and file checksums.  Files with the same settings and at least as many frames are
reused; ``overwrite`` rebuilds.  The default ``DIR`` is ``md17`` under :func:`cache_root`.
The same seed gives the same frames, so a shorter request is the head of a longer build.

Run ``python -m structrecon.data.md_dataset --help`` for a command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._errors import StructreconError

__all__ = [
    "MOLECULES",
    "MDSettings",
    "build_md_dataset",
    "cache_root",
    "default_directory",
    "md_frames",
    "statistical_inefficiency",
]

#: The MD-17 molecules (Chmiela et al. 2017) as SMILES.  Malonaldehyde is the
#: intramolecularly hydrogen-bonded (Z)-enol, 3-hydroxyprop-2-enal, as in MD-17.
MOLECULES: dict[str, str] = {
    "benzene": "c1ccccc1",
    "ethanol": "CCO",
    "malonaldehyde": "O/C=C\\C=O",
    "uracil": "O=C1C=CNC(=O)N1",
    "toluene": "Cc1ccccc1",
    "naphthalene": "c1ccc2ccccc2c1",
    "salicylic_acid": "OC(=O)c1ccccc1O",
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
}

_FORMAT = 2  # bump when the files or the build procedure change incompatibly
_MANIFEST = "manifest.json"
_ALIASES = {"salicylic acid": "salicylic_acid", "salicylic-acid": "salicylic_acid"}


@dataclass(frozen=True, kw_only=True)
class MDSettings:
    """Settings of one MD build (everything but the number of frames).

    Parameters
    ----------
    temperature : thermostat temperature, K.
    timestep : MD time step, fs.
    friction : Langevin friction, 1/fs.
    equilibration : MD steps discarded before the pilot run.
    pilot : MD steps of the pilot run that measures the autocorrelation (also discarded).
    spacing : MD steps between kept frames; None measures it (see module docstring).
    min_spacing : lower bound of the measured spacing, MD steps.
    fmax : force threshold of the final relaxation, eV/A.
    n_conformers : ETKDG conformers tried for the relaxed start (plus the rotamers of the
        first about its rotatable bonds).
    seed : seed of RDKit's embedding and of the velocities and Langevin noise.
    """

    temperature: float = 500.0
    timestep: float = 0.5
    friction: float = 0.01
    equilibration: int = 2000
    pilot: int = 4000
    spacing: int | None = None
    min_spacing: int = 40
    fmax: float = 1e-3
    n_conformers: int = 8
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.temperature > 0, f"temperature must be > 0 K, got {self.temperature}"),
            (0 < self.timestep <= 5, f"timestep must be in (0, 5] fs, got {self.timestep}"),
            (self.friction > 0, f"friction must be > 0 per fs, got {self.friction}"),
            (self.equilibration >= 0, f"equilibration must be >= 0, got {self.equilibration}"),
            (self.spacing is None or self.spacing >= 1, f"spacing must be >= 1: {self.spacing}"),
            (self.min_spacing >= 1, f"min_spacing must be >= 1, got {self.min_spacing}"),
            (self.fmax > 0, f"fmax must be > 0 eV/A, got {self.fmax}"),
            (self.n_conformers >= 1, f"n_conformers must be >= 1, got {self.n_conformers}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
        ]
        if self.spacing is None:
            checks.append(
                (
                    self.pilot >= 20,
                    f"pilot must be >= 20 steps to measure the spacing: {self.pilot}",
                )
            )
        for ok, message in checks:
            if not ok:
                raise StructreconError(message)

    def to_dict(self) -> dict:
        """JSON-ready dict of the fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MDSettings:
        """Inverse of :meth:`to_dict`; unknown keys are errors naming the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise StructreconError(
                f"unknown MD setting(s) {', '.join(unknown)}; valid: {', '.join(names)}"
            )
        return cls(**data)


def cache_root() -> Path:
    """Root of structrecon's caches: ``$STRUCTRECON_CACHE``, else ``~/.cache/structrecon``.

    ``$XDG_CACHE_HOME`` replaces ``~/.cache`` when set.
    """
    env = os.environ.get("STRUCTRECON_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "structrecon"


def default_directory() -> Path:
    """Default directory of the MD frames: ``cache_root() / "md17"``."""
    return cache_root() / "md17"


def _molecule_name(name: str) -> str:
    key = _ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in MOLECULES:
        raise StructreconError(f"unknown molecule '{name}'; valid: {', '.join(MOLECULES)}")
    return key


# --------------------------------------------------------------------------------------
# autocorrelation


def _autocorrelation(x: np.ndarray) -> np.ndarray:
    """Normalised autocorrelation [T, K] of each column of ``x`` [T, K] (FFT, unbiased)."""
    x = x - x.mean(axis=0)
    n = x.shape[0]
    f = np.fft.rfft(x, 2 * n, axis=0)
    c = np.fft.irfft(f * np.conj(f), 2 * n, axis=0)[:n]
    c /= np.arange(n, 0, -1)[:, None]
    var = c[0]
    keep = var > 1e-12 * max(float(var.max()), 1e-300)  # constant columns carry no time
    if not keep.any():
        raise StructreconError("autocorrelation of constant data is undefined")
    return c[:, keep] / var[keep]


def statistical_inefficiency(x, *, c: float = 5.0) -> tuple[float, int]:
    """Statistical inefficiency of a time series, averaged over its columns.

    Parameters
    ----------
    x : [T] or [T, K] samples at equal time intervals (e.g. K interatomic distances).
    c : Sokal's window factor.

    Returns
    -------
    (g, W) : g = 1 + 2 sum_{t=1}^{W} rho(t), in units of the sampling interval, with rho
        the mean over columns of their normalised autocorrelation functions and W the
        smallest window with W >= c g(W) (Sokal 1997, "Monte Carlo methods in statistical
        mechanics", sec. 3); samples g apart are effectively independent.  If no window
        up to T/2 qualifies (series too short) W = T/2 is returned with its g.
    """
    x = np.asarray(x, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] < 4:
        raise StructreconError(f"need a [T >= 4, K] time series, got shape {x.shape}")
    rho = _autocorrelation(x).mean(axis=1)
    g = 2.0 * np.cumsum(rho) - 1.0  # g[W] = 1 + 2 sum_{t=1}^{W} rho(t)
    half = x.shape[0] // 2
    ok = np.nonzero(np.arange(half) >= c * g[:half])[0]
    w = int(ok[0]) if ok.size else half - 1
    return float(max(g[w], 1.0)), w


# --------------------------------------------------------------------------------------
# building blocks


def _rdkit():
    try:
        from rdkit import Chem, RDLogger
        from rdkit.Chem import AllChem
    except ImportError:
        raise StructreconError(
            "building MD frames needs RDKit for the starting geometries (pip install rdkit), "
            "which is not installed"
        ) from None
    RDLogger.DisableLog("rdApp.*")
    return Chem, AllChem


def _rotatable_torsions(mol):
    """Torsions (a, b, c, d) about non-ring single bonds between non-terminal atoms.

    With explicit hydrogens this includes the O-H rotors.  Each comes with the rotations
    tried: 180 deg between two sp2 (or aromatic) centres, else 120 and 240 deg.
    """
    from rdkit import Chem

    out = []
    for bond in mol.GetBonds():
        if bond.GetBondType() != Chem.BondType.SINGLE or bond.IsInRing():
            continue
        b, c = bond.GetBeginAtom(), bond.GetEndAtom()
        if b.GetDegree() < 2 or c.GetDegree() < 2:
            continue

        def neighbour(x, other):
            nbrs = [n for n in x.GetNeighbors() if n.GetIdx() != other.GetIdx()]
            return max(nbrs, key=lambda n: (n.GetAtomicNum(), -n.GetIdx())).GetIdx()

        sp3 = Chem.HybridizationType.SP3
        flat = b.GetHybridization() != sp3 and c.GetHybridization() != sp3
        torsion = (neighbour(b, c), b.GetIdx(), c.GetIdx(), neighbour(c, b))
        out.append((torsion, (180.0,) if flat else (120.0, 240.0)))
    return out


def _conformers(smiles: str, n: int, seed: int):
    """Starting geometries of ``smiles`` with hydrogens, as ASE Atoms.

    ``n`` ETKDG conformers (RDKit, ``seed``), plus every combination of rotations about
    the rotatable bonds (:func:`_rotatable_torsions`) applied to the first one: ETKDG
    alone gave 24 identical conformers of salicylic acid, none with its hydrogen bond.
    Geometries with atoms closer than 0.7 A are dropped.
    """
    import itertools

    from ase import Atoms
    from rdkit.Chem import rdMolTransforms

    Chem, AllChem = _rdkit()
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed)
    ids = list(AllChem.EmbedMultipleConfs(mol, numConfs=int(n), params=params))
    if not ids:
        raise StructreconError(f"RDKit could not embed {smiles}")
    symbols = [a.GetSymbol() for a in mol.GetAtoms()]
    positions = [mol.GetConformer(i).GetPositions() for i in ids]
    torsions = _rotatable_torsions(mol)
    base = mol.GetConformer(ids[0])
    start = [rdMolTransforms.GetDihedralDeg(base, *t) for t, _ in torsions]
    choices = [(0.0, *turns) for _, turns in torsions]
    for offsets in itertools.product(*choices):
        if not any(offsets):
            continue  # the first conformer itself
        conf = Chem.Conformer(base)
        for (t, _), phi, off in zip(torsions, start, offsets):
            rdMolTransforms.SetDihedralDeg(conf, *t, phi + off)
        positions.append(conf.GetPositions())
    out = []
    for pos in positions:
        d = np.linalg.norm(pos[:, None] - pos[None], axis=-1) + 10.0 * np.eye(len(pos))
        if d.min() >= 0.7:
            out.append(Atoms(symbols, positions=pos))
    return out


def _calculator():
    from .pt_dataset import get_calculator

    return get_calculator("gfn2", threads=1)


def _relax(atoms, fmax: float, steps: int, what: str):
    """BFGS-relax ``atoms`` in place with GFN2-xTB; returns the number of steps."""
    from ase.optimize import BFGS

    try:
        opt = BFGS(atoms, logfile=None)
        converged = opt.run(fmax=fmax, steps=steps)
        f = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
    except Exception as err:  # noqa: BLE001 - SCF failures surface as many types
        raise StructreconError(f"{what}: relaxation failed: {_one_line(err)}") from None
    if not converged and f > fmax:
        raise StructreconError(
            f"{what}: relaxation did not reach fmax {fmax:g} eV/A in {steps} steps "
            f"(max force {f:.2e} eV/A)"
        )
    return int(opt.nsteps)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _relaxed_start(name: str, settings: MDSettings):
    """Lowest of the relaxed ETKDG conformers, tightened to ``settings.fmax``, centred."""
    from ase.calculators.singlepoint import SinglePointCalculator

    best, best_e = None, math.inf
    for k, atoms in enumerate(_conformers(MOLECULES[name], settings.n_conformers, settings.seed)):
        atoms.calc = _calculator()
        _relax(atoms, max(0.05, settings.fmax), 1000, f"{name} conformer {k}")
        e = float(atoms.get_potential_energy())
        if e < best_e:
            best, best_e = atoms, e
    _relax(best, settings.fmax, 3000, name)
    best.positions -= best.get_center_of_mass()
    out = best.copy()
    out.calc = SinglePointCalculator(
        out,
        energy=float(best.get_potential_energy()),
        forces=best.get_forces().copy(),
    )
    out.info.update(name=name, smiles=MOLECULES[name], fmax=settings.fmax)
    return out


def _run_md(name: str, relaxed, n_frames: int, settings: MDSettings, progress: bool):
    """Equilibrate, measure the spacing, sample; returns (frames, report dict)."""
    from ase import Atoms, units
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from tqdm.auto import tqdm

    rng = np.random.default_rng(settings.seed)
    atoms = relaxed.copy()
    atoms.info.clear()
    atoms.set_constraint(FixCom())
    atoms.calc = _calculator()
    masses = atoms.get_masses()
    # Maxwell-Boltzmann momenta, net momentum removed
    p = rng.standard_normal((len(atoms), 3)) * np.sqrt(
        masses[:, None] * units.kB * settings.temperature
    )
    p -= masses[:, None] * (p.sum(axis=0) / masses.sum())
    atoms.set_momenta(p, apply_constraint=False)
    dyn = Langevin(
        atoms,
        settings.timestep * units.fs,
        temperature_K=settings.temperature,
        friction=settings.friction / units.fs,
        fixcm=False,  # FixCom does it; ASE's fixcm=True ran ethanol at ~620 K for 500 K
        rng=rng,
    )
    iu = np.triu_indices(len(atoms), 1)
    bar = tqdm(
        total=settings.equilibration + (settings.pilot if settings.spacing is None else 0),
        desc=f"{name} md",
        unit="step",
        disable=not progress,
        leave=False,
    )
    timings = {}

    def run(steps: int, every=None, record=None):
        done = 0
        while done < steps:
            chunk = min(every or 50, steps - done)
            try:
                dyn.run(chunk)
            except Exception as err:  # noqa: BLE001 - SCF failures surface as many types
                raise StructreconError(
                    f"{name}: MD failed at step {dyn.nsteps}: {_one_line(err)}"
                ) from None
            done += chunk
            bar.update(chunk)
            if record is not None:
                record()

    try:
        t0 = time.perf_counter()
        run(settings.equilibration)
        timings["equilibration"] = time.perf_counter() - t0
        report = {}
        if settings.spacing is None:
            t0 = time.perf_counter()
            distances = np.empty((settings.pilot, len(iu[0])))
            energies = np.empty(settings.pilot)
            step = [0]

            def record_pilot():
                distances[step[0]] = atoms.get_all_distances()[iu]
                energies[step[0]] = atoms.get_potential_energy()
                step[0] += 1

            run(settings.pilot, every=1, record=record_pilot)
            g_d, w_d = statistical_inefficiency(distances)
            g_e, w_e = statistical_inefficiency(energies)
            spacing = max(settings.min_spacing, math.ceil(g_d), math.ceil(g_e))
            timings["pilot"] = time.perf_counter() - t0
            last = settings.pilot // 2 - 1
            report.update(
                statistical_inefficiency_steps={
                    "distances": round(g_d, 2),
                    "energy": round(g_e, 2),
                },
                sokal_window_steps={"distances": w_d, "energy": w_e},
                window_found=bool(w_d < last and w_e < last),
            )
        else:
            spacing = settings.spacing
        bar.total = bar.total + n_frames * spacing
        bar.refresh()
        frames, temperatures = [], []
        t0 = time.perf_counter()

        def keep():
            frame = Atoms(atoms.numbers, positions=atoms.positions.copy())
            frame.calc = SinglePointCalculator(
                frame,
                energy=float(atoms.get_potential_energy()),
                forces=atoms.get_forces(apply_constraint=False).copy(),
            )
            frame.info.update(
                name=f"{name}_{len(frames):03d}",
                md_step=int(dyn.nsteps),
                time_fs=round(dyn.nsteps * settings.timestep, 6),
            )
            frames.append(frame)
            temperatures.append(float(atoms.get_temperature()))

        run(n_frames * spacing, every=spacing, record=keep)
        timings["production"] = time.perf_counter() - t0
    finally:
        bar.close()
    lag1 = np.nan
    if len(frames) >= 4:
        d = np.stack([f.get_all_distances()[iu] for f in frames])
        lag1 = float(_autocorrelation(d)[1].mean())
    report.update(
        spacing_steps=int(spacing),
        spacing_fs=spacing * settings.timestep,
        mean_frame_temperature_K=round(float(np.mean(temperatures)), 1),
        frame_lag1_autocorrelation=None if np.isnan(lag1) else round(lag1, 4),
        timings_s={k: round(v, 2) for k, v in timings.items()},
    )
    return frames, report


# --------------------------------------------------------------------------------------
# cache


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_manifest(directory: Path) -> dict:
    try:
        data = json.loads((directory / _MANIFEST).read_text())
    except (OSError, ValueError):
        return {"format": _FORMAT, "molecules": {}}
    if data.get("format") != _FORMAT or not isinstance(data.get("molecules"), dict):
        return {"format": _FORMAT, "molecules": {}}
    return data


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cached_entry(directory: Path, name: str, n_frames: int, settings: MDSettings):
    """The manifest entry if the files on disk satisfy the request, else None."""
    entry = _read_manifest(directory)["molecules"].get(name)
    if not isinstance(entry, dict) or entry.get("settings") != settings.to_dict():
        return None
    if int(entry.get("n_frames", -1)) < n_frames:
        return None
    try:
        for key in ("frames", "relaxed"):
            path = directory / entry["files"][key]
            if not path.is_file() or _sha256(path) != entry["sha256"][key]:
                return None
    except (KeyError, TypeError):  # a damaged manifest entry: rebuild
        return None
    return entry


@contextlib.contextmanager
def _lock(directory: Path):
    """Exclusive lock on ``directory`` (so two processes do not build the same files)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(directory / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("tblite", "ase", "rdkit", "structrecon"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _lowest_frame_check(frames, relaxed, settings: MDSettings):
    """Energy (eV) of the minimum below the lowest-energy frame minus the start's.

    About 0 when the MD stayed in the start's basin; clearly negative means the start
    was not the lowest minimum the MD reaches (None if the relaxation failed).
    """
    from ase import Atoms

    lowest = min(frames, key=lambda f: f.get_potential_energy())
    atoms = Atoms(lowest.numbers, positions=lowest.positions.copy())
    atoms.calc = _calculator()
    try:
        _relax(atoms, settings.fmax, 3000, "lowest frame")
    except StructreconError:
        return None
    return round(float(atoms.get_potential_energy() - relaxed.get_potential_energy()), 6)


def _build_one(name, n_frames, settings, directory: Path, progress: bool) -> dict:
    import ase.io

    t_start, cpu_start = time.perf_counter(), time.process_time()
    relaxed = _relaxed_start(name, settings)
    t_relax = time.perf_counter() - t_start
    frames, report = _run_md(name, relaxed, n_frames, settings, progress)
    report["lowest_frame_minimum_minus_start_eV"] = _lowest_frame_check(frames, relaxed, settings)
    files = {"frames": f"{name}.extxyz", "relaxed": f"{name}_relaxed.extxyz"}
    _write_atomic(directory / files["relaxed"], lambda p: ase.io.write(p, relaxed, "extxyz"))
    _write_atomic(directory / files["frames"], lambda p: ase.io.write(p, frames, "extxyz"))
    report["timings_s"] = {"relax": round(t_relax, 2), **report["timings_s"]}
    report["timings_s"]["total"] = round(time.perf_counter() - t_start, 2)
    report["timings_s"]["total_cpu"] = round(time.process_time() - cpu_start, 2)
    entry = {
        "settings": settings.to_dict(),
        "n_frames": int(n_frames),
        "smiles": MOLECULES[name],
        "n_atoms": len(relaxed),
        "formula": relaxed.get_chemical_formula(),
        "relaxed_energy_eV": float(relaxed.get_potential_energy()),
        "relaxed_max_force_eV_A": float(np.linalg.norm(relaxed.get_forces(), axis=1).max()),
        "spacing_rule": (
            "fixed by the spacing setting"
            if settings.spacing is not None
            else "max(min_spacing, ceil(g_distances), ceil(g_energy)); g = statistical "
            "inefficiency over the pilot run (Sokal window c = 5) of the mean normalised "
            "autocorrelation of all interatomic distances, and of the potential energy"
        ),
        **report,
        "method": "GFN2-xTB (tblite), 1 OpenMP thread",
        "files": files,
        "sha256": {k: _sha256(directory / v) for k, v in files.items()},
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    manifest = _read_manifest(directory)
    manifest["molecules"][name] = entry
    _write_atomic(
        directory / _MANIFEST,
        lambda p: p.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n"),
    )
    return entry


def build_md_dataset(
    names=None,
    n_frames: int = 120,
    *,
    settings: MDSettings | None = None,
    directory: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, dict]:
    """Build (or reuse) the frames of ``names`` (default: all of :data:`MOLECULES`).

    Parameters
    ----------
    names : molecule names (keys of :data:`MOLECULES`; "salicylic acid" also accepted).
    n_frames : frames kept per molecule.
    settings : :class:`MDSettings` (default settings if None).
    directory : output directory (default :func:`default_directory`).
    overwrite : rebuild even if matching files exist.

    Returns
    -------
    {name: manifest entry} with an added key ``cached`` (True if the files were reused).
    """
    settings = MDSettings() if settings is None else settings
    if not isinstance(settings, MDSettings):
        raise StructreconError("settings must be an MDSettings")
    names = list(MOLECULES) if names is None else [_molecule_name(n) for n in names]
    if int(n_frames) < 1:
        raise StructreconError(f"n_frames must be >= 1, got {n_frames}")
    directory = default_directory() if directory is None else Path(directory).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StructreconError(f"cannot create {directory}: {_one_line(err)}") from None
    out = {}
    with _lock(directory):
        for name in names:
            entry = None if overwrite else _cached_entry(directory, name, n_frames, settings)
            if entry is not None:
                out[name] = {**entry, "cached": True}
                continue
            out[name] = {
                **_build_one(name, n_frames, settings, directory, progress),
                "cached": False,
            }
    return out


def md_frames(
    name: str,
    n_frames: int = 120,
    *,
    settings: MDSettings | None = None,
    directory: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
):
    """Relaxed start and MD frames of one MD-17 molecule, built on first use.

    Parameters
    ----------
    name : a key of :data:`MOLECULES`.
    n_frames : number of frames (the head of a longer cached build is reused).
    settings, directory, overwrite, progress : as in :func:`build_md_dataset`.

    Returns
    -------
    (relaxed, frames) : ``ase.Atoms`` of the relaxed start and a list of ``n_frames``
        ``ase.Atoms``; positions in A, no cell, each with GFN2-xTB energy (eV) and forces
        (eV/A) in ``atoms.calc`` and ``name``, ``md_step``, ``time_fs`` in ``info``.
    """
    import ase.io

    from ..io import read_frames

    name = _molecule_name(name)
    entry = build_md_dataset(
        [name],
        n_frames,
        settings=settings,
        directory=directory,
        overwrite=overwrite,
        progress=progress,
    )[name]
    directory = default_directory() if directory is None else Path(directory).expanduser()
    relaxed = ase.io.read(directory / entry["files"]["relaxed"], format="extxyz")
    frames = read_frames(str(directory / entry["files"]["frames"]), "MD frames")
    return relaxed, frames[:n_frames]


# --------------------------------------------------------------------------------------
# command line


def main(argv=None) -> int:
    """``python -m structrecon.data.md_dataset``: build the MD-17-like frames."""
    import argparse
    import sys

    p = argparse.ArgumentParser(
        prog="python -m structrecon.data.md_dataset",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--molecules",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"subset of: {', '.join(MOLECULES)} (default: all)",
    )
    p.add_argument("--frames", type=int, default=120, help="frames per molecule (120)")
    p.add_argument("--temperature", type=float, default=500.0, help="K (500)")
    p.add_argument("--timestep", type=float, default=0.5, help="fs (0.5)")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs (0.01)")
    p.add_argument("--equilibration", type=int, default=2000, help="MD steps discarded (2000)")
    p.add_argument("--pilot", type=int, default=4000, help="MD steps measuring the ACF (4000)")
    p.add_argument("--spacing", type=int, default=None, help="fixed MD steps between frames")
    p.add_argument("--out", default=None, help=f"output directory (default {default_directory()})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="rebuild even if cached")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        settings = MDSettings(
            temperature=args.temperature,
            timestep=args.timestep,
            friction=args.friction,
            equilibration=args.equilibration,
            pilot=args.pilot,
            spacing=args.spacing,
            seed=args.seed,
        )
        names = list(MOLECULES) if args.molecules is None else args.molecules
        names = [_molecule_name(n) for n in names]  # all names checked before any work
        directory = default_directory() if args.out is None else Path(args.out)
        for name in names:
            entry = build_md_dataset(
                [name],
                args.frames,
                settings=settings,
                directory=directory,
                overwrite=args.overwrite,
                progress=not args.quiet,
            )[name]
            how = "cached" if entry["cached"] else f"built in {entry['timings_s']['total']:.0f} s"
            print(
                f"{name:15s} {entry['n_atoms']:2d} atoms  {args.frames} frames, spacing "
                f"{entry['spacing_steps']} steps ({entry['spacing_fs']:g} fs)  {how}",
                flush=True,
            )
        print(f"frames in {directory}")
    except StructreconError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
