"""What the artefact pages of the book share: read an artefact's results through
``dpai_lib.results``, label what is shown by run tier, device and threads, count finished runs, and put
the paper's numbers beside ours.

Pages import it from their working folder (``_config.yml``: ``run_in_temp: false``, so pages run in
``book/``); it is book code, kept out of ``dpai_lib``, and it only reads results, never runs anything.
"""

from __future__ import annotations

import html
from functools import cached_property

import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from dpai_lib import results as R
from dpai_lib.params import load_artefact
from dpai_lib.pipeline import Paths, plan
from dpai_lib.runs import run_id

SMOKE = "smoke tier: offline stand-in data, not comparable with the paper"
TIERS = ("paper", "short", "smoke")  # most faithful first
FINISHED = ("done", "diverged")
STAGE_WORDS = {"prune": "data-free masks (stage prune)", "all": "pruned and trained (stage all)"}
SETTING_NAMES = {"resnet20_cifar10": "ResNet-20 / CIFAR-10", "vgg19_cifar100": "VGG-19 / CIFAR-100",
                 "resnet18_tinyimagenet": "ResNet-18 / Tiny-ImageNet",
                 "efficientnet_b0_imagenet": "EfficientNet-B0 / ImageNet-1K",
                 "vit_b16_tinyimagenet": "ViT-B/16 / Tiny-ImageNet",
                 "resnet20_fmnist": "ResNet-20 / Fashion-MNIST (offline stand-in)"}
METHOD_NAMES = {"random": "Random", "snip": "SNIP", "iter_snip": "Iter-SNIP", "synflow": "SynFlow",
                "phew": "PHEW", "npb": "NPB", "dpai": "DPaI", "dpai_exact": "DPaI (exact count)",
                "grasp": "GraSP"}  # GraSP last: pages zip METHOD_ORDER with their markers
METHOD_ORDER = list(METHOD_NAMES)
TEXT_COLUMNS = {"artefact", "setting", "method", "pruner", "tier", "stage", "dataset", "model", "run_id",
                "status", "error", "device_name", "git_commit"}
# the paper's metric -> (our column, scale, stage it needs: "all" = trained runs, None = any mask)
OURS = {"best_test_acc": ("best_test_acc", 100.0, "all"), "final_test_acc": ("final_test_acc", 100.0, "all"),
        "log_paths": ("log_paths", 1.0, None), "nodes": ("nodes", 1.0, None), "kernels": ("kernels", 1.0, None),
        "prune_s": ("prune_s", 1.0, None)}
RELEASE = {"log_paths": "log_paths_dpai", "nodes": "nodes_dpai", "kernels": "kernels_dpai"}


def numeric(df: pd.DataFrame, skip: set[str]) -> pd.DataFrame:
    """``df`` with every column outside ``skip`` made numeric (unparseable cells become NaN)."""
    for col in df.columns:
        if col not in skip:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def finished(rows: pd.DataFrame, stage: str | None = None) -> pd.DataFrame:
    rows = rows[rows["status"].isin(FINISHED)]
    return rows if stage is None else rows[rows["stage"] == stage]


def mask_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """One finished row per mask (setting, method, sparsity, seed, tier): a data-free (prune) run where there
    is one, else the trained run, whose masks are the same configuration's."""
    rows = finished(rows).sort_values("stage", key=lambda c: c.map({"prune": 0, "all": 1}))
    return rows.drop_duplicates(["tier", "setting", "method", "sparsity", "seed"])


def best_tier(rows: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """The rows of the most faithful run tier present (paper, then short, then smoke) and its name."""
    for tier in TIERS:
        if (rows["tier"] == tier).any():
            return rows[rows["tier"] == tier], tier
    return rows.iloc[0:0], None


def device_words(name: str, threads: float) -> str:
    gpu = any(k in str(name).upper() for k in ("NVIDIA", "TESLA", "GEFORCE", "RADEON", "INSTINCT"))
    place = f"GPU {name}" if gpu else f"CPU ({name})"
    return place if pd.isna(threads) else f"{place}, {int(threads)} torch thread{'s' if int(threads) != 1 else ''}"


def where(rows: pd.DataFrame) -> str:
    """Budget tier(s), device and threads of the rows shown; smoke-tier rows carry the warning."""
    if rows.empty:
        return "not yet run"
    tiers = [t for t in TIERS if (rows["tier"] == t).any()]
    kinds = rows[["device_name", "torch_threads"]].drop_duplicates().itertuples(index=False)
    text = f"{' + '.join(tiers)} tier; " + "; ".join(device_words(d, t) for d, t in kinds)
    return f"{text}. {SMOKE[0].upper()}{SMOKE[1:]}" if "smoke" in tiers else text


def in_order(df: pd.DataFrame, settings: list[str]) -> pd.DataFrame:
    """Rows sorted by the given setting order, the paper's method order, then sparsity and seed."""
    rank = {"setting": {s: i for i, s in enumerate(settings)}, "method": {m: i for i, m in enumerate(METHOD_ORDER)}}
    return df.sort_values([c for c in ("setting", "method", "sparsity", "seed") if c in df],
                          key=lambda c: c.map(rank[c.name]).fillna(len(rank[c.name])) if c.name in rank else c)


def pct(s: float) -> str:
    return f"{100 * float(s):.2f} %"


def mean_std(values, digits: int = 1, scale: float = 1.0) -> str:
    """'m' for one value, 'm ± s (n=k)' for several (sample std over seeds), '' for none; non-finite values
    (a log path count of -inf: no path) are counted apart."""
    v = pd.to_numeric(pd.Series(list(values), dtype=float), errors="coerce").dropna() * scale
    finite = v[np.isfinite(v)]
    note = f" ({len(v) - len(finite)} of {len(v)}: {v[~np.isfinite(v)].iloc[0]:g})" if len(finite) < len(v) else ""
    if finite.empty:
        return ", ".join(sorted({f"{x:g}" for x in v}))
    if len(finite) == 1:
        return f"{finite.iloc[0]:.{digits}f}{note}"
    return f"{finite.mean():.{digits}f} ± {finite.std(ddof=1):.{digits}f} (n={len(finite)}){note}"


def same_sparsity(series: pd.Series, s: float) -> np.ndarray:
    return np.isclose(series.astype(float), float(s), rtol=0, atol=5e-6)


def pick(frame: pd.DataFrame, method: str, sparsity: float) -> pd.DataFrame:
    """The rows of one method at one sparsity."""
    return frame[(frame["method"] == method) & same_sparsity(frame["sparsity"], sparsity)] if len(frame) else frame


def show(df: pd.DataFrame, caption: str) -> None:
    """A table with a caption, no index, missing values as empty cells; cells and caption are HTML-escaped
    (a Styler writes them raw: "p < 0.05" or "<lambda>" would reach the page as markup)."""
    display(df.style.hide(axis="index").set_caption(html.escape(caption, quote=False))
            .format(na_rep="", escape="html").format_index(escape="html", axis=1))


def _ours_cell(sel: pd.DataFrame, column: str, scale: float, split: list[str]) -> str:
    """Mean ± std of ``column``; one entry per setting / sparsity where the paper's number leaves them open."""
    if column not in sel or sel[column].isna().all():
        return ""
    if not split:
        return mean_std(sel[column], 2, scale)
    parts = []
    for key, g in sel.groupby(split):
        label = ", ".join(pct(v) if k == "sparsity" else SETTING_NAMES.get(v, v) for k, v in zip(split, key))
        parts.append(f"{label}: {mean_std(g[column], 2, scale)}")
    return "; ".join(parts)


class ArtefactPage:
    """One artefact's results as its page shows them: ``ArtefactPage("fig1_main")`` reads
    ``results/fig1_main.csv``, the run records and ``params/fig1_main.yaml`` under ``paths``
    (default: the repository, or ``$DPAI_ROOT``)."""

    def __init__(self, name: str, paths: Paths | None = None):
        self.name = name
        self.paths = paths or Paths.at()
        self.params = self.paths.params / f"{name}.yaml"
        if not self.params.exists():
            raise FileNotFoundError(f"no params file for artefact {name!r} ({self.params}); "
                                    f"known: {', '.join(R.artefacts(self.paths))}")
        self.artefact = load_artefact(self.params)
        self._planned: dict[tuple[str, str], frozenset[str]] = {}

    def load_table(self) -> pd.DataFrame:
        """This artefact's collected runs, one row per record (``results/<artefact>.csv``)."""
        return numeric(R.load_table(self.name, paths=self.paths).copy(), TEXT_COLUMNS)

    def load_paper(self) -> pd.DataFrame:
        """The paper's transcribed numbers for this artefact (``results/paper/<artefact>.csv``), possibly empty."""
        return numeric(R.load_paper(self.name, paths=self.paths).copy(),
                       set(R.PAPER_COLUMNS) - {"sparsity", "value", "std"})

    def planned_ids(self, tier: str, stage: str) -> frozenset[str]:
        if (tier, stage) not in self._planned:
            self._planned[tier, stage] = frozenset(run_id(r.config) for r in plan(self.params, tier, stage=stage))
        return self._planned[tier, stage]

    @cached_property
    def records(self) -> tuple[dict, ...]:
        """The full JSON records of this artefact's runs found in the store (labelled for this artefact)."""
        return tuple(R.artefact_records(self.name, paths=self.paths))

    def records_for(self, rows: pd.DataFrame) -> list[dict]:
        """The records of the given table rows (matched by run id)."""
        by_id = {r["run_id"]: r for r in self.records}
        return [by_id[i] for i in rows["run_id"] if i in by_id]

    def setting_order(self) -> list[str]:
        return list(self.artefact.settings)

    @property
    def methods(self) -> list[str]:
        """The methods of every setting, in the params file's order, each once."""
        return list(dict.fromkeys(m for x in self.artefact.settings.values() for m in x.methods))

    @property
    def sparsities(self) -> list[float]:
        """Every setting's sparsities, sorted, each once."""
        return sorted({float(v) for x in self.artefact.settings.values() for v in x.sparsities})

    def status_line(self) -> str:
        """Runs finished out of those planned, per run tier and stage (tiers beyond paper only when they ran)."""
        stages = ("prune", "all") if "train" in self.artefact.stages else ("prune",)
        state = {r["run_id"]: r["status"] for r in self.records}
        parts = []
        for tier in TIERS:
            for stage in stages:
                ids = self.planned_ids(tier, stage)
                done = sum(state.get(i) in FINISHED for i in ids)
                failed = sum(state.get(i) == "failed" for i in ids)
                if tier != "paper" and (ids == self.planned_ids("paper", stage) or not done + failed):
                    continue  # another tier's identical runs, or a tier nobody ran
                parts.append(f"{tier} tier, {STAGE_WORDS[stage]}: {done} of {len(ids)} runs finished"
                             + (f", {failed} failed" if failed else ""))
        return "; ".join(parts)

    def show_failures(self, rows: pd.DataFrame) -> None:
        """The failed runs with their errors (nothing when none failed)."""
        failed = in_order(rows[rows["status"] == "failed"], self.setting_order())
        if len(failed):
            table = failed[["tier", "stage", "setting", "method", "sparsity", "seed", "error"]].copy()
            table["sparsity"] = table["sparsity"].map(pct)
            table["error"] = table["error"].astype(str).str.slice(0, 300)
            show(table, "Failed runs (their records hold the full traceback)")

    def grid_table(self) -> pd.DataFrame:
        """The artefact's grid as its params file states it."""
        return pd.DataFrame([{"setting": SETTING_NAMES.get(s, s), "methods": ", ".join(x.methods),
                              "sparsities": ", ".join(pct(v) for v in x.sparsities), "seeds": len(x.seeds)}
                             for s, x in self.artefact.settings.items()])

    def paper_vs_ours(self, rows: pd.DataFrame) -> pd.DataFrame | None:
        """The paper's numbers (with source and certainty) beside ours for the same setting / method / sparsity /
        metric, from the most faithful tier we have; None if the paper's numbers were not available."""
        paper = self.load_paper()
        if paper.empty:
            return None
        out = []
        for p in paper.itertuples(index=False):
            column, scale, stage = OURS.get(p.metric, (p.metric, 1.0, None))
            sel = finished(rows, "all") if stage == "all" else mask_rows(rows)  # each mask counted once
            sel = sel[sel["method"] == p.method]
            split = []
            if isinstance(p.setting, str) and p.setting:
                sel = sel[sel["setting"] == p.setting]
            else:
                split.append("setting")
            if pd.notna(p.sparsity):
                sel = sel[same_sparsity(sel["sparsity"], p.sparsity)]
            else:
                split.append("sparsity")
            sel, tier = best_tier(sel)
            ours = _ours_cell(sel, column, scale, split)
            release = _ours_cell(sel, RELEASE[p.metric], 1.0, split) if p.metric in RELEASE else ""
            tag = "" if tier is None else f" [{SMOKE if tier == 'smoke' else tier + ' tier'}]"
            value = "" if pd.isna(p.value) else f"{p.value:g}"
            if pd.notna(p.std):
                value = f"{value} ± {p.std:g}".strip()
            out.append({"setting": SETTING_NAMES.get(p.setting, p.setting) if isinstance(p.setting, str) else "",
                        "method": METHOD_NAMES.get(p.method, p.method),
                        "sparsity": pct(p.sparsity) if pd.notna(p.sparsity) else "", "metric": p.metric,
                        "paper": value, "certainty": p.certainty,
                        "ours": ours + tag if ours else "" if release else "not yet run",
                        "ours, release's definition": release + tag if release else "", "source": p.source,
                        "note": p.note})
        table = pd.DataFrame(out)
        if not table["ours, release's definition"].astype(bool).any():
            table = table.drop(columns="ours, release's definition")
        return table

    def show_paper_vs_ours(self, rows: pd.DataFrame) -> None:
        table = self.paper_vs_ours(rows)
        if table is None:
            display(Markdown("The paper's numbers for this artefact were not available to us "
                             f"(no `results/paper/{self.name}.csv`)."))
        else:
            show(table, "The paper's numbers (with their source and certainty) beside ours. Accuracies in %; "
                        "our accuracy is the best test accuracy over epochs, mean ± std over seeds.")
