"""Time the MILAD descriptor (117 Zernike invariants, n_max = 7, cutoff 5 A, species
weights) against the ``milad`` package's own fingerprint, side by side in one run.

Molecules: ethanol (9 atoms, ASE) and the first 20-atom molecule of QM9 (``qm9pack``
data files).  Ours: ``fn(positions [B, N, 3])`` forward, and forward + backward of the
sum (one vector-Jacobian product), batches of 1 and 100, float64.  milad: its
``MomentInvariantsDescriptor`` on one structure at a time (a batch of 100 is 100 calls),
forward, and forward with its Jacobian (what its optimisers use; there is no cheaper
gradient in milad).  Both centre the molecule first (ours inside fn, centroid; milad is
given centroid-centred positions).  One thread.

    OMP_NUM_THREADS=1 python benchmarks/descriptor_milad.py [--repeat 20]

Writes benchmarks/results/descriptor_milad.json and .md.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import ast
import csv
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import molecule

from structrecon.descriptors import MiladSpec

torch.set_num_threads(1)
HERE = Path(__file__).resolve().parent
SPECIES = (1, 6, 7, 8, 9)
WEIGHTS = (1.1, 1.3, 1.5, 1.7, 1.9)  # the milad package's mapping of H C N O F onto 1-2


def qm9_molecule(n_atoms):
    """The first QM9 molecule with n_atoms atoms, from qm9pack's CSV files."""
    spec = importlib.util.find_spec("qm9pack")  # its __init__ needs pkg_resources
    if spec is None:
        sys.exit('error: QM9 comes from the qm9pack package: pip install -e ".[bench]"')
    folder = Path(spec.submodule_search_locations[0]) / "data"
    csv.field_size_limit(sys.maxsize)
    with open(folder / "qm9_part1.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if int(row["N_atoms"]) == n_atoms:
                symbols = ast.literal_eval(row["Elements"])  # Python literals ("0." floats)
                positions = ast.literal_eval(row["XYZ_Ang"])
                return Atoms(symbols, positions=positions), row["SMILES"]
    raise RuntimeError(f"no {n_atoms}-atom molecule in qm9_part1.csv")


def best_of(fn, repeat):
    """Median seconds of ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_ours(atoms, batch, repeat, rng):
    fn = MiladSpec(cutoff=5.0, species=SPECIES, weights=WEIGHTS).build(atoms.numbers)
    pos = atoms.positions[None] + 0.05 * rng.normal(size=(batch, len(atoms), 3))
    x = torch.tensor(pos)
    xg = x.clone().requires_grad_()

    def forward():
        with torch.no_grad():
            fn(x)

    def backward():
        xg.grad = None
        fn(xg).sum().backward()

    return best_of(forward, repeat), best_of(backward, repeat)


def time_milad(atoms, batch, repeat):
    import dscribe.descriptors as dd
    from dscribe.descriptors.descriptor import Descriptor

    dd.Descriptor = Descriptor  # milad with dscribe 2.x
    import milad
    from milad.play import asetools

    desc = milad.descriptor(
        species={"map": {"numbers": list(SPECIES), "range": (1.0, 2.0)}}, cutoff=5.0
    )
    centred = atoms.copy()
    centred.positions -= centred.positions.mean(axis=0)
    coll = asetools.ase2milad(centred)
    reps = max(1, repeat // 4)

    def forward():
        for _ in range(batch):
            desc(coll)

    def jacobian():
        for _ in range(batch):
            desc.process(desc.preprocess(coll), jacobian=True)

    return best_of(forward, reps), best_of(jacobian, reps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 100])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    big, smiles = qm9_molecule(20)
    cases = [("ethanol", molecule("CH3CH2OH")), (f"QM9 {smiles}", big)]
    rows = []
    header = (
        f"{'molecule':>22} {'N':>3} {'B':>4} | {'ours fwd':>10} {'ours f+b':>10} | "
        f"{'milad fwd':>10} {'milad f+J':>10} | {'ratio fwd':>9} {'ratio f+b':>9}"
    )
    print(header)
    for name, atoms in cases:
        for batch in args.batches:
            fwd, bwd = time_ours(atoms, batch, args.repeat, rng)
            m_fwd, m_jac = time_milad(atoms, batch, args.repeat)
            row = {
                "molecule": name,
                "n_atoms": len(atoms),
                "batch": batch,
                "ours_forward_s": fwd,
                "ours_forward_backward_s": bwd,
                "milad_forward_s": m_fwd,
                "milad_forward_jacobian_s": m_jac,
                "ratio_forward": m_fwd / fwd,
                "ratio_gradient": m_jac / bwd,
            }
            rows.append(row)
            print(
                f"{name:>22} {len(atoms):>3} {batch:>4} | {fwd * 1e3:>8.2f}ms {bwd * 1e3:>8.2f}ms | "
                f"{m_fwd * 1e3:>8.1f}ms {m_jac * 1e3:>8.1f}ms | {m_fwd / fwd:>8.0f}x "
                f"{m_jac / bwd:>8.0f}x",
                flush=True,
            )
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "descriptor_milad.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "# MILAD descriptor: ours vs the milad package (one thread, float64)",
        "",
        "| molecule | N | B | ours fwd | ours fwd+bwd | milad fwd | milad fwd+Jacobian |"
        " ratio fwd | ratio grad |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['molecule']} | {r['n_atoms']} | {r['batch']} | "
            f"{r['ours_forward_s'] * 1e3:.2f} ms | {r['ours_forward_backward_s'] * 1e3:.2f} ms | "
            f"{r['milad_forward_s'] * 1e3:.1f} ms | {r['milad_forward_jacobian_s'] * 1e3:.1f} ms | "
            f"{r['ratio_forward']:.0f}x | {r['ratio_gradient']:.0f}x |"
        )
    (out / "descriptor_milad.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'descriptor_milad.md'}")


if __name__ == "__main__":
    main()
