"""Compute the fingerprint of every structure in INPUT and write a fingerprint file.

The file stores names, atomic numbers, cells, periodicity and fingerprints, never
positions (see the README for its layout).  Scalar numeric ``info`` keys of the
frames (an energy, say) are kept as properties.
"""

from __future__ import annotations

import numbers


def add_arguments(p):
    """Arguments of ``structrecon describe``."""
    p.add_argument("input", help="structure file ASE reads (one or many frames)")
    p.add_argument(
        "-d",
        "--descriptor",
        required=True,
        metavar="SPEC",
        help="preset name (acsf-fung, acsf, bispectrum-cobelli, soap, milad, milad-species) "
        "or a TOML spec file",
    )
    p.add_argument("-o", "--output", required=True, help="fingerprint file to write (.npz)")


def run(args) -> int:
    """Describe and write."""
    import numpy as np

    from ..descriptors import describe, load_spec
    from ..fingerprints import FingerprintSet, write_fingerprints
    from ..io import frame_name, read_frames

    spec = load_spec(args.descriptor)
    frames = read_frames(args.input)
    fps = describe(spec, frames)
    props = [_scalar_properties(a) for a in frames]
    keys = set.intersection(*[set(p) for p in props])
    fset = FingerprintSet(
        spec=spec,
        names=[frame_name(a, args.input, k) for k, a in enumerate(frames)],
        numbers=[a.numbers.copy() for a in frames],
        cells=np.stack([a.cell.array for a in frames]),
        pbc=np.stack([a.pbc for a in frames]),
        fingerprints=fps,
        properties={k: np.asarray([p[k] for p in props], dtype=float) for k in sorted(keys)},
    )
    fset.validate()
    output = args.output if args.output.endswith(".npz") else args.output + ".npz"
    write_fingerprints(output, fset)
    _warn_beyond_cutoff(spec, frames, fset.names)
    print(
        f"wrote {len(frames)} fingerprint(s) of {fps.shape[1]} values "
        f"({spec.name or spec.descriptor.kind}) to {output}"
    )
    return 0


def _warn_beyond_cutoff(spec, frames, names) -> None:
    """One line on stderr when a MILAD fingerprint describes atoms beyond its cutoff."""
    import sys

    from ..descriptors import MiladSpec

    milad = spec.descriptor
    if not isinstance(milad, MiladSpec):
        return
    reach = [milad.reach(a.positions) for a in frames]
    far = [k for k, r in enumerate(reach) if r > milad.cutoff]
    if far:
        k = max(far, key=lambda i: reach[i])
        print(
            f"warning: {len(far)} of {len(frames)} structure(s) reach beyond the "
            f"{milad.cutoff:g} A MILAD cutoff (farthest: {names[k]}, {reach[k]:.2f} A); "
            "the basis is orthonormal only inside and 'invert --method milad' assumes every "
            "atom inside: a larger cutoff in a TOML spec holds them",
            file=sys.stderr,
        )


def _scalar_properties(atoms) -> dict[str, float]:
    """Scalar numbers of a frame: its info keys and a stored calculator's energy."""
    import numpy as np

    out = {
        k: float(v)
        for k, v in atoms.info.items()
        if isinstance(v, numbers.Real) and not isinstance(v, bool)
    }
    results = getattr(atoms.calc, "results", {}) or {}
    for key in ("energy", "free_energy"):
        if key in results and np.ndim(results[key]) == 0:
            out.setdefault(key, float(results[key]))
    return out
