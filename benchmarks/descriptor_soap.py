"""Time the SOAP power spectrum (the ``soap`` preset's settings) against featomic and
featomic-torch, side by side in one run, one thread.

Molecule: the first 22-atom molecule of QM9 (``qm9pack`` data files), or any ASE
``molecule``/s22 name with ``--molecule``.  Batches of 1 and 100 structures (rattled
copies, 0.05 A).  Timed, per structure:

- featomic (Rust, numpy output): values, and values + "positions" gradients, one
  ``compute`` call on the whole list of structures;
- featomic-torch: forward, and forward + backward of the sum of all values (autograd
  through its stored position gradients), one call on the list of systems;
- ours (``SoapSpec.build`` -> ``fn(positions [B, N, 3])``): forward under no_grad, and
  forward + backward of the sum of all values, float64 (and float32 for reference).

featomic computes only the species pairs present; ours also returns the zero blocks of
the absent preset species (H, C, N, O, F layout).  featomic uses its default splined
radial integral here (spline_accuracy 1e-8); ours is the exact-to-1e-12 spline.  The
methods alternate within each repetition, so machine load hits all of them alike;
medians are reported.

    OMP_NUM_THREADS=1 RAYON_NUM_THREADS=1 python benchmarks/descriptor_soap.py [--repeat 7]

Writes benchmarks/results/descriptor_soap.json and .md.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

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

from structrecon.descriptors import preset

torch.set_num_threads(1)
HERE = Path(__file__).resolve().parent


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
                symbols = ast.literal_eval(row["Elements"])
                positions = ast.literal_eval(row["XYZ_Ang"])
                return Atoms(symbols, positions=positions), row["SMILES"]
    raise RuntimeError(f"no {n_atoms}-atom molecule in qm9_part1.csv")


def get_molecule(name):
    if name == "qm9-22":
        return qm9_molecule(22)
    from ase.build import molecule
    from ase.collections import s22

    if name in s22.names:
        return s22[name], name
    return molecule(name), name


def featomic_calculators(spec):
    import featomic
    import featomic.torch
    from featomic.basis import Gto, TensorProduct
    from featomic.cutoff import Cutoff, ShiftedCosine
    from featomic.density import Gaussian

    hypers = dict(
        cutoff=Cutoff(spec.cutoff, ShiftedCosine(width=spec.cutoff_width)),
        density=Gaussian(width=spec.density_width, center_atom_weight=spec.center_weight),
        basis=TensorProduct(max_angular=spec.max_angular, radial=Gto(max_radial=spec.max_radial)),
    )
    return featomic.SoapPowerSpectrum(**hypers), featomic.torch.SoapPowerSpectrum(**hypers)


def make_cases(atoms, spec, batch, rng):
    from featomic.torch import systems_to_torch

    calc_np, calc_torch = featomic_calculators(spec)
    frames = []
    for _ in range(batch):
        a = atoms.copy()
        a.positions += 0.05 * rng.normal(size=a.positions.shape)
        frames.append(a)
    fn = spec.build(atoms.numbers)
    x = torch.tensor(np.stack([a.positions for a in frames]))

    def featomic_values():
        calc_np.compute(frames)

    def featomic_gradients():
        calc_np.compute(frames, gradients=["positions"])

    def featomic_torch_forward():
        calc_torch(systems_to_torch(frames))

    def featomic_torch_backward():
        systems = systems_to_torch(frames, positions_requires_grad=True)
        out = calc_torch(systems)
        sum(block.values.sum() for block in out.blocks()).backward()

    def ours_forward():
        with torch.no_grad():
            fn(x)

    def ours_backward():
        xg = x.clone().requires_grad_()
        fn(xg).sum().backward()

    x32 = x.float()

    def ours_backward_float32():
        xg = x32.clone().requires_grad_()
        fn(xg).sum().backward()

    return {
        "featomic values": featomic_values,
        "featomic values+gradients": featomic_gradients,
        "featomic-torch forward": featomic_torch_forward,
        "featomic-torch forward+backward": featomic_torch_backward,
        "ours forward": ours_forward,
        "ours forward+backward": ours_backward,
        "ours forward+backward float32": ours_backward_float32,
    }


def run(atoms, spec, batch, repeat, rng):
    cases = make_cases(atoms, spec, batch, rng)
    times = {name: [] for name in cases}
    for f in cases.values():
        f()  # warm-up (tables, allocations)
    for _ in range(repeat):
        for name, f in cases.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) / batch * 1e3 for name, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--molecule", default="qm9-22", help="qm9-22, an s22 or ASE molecule name")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 100])
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    import featomic
    import featomic.torch

    atoms, label = get_molecule(args.molecule)
    spec = preset("soap").descriptor
    print(
        f"{label}: {len(atoms)} atoms {atoms.get_chemical_formula()}; soap preset "
        f"(r_c {spec.cutoff} A, sigma {spec.density_width} A, max_radial {spec.max_radial}, "
        f"max_angular {spec.max_angular}, {spec.n_features} values per atom); "
        f"featomic {featomic.__version__}, featomic-torch {featomic.torch.__version__}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    rng = np.random.default_rng(0)
    results = {}
    for batch in args.batches:
        res = run(atoms, spec, batch, args.repeat, rng)
        results[batch] = res
        print(f"batch {batch}: ms per structure (median of {args.repeat})")
        for name, ms in res.items():
            print(f"  {name:34s} {ms:9.3f}")
        print(
            "  ratios: featomic-torch/ours forward+backward "
            f"{res['featomic-torch forward+backward'] / res['ours forward+backward']:.1f}x, "
            f"forward {res['featomic-torch forward'] / res['ours forward']:.1f}x; "
            "featomic values+gradients/ours forward+backward "
            f"{res['featomic values+gradients'] / res['ours forward+backward']:.1f}x",
            flush=True,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "molecule": label,
        "n_atoms": len(atoms),
        "spec": spec.to_dict(),
        "repeat": args.repeat,
        "featomic": featomic.__version__,
        "featomic_torch": featomic.torch.__version__,
        "torch": torch.__version__,
    }
    (out / "descriptor_soap.json").write_text(
        json.dumps({"meta": meta, "ms_per_structure": results}, indent=2)
    )
    names = list(next(iter(results.values())))
    lines = [
        f"SOAP power spectrum, {label} ({len(atoms)} atoms), soap preset, one thread; "
        "ms per structure (median)",
        "",
        "| method | " + " | ".join(f"batch {b}" for b in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{r[name]:.3f}" for r in results.values()) + " |")
    (out / "descriptor_soap.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'descriptor_soap.md'}")


if __name__ == "__main__":
    main()
