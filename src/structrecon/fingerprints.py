"""The fingerprint file: one record per structure, never the positions.

A ``.npz`` file (``numpy.load(path)`` reads it, no pickles) with the arrays

========================  ==========  =================================================
key                       shape       meaning
========================  ==========  =================================================
``format``                ()          ``"structrecon-fingerprints-1"``
``spec``                  ()          JSON of the fingerprint spec that made it
``names``                 [B]         structure names (str)
``n_atoms``               [B]         atoms per structure
``numbers``               [sum N]     atomic numbers, structures concatenated
``cells``                 [B, 3, 3]   cell rows in Angstrom (zeros for clusters)
``pbc``                   [B, 3]      periodic directions
``fingerprints``          [B, F]      float64 fingerprints
``prop_<key>``            [B]         optional per-structure properties (e.g. energy)
========================  ==========  =================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._errors import StructreconError
from .descriptors import FingerprintSpec

__all__ = ["FORMAT", "FingerprintSet", "read_fingerprints", "write_fingerprints"]

FORMAT = "structrecon-fingerprints-1"


@dataclass
class FingerprintSet:
    """Fingerprints of B structures with what is needed to invert them."""

    spec: FingerprintSpec
    names: list[str]
    numbers: list[np.ndarray]
    cells: np.ndarray
    pbc: np.ndarray
    fingerprints: np.ndarray
    properties: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    def validate(self) -> None:
        """Raise a one-line error on inconsistent or non-finite content."""
        b = len(self.names)
        if b == 0:
            raise StructreconError("the fingerprint file holds no structures")
        if self.fingerprints.ndim != 2 or self.fingerprints.shape[0] != b:
            raise StructreconError(
                f"fingerprints must be [{b}, F], got {list(self.fingerprints.shape)}"
            )
        if self.fingerprints.shape[1] != self.spec.n_features:
            raise StructreconError(
                f"fingerprint length {self.fingerprints.shape[1]} does not match its spec "
                f"'{self.spec.name or self.spec.descriptor.kind}' ({self.spec.n_features} values)"
            )
        bad = np.flatnonzero(~np.isfinite(self.fingerprints).all(axis=1))
        if bad.size:
            raise StructreconError(
                f"fingerprint of '{self.names[bad[0]]}' contains NaN or inf "
                f"({bad.size} structure(s) affected)"
            )
        for name, numbers in zip(self.names, self.numbers):
            if len(numbers) == 0:
                raise StructreconError(f"structure '{name}' has no composition (no atoms)")
            unknown = sorted(set(np.asarray(numbers).tolist()) - set(self.spec.species))
            if unknown and self.spec.species:  # no species: any element (milad preset)
                raise StructreconError(
                    f"structure '{name}' has element(s) {unknown} outside the spec's "
                    f"species {list(self.spec.species)}"
                )


def write_fingerprints(path: str | Path, fps: FingerprintSet) -> None:
    """Write ``fps`` to ``path`` (.npz)."""
    arrays = {
        "format": np.asarray(FORMAT),
        "spec": np.asarray(fps.spec.to_json()),
        "names": np.asarray(fps.names, dtype=str),
        "n_atoms": np.asarray([len(n) for n in fps.numbers], dtype=np.int64),
        "numbers": np.concatenate([np.asarray(n, dtype=np.int64) for n in fps.numbers]),
        "cells": np.asarray(fps.cells, dtype=float).reshape(-1, 3, 3),
        "pbc": np.asarray(fps.pbc, dtype=bool).reshape(-1, 3),
        "fingerprints": np.asarray(fps.fingerprints, dtype=float),
    }
    for key, values in fps.properties.items():
        arrays[f"prop_{key}"] = np.asarray(values)
    path = Path(path)
    tmp = path.with_name(path.name + ".part.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def read_fingerprints(path: str | Path) -> FingerprintSet:
    """Read and validate a fingerprint file."""
    path = Path(path)
    if not path.is_file():
        raise StructreconError(f"fingerprint file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as err:  # zipfile/ValueError/OSError: not an npz
        raise StructreconError(f"{path} is not a structrecon fingerprint file ({err})") from None
    if str(arrays.get("format", "")) != FORMAT:
        raise StructreconError(f"{path} is not a structrecon fingerprint file (no format tag)")
    missing = {"spec", "names", "n_atoms", "numbers", "cells", "pbc", "fingerprints"} - set(arrays)
    if missing:
        raise StructreconError(f"{path} lacks the array(s) {', '.join(sorted(missing))}")
    spec = FingerprintSpec.from_json(str(arrays["spec"]))
    n_atoms = arrays["n_atoms"].astype(int)
    if n_atoms.sum() != len(arrays["numbers"]):
        raise StructreconError(f"{path}: n_atoms does not add up to the numbers array")
    numbers = np.split(arrays["numbers"].astype(int), np.cumsum(n_atoms)[:-1])
    fps = FingerprintSet(
        spec=spec,
        names=[str(n) for n in arrays["names"]],
        numbers=numbers,
        cells=arrays["cells"],
        pbc=arrays["pbc"],
        fingerprints=arrays["fingerprints"].astype(float),
        properties={k[5:]: v for k, v in arrays.items() if k.startswith("prop_")},
    )
    fps.validate()
    return fps
