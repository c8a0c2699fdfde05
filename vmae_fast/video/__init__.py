"""Reading videos: the library's one room for it, used by the training loader, the user tools
(``vmae_fast.tools``) and the benchmarks.

    decoders  PyAV, torchcodec and decord behind one interface (``open_video``, ``--decoder``)
    frames    a folder of images read as a video (the official rawframes layout)
    lists     dataset list entries in the official list formats (``read_list``)
    sources   one entry or path as frames, file or folder alike (``VideoSource``, ``open_source``)
    resize    the uint8 resizes: the training crops' antialiased one, the test views' one
    views     the official multi-view test protocol (``make_views``)
    shards    video datasets as WebDataset tar shards (imported on its own: ``webdataset``)
"""
from .decoders import (DECODERS, UnreadableVideo, VideoReader, add_decoder_arg, available_decoders, open_video,
                       resolve_decoder)
from .frames import FRAME_PATTERN, FrameFolder
from .lists import Entry, read_list
from .sources import VideoSource, open_source
from .views import DEFAULT_VIEWS, make_views, parse_views

__all__ = ["DECODERS", "UnreadableVideo", "VideoReader", "add_decoder_arg", "available_decoders", "open_video", "resolve_decoder",
           "FRAME_PATTERN", "FrameFolder", "Entry", "read_list", "VideoSource", "open_source", "DEFAULT_VIEWS",
           "make_views", "parse_views"]
