"""Plain transformer pieces shared by the detector families: an MLP, multi-head attention on already-projected
inputs, a multi-head attention module with separate q/k/v projections, DETR's post-norm encoder layer, and the
LayerNorm every family uses (with an optional bf16 output under autocast).

Shapes: B batch, N queries, S keys, d model width, h heads.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def layer_norm(x: Tensor, shape, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, bf16_output: bool = False) -> Tensor:
    """F.layer_norm; with bf16_output, under bf16 autocast, the result is bf16 where autocast's policy makes it
    float32: the bf16 input normalised with bf16 weight and bias (the statistics and the affine are computed in
    float32 inside the kernel; the weight and bias are rounded as autocast rounds a Linear's, and the output).

    Why: in a post-norm transformer every LayerNorm output feeds the next matrix products, which autocast runs
    in bf16, and the residual add. A float32 output is cast to bf16 again at each product (an operator forward
    and one backward), and on a GPU a batch-2 detection step is bound by its operator launches. A bf16 output
    makes the residual stream bf16, as Megatron-LM keeps it: fewer operators, one more rounding of each
    residual sum (ScheduleConfig.amp_layer_norm). The weight and bias must be bf16 because CUDA's kernel takes
    only its input's dtype for them (the CPU's also mixes bf16 input and float32 weights); BF16Weights holds
    bf16 copies of them, so a training step casts none here."""
    if bf16_output and torch.is_autocast_enabled(x.device.type) and \
            torch.get_autocast_dtype(x.device.type) == torch.bfloat16:
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(_bf16(x), shape, _bf16(weight), _bf16(bias), eps)
    return F.layer_norm(x, shape, weight, bias, eps)


def matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matrix product of `x` runs in: autocast's on x's device when it is on, else x's own. A
    constant input (a positional encoding) made in it once is not cast again by every layer that uses it."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _bf16(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.dtype == torch.bfloat16 else t.to(torch.bfloat16)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (the same parameters and state_dict) computed by `layer_norm`; `bf16_output` is set for a
    whole model by `set_bf16_layer_norm`."""
    bf16_output = False

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, self.bf16_output)


def set_bf16_layer_norm(model: nn.Module, on: bool) -> None:
    """Make every `LayerNorm` of `model` return bf16 under bf16 autocast (on) or float32 (off, autocast's own
    policy)."""
    for module in model.modules():
        if isinstance(module, LayerNorm):
            module.bf16_output = on


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them (not after the last): [..., in] -> [..., out]."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def linear_many(x: Tensor, layers: list[nn.Linear]) -> tuple[Tensor, ...]:
    """Several linear layers applied to the same input, as one matrix multiply: x [..., d_in] -> one
    [..., d_out_i] per layer. The same values as calling each (up to float rounding); fewer kernels
    forward and backward (on a GPU a small-batch step is bound by its launches), and under autocast one
    cast of the input instead of one per layer."""
    if len(layers) == 1:
        return (layers[0](x),)
    weight = torch.cat([layer.weight for layer in layers])
    bias = torch.cat([layer.bias for layer in layers])
    return F.linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1)


def attention_bias(blocked: Tensor, dtype: torch.dtype) -> Tensor:
    """blocked [..., S] bool (True = may not attend: a key that is padding, a query of another group) ->
    the additive attention bias [..., S] of `dtype`: -inf where blocked, else 0.

    Made once per forward and given to every layer's attention: a bool mask is converted by
    scaled_dot_product_attention at every call (logical_not, a fill, where), and a bias whose rows do not start
    at multiples of 8 elements is copied into such a layout first (PyTorch's memory-efficient kernel wants it
    so; at 800 x 1066 the encoder's 850 keys are not): five kernel launches a call, 12 calls a Conditional DETR
    forward. This one is made in that layout (a view of a row-padded buffer), in the dtype the attention runs
    in (`matmul_dtype` of its input; autocast would cast a float32 one at every call).
    """
    size = blocked.shape[-1]
    bias = blocked.new_zeros(*blocked.shape[:-1], -(-size // 8) * 8, dtype=dtype)[..., :size]
    return bias.masked_fill_(blocked, float("-inf"))


def multi_head_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, bias: Optional[Tensor] = None) -> Tensor:
    """Scaled dot-product attention of projected inputs, split into heads.

    q [B, N, h*dq], k [B, S, h*dq], v [B, S, h*dv], bias: an additive attention bias broadcastable to
    [B, h, N, S] (`attention_bias`: [B, 1, 1, S] for padded keys, [N, S] between query groups) or None
    -> [B, N, h*dv]. The scale is 1/sqrt(dq), dq being the per-head width of q and k (which may differ from
    the value's, as in Conditional DETR's cross-attention).
    """
    B, N, S = q.shape[0], q.shape[1], k.shape[1]
    q = q.view(B, N, num_heads, -1).transpose(1, 2)  # [B, h, N, dq]
    k = k.view(B, S, num_heads, -1).transpose(1, 2)
    v = v.view(B, S, num_heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, h, N, dv]
    return out.transpose(1, 2).flatten(2)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (no attention-weight dropout)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """query [B, N, d], key/value [B, S, d], bias: `attention_bias` of the padded keys [B, 1, 1, S] or
        None -> [B, N, d]."""
        # self-attention (query is key, as in the encoder): both projections in one multiply
        if query is key:
            q, k = linear_many(query, [self.q_proj, self.k_proj])
        else:
            q, k = self.q_proj(query), self.k_proj(key)
        out = multi_head_attention(q, k, self.v_proj(value), self.num_heads, bias)
        return self.out_proj(out)


class EncoderLayer(nn.Module):
    """DETR's post-norm encoder layer: self-attention with the position embedding added to queries and keys
    (not values), then a ReLU FFN; each followed by dropout, the residual, and LayerNorm."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.1):
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, padding_bias: Optional[Tensor] = None) -> Tensor:
        """src, pos [B, S, d], padding_bias [B, 1, 1, S]: `attention_bias` of the padding -> [B, S, d]."""
        qk = src + pos
        src = self.norm1(src + self.dropout(self.self_attn(qk, qk, src, padding_bias)))
        return self.norm2(src + self.dropout(self.linear2(F.relu(self.linear1(src)))))
