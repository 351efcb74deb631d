"""MILAD reconstruction of QM9 molecules (Uhrin 2021, section IV A, Fig. 5): ours against
the ``milad`` package, side by side in one run, one thread.

Molecules: ``--per-size`` random QM9 molecules of each size N in ``--sizes`` (default 3 per
size for N = 3 ... 29: 77 molecules, as the paper; QM9 has two of 3 atoms and none of 28),
from the ``qm9pack`` package's CSV files, drawn with a generator seeded by (seed, N) so a
subset of sizes picks the same molecules as the full run.  Each molecule is centred on
its smallest bounding sphere (``miniball``, as the paper) and described with Zernike
n_max = 7, cutoff 5 A, delta functions: 117 invariants.

Modes (``--modes``):

- ``positions``: unit weights; the strategy is given N.
- ``species``: weights H 1.1, C 1.3, O 1.5, N 1.7, F 1.9 (the paper's text; the ``milad``
  package maps N 1.5, O 1.7 and is run with its own mapping); species unknown, recovered
  from the one fingerprint.
- ``two``: positions from the unit-weight fingerprint, species from the species one
  (ours only: the ``milad`` package has no such routine).

Success: the paper's criterion (fingerprint RMSD < 1e-6, recomputed from the returned
structure and species) and a structural one (RMSD < 0.1 A after the best superposition,
mirror images allowed; for positions all atoms count as one element, otherwise the
species must be right).  Both codes get ``--attempts`` attempts per molecule (the paper: 3)
and stop at the first success; seconds are per molecule.  The ``milad`` package runs its
``reconstruct.find_iteratively`` (6 outer iterations, repulsion r_min 0.55 A) from random
atoms in the cutoff sphere, as the paper.

    OMP_NUM_THREADS=1 python benchmarks/qm9_milad.py                       # full: 77 x 3 modes
    OMP_NUM_THREADS=1 python benchmarks/qm9_milad.py --sizes 5 10 15 20 25 --per-size 1

The ``milad`` package takes minutes per molecule; ``--milad-per-size`` runs it on the first
k molecules of each size only, ``--milad-max-atoms`` on the small ones only, ``--skip-milad``
not at all.  Writes
benchmarks/results/qm9_milad[_TAG].json, .md and .png.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import argparse
import ast
import csv
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from structrecon import StructreconError
from structrecon.descriptors import FingerprintSpec, MiladSpec, describe
from structrecon.evaluate import structure_rmsd
from structrecon.inversion import MiladReconstruction, Repulsion, Target, invert
from structrecon.inversion.milad import MOLECULAR_R_MIN

torch.set_num_threads(1)
HERE = Path(__file__).resolve().parent
SPECIES = (1, 6, 8, 7, 9)
WEIGHTS = (1.1, 1.3, 1.5, 1.7, 1.9)  # H C O N F, Uhrin 2021 section IV A
MODES = ("positions", "species", "two")
TOL = 1e-6
CUTOFF = 5.0  # Angstrom, the paper's and the milad preset's
STRUCT_TOL = 0.1


# -- data ------------------------------------------------------------------------------------


def qm9_molecules(sizes, per_size, seed, max_radius=None):
    """``per_size`` random QM9 molecules of each size, miniball-centred ase.Atoms.

    With ``max_radius`` (Angstrom), a drawn molecule whose smallest bounding sphere is
    larger is replaced by the first that fits among the size's other molecules in an
    order seeded by (seed, N, 1); the others stay the molecules drawn without it.  Its
    ``info["replaces"]`` names the molecule it stands in for.
    """
    import miniball

    spec = importlib.util.find_spec("qm9pack")  # its __init__ needs pkg_resources
    if spec is None:
        sys.exit('error: QM9 comes from the qm9pack package: pip install -e ".[bench]"')
    folder = Path(spec.submodule_search_locations[0]) / "data"
    csv.field_size_limit(sys.maxsize)
    rows = {}
    for part in ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv"):
        with open(folder / part, newline="") as fh:
            reader = csv.reader(fh)
            head = next(reader)
            cols = [head.index(k) for k in ("Index", "N_atoms", "Elements", "XYZ_Ang")]
            for row in reader:
                index, n, elements, xyz = (row[c] for c in cols)
                if int(n) in sizes:
                    rows.setdefault(int(n), []).append((int(index), elements, xyz))

    def centred(entry):
        index, elements, xyz = entry
        atoms = Atoms(ast.literal_eval(elements), positions=ast.literal_eval(xyz))
        # a fixed generator: miniball's own, seeded per process, changes the last bits
        centre, r2 = miniball.get_bounding_ball(atoms.positions, rng=np.random.default_rng(0))
        atoms.positions -= centre
        atoms.info["name"] = f"qm9_{index}"
        return atoms, np.sqrt(r2)

    out = []
    for n in sizes:
        found = sorted(rows.get(n, []))
        rng = np.random.default_rng([seed, n])
        pick = rng.choice(len(found), size=min(per_size, len(found)), replace=False)
        spare = iter(np.random.default_rng([seed, n, 1]).permutation(len(found)))
        for k in sorted(pick):
            atoms, radius = centred(found[k])
            if max_radius is not None and radius > max_radius:
                for j in spare:
                    if j in pick:
                        continue
                    other, r_other = centred(found[j])
                    if r_other <= max_radius:
                        other.info["replaces"] = f"{atoms.info['name']} ({radius:.2f} A)"
                        atoms = other
                        break
                else:
                    sys.exit(f"error: no QM9 molecule of {n} atoms fits in {max_radius} A")
            out.append(atoms)
    return out


def specs(cutoff=CUTOFF):
    unit = MiladSpec(cutoff=cutoff, centre="miniball", species=SPECIES)  # all weights 1
    weighted = MiladSpec(cutoff=cutoff, centre="miniball", species=SPECIES, weights=WEIGHTS)
    return (
        FingerprintSpec(descriptor=unit, pooling="none", name="milad-miniball"),
        FingerprintSpec(descriptor=weighted, pooling="none", name="milad-species-miniball"),
    )


def as_one_element(atoms):
    return Atoms([1] * len(atoms), positions=atoms.positions)


def judge(reference, candidate, fp_rmsd, positions_only):
    """(species right, structural RMSD or nan) of a recovered molecule."""
    if positions_only:
        return True, structure_rmsd(as_one_element(reference), as_one_element(candidate))
    right = sorted(candidate.numbers) == sorted(reference.numbers)
    if not right or not np.isfinite(candidate.positions).all():
        return right, float("nan")
    return right, structure_rmsd(reference, candidate)


# -- ours ------------------------------------------------------------------------------------


def fp_rmsd(spec, atoms, target):
    return float(np.sqrt(np.mean((describe(spec, [atoms])[0] - target) ** 2)))


def run_ours(atoms, mode, attempts, seed, rounds, r_min=None, cutoff=CUTOFF, restrain=True):
    unit, weighted = specs(cutoff)
    fp_unit, fp_w = describe(unit, [atoms])[0], describe(weighted, [atoms])[0]
    options = dict(trials=attempts, rounds=rounds, restrain=restrain)
    if mode == "positions":
        target = Target(name=atoms.info["name"], numbers=atoms.numbers, fingerprint=fp_unit)
        strategy = MiladReconstruction(**options)
        spec, species_spec = unit, None
    elif mode == "species":
        target = Target(name=atoms.info["name"], numbers=atoms.numbers, fingerprint=fp_w)
        strategy = MiladReconstruction(species="fit", **options)
        spec, species_spec = weighted, None
    else:
        target = Target(
            name=atoms.info["name"],
            numbers=atoms.numbers,
            fingerprint=fp_unit,
            species_fingerprint=fp_w,
        )
        strategy = MiladReconstruction(**options)
        spec, species_spec = unit, weighted
    t0 = time.perf_counter()
    (res,) = invert(
        [target],
        spec,
        strategy,
        seed=seed,
        tol=TOL,
        species_spec=species_spec,
        repulsion=None if r_min is None else Repulsion(r_min=r_min),
    )
    seconds = time.perf_counter() - t0
    got = res.atoms
    # the paper's criterion, recomputed from what came back
    rmsd = float("inf")
    if set(got.numbers.tolist()) <= set(SPECIES):
        try:
            if mode == "positions":
                rmsd = fp_rmsd(unit, got, fp_unit)
            else:
                rmsd = fp_rmsd(weighted, got, fp_w)
                if mode == "two":
                    rmsd = max(rmsd, fp_rmsd(unit, got, fp_unit))
        except StructreconError:  # e.g. an atom out of everybody's reach
            pass
    right, srmsd = judge(atoms, got, rmsd, mode == "positions")
    return dict(fp_rmsd=rmsd, struct_rmsd=srmsd, species_ok=right, seconds=seconds)


# -- the milad package ---------------------------------------------------------------------


def milad_package():
    import dscribe.descriptors as dd
    from dscribe.descriptors.descriptor import Descriptor

    dd.Descriptor = Descriptor  # milad with dscribe 2.x
    import milad

    return milad


def run_milad(atoms, mode, attempts, seed, cutoff=CUTOFF):
    milad = milad_package()
    from milad import atomic, reconstruct
    from milad.play import asetools

    np.random.seed(seed)
    random.seed(seed)
    if mode == "positions":
        desc = milad.descriptor(cutoff=cutoff)
        ref = as_one_element(atoms)
        numbers = 1.0
    else:
        desc = milad.descriptor(
            species={"map": {"numbers": list(SPECIES), "range": (1.0, 2.0)}}, cutoff=cutoff
        )
        ref = atoms
        numbers = tuple(sorted(SPECIES))
    fp = np.asarray(desc(asetools.ase2milad(ref))).real
    t0 = time.perf_counter()
    best = None
    for _ in range(attempts):
        start = atomic.random_atom_collection_in_sphere(
            len(atoms), radius=cutoff, centre=True, numbers=numbers
        )
        try:
            res = reconstruct.find_iteratively(
                desc, fp, start, find_species=mode == "species", min_rmsd=1e-7, minsep=0.55
            )
            got = asetools.milad2ase(res.value)
            rmsd = float(np.sqrt(np.mean((np.asarray(desc(res.value)).real - fp) ** 2)))
        except Exception as err:  # noqa: BLE001 - a failed attempt, reported
            print(f"    milad attempt failed: {type(err).__name__}: {err}", flush=True)
            continue
        if best is None or rmsd < best[0]:
            best = (rmsd, got)
        if rmsd < TOL:
            break
    seconds = time.perf_counter() - t0
    if best is None:
        return dict(
            fp_rmsd=float("inf"), struct_rmsd=float("nan"), species_ok=False, seconds=seconds
        )
    rmsd, got = best
    if mode == "positions":
        got = as_one_element(got)
    else:
        got.numbers = np.rint(got.numbers).astype(int)
    right, srmsd = judge(atoms, got, rmsd, mode == "positions")
    return dict(fp_rmsd=rmsd, struct_rmsd=srmsd, species_ok=right, seconds=seconds)


# -- report ------------------------------------------------------------------------------------


def success(r):
    return r["fp_rmsd"] < TOL, bool(r["species_ok"] and r["struct_rmsd"] < STRUCT_TOL)


def summary(records, code, mode, names=None):
    rows = [r for r in records if r["code"] == code and r["mode"] == mode]
    if names is not None:
        rows = [r for r in rows if r["name"] in names]
    if not rows:
        return None
    ok = np.array([success(r) for r in rows])
    secs = np.array([r["seconds"] for r in rows])
    return dict(
        n=len(rows),
        fp=int(ok[:, 0].sum()),
        struct=int(ok[:, 1].sum()),
        median_s=float(np.median(secs)),
        mean_s=float(np.mean(secs)),
    )


def write_report(records, args, out):
    lines = [
        "# MILAD reconstruction of QM9 molecules: structrecon vs the milad package",
        "",
        f"Sizes {args.sizes[0]}-{args.sizes[-1]}, {args.per_size} per size, seed {args.seed}, "
        f"{args.attempts} attempts, {args.rounds} rounds, our repulsion r_min "
        f"{MOLECULAR_R_MIN if args.r_min is None else args.r_min} A, one thread.  Success: fingerprint RMSD < {TOL:g} / "
        f"aligned RMSD < {STRUCT_TOL} A (mirror allowed; species must be right)."
        + (
            f"  Molecules within the {args.cutoff:g} A cutoff only (--within-cutoff): "
            + ("; ".join(args.replaced) or "none replaced")
            + "."
            if getattr(args, "within_cutoff", False)
            else ""
        ),
        "",
        "| code | mode | molecules | fp < 1e-6 | struct < 0.1 A | median s | mean s |",
        "|---|---|---|---|---|---|---|",
    ]
    for code in ("ours", "milad"):
        for mode in MODES:
            s = summary(records, code, mode)
            if s:
                lines.append(
                    f"| {code} | {mode} | {s['n']} | {s['fp']}/{s['n']} "
                    f"({100 * s['fp'] / s['n']:.0f}%) | {s['struct']}/{s['n']} "
                    f"({100 * s['struct'] / s['n']:.0f}%) | {s['median_s']:.1f} | "
                    f"{s['mean_s']:.1f} |"
                )
    lines += ["", "Side by side (molecules both codes ran):", ""]
    lines += [
        "| mode | molecules | ours fp/struct | milad fp/struct | ours median s | "
        "milad median s | speed-up (median) | speed-up (total) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        names = {r["name"] for r in records if r["code"] == "milad" and r["mode"] == mode}
        a, b = summary(records, "ours", mode, names), summary(records, "milad", mode, names)
        if a and b:
            lines.append(
                f"| {mode} | {a['n']} | {a['fp']}/{a['struct']} | {b['fp']}/{b['struct']} | "
                f"{a['median_s']:.1f} | {b['median_s']:.1f} | "
                f"{b['median_s'] / a['median_s']:.1f}x | {b['mean_s'] / a['mean_s']:.1f}x |"
            )
    lines += ["", "By size (ours: fp successes / molecules per mode):", ""]
    lines += ["| N | " + " | ".join(MODES) + " |", "|---|" + "---|" * len(MODES)]
    for n in sorted({r["n_atoms"] for r in records}):
        cells = []
        for mode in MODES:
            rows = [
                r
                for r in records
                if r["code"] == "ours" and r["mode"] == mode and r["n_atoms"] == n
            ]
            cells.append(f"{sum(success(r)[0] for r in rows)}/{len(rows)}" if rows else "-")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)


def plot(records, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    styles = {
        "positions": ("tab:orange", "o"),
        "species": ("tab:purple", "s"),
        "two": ("tab:green", "^"),
    }
    for ax, code in zip(axes, ("ours", "milad")):
        for mode, (colour, marker) in styles.items():
            rows = [r for r in records if r["code"] == code and r["mode"] == mode]
            if not rows:
                continue
            n = np.array([r["n_atoms"] for r in rows], dtype=float)
            fp = np.clip([r["fp_rmsd"] for r in rows], 1e-17, 1e3)
            ok = np.mean([success(r)[0] for r in rows])
            jitter = {"positions": -0.2, "species": 0.0, "two": 0.2}[mode]
            ax.scatter(
                n + jitter,
                fp,
                c=colour,
                marker=marker,
                s=18,
                label=f"{mode} ({100 * ok:.0f}% < 1e-6)",
            )
        ax.axhline(TOL, ls="--", c="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("number of atoms")
        ax.set_title("structrecon" if code == "ours" else "milad package")
        if ax.collections:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("fingerprint RMSD (best of the attempts)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(range(3, 30)))
    parser.add_argument("--per-size", type=int, default=3)
    parser.add_argument("--attempts", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rounds", type=int, default=8, help="our alternations of moments and atoms fits (8)"
    )
    parser.add_argument(
        "--r-min",
        type=float,
        help="our repulsion radius, Angstrom (default: the milad method's, 0.9; the paper "
        "and the milad package: 0.55)",
    )
    parser.add_argument(
        "--cutoff",
        type=float,
        default=CUTOFF,
        help="radius of the sphere mapped onto the unit ball, Angstrom (5, the paper's; "
        "molecules reaching beyond it are described with the basis outside its ball)",
    )
    parser.add_argument(
        "--within-cutoff",
        action="store_true",
        help="draw only molecules whose smallest bounding sphere fits in the cutoff (the "
        "paper's set-up: its 5 A 'accommodate[s] the largest molecule'); a drawn molecule "
        "reaching beyond is replaced by another of its size, the others stay the same",
    )
    parser.add_argument(
        "--no-restraints",
        action="store_true",
        help="our reconstruction without the chemical restraints of its last polish",
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--skip-milad", action="store_true")
    parser.add_argument(
        "--milad-per-size", type=int, help="run the milad package on this many per size only"
    )
    parser.add_argument(
        "--milad-max-atoms",
        type=int,
        help="run the milad package only on molecules of at most this many atoms",
    )
    parser.add_argument(
        "--milad-species-max-atoms",
        type=int,
        help="the same for the species mode (default: --milad-max-atoms)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the records of an earlier run with the same tag, run only what is missing",
    )
    parser.add_argument(
        "--milad-modes",
        nargs="+",
        default=["positions", "species"],
        choices=("positions", "species"),
    )
    parser.add_argument("--tag", default="", help="suffix of the output files")
    args = parser.parse_args()
    if not args.cutoff > 0:
        parser.error(f"--cutoff must be > 0, got {args.cutoff}")
    if args.r_min is not None and not args.r_min > 0:
        parser.error(f"--r-min must be > 0, got {args.r_min}")
    args.sizes = sorted(set(args.sizes))
    molecules = qm9_molecules(
        args.sizes, args.per_size, args.seed, args.cutoff if args.within_cutoff else None
    )
    args.replaced = [
        f"{a.info['name']} replaces {a.info['replaces']}" for a in molecules if "replaces" in a.info
    ]
    for line in args.replaced:
        print(line + ", beyond the cutoff")
    print(f"{len(molecules)} molecules", flush=True)
    out = HERE / "results" / ("qm9_milad" + (f"_{args.tag}" if args.tag else ""))
    out.parent.mkdir(exist_ok=True)
    records = []
    if args.resume and out.with_suffix(".json").exists():
        records = json.loads(out.with_suffix(".json").read_text())
    done = {(r["name"], r["code"], r["mode"]) for r in records}
    species_max = args.milad_species_max_atoms or args.milad_max_atoms
    milad_quota = {}
    for atoms in molecules:
        n = len(atoms)
        base = dict(name=atoms.info["name"], n_atoms=n, formula=atoms.get_chemical_formula())
        run_milad_here = (
            not args.skip_milad
            and (args.milad_per_size is None or milad_quota.get(n, 0) < args.milad_per_size)
            and (args.milad_max_atoms is None or n <= args.milad_max_atoms)
        )
        milad_quota[n] = milad_quota.get(n, 0) + 1
        for mode in args.modes:
            jobs = [
                (
                    "ours",
                    lambda *a: run_ours(
                        *a,
                        rounds=args.rounds,
                        r_min=args.r_min,
                        cutoff=args.cutoff,
                        restrain=not args.no_restraints,
                    ),
                )
            ]
            if run_milad_here and mode in args.milad_modes:
                if mode != "species" or species_max is None or n <= species_max:
                    jobs.append(("milad", lambda *a: run_milad(*a, cutoff=args.cutoff)))
            for code, fn in jobs:
                if (base["name"], code, mode) in done:
                    continue
                r = dict(base, code=code, mode=mode, **fn(atoms, mode, args.attempts, args.seed))
                records.append(r)
                fp_ok, st_ok = success(r)
                print(
                    f"{r['name']:>12} N={n:2d} {mode:>9} {code:>5}: fp {r['fp_rmsd']:.1e} "
                    f"struct {r['struct_rmsd']:.1e} species {r['species_ok']} "
                    f"{r['seconds']:6.1f}s {'ok' if fp_ok else 'FAIL'}",
                    flush=True,
                )
                out.with_suffix(".json").write_text(json.dumps(records, indent=1))
    write_report(records, args, out)
    plot(records, out)
    print(f"wrote {out.with_suffix('.md')}, .json, .png")


if __name__ == "__main__":
    main()
