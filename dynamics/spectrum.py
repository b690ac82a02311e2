"""H_z = diag(p) − p pᵀ at vocabulary scale (V up to ~10⁶) without ever forming the V × V matrix.

theory.md §1 facts, made computable at scale [ours]:

- Matrix–vector product in O(V): H_z x = p ⊙ x − p (pᵀx).
- Secular equation. If H_z v = λ v then (p_i − λ) v_i = p_i (pᵀv). For λ not equal to any p_i (and pᵀv ≠ 0),
  v_i ∝ p_i / (p_i − λ) and multiplying by p_i and summing gives the secular equation

      f(λ) = 1 − Σ_i p_i² / (p_i − λ) = 0,

  f strictly decreasing between consecutive poles, from +∞ to −∞: one root in each interval (u_l, u_{l+1}) of
  consecutive distinct positive values of p (interlacing). Since Σ p = 1, f(0) = 0: the null mode λ = 0,
  v = 𝟙/√V (H_z 𝟙 = 0) is the root below the smallest pole.
- The equation actually solved. With Σ p = 1, f(λ) = Σp_i − Σ p_i²/(p_i − λ) = −λ F(λ) with

      F(λ) = Σ_i p_i / (p_i − λ) = 𝟙ᵀu(λ),   u_i(λ) = p_i / (p_i − λ),

  so the nonzero eigenvalues are the roots of F: exactly the condition that the eigenvector u be orthogonal to
  the null mode 𝟙. F has the same poles and interlacing (increasing from −∞ to +∞ between poles) but no
  constant term: f's "1 − Σ" cancels catastrophically when one p_i ≈ 1 and λ ≪ eps (e.g. p = (1 − δ, δ),
  λ = 2δ(1 − δ) with δ = 1e-29: f cannot resolve λ, F does), and solving F keeps the computed eigenvectors
  orthogonal to 𝟙 to rounding. The null mode is taken as exact (λ = 0, 𝟙/√V); for p summing to 1 only up to
  rounding its residual is ‖p‖·|1 − Σp|.
- Deflation. A value u repeated m times gives the eigenvalue u exactly, m − 1 times, with eigenvectors spanning
  {v supported on those coordinates, Σ v_i = 0} (returned as an orthonormal Helmert basis); the group acts as a
  single pole of weight m u² in f. Entries p_i ≤ TINY (1e-150, where p_i² would underflow) are treated as exact
  zeros (a perturbation of H_z of norm ≤ TINY): zeros give m extra null vectors orthogonal to 𝟙.
- Roots are found in O(V) per secular evaluation by a bracketed, vectorised rational-interpolation iteration
  (the "middle way" of Li 1994 / LAPACK dlaed4: ψ and φ, the parts of the sum from poles below and above λ, are
  each modelled by one pole matched in value and slope), with bisection as safeguard. λ is stored as
  origin + τ with origin the pole nearest to the root, and d_i − λ = (p_i − origin) − τ: the differences that
  the eigenvector needs are then free of cancellation.

Conventions: `top_modes` returns eigenvalues in DESCENDING order and eigenvectors as columns (V, k);
`full_spectrum` follows numpy's `eigh` (ascending, columns (V, V)).
"""

from __future__ import annotations

import numpy as np

from dynamics._validate import as_float_array, as_probs

TINY = 1e-150
"""Entries of p at or below this are deflated as exact zeros (their square would underflow)."""

_CHUNK_ELEMENTS = 1 << 19
"""Roots are solved in row-chunks of about this many (root, coordinate) pairs: bounds the working memory."""

_MAX_ITER = 100
_EPS = np.finfo(np.float64).eps


def hz_matvec(p: np.ndarray, x: np.ndarray) -> np.ndarray:
    """H_z x = p ⊙ x − p (pᵀ x) in O(V) (theory.md §1); p (V,), x (V,) or (V, m) -> same shape as x."""
    p = as_probs(p)
    x = as_float_array(x, "x")
    if x.ndim not in (1, 2) or x.shape[0] != p.shape[0]:
        raise ValueError(f"x: expected shape ({p.shape[0]},) or ({p.shape[0]}, m), got {x.shape}")
    if x.ndim == 1:
        return p * x - p * float(p @ x)
    return p[:, None] * x - np.outer(p, p @ x)


def secular_function(p: np.ndarray, lam: np.ndarray | float) -> np.ndarray:
    """f(λ) = 1 − Σ_i p_i² / (p_i − λ) [ours]; p (V,), λ (...) -> (...). Roots are the nonzero eigenvalues."""
    p = as_probs(p)
    lam_arr = np.asarray(lam, dtype=np.float64)
    flat = lam_arr.reshape(-1)
    out = np.array([1.0 - np.sum(p * p / (p - value)) for value in flat])
    return out.reshape(lam_arr.shape)


def _solve_chunk(
    p: np.ndarray, lower: np.ndarray, upper: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # p: (V,) shared by the r rows, or (r, V) one per row
    """Roots of F in (lower_r, upper_r) for r rows; returns (origin (r,), τ (r,), diff (r, V) = p − origin − τ).

    lower < upper are consecutive distinct pole values. The root is origin + τ with origin the nearer pole.
    The iteration solves −F(λ) = −Σ p_i/(p_i − λ) = 0 (see the module docstring), modelled as
    c − s/(d_lo − λ) − S/(d_hi − λ) with s, S, c matching −F and its slope at the current iterate.
    """
    rows_p = p if p.ndim == 2 else p[None, :]  # (r, V) per-row poles, or one p shared by all rows
    mid = 0.5 * (lower + upper)
    f_mid = -np.sum(rows_p / (rows_p - mid[:, None]), axis=1)
    # f decreasing: f(mid) > 0 means the root is above mid, closer to the upper pole.
    use_upper = f_mid > 0.0
    origin = np.where(use_upper, upper, lower)
    d_lo = np.where(use_upper, lower - upper, 0.0)  # lower pole − origin (exact: Sterbenz)
    d_hi = np.where(use_upper, 0.0, upper - lower)  # upper pole − origin
    half = np.where(use_upper, mid - upper, mid - lower)
    # Bracket for τ (open at the pole end).
    a = np.where(use_upper, half, 0.0)
    b = np.where(use_upper, 0.0, half)
    shifted = rows_p - origin[:, None]  # (r, V): d_i − origin
    x = 0.5 * (a + b)
    active = np.ones(lower.shape[0], dtype=bool)
    for _ in range(_MAX_ITER):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        xr = x[rows]
        delta = shifted[rows] - xr[:, None]  # d_i − λ
        ratio = (rows_p[rows] if p.ndim == 2 else rows_p) / delta
        below = delta < 0.0
        psi = np.where(below, ratio, 0.0).sum(axis=1)
        phi = ratio.sum(axis=1) - psi
        ratio /= delta
        dpsi = np.where(below, ratio, 0.0).sum(axis=1)
        dphi = ratio.sum(axis=1) - dpsi
        del delta, ratio, below
        f = -(psi + phi)  # −F(λ), decreasing between the poles like f
        # Bracket update: f > 0 -> root above x.
        a_r = np.where(f > 0.0, xr, a[rows])
        b_r = np.where(f < 0.0, xr, b[rows])
        delta1 = d_lo[rows] - xr
        delta2 = d_hi[rows] - xr
        s_lo = dpsi * delta1 * delta1
        s_hi = dphi * delta2 * delta2
        c = -(psi - s_lo / delta1) - (phi - s_hi / delta2)
        qa = c
        qb = c * (delta1 + delta2) - s_lo - s_hi
        qc = f * delta1 * delta2
        disc = np.sqrt(np.maximum(qb * qb - 4.0 * qa * qc, 0.0))
        q = 0.5 * (qb + np.copysign(disc, qb))
        with np.errstate(divide="ignore", invalid="ignore"):
            eta1 = q / qa
            eta2 = qc / q
        new1 = xr + eta1
        new2 = xr + eta2
        ok1 = np.isfinite(new1) & (new1 > a_r) & (new1 < b_r)
        ok2 = np.isfinite(new2) & (new2 > a_r) & (new2 < b_r)
        bisect = 0.5 * (a_r + b_r)
        new = np.where(ok2, new2, np.where(ok1, new1, bisect))
        step = np.abs(new - xr)
        done = (f == 0.0) | (step <= 4.0 * _EPS * np.abs(new)) | (b_r - a_r <= 4.0 * _EPS * np.abs(bisect))
        x[rows] = np.where(f == 0.0, xr, new)
        a[rows] = a_r
        b[rows] = b_r
        active[rows[done]] = False
    diff = shifted
    diff -= x[:, None]
    return origin, x, diff


def _chunk_pairs(
    p: np.ndarray, lower: np.ndarray, upper: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:  # p: (V,) shared by the r rows, or (r, V) one per row
    """Eigenpairs for the roots in (lower_r, upper_r) of one chunk: λ (r,), unit eigenvectors as rows (r, V)."""
    origin, tau, diff = _solve_chunk(p, lower, upper)  # diff = p − λ, computed as (p − origin) − τ
    np.divide(p if p.ndim == 2 else p[None, :], diff, out=diff)  # u_i = p_i / (p_i − λ)
    diff /= np.linalg.norm(diff, axis=1, keepdims=True)
    return origin + tau, diff


def _interval_pairs(p: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs for the roots in (lower_r, upper_r): λ (r,), unit eigenvectors as rows (r, V); O(rV)."""
    num = lower.shape[0]
    vectors = np.empty((num, p.shape[0]))
    values = np.empty(num)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // p.shape[0])
    for start in range(0, num, rows_per_chunk):
        stop = min(num, start + rows_per_chunk)
        values[start:stop], vectors[start:stop] = _chunk_pairs(p, lower[start:stop], upper[start:stop])
    return values, vectors


def _helmert_rows(indices: np.ndarray, count: int, size: int) -> np.ndarray:
    """The first `count` Helmert vectors on `indices` (orthonormal, each summing to 0), as rows (count, size)."""
    out = np.zeros((count, size))
    for r in range(1, count + 1):
        scale = 1.0 / np.sqrt(r * (r + 1.0))
        out[r - 1, indices[:r]] = scale
        out[r - 1, indices[r]] = -r * scale
    return out


def _check_k(k: object, size: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= size:
        raise ValueError(f"k: expected an int in [1, {size}], got {k!r}")
    return int(k)


def _null_rows(p: np.ndarray, zero_idx: np.ndarray, count: int) -> np.ndarray:
    """The first `count` of an orthonormal basis of ker H_z (rows): 𝟙/√V, then, when some p_i = 0 (m of them,
    n = V − m positive), (n·𝟙_zero − m·𝟙_positive)/√(nmV) and the Helmert vectors on the zero coordinates."""
    size = p.shape[0]
    num_zero = zero_idx.shape[0]
    rows = [np.full((1, size), 1.0 / np.sqrt(size))]
    if num_zero > 0 and num_zero < size:
        rest = size - num_zero
        extra = np.full((1, size), -num_zero / np.sqrt(rest * num_zero * size))
        extra[0, zero_idx] = rest / np.sqrt(rest * num_zero * size)
        rows.append(extra)
    if num_zero > 1:
        rows.append(_helmert_rows(zero_idx, min(num_zero - 1, max(0, count - len(rows))), size))
    return np.concatenate(rows, axis=0)[:count]


def full_spectrum(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All V eigenpairs of H_z = diag(p) − ppᵀ in O(V²) time, no matrix formed [ours]; like numpy `eigh`.

    p (V,) probabilities -> (λ (V,) ascending, vectors (V, V) orthonormal columns). Structure (module docstring):
    null mode (0, 𝟙/√V); extra null vectors on the zero (≤ TINY) entries; each positive value u of multiplicity
    m gives (u, Helmert vectors) m − 1 times; one secular root in each interval of consecutive distinct values.
    """
    p = as_probs(p)
    size = p.shape[0]
    p = np.where(p <= TINY, 0.0, p)
    order = np.argsort(p, kind="stable")
    sorted_p = p[order]
    num_zero = int(np.count_nonzero(sorted_p == 0.0))
    values_parts: list[np.ndarray] = [np.zeros(1 + num_zero)]
    rows_parts: list[np.ndarray] = [_null_rows(p, order[:num_zero], 1 + num_zero)]
    positive = sorted_p[num_zero:]
    uniq, first, counts = np.unique(positive, return_index=True, return_counts=True)
    root_values, root_rows = _interval_pairs(p, uniq[:-1], uniq[1:])
    for level in range(uniq.shape[0]):
        if level > 0:
            values_parts.append(root_values[level - 1 : level])
            rows_parts.append(root_rows[level - 1 : level])
        if counts[level] > 1:
            idx = order[num_zero + first[level] : num_zero + first[level] + counts[level]]
            values_parts.append(np.full(counts[level] - 1, uniq[level]))
            rows_parts.append(_helmert_rows(idx, counts[level] - 1, size))
    values = np.concatenate(values_parts)
    vectors = np.concatenate(rows_parts, axis=0).T
    return values, vectors


def top_modes(p: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest eigenpairs of H_z = diag(p) − ppᵀ in O(kV) time and memory [ours].

    p (V,), k in [1, V] -> (λ (k,) DESCENDING, vectors (V, k) orthonormal columns). Uses the k + 1 largest
    entries of p (argpartition, O(V)) and their multiplicities (O(kV)); each top root lies between two of them
    (interlacing). Entries ≤ TINY are exact zeros; past the smallest positive value the remaining modes are
    the null space (`_null_rows`). Falls back to `full_spectrum` when 4(k + 1) ≥ V.
    """
    p = as_probs(p)
    size = p.shape[0]
    k = _check_k(k, size)
    if 4 * (k + 1) >= size:
        values, vectors = full_spectrum(p)
        return values[::-1][:k].copy(), vectors[:, ::-1][:, :k].copy()
    p = np.where(p <= TINY, 0.0, p)  # deflated as exact zeros, as in full_spectrum
    top_idx = np.argpartition(p, size - (k + 1))[size - (k + 1) :]
    cand = np.unique(p[top_idx])[::-1]  # distinct candidate values, descending
    plan: list[tuple[str, float, float | np.ndarray, int]] = []  # (kind, value, lower or indices, count)
    found = 0
    seen = 0
    for pos, value in enumerate(cand):
        if found >= k or value == 0.0:
            break
        members = np.flatnonzero(p == value)
        seen += members.size
        take = min(members.size - 1, k - found)
        if take > 0:
            plan.append(("group", float(value), members, take))
            found += take
        if found >= k:
            break
        if pos + 1 < cand.shape[0] and cand[pos + 1] > 0.0:
            plan.append(("root", float(value), float(cand[pos + 1]), 1))
            found += 1
        elif pos + 1 < cand.shape[0] or seen == np.count_nonzero(p):
            break  # no positive value below: the rest of the spectrum is the null space
        else:  # pragma: no cover - excluded by the counting argument in the docstring
            raise RuntimeError("top_modes: candidate set too small; please report")
    if found < k:
        plan.append(("null", 0.0, 0.0, k - found))
    roots = [item for item in plan if item[0] == "root"]
    if roots:
        lower = np.array([item[2] for item in roots])
        upper = np.array([item[1] for item in roots])
        root_values, root_rows = _interval_pairs(p, lower, upper)
    values = np.empty(k)
    vectors = np.empty((size, k))
    col = 0
    next_root = 0
    for kind, value, extra, count in plan:
        if kind == "group":
            values[col : col + count] = value
            vectors[:, col : col + count] = _helmert_rows(extra, count, size).T
        elif kind == "root":
            values[col] = root_values[next_root]
            vectors[:, col] = root_rows[next_root]
            next_root += 1
        else:
            values[col : col + count] = 0.0
            vectors[:, col : col + count] = _null_rows(p, np.flatnonzero(p == 0.0), count).T
        col += count
    return values, vectors


def top_mode_batched(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The top eigenpair of H_z for each of N distributions at once [ours]; probs (N, V) -> (λ (N,), v (N, V)).

    Rows whose two largest entries are distinct are solved together (the root in (p_(2), p_(1)), chunked to
    bound memory); rows with a tied maximum (a degenerate top eigenvalue) use `top_modes(row, 1)`.
    O(N·V) time and O(chunk·V) working memory beyond the (N, V) output.
    """
    probs = as_float_array(probs, "probs", ndim=2)
    num, size = probs.shape
    if size < 2 or np.any(probs < -1e-6) or np.any(np.abs(probs.sum(axis=1) - 1.0) > 1e-6):
        raise ValueError(
            f"probs: expected rows of probabilities (nonnegative, summing to 1), got shape {probs.shape}"
        )
    probs = np.where(probs <= TINY, 0.0, probs)
    top_two = -np.partition(-probs, 1, axis=1)[:, :2]
    values = np.empty(num)
    vectors = np.empty((num, size))
    simple = np.flatnonzero(top_two[:, 0] > top_two[:, 1])
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // size)
    for start in range(0, simple.size, rows_per_chunk):
        rows = simple[start : start + rows_per_chunk]
        values[rows], vectors[rows] = _chunk_pairs(probs[rows], top_two[rows, 1], top_two[rows, 0])
    for row in np.setdiff1d(np.arange(num), simple):
        row_values, row_vectors = top_modes(probs[row] / probs[row].sum(), 1)
        values[row] = row_values[0]
        vectors[row] = row_vectors[:, 0]
    return values, vectors


def top_mode_share(p: np.ndarray, g: np.ndarray, k: int) -> float:
    """Share of ‖g‖² carried by the k top-curvature modes, Σ_{j≤k} (v_jᵀg)² / ‖g‖² ∈ [0, 1] [ours]; 0 if g = 0."""
    p = as_probs(p)
    g = as_float_array(g, "g", ndim=1, size=p.shape[0])
    total = float(g @ g)
    if total == 0.0:
        return 0.0
    _, vectors = top_modes(p, k)
    coeffs = vectors.T @ g
    return float(coeffs @ coeffs) / total


def zipf_probs(size: int, exponent: float = 1.1, seed: int = 0) -> np.ndarray:
    """A peaked, Zipf-like test distribution: p ∝ rank^(−exponent), ranks randomly permuted; -> (size,)."""
    ranks = np.random.default_rng(seed).permutation(size) + 1.0
    p = ranks ** (-float(exponent))
    return p / p.sum()


def near_flat_probs(size: int, scale: float = 0.01, seed: int = 0) -> np.ndarray:
    """A flat test distribution: p = softmax(scale · N(0, 1)) (distinct entries within ~±3·scale of 1/V)."""
    z = float(scale) * np.random.default_rng(seed).standard_normal(size)
    p = np.exp(z - z.max())
    return p / p.sum()
