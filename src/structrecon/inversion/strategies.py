"""Inversion strategies over a fingerprint function and targets.

A strategy never sees the descriptor's hyperparameters, and it runs all trials of
all targets as one batch.

Each strategy is a frozen dataclass with a ``run(problem, generator)`` method that
returns an :class:`Outcome`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from ase.data import covalent_radii

from .._errors import StructreconError
from ..structures import point_group, rotatable_bonds, rotate_about_bond
from .losses import Repulsion, fingerprint_rmsd, get_loss
from .milad import MiladReconstruction

__all__ = [
    "AdamHops",
    "LBFGS",
    "LocalLM",
    "NoisyGD",
    "Outcome",
    "Problem",
    "STRATEGIES",
    "get_strategy",
    "lbfgs_polish",
    "lm_polish",
    "random_positions",
]


@dataclass
class Problem:
    """T targets of one composition group.

    Attributes
    ----------
    fn : positions [B, N, 3] -> fingerprints [B, F].
    targets : [T, F] target fingerprints (dtype of the optimisation).
    numbers : [N] atomic numbers.
    cell : [3, 3] Angstrom or None; pbc : three booleans.
    starts : [T, N, 3] starting positions, or None for random starts.
    repulsion : optional short-range term added to the loss.
    tol : fingerprint RMSD under which a target counts as converged.
    species_fn, species_targets : optional second fingerprint (function and [T, F2]
        targets) that encodes the species, for strategies that recover species from it
        (``milad``); the others ignore it.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    targets: torch.Tensor
    numbers: np.ndarray
    cell: np.ndarray | None = None
    pbc: tuple = (False, False, False)
    starts: torch.Tensor | None = None
    repulsion: Repulsion | None = None
    tol: float = 1e-4
    species_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    species_targets: torch.Tensor | None = None

    @property
    def n_targets(self) -> int:
        """T."""
        return self.targets.shape[0]


@dataclass
class Outcome:
    """What a strategy returns for T targets.

    positions [T, N, 3]; loss, fingerprint_rmsd [T] (numpy); trials [T] int (trials
    started before the target converged or the budget ran out); history: per target,
    the best loss after each optimiser step; numbers: None, or [T, N] atomic numbers
    recovered by the strategy (species reconstruction) in place of the problem's.
    """

    positions: torch.Tensor
    loss: np.ndarray
    fingerprint_rmsd: np.ndarray
    trials: np.ndarray
    history: list[list[float]] = field(default_factory=list)
    numbers: np.ndarray | None = None


def random_positions(numbers, cell, pbc, n: int, generator: torch.Generator, dtype) -> torch.Tensor:
    """N random structures [n, N, 3]: uniform in the cell if periodic, else in a sphere.

    The sphere holds the atoms' covalent spheres at a packing fraction of 1/2:
    radius = (2 sum_i r_i^3)^(1/3).
    """
    numbers = np.asarray(numbers)
    n_atoms = len(numbers)
    if cell is not None and any(pbc):
        frac = torch.rand(n, n_atoms, 3, generator=generator, dtype=dtype)
        return frac @ torch.as_tensor(cell, dtype=dtype)
    radius = float((2.0 * np.sum(covalent_radii[numbers] ** 3)) ** (1.0 / 3.0))
    direction = torch.randn(n, n_atoms, 3, generator=generator, dtype=dtype)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    r = radius * torch.rand(n, n_atoms, 1, generator=generator, dtype=dtype) ** (1.0 / 3.0)
    return direction * r


def _objective(problem: Problem, loss_fn, x: torch.Tensor, targets: torch.Tensor):
    """Per-structure loss [B] and fingerprint RMSD [B] (the latter without grad)."""
    pred = problem.fn(x)
    loss = loss_fn(pred, targets)
    if problem.repulsion is not None:
        loss = loss + problem.repulsion(x)
    return loss, fingerprint_rmsd(pred.detach(), targets)


def lbfgs_polish(
    problem: Problem,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int = 100,
    loss: str = "mse",
) -> tuple[torch.Tensor, torch.Tensor]:
    """L-BFGS (strong Wolfe line search) on the summed loss of a batch.

    Structures are independent, so the sum's minimum is each one's minimum.
    Returns polished positions [B, N, 3] and their fingerprint RMSD [B]; a structure
    whose RMSD got worse keeps its input positions.
    """
    loss_fn = get_loss(loss)
    with torch.no_grad():
        _, rmsd0 = _objective(problem, loss_fn, x, targets)
    if steps <= 0:
        return x, rmsd0
    var = x.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [var],
        lr=1.0,
        max_iter=steps,
        history_size=20,
        tolerance_grad=1e-15,
        tolerance_change=1e-20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        value, _ = _objective(problem, loss_fn, var, targets)
        total = value.sum()
        total.backward()
        return total

    try:
        opt.step(closure)
    except RuntimeError:  # a line search that met a non-finite value
        return x, rmsd0
    with torch.no_grad():
        new = var.detach()
        _, rmsd1 = _objective(problem, loss_fn, new, targets)
    ok = torch.isfinite(rmsd1) & (rmsd1 < rmsd0)
    return torch.where(ok[:, None, None], new, x), torch.where(ok, rmsd1, rmsd0)


def _fd_jacobian(fn, x: torch.Tensor, *, step: float = 1e-6, chunk: int = 2048) -> torch.Tensor:
    """Forward-difference Jacobians [B, F, 3N] of ``fn`` at x [B, N, 3], in float64.

    All 3N displaced copies of all structures go through ``fn`` in batches of ``chunk``.
    With a step of 1e-6 Angstrom the truncation error is ~1e-6 of the second derivative
    and the rounding error ~1e-10 of the values; enough for Gauss-Newton steps.
    """
    b, n, _ = x.shape
    d = 3 * n
    x = x.detach().to(torch.float64)
    with torch.no_grad():
        f0 = fn(x)
        disp = x.reshape(b, 1, d) + step * torch.eye(d, dtype=x.dtype)
        disp = disp.reshape(b * d, n, 3)
        out = torch.cat([fn(disp[i : i + chunk]) for i in range(0, b * d, chunk)])
    jac = (out.reshape(b, d, -1) - f0[:, None, :]) / step
    return jac.transpose(1, 2)


JACOBIANS = ("auto", "analytic", "autodiff", "fd")


def _check_jacobian(value: str) -> None:
    if value not in JACOBIANS:
        raise StructreconError(f"lm: jacobian must be one of {', '.join(JACOBIANS)}; got {value!r}")


def _jacobian_kind(problem: Problem, value: str) -> str:
    """``value`` with 'auto' resolved: 'analytic' where the fingerprint has it, else 'fd'."""
    _check_jacobian(value)
    has = getattr(problem.fn, "jacobian", None) is not None
    if value == "analytic" and not has:
        raise StructreconError(
            "lm: this fingerprint has no analytic Jacobian (bispectrum clusters with linear "
            "pooling have one); use jacobian='fd' or 'autodiff'"
        )
    if value == "auto":
        return "analytic" if has else "fd"
    return value


def lm_polish(
    problem: Problem,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int = 30,
    damping: float = 1e-3,
    patience: int = 8,
    progress: float = 0.25,
    jacobian_dtype=None,
    jacobian: str = "autodiff",
    done_below: float | None = None,
    groups: torch.Tensor | None = None,
    fast_above: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Levenberg-Marquardt on the fingerprint residuals f(x) - target.

    Each structure keeps its own damping: a step that lowers its squared residual is
    taken and the damping divided by 3, otherwise the damping is multiplied by 4.
    The Jacobians [B, F, 3N] come from forward-mode autodiff (``jacobian='autodiff'``),
    from forward differences in float64 (``'fd'``: 3N more batched forward passes,
    several times cheaper than forward mode for the bispectrum; only for fingerprints
    smooth in the positions, not for max/min pooling), or from the fingerprint's own
    ``fn.jacobian`` (``'analytic'``: the bispectrum of clusters); ``'auto'`` takes the
    analytic one where there is one, else forward differences.  Gauss-Newton suits the
    piecewise-smooth residuals of max/min pooling far better than L-BFGS (measured on
    Pt10: L-BFGS stalls at fingerprint RMSD ~1e-4 where LM reaches 1e-15).  A structure
    whose squared residual has not fallen below ``progress`` times its value
    ``patience`` iterations earlier is stalled - it is in a wrong basin - and stops
    being polished, which saves most of the Jacobians.  With ``done_below``, a structure
    whose fingerprint RMSD falls below it is done and stops, and so do the other
    structures of its group (``groups`` [B]: a group id per structure, e.g. the trials
    of one target; default: each structure its own group).  With ``fast_above`` and a
    ``jacobian_dtype`` (float32), the trial steps of structures whose fingerprint RMSD
    is above it are evaluated in that dtype too (2-2.5x cheaper for the bispectrum):
    far from the target the rounding (RMSD ~1e-4 for the summed bispectra of MD-17
    molecules) does not change which steps are accepted.  Returns positions [B, N, 3]
    and fingerprint RMSD [B].  The repulsion term is not part of the residuals.
    """
    from torch.func import jacfwd, vmap

    b, n, _ = x.shape
    x = x.detach().clone()
    jdtype = jacobian_dtype or x.dtype

    def single(p, t):
        return problem.fn(p[None])[0] - t

    jacobian = _jacobian_kind(problem, jacobian)
    if jacobian == "analytic":

        def jac(xs, ts):
            return problem.fn.jacobian(xs, values=False)[1]

    elif jacobian == "fd":

        def jac(xs, ts):  # the residual's offset ts does not change its Jacobian
            return _fd_jacobian(problem.fn, xs)

    elif problem.cell is not None and any(problem.pbc):
        # periodic neighbour slots are chosen from the data, which vmap cannot batch
        def jac(xs, ts):
            return torch.stack([jacfwd(single)(p, t) for p, t in zip(xs, ts)])
    else:
        jac = vmap(jacfwd(single), in_dims=(0, 0))
    with torch.no_grad():
        res = problem.fn(x) - targets
    cost = (res**2).sum(-1)
    lam = torch.full((b,), damping, dtype=x.dtype)
    eye = torch.eye(3 * n, dtype=x.dtype)
    alive = torch.isfinite(cost)

    def retire():  # structures below done_below, and their groups, stop
        if done_below is not None:
            done = (cost / res.shape[-1]).sqrt() < done_below
            alive.logical_and_(~(done if groups is None else torch.isin(groups, groups[done])))

    retire()
    need_jac = alive.clone()
    jtj = torch.zeros(b, 3 * n, 3 * n, dtype=x.dtype)
    jtr = torch.zeros(b, 3 * n, dtype=x.dtype)
    past = [cost.clone()]
    for it in range(steps):
        idx = torch.nonzero(need_jac & alive).flatten()
        if idx.numel():
            j = jac(x[idx].to(jdtype), targets[idx].to(jdtype)).reshape(idx.numel(), -1, 3 * n)
            j = j.to(x.dtype)
            jtj[idx] = j.transpose(1, 2) @ j
            jtr[idx] = (j.transpose(1, 2) @ res[idx, :, None])[..., 0]
        live = torch.nonzero(alive).flatten()
        if live.numel() == 0:
            break
        scale = torch.diagonal(jtj[live], dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
        a = jtj[live] + (lam[live] * scale)[:, None, None] * eye
        step = -torch.linalg.solve(a, jtr[live])
        x_new = x[live] + step.reshape(-1, n, 3)
        with torch.no_grad():
            res_new = _residuals(problem.fn, x_new, targets[live], cost[live], fast_above, jdtype)
        cost_new = (res_new**2).sum(-1)
        ok = torch.isfinite(cost_new) & (cost_new < cost[live])
        x[live] = torch.where(ok[:, None, None], x_new, x[live])
        res[live] = torch.where(ok[:, None], res_new, res[live])
        cost[live] = torch.where(ok, cost_new, cost[live])
        lam[live] = torch.where(ok, lam[live] / 3.0, lam[live] * 4.0).clamp(1e-12, 1e10)
        need_jac[:] = False
        need_jac[live] = ok
        past.append(cost.clone())
        retire()
        if it + 1 >= patience:
            stalled = cost > progress * past[-1 - patience]
            alive &= ~stalled & (lam < 1e10) & (cost > 0)
    return x, (cost / res.shape[-1]).sqrt()


def _residuals(fn, x, targets, cost, fast_above, fast_dtype):
    """fn(x) - targets, in ``fast_dtype`` where the RMSD from ``cost`` is above fast_above."""
    if fast_above is None or fast_dtype == x.dtype:
        return fn(x) - targets
    fast = (cost / targets.shape[-1]).sqrt() > fast_above
    if not fast.any():
        return fn(x) - targets
    out = torch.empty_like(targets)
    out[fast] = fn(x[fast].to(fast_dtype)).to(x.dtype) - targets[fast]
    if not fast.all():
        out[~fast] = fn(x[~fast]) - targets[~fast]
    return out


def _final(problem: Problem, loss: str, x: torch.Tensor, trials, history) -> Outcome:
    with torch.no_grad():
        value, rmsd = _objective(problem, get_loss(loss), x, problem.targets)
    return Outcome(
        positions=x.detach(),
        loss=value.double().numpy(),
        fingerprint_rmsd=rmsd.double().numpy(),
        trials=np.asarray(trials, dtype=int),
        history=history,
    )


@dataclass(frozen=True, kw_only=True)
class AdamHops:
    """Fung 2022 Algorithm 1: random starts x noise hops with Adam, keep the lowest.

    All ``trials`` starts of all targets are one batch.  Each hop runs ``steps`` Adam
    steps on the loss (learning rate decaying geometrically from ``lr`` to
    ``lr_final``; in ``explore_dtype``, float32 by default, which is ~2x faster
    on a CPU), then the ``polish_top`` best trials of every target still open are
    polished in float64 with Levenberg-Marquardt (:func:`lm_polish`).  A target whose
    fingerprint RMSD falls below the problem's ``tol`` is done and leaves the batch;
    otherwise Gaussian noise of ``hop_noise`` Angstrom is added to every trial and the
    next hop starts.  Random starts use spheres scaled from 1 to ``spread`` times the
    compact radius of :func:`random_positions`, so open structures are reachable too.
    With ``rounds`` > 1, targets still open after all hops start again from fresh
    random trials, up to ``rounds`` times (the paper's protocol is ``rounds=1``); the
    result's ``trials`` counts the trials a target used.
    """

    trials: int = 10
    hops: int = 5
    steps: int = 100
    lr: float = 0.1
    lr_final: float = 0.002
    hop_noise: float = 0.3
    loss: str = "mae"
    spread: float = 1.5
    polish_top: int = 2
    polish_steps: int = 40
    explore_dtype: str = "float32"
    rounds: int = 1

    name = "adam-hops"

    def __post_init__(self):
        _positive(
            self, "trials", "hops", "steps", "lr", "lr_final", "spread", "polish_top", "rounds"
        )
        get_loss(self.loss)
        if self.explore_dtype not in ("float32", "float64"):
            raise StructreconError("adam-hops: explore_dtype must be float32 or float64")

    def run(self, problem: Problem, generator: torch.Generator) -> Outcome:
        """Invert all targets of ``problem``."""
        t_count, k = problem.n_targets, self.trials
        dtype = problem.targets.dtype
        xdtype = getattr(torch, self.explore_dtype)
        x = self._starts(problem, generator, first_exact=True)
        best_x = x[:, 0].clone()
        best_rmsd = torch.full((t_count,), math.inf, dtype=dtype)
        history: list[list[float]] = [[] for _ in range(t_count)]
        active = torch.ones(t_count, dtype=torch.bool)
        loss_fn = get_loss(self.loss)
        gamma = (self.lr_final / self.lr) ** (1.0 / max(self.steps - 1, 1))
        top = min(self.polish_top, k)
        rounds = torch.zeros(t_count, dtype=torch.long)
        for hop in range(self.hops * self.rounds):
            idx = torch.nonzero(active).flatten()
            if idx.numel() == 0:
                break
            if hop % self.hops == 0:  # a new round: fresh starts for the open targets
                rounds[idx] += 1
                if hop > 0:
                    x[idx] = self._starts(problem, generator, first_exact=False)[idx]
            m = idx.numel()
            targets = problem.targets[idx].repeat_interleave(k, dim=0).to(xdtype)
            var = x[idx].reshape(-1, *x.shape[2:]).to(xdtype).requires_grad_(True)
            opt = torch.optim.Adam([var], lr=self.lr)
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
            trial_best = torch.full((var.shape[0],), math.inf, dtype=xdtype)
            trial_x = var.detach().clone()
            steps_best = []
            for _ in range(self.steps):
                opt.zero_grad()
                value, rmsd = _objective(problem, loss_fn, var, targets)
                value.sum().backward()
                with torch.no_grad():
                    better = rmsd < trial_best
                    trial_best = torch.where(better, rmsd, trial_best)
                    trial_x = torch.where(better[:, None, None], var.detach(), trial_x)
                    steps_best.append(value.detach().reshape(m, k).min(dim=1).values)
                opt.step()
                sched.step()
            for n, row in enumerate(torch.stack(steps_best, dim=1).double().tolist()):
                history[int(idx[n])].extend(row)
            with torch.no_grad():
                x[idx] = var.detach().to(dtype).reshape(m, k, *x.shape[2:])
                pick = trial_best.reshape(m, k).argsort(dim=1)[:, :top]  # [m, top]
                cand = trial_x.to(dtype).reshape(m, k, *x.shape[2:])
                cand = cand[torch.arange(m)[:, None], pick].reshape(m * top, *x.shape[2:])
            cand, cand_rmsd = lm_polish(
                problem,
                cand,
                problem.targets[idx].repeat_interleave(top, dim=0),
                steps=self.polish_steps,
            )
            with torch.no_grad():
                cand_rmsd, which = cand_rmsd.reshape(m, top).min(dim=1)
                cand = cand.reshape(m, top, *x.shape[2:])[torch.arange(m), which]
                improve = cand_rmsd < best_rmsd[idx]
                best_rmsd[idx] = torch.where(improve, cand_rmsd, best_rmsd[idx])
                best_x[idx] = torch.where(improve[:, None, None], cand, best_x[idx])
                active[idx[best_rmsd[idx] < problem.tol]] = False
                x[idx] = x[idx] + self.hop_noise * torch.randn(
                    x[idx].shape, generator=generator, dtype=dtype
                )
        return _final(problem, self.loss, best_x, (rounds * k).numpy(), history)

    def _starts(self, problem: Problem, generator, *, first_exact: bool) -> torch.Tensor:
        """Trial starts [T, trials, N, 3]: around the given starts, or random."""
        t_count, k = problem.n_targets, self.trials
        dtype = problem.targets.dtype
        if problem.starts is not None:
            base = problem.starts.repeat_interleave(k, dim=0)
            noise = torch.randn(base.shape, generator=generator, dtype=dtype) * self.hop_noise
            if first_exact:
                noise[::k] = 0.0  # the first trial of each target starts exactly at its start
            x = base + noise
        else:
            x = random_positions(
                problem.numbers, problem.cell, problem.pbc, t_count * k, generator, dtype
            )
            if problem.cell is None or not any(problem.pbc):
                scale = torch.linspace(1.0, self.spread, k, dtype=dtype).repeat(t_count)
                x = x * scale[:, None, None]
        return x.reshape(t_count, k, *x.shape[1:])


@dataclass(frozen=True, kw_only=True)
class NoisyGD:
    """Cobelli 2022 eq. 3: r <- r - gamma grad L + eta exp(-nu n) epsilon.

    epsilon is drawn independently per coordinate, uniform in [-1/2, 1/2): zero mean.
    (The paper's [0, 1] noise, applied as coded to all three coordinates alike, makes
    the molecule drift along (1, 1, 1); see ANCHORS.md.)  Starts from the problem's
    start structures (random starts if none).  Converged structures stop moving;
    the run ends when all have converged or after ``iterations``.  An optional
    L-BFGS polish follows.
    """

    gamma: float = 4e-8
    eta: float = 1e-2
    nu: float = 1e-3
    iterations: int = 50_000
    loss: str = "sse"
    trials: int = 1
    check_every: int = 50
    polish_steps: int = 0

    name = "noisy-gd"

    def __post_init__(self):
        _positive(self, "gamma", "iterations", "trials", "check_every")
        if self.eta < 0 or self.nu < 0:
            raise StructreconError("noisy-gd needs eta >= 0 and nu >= 0")
        get_loss(self.loss)

    def run(self, problem: Problem, generator: torch.Generator) -> Outcome:
        """Invert all targets of ``problem``."""
        t_count, k = problem.n_targets, self.trials
        dtype = problem.targets.dtype
        if problem.starts is not None:
            x = problem.starts.repeat_interleave(k, dim=0).clone()
        else:
            x = random_positions(
                problem.numbers, problem.cell, problem.pbc, t_count * k, generator, dtype
            )
        targets = problem.targets.repeat_interleave(k, dim=0)
        loss_fn = get_loss(self.loss)
        moving = torch.ones(x.shape[0], dtype=torch.bool)
        per_step: list[torch.Tensor] = []  # best loss of each target, per iteration
        for n in range(self.iterations):
            var = x.clone().requires_grad_(True)
            value, rmsd = _objective(problem, loss_fn, var, targets)
            (grad,) = torch.autograd.grad(value.sum(), var)
            with torch.no_grad():
                noise = torch.rand(x.shape, generator=generator, dtype=dtype) - 0.5
                step = -self.gamma * grad + self.eta * math.exp(-self.nu * n) * noise
                x = torch.where(moving[:, None, None], x + step, x)
                per_step.append(value.reshape(t_count, k).min(dim=1).values)
                if n % self.check_every == 0:
                    moving &= ~(rmsd < problem.tol)
                    if not moving.any():
                        break
        history = torch.stack(per_step, dim=1).double().tolist()
        with torch.no_grad():
            _, rmsd = _objective(problem, loss_fn, x, targets)
        pick = rmsd.reshape(t_count, k).argmin(dim=1)
        best = x.reshape(t_count, k, *x.shape[1:])[torch.arange(t_count), pick]
        best, _ = lbfgs_polish(problem, best, problem.targets, steps=self.polish_steps)
        return _final(problem, self.loss, best, np.full(t_count, k), history)


@dataclass(frozen=True, kw_only=True)
class LBFGS:
    """L-BFGS from the start structures (or random starts), ``trials`` per target."""

    trials: int = 1
    steps: int = 500
    start_noise: float = 0.0
    loss: str = "mse"

    name = "lbfgs"

    def __post_init__(self):
        _positive(self, "trials", "steps")
        get_loss(self.loss)

    def run(self, problem: Problem, generator: torch.Generator) -> Outcome:
        """Invert all targets of ``problem``."""
        t_count, k = problem.n_targets, self.trials
        dtype = problem.targets.dtype
        if problem.starts is not None:
            x = problem.starts.repeat_interleave(k, dim=0).clone()
            x = x + self.start_noise * torch.randn(x.shape, generator=generator, dtype=dtype)
        else:
            x = random_positions(
                problem.numbers, problem.cell, problem.pbc, t_count * k, generator, dtype
            )
        targets = problem.targets.repeat_interleave(k, dim=0)
        x, rmsd = lbfgs_polish(problem, x, targets, steps=self.steps, loss=self.loss)
        pick = rmsd.reshape(t_count, k).argmin(dim=1)
        best = x.reshape(t_count, k, *x.shape[1:])[torch.arange(t_count), pick]
        return _final(problem, self.loss, best, np.full(t_count, k), [[] for _ in range(t_count)])


#: LM steps per symmetry image in a sweep, and finalists per target polished in full
_SWEEP_STEPS, _SWEEP_KEEP = 5, 3
#: trial steps in float32 while the fingerprint RMSD is above this times its rounding
_FAST_FACTOR = 100.0


@dataclass(frozen=True, kw_only=True)
class LocalLM:
    """Levenberg-Marquardt from perturbed copies of a nearby start, with small hops.

    For targets close to a known structure - MD frames inverted from the relaxed
    geometry, as in Cobelli 2022 - a local second-order method replaces the tens of
    thousands of gradient steps of :class:`NoisyGD`.  Each target gets ``trials``
    starts: copies of its start structure with Gaussian noise of ``start_noise``
    Angstrom per coordinate.  None starts exactly at the start structure: the noise
    lets a planar start leave its plane (the role of the noise term of Cobelli eq. 3;
    at an exactly planar start the gradient has no out-of-plane part), and it draws
    the phases of the ring distortions that a symmetric start leaves undecided.  The
    Jacobians (``jacobian``) are the fingerprint's analytic one where it has one (the
    bispectrum of clusters; computed in float32, 1e-6 relative, as accurate as forward
    differences and 11-14x cheaper than them), else forward differences (``'auto'``), or
    ``'analytic'``, ``'fd'``, ``'autodiff'``.  With a float32 Jacobian, trial steps are
    evaluated in float32 too while a structure's fingerprint RMSD is above 100 times
    the float32 rounding of the fingerprint (measured once at the start structures;
    :func:`lm_polish` ``fast_above``; at 1000 times, a third of the benzene trial
    steps were in float64, and 40 benzene frames cost 18% more).  All starts of all targets are
    polished as one batch (:func:`lm_polish`, ``steps`` iterations; a trial whose
    residual has not fallen 4x in ``patience`` iterations is dropped); a target whose
    fingerprint RMSD is below the problem's ``tol`` is done, the others hop: new trials around
    their best structure with ``hop_noise`` Angstrom of noise, up to ``hops`` times.
    Without start structures the starts are random, which only suits small systems.

    Torsions: a molecule at 500 K turns about its single bonds by more than a local
    method reaches from the start (LM's basin is about +-30-45 degrees per torsion).
    Before hop ``torsion_hop`` (0, the default: before the first LM round; 1: only
    targets still open after it) the open targets go through ``torsions`` sweeps over
    the start's rotatable bonds (:func:`structrecon.structures.rotatable_bonds`: found
    from covalent radii, not in rings, largest moving side first): starting from the
    start structure (turning the stuck structure instead recovered 6 of 8 aspirin
    frames against 8 of 8), per bond every turn by a multiple of ``torsion_step``
    degrees within the bond's period (with 0.05 A noise; turns that bring two atoms
    closer than 0.8 A are dropped) gets 8 LM steps, and the target moves to the best
    of them; the hops then start there with ``start_noise``.  Eight steps separate
    right turns from wrong ones (measured on aspirin: right ones fall below
    fingerprint RMSD 1, wrong ones stay above 5), and often finish the target: with
    the sweep first, 8 frames each of ethanol, malonaldehyde, salicylic acid and
    toluene took 1.1-1.7x less time than with the sweep after the first round, and 6
    of aspirin 2.5x less (all recovered either way but one aspirin frame).

    Symmetric starts: around a symmetric molecule (benzene, naphthalene) an invariant
    fingerprint pins each symmetry component of the distortion only up to its phase or
    sign at second order, and LM can stop in a wrong one.  Targets still open after
    the hops go through up to ``symmetry`` sweeps over the partial symmetry images of
    their best structure (:meth:`structrecon.structures.PointGroup.images`: one
    operation of the start's point group applied to one component; 43 images for
    benzene, 7 for naphthalene, none for molecules with a single non-trivial
    component or none).  Each image gets 5 LM steps, the best three a full polish;
    a sweep that improves nothing ends the target's sweeps.  When: with
    ``symmetry_hop=None`` (default), a target whose sweep costs less than an LM round
    (images x 5 < (trials - 3) x steps LM steps: naphthalene's 7 and benzene's 43) is
    swept already before the second round, and every target still open after the hops
    is swept then (20 frames: naphthalene 6.2 -> 4.9 s/frame with 8 steps per image;
    40 benzene frames, 8 -> 5 steps, which moves benzene's sweep before the second
    round: 37/40 -> 40/40 recovered, at about the same cost); an integer h sweeps
    all open targets before round h only (h >= hops: after the hops).

    Targets are done when their fingerprint RMSD is 1e-4 times the problem's ``tol``
    (:func:`lm_polish` ``done_below``; the other trials of the target stop with it).
    """

    trials: int = 6
    start_noise: float = 0.1
    hops: int = 3
    hop_noise: float = 0.2
    steps: int = 100
    patience: int = 25
    jacobian: str = "auto"
    torsions: int = 1
    torsion_step: float = 60.0
    torsion_hop: int = 0
    symmetry: int = 2
    symmetry_hop: int | None = None

    name = "lm"

    def __post_init__(self):
        _positive(self, "trials", "hops", "steps", "patience", "torsion_step")
        if self.start_noise < 0 or self.hop_noise < 0:
            raise StructreconError("lm: start_noise and hop_noise must be >= 0")
        for name in ("torsions", "torsion_hop", "symmetry", "symmetry_hop"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise StructreconError(f"lm: {name} must be >= 0, got {getattr(self, name)}")
        _check_jacobian(self.jacobian)

    def run(self, problem: Problem, generator: torch.Generator) -> Outcome:
        """Invert all targets of ``problem``."""
        t_count, k = problem.n_targets, self.trials
        dtype = problem.targets.dtype
        if problem.starts is not None:
            centre = problem.starts.to(dtype).clone()
        else:
            centre = random_positions(
                problem.numbers, problem.cell, problem.pbc, t_count, generator, dtype
            )
        best_x = centre.clone()
        best_rmsd = torch.full((t_count,), math.inf, dtype=dtype)
        active = torch.ones(t_count, dtype=torch.bool)
        trials = np.zeros(t_count, dtype=int)
        kind = _jacobian_kind(problem, self.jacobian)
        jacobian_dtype = torch.float32 if kind == "analytic" else None
        # a structure 1e-4 * tol from its target is done (LM converges quadratically there,
        # so this costs a step or two), and so are the other trials of that target
        fast_above = None
        if jacobian_dtype is not None:  # trial steps in float32 while 1000x its rounding away
            with torch.no_grad():
                rounding = problem.fn(centre.to(jacobian_dtype)).to(dtype) - problem.fn(centre)
            fast_above = _FAST_FACTOR * float(rounding.square().mean().sqrt())
        polish = functools.partial(
            lm_polish,
            jacobian=kind,
            jacobian_dtype=jacobian_dtype,
            done_below=1e-4 * problem.tol,
            fast_above=fast_above,
        )
        rotors = []
        if self.torsions and problem.starts is not None and problem.cell is None:
            rotors = rotatable_bonds(problem.numbers, problem.starts[0].double().numpy())
        sweep_symmetry = self.symmetry and problem.starts is not None and problem.cell is None
        if self.symmetry_hop is None:  # early for targets whose sweep costs less than a round
            symmetry_hop, early = 1, (k - _SWEEP_KEEP) * self.steps // _SWEEP_STEPS
        else:
            symmetry_hop, early = self.symmetry_hop, None
        for hop in range(self.hops):
            idx = torch.nonzero(active).flatten()
            if idx.numel() == 0:
                break
            sigma = self.start_noise if hop == 0 else self.hop_noise
            if hop == symmetry_hop and sweep_symmetry:
                trials += self._symmetry_sweeps(
                    problem, best_x, best_rmsd, active, polish, max_images=early
                )
                centre = torch.where(active[:, None, None], best_x, centre)
                idx = torch.nonzero(active).flatten()
                if idx.numel() == 0:
                    break
            if hop == self.torsion_hop and rotors:
                centre[idx] = problem.starts[idx].to(dtype)  # the sweep turns the start's bonds
                for _ in range(self.torsions):
                    for rotor in rotors:
                        trials += self._turn(
                            problem, rotor, centre, best_x, best_rmsd, active, generator, polish
                        )
                idx = torch.nonzero(active).flatten()
                if idx.numel() == 0:
                    break
                sigma = self.start_noise
            x = centre[idx].repeat_interleave(k, dim=0)
            noise = sigma * torch.randn(x.shape, generator=generator, dtype=dtype)
            x, rmsd = polish(
                problem,
                x + noise,
                problem.targets[idx].repeat_interleave(k, dim=0),
                steps=self.steps,
                patience=self.patience,
                groups=idx.repeat_interleave(k),
            )
            trials[idx.numpy()] += k
            _take_best(x, rmsd, idx, best_x, best_rmsd, active, problem.tol)
            centre[idx] = best_x[idx]
        if sweep_symmetry and (self.symmetry_hop is None or symmetry_hop >= self.hops):
            trials += self._symmetry_sweeps(problem, best_x, best_rmsd, active, polish)
        return _final(problem, "mse", best_x, trials, [[] for _ in range(t_count)])

    def _symmetry_sweeps(self, problem, best_x, best_rmsd, active, polish, max_images=None):
        """Sweeps over the partial symmetry images of the open targets; trials per target.

        Targets with more than ``max_images`` images are left for a later sweep.
        """
        keep = _SWEEP_KEEP
        spent = np.zeros(len(active), dtype=int)
        groups = {}  # start bytes -> PointGroup
        sweeping = active.clone()
        for _ in range(self.symmetry):
            images, owners = [], []
            for t in torch.nonzero(sweeping).flatten().tolist():
                start = problem.starts[t].double().numpy()
                key = start.tobytes()
                if key not in groups:
                    groups[key] = point_group(problem.numbers, start)
                cand = groups[key].images(best_x[t].double().numpy())
                if len(cand) == 0 or (max_images is not None and len(cand) > max_images):
                    sweeping[t] = False
                    continue
                images.append(torch.as_tensor(cand, dtype=best_x.dtype))
                owners += [t] * len(cand)
            if not images:
                break
            owners = torch.as_tensor(owners)
            x, rmsd = polish(
                problem,
                torch.cat(images),
                problem.targets[owners],
                steps=_SWEEP_STEPS,
                groups=owners,
            )
            rmsd = torch.nan_to_num(rmsd, nan=math.inf)
            idx = torch.unique(owners)
            pick = torch.cat(
                [
                    torch.nonzero(owners == t).flatten()[rmsd[owners == t].argsort()[:keep]]
                    for t in idx
                ]
            )
            np.add.at(spent, owners.numpy(), 1)  # one trial per image
            x, rmsd = polish(
                problem,
                x[pick],
                problem.targets[owners[pick]],
                steps=self.steps,
                patience=self.patience,
                groups=owners[pick],
            )
            before = best_rmsd.clone()
            for t in idx.tolist():  # targets have up to ``keep`` finalists each
                mine = owners[pick] == t
                _take_best(
                    x[mine], rmsd[mine], torch.tensor([t]), best_x, best_rmsd, active, problem.tol
                )
            sweeping &= active & (best_rmsd < before)
        return spent

    def _turn(self, problem, rotor, centre, best_x, best_rmsd, active, generator, polish):
        """One rotor of the torsion sweep for the open targets; trials spent per target."""
        spent = np.zeros(len(active), dtype=int)
        idx = torch.nonzero(active).flatten()
        if idx.numel() == 0:
            return spent
        angles = torch.arange(0.0, rotor.period - 1e-6, self.torsion_step, dtype=centre.dtype)
        m, a = idx.numel(), len(angles)
        x = rotate_about_bond(centre[idx].repeat_interleave(a, dim=0), rotor, angles.repeat(m))
        x = x + 0.05 * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        dist = torch.cdist(x, x) + 10.0 * torch.eye(x.shape[1], dtype=x.dtype)
        fine = dist.amin(dim=(1, 2)) >= 0.8  # turns that clash are dropped unpolished
        rmsd = torch.full((x.shape[0],), math.inf, dtype=x.dtype)
        if fine.any():
            x = x.clone()
            x[fine], rmsd[fine] = polish(
                problem,
                x[fine],
                problem.targets[idx].repeat_interleave(a, dim=0)[fine],
                steps=8,
                groups=idx.repeat_interleave(a)[fine],
            )
        spent[idx.numpy()] = a
        cand, cand_rmsd = _take_best(x, rmsd, idx, best_x, best_rmsd, active, problem.tol)
        found = torch.isfinite(cand_rmsd)
        centre[idx] = torch.where(found[:, None, None], cand, centre[idx])
        return spent


@torch.no_grad()
def _take_best(x, rmsd, idx, best_x, best_rmsd, active, tol):
    """Best of each open target's candidates, kept where it beats the target's best so far.

    x [M C, N, 3] and rmsd [M C]: C candidates for each target of idx [M], in order.
    Updates best_x, best_rmsd and active (targets under ``tol`` are done) in place and
    returns the candidates [M, N, 3] and their RMSD [M] (inf where none is finite).
    """
    m = idx.numel()
    rmsd = torch.nan_to_num(rmsd, nan=math.inf).reshape(m, -1)
    cand_rmsd, which = rmsd.min(dim=1)
    cand = x.reshape(m, rmsd.shape[1], *x.shape[1:])[torch.arange(m), which]
    improve = cand_rmsd < best_rmsd[idx]
    best_rmsd[idx] = torch.where(improve, cand_rmsd, best_rmsd[idx])
    best_x[idx] = torch.where(improve[:, None, None], cand, best_x[idx])
    active[idx[best_rmsd[idx] < tol]] = False
    return cand, cand_rmsd


def _positive(obj, *names):
    for name in names:
        if not getattr(obj, name) > 0:
            raise StructreconError(f"{obj.name}: {name} must be positive, got {getattr(obj, name)}")


#: method name -> strategy class
STRATEGIES = {cls.name: cls for cls in (AdamHops, NoisyGD, LBFGS, LocalLM, MiladReconstruction)}


def get_strategy(method: str, **options):
    """Build the strategy ``method`` with ``options``; unknown names/options are errors."""
    if method not in STRATEGIES:
        raise StructreconError(f"unknown method '{method}'; valid: {', '.join(sorted(STRATEGIES))}")
    cls = STRATEGIES[method]
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise StructreconError(
            f"method '{method}' has no option(s) {', '.join(unknown)}; "
            f"valid: {', '.join(sorted(valid))}"
        )
    return cls(**options)
