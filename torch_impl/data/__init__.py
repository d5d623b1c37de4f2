"""Slide data: lazy whole-slide reading, tissue detection, CAMELYON16 layout, synthetic data."""

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
from .synthetic import make_demo_data, main_make_demo_data
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
    "main_make_demo_data",
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
