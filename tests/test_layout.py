"""`stmdit layout`: coarse layout agreement of generated tiles with their real spots."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
import pytest
import zarr

from stmdit.errors import InputError
from stmdit.layout import coarse_layout, derangement, layout_agreement, layout_report


def random_tiles(n: int, seed: int, size: int = 64) -> np.ndarray:
    """Tiles with a random coarse layout (8 x 8 blocks) plus pixel noise."""
    rng = np.random.default_rng(seed)
    blocks = rng.uniform(40, 215, size=(n, 8, 8, 3))
    tiles = np.repeat(np.repeat(blocks, size // 8, axis=1), size // 8, axis=2)
    return np.clip(tiles + rng.normal(0, 10, tiles.shape), 0, 255).astype(np.uint8)


def write_store(path, keys, images):
    group = zarr.open_group(str(path), mode="w")
    group.create_array("images", data=images, chunks=(4, *images.shape[1:]))
    group.create_array("spot_key", data=np.array(keys, dtype=str))
    return path


def test_layout_ignores_brightness_and_palette_but_not_position():
    tiles = random_tiles(6, seed=0)
    brighter = np.clip(tiles.astype(np.int16) + 30, 0, 255).astype(np.uint8)
    recoloured = tiles[..., ::-1]
    flipped = tiles[:, ::-1]
    base = coarse_layout(tiles)
    assert np.allclose(base.mean(axis=1), 0, atol=1e-4)
    assert layout_agreement(base, coarse_layout(brighter)).min() > 0.97
    assert layout_agreement(base, coarse_layout(recoloured)).min() > 0.8  # grey mean of permuted channels
    assert layout_agreement(base, coarse_layout(flipped)).mean() < 0.5
    flat = np.full_like(tiles, 128)
    assert np.all(layout_agreement(base, coarse_layout(flat)) == 0)  # a flat tile has no layout, not NaN
    with pytest.raises(ValueError, match="8 x 8 blocks"):
        coarse_layout(tiles[:, :60, :60])


def test_derangement_has_no_fixed_point():
    for seed in range(20):
        order = derangement(5, seed)
        assert sorted(order) == list(range(5)) and not np.any(order == np.arange(5))


def test_tiles_that_follow_their_spots_beat_the_null_and_others_do_not(tmp_path):
    n = 60
    keys = [f"s:{i}" for i in range(n)]
    real = random_tiles(n, seed=1)
    patches = [write_store(tmp_path / "a.zarr", keys[:25], real[:25]), write_store(tmp_path / "b.zarr", keys[25:], real[25:])]
    rng = np.random.default_rng(2)
    following = np.clip(real.astype(np.float32) * 0.7 + 40 + rng.normal(0, 25, real.shape), 0, 255).astype(np.uint8)
    samples = {
        "uni": write_store(tmp_path / "uni.zarr", keys, following),
        "uncond": write_store(tmp_path / "uncond.zarr", keys, random_tiles(n, seed=3)),
        "shuffled": write_store(tmp_path / "shuffled.zarr", keys, following[np.roll(np.arange(n), 7)]),
    }
    regimes = layout_report(patches, samples, cells=8, n_boot=200, seed=0)
    assert regimes["uni"]["follows_layout"] and regimes["uni"]["mean"] > 0.8
    for name in ("uncond", "shuffled"):
        entry = regimes[name]
        assert not entry["follows_layout"], name
        assert entry["lo"] < 0 < entry["hi"] and entry["null"]["lo"] < 0 < entry["null"]["hi"], name
    assert abs(regimes["uni"]["null"]["mean"]) < 0.1


def test_cli_writes_json_and_names_a_missing_spot(tmp_path):
    keys = [f"s:{i}" for i in range(8)]
    real = random_tiles(8, seed=4)
    patches = write_store(tmp_path / "p.zarr", keys, real)
    uni = write_store(tmp_path / "uni.zarr", keys, real)
    out = tmp_path / "layout.json"
    command = [sys.executable, "-m", "stmdit", "layout", "--patches", str(patches), "--tiles", f"uni={uni}",
               "--n-boot", "50", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["regimes"]["uni"]["mean"] == pytest.approx(1.0) and result["regimes"]["uni"]["follows_layout"]
    stray = write_store(tmp_path / "stray.zarr", [*keys[:7], "other:0"], real)
    with pytest.raises(InputError, match="other:0") as error:
        layout_report([patches], {"uni": stray}, cells=8, n_boot=50, seed=0)
    assert "stray.zarr" in str(error.value)


class OracleFlow(torch.nn.Module):
    """A flow denoiser whose UNI is the spot's clean latent, flattened: its velocity implies the
    clean estimate `reveal(uni)` with the UNI and 0 with the null UNI."""

    def __init__(self, reveal):
        super().__init__()
        self.reveal = reveal

    def forward(self, x, t, uni, ge=None, drop_uni=None, drop_ge=None):
        estimate = self.reveal(uni.reshape(x.shape))
        estimate = torch.where(drop_uni[:, None, None, None], torch.zeros_like(estimate), estimate)
        return (x - estimate) / (t / 1000.0).reshape(-1, 1, 1, 1)


def palette_only(latents):
    return latents.mean(dim=(2, 3), keepdim=True).expand_as(latents)


@pytest.mark.parametrize("reveal, follows", [(lambda z: z, True), (palette_only, False)])
def test_layout_probe_tells_a_uni_path_that_carries_layout_from_one_that_carries_palette(reveal, follows):
    """The probe on exact answers: a model that reads the whole latent from UNI has a UNI part with
    the spot's layout; one that reads only the spot's mean colour has the brightness and no layout."""
    from stmdit.encoders.smoke import SmokeVae
    from stmdit.layout import probe_split
    from stmdit.model import get_objective

    codec = SmokeVae(torch.device("cpu"))
    latents = codec.encode(random_tiles(24, seed=5, size=256))["latent"]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    entry = probe_split(OracleFlow(reveal), get_objective("flow"), latents, latents.reshape(len(latents), -1), noise,
                        codec.decode, noise_level=0.98, batch_size=8, cells=8, n_boot=100, seed=0)
    part = entry["uni_part_layout"]
    assert part["follows_layout"] is follows
    if follows:
        assert part["mean"] > 0.9
    else:
        assert abs(part["mean"]) < 0.05
    assert entry["brightness_r"]["with_uni"] > 0.9
    assert abs(entry["brightness_r"]["null_uni"]) < 0.6  # 2% of the latent is left in the noised input
    assert (entry["contrast_r"]["with_uni"] > 0.9) is follows  # a flat palette tile has no contrast
