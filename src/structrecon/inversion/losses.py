"""Fingerprint losses and the short-range repulsion term.

Every loss maps predicted and target fingerprints ``[B, F]`` to one value per
structure ``[B]``, so that trials and targets stay independent inside a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._errors import StructreconError

__all__ = ["LOSSES", "Repulsion", "fingerprint_rmsd", "get_loss"]


def mae(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over features (Fung 2022, section 2.2)."""
    return (pred - target).abs().mean(dim=-1)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over features."""
    return ((pred - target) ** 2).mean(dim=-1)


def fingerprint_rmsd(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Root-mean-square fingerprint difference over features, [B]."""
    return mse(pred, target).sqrt()


def sse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of squared differences: Cobelli 2022 eq. 2 up to its 1/N_s factor."""
    return ((pred - target) ** 2).sum(dim=-1)


#: name -> loss(pred [B, F], target [B, F]) -> [B]
LOSSES = {"mae": mae, "mse": mse, "sse": sse}


def get_loss(name: str):
    """The loss function called ``name``; unknown names list the valid ones."""
    if name not in LOSSES:
        raise StructreconError(f"unknown loss '{name}'; valid: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


@dataclass(frozen=True, kw_only=True)
class Repulsion:
    """Short-range pair repulsion, Uhrin 2021 eq. 35.

    E(r) = 4 epsilon [(sigma / r)^n + k1 r + k2] for r < r_min, else 0, with k1, k2
    chosen so that E and dE/dr vanish at r_min.  The paper's values are
    epsilon = 0.1, sigma = 1, n = 2, r_min = 0.55 A.
    """

    r_min: float = 0.55
    epsilon: float = 0.1
    sigma: float = 1.0
    n: int = 2

    def __post_init__(self):
        if self.r_min <= 0 or self.epsilon < 0 or self.sigma <= 0 or self.n < 1:
            raise StructreconError(f"invalid repulsion parameters {self}")

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        """Sum over ordered pairs i != j (as eq. 36), positions [B, N, 3] -> [B]."""
        n, s, rm = self.n, self.sigma, self.r_min
        k1 = n * s**n / rm ** (n + 1)
        k2 = -((s / rm) ** n) - k1 * rm
        diff = positions[:, :, None, :] - positions[:, None, :, :]
        n_atoms = positions.shape[1]
        eye = torch.eye(n_atoms, dtype=torch.bool, device=positions.device)
        diff = torch.where(eye[None, :, :, None], torch.full_like(diff, 2 * rm), diff)
        r = torch.linalg.norm(diff, dim=-1)
        inside = r < rm
        r_safe = torch.where(inside, r, torch.full_like(r, rm))
        e = 4 * self.epsilon * ((s / r_safe) ** n + k1 * r_safe + k2)
        return torch.where(inside, e, torch.zeros_like(e)).sum(dim=(1, 2))
