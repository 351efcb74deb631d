"""Run the whole pipeline on two small built-in examples, in a fresh folder.

1. Four small molecules (water, ammonia, methane, methanol from ASE's collection),
   preset ``acsf`` (ACSF summed per species, Cobelli 2022 eq. 2).
2. Compact Pt10 clusters (random starts relaxed with ASE's EMT), preset ``acsf-fung``
   (max/min pooled ACSF, Fung 2022).

For each it runs ``structrecon describe``, ``structrecon invert`` (adam-hops) and
``structrecon compare`` exactly as a user would and prints the table.  Takes about a
minute on one core.
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(p):
    """Arguments of ``structrecon demo``."""
    p.add_argument(
        "-o",
        "--outdir",
        default="structrecon-demo",
        help="folder for the files (default ./structrecon-demo)",
    )
    p.add_argument("-n", type=int, default=3, help="number of Pt10 clusters (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def run(args) -> int:
    """Build, describe, invert, compare."""
    import ase.io
    from ase.build import molecule

    from ..data import relaxed_clusters
    from . import main

    examples = [
        ("molecules", "acsf", [molecule(n) for n in ("H2O", "NH3", "CH4", "CH3OH")]),
        ("pt10", "acsf-fung", relaxed_clusters(args.n, seed=args.seed)),
    ]
    for name, spec, frames in examples:
        out = Path(args.outdir) / name
        out.mkdir(parents=True, exist_ok=True)
        for k, atoms in enumerate(frames):
            atoms.info.setdefault("name", f"{atoms.get_chemical_formula()}_{k}")
        reference = out / "reference.extxyz"
        fingerprints = out / "fingerprints.npz"
        recovered = out / "recovered.extxyz"
        print(f"== {name}: {len(frames)} reference structures -> {reference}")
        ase.io.write(reference, frames)
        steps = [
            ["describe", str(reference), "-d", spec, "-o", str(fingerprints)],
            ["invert", str(fingerprints), "-o", str(recovered), "--overwrite",
             "--seed", str(args.seed)],
            ["compare", str(reference), str(recovered), "--plot", str(out / "plots")],
        ]  # fmt: skip
        for argv in steps:
            print(f"$ structrecon {' '.join(argv)}")
            code = main(argv)
            if code:
                return code
    return 0
