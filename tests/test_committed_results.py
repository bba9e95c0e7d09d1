"""Committed results: every record belongs to its artefact's current grid, none is a smoke run, and the
collected CSV is exactly the records."""

from pathlib import Path

import pandas as pd
import pytest

from dpai_lib.pipeline import plan
from dpai_lib.results import COLUMNS
from dpai_lib.runs import load_record, run_id

ROOT = Path(__file__).resolve().parents[1]
ARTEFACTS = sorted(p.name for p in (ROOT / "results" / "runs").glob("*") if p.is_dir())


@pytest.mark.parametrize("artefact", ARTEFACTS)
def test_committed_records_are_current_finished_and_collected(artefact):
    params = ROOT / "params" / f"{artefact}.yaml"
    assert params.exists(), f"results for {artefact} but no params file"
    current = {run_id(r.config) for budget in ("short", "paper") for stage in ("all", "prune")
               for r in plan(params, budget, stage=stage)}
    records = [load_record(p) for p in sorted((ROOT / "results" / "runs" / artefact).glob("*.json"))]
    for rec in records:
        assert rec["run_id"] in current, f"{rec['run_id']} is not in {artefact}'s current grid (stale record)"
        assert rec["status"] == "done" and rec["labels"]["budget"] != "smoke"
        assert rec["provenance"]["git_dirty"] is False, "results must come from committed code"
    table = pd.read_csv(ROOT / "results" / f"{artefact}.csv")
    assert list(table.columns) == COLUMNS
    assert sorted(table["run_id"]) == sorted(r["run_id"] for r in records)
