"""The harder synthetic CAMELYON16 (`difficulty="camelyon"`) and the demo data it must leave unchanged.

Oracles: the same slide painted without tumour (same seed: identical outside the lesions),
box means computed here with numpy (the 8 um/px view), colour deconvolution with Ruifrok &
Johnston's published stain vectors (not the painter's jittered ones) for nuclei, binomial and
Kolmogorov-Smirnov tests from scipy for the samplers, scipy's pdist for lesion diameters, the
written TIFF / XML / CSV files read back with tifffile, `Slide`, `read_asap_xml` and `csv`, and
for the demo the painter it always used (`synthesize_slide` + `write_pyramid_tiff`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageDraw
from scipy import ndimage, stats
from scipy.spatial.distance import pdist

from torch_impl.pipeline.demo import MakeDemoDataOptions, main_make_demo_data
from torch_impl.pipeline.options import field_docs
from torch_impl.slides import Slide, discover, make_demo_data, rasterize_polygons, read_asap_xml, synthetic
from torch_impl.slides.synthetic import DIFFICULTIES, pyramid, slide_seed, synthesize_slide, write_pyramid_tiff
from torch_impl.slides.synthetic_camelyon import (
    CAMELYON_PARAMS,
    CamelyonParams,
    lesion_category,
    sample_confounders,
    sample_lesion_diameters,
    synthesize_camelyon_slide,
)

MPP = 0.25
#: Largest lesions are micro-metastases (the slides here are too small for macro ones).
MICRO = CamelyonParams(itc_share=0.0, micro_share=1.0)
#: Ruifrok & Johnston's H, E and residual optical-density vectors (R, G, B).
RUIFROK = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]])
RUIFROK = RUIFROK / np.linalg.norm(RUIFROK, axis=1, keepdims=True)


def box_means(a: np.ndarray, k: int = 32) -> np.ndarray:
    """(H/k, W/k, ...) means of k x k blocks: the 8 um/px view of a 0.25 um/px image."""
    h, w = a.shape[0] // k * k, a.shape[1] // k * k
    return a[:h, :w].reshape(h // k, k, w // k, k, *a.shape[2:]).mean(axis=(1, 3))


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """(H, W) haematoxylin density by colour deconvolution with the published stain vectors."""
    od = -np.log((rgb.astype(np.float64) + 1.0) / 256.0)
    return (od.reshape(-1, 3) @ np.linalg.inv(RUIFROK))[:, 0].reshape(rgb.shape[:2])


def nuclei(rgb: np.ndarray, tissue: np.ndarray) -> tuple[np.ndarray, int]:
    """Nucleus labels: haematoxylin smoothed over 1 um, above 40% of its 99th percentile on tissue."""
    h = ndimage.gaussian_filter(haematoxylin(rgb), 1.0 / MPP)
    return ndimage.label(h > 0.4 * np.percentile(h[tissue], 99))


def nucleus_stats(rgb: np.ndarray, labels: np.ndarray, n: int, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(areas um^2, chromatin texture) of the nuclei lying wholly in `region`. Texture: the std
    of the haematoxylin's detail finer than 0.5 um over the nucleus's core (1 um in from its
    edge, so the edge's fall-off does not count), relative to the core's mean haematoxylin."""
    idx = np.arange(1, n + 1)
    h = haematoxylin(rgb)
    detail = h - ndimage.gaussian_filter(h, 0.5 / MPP)
    core = labels * ndimage.binary_erosion(labels > 0, iterations=int(1 / MPP))
    core_px = ndimage.sum_labels(core > 0, labels, idx)
    keep = (ndimage.mean(region, labels, idx) > 0.999) & (core_px >= 8)  # wholly inside, with a core
    areas = ndimage.sum_labels(np.ones(labels.shape), labels, idx) * MPP**2
    with np.errstate(invalid="ignore", divide="ignore"):  # nuclei without a core: dropped by `keep`
        texture = ndimage.standard_deviation(detail, core, idx) / ndimage.mean(h, core, idx)
    return areas[keep], texture[keep]


# ---------------------------------------------------------------- the demo stays as it was
def test_demo_difficulty_writes_what_the_demo_painter_wrote(tmp_path):
    """make_demo_data's default difficulty: the same TIFF bytes and pixels as synthesize_slide
    + write_pyramid_tiff (the demo's painter), and Tumor,Macro in the reference CSV."""
    records = make_demo_data(tmp_path / "d", n_normal=0, n_tumor=1, n_test_normal=0, n_test_tumor=1, size=512, seed=7)
    assert not (tmp_path / "d" / "lesions.csv").exists()
    for r in records:
        own = synthesize_slide((512, 512), tumor=True, seed=slide_seed(7, r.slide_id), mpp=MPP)
        write_pyramid_tiff(tmp_path / "own.tif", own.rgb, MPP)
        assert r.path.read_bytes() == (tmp_path / "own.tif").read_bytes()
        written = hashlib.sha256(tifffile.imread(r.path, level=0).tobytes()).hexdigest()
        assert written == hashlib.sha256(tifffile.imread(tmp_path / "own.tif", level=0).tobytes()).hexdigest()
    assert (tmp_path / "d" / "testing" / "reference.csv").read_text() == "test_001,Tumor,Macro\n"


def test_demo_preset_is_the_old_default(monkeypatch, tmp_path):
    """Without counts, size or mpp the demo writes 6 + 6 training and 4 + 4 test slides of
    2048 x 2048 px at 0.25 um/px, as before the difficulties (painter stubbed: no pixels needed)."""
    painted = []

    def paint(size, tumor, seed, mpp):
        painted.append((size, tumor, mpp))
        return synthetic.SyntheticSlide(
            np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), bool), np.zeros((8, 8), bool), []
        )

    monkeypatch.setattr(synthetic, "synthesize_slide", paint)
    monkeypatch.setattr(synthetic, "write_pyramid_tiff", lambda path, rgb, mpp: open(path, "wb").close())
    records = make_demo_data(tmp_path)
    assert {s for s, _, _ in painted} == {(2048, 2048)} and {m for _, _, m in painted} == {0.25}
    assert sum(t for _, t, _ in painted) == 10 and len(painted) == 20
    assert [r.split for r in records].count("test") == 8


def test_pyramid_is_the_rounded_two_by_two_mean():
    rgb = np.random.default_rng(0).integers(0, 256, size=(1024, 512, 3), dtype=np.uint8)
    levels = pyramid(rgb)
    assert [a.shape[:2] for a in levels] == [(1024, 512), (512, 256), (256, 128)]
    for fine, coarse in zip(levels, levels[1:]):
        h, w = fine.shape[:2]
        s = fine.reshape(h // 2, 2, w // 2, 2, 3).astype(np.int64).sum(axis=(1, 3))
        np.testing.assert_array_equal(coarse, (s + 2) // 4)


# ---------------------------------------------------------------- lesions: coarse versus fine scale
@pytest.fixture(scope="module")
def pairs():
    """(tumour slide, normal slide) painted from the same seeds, 2048 x 2048 px (0.5 mm)."""
    return [
        (
            synthesize_camelyon_slide((2048, 2048), True, s, MPP, MICRO),
            synthesize_camelyon_slide((2048, 2048), False, s, MPP, MICRO),
        )
        for s in (3, 5)  # seeds whose slides have lymphocyte regions and normal stroma around the lesion
    ]


def test_tumour_and_normal_of_one_seed_differ_only_in_lesions(pairs):
    for tumour, normal in pairs:
        assert tumour.lesions and not normal.lesions
        assert tumour.confounders.lymph == normal.confounders.lymph
        assert (tumour.confounders.fold is None) == (normal.confounders.fold is None)
        outside = ~ndimage.binary_dilation(tumour.lesion, iterations=6)  # painting grid 2 px, bilinear upsampling
        np.testing.assert_array_equal(tumour.rgb[outside], normal.rgb[outside])
        # tissue grows by the lesion (on the 2 px painting grid, so up to 2 px beyond its outline)
        assert np.all(tumour.tissue[normal.tissue | tumour.lesion])
        assert not np.any(tumour.tissue & ~normal.tissue & ~ndimage.binary_dilation(tumour.lesion, iterations=2))
        assert not np.array_equal(tumour.rgb[tumour.lesion], normal.rgb[tumour.lesion])


def test_lesions_are_invisible_at_8_um_per_px(pairs):
    """At 8 um/px (32 x 32 box means) a lesion has the colour of the normal tissue it replaced:
    the mean over its boxes is within 2 grey levels per channel, and the boxes spread alike."""
    for tumour, normal in pairs:
        inside = (box_means(tumour.lesion.astype(float)) == 1) & (box_means(normal.tissue.astype(float)) == 1)
        assert inside.sum() > 200
        a, b = box_means(tumour.rgb.astype(float))[inside], box_means(normal.rgb.astype(float))[inside]
        assert np.abs(a.mean(axis=0) - b.mean(axis=0)).max() <= 2.0, (a.mean(axis=0), b.mean(axis=0))
        assert np.all(a.std(axis=0) <= 1.6 * b.std(axis=0) + 2.0), (a.std(axis=0), b.std(axis=0))


def test_lesions_differ_at_fine_scale(pairs):
    """At 0.25 um/px tumour nuclei are larger and textured; normal and lymphocyte nuclei small and uniform."""
    areas = {"tumour": [], "normal": [], "lymph": []}
    texture = {"tumour": [], "normal": [], "lymph": []}
    for tumour, _ in pairs:
        labels, n = nuclei(tumour.rgb, tumour.tissue)
        far = ~ndimage.binary_dilation(tumour.lesion, iterations=40)
        regions = {
            "tumour": tumour.lesion,
            "normal": tumour.tissue & far & ~tumour.lymph,
            "lymph": tumour.lymph & far,
        }
        for name, region in regions.items():
            a, t = nucleus_stats(tumour.rgb, labels, n, region)
            areas[name] += list(a)
            texture[name] += list(t)
    assert min(len(v) for v in areas.values()) >= 30, {k: len(v) for k, v in areas.items()}
    med = {k: float(np.median(v)) for k, v in areas.items()}
    tex = {k: float(np.median(v)) for k, v in texture.items()}
    assert med["tumour"] >= 1.8 * med["normal"] and med["tumour"] >= 1.2 * med["lymph"], med
    assert tex["tumour"] >= 1.6 * max(tex["normal"], tex["lymph"]), tex


def test_lymphocyte_regions_are_dark_at_coarse_scale(pairs):
    """The confounder: lymphocyte regions are darker than other normal tissue at 8 um/px."""
    tumour, _ = pairs[0]
    assert tumour.lymph.any()
    grey = box_means(tumour.rgb.astype(float).mean(axis=-1))
    lymph = box_means((tumour.lymph & ~tumour.lesion).astype(float)) == 1
    other = box_means((tumour.tissue & ~tumour.lymph & ~tumour.lesion).astype(float)) == 1
    assert grey[lymph].mean() < grey[other].mean() - 10


# ---------------------------------------------------------------- lesion sizes and outlines
def test_lesion_size_sampler_has_camelyon_like_shares():
    rng = np.random.default_rng(1)
    draws = [sample_lesion_diameters(rng) for _ in range(4000)]
    largest = np.array([d[0] for d in draws])
    cats = np.array([lesion_category(d) for d in largest])
    p = CAMELYON_PARAMS
    for cat, share in (("itc", p.itc_share), ("micro", p.micro_share), ("macro", 1 - p.itc_share - p.micro_share)):
        assert stats.binomtest(int((cats == cat).sum()), len(cats), share).pvalue > 1e-3, cat
    micro = largest[cats == "micro"]
    assert stats.kstest(np.log(micro), stats.uniform(np.log(0.2), np.log(5.0)).cdf).pvalue > 1e-3  # log-uniform
    assert 0.4 < np.mean(micro < 0.5) < 0.7  # some micro-metastases are < 0.5 mm
    assert largest.min() >= p.itc_mm[0] and largest.max() <= p.macro_mm[1]
    assert all(np.all(d[1:] <= d[0]) for d in draws)  # satellites are smaller
    n_satellites = np.array([len(d) - 1 for d in draws])
    assert abs(n_satellites.mean() - p.satellite_mean) < 0.1
    capped = sample_lesion_diameters(np.random.default_rng(2), max_diameter_mm=0.3)
    assert capped.max() <= 0.3


def test_lesion_categories_follow_the_scaled_thresholds():
    assert [lesion_category(d) for d in (0.05, 0.199, 0.2, 0.99, 1.0, 1.4)] == [
        "itc",
        "itc",
        "micro",
        "micro",
        "macro",
        "macro",
    ]


@pytest.mark.parametrize("seed", [0, 3])
def test_lesion_outlines_sizes_and_masks_agree(pairs, seed, tmp_path):
    slide = synthesize_camelyon_slide((1024, 1024), True, seed, MPP)
    assert slide.polygons and len(slide.polygons) == len(slide.lesions)
    np.testing.assert_array_equal(rasterize_polygons(slide.polygons, (1024, 1024)), slide.lesion)
    assert np.all(slide.tissue[slide.lesion])
    for lesion in slide.lesions:
        assert math.isclose(pdist(lesion.polygon).max() * MPP / 1000, lesion.diameter_mm, rel_tol=1e-9)
        own_mask = rasterize_polygons([lesion.polygon], (1024, 1024))
        assert math.isclose(own_mask.sum() * (MPP / 1000) ** 2, lesion.area_mm2, rel_tol=0.03)
        assert lesion.category == lesion_category(lesion.diameter_mm)
    assert slide.category == slide.lesions[0].category
    assert [d.diameter_mm for d in slide.lesions] == sorted((d.diameter_mm for d in slide.lesions), reverse=True)


# ---------------------------------------------------------------- determinism
def test_painting_is_deterministic():
    a = synthesize_camelyon_slide((512, 768), True, 11, MPP)
    b = synthesize_camelyon_slide((512, 768), True, 11, MPP)
    c = synthesize_camelyon_slide((512, 768), True, 12, MPP)
    assert a.rgb.shape == (512, 768, 3) and a.rgb.dtype == np.uint8
    assert a.tissue.shape == a.lesion.shape == a.lymph.shape == (512, 768)
    for name in ("rgb", "tissue", "lesion", "lymph"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert [x.diameter_mm for x in a.lesions] == [x.diameter_mm for x in b.lesions]
    assert not np.array_equal(a.rgb, c.rgb)


# ---------------------------------------------------------------- confounders
def test_confounder_sampler_rates():
    rng = np.random.default_rng(3)
    draws = [sample_confounders(rng) for _ in range(4000)]
    p = CAMELYON_PARAMS
    for key, rate in (("fold", p.fold_rate), ("pen", p.pen_rate), ("bubble", p.bubble_rate)):
        k = sum(bool(d[key]) for d in draws)
        assert stats.binomtest(k, len(draws), rate).pvalue > 1e-3, key
    counts = np.array([d["lymph"] for d in draws])
    assert abs(counts.mean() - p.lymph_regions_mean) < 0.1 and abs(counts.var() - p.lymph_regions_mean) < 0.2
    colours = {d["pen"] for d in draws if d["pen"]}
    assert colours == {"green", "blue", "black"}


def _stroke_mask(strokes, width, shape):
    img = Image.new("L", shape[::-1], 0)
    draw = ImageDraw.Draw(img)
    for s in strokes:
        draw.line([(float(x), float(y)) for x, y in s], fill=1, width=max(1, int(width)), joint="curve")
    return np.asarray(img) > 0


@pytest.mark.parametrize("seed", [0, 1, 8])  # black, blue and green pens, each confounder with room of its own
def test_confounders_are_painted_where_recorded(seed):
    """All confounders on versus off for one seed: the pixels change where their geometry
    says and nowhere else; folds darken and saturate, pens take their colour, bubbles are pale
    with a dark rim."""
    on = CamelyonParams(fold_rate=1.0, pen_rate=1.0, bubble_rate=1.0)
    off = CamelyonParams(fold_rate=0.0, pen_rate=0.0, bubble_rate=0.0)
    H = W = 2048
    a = synthesize_camelyon_slide((H, W), False, seed, MPP, on)
    b = synthesize_camelyon_slide((H, W), False, seed, MPP, off)
    assert b.confounders.fold is None and b.confounders.pen is None and b.confounders.bubble is None
    conf = a.confounders
    yy, xx = np.mgrid[0:H, 0:W]
    x0, y0, angle, width = conf.fold
    dist = np.abs((xx - x0) * np.sin(angle) - (yy - y0) * np.cos(angle))
    fold = (dist < 0.3 * width) & b.tissue
    colour, strokes, pen_width = conf.pen
    pen = _stroke_mask(strokes, 0.5 * pen_width, (H, W))
    cx, cy, r = conf.bubble
    rho = np.hypot(xx - cx, yy - cy)
    bubble_in, rim = rho < 0.8 * r, np.abs(rho - r) < 1.0 / MPP
    near_pen = ndimage.distance_transform_edt(~pen) < 0.6 * pen_width + 8  # the ink's edge and blur, any joint
    touched = (dist < 0.7 * width) | near_pen | (rho < r + 13 / MPP)
    np.testing.assert_array_equal(a.rgb[~touched], b.rgb[~touched])

    fa, fb = a.rgb.astype(float), b.rgb.astype(float)
    only_fold = fold & ~pen & ~(rho < r + 13 / MPP)
    assert only_fold.sum() > 500
    assert fa[only_fold].mean() < fb[only_fold].mean() - 10  # darker
    sat = lambda x: (x.max(-1) - x.min(-1)) / np.maximum(x.max(-1), 1)  # noqa: E731
    assert sat(fa[only_fold]).mean() > sat(fb[only_fold]).mean()  # more saturated
    only_pen = pen & ~(dist < 0.7 * width) & ~(rho < r + 13 / MPP)
    assert only_pen.sum() > 500
    ratio = (fa[only_pen] + 1).mean(axis=0) / (fb[only_pen] + 1).mean(axis=0)  # per-channel transmittance of the ink
    order = {"green": (1, 0), "blue": (2, 0), "black": None}[colour]  # the channel the ink passes most vs least
    assert ratio.max() < 0.85
    if order:
        assert ratio[order[0]] > ratio[order[1]] + 0.1, (colour, ratio)
    only_bubble = bubble_in & ~(dist < 0.7 * width) & ~near_pen
    only_rim = rim & ~(dist < 0.7 * width) & ~near_pen
    if only_bubble[b.tissue].sum() > 500:
        assert fa[only_bubble & b.tissue].mean() > fb[only_bubble & b.tissue].mean() + 5  # paler on tissue
    assert only_rim.sum() > 200
    assert fa[only_rim].mean() < fb[only_rim].mean() - 20  # dark rim


# ---------------------------------------------------------------- files, layout, command line
def test_camelyon_files_open_and_discover_finds_them(tmp_path):
    """A small set at 2 um/px (1024 px = 2 mm, so macro lesions fit): labels, slides, XML,
    reference.csv (Macro / Micro by the largest lesion) and lesions.csv agree with the painter."""
    root = tmp_path / "cam"
    seed, mpp = 1, 2.0
    records = make_demo_data(
        root,
        n_normal=1,
        n_tumor=1,
        n_test_normal=1,
        n_test_tumor=3,
        size=1024,
        seed=seed,
        mpp=mpp,
        difficulty="camelyon",
    )
    found = discover(root)
    assert [(r.slide_id, r.label, r.split) for r in found] == [(r.slide_id, r.label, r.split) for r in records]
    with open(root / "lesions.csv", newline="") as f:
        rows = {row["slide_id"]: row for row in csv.DictReader(f)}
    assert list(next(iter(rows.values()))) == list(synthetic.LESION_CSV_COLUMNS)
    reference = dict(line.split(",", 1) for line in (root / "testing" / "reference.csv").read_text().splitlines())
    seen = set()
    for r in found:
        truth = synthesize_camelyon_slide((1024, 1024), bool(r.label), slide_seed(seed, r.slide_id), mpp)
        with Slide(r.path, mpp=mpp) as s:
            assert s.shape == (3, 1024, 1024)
        level0 = tifffile.imread(r.path, level=0)
        assert np.abs(level0.astype(float) - truth.rgb).mean() < 6  # JPEG (q 90) of the painted pixels
        row = rows[r.slide_id]
        assert (row["split"], int(row["label"]), int(row["n_lesions"])) == (r.split, r.label, len(truth.lesions))
        assert row["category"] == truth.category
        assert math.isclose(float(row["lesion_area_mm2"]), truth.lesion.sum() * (mpp / 1000) ** 2, rel_tol=1e-4)
        if r.label:
            assert math.isclose(float(row["largest_lesion_mm"]), truth.lesions[0].diameter_mm, abs_tol=1e-4)
            np.testing.assert_array_equal(
                rasterize_polygons(read_asap_xml(r.annotation_path), (1024, 1024)), truth.lesion
            )
        if r.split == "test":
            want = "Normal" if not r.label else "Tumor,Macro" if truth.category == "macro" else "Tumor,Micro"
            assert reference[r.slide_id] == want
            seen.add(want)
    assert seen == {"Normal", "Tumor,Macro", "Tumor,Micro"}  # this seed has all three


def test_make_demo_data_command_difficulty_presets(tmp_path):
    camelyon = MakeDemoDataOptions(root=tmp_path, difficulty="camelyon")
    preset = DIFFICULTIES["camelyon"]
    assert (camelyon.n_normal, camelyon.n_tumor, camelyon.n_test_normal, camelyon.n_test_tumor) == (24, 16, 12, 8)
    assert camelyon.size == preset.size == (8192, 8192) and camelyon.mpp == 0.25
    mixed = MakeDemoDataOptions(root=tmp_path, difficulty="camelyon", n_tumor=2, size=(1024,))
    assert (mixed.n_normal, mixed.n_tumor, mixed.size) == (24, 2, (1024,))
    demo = MakeDemoDataOptions(root=tmp_path)
    assert (demo.n_normal, demo.size, demo.mpp) == (6, (2048, 2048), 0.25)
    argv = [str(tmp_path / "c"), "--difficulty", "camelyon", "--size", "512", "--n-normal", "1", "--n-tumor", "1"]
    assert main_make_demo_data(argv + ["--n-test-normal", "0", "--n-test-tumor", "0", "-q"]) == 0
    assert [r.label for r in discover(tmp_path / "c")] == [0, 1]
    assert (tmp_path / "c" / "lesions.csv").is_file()
    with pytest.raises(SystemExit) as e:
        main_make_demo_data([str(tmp_path / "x"), "--difficulty", "hard"])
    assert e.value.code == 2


def test_bad_arguments_say_what_to_change():
    with pytest.raises(ValueError, match="difficulty must be one of demo, camelyon"):
        make_demo_data("unused", difficulty="hard")
    with pytest.raises(ValueError, match="itc_share"):
        CamelyonParams(itc_share=0.8, micro_share=0.5)
    with pytest.raises(ValueError, match="fold_rate"):
        CamelyonParams(fold_rate=1.5)
    with pytest.raises(ValueError, match="mpp"):
        synthesize_camelyon_slide((256, 256), True, 0, mpp=0.0)


def test_parameter_table_in_the_docs_matches_the_code():
    """docs/synthetic_camelyon.md lists every CamelyonParams field with its default and comment."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "synthetic_camelyon.md").read_text()
    text = text[text.index("## Parameters") :]
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*?) \| .*\|$", text, flags=re.MULTILINE))
    comments = field_docs(CamelyonParams)
    for f in dataclasses.fields(CamelyonParams):
        assert rows.get(f.name) == repr(f.default), f.name
        assert f"| `{f.name}` | {f.default!r} | {comments[f.name][1]} |" in text, f.name
    assert set(rows) == {f.name for f in dataclasses.fields(CamelyonParams)}
