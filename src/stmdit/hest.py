"""HEST-1k samples (mahmoodlab/HEST) as slides of the pipeline: sample-sheet rows with `kind: hest`.

A row's `sample` is the HEST id and its `path` the HEST root, which holds, per sample:
`st/{id}.h5ad` (spots x genes), `wsis/{id}.tif` (the full-resolution H&E, a tiled pyramidal TIFF
read in blocks through OpenSlide) and `metadata/{id}.json`. How the pipeline reads them:

- barcodes: the obs index of the h5ad; spots with `obs["in_tissue"]` false, where that column
  exists, are left out (HEST keeps only spots under tissue, so there usually are none).
- spot centres (full-resolution px of the WSI): `obsm["spatial"]` = (x, y), i.e. (pxl_col_in_fullres,
  pxl_row_in_fullres); without obsm["spatial"], those two obs columns.
- lattice: `obs["array_row"]`, `obs["array_col"]`. Visium's doubled-column hexagonal indices are
  kept. A square lattice (Visium HD and Xenium pseudo-spots, legacy ST; recognised by a spot whose
  row + column is odd) becomes offset coordinates, column 2 x col + row % 2, so DeepSpot's
  hexagonal neighbours (same row, column +-2; rows +-1, columns +-1) are the four sides and two
  diagonals. Without these columns the lattice is derived from the spot centres (`derive_lattice`:
  centre-to-centre distance, packing and rotation from the nearest neighbours) and the log says so.
- um/px: metadata `pixel_size_um_estimated` (what HEST's own loader uses); a warning when
  `pixel_size_um_embedded` (the TIFF's own resolution) differs from it by more than 10%.
- spot geometry: metadata `spot_diameter` and `inter_spot_dist` (um) for spot technologies (Visium:
  55 and 100 when the metadata lacks them, with a warning; Spatial Transcriptomics: required); a
  warning when the centres' spacing at this um/px is more than 10% off inter_spot_dist. A Visium
  patch is cut around a 65 um spot, not the physical 55 um one: Space Ranger's spot_diameter_fullres,
  which `kind: visium` cuts patches with, is by 10x's definition the diameter of a theoretical 65 um
  spot (0.65 of the 100 um spacing in shared/data's Space Ranger 1.0 folder), so one slide read from
  HEST or from its Space Ranger folder gives patches of the same size in um.
  Visium HD and Xenium samples hold pseudo-spots: HEST's readers pool Visium HD's 16 um bins into
  128 um squares and Xenium transcripts into 100 um squares (src/hest/readers.py), on a square grid
  whose pitch is the square's side, while the metadata keep the source bin (2 um) or nothing. Their
  side is measured here from the spot centres (median nearest-neighbour distance x um/px), logged
  next to HEST's value, and used as the spot diameter: a patch is the pseudo-spot's square.
- counts: `X`, read in blocks of rows; every stored value must be a finite non-negative integer.
- technology: metadata `st_technology` (missing: a warning, and spots then need the metadata's
  spot_diameter and inter_spot_dist).

Bad input stops with one InputError naming the file and the field: a missing file, a missing or
non-positive pixel_size_um_estimated, non-integer counts, spots outside the image, and the like.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stmdit.errors import InputError

log = logging.getLogger(__name__)

ST_DIR, WSI_DIR, METADATA_DIR = "st", "wsis", "metadata"
# HEST's pseudo-spots: technology -> side of the square bins its readers pool into (um)
PSEUDO_SPOT_UM = {"Visium HD": 128.0, "Xenium": 100.0}
VISIUM_DEFAULT_UM = (55.0, 100.0)  # Visium spot diameter and centre-to-centre distance
VISIUM_PATCH_SPOT_UM = 65.0  # the spot Space Ranger's spot_diameter_fullres measures (see the module doc)
EMBEDDED_TOLERANCE = 0.10
COUNT_BLOCK_ROWS = 4096
COUNT_BLOCK_VALUES = 2**24  # at most this many values of a dense X in memory at once (64 MB of float32)


def sample_files(root: str | Path, sample_id: str) -> dict[str, Path]:
    """The three files of a HEST sample under `root`: st (h5ad), wsi (tif), metadata (json)."""
    root = Path(root)
    return {
        "st": root / ST_DIR / f"{sample_id}.h5ad",
        "wsi": root / WSI_DIR / f"{sample_id}.tif",
        "metadata": root / METADATA_DIR / f"{sample_id}.json",
    }


def counts_path(root: str | Path, sample_id: str) -> Path:
    return sample_files(root, sample_id)["st"]


def check_files(files: dict[str, Path]) -> None:
    for name in ("metadata", "st", "wsi"):
        if not files[name].is_file():
            raise InputError(files[name], f"HEST {name} file not found")


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


def read_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "HEST metadata file not found")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read HEST metadata: {exc}") from None
    if not isinstance(meta, dict):
        raise InputError(path, "HEST metadata must be a JSON object")
    return meta


def _number(value: Any) -> float | None:
    """A finite float from a JSON number or numeric string; None otherwise."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def pixel_size(meta: dict[str, Any], path: str | Path) -> float:
    """um/px of the WSI: `pixel_size_um_estimated`, which must be a positive number; a warning when
    `pixel_size_um_embedded` differs from it by more than 10%."""
    raw = meta.get("pixel_size_um_estimated")
    estimated = _number(raw)
    if estimated is None or estimated <= 0:
        raise InputError(path, f"pixel_size_um_estimated must be a positive number, found {raw!r}")
    embedded = _number(meta.get("pixel_size_um_embedded"))
    if embedded is not None and embedded > 0 and abs(embedded - estimated) > EMBEDDED_TOLERANCE * estimated:
        log.warning("%s: pixel_size_um_embedded %.4g differs from pixel_size_um_estimated %.4g by %.0f%%; using"
                    " the estimated one (HEST's loader does too)", path, embedded, estimated,
                    100 * abs(embedded - estimated) / estimated)
    return estimated


def technology(meta: dict[str, Any], path: str | Path) -> str:
    """metadata st_technology; when missing, "unknown" (a warning): spots then need the metadata's
    spot_diameter and inter_spot_dist."""
    value = meta.get("st_technology")
    if not isinstance(value, str) or not value.strip():
        log.warning("%s: st_technology is missing (%r): reading the spots with the metadata's spot_diameter and"
                    " inter_spot_dist", path, value)
        return "unknown"
    return value.strip()


# --------------------------------------------------------------------------------------------
# The h5ad: barcodes, centres, lattice, counts
# --------------------------------------------------------------------------------------------


def open_st(path: str | Path):
    """The h5ad opened backed (X stays on disk); InputError naming it when unreadable."""
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "HEST st file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ad.read_h5ad(path, backed="r")
    except Exception as exc:  # h5py/anndata raise many types for a damaged file
        raise InputError(path, f"cannot read h5ad: {exc}") from None


def check_counts(adata, path: str | Path) -> None:
    """Every stored value of X is a finite non-negative integer (read in blocks of rows)."""
    import scipy.sparse as sp

    if adata.X is None:
        raise InputError(path, "X is empty: no counts")
    rows = max(1, min(COUNT_BLOCK_ROWS, COUNT_BLOCK_VALUES // max(1, adata.n_vars)))  # bounds a dense block
    for start in range(0, adata.n_obs, rows):
        block = adata.X[start:start + rows]
        values = np.asarray(block.data if sp.issparse(block) else block)
        if values.dtype.kind in "iu":
            bad = values < 0
        elif values.dtype.kind == "f":
            bad = ~np.isfinite(values) | (values < 0) | (values != np.floor(values))
        else:
            raise InputError(path, f"X must hold counts (non-negative integers), found dtype {values.dtype}")
        if bad.any():
            first = int(np.flatnonzero(bad.ravel())[0])
            row = (np.searchsorted(block.indptr, first, side="right") - 1 if sp.issparse(block)
                   else first // max(1, values.shape[-1]))
            raise InputError(path, f"X must hold counts (non-negative integers), found {values.ravel()[first].item():g}"
                                   f" at spot {adata.obs_names[start + int(row)]!r}")


def spot_centres(adata, path: str | Path) -> np.ndarray:
    """(n, 2) (x, y) full-resolution px: obsm["spatial"], else obs pxl_col/pxl_row_in_fullres."""
    if "spatial" in adata.obsm:
        centres = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        name = 'obsm["spatial"]'
        if centres.ndim != 2 or centres.shape[0] != adata.n_obs or centres.shape[1] < 2:
            raise InputError(path, f"{name} must be (spots, 2) = (x, y), found shape {centres.shape}")
        centres = centres[:, :2]
    elif {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(adata.obs.columns):
        name = "obs pxl_col_in_fullres/pxl_row_in_fullres"
        centres = adata.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    else:
        raise InputError(path, 'no spot centres: obsm["spatial"] (or obs pxl_col_in_fullres, pxl_row_in_fullres)'
                               " is missing")
    if not np.isfinite(centres).all():
        raise InputError(path, f"{name} holds NaN or infinite values")
    return centres


def nearest_neighbours(centres: np.ndarray, k: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices) of each centre's k nearest other centres."""
    from scipy.spatial import cKDTree

    k = min(k, len(centres) - 1)
    distances, indices = cKDTree(centres).query(centres, k=k + 1)
    return distances[:, 1:], indices[:, 1:]


def centre_pitch(centres: np.ndarray, path: str | Path) -> float:
    """Median nearest-neighbour distance of the spot centres (px)."""
    if len(centres) < 2:
        raise InputError(path, "fewer than 2 spots: the spot spacing cannot be measured")
    distances, _ = nearest_neighbours(centres, 1)
    pitch = float(np.median(distances[:, 0]))
    if pitch <= 0:
        raise InputError(path, "spot centres coincide: the spot spacing cannot be measured")
    return pitch


def derive_lattice(centres: np.ndarray, path: str | Path) -> tuple[np.ndarray, np.ndarray, str, float]:
    """(array_row, array_col, packing, pitch px) from spot centres alone.

    The pitch is the median nearest-neighbour distance; the packing is hexagonal when most spots have
    more than 4 neighbours within 1.2 pitches, else square; the lattice's rotation is the circular mean
    of the neighbour directions modulo 60 (hex) or 90 (square) degrees. Rows and columns are the
    rounded coordinates in the rotated frame: Visium's doubled columns for hex, offset coordinates
    (2 x col + row % 2) for square. Two spots on one lattice site -> InputError."""
    pitch = centre_pitch(centres, path)
    distances, indices = nearest_neighbours(centres, 6)
    close = distances <= 1.2 * pitch
    packing = "hex" if np.median(close.sum(axis=1)) > 4 else "square"
    period = math.pi / 3 if packing == "hex" else math.pi / 2
    vectors = centres[indices[close]] - np.repeat(centres, close.sum(axis=1), axis=0)
    angles = np.arctan2(vectors[:, 1], vectors[:, 0]) * (2 * math.pi / period)
    theta = math.atan2(np.sin(angles).mean(), np.cos(angles).mean()) * period / (2 * math.pi)
    cos, sin = math.cos(-theta), math.sin(-theta)
    x = centres[:, 0] * cos - centres[:, 1] * sin
    y = centres[:, 0] * sin + centres[:, 1] * cos
    row_step = pitch * math.sqrt(3) / 2 if packing == "hex" else pitch
    col_step = pitch / 2 if packing == "hex" else pitch
    rows = _lattice_index(y, row_step)
    cols = _lattice_index(x, col_step)
    if packing == "hex":
        if np.mean((rows - cols) % 2 != 0) > 0.5:  # the columns' origin sits on the other parity
            cols = cols + 1
    else:
        cols = 2 * cols + rows % 2
    sites = pd.Series(list(zip(rows.tolist(), cols.tolist())))
    if sites.duplicated().any():
        raise InputError(path, "obs has no array_row/array_col and the spot centres do not lie on a regular"
                               f" lattice ({int(sites.duplicated().sum())} spots share a site)")
    return rows, cols, packing, pitch


def _lattice_index(values: np.ndarray, step: float) -> np.ndarray:
    """round((values - origin) / step), the origin centred on the values' phase so rounding has margin."""
    phase = 2 * math.pi * values / step
    origin = math.atan2(np.sin(phase).mean(), np.cos(phase).mean()) * step / (2 * math.pi)
    index = np.round((values - origin) / step).astype(np.int64)
    return index - index.min()


def read_lattice(adata, centres: np.ndarray, path: str | Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(array_row, array_col, how) from obs, or derived from the centres (see module docstring)."""
    obs = adata.obs
    if {"array_row", "array_col"} <= set(obs.columns):
        try:
            rows = pd.to_numeric(obs["array_row"], errors="raise").to_numpy()
            cols = pd.to_numeric(obs["array_col"], errors="raise").to_numpy()
        except (TypeError, ValueError) as exc:
            raise InputError(path, f"obs array_row/array_col are not numbers: {exc}") from None
        if not (np.isfinite(rows).all() and np.isfinite(cols).all() and (rows == np.round(rows)).all()
                and (cols == np.round(cols)).all()):
            raise InputError(path, "obs array_row/array_col must be integers")
        rows, cols = rows.astype(np.int64), cols.astype(np.int64)
        if ((rows + cols) % 2 != 0).any():
            return rows, 2 * cols + rows % 2, "obs array_row/array_col (a square grid: offset columns 2 x col + row % 2)"
        return rows, cols, "obs array_row/array_col (Visium's hexagonal indices)"
    rows, cols, packing, pitch = derive_lattice(centres, path)
    log.warning("%s: obs has no array_row/array_col; lattice derived from the spot centres (%s packing, pitch"
                " %.2f px)", path, packing, pitch)
    return rows, cols, f"derived from the spot centres ({packing} packing)"


# --------------------------------------------------------------------------------------------
# One sample
# --------------------------------------------------------------------------------------------


@dataclass
class HestSample:
    """What the spots stage needs from a HEST sample (coordinates in full-resolution px of the WSI)."""

    spots: pd.DataFrame  # barcode, array_row, array_col, pxl_row, pxl_col; h5ad order
    diameter_px: float
    spacing_px: float
    um_per_px: float
    technology: str
    files: dict[str, Path]
    known_barcodes: pd.Index  # every obs barcode, in tissue or not
    notes: list[str] = field(default_factory=list)


def spot_geometry(meta: dict[str, Any], tech: str, pitch_px: float | None, um_per_px: float,
                  meta_path: str | Path) -> tuple[float, float, str]:
    """(diameter um, spacing um, how) of a sample's spots (see module docstring)."""
    if tech in PSEUDO_SPOT_UM:
        measured = pitch_px * um_per_px
        hest_um = PSEUDO_SPOT_UM[tech]
        note = (f"{tech} pseudo-spots: squares of {measured:.1f} um measured from the spot centres (HEST pools"
                f" {tech} into {hest_um:g} um squares; metadata spot_diameter={meta.get('spot_diameter')!r},"
                f" inter_spot_dist={meta.get('inter_spot_dist')!r} describe the source, not the pseudo-spots)")
        if abs(measured - hest_um) > 0.1 * hest_um:
            log.warning("%s: measured pseudo-spot side %.1f um differs from HEST's %g um by more than 10%%",
                        meta_path, measured, hest_um)
        return measured, measured, note
    diameter, spacing = _number(meta.get("spot_diameter")), _number(meta.get("inter_spot_dist"))
    if tech == "Visium" and (diameter is None or spacing is None):
        log.warning("%s: spot_diameter/inter_spot_dist missing: using Visium's %g/%g um", meta_path,
                    *VISIUM_DEFAULT_UM)
        diameter = VISIUM_DEFAULT_UM[0] if diameter is None else diameter
        spacing = VISIUM_DEFAULT_UM[1] if spacing is None else spacing
    for name, value in (("spot_diameter", diameter), ("inter_spot_dist", spacing)):
        if value is None or value <= 0:
            raise InputError(meta_path, f"{name} must be a positive number of um for {tech}, found"
                                        f" {meta.get(name)!r}")
    if tech == "Visium":
        return VISIUM_PATCH_SPOT_UM, spacing, (f"Visium spots: patches around a {VISIUM_PATCH_SPOT_UM:g} um spot"
                                               f" (Space Ranger's spot_diameter_fullres; metadata spot_diameter"
                                               f" {diameter:g} um is the physical spot), spacing {spacing:g} um")
    return diameter, spacing, f"{tech} spots: diameter {diameter:g} um, spacing {spacing:g} um (metadata)"


def read_hest_sample(root: str | Path, sample_id: str) -> HestSample:
    """Validate one HEST sample's files and read its spots (counts are checked, not kept)."""
    files = sample_files(root, sample_id)
    check_files(files)
    meta = read_metadata(files["metadata"])
    um_per_px = pixel_size(meta, files["metadata"])
    tech = technology(meta, files["metadata"])
    adata = open_st(files["st"])
    try:
        barcodes = pd.Index(adata.obs_names.astype(str))
        if barcodes.duplicated().any():
            raise InputError(files["st"], f"obs index: duplicate barcode {barcodes[barcodes.duplicated()][0]!r}")
        if adata.n_obs == 0:
            raise InputError(files["st"], "obs: the h5ad has no spots")
        check_counts(adata, files["st"])
        centres = spot_centres(adata, files["st"])
        rows, cols, lattice = read_lattice(adata, centres, files["st"])
        in_tissue = np.ones(adata.n_obs, dtype=bool)
        if "in_tissue" in adata.obs.columns:
            in_tissue = adata.obs["in_tissue"].astype(bool).to_numpy()
            if not in_tissue.any():
                raise InputError(files["st"], "obs in_tissue: no spot is in tissue")
    finally:
        adata.file.close()
    pitch = centre_pitch(centres[in_tissue], files["st"])
    diameter_um, spacing_um, geometry = spot_geometry(meta, tech, pitch, um_per_px, files["metadata"])
    if abs(pitch * um_per_px - spacing_um) > 0.1 * spacing_um:
        log.warning("%s: the spot centres lie %.1f um apart at pixel_size_um_estimated %.4g, not inter_spot_dist"
                    " %g um: is the pixel size right?", files["metadata"], pitch * um_per_px, um_per_px, spacing_um)
    spots = pd.DataFrame({
        "barcode": barcodes.to_numpy(dtype=object),
        "array_row": rows,
        "array_col": cols,
        "pxl_row": centres[:, 1],
        "pxl_col": centres[:, 0],
    })[in_tissue].reset_index(drop=True)
    notes = [f"{tech}, {um_per_px:.4g} um/px (pixel_size_um_estimated)", geometry, f"lattice: {lattice}"]
    if not in_tissue.all():
        notes.append(f"{int((~in_tissue).sum())} spot(s) with obs in_tissue false left out")
    return HestSample(spots, diameter_um / um_per_px, spacing_um / um_per_px, um_per_px, tech, files, barcodes, notes)


def check_inside(sample: HestSample, width: int, height: int) -> None:
    """Every spot centre lies inside the WSI (InputError naming the h5ad, the field and the image)."""
    rows, cols = sample.spots["pxl_row"].to_numpy(), sample.spots["pxl_col"].to_numpy()
    outside = (rows < 0) | (rows >= height) | (cols < 0) | (cols >= width)
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        raise InputError(
            sample.files["st"],
            f'obsm["spatial"]: {int(outside.sum())} spot centre(s) lie outside {sample.files["wsi"]} ({width} x'
            f" {height} px), e.g. {sample.spots['barcode'].iloc[first]} at x {cols[first]:.1f}, y {rows[first]:.1f}",
        )


def read_counts(path: str | Path):
    """All counts of a HEST h5ad as an AnnData with CSR float32 X (checked to be counts), for the
    expression stage."""
    import anndata as ad
    import scipy.sparse as sp

    path = Path(path)
    backed = open_st(path)
    try:
        check_counts(backed, path)
    finally:
        backed.file.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = ad.read_h5ad(path)
    var = pd.DataFrame(index=adata.var_names.astype(str))
    if "gene_ids" in adata.var:  # Ensembl ids, as read_10x_h5 gives them
        var["gene_ids"] = adata.var["gene_ids"].astype(str).to_numpy()
    return ad.AnnData(X=sp.csr_matrix(adata.X, dtype=np.float32),
                      obs=pd.DataFrame(index=adata.obs_names.astype(str)), var=var)
