"""Pt cluster dataset builder (Fung 2022, sec. 2.3): relaxation trajectories in an ASE database.

Random Pt_N geometries (compact and more open starts) centred in a cubic box (17 A) are
relaxed with BFGS on a real calculator (ASE's EMT; GFN2-xTB through ``tblite`` if
installed, its OpenMP threads pinned, see :func:`get_calculator`).  Every ``every``-th
optimiser step and the final local minimum are kept, each with its formation energy per atom

    E_form = (E_total - N E_bulk) / N     (eV/atom),

E_bulk the energy per atom of fcc bulk of the element from the same calculator at its
optimal lattice constant (see :func:`bulk_energy` for the supercell GFN2-xTB needs).
Rows are written to an ASE SQLite database with key-value pairs ``e_form``, ``e_total``,
``relaxation``, ``step``, ``minimum``.
:func:`furthest_point_sampling` in (standardised) fingerprint space cuts subsets.

Run ``python -m structrecon.data.pt_dataset --help`` for a command line.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
from pathlib import Path

import numpy as np
from ase import Atoms

from .._errors import StructreconError
from .clusters import random_cluster

__all__ = [
    "BULK_REPEAT",
    "CALCULATORS",
    "build_pt_dataset",
    "bulk_energy",
    "formation_energies",
    "furthest_point_sampling",
    "get_calculator",
    "open_cluster",
    "subset_database",
]

CALCULATORS = ("emt", "gfn2")

#: n of the n x n x n supercell of the primitive fcc cell used for E_bulk, per calculator.
#: EMT is a pair-functional potential (one atom suffices); tblite evaluates periodic cells at
#: the Gamma point only, so the supercell stands in for an n x n x n k-point mesh.
BULK_REPEAT = {"emt": 1, "gfn2": 4}

_OPENMP_LIBRARIES = ("libgomp.so.1", "libomp.so", "libiomp5.so", "libgomp.1.dylib", "libomp.dylib")


def _openmp_runtime():
    """The OpenMP runtime already loaded in this process (ctypes handle), or None."""
    mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 0)
    for name in _OPENMP_LIBRARIES:
        try:
            lib = ctypes.CDLL(name, mode=mode)
        except OSError:
            continue
        if hasattr(lib, "omp_set_num_threads") and hasattr(lib, "omp_get_max_threads"):
            return lib
    return None


@contextlib.contextmanager
def _openmp_threads(threads: int):
    """Run the body with the calling thread's OpenMP team size set to ``threads``.

    The previous setting is restored afterwards, so a PyTorch sharing the same OpenMP
    runtime (its wheel ships ``libgomp.so.1``, which tblite then binds to) keeps its own.
    """
    lib = _openmp_runtime()
    if lib is None:  # no runtime loaded (or an unknown one): OMP_NUM_THREADS must do
        yield
        return
    previous = int(lib.omp_get_max_threads())
    lib.omp_set_num_threads(int(threads))
    try:
        yield
    finally:
        lib.omp_set_num_threads(previous)


@functools.cache
def _pinned_tblite_class():
    """The class of tblite's ASE calculator with OpenMP threads pinned in each calculation."""
    from tblite.ase import TBLite

    class PinnedTBLite(TBLite):
        """``tblite.ase.TBLite`` whose calculations run on ``threads`` OpenMP threads."""

        def __init__(self, *, threads: int = 1, **kwargs):
            self.threads = int(threads)
            super().__init__(**kwargs)

        def calculate(self, *args, **kwargs):
            """Single point on ``self.threads`` threads (restored afterwards)."""
            with _openmp_threads(self.threads):
                super().calculate(*args, **kwargs)

    return PinnedTBLite


def get_calculator(name: str, *, threads: int = 1):
    """A fresh ASE calculator: ``emt`` or ``gfn2`` (tblite); one-line errors otherwise.

    ``gfn2`` is GFN2-xTB from ``tblite.ase.TBLite`` (verbosity 0) with its OpenMP threads
    pinned to ``threads``: ``OMP_NUM_THREADS`` is set (if unset) before the library first
    loads, and every calculation sets the OpenMP team size of the calling thread to
    ``threads`` and restores it afterwards (this also holds when PyTorch loaded the OpenMP
    runtime first).  Unpinned, tblite ran 18-40x slower on this shared 2-core machine.
    """
    if name == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    if name == "gfn2":
        if int(threads) < 1:
            raise StructreconError(f"threads must be >= 1, got {threads}")
        os.environ.setdefault("OMP_NUM_THREADS", str(int(threads)))
        try:
            cls = _pinned_tblite_class()
        except ImportError:
            raise StructreconError(
                "calculator gfn2 needs the tblite Python package (pip install tblite), "
                "which is not installed"
            ) from None
        return cls(method="GFN2-xTB", verbosity=0, threads=threads)
    raise StructreconError(f"unknown calculator '{name}'; valid: {', '.join(CALCULATORS)}")


def _bulk_cache_key(symbol: str, calculator: str, repeat: int) -> str | None:
    """Key of an on-disk cached E_bulk, or None for calculators not worth caching (EMT)."""
    if calculator == "emt":
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        tb = version("tblite")
    except PackageNotFoundError:  # pragma: no cover - get_calculator failed before this
        tb = "unknown"
    return f"{calculator}:{symbol}:fcc:{repeat}x{repeat}x{repeat}:tblite-{tb}"


def _bulk_cache_file() -> Path:
    from .md_dataset import cache_root

    return cache_root() / "bulk_energies.json"


def bulk_energy(symbol: str = "Pt", calculator: str = "emt", repeat: int | None = None) -> float:
    """Energy per atom (eV) of fcc bulk ``symbol`` at the calculator's optimal lattice constant.

    The cubic lattice constant is found by a bounded scalar minimisation around ASE's
    reference value (+-10%).  The cell is the primitive fcc cell repeated
    ``repeat`` x ``repeat`` x ``repeat`` (default :data:`BULK_REPEAT`: 1 for EMT; 4, i.e. 64
    atoms, for GFN2-xTB, which tblite evaluates at the Gamma point only: one atom gave
    -95 eV/atom for Pt against -125.8 eV/atom for 64).  GFN2-xTB values are slow (minutes)
    and are kept on disk in ``cache_root()/bulk_energies.json`` keyed by element,
    supercell and tblite version.
    """
    rep = BULK_REPEAT.get(calculator, 1) if repeat is None else int(repeat)
    if rep < 1:
        raise StructreconError(f"bulk supercell repeat must be >= 1, got {repeat}")
    return _bulk_energy(symbol, calculator, rep)


@functools.lru_cache(maxsize=16)
def _bulk_energy(symbol: str, calculator: str, rep: int) -> float:
    from ase.build import bulk
    from scipy.optimize import minimize_scalar

    try:
        a0 = bulk(symbol, "fcc").cell.lengths()[0] * np.sqrt(2.0)  # primitive -> cubic a
    except Exception as err:  # noqa: BLE001 - ASE has no fcc reference for the element
        raise StructreconError(f"no fcc reference lattice for {symbol}: {err}") from None
    key = _bulk_cache_key(symbol, calculator, rep)
    if key is not None:
        path = _bulk_cache_file()
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = {}
        if isinstance(stored.get(key), dict) and "energy" in stored[key]:
            return float(stored[key]["energy"])
    xatol = 1e-4 if calculator == "emt" else 5e-3  # 5e-3 A moves E_bulk by < 1e-3 eV/atom
    base = bulk(symbol, "fcc", a=a0) * (rep, rep, rep)
    atoms = base.copy()
    atoms.calc = get_calculator(calculator)  # one calculator: the SCF restarts from the last

    def energy(a: float) -> float:
        atoms.set_cell(base.cell * (a / a0), scale_atoms=True)
        try:
            return float(atoms.get_potential_energy()) / len(atoms)
        except Exception as err:  # noqa: BLE001 - calculator failures
            msg = " ".join(str(err).split()) or type(err).__name__
            raise StructreconError(
                f"bulk {symbol} ({calculator}, a = {a:.3f} A) failed: {msg}"
            ) from None

    res = minimize_scalar(
        energy, bounds=(0.9 * a0, 1.1 * a0), method="bounded", options={"xatol": xatol}
    )
    if key is not None:
        _store_bulk_energy(key, float(res.fun), float(res.x))
    return float(res.fun)


def _store_bulk_energy(key: str, energy: float, a: float) -> None:
    """Add one E_bulk to the on-disk cache (atomic replace; failures are not fatal)."""
    path = _bulk_cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = {}
        stored[key] = {"energy": energy, "a": a}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs the recomputation
        pass


def formation_energies(frames, calculator: str = "emt", *, threads: int = 1) -> np.ndarray:
    """E_form (eV/atom) [B] of single-element structures with ``calculator``.

    Each frame is evaluated as is (no relaxation), with its own cell and pbc (clusters in
    a box with pbc off are isolated).  ``threads``: OpenMP threads of gfn2.
    """
    out = np.zeros(len(frames))
    for k, atoms in enumerate(frames):
        symbols = set(atoms.get_chemical_symbols())
        if len(symbols) != 1:
            raise StructreconError(
                f"structure {k}: formation energy per atom needs one element, got {sorted(symbols)}"
            )
        a = atoms.copy()
        a.calc = get_calculator(calculator, threads=threads)
        try:
            e_total = float(a.get_potential_energy())
        except Exception as err:  # noqa: BLE001 - calculator failures
            msg = " ".join(str(err).split()) or type(err).__name__
            raise StructreconError(f"structure {k}: {calculator} failed: {msg}") from None
        out[k] = (e_total - len(a) * bulk_energy(symbols.pop(), calculator)) / len(a)
    return out


def open_cluster(
    symbol: str,
    n_atoms: int,
    rng: np.random.Generator,
    radius: float,
    *,
    min_distance: float = 2.0,
    bond: float = 3.3,
) -> Atoms:
    """Random connected positions in a sphere of ``radius`` (A).

    Pairs are >= ``min_distance`` apart and linked by bonds shorter than ``bond`` into one
    cluster (so the calculator sees one cluster, not fragments).
    """
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial.distance import pdist, squareform

    for _ in range(10000):
        positions: list[np.ndarray] = []
        tries = 0
        while len(positions) < n_atoms and tries < 20000:
            tries += 1
            p = rng.normal(size=3)
            p *= radius * rng.random() ** (1.0 / 3.0) / np.linalg.norm(p)
            if all(np.linalg.norm(p - q) >= min_distance for q in positions):
                positions.append(p)
        if len(positions) < n_atoms:
            continue
        d = squareform(pdist(np.asarray(positions)))
        n_comp, _ = connected_components(d < bond, directed=False)
        if n_comp == 1:
            return Atoms([symbol] * n_atoms, positions=positions)
    raise StructreconError(f"could not place {n_atoms} connected atoms in radius {radius} A")


def build_pt_dataset(
    output: str | Path,
    n_relaxations: int,
    *,
    symbol: str = "Pt",
    n_atoms: int = 10,
    box: float = 17.0,
    calculator: str = "emt",
    every: int = 5,
    open_fraction: float = 0.5,
    max_radius: float = 6.0,
    fmax: float = 0.05,
    max_steps: int = 300,
    seed: int = 0,
    progress: bool = True,
) -> int:
    """Relax ``n_relaxations`` random clusters and append their frames to ``output`` (.db).

    Parameters
    ----------
    output : ASE SQLite database path (created or appended to).
    n_relaxations : number of random starts.
    box : edge of the cubic cell (A) the clusters are centred in (pbc off).
    every : keep every ``every``-th BFGS step (step 0 = the start) and the final minimum.
    open_fraction : share of starts from :func:`open_cluster` with a radius drawn uniformly
        between the compact radius and ``max_radius`` (A); the rest from
        :func:`~structrecon.data.clusters.random_cluster` (compact).
    fmax : BFGS force threshold (eV/A); max_steps : BFGS step limit.
    Returns the number of rows written.  Key-value pairs: e_form (eV/atom), e_total (eV),
    relaxation, step, minimum (1 for the final frame of a relaxation).
    """
    import ase.db
    from ase.data import atomic_numbers, covalent_radii
    from ase.optimize import BFGS
    from tqdm.auto import tqdm

    if every < 1:
        raise StructreconError("every must be >= 1")
    rng = np.random.default_rng(seed)
    e_bulk = bulk_energy(symbol, calculator)
    r_compact = covalent_radii[atomic_numbers[symbol]] * (2.0 * n_atoms) ** (1.0 / 3.0)
    written = 0
    with ase.db.connect(str(output)) as db:
        for rel in tqdm(range(n_relaxations), desc="relax", disable=not progress):
            if rng.random() < open_fraction:
                radius = rng.uniform(r_compact, max(max_radius, r_compact))
                atoms = open_cluster(symbol, n_atoms, rng, radius)
            else:
                atoms = random_cluster(symbol, n_atoms, rng)
            atoms.cell = np.eye(3) * box
            atoms.pbc = False
            atoms.positions += atoms.cell.diagonal() / 2 - atoms.positions.mean(axis=0)
            atoms.calc = get_calculator(calculator)
            frames: list[tuple[int, np.ndarray, float]] = []
            opt = BFGS(atoms, logfile=None)

            def record(opt=opt, atoms=atoms, frames=frames):
                if opt.nsteps % every == 0:
                    e = float(atoms.get_potential_energy())
                    frames.append((opt.nsteps, atoms.positions.copy(), e))

            opt.attach(record, interval=1)
            opt.run(fmax=fmax, steps=max_steps)
            e_final = float(atoms.get_potential_energy())
            if not frames or frames[-1][0] != opt.nsteps:
                frames.append((opt.nsteps, atoms.positions.copy(), e_final))
            for k, (step, pos, energy) in enumerate(frames):
                frame = Atoms(atoms.numbers, positions=pos, cell=atoms.cell, pbc=False)
                db.write(
                    frame,
                    e_form=(energy - n_atoms * e_bulk) / n_atoms,
                    e_total=energy,
                    relaxation=int(rel + seed * 1_000_000),
                    step=int(step),
                    minimum=int(k == len(frames) - 1),
                )
                written += 1
    return written


def furthest_point_sampling(
    fingerprints: np.ndarray, k: int, *, start: int | None = None, seed: int = 0
) -> np.ndarray:
    """Indices of ``k`` rows of ``fingerprints`` [B, F] chosen by furthest-point sampling.

    Columns are standardised first; each new point maximises its Euclidean distance to
    the chosen set.  ``start`` is the first index (default: random with ``seed``).
    Returns [k] int indices in the order chosen.
    """
    X = np.asarray(fingerprints, dtype=float)
    b = X.shape[0]
    if not 1 <= k <= b:
        raise StructreconError(f"cannot pick {k} of {b} structures")
    std = X.std(axis=0)
    X = (X - X.mean(axis=0)) / np.where(std > 0, std, 1.0)
    first = int(np.random.default_rng(seed).integers(b)) if start is None else int(start)
    chosen = [first]
    dist = np.linalg.norm(X - X[first], axis=1)
    for _ in range(k - 1):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(X - X[nxt], axis=1))
    return np.asarray(chosen, dtype=int)


def subset_database(
    source: str | Path, output: str | Path, k: int, *, spec="acsf-fung", seed: int = 0
) -> np.ndarray:
    """Copy ``k`` rows of ``source`` picked by furthest-point sampling into ``output``.

    Fingerprints are computed with ``spec`` (:func:`structrecon.descriptors.describe`).
    Returns the chosen row ids of ``source``.
    """
    import ase.db

    from ..descriptors import describe

    if not Path(source).is_file():
        raise StructreconError(f"database {source} does not exist")
    with ase.db.connect(str(source)) as db:
        rows = list(db.select())
    if not rows:
        raise StructreconError(f"database {source} holds no structures")
    X = describe(spec, [r.toatoms() for r in rows])
    idx = furthest_point_sampling(X, k, seed=seed)
    with ase.db.connect(str(output)) as out:
        for i in idx:
            out.write(rows[i].toatoms(), **rows[i].key_value_pairs)
    return np.asarray([rows[i].id for i in idx])


def main(argv=None) -> int:
    """``python -m structrecon.data.pt_dataset``: build a database, optionally cut a subset."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", required=True, help="ASE database to write (.db)")
    p.add_argument("-n", "--relaxations", type=int, default=100)
    p.add_argument("--every", type=int, default=5, help="keep every k-th BFGS step")
    p.add_argument("--calculator", default="emt", choices=CALCULATORS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset", type=int, nargs="*", default=[], help="FPS subset sizes")
    args = p.parse_args(argv)
    n = build_pt_dataset(
        args.output,
        args.relaxations,
        every=args.every,
        calculator=args.calculator,
        seed=args.seed,
    )
    print(f"wrote {n} frames to {args.output}")
    for k in args.subset:
        out = Path(args.output).with_name(f"{Path(args.output).stem}_fps{k}.db")
        subset_database(args.output, out, k, seed=args.seed)
        print(f"wrote {k} furthest-point-sampled frames to {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
