"""Fine-tuning on a cohort: label sources, splits, augmentation, ``train`` and ``evaluate``.

>>> from tmequant.training import TrainConfig, train, evaluate
>>> res = train(TrainConfig(data="NCT-CRC-HE-100K/", out="models/crc"))   # doctest: +SKIP
>>> ev = evaluate("CRC-VAL-HE-7K/", "models/crc")                           # doctest: +SKIP
>>> ev.metrics["tissue"]["balanced_accuracy"]                               # doctest: +SKIP
"""

from tmequant.training.augment import AugmentConfig, MacenkoNormalizer, augment, hed_jitter
from tmequant.training.dataset import TileDataset, TileReader, read_image
from tmequant.training.evaluate import EvalResult, evaluate, evaluate_labels, predict_labels
from tmequant.training.labels import (
    NCT_CRC_ROLES,
    AnnotatedSlide,
    LabelSet,
    Sample,
    find_annotated_slides,
    load_labels,
    read_class_folders,
    read_csv_manifest,
    read_slide_annotations,
)
from tmequant.training.metrics import classification_metrics, count_metrics
from tmequant.training.splits import check_no_leakage, split_labels
from tmequant.training.trainer import TrainConfig, TrainResult, train

__all__ = [
    "NCT_CRC_ROLES",
    "AnnotatedSlide",
    "AugmentConfig",
    "EvalResult",
    "LabelSet",
    "MacenkoNormalizer",
    "Sample",
    "TileDataset",
    "TileReader",
    "TrainConfig",
    "TrainResult",
    "augment",
    "check_no_leakage",
    "classification_metrics",
    "count_metrics",
    "evaluate",
    "evaluate_labels",
    "find_annotated_slides",
    "hed_jitter",
    "load_labels",
    "predict_labels",
    "read_class_folders",
    "read_csv_manifest",
    "read_image",
    "read_slide_annotations",
    "split_labels",
    "train",
]
