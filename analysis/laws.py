"""Test-time scaling laws fitted to the records, checked by forecasts, and the compute-optimal
frontier between methods (SPEC §7).

For each configuration (label, dataset, model; `analysis.records`) this module fits:

- **Sampling methods** (BoN, SC: a method with `samples`), from each problem's N recorded
  samples (`sample_correct`):
  - `coverage_power`: pass@k, the unbiased per-problem estimator 1 - C(N-c, k) / C(N, k)
    (Chen et al. 2021) averaged over problems, k = 1..N, fitted as -log(pass@k) = a * k^-b
    (Brown et al. 2024) by least squares on log(-log pass@k) against log k, on the k where
    0 < pass@k < 1.
  - `coverage_beta`: the distributional estimator (Schaeffer et al. 2025): per-problem success
    rates p ~ Beta(alpha, beta), fitted by maximum likelihood to the per-problem counts
    (c of N correct: a beta-binomial likelihood), predicting pass@k = 1 - E[(1-p)^k]
    = 1 - B(alpha, beta + k) / B(alpha, beta). A heavy left tail (alpha < 1) gives the
    aggregate power law: 1 - pass@k ~ k^-alpha for large k.
  - `accuracy_n`: the method's own answer from the first n samples (best-of-n, majority of n;
    `analysis.curves.sample_steps`) against n, in the saturating form below.
- **Iterative methods** (LatentSeek, SE: a method with `iterations`): `accuracy_k`, the answer
  after k steps (`analysis.curves.latent_steps`, `return_best`'s rule where the run used it)
  against k = 0..K.
- **Every method** with more than one budget: `accuracy_compute`, the same accuracy against
  tokens per problem (solver + verifier, prompt + generated; `analysis.curves`' estimates).

The saturating form of accuracy against a budget x (k, n or tokens):

    acc(x) = A - (A - a0) * exp(-(x - x0) / s)

x0 fixed at the smallest budget fitted (k = 0, n = 1, that budget's tokens), a0 the accuracy
there, A the asymptote, s the budget scale over which 63% of the remaining gain is made
(accuracies in %, fitted by bounded least squares: 0 <= A, a0 <= 100, s > 0).

Intervals: every fit is repeated on `resamples` bootstrap resamples of the problems (seeded);
parameter intervals, the band of a fitted curve and the error bars of the data are 95%
percentile intervals over them. Goodness of fit: R^2 and RMSE (points of %) on the fitted
points. A law refuses (`refused` says why) with fewer than `MIN_PROBLEMS` problems, fewer
budgets than its parameters + 1, no variation, or a fit that does not converge.

Forecasts: each law is fitted again on the budgets <= a cut (half the largest budget; for
`coverage_beta` the first cut samples of every problem) and predicts the largest budget
observed; predicted - observed is the forecast error.

The frontier: per dataset and model, at each token budget B (a log grid over the observed
range), the configuration whose `accuracy_compute` law (or, for one with a single budget such
as CoT, its point) is highest at min(B, its largest budget), among those whose smallest budget
is <= B; the crossovers are the budgets where the best configuration changes.

numpy / scipy / pandas only. The report's section, figures and MLflow values built from the
result: `analysis.laws_report`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.special import betaln, digamma, polygamma

from analysis.curves import _is, _max_k, _returns_best, latent_steps, sample_steps
from analysis.records import CONFIGURATION_KEY, Records

MIN_PROBLEMS = 8  # fewer problems: no law (a bootstrap over 7 problems says little)
RESAMPLES = 200
SEED = 0
CONFIDENCE = 95.0

SATURATING = "acc(x) = A - (A - a0) * exp(-(x - x0) / s)"
POWER = "-log(pass@k) = a * k^-b"
BETA = "p ~ Beta(alpha, beta); pass@k = 1 - B(alpha, beta + k) / B(alpha, beta)"

# law -> (quantity, axis) as tables and figures name them
LAWS = {
    "coverage_power": ("pass@k (%)", "samples k"),
    "coverage_beta": ("pass@k (%)", "samples k"),
    "accuracy_n": ("accuracy (%)", "samples n"),
    "accuracy_k": ("accuracy (%)", "latent steps k"),
    "accuracy_compute": ("accuracy (%)", "tokens per problem"),
}


@dataclass
class Law:
    """One law fitted to one configuration (or its refusal)."""

    label: str
    method: str
    dataset: str
    model: str
    law: str  # a key of LAWS
    form: str
    fitted_on: str  # the budgets and problems it was fitted on
    params: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    r2: float = math.nan
    rmse: float = math.nan  # points of %
    refused: str = ""
    predict: Callable[[np.ndarray], np.ndarray] | None = None  # budgets -> % (the fit)
    band: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None  # 95% band
    resamples: int = 0  # bootstrap fits that converged
    note: str = ""  # what a reader must know to read the parameters (a fit at its bound)


@dataclass
class Forecast:
    label: str
    method: str
    dataset: str
    model: str
    law: str
    cut: float  # fitted on budgets <= cut
    target: float  # the largest budget observed
    predicted: float = math.nan
    lo: float = math.nan
    hi: float = math.nan
    observed: float = math.nan
    observed_lo: float = math.nan
    observed_hi: float = math.nan
    refused: str = ""

    @property
    def error(self) -> float:
        """Predicted - observed, points of %."""
        return self.predicted - self.observed

    @property
    def within(self) -> bool:
        """The observed value lies in the forecast's interval."""
        return bool(self.lo <= self.observed <= self.hi)


@dataclass
class Laws:
    """Everything `fit_laws` found: the laws, the data they were fitted to, the forecasts, the
    frontier and its crossovers, as tables (`tables()`) and objects (for figures)."""

    laws: list[Law]
    points: pd.DataFrame  # label, dataset, model, law, budget, tokens, value, lo, hi
    forecasts: list[Forecast]
    frontier: pd.DataFrame  # dataset, model, tokens, label, accuracy_pct, lo, hi
    crossovers: pd.DataFrame  # dataset, model, tokens, from, to

    def laws_table(self) -> pd.DataFrame:
        """One row per (law, parameter); a refused law is one row with `refused`."""
        rows = []
        for w in self.laws:
            head = {"label": w.label, "method": w.method, "dataset": w.dataset, "model": w.model,
                    "law": w.law, "form": w.form, "fitted_on": w.fitted_on}  # fmt: skip
            tail = {"r2": w.r2, "rmse_pts": w.rmse, "resamples": w.resamples,
                    "refused": w.refused, "note": w.note}  # fmt: skip
            if w.refused:
                rows.append({**head, "param": "", "value": math.nan, "lo": math.nan,
                             "hi": math.nan, **tail})  # fmt: skip
            for name, value in w.params.items():
                lo, hi = w.intervals.get(name, (math.nan, math.nan))
                rows.append({**head, "param": name, "value": value, "lo": lo, "hi": hi, **tail})
        columns = ["label", "method", "dataset", "model", "law", "form", "fitted_on", "param",
                   "value", "lo", "hi", "r2", "rmse_pts", "resamples", "refused",
                   "note"]  # fmt: skip
        return pd.DataFrame(rows, columns=columns)

    def forecasts_table(self) -> pd.DataFrame:
        columns = ["label", "method", "dataset", "model", "law", "cut", "target", "predicted",
                   "lo", "hi", "observed", "observed_lo", "observed_hi", "error_pts", "within",
                   "refused"]  # fmt: skip
        rows = [
            {**{k: getattr(f, k) for k in columns if hasattr(f, k)},
             "error_pts": f.error, "within": f.within if not f.refused else None}
            for f in self.forecasts
        ]  # fmt: skip
        return pd.DataFrame(rows, columns=columns)


# ------------------------------------------------------------------------------------------
# Estimators


def pass_at_k(n: np.ndarray, c: np.ndarray, k: int) -> np.ndarray:
    """The unbiased pass@k of problems with c of n samples correct: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021), k <= n, as the product prod_{i = n-c+1}^{n} (1 - k / i): exactly 0
    when c = 0 and 1 when n - c < k."""
    n, c = np.asarray(n, float), np.asarray(c, float)
    j = np.arange(int(c.max(initial=0)))[None, :]  # [1, max c]
    i = (n - c + 1)[:, None] + j  # [P, max c]: n-c+1, ..., n (and beyond, masked)
    terms = np.where(j < c[:, None], 1.0 - k / i, 1.0)
    return np.where(n - c < k, 1.0, 1.0 - np.prod(terms, axis=1))


def beta_pass_at_k(alpha, beta, k: np.ndarray) -> np.ndarray:
    """pass@k (%) of a problem whose success rate is Beta(alpha, beta): 1 - E[(1-p)^k]
    (alpha, beta: scalars or [R, 1] columns)."""
    k = np.asarray(k, float)
    return 100.0 * (1.0 - np.exp(betaln(alpha, beta + k) - betaln(alpha, beta)))


LOG_BOUND = 9.0  # |log alpha|, |log beta| at most this (e^9 ~ 8100: the binomial limit)


def fit_beta_binomial(
    c: np.ndarray, n: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """[R, 2]: (alpha, beta) maximising the beta-binomial likelihood of c of n correct per
    problem, for each row of `weights` ([R, P]: how often each problem is counted; default
    once); NaN rows where no optimum was found. Problems with the same (c, n) are pooled;
    Levenberg-Marquardt on (log alpha, log beta) with the exact gradient and Hessian."""
    c, n = np.asarray(c, float), np.asarray(n, float)
    w = np.ones((1, len(c))) if weights is None else np.atleast_2d(np.asarray(weights, float))
    pairs, inverse = np.unique(np.stack([c, n], axis=1), axis=0, return_inverse=True)
    w = np.stack([np.bincount(inverse.ravel(), weights=row, minlength=len(pairs)) for row in w])
    c, n = pairs[:, 0], pairs[:, 1]  # [G]; w [R, G]

    def nll(t: np.ndarray) -> np.ndarray:  # [R, 2] -> [R]
        a, b = np.exp(t[:, :1]), np.exp(t[:, 1:])
        return -np.sum(w * (betaln(c + a, n - c + b) - betaln(a, b)), axis=1)

    def grad_hess(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, b = np.exp(t[:, :1]), np.exp(t[:, 1:])
        d0, d1 = digamma(n + a + b) - digamma(a + b), polygamma(1, n + a + b) - polygamma(1, a + b)
        ga = -np.sum(w * (digamma(c + a) - digamma(a) - d0), axis=1)
        gb = -np.sum(w * (digamma(n - c + b) - digamma(b) - d0), axis=1)
        haa = -np.sum(w * (polygamma(1, c + a) - polygamma(1, a) - d1), axis=1)
        hbb = -np.sum(w * (polygamma(1, n - c + b) - polygamma(1, b) - d1), axis=1)
        hab = np.sum(w * d1, axis=1)
        a, b = a[:, 0], b[:, 0]
        g = np.stack([a * ga, b * gb], axis=1)  # d/d log alpha, d/d log beta
        h = np.stack([np.stack([a * a * haa + a * ga, a * b * hab], -1),
                      np.stack([a * b * hab, b * b * hbb + b * gb], -1)], axis=1)  # fmt: skip
        return g, h

    mean = np.clip((w * c).sum(1) / np.maximum((w * n).sum(1), 1e-12), 0.01, 0.99)
    t = np.log(np.stack([mean, 1 - mean], axis=1))  # Beta(mean, 1 - mean): concentration 1
    lam = np.full(len(w), 1e-3)
    f = nll(t)
    for _ in range(200):
        g, h = grad_hess(t)
        step = -np.linalg.solve(h + lam[:, None, None] * np.eye(2), g[..., None])[..., 0]
        step = np.clip(np.nan_to_num(step), -2.0, 2.0)
        trial = np.clip(t + step, -LOG_BOUND, LOG_BOUND)
        ft = nll(trial)
        better = ft < f
        t = np.where(better[:, None], trial, t)
        f = np.where(better, ft, f)
        lam = np.where(better, lam / 3, lam * 4)
        if np.all((np.abs(g).max(axis=1) < 1e-6) | (lam > 1e8)):
            break
    g, _ = grad_hess(t)
    out = np.exp(t)
    out[~(np.abs(g).max(axis=1) < 1e-3 * np.maximum(1.0, w.sum(1)))] = np.nan
    return out


def saturating(x: np.ndarray, a_inf, a0, s, x0) -> np.ndarray:
    """`SATURATING` (parameters: scalars or [R, 1] columns)."""
    return a_inf - (a_inf - a0) * np.exp(-(np.asarray(x, float) - x0) / s)


_S_GRID = np.geomspace(1e-3, 1e3, 481)  # s / (the budget span) searched


def fit_saturating(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[R, 4]: (A, a0, s, x0) of `SATURATING` through each row of x, y ([R, B] or [B]; y in
    %), x0 = the row's smallest x, least squares with 0 <= A, a0 <= 100: for each s on a log
    grid (1e-3 to 1e3 times the budget span, steps of 3%) the model is linear in (A, a0),
    solved in closed form on the box (the free solution or the best on its edges); NaN rows
    where x does not vary."""
    y = np.atleast_2d(np.asarray(y, float))
    x = np.broadcast_to(np.asarray(x, float), y.shape)
    x0 = x.min(axis=1)
    span = x.max(axis=1) - x0
    s = np.where(span > 0, span, np.nan)[:, None] * _S_GRID[None, :]  # [R, G]
    v = np.exp(-(x[:, None, :] - x0[:, None, None]) / s[:, :, None])  # [R, G, B]: weight of a0
    u = 1.0 - v  # weight of A
    yy = y[:, None, :]
    suu, svv, suv = (u * u).sum(-1), (v * v).sum(-1), (u * v).sum(-1)
    suy, svy, syy = (u * yy).sum(-1), (v * yy).sum(-1), (yy * yy).sum(-1)

    def sse(a, b):
        return syy - 2 * a * suy - 2 * b * svy + a * a * suu + 2 * a * b * suv + b * b * svv

    with np.errstate(invalid="ignore", divide="ignore"):
        det = suu * svv - suv**2
        free_a = (svv * suy - suv * svy) / det
        free_b = (suu * svy - suv * suy) / det
        ok = (det > 1e-12 * np.maximum(suu * svv, 1e-300)) & (free_a >= 0) & (free_a <= 100)
        ok &= (free_b >= 0) & (free_b <= 100)
        candidates = [(np.where(ok, free_a, 0.0), np.where(ok, free_b, 0.0), ok)]
        for bound in (0.0, 100.0):
            b = np.clip((svy - bound * suv) / svv, 0, 100)
            candidates.append((np.full_like(b, bound), b, np.isfinite(b)))
            a = np.clip((suy - bound * suv) / suu, 0, 100)
            candidates.append((a, np.full_like(a, bound), np.isfinite(a)))
        errors = np.stack([np.where(valid, sse(a, b), np.inf) for a, b, valid in candidates])
    errors = np.where(np.isnan(errors), np.inf, errors)  # [C, R, G]
    which = np.argmin(errors.transpose(1, 0, 2).reshape(len(y), -1), axis=1)  # [R]
    cand, g = np.divmod(which, s.shape[1])
    rows = np.arange(len(y))
    a_inf = np.stack([a for a, _, _ in candidates])[cand, rows, g]
    a0 = np.stack([b for _, b, _ in candidates])[cand, rows, g]
    out = np.stack([a_inf, a0, s[rows, g], x0], axis=1)
    out[~(span > 0)] = np.nan
    return out


def fit_power(k: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[R, 2]: (a, b) of `POWER` through each row of pass@k (%) ([R, B] or [B]) on the k where
    0 < pass@k < 100, by least squares on log(-log pass@k) = log a - b log k (closed form);
    NaN rows with fewer than 3 such k."""
    y = np.atleast_2d(np.asarray(y, float))
    lk = np.broadcast_to(np.log(np.asarray(k, float)), y.shape)
    m = (y > 0) & (y < 100)
    with np.errstate(invalid="ignore", divide="ignore"):
        ly = np.where(m, np.log(-np.log(np.where(m, y, 50.0) / 100.0)), 0.0)
        count = m.sum(axis=1)
        mx = (m * lk).sum(axis=1) / count
        my = (m * ly).sum(axis=1) / count
        dx = np.where(m, lk - mx[:, None], 0.0)
        b = -(dx * (ly - my[:, None])).sum(axis=1) / (dx * dx).sum(axis=1)
        a = np.exp(my + b * mx)
    out = np.stack([a, b], axis=1)
    out[count < 3] = np.nan
    return out


def power(k: np.ndarray, a, b) -> np.ndarray:
    """`POWER` as pass@k (%) (parameters: scalars or [R, 1] columns)."""
    return 100.0 * np.exp(-a * np.asarray(k, float) ** -b)


# ------------------------------------------------------------------------------------------
# One configuration's data: per-problem matrices over budgets


@dataclass
class _Family:
    label: str
    method: str
    dataset: str
    model: str
    kind: str  # "samples" | "iterations" | "point"
    budgets: np.ndarray  # [B]: k or n
    correct: np.ndarray  # [P, B] in {0, 1}: the method's answer at each budget
    tokens: np.ndarray  # [P, B]
    counts: np.ndarray | None = None  # samples: [P] correct samples (failures: 0 of N)
    sizes: np.ndarray | None = None  # samples: [P] samples (failures: the largest N)
    sample_matrix: np.ndarray | None = None  # samples: [P, N] each sample's grade (NaN: none)
    ungraded: bool = False  # samples: some record holds no per-sample grades (older records)

    def head(self) -> dict[str, str]:
        return {"label": self.label, "method": self.method, "dataset": self.dataset,
                "model": self.model}  # fmt: skip


def _families(records: Records) -> list[_Family]:
    out = []
    p = records.problems
    for (label, dataset, model), g in p.groupby(CONFIGURATION_KEY, sort=False):
        g = g.reset_index(drop=True)
        method = g["method"].iloc[0]
        head = {"label": label, "method": method, "dataset": dataset, "model": model}
        if _is("samples")(method):
            s = sample_steps(g)
            keep = ~np.isnan(s["correct"]).any(axis=0)
            budgets = np.arange(1, s["correct"].shape[1] + 1)[keep]
            graded = [list(x) if x is not None else [] for x in g["sample_correct"]]
            width = max((len(x) for x in graded), default=0)
            matrix = np.full((len(g), width), np.nan)
            for i, x in enumerate(graded):
                matrix[i, : len(x)] = x
            sizes = np.array([len(x) for x in graded])
            failed = (g["error"] != "").to_numpy() | (g["samples"].map(len).to_numpy() == 0)
            ungraded = bool(((sizes != g["samples"].map(len).to_numpy()) & ~failed).any())
            matrix[failed] = 0.0
            sizes = np.where(failed, width, sizes)
            out.append(_Family(**head, kind="samples", budgets=budgets,
                               correct=s["correct"][:, keep], tokens=s["tokens"][:, keep],
                               counts=np.nansum(matrix, axis=1), sizes=sizes,
                               sample_matrix=matrix, ungraded=ungraded))  # fmt: skip
        elif _is("iterations")(method):
            it = records.iterations
            it = it[(it["label"] == label) & (it["dataset"] == dataset) & (it["model"] == model)]
            k = _max_k(g)
            s = latent_steps(g, it, k, best=_returns_best(g))
            out.append(_Family(**head, kind="iterations", budgets=np.arange(k + 1),
                               correct=s["correct"].astype(float), tokens=s["tokens"]))  # fmt: skip
        else:
            tokens = (g["solver_tokens"] + g["verifier_tokens"]).to_numpy(float)[:, None]
            correct = g["final_correct"].to_numpy(float)[:, None]
            out.append(_Family(**head, kind="point", budgets=np.array([0]), correct=correct,
                               tokens=tokens))  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------
# Fitting with a bootstrap over problems


def _percentiles(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    half = (100.0 - CONFIDENCE) / 2
    return np.nanpercentile(values, half, axis=0), np.nanpercentile(values, 100 - half, axis=0)


def _r2_rmse(y: np.ndarray, fit: np.ndarray) -> tuple[float, float]:
    res = float(np.sum((y - fit) ** 2))
    tot = float(np.sum((y - y.mean()) ** 2))
    return (1.0 - res / tot if tot > 0 else math.nan), math.sqrt(res / len(y))


# law -> (form, parameter names, batched fit, batched prediction (params [R, n], x))
_CURVES = {
    "coverage_power": (POWER, ("a", "b"), fit_power, lambda p, x: power(x, p[:, :1], p[:, 1:2])),
    "saturating": (SATURATING, ("A", "a0", "s", "x0"), fit_saturating,
                   lambda p, x: saturating(x, *(p[:, i : i + 1] for i in range(4)))),
}  # fmt: skip


def _attach(w: Law, names, params: np.ndarray, boot: np.ndarray, predict_with) -> None:
    """Fill `w` with the fit `params` [n] and the bootstrap fits `boot` [R, n] (NaN rows: a
    resample whose fit failed)."""
    boot = boot[~np.isnan(boot).any(axis=1)]
    nan = np.full(len(names), np.nan)
    lo, hi = _percentiles(boot) if len(boot) else (nan, nan)
    w.params = dict(zip(names, map(float, params), strict=True))
    w.intervals = {n: (float(a), float(b)) for n, a, b in zip(names, lo, hi, strict=True)}
    w.resamples = len(boot)
    w.predict = lambda x, p=params[None, :]: predict_with(p, np.asarray(x, float))[0]

    def band(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, float)
        if not len(boot):
            return np.full(x.shape, np.nan), np.full(x.shape, np.nan)
        return _percentiles(predict_with(boot, x))

    w.band = band


def _refusal(problems: int, budgets: int, need: int, ys: np.ndarray) -> str:
    if problems < MIN_PROBLEMS:
        return f"{problems} problems (a law needs {MIN_PROBLEMS})"
    if budgets < need:
        return f"{budgets} budget(s) (this form needs {need})"
    if np.ptp(ys) == 0:
        return f"no variation: {ys[0]:.1f}% at every budget"
    return ""


def _curve_law(
    fam: _Family,
    law: str,
    x: np.ndarray,  # [P, B] budgets (tokens differ per problem) or [B]
    y: np.ndarray,  # [P, B] per-problem values in [0, 1]
    idx: np.ndarray,  # [R, P] bootstrap resamples
    fitted_on: str,
) -> Law:
    """A law of the aggregate curve (mean over problems, in %) against the budget."""
    form, names, fit, predict_with = _CURVES.get(law, _CURVES["saturating"])
    w = Law(**fam.head(), law=law, form=form, fitted_on=fitted_on)
    xs = x.mean(axis=0) if x.ndim == 2 else x
    ys = 100.0 * y.mean(axis=0)
    need = 3 if law == "coverage_power" else len(names)  # x0 is not free
    w.refused = _refusal(len(y), len(xs), need, ys)
    if w.refused:
        return w
    params = fit(xs, ys)[0]
    if np.isnan(params).any():
        w.refused = (
            "fewer than 3 budgets with 0 < pass@k < 100%" if law == "coverage_power"
            else "the fit did not converge"
        )  # fmt: skip
        return w
    bx = x[idx].mean(axis=1) if x.ndim == 2 else x  # [R, B]
    boot = fit(bx, 100.0 * y[idx].mean(axis=1))
    _attach(w, names, params, boot, predict_with)
    keep = (ys > 0) & (ys < 100) if law == "coverage_power" else slice(None)
    w.r2, w.rmse = _r2_rmse(ys[keep], w.predict(xs[keep]))
    return w


def _beta_law(fam: _Family, c: np.ndarray, n: np.ndarray, idx: np.ndarray, on: str) -> Law:
    w = Law(**fam.head(), law="coverage_beta", form=BETA, fitted_on=on)
    if len(c) < MIN_PROBLEMS:
        w.refused = f"{len(c)} problems (a law needs {MIN_PROBLEMS})"
    elif c.sum() == 0:
        w.refused = "no variation: no sample of any problem is correct"
    elif (c == n).all():
        w.refused = "no variation: every sample of every problem is correct"
    if w.refused:
        return w
    params = fit_beta_binomial(c, n)[0]
    if np.isnan(params).any():
        w.refused = "the likelihood maximisation did not converge"
        return w
    weights = np.stack([np.bincount(rows, minlength=len(c)) for rows in idx])  # [R, P]
    boot = fit_beta_binomial(c, n, weights)
    degenerate = ((weights * c).sum(1) == 0) | ((weights * (n - c)).sum(1) == 0)
    boot[degenerate] = np.nan  # a resample with no variation has no Beta
    _attach(w, ("alpha", "beta"), params, boot,
            lambda p, k: beta_pass_at_k(p[:, :1], p[:, 1:2], k))  # fmt: skip
    if np.log(params).max() >= LOG_BOUND - 1e-6:
        mean = params[0] / params.sum()
        w.note = (
            f"at the fit's bound e^{LOG_BOUND:g}: these samples show no spread of the problems' "
            f"success rates beyond chance, so only alpha / (alpha + beta) = {mean:.3g} (one rate "
            "for every problem) is estimated, and the Beta's shape, hence its forecast, is not"
        )
    ks = np.arange(1, int(n.min()) + 1)
    observed = 100.0 * np.array([pass_at_k(n, c, k).mean() for k in ks])
    w.r2, w.rmse = _r2_rmse(observed, w.predict(ks))
    return w


def _passk_matrix(c: np.ndarray, n: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """[P, len(ks)] per-problem unbiased pass@k."""
    return np.stack([pass_at_k(n, c, int(k)) for k in ks], axis=1)


def _points(fam: _Family, law: str, x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> list[dict]:
    """The data a law is fitted to, with bootstrap error bars (% and tokens per problem)."""
    value = 100.0 * y.mean(axis=0)
    lo, hi = _percentiles(100.0 * np.stack([y[rows].mean(axis=0) for rows in idx]))
    return [
        {**fam.head(), "law": law, "budget": float(b), "tokens": float(t), "value": float(v),
         "lo": float(a), "hi": float(z)}
        for b, t, v, a, z in zip(x, _tokens_at(fam, x), value, lo, hi, strict=True)
    ]  # fmt: skip


def _tokens_at(fam: _Family, budgets: np.ndarray) -> np.ndarray:
    """Mean tokens per problem at each of `budgets` (the nearest recorded budget below)."""
    mean = fam.tokens.mean(axis=0)
    pos = np.clip(np.searchsorted(fam.budgets, budgets, side="right") - 1, 0, len(mean) - 1)
    return mean[pos]


def _cut(budgets: np.ndarray) -> float:
    return float(budgets.max()) / 2


def _forecast(
    fam: _Family, law: Law, fitted: Law, target: float, observed: np.ndarray, idx: np.ndarray
) -> Forecast:
    """`fitted` (the law refitted on the small budgets) predicting `target`."""
    f = Forecast(**fam.head(), law=law.law, cut=math.nan, target=float(target))
    obs = 100.0 * observed.mean()
    f.observed = float(obs)
    olo, ohi = _percentiles(100.0 * np.array([observed[rows].mean() for rows in idx]))
    f.observed_lo, f.observed_hi = float(olo), float(ohi)
    if fitted.refused or fitted.predict is None:
        f.refused = fitted.refused or "no fit"
        return f
    f.predicted = float(fitted.predict(np.array([target]))[0])
    lo, hi = fitted.band(np.array([target]))
    f.lo, f.hi = float(lo[0]), float(hi[0])
    return f


def fit_laws(records: Records, resamples: int = RESAMPLES, seed: int = SEED) -> Laws:
    """Fit every law of every configuration of `records` (see the module docstring)."""
    laws: list[Law] = []
    forecasts: list[Forecast] = []
    points: list[dict] = []
    rng = np.random.default_rng(seed)
    for fam in _families(records):
        P = len(fam.correct)
        idx = rng.integers(0, P, size=(resamples, P)) if P else np.zeros((0, 0), int)
        b = fam.budgets
        unit = {"samples": "n", "iterations": "k", "point": ""}[fam.kind]
        on = f"{unit} = {b.min():g}..{b.max():g}, {P} problems" if len(b) > 1 else f"{P} problems"
        if fam.kind == "samples" and (fam.ungraded or not len(fam.sizes) or fam.sizes.min() == 0):
            why = ("the records hold no per-sample grades (written before sample_correct)"
                   if fam.ungraded else "no samples recorded")  # fmt: skip
            laws += [Law(**fam.head(), law=name, form=form, fitted_on=on, refused=why)
                     for name, form in (("coverage_power", POWER), ("coverage_beta", BETA))]  # fmt: skip
        elif fam.kind == "samples":
            N = int(fam.sizes.min())
            ks = np.arange(1, N + 1)
            pk = _passk_matrix(fam.counts, fam.sizes, ks)
            points += _points(fam, "coverage_power", ks, pk, idx)
            power_on = f"pass@k, k = 1..{N}, {P} problems"
            laws.append(_curve_law(fam, "coverage_power", ks, pk, idx, power_on))
            beta_on = f"c of N = {N} samples per problem, {P} problems"
            laws.append(_beta_law(fam, fam.counts, fam.sizes, idx, beta_on))
            cut = int(_cut(ks))
            small = ks[ks <= cut]
            target_pk = pk[:, -1]
            w = _curve_law(fam, "coverage_power", small, pk[:, : len(small)], idx,
                           f"pass@k, k = 1..{cut}")  # fmt: skip
            forecasts.append(_forecast(fam, laws[-2], w, N, target_pk, idx))
            first = np.nan_to_num(fam.sample_matrix[:, :cut], nan=0.0)
            wb = _beta_law(fam, first.sum(axis=1), np.full(P, cut), idx,
                           f"c of the first {cut} samples")  # fmt: skip
            forecasts.append(_forecast(fam, laws[-1], wb, N, target_pk, idx))
            for f in forecasts[-2:]:
                f.cut = cut
        if fam.kind in ("samples", "iterations"):
            law = "accuracy_n" if fam.kind == "samples" else "accuracy_k"
            y = fam.correct
            points += _points(fam, law, b, y, idx)
            laws.append(_curve_law(fam, law, b, y, idx, on))
            cut = _cut(b)
            small = b <= cut
            w = _curve_law(fam, law, b[small], y[:, small], idx, f"{unit} <= {cut:g}")
            forecasts.append(_forecast(fam, laws[-1], w, float(b.max()), y[:, -1], idx))
            forecasts[-1].cut = cut
        points += _points(fam, "accuracy_compute", b, fam.correct, idx)
        laws.append(_curve_law(fam, "accuracy_compute", fam.tokens, fam.correct, idx,
                               f"tokens per problem; {on}"))  # fmt: skip
        if len(b) > 1:
            small = b <= _cut(b)
            w = _curve_law(fam, "accuracy_compute", fam.tokens[:, small], fam.correct[:, small],
                           idx, f"tokens at {unit} <= {_cut(b):g}")  # fmt: skip
            target = float(fam.tokens[:, -1].mean())
            forecasts.append(_forecast(fam, laws[-1], w, target, fam.correct[:, -1], idx))
            forecasts[-1].cut = float(fam.tokens[:, small][:, -1].mean())
    columns = ["label", "method", "dataset", "model", "law", "budget", "tokens", "value", "lo",
               "hi"]  # fmt: skip
    points_df = pd.DataFrame(points, columns=columns)
    frontier, crossovers = _frontier(laws, points_df)
    return Laws(laws, points_df, forecasts, frontier, crossovers)


# ------------------------------------------------------------------------------------------
# The compute-optimal frontier


def _frontier(laws: list[Law], points: pd.DataFrame, grid: int = 60):
    rows, crossings = [], []
    compute = points[points["law"] == "accuracy_compute"]
    by_label = {(w.label, w.dataset, w.model): w for w in laws if w.law == "accuracy_compute"}
    for (dataset, model), part in compute.groupby(["dataset", "model"], sort=False):
        lo_t, hi_t = float(part["tokens"].min()), float(part["tokens"].max())
        if not (lo_t > 0 and hi_t > lo_t):
            continue
        budgets = np.geomspace(lo_t, hi_t, grid)
        best_prev = None
        for budget in budgets:
            best = None
            for label, pts in part.groupby("label", sort=False):
                if pts["tokens"].min() > budget * (1 + 1e-9):
                    continue
                w = by_label.get((label, dataset, model))
                at = min(budget, float(pts["tokens"].max()))
                if w is not None and w.predict is not None:
                    value = float(w.predict(np.array([at]))[0])
                    lo, hi = (float(v[0]) for v in w.band(np.array([at])))
                else:  # no law: the best point within the budget
                    p = pts[pts["tokens"] <= budget * (1 + 1e-9)].sort_values("value").iloc[-1]
                    value, lo, hi = float(p["value"]), float(p["lo"]), float(p["hi"])
                if best is None or value > best[1]:
                    best = (label, value, lo, hi)
            if best is None:
                continue
            rows.append({"dataset": dataset, "model": model, "tokens": float(budget),
                         "label": best[0], "accuracy_pct": best[1], "lo": best[2],
                         "hi": best[3]})  # fmt: skip
            if best_prev is not None and best_prev[0] != best[0]:
                crossings.append({"dataset": dataset, "model": model,
                                  "tokens": float(math.sqrt(best_prev[4] * budget)),
                                  "from": best_prev[0], "to": best[0]})  # fmt: skip
            best_prev = (*best[:1], best[1], best[2], best[3], float(budget))
    frontier = pd.DataFrame(
        rows, columns=["dataset", "model", "tokens", "label", "accuracy_pct", "lo", "hi"]
    )
    return frontier, pd.DataFrame(crossings, columns=["dataset", "model", "tokens", "from", "to"])
