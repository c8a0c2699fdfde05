"""train/config.py: every command-line option lands in the frozen config the tasks build from,
and a bad value names its flag, however the config is made."""
from __future__ import annotations

import dataclasses

import pytest

from train import cli, finetune, pretrain
from train.augment import EraseSpec
from train.config import FinetuneConfig, PretrainConfig
from vmae_fast.errors import UsageError

# options that are no config field of their own name: --debug is read off the command line by
# run_cli; --eval and --finetune are the run's eval_only and start_weights
ELSEWHERE = {"help", "debug", "eval", "finetune"}


@pytest.fixture
def argv(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("a.mp4 0 -1\n")
    out = ["--output-dir", str(tmp_path / "out")]
    return {pretrain: ["--data-list", str(lst), *out],
            finetune: ["--train-list", str(lst), "--num-classes", "4", *out]}


@pytest.mark.parametrize("module, config", [(pretrain, PretrainConfig), (finetune, FinetuneConfig)])
def test_every_option_reaches_the_config(module, config, argv, monkeypatch):
    parsers = []

    def spy(ap, *rest):
        parsers.append(ap)
        return cli.parse(ap, *rest)

    monkeypatch.setattr(module, "parse", spy)
    cfg = module.parse_args(argv[module])
    assert type(cfg) is config and cfg.run.task == module.__name__.split(".")[-1]
    dests = {a.dest for a in parsers[0]._actions}
    held = {f.name for f in dataclasses.fields(cfg)} | {f.name for f in dataclasses.fields(cfg.run)}
    assert dests - ELSEWHERE - held == set()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_frames = 8


def test_finetune_values_and_their_checks(argv):
    cfg = finetune.parse_args(argv[finetune] + ["--mixup", "0.3", "--cutmix", "0", "--reprob", "0.5",
                                                "--remode", "rand", "--recount", "2", "--head-drop", "0.25"])
    assert (cfg.mixup, cfg.cutmix, cfg.mixing, cfg.num_classes) == (0.3, 0.0, True, 4)
    assert cfg.erase_spec() == EraseSpec(0.5, "rand", 2)
    assert cfg.model_options() == {"num_frames": 16, "img_size": 224, "drop_path_rate": 0.1, "head_drop_rate": 0.25}
    assert dataclasses.replace(cfg, reprob=0.0).erase_spec() is None
    # replace() builds a new config: the same checks, in the flag's words
    for change, words in [({"test_num_crop": 0}, "--test-num-crop must be >= 1, got 0"),
                          ({"recount": 0}, "--recount must be >= 1, got 0"),
                          ({"num_classes": 0}, "--num-classes must be >= 1, got 0"),
                          ({"shuffle_buffer": 0}, "--shuffle-buffer must be >= 1, got 0"),
                          ({"model_overrides": "depth"}, "--model-overrides takes key=value pairs")]:
        with pytest.raises(UsageError, match=words):
            dataclasses.replace(cfg, **change)
    with pytest.raises(UsageError, match="must be even, got 1 x 1"):
        dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, batch_size=1, num_sample=1))


def test_pretrain_values_and_their_checks(argv):
    cfg = pretrain.parse_args(argv[pretrain] + ["--encoder-ratio", "0.75", "--decoder-depth", "2"])
    assert (cfg.encoder_ratio, cfg.decoder_ratio, cfg.encoder_mask_type) == (0.75, 0.5, "tube")
    assert cfg.model_options()["decoder_depth"] == 2
    with pytest.raises(UsageError, match="masking: running-cell decoder_ratio must be 0.25, 0.5 or 0.75"):
        dataclasses.replace(cfg, decoder_ratio=0.3)
    with pytest.raises(UsageError, match=r"--encoder-ratio must be in \[0, 1\), got 1.5"):
        dataclasses.replace(cfg, encoder_ratio=1.5)
    with pytest.raises(UsageError, match="--data-list LIST or --shards SPEC"):
        dataclasses.replace(cfg, data_list=None)
