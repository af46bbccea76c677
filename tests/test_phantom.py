"""Phantom slides: truth lands on the intended phenotype, slides open, cells match densities."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tmequant.phantom import (
    CLASS_NAMES,
    PhantomRenderer,
    PhantomSpec,
    construction_truth,
    expected_biomarkers,
    generate_phantom,
    generator_key,
    load_truth,
    make_layout,
    phantom_tiles,
    realised_densities,
    scenario_spec,
    truth_grid,
)
from tmequant.phantom.spec import LYM, STR, TUM


@pytest.fixture(scope="module")
def layouts():
    return {s: make_layout(scenario_spec(s, seed=0)) for s in ("inflamed", "excluded", "desert")}


@pytest.mark.parametrize("scenario", ["inflamed", "excluded", "desert"])
def test_scenario_truth_has_intended_phenotype_and_tls(layouts, scenario):
    lay = layouts[scenario]
    row = expected_biomarkers(lay).row
    assert row["immune_phenotype"] == scenario
    assert row["tls_count"] == lay.spec.n_tls
    assert row["count_source"] == "cell_table"
    # the bulk is big enough for several 1 mm^2 phenotype regions
    assert row["bulk_area_mm2"] > 4.0 and row["phenotype_regions_n"] >= 4
    if scenario == "inflamed":
        assert row["til_density_intratumoral_per_mm2"] >= 2 * 130
    if scenario == "excluded":
        assert row["til_density_intratumoral_per_mm2"] < 130 / 1.5
        assert row["til_density_stromal_per_mm2"] >= 1.5 * 260
    if scenario == "desert":
        assert row["til_density_stromal_per_mm2"] < 260 / 2


def test_scenario_other_seed_keeps_phenotype():
    for s in ("inflamed", "excluded", "desert"):
        lay = make_layout(scenario_spec(s, seed=5))
        row = expected_biomarkers(lay).row
        assert (row["immune_phenotype"], row["tls_count"]) == (s, lay.spec.n_tls)


def test_tls_count_follows_spec_and_distance_rule():
    spec = scenario_spec("inflamed", seed=2, n_tls=4)
    lay = make_layout(spec)
    res = expected_biomarkers(lay)
    assert res.row["tls_count"] == 4
    assert (res.tls["distance_to_bulk_um"] <= 1000).all()
    assert (res.tls["mean_density_per_mm2"] >= 3000).all()
    # the same aggregates moved 1.4-1.6 mm away from the tumour are not TLS
    assert construction_truth(lay).placed["tls_count"] == 4
    far = make_layout(spec.replace(n_tls=1, tls_distance_um=(1400.0, 1600.0), fat_area_mm2=0.0,
                                   width_px=14000, height_px=12000))
    assert (far.labels == LYM).any()
    assert expected_biomarkers(far).row["tls_count"] == 0
    ct = construction_truth(far)
    assert ct.placed["tls_count"] == 0 and len(ct.tls) == 1
    assert ct.tls["distance_to_bulk_um"].iloc[0] > 1000 and not ct.tls["is_tls"].iloc[0]


# --- the construction truth: what was drawn, found without tmequant.biomarkers ---------------

@pytest.mark.parametrize("scenario", ["inflamed", "excluded", "desert"])
def test_construction_truth_is_what_was_drawn(layouts, scenario):
    lay = layouts[scenario]
    spec = lay.spec
    ct = construction_truth(lay)
    p = ct.placed
    assert p["immune_phenotype"] == scenario and p[f"phenotype_{scenario}_fraction"] == 1.0
    assert p["tls_count"] == spec.n_tls == len(ct.tls) and p["tls_intratumoral_count"] == 0
    assert (ct.tls["distance_to_bulk_um"] >= spec.tls_distance_um[0] - spec.tls_radius_um - 20).all()
    # areas from the spec's geometry: the bulk is the lobed ellipse (lobes average out), the
    # nests take nest_fraction of it, less the necrotic focus's share
    rx, ry = spec.tumor_radii_um
    assert p["bulk_area_mm2"] == pytest.approx(math.pi * rx * ry / 1e6, rel=0.05)
    want_tum = spec.nest_fraction * (1 - spec.necrosis_fraction) * p["bulk_area_mm2"]
    assert p["tumor_area_mm2"] == pytest.approx(want_tum, rel=0.05)
    # densities as drawn: the spec's intensities within 4 Poisson sigma
    for key, want in (("epithelium", spec.lymph_nest_per_mm2), ("tumor_stroma", spec.lymph_stroma_per_mm2)):
        area = p[f"{key}_area_mm2"]
        n = p["lymphocytes_intratumoral" if key == "epithelium" else "lymphocytes_stromal"]
        assert abs(n - want * area) <= 4 * math.sqrt(want * area) + 1, (key, n, want * area)
    # the checked row takes compartment densities at tile resolution, the rest as drawn
    row = ct.row
    assert row["truth_source"] == "construction"
    assert row["til_density_intratumoral_per_mm2"] == ct.tile["til_density_intratumoral_per_mm2"]
    assert row["immune_phenotype"] == p["immune_phenotype"] and row["tumor_area_mm2"] == p["tumor_area_mm2"]


@pytest.mark.parametrize("scenario", ["inflamed", "excluded", "desert"])
def test_biomarkers_module_agrees_with_the_construction(layouts, scenario):
    # the biomarkers module on a perfect classifier and counter (tile resolution) against the
    # independent construction truth: the bulk differs by definition (closed and opened tumour
    # tiles vs the drawn region: 4% on these 6 x 5 mm phantoms), the rest within a few %
    lay = layouts[scenario]
    ct = construction_truth(lay)
    row = expected_biomarkers(lay).row
    truth = ct.row
    assert row["compartment_resolution"] == "tile"
    assert (row["immune_phenotype"], row["tls_count"]) == (truth["immune_phenotype"], truth["tls_count"])
    assert row["tumor_area_mm2"] == pytest.approx(truth["tumor_area_mm2"], rel=1e-3)
    assert row["bulk_area_mm2"] == pytest.approx(truth["bulk_area_mm2"], rel=0.08)
    for k in ("til_density_intratumoral_per_mm2", "til_density_stromal_per_mm2", "til_density_core_per_mm2"):
        assert abs(row[k] - truth[k]) <= max(0.05 * truth[k], 2.0), (k, row[k], truth[k])
    assert abs(row["til_positive_tile_fraction"] - truth["til_positive_tile_fraction"]) <= 0.02


def test_tile_resolution_blurs_the_excluded_nests(layouts):
    # a known property of the tile definition, kept visible: the excluded nests were drawn
    # with 15 lymphocytes/mm^2 in stroma with 600; 112 um tiles on nest borders mix the two
    ct = construction_truth(layouts["excluded"])
    placed = ct.placed["til_density_intratumoral_per_mm2"]
    tile = ct.tile["til_density_intratumoral_per_mm2"]
    assert placed == pytest.approx(15.0, abs=5.0)
    assert 3 * placed < tile < 130  # blurred, yet still below the inflamed threshold


def test_lymphocyte_density_matches_request_within_poisson_error():
    spec = PhantomSpec(width_px=6000, height_px=6000, seed=3, n_tls=0, necrosis_fraction=0.0,
                       fat_area_mm2=0.0, tumor_radii_um=(900.0, 900.0), tumor_center_frac=(0.5, 0.5),
                       lymph_nest_per_mm2=300.0, lymph_stroma_per_mm2=800.0, lymph_outer_stroma_per_mm2=120.0)
    lay = make_layout(spec)
    px_mm2 = (spec.label_um * 1e-3) ** 2
    cells = lay.cells()
    lym = cells[cells["class"] == "lymphocyte"]
    lab = lay.labels[(lym["y"].to_numpy() // lay.downsample).astype(int),
                     (lym["x"].to_numpy() // lay.downsample).astype(int)]
    reg = lay.tumor_region[(lym["y"].to_numpy() // lay.downsample).astype(int),
                           (lym["x"].to_numpy() // lay.downsample).astype(int)]
    for mask_cells, mask_area, want in (
        (lab == TUM, lay.labels == TUM, 300.0),
        ((lab == STR) & reg, (lay.labels == STR) & lay.tumor_region, 800.0),
        ((lab == STR) & ~reg, (lay.labels == STR) & ~lay.tumor_region, 120.0),
    ):
        area = mask_area.sum() * px_mm2
        expected = want * area
        n = int(mask_cells.sum())
        assert abs(n - expected) < 4 * math.sqrt(expected), (n, expected)
    got = realised_densities(lay)
    assert abs(got["lymph_nest_per_mm2"] - 300) < 40


def test_rendered_lymphocytes_are_dark_round_nuclei():
    spec = PhantomSpec(width_px=2048, height_px=2048, seed=4, n_tls=0, fat_area_mm2=0.0,
                       necrosis_fraction=0.0, tumor_radii_um=(300.0, 300.0), lymph_outer_stroma_per_mm2=400.0,
                       background_margin_um=50.0)
    lay = make_layout(spec)
    img = PhantomRenderer(lay).render().astype(float)
    assert img.shape == (2048, 2048, 3)
    gray = img.mean(-1)
    kind = lay.nuclei_kind
    xy = lay.nuclei_xy.astype(int)
    lab_at = lay.labels[xy[:, 1] // lay.downsample, xy[:, 0] // lay.downsample]
    sel = (kind == 0) & (lab_at == STR)
    assert sel.sum() > 50
    at_lymph = gray[xy[sel, 1], xy[sel, 0]]
    rng = np.random.default_rng(0)
    ry, rx = np.nonzero(lay.labels == STR)
    pick = rng.choice(ry.size, 500)
    yy = ry[pick] * lay.downsample + 2
    xx = rx[pick] * lay.downsample + 2
    stroma = gray[yy, xx]
    assert np.median(at_lymph) < 110 < np.median(stroma)
    # haematoxylin-blue nuclei: blue channel above red at lymphocyte centres
    assert np.median(img[xy[sel, 1], xy[sel, 0], 2] - img[xy[sel, 1], xy[sel, 0], 0]) > 0


def test_layout_and_pixels_are_deterministic_in_the_seed():
    spec = PhantomSpec(width_px=3000, height_px=2600, seed=11, tumor_radii_um=(450.0, 400.0), n_tls=1,
                       tls_radius_um=70.0, tls_distance_um=(100.0, 200.0), fat_area_mm2=0.1,
                       background_margin_um=80.0)
    a, b = make_layout(spec), make_layout(spec)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.nuclei_xy, b.nuclei_xy)
    ra = PhantomRenderer(a).read(1000, 500, 300, 700)
    rb = PhantomRenderer(b).read(1000, 500, 300, 700)
    assert np.array_equal(ra, rb)
    c = make_layout(spec.replace(seed=12))
    assert not np.array_equal(a.labels, c.labels)


def test_read_regions_agree_with_full_render():
    spec = PhantomSpec(width_px=1500, height_px=1300, seed=1, tumor_radii_um=(250.0, 200.0), n_tls=0,
                       fat_area_mm2=0.05, background_margin_um=40.0)
    r = PhantomRenderer(make_layout(spec), band_px=512)
    full = r.render()
    assert np.array_equal(r.read(700, 300, 400, 900), full[700:1100, 300:1200])
    edge = r.read(1200, 1400, 200, 200)  # past the bottom-right corner: glass there
    assert np.array_equal(edge[:100, :100], full[1200:, 1400:])
    assert (edge[150:, 150:] == edge[199, 199]).all() and edge[199, 199].min() > 230
    assert (full.reshape(-1, 3).std(0) > 5).all()


@pytest.mark.parametrize("mpp", [0.5, 0.25])
def test_generate_writes_openslide_readable_svs_and_truth(tmp_path, mpp):
    openslide = pytest.importorskip("openslide")
    w = int(1200 / mpp)
    h = int(1000 / mpp)
    spec = PhantomSpec(name=f"tiny{mpp}", width_px=w, height_px=h, mpp_um=mpp, seed=2,
                       tumor_radii_um=(350.0, 300.0), n_tls=1 if mpp == 0.5 else 0,
                       tls_distance_um=(100.0, 200.0), tls_radius_um=70.0, fat_area_mm2=0.05,
                       background_margin_um=60.0)
    truth = generate_phantom(spec, tmp_path)
    with openslide.OpenSlide(str(truth.slide_path)) as s:
        assert s.dimensions == (w, h)
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(mpp)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(mpp)
        assert s.properties["openslide.vendor"] == "aperio"
        assert s.level_count >= 2
        region = np.asarray(s.read_region((0, 0), 0, (w, h)).convert("RGB"))
    # the pixels are the renderer's pixels, up to JPEG loss
    ref = PhantomRenderer(make_layout(spec)).render()
    assert np.abs(region.astype(int) - ref.astype(int)).mean() < 6
    t = load_truth(truth.slide_path)
    assert t["spec"]["seed"] == 2 and t["slide_mpp_um"] == mpp
    assert [c["name"] for c in t["legend"]] == list(CLASS_NAMES)
    assert t["expected"]["tls_count"] == truth.tls_count
    assert t["grid"]["tile_level0_px"] == pytest.approx(112.0 / mpp)
    assert t["tissue_area_mm2"] == pytest.approx(sum(v for k, v in truth.areas_mm2.items() if k != "BACK"))
    lab = np.load(truth.labels_path)
    assert lab["labels"].shape == (math.ceil(h / lab["downsample"]), math.ceil(w / lab["downsample"]))
    assert int(lab["downsample"]) * mpp == pytest.approx(spec.label_um)
    from tmequant.biomarkers import read_cell_table

    cells = read_cell_table(truth.cells_path)
    assert len(cells) == sum(t["cells"]["counts"].values())
    assert set(cells["class"].astype(str)) <= {"lymphocyte", "tumor_cell", "other"}
    json.dumps(t)  # plain JSON


def test_truth_grid_geometry_matches_pipeline_grid():
    spec = PhantomSpec(width_px=3000, height_px=2600, seed=0, tumor_radii_um=(500.0, 450.0), n_tls=0)
    g = truth_grid(make_layout(spec), min_tissue_fraction=0.0)
    assert g.tile_level0_px == pytest.approx(224.0)
    assert g.rows.max() == 2600 // 224 - 1 and g.cols.max() == 3000 // 224 - 1  # full tiles only
    total = sum(g.prob(r) for r in ("tumor", "stroma", "immune", "necrosis", "other_tissue", "background"))
    assert np.allclose(total, 1.0)


def test_phantom_tiles_are_labelled_and_counted():
    spec = PhantomSpec(width_px=4000, height_px=3400, seed=6, tumor_radii_um=(500.0, 420.0), n_tls=1,
                       tls_radius_um=120.0, tls_distance_um=(130.0, 250.0), fat_area_mm2=0.3,
                       background_margin_um=80.0)
    tiles = list(phantom_tiles([spec], max_per_class=6, min_purity=0.9))
    classes = {t.tissue_class for t in tiles}
    assert {"TUM", "STR", "ADI", "BACK"} <= classes
    assert all(t.image.shape == (224, 224, 3) and t.image.dtype == np.uint8 for t in tiles)
    assert all(t.purity >= 0.9 for t in tiles)
    assert max(sum(t.tissue_class == c for t in tiles) for c in classes) <= 6
    lym = [t.lymphocyte_count for t in tiles if t.tissue_class == "LYM"]
    back = [t.lymphocyte_count for t in tiles if t.tissue_class == "BACK" and t.purity == 1.0]
    assert all(c == 0 for c in back)
    if lym:  # a 150 um TLS holds at least one pure tile only sometimes
        assert min(lym) > 100
    mean = {c: np.mean([t.image.mean() for t in tiles if t.tissue_class == c]) for c in classes}
    assert mean["BACK"] > mean["STR"] > mean["TUM"]


def test_generator_key_and_phantom_cache(tmp_path):
    from tmequant.phantom import cache

    spec = PhantomSpec(name="cached", width_px=1200, height_px=1000, seed=3, tumor_radii_um=(160.0, 130.0),
                       n_tls=0, fat_area_mm2=0.0, background_margin_um=30.0)
    key = generator_key(spec)
    assert key == generator_key(spec) and key != generator_key(spec.replace(seed=4))
    assert key != generator_key(spec, tile_um=56.0)
    generate_phantom(spec, tmp_path / "a")
    slide = tmp_path / "a" / "cached.svs"
    assert cache.verified_truth(slide, key)["generator"] == key
    assert cache.verified_truth(slide, generator_key(spec.replace(seed=4))) is None
    assert cache.fetch(tmp_path / "c", key, "cached", tmp_path / "b") is None  # empty cache
    entry = cache.store(tmp_path / "c", key, "cached", tmp_path / "a")
    assert entry is not None and entry.name == key
    got = cache.fetch(tmp_path / "c", key, "cached", tmp_path / "b")
    assert got is not None and got["generator"] == key
    assert (tmp_path / "b" / "cached.svs").read_bytes() == slide.read_bytes()
    # a damaged entry is never used
    with open(entry / "cached.svs", "ab") as f:
        f.write(b"x")
    assert cache.fetch(tmp_path / "c", key, "cached", tmp_path / "d") is None
    assert not (tmp_path / "d" / "cached.svs").exists()


def test_pyramid_reduce_is_the_rounded_block_mean():
    from tmequant.wsi.write import _reduce

    rng = np.random.default_rng(0)
    for ds in (2, 4):
        for h, w in ((64, 96), (61, 94)):  # whole blocks, and edge-replicated ones
            strip = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            pad = np.pad(strip, ((0, (-h) % ds), (0, (-w) % ds), (0, 0)), mode="edge").astype(np.int64)
            hh, ww = pad.shape[0] // ds, pad.shape[1] // ds
            want = (pad.reshape(hh, ds, ww, ds, 3).sum(axis=(1, 3)) + ds * ds // 2) // (ds * ds)
            assert np.array_equal(_reduce(strip, ds), want.astype(np.uint8))


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError):
        PhantomSpec(mpp_um=0.3)
    with pytest.raises(ValueError):
        scenario_spec("hot")
    with pytest.raises(ValueError, match="n_tls"):
        make_layout(PhantomSpec(width_px=2000, height_px=2000, tumor_radii_um=(300.0, 300.0), n_tls=30))
