"""vmae-fast: compute-optimized VideoMAE V2 (dual masking) for PyTorch.

Quick start::

    import vmae_fast
    model = vmae_fast.create_pretrain_model("vit_base_patch16_224")
    masks = vmae_fast.DualMask.sample(2, model.grid, encoder_ratio=0.9, decoder_ratio=0.5)
    out = model(video, masks)      # out.loss, out.pred
"""
from . import _native, flops, hf, labels, ops  # noqa: F401  (_native: lazy loader of vmae_fast._C)
from .attention import AttentionBackendError
from .checkpoint import load_checkpoint_file, save_atomic, unwrap_state_dict
from .config import ARCHS, IMAGENET_MEAN, IMAGENET_STD, VideoMAEConfig, config_for
from .masking import DualMask
from .models import (LoadReport, PretrainOutput, VideoMAEv2Classifier, VideoMAEv2Pretrain, create_model,
                     create_pretrain_model, load_model)

__version__ = "0.1.0"

__all__ = ["ARCHS", "AttentionBackendError", "DualMask", "IMAGENET_MEAN", "IMAGENET_STD", "LoadReport",
           "PretrainOutput", "VideoMAEConfig", "VideoMAEv2Classifier", "VideoMAEv2Pretrain", "config_for",
           "create_model", "create_pretrain_model", "flops", "hf", "labels", "load_checkpoint_file", "load_model",
           "ops", "save_atomic", "unwrap_state_dict"]

