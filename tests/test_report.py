"""The six tables and the figures from small hand-made evaluation JSONs."""

from __future__ import annotations

import argparse
import io
import json

import pandas as pd
import pytest

from stmdit import eval_json, report
from stmdit.errors import InputError

COHORT, OOD = "tupro", "tcga"
MODELS = [
    {"model": "pixcell_b", "name": "PixCell-B", "family": "baseline", "sampler": "ddpm", "tables": [1, 2, 3, 4]},
    {"model": "adaln_p01", "name": "PixCell-GE-B (AdaLN DDPM)", "p": 0.1, "family": "adaln", "sampler": "ddpm",
     "baseline": "pixcell_b", "tables": [1, 2, 3, 4, 5]},
    {"model": "adaln_p02", "name": "PixCell-GE-B", "p": 0.2, "family": "adaln", "tables": [4]},
    # No "tables": in every table whose metric file it has.
    {"model": "ptpl_adaln_p06", "name": "PTPL-AdaLN-B-p06", "p": 0.6, "architecture": "PTPL-AdaLN", "ptpl": True,
     "baseline": "pixcell_b"},
    {"model": "pixcell_xl", "name": "PixCell-Pretrained-XL", "tables": [1]},  # listed, no results at all
]


def fid_entry(point, lo=None, hi=None, n=120):
    return {"point": point, "lo": lo, "hi": hi, "n_real": n, "n_gen": n, "n_boot": 1000, "seed": 42}


def fidelity_entry(auc, lo=None, hi=None):
    return {"ks": [50, 100], "curve": [auc - 0.01, auc + 0.01], "auc": auc, "lo": lo, "hi": hi}


def regressor_entry(real_auc, generated):
    return {"ks": [50, 100], "real": fidelity_entry(real_auc, real_auc - 0.01, real_auc + 0.01),
            "generated": generated,
            "null": {"by_construction": 0.0, "empirical": {**fidelity_entry(0.004, -0.030, 0.031), "n_perm": 1000},
                     "empirical_method": "spot correspondence permuted, 1000 permutations"}}


def common(model, smoke=False):
    return {"model": model, "encoders": {"h0mini": "smoke" if smoke else "real"}, "params": {"seed": 42},
            "inputs": [f"results/tiles/{model}"]}


def eval_docs():
    docs = []
    fids = {
        "pixcell_b": {"uni": fid_entry(330.7, 325.0, 336.2)},
        "adaln_p01": {"uni_ge": fid_entry(291.5, 285.0, 298.1), "uni": fid_entry(287.3, 281.0, 293.0),
                      "ge": fid_entry(628.0, 610.2, 640.9), "uncond": fid_entry(700.0)},
        "adaln_p02": {"uni_ge": fid_entry(294.7), "uni": fid_entry(293.1), "ge": fid_entry(620.4)},
        "ptpl_adaln_p06": {"uni_ge": fid_entry(280.0), "uni": fid_entry(281.0)},
    }
    for model, regimes in fids.items():
        per_tissue = {"uni_ge": {"labels": {"Tumor": fid_entry(250.0, 240.0, 260.0), "Stroma": fid_entry(300.0)},
                                 "skipped": {"Immune": "5 spots (< 50)"}, "min_spots": 50}} if "uni_ge" in regimes else {}
        docs.append(eval_json.fid_json(cohort=COHORT, regimes=regimes, per_tissue=per_tissue,
                                    features={"real": "real.zarr", "generated": {}},
                                    **common(model, smoke=model == "adaln_p02")))
    docs.append(eval_json.auc_json(cohort=COHORT, features={}, regressors={
        "oracle": regressor_entry(0.325, {"uni": fidelity_entry(0.229, 0.22, 0.24)}),
        "midnight_mlp": regressor_entry(0.130, {"uni": fidelity_entry(0.118)})}, **common("pixcell_b")))
    docs.append(eval_json.auc_json(cohort=COHORT, features={}, regressors={
        "oracle": regressor_entry(0.325, {"uni_ge": fidelity_entry(0.243, 0.231, 0.252), "uni": fidelity_entry(0.2)})},
        **common("adaln_p01")))
    oods = {
        "pixcell_b": {"uni": fid_entry(747.1)},
        "adaln_p01": {"uni_ge": fid_entry(663.8, 650.0, 677.0), "uni": fid_entry(670.5)},
        "ptpl_adaln_p06": {"uni_ge": fid_entry(783.3), "uni": fid_entry(772.8)},
    }
    for model, regimes in oods.items():
        docs.append(eval_json.ood_fid_json(cohort=OOD, regimes=regimes, n_subsample=10_000, seed=42, features={},
                                        **common(model)))
    pairs = {"T->S": {"source": "Tumor", "target": "Stroma", "transition": -0.9, "monotonicity": 0.1, "composite": -0.781, "n_ref": 100},
             "T->I": {"source": "Tumor", "target": "Immune", "transition": 0.1, "monotonicity": 0.2, "composite": 0.280, "n_ref": 100},
             "I->T": {"source": "Immune", "target": "Tumor", "transition": 0.1, "monotonicity": 0.2, "composite": 0.287, "n_ref": 100}}
    docs.append(eval_json.perturbation_json(cohort=COHORT, pairs=pairs, alphas=[0, 0.25, 0.5, 0.75, 1],
                                         monotonicity_weight=1.0, mode="centroid", **common("adaln_p01")))
    docs.append(eval_json.perturbation_json(cohort=COHORT, pairs={k: pairs[k] for k in ("T->S", "T->I")},
                                         alphas=[0, 0.25, 0.5, 0.75, 1], monotonicity_weight=1.0, mode="centroid",
                                         **common("ptpl_adaln_p06")))
    docs.append(eval_json.swap_fid_json(cohort=COHORT, deepspot=fid_entry(277.5, 270.1, 284.0), visium=fid_entry(285.6),
                                     features={}, **common("ptpl_adaln_p06")))
    return docs


@pytest.fixture(scope="module")
def docs():
    return eval_docs()


def row(df, label, column="Model"):
    return df.set_index(column).loc[label]


def test_table1_rows_columns_delta_and_missing(docs, tmp_path):
    df = report.build_table(1, docs, MODELS)
    assert list(df["Model"]) == ["PixCell-B", "PixCell-GE-B (AdaLN DDPM)", "PTPL-AdaLN-B-p06", "PixCell-Pretrained-XL"]
    assert list(report.markdown_cells(df).columns) == ["Model", "p", "UNI+GE", "UNI", "GE", "Delta"]
    assert row(df, "PixCell-GE-B (AdaLN DDPM)")["Delta"] == pytest.approx(4.2)
    assert row(df, "PixCell-B")["UNI+GE"] is None and row(df, "PixCell-B")["Delta"] is None

    report.write_table(df, tmp_path / "t1.tsv", tmp_path / "t1.md", ["stmdit 0.1.0; config hash abc"])
    md = (tmp_path / "t1.md").read_text()
    assert "| PixCell-GE-B (AdaLN DDPM) | 0.1 | 291.5 [285.0, 298.1] | 287.3 [281.0, 293.0] | 628.0 [610.2, 640.9] | +4.2 |" in md
    assert "| PixCell-B | - | - | 330.7 [325.0, 336.2] | - | - |" in md
    assert "| PixCell-Pretrained-XL | - | - | - | - | - |" in md
    assert "config hash abc" in md
    assert report.SMOKE_LINE not in md  # the smoke-encoder model adaln_p02 is only in Table 4
    tsv = pd.read_csv(tmp_path / "t1.tsv", sep="\t", comment="#", dtype=str)
    assert list(tsv.columns[:5]) == ["Model", "p", "UNI+GE", "UNI+GE lo", "UNI+GE hi"]
    assert tsv.set_index("Model").loc["PixCell-B", "GE"] == "-"
    assert float(tsv.set_index("Model").loc["PixCell-GE-B (AdaLN DDPM)", "UNI+GE hi"]) == 298.1
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_fid_tables_print_the_bootstrap_mean_inside_its_interval_and_keep_the_old_fields(tmp_path):
    import re

    import numpy as np

    from stmdit import metrics

    rng = np.random.default_rng(1)
    real = rng.normal(size=(40, 24))
    regimes = {"uni": metrics.fid_bootstrap(real, real + 0.3 * rng.normal(size=real.shape), n_boot=30),
               "uncond": metrics.fid_bootstrap(real, rng.normal(size=real.shape) + 1.0, n_boot=30)}
    assert regimes["uni"]["point"] < regimes["uni"]["lo"]  # what Table 1 used to print outside its interval
    path = tmp_path / "fid.json"
    eval_json.write_eval_json(path, eval_json.fid_json(model="m", cohort=COHORT, regimes=regimes, per_tissue={},
                                                 features={}, **{k: v for k, v in common("m").items() if k != "model"}))
    stored = json.loads(path.read_text())["regimes"]
    for entry in stored.values():  # the fields older readers (and the before-stop hook) use
        assert {"point", "mean", "lo", "hi", "n_boot", "n_real", "n_gen"} <= set(entry)
    assert stored["uni"]["hi"] < stored["uncond"]["lo"]  # a disjoint-interval comparison still reads the same keys

    df = report.build_table(1, [eval_json.load_eval_json(path)], [{"model": "m", "name": "M"}])
    cell = report.markdown_cells(df).loc[0, "UNI"]
    shown, lo, hi, point = map(float, re.fullmatch(r"([\d.]+) \[([\d.]+), ([\d.]+)\] \(point ([\d.]+)\)", cell).groups())
    assert lo <= shown <= hi
    assert shown == pytest.approx(stored["uni"]["mean"], abs=0.05) and point == pytest.approx(stored["uni"]["point"], abs=0.05)
    assert any("bootstrap mean [95% percentile interval] over 30" in note for note in df.attrs["notes"])
    tsv = pd.read_csv(io.StringIO(report.render_tsv(df)), sep="\t", dtype=str)
    assert {"UNI", "UNI lo", "UNI hi", "UNI point"} <= set(tsv.columns)


def test_table4_has_the_full_sweep_and_the_smoke_footer(docs, tmp_path):
    df = report.build_table(4, docs, MODELS)
    assert list(df["Model"]) == ["PixCell-B", "PixCell-GE-B (AdaLN DDPM)", "PixCell-GE-B", "PTPL-AdaLN-B-p06"]
    assert row(df, "PixCell-GE-B")["Delta"] == pytest.approx(1.6)
    report.write_table(df, tmp_path / "t4.tsv", tmp_path / "t4.md", [])
    assert report.SMOKE_LINE in (tmp_path / "t4.md").read_text()
    assert f"# {report.SMOKE_LINE}" in (tmp_path / "t4.tsv").read_text()


def test_table2_ceiling_null_and_percent(docs):
    df = report.build_table(2, docs, MODELS)
    assert list(df["Model"]) == ["Upper bound (real tiles)", "Null", "PixCell-B", "PixCell-GE-B (AdaLN DDPM)"]
    cells = report.markdown_cells(df).set_index("Model")
    assert list(cells.columns) == ["Oracle", "Midnight+MLP"]
    assert cells.loc["Upper bound (real tiles)", "Oracle"] == "0.325 [0.315, 0.335] (100%)"
    assert cells.loc["Null", "Oracle"] == "0.004 [-0.030, 0.031]"  # measured, with its interval
    assert cells.loc["PixCell-GE-B (AdaLN DDPM)", "Oracle"] == "0.243 [0.231, 0.252] (75%)"  # its UNI+GE regime
    assert cells.loc["PixCell-B", "Oracle"] == "0.229 [0.220, 0.240] (70%)"  # baseline: UNI regime
    assert cells.loc["PixCell-GE-B (AdaLN DDPM)", "Midnight+MLP"] == "-"
    assert row(df, "PixCell-B")["Midnight+MLP %"] == pytest.approx(100 * 0.118 / 0.130)
    assert any("null: spot correspondence permuted, 1000 permutations" in note for note in df.attrs["notes"])


def test_table3_deltas(docs):
    df = report.build_table(3, docs, MODELS)
    assert list(df["Model"]) == ["PixCell-B", "PixCell-GE-B (AdaLN DDPM)", "PTPL-AdaLN-B-p06"]
    assert list(report.markdown_cells(df).columns) == ["Model", "FID", "Delta_baseline", "Delta_OOD(GE)"]
    ge = row(df, "PixCell-GE-B (AdaLN DDPM)")
    assert ge["FID"] == 663.8
    assert ge["Delta_baseline"] == pytest.approx(747.1 - 663.8)
    assert ge["Delta_OOD(GE)"] == pytest.approx(670.5 - 663.8)
    assert row(df, "PTPL-AdaLN-B-p06")["Delta_baseline"] == pytest.approx(-36.2)
    cells = report.markdown_cells(df).set_index("Model")
    assert cells.loc["PixCell-B", "Delta_baseline"] == "-" and cells.loc["PixCell-B", "FID"] == "747.1"
    assert cells.loc["PTPL-AdaLN-B-p06", "Delta_OOD(GE)"] == "-10.5"


def test_table5_pairs_mean_and_missing_pair(docs):
    df = report.build_table(5, docs, MODELS)
    assert list(df.columns) == ["Model", "p", "T->S", "T->I", "I->T", "mean"]
    assert list(df["Model"]) == ["PixCell-GE-B (AdaLN DDPM)", "PTPL-AdaLN-B-p06"]
    assert row(df, "PixCell-GE-B (AdaLN DDPM)")["mean"] == pytest.approx((-0.781 + 0.280 + 0.287) / 3)
    cells = report.markdown_cells(df).set_index("Model")
    assert cells.loc["PixCell-GE-B (AdaLN DDPM)", "mean"] == "-0.071"
    assert cells.loc["PTPL-AdaLN-B-p06", "I->T"] == "-" and cells.loc["PTPL-AdaLN-B-p06", "T->I"] == "+0.280"
    assert cells.loc["PTPL-AdaLN-B-p06", "mean"] == "-"  # not a three-pair mean


def test_table6_delta(docs, tmp_path):
    df = report.build_table(6, docs, MODELS)
    assert list(df["Architecture"]) == ["PTPL-AdaLN"]
    assert list(report.markdown_cells(df).columns) == ["Architecture", "DeepSpot-cond", "Visium-cond", "Delta"]
    assert df.loc[0, "Delta"] == pytest.approx(285.6 - 277.5)
    report.write_table(df, tmp_path / "t6.tsv", tmp_path / "t6.md", [])
    assert "| PTPL-AdaLN | 277.5 [270.1, 284.0] | 285.6 | +8.1 |" in (tmp_path / "t6.md").read_text()


def test_unknown_table_and_duplicate_cohorts(docs):
    with pytest.raises(InputError, match="tables 1 to 6"):
        report.build_table(7, docs, MODELS)
    other_cohort = dict(docs[0], cohort="other")
    with pytest.raises(InputError, match="two fid results"):
        report.build_table(1, [*docs, other_cohort], MODELS)
    only_other = report.build_table(1, [*docs, other_cohort], MODELS, cohort="other")
    # Listed models stay (with "-"), the unlisted PTPL model has no result in this cohort.
    assert list(only_other["Model"]) == ["PixCell-B", "PixCell-GE-B (AdaLN DDPM)", "PixCell-Pretrained-XL"]
    assert row(only_other, "PixCell-B")["UNI"] == 330.7 and row(only_other, "PixCell-GE-B (AdaLN DDPM)")["UNI"] is None


def test_bad_eval_json_names_the_file(tmp_path):
    path = tmp_path / "fid.json"
    path.write_text(json.dumps({"metric": "fid", "model": "m", "cohort": "c", "regimes": {"uni": {"point": 1.0}}}))
    with pytest.raises(InputError, match="lacks") as err:
        eval_json.load_eval_json(path)
    assert str(path) in str(err.value)
    doc = eval_docs()[0]
    doc["regimes"]["uni"].pop("lo")
    with pytest.raises(InputError, match=r"regimes.uni lacks \['lo'\]"):
        eval_json.write_eval_json(tmp_path / "out.json", doc)
    assert not (tmp_path / "out.json").exists()
    with pytest.raises(InputError, match="unknown keys"):
        report.ModelRow.from_dict({"model": "m", "colour": "red"})


def test_cli_table_and_figures(docs, tmp_path):
    paths = []
    for i, doc in enumerate(docs):
        paths.append(tmp_path / f"{doc['model']}_{doc['metric']}_{i}.json")
        eval_json.write_eval_json(paths[-1], doc)
    assert eval_json.load_eval_json(paths[0])["regimes"] == docs[0]["regimes"]
    models = tmp_path / "models.json"
    models.write_text(json.dumps({"models": MODELS}))
    parser = argparse.ArgumentParser()
    report.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "tables"
    args = parser.parse_args(["table", "--n", "4", "--evals", *map(str, paths), "--models-json", str(models),
                              "--out-tsv", str(out / "table4.tsv"), "--out-md", str(out / "table4.md"),
                              "--config-hash", "cafe1234"])
    args.func(args)
    md = (out / "table4.md").read_text()
    assert md.startswith("# Table 4:") and "config hash cafe1234" in md and report.SMOKE_LINE in md
    assert "adaln_p02_fid_2.json" in md  # inputs listed in the footer

    for kind, name in (("per-tissue-fid", "tissue.png"), ("auc-curves", "auc.png")):
        args = parser.parse_args(["figure", "--kind", kind, "--evals", *map(str, paths), "--out", str(tmp_path / name),
                                  "--models-json", str(models)])
        args.func(args)
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    with pytest.raises(InputError, match="per-tissue FID for regime 'ge'"):
        report.plot_per_tissue_fid(docs, tmp_path / "none.png", regime="ge")
