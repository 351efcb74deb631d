"""Generate the independent set of MILAD rotation invariants and ship it as a data file.

Uhrin, *Through the eyes of a descriptor*, section II:

1. candidates from Clebsch-Gordan coupling of Zernike moments up to correlation order
   nu = 4 (eqs. 19-22): nu = 1 c_n0; nu = 2 c_n(l, l)_0 (one order n, eq. 20);
   nu = 3 c_n1(l1, l2)_j c_n2 (eq. 21); nu = 4 c_n1(l1, l2)_j c_n2(l3, l4)_j (eq. 22).
   Left out while generating: couplings that contain a factor l = 0 or j = 0 (direct
   products of lower invariants), l1 = l2 with odd j (vanish identically), nu = 3
   couplings with l1 + l2 + j odd (pseudoscalars: purely imaginary for a real density)
   and nu = 4 couplings whose two forms have different parity; then invariants that
   vanish or repeat another one up to a factor (same polynomial) are dropped.
2. linear independence (section II C 1): an invariant of degree nu is linearly dependent
   if it lies in the span of the other candidates of degree nu and the products of lower
   degree candidates (numerical rank on random moments).
3. algebraic independence (section II C 2, Kostkova et al.): candidates in order of the
   maximum order n they contain, then correlation order, then number of terms; one at a
   time, kept if the rank of the Jacobian d(invariants)/d(moments) at generic random
   moments goes up (maximum over a few points).  Ordering by n first makes every prefix
   up to some n_max an independent set for that n_max.

Table I of the paper counts invariants of moments with n >= 2 (translation removed,
c_00 fixed); the shipped set of 117 invariants up to n = 7 also uses c_00 and the
first-order moments c_1 (its n >= 2 part is the Table I set; candidates containing n < 2
moments come last within each order, so only four of them are needed).

    OMP_NUM_THREADS=1 python scripts/generate_milad_invariants.py [--no-linear]

Writes src/structrecon/data/milad_invariants_n7.json.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from structrecon.descriptors._zernike import invariant_polynomial, zernike_indices

N_MAX = 7
OUT = Path(__file__).resolve().parents[1] / "src/structrecon/data/milad_invariants_n7.json"

#: Uhrin, Table I (n >= 2 moments): n_max -> (all, linearly indep., algebraically indep.)
PAPER_TABLE_I = {
    2: (4, 3, 3),
    3: (16, 13, 13),
    4: (49, 37, 28),
    5: (123, 100, 49),
    6: (280, 228, 77),
    7: (573, 486, 113),
}
RANK_TOL = 1e-7  # relative residual for "the rank went up" (the gap is printed)


def _ls(n):
    return range(n % 2, n + 1, 2)


def candidate_labels(n_max: int, n_min: int = 0) -> list[tuple[int, ...]]:
    """Invariant labels of eqs. 19-22 (see the module docstring for what is left out)."""
    orders = range(n_min, n_max + 1)
    out = [(1, n) for n in orders if n % 2 == 0]
    out += [(2, n, ell) for n in orders for ell in _ls(n) if ell >= 1]
    seen = set()
    for n1 in orders:
        for l1 in _ls(n1):
            for l2 in _ls(n1):
                if not 1 <= l2 <= l1:
                    continue
                for j in range(max(l1 - l2, 1), l1 + l2 + 1):
                    if (l1 + l2 + j) % 2:
                        continue
                    for n2 in orders:
                        if j > n2 or (n2 - j) % 2:
                            continue
                        # one 3j coupling per multiset of three tensors: same invariant
                        key = tuple(sorted([(n1, l1), (n1, l2), (n2, j)]))
                        if key not in seen:
                            seen.add(key)
                            out.append((3, n1, l1, l2, j, n2))
    pairs = [(n, l1, l2) for n in orders for l1 in _ls(n) for l2 in _ls(n) if 1 <= l2 <= l1]
    for a, b in itertools.product(pairs, pairs):
        if b > a:
            continue
        (n1, l1, l2), (n2, l3, l4) = a, b
        for j in range(max(l1 - l2, l3 - l4, 1), min(l1 + l2, l3 + l4) + 1):
            if (l1 + l2 + j) % 2 != (l3 + l4 + j) % 2:
                continue
            if (l1 == l2 or l3 == l4) and j % 2:
                continue
            out.append((4, n1, l1, l2, j, n2, l3, l4))
    return out


class Candidate:
    """One invariant: label, polynomial as index/coefficient arrays, metadata."""

    def __init__(self, label, poly, position):
        self.label = tuple(int(v) for v in label)
        self.nu = label[0]
        keys = sorted(poly)
        self.keys = keys
        self.index = np.array([[position[x] for x in key] for key in keys])  # [T, nu]
        self.coef = np.array([poly[key] for key in keys])
        self.n_terms = len(keys)
        self.max_order = max(x[0] for key in keys for x in key)
        self.low_order = any(x[0] < 2 for key in keys for x in key)

    def signature(self):
        """Polynomial up to a factor (to find repeats)."""
        scale = self.coef[np.argmax(np.abs(self.coef))]
        return tuple(self.keys), tuple(np.round(self.coef / scale, 9))

    def values(self, c):
        """Invariant at moments c [S, K] complex -> [S] (real part)."""
        return (np.prod(c[:, self.index], axis=2) @ self.coef).real

    def gradient(self, c):
        """Partials d I / d c_alpha (holomorphic) at one point c [K] -> [K] complex."""
        g = np.zeros(c.shape[-1], dtype=complex)
        factors = c[self.index]  # [T, nu]
        for p in range(self.nu):
            others = np.prod(np.delete(factors, p, axis=1), axis=1) if self.nu > 1 else 1.0
            np.add.at(g, self.index[:, p], self.coef * others)
        return g


def build_candidates(n_max, n_min):
    """Candidates with their polynomials; vanishing ones and repeats dropped."""
    position = {x: k for k, x in enumerate(zernike_indices(n_max))}
    out, seen = [], set()
    for label in candidate_labels(n_max, n_min):
        poly = invariant_polynomial(label)
        if not poly:
            continue  # vanishes identically
        cand = Candidate(label, poly, position)
        sig = cand.signature()
        if sig in seen:
            continue  # the same polynomial up to a factor
        seen.add(sig)
        out.append(cand)
    return out


def random_moments(n_max, n_samples, rng):
    """Generic moments of real densities: [S, K] complex with c^-m = (-1)^m conj(c^m)."""
    idx = zernike_indices(n_max)
    pos = {x: k for k, x in enumerate(idx)}
    c = np.zeros((n_samples, len(idx)), dtype=complex)
    for (n, ell, m), k in pos.items():
        if m == 0:
            c[:, k] = rng.normal(size=n_samples)
        elif m > 0:
            c[:, k] = rng.normal(size=n_samples) + 1j * rng.normal(size=n_samples)
    for (n, ell, m), k in pos.items():
        if m < 0:
            c[:, k] = (-1) ** m * np.conj(c[:, pos[(n, ell, -m)]])
    return c


def real_jacobian_row(grad, n_max):
    """Holomorphic partials [K] -> derivative w.r.t. the real coordinates of the moments.

    Coordinates: Re c^0; and for m > 0, Re c^m and Im c^m (c^-m follows from them).
    """
    idx = zernike_indices(n_max)
    pos = {x: k for k, x in enumerate(idx)}
    row = np.zeros(len(idx))
    for (n, ell, m), k in pos.items():
        if m == 0:
            row[k] = grad[k].real
        elif m > 0:
            km = pos[(n, ell, -m)]
            sign = (-1) ** m
            row[k] = (grad[k] + sign * grad[km]).real  # d/d Re c^m
            row[km] = (1j * grad[k] - 1j * sign * grad[km]).real  # d/d Im c^m
    return row


def selection_key(cand):
    """Order of the greedy selection: largest n, n < 2 moments last, nu, number of terms."""
    return (cand.max_order, cand.low_order, cand.nu, cand.n_terms, cand.label)


def select_independent(cands, n_max, rng, n_points=3):
    """Greedy Jacobian-rank selection (section II C 2); returns (kept, gap)."""
    points = random_moments(n_max, n_points, rng)
    bases = [np.zeros((0, points.shape[1])) for _ in range(n_points)]
    kept = []
    smallest_kept, largest_dropped = np.inf, 0.0
    for cand in sorted(cands, key=selection_key):
        rows, residuals = [], []
        for p in range(n_points):
            v = real_jacobian_row(cand.gradient(points[p]), n_max)
            v = v / np.linalg.norm(v)
            r = v - bases[p].T @ (bases[p] @ v)
            r = r - bases[p].T @ (bases[p] @ r)
            rows.append(r)
            residuals.append(np.linalg.norm(r))
        best = max(residuals)
        if best > RANK_TOL:
            kept.append(cand)
            smallest_kept = min(smallest_kept, best)
            for p in range(n_points):
                if residuals[p] > RANK_TOL:
                    bases[p] = np.vstack([bases[p], rows[p] / residuals[p]])
        else:
            largest_dropped = max(largest_dropped, best)
    return kept, (smallest_kept, largest_dropped)


def _rank(matrix, tol=1e-9):
    if matrix.shape[1] == 0:
        return 0
    matrix = matrix / np.linalg.norm(matrix, axis=0)
    s = np.linalg.svd(matrix, compute_uv=False)
    return int((s > tol * s[0]).sum())


def linear_counts(cands, n_max, rng):
    """Linearly independent candidates per degree.

    New dimensions beyond the products of lower-degree candidates (numerical rank on
    random moments).
    """
    by_degree = collections.defaultdict(list)
    for cand in cands:
        by_degree[cand.nu].append(cand)
    n_cols = max(len(v) for v in by_degree.values())
    samples = 2 * (n_cols + 1200)
    c = random_moments(n_max, samples, rng)
    values = {
        d: np.stack([cand.values(c) for cand in by_degree[d]], 1)
        if by_degree[d]
        else np.zeros((samples, 0))
        for d in range(1, 5)
    }
    counts = {}
    for d in range(1, 5):
        products = []
        for k in range(2, d + 1):
            for degrees in itertools.combinations_with_replacement(range(1, d), k):
                if sum(degrees) != d:
                    continue
                for combo in itertools.product(*(range(values[g].shape[1]) for g in degrees)):
                    if any(
                        degrees[i] == degrees[i + 1] and combo[i] > combo[i + 1]
                        for i in range(len(degrees) - 1)
                    ):
                        continue
                    v = np.ones(samples)
                    for g, col in zip(degrees, combo):
                        v = v * values[g][:, col]
                    products.append(v)
        products = np.stack(products, 1) if products else np.zeros((samples, 0))
        base = _rank(products)
        counts[d] = _rank(np.concatenate([products, values[d]], 1)) - base
    return counts


def table_i(rng, linear=True):
    """Counts for n >= 2 moments per n_max (Table I); returns the selected sets."""
    print("Table I (moments with n >= 2); per nu = 1, 2, 3, 4 in brackets")
    header = f"{'n_max':>5} | {'all':>18} | {'linearly indep.':>22} | {'algebraically indep.':>22}"
    print(header)
    selected = {}
    rows = {}
    for n_max in range(2, N_MAX + 1):
        t0 = time.perf_counter()
        cands = build_candidates(n_max, n_min=2)
        per_nu = collections.Counter(c.nu for c in cands)
        kept, gap = select_independent(cands, n_max, rng)
        alg_nu = collections.Counter(c.nu for c in kept)
        lin = linear_counts(cands, n_max, rng) if linear else None
        paper = PAPER_TABLE_I[n_max]
        fmt = lambda cnt: f"{sum(cnt.values())} {[cnt.get(d, 0) for d in range(1, 5)]}"  # noqa: E731
        lin_txt = fmt(lin) if lin else "-"
        print(
            f"{n_max:>5} | {fmt(per_nu):>18} | {lin_txt:>22} | {fmt(alg_nu):>22}"
            f"   paper {paper}   ({time.perf_counter() - t0:.0f} s, rank gap "
            f"{gap[0]:.1e} kept vs {gap[1]:.1e} dropped)",
            flush=True,
        )
        selected[n_max] = kept
        rows[n_max] = {
            "all": sum(per_nu.values()),
            "linear": sum(lin.values()) if lin else None,
            "algebraic": len(kept),
        }
    return selected, rows


def main():
    """Print Table I, select the 117 invariants and write the data file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-linear", action="store_true", help="skip the linear counts")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    selected, rows = table_i(rng, linear=not args.no_linear)
    for n_max, row in rows.items():
        assert row["algebraic"] == PAPER_TABLE_I[n_max][2], (n_max, row)
    print("algebraically independent counts agree with Table I for n_max = 2..7")
    for n_max, row in rows.items():
        paper = PAPER_TABLE_I[n_max]
        if row["all"] != paper[0] or (row["linear"] is not None and row["linear"] != paper[1]):
            print(
                f"  n_max={n_max}: all/linear {row['all']}/{row['linear']} differ from the "
                f"paper's {paper[0]}/{paper[1]} (these depend on which couplings are "
                "enumerated, which the paper does not spell out)"
            )

    # the shipped set: moments from n = 0 (c_00, c_1 as well)
    cands = build_candidates(N_MAX, n_min=0)
    kept, gap = select_independent(cands, N_MAX, rng)
    n_dof = len(zernike_indices(N_MAX)) - 3
    print(
        f"n_max = {N_MAX} with n = 0, 1 moments: {len(cands)} candidates -> {len(kept)} "
        f"algebraically independent (moments - 3 rotations = {n_dof}); rank gap "
        f"{gap[0]:.1e} vs {gap[1]:.1e}"
    )
    assert len(kept) == n_dof == 117
    table_labels = {c.label for c in selected[N_MAX]}
    high = {c.label for c in kept if not c.low_order}
    assert high == table_labels, "the n >= 2 part differs from the Table I selection"
    print(
        "per nu:",
        dict(sorted(collections.Counter(c.nu for c in kept).items())),
        "; with n < 2 moments:",
        [c.label for c in kept if c.low_order],
    )

    moments = [list(x) for x in zernike_indices(N_MAX)]
    data = {
        "description": (
            "Algebraically independent rotation invariants of 3D Zernike moments up to "
            "n = 7 (Uhrin, Through the eyes of a descriptor, section II), generated by "
            "scripts/generate_milad_invariants.py. Each invariant is a polynomial in the "
            "moments: sum over terms of coefficient * product of moments[index]."
        ),
        "n_max": N_MAX,
        "moments": moments,
        "label_format": {
            "1": "(1, n): c_n0",
            "2": "(2, n, l): c_n(l,l)_0",
            "3": "(3, n1, l1, l2, j, n2): c_n1(l1,l2)_j c_n2",
            "4": "(4, n1, l1, l2, j, n2, l3, l4): c_n1(l1,l2)_j c_n2(l3,l4)_j",
        },
        "table_i": {str(k): v for k, v in rows.items()},
        "invariants": [
            {
                "label": list(c.label),
                "max_order": int(c.max_order),
                "terms": [
                    [float(coef), [int(i) for i in idx]] for coef, idx in zip(c.coef, c.index)
                ],
            }
            for c in kept
        ],
    }
    args.out.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB, {len(kept)} invariants)")


if __name__ == "__main__":
    main()
