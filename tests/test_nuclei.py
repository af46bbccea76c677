"""Nucleus counter: synthetic scenes with known nuclei, MPP invariance, params, real pixels."""

from __future__ import annotations

import numpy as np
import pytest

from tmequant.errors import ParamsError
from tmequant.inference.nuclei import (
    NucleusCounterParams,
    count_tiles,
    detect_nuclei,
    haematoxylin_od,
)

# colours: medians of the histolytics nest image (background, inflammatory, neoplastic)
BACKGROUND = (168, 105, 188)
LYMPHOCYTE = (48, 11, 109)
TUMOUR = (103, 49, 158)
TILE_UM = 112.0


def scene(seed: int = 0, n_pairs: int = 2):
    """A 112 x 112 um scene: lymphocytes (7 um discs), touching lymphocyte pairs, tumour
    nuclei (14 x 11 um ellipses). Returns a list of (x_um, y_um, rx_um, ry_um, colour) and
    the true (lymphocyte, other) counts."""
    rng = np.random.default_rng(seed)
    cells = []
    slots = [(x, y) for y in np.arange(12, 112, 22.0) for x in np.arange(12, 112, 22.0)]
    rng.shuffle(slots)
    n_lym, n_tum = 0, 0
    for i, (x, y) in enumerate(slots):
        x, y = x + rng.uniform(-2, 2), y + rng.uniform(-2, 2)
        if i < n_pairs:  # two lymphocytes touching: centres 6.5 um apart, radius 3.5 um
            cells += [(x - 3.25, y, 3.5, 3.5, LYMPHOCYTE), (x + 3.25, y, 3.5, 3.5, LYMPHOCYTE)]
            n_lym += 2
        elif i < 17:
            cells.append((x, y, 3.5, 3.5, LYMPHOCYTE))
            n_lym += 1
        else:
            cells.append((x, y, 7.0, 5.5, TUMOUR))
            n_tum += 1
    return cells, (n_lym, n_tum)


def render(cells, mpp_um: float, seed: int = 0, tile_um: float = TILE_UM) -> np.ndarray:
    """Rasterise a scene at ``mpp_um`` with 2x2 supersampling, slight blur and noise."""
    from scipy import ndimage as ndi

    n = round(tile_um / mpp_um)
    ss = 2
    c = (np.arange(n * ss) + 0.5) * (mpp_um / ss)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    img = np.empty((n * ss, n * ss, 3), np.float32)
    img[:] = BACKGROUND
    for x, y, rx, ry, col in cells:
        inside = ((xx - x) / rx) ** 2 + ((yy - y) / ry) ** 2 <= 1
        img[inside] = col
    img = img.reshape(n, ss, n, ss, 3).mean((1, 3))
    s = 0.3 / mpp_um
    img = ndi.gaussian_filter(img, (s, s, 0))
    img += np.random.default_rng(seed).normal(0, 4, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def test_haematoxylin_separates_stains():
    px = np.array([[BACKGROUND, LYMPHOCYTE, TUMOUR, (255, 255, 255)]], np.uint8)
    h = haematoxylin_od(px)[0]
    assert h[1] > 0.9 > h[2] > 0.5 > h[0] > 0.1 > abs(h[3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_counts_exact(seed):
    cells, (n_lym, n_tum) = scene(seed)
    tile = render(cells, 0.5, seed)
    counts = count_tiles(tile[None], 0.5)
    assert counts.shape == (1, 2) and counts.dtype == np.float32
    assert abs(counts[0, 0] - n_lym) <= 1, (counts, n_lym)
    assert abs(counts[0, 1] - n_tum) <= 1, (counts, n_tum)


@pytest.mark.parametrize("seed", [0, 3])
def test_same_counts_at_half_the_mpp(seed):
    cells, truth = scene(seed)
    c05 = count_tiles(render(cells, 0.5, seed)[None], 0.5)[0]
    c025 = count_tiles(render(cells, 0.25, seed)[None], 0.25)[0]
    assert np.abs(c05 - c025).max() <= 1, (c05, c025)
    assert abs(c025[0] - truth[0]) <= 1


def test_detections_positions_and_sizes_in_um():
    cells, _ = scene(5, n_pairs=0)
    for mpp in (0.5, 0.25):
        d = detect_nuclei(render(cells, mpp, 5), mpp)
        lym = d[d["class"] == "lymphocyte"]
        true = np.array([(x, y) for x, y, *_, col in cells if col == LYMPHOCYTE])
        got = lym[["x_px", "y_px"]].to_numpy() * mpp + mpp / 2  # pixel centres in um
        dist = np.sqrt(((got[:, None] - true[None]) ** 2).sum(-1)).min(1)
        assert len(lym) == len(true) and dist.max() < 1.5
        # a 7 um disc is 38.5 um^2; the body above the peak fraction is a bit smaller
        assert 15 < lym["area_um2"].median() < 45


def test_empty_and_blank_tiles():
    blank = np.full((3, 64, 64, 3), 240, np.uint8)
    assert count_tiles(blank, 0.5).sum() == 0
    assert count_tiles(np.zeros((0, 64, 64, 3), np.uint8), 0.5).shape == (0, 2)
    assert len(detect_nuclei(blank[0], 0.5)) == 0


def test_batch_equals_tile_by_tile():
    tiles = np.stack([render(scene(s)[0], 0.5, s) for s in range(3)])
    batch = count_tiles(tiles, 0.5, sub_batch=2)
    one = np.concatenate([count_tiles(t[None], 0.5) for t in tiles])
    np.testing.assert_array_equal(batch, one)


def test_stain_normalisation_recovers_a_pale_slide():
    cells, truth = scene(7)
    tile = render(cells, 0.5, 7)
    # a pale slide: optical density at 60 %
    pale = np.clip(255 * (tile / 255.0) ** 0.6, 0, 255).astype(np.uint8)
    plain = count_tiles(pale[None], 0.5)[0]
    normed = count_tiles(pale[None], 0.5, NucleusCounterParams(stain_normalize=True))[0]
    assert plain[0] < truth[0] - 3  # pale lymphocytes fail the darkness rule ...
    assert abs(normed[0] - truth[0]) <= 2  # ... and the slide-level rescale brings them back


def test_params_validate_and_hash():
    p = NucleusCounterParams()
    assert p.validate() is p
    assert p.params_hash == NucleusCounterParams().params_hash
    assert p.params_hash != NucleusCounterParams(lymphocyte_min_h_od=0.9).params_hash
    for bad in (
        {"lymphocyte_min_area_um2": 90.0, "lymphocyte_max_area_um2": 80.0},
        {"lymphocyte_min_roundness": 1.5},
        {"foreground_h_od": -0.1},
        {"seed_h_od": 0.3, "foreground_h_od": 0.45},
        {"seed_min_distance_um": 0.0},
        {"smooth_sigma_um": float("nan")},
        {"enabled": "yes"},
        {"peak_fraction": 1.0},
    ):
        with pytest.raises(ParamsError, match=r"\[nucleus_counter\]"):
            NucleusCounterParams(**bad).validate()
    assert NucleusCounterParams.from_dict({"lymphocyte_min_h_od": 0.9}).lymphocyte_min_h_od == 0.9
    with pytest.raises(ParamsError, match="unknown key"):
        NucleusCounterParams.from_dict({"lymphocyte_min_darkness": 0.9})


def test_bad_input_shapes():
    with pytest.raises(ValueError):
        count_tiles(np.zeros((2, 8, 8), np.uint8), 0.5)
    with pytest.raises(ValueError):
        count_tiles(np.zeros((1, 8, 8, 3), np.float32), 0.5)
    with pytest.raises(ValueError):
        count_tiles(np.zeros((1, 8, 8, 3), np.uint8), 0.0)


def test_threads_give_the_same_counts():
    tiles = np.stack([render(scene(s)[0], 0.5, s) for s in range(4)])
    np.testing.assert_array_equal(count_tiles(tiles, 0.5, sub_batch=1, workers=2),
                                  count_tiles(tiles, 0.5))


def test_params_file_section(tmp_path):
    params_mod = pytest.importorskip("tmequant.params")
    f = tmp_path / "params.toml"
    f.write_text("[nucleus_counter]\nlymphocyte_max_area_um2 = 90\nstain_normalize = true\n")
    p = params_mod.nucleus_counter_params_from_file(f)
    assert p.lymphocyte_max_area_um2 == 90.0 and p.stain_normalize
    assert p.params_hash != NucleusCounterParams().params_hash
    f.write_text("[nucleus_counter]\nlymphocyte_darkness = 0.9\n")
    with pytest.raises(ParamsError, match="lymphocyte_darkness"):
        params_mod.nucleus_counter_params_from_file(f)
