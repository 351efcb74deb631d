"""Compare recovered structures (OUTPUT) with references (REFERENCE).

Frames are matched by their ``name`` info key when both files carry names, else by
order.  Prints one row per structure (RMSD after the best rotation, reflection,
translation and permutation of like atoms) and a summary with the pair-distance and
angle distribution distances; ``--plot DIR`` draws the distributions.
"""

from __future__ import annotations

from .._errors import StructreconError


def add_arguments(p):
    """Arguments of ``structrecon compare``."""
    p.add_argument("reference", help="reference structures (any file ASE reads)")
    p.add_argument("output", help="recovered structures (from 'structrecon invert')")
    p.add_argument("--plot", metavar="DIR", help="write distribution plots into DIR")
    p.add_argument(
        "--no-reflection",
        action="store_true",
        help="do not allow mirror images when aligning (default: allowed)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.05,
        help="RMSD (Angstrom) counted as recovered in the summary (default 0.05)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")


def match_frames(references, outputs, ref_names, out_names):
    """Pairs (reference, output) by name where possible, else by order."""
    if (
        all(out_names)
        and set(out_names) <= set(ref_names)
        and len(set(ref_names)) == len(ref_names)
    ):
        index = {n: k for k, n in enumerate(ref_names)}
        return [(references[index[n]], o, n) for o, n in zip(outputs, out_names)]
    if len(references) != len(outputs):
        raise StructreconError(
            f"{len(outputs)} output frame(s) but {len(references)} reference(s), and the "
            "names do not match them up"
        )
    return [
        (r, o, n or f"frame_{k}") for k, (r, o, n) in enumerate(zip(references, outputs, out_names))
    ]


def run(args) -> int:
    """Compare and print."""
    import json

    import numpy as np

    from ..evaluate import compare_sets, plot_distributions
    from ..io import frame_name, read_frames

    refs = read_frames(args.reference, "reference")
    outs = read_frames(args.output, "output")
    ref_names = [frame_name(a, args.reference, k) for k, a in enumerate(refs)]
    out_names = [str(a.info.get("name", "")) for a in outs]
    pairs = match_frames(refs, outs, ref_names, out_names)
    references = [p[0] for p in pairs]
    candidates = [p[1] for p in pairs]
    stats = compare_sets(references, candidates, allow_reflection=not args.no_reflection)
    rmsd = np.asarray(stats["rmsd"])
    width = max(8, *(len(p[2]) for p in pairs))
    print(f"{'name':<{width}}  {'rmsd/A':>8}  {'fp_rmsd':>9}  {'conv':>5}  {'seconds':>8}")
    for (_, out, name), r in zip(pairs, rmsd):
        fp = out.info.get("fingerprint_rmsd", float("nan"))
        conv = out.info.get("converged", "")
        sec = out.info.get("seconds", float("nan"))
        print(f"{name:<{width}}  {r:8.4f}  {fp:9.2e}  {str(conv):>5}  {sec:8.2f}")
    n_ok = int((rmsd < args.threshold).sum())
    mirror = "" if args.no_reflection else ", mirror allowed"
    print(
        f"recovered (RMSD < {args.threshold} A{mirror}): "
        f"{n_ok}/{len(rmsd)} ({100.0 * n_ok / len(rmsd):.0f}%); median RMSD {np.median(rmsd):.4f} A"
    )
    print(
        f"distribution distance (0 same, 1 disjoint): pair distances "
        f"{stats['pair_distance_distance']:.3f}, angles {stats['angle_distance']:.3f}"
    )
    if args.plot:
        paths = plot_distributions(references, candidates, args.plot)
        print("plots: " + ", ".join(str(p) for p in paths))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"names": [p[2] for p in pairs], **{k: _plain(v) for k, v in stats.items()}},
                fh,
                indent=2,
            )
    return 0


def _plain(value):
    import numpy as np

    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [float(v) for v in value]
    return float(value)
