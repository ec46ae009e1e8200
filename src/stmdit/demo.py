"""The embedded demo cohort: complete Space Ranger folders and one H&E-only slide, built
deterministically from one real H&E image (OpenSlide's CMU-1-Small-Region, human skin, 20x).

    stmdit demo-data --samples workflow/demo/samples.tsv --source-image resources/cmu_small_region.svs
        --seed 0 --n-genes 600

Every sample-sheet row whose files lie under the demo root (`results/resources/demo/`) is made:

- `visium` rows: the source image (or, with --region-px, a square crop of it) with its own
  rotation, flip, 0.9-1.1x rescaling and mild stain jitter in optical-density space, written as the
  full-resolution `image`, and its own Visium lattice offset; `outs/spatial/` with hires and
  lowres PNGs, `scalefactors_json.json` and the spot positions (rows alternate between the 1.x
  headerless `tissue_positions_list.csv` and the 2.x `tissue_positions.csv`); the Visium grid at the
  image's real scale (55 um spots, 100 um centre to centre, 0.499 um/px); `outs/filtered_feature_bc_matrix.h5`
  in 10x's HDF5 v3 layout with real human gene symbols; and the `labels` CSV.
- `he` rows: another transformed region written as the slide image (um/px comes from the sheet).

Counts carry the image's signal. For each spot the disc's pixels give four morphology scores
(hematoxylin optical density = nuclear density, eosin optical density, nuclear texture, blood
redness) and a background fraction, standardised over all demo slides (so one image feature means
the same expression on every slide). Gene programs (tumour, stroma, immune, blood, epidermis, see
PROGRAMS) have log-rates linear in those scores; every gene also has a donor effect, the library
size falls with background, and counts are negative-binomial (gamma-Poisson). Labels follow the
same scores: Whitespace for mostly background, else the program with the largest score, and a
seeded 5% of spots "Mixed".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from stmdit.config import load_sample_sheet
from stmdit.errors import InputError
from stmdit.provenance import atomic_path, provenance
from stmdit.spots import crop_patches, disc_mask, hex_grid
from stmdit.visium import read_rgb_image

log = logging.getLogger(__name__)

SOURCE_MPP = 0.499  # um/px of CMU-1-Small-Region
SPOT_DIAMETER_UM = 55.0
SPOT_SPACING_UM = 100.0
SCALE_RANGE = (0.9, 1.1)  # tissue magnification jitter of a slide (the Visium geometry stays 55/100 um)
HIRES_SIDE = 1000  # longest side of tissue_hires_image.png
LOWRES_SIDE = 300  # longest side of tissue_lowres_image.png
MIXED_FRACTION = 0.05
DONOR_EFFECT_SD = 0.15  # per-gene log-rate shift of each donor
BACKGROUND_WHITESPACE = 0.5  # spots with more background than this are labelled Whitespace
IN_TISSUE_BACKGROUND = 0.9  # spots with less background than this are in tissue

# Ruifrok & Johnston stain vectors (rows: hematoxylin, eosin, residual) in optical density.
_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
STAIN_MATRIX = _STAINS / np.linalg.norm(_STAINS, axis=1, keepdims=True)

# Program -> (label, marker genes). Log-rates of a program's genes rise with its morphology score.
PROGRAMS = {
    "tumour": ("Tumor", ["MLANA", "PMEL", "TYR", "DCT", "MITF", "SOX10", "S100B", "TYRP1", "MKI67", "TOP2A",
                         "CDK4", "CCND1", "PRAME", "BIRC5", "CENPF", "MCM2", "PCNA", "TPX2"]),
    "stroma": ("Stroma", ["COL1A1", "COL1A2", "COL3A1", "COL5A1", "COL6A1", "COL6A2", "COL6A3", "DCN", "LUM",
                          "FN1", "SPARC", "POSTN", "VIM", "ACTA2", "TAGLN", "PDGFRB", "FAP", "THY1", "PECAM1",
                          "VWF", "CDH5"]),
    "immune": ("Immune", ["PTPRC", "CD3E", "CD3D", "CD2", "CD4", "CD8A", "CD19", "MS4A1", "CD79A", "CD79B",
                          "IGKC", "IGHG1", "IGHM", "JCHAIN", "CCL19", "CCL21", "CXCL13", "LTB", "CD74",
                          "HLA-DRA", "HLA-DRB1", "HLA-DPA1", "HLA-DPB1", "GZMB", "NKG7", "LYZ", "CD68", "CD163"]),
    "blood": ("Blood/Necrosis", ["HBB", "HBA1", "HBA2", "HBD", "ALAS2", "CA1", "SLC4A1", "GYPA"]),
    "epidermis": ("Stroma", ["KRT5", "KRT14", "KRT10", "KRT1", "KRT15", "KRT17", "KRT6A", "KRT16", "LOR", "FLG",
                             "IVL", "SFN", "DSP", "PERP"]),
}
# Which morphology score drives each program (scores: hema, eosin, texture, red).
PROGRAM_SCORE = {"tumour": "hema", "stroma": "eosin", "immune": "texture", "blood": "red", "epidermis": "eosin"}
SCORES = ("hema", "eosin", "texture", "red")


def gene_panel(n_genes: int) -> list[str]:
    """The first `n_genes` symbols of the shipped panel (program markers first)."""
    text = resources.files("stmdit").joinpath("data/demo_genes.txt").read_text()
    genes = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    markers = [g for _, members in PROGRAMS.values() for g in members]
    if n_genes < len(markers) or n_genes > len(genes):
        raise ValueError(f"n_genes must be between {len(markers)} and {len(genes)}, got {n_genes}")
    return genes[:n_genes]


def _rng(seed: int, *parts: str) -> np.random.Generator:
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def optical_density(rgb: np.ndarray) -> np.ndarray:
    return -np.log((rgb.astype(np.float32) + 1.0) / 256.0)


def stain_concentrations(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) hematoxylin, eosin, residual concentrations (colour deconvolution)."""
    od = optical_density(rgb).reshape(-1, 3)
    return (od @ np.linalg.inv(STAIN_MATRIX).astype(np.float32)).reshape(rgb.shape)


def from_concentrations(conc: np.ndarray) -> np.ndarray:
    od = conc.reshape(-1, 3) @ STAIN_MATRIX.astype(np.float32)
    rgb = 256.0 * np.exp(-od) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(conc.shape)


def transformed_region(source: np.ndarray, rng: np.random.Generator, side: int | None) -> np.ndarray:
    """A rotated/flipped, slightly rescaled copy of `source` with a mild stain jitter: the whole
    image when `side` is None, else a random side x side crop of it."""
    image = np.rot90(source, k=int(rng.integers(4)))
    if rng.random() < 0.5:
        image = image[:, ::-1]
    scale = rng.uniform(*SCALE_RANGE)
    height, width = image.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    height, width = image.shape[:2]
    if side is not None:
        if height < side or width < side:
            raise ValueError(f"source image {width} x {height} is smaller than a {side} px demo region")
        top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
        image = image[top:top + side, left:left + side]
    conc = stain_concentrations(np.ascontiguousarray(image))
    conc[..., 0] *= rng.uniform(0.9, 1.1)  # hematoxylin intensity
    conc[..., 1] *= rng.uniform(0.9, 1.1)  # eosin intensity
    return from_concentrations(conc)


def offset_grid(height: int, width: int, rng: np.random.Generator) -> pd.DataFrame:
    """The Visium grid of a height x width slide, its origin shifted by a random lattice offset (so
    slides of the same tissue sample different spot positions)."""
    diameter_px, spacing_px = SPOT_DIAMETER_UM / SOURCE_MPP, SPOT_SPACING_UM / SOURCE_MPP
    dy, dx = rng.uniform(0, spacing_px * math.sqrt(3)), rng.uniform(0, spacing_px)
    grid = hex_grid(int(height - dy), int(width - dx), diameter_px, spacing_px)
    grid["pxl_row"] += dy
    grid["pxl_col"] += dx
    return grid


def downscaled(image: np.ndarray, longest_side: int) -> tuple[np.ndarray, float]:
    scale = longest_side / max(image.shape[:2])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    ok, encoded = cv2.imencode(path.suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"cannot encode {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())


# --------------------------------------------------------------------------------------------
# Spots, morphology, counts
# --------------------------------------------------------------------------------------------


def morphology_scores(image: np.ndarray, spots: pd.DataFrame, diameter_px: float) -> pd.DataFrame:
    """Per-spot morphology from the pixels of its disc: mean hematoxylin and eosin density,
    hematoxylin texture (std), redness, and the background (near-white) fraction."""
    side = max(1, int(round(diameter_px)))
    mask = disc_mask(side)
    patches = crop_patches(image, spots["pxl_row"].to_numpy(), spots["pxl_col"].to_numpy(), side)
    conc = stain_concentrations(patches.reshape(-1, side, 3)).reshape(patches.shape)
    grey = patches.mean(axis=-1)
    rgb = patches.astype(np.float32)
    redness = (rgb[..., 0] - 0.5 * (rgb[..., 1] + rgb[..., 2])) / 255.0
    return pd.DataFrame({
        "hema": [c[..., 0][mask].mean() for c in conc],
        "eosin": [c[..., 1][mask].mean() for c in conc],
        "texture": [c[..., 0][mask].std() for c in conc],
        "red": [r[mask].mean() for r in redness],
        "background": [(g[mask] > 215).mean() for g in grey],
    }, index=spots.index)


def standardised(scores: pd.DataFrame, reference: tuple[pd.Series, pd.Series] | None = None) -> pd.DataFrame:
    """Morphology scores as z-scores, against `reference` (mean, std) or their own."""
    z = scores[list(SCORES)]
    mean, std = reference if reference is not None else (z.mean(), z.std(ddof=0))
    return (z - mean) / std.replace(0, 1)


@dataclass(frozen=True)
class GeneModel:
    """Per-gene baseline log-rate, program loadings on the morphology scores, NB dispersion."""

    genes: list[str]
    base: np.ndarray  # (G,) log-rate share
    loadings: np.ndarray  # (G, len(SCORES))
    dispersion: float = 5.0  # gamma shape: NB variance mu + mu^2 / dispersion

    @classmethod
    def make(cls, genes: list[str], rng: np.random.Generator) -> "GeneModel":
        base = rng.normal(0.0, 1.0, len(genes))
        housekeeping = [i for i, g in enumerate(genes) if g.startswith(("RPL", "RPS", "MT-", "ACTB", "GAPDH"))]
        base[housekeeping] += 2.0
        loadings = rng.normal(0.0, 0.05, (len(genes), len(SCORES)))  # weak coupling for every gene
        index = {g: i for i, g in enumerate(genes)}
        for program, (_, members) in PROGRAMS.items():
            column = SCORES.index(PROGRAM_SCORE[program])
            for gene in members:
                loadings[index[gene], column] = rng.uniform(0.6, 1.2)
                base[index[gene]] += 0.5
        return cls(genes, base, loadings)


def simulate_counts(model: GeneModel, z: pd.DataFrame, background: np.ndarray, donor_effect: np.ndarray,
                    rng: np.random.Generator) -> sp.csr_matrix:
    """Negative-binomial counts (spots x genes) whose rates follow morphology and donor."""
    log_rate = model.base[None, :] + z.to_numpy() @ model.loadings.T + donor_effect[None, :]
    share = np.exp(log_rate - log_rate.max(axis=1, keepdims=True))
    share /= share.sum(axis=1, keepdims=True)
    library = rng.lognormal(math.log(3000.0), 0.3, len(z)) * np.clip(1.0 - background, 0.05, 1.0)
    mu = share * library[:, None]
    counts = rng.poisson(rng.gamma(model.dispersion, mu / model.dispersion))
    return sp.csr_matrix(counts.astype(np.int32))


def spot_labels(z: pd.DataFrame, background: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    score_label = {"hema": "Tumor", "eosin": "Stroma", "texture": "Immune", "red": "Blood/Necrosis"}
    labels = np.array([score_label[s] for s in z[list(SCORES)].idxmax(axis=1)], dtype=object)
    labels[rng.random(len(z)) < MIXED_FRACTION] = "Mixed"
    labels[background > BACKGROUND_WHITESPACE] = "Whitespace"
    return labels


def barcodes(n: int, rng: np.random.Generator) -> list[str]:
    """Unique Visium-like barcodes (16 nt + "-1")."""
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        code = "".join(rng.choice(list("ACGT"), 16)) + "-1"
        if code not in seen:
            seen.add(code)
            out.append(code)
    return out


def write_10x_h5(path: Path, counts: sp.csr_matrix, barcodes_: list[str], genes: list[str], library_id: str) -> None:
    """A 10x Genomics HDF5 feature-barcode matrix (v3 layout: features x barcodes, CSC by barcode)."""
    matrix = counts.T.tocsc()  # genes x spots; 10x stores columns = barcodes
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        f.attrs["library_ids"] = np.array([library_id.encode()])
        f.attrs["chemistry_description"] = "Spatial 3' v1 (stmdit demo)"
        f.attrs["software_version"] = "stmdit demo"
        group = f.create_group("matrix")
        group.create_dataset("barcodes", data=np.array([b.encode() for b in barcodes_]))
        group.create_dataset("data", data=matrix.data.astype(np.int32), compression="gzip")
        group.create_dataset("indices", data=matrix.indices.astype(np.int64), compression="gzip")
        group.create_dataset("indptr", data=matrix.indptr.astype(np.int64))
        group.create_dataset("shape", data=np.array(matrix.shape, dtype=np.int32))
        features = group.create_group("features")
        features.create_dataset("id", data=np.array([f"DEMO{i:05d}".encode() for i in range(len(genes))]))
        features.create_dataset("name", data=np.array([g.encode() for g in genes]))
        features.create_dataset("feature_type", data=np.array([b"Gene Expression"] * len(genes)))
        features.create_dataset("genome", data=np.array([b"GRCh38"] * len(genes)))
        features.create_dataset("_all_tag_keys", data=np.array([b"genome"]))


def write_positions(path: Path, positions: pd.DataFrame, with_header: bool) -> None:
    columns = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    table = positions[columns].copy()
    table["pxl_row_in_fullres"] = table["pxl_row_in_fullres"].round().astype(int)
    table["pxl_col_in_fullres"] = table["pxl_col_in_fullres"].round().astype(int)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, header=with_header)


# --------------------------------------------------------------------------------------------
# Slides
# --------------------------------------------------------------------------------------------


def slide_region(row: pd.Series, source: np.ndarray, seed: int, region_px: int | None):
    """(image, spot grid, morphology scores, rng) of one demo slide; the same every call."""
    rng = _rng(seed, "slide", row["sample"])
    image = transformed_region(source, rng, region_px)
    diameter_px = SPOT_DIAMETER_UM / SOURCE_MPP
    grid = offset_grid(*image.shape[:2], rng)
    grid["barcode"] = barcodes(len(grid), rng)
    return image, grid, morphology_scores(image, grid, diameter_px), rng


def cohort_reference(rows: pd.DataFrame, source: np.ndarray, seed: int,
                     region_px: int | None) -> tuple[pd.Series, pd.Series]:
    """Mean and std of the morphology scores over the in-tissue spots of all demo Visium slides:
    expression follows the same image features on every slide (not slide-relative ones)."""
    scores = [slide_region(row, source, seed, region_px)[2] for _, row in rows.iterrows()]
    tissue = pd.concat([s[s["background"] < IN_TISSUE_BACKGROUND] for s in scores])[list(SCORES)]
    return tissue.mean(), tissue.std(ddof=0)


def make_visium_slide(row: pd.Series, index: int, source: np.ndarray, model: GeneModel,
                      donor_effect: np.ndarray, seed: int, region_px: int | None,
                      reference: tuple[pd.Series, pd.Series] | None = None) -> dict[str, int]:
    image, grid, scores, rng = slide_region(row, source, seed, region_px)
    diameter_px = SPOT_DIAMETER_UM / SOURCE_MPP
    in_tissue = scores["background"].to_numpy() < IN_TISSUE_BACKGROUND
    grid["in_tissue"] = in_tissue.astype(int)
    grid["pxl_row_in_fullres"], grid["pxl_col_in_fullres"] = grid["pxl_row"], grid["pxl_col"]
    tissue = grid[in_tissue]
    if tissue.empty:
        raise InputError(row["path"], "demo region has no tissue; choose another demo seed")
    z = standardised(scores[in_tissue], reference)
    background = scores.loc[in_tissue, "background"].to_numpy()
    counts = simulate_counts(model, z, background, donor_effect, rng)

    outs = Path(row["path"])
    write_rgb(Path(row["image"]), image)
    hires, hires_scale = downscaled(image, HIRES_SIDE)
    lowres, lowres_scale = downscaled(image, LOWRES_SIDE)
    write_rgb(outs / "spatial" / "tissue_hires_image.png", hires)
    write_rgb(outs / "spatial" / "tissue_lowres_image.png", lowres)
    layout_1x = index % 2 == 0
    write_positions(outs / "spatial" / ("tissue_positions_list.csv" if layout_1x else "tissue_positions.csv"),
                    grid, with_header=not layout_1x)
    factors = {
        "spot_diameter_fullres": diameter_px,
        "fiducial_diameter_fullres": diameter_px * 1.6,
        "tissue_hires_scalef": hires_scale,
        "tissue_lowres_scalef": lowres_scale,
    }
    with atomic_path(outs / "spatial" / "scalefactors_json.json") as tmp:
        tmp.write_text(json.dumps(factors, indent=2) + "\n")
    labels = spot_labels(z, background, rng)
    with atomic_path(Path(row["labels"])) as tmp:
        pd.DataFrame({"barcode": tissue["barcode"].to_numpy(), "label": labels}).to_csv(tmp, index=False)
    write_10x_h5(outs / "filtered_feature_bc_matrix.h5", counts, tissue["barcode"].tolist(), model.genes,
                 row["sample"])
    label_counts = pd.Series(labels).value_counts().to_dict()
    log.info("%s (%s): %d spots (%d in tissue), %s layout, labels %s", row["sample"], row["donor"], len(grid),
             len(tissue), "1.x" if layout_1x else "2.x", label_counts)
    return {"spots": int(len(grid)), "in_tissue": int(len(tissue))}


def make_he_slide(row: pd.Series, source: np.ndarray, seed: int, region_px: int | None) -> None:
    rng = _rng(seed, "slide", row["sample"])
    image = transformed_region(source, rng, region_px)
    write_rgb(Path(row["path"]), image)
    log.info("%s: H&E-only slide %s (%d x %d px)", row["sample"], row["path"], image.shape[1], image.shape[0])


def demo_rows(sheet: pd.DataFrame, root: str) -> pd.DataFrame:
    """Sample-sheet rows whose files the demo makes (paths under `root`)."""
    under = sheet["path"].str.startswith(root.rstrip("/") + "/")
    rows = sheet[under]
    for _, row in rows[rows["kind"] == "visium"].iterrows():
        if not row["image"] or not row["labels"]:
            raise InputError(None, f"demo slide {row['sample']}: the sample sheet must name its image and labels")
    return rows


def build_demo(sheet_path: Path, source_image: Path, seed: int, n_genes: int,
               root: str = "results/resources/demo", region_px: int | None = None) -> dict:
    """Every demo file of the sheet; `region_px` None makes each slide the whole (transformed)
    source image, an integer a random square crop of that side."""
    sheet = load_sample_sheet(sheet_path)
    rows = demo_rows(sheet, root)
    if rows.empty:
        raise InputError(sheet_path, f"no sample-sheet row has its path under {root}/")
    source = read_rgb_image(source_image)
    log.info("source image %s: %d x %d px", source_image, source.shape[1], source.shape[0])
    genes = gene_panel(n_genes)
    model = GeneModel.make(genes, _rng(seed, "genes"))
    donors = sorted(set(rows.loc[rows["kind"] == "visium", "donor"]))
    donor_effects = {d: _rng(seed, "donor", d).normal(0.0, DONOR_EFFECT_SD, len(genes)) for d in donors}
    reference = cohort_reference(rows[rows["kind"] == "visium"], source, seed, region_px)
    summary = {}
    visium_index = 0
    for _, row in rows.iterrows():
        if row["kind"] == "visium":
            summary[row["sample"]] = make_visium_slide(row, visium_index, source, model, donor_effects[row["donor"]],
                                                       seed, region_px, reference)
            visium_index += 1
        else:
            make_he_slide(row, source, seed, region_px)
            summary[row["sample"]] = {"kind": "he"}
    meta = provenance("demo-data", {"seed": seed, "n_genes": n_genes, "region_px": region_px},
                      [sheet_path, source_image])
    meta["slides"] = summary
    with atomic_path(Path(root) / "demo.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return summary


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo-data", help="build the embedded demo cohort from a real H&E image")
    p.add_argument("--samples", type=Path, required=True, help="sample sheet naming the demo slides")
    p.add_argument("--source-image", type=Path, required=True, help="CMU-1-Small-Region svs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-genes", type=int, default=600)
    p.add_argument("--root", default="results/resources/demo", help="the demo's files lie under this folder")
    p.add_argument("--region-px", type=int, default=None,
                   help="side of a random square crop per slide (default: the whole transformed image)")
    p.set_defaults(func=lambda a: build_demo(a.samples, a.source_image, a.seed, a.n_genes, a.root, a.region_px))
