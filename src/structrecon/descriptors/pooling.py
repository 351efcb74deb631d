"""Pooling of per-atom features into one fingerprint per structure."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["pool"]


def pool(features: torch.Tensor, kind: str, numbers=None, species=()) -> torch.Tensor:
    """Pool per-atom features over the atoms of each structure.

    Parameters
    ----------
    features : [B, N, F] per-atom features.
    kind : ``maxmin`` - [max over atoms, min over atoms] (Fung 2022 eq. 3), [B, 2F];
        ``sum-species`` - sum over the atoms of each centre species, species in
        increasing atomic number (Cobelli 2022 eq. 2), [B, S * F];
        ``mean`` - mean over atoms, [B, F]; ``sum`` - sum over atoms, [B, F];
        ``none`` - a global descriptor's single row, features [B, 1, F] -> [B, F].
    numbers : [N] atomic numbers (for ``sum-species``).
    species : the spec's species, sorted (for ``sum-species``).
    """
    if kind == "maxmin":
        # max/min send each feature's gradient to one atom (ANCHORS: Fung)
        return torch.cat([features.amax(dim=1), features.amin(dim=1)], dim=-1)
    if kind == "none":
        if features.shape[1] != 1:
            raise ValueError(
                f"pooling 'none' needs [B, 1, F] features, got {tuple(features.shape)}"
            )
        return features[:, 0]
    if kind == "mean":
        return features.mean(dim=1)
    if kind == "sum":
        return features.sum(dim=1)
    if kind == "sum-species":
        numbers = np.asarray(numbers)
        onehot = np.stack([numbers == z for z in species], axis=0).astype(float)  # [S, N]
        weights = torch.as_tensor(onehot, dtype=features.dtype, device=features.device)
        return torch.einsum("sn,bnf->bsf", weights, features).flatten(1)
    raise ValueError(f"unknown pooling {kind!r}")
