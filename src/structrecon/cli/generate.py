"""Generate fingerprints for a target property with a trained cVAE (Fung 2022, sec. 3.2).

Samples z from the cVAE's prior at temperature T (default 1): z ~ N(0, T^2 I), or for
a cVAE trained with '--prior conditional' z = mu(Y) + T sigma(Y) eps; or, with
'--latent posterior', from the encoder's posterior over the training structures whose
property lies within about a bandwidth of Y (z = mu_i + T sigma_i eps); decodes them
conditioned on the target and writes a fingerprint file that 'structrecon invert' reads, with the
composition and cell of the training data, names gen_Y_k and the property prop_target.
With --surrogate, the generated fingerprints are scored by a trained surrogate: MAE to
the target and the share within +-0.1 (property units, e.g. eV/atom).

With --calibrate SURROGATE [SURROGATE ...], the samples are decoded not at Y but at the
condition c at which that surrogate (several: the mean of their predictions) puts the
mean property of --calibration-samples other samples (seed S + 1) at Y: a cVAE's samples
miss their condition on average, and this takes the offset out.  The file then holds the
property 'condition' (c) beside 'target' (Y).  Score with another surrogate than the one
that calibrated for an independent check.  --min-share F also calibrates the spread:
while that surrogate (any one of several) puts fewer than the fraction F of those samples
within +-WINDOW of Y, the temperature is multiplied by 0.8 and c found again (down to
T = 0.1); the file then holds the temperature used as the property 'temperature'.
"""

from __future__ import annotations


def add_arguments(p):
    """Arguments of ``structrecon generate``."""
    p.add_argument("model", metavar="MODEL_DIR", help="directory of a trained cVAE")
    p.add_argument("--target", type=float, required=True, metavar="Y", help="target property")
    p.add_argument("-n", type=int, required=True, metavar="K", help="number of samples")
    p.add_argument("-o", "--output", required=True, help="fingerprint file to write (.npz)")
    p.add_argument("--seed", type=int, default=0, help="seed of z")
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        metavar="T",
        help="z ~ N(0, T^2 I) (conditional prior: mu + T sigma eps); T < 1 follows the "
        "target more closely, less diverse (1)",
    )
    p.add_argument(
        "--latent",
        choices=["prior", "posterior"],
        default="prior",
        help="where z comes from: the prior (the paper), or the posterior of training "
        "structures near the target, drawn with weight exp(-(y_i - Y)^2 / 2 H^2) (prior)",
    )
    p.add_argument(
        "--bandwidth",
        type=float,
        metavar="H",
        help="--latent posterior: kernel width in property units (0.2 standard deviations "
        "of the training property)",
    )
    p.add_argument("--surrogate", metavar="MODEL_DIR", help="score samples with this surrogate")
    p.add_argument(
        "--calibrate",
        metavar="MODEL_DIR",
        nargs="+",
        help="decode at the condition where this surrogate's mean over other samples is the "
        "target; several: a committee, calibrated on the mean of their predictions",
    )
    p.add_argument(
        "--calibration-samples",
        type=int,
        default=2000,
        metavar="M",
        help="samples per calibration step (2000)",
    )
    p.add_argument(
        "--min-share",
        type=float,
        metavar="F",
        help="with --calibrate: lower the temperature until the calibrating surrogate puts "
        "this fraction of the samples within +-WINDOW of the target (e.g. 0.95)",
    )
    p.add_argument(
        "--window",
        type=float,
        default=0.1,
        help="half width of the 'within' window, property units (0.1)",
    )


def run(args) -> int:
    """Sample, write, optionally score."""
    import numpy as np

    from .._errors import StructreconError
    from ..fingerprints import FingerprintSet, write_fingerprints
    from ..generative import load_model

    if args.n < 1:
        raise StructreconError(f"-n must be >= 1, got {args.n}")
    cvae = load_model(args.model, "cvae")
    surrogate = load_model(args.surrogate, "surrogate") if args.surrogate else None
    calibrators = [load_model(d, "surrogate") for d in args.calibrate or []]
    for path, model in [(args.surrogate, surrogate), *zip(args.calibrate or [], calibrators)]:
        if model is not None and model.per_atom:
            raise StructreconError(
                f"{path} is a per-atom surrogate: it scores structures "
                "('structrecon screen'), not generated fingerprints"
            )
        if model is not None and (
            model.fingerprint_spec.to_dict() != cvae.fingerprint_spec.to_dict()
        ):
            raise StructreconError(f"{path} was trained on another fingerprint spec")
    condition, temperature = args.target, args.temperature
    if args.min_share is not None and not calibrators:
        raise StructreconError("--min-share needs --calibrate SURROGATE_DIR")
    if calibrators:
        if args.calibration_samples < 1:
            raise StructreconError(
                f"--calibration-samples must be >= 1, got {args.calibration_samples}"
            )
        condition, info = cvae.calibrate(
            args.target,
            calibrators,
            n=args.calibration_samples,
            seed=args.seed + 1,
            temperature=args.temperature,
            latent=args.latent,
            bandwidth=args.bandwidth,
            min_share=args.min_share,
            window=args.window,
            min_temperature=min(0.1, args.temperature),
        )
        temperature = info["temperature"]
        who = args.calibrate[0] if len(args.calibrate) == 1 else f"{len(args.calibrate)} surrogates"
        print(
            f"calibrated: condition {condition:.4g} (offset {info['offset']:+.4g}); "
            f"{who} put(s) {args.calibration_samples} samples there at mean "
            f"{info['mean']:.4g} after {len(info['steps'])} step(s)"
            + ("" if info["converged"] else " (not converged: the closest step is kept)")
        )
        if args.min_share is not None:
            print(
                f"temperature {temperature:.3g}: {100 * info['share']:.1f}% of them within "
                f"+-{args.window:g} (asked {100 * args.min_share:g}%"
                + (")" if info["share"] >= args.min_share else "; not reached, the best kept)")
            )
    X = cvae.generate(
        condition,
        args.n,
        seed=args.seed,
        temperature=temperature,
        latent=args.latent,
        bandwidth=args.bandwidth,
    )
    label = f"{args.target:g}"
    fset = FingerprintSet(
        spec=cvae.fingerprint_spec,
        names=[f"gen_{label}_{k}" for k in range(args.n)],
        numbers=[cvae.numbers.copy() for _ in range(args.n)],
        cells=np.repeat(cvae.cell[None], args.n, axis=0),
        pbc=np.repeat(cvae.pbc[None], args.n, axis=0),
        fingerprints=X,
        properties={"target": np.full(args.n, args.target)}
        | ({"condition": np.full(args.n, condition)} if calibrators else {})
        | ({"temperature": np.full(args.n, temperature)} if args.min_share is not None else {}),
    )
    fset.validate()
    output = args.output if args.output.endswith(".npz") else args.output + ".npz"
    write_fingerprints(output, fset)
    print(f"wrote {args.n} generated fingerprint(s) for {cvae.prop_name} = {label} to {output}")
    if surrogate is not None:
        pred = surrogate.predict(X)
        err = np.abs(pred - args.target)
        print(
            f"surrogate: MAE {err.mean():.4f}, within +-{args.window:g}: "
            f"{100 * (err <= args.window).mean():.1f}% of {args.n}"
        )
    return 0
