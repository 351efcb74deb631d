"""Targets in, structures out: grouping, batching and bookkeeping around a strategy."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import ase
import numpy as np
import torch

from .._errors import StructreconError
from ..descriptors import FingerprintSpec, fingerprint_fn, load_spec
from ..structures import group_key
from .losses import Repulsion
from .strategies import AdamHops, Problem

__all__ = ["Result", "Target", "invert", "invert_iter", "targets_from_fingerprints"]


@dataclass
class Target:
    """One structure to recover.

    fingerprint [F]; numbers [N]; cell [3, 3] Angstrom or None; pbc three booleans;
    start [N, 3] Angstrom or None (random initialisation); species_fingerprint [F2] or
    None: a second fingerprint that encodes the species (see ``invert_iter``).
    """

    name: str
    numbers: np.ndarray
    fingerprint: np.ndarray
    cell: np.ndarray | None = None
    pbc: tuple = (False, False, False)
    start: np.ndarray | None = None
    species_fingerprint: np.ndarray | None = None


@dataclass
class Result:
    """One recovered structure with how it was found.

    ``seconds`` is the wall time of the batch the target ran in divided by the
    number of targets in it.  ``history`` holds the best loss after each step.
    """

    name: str
    atoms: ase.Atoms
    loss: float
    fingerprint_rmsd: float
    converged: bool
    seconds: float
    trials: int
    history: list[float] = field(default_factory=list, repr=False)


def targets_from_fingerprints(fps, starts=None, species_fps=None) -> list[Target]:
    """Targets from a :class:`FingerprintSet`; ``starts``: None, one Atoms, or one per target.

    ``species_fps``: optionally a second :class:`FingerprintSet` of the same structures
    (same names and compositions, in order) whose fingerprints encode the species.
    """
    if species_fps is not None:
        if list(species_fps.names) != list(fps.names) or any(
            list(a) != list(b) for a, b in zip(species_fps.numbers, fps.numbers)
        ):
            raise StructreconError(
                "the species fingerprints must be of the same structures as the fingerprints "
                "(same names and compositions, in the same order)"
            )
    if starts is not None and len(starts) not in (1, len(fps)):
        raise StructreconError(
            f"--start has {len(starts)} frames; give one, or one per target ({len(fps)})"
        )
    targets = []
    for k in range(len(fps)):
        pbc = tuple(bool(p) for p in fps.pbc[k])
        start = None
        if starts is not None:
            frame = starts[0] if len(starts) == 1 else starts[k]
            if list(frame.numbers) != list(fps.numbers[k]):
                raise StructreconError(
                    f"start structure for '{fps.names[k]}' has composition "
                    f"{frame.get_chemical_formula()}, the target has "
                    f"{ase.Atoms(numbers=fps.numbers[k]).get_chemical_formula()} "
                    "(same atoms in the same order needed)"
                )
            start = frame.positions.copy()
        targets.append(
            Target(
                name=fps.names[k],
                numbers=np.asarray(fps.numbers[k]),
                fingerprint=fps.fingerprints[k],
                cell=fps.cells[k] if any(pbc) else None,
                pbc=pbc,
                start=start,
                species_fingerprint=(None if species_fps is None else species_fps.fingerprints[k]),
            )
        )
    return targets


def _chunks(targets: list[Target], size: int) -> Iterator[list[int]]:
    """Consecutive runs of targets of one composition group, at most ``size`` long."""
    chunk: list[int] = []
    key = None
    for k, t in enumerate(targets):
        k_key = (group_key(t.numbers, t.cell, t.pbc), t.start is None)
        if chunk and (k_key != key or len(chunk) == size):
            yield chunk
            chunk = []
        chunk.append(k)
        key = k_key
    if chunk:
        yield chunk


def invert_iter(
    targets: list[Target],
    spec: FingerprintSpec | str,
    strategy=None,
    *,
    seed: int = 0,
    tol: float = 1e-4,
    repulsion: Repulsion | None = None,
    batch_targets: int = 8,
    dtype=torch.float64,
    species_spec: FingerprintSpec | str | None = None,
) -> Iterator[Result]:
    """Invert ``targets``, yielding one :class:`Result` per target, in order.

    Consecutive targets with the same composition and cell run together, up to
    ``batch_targets`` at a time, with all their trials in one tensor batch.  Each
    batch draws its random numbers from a generator seeded with ``seed`` and the
    index of the batch's first target, so a run is reproducible.  With
    ``species_spec``, every target needs a ``species_fingerprint`` made with it; the
    problem then carries that second fingerprint (``species_fn``, ``species_targets``)
    for strategies that recover species from it.  A strategy that recovers species
    returns them, and the result's atoms carry them.
    """
    spec = load_spec(spec)
    species_spec = None if species_spec is None else load_spec(species_spec)
    strategy = strategy or AdamHops()
    for t in targets:
        if len(t.fingerprint) != spec.n_features:
            raise StructreconError(
                f"target '{t.name}': fingerprint length {len(t.fingerprint)} does not match "
                f"the spec ({spec.n_features})"
            )
        if not np.isfinite(t.fingerprint).all():
            raise StructreconError(f"target '{t.name}': fingerprint contains NaN or inf")
        if species_spec is not None:
            fp2 = t.species_fingerprint
            if fp2 is None or len(fp2) != species_spec.n_features or not np.isfinite(fp2).all():
                raise StructreconError(
                    f"target '{t.name}': species fingerprint missing, non-finite or not of "
                    f"the species spec's length ({species_spec.n_features})"
                )
    for chunk in _chunks(targets, batch_targets):
        first = targets[chunk[0]]
        t0 = time.perf_counter()
        fn = fingerprint_fn(spec, first.numbers, first.cell, first.pbc)
        starts = None
        if first.start is not None:
            starts = torch.as_tensor(np.stack([targets[k].start for k in chunk]), dtype=dtype)
        problem = Problem(
            fn=fn,
            targets=torch.as_tensor(np.stack([targets[k].fingerprint for k in chunk]), dtype=dtype),
            numbers=np.asarray(first.numbers),
            cell=first.cell,
            pbc=first.pbc,
            starts=starts,
            repulsion=repulsion,
            tol=tol,
        )
        if species_spec is not None:
            problem.species_fn = fingerprint_fn(species_spec, first.numbers, first.cell, first.pbc)
            problem.species_targets = torch.as_tensor(
                np.stack([targets[k].species_fingerprint for k in chunk]), dtype=dtype
            )
        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + chunk[0])
        outcome = strategy.run(problem, generator)
        seconds = (time.perf_counter() - t0) / len(chunk)
        for n, k in enumerate(chunk):
            t = targets[k]
            numbers = t.numbers if outcome.numbers is None else outcome.numbers[n]
            atoms = ase.Atoms(
                numbers=numbers,
                positions=outcome.positions[n].double().numpy(),
                cell=t.cell if t.cell is not None else np.zeros((3, 3)),
                pbc=t.pbc,
            )
            if any(t.pbc):
                atoms.wrap()
            rmsd = float(outcome.fingerprint_rmsd[n])
            yield Result(
                name=t.name,
                atoms=atoms,
                loss=float(outcome.loss[n]),
                fingerprint_rmsd=rmsd,
                converged=bool(rmsd < tol),
                seconds=seconds,
                trials=int(outcome.trials[n]),
                history=outcome.history[n] if outcome.history else [],
            )


def invert(targets, spec, strategy=None, **options) -> list[Result]:
    """All results of :func:`invert_iter` as a list."""
    return list(invert_iter(targets, spec, strategy, **options))
