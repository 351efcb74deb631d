"""Screen reconstructed structures before spending a calculator on them.

Two checks, either or both (Fung 2022, sec. 3.3, and one step further):

* the *invalid-representation* screen: a generated fingerprint whose reconstruction
  keeps a high fingerprint RMSD (the ``fingerprint_rmsd`` that ``invert`` writes) is
  not realisable; --max-fp-rmsd X flags structures above X;
* the *surrogate* screen: the fingerprint of each reconstructed structure is computed
  again (with the surrogate's descriptor) and the surrogate predicts its property;
  --surrogate MODEL_DIR --target Y flags structures predicted more than --window away
  from Y.  It asks of the structure what the generator was asked of the fingerprint.
  A per-atom surrogate ('train surrogate --per-atom') predicts from the structure's
  per-atom features instead: far more accurate on reconstructions, which lie off the
  training data (Pt10, EMT: MAE 0.01-0.02 against 0.03-0.11 eV/atom).

Prints one line per structure (name, fingerprint RMSD, prediction, kept or why not) and
the count kept; -o writes the kept structures (with ``predicted_<property>`` in their
info) to a new file.  No calculator is called.
"""

from __future__ import annotations

import math
from pathlib import Path

from .._errors import StructreconError


def add_arguments(p):
    """Arguments of ``structrecon screen``."""
    p.add_argument("structures", help="structure file (e.g. OUTPUT.extxyz of 'invert')")
    p.add_argument("--surrogate", metavar="MODEL_DIR", help="surrogate of 'train surrogate'")
    p.add_argument("--target", type=float, help="target property (with --surrogate)")
    p.add_argument(
        "--window",
        type=float,
        default=0.05,
        help="keep predictions within +-window of the target (default 0.05)",
    )
    p.add_argument(
        "--max-fp-rmsd",
        type=float,
        help="flag structures whose reconstruction fingerprint RMSD is above this",
    )
    p.add_argument("-o", "--output", help="write the kept structures here (extxyz)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")


def _check(args) -> None:
    if args.surrogate is None and args.max_fp_rmsd is None:
        raise StructreconError("nothing to screen by: give --surrogate and/or --max-fp-rmsd")
    if args.surrogate is not None and args.target is None:
        raise StructreconError("--surrogate needs --target")
    if args.target is not None and args.surrogate is None:
        raise StructreconError("--target needs --surrogate")
    if args.target is not None and not math.isfinite(args.target):
        raise StructreconError(f"--target must be finite, got {args.target}")
    if not args.window > 0:
        raise StructreconError(f"--window must be positive, got {args.window}")
    if args.max_fp_rmsd is not None and not args.max_fp_rmsd > 0:
        raise StructreconError(f"--max-fp-rmsd must be positive, got {args.max_fp_rmsd}")
    if args.output and Path(args.output).exists() and not args.overwrite:
        raise StructreconError(f"{args.output} exists; pass --overwrite to replace it")


def run(args) -> int:
    """Screen and report."""
    import ase.io
    import numpy as np

    from ..descriptors import check_cluster_connected
    from ..generative import load_model
    from ..io import frame_name, read_frames

    _check(args)
    frames = read_frames(args.structures, "structures")
    n = len(frames)
    keep = np.ones(n, dtype=bool)
    why = [[] for _ in range(n)]
    fp = np.array([float(a.info.get("fingerprint_rmsd", np.nan)) for a in frames])
    if args.max_fp_rmsd is not None:
        if np.isnan(fp).any():
            raise StructreconError(
                f"{args.structures}: frame {int(np.isnan(fp).argmax())} has no "
                "fingerprint_rmsd (screen the output of 'structrecon invert')"
            )
        for k in np.flatnonzero(fp > args.max_fp_rmsd):
            keep[k] = False
            why[k].append(f"fingerprint RMSD > {args.max_fp_rmsd:g}")
    pred = np.full(n, np.nan)
    key = None
    if args.surrogate is not None:
        model = load_model(args.surrogate, "surrogate")
        key = model.prop_name
        for k, atoms in enumerate(frames):
            if len(atoms) != len(model.numbers) or (atoms.numbers != model.numbers).any():
                raise StructreconError(
                    f"{args.structures}: frame {k} is not the surrogate's composition "
                    f"({len(model.numbers)} atoms, numbers {sorted(set(model.numbers.tolist()))})"
                )
        spec = model.fingerprint_spec
        whole = []  # an atom out of every other's cutoff: the fingerprint misses it
        for k, atoms in enumerate(frames):
            try:
                check_cluster_connected(atoms, spec.descriptor.cutoff)
                whole.append(k)
            except StructreconError:
                keep[k] = False
                why[k].append(f"an atom beyond the {spec.descriptor.cutoff:g} A cutoff")
        if whole:
            pred[whole] = model.predict_structures([frames[k] for k in whole])
        for k in np.flatnonzero(np.abs(pred[whole] - args.target) > args.window):
            keep[whole[k]] = False
            why[whole[k]].append(f"predicted {key} off by > {args.window:g}")
    for k, atoms in enumerate(frames):
        verdict = "kept" if keep[k] else "flagged: " + "; ".join(why[k])
        print(f"{frame_name(atoms, args.structures, k)}\t{fp[k]:.3g}\t{pred[k]:.4f}\t{verdict}")
    print(f"{n} structure(s): {int(keep.sum())} kept, {int((~keep).sum())} flagged")
    if args.output:
        kept = []
        for k in np.flatnonzero(keep):
            atoms = frames[k].copy()
            if key is not None:
                atoms.info[f"predicted_{key}"] = float(pred[k])
            kept.append(atoms)
        ase.io.write(args.output, kept, format="extxyz")
        print(f"wrote {len(kept)} structure(s) to {args.output}")
    return 0
