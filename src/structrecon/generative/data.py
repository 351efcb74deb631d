"""Reading training data for the generative models: structures, fingerprint files or CSV."""

from __future__ import annotations

import numbers as _numbers
from pathlib import Path

import numpy as np

from .._errors import StructreconError
from ..descriptors import FingerprintSpec, load_spec
from ..io import check_file
from .training import TrainingData

__all__ = ["load_training_data", "frame_property"]

#: composition and cell assumed for a bare fingerprint CSV (StructRepGen's Pt10 set)
CSV_NUMBERS = np.full(10, 78)


def frame_property(atoms, key: str):
    """Scalar ``key`` of a frame: its info, then a stored calculator result; else None."""
    value = atoms.info.get(key)
    if value is None:
        results = getattr(atoms.calc, "results", {}) or {}
        value = results.get(key)
    if isinstance(value, _numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return float(value)
    return None


def _read_structures(path: Path, key: str):
    """Frames of an ASE database or structure file and their ``key`` values."""
    if path.suffix == ".db":
        import ase.db

        try:
            with ase.db.connect(str(path)) as db:
                rows = list(db.select())
        except Exception as err:  # noqa: BLE001 - sqlite/ase errors
            raise StructreconError(f"cannot read database {path}: {err}") from None
        if not rows:
            raise StructreconError(f"database {path} holds no structures")
        frames, values = [], []
        for row in rows:
            value = row.key_value_pairs.get(key, row.get(key))
            frames.append(row.toatoms())
            values.append(
                float(value)
                if isinstance(value, _numbers.Real) and not isinstance(value, bool)
                else None
            )
        available = sorted(set().union(*[r.key_value_pairs for r in rows]))
    else:
        from ..io import read_frames

        frames = read_frames(str(path), "data")
        values = [frame_property(a, key) for a in frames]
        available = sorted(
            set().union(*[{k for k in a.info if frame_property(a, k) is not None} for a in frames])
        )
    missing = [k for k, v in enumerate(values) if v is None]
    if missing:
        raise StructreconError(
            f"property '{key}' missing in {len(missing)} of {len(frames)} structure(s) of "
            f"{path} (first: index {missing[0]}); available: {', '.join(available) or 'none'}"
        )
    return frames, np.asarray(values, dtype=float)


def load_training_data(
    path: str | Path,
    key: str,
    spec: str | FingerprintSpec | None = None,
    y_csv: str | Path | None = None,
    *,
    per_atom: bool = False,
) -> TrainingData:
    """Fingerprints and property ``key`` from ``path``.

    Parameters
    ----------
    path : an ASE database (``.db``) or structure file with ``key`` in each frame's
        key-value pairs / info (fingerprints computed here with ``spec``, default
        ``acsf-fung``); a structrecon fingerprint file (``.npz``) with ``prop_<key>``; or a
        CSV of fingerprints [B, F] (no header) together with ``y_csv`` (B values), read as
        Pt10 clusters described with ``spec`` (default ``acsf-fung``).
    key : property name (e.g. ``e_form``, eV/atom).
    per_atom : per-atom features [B, N, F] (the descriptor of ``spec`` without its pooling)
        instead of fingerprints, for a per-atom surrogate; structures only.
    All structures must share one composition; the first frame's cell/pbc are kept.
    """
    p = check_file(path, "data")
    if per_atom and p.suffix.lower() in (".csv", ".npz"):
        raise StructreconError(
            f"{p} holds fingerprints, not structures: a per-atom surrogate needs structures "
            "(an ASE database or structure file)"
        )
    if y_csv is not None and p.suffix.lower() != ".csv":
        raise StructreconError("--y-csv goes with a CSV of fingerprints as DATA")
    if p.suffix.lower() == ".csv":
        if y_csv is None:
            raise StructreconError(
                f"{p} is a CSV of fingerprints: give the property values with --y-csv FILE"
            )
        fps = _load_csv(p, 2)
        prop = _load_csv(Path(y_csv), 1)
        if len(prop) != len(fps):
            raise StructreconError(f"{p} has {len(fps)} rows but {y_csv} has {len(prop)} values")
        fspec = load_spec(spec or "acsf-fung")
        return TrainingData(fps, prop, key, fspec, CSV_NUMBERS, np.zeros((3, 3)), np.zeros(3, bool))
    if p.suffix.lower() == ".npz":
        from ..fingerprints import read_fingerprints

        fset = read_fingerprints(p)
        if key not in fset.properties:
            raise StructreconError(
                f"property '{key}' not in {p}; available: "
                f"{', '.join(sorted(fset.properties)) or 'none'}"
            )
        if spec is not None and load_spec(spec).to_dict() != fset.spec.to_dict():
            raise StructreconError(f"{p} was made with another fingerprint spec than -d {spec}")
        _check_one_composition(fset.numbers, p)
        return TrainingData(
            fset.fingerprints,
            fset.properties[key],
            key,
            fset.spec,
            fset.numbers[0],
            fset.cells[0],
            fset.pbc[0],
        )
    frames, prop = _read_structures(p, key)
    _check_one_composition([a.numbers for a in frames], p)
    from ..descriptors import describe, describe_atoms

    fspec = load_spec(spec or "acsf-fung")
    fps = (describe_atoms if per_atom else describe)(fspec, frames)
    first = frames[0]
    cell = first.cell.array if first.pbc.any() else np.zeros((3, 3))
    return TrainingData(fps, prop, key, fspec, first.numbers.copy(), cell, first.pbc.copy())


def _check_one_composition(numbers_list, path) -> None:
    """The models are per composition (Fung 2022: Pt10 only)."""
    ref = np.sort(np.asarray(numbers_list[0]))
    for k, numbers in enumerate(numbers_list):
        if not np.array_equal(np.sort(np.asarray(numbers)), ref):
            raise StructreconError(
                f"{path}: structure {k} has another composition than the first; "
                "train one model per composition"
            )


def _load_csv(path: Path, ndim: int) -> np.ndarray:
    """A numeric CSV (comma separated, no header) as a float array of ``ndim`` dims."""
    if not path.is_file():
        raise StructreconError(f"CSV file {path} does not exist")
    try:
        arr = np.loadtxt(path, delimiter=",", dtype=float, ndmin=ndim)
    except ValueError as err:
        raise StructreconError(f"cannot read CSV {path}: {err}") from None
    if ndim == 1 and arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size == 0:
        raise StructreconError(f"CSV file {path} is empty")
    return arr
