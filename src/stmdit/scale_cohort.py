"""A synthetic cohort at any size in the real on-disk formats: the inputs of `stmdit bench scale`.

Visium slides: Space Ranger 2.x-like outs/ folders (stmdit.bigslide.write_visium_folder) over one
full-resolution tiled pyramidal JPEG TIFF of the real CMU H&E mirror-tiled (the sheet's `image`),
each with a `filtered_feature_bc_matrix.h5` of real human gene symbols (the bundled HGNC
protein-coding list, topped up with LINC names to `n_genes`), 3,000-5,000 detected genes per spot
and negative-binomial counts, written in blocks of spots (never a dense spots x genes matrix), and a
labels CSV (Tumor / Stroma / Immune by angular sector of the tissue, with a gene program each).
One folder is generated per donor (at least 3) and replicated under several sample names by
symlinks. H&E-only slides: one tiled pyramidal TIFF of at least `he_gigapixels` at 0.25 um/px,
written tile by tile, replicated under several sample names, its tissue ellipse sized so that the
cohort has about the asked number of pseudo-spots.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from stmdit.bigslide import MirroredTissue, read_source, write_pyramidal_tiff, write_visium_folder

VISIUM_MPP = 0.27            # um/px of the Visium full-resolution image (25,000 px ~ 6.75 mm)
HE_MPP = 0.25                # 40x
SPOT_SPACING_UM = 100.0
SPOT_DIAMETER_UM = 55.0
MAX_SPOTS_PER_VISIUM_SLIDE = 5_000
MIN_VISIUM_SLIDES = 3           # one per donor at least: a test donor and two for DeepSpot's leave-one-donor-out
MIN_DONORS = 3
LABELS = ("Tumor", "Stroma", "Immune")
PROGRAM_GENES = 300          # genes up-regulated 4x in each label's spots
DETECTED_RANGE = (3_000, 5_000)
NB_DISPERSION = 2.0          # the negative binomial's r
BLOCK_SPOTS = 256            # spots simulated and written at a time


def tissue_rich_crop(source: np.ndarray) -> np.ndarray:
    """The CMU region's tissue-rich part (its middle half of columns, lower three quarters of rows:
    about 60% of pixels darker than the spots filter's grey threshold, against 32% for the whole)."""
    height, width = source.shape[:2]
    return source[height // 4:, width // 4: 3 * width // 4]


def gene_table(n_genes: int) -> pd.DataFrame:
    """`n_genes` human symbols: the bundled HGNC protein-coding list, then LINC names; with Ensembl ids."""
    from stmdit.genesets import bundled_path

    listed = pd.read_csv(bundled_path(), sep="\t", comment="#", dtype=str).fillna("")
    listed = listed.sort_values("symbol").head(n_genes)
    symbols = listed["symbol"].tolist()
    ids = [i or f"ENSG9{n:010d}" for n, i in enumerate(listed["ensembl_gene_id"].tolist())]
    extra = n_genes - len(symbols)
    symbols += [f"LINC{n:05d}" for n in range(1, extra + 1)]
    ids += [f"ENSG8{n:010d}" for n in range(1, extra + 1)]
    return pd.DataFrame({"id": ids, "symbol": symbols})


def sector_labels(rows: np.ndarray, cols: np.ndarray, height: int, width: int) -> np.ndarray:
    """Tumor / Stroma / Immune by angular sector around the slide's centre (spatially coherent)."""
    angle = np.arctan2(rows / height - 0.5, cols / width - 0.5)
    sector = ((angle + np.pi) / (2 * np.pi) * len(LABELS)).astype(int) % len(LABELS)
    return np.asarray(LABELS, dtype=object)[sector]


def write_10x_h5_blocks(path: str | Path, barcodes: np.ndarray, labels: np.ndarray, genes: pd.DataFrame,
                        seed: int, block: int = BLOCK_SPOTS) -> int:
    """A 10x HDF5 matrix (v3: features x barcodes, CSC by barcode) simulated and appended `block`
    spots at a time. Per spot, each gene is detected with its own probability scaled by the spot's
    depth (DETECTED_RANGE genes on average); a detected gene's count is 1 + NB(r, mean). Returns the
    number of non-zeros."""
    import h5py

    from stmdit.provenance import atomic_path

    rng = np.random.default_rng(seed)
    n_genes = len(genes)
    detect = rng.beta(0.6, 2.4, n_genes).astype(np.float32)
    detect *= (sum(DETECTED_RANGE) / 2 / n_genes) / detect.mean()
    mean = rng.lognormal(0.0, 1.0, n_genes).astype(np.float32)
    programs = {label: rng.choice(n_genes, PROGRAM_GENES, replace=False) for label in LABELS}
    label_mean = {}
    for label, columns in programs.items():
        label_mean[label] = mean.copy()
        label_mean[label][columns] *= 4.0
    low, high = DETECTED_RANGE
    nnz = 0
    with atomic_path(Path(path)) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        f.attrs["library_ids"] = np.array([b"stmdit-bench-scale"])
        group = f.create_group("matrix")
        group.create_dataset("barcodes", data=np.asarray(barcodes).astype("S"))
        data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,),
                                    compression="gzip", compression_opts=1)
        indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1 << 18,),
                                       compression="gzip", compression_opts=1)
        indptr = np.zeros(len(barcodes) + 1, dtype=np.int64)
        for start in range(0, len(barcodes), block):
            stop = min(start + block, len(barcodes))
            depth = rng.uniform(low / ((low + high) / 2), high / ((low + high) / 2), stop - start).astype(np.float32)
            hit = rng.random((stop - start, n_genes), dtype=np.float32) < depth[:, None] * detect[None, :]
            spot, gene = np.nonzero(hit)  # row-major: by spot, then gene (sorted indices per barcode)
            means = np.stack([label_mean[str(lab)] for lab in labels[start:stop]])[spot, gene]
            counts = 1 + rng.negative_binomial(NB_DISPERSION, NB_DISPERSION / (NB_DISPERSION + means))
            data.resize((nnz + len(gene),))
            indices.resize((nnz + len(gene),))
            data[nnz:] = counts.astype(np.int32)
            indices[nnz:] = gene
            indptr[start + 1:stop + 1] = nnz + np.cumsum(np.bincount(spot, minlength=stop - start))
            nnz += len(gene)
        group.create_dataset("indptr", data=indptr)
        group.create_dataset("shape", data=np.array([n_genes, len(barcodes)], dtype=np.int32))
        features = group.create_group("features")
        features.create_dataset("id", data=genes["id"].to_numpy().astype("S"))
        features.create_dataset("name", data=genes["symbol"].to_numpy().astype("S"))
        features.create_dataset("feature_type", data=np.array([b"Gene Expression"] * n_genes))
        features.create_dataset("genome", data=np.array([b"GRCh38"] * n_genes))
        features.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
    return nnz


def visium_grid_count(side: int, tissue_fraction: float) -> int:
    """In-tissue spots of write_visium_folder's grid on a side x side image at VISIUM_MPP."""
    from stmdit.spots import hex_grid

    grid = hex_grid(side, side, SPOT_DIAMETER_UM / VISIUM_MPP, SPOT_SPACING_UM / VISIUM_MPP)
    radius2 = tissue_fraction / np.pi
    return int((((grid["pxl_row"] / side - 0.5) ** 2 + (grid["pxl_col"] / side - 0.5) ** 2) <= radius2).sum())


def visium_side_for(spots: int, tissue_fraction: float = 0.95) -> int:
    """The smallest side (a multiple of the pyramid's block) whose grid has at least `spots` in tissue."""
    block = MirroredTissue.BLOCK
    spacing = SPOT_SPACING_UM / VISIUM_MPP
    area = spots * spacing ** 2 * math.sqrt(3) / 2 / min(tissue_fraction, 0.78)  # a first guess, then search
    side = max(4 * block, int(math.sqrt(area)) // block * block)
    while visium_grid_count(side, tissue_fraction) < spots:
        side += block
    while side > 4 * block and visium_grid_count(side - block, tissue_fraction) >= spots:
        side -= block
    return side


@dataclass
class ScaleCohort:
    """What write_scale_cohort wrote."""

    root: Path
    sheet: Path
    visium_cohort: str
    he_cohort: str
    visium_slides: list[str]
    donors: list[str]
    test_donor: str
    he_slides: list[str]
    visium_spots: int          # in-tissue spots of the Visium cohort
    he_tissue_fraction: float
    n_genes: int
    files: dict[str, dict] = field(default_factory=dict)  # generated file -> size and shape


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


def write_scale_cohort(root: str | Path, visium_spots: int, he_spots: int, source_image: str | Path,
                       n_genes: int = 20_000, he_gigapixels: float = 4.1, seed: int = 0,
                       visium_cohort: str = "scale", he_cohort: str = "scale_he", tile: int = 512,
                       log=print) -> ScaleCohort:
    """Write the cohort under `root` (see the module docstring) and its sample sheet."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    source = tissue_rich_crop(read_source(source_image))
    slides = max(MIN_VISIUM_SLIDES, math.ceil(visium_spots / MAX_SPOTS_PER_VISIUM_SLIDE))
    donors = [f"D{d}" for d in range(max(MIN_DONORS, slides // 3))]
    per_slide = math.ceil(visium_spots / slides)
    side = visium_side_for(per_slide)
    files: dict[str, dict] = {}

    tissue = MirroredTissue(source, side, side, tissue_fraction=0.95)
    image = root / "visium_fullres.tif"
    write_pyramidal_tiff(image, tissue, VISIUM_MPP, tile=tile)
    files[image.name] = {"bytes": image.stat().st_size, "px": f"{side} x {side}"}
    genes = gene_table(n_genes)
    in_tissue_total = 0
    for number, donor in enumerate(donors):
        outs = root / "templates" / donor / "outs"
        write_visium_folder(outs, tissue, VISIUM_MPP, SPOT_DIAMETER_UM, SPOT_SPACING_UM, seed=seed + number,
                            write_matrix=False)
        positions = pd.read_csv(outs / "spatial" / "tissue_positions.csv")
        positions = positions[positions["in_tissue"] == 1]
        barcodes = np.sort(positions["barcode"].to_numpy().astype(str))
        by_barcode = positions.set_index("barcode").loc[barcodes]
        labels = sector_labels(by_barcode["pxl_row_in_fullres"].to_numpy(), by_barcode["pxl_col_in_fullres"].to_numpy(),
                               side, side)
        nnz = write_10x_h5_blocks(outs / "filtered_feature_bc_matrix.h5", barcodes, labels, genes, seed + 100 + number)
        pd.DataFrame({"barcode": barcodes, "label": labels}).to_csv(outs.parent / "labels.csv", index=False)
        files[f"templates/{donor}/filtered_feature_bc_matrix.h5"] = {
            "bytes": (outs / "filtered_feature_bc_matrix.h5").stat().st_size, "spots": len(barcodes),
            "genes": n_genes, "nonzeros": nnz, "detected_per_spot": round(nnz / max(len(barcodes), 1))}
        log(f"  {donor}: {len(barcodes):,} spots x {n_genes:,} genes, "
            f"{nnz / max(len(barcodes), 1):,.0f} detected per spot")

    rows = ["sample\tdonor\tcohort\tkind\tpath\timage\tlabels\tmpp"]
    visium_slides = []
    for i in range(slides):
        donor = donors[i % len(donors)]
        name = f"V{i:02d}"
        slide = root / "slides" / name
        template = root / "templates" / donor
        for part in ("outs/spatial", "outs/filtered_feature_bc_matrix.h5", "labels.csv"):
            _link(template / part, slide / part)
        rows.append(f"{name}\t{donor}\t{visium_cohort}\tvisium\t{slide / 'outs'}\t{image}\t{slide / 'labels.csv'}\t")
        visium_slides.append(name)
        in_tissue_total += files[f"templates/{donor}/filtered_feature_bc_matrix.h5"]["spots"]

    # H&E-only: one slide of >= he_gigapixels replicated; its tissue ellipse holds he_spots / copies
    block = MirroredTissue.BLOCK
    he_side = math.ceil(math.sqrt(he_gigapixels * 1e9) / block) * block
    spots_per_area = 1.0 / ((SPOT_SPACING_UM / HE_MPP) ** 2 * math.sqrt(3) / 2)
    full = he_side * he_side * spots_per_area
    copies = max(2, math.ceil(he_spots / (0.6 * full)))
    fraction = min(0.6, he_spots / copies / full)
    he_image = root / "he_40x.tif"
    he_tissue = MirroredTissue(source, he_side, he_side, tissue_fraction=fraction)
    write_pyramidal_tiff(he_image, he_tissue, HE_MPP, tile=tile)
    files[he_image.name] = {"bytes": he_image.stat().st_size, "px": f"{he_side} x {he_side}",
                            "gigapixels": round(he_side * he_side / 1e9, 2), "tissue_fraction": round(fraction, 4)}
    he_slides = []
    for i in range(copies):
        name = f"H{i:02d}"
        rows.append(f"{name}\tHD{i}\t{he_cohort}\the\t{he_image}\t\t\t{HE_MPP}")
        he_slides.append(name)
    sheet = root / "samples.tsv"
    sheet.write_text("\n".join(rows) + "\n")
    return ScaleCohort(root, sheet, visium_cohort, he_cohort, visium_slides, donors, donors[0], he_slides,
                       in_tissue_total, fraction, n_genes, files)
