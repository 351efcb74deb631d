"""Run the whole pipeline on a small built-in example, in a fresh folder.

Makes a few compact Pt10 clusters (random starts relaxed with ASE's EMT), then runs
``structrecon describe`` (preset acsf-fung, Fung 2022), ``structrecon invert``
(adam-hops) and ``structrecon compare`` on them, exactly as a user would, and prints
the table.  Takes about a minute on one core.
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
    p.add_argument("-n", type=int, default=3, help="number of clusters (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def run(args) -> int:
    """Build, describe, invert, compare."""
    import ase.io

    from ..data import relaxed_clusters
    from . import main

    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    reference = out / "reference.extxyz"
    fingerprints = out / "fingerprints.npz"
    recovered = out / "recovered.extxyz"
    print(f"[1/4] relaxing {args.n} random Pt10 clusters with EMT -> {reference}")
    ase.io.write(reference, relaxed_clusters(args.n, seed=args.seed))
    steps = [
        (
            "[2/4] describe",
            ["describe", str(reference), "-d", "acsf-fung", "-o", str(fingerprints)],
        ),
        (
            "[3/4] invert",
            [
                "invert",
                str(fingerprints),
                "-o",
                str(recovered),
                "--overwrite",
                "--seed",
                str(args.seed),
            ],
        ),
        (
            "[4/4] compare",
            ["compare", str(reference), str(recovered), "--plot", str(out / "plots")],
        ),
    ]
    for label, argv in steps:
        print(f"{label}: structrecon {' '.join(argv)}")
        code = main(argv)
        if code:
            return code
    return 0
