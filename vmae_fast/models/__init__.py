from .classifier import VideoMAEv2Classifier
from .common import LoadReport, OfficialCheckpointMixin
from .factory import create_model, create_pretrain_model
from .load import load_model
from .pretrain import PretrainOutput, VideoMAEv2Pretrain

__all__ = ["LoadReport", "OfficialCheckpointMixin", "VideoMAEv2Classifier", "VideoMAEv2Pretrain",
           "PretrainOutput", "create_model", "create_pretrain_model", "load_model"]
