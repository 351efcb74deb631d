"""Training, saving, loading and sampling of the generative models (Fung 2022, sec. 2.3).

A model directory holds ``model.pt`` (a ``state_dict``, read with
``torch.load(weights_only=True)``), ``spec.json`` (model spec, fingerprint spec,
normalisation, property name, composition, cell, pbc, training history) and
``loss.png`` (training and validation loss per epoch); a cVAE's directory also holds
``posterior.npz`` (its encoder's posterior over the training structures, for
``generate(latent="posterior")``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._errors import StructreconError
from ..descriptors import FingerprintSpec
from .models import CVAE, CVAESpec, Normaliser, Surrogate, SurrogateSpec, model_from_spec

__all__ = [
    "FORMAT",
    "TrainedModel",
    "TrainingData",
    "load_model",
    "plot_losses",
    "split_indices",
    "train",
]

FORMAT = "structrecon-model-1"


@dataclasses.dataclass
class TrainingData:
    """Fingerprints and one scalar property of structures of a single composition.

    Parameters
    ----------
    fingerprints : [B, F] float64 global fingerprints R, or [B, N, F] per-atom features
        (the descriptor of ``spec`` without its pooling) for a per-atom surrogate.
    prop : [B] property values (e.g. formation energy, eV/atom).
    prop_name : the property's key (e.g. ``e_form``).
    spec : fingerprint spec that made R.
    numbers : [N] atomic numbers of the (shared) composition.
    cell : [3, 3] Angstrom (zeros for clusters).  pbc : [3] booleans.
    """

    fingerprints: np.ndarray
    prop: np.ndarray
    prop_name: str
    spec: FingerprintSpec
    numbers: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray

    def __post_init__(self):
        self.fingerprints = np.asarray(self.fingerprints, dtype=float)
        self.prop = np.asarray(self.prop, dtype=float).reshape(-1)
        if self.fingerprints.ndim not in (2, 3):
            raise StructreconError(
                "training fingerprints must be a [B, F] array (or [B, N, F] per atom)"
            )
        b, f = self.fingerprints.shape[0], self.fingerprints.shape[-1]
        if b < 2:
            raise StructreconError(f"need at least 2 training structures, got {b}")
        if len(self.prop) != b:
            raise StructreconError(f"{b} fingerprints but {len(self.prop)} property values")
        expected = self.spec.descriptor.n_features if self.per_atom else self.spec.n_features
        if f != expected:
            raise StructreconError(
                f"fingerprint length {f} does not match the spec '{self.spec.name or 'custom'}' "
                f"({expected} values{' per atom' if self.per_atom else ''})"
            )
        if not (np.isfinite(self.fingerprints).all() and np.isfinite(self.prop).all()):
            raise StructreconError("training data contains NaN or inf")

    @property
    def per_atom(self) -> bool:
        """Per-atom features [B, N, F] rather than pooled fingerprints [B, F]."""
        return self.fingerprints.ndim == 3


def split_indices(n: int, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random train/validation split of ``range(n)`` (paper: 80:20), as sorted index arrays.

    Both parts are non-empty when ``train_fraction < 1`` and ``n >= 2``.
    """
    perm = np.random.default_rng(seed).permutation(n)
    if train_fraction >= 1.0:
        return np.sort(perm), np.array([], dtype=int)
    n_train = min(n - 1, max(1, int(round(train_fraction * n))))
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


@dataclasses.dataclass
class TrainedModel:
    """A trained model with everything needed to use it on raw fingerprints."""

    model: CVAE | Surrogate
    normaliser: Normaliser
    fingerprint_spec: FingerprintSpec
    prop_name: str
    numbers: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    history: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    # cVAE only: q(z | x, y) over the training structures, normalised units:
    # "mu", "logvar" [n_train, latent] and "y" [n_train]
    posterior: dict[str, np.ndarray] | None = None

    @property
    def kind(self) -> str:
        """``cvae`` or ``surrogate``."""
        return self.model.spec.kind

    def save(self, directory: str | Path) -> Path:
        """Write ``model.pt`` (state_dict), ``spec.json`` and ``loss.png`` into ``directory``."""
        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise StructreconError(f"model directory {d} exists and is not a directory")
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        torch.save(state, d / "model.pt")
        meta = {
            "format": FORMAT,
            "model": self.model.spec.to_dict(),
            "fingerprint_spec": self.fingerprint_spec.to_dict(),
            "normalisation": self.normaliser.to_dict(),
            "property": self.prop_name,
            "numbers": [int(n) for n in self.numbers],
            "cell": np.asarray(self.cell, dtype=float).tolist(),
            "pbc": [bool(p) for p in self.pbc],
            "history": self.history,
            "info": self.info,
        }
        (d / "spec.json").write_text(json.dumps(meta, indent=1))
        if self.posterior is not None:
            np.savez(d / "posterior.npz", **self.posterior)
        else:  # a stale one from another model must not be read as this model's
            (d / "posterior.npz").unlink(missing_ok=True)
        if self.history.get("train"):
            plot_losses(self.history, d / "loss.png", title=f"{self.kind} training")
        return d

    @property
    def per_atom(self) -> bool:
        """A per-atom surrogate (scores structures, not pooled fingerprints)."""
        return bool(getattr(self.model.spec, "per_atom", False))

    def predict(self, fingerprints: np.ndarray) -> np.ndarray:
        """Surrogate only: raw fingerprints [B, F] -> property [B] (property units).

        A per-atom surrogate takes per-atom features [B, N, F]
        (:func:`structrecon.descriptors.describe_atoms`).
        """
        if not isinstance(self.model, Surrogate):
            raise StructreconError("this model is a cVAE, not a surrogate")
        fingerprints = np.asarray(fingerprints, dtype=float)
        ndim, f = (3, "N, ") if self.per_atom else (2, "")
        if fingerprints.ndim != ndim or fingerprints.shape[-1] != self.model.spec.n_features:
            raise StructreconError(
                f"surrogate expects [B, {f}{self.model.spec.n_features}] "
                f"{'per-atom features' if self.per_atom else 'fingerprints'}, "
                f"got {list(fingerprints.shape)}"
            )
        x = torch.as_tensor(self.normaliser.x(fingerprints), dtype=torch.float32)
        self.model.eval()
        out = []
        with torch.no_grad():
            for chunk in torch.split(x, 4096):
                out.append(self.model(chunk).double().numpy())
        return self.normaliser.y_inverse(np.concatenate(out))

    def predict_structures(self, frames) -> np.ndarray:
        """Surrogate only: the property [B] of structures, from their own fingerprints."""
        from ..descriptors import describe, describe_atoms

        features = describe_atoms if self.per_atom else describe
        return self.predict(features(self.fingerprint_spec, frames))

    def generate(
        self,
        target: float,
        n: int,
        seed: int | None = 0,
        temperature: float = 1.0,
        *,
        latent: str = "prior",
        bandwidth: float | None = None,
    ) -> np.ndarray:
        """CVAE only: ``n`` fingerprints [n, F] for property ``target`` (property units).

        ``latent="prior"``: z from the prior at ``temperature`` T (z ~ N(0, T^2 I), or
        mu(y) + T sigma(y) eps for a conditional prior).  ``latent="posterior"``: z from
        the encoder's posterior over the training structures whose property lies near the
        target, an ex-post estimate of p(z | y) (cf. Ghosh et al. 2020): a training
        structure i is drawn with probability ~ exp(-(y_i - target)^2 / (2 h^2)), h =
        ``bandwidth`` (property units; default 0.2 standard deviations of the training
        property), and z = mu_i + T sigma_i eps.  Either z is decoded conditioned on the
        target and de-normalised; T below 1 trades diversity for fidelity to the target.
        """
        if not isinstance(self.model, CVAE):
            raise StructreconError("this model is a surrogate, not a cVAE")
        if n < 1:
            raise StructreconError(f"number of samples must be >= 1, got {n}")
        if not np.isfinite(target):
            raise StructreconError(f"target must be finite, got {target}")
        if not (np.isfinite(temperature) and temperature > 0):
            raise StructreconError(f"temperature must be > 0, got {temperature}")
        if latent not in ("prior", "posterior"):
            raise StructreconError(f"latent must be 'prior' or 'posterior', got '{latent}'")
        if bandwidth is not None and latent != "posterior":
            raise StructreconError("a bandwidth applies to latent='posterior' only")
        gen = torch.Generator().manual_seed(int(seed) if seed is not None else 0)
        y = torch.full((n, 1), float(self.normaliser.y(target)), dtype=torch.float32)
        self.model.eval()
        if latent == "prior":
            x = self.model.sample(y, generator=gen, temperature=float(temperature))
        else:
            z = self._posterior_latents(float(target), n, gen, float(temperature), bandwidth)
            with torch.no_grad():
                x = self.model.decode(z, y)
        return self.normaliser.x_inverse(x.double().numpy())

    def _posterior_latents(self, target, n, gen, temperature, bandwidth) -> torch.Tensor:
        """Z [n, latent] drawn from the posteriors of training structures near ``target``."""
        post = self.posterior
        if post is None:
            raise StructreconError(
                "this cVAE has no stored posterior (posterior.npz; models trained before "
                "it was saved): retrain it, or sample the prior"
            )
        y_std = self.normaliser.y_std
        h = 0.2 if bandwidth is None else float(bandwidth) / y_std  # normalised units
        if not (np.isfinite(h) and h > 0):
            raise StructreconError(f"bandwidth must be > 0, got {bandwidth}")
        dist = (np.asarray(post["y"], dtype=float) - float(self.normaliser.y(target))) / h
        if np.abs(dist).min() > 4.0:
            lo, hi = self.normaliser.y_inverse([post["y"].min(), post["y"].max()])
            raise StructreconError(
                f"target {target:g} is more than 4 bandwidths ({4 * h * y_std:.3g}) from "
                f"every training structure's {self.prop_name} ({lo:.4g} to {hi:.4g}): "
                "sample the prior or give a larger bandwidth"
            )
        p = torch.softmax(torch.as_tensor(-0.5 * dist**2), dim=0)
        idx = torch.multinomial(p, n, replacement=True, generator=gen)
        mu = torch.as_tensor(post["mu"], dtype=torch.float32)[idx]
        sigma = torch.exp(0.5 * torch.as_tensor(post["logvar"], dtype=torch.float32)[idx])
        eps = torch.randn(mu.shape, generator=gen, dtype=mu.dtype)
        return mu + temperature * sigma * eps

    def calibrate(
        self,
        target: float,
        surrogate: TrainedModel | list[TrainedModel],
        *,
        n: int = 2000,
        seed: int | None = 1,
        temperature: float = 1.0,
        latent: str = "prior",
        bandwidth: float | None = None,
        tol: float | None = None,
        max_steps: int = 8,
        min_share: float | None = None,
        window: float = 0.1,
        cooling: float = 0.8,
        min_temperature: float = 0.1,
    ) -> tuple[float, dict]:
        """CVAE only: the condition at which ``surrogate`` puts the samples' mean at ``target``.

        A cVAE's samples at condition y miss y on average (on the StructRepGen Pt10 data
        by +0.02 to +0.07 eV/atom at 1.9 and 3.4, by -0.01 to -0.04 at 3.7, as a second
        surrogate sees them).  This finds the condition c with mean(surrogate(generate(c)))
        = target by secant steps from c = target, on ``n`` samples drawn with one ``seed``
        at every step (common random numbers), so the mean is a smooth function of c.
        Sample the real fingerprints at c with another seed.  ``tol``: property units
        (default 1% of the training property's standard deviation); c stays within 3
        standard deviations of the target.  ``surrogate`` may be a list (a committee,
        e.g. one architecture from several initialisations): the mean is then that of
        the members' mean prediction.

        ``min_share`` (a fraction, e.g. 0.95) also calibrates the spread: while the
        surrogate (any member of a committee) puts fewer than that share of the samples
        at c within +-``window`` of the target, the temperature is multiplied by
        ``cooling`` and c found again, down to ``min_temperature``.  The highest
        temperature that reaches the share is kept (if none does, the one with the
        largest share).  Generate at ``info["temperature"]``.

        Returns ``(c, info)``; ``info`` has ``steps`` [(c, mean)] (of the kept
        temperature), ``mean`` (the surrogate's mean at c), ``converged``, ``offset``
        (c - target), ``temperature``, ``share`` (the surrogate's share within
        +-``window`` at c; of a committee, its least agreeing member's) and ``rungs``
        [(temperature, c, share)], one per temperature tried.
        """
        if not isinstance(self.model, CVAE):
            raise StructreconError("this model is a surrogate, not a cVAE")
        members = list(surrogate) if isinstance(surrogate, (list, tuple)) else [surrogate]
        if not members:
            raise StructreconError("calibration needs at least one surrogate")
        for member in members:
            if not isinstance(member.model, Surrogate) or member.per_atom:
                raise StructreconError("calibration needs a surrogate over pooled fingerprints")
            if member.fingerprint_spec.to_dict() != self.fingerprint_spec.to_dict():
                raise StructreconError("the surrogate was trained on another fingerprint spec")
        if max_steps < 1:
            raise StructreconError(f"max_steps must be >= 1, got {max_steps}")
        y_std = self.normaliser.y_std
        tol = 0.01 * y_std if tol is None else float(tol)
        if not (np.isfinite(tol) and tol > 0):
            raise StructreconError(f"tol must be > 0, got {tol}")
        if not (np.isfinite(window) and window > 0):
            raise StructreconError(f"window must be > 0, got {window}")
        if min_share is not None and not 0.0 < min_share <= 1.0:
            raise StructreconError(f"min_share must be a fraction in (0, 1], got {min_share}")
        if not 0.0 < cooling < 1.0:
            raise StructreconError(f"cooling must lie in (0, 1), got {cooling}")
        if min_share is not None and not 0.0 < min_temperature <= temperature:
            raise StructreconError(
                f"min_temperature must lie in (0, temperature], got {min_temperature}"
            )
        lo, hi = target - 3 * y_std, target + 3 * y_std

        def rung(t, start):
            """Secant steps at temperature t from c = start -> (c, steps, predictions at c)."""
            preds = {}

            def mean_at(c):
                x = self.generate(c, n, seed, t, latent=latent, bandwidth=bandwidth)
                preds[c] = np.stack([member.predict(x) for member in members])
                return float(preds[c].mean())

            steps = [(float(start), mean_at(float(start)))]
            while abs(steps[-1][1] - target) > tol and len(steps) < max_steps:
                slope = 1.0
                if len(steps) > 1 and steps[-1][0] != steps[-2][0]:
                    slope = (steps[-1][1] - steps[-2][1]) / (steps[-1][0] - steps[-2][0])
                    slope = min(max(slope, 0.2), 5.0)  # a noisy secant must not fling c away
                c = float(np.clip(steps[-1][0] - (steps[-1][1] - target) / slope, lo, hi))
                if c == steps[-1][0]:
                    break  # at the bound
                steps.append((c, mean_at(c)))
            c = min(steps, key=lambda s: abs(s[1] - target))[0]
            share = float((np.abs(preds[c] - target) <= window).mean(axis=1).min())
            return c, steps, share

        tried = []  # (temperature, c, steps, share)
        t, start = float(temperature), float(target)
        while True:
            c, steps, share = rung(t, start)
            tried.append((t, c, steps, share))
            if min_share is None or share >= min_share or t * cooling < min_temperature:
                break
            t, start = t * cooling, c  # colder, from the last condition
        reached = [r for r in tried if min_share is not None and r[3] >= min_share]
        t, c, steps, share = reached[0] if reached else max(tried, key=lambda r: r[3])
        m = dict(steps)[c]
        info = {
            "steps": steps,
            "mean": m,
            "converged": abs(m - target) <= tol,
            "offset": c - float(target),
            "temperature": t,
            "share": share,
            "rungs": [(r[0], r[1], r[3]) for r in tried],
        }
        return c, info


def load_model(directory: str | Path, kind: str | None = None) -> TrainedModel:
    """Read a model directory written by :meth:`TrainedModel.save`.

    ``kind`` (``cvae``/``surrogate``), if given, must match.  Errors are one line.
    """
    d = Path(directory)
    if not d.is_dir():
        raise StructreconError(f"model directory {d} does not exist")
    for name in ("spec.json", "model.pt"):
        if not (d / name).is_file():
            raise StructreconError(f"{d} is not a structrecon model directory (no {name})")
    try:
        meta = json.loads((d / "spec.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StructreconError(f"cannot read {d / 'spec.json'}: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StructreconError(f"{d / 'spec.json'} is not a structrecon model spec")
    model = model_from_spec(meta["model"])
    if kind is not None and model.spec.kind != kind:
        raise StructreconError(f"{d} holds a {model.spec.kind} model, expected a {kind}")
    try:
        state = torch.load(d / "model.pt", weights_only=True, map_location="cpu")
        model.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - corrupted or mismatched weights
        raise StructreconError(f"cannot load weights {d / 'model.pt'}: {err}") from None
    model.eval()
    return TrainedModel(
        model=model,
        normaliser=Normaliser.from_dict(meta["normalisation"]),
        fingerprint_spec=FingerprintSpec.from_dict(meta["fingerprint_spec"]),
        prop_name=str(meta["property"]),
        numbers=np.asarray(meta["numbers"], dtype=int),
        cell=np.asarray(meta["cell"], dtype=float).reshape(3, 3),
        pbc=np.asarray(meta["pbc"], dtype=bool),
        history=meta.get("history", {}),
        info=meta.get("info", {}),
        posterior=_read_posterior(d / "posterior.npz", model),
    )


def _read_posterior(path: Path, model) -> dict[str, np.ndarray] | None:
    """The stored posterior of a cVAE (None if absent); errors are one line."""
    if not isinstance(model, CVAE) or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            post = {k: np.asarray(f[k], dtype=float) for k in ("mu", "logvar", "y")}
    except (OSError, KeyError, ValueError) as err:
        raise StructreconError(f"cannot read {path}: {err}") from None
    d = model.spec.latent
    n = len(post["y"])
    if post["mu"].shape != (n, d) or post["logvar"].shape != (n, d) or n == 0:
        raise StructreconError(f"{path} does not match the model (latent {d})")
    return post


def train(
    data: TrainingData,
    spec: CVAESpec | SurrogateSpec,
    *,
    seed: int = 0,
    split_seed: int | None = None,
    progress: bool = True,
) -> TrainedModel:
    """Train a cVAE or a surrogate on ``data`` with Adam (Fung 2022, sec. 2.3).

    The data are split ``spec.train_fraction`` : rest, by ``split_seed`` (default: ``seed``,
    which also sets the initialisation and the batches; give both to retrain on the same
    split from another initialisation); normalisation statistics come
    from the training part only.  Per epoch the mean training loss and the validation loss
    are recorded in ``history`` (for the cVAE: recon + beta KL; for the surrogate: MSE on
    the normalised property, plus the validation MAE in property units).
    ``spec.lr_decay`` sets the exponential decay of the learning rate (``info['final_lr']``
    is the rate after the last epoch), and with ``spec.keep_best`` the model ends with the
    weights of the epoch of lowest validation loss (``info['best_epoch']``, from 0).
    """
    from tqdm.auto import tqdm

    if spec.n_features != data.fingerprints.shape[-1]:
        raise StructreconError(
            f"model spec n_features={spec.n_features} but the data have "
            f"{data.fingerprints.shape[-1]} features"
        )
    per_atom = bool(getattr(spec, "per_atom", False))
    if per_atom != data.per_atom:
        raise StructreconError(
            "a per-atom surrogate needs per-atom features [B, N, F] and the other models "
            "pooled fingerprints [B, F]"
        )
    torch.manual_seed(seed)
    split_seed = seed if split_seed is None else split_seed
    tr, va = split_indices(len(data.prop), spec.train_fraction, split_seed)
    # per atom: one set of statistics per feature over all atoms (the atoms are alike)
    fit_x = data.fingerprints[tr].reshape(-1, data.fingerprints.shape[-1])
    norm = Normaliser.fit(fit_x, data.prop[tr])
    x_all = torch.as_tensor(norm.x(data.fingerprints), dtype=torch.float32)
    y_all = torch.as_tensor(norm.y(data.prop), dtype=torch.float32).reshape(-1, 1)
    x_tr, y_tr, x_va, y_va = x_all[tr], y_all[tr], x_all[va], y_all[va]
    model = CVAE(spec) if isinstance(spec, CVAESpec) else Surrogate(spec)
    opt = torch.optim.Adam(
        model.parameters(), lr=spec.lr, weight_decay=getattr(spec, "weight_decay", 0.0)
    )
    decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=spec.lr_decay ** (1 / spec.epochs))
    best_loss, best_epoch, best_state = math.inf, -1, None
    gen = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"train": [], "validation": []}
    if isinstance(model, Surrogate):
        history["validation_mae"] = []
    n = len(tr)
    t0 = time.perf_counter()
    bar = tqdm(range(spec.epochs), desc=f"train {spec.kind}", disable=not progress, unit="ep")
    for epoch in bar:
        model.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, spec.batch_size):
            idx = perm[start : start + spec.batch_size]
            loss, _ = model.loss(x_tr[idx], y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        history["train"].append(total / n)
        if len(va):
            model.eval()
            with torch.no_grad():
                vloss, extra = model.loss(x_va, y_va)
            history["validation"].append(float(vloss))
            if isinstance(model, Surrogate):
                history["validation_mae"].append(float(extra) * norm.y_std)
            bar.set_postfix(train=f"{history['train'][-1]:.4g}", val=f"{float(vloss):.4g}")
            if spec.keep_best and float(vloss) < best_loss:
                best_loss, best_epoch = float(vloss), epoch
                best_state = copy.deepcopy(model.state_dict())
        else:
            bar.set_postfix(train=f"{history['train'][-1]:.4g}")
        decay.step()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    posterior = None
    if isinstance(model, CVAE):
        with torch.no_grad():
            mu, logvar = model.encode(x_tr, y_tr)
        posterior = {
            "mu": mu.double().numpy(),
            "logvar": logvar.double().numpy(),
            "y": y_tr[:, 0].double().numpy(),
        }
    info = {
        "seed": seed,
        "split_seed": split_seed,
        "n_train": int(len(tr)),
        "n_validation": int(len(va)),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    info["final_lr"] = opt.param_groups[0]["lr"]  # after the last epoch's decay step
    if spec.keep_best:
        info["best_epoch"] = best_epoch
    return TrainedModel(
        model=model,
        normaliser=norm,
        fingerprint_spec=data.spec,
        prop_name=data.prop_name,
        numbers=np.asarray(data.numbers, dtype=int),
        cell=np.asarray(data.cell, dtype=float).reshape(3, 3),
        pbc=np.asarray(data.pbc, dtype=bool).reshape(3),
        history=history,
        info=info,
        posterior=posterior,
    )


def plot_losses(history: dict[str, list[float]], path: str | Path, title: str = "") -> None:
    """Training and validation loss per epoch (log scale) to a PNG, on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key in ("train", "validation"):
        values = history.get(key) or []
        if values:
            ax.plot(np.arange(1, len(values) + 1), values, label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (normalised units)")
    if all(v > 0 for key in ("train", "validation") for v in history.get(key) or []):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
