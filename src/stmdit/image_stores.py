"""Image stores, the one reader: patches (`patches/{sample}.zarr`, real spot crops, written by
`stmdit spots`) and tile stores (`tiles/{model}/{cohort}/{regime}.zarr`, generated, written by
`sampling.write_tile_store`). Both have `spot_key` (N,), unique, rows aligned with their pixels:
`images` uint8 (N, H, W, 3), or, for tile stores sampled with `sampler.store_images: false` (the
default), only `latent` float16 (N, C, h, w), which `ImageStore.read_rows` decodes on demand with
the decoder the command was given (`tile_decoder.StoreDecoder`: the `sd3_vae` options), checked
against the decoder the store records. Opening a store checks all of that and names the store
when it fails.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import pandas as pd
import zarr

from stmdit.errors import InputError
import stmdit.patch_codec  # noqa: F401  (registers the stmdit.jpegls codec of patches stores with zarr)
from stmdit.spots_table import read_spots_table
from stmdit.zarr_rows import read_array_rows, string_values

log = logging.getLogger(__name__)

DECODE_ROWS = 32  # latents decoded per call when a store keeps latents only
DECODER_IDENTITY_KEYS = ("impl", "weights_sha256", "shift_factor", "scaling_factor", "latent_shape")


class Decoder(Protocol):
    """What reading a latents-only tile store needs (`tile_decoder.StoreDecoder`)."""

    def decode(self, latents: np.ndarray) -> np.ndarray: ...  # float32 (B, C, h, w) -> uint8 (B, H, W, 3)

    def identity(self) -> dict[str, Any]: ...  # DECODER_IDENTITY_KEYS


def check_unique(keys: Sequence[str], source: str | Path) -> None:
    index = pd.Index(keys)
    if not index.is_unique:
        raise InputError(source, f"spot key {index[index.duplicated()][0]} appears twice")


@dataclass
class ImageStore:
    """An opened image store. `read_rows` gives pixels whether the store keeps them or only latents
    (then `decoder` is set); `images` is the stored pixel array, for stores that keep one."""

    path: Path
    group: zarr.Group
    keys: list[str]
    decoder: Decoder | None = None  # set when the store keeps latents only
    index: dict[str, int] = field(init=False, repr=False)  # spot key -> row

    def __post_init__(self) -> None:
        self.index = {k: i for i, k in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def images(self) -> zarr.Array:
        if self.decoder is not None:
            raise InputError(self.path, "the store keeps latents only; read its pixels with read_rows")
        return self.group["images"]

    def read_rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 (len(rows), H, W, 3): the rows' stored pixels, or their latents decoded."""
        if self.decoder is None:
            return read_array_rows(self.images, rows)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        latent = self.group["latent"]
        parts = [self.decoder.decode(read_array_rows(latent, rows[start:start + DECODE_ROWS]).astype(np.float32))
                 for start in range(0, rows.size, DECODE_ROWS)]
        return np.concatenate(parts) if parts else np.zeros((0, 0, 0, 3), np.uint8)

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Every row's pixels in store order, `batch_size` rows at a time."""
        for start in range(0, len(self.keys), batch_size):
            yield self.read_rows(np.arange(start, min(start + batch_size, len(self.keys))))


def open_image_store(path: str | Path, min_spots: int = 1, decoder: Decoder | None = None) -> ImageStore:
    """A patches or tile store, checked (InputError naming it otherwise); `min_spots` rows at least.
    A tile store that keeps latents only needs `decoder`, the one its tiles were sampled with."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "image store not found")
    try:
        group = zarr.open_group(str(path), mode="r")
        keys = [str(k) for k in string_values(group["spot_key"][:])]
        pixels = group["images"] if "images" in group else group["latent"]
    except Exception as exc:  # zarr raises several types for damaged or foreign stores
        raise InputError(path, f"not a readable image store (needs arrays spot_key and images, or a tile "
                               f"store's latent): {exc}") from None
    if "images" in group:
        if pixels.ndim != 4 or pixels.shape[-1] != 3 or np.dtype(pixels.dtype) != np.uint8:
            raise InputError(path, f"images must be uint8 (N, H, W, 3), found {pixels.dtype} {pixels.shape}")
        decoder = None
    else:
        check_latents(path, group, pixels, decoder)
    if pixels.shape[0] != len(keys):
        raise InputError(path, f"{pixels.shape[0]} {'images' if decoder is None else 'latents'} but {len(keys)} spot keys")
    if len(keys) < min_spots:
        raise InputError(path, "the store has no spots" if not keys else
                         f"{len(keys)} spot(s): at least {min_spots} needed")
    check_unique(keys, path)
    return ImageStore(path, group, keys, decoder)


def check_latents(path: Path, group: zarr.Group, latent: zarr.Array, decoder: Decoder | None) -> None:
    """A latents-only tile store: float latents (N, C, h, w), and a decoder equal to the one recorded."""
    if latent.ndim != 4 or np.dtype(latent.dtype).kind != "f":
        raise InputError(path, f"latent must be float (N, C, h, w), found {latent.dtype} {latent.shape}")
    recorded = group.attrs.get("decoder")
    if not isinstance(recorded, dict):
        raise InputError(path, "the store keeps latents only but records no decoder (attrs decoder): "
                               "sample it again with stmdit tiles")
    if decoder is None:
        raise InputError(path, f"the store keeps latents only (sampled with store_images off): this command needs "
                               f"their decoder, sd3_vae {recorded.get('impl')} (--vae-impl, --vae-weights)")
    given = json.loads(json.dumps(decoder.identity(), default=str))  # as the store's attrs were written
    differs = [k for k in DECODER_IDENTITY_KEYS if recorded.get(k) != given.get(k)]
    if differs:
        raise InputError(path, "its latents were sampled for another decoder: "
                               + ", ".join(f"{k} {recorded.get(k)!r} recorded, {given.get(k)!r} given" for k in differs))


def read_image(stores: Sequence[ImageStore], key: str) -> np.ndarray:
    """The image of `key` from the first store that holds it."""
    for store in stores:
        if key in store.index:
            return store.read_rows([store.index[key]])[0]
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
