"""Config and sample-sheet validation: bad input names the file, the key and the value."""

from __future__ import annotations

import pytest
import yaml

from stmdit.config import check_renamed_results, load_config, load_sample_sheet, validate_config
from stmdit.errors import InputError

SHEET_HEADER = "sample\tdonor\tcohort\tkind\tpath\timage\tlabels\tmpp\n"


def write_sheet(tmp_path, rows, header=SHEET_HEADER):
    path = tmp_path / "samples.tsv"
    path.write_text(header + "".join(rows))
    return path


def test_default_config_is_valid_and_defaults_are_filled(repo_root):
    config = load_config(repo_root / "config.yaml")
    assert config["spots"]["min_foreground"] == 0.55
    assert config["spots"]["min_laplacian_var"] == 20
    assert config["expression"]["n_hvg"] == 3000
    assert config["features"]["encoders"]["uni2h"]["arch"] == {}
    filled = validate_config({"samples": "x.tsv"})
    assert filled["split"]["seed"] == 42 and filled["spots"]["exclude_labels"] == ["Whitespace", "Mixed"]


def test_config_error_names_key_and_value(tmp_path, repo_root):
    config = yaml.safe_load((repo_root / "config.yaml").read_text())
    config["spots"]["min_foreground"] = "lots"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(InputError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "spots.min_foreground" in message and "'lots'" in message


def test_config_rejects_unknown_key():
    with pytest.raises(InputError, match="spots"):
        validate_config({"samples": "x.tsv", "spots": {"min_forground": 0.5}})


def test_a_renamed_config_key_names_its_new_name(tmp_path, repo_root):
    config = yaml.safe_load((repo_root / "config.yaml").read_text())
    config["sample"] = config.pop("sampler")
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(InputError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: config key sample was renamed to sampler: rename the section (its keys are unchanged)"


def test_a_results_folder_left_under_its_old_name_stops_the_run(tmp_path):
    check_renamed_results(["results/tiles/M/c/uni.zarr"], tmp_path)
    (tmp_path / "results" / "samples").mkdir(parents=True)
    with pytest.raises(InputError, match=r"results/samples/ was renamed to results/tiles/: `mv results/samples "
                                         r"results/tiles` keeps what it holds"):
        check_renamed_results([], tmp_path)
    (tmp_path / "results" / "tiles").mkdir()
    check_renamed_results([], tmp_path)


def test_demo_sheet_is_valid(repo_root):
    sheet = load_sample_sheet(repo_root / "workflow" / "demo" / "samples.tsv")
    assert sheet["donor"].nunique() >= 4 and (sheet["kind"] == "visium").sum() >= 6
    assert (sheet["kind"] == "he").sum() == 1


@pytest.mark.parametrize(
    "rows, header, expected",
    [
        (["s1\td1\tc\tvisium\tp\t\t\t\n", "s1\td2\tc\tvisium\tq\t\t\t\n"], SHEET_HEADER, "duplicate sample"),
        (["s1\td1\tc\tvisium\tp\t\t\t\tx\n"], SHEET_HEADER.strip() + "\tcolour\n", "unknown column"),
        (["../evil\td1\tc\tvisium\tp\t\t\t\n"], SHEET_HEADER, "'../evil'"),
        (["s 1\td1\tc\tvisium\tp\t\t\t\n"], SHEET_HEADER, "column sample"),
        (["s1\td1\tc\tslide\tp\t\t\t\n"], SHEET_HEADER, "column kind"),
        (["s1\td1\tc\the\tp.svs\t\t\t-1\n"], SHEET_HEADER, "column mpp"),
        (["s1\td1\tc\tvisium\tp\t\t\t\n"], "sample\tdonor\tcohort\tkind\n", "missing required column"),
    ],
)
def test_bad_sample_sheets(tmp_path, rows, header, expected):
    path = write_sheet(tmp_path, rows, header)
    with pytest.raises(InputError) as err:
        load_sample_sheet(path)
    assert str(path) in str(err.value) and expected in str(err.value)


def sheet_of(rows) -> "pd.DataFrame":
    import pandas as pd

    table = pd.DataFrame(rows, columns=["sample", "donor", "cohort", "kind"])
    return table.set_index("sample", drop=False)


def test_unset_cohorts_default_to_the_sheets_only_visium_and_he_cohorts():
    from stmdit.config import resolve_cohorts

    config = validate_config({"samples": "s.tsv"})
    one = sheet_of([("a", "d1", "mine", "visium"), ("b", "d2", "mine", "visium"), ("t", "x", "tcga", "he")])
    cohort, ood, notes = resolve_cohorts(config, one, "s.tsv")
    assert (cohort, ood) == ("mine", ["tcga"]) and "only Visium cohort 'mine'" in notes[0] and "'tcga'" in notes[1]
    two = sheet_of([("a", "d1", "mine", "visium"), ("b", "d2", "yours", "visium"), ("t", "x", "tcga", "he"),
                    ("u", "y", "cptac", "he")])
    with pytest.raises(InputError, match=r"train.cohort is not set .* 2 Visium cohorts \(Visium: mine, yours"):
        resolve_cohorts(config, two, "s.tsv")
    config["train"]["cohort"] = "mine"
    with pytest.raises(InputError, match=r"ood_cohorts is not set .* H&E-only: tcga, cptac"):
        resolve_cohorts(config, two, "s.tsv")
    config["train"]["ood_cohorts"] = []
    assert resolve_cohorts(config, two, "s.tsv")[:2] == ("mine", [])
    config["train"]["cohort"] = "demo"
    with pytest.raises(InputError, match=r"train.cohort = 'demo': no such cohort in the sample sheet \(Visium: mine, yours") as err:
        resolve_cohorts(config, two, "s.tsv")
    assert err.value.path == "s.tsv"


def test_required_test_donor_and_unknown_test_donors():
    from stmdit.config import check_test_donors

    sheet = sheet_of([("a", "d1", "mine", "visium"), ("b", "d2", "mine", "visium")])
    config = validate_config({"samples": "s.tsv", "split": {"require_test_donors": True}})
    with pytest.raises(InputError, match=r"requires the held-out test donor of cohort 'mine' .* one of d1, d2"):
        check_test_donors(config, sheet, "mine", "config")
    config["split"]["test_donors"] = {"mine": ["d3"]}
    with pytest.raises(InputError, match=r"split.test_donors.mine: \['d3'\] are not donors"):
        check_test_donors(config, sheet, "mine", "config")
    config["split"]["test_donors"] = {"mine": ["d2"]}
    check_test_donors(config, sheet, "mine", "config")


def test_paper_configuration_budget_labels_and_test_donor(repo_root):
    from stmdit.models_config import resolve_models

    config = load_config(repo_root / "workflow" / "paper" / "config.yaml")
    assert config["split"]["require_test_donors"] is True and config["evaluate"]["perturbation"]["mode"] == "centroid"
    config["train"]["cohort"] = "10x_TuPro"
    models = resolve_models(config)
    assert all(m.settings["epochs"] == 1000 and "steps" not in m.settings for m in models.values())
    named = [m for m in models.values() if m.name == "PTPL-XAttn-PMA-B"]
    assert [(m.model, m.p, m.tables) for m in named] == [("PTPL-XAttn-PMA-B-p05", 0.5, (3,))]
    # a model's own budget replaces the inherited one; both at once is refused
    config["models"]["PixCell-B"]["settings"] = {"steps": 10}
    assert resolve_models(config)["PixCell-B"].settings["steps"] == 10
    assert "epochs" not in resolve_models(config)["PixCell-B"].settings
    config["models"]["PixCell-B"]["settings"] = {"steps": 10, "epochs": 2}
    with pytest.raises(InputError, match="models.PixCell-B.settings: give the training budget as steps or as epochs"):
        resolve_models(config)


def test_paper_configuration_samples_with_ddim_and_euler_at_50_steps(repo_root):
    """The paper's samplers (D.3) are the paper configuration's, explicitly; a solver that cannot
    sample one of its models is refused when the workflow is parsed, naming the model."""
    import yaml

    from stmdit.models_config import resolve_models

    raw = yaml.safe_load((repo_root / "workflow" / "paper" / "config.yaml").read_text())
    assert raw["sampler"]["solver"] == "default" and raw["sampler"]["steps"] == 50
    config = load_config(repo_root / "workflow" / "paper" / "config.yaml")
    config["train"]["cohort"] = "10x_TuPro"
    objectives = {m.objective for m in resolve_models(config).values()}
    assert objectives == {"ddpm", "flow"}
    config["sampler"]["solver"] = "heun"
    with pytest.raises(InputError, match=r"sampler.solver = 'heun': does not sample ddpm models such as \S+ \(use one "
                                         r"of default, dpmpp_2m\)"):
        resolve_models(config)


def test_models_table_names_the_configured_solver(repo_root):
    from stmdit.models_config import resolve_models

    config = load_config(repo_root / "config.yaml")
    assert {m.sampler for m in resolve_models(config).values()} == {"unipc"}  # the demo's flow models
    config["sampler"]["solver"] = "default"
    assert {m.sampler for m in resolve_models(config).values()} == {"euler"}
    config["sampler"]["solver"] = "heun"
    assert {m.sampler for m in resolve_models(config).values()} == {"heun"}
    for entry in config["models"].values():
        entry["objective"] = "flow_x0"
    with pytest.raises(InputError, match=r"sampler.solver = 'heun': does not sample flow_x0 models such as \S+ "
                                         r"\(use one of default, unipc\)"):
        resolve_models(config)  # Heun's last correction would multiply an x0 model's error ~26x


def test_unipc_is_a_flow_solver_in_config(repo_root):
    """`sampler.solver: unipc` passes the schema and names the demo's flow models' sampler; the paper
    configuration, which has ddpm models too, refuses it at parse time."""
    from stmdit.models_config import resolve_models

    raw = yaml.safe_load((repo_root / "config.yaml").read_text())
    raw["sampler"]["solver"] = "unipc"
    config = validate_config(raw, repo_root / "config.yaml")
    assert {m.sampler for m in resolve_models(config).values()} == {"unipc"}
    paper = load_config(repo_root / "workflow" / "paper" / "config.yaml")
    paper["train"]["cohort"] = "10x_TuPro"
    paper["sampler"]["solver"] = "unipc"
    with pytest.raises(InputError, match=r"sampler.solver = 'unipc': does not sample ddpm models"):
        resolve_models(paper)
    raw["sampler"]["solver"] = "unipc2"
    with pytest.raises(InputError, match="unipc2"):
        validate_config(raw, repo_root / "config.yaml")
