"""The CAMELYON16 data set on disk: slides, labels, splits and lesion annotations.

Expected layout under `root` (directory and file names matched case-insensitively):

    training/normal/normal_001.tif ... normal_160.tif        label 0
    training/tumor/tumor_001.tif ... tumor_110.tif           label 1
    training/lesion_annotations/tumor_001.xml ...            ASAP XML polygons
    testing/images/test_001.tif ... test_130.tif             labels from the reference CSV
    testing/reference.csv                                    test_001,Tumor,Macro,...
    testing/lesion_annotations/test_001.xml ...

Slide ids are the lower-case file stems (`tumor_001`). `test_049` is excluded by default.

Lesion annotations are ASAP XML: polygons in level-0 pixel coordinates (x to the right,
y down). In CAMELYON16, groups `_0` and `_1` outline tumour and `_2` outlines non-tumour
regions cut out of them (`EXCLUSION_GROUPS`).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

#: Slides dropped by default: test_049 is reported as a duplicate / ambiguous slide and is
#: commonly left out of CAMELYON16 evaluations.
DEFAULT_EXCLUDE = ("test_049",)
EXCLUDE_REASON = {
    "test_049": "reported as a duplicate/ambiguous slide; commonly dropped from evaluation",
}

#: Where the test reference CSV may live, relative to root (first hit wins, any case).
REFERENCE_CSV_CANDIDATES = (
    "testing/reference.csv",
    "testing/evaluation/reference.csv",
)
#: Folders searched for ASAP XML annotations, relative to root (any case).
ANNOTATION_DIRS = (
    "training/lesion_annotations",
    "training/annotations",
    "testing/lesion_annotations",
    "testing/annotations",
    "lesion_annotations",
    "annotations",
)
#: ASAP annotation groups that outline regions to cut out of the lesions (CAMELYON16).
EXCLUSION_GROUPS = ("_2",)

_LABELS = {"tumor": 1, "tumour": 1, "1": 1, "normal": 0, "0": 0}
_SLIDE_FILE = re.compile(r"^(normal|tumor|test)_(\d+)\.tiff?$", re.IGNORECASE)


@dataclass(frozen=True)
class SlideRecord:
    """One slide of the data set.

    Attributes:
        slide_id: lower-case file stem, e.g. "tumor_001".
        path: the slide file.
        label: 0 normal, 1 tumour (slide level).
        split: "train" or "test" from `discover`; "train", "val" or "test" after `make_splits`.
        annotation_path: ASAP XML lesion annotation, or None (normal slides have none).
    """

    slide_id: str
    path: Path
    label: int
    split: str
    annotation_path: Path | None = None


def _child(parent: Path, name: str) -> Path | None:
    """The entry of `parent` called `name`, ignoring case; None if absent."""
    if not parent.is_dir():
        return None
    exact = parent / name
    if exact.exists():
        return exact
    for entry in parent.iterdir():
        if entry.name.lower() == name.lower():
            return entry
    return None


def _resolve(root: Path, relative: str) -> Path | None:
    """`root / relative` with every component matched case-insensitively; None if absent."""
    path: Path | None = root
    for part in relative.split("/"):
        path = _child(path, part) if path is not None else None
    return path


def _slide_files(folder: Path | None, kind: str) -> list[tuple[str, Path]]:
    """(slide_id, path) of files named `<kind>_<digits>.tif` in `folder`, sorted by id."""
    if folder is None:
        return []
    found = []
    for entry in folder.iterdir():
        m = _SLIDE_FILE.match(entry.name)
        if m and m.group(1).lower() == kind and entry.is_file():
            found.append((f"{kind}_{m.group(2)}", entry))
    return sorted(found)


def _normalise_id(text: str) -> str:
    """'Test_001.tif ' -> 'test_001'."""
    text = text.strip().lower()
    return re.sub(r"\.tiff?$", "", text)


def read_reference_csv(path: str | os.PathLike) -> dict[str, int]:
    """Test labels from a CAMELYON16 reference CSV: {slide_id: 0 or 1}.

    Rows are `test_001,Tumor,Macro,...` or `test_003,Normal`; labels tumor/normal/1/0 in any
    case; a header row (first row with an unrecognised label) and blank lines are skipped.
    """
    path = Path(path)
    labels: dict[str, int] = {}
    with open(path, newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or not row[0].strip():
                continue
            label = row[1].strip().lower() if len(row) > 1 else ""
            if label not in _LABELS:
                if i == 0:
                    continue  # header
                raise ValueError(f"{path}, line {i + 1}: label {label!r} of {row[0]!r} is none of tumor/normal/1/0")
            labels[_normalise_id(row[0])] = _LABELS[label]
    return labels


def _find_reference_csv(root: Path) -> Path:
    for candidate in REFERENCE_CSV_CANDIDATES:
        path = _resolve(root, candidate)
        if path is not None and path.is_file():
            return path
    looked = ", ".join(str(root / c) for c in REFERENCE_CSV_CANDIDATES)
    raise FileNotFoundError(
        f"test slides found but no reference CSV with their labels; looked for (any case): "
        f"{looked}. Put CAMELYON16's reference.csv in {root / 'testing'}"
    )


def _find_annotations(root: Path) -> dict[str, Path]:
    """{slide_id: xml path} over all annotation folders."""
    found: dict[str, Path] = {}
    for relative in ANNOTATION_DIRS:
        folder = _resolve(root, relative)
        if folder is None:
            zipped = _resolve(root, relative + ".zip")
            if zipped is not None:
                logger.warning("%s is still zipped; unzip it to use the annotations", zipped)
            continue
        for entry in sorted(folder.iterdir()):
            if entry.suffix.lower() == ".xml":
                found.setdefault(_normalise_id(entry.stem), entry)
    return found


def _test_labels(root: Path) -> tuple[list[tuple[str, Path]], dict[str, int], Path | None]:
    """(test slide files, reference labels, reference CSV) of a root; ({}, None) without test slides."""
    tests = _slide_files(_resolve(root, "testing/images"), "test")
    if not tests:
        for candidate in REFERENCE_CSV_CANDIDATES:  # a reference CSV alone: every listed slide is missing
            path = _resolve(root, candidate)
            if path is not None and path.is_file():
                return tests, read_reference_csv(path), path
        return tests, {}, None
    reference_path = _find_reference_csv(root)
    return tests, read_reference_csv(reference_path), reference_path


def missing_test_slides(root: str | os.PathLike, exclude: Iterable[str] = DEFAULT_EXCLUDE) -> list[str]:
    """Test slides that the reference CSV lists but ``testing/images`` lacks, sorted.

    Slides in ``exclude`` do not count. Empty when there is no reference CSV and no test slide.
    """
    root = Path(root)
    excluded = {_normalise_id(s) for s in exclude}
    tests, reference, _ = _test_labels(root)
    present = {slide_id for slide_id, _ in tests}
    return sorted(s for s in reference if s not in present and s not in excluded)


def discover(
    root: str | os.PathLike,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    include_test: bool = True,
    warn_missing: bool = True,
) -> list[SlideRecord]:
    """All CAMELYON16 slides under `root` (layout in the module docstring), sorted by split and id.

    Training labels come from the folder (normal/tumor), test labels from the reference CSV
    (FileNotFoundError naming the places looked if test slides exist but no CSV; ValueError
    if a test slide has no row). Slides in `exclude` are dropped and logged.

    Args:
        include_test: False: the training slides only; the test folder and the reference
            CSV are not looked at (training needs no test labels).
        warn_missing: log a warning naming each test slide that the reference CSV lists but
            the test folder lacks (:func:`missing_test_slides`); such slides are not in the
            result. Evaluation checks them itself (an error unless bad slides are skipped).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CAMELYON16 root not found: {root}")
    exclude = {_normalise_id(s) for s in exclude}
    annotations = _find_annotations(root)

    records: list[SlideRecord] = []
    for kind, label in (("normal", 0), ("tumor", 1)):
        for slide_id, path in _slide_files(_resolve(root, f"training/{kind}"), kind):
            records.append(SlideRecord(slide_id, path, label, "train", annotations.get(slide_id)))

    if include_test:
        tests, reference, reference_path = _test_labels(root)
        missing = [s for s, _ in tests if s not in reference and s not in exclude]
        if missing:
            raise ValueError(
                f"{reference_path} has no label for {len(missing)} test slide(s): {', '.join(missing[:10])}"
            )
        for slide_id, path in tests:
            label = reference.get(slide_id, -1)  # -1 only for excluded slides, dropped below
            records.append(SlideRecord(slide_id, path, label, "test", annotations.get(slide_id)))
        present = {slide_id for slide_id, _ in tests}
        absent = sorted(s for s in reference if s not in present and s not in exclude)
        if absent and warn_missing:
            for slide_id in absent:
                logger.warning(
                    "%s lists %s, but %s holds no such slide file; it is not among the test slides",
                    reference_path,
                    slide_id,
                    root / "testing" / "images",
                )

    if not records:
        where = "training/normal/normal_*.tif, training/tumor/tumor_*.tif"
        raise FileNotFoundError(
            f"no CAMELYON16 slides under {root}: expected {where}"
            + (" and/or testing/images/test_*.tif" if include_test else " (training slides)")
        )
    kept = []
    for r in records:
        if r.slide_id in exclude:
            logger.info("excluding %s: %s", r.slide_id, EXCLUDE_REASON.get(r.slide_id, "listed in exclude"))
        else:
            kept.append(r)
    unlabelled_tumours = [r.slide_id for r in kept if r.label == 1 and r.annotation_path is None]
    if unlabelled_tumours:
        logger.info(
            "%d tumour slides have no lesion annotation (e.g. %s)", len(unlabelled_tumours), unlabelled_tumours[0]
        )
    logger.info(
        "found %d slides under %s (%d train, %d test)",
        len(kept),
        root,
        sum(r.split == "train" for r in kept),
        sum(r.split == "test" for r in kept),
    )
    return kept


def read_splits(csv_path: str | os.PathLike) -> dict[str, tuple[int, str]]:
    """{slide_id: (label, split)} from a splits CSV with header `slide,label,split`."""
    csv_path = Path(csv_path)
    out: dict[str, tuple[int, str]] = {}
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != ["slide", "label", "split"]:
            raise ValueError(f"{csv_path}: header must be slide,label,split, got {reader.fieldnames}")
        for row in reader:
            if row["split"] not in ("train", "val", "test"):
                raise ValueError(f"{csv_path}: split {row['split']!r} of {row['slide']} is none of train/val/test")
            out[row["slide"]] = (int(row["label"]), row["split"])
    return out


def make_splits(
    records: Sequence[SlideRecord],
    out_csv: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> list[SlideRecord]:
    """Assign train/val/test; write the assignment to `out_csv` once, re-read it afterwards.

    First call (no `out_csv`): per label, the training slides are sorted by id, shuffled
    with `np.random.default_rng(seed)` and round(n * val_fraction) of them go to "val"
    (a stratified fold), at least one when val_fraction > 0 and the label has n >= 2
    slides (so each class is validated); test slides stay "test". The CSV (slide,label,split) is written
    atomically. Later calls read it back, so every run and every process uses the same
    fold; they fail loudly if the CSV disagrees with `records` (delete it to redo).

    Returns the records with `split` set, in the order given.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_csv = Path(out_csv)
    by_id = {r.slide_id: r for r in records}
    if out_csv.exists():
        splits = read_splits(out_csv)
        if set(splits) != set(by_id):
            extra, lacking = set(splits) - set(by_id), set(by_id) - set(splits)
            raise ValueError(
                f"{out_csv} does not match the slides found: {len(extra)} listed but not "
                f"found (e.g. {sorted(extra)[:3]}), {len(lacking)} found but not listed "
                f"(e.g. {sorted(lacking)[:3]}); delete it to make new splits"
            )
        for slide_id, (label, _) in splits.items():
            if label != by_id[slide_id].label:
                raise ValueError(
                    f"{out_csv}: {slide_id} has label {label} but the data set "
                    f"says {by_id[slide_id].label}; delete the file to redo"
                )
        logger.info("read splits from %s", out_csv)
        return [dataclasses.replace(r, split=splits[r.slide_id][1]) for r in records]

    rng = np.random.default_rng(seed)
    val_ids: set[str] = set()
    for label in sorted({r.label for r in records if r.split != "test"}):
        ids = sorted(r.slide_id for r in records if r.split != "test" and r.label == label)
        order = rng.permutation(len(ids))
        n_val = round(len(ids) * val_fraction)
        if val_fraction > 0 and len(ids) >= 2:
            n_val = max(n_val, 1)  # a class without validation slides leaves the validation AUC undefined
        val_ids.update(ids[i] for i in order[:n_val])
    result = [
        dataclasses.replace(r, split="test" if r.split == "test" else ("val" if r.slide_id in val_ids else "train"))
        for r in records
    ]
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_csv.with_name(f".{out_csv.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide", "label", "split"])
        for r in sorted(result, key=lambda r: r.slide_id):
            writer.writerow([r.slide_id, r.label, r.split])
    os.replace(tmp, out_csv)  # atomic: a concurrent reader never sees half a file
    logger.info("wrote splits to %s (%d val slides)", out_csv, len(val_ids))
    return result


# ---------------------------------------------------------------------- annotations
@dataclass(frozen=True)
class Annotation:
    """One ASAP annotation: `coords` is (N, 2) float64 (x, y) in level-0 pixels."""

    name: str
    group: str
    coords: np.ndarray


def read_asap_annotations(path: str | os.PathLike) -> list[Annotation]:
    """All annotations of an ASAP XML file, vertices sorted by their `Order` attribute."""
    path = Path(path)
    try:
        tree = ET.parse(path)
    except ET.ParseError as e:
        raise ValueError(f"{path}: not valid XML: {e}") from e
    annotations = []
    for ann in tree.getroot().iter("Annotation"):
        points = []
        for k, c in enumerate(ann.iter("Coordinate")):
            try:
                order = float(c.get("Order", k))
                # some exports write decimal commas
                x = float(c.attrib["X"].replace(",", "."))
                y = float(c.attrib["Y"].replace(",", "."))
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}: bad Coordinate {c.attrib} in annotation {ann.get('Name')!r}: {e}") from e
            points.append((order, x, y))
        points.sort(key=lambda p: p[0])
        coords = np.array([(x, y) for _, x, y in points], dtype=np.float64).reshape(-1, 2)
        annotations.append(Annotation(ann.get("Name", ""), ann.get("PartOfGroup", ""), coords))
    return annotations


def read_asap_xml(path: str | os.PathLike, groups: Iterable[str] | None = None) -> list[np.ndarray]:
    """Polygons of an ASAP XML file: a list of (N_i, 2) float64 arrays of (x, y), level 0.

    `groups`: keep only annotations whose PartOfGroup is listed (None: all). For CAMELYON16
    lesions use the complement of `EXCLUSION_GROUPS` via `read_lesions`.
    """
    keep = None if groups is None else set(groups)
    return [a.coords for a in read_asap_annotations(path) if keep is None or a.group in keep]


def read_lesions(path: str | os.PathLike) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(lesion polygons, exclusion polygons) of a CAMELYON16 annotation file."""
    lesions, holes = [], []
    for a in read_asap_annotations(path):
        (holes if a.group in EXCLUSION_GROUPS else lesions).append(a.coords)
    return lesions, holes


def write_asap_xml(path: str | os.PathLike, polygons: Sequence[np.ndarray], group: str = "_0") -> None:
    """Write (N_i, 2) (x, y) level-0 polygons as ASAP XML, all in one group."""
    root = ET.Element("ASAP_Annotations")
    anns = ET.SubElement(root, "Annotations")
    for i, poly in enumerate(polygons):
        ann = ET.SubElement(
            anns, "Annotation", Name=f"Annotation {i}", Type="Polygon", PartOfGroup=group, Color="#F4FA58"
        )
        coords = ET.SubElement(ann, "Coordinates")
        for k, (x, y) in enumerate(np.asarray(poly, dtype=np.float64)):
            ET.SubElement(coords, "Coordinate", Order=str(k), X=f"{x:.4f}", Y=f"{y:.4f}")
    groups = ET.SubElement(root, "AnnotationGroups")
    g = ET.SubElement(groups, "Group", Name=group, PartOfGroup="None", Color="#FF0000")
    ET.SubElement(g, "Attributes")
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def rasterize_polygons(
    polygons: Sequence[np.ndarray],
    shape: tuple[int, int],
    scale: float | tuple[float, float] = 1.0,
    holes: Sequence[np.ndarray] = (),
) -> np.ndarray:
    """Fill polygons into a boolean (H, W) mask, then clear `holes`.

    A vertex (x, y) in level-0 pixels lands at mask pixel (x * sx, y * sy), where `scale` is
    mask pixels per level-0 pixel, one number or (sy, sx) (e.g. 1/64 for a 64x downsampled
    mask). PIL's polygon fill decides which pixels are inside. Polygons with one or two
    vertices are drawn as a point or a line so tiny lesions are not lost.
    """
    sy, sx = (float(scale), float(scale)) if np.isscalar(scale) else map(float, scale)
    H, W = int(shape[0]), int(shape[1])
    img = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(img)
    for value, polys in ((1, polygons), (0, holes)):
        for poly in polys:
            pts = [(float(x) * sx, float(y) * sy) for x, y in np.asarray(poly).reshape(-1, 2)]
            if len(pts) >= 3:
                draw.polygon(pts, fill=value, outline=value)
            elif len(pts) == 2:
                draw.line(pts, fill=value)
            elif len(pts) == 1:
                draw.point(pts, fill=value)
    # `> 0` rather than dtype=bool: PIL's mode "1" arrays are bools stored as 0/255 bytes,
    # which break arithmetic on their uint8 view; mode "L" and a comparison are clean.
    return np.asarray(img) > 0
