"""`stmdit texture`: grey roughness of generated tiles against their spots' real tiles through the VAE."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from stmdit.encoders.smoke import SmokeVae
from stmdit.errors import InputError
from stmdit.tile_decoder import CodecSettings, StoreDecoder
from stmdit.texture import TARGET, cell_border_roughness, grey_roughness, texture_report

SIZE = 64  # 8 x 8 latents of the smoke VAE


def test_grey_roughness_of_flat_checkerboard_and_smooth_tiles():
    flat = np.full((1, SIZE, SIZE, 3), 128, np.uint8)
    assert grey_roughness(flat)[0] == 0.0
    blocks = (np.indices((SIZE // 8, SIZE // 8)).sum(0) % 2 * 255).astype(np.uint8)
    checker = np.repeat(np.repeat(blocks, 8, 0), 8, 1)[None, ..., None].repeat(3, axis=-1)
    assert grey_roughness(checker)[0] == pytest.approx(255.0**2)  # every neighbour pair differs by 255
    ramp = np.tile(np.linspace(0, 255, SIZE), (SIZE, 1)).astype(np.uint8)[None, ..., None].repeat(3, axis=-1)
    assert 0 < grey_roughness(ramp)[0] < 0.01 * grey_roughness(checker)[0]
    with pytest.raises(ValueError, match="blocks"):
        grey_roughness(np.zeros((1, 12, 12, 3), np.uint8))


def write_store(path, keys, name, data):
    group = zarr.open_group(str(path), mode="w")
    group.create_array(name, data=data, chunks=(4, *data.shape[1:]))
    group.create_array("spot_key", data=np.array(keys, dtype=str))
    return path


def tissue_like(n: int, seed: int) -> np.ndarray:
    """Tiles with structure at every scale: smoothed noise plus dark dots (nuclei) on a pink ground."""
    import cv2

    rng = np.random.default_rng(seed)
    tiles = []
    for _ in range(n):
        grey = cv2.GaussianBlur(rng.normal(0, 1, (SIZE, SIZE)), (0, 0), 3)
        grey = 200 + 40 * grey / grey.std()
        for y, x in rng.integers(4, SIZE - 4, size=(12, 2)):
            cv2.circle(grey, (int(x), int(y)), 3, 70, -1)
        tiles.append(np.stack([grey, 0.8 * grey, grey], -1))
    return np.clip(tiles, 0, 255).astype(np.uint8)


def test_generated_tiles_are_scored_against_the_real_tiles_through_the_vae(tmp_path):
    """Tiles that are the real latents decoded score 1.0; a blurred generator and one that makes
    independent 8-px squares fall outside TARGET on either side; the spots must be in the latents."""
    codec = SmokeVae(torch.device("cpu"), latent_channels=4, input_size=SIZE)
    n = 40
    keys = [f"s:{i}" for i in range(n)]
    latents = codec.encode(tissue_like(n, seed=0))["latent"]
    latent_store = write_store(tmp_path / "latents.zarr", keys, "latent", latents)
    rng = np.random.default_rng(1)
    blurred = latents.mean(axis=(2, 3), keepdims=True) + 0.3 * (latents - latents.mean(axis=(2, 3), keepdims=True))
    squares = codec.decode(latents + rng.normal(0, 2.0, latents.shape).astype(np.float32))  # independent latent pixels
    stores = {
        "perfect": write_store(tmp_path / "perfect.zarr", keys[::-1], "images", codec.decode(latents)[::-1]),
        "blurred": write_store(tmp_path / "blurred.zarr", keys, "images", codec.decode(blurred.astype(np.float32))),
        "squares": write_store(tmp_path / "squares.zarr", keys, "images", squares),
    }
    decoder = StoreDecoder(CodecSettings(), "cpu", codec=codec)
    report = texture_report(latent_store, stores, decoder, n_boot=50, seed=0)
    assert report["perfect"]["ratio"] == pytest.approx(1.0) and report["perfect"]["within_target"]
    assert report["perfect"]["lo"] <= 1.0 <= report["perfect"]["hi"]
    assert report["blurred"]["ratio"] < TARGET[0] and not report["blurred"]["within_target"]
    assert report["squares"]["ratio"] > TARGET[1] and not report["squares"]["within_target"]
    stranger = write_store(tmp_path / "stranger.zarr", ["x:0", "x:1"], "images", codec.decode(latents[:2]))
    with pytest.raises(InputError, match="latents.zarr"):
        texture_report(latent_store, {"uni": stranger}, decoder, n_boot=5, seed=0)


def test_texture_command_writes_its_report(tmp_path):
    codec = SmokeVae(torch.device("cpu"), latent_channels=16, input_size=256)
    keys = [f"s:{i}" for i in range(6)]
    latents = codec.encode(np.repeat(np.repeat(tissue_like(6, seed=2), 4, 1), 4, 2))["latent"]
    write_store(tmp_path / "latents.zarr", keys, "latent", latents)
    write_store(tmp_path / "uni.zarr", keys, "images", codec.decode(latents))
    out = tmp_path / "texture.json"
    subprocess.run([sys.executable, "-m", "stmdit", "texture", "--latents", str(tmp_path / "latents.zarr"),
                    "--tiles", f"uni={tmp_path / 'uni.zarr'}", "--vae-impl", "smoke", "--n-boot", "20",
                    "--out", str(out)], check=True, capture_output=True)
    report = json.loads(out.read_text())
    assert report["regimes"]["uni"]["ratio"] == pytest.approx(1.0) and report["target"] == list(TARGET)


def test_a_mosaic_of_token_squares_is_told_from_tissue_by_its_cell_borders(tmp_path):
    """Tiles whose 32-px cells are each a flat colour plus fine noise (what a denoiser making each
    patch token on its own draws) have about the roughness of tissue, but all of it on the cell
    borders: the border / inner ratio is far above tissue's ~1. The report keeps both per cell size."""
    rng = np.random.default_rng(3)
    n, size = 12, 128
    cells = np.kron(rng.uniform(90, 230, size=(n, size // 32, size // 32)), np.ones((32, 32)))
    mosaic = np.clip(cells + rng.normal(0, 12, size=(n, size, size)), 0, 255).astype(np.uint8)
    mosaic = np.repeat(mosaic[..., None], 3, axis=-1)
    tissue = np.repeat(np.repeat(tissue_like(n, seed=4), 2, 1), 2, 2)
    ratio = lambda tiles: np.nanmean(cell_border_roughness(tiles, 32), axis=0)  # noqa: E731
    border, inner = ratio(mosaic)
    assert border / inner > 20
    border, inner = ratio(tissue)
    assert 0.5 < border / inner < 2
    assert np.isnan(cell_border_roughness(mosaic[:, :32, :32], 32)).all()  # one cell: no border
    with pytest.raises(ValueError, match="multiple"):
        cell_border_roughness(mosaic, 12)

    codec = SmokeVae(torch.device("cpu"), latent_channels=4, input_size=size)
    keys = [f"s:{i}" for i in range(n)]
    latents = codec.encode(tissue)["latent"]
    latent_store = write_store(tmp_path / "latents.zarr", keys, "latent", latents)
    stores = {"uni": write_store(tmp_path / "mosaic.zarr", keys, "images", mosaic),
              "uncond": write_store(tmp_path / "same.zarr", keys, "images", codec.decode(latents))}
    report = texture_report(latent_store, stores, StoreDecoder(CodecSettings(), "cpu", codec=codec), n_boot=5, seed=0)
    assert report["uni"]["cell_border"]["32"]["generated"] > 10 * report["uni"]["cell_border"]["32"]["real_vae"]
    assert report["uncond"]["cell_border"]["32"]["generated"] == pytest.approx(report["uncond"]["cell_border"]["32"]["real_vae"])
    assert set(report["uni"]["cell_border"]) == {"16", "32"}


def test_tiles_without_large_structures_are_told_from_tissue_by_the_larger_blocks(tmp_path):
    """The real tiles are half white space, half tissue (a large structure). Shuffling each tile's
    8-px blocks keeps its palette and its 8-px detail but removes the structure: the roughness with
    64-px blocks then falls far below real (VAE)'s, while the real tiles themselves score 1 at every
    block size. The 8-px entry is the report's roughness ratio."""
    rng = np.random.default_rng(5)
    n, size = 16, 128
    tissue = np.repeat(np.repeat(tissue_like(n, seed=6), 2, 1), 2, 2)
    for tile in tissue:
        edge = rng.integers(40, 88)
        tile[:, edge:] = 245  # white space beside tissue, at a different place in each tile
    blocks = tissue.reshape(n, size // 8, 8, size // 8, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, -1, 8, 8, 3)
    shuffled = np.stack([b[rng.permutation(len(b))] for b in blocks])
    shuffled = shuffled.reshape(n, size // 8, size // 8, 8, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, size, size, 3)

    codec = SmokeVae(torch.device("cpu"), latent_channels=4, input_size=size)
    keys = [f"s:{i}" for i in range(n)]
    latents = codec.encode(tissue)["latent"]
    latent_store = write_store(tmp_path / "latents.zarr", keys, "latent", latents)
    stores = {"uni": write_store(tmp_path / "shuffled.zarr", keys, "images", codec.decode(codec.encode(shuffled)["latent"])),
              "uncond": write_store(tmp_path / "same.zarr", keys, "images", codec.decode(latents))}
    report = texture_report(latent_store, stores, StoreDecoder(CodecSettings(), "cpu", codec=codec), n_boot=5, seed=0)
    same, noise = report["uncond"]["scales"], report["uni"]["scales"]
    assert set(same) == {"8", "16", "32", "64"}
    assert all(entry["ratio"] == pytest.approx(1.0) for entry in same.values())
    assert noise["8"]["ratio"] == pytest.approx(report["uni"]["ratio"])
    assert noise["8"]["ratio"] > 0.8  # the fine detail is kept ...
    assert noise["64"]["ratio"] < 0.3  # ... the large structure is not
    assert set(texture_report(latent_store, {"uni": write_store(tmp_path / "small.zarr", keys, "images", tissue[:, :64, :64])},
                              StoreDecoder(CodecSettings(), "cpu", codec=codec), n_boot=5, seed=0)["uni"]["scales"]) == {"8", "16", "32"}
