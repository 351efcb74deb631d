"""Recover structures from a fingerprint file.

Targets with the same composition run together as one batch (all their trials in one
tensor computation).  Each result is appended to OUTPUT as soon as its batch ends,
so an interrupted run keeps what it finished; ``--resume`` then skips those.
Per-frame info keys: name, loss, fingerprint_rmsd, converged, seconds, trials.

Species with ``--method milad`` (Uhrin 2021): ``--fit-species`` treats the species as
unknown (the fingerprint file's composition only gives the number of atoms; the
fingerprint must weight elements, e.g. the ``milad-species`` preset) and writes the
recovered elements; ``--species-fingerprints FP2`` takes positions from FINGERPRINTS
(e.g. ``milad``, unit weights) and species from FP2, a second fingerprint file of the
same structures (e.g. ``milad-species``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .._errors import StructreconError

METHOD_OPTIONS = {
    # CLI flag -> strategy field, for the methods that have it
    "attempts": "trials",
    "hops": "hops",
    "steps": "steps",
    "lr": "lr",
    "iterations": "iterations",
    "rounds": "rounds",
    "torsions": "torsions",
    "symmetry": "symmetry",
    "symmetry_hop": "symmetry_hop",
}


def add_arguments(p):
    """Arguments of ``structrecon invert``."""
    p.add_argument("fingerprints", help="fingerprint file written by 'structrecon describe'")
    p.add_argument("-o", "--output", required=True, help="output structures (.extxyz)")
    p.add_argument(
        "--method",
        default="adam-hops",
        help="adam-hops (Fung 2022, default), noisy-gd (Cobelli 2022), lm (Levenberg-Marquardt "
        "from perturbed copies of --start; fast for targets near a known structure), lbfgs, "
        "milad (Uhrin 2021: moments from invariants, then atoms; MILAD fingerprints only)",
    )
    p.add_argument("--attempts", type=int, help="random starts (trials) per target (adam-hops: 10)")
    p.add_argument("--hops", type=int, help="noise hops per trial (adam-hops: 5)")
    p.add_argument("--steps", type=int, help="optimiser steps per hop (adam-hops: 100)")
    p.add_argument("--lr", type=float, help="Adam learning rate, Angstrom (adam-hops: 0.1)")
    p.add_argument("--iterations", type=int, help="noisy-gd iterations (50000)")
    p.add_argument(
        "--rounds",
        type=int,
        help="adam-hops: fresh trials x hops for targets still open, up to this many rounds "
        "(1); milad: alternations of the moments and atoms fits per attempt (8)",
    )
    p.add_argument(
        "--torsions",
        type=int,
        help="lm: sweeps over the start's rotatable bonds before the first LM round (1; 0: none)",
    )
    p.add_argument(
        "--symmetry",
        type=int,
        help="lm: sweeps over partial symmetry images of the start's point group for targets "
        "still open after the hops (2; 0: none)",
    )
    p.add_argument(
        "--symmetry-hop",
        type=int,
        metavar="H",
        help="lm: sweep all open targets before LM round H only (default: before the second "
        "round those whose sweep costs less than a round, and all open targets after the hops)",
    )
    p.add_argument(
        "--fit-species",
        action="store_true",
        help="milad: species unknown; fit them from the (species-weighted) fingerprint",
    )
    p.add_argument(
        "--no-bonds",
        action="store_true",
        help="milad: map fitted weights to elements by weight alone, without the candidates "
        "from the bonding graph (which assume the usual valences of H, B, C, N, O, F, Si, P, "
        "S, Cl, Br, I)",
    )
    p.add_argument(
        "--no-restraints",
        action="store_true",
        help="milad: no chemical restraints (bond lengths and angles of H, C, N, O, F "
        "molecules) in the last polish of attempts still open after the first round",
    )
    p.add_argument(
        "--species-fingerprints",
        metavar="FP2",
        help="milad: second fingerprint file of the same structures that encodes species "
        "(e.g. milad-species); positions come from FINGERPRINTS",
    )
    p.add_argument("--start", help="start structure(s): one frame, or one per target")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--tol",
        type=float,
        default=1e-4,
        help="fingerprint RMSD counted as converged (default 1e-4)",
    )
    p.add_argument(
        "--repulsion",
        type=float,
        default=0.0,
        metavar="R_MIN",
        help="add Uhrin's short-range repulsion (eq. 35) below R_MIN Angstrom (default off; "
        "the milad method always has it, at 0.9 unless given)",
    )
    p.add_argument(
        "--batch", type=int, default=8, help="targets inverted together per batch (default 8)"
    )
    p.add_argument("--resume", action="store_true", help="skip targets already in OUTPUT")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _done_names(output: Path, names: list[str]) -> int:
    """How many leading targets OUTPUT already holds (checked by name, in order)."""
    import ase.io

    try:
        frames = ase.io.read(output, index=":", format="extxyz")
    except Exception as err:
        raise StructreconError(f"cannot resume: {output} is not readable ({err})") from None
    done = [str(a.info.get("name", "")) for a in frames]
    if done != names[: len(done)]:
        raise StructreconError(
            f"cannot resume: {output} does not hold the first targets of this fingerprint "
            "file in order (different input?)"
        )
    return len(done)


def run(args) -> int:
    """Invert and write."""
    import ase.io
    from tqdm import tqdm

    from ..fingerprints import read_fingerprints
    from ..inversion import Repulsion, get_strategy, invert_iter, targets_from_fingerprints
    from ..io import read_frames

    if args.batch < 1:
        raise StructreconError("--batch must be at least 1")
    if not args.tol > 0:
        raise StructreconError("--tol must be positive")
    fps = read_fingerprints(args.fingerprints)
    options = {}
    for flag, field in METHOD_OPTIONS.items():
        value = getattr(args, flag)
        if value is not None:
            options[field] = value
    if args.fit_species or args.species_fingerprints or args.no_bonds or args.no_restraints:
        if args.method != "milad":
            raise StructreconError(
                "--fit-species, --species-fingerprints, --no-bonds and --no-restraints "
                "need --method milad"
            )
        if args.no_restraints:
            options["restrain"] = False
        if args.fit_species:
            options["species"] = "fit"
        if args.no_bonds:
            options["bonds"] = False
    strategy = get_strategy(args.method, **options)
    species_fps = (
        read_fingerprints(args.species_fingerprints) if args.species_fingerprints else None
    )
    starts = read_frames(args.start, "start") if args.start else None
    targets = targets_from_fingerprints(fps, starts, species_fps)
    output = Path(args.output)
    skip = 0
    if output.exists() and output.stat().st_size > 0:
        if args.resume:
            skip = _done_names(output, fps.names)
        elif not args.overwrite:
            raise StructreconError(
                f"{output} exists; pass --resume to continue it or --overwrite to replace it"
            )
        else:
            output.unlink()
    todo = targets[skip:]
    if not todo:
        print(f"all {len(targets)} target(s) already in {output}")
        return 0
    repulsion = Repulsion(r_min=args.repulsion) if args.repulsion > 0 else None
    results = invert_iter(
        todo,
        fps.spec,
        strategy,
        seed=args.seed,
        tol=args.tol,
        repulsion=repulsion,
        batch_targets=args.batch,
        species_spec=None if species_fps is None else species_fps.spec,
    )
    n_conv = 0
    bar = tqdm(total=len(targets), initial=skip, unit="target", disable=args.quiet)
    with bar:
        for res in results:
            atoms = res.atoms
            atoms.info.update(
                name=res.name,
                loss=res.loss,
                fingerprint_rmsd=res.fingerprint_rmsd,
                converged=res.converged,
                seconds=round(res.seconds, 3),
                trials=res.trials,
            )
            with open(output, "a") as fh:
                ase.io.write(fh, atoms, format="extxyz")
                fh.flush()
                os.fsync(fh.fileno())
            n_conv += res.converged
            bar.update(1)
            bar.set_postfix(converged=n_conv)
    print(
        f"wrote {len(todo)} structure(s) to {output}: {n_conv} converged "
        f"(fingerprint RMSD < {args.tol:g})"
    )
    return 0
