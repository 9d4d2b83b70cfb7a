"""Custom ops: MoE token permute / unpermute on the megamod._C kernels."""

from megamod.ops.permute import extension_available, permute, unpermute

__all__ = ["extension_available", "permute", "unpermute"]
