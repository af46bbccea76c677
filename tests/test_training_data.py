"""Label sources, splits, augmentation and metrics of tmequant.training (no training here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path

from tmequant.errors import InputError, TmequantError
from tmequant.training import (
    NCT_CRC_ROLES,
    LabelSet,
    Sample,
    check_no_leakage,
    classification_metrics,
    count_metrics,
    load_labels,
    read_class_folders,
    read_csv_manifest,
    split_labels,
)
from tmequant.training.augment import (
    AugmentConfig,
    MacenkoNormalizer,
    augment,
    dihedral,
    hed_jitter,
)
from tmequant.training.dataset import TileReader, read_image

NCT = ("tiles", "nct-crc-he-samples")
CMU = ("slides", "CMU-1-Small-Region.svs")


def make_class_folders(root: Path) -> Path:
    """NCT sample tiles (one per class) laid out as class folders via symlinks."""
    src = shared_path(*NCT)
    out = root / "nct"
    for f in sorted(src.glob("*.tif")):
        cls = f.name.split("-")[0]
        (out / cls).mkdir(parents=True, exist_ok=True)
        (out / cls / f.name).symlink_to(f)
    return out


# --- 1. class folders --------------------------------------------------------------------
def test_class_folders_parse_nct_layout_with_builtin_roles(tmp_path):
    folder = make_class_folders(tmp_path)
    ls = load_labels(folder)
    assert ls.tissue_classes == sorted(
        ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
    )
    assert len(ls) == 9
    assert {s.label for s in ls.samples} == set(ls.tissue_classes)
    assert all(Path(s.path).is_file() and s.kind == "file" for s in ls.samples)
    # the built-in map (a user who downloads NCT-CRC-HE-100K trains in one command)
    assert ls.tissue_roles["TUM"] == "tumor" and ls.tissue_roles["LYM"] == "immune"
    assert ls.tissue_roles["STR"] == ls.tissue_roles["MUS"] == "stroma"
    assert ls.tissue_roles["DEB"] == "necrosis" and ls.tissue_roles["BACK"] == "background"
    assert {ls.tissue_roles[c] for c in ("ADI", "MUC", "NORM")} == {"other_tissue"}
    assert set(NCT_CRC_ROLES) == set(ls.tissue_classes)


def test_class_folder_without_images_is_a_clear_error(tmp_path):
    folder = make_class_folders(tmp_path)
    (folder / "EMPTY").mkdir()
    with pytest.raises(InputError, match="EMPTY.*no images"):
        read_class_folders(folder)
    ls = read_class_folders(folder, allow_empty_classes=True)
    assert "EMPTY" in ls.tissue_classes and ls.label_counts()["EMPTY"] == 0


def test_class_folder_unknown_class_is_a_clear_error(tmp_path):
    folder = make_class_folders(tmp_path)
    with pytest.raises(InputError, match="unknown classes.*'TUM'"):
        read_class_folders(
            folder, classes=["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR"]
        )


def test_tile_reader_crops_centre_and_random_without_resampling(tmp_path):
    folder = make_class_folders(tmp_path)
    s = read_class_folders(folder).samples[0]
    full = read_image(s.path)
    assert full.shape == (224, 224, 3)
    r = TileReader(64, 0.5)
    centre = r.read(s)
    assert centre.shape == (64, 64, 3)
    np.testing.assert_array_equal(centre, full[80:144, 80:144])
    crop = r.read(s, np.random.default_rng(3))
    # a random crop is a window of the original pixels (the MPP is kept)
    hits = [
        (y, x)
        for y in range(161)
        for x in range(161)
        if np.array_equal(full[y : y + 64, x : x + 64], crop)
    ]
    assert hits


# --- 2. CSV manifest ---------------------------------------------------------------------
def test_csv_manifest_with_patients_relative_paths(tmp_path):
    src = shared_path(*NCT)
    files = sorted(src.glob("*.tif"))
    (tmp_path / "img").mkdir()
    rows = ["path,label,slide_id,patient_id"]
    for i, f in enumerate(files):
        (tmp_path / "img" / f.name).symlink_to(f)
        label = "tumour" if f.name.startswith("TUM") else "other"
        rows.append(f"img/{f.name},{label},s{i},P{i % 3}")
    man = tmp_path / "labels.csv"
    man.write_text("\n".join(rows) + "\n")
    ls = load_labels(man)
    assert ls.tissue_classes == ["other", "tumour"]
    assert ls.label_counts() == {"other": 8, "tumour": 1}
    assert [s.patient_id for s in ls.samples[:4]] == ["P0", "P1", "P2", "P0"]
    assert ls.tissue_roles == {"other": "other_tissue", "tumour": "tumor"}
    assert all(Path(s.path).is_absolute() for s in ls.samples)


def test_csv_manifest_errors_name_the_problem(tmp_path):
    man = tmp_path / "bad.csv"
    man.write_text("file,class\nx.png,TUM\n")
    with pytest.raises(InputError, match="lacks 'path' and 'label'"):
        read_csv_manifest(man)
    man.write_text("path,label\nmissing.png,TUM\n")
    with pytest.raises(InputError, match="line 2.*not found"):
        read_csv_manifest(man)


# --- 3. slides + QuPath GeoJSON ------------------------------------------------------------
def _polygon(x0, y0, x1, y1, cls):
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    f = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"objectType": "annotation"},
    }
    if cls:
        f["properties"]["classification"] = {"name": cls, "color": [255, 0, 0]}
    return f


def _point(x, y, cls):
    return {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [x, y]},
        "properties": {"objectType": "detection", "classification": {"name": cls}},
    }


def _write_geojson(path: Path, feats) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def _expected_tiles(rect, side, width, height, min_cover):
    """Brute force, arithmetic only: grid cells covering >= min_cover of an axis-aligned rect."""
    x0, y0, x1, y1 = rect
    out = set()
    for r in range(int(height // side)):
        for c in range(int(width // side)):
            ox = max(0.0, min(x1, (c + 1) * side) - max(x0, c * side))
            oy = max(0.0, min(y1, (r + 1) * side) - max(y0, r * side))
            if ox * oy / side**2 >= min_cover - 1e-9:
                out.add((c, r))
    return out


def test_slide_geojson_polygons_give_tiles_and_points_give_counts(tmp_path):
    slide = shared_path(*CMU)
    from tmequant.wsi import open_slide

    with open_slide(slide) as s:
        width, height = s.info.dimensions
        mpp = s.info.mpp_um
    tile_px, target = 64, 0.5
    side = tile_px * target / mpp  # level-0 px per tile
    tum, strm = (1000, 1000, 1400, 1300), (1200, 1800, 1500, 2100)
    cx, cy = 17.5 * side, 17.5 * side  # centre of grid tile (col 17, row 17), inside `tum`
    feats = [_polygon(*tum, "Tumor"), _polygon(*strm, "Stroma")]
    feats += [_point(cx + d, cy - d, "Lymphocyte") for d in (-5, 0, 5)]
    feats += [_point(18.5 * side, cy + d, "Tumor cell") for d in (-3, 3)]
    ann = _write_geojson(tmp_path / "CMU-1-Small-Region.geojson", feats)
    from tmequant.training import AnnotatedSlide, read_slide_annotations

    ls = read_slide_annotations([AnnotatedSlide(str(slide), str(ann), "cmu")], tile_px, target)
    assert ls.tissue_classes == ["Stroma", "Tumor"]
    assert ls.cell_classes == ["Lymphocyte", "Tumor cell"]
    assert ls.cell_roles == {"Lymphocyte": "lymphocyte", "Tumor cell": "tumor_cell"}
    got = {}
    for smp in ls.samples:
        x, y, sd = smp.box
        assert sd == pytest.approx(side)
        c, r = round(x / side), round(y / side)
        assert x == pytest.approx(c * side) and y == pytest.approx(r * side)
        got[(c, r)] = smp
    for rect, cls in ((tum, "Tumor"), (strm, "Stroma")):
        exp = _expected_tiles(rect, side, width, height, 0.5)
        assert exp and {k for k, v in got.items() if v.label == cls} == exp
    # counts only on tiles fully inside an annotation; (17,17): 3 lymphocytes; (18,17): 2 tumour
    full = _expected_tiles(tum, side, width, height, 0.99) | _expected_tiles(
        strm, side, width, height, 0.99
    )
    assert {k for k, v in got.items() if v.counts is not None} == full
    assert got[(17, 17)].counts == (3.0, 0.0)
    assert got[(18, 17)].counts == (0.0, 2.0)
    assert sum(sum(v.counts) for v in got.values() if v.counts is not None) == 5
    # the pixels are read through tmequant.wsi at the model's MPP
    smp = got[(17, 17)]
    tile = TileReader(tile_px, target).read(smp)
    assert tile.shape == (64, 64, 3) and tile.dtype == np.uint8
    import openslide
    from PIL import Image

    x, y, sd = smp.box
    with openslide.OpenSlide(str(slide)) as osr:
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        ref = osr.read_region((x0, y0), 0, (int(sd) + 2, int(sd) + 2)).convert("RGB")
    ref = np.asarray(
        ref.resize((64, 64), Image.BOX, box=(x - x0, y - y0, x - x0 + sd, y - y0 + sd)), dtype=float
    )
    assert tile.std() > 10  # tissue, not glass
    assert np.abs(tile - ref).mean() < 3.0


def test_geojson_errors_are_clear(tmp_path):
    slide = shared_path(*CMU)
    from tmequant.training import AnnotatedSlide, read_slide_annotations

    bad = tmp_path / "bad.geojson"
    bad.write_text('{"type": "FeatureCollection", "features": [ {"type": ')
    with pytest.raises(TmequantError, match="bad.geojson.*not valid JSON"):
        read_slide_annotations([AnnotatedSlide(str(slide), str(bad), "cmu")], 64, 0.5)
    nogeom = _write_geojson(tmp_path / "nogeom.geojson", [{"type": "Feature", "properties": {}}])
    with pytest.raises(TmequantError, match="no geometry"):
        read_slide_annotations([AnnotatedSlide(str(slide), str(nogeom), "cmu")], 64, 0.5)
    uncl = _write_geojson(tmp_path / "uncl.geojson", [_polygon(0, 0, 500, 500, None)])
    with pytest.raises(InputError, match="no classified polygons"):
        read_slide_annotations([AnnotatedSlide(str(slide), str(uncl), "cmu")], 64, 0.5)
    two = _write_geojson(
        tmp_path / "two.geojson",
        [_polygon(0, 0, 500, 500, "Tumor"), _polygon(600, 600, 900, 900, "Fat")],
    )
    with pytest.raises(InputError, match=r"unknown classes \['Fat'\]"):
        read_slide_annotations(
            [AnnotatedSlide(str(slide), str(two), "cmu")], 64, 0.5, classes=["Tumor"]
        )
    with pytest.raises(InputError, match=r"classes \['Necrosis'\] have no tiles"):
        read_slide_annotations(
            [AnnotatedSlide(str(slide), str(two), "cmu")],
            64,
            0.5,
            classes=["Tumor", "Fat", "Necrosis"],
        )


def test_load_labels_finds_geojson_beside_slide(tmp_path):
    slide = shared_path(*CMU)
    (tmp_path / slide.name).symlink_to(slide)
    _write_geojson(tmp_path / "CMU-1-Small-Region.geojson", [_polygon(0, 0, 700, 700, "Tumor")])
    ls = load_labels(tmp_path, tile_px=64, mpp_um=0.5)
    assert ls.tissue_classes == ["Tumor"] and len(ls) > 0
    assert {s.slide_id for s in ls.samples} == {"CMU-1-Small-Region"}


# --- splits ------------------------------------------------------------------------------
def _synthetic_set(n_patients=30, seed=0) -> LabelSet:
    rng = np.random.default_rng(seed)
    samples = []
    for p in range(n_patients):
        for s in range(int(rng.integers(1, 3))):
            for t in range(int(rng.integers(2, 9))):
                samples.append(
                    Sample(
                        path=f"/x/p{p}s{s}t{t}.png",
                        label=f"c{int(rng.integers(3))}",
                        slide_id=f"p{p}s{s}",
                        patient_id=f"P{p}",
                    )
                )
    return LabelSet(samples=samples, tissue_classes=["c0", "c1", "c2"])


def test_split_never_puts_a_patient_in_two_splits_and_is_stratified():
    ls = _synthetic_set()
    sp = split_labels(ls, val_fraction=0.2, test_fraction=0.2, seed=1)
    where: dict[str, set[str]] = {}
    for s, k in zip(ls.samples, sp):
        where.setdefault(s.patient_id, set()).add(k)
    assert all(len(v) == 1 for v in where.values())
    for k in ("train", "val", "test"):
        labs = [s.label for s, kk in zip(ls.samples, sp) if kk == k]
        assert set(labs) == {"c0", "c1", "c2"}, k  # every class in every split
    frac_val = sp.count("val") / len(sp)
    assert 0.1 < frac_val < 0.3
    assert split_labels(ls, 0.2, 0.2, seed=1) == sp  # deterministic
    check_no_leakage(ls, sp)


def test_split_falls_back_to_slides_then_files_and_detects_leakage():
    ls = _synthetic_set()
    no_pat = LabelSet([Sample(s.path, s.label, s.slide_id) for s in ls.samples], ls.tissue_classes)
    sp = split_labels(no_pat, 0.25, seed=0)
    by_slide: dict[str, set[str]] = {}
    for s, k in zip(no_pat.samples, sp):
        by_slide.setdefault(s.slide_id, set()).add(k)
    assert all(len(v) == 1 for v in by_slide.values())
    leaky = ["train"] * len(ls)
    leaky[1] = "val"  # tiles 0 and 1 belong to patient P0
    with pytest.raises(InputError, match="P0.*more than one split"):
        check_no_leakage(ls, leaky)
    given = LabelSet(
        [
            Sample(
                s.path,
                s.label,
                s.slide_id,
                s.patient_id,
                split="val" if i in (0, 1) and s.patient_id == "P0" else None,
            )
            for i, s in enumerate(ls.samples)
        ],
        ls.tissue_classes,
    )
    sp2 = split_labels(given, 0.2, seed=0)
    assert {k for s, k in zip(ls.samples, sp2) if s.patient_id == "P0"} == {"val"}


# --- augmentation ------------------------------------------------------------------------
def _nct_tile(name="TUM"):
    return read_image(next(shared_path(*NCT).glob(f"{name}-*.tif")))


def test_dihedral_is_the_eight_symmetries():
    a = np.arange(12).reshape(3, 4)
    outs = {dihedral(a, k).tobytes() + bytes(dihedral(a, k).shape) for k in range(8)}
    assert len(outs) == 8
    assert np.array_equal(dihedral(a, 2), a[::-1, ::-1])


def test_hed_jitter_identity_and_effect():
    img = _nct_tile()
    same = hed_jitter(img, np.random.default_rng(0), 0.0, 0.0)
    assert np.abs(same - img).max() <= 1.0  # OD round trip only
    moved = hed_jitter(img, np.random.default_rng(0), 0.2, 0.05)
    assert np.abs(moved - img).mean() > 2.0
    out = augment(img[:64, :64], np.random.default_rng(1), AugmentConfig())
    assert (
        out.shape == (64, 64, 3) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 255
    )
    out2 = augment(img[:64, :64], np.random.default_rng(1), AugmentConfig())
    np.testing.assert_array_equal(out, out2)  # seeded: reproducible


def test_macenko_moves_stains_towards_target():
    target = read_image(shared_path("tiles", "tiatoolbox-target-image.png"))[:400, :400]
    src = _nct_tile("TUM")
    norm = MacenkoNormalizer(target)
    out = norm(src)
    assert out.shape == src.shape and out.dtype == np.uint8
    from tmequant.training.augment import macenko_stains

    t_he, _ = macenko_stains(target)
    s_he, _ = macenko_stains(src)
    o_he, _ = macenko_stains(out)
    # the output's stain vectors are closer to the target's than the source's were
    assert np.abs(o_he - t_he).sum() < np.abs(s_he - t_he).sum()


# --- metrics -----------------------------------------------------------------------------
def test_classification_metrics_hand_example():
    m = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), ["a", "b"])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    # F1(a) = 2*1*0.5/1.5, F1(b) = 2*(2/3)*1/(5/3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == [[1, 1], [0, 2]]


def test_count_metrics_per_tile_and_per_image():
    true = np.array([[1.0], [3.0], [5.0], [np.nan]])
    pred = np.array([[2.0], [3.0], [4.0], [9.0]])
    m = count_metrics(true, pred, ["lym"], image_ids=["a", "a", "b", "b"])["lym"]
    assert m["n_tiles"] == 3 and m["mae_per_tile"] == pytest.approx(2 / 3)
    assert m["pearson_per_tile"] == pytest.approx(np.corrcoef([1, 3, 5], [2, 3, 4])[0, 1])
    assert m["spearman_per_tile"] == pytest.approx(1.0)
    assert m["n_images"] == 2 and m["mae_per_image"] == pytest.approx((1 + 1) / 2)
    assert math.isnan(count_metrics(np.ones((3, 1)), pred[:3], ["x"])["x"]["pearson_per_tile"])


def test_demo_finds_inflammatory_type_id_from_the_parquet():
    import importlib.util

    folder = shared_path("histolytics")
    shared_path("histolytics", "hgsc_nest_type_mask.npz")
    spec = importlib.util.spec_from_file_location(
        "demo_count_head",
        Path(__file__).resolve().parents[1] / "scripts" / "demo_count_head_histolytics.py",
    )
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    centroids, types, names = demo.nuclei_table(folder)
    assert sorted(names.values()) == ["connective", "inflammatory", "neoplastic"]
    inflam = next(k for k, v in names.items() if v == "inflammatory")
    # the data's README: 633 inflammatory nuclei in this crop
    assert abs(int((types == inflam).sum()) - 633) <= 3
    assert centroids.shape == (len(types), 2) and centroids.max() < 1500
