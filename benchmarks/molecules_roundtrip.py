"""Small-molecule round trip with the ``acsf`` preset (ACSF summed per species).

Molecules: every entry of ASE's G2 collection made of H, C, N, O with 3-9 atoms
(up to ``--max`` of them, in name order).  Each is described, inverted with the
default ``adam-hops`` (10 trials x 5 hops) and compared with the original (RMSD
allowing a mirror image).

Run: ``OMP_NUM_THREADS=1 python benchmarks/molecules_roundtrip.py`` (a few minutes).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch
from ase.build import molecule
from ase.collections import g2


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--max", type=int, default=20, help="molecules at most (default 20)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from structrecon.descriptors import describe
    from structrecon.evaluate import structure_rmsd
    from structrecon.inversion import AdamHops, Target, invert

    names = [
        n
        for n in sorted(g2.names)
        if set(molecule(n).get_chemical_symbols()) <= {"H", "C", "N", "O"}
        and 3 <= len(molecule(n)) <= 9
    ][: args.max]
    mols = [molecule(n) for n in names]
    fps = describe("acsf", mols)
    rows = []
    for k, (name, mol) in enumerate(zip(names, mols)):
        t0 = time.perf_counter()
        target = Target(name=name, numbers=mol.numbers, fingerprint=fps[k])
        res = invert([target], "acsf", AdamHops(), seed=args.seed)[0]
        sec = time.perf_counter() - t0
        rmsd = structure_rmsd(mol, res.atoms)
        rows.append((name, len(mol), rmsd, res.fingerprint_rmsd, sec))
        print(
            f"{name:10s} {len(mol):2d} atoms  RMSD {rmsd:.4f} A  fp {res.fingerprint_rmsd:.1e}  {sec:.1f} s",
            flush=True,
        )
    rmsd = np.array([r[2] for r in rows])
    secs = np.array([r[4] for r in rows])
    print(
        f"recovered (RMSD < 0.05 A, mirror allowed): {(rmsd < 0.05).sum()}/{len(rows)}; "
        f"median {np.median(secs):.1f} s per molecule, max {secs.max():.1f} s"
    )


if __name__ == "__main__":
    main()
