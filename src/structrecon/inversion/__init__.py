"""Inversion: losses, strategies and the batched engine."""

from .engine import Result, Target, invert, invert_iter, targets_from_fingerprints
from .losses import LOSSES, Repulsion, fingerprint_rmsd, get_loss
from .milad import MiladModel, MiladReconstruction
from .strategies import (
    LBFGS,
    STRATEGIES,
    AdamHops,
    LocalLM,
    NoisyGD,
    Outcome,
    Problem,
    get_strategy,
    lbfgs_polish,
    lm_polish,
    random_positions,
)

__all__ = [
    "AdamHops",
    "LBFGS",
    "LOSSES",
    "LocalLM",
    "MiladModel",
    "MiladReconstruction",
    "NoisyGD",
    "Outcome",
    "Problem",
    "Repulsion",
    "Result",
    "STRATEGIES",
    "Target",
    "fingerprint_rmsd",
    "get_loss",
    "get_strategy",
    "invert",
    "invert_iter",
    "lbfgs_polish",
    "lm_polish",
    "random_positions",
    "targets_from_fingerprints",
]
