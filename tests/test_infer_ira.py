"""
Lesson: the IRA system from the shell (infer.py --speak / --pipeline), on tiny random checkpoints.

  - `--speak` writes exactly the speech `speechlm.speak` makes with the same seed: a 24 kHz 16-bit mono WAV of
    320 samples per generated codec frame, and nothing on stdout;
  - `--pipeline` writes that speech too, and prints exactly the response `adapter.pipeline` gives (the LLM
    hearing the very same codes through the adapter), and nothing else;
  - a missing checkpoint is one `error: ...` line on stderr and exit code 2.

The codec is EnCodec's untrained twin (no download here) with k-means codebooks fitted on two tones, so the
audio is noise; what is checked is the plumbing, against the library functions as reference.

Run:  python -m pytest tests/test_infer_ira.py
"""
import json
import math
import wave

import pytest
import torch
from safetensors.torch import save_file

import adapter
import config
import data
import infer
import speechlm

QUIET = dict(log=lambda *a: None)


def write_run(folder, cfg, tensors):
    """What train.py leaves in its out_dir, as far as inference reads it: config.json and the weights."""
    (folder / "ckpt").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "ckpt" / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A corpus folder holding codec codebooks, a stage-1 run folder (s1) and a stage-2 run folder (s2), as
    train.py would leave them (config.json + ckpt/model.safetensors), with random tiny weights; the config
    and the codec, for the reference calls."""
    root = tmp_path_factory.mktemp("ira")
    t = torch.arange(int(0.4 * 16000)) / 16000
    for i, f in enumerate((220.0, 660.0)):                                       # two tones for k-means
        data.save_wav(root / "corpus" / f"{i}.wav", 0.5 * torch.sin(2 * math.pi * f * t), 16000)
    (root / "corpus" / "train.jsonl").write_text("".join(json.dumps({"audio": f"{i}.wav", "text": "x"}) + "\n"
                                                         for i in (0, 1)))
    data.encode_manifest_codes(root / "corpus" / "train.jsonl", 1.5, "", **QUIET)  # codebooks + codec.json
    cfg = config.get_config("tiny", [f"--data.corpus={root / 'corpus'}",
                                     f"--adapter.speechlm_checkpoint={root / 's1'}"])
    torch.manual_seed(0)
    lm, _ = speechlm.build_speechlm(cfg, **QUIET)
    write_run(root / "s1", cfg, speechlm.SpeechLMTraining(lm, 1.0).state_dict())
    align_model, _, _ = adapter.build_align_model(cfg, torch.device("cpu"), **QUIET)
    write_run(root / "s2", cfg, {f"adapter.{k}": v for k, v in align_model.adapter.state_dict().items()})
    return root, cfg, data.load_codec_for(cfg, **QUIET)                         # the reference's codec


def read_wav(path):
    with wave.open(str(path)) as f:
        return f.getframerate(), f.getnchannels(), f.getsampwidth(), f.getnframes()


def test_speak_writes_the_speech_speechlm_speak_makes(checkpoints, capsys):
    root, cfg, codec = checkpoints
    infer.main(["--speak", "red cat", "--voice", "a slow male voice", "--out", str(root / "speak.wav"),
                "--checkpoint", str(root / "s1"), "--device", "cpu", "--max-seconds", "0.5", "--seed", "3"])
    assert capsys.readouterr().out == ""                                         # the speech is the file
    # reference: the library call with the same seed
    lm, tokenizer, cfg = speechlm.load_speechlm_checkpoint(root / "s1", cfg, **QUIET)
    torch.manual_seed(3)
    codes, waveform = speechlm.speak(lm.eval(), tokenizer, codec, "red cat", "a slow male voice", 0.5, 0.8, 50)
    rate, channels, width, n = read_wav(root / "speak.wav")
    assert (rate, channels, width) == (24000, 1, 2)                              # 24 kHz, mono, 16-bit
    assert 1 <= codes.size(1) <= 37 and n == 320 * codes.size(1)                # <= 0.5 s: 37 frames of 320
    written = data.load_audio(root / "speak.wav", sr=24000)
    assert (written - waveform.clamp(-1, 1)).abs().max() <= 1 / 2**15           # 16-bit rounding only


def test_pipeline_prints_only_the_llm_response(checkpoints, capsys):
    root, cfg, codec = checkpoints
    infer.main(["--pipeline", "blue dog", "--out", str(root / "pipe.wav"), "--checkpoint", str(root / "s2"),
                "--device", "cpu", "--max-seconds", "0.5", "--max-new-tokens", "6"])
    printed = capsys.readouterr().out
    align_model, _, cfg = adapter.load_align_model(cfg, root / "s2", torch.device("cpu"), **QUIET)
    torch.manual_seed(0)                                                         # infer's default --seed
    waveform, response = adapter.pipeline(align_model, codec, "blue dog", max_seconds=0.5, max_new_tokens=6)
    assert printed == response + "\n"
    assert read_wav(root / "pipe.wav")[3] == waveform.numel() > 0


@pytest.mark.parametrize("mode, stage", [("--speak", "speechlm"), ("--pipeline", "align")])
def test_missing_checkpoint_is_one_error_line(tmp_path, capsys, mode, stage):
    with pytest.raises(SystemExit) as caught:
        infer.main([mode, "hello", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o.wav"),
                    "--device", "cpu"])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert f"--stage={stage}" in err and not (tmp_path / "o.wav").exists()
