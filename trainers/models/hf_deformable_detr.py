"""transformers' DeformableDetrForObjectDetection -> our DeformableDETR, same weights, same outputs.

Only the configuration DETRDistill uses: single stage, no iterative box refinement, sine position encoding,
one FFN width and one number of sampling points for encoder and decoder.
"""
import re

import torch
from torch import nn

from trainers.config import ModelConfig
from trainers.models.deformable_detr import DeformableDETR
from trainers.models.hf_backbone import (HF_BACKBONE_PREFIX, backbone_name_from_hf,
                                                     backbone_state_from_hf, load_exactly, rename_key)

# transformers key (after the backbone) -> ours; the first matching rule wins. Decoder self-attention q/k/v
# are packed separately (nn.MultiheadAttention keeps one in_proj), and per-layer heads are checked to be one.
_RENAMES = [
    (r"model\.input_proj\.", "input_proj."),
    (r"model\.query_position_embeddings\.", "query_embed."),
    (r"model\.level_embed$", "level_embed"),
    (r"model\.reference_points\.", "reference_points."),
    (r"model\.encoder\.layers\.(\d+)\.self_attn\.", r"encoder.\1.self_attn."),
    (r"model\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"encoder.\1.norm1."),
    (r"model\.encoder\.layers\.(\d+)\.mlp\.fc1\.", r"encoder.\1.linear1."),
    (r"model\.encoder\.layers\.(\d+)\.mlp\.fc2\.", r"encoder.\1.linear2."),
    (r"model\.encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.\1.norm2."),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.o_proj\.", r"decoder.\1.self_attn.out_proj."),
    (r"model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"decoder.\1.norm1."),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn\.", r"decoder.\1.cross_attn."),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.", r"decoder.\1.norm2."),
    (r"model\.decoder\.layers\.(\d+)\.mlp\.fc1\.", r"decoder.\1.linear1."),
    (r"model\.decoder\.layers\.(\d+)\.mlp\.fc2\.", r"decoder.\1.linear2."),
    (r"model\.decoder\.layers\.(\d+)\.final_layer_norm\.", r"decoder.\1.norm3."),
    (r"class_embed\.0\.", "class_head."),
    (r"bbox_embed\.0\.", "box_head."),
]
_QKV = re.compile(r"model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_LAYER_HEAD = re.compile(r"(class_embed|bbox_embed)\.(\d+)\.(.+)")
_STAGES = ["stage2", "stage3", "stage4"]  # strides 8, 16, 32


def _backbone_levels(backbone_config, num_backbone_levels: int) -> None:
    """Our Backbone returns the last `num_backbone_levels` of strides 8/16/32; so must transformers'."""
    get = backbone_config.get if isinstance(backbone_config, dict) else lambda k: getattr(backbone_config, k, None)
    if get("model_type") == "timm_backbone":
        got, wanted = list(get("out_indices") or []), [2, 3, 4][3 - num_backbone_levels:]
    else:
        got, wanted = list(get("out_features") or []), _STAGES[3 - num_backbone_levels:]
    if got != wanted:
        raise ValueError(f"Deformable DETR with these feature levels reads backbone outputs {wanted}; "
                         f"the transformers backbone returns {got}")


def model_config_from_hf(hf_config) -> ModelConfig:
    """Our ModelConfig for a transformers DeformableDetrConfig; a ValueError for what we do not implement."""
    c = hf_config
    if c.two_stage or c.with_box_refine:
        raise ValueError("only single-stage Deformable DETR without iterative box refinement is supported "
                         f"(two_stage={c.two_stage}, with_box_refine={c.with_box_refine})")
    unsupported = {
        "position_embedding_type": (c.position_embedding_type, "sine"),
        "activation_function": (c.activation_function, "relu"),
        "dilation": (bool(getattr(c, "dilation", False)), False),
        "decoder_attention_heads": (c.decoder_attention_heads, c.encoder_attention_heads),
        "decoder_ffn_dim": (c.decoder_ffn_dim, c.encoder_ffn_dim),
        "decoder_n_points": (c.decoder_n_points, c.encoder_n_points),
    }
    for key, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ValueError(f"DeformableDetrConfig.{key}={value!r} is not supported (need {wanted!r})")
    _backbone_levels(c.backbone_config, min(c.num_feature_levels, 3))
    return ModelConfig(family="deformable_detr", backbone=backbone_name_from_hf(c.backbone_config),
                       backbone_norm="frozen_bn",  # a pretrained backbone: DETR's frozen batch norm
                       encoder_layers=c.encoder_layers, decoder_layers=c.decoder_layers, num_queries=c.num_queries,
                       hidden_dim=c.d_model, num_heads=c.encoder_attention_heads, ffn_dim=c.encoder_ffn_dim,
                       num_feature_levels=c.num_feature_levels, num_points=c.encoder_n_points, dropout=c.dropout)


def convert_deformable_detr(hf_model: nn.Module) -> DeformableDETR:
    """A transformers DeformableDetrForObjectDetection -> our DeformableDETR with its weights, in eval mode.
    Every parameter and buffer of ours must be filled: anything missing or left over is an error."""
    config = model_config_from_hf(hf_model.config)
    model = DeformableDETR(config, hf_model.config.num_labels)
    hf_state = hf_model.state_dict()
    state = backbone_state_from_hf(hf_state)
    qkv, unknown = {}, []
    for key, value in hf_state.items():
        if key.startswith(HF_BACKBONE_PREFIX):
            continue
        if key == "model.level_embed" and not config.encoder_layers:
            continue  # read only by the encoder; transformers keeps it even without one
        if m := _QKV.fullmatch(key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        if (m := _LAYER_HEAD.fullmatch(key)) and m[2] != "0":
            # no box refinement: all layers share one head (tied in transformers); refuse separate ones
            if not torch.equal(value, hf_state[f"{m[1]}.0.{m[3]}"]):
                raise ValueError(f"{key} differs from layer 0's: per-layer heads are not supported")
            continue
        try:
            state[rename_key(key, _RENAMES)] = value
        except KeyError:
            unknown.append(key)
    for (layer, kind), parts in qkv.items():
        state[f"decoder.{layer}.self_attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return load_exactly(model, state, unknown, "DeformableDetr")
