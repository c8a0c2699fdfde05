"""Fused ops of dual-masked pretraining, each beside its pure-PyTorch reference.

- ``gather_cubes``: the cubes at token indices, straight from the clip (float or uint8).
- ``decoder_input``: ``[z + pos[visible], mask_token + pos[decoder]]`` in one pass.
- ``masked_mse_loss``: normalized-pixel target built in registers, weighted MSE to a scalar.

``VMAE_FAST_KERNELS=0`` (or ``with use_kernels(False):``) routes every op to its ``*_ref``.
"""
from ._common import kernels_enabled, normalize_uint8, use_kernels
from .decoder_input import decoder_input, decoder_input_ref
from .gather_cubes import gather_cubes, gather_cubes_ref
from .masked_mse import cube_targets_ref, masked_mse_loss, masked_mse_loss_ref

__all__ = ["kernels_enabled", "use_kernels", "normalize_uint8", "gather_cubes", "gather_cubes_ref", "decoder_input",
           "decoder_input_ref", "masked_mse_loss", "masked_mse_loss_ref", "cube_targets_ref"]
