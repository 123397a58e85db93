"""COCO-format detection data: dataset, DETR transforms, batching, and the synthetic dataset generator."""
from .batching import collate
from .coco import CocoDetection, DatasetError, MissingDataError, build_dataset
from .synthetic import CLASSES as SYNTHETIC_CLASSES, ensure_synthetic, make_synthetic
from .transforms import make_transforms, to_model_input

__all__ = ["CocoDetection", "DatasetError", "MissingDataError", "build_dataset", "collate", "make_transforms",
           "to_model_input", "make_synthetic", "ensure_synthetic", "SYNTHETIC_CLASSES"]
