"""bf16 copies of the weights that bf16 autocast casts at every use, refreshed by one operator per step.

Under bf16 autocast each Linear and Conv2d casts its float32 weight and bias to bfloat16 in the forward (one
cast operator per tensor) and casts their gradients back to float32 in the backward (one more). At the batch
sizes of detection training a GPU step is bound by its kernel launches, and a detector has many such tensors; a
frozen teacher casts its own again at every forward. `BF16Weights` keeps a bfloat16 copy of them: one
multi-tensor copy (`torch._foreach_copy_`) refreshes all of them before the forward, the model runs on them
(they stand in the modules' parameter slots during the call), and `grads_to_master()` copies their gradients
into the float32 parameters' `.grad` with one more. The optimizer, the gradient clipping and the checkpoint see
only the float32 parameters (the master weights of mixed-precision training); the copies are in no state_dict.

The values are autocast's own: the copies are the same round-to-nearest bf16 casts of the same weights,
and a bf16 gradient upcast to float32 is exact, so losses and gradients are bitwise those of plain autocast
(tests/test_bf16_weights.py). Only Linear and Conv2d parameters get copies (and nn.MultiheadAttention's packed
in-projection, Deformable DETR's decoder self-attention), and those of the LayerNorms that
return bf16 (ScheduleConfig.amp_layer_norm; they take bf16 weights, see transformer_layers.layer_norm), which
stand in only while a norm is so set; other norms, embeddings and other parameters stay float32 as autocast
treats them.
"""
from typing import Optional

import torch
from torch import nn

from trainers.models.transformer_layers import LayerNorm


class BF16Weights(nn.Module):
    """Calls `model` with bf16 copies of its Linear/Conv2d (and MultiheadAttention in-projection) weights and
    biases, and of its bf16-output LayerNorms'; use it under bf16 autocast.

    frozen=True (a teacher): the copies are made once, and again only after `refresh()` (e.g. after loading
    other weights); otherwise every call refreshes them from the current float32 parameters.
    """

    def __init__(self, model: nn.Module, frozen: bool = False):
        super().__init__()
        self.model = model
        self.frozen = frozen
        self.master: list[nn.Parameter] = []  # each parameter once, even when two modules share it
        self.slots: list[tuple[nn.Module, str, int]] = []  # (module, parameter name, index in master)
        # the LayerNorms': used by a norm only while its bf16_output is set, which may change after wrapping
        self.norm_slots: list[tuple[nn.Module, str, int]] = []
        index: dict[int, int] = {}
        for module in model.modules():
            # an attention's packed in-projection too: autocast casts its q/k/v chunks (views, which its weight
            # cache skips) at every call, three weights and three biases
            slots = self.slots if isinstance(module, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)) else \
                self.norm_slots if isinstance(module, LayerNorm) else None
            if slots is None:
                continue
            for name, param in module.named_parameters(recurse=False):
                if param.dtype == torch.float32:
                    if id(param) not in index:
                        index[id(param)] = len(self.master)
                        self.master.append(param)
                    slots.append((module, name, index[id(param)]))
        self.copies: list[torch.Tensor] = []
        # float32 gradient storage reused step after step (4 bytes per copied parameter held between steps)
        self._grad_buffers: dict[int, torch.Tensor] = {}

    def refresh(self) -> None:
        """Copy the float32 parameters into their bf16 copies (allocated on first use, or when a parameter
        moved to another device)."""
        with torch.no_grad():
            if not self._placed():
                self.copies = [p.detach().to(torch.bfloat16) for p in self.master]
            else:
                torch._foreach_copy_(self.copies, [p.detach() for p in self.master])
        for copy, param in zip(self.copies, self.master):
            copy.requires_grad_(param.requires_grad and not self.frozen)
            copy.grad = None

    def _placed(self) -> bool:
        """Whether the copies exist, on the parameters' device."""
        return bool(self.copies) and self.copies[0].device == self.master[0].device

    def forward(self, *args, **kwargs):
        if not self.master:
            return self.model(*args, **kwargs)
        if not self.frozen or not self._placed():
            self.refresh()
        # The copies stand in the modules' parameter slots for this call. Not torch.func.functional_call,
        # which does the same through its general reparametrisation at many times the host time: host time
        # is what a GPU step bound by its launches pays.
        slots = self.slots + [slot for slot in self.norm_slots if slot[0].bf16_output]
        for module, name, i in slots:
            module._parameters[name] = self.copies[i]
        try:
            return self.model(*args, **kwargs)
        finally:
            for module, name, i in slots:
                module._parameters[name] = self.master[i]

    def grads_to_master(self) -> None:
        """After backward: the copies' bf16 gradients, upcast, become (or are added to) the float32
        parameters' gradients; the copies' are cleared."""
        pairs = [(param, copy.grad) for param, copy in zip(self.master, self.copies) if copy.grad is not None]
        if not pairs:
            return
        fresh = [(p, g) for p, g in pairs if p.grad is None]
        accumulated = [(p, g) for p, g in pairs if p.grad is not None]
        for param, _ in fresh:
            param.grad = self._grad_buffer(param)
        if fresh:
            torch._foreach_copy_([p.grad for p, _ in fresh], [g for _, g in fresh])
        if accumulated:
            torch._foreach_add_([p.grad for p, _ in accumulated], [g.float() for _, g in accumulated])
        for copy in self.copies:
            copy.grad = None

    def _grad_buffer(self, param: torch.Tensor) -> torch.Tensor:
        buffer: Optional[torch.Tensor] = self._grad_buffers.get(id(param))
        if buffer is None or buffer.device != param.device or buffer.shape != param.shape:
            buffer = self._grad_buffers[id(param)] = torch.empty_like(param)
        return buffer
