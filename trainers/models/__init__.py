"""Detectors of the DETR family behind one contract (see output.py).

`build_detector(model_config, num_classes)` constructs one from its pydantic config;
`from_transformers(model_or_dir)` takes the weights of a transformers detector into ours.
"""
from trainers.config import ModelConfig
from trainers.models.output import DecoderPredictions, DetectorOutput, QueryGroup


def build_detector(config: ModelConfig, num_classes: int):
    """A detector of `config.family` with `num_classes` sigmoid classes."""
    if config.family == "conditional_detr":
        from trainers.models.conditional_detr import ConditionalDETR
        return ConditionalDETR(config, num_classes)
    if config.family == "deformable_detr":
        from trainers.models.deformable_detr import DeformableDETR
        return DeformableDETR(config, num_classes)
    if config.family == "adamixer":
        from trainers.models.adamixer import AdaMixer
        return AdaMixer(config, num_classes)
    raise ValueError(f"unknown detector family {config.family!r}")


def from_transformers(model_or_dir):
    """Our detector with the weights of a transformers ConditionalDetr/DeformableDetr ForObjectDetection
    (the model object, or a directory written by its save_pretrained)."""
    from trainers.models.hf_import import from_transformers as _convert
    return _convert(model_or_dir)


__all__ = ["build_detector", "from_transformers", "DetectorOutput", "DecoderPredictions", "QueryGroup"]
