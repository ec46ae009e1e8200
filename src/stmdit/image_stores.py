"""Image stores, the one reader: patches (`patches/{sample}.zarr`, real spot crops, written by
`stmdit spots`) and tile stores (`tiles/{model}/{cohort}/{regime}.zarr`, generated, written by
`sampling.write_tile_store`) share one layout: `images` uint8 (N, H, W, 3) and `spot_key` (N,),
rows aligned, keys unique. Opening one checks all of that and names the store when it fails.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import zarr

from stmdit.errors import InputError
from stmdit.spots_table import read_spots_table
from stmdit.zarr_rows import string_values

log = logging.getLogger(__name__)


def check_unique(keys: Sequence[str], source: str | Path) -> None:
    index = pd.Index(keys)
    if not index.is_unique:
        raise InputError(source, f"spot key {index[index.duplicated()][0]} appears twice")


@dataclass
class ImageStore:
    path: Path
    group: zarr.Group
    keys: list[str]
    index: dict[str, int] = field(init=False, repr=False)  # spot key -> row

    def __post_init__(self) -> None:
        self.index = {k: i for i, k in enumerate(self.keys)}

    @property
    def images(self) -> zarr.Array:
        return self.group["images"]


def open_image_store(path: str | Path, min_spots: int = 1) -> ImageStore:
    """A patches or tile store, checked (InputError naming it otherwise); `min_spots` rows at least."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "image store not found")
    try:
        group = zarr.open_group(str(path), mode="r")
        images = group["images"]
        keys = [str(k) for k in string_values(group["spot_key"][:])]
    except Exception as exc:  # zarr raises several types for damaged or foreign stores
        raise InputError(path, f"not a readable image store (needs arrays spot_key, images): {exc}") from None
    if images.ndim != 4 or images.shape[-1] != 3 or np.dtype(images.dtype) != np.uint8:
        raise InputError(path, f"images must be uint8 (N, H, W, 3), found {images.dtype} {images.shape}")
    if images.shape[0] != len(keys):
        raise InputError(path, f"{images.shape[0]} images but {len(keys)} spot keys")
    if len(keys) < min_spots:
        raise InputError(path, "the store has no spots" if not keys else
                         f"{len(keys)} spot(s): at least {min_spots} needed")
    check_unique(keys, path)
    return ImageStore(path, group, keys)


def read_image(stores: Sequence[ImageStore], key: str) -> np.ndarray:
    """The image of `key` from the first store that holds it."""
    for store in stores:
        if key in store.index:
            return np.asarray(store.images[store.index[key]])
    raise KeyError(key)


# ---------------------------------------------------------------------------------------------
# Patches: the kept spots of a cohort's slides, in cohort order


@dataclass
class SamplePatches:
    """The kept spots of one sample: rows of its patches store and their keys."""

    spots_path: Path
    patches_path: Path
    images: zarr.Array
    rows: np.ndarray
    keys: list[str]


def read_sample_patches(spots_path: Path, patches_path: Path) -> SamplePatches:
    """The kept spots of one slide: its spots table's keep flags on its patches store's rows, which
    must be the table's rows in order."""
    table = read_spots_table(spots_path, ["key", "keep"])
    store = open_image_store(patches_path, min_spots=0)  # a slide without kept spots: the cohort decides
    if len(store.keys) != len(table) or store.keys != [str(k) for k in table["key"]]:
        raise InputError(patches_path, f"rows do not match the spots table {spots_path.name} (spot keys differ)")
    rows = np.flatnonzero(table["keep"].to_numpy(dtype=bool))
    return SamplePatches(spots_path, patches_path, store.images, rows, [store.keys[r] for r in rows])


def read_cohort_patches(spots_paths: Sequence[str | Path], patches_paths: Sequence[str | Path]) -> list[SamplePatches]:
    """Kept spots of every sample, in the given (cohort) order; checks inputs before any work."""
    if len(spots_paths) != len(patches_paths):
        raise InputError(None, f"{len(spots_paths)} --spots tables but {len(patches_paths)} --patches stores")
    samples = [read_sample_patches(Path(s), Path(p)) for s, p in zip(spots_paths, patches_paths)]
    keys = [k for s in samples for k in s.keys]
    if not keys:
        raise InputError(", ".join(str(s) for s in spots_paths), "the cohort has no kept spots (keep is False everywhere)")
    duplicated = pd.Index(keys)[pd.Index(keys).duplicated()]
    if len(duplicated):
        raise InputError(", ".join(str(s) for s in spots_paths), f"spot key {duplicated[0]} appears twice in the cohort")
    for s in samples:
        log.info("%s: %d kept of %d spots (%s)", s.spots_path.name, len(s.rows), s.images.shape[0], s.patches_path)
    return samples


def iter_kept_images(samples: Sequence[SamplePatches], batch_size: int) -> Iterator[np.ndarray]:
    """Batches of kept-spot patches in cohort order. Each store is read in row blocks aligned to
    its chunks, so every stored chunk is decoded at most once (only the span of kept spots)."""
    pending: list[np.ndarray] = []
    n_pending = 0
    for sample in samples:
        images = sample.images
        unit = images.chunks[0]
        block = max(1, math.ceil(batch_size / unit)) * unit
        for start in range(0, images.shape[0], block):
            stop = min(start + block, images.shape[0])
            wanted = sample.rows[(sample.rows >= start) & (sample.rows < stop)]
            if not wanted.size:
                continue
            first, last = int(wanted[0]), int(wanted[-1]) + 1
            pending.append(np.asarray(images[first:last])[wanted - first])
            n_pending += wanted.size
            while n_pending >= batch_size:
                merged = np.concatenate(pending)
                yield merged[:batch_size]
                pending, n_pending = [merged[batch_size:]], n_pending - batch_size
    if n_pending:
        yield np.concatenate(pending)
