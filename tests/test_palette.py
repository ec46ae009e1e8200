"""`stmdit palette`: mean-colour agreement of generated tiles with their real spots, against the
other-spot null."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

from stmdit.errors import InputError
from stmdit.palette import CONSTANT_SD, axis_correlations, mean_colour, palette_report


def palette_tiles(palettes: np.ndarray, seed: int, size: int = 64) -> np.ndarray:
    """Tiles of the given (N, 3) RGB palettes: a random coarse layout of light and dark blocks in
    that palette, plus pixel noise (so layout and palette vary independently)."""
    rng = np.random.default_rng(seed)
    n = len(palettes)
    shade = np.repeat(np.repeat(rng.uniform(0.6, 1.4, size=(n, 8, 8, 1)), size // 8, axis=1), size // 8, axis=2)
    tiles = palettes[:, None, None, :] * shade + rng.normal(0, 12, (n, size, size, 3))
    return np.clip(tiles, 0, 255).astype(np.uint8)


def write_store(path, keys, images):
    group = zarr.open_group(str(path), mode="w")
    group.create_array("images", data=images, chunks=(4, *images.shape[1:]))
    group.create_array("spot_key", data=np.array(keys, dtype=str))
    return path


def random_palettes(n: int, seed: int) -> np.ndarray:
    """H&E-like palettes: pink to purple, light to dark."""
    rng = np.random.default_rng(seed)
    purple, pink = np.array([120.0, 70.0, 150.0]), np.array([220.0, 150.0, 190.0])
    mix = rng.uniform(0, 1, size=(n, 1))
    return (mix * purple + (1 - mix) * pink) * rng.uniform(0.8, 1.1, size=(n, 1))


def test_mean_colour_in_lab_and_rgb():
    white = np.full((1, 8, 8, 3), 255, np.uint8)
    assert mean_colour(white, "lab")[0] == pytest.approx([100.0, 0.0, 0.0], abs=0.01)
    red = np.zeros((1, 8, 8, 3), np.uint8)
    red[..., 0] = 255
    lab = mean_colour(red, "lab")[0]
    assert lab[1] > 50 and lab[2] > 50  # red is +a* (red-green) and +b* (yellow-blue)
    half = np.concatenate([white, np.zeros_like(white)], axis=1)
    assert mean_colour(half, "rgb")[0] == pytest.approx([127.5] * 3)
    with pytest.raises(ValueError, match="expected"):
        mean_colour(white[..., :2], "lab")
    with pytest.raises(ValueError, match="colour space"):
        mean_colour(white, "hsv")


def test_axis_correlations_are_zero_for_a_constant_column():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(20, 3))
    generated = real.copy()
    generated[:, 1] = 5.0
    assert axis_correlations(real, generated) == pytest.approx([1.0, 0.0, 1.0])
    # grey tiles: a* and b* are 0 up to rounding, which must not correlate with anything
    rng_tiles = np.random.default_rng(1).integers(0, 256, size=(20, 8, 8, 1), dtype=np.uint8)
    grey = mean_colour(np.repeat(rng_tiles, 3, axis=-1), "lab")
    assert np.abs(grey[:, 1:]).max() < 0.1 and grey[:, 1:].std(axis=0).max() < CONSTANT_SD
    assert axis_correlations(real, grey)[1:] == pytest.approx([0.0, 0.0])


@pytest.mark.parametrize("space", ["lab", "rgb"])
def test_tiles_in_their_spots_palette_beat_the_null_and_broken_generators_do_not(tmp_path, space):
    n = 80
    keys = [f"s:{i}" for i in range(n)]
    palettes = random_palettes(n, seed=1)
    real = palette_tiles(palettes, seed=2)
    patches = [write_store(tmp_path / "a.zarr", keys[:30], real[:30]),
               write_store(tmp_path / "b.zarr", keys[30:], real[30:])]
    # the spot's palette, a little off, in a layout of its own: what UNI should give
    own_palette = palette_tiles(palettes * np.random.default_rng(3).uniform(0.9, 1.1, size=(n, 3)), seed=4)
    samples = {
        "uni": write_store(tmp_path / "uni.zarr", keys, own_palette),
        "shuffled_uni": write_store(tmp_path / "shuffled.zarr", keys, own_palette[np.roll(np.arange(n), 11)]),
        "untrained": write_store(tmp_path / "untrained.zarr", keys, np.repeat(own_palette[:1], n, axis=0)),
        "uncond": write_store(tmp_path / "uncond.zarr", keys, palette_tiles(random_palettes(n, seed=5), seed=6)),
    }
    regimes = palette_report(patches, samples, space=space, n_boot=200, seed=0)
    assert regimes["uni"]["carries_palette"] and regimes["uni"]["point"] > 0.6
    for name in ("shuffled_uni", "untrained", "uncond"):
        entry = regimes[name]
        assert not entry["carries_palette"], name
        assert entry["lo"] < 0.3, name
    for name in ("shuffled_uni", "uncond"):
        assert regimes[name]["null"]["lo"] < 0 < regimes[name]["null"]["hi"], name
    untrained = regimes["untrained"]  # one tile for every spot: no colour varies, r is 0 throughout
    assert untrained["point"] == untrained["lo"] == untrained["hi"] == untrained["null"]["hi"] == 0.0


def test_cli_writes_json_and_names_bad_stores(tmp_path):
    keys = [f"s:{i}" for i in range(12)]
    real = palette_tiles(random_palettes(12, seed=7), seed=8)
    patches = write_store(tmp_path / "p.zarr", keys, real)
    uni = write_store(tmp_path / "uni.zarr", keys, real)
    out = tmp_path / "palette.json"
    command = [sys.executable, "-m", "stmdit", "palette", "--patches", str(patches), "--tiles", f"uni={uni}",
               "--n-boot", "50", "--model", "M", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["space"] == "lab" and result["axes"] == ["L*", "a*", "b*"] and result["model"] == "M"
    entry = result["regimes"]["uni"]
    assert entry["point"] == pytest.approx(1.0) and entry["carries_palette"] and entry["n"] == 12
    stray = write_store(tmp_path / "stray.zarr", [*keys[:11], "other:0"], real)
    with pytest.raises(InputError, match="other:0") as error:
        palette_report([patches], {"uni": stray}, space="lab", n_boot=20, seed=0)
    assert "stray.zarr" in str(error.value)
    single = write_store(tmp_path / "single.zarr", keys[:1], real[:1])
    failed = subprocess.run([*command[:-4], "--tiles", f"uni={single}", "--out", str(tmp_path / "x.json")],
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "single.zarr" in failed.stderr and "at least 2" in failed.stderr
    assert not (tmp_path / "x.json").exists()


def test_palette_json_is_an_evaluation_json_read_through_its_one_reader(tmp_path):
    from stmdit.eval_json import load_eval_json

    keys = [f"s:{i}" for i in range(12)]
    real = palette_tiles(random_palettes(12, seed=7), seed=8)
    patches = write_store(tmp_path / "p.zarr", keys, real)
    out = tmp_path / "palette.json"
    subprocess.run([sys.executable, "-m", "stmdit", "palette", "--patches", str(patches), "--tiles", f"uni={patches}",
                    "--n-boot", "20", "--model", "M", "--out", str(out)], check=True, capture_output=True)
    doc = load_eval_json(out, "palette")
    assert doc["metric"] == "palette" and doc["regimes"]["uni"]["carries_palette"]
    with pytest.raises(InputError, match="a palette JSON where a layout JSON was expected"):
        load_eval_json(out, "layout")
    old = json.loads(out.read_text())
    del old["metric"]  # written before the diagnostics named their metric
    del old["regimes"]["uni"]["carries_palette"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(InputError, match=r"old\.json: regimes\.uni: .*\['carries_palette'\]"):
        load_eval_json(tmp_path / "old.json", "palette")
