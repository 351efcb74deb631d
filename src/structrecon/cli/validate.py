"""Compute the formation energy per atom of structures with a real calculator.

E_form = (E_total - N E_bulk) / N (eV/atom), E_bulk the energy per atom of fcc bulk of
the same element from the same calculator (Fung 2022, sec. 2.3).  Prints each value, the
MAE to --target and the share within +-0.1 eV/atom.  Calculators: emt (ASE), gfn2
(GFN2-xTB through tblite, if installed, on --threads OpenMP threads, default 1).  tblite
evaluates periodic cells at the Gamma point only, so the gfn2 bulk reference is a 64-atom
fcc supercell with its lattice constant optimised: minutes on the first call for an
element, then read from the cache (STRUCTRECON_CACHE, default ~/.cache/structrecon).
"""

from __future__ import annotations


def add_arguments(p):
    """Arguments of ``structrecon validate``."""
    p.add_argument("structures", help="structure file (e.g. OUTPUT.extxyz of 'invert')")
    p.add_argument("--calculator", default="emt", help="emt (default) or gfn2")
    p.add_argument("--target", type=float, required=True, help="target E_form, eV/atom")
    p.add_argument("--window", type=float, default=0.1, help="half width, eV/atom (0.1)")


def run(args) -> int:
    """Evaluate and report."""
    import numpy as np

    from ..data.pt_dataset import formation_energies, get_calculator
    from ..io import frame_name, read_frames

    threads = max(1, int(getattr(args, "threads", 1)))
    get_calculator(args.calculator, threads=threads)  # unknown name / no tblite: error first
    frames = read_frames(args.structures, "structures")
    values = formation_energies(frames, args.calculator, threads=threads)
    for k, (atoms, e) in enumerate(zip(frames, values)):
        print(f"{frame_name(atoms, args.structures, k)}\t{e:.4f}")
    err = np.abs(values - args.target)
    print(
        f"{len(frames)} structure(s), calculator {args.calculator}: E_form MAE to "
        f"{args.target:g} = {err.mean():.4f} eV/atom; within +-{args.window:g}: "
        f"{100 * (err <= args.window).mean():.1f}%"
    )
    return 0
