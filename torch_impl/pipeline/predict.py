"""Whole-slide inference, the one path: slide -> P(tumour), attention, tissue mask; saved and loaded.

    slide file --open_slide(mpp, rng=None)--> the whole tissue crop (3, h, w), lazy
        --feature_mask--> tissue on the trunk's feature grid (1, H', W')
        --predict_slide (eval mode, no gradients; the crop decoded once, CropCache)--> SlidePrediction:
              P(tumour), logits, attention on the head's (pooled) grid, its placement
        --save_prediction--> attention/<id>.npy + <id>.json --load_prediction--> the same

Validation during training (:func:`torch_impl.pipeline.train.validate`), evaluation
(:mod:`torch_impl.pipeline.evaluate`), heatmaps (:mod:`torch_impl.pipeline.heatmap`) and the
``predict`` command below all call :func:`predict_slide` (through :func:`predict_file` and
:func:`predict_slides`), so they compute the same numbers for the same slide and model.

The feature grid, one way. For a crop of (h, w) working pixels the trunk returns a
(H', W') feature map, H' = the trunk's output size for h input pixels (the tile plan's
``output_size``: what the streamed trunk allocates). The tissue mask on that grid comes
from :meth:`torch_impl.slides.augment.AugmentedView.feature_mask` of the view the trunk
sees: the identity view here (equal to ``SlideInput.feature_mask``), training's augmented
view in training. Feature position (i, j) covers working pixels [i S, (i+1) S) x
[j S, (j+1) S) of the crop (S = 32, the trunk's stride). A head that pools by P groups
P x P positions into one *cell* of ``cell_size = S P`` working pixels; the attention lives
on the cells, and is exactly 0 on cells without tissue.

The crop is decoded once (``slide_cache``, the option of training's ``--slide-cache``: a
:class:`~torch_impl.slides.crop_cache.CropCache` in device memory, host memory, or none):
the streamed forward pass reads overlapping tiles (each carries the trunk's halo), so
without the cache pixels near tile borders are decoded again: 1.23-1.40 decodes per pixel
for crops of 8192^2 to 65536^2 at the default tile of 5760 px, 1.8-2.1 at 2880 px, 2.8-3.2
at 2048 px (the plans' summed tile areas over the crop's). With the cache, one, decoded in
row bands by a background thread while the trunk computes. The predictions are the same bit
for bit (``tests/test_predict.py``) for a slide read at a pyramid level's own resolution;
a slide resampled between levels may differ by a grey level where tiles overlap (see
:mod:`torch_impl.slides.crop_cache`).

The ``predict`` command (``python -m torch_impl predict SLIDES... --checkpoint C --out DIR``)
runs a checkpoint on slides without labels: each of SLIDES is a slide file, or a folder
whose files with a slide extension (:data:`SLIDE_EXTENSIONS`, not recursive, sorted by
name) are all used. It writes

    DIR/predictions.csv               image,probability (CAMELYON16's submission format):
                                      image = the slide file's stem, probability = P(tumour)
    DIR/attention/<image>.npy, .json  the saved predictions (redraw heatmaps without the model)
    DIR/summary.json                  checkpoint, mpp, slides, skipped slides
    DIR/heatmaps/<image>_heatmap.png, _attention.tif, _attention.geojson    with --heatmaps
                                      (see :func:`torch_impl.pipeline.heatmap.write_heatmap`)

The commands' shared options are written once here, as dataclasses whose fields become the
options (:mod:`torch_impl.pipeline.options`; a field's comment is its help):

    ComputeOptions          --device                                         (every command that computes)
    InferenceOptions        + --checkpoint --out --mpp --amp --slide-cache   (heatmap)
    BatchInferenceOptions   + --skip-bad-slides                              (evaluate, predict)
    PredictOptions          + SLIDE... --heatmaps                            (predict)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..models.streaming_clam import StreamingCLAM
from ..slides import NoTissueError, SlideError
from ..slides.augment import AugmentedView
from ..slides.crop_cache import MODES as CACHE_MODES
from ..slides.crop_cache import CropCache
from ..slides.inputs import SlideInput, open_slide_input
from .checkpoint import load_model, trained_mpp
from .logs import verbosity_options
from .options import OptionParser, option
from .runtime import AMP_CHOICES, BadSlideError, atomic_write, autocast, autocast_dtype, resolve_device

__all__ = [
    "SLIDE_EXTENSIONS",
    "BatchInferenceOptions",
    "ComputeOptions",
    "InferenceOptions",
    "PredictOptions",
    "SlidePrediction",
    "attention_cell_size",
    "feature_grid",
    "feature_mask",
    "find_slides",
    "load_prediction",
    "main_predict",
    "open_slide",
    "predict_file",
    "predict_run",
    "predict_slide",
    "predict_slides",
    "save_prediction",
    "write_submission",
]

logger = logging.getLogger(__name__)

#: File extensions (lower case) that a folder of slides is searched for: the formats
#: OpenSlide reads as single files (Aperio, Hamamatsu, Leica, MIRAX, Philips, Sakura,
#: Ventana, Zeiss, generic tiled TIFF). DICOM is left out (one slide is a folder of files).
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi")

#: Appended to the error of an unusable slide when it stops a run.
SKIP_HINT = "; pass skip_bad_slides=True (--skip-bad-slides) to skip it"


# ---------------------------------------------------------------------- the commands' options
@dataclass(frozen=True, kw_only=True)
class ComputeOptions:
    """Where a command computes. Raises ValueError (a usage error on the command line) for a
    device that is no device or is not there (:func:`~torch_impl.pipeline.runtime.resolve_device`)."""

    device: str = option("auto", metavar="DEV")  # "auto" (the first GPU, else the CPU), "cpu", "cuda" or "cuda:N"

    def __post_init__(self) -> None:
        try:
            resolve_device(self.device)
        except RuntimeError as e:  # no such device type, or no such GPU here
            raise ValueError(f"--device {self.device}: {e}") from e


@dataclass(frozen=True, kw_only=True)
class InferenceOptions(ComputeOptions):
    """Running a trained checkpoint on slides (heatmap; evaluate and predict through
    :class:`BatchInferenceOptions`). Raises ValueError for an mpp that is not > 0 or an
    unknown slide cache mode."""

    checkpoint: Path = option(metavar="FILE")  # training checkpoint (.pt), e.g. a run's best.pt
    out_dir: Path = option(flag="--out", metavar="DIR")  # output folder (created if needed)
    mpp: float | None = None  # working resolution in um/px; none = the checkpoint's (the one it was trained at)
    amp: str = option("auto", choices=AMP_CHOICES)  # bfloat16 autocast of the trunk ("auto": on CUDA only)
    slide_cache: str = option(
        "auto", choices=CACHE_MODES
    )  # each crop decoded once, kept in: "device" memory, "host" memory, or "none" (tiles read from the file, host memory O(tile)); "auto": device if the crop fits half the free memory, else host, else none

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mpp is not None and not self.mpp > 0:  # also NaN
            raise ValueError(f"--mpp must be > 0 micrometres per pixel, got {self.mpp}")
        if self.slide_cache not in CACHE_MODES:
            raise ValueError(f"--slide-cache must be one of {', '.join(CACHE_MODES)}, got {self.slide_cache!r}")


@dataclass(frozen=True, kw_only=True)
class BatchInferenceOptions(InferenceOptions):
    """A checkpoint run on many slides (evaluate, predict)."""

    skip_bad_slides: bool = False  # skip a missing, unreadable or tissue-less slide with a warning instead of stopping


@dataclass(frozen=True, kw_only=True)
class PredictOptions(BatchInferenceOptions):
    """The ``predict`` command; its fields are :func:`predict_run`'s arguments."""

    slides: list[Path] = option(positional=True, metavar="SLIDE")  # slide files, or folders of them
    heatmaps: bool = False  # also write each slide's <image>_heatmap.png, _attention.tif and _attention.geojson


@dataclass(frozen=True)
class SlidePrediction:
    """The model's output for one slide.

    Attributes:
        slide_id: e.g. "test_001".
        prob_tumor: P(tumour), the softmax probability of class 1.
        logits: (n_classes,) float32 bag logits (the validation loss is their cross-entropy).
        attention: (h', w') float32 attention of the tumour branch (the only branch of a
            single-branch head, branch 1 of a multi-branch head) on the head's grid: the
            trunk's feature grid, pooled if the head pools. Sums to 1 over tissue cells;
            exactly 0 on background cells.
        feature_hw: (H', W') of the trunk's feature map (before the head's pooling).
        box: (y, x, h, w) of the analysed crop in working pixels.
        cell_size: working pixels per attention cell side: the trunk's stride S (32),
            times the head's pool size if it pools. Cell (i, j) covers working rows
            [box_y + i cell_size, box_y + (i+1) cell_size) and the matching columns,
            clipped to the crop.
        mpp: the working resolution in um/px.
        slide_path: the slide file.
    """

    slide_id: str
    prob_tumor: float
    logits: np.ndarray
    attention: np.ndarray
    feature_hw: tuple[int, int]
    box: tuple[int, int, int, int]
    cell_size: int
    mpp: float
    slide_path: str


# ---------------------------------------------------------------------- the grid
def feature_grid(model: StreamingCLAM, image_hw: Sequence[int]) -> tuple[int, int]:
    """(H', W') of the trunk's feature map for an (h, w) input: the tile plan's output size.

    Raises ValueError (from the planner) when the input is smaller than the trunk's window.
    """
    h, w = (int(v) for v in image_hw)
    out_h, out_w = model.trunk.plan((h, w)).output_size
    return int(out_h), int(out_w)


def feature_mask(model: StreamingCLAM, slide_input: SlideInput, view: AugmentedView | None = None) -> torch.Tensor:
    """(1, H', W') bool: which positions of the trunk's feature map hold tissue.

    Args:
        model: gives the grid (:func:`feature_grid`) and the stride S.
        slide_input: the crop and its thumbnail tissue mask.
        view: the view of ``slide_input.source`` that the trunk sees; default the identity
            (inference). Training passes its augmented view: the mask is then flipped and
            rotated with the pixels.
    """
    view = view if view is not None else AugmentedView(slide_input.source)
    return view.feature_mask(slide_input, feature_grid(model, view.shape[1:]), model.trunk.geometry[0].stride)


def attention_cell_size(model: StreamingCLAM) -> int:
    """Working pixels per attention cell side: trunk stride S, times the head's pool size."""
    rows, cols = model.trunk.geometry
    if rows.stride != cols.stride:
        raise ValueError(
            f"the trunk's row and column strides differ ({rows.stride} vs "
            f"{cols.stride}); square attention cells are assumed"
        )
    pool = model.head.pool_size if model.head.pool is not None else 1
    return int(rows.stride) * int(pool)


# ---------------------------------------------------------------------- one slide
def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def open_slide(
    path: str | os.PathLike,
    mpp: float,
    slide_id: str | None = None,
    max_size: int = 65536,
    rng: np.random.Generator | None = None,
) -> SlideInput:
    """``open_slide_input`` with every problem of the file raised as :class:`BadSlideError`.

    Args:
        path, mpp, max_size, rng: see :func:`torch_impl.slides.inputs.open_slide_input`;
            ``rng=None`` (inference) keeps the whole tissue box.
        slide_id: named in the error; default the file's lower-case stem.

    Raises:
        BadSlideError: the file is missing, unreadable or corrupt, holds no tissue, or its
            finest level is coarser than ``mpp``. The message names the slide and the file.
    """
    slide_id = slide_id if slide_id is not None else Path(path).stem.lower()
    try:
        return open_slide_input(path, mpp=mpp, max_size=max_size, rng=rng)
    except (OSError, SlideError, NoTissueError, ValueError) as e:  # ValueError: mpp finer than the file
        raise BadSlideError(f"slide {slide_id} ({path}): {e}") from e


def predict_slide(
    model: StreamingCLAM,
    slide_input: SlideInput,
    device: str | torch.device | None = None,
    amp: str = "auto",
    slide_id: str | None = None,
    slide_cache: str = "auto",
) -> SlidePrediction:
    """Whole-crop inference on one slide: eval mode, no gradients, deterministic.

    Args:
        model: the network, already on ``device`` (it is not moved: moving is the caller's
            choice). It runs in eval mode and is put back in its previous mode afterwards.
        slide_input: from :func:`open_slide` (or ``open_slide_input(path, mpp, rng=None)``):
            the whole tissue.
        device: where the model lives (:func:`~torch_impl.pipeline.runtime.resolve_device`
            names); default where its parameters are. Only checked, and used for autocast.
        amp: "auto" | "bf16" | "off" (:mod:`torch_impl.pipeline.runtime`): bfloat16
            autocast of the trunk; the head runs in float32 regardless.
        slide_id: default: the slide file's lower-case stem.
        slide_cache: "auto" | "device" | "host" | "none": where the crop is kept, decoded
            once (module docstring; :class:`~torch_impl.slides.crop_cache.CropCache`).

    The tissue mask is computed on the trunk's feature grid (:func:`feature_mask`), as in
    training, and the head attends only to tissue positions.

    Raises:
        BadSlideError: no tissue falls on the feature grid of the crop.
        ValueError: the model is elsewhere than ``device``, has fewer than two classes, or
            ``slide_cache`` is no mode or an explicit tier the crop does not fit.
        OSError, SlideError: a tile of the slide cannot be decoded (:func:`predict_file`
            names the slide).
    """
    model_device = _model_device(model)
    dev = resolve_device(device) if device is not None else model_device
    if dev.type != model_device.type or (dev.index is not None and dev != model_device):
        raise ValueError(f"the model is on {model_device}, not {dev}; call model.to({str(dev)!r}) first")
    dtype = autocast_dtype(amp, dev)
    path = slide_input.slide.path
    slide_id = slide_id if slide_id is not None else Path(path).stem.lower()

    mask = feature_mask(model, slide_input)  # (1, H', W') bool
    feature_hw = (int(mask.shape[1]), int(mask.shape[2]))
    if not mask.any():
        raise BadSlideError(f"slide {slide_id} ({path}): no tissue on the feature grid of its crop")

    was_training = model.training
    model.eval()
    try:
        with CropCache.open(slide_input.source, slide_cache, dev) as crop, torch.no_grad(), autocast(dev, dtype):
            out = model(crop, mask.to(dev))
    finally:
        model.train(was_training)

    if out.probs.shape[1] < 2:
        raise ValueError(f"the model has {out.probs.shape[1]} class(es); P(tumour) needs class 1")
    branch = 1 if out.attention.shape[1] > 1 else 0  # multi-branch: the tumour class's branch
    return SlidePrediction(
        slide_id=slide_id,
        prob_tumor=float(out.probs[0, 1]),
        logits=out.logits[0].float().cpu().numpy(),  # (n_classes,)
        attention=out.attention[0, branch].float().cpu().numpy(),  # (h', w')
        feature_hw=feature_hw,
        box=tuple(int(v) for v in slide_input.box),
        cell_size=attention_cell_size(model),
        mpp=float(slide_input.slide.mpp),
        slide_path=str(path),
    )


def predict_file(
    model: StreamingCLAM,
    path: str | os.PathLike,
    mpp: float,
    device: str | torch.device | None = None,
    amp: str = "auto",
    slide_id: str | None = None,
    slide_cache: str = "auto",
) -> SlidePrediction:
    """:func:`predict_slide` on a slide file at ``mpp`` um/px: opened, predicted, closed.

    Raises:
        BadSlideError: anything wrong with the file (:func:`open_slide`), a tile that cannot
            be decoded, or no tissue on the feature grid; the message names slide and file.
    """
    slide_id = slide_id if slide_id is not None else Path(path).stem.lower()
    slide_input = open_slide(path, mpp, slide_id)
    try:
        return predict_slide(model, slide_input, device, amp, slide_id=slide_id, slide_cache=slide_cache)
    except (OSError, SlideError) as e:  # a tile that cannot be decoded
        raise BadSlideError(f"slide {slide_id} ({path}): {e}") from e
    finally:
        slide_input.close()


def predict_slides(
    model: StreamingCLAM,
    slides: Sequence[tuple[str, str | os.PathLike]],
    mpp: float,
    device: str | torch.device | None = None,
    amp: str = "auto",
    skip_bad_slides: bool = False,
    on_prediction: Callable[[SlidePrediction], None] | None = None,
    progress: bool = False,
    slide_cache: str = "auto",
) -> tuple[list[SlidePrediction], list[dict[str, str]]]:
    """:func:`predict_file` on each (slide_id, path), in order.

    Args:
        on_prediction: called with each prediction as it is made (e.g. to save it).
        skip_bad_slides: skip a slide that raises :class:`BadSlideError` with a warning,
            instead of raising (with a hint to this option).
        progress: a tqdm progress bar.
        slide_cache: where each crop is kept, decoded once (:func:`predict_slide`).

    Returns:
        (predictions, skipped): skipped = [{"slide_id", "path", "error"}], in order.
    """
    predictions: list[SlidePrediction] = []
    skipped: list[dict[str, str]] = []
    for k, (slide_id, path) in enumerate(tqdm(slides, desc="slides", leave=False, disable=not progress), 1):
        start = time.perf_counter()
        try:
            pred = predict_file(model, path, mpp, device, amp, slide_id=slide_id, slide_cache=slide_cache)
        except BadSlideError as e:
            if not skip_bad_slides:
                raise BadSlideError(f"{e}{SKIP_HINT}") from e
            logger.warning("skipping %s", e)
            skipped.append({"slide_id": slide_id, "path": str(path), "error": str(e)})
            continue
        predictions.append(pred)
        if on_prediction is not None:
            on_prediction(pred)
        logger.info(
            "[%d/%d] %s: P(tumour) = %.4f, crop %dx%d px, %.1f s",
            k,
            len(slides),
            slide_id,
            pred.prob_tumor,
            pred.box[2],
            pred.box[3],
            time.perf_counter() - start,
        )
    return predictions, skipped


# ---------------------------------------------------------------------- saved predictions
_SAVED_KEYS = ("slide_id", "prob_tumor", "logits", "feature_hw", "box", "cell_size", "mpp", "slide_path")


def save_prediction(prediction: SlidePrediction, folder: str | os.PathLike, **extra: Any) -> Path:
    """Write ``<slide_id>.npy`` (the (h', w') float32 attention) and ``<slide_id>.json``
    (every other field, plus ``extra``, e.g. the label) into ``folder``, each atomically.

    :func:`load_prediction` reads them back; the heatmap needs nothing else (and the slide).
    Returns the .npy path.
    """
    folder = Path(folder)
    npy = folder / f"{prediction.slide_id}.npy"
    with atomic_write(npy, "wb") as f:
        np.save(f, np.asarray(prediction.attention, dtype=np.float32))
    meta = {k: v for k, v in dataclasses.asdict(prediction).items() if k != "attention"}
    meta["logits"] = [float(v) for v in np.asarray(prediction.logits).ravel()]
    meta.update(extra)
    with atomic_write(folder / f"{prediction.slide_id}.json") as f:
        f.write(json.dumps(meta, indent=2, default=str))
    return npy


def load_prediction(path: str | os.PathLike) -> SlidePrediction:
    """A prediction written by :func:`save_prediction`, from its ``.npy`` or ``.json`` path.

    Floats come back exactly (JSON holds their shortest round-trip form).
    """
    path = Path(path)
    npy, meta_path = path.with_suffix(".npy"), path.with_suffix(".json")
    for p in (npy, meta_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"saved prediction incomplete: {p} not found (save_prediction writes "
                f"<id>.npy and <id>.json side by side)"
            )
    meta = json.loads(meta_path.read_text())
    missing = [k for k in _SAVED_KEYS if k not in meta]
    if missing:
        raise ValueError(
            f"{meta_path} lacks {missing} (written by an older version?); run evaluate or predict again to save it anew"
        )
    attention = np.load(npy)
    if attention.ndim != 2:
        raise ValueError(f"{npy}: the attention must be a 2-D cell grid, got shape {attention.shape}")
    return SlidePrediction(
        slide_id=str(meta["slide_id"]),
        prob_tumor=float(meta["prob_tumor"]),
        logits=np.asarray(meta["logits"], dtype=np.float32),
        attention=attention,
        feature_hw=tuple(int(v) for v in meta["feature_hw"]),
        box=tuple(int(v) for v in meta["box"]),
        cell_size=int(meta["cell_size"]),
        mpp=float(meta["mpp"]),
        slide_path=str(meta["slide_path"]),
    )


# ---------------------------------------------------------------------- the predict command
def find_slides(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The slide files of ``inputs``: files as given, folders' slide files (module docstring).

    Raises:
        FileNotFoundError: an input does not exist, or no slide file is found.
        ValueError: two slides share a file stem (their outputs would collide).
    """
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += sorted(
                f
                for f in p.iterdir()
                if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in SLIDE_EXTENSIONS
            )
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"no such slide file or folder: {p}")
    if not found:
        raise FileNotFoundError(f"no slide files ({', '.join(SLIDE_EXTENSIONS)}) in {[str(i) for i in inputs]}")
    by_stem: dict[str, list[Path]] = {}
    for f in found:
        by_stem.setdefault(f.stem, []).append(f)
    clashes = {s: [str(f) for f in fs] for s, fs in by_stem.items() if len(fs) > 1}
    if clashes:
        raise ValueError(f"slides must have distinct file stems (the submission's image names): {clashes}")
    return found


def write_submission(path: str | os.PathLike, predictions: Sequence[SlidePrediction]) -> Path:
    """CAMELYON16's submission CSV: header ``image,probability``, one row per slide
    (image = slide_id, probability = P(tumour) at full precision). Written atomically."""
    path = Path(path)
    with atomic_write(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "probability"])
        for p in predictions:
            writer.writerow([p.slide_id, repr(p.prob_tumor)])
    return path


def predict_run(
    checkpoint: str | os.PathLike,
    slides: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    mpp: float | None = None,
    device: str | torch.device | None = "auto",
    amp: str = "auto",
    heatmaps: bool = False,
    skip_bad_slides: bool = False,
    slide_cache: str = "auto",
) -> dict[str, Any]:
    """Run a checkpoint on unlabelled slides; write the files of the module docstring.

    The arguments are the fields of :class:`PredictOptions` (the ``predict`` command's
    options, whose help says what each means). Besides: ``slides`` may also be one file or
    folder; ``device`` may be a ``torch.device``; with ``skip_bad_slides`` the skipped slides
    are listed in summary.json, without it the first one raises :class:`BadSlideError`.

    Returns:
        the summary also written to summary.json: checkpoint, mpp, n_slides, predictions
        ({image: probability}), skipped, csv, and with ``heatmaps`` the heatmap results
        (:func:`torch_impl.pipeline.heatmap.write_heatmap`).
    """
    paths = find_slides([slides] if isinstance(slides, (str, os.PathLike)) else list(slides))
    out = Path(out_dir)
    dev = resolve_device(device)
    mpp = trained_mpp(checkpoint, mpp)
    autocast_dtype(amp, dev)  # a wrong amp fails before the model is loaded
    if slide_cache not in CACHE_MODES:
        raise ValueError(f"slide_cache must be one of {', '.join(CACHE_MODES)}, got {slide_cache!r}")
    model, _ = load_model(checkpoint, device=dev)
    model.eval()
    logger.info("predicting %d slides with %s at %g um/px on %s (amp %s)", len(paths), checkpoint, mpp, dev, amp)

    drawn: list[dict[str, Any]] = []
    if heatmaps:
        from .heatmap import write_heatmap  # heatmap imports this module: import it when it is needed

    def finish(pred: SlidePrediction) -> None:
        save_prediction(pred, out / "attention")
        if heatmaps:
            drawn.append(write_heatmap(pred, out / "heatmaps"))

    predictions, skipped = predict_slides(
        model,
        [(p.stem, p) for p in paths],
        mpp,
        dev,
        amp,
        skip_bad_slides,
        on_prediction=finish,
        slide_cache=slide_cache,
    )
    if not predictions:
        raise BadSlideError(f"no slide of {len(paths)} could be read (all skipped)")
    csv_path = write_submission(out / "predictions.csv", predictions)
    summary: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "mpp": mpp,
        "n_slides": len(predictions),
        "predictions": {p.slide_id: p.prob_tumor for p in predictions},
        "skipped": skipped,
        "csv": str(csv_path),
    }
    if heatmaps:
        summary["heatmaps"] = drawn
    with atomic_write(out / "summary.json") as f:
        f.write(json.dumps(summary, indent=2, default=str))
    logger.info(
        "wrote %s (%d slides, %d skipped)%s",
        csv_path,
        len(predictions),
        len(skipped),
        f" and heatmaps in {out / 'heatmaps'}" if heatmaps else "",
    )
    return summary


def main_predict(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """CLI: ``python -m torch_impl predict SLIDE... --checkpoint FILE --out DIR`` (:class:`PredictOptions`).

    Returns 0. The pipeline's errors propagate: :func:`torch_impl.pipeline.cli.main` reports
    the expected ones in one line (exit status 2).
    """
    parser = OptionParser(
        PredictOptions,
        prog=prog or "python -m torch_impl predict",
        description="Run a StreamingCLAM checkpoint on slides without labels: predictions.csv in the "
        "CAMELYON16 submission format (image,probability), the attention maps, and with "
        "--heatmaps a PNG overlay, a pyramidal TIFF and a QuPath GeoJSON per slide. A folder "
        f"gives its files named *{' *'.join(SLIDE_EXTENSIONS)}.",
        parents=[verbosity_options()],
    )
    predict_run(**dataclasses.asdict(parser.parse(argv)))
    return 0
