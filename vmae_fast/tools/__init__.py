"""The user tools: commands that use a trained model and read videos, but neither train nor
benchmark. Each is a console script and ``python -m vmae_fast.tools.<name>``:

    predict           vmae-predict            top-k labels by the official multi-view test protocol
    extract_features  vmae-extract-features   per-video encoder features over sliding windows
    visualize         vmae-visualize          reconstruction picture of a pretraining checkpoint
    export            vmae-export             ONNX graph of a classifier or its encoder (dynamic batch)

They share one skeleton (``common``): the checkpoint and architecture options, ``--device`` and
``--dtype``, ``--decoder``, per-video errors (one line each, the other videos complete, exit
status 1), atomic output files and ``--debug``. They import the library only (never ``train``
or ``bench``).
"""
