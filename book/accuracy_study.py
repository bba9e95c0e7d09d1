"""The numbers of the Fashion-MNIST accuracy page (``book/cpu_fmnist.md``): accuracy per method and sparsity,
rank correlations of accuracy with effective nodes and paths, the paper's claims checked against the
records, and the result file of the GPU check. Book code beside ``artefact_page.py``: it only reads
tables, never runs anything; every statement it makes is computed from the rows it is given.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from artefact_page import METHOD_NAMES, pct, same_sparsity

STAND_IN = "offline stand-in (Fashion-MNIST), not the paper's setting"
DATA_SCORING = ("snip", "iter_snip", "grasp")  # score weights with real training batches
DATA_FREE = ("random", "synflow", "phew", "npb", "dpai")
FEATURES = {"nodes": "effective nodes", "log_paths": "effective paths (ln)", "kernels": "effective kernels"}
HIGH = (0.9683772233983162, 0.99)  # where the paper claims DPaI's margin "typically > 2 %"


def name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def accuracy_stats(trained: pd.DataFrame, column: str = "final_test_acc") -> pd.DataFrame:
    """Mean, sample std and count (in %) of ``column`` per method and sparsity; columns method, sparsity, mean,
    std, n (std NaN for a single seed)."""
    rows = []
    for (method, sparsity), g in trained.groupby(["method", "sparsity"], sort=False):
        v = pd.to_numeric(g[column], errors="coerce").dropna() * 100.0
        if len(v):
            rows.append({"method": method, "sparsity": float(sparsity), "mean": v.mean(),
                         "std": v.std(ddof=1) if len(v) > 1 else math.nan, "n": len(v)})
    return pd.DataFrame(rows, columns=["method", "sparsity", "mean", "std", "n"])


def accuracy_table(stats: pd.DataFrame, methods: list[str], sparsities: list[float]) -> pd.DataFrame:
    """Method x sparsity table of 'mean ± std (n=k)' cells (%), empty where no run finished."""
    out = []
    for method in methods:
        row = {"method": name(method)}
        for s in sparsities:
            cell = stats[(stats["method"] == method) & same_sparsity(stats["sparsity"], s)]
            if cell.empty:
                row[pct(s)] = ""
            else:
                c = cell.iloc[0]
                row[pct(s)] = f"{c['mean']:.2f}" + ("" if pd.isna(c["std"]) else f" ± {c['std']:.2f} (n={int(c['n'])})")
        out.append(row)
    return pd.DataFrame(out)


def spearman(x: pd.Series, y: pd.Series) -> tuple[float, float, int]:
    """Spearman's rank correlation of two columns over the rows where both are finite: (rho, p-value, n);
    NaNs where it is undefined (fewer than 3 points, or a constant column)."""
    from scipy.stats import spearmanr

    both = pd.DataFrame({"x": pd.to_numeric(x, errors="coerce"), "y": pd.to_numeric(y, errors="coerce")})
    both = both[np.isfinite(both["x"]) & np.isfinite(both["y"])]
    if len(both) < 3 or both["x"].nunique() < 2 or both["y"].nunique() < 2:
        return math.nan, math.nan, len(both)
    rho, p = spearmanr(both["x"], both["y"])
    return float(rho), float(p), len(both)


def rank_correlations(trained: pd.DataFrame, column: str = "final_test_acc") -> pd.DataFrame:
    """Per sparsity, Spearman's rho (and p) between accuracy and each feature of :data:`FEATURES`, one point per
    trained run (every method and seed at that sparsity)."""
    rows = []
    for s, g in trained.groupby("sparsity"):
        row: dict[str, Any] = {"sparsity": float(s)}
        for feature in FEATURES:
            rho, p, n = spearman(g[feature], g[column])
            row |= {f"rho_{feature}": rho, f"p_{feature}": p, "n": n}
        rows.append(row)
    columns = ["sparsity", "n"] + [f"{k}_{f}" for f in FEATURES for k in ("rho", "p")]
    return pd.DataFrame(rows, columns=columns)


def _margin(stats: pd.DataFrame, s: float, method: str) -> dict[str, Any] | None:
    """``method``'s mean minus the best other method's at sparsity ``s``, and whether the gap exceeds two
    standard errors of the difference (seed-to-seed noise); None if either is missing. The standard error
    needs a sample std on both sides: where either mean is a single seed it is NaN and no gap is clear."""
    at = stats[same_sparsity(stats["sparsity"], s)]
    own = at[at["method"] == method]
    others = at[at["method"] != method]
    if own.empty or others.empty:
        return None
    best = others.loc[others["mean"].idxmax()]
    o = own.iloc[0]
    se = math.sqrt(sum((r["std"] ** 2) / r["n"] for r in (o, best)))  # NaN when either std is (one seed)
    gap = float(o["mean"] - best["mean"])
    rank = int((at["mean"] > o["mean"]).sum()) + 1
    return {"gap": gap, "other": best["method"], "rank": rank, "of": len(at), "se": se,
            "clear": bool(math.isfinite(se) and se > 0 and abs(gap) > 2 * se)}


def _verdict(hits: int, total: int) -> str:
    if total == 0:
        return "cannot tell (no runs)"
    return "holds" if hits == total else "does not hold" if hits == 0 else f"partly ({hits} of {total})"


def claims(stats: pd.DataFrame, corr: pd.DataFrame, sparsities: list[float]) -> pd.DataFrame:
    """The paper's claims that this study can test, each with a verdict and the evidence, both computed from
    ``stats`` (:func:`accuracy_stats`) and ``corr`` (:func:`rank_correlations`)."""
    out = []
    # 1. DPaI is the most accurate method
    margins = {s: _margin(stats, s, "dpai") for s in sparsities}
    seen = {s: m for s, m in margins.items() if m is not None}
    evidence = "; ".join(
        f"{pct(s)}: rank {m['rank']} of {m['of']}, {m['gap']:+.2f} points vs {name(m['other'])}"
        + (" (beyond 2 SE)" if m["clear"] else " (within 2 SE of seed noise)" if m["se"] > 0
           else " (one seed on a side: noise not estimated)" if math.isnan(m["se"]) else "")
        for s, m in seen.items())
    out.append({"claim": "DPaI is the most accurate method (Figure 1)",
                "verdict": _verdict(sum(m["rank"] == 1 for m in seen.values()), len(seen)) + (
                    f"; first by more than 2 SE at {sum(m['rank'] == 1 and m['clear'] for m in seen.values())} of "
                    f"{len(seen)}" if seen else ""),
                "evidence": evidence or "no trained DPaI runs"})
    # 2. ... by more than 2 points at 96.84 % and 99 %
    high = {s: m for s, m in seen.items() if any(abs(s - h) < 5e-6 for h in HIGH)}
    out.append({"claim": "DPaI's margin over the next method is > 2 points at 96.84 % and 99 % (ResNets)",
                "verdict": _verdict(sum(m["gap"] > 2.0 for m in high.values()), len(high)),
                "evidence": "; ".join(f"{pct(s)}: {m['gap']:+.2f} points" for s, m in high.items()) or "no runs"})
    # 3./4. accuracy rises with effective nodes / paths
    for feature, words in (("nodes", "effective nodes"), ("log_paths", "effective paths")):
        rows = corr.dropna(subset=[f"rho_{feature}"])
        hits = int(((rows[f"rho_{feature}"] > 0) & (rows[f"p_{feature}"] < 0.05)).sum())
        evidence = "; ".join(f"{pct(r['sparsity'])}: rho {r[f'rho_{feature}']:+.2f} (p {r[f'p_{feature}']:.2g}, "
                             f"n={int(r['n'])})" for _, r in rows.iterrows())
        out.append({"claim": f"more {words} go with higher accuracy (node-path balance principle)",
                    "verdict": _verdict(hits, len(rows)) + ("" if rows.empty else " (rho > 0 with p < 0.05)"),
                    "evidence": evidence or "too few runs for a rank correlation"})
    # 5. data-free DPaI / NPB match or beat the data-scoring SNIP / Iter-SNIP / GraSP
    hits = total = 0
    parts = []
    for s in sparsities:
        at = stats[same_sparsity(stats["sparsity"], s)].set_index("method")["mean"]
        free = at.reindex(["npb", "dpai"]).dropna()
        scoring = at.reindex(list(DATA_SCORING)).dropna()
        if free.empty or scoring.empty:
            continue
        total += 1
        hits += bool(free.max() >= scoring.max())
        parts.append(f"{pct(s)}: best of NPB/DPaI {free.max():.2f} ({name(str(free.idxmax()))}) vs best data-scoring "
                     f"{scoring.max():.2f} ({name(str(scoring.idxmax()))})")
    out.append({"claim": "data-free NPB / DPaI match or beat the data-scoring SNIP, Iter-SNIP, GraSP",
                "verdict": _verdict(hits, total), "evidence": "; ".join(parts) or "no runs"})
    # 6. pruning at initialisation beats a random ERK mask
    hits = total = 0
    parts = []
    for s in sparsities:
        at = stats[same_sparsity(stats["sparsity"], s)].set_index("method")["mean"]
        if "random" not in at or len(at) < 2:
            continue
        others = at.drop("random")
        total += 1
        beat = int((others > at["random"]).sum())
        hits += beat == len(others)
        parts.append(f"{pct(s)}: {beat} of {len(others)} methods above Random ({at['random']:.2f})")
    out.append({"claim": "every pruner beats a random ERK mask of the same sparsity",
                "verdict": _verdict(hits, total), "evidence": "; ".join(parts) or "no runs"})
    return pd.DataFrame(out, columns=["claim", "verdict", "evidence"])


VERDICT_KINDS = ("holds", "does not hold", "partly", "cannot tell")


def tally(verdicts: pd.DataFrame) -> dict[str, int]:
    """How many of :func:`claims`' verdicts fall in each of :data:`VERDICT_KINDS`, told by the verdict's first
    words: a verdict carries its kind first and details after it ("holds (rho > 0 with p < 0.05)", "partly (1 of
    4); first by ..."), so comparing whole strings would miss some."""
    kinds = [next((k for k in VERDICT_KINDS if v.startswith(k)), None) for v in verdicts["verdict"]]
    unknown = [v for v, k in zip(verdicts["verdict"], kinds) if k is None]
    if unknown:
        raise ValueError(f"verdicts of no known kind {unknown}; known kinds: {', '.join(VERDICT_KINDS)}")
    return {k: kinds.count(k) for k in VERDICT_KINDS}


def load_gpu_check(path: str | Path) -> dict[str, Any] | None:
    """The result file of ``make gpu-check`` (``gpu_check.json``), or None when it does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def gpu_check_table(result: dict[str, Any]) -> pd.DataFrame:
    """One row per check of a ``gpu_check.json``: name, status, seconds (text, one decimal), summary."""
    return pd.DataFrame([{"check": k, "status": v.get("status"),
                          "seconds": "" if v.get("seconds") is None else f"{v['seconds']:.1f}",
                          "result": v.get("summary") or v.get("error", "")} for k, v in result.get("checks", {}).items()],
                        columns=["check", "status", "seconds", "result"])
