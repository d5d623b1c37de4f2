"""The slides: lazy whole-slide reading, tissue detection, CAMELYON16 layout, synthetic data, augmentation.

Imports neither the models nor the pipeline: a slide becomes what a model eats (a lazy
(3, h, w) uint8 source and a tissue mask on the feature grid) without knowing the model.

    slide.py       Slide (mpp-based level choice), ArrayImage, RegionView, SlideError
    tiff_reader.py fast threaded reader of tiled pyramidal TIFFs (Slide's backend for TIFF/SVS)
    resample.py    the box filter that shrinks a level to the working mpp (PIL's windows, fast)
    tissue.py      tissue mask (Otsu on saturation), bounding box, crops, masks at other resolutions
    camelyon.py    CAMELYON16 folder layout, labels, splits, ASAP XML annotations
    synthetic.py   a synthetic mini-CAMELYON16 (pyramidal JPEG TIFFs with lesions and XML)
    synthetic_camelyon.py  a harder one: small lesions seen only at fine scale, confounders
    augment.py     flips, quarter turns and HSV jitter as a lazy view (the NumPy reference)
    device_jitter.py  the HSV jitter in torch, for tiles on the device
    device_view.py    DeviceAugmentedView: the augmentation in torch, tile by tile on the device
    band_augment.py   the augmentation written into interleaved rows (what the crop cache stores)
    crop_cache.py     CropCache: a crop decoded and augmented once per step (device, host or none)
    inputs.py      slide file -> lazy tissue crop + tissue mask on the feature grid
    samples.py     the shipped CC0 H&E sample slide (tests and tutorials)
"""

from .camelyon import (
    SlideRecord,
    discover,
    make_splits,
    rasterize_polygons,
    read_asap_xml,
    read_lesions,
    read_splits,
)
from .slide import ArrayImage, ImageSource, RegionView, Slide, SlideError
from .synthetic import make_demo_data
from .tissue import NoTissueError, crop_box, mask_at_resolution, tissue_bbox, tissue_mask

__all__ = [
    "ArrayImage",
    "ImageSource",
    "NoTissueError",
    "RegionView",
    "Slide",
    "SlideError",
    "SlideRecord",
    "crop_box",
    "discover",
    "make_demo_data",
    "make_splits",
    "mask_at_resolution",
    "rasterize_polygons",
    "read_asap_xml",
    "read_lesions",
    "read_splits",
    "tissue_bbox",
    "tissue_mask",
]
