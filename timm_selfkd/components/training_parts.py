"""The training-only parts a method adds to a model (exits, branches, heads, self-teachers): placed like the model,
and counted for the method's log line."""
import torch.nn as nn

__all__ = ['like_model', 'training_only_parameters']


def like_model(part: nn.Module, model: nn.Module) -> nn.Module:
    """`part` on the model's device and dtype, its BatchNorms synchronised where the model's are (train.py converts
    the model for --sync-bn before the method wraps it)."""
    reference = next(model.parameters())
    part = part.to(device=reference.device, dtype=reference.dtype)
    if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        part = nn.SyncBatchNorm.convert_sync_batchnorm(part)
    return part


def training_only_parameters(part: nn.Module) -> str:
    """'1.23M training-only parameters': the trained parameters of `part`, for a log line."""
    return f'{sum(p.numel() for p in part.parameters() if p.requires_grad) / 1e6:.2f}M training-only parameters'
