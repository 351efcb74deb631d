"""Conditional VAE and surrogate property model over global fingerprints (Fung 2022, sec. 2.3).

Both models work on *normalised* fingerprints ``x = (R - mean) / std`` (shape [B, F]) and
a normalised scalar property ``y = (p - mean_p) / std_p`` (shape [B, 1]); see
:class:`Normaliser`.  Specs are frozen, validated dataclasses with plain dict/JSON forms so
that a saved model is a ``state_dict`` plus JSON, never a pickled object.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .._errors import StructreconError
from ..descriptors._spec import check_keys

__all__ = ["CVAE", "CVAESpec", "Normaliser", "Surrogate", "SurrogateSpec", "model_from_spec"]

PRIORS = ("standard", "conditional")
ACTIVATIONS = {"relu": nn.ReLU, "leaky-relu": nn.LeakyReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class _SpecBase:
    """Shared dict/validation behaviour of the model specs."""

    kind: ClassVar[str] = ""

    def _check(self):
        for name in ("n_features", "hidden", "layers", "epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise StructreconError(f"{self.kind} spec: {name} must be a positive integer")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise StructreconError(f"{self.kind} spec: lr must be positive")
        if not 0.0 < self.train_fraction <= 1.0:
            raise StructreconError(f"{self.kind} spec: train_fraction must be in (0, 1]")
        if self.activation not in ACTIVATIONS:
            raise StructreconError(
                f"{self.kind} spec: unknown activation '{self.activation}'; "
                f"valid: {', '.join(ACTIVATIONS)}"
            )
        if not (isinstance(self.lr_decay, (int, float)) and 0.0 < self.lr_decay <= 1.0):
            raise StructreconError(f"{self.kind} spec: lr_decay must be in (0, 1]")
        if not isinstance(self.keep_best, bool):
            raise StructreconError(f"{self.kind} spec: keep_best must be true or false")
        if self.keep_best and self.train_fraction >= 1.0:
            raise StructreconError(
                f"{self.kind} spec: keep_best needs validation data (train_fraction < 1)"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-able) that :meth:`from_dict` reads back."""
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build from a dict; unknown keys are errors naming the valid ones."""
        data = dict(data)
        kind = data.pop("kind", cls.kind)
        if kind != cls.kind:
            raise StructreconError(f"expected a '{cls.kind}' model spec, got '{kind}'")
        fields = {f.name for f in dataclasses.fields(cls)}
        check_keys(f"{cls.kind} model", data, fields)
        try:
            return cls(**data)
        except TypeError as err:
            raise StructreconError(f"{cls.kind} model spec: {err}") from None

    def replace(self, **changes):
        """A copy with some fields changed (validated; unknown names are errors)."""
        return self.from_dict({**dataclasses.asdict(self), **changes})


@dataclasses.dataclass(frozen=True, kw_only=True)
class CVAESpec(_SpecBase):
    """Conditional VAE (Sohn et al. 2015) as set up in Fung 2022, sec. 2.3.

    Parameters
    ----------
    n_features : F, length of the global fingerprint (380 for ``acsf-fung``).
    hidden : width of each hidden layer (paper: 128).
    layers : hidden layers of the encoder and of the decoder (paper: 3).
    latent : dimension of z (paper: 25).
    beta : weight of the Kullback-Leibler term, loss = recon + beta * KL (paper: 0.75).
    lr : Adam learning rate (paper: 1e-3).  batch_size : paper 64.  epochs : paper 2000.
    train_fraction : share of the data used for training (rest: validation; 0.8).
    lr_decay, keep_best : see :class:`SurrogateSpec`.
    activation : hidden nonlinearity, one of ``relu``, ``leaky-relu``, ``silu``, ``tanh``.
    reconstruction : ``sum`` or ``mean`` of the squared error over the F features in the
        reconstruction term (``mean`` weighs the KL term F times more).
    prior : ``standard`` - z ~ N(0, I) whatever the condition (Fung 2022); ``conditional``
        - a prior network p(z | y) = N(mu(y), diag sigma^2(y)) (Sohn et al. 2015, eq. 4;
        ``layers`` x ``hidden``), trained through the KL term and sampled from at
        generation.  With the standard prior the latent code must carry the same
        distribution of structure types at every condition; where the data's types
        change with the property (near the edges of its range), the conditional prior
        lets them.
    """

    n_features: int
    hidden: int = 128
    layers: int = 3
    latent: int = 25
    beta: float = 0.75
    lr: float = 1e-3
    batch_size: int = 64
    epochs: int = 2000
    train_fraction: float = 0.8
    activation: str = "relu"
    reconstruction: str = "sum"
    prior: str = "standard"
    lr_decay: float = 1.0
    keep_best: bool = False

    kind: ClassVar[str] = "cvae"

    def __post_init__(self):
        self._check()
        if self.reconstruction not in ("sum", "mean"):
            raise StructreconError(
                f"cvae spec: unknown reconstruction '{self.reconstruction}'; valid: sum, mean"
            )
        if self.prior not in PRIORS:
            raise StructreconError(
                f"cvae spec: unknown prior '{self.prior}'; valid: {', '.join(PRIORS)}"
            )
        if not isinstance(self.latent, int) or self.latent < 1:
            raise StructreconError("cvae spec: latent must be a positive integer")
        if not (isinstance(self.beta, (int, float)) and self.beta >= 0):
            raise StructreconError("cvae spec: beta must be >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SurrogateSpec(_SpecBase):
    """Feed-forward property model R -> y (Fung 2022, sec. 2.3).

    Parameters
    ----------
    n_features : F, input length.
    hidden : width (paper: 256).  layers : linear layers in all, output included (paper: 5).
    lr : Adam learning rate (paper: 5e-4).  batch_size : paper 256.  epochs : paper 2000.
    weight_decay : Adam L2 weight decay (0 = none).
    train_fraction : share of the data used for training (0.8).
    activation : hidden nonlinearity.
    lr_decay : the learning rate decays exponentially, by ``lr_decay ** (1 / epochs)``
        after each epoch, to ``lr * lr_decay`` after the last (1 = constant, as the
        paper's text; the authors' StructRepGen code uses 0.2).
    keep_best : end with the weights of the epoch of lowest validation loss, not the
        last epoch's (as the authors' code does); needs ``train_fraction`` < 1.
    per_atom : the model is one MLP applied to every atom's features [B, N, F] (``n_features``
        is then the per-atom F), whose outputs are averaged over the atoms: the additive form
        of Behler-Parrinello potentials, y = mean_i phi(G_i), for a per-atom property such
        as a formation energy per atom.  It is invariant to the order of the atoms, and it
        scores structures, not generated (pooled) fingerprints.  Default False: one MLP on
        the pooled fingerprint [B, F], as the paper.
    """

    n_features: int
    hidden: int = 256
    layers: int = 5
    lr: float = 5e-4
    batch_size: int = 256
    epochs: int = 2000
    weight_decay: float = 0.0
    train_fraction: float = 0.8
    activation: str = "relu"
    per_atom: bool = False
    lr_decay: float = 1.0
    keep_best: bool = False

    kind: ClassVar[str] = "surrogate"

    def __post_init__(self):
        self._check()
        if self.layers < 2:
            raise StructreconError("surrogate spec: layers must be >= 2")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise StructreconError("surrogate spec: weight_decay must be >= 0")
        if not isinstance(self.per_atom, bool):
            raise StructreconError("surrogate spec: per_atom must be true or false")


def _mlp(n_in: int, hidden: int, n_hidden: int, n_out: int, activation: str) -> nn.Sequential:
    """``n_hidden`` hidden layers of width ``hidden`` then a linear output layer."""
    act = ACTIVATIONS[activation]
    mods: list[nn.Module] = []
    width = n_in
    for _ in range(n_hidden):
        mods += [nn.Linear(width, hidden), act()]
        width = hidden
    mods.append(nn.Linear(width, n_out))
    return nn.Sequential(*mods)


class CVAE(nn.Module):
    """Conditional VAE: q(z | x, y) and p(x | z, y), Gaussian (Sohn et al. 2015).

    Encoder ``[x, y] (F + 1) -> layers x hidden -> (mu, log sigma^2) (2 x latent)``;
    decoder ``[z, y] (latent + 1) -> layers x hidden -> x_hat (F)``; with
    ``spec.prior == "conditional"`` a prior network ``y (1) -> layers x hidden ->
    (mu, log sigma^2)``.  All tensors are normalised (dimensionless).
    """

    def __init__(self, spec: CVAESpec):
        super().__init__()
        self.spec = spec
        f, h, n, d = spec.n_features, spec.hidden, spec.layers, spec.latent
        self.encoder = _mlp(f + 1, h, n, 2 * d, spec.activation)
        self.decoder = _mlp(d + 1, h, n, f, spec.activation)
        if spec.prior == "conditional":
            self.prior_net = _mlp(1, h, n, 2 * d, spec.activation)

    def prior(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Y [B, 1] -> prior mu [B, latent], logvar [B, latent] (zeros: N(0, I))."""
        if self.spec.prior == "standard":
            zero = y.new_zeros((y.shape[0], self.spec.latent))
            return zero, zero
        mu, logvar = self.prior_net(y).chunk(2, dim=1)
        return mu, logvar.clamp(-20.0, 10.0)

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """X [B, F], y [B, 1] -> mu [B, latent], logvar [B, latent]."""
        out = self.encoder(torch.cat([x, y], dim=1))
        mu, logvar = out.chunk(2, dim=1)
        return mu, logvar.clamp(-20.0, 10.0)

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Z [B, latent], y [B, 1] -> x_hat [B, F]."""
        return self.decoder(torch.cat([z, y], dim=1))

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        """Reparameterised pass: returns (x_hat [B, F], mu, logvar [B, latent])."""
        mu, logvar = self.encode(x, y)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z, y), mu, logvar

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Negative beta-ELBO per sample, averaged over the batch (Higgins et al. 2016).

        recon = sum_f (x_hat - x)^2 (Gaussian decoder, up to constants; or the mean over f);
        KL(q(z | x, y) || p(z | y)) = 1/2 sum_d (log s_d^2 - log sigma_d^2
        + (sigma_d^2 + (mu_d - m_d)^2) / s_d^2 - 1), with the prior N(m, diag s^2)
        (m = 0, s = 1 for the standard prior).  Returns (recon + beta * KL, KL), both scalars.
        """
        x_hat, mu, logvar = self(x, y)
        sq = (x_hat - x) ** 2
        recon = (sq.sum(dim=1) if self.spec.reconstruction == "sum" else sq.mean(dim=1)).mean()
        mu_p, logvar_p = self.prior(y)
        kl_d = logvar_p - logvar + (logvar.exp() + (mu - mu_p) ** 2) / logvar_p.exp() - 1.0
        kl = (0.5 * kl_d.sum(dim=1)).mean()
        return recon + self.spec.beta * kl, kl

    @torch.no_grad()
    def sample(
        self,
        y: torch.Tensor,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Decode z from the prior conditioned on normalised targets y [B, 1] -> x [B, F].

        z = mu(y) + T sigma(y) eps with eps ~ N(0, I); for the standard prior z ~ N(0, T^2 I).
        A temperature T < 1 keeps z nearer the prior's centre: samples follow the
        condition more closely and are less diverse.
        """
        eps = torch.randn(
            (y.shape[0], self.spec.latent), generator=generator, dtype=y.dtype, device=y.device
        )
        mu_p, logvar_p = self.prior(y)
        return self.decode(mu_p + temperature * torch.exp(0.5 * logvar_p) * eps, y)


class Surrogate(nn.Module):
    """MLP ``x [B, F] -> y [B]`` (normalised), ``layers`` linear layers of width ``hidden``.

    With ``spec.per_atom``: ``x [B, N, F] -> y [B]``, the MLP applied to each atom and its
    outputs averaged over the atoms.
    """

    def __init__(self, spec: SurrogateSpec):
        super().__init__()
        self.spec = spec
        self.net = _mlp(spec.n_features, spec.hidden, spec.layers - 1, 1, spec.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """X [B, F] (per atom: [B, N, F]) -> y [B]."""
        out = self.net(x).squeeze(-1)
        return out.mean(dim=1) if self.spec.per_atom else out

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean squared error on normalised y [B, 1]; returns (loss, mean absolute error)."""
        pred = self(x)
        diff = pred - y.squeeze(1)
        return (diff**2).mean(), diff.abs().mean()


SPECS = {"cvae": CVAESpec, "surrogate": SurrogateSpec}
MODELS = {"cvae": CVAE, "surrogate": Surrogate}


def model_from_spec(data: dict[str, Any]) -> nn.Module:
    """Build an untrained model from a spec dict (``kind`` selects cvae or surrogate)."""
    kind = data.get("kind")
    if kind not in SPECS:
        raise StructreconError(f"unknown model kind '{kind}'; valid: {', '.join(SPECS)}")
    return MODELS[kind](SPECS[kind].from_dict(data))


@dataclasses.dataclass(frozen=True)
class Normaliser:
    """Per-feature standardisation of fingerprints and of the property.

    ``x = (R - x_mean) / x_std`` and ``y = (p - y_mean) / y_std``.  Units: those of R and p
    (eV/atom).  ``x_std`` is floored at 1e-6 of the largest column's standard deviation, so
    a (nearly) constant column stays (nearly) constant in R whatever a model outputs for it
    in x.  (A floor of 1 there let a cVAE write noise of 1e-3 into columns whose data vary
    by 1e-13, e.g. min-pooled ACSF of Pt10; a surrogate fitted on other data, where the
    same column's tiny spread set its scale, then saw values 1e10 standard deviations away
    and predicted 10 eV/atom off.)
    """

    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: float
    y_std: float

    @classmethod
    def fit(cls, fingerprints: np.ndarray, prop: np.ndarray) -> Normaliser:
        """Statistics of fingerprints [B, F] and property [B]."""
        x_mean = fingerprints.mean(axis=0)
        x_std = fingerprints.std(axis=0)
        top = float(x_std.max(initial=0.0))
        x_std = np.maximum(x_std, 1e-6 * top if top > 0 else 1.0)
        y_std = float(prop.std())
        return cls(x_mean, x_std, float(prop.mean()), y_std if y_std > 0 else 1.0)

    def x(self, fingerprints: np.ndarray) -> np.ndarray:
        """R [B, F] -> normalised x [B, F]."""
        return (fingerprints - self.x_mean) / self.x_std

    def x_inverse(self, x: np.ndarray) -> np.ndarray:
        """Normalised x [B, F] -> R [B, F]."""
        return x * self.x_std + self.x_mean

    def y(self, prop) -> np.ndarray:
        """Property (e.g. eV/atom) -> normalised."""
        return (np.asarray(prop, dtype=float) - self.y_mean) / self.y_std

    def y_inverse(self, y) -> np.ndarray:
        """Normalised -> property units."""
        return np.asarray(y, dtype=float) * self.y_std + self.y_mean

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {
            "x_mean": self.x_mean.tolist(),
            "x_std": self.x_std.tolist(),
            "y_mean": self.y_mean,
            "y_std": self.y_std,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normaliser:
        """Inverse of :meth:`to_dict`."""
        check_keys("normalisation", data, ["x_mean", "x_std", "y_mean", "y_std"])
        x_mean = np.asarray(data["x_mean"], dtype=float)
        x_std = np.asarray(data["x_std"], dtype=float)
        if x_mean.shape != x_std.shape or not (np.isfinite(x_std).all() and (x_std > 0).all()):
            raise StructreconError("normalisation: bad x_mean/x_std")
        y_std = float(data["y_std"])
        if not (math.isfinite(y_std) and y_std > 0):
            raise StructreconError("normalisation: bad y_std")
        return cls(x_mean, x_std, float(data["y_mean"]), y_std)
