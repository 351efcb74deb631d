"""Metal clusters: random compact starts relaxed with a real calculator (EMT)."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, covalent_radii

__all__ = ["random_cluster", "relaxed_clusters"]


def random_cluster(
    symbol: str, n_atoms: int, rng: np.random.Generator, *, min_distance=None
) -> Atoms:
    """Random positions in a sphere sized for compact packing.

    No pair is closer than ``min_distance`` (default: 0.8 x twice the covalent radius).
    """
    r_cov = covalent_radii[atomic_numbers[symbol]]
    min_distance = 1.6 * r_cov if min_distance is None else min_distance
    radius = r_cov * (2.0 * n_atoms) ** (1.0 / 3.0)
    positions: list[np.ndarray] = []
    while len(positions) < n_atoms:
        p = rng.normal(size=3)
        p *= radius * rng.random() ** (1.0 / 3.0) / np.linalg.norm(p)
        if all(np.linalg.norm(p - q) >= min_distance for q in positions):
            positions.append(p)
    return Atoms(symbol * n_atoms if len(symbol) == 1 else [symbol] * n_atoms, positions=positions)


def relaxed_clusters(
    n_clusters: int,
    *,
    symbol: str = "Pt",
    n_atoms: int = 10,
    seed: int = 0,
    fmax: float = 0.02,
    max_steps: int = 500,
) -> list[Atoms]:
    """``n_clusters`` local minima of EMT for ``symbol``_``n_atoms``, centred at the origin.

    Each starts from :func:`random_cluster` and is relaxed with ASE's BFGS; the
    potential energy (eV) is stored in ``atoms.info["energy"]``.
    """
    from ase.calculators.emt import EMT
    from ase.optimize import BFGS

    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_clusters):
        atoms = random_cluster(symbol, n_atoms, rng)
        atoms.calc = EMT()
        BFGS(atoms, logfile=None).run(fmax=fmax, steps=max_steps)
        energy = float(atoms.get_potential_energy())
        atoms.calc = None
        atoms.positions -= atoms.positions.mean(axis=0)
        atoms.info["name"] = f"{symbol}{n_atoms}_emt_{seed}_{k}"
        atoms.info["energy"] = energy
        out.append(atoms)
    return out
