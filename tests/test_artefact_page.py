"""book/artefact_page.py, the helpers of the eight artefact pages: their numbers against hand computations on a
store of two real smoke runs, and their errors."""

from __future__ import annotations

import math
import sys

import pandas as pd
import pytest
import yaml

from dpai_lib.pipeline import ROOT, Paths, plan, run_sweep
from dpai_lib.results import collect

sys.path.insert(0, str(ROOT / "book"))
import artefact_page as ap


def test_mean_std_formats_one_several_and_non_finite_values():
    assert ap.mean_std([]) == ""
    assert ap.mean_std([2.0]) == "2.0"
    assert ap.mean_std([1.0, 2.0, 3.0], 2) == "2.00 ± 1.00 (n=3)"  # sample std
    assert ap.mean_std([0.5, 0.7], 1, 100.0) == "60.0 ± 14.1 (n=2)"
    assert ap.mean_std([1.0, 3.0, -math.inf], 1) == "2.0 ± 1.4 (n=2) (1 of 3: -inf)"
    assert ap.mean_std([-math.inf]) == "-inf"


def test_a_table_is_shown_with_its_cells_header_and_caption_html_escaped(monkeypatch):
    shown = []
    monkeypatch.setattr(ap, "display", shown.append)
    ap.show(pd.DataFrame({"p < 0.05": ["rho > 0 with p < 0.05", "<lambda> & co", None]}), "n < 3 & <b>x</b>")
    page = shown[0].to_html()
    assert "rho &gt; 0 with p &lt; 0.05" in page and "&lt;lambda&gt; &amp; co" in page and "p &lt; 0.05</th>" in page
    assert "n &lt; 3 &amp; &lt;b&gt;x&lt;/b&gt;" in page
    assert "<lambda>" not in page and "<b>" not in page and ">None<" not in page and ">nan<" not in page


def test_mask_rows_keep_one_row_per_mask_preferring_the_data_free_run():
    rows = pd.DataFrame([
        {"tier": "paper", "setting": "s", "method": "dpai", "sparsity": 0.9, "seed": 0, "stage": "all",
         "status": "done", "nodes": 1},
        {"tier": "paper", "setting": "s", "method": "dpai", "sparsity": 0.9, "seed": 0, "stage": "prune",
         "status": "done", "nodes": 2},
        {"tier": "paper", "setting": "s", "method": "dpai", "sparsity": 0.9, "seed": 1, "stage": "prune",
         "status": "failed", "nodes": 3},
        {"tier": "smoke", "setting": "s", "method": "dpai", "sparsity": 0.9, "seed": 0, "stage": "all",
         "status": "done", "nodes": 4}])
    masks = ap.mask_rows(rows)
    assert sorted(masks["nodes"]) == [2, 4]
    best, tier = ap.best_tier(masks)
    assert tier == "paper" and best["nodes"].tolist() == [2]


def test_a_page_of_an_unknown_artefact_names_the_known_ones(tmp_path):
    paths = Paths.at(tmp_path)
    paths.params.mkdir()
    (paths.params / "mine.yaml").write_text((ROOT / "params" / "fig3_prune_time.yaml").read_text())
    with pytest.raises(FileNotFoundError, match="'nope'.*known: mine"):
        ap.ArtefactPage("nope", paths)


def test_a_page_reads_its_runs_status_and_grid_from_the_store(tmp_path):
    paths = Paths.at(tmp_path)
    paths.params.mkdir()
    raw = yaml.safe_load((ROOT / "params" / "fig3_prune_time.yaml").read_text())
    setting = next(iter(raw["settings"]))
    raw["settings"] = {setting: dict(raw["settings"][setting], methods=["random", "phew"])}
    raw["tiers"]["smoke"].pop("settings", None)  # overrides of the settings dropped above
    (paths.params / "fig3_prune_time.yaml").write_text(yaml.safe_dump(raw))
    page = ap.ArtefactPage("fig3_prune_time", paths)
    runs = plan(page.params, "smoke", stage="prune")
    assert run_sweep(runs, paths=paths, device="cpu", threads=1, progress=False) == {"skipped": 0,
                                                                                      "done": len(runs)}
    collect("fig3_prune_time", paths=paths)
    rows = page.load_table()
    assert len(rows) == len(runs) and set(rows["method"]) == {"random", "phew"}
    assert len(page.records_for(rows)) == len(runs)
    planned = len(plan(page.params, "paper", stage="prune"))
    assert page.status_line() == (f"paper tier, data-free masks (stage prune): 0 of {planned} runs finished; "
                                  f"smoke tier, data-free masks (stage prune): {len(runs)} of {len(runs)} "
                                  "runs finished")
    assert page.methods == ["random", "phew"]
    grid = page.grid_table()
    assert grid["methods"].tolist() == ["random, phew"]
    assert grid["seeds"].tolist() == [len(raw["settings"][setting]["seeds"])]
    assert ap.where(ap.mask_rows(rows)).startswith("smoke tier; CPU (")
