"""Training entry points: ``python -m train.pretrain``, ``python -m train.finetune``,
``python -m train.make_synthetic`` (see each module's docstring)."""
