"""`stmdit hest-sheet` on a small table with HEST's real header (HEST_v1_1_0.csv's 28 columns, the
byte-order mark its file starts with) and realistic rows: "Patient 1" shared by TENX153-156 whose
subseries name P1, P2, P3 and P5; blank patients; patients that do identify people (NCBI759-770)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from hest_format import write_hest_sample
from stmdit import cli
from stmdit.config import load_sample_sheet
from stmdit.hest import sample_files

HEADER = ["dataset_title", "id", "image_filename", "organ", "disease_state", "oncotree_code", "species", "patient",
          "st_technology", "data_publication_date", "license", "study_link", "download_page_link1", "inter_spot_dist",
          "spot_diameter", "spots_under_tissue", "preservation_method", "nb_genes", "treatment_comment",
          "pixel_size_um_embedded", "pixel_size_um_estimated", "magnification", "fullres_px_width",
          "fullres_px_height", "tissue", "disease_comment", "subseries", "hest_version_added"]
CRC_HD = "Characterization of immune cell populations in the tumor microenvironment of colorectal cancer using high definition spatial profiling"
CSCC = "Single Cell and Spatial Analysis of Human Squamous Cell Carcinoma [ST]"
SKIN = "Spatial transcriptomics landscape of non-communicable inflammatory skin diseases"
# id, dataset, organ, disease, oncotree, species, patient, technology, spot d/dist, spots, subseries
ROWS = [
    ("TENX153", CRC_HD, "Bowel", "Healthy", "", "Homo sapiens", "Patient 1", "Visium HD", "2", "2", "2018", "Visium HD, Sample P3 NAT"),
    ("TENX154", CRC_HD, "Bowel", "Cancer", "COAD", "Homo sapiens", "Patient 1", "Visium HD", "2", "2", "2220", "Visium HD, Sample P5 CRC"),
    ("TENX155", CRC_HD, "Bowel", "Cancer", "COAD", "Homo sapiens", "Patient 1", "Visium HD", "2", "2", "2281", "Visium HD, Sample P2 CRC"),
    ("TENX156", CRC_HD, "Bowel", "Cancer", "COAD", "Homo sapiens", "Patient 1", "Visium HD", "2", "2", "2179", "Visium HD, Sample P1 CRC"),
    ("NCBI770", CSCC, "Skin", "Cancer", "CSCC", "Homo sapiens", "Patient 2", "Spatial Transcriptomics", "150", "110", "666", "P2_ST_rep1"),
    ("NCBI769", CSCC, "Skin", "Cancer", "CSCC", "Homo sapiens", "Patient 2", "Spatial Transcriptomics", "150", "110", "646", "P2_ST_rep2"),
    ("NCBI767", CSCC, "Skin", "Cancer", "CSCC", "Homo sapiens", "Patient 5", "Spatial Transcriptomics", "150", "110", "590", "P5_ST_rep1"),
    ("NCBI526", SKIN, "Skin", "Healthy", "", "Homo sapiens", "", "Visium", "55", "100", "818", "Patient 1 non lesional psoriasis, rep 1 [P15509_1001]"),
    ("NCBI522", SKIN, "Skin", "Healthy", "", "Homo sapiens", "", "Visium", "55", "100", "587", "Patient 2 non lesional atopic dermatitis, rep 1 [P16357_1001]"),
    ("NCBI518", SKIN, "Skin", "Healthy", "", "Homo sapiens", "", "Visium", "55", "100", "546", "Patient 3 non lesional lichen planus, rep 1 [P16357_1005]"),
    ("NCBI689", "A cellular hierarchy in melanoma uncouples growth and metastasis", "Skin", "Cancer", "SKCM", "Mus musculus", "", "Visium", "55", "100", "4992", "Visium melanoma_2"),
    ("TENX158", "FFPE Human Skin Primary Dermal Melanoma with 5K Human Pan Tissue and Pathways Panel", "Skin", "Cancer", "SKCM", "Homo sapiens", "", "Xenium", "", "", "2179", ""),
]


def write_table(path: Path, rows=ROWS) -> Path:
    with open(path, "w", newline="", encoding="utf-8-sig") as fh:  # HEST's file starts with a BOM
        writer = csv.DictWriter(fh, fieldnames=HEADER)
        writer.writeheader()
        for (sample, title, organ, disease, oncotree, species, patient, tech, diameter, dist, spots, subseries) in rows:
            writer.writerow({
                "dataset_title": title, "id": sample, "image_filename": f"{sample}.tif", "organ": organ,
                "disease_state": disease, "oncotree_code": oncotree, "species": species, "patient": patient,
                "st_technology": tech, "data_publication_date": "7/11/24", "license": "CC BY 4.0",
                "inter_spot_dist": dist, "spot_diameter": diameter, "spots_under_tissue": spots,
                "preservation_method": "FFPE", "pixel_size_um_estimated": "0.2738", "magnification": "40x",
                "tissue": organ, "subseries": subseries, "hest_version_added": "v1_1_0",
            })
    return path


@pytest.fixture(scope="module")
def hest_root(tmp_path_factory, visium_folders) -> Path:
    """Every id of ROWS but NCBI518 and TENX158 has its three files (copies of one real sample)."""
    root = tmp_path_factory.mktemp("hest")
    write_hest_sample(visium_folders["sr1"], root, "SRC")
    source = sample_files(root, "SRC")
    for sample, *_ in ROWS:
        if sample in ("NCBI518", "TENX158"):
            continue
        for name, path in sample_files(root, sample).items():
            shutil.copy(source[name], path)
    return root


def hest_sheet(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["hest-sheet", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_patient_1_on_every_sample_of_a_dataset_tells_nobody_apart(tmp_path, hest_root, capsys):
    table, out = write_table(tmp_path / "HEST_v1_1_0.csv"), tmp_path / "crc.tsv"
    code, printed, err = hest_sheet(capsys, "--metadata", table, "--root", hest_root, "--cohort", "crc_hd",
                                    "--organ", "Bowel", "--technology", "Visium HD", "--out", out)
    assert code == 0, err
    sheet = load_sample_sheet(out)
    assert list(sheet["sample"]) == ["TENX153", "TENX154", "TENX155", "TENX156"]
    assert set(sheet["kind"]) == {"hest"} and set(sheet["path"]) == {str(hest_root)} and set(sheet["cohort"]) == {"crc_hd"}
    assert dict(zip(sheet["sample"], sheet["donor"])) == {
        "TENX153": "TENX153_Visium_HD_Sample_P3_NAT", "TENX154": "TENX153_Visium_HD_Sample_P5_CRC",
        "TENX155": "TENX153_Visium_HD_Sample_P2_CRC", "TENX156": "TENX153_Visium_HD_Sample_P1_CRC"}
    assert "(patient 'Patient 1' is on all 4 samples of its dataset)" in printed
    assert "Visium HD: 4 passed, 0 dropped; 3,928 spots and 4 donor(s) remain" in printed  # 982 spots each
    assert "Visium: 0 passed, 4 dropped" in printed and "dropped 4 (organ not in ['Bowel'])" in printed


def test_patients_blank_subseries_and_ids_become_donors(tmp_path, hest_root, capsys):
    table, out = write_table(tmp_path / "HEST_v1_1_0.csv"), tmp_path / "skin.tsv"
    code, printed, err = hest_sheet(capsys, "--metadata", table, "--root", hest_root, "--cohort", "skin",
                                    "--organ", "Skin", "--species", "Homo sapiens", "--out", out)
    assert code == 0, err
    donors = dict(zip(*load_sample_sheet(out)[["sample", "donor"]].T.to_numpy()))
    # patients that differ within their dataset identify people: Patient 2's two slides share a donor
    assert donors["NCBI770"] == donors["NCBI769"] == "NCBI767_Patient_2" and donors["NCBI767"] == "NCBI767_Patient_5"
    # a blank patient: dataset + subseries (the dataset's first id in the table names it, though NCBI518 has no files)
    assert donors["NCBI526"] == "NCBI518_Patient_1_non_lesional_psoriasis_rep_1_P15509_1001"
    assert donors["NCBI522"] == "NCBI518_Patient_2_non_lesional_atopic_dermatitis_rep_1_P16357_1001"
    assert "NCBI518" not in donors and "TENX158" not in donors and "NCBI689" not in donors
    assert "dropped 1 (missing files): NCBI518 (st, wsis and metadata files)" in printed
    assert "dropped 1 (missing files): TENX158 (st, wsis and metadata files)" in printed
    assert "dropped 1 (species not in ['Homo sapiens']): NCBI689" in printed
    assert "Spatial Transcriptomics: 3 passed, 0 dropped; 2,946 spots and 2 donor(s) remain" in printed
    assert "Visium: 2 passed, 2 dropped; 1,964 spots and 2 donor(s) remain" in printed
    assert "Xenium: 0 passed, 1 dropped; 0 spots and 0 donor(s) remain" in printed
    assert "  NCBI767_Patient_2: NCBI769, NCBI770 <- patient 'Patient 2'" in printed


def test_a_donor_file_overrides_the_rules(tmp_path, hest_root, capsys):
    table, out = write_table(tmp_path / "HEST_v1_1_0.csv"), tmp_path / "skin.tsv"
    mapping = tmp_path / "donors.tsv"
    mapping.write_text("id\tdonor\nNCBI526\tpsoriasis_P1\nNCBI522\tdermatitis_P2\n")
    code, printed, err = hest_sheet(capsys, "--metadata", table, "--root", hest_root, "--cohort", "skin",
                                    "--organ", "skin", "--species", "homo sapiens", "--donors", mapping, "--out", out)
    assert code == 0, err
    donors = dict(zip(*load_sample_sheet(out)[["sample", "donor"]].T.to_numpy()))
    assert donors["NCBI526"] == "psoriasis_P1" and donors["NCBI522"] == "dermatitis_P2"
    assert "psoriasis_P1: NCBI526 <- --donors donors.tsv" in printed


def test_fewer_than_three_donors_stop_with_one_line_and_no_sheet(tmp_path, hest_root, capsys):
    table, out = write_table(tmp_path / "HEST_v1_1_0.csv"), tmp_path / "cscc.tsv"
    code, printed, err = hest_sheet(capsys, "--metadata", table, "--root", hest_root, "--cohort", "cscc",
                                    "--technology", "Spatial Transcriptomics", "--oncotree", "CSCC", "--out", out)
    assert code == 2 and not out.exists() and printed == ""
    lines = [line for line in err.splitlines() if "error" in line]
    assert lines == [f"stmdit hest-sheet: error: {table}: cohort 'cscc' has 2 donor(s) after the filters and file checks"
                     " (NCBI767_Patient_2, NCBI767_Patient_5); a training cohort needs at least 3 (DeepSpot's"
                     " leave-one-donor-out plus a test donor)"]


def test_a_table_without_hest_columns_is_named(tmp_path, hest_root, capsys):
    table = tmp_path / "table.csv"
    table.write_text("id,organ\nTENX153,Bowel\n")
    code, _, err = hest_sheet(capsys, "--metadata", table, "--root", hest_root, "--cohort", "c", "--out", tmp_path / "o.tsv")
    assert code == 2 and f"{table}: HEST metadata table lacks column(s) ['dataset_title', 'species'," in err
