"""Which kernels a step runs: the model through torch.compile (RuntimeConfig.compile), and the attention
kernels scaled_dot_product_attention may pick on CUDA."""
import torch


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model's forward through torch.compile (inductor), for RuntimeConfig.compile (the student, and a
    distillation teacher). Its parameters and state_dict stay the model's; dynamo compiles again for a new
    input shape, then with dynamic sizes.

    Without inductor's layout optimisation (convolutions made channels_last): with dynamic sizes it wrote
    the first shape's strides of a saved input into the backward graph, and Deformable DETR's training
    failed at the next shape (`assert_size_stride`, torch 2.14 on the CPU); without it all three families
    train compiled with multi-scale batches."""
    return torch.compile(model, options={"layout_optimization": False})


def select_attention_kernels(device: torch.device, cudnn: bool = False) -> None:
    """Which kernels scaled_dot_product_attention may use on CUDA (a process-wide switch): by default not
    cuDNN's, which PyTorch picks first for bf16 on Hopper. A detection step's attention calls are small (batch
    2, a few hundred queries) and the step waits on its host; cuDNN's attention costs more host time per call
    than the FlashAttention / memory-efficient kernels it displaces (benchmarks/profile_step.py compares)."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
