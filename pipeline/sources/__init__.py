"""Data sources of the pipeline: HTTP downloads, safe archive extraction, the embedded dataset."""

from .archive import UnsafeArchiveError, safe_extract
from .download import ChecksumError, DownloadError, DownloadResult, download_file
from .embedded import SplitSummary, generate_split, target_families
from .scenes import CATEGORIES, JPEG_QUALITY, Scene, generate_scene, scene_generator

__all__ = [
    "CATEGORIES",
    "JPEG_QUALITY",
    "ChecksumError",
    "DownloadError",
    "DownloadResult",
    "Scene",
    "SplitSummary",
    "UnsafeArchiveError",
    "download_file",
    "generate_scene",
    "generate_split",
    "safe_extract",
    "scene_generator",
    "target_families",
]
