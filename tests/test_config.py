"""
Lesson: the whole configuration is plain dataclasses plus `--section.key=value` overrides.

Values are parsed with ast.literal_eval and checked against the default's type; mistakes are one
clear line naming the closest valid key. Run:  python -m pytest tests/test_config.py
"""
import pytest
import torch

import config
from config import ConfigError, get_config


def test_presets_and_overrides():
    cfg = get_config("seed", ["--train.lr=3e-4", "--lora.targets=('q_proj', 'o_proj')", "--system.device=cpu",
                              "--model.pad_audio_to_30s=True", "--train.max_steps=7", "--train.min_lr=0"])
    assert cfg.model.llm == "sarvamai/sarvam-2b-v0.5" and cfg.lora.r == 16      # from the preset
    assert cfg.train.lr == 3e-4 and cfg.train.max_steps == 7 and cfg.train.min_lr == 0.0
    assert cfg.lora.targets == ("q_proj", "o_proj") and cfg.system.device == "cpu"
    assert cfg.model.pad_audio_to_30s is True
    assert get_config("base").model.encoder == "openai/whisper-base"
    assert get_config("tiny").model.llm == "tiny:llama"
    assert get_config("base", ["--model.llm=checkpoints/my model"]).model.llm == "checkpoints/my model"


@pytest.mark.parametrize("override,message", [
    ("--train.lrr=1", "did you mean train.lr"),
    ("--trian.lr=1", "did you mean train"),
    ("--train.max_steps=1.5", "expected int, got float"),
    ("--model.pad_audio_to_30s=yes", "expected True or False"),
    ("train.lr=1", "--section.key=value"),
])
def test_bad_overrides_are_one_clear_line(override, message):
    with pytest.raises(ConfigError, match=message):
        get_config("base", [override])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="did you mean tiny"):
        get_config("tiyn")


def test_device_and_precision_say_why():
    said = []
    assert config.choose_device("cpu", log=said.append) == torch.device("cpu")
    assert config.choose_precision("fp16", torch.device("cpu"), log=said.append) == (torch.float32, False)
    assert config.choose_precision("int8", torch.device("cpu"), log=said.append) == (torch.float32, True)
    assert "fp16 matmuls are not supported well on CPU" in said[1] and "int8" in said[2]
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            config.choose_device("cuda", log=said.append)


# Property: any override string either applies cleanly (and the field keeps its type) or raises
# ConfigError with one line. Never a TypeError, KeyError or traceback from deep inside.
from hypothesis import given, settings, strategies as st

KEYS = [f"{section}.{name}" for section, values in config.Config().to_dict().items() for name in values]


@settings(max_examples=500, deadline=None)
@given(key=st.one_of(st.sampled_from(KEYS), st.text(max_size=20)),
       value=st.one_of(st.text(max_size=30), st.integers().map(str), st.floats().map(repr),
                       st.sampled_from(["True", "False", "None", "()", "('q_proj',)", "[1, 2]", "{}", "1e-3"])))
def test_override_parser_never_crashes(key, value):
    try:
        cfg = get_config("tiny", [f"--{key}={value}"])
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    section, name = key.split(".", 1)
    default = getattr(getattr(get_config("tiny"), section), name)
    assert type(getattr(getattr(cfg, section), name)) is type(default)
