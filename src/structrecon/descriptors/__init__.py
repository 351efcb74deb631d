"""Differentiable descriptors, pooling, specs and presets.

A fingerprint function is built once per composition group and is a pure function
of the positions: ``fn(positions [B, N, 3]) -> fingerprints [B, F]``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from .._errors import StructreconError
from ..structures import atoms_groups
from ._spec import POOLINGS, FingerprintSpec, descriptor_kinds, register_descriptor
from .acsf import ACSFSpec, acsf_fn, cosine_cutoff
from .milad import (
    MiladSpec,
    MomentInvariants,
    density_from_moments,
    geometric_moments,
    load_invariants,
    zernike_basis,
    zernike_indices,
    zernike_moments,
)
from .pooling import pool
from .snap import BispectrumSpec
from .soap import SoapSpec

__all__ = [
    "ACSFSpec",
    "BispectrumSpec",
    "FingerprintSpec",
    "MiladSpec",
    "MomentInvariants",
    "POOLINGS",
    "PRESETS",
    "SoapSpec",
    "acsf_fn",
    "cosine_cutoff",
    "density_from_moments",
    "describe",
    "describe_atoms",
    "descriptor_kinds",
    "fingerprint_fn",
    "geometric_moments",
    "load_invariants",
    "load_spec",
    "pool",
    "preset",
    "register_descriptor",
    "zernike_basis",
    "zernike_indices",
    "zernike_moments",
]


def _acsf_fung() -> FingerprintSpec:
    """Fung 2022 Pt10 settings (StructRepGen example config), 190 per atom, 380 pooled."""
    desc = ACSFSpec.from_dict(
        {
            "cutoff": 20.0,
            "species": [78],
            "g2": {
                "eta": [0.01, 0.06, 0.1, 0.2, 0.4, 0.7, 1.0, 2.0, 3.5, 5.0],
                "rs": [0, 1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 9, 10],
            },
            "g5": {"eta": [0.06, 0.1, 0.2, 0.4, 1.0], "zeta": [1, 2, 4, 16, 64], "lambda": [-1, 1]},
        }
    )
    return FingerprintSpec(descriptor=desc, pooling="maxmin", name="acsf-fung")


def _acsf_molecules() -> FingerprintSpec:
    """General-purpose ACSF for organic molecules (H, C, N, O, F), summed per species."""
    desc = ACSFSpec.from_dict(
        {
            "cutoff": 6.0,
            "species": [1, 6, 7, 8, 9],
            "g2": {"eta": [0.5, 2.0, 8.0], "rs": [0.9, 1.1, 1.3, 1.5, 2.0, 2.5, 3.0, 4.0]},
            "g4": {"eta": [0.05, 0.3], "zeta": [1, 4], "lambda": [-1, 1]},
        }
    )
    return FingerprintSpec(descriptor=desc, pooling="sum-species", name="acsf")


def _milad() -> FingerprintSpec:
    """Uhrin 2021 QM9 settings, positions only, 117 invariants.

    Zernike n_max = 7, cutoff 5 A, delta functions of unit weight (any element),
    centred on the centroid.
    """
    desc = MiladSpec(n_max=7, cutoff=5.0, feature="delta")
    return FingerprintSpec(descriptor=desc, pooling="none", name="milad")


def _milad_species() -> FingerprintSpec:
    """As ``milad`` with species weights H 1.1, C 1.3, O 1.5, N 1.7, F 1.9.

    The weights of Uhrin 2021, section IV A, as the paper's text gives them; the
    ``milad`` package's code maps N to 1.5 and O to 1.7 instead (it sorts atomic
    numbers onto the range 1-2).
    """
    desc = MiladSpec(
        n_max=7,
        cutoff=5.0,
        feature="delta",
        species=(1, 6, 8, 7, 9),
        weights=(1.1, 1.3, 1.5, 1.7, 1.9),
    )
    return FingerprintSpec(descriptor=desc, pooling="none", name="milad-species")


def _soap_molecules() -> FingerprintSpec:
    """SOAP power spectrum for organic molecules (H, C, N, O, F), summed per species.

    Cutoff 5 A (second and third neighbours of organic molecules, and most of a
    ~20-atom molecule) with a 0.5 A shifted-cosine smoothing; Gaussian width 0.4 A,
    about a third of the shortest bond (C-H 1.09 A), so neighbours stay resolved while
    the loss landscape stays smooth; 7 GTO radial functions (max_radial 6) and
    l <= 4, a compromise between resolution and fingerprint size.
    Per atom 15 species pairs x 5 x 7^2 = 3675 values; pooled by centre species as
    Cobelli 2022 eq. 2: 5 x 3675 = 18375.
    """
    desc = SoapSpec(
        cutoff=5.0,
        cutoff_width=0.5,
        density_width=0.4,
        max_radial=6,
        max_angular=4,
        species=[1, 6, 7, 8, 9],
    )
    return FingerprintSpec(descriptor=desc, pooling="sum-species", name="soap")


def _bispectrum_cobelli() -> FingerprintSpec:
    """Cobelli 2022 settings (l_max = 4, r_c = 6 A) for H, C, N, O; 55 per atom, 220 pooled.

    twojmax = 8 (l_max = twojmax / 2 = 4).  The pair cutoff rcutfac (R_i + R_j) is 6 A for
    every pair with the radii R = 1 A and rcutfac = 3 of the paper's code
    (github.com/MCobe94/descriptors-inversion: ``rcutfac=3``, ``twojmax=8`` in
    dask_inversion.py; radii and weights all 1.0 and ``rmin0 0.0`` in
    inv/descriptors/bispectrum.py).  rfac0 = 0.99 as in that code (LAMMPS has no default
    for it; its examples use 0.99363).  Weights 1 for every species, so species enter only
    through the per-species sums; switching function and B0 subtraction on (LAMMPS
    defaults, which that code kept).  Per-atom bispectra summed over the atoms of each
    species (Cobelli 2022 eq. 2).
    """
    desc = BispectrumSpec(
        twojmax=8,
        rcutfac=3.0,
        species=[1, 6, 7, 8],
        radii=[1.0, 1.0, 1.0, 1.0],
        weights=[1.0, 1.0, 1.0, 1.0],
        rfac0=0.99,
        rmin0=0.0,
    )
    return FingerprintSpec(descriptor=desc, pooling="sum-species", name="bispectrum-cobelli")


#: preset name -> factory of the spec
PRESETS = {
    "bispectrum-cobelli": _bispectrum_cobelli,
    "acsf-fung": _acsf_fung,
    "acsf": _acsf_molecules,
    "milad": _milad,
    "milad-species": _milad_species,
    "soap": _soap_molecules,
}


def preset(name: str) -> FingerprintSpec:
    """The named preset spec; an unknown name is an error listing the valid ones."""
    if name not in PRESETS:
        raise StructreconError(
            f"unknown descriptor preset '{name}'; valid: {', '.join(sorted(PRESETS))} "
            "or a .toml file"
        )
    return PRESETS[name]()


def load_spec(name_or_path: str | Path | FingerprintSpec) -> FingerprintSpec:
    """A preset name, a TOML file path, or a spec (returned as is)."""
    if isinstance(name_or_path, FingerprintSpec):
        return name_or_path
    text = str(name_or_path)
    if text.endswith(".toml") or Path(text).is_file():
        return FingerprintSpec.from_toml(text)
    return preset(text)


def fingerprint_fn(spec: FingerprintSpec, numbers, cell=None, pbc=None):
    """Return ``fn(positions [B, N, 3]) -> [B, F]`` for one composition group.

    Parameters
    ----------
    spec : fingerprint spec (descriptor + pooling).
    numbers : [N] atomic numbers.
    cell : [3, 3] Angstrom or None; pbc : three booleans or None.
    """
    per_atom = spec.descriptor.build(numbers, cell, pbc)
    numbers = np.asarray(numbers)

    def fn(positions: torch.Tensor) -> torch.Tensor:
        return pool(per_atom(positions), spec.pooling, numbers, spec.species)

    def jacobian(positions: torch.Tensor, values: bool = True):
        """Fingerprints [B, F] and their Jacobians [B, F, 3N] (pooling is linear).

        With ``values=False`` the fingerprints are not computed (None in their place).
        """
        values, jac = per_atom.jacobian(positions, values)  # [B, N, K], [B, N, K, N, 3]
        b, n, k = jac.shape[:3]
        # each of the 3N columns is pooled like a set of per-atom features [N, K]
        columns = jac.reshape(b, n, k, 3 * n).permute(0, 3, 1, 2).reshape(b * 3 * n, n, k)
        pooled = pool(columns, spec.pooling, numbers, spec.species).view(b, 3 * n, -1)
        if values is not None:
            values = pool(values, spec.pooling, numbers, spec.species)
        return values, pooled.transpose(1, 2)

    fn.n_features = spec.n_features
    fn.spec = spec
    # an analytic Jacobian where the descriptor has one and the pooling is linear
    linear = spec.pooling in ("sum", "sum-species", "mean", "none")
    fn.jacobian = jacobian if linear and getattr(per_atom, "jacobian", None) else None
    return fn


def check_cluster_connected(atoms, cutoff: float, name: str = "") -> None:
    """Error if an atom of a cluster is beyond the cutoff of every other atom.

    Such an atom's position is not encoded by a local descriptor at all.
    """
    if atoms.pbc.any() or len(atoms) < 2:
        return
    d = atoms.get_all_distances()
    np.fill_diagonal(d, np.inf)
    far = np.flatnonzero(d.min(axis=1) >= cutoff)
    if far.size:
        label = f"structure {name}: " if name else ""
        raise StructreconError(
            f"{label}atom {int(far[0])} is outside the {cutoff} A cutoff sphere of every "
            "other atom, so the fingerprint does not encode its position"
        )


def describe(spec: FingerprintSpec | str, frames, *, dtype=torch.float64) -> np.ndarray:
    """Fingerprints of a list of ``ase.Atoms``: [n_frames, F] float64.

    Frames are grouped by composition and cell and each group is computed as one batch.
    """
    spec = load_spec(spec)
    for k, atoms in enumerate(frames):
        if len(atoms) == 0:
            raise StructreconError(f"frame {k} has no atoms")
        check_cluster_connected(atoms, spec.descriptor.cutoff, str(k))
    build = functools.partial(fingerprint_fn, spec)
    return _by_group(frames, (spec.n_features,), build, dtype)


def describe_atoms(spec: FingerprintSpec | str, frames, *, dtype=torch.float64) -> np.ndarray:
    """Per-atom features (the descriptor without its pooling): [n_frames, N, F] float64.

    All frames must have the same number of atoms N; atoms keep their order.
    """
    spec = load_spec(spec)
    sizes = {len(atoms) for atoms in frames}
    if len(sizes) > 1:
        raise StructreconError(
            f"per-atom features need frames with one number of atoms, got {sorted(sizes)}"
        )
    n = sizes.pop() if sizes else 0
    if frames and n == 0:
        raise StructreconError("frame 0 has no atoms")
    return _by_group(frames, (n, spec.descriptor.n_features), spec.descriptor.build, dtype)


def _by_group(frames, shape, build, dtype) -> np.ndarray:
    """``build(numbers, cell, pbc)(positions)`` per composition and cell: [n_frames, *shape]."""
    out = np.zeros((len(frames), *shape))
    for (numbers, _, pbc), idx in atoms_groups(frames).items():
        first = frames[idx[0]]
        cell = first.cell.array if any(pbc) else None
        fn = build(numbers, cell, pbc)
        pos = torch.as_tensor(np.stack([frames[i].positions for i in idx]), dtype=dtype)
        with torch.no_grad():
            out[idx] = fn(pos).double().numpy()
    return out
