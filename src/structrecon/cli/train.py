"""Train a conditional VAE or a surrogate property model on fingerprints (Fung 2022, sec. 2.3).

DATA is an ASE database (.db) or structure file with the property in each frame's
key-value pairs / info (fingerprints are computed with SPEC, default acsf-fung), a
structrecon fingerprint file (.npz) with a prop_KEY array, or a CSV of fingerprints with
the property values in --y-csv (read as Pt10 clusters, spec acsf-fung).  MODEL_DIR gets
model.pt (state_dict), spec.json and loss.png.  80:20 train/validation split (seeded).
"""

from __future__ import annotations

#: CLI flag -> model spec field
SPEC_OPTIONS = {
    "epochs": "epochs",
    "lr": "lr",
    "batch_size": "batch_size",
    "hidden": "hidden",
    "layers": "layers",
    "latent": "latent",
    "beta": "beta",
    "prior": "prior",
    "lr_decay": "lr_decay",
    "keep_best": "keep_best",
}

#: defaults of ``train surrogate --per-atom`` (chosen on Pt10 EMT data, see the README)
PER_ATOM_DEFAULTS = {
    "per_atom": True,
    "hidden": 64,
    "layers": 3,
    "lr": 1e-3,
    "batch_size": 64,
    "epochs": 600,
    "activation": "silu",
    "weight_decay": 1e-5,
}


def add_arguments(p):
    """Arguments of ``structrecon train``."""
    p.add_argument("kind", choices=["cvae", "surrogate"], help="model to train")
    p.add_argument("--data", required=True, help="ASE database/structure file, .npz or .csv")
    p.add_argument("--property", required=True, metavar="KEY", help="property key (e.g. e_form)")
    p.add_argument("-d", "--descriptor", metavar="SPEC", help="preset or TOML (default acsf-fung)")
    p.add_argument("--y-csv", metavar="FILE", help="property values for a CSV of fingerprints")
    p.add_argument("-o", "--output", required=True, metavar="MODEL_DIR", help="model directory")
    p.add_argument("--epochs", type=int, help="epochs (default: cvae 2000, surrogate 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of split, init and batches")
    p.add_argument("--lr", type=float, help="Adam learning rate (cvae 1e-3, surrogate 5e-4)")
    p.add_argument("--batch-size", type=int, help="batch size (cvae 64, surrogate 256)")
    p.add_argument("--hidden", type=int, help="hidden width (cvae 128, surrogate 256)")
    p.add_argument("--layers", type=int, help="layers (cvae 3 hidden, surrogate 5 in all)")
    p.add_argument(
        "--lr-decay",
        type=float,
        metavar="FACTOR",
        help="decay the learning rate exponentially to FACTOR times the first after the "
        "last epoch (default 1: constant, as the paper; the authors' code uses 0.2)",
    )
    p.add_argument(
        "--keep-best",
        action="store_true",
        default=None,
        help="keep the weights of the epoch with the lowest validation loss, not the last "
        "epoch's (as the authors' code)",
    )
    p.add_argument("--latent", type=int, help="cvae latent dimension (25)")
    p.add_argument("--beta", type=float, help="cvae weight of the KL term (0.75)")
    p.add_argument(
        "--prior",
        choices=["standard", "conditional"],
        help="cvae prior of z: standard N(0, I) as Fung 2022 (default), or conditional, "
        "a prior network p(z | property) as Sohn et al. 2015",
    )
    p.add_argument(
        "--per-atom",
        action="store_true",
        help="surrogate: one MLP per atom on the descriptor's per-atom features, averaged "
        "over the atoms (Behler-Parrinello form; scores structures with 'screen', not "
        "generated fingerprints); defaults hidden 64, 3 layers, lr 1e-3, batch 64, "
        "600 epochs, SiLU, weight decay 1e-5",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    """Train and save."""
    from pathlib import Path

    from .._errors import StructreconError
    from ..generative import CVAESpec, SurrogateSpec, load_training_data, train

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise StructreconError(f"output {out} exists and is not a directory")
    if args.per_atom and args.kind != "surrogate":
        raise StructreconError("--per-atom is for 'train surrogate'")
    for flag in ("latent", "beta", "prior"):
        if getattr(args, flag) is not None and args.kind != "cvae":
            raise StructreconError(f"--{flag} is for 'train cvae'")
    data = load_training_data(
        args.data, args.property, args.descriptor, args.y_csv, per_atom=args.per_atom
    )
    options = dict(PER_ATOM_DEFAULTS) if args.per_atom else {}
    options.update(
        {
            field: getattr(args, flag)
            for flag, field in SPEC_OPTIONS.items()
            if getattr(args, flag) is not None
        }
    )
    cls = CVAESpec if args.kind == "cvae" else SurrogateSpec
    spec = cls.from_dict({"n_features": data.fingerprints.shape[-1], **options})
    model = train(data, spec, seed=args.seed, progress=not args.no_progress)
    model.save(out)
    hist = model.history
    last = model.info.get("best_epoch", -1)  # the epoch whose weights were kept
    line = (
        f"trained {args.kind} on {model.info['n_train']} structures "
        f"({model.info['n_validation']} for validation) for {spec.epochs} epochs in "
        f"{model.info['seconds']:.1f} s; "
        + ("final" if last == -1 else f"kept epoch {last + 1} (lowest validation loss),")
        + f" loss train {hist['train'][last]:.4g}"
    )
    if hist.get("validation"):
        line += f", validation {hist['validation'][last]:.4g}"
    if hist.get("validation_mae"):
        line += f", validation MAE {hist['validation_mae'][last]:.4g} ({args.property})"
    print(line)
    print(f"wrote {out / 'model.pt'}, {out / 'spec.json'}, {out / 'loss.png'}")
    return 0
