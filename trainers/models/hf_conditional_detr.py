"""transformers' ConditionalDetrForObjectDetection -> our ConditionalDETR, same weights, same outputs."""
import warnings

from torch import nn

from trainers.config import ModelConfig
from trainers.models.conditional_detr import ConditionalDETR
from trainers.models.hf_backbone import (HF_BACKBONE_PREFIX, backbone_name_from_hf,
                                                     backbone_state_from_hf, config_field, load_exactly,
                                                     rename_key)

# transformers key (after the backbone) -> ours, applied in order to each key; the first matching rule wins
_RENAMES = [
    (r"model\.input_projection\.", "input_proj."),
    (r"model\.query_position_embeddings\.", "query_embed."),
    (r"model\.encoder\.layers\.(\d+)\.self_attn\.o_proj\.", r"encoder.\1.self_attn.out_proj."),
    (r"model\.encoder\.layers\.(\d+)\.self_attn\.", r"encoder.\1.self_attn."),
    (r"model\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"encoder.\1.norm1."),
    (r"model\.encoder\.layers\.(\d+)\.mlp\.fc1\.", r"encoder.\1.linear1."),
    (r"model\.encoder\.layers\.(\d+)\.mlp\.fc2\.", r"encoder.\1.linear2."),
    (r"model\.encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.\1.norm2."),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.o_proj\.", r"decoder.layers.\1.self_attn.out_proj."),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.", r"decoder.layers.\1.self_attn."),
    (r"model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"decoder.layers.\1.norm1."),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn\.o_proj\.", r"decoder.layers.\1.cross_attn.out_proj."),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn\.", r"decoder.layers.\1.cross_attn."),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.", r"decoder.layers.\1.norm2."),
    (r"model\.decoder\.layers\.(\d+)\.mlp\.fc1\.", r"decoder.layers.\1.linear1."),
    (r"model\.decoder\.layers\.(\d+)\.mlp\.fc2\.", r"decoder.layers.\1.linear2."),
    (r"model\.decoder\.layers\.(\d+)\.final_layer_norm\.", r"decoder.layers.\1.norm3."),
    (r"model\.decoder\.layernorm\.", "decoder.norm."),
    (r"model\.decoder\.(query_scale|ref_point_head)\.", r"decoder.\1."),
    (r"class_labels_classifier\.", "class_head."),
    (r"bbox_predictor\.", "box_head."),
]


def model_config_from_hf(hf_config) -> ModelConfig:
    """Our ModelConfig for a transformers ConditionalDetrConfig; a ValueError for what we do not implement."""
    c = hf_config
    unsupported = {
        "position_embedding_type": (c.position_embedding_type, "sine"),
        "activation_function": (c.activation_function, "relu"),
        "dilation": (getattr(c, "dilation", False), False),
        "decoder_attention_heads": (c.decoder_attention_heads, c.encoder_attention_heads),
        "decoder_ffn_dim": (c.decoder_ffn_dim, c.encoder_ffn_dim),
    }
    for key, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ValueError(f"ConditionalDetrConfig.{key}={value!r} is not supported (need {wanted!r})")
    out_features = config_field(c.backbone_config, "out_features") or ["stage4"]
    if config_field(c.backbone_config, "model_type") == "resnet" and out_features[-1] != "stage4":
        raise ValueError(f"Conditional DETR reads the backbone's last output; need stage4, got {out_features}")
    return ModelConfig(family="conditional_detr", backbone=backbone_name_from_hf(c.backbone_config),
                       backbone_norm="frozen_bn",  # a pretrained backbone: DETR's frozen batch norm
                       encoder_layers=c.encoder_layers, decoder_layers=c.decoder_layers, num_queries=c.num_queries,
                       hidden_dim=c.d_model, num_heads=c.encoder_attention_heads, ffn_dim=c.encoder_ffn_dim,
                       dropout=c.dropout)


def convert_conditional_detr(hf_model: nn.Module) -> ConditionalDETR:
    """A transformers ConditionalDetrForObjectDetection -> our ConditionalDETR with its weights, in eval mode.
    Every parameter and buffer of ours must be filled: anything missing or left over is an error."""
    config = model_config_from_hf(hf_model.config)
    if getattr(hf_model.config, "auxiliary_loss", False):
        # transformers then feeds each layer's *normed* output into the next layer (and norms the last twice);
        # the original code, transformers' default and ours feed the un-normed output
        warnings.warn("ConditionalDetrConfig.auxiliary_loss=True changes transformers' decoder forward; the "
                      "converted model follows the original Conditional DETR (auxiliary_loss=False) forward")
    model = ConditionalDETR(config, hf_model.config.num_labels)
    hf_state = hf_model.state_dict()
    state = backbone_state_from_hf(hf_state)
    unknown = []
    for key, value in hf_state.items():
        if key.startswith(HF_BACKBONE_PREFIX):
            continue
        try:
            state[rename_key(key, _RENAMES)] = value
        except KeyError:
            unknown.append(key)
    return load_exactly(model, state, unknown, "ConditionalDetr")
