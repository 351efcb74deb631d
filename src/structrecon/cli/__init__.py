"""The ``structrecon`` command: thin wrappers around the library.

Each subcommand lives in its own module with ``add_arguments(parser)`` and
``run(args)``; heavy imports happen inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .._errors import StructreconError

COMMANDS = {
    "describe": "compute fingerprints of the structures in a file",
    "invert": "recover structures from a fingerprint file",
    "compare": "compare recovered structures with references",
    "demo": "describe, invert and compare a small built-in example",
    "train": "train a conditional VAE or a surrogate model on fingerprints",
    "generate": "generate fingerprints for a target property with a trained cVAE",
    "screen": "flag reconstructed structures by fingerprint RMSD or a surrogate's prediction",
    "validate": "formation energy per atom of structures with a real calculator",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="structrecon",
        description="Invert invariant fingerprints of atomic structures back to 3D structures.",
    )
    parser.add_argument("--version", action="version", version=f"structrecon {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for PyTorch (default 1: fastest for these small batches)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f".{name}", __name__)
        p = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(p)
    return parser


def main(argv=None) -> int:
    """Entry point; returns the exit code.

    0 ok, 1 error, 2 usage, 130 interrupted, 141 the reader of the output went away.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    try:
        import torch

        torch.set_num_threads(max(1, args.threads))
        module = importlib.import_module(f".{args.command}", __name__)
        return int(module.run(args) or 0)
    except StructreconError as err:
        if args.debug:
            raise
        print(f"structrecon {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"structrecon {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (e.g. '| head'): stop without a word
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit must not fail
        return 141  # 128 + SIGPIPE, as a shell reports it
    except Exception as err:  # noqa: BLE001 - last resort: one line, unless --debug
        if args.debug:
            raise
        print(
            f"structrecon {args.command}: unexpected error: {type(err).__name__}: {err} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
