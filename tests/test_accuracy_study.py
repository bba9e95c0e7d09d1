"""book/accuracy_study.py, the numbers of the Fashion-MNIST accuracy page: statistics, rank correlations and the
claims' verdicts against hand computations on made-up rows, and the GPU check's result file."""

from __future__ import annotations

import json
import math
import sys

import pandas as pd
import pytest

from dpai_lib.pipeline import ROOT

sys.path.insert(0, str(ROOT / "book"))
import accuracy_study as A

S = [0.9, 0.99]


def _rows(acc: dict[tuple[str, float], list[float]], nodes: dict[str, float] | None = None) -> pd.DataFrame:
    """One row per (method, sparsity, seed) with the given accuracies (fractions); nodes / paths rise with
    the method's position in ``nodes`` (default: all equal to 100)."""
    out = []
    for (method, s), values in acc.items():
        for seed, a in enumerate(values):
            n = (nodes or {}).get(method, 100.0)
            out.append({"method": method, "sparsity": s, "seed": seed, "final_test_acc": a, "best_test_acc": a + 0.01,
                        "nodes": n + seed, "log_paths": math.log(n) + seed / 10, "kernels": 10 * n + seed})
    return pd.DataFrame(out)


def test_statistics_are_mean_and_sample_std_in_percent():
    stats = A.accuracy_stats(_rows({("dpai", 0.9): [0.80, 0.82, 0.84], ("npb", 0.9): [0.7]}))
    dpai = stats[stats["method"] == "dpai"].iloc[0]
    assert dpai["mean"] == pytest.approx(82.0) and dpai["std"] == pytest.approx(2.0) and dpai["n"] == 3
    assert math.isnan(stats[stats["method"] == "npb"].iloc[0]["std"])
    table = A.accuracy_table(stats, ["dpai", "npb", "snip"], [0.9])
    assert table.to_dict("records") == [{"method": "DPaI", "90.00 %": "82.00 ± 2.00 (n=3)"},
                                        {"method": "NPB", "90.00 %": "70.00"}, {"method": "SNIP", "90.00 %": ""}]
    assert A.accuracy_stats(_rows({}).reindex(columns=["method", "sparsity", "final_test_acc"])).empty


def test_rank_correlations_per_sparsity_and_undefined_cases():
    rows = _rows({("a", 0.9): [0.5], ("b", 0.9): [0.6], ("c", 0.9): [0.7], ("d", 0.9): [0.8],
                  ("a", 0.99): [0.3], ("b", 0.99): [0.2]}, nodes={"a": 10.0, "b": 20.0, "c": 30.0, "d": 40.0})
    corr = A.rank_correlations(rows).set_index("sparsity")
    assert corr.loc[0.9, "rho_nodes"] == pytest.approx(1.0) and corr.loc[0.9, "n"] == 4
    assert corr.loc[0.9, "rho_log_paths"] == pytest.approx(1.0)
    assert math.isnan(corr.loc[0.99, "rho_nodes"])  # two points: undefined
    rho, _, n = A.spearman(pd.Series([1, 2, 3, 4]), pd.Series([4, 3, 2, 1]))
    assert rho == pytest.approx(-1.0) and n == 4
    assert math.isnan(A.spearman(pd.Series([1, 1, 1]), pd.Series([1, 2, 3]))[0])  # constant column
    assert A.spearman(pd.Series([1, 2, float("-inf"), 4]), pd.Series([1, 2, 3, 4]))[2] == 3  # non-finite dropped


def test_claims_are_computed_from_the_rows():
    acc = {("random", 0.9): [0.70, 0.71, 0.72], ("snip", 0.9): [0.74, 0.75, 0.76], ("npb", 0.9): [0.77, 0.78, 0.79],
           ("dpai", 0.9): [0.80, 0.81, 0.82],
           ("random", 0.99): [0.50, 0.51, 0.52], ("snip", 0.99): [0.60, 0.61, 0.62], ("npb", 0.99): [0.49, 0.50, 0.51],
           ("dpai", 0.99): [0.55, 0.56, 0.57]}
    rows = _rows(acc, nodes={"random": 10.0, "snip": 20.0, "npb": 30.0, "dpai": 40.0})
    stats = A.accuracy_stats(rows)
    verdicts = A.claims(stats, A.rank_correlations(rows), S).set_index("claim")["verdict"]
    best = verdicts["DPaI is the most accurate method (Figure 1)"]
    assert best == "partly (1 of 2); first by more than 2 SE at 1 of 2"  # first at 90 %, second (behind SNIP) at 99 %
    evidence = A.claims(stats, A.rank_correlations(rows), S).set_index("claim")["evidence"]
    assert "90.00 %: rank 1 of 4, +3.00 points vs NPB (beyond 2 SE)" in evidence["DPaI is the most accurate method (Figure 1)"]
    assert "99.00 %: rank 2 of 4, -5.00 points vs SNIP" in evidence["DPaI is the most accurate method (Figure 1)"]
    assert verdicts["DPaI's margin over the next method is > 2 points at 96.84 % and 99 % (ResNets)"] == "does not hold"
    assert verdicts["data-free NPB / DPaI match or beat the data-scoring SNIP, Iter-SNIP, GraSP"] == "partly (1 of 2)"
    assert verdicts["every pruner beats a random ERK mask of the same sparsity"] == "partly (1 of 2)"  # NPB < Random at 99 %
    assert verdicts["more effective nodes go with higher accuracy (node-path balance principle)"].startswith("partly (1 of 2)")
    # partly: best, data-free, random, nodes; does not hold: the margin; paths like nodes (same ranks here)
    assert A.tally(A.claims(stats, A.rank_correlations(rows), S)) == {"holds": 0, "does not hold": 1, "partly": 5,
                                                                       "cannot tell": 0}


def test_a_gap_against_a_single_seed_is_never_called_beyond_the_noise():
    # DPaI one seed, Random three seeds with a tiny spread: the old code took Random's SE alone and called the gap
    # "beyond 2 SE"; with one seed on a side the noise of the difference is unknown
    rows = _rows({("random", 0.9): [0.800, 0.801, 0.802], ("dpai", 0.9): [0.78]})
    stats = A.accuracy_stats(rows)
    m = A._margin(stats, 0.9, "dpai")
    assert m is not None and m["gap"] == pytest.approx(-2.1) and math.isnan(m["se"]) and not m["clear"]
    table = A.claims(stats, A.rank_correlations(rows), S).set_index("claim")
    assert "-2.10 points vs Random (one seed on a side: noise not estimated)" in table.loc[
        "DPaI is the most accurate method (Figure 1)", "evidence"]
    assert table.loc["DPaI is the most accurate method (Figure 1)", "verdict"] == (
        "does not hold; first by more than 2 SE at 0 of 1")
    both = A._margin(A.accuracy_stats(_rows({("random", 0.9): [0.70, 0.71, 0.72], ("dpai", 0.9): [0.80, 0.81]})),
                     0.9, "dpai")
    assert both is not None and both["se"] == pytest.approx(math.sqrt(1.0 / 3 + 0.5 / 2)) and both["clear"]


def test_the_tally_counts_verdicts_by_their_kind_not_their_whole_text():
    # nodes rise with accuracy at both sparsities (rho = +1 over 4 methods x 3 seeds): "holds (rho > 0 with
    # p < 0.05)" must count as holding; the page once compared whole strings and said "1 holds" for 2
    acc = {(m, s): [a + s / 10 + k / 100 for k in range(3)]
           for s in S for m, a in (("random", 0.5), ("snip", 0.6), ("npb", 0.7), ("dpai", 0.8))}
    rows = _rows(acc, nodes={"random": 10.0, "snip": 20.0, "npb": 30.0, "dpai": 40.0})
    verdicts = A.claims(A.accuracy_stats(rows), A.rank_correlations(rows), S)
    by_claim = verdicts.set_index("claim")["verdict"]
    assert by_claim["more effective nodes go with higher accuracy (node-path balance principle)"] == (
        "holds (rho > 0 with p < 0.05)")
    assert by_claim["DPaI is the most accurate method (Figure 1)"].startswith("holds; ")
    # every claim holds here; three verdicts carry details after "holds"
    assert A.tally(verdicts) == {"holds": 6, "does not hold": 0, "partly": 0, "cannot tell": 0}
    assert A.tally(A.claims(A.accuracy_stats(rows.iloc[:0]), A.rank_correlations(rows.iloc[:0]), S)) == {
        "holds": 0, "does not hold": 0, "partly": 0, "cannot tell": 6}
    with pytest.raises(ValueError, match="verdicts of no known kind.*'maybe'"):
        A.tally(pd.DataFrame({"verdict": ["holds", "maybe"]}))


def test_claims_without_runs_cannot_tell():
    empty = A.accuracy_stats(_rows({}).reindex(columns=["method", "sparsity", "final_test_acc"]))
    verdicts = A.claims(empty, A.rank_correlations(_rows({}).reindex(columns=["method", "sparsity", "final_test_acc",
                                                                               "nodes", "log_paths", "kernels"])), S)
    assert len(verdicts) == 6 and set(verdicts["verdict"]) == {"cannot tell (no runs)"}


def test_the_gpu_check_result_file_is_read_when_it_exists(tmp_path):
    assert A.load_gpu_check(tmp_path / "gpu_check.json") is None
    (tmp_path / "gpu_check.json").write_text(json.dumps({"checks": {
        "environment": {"status": "pass", "seconds": 0.5, "summary": "NVIDIA H100"},
        "throughput": {"status": "fail", "seconds": 30.0, "error": "RuntimeError: boom"}}}))
    table = A.gpu_check_table(A.load_gpu_check(tmp_path / "gpu_check.json"))
    assert table.to_dict("records") == [
        {"check": "environment", "status": "pass", "seconds": "0.5", "result": "NVIDIA H100"},
        {"check": "throughput", "status": "fail", "seconds": "30.0", "result": "RuntimeError: boom"}]
