"""
Lesson: how a SpeechLM over EnCodec tokens is wired, checked piece by piece (speechlm.py).

  - the delay pattern is an exact, invertible re-layout of K codebooks (a property over random K, T),
    and matches the picture in speechlm.py's docstring;
  - the VoiceEncoder's symmetric InfoNCE equals a value computed by hand on a 2 x 2 example;
  - the loss is cross-entropy on audio positions only (what a text position "should" predict is irrelevant);
  - KV-cache generation picks exactly what a full forward pass would pick greedily;
  - the tiny preset's stage 1 trains: its loss falls within a few steps; with --system.precision=bf16 its
    matmuls run in bf16 under autocast while the weights stay fp32;
  - --speechlm.voice_only trains the VoiceEncoder alone, on codes or on log-mel (--speechlm.voice_audio);
  - the hearing loss (--speechlm.whisper_weight) lines each audio-only column up with the right Whisper frame
    (a column-by-column reference), ignores padding, and in stage 1 its targets come from the encoder cache.

Run:  python -m pytest tests/test_speechlm.py
"""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from safetensors.torch import save_file

import config
import data
import speechlm
import weights
from speechlm import BOS, END, PAD, SpeechLM, apply_delay, info_nce, undo_delay


def make_coded_corpus(root, n_train=12, n_test=6, K=2, seed=0):
    """A corpus folder whose codes are already on disk (as if encode_manifest_codes had run): short
    transcribe rows with made-up codes that depend on the text, so there is something to learn."""
    generator = torch.Generator().manual_seed(seed)
    words = ["red", "blue", "green", "cat", "dog", "bird"]
    codes_dir = root / "codes-1.5kbps"
    (codes_dir / "wav").mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(n):
            text = f"{words[i % 6]} {words[(i * 5 + 1) % 6]}"
            frames = 6 + (i % 5)                                                   # 6..10 frames
            base = torch.tensor([7 * words.index(w) for w in text.split()]).repeat_interleave(frames)[:frames]
            noise = torch.randint(3, (K, frames), generator=generator)
            codes = base[None] * (torch.arange(K)[:, None] + 1) + noise               # (K, frames)
            np.save(codes_dir / "wav" / f"{split}{i}.npy", codes.numpy().astype(np.int16))
            rows.append({"audio": f"wav/{split}{i}.wav", "text": text, "task": "transcribe",
                         "voice_description": ["a slow male voice", "a fast female voice"][i % 2]})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (codes_dir / "codec.json").write_text(json.dumps({"codec": "encodec_24khz-untrained", "fingerprint": "test",
                                                      "bandwidth": 1.5, "n_codebooks": K}))
    return root


def tiny_speechlm(seed=0):
    torch.manual_seed(seed)
    cfg = config.get_config("tiny").speechlm
    return SpeechLM(cfg, text_vocab=320, n_codebooks=2).eval()


# -----------------------------------------------------------------------------
# the delay pattern

@settings(max_examples=50, deadline=None)
@given(K=st.integers(1, 6), T=st.integers(1, 12), batch=st.integers(1, 3))
def test_delay_round_trip_is_exact(K, T, batch):
    codes = torch.randint(0, 1024, (batch, K, T))
    delayed = apply_delay(codes)
    assert delayed.shape == (batch, K, T + K - 1)
    assert torch.equal(undo_delay(delayed), codes)
    for k in range(K):                                   # codebook k is shifted by exactly k steps
        assert torch.equal(delayed[:, k, k: k + T], codes[:, k])
        assert (delayed[:, k, :k] == PAD).all() and (delayed[:, k, k + T:] == PAD).all()


def test_delay_matches_the_docstring_picture():
    a, b, c = [0, 1, 2, 3], [10, 11, 12, 13], [20, 21, 22, 23]        # K = 3 codebooks, T = 4 frames
    P = PAD
    expected = torch.tensor([[0, 1, 2, 3, P, P], [P, 10, 11, 12, 13, P], [P, P, 20, 21, 22, 23]])
    assert torch.equal(apply_delay(torch.tensor([a, b, c])), expected)


# -----------------------------------------------------------------------------
# VoiceEncoder: InfoNCE by hand

def test_info_nce_equals_hand_computed_value():
    audio = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # temperature 1 (logit_scale = log 1 = 0): logits = audio @ text.T = [[1.0, 0.6], [0.0, 0.8]]
    row0 = math.log(math.exp(1.0) + math.exp(0.6)) - 1.0          # audio 0 -> text 0 among {1.0, 0.6}
    row1 = math.log(math.exp(0.0) + math.exp(0.8)) - 0.8          # audio 1 -> text 1 among {0.0, 0.8}
    col0 = math.log(math.exp(1.0) + math.exp(0.0)) - 1.0          # text 0 -> audio 0 among {1.0, 0.0}
    col1 = math.log(math.exp(0.6) + math.exp(0.8)) - 0.8          # text 1 -> audio 1 among {0.6, 0.8}
    expected = ((row0 + row1) / 2 + (col0 + col1) / 2) / 2
    assert info_nce(audio, text, torch.tensor(0.0)).item() == pytest.approx(expected, abs=1e-6)
    # two clips with the same description are positives of each other: the target spreads over both
    both = info_nce(audio, text, torch.tensor(0.0), same=torch.ones(2, 2, dtype=torch.bool))
    lse = lambda *v: math.log(sum(math.exp(x) for x in v))                    # log-sum-exp
    # target 1/2 on each column: -(1/2) sum_j log_softmax_j = logsumexp - mean of the row's logits
    rows = (lse(1.0, 0.6) - 0.8) + (lse(0.0, 0.8) - 0.4)
    cols = (lse(1.0, 0.0) - 0.5) + (lse(0.6, 0.8) - 0.7)
    assert both.item() == pytest.approx((rows / 2 + cols / 2) / 2, abs=1e-6)


def test_voice_audio_tower_by_hand_and_deaf_to_padding():
    """The audio tower's clip vector is proj(mean over time of its final states), normalized; padding a clip
    inside a batch changes nothing, even where the stride-4 convolution straddles the clip's end."""
    torch.manual_seed(0)
    voice = speechlm.VoiceEncoder(text_vocab=50, n_codebooks=2, dim=16, n_layers=1).eval()
    clip = torch.randint(0, 1024, (2, 11))                        # 11 frames -> 3 positions after stride 4
    states = []
    hook = voice.audio_norm.register_forward_hook(lambda module, inputs, output: states.append(output))
    alone = voice.embed_audio(clip[None], torch.tensor([11]))[0]
    hook.remove()
    assert states[0].shape == (1, 3, 16)
    assert torch.allclose(alone, F.normalize(voice.audio_proj(states[0][0].mean(0)), dim=-1), atol=1e-6)
    longer = torch.randint(0, 1024, (2, 30))
    batch = torch.stack([F.pad(clip, (0, 19), value=5), longer])                    # clip padded to 30
    together = voice.embed_audio(batch, torch.tensor([11, 30]))
    assert torch.allclose(together[0], alone, atol=1e-5)


# -----------------------------------------------------------------------------
# SpeechLM: where the loss is, and the KV cache

def test_loss_is_on_audio_positions_only():
    lm = tiny_speechlm()
    examples = [{"text_ids": torch.tensor([5, 6, 7]), "desc_ids": torch.tensor([9, 9]), "description": "x",
                 "codes": torch.randint(0, 1024, (2, 5))},
                {"text_ids": torch.tensor([8]), "desc_ids": torch.tensor([3]), "description": "y",
                 "codes": torch.randint(0, 1024, (2, 3))}]
    batch = speechlm.speech_batch(examples)
    loss = lm(**batch)
    # Reference: logits at EVERY position, with a target for every position; text positions get arbitrary
    # targets, then a mask keeps audio positions only. Whatever the text targets are, the loss is the same.
    voice = lm.voice_vector(batch["desc_ids"], batch["desc_lengths"], batch["uncond"])
    x, audio_start = lm.sequence(voice, batch["text_ids"], batch["text_lengths"], batch["audio_in"],
                                 batch["audio_lengths"])
    hidden = lm.run(x)                                                               # (B, T, C)
    for fill in (0, 777):
        total, count = 0.0, 0
        for b in range(2):
            for t in range(x.size(1)):
                j = t - int(audio_start[b])                                           # audio column index
                is_audio = 0 <= j < int(batch["audio_lengths"][b])
                for k in range(2):
                    target = int(batch["audio_targets"][b, k, j]) if is_audio else fill
                    if is_audio and target != -100:
                        total += F.cross_entropy(lm.heads[k](hidden[b, t]), torch.tensor(target)).item()
                        count += 1
        assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_kv_cache_generation_equals_full_forward_greedy():
    lm = tiny_speechlm(seed=1)
    text, desc = torch.tensor([5, 6, 7, 8]), torch.tensor([1, 2])
    codes = lm.generate(text, desc, max_seconds=0.2, temperature=0.0)           # 15 frames at most
    assert codes.shape == (2, 15), "this seed should not stop early; the check below assumes it"
    delayed = apply_delay(codes)                                                 # what generate produced
    inputs = torch.cat([torch.full((2, 1), BOS), delayed[:, :-1]], dim=1)[None]   # teacher forcing
    voice = lm.voice_vector(desc[None], torch.tensor([2]), torch.tensor([False]))
    x, start = lm.sequence(voice, text[None], torch.tensor([4]), inputs, torch.tensor([inputs.size(2)]))
    hidden = lm.run(x)[0, int(start):]                                            # (steps, C) no cache
    for step in range(delayed.size(1)):
        for k in range(2):
            if step < k or step >= 15 + k:                      # delay corners (and codebook 0's END): forced
                assert delayed[k, step] == PAD
                continue
            logits = lm.heads[k](hidden[step])
            logits[1024:] = float("-inf")
            if k == 0:
                logits[END] = lm.heads[k](hidden[step])[END]                       # codebook 0 may stop
            assert int(logits.argmax()) == int(delayed[k, step]), f"step {step}, codebook {k}"


# -----------------------------------------------------------------------------
# stage 1

def test_tiny_stage1_loss_falls(tmp_path):
    corpus = make_coded_corpus(tmp_path)
    cfg = config.get_config("tiny", [f"--data.corpus={corpus}", "--train.eval_samples=4",
                                     "--speechlm.max_seconds=0.5"])
    stage = speechlm.build_speechlm_stage(cfg, torch.device("cpu"), log=lambda *a: None)
    params = [p for p in stage.model.parameters() if p.requires_grad]
    assert len(params) == len(list(stage.model.parameters()))                   # stage 1 trains everything
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for i in range(12):
        loss = stage.model(**stage.batch(i))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < sum(losses[:3]) - 1.0, losses
    assert torch.equal(stage.batch(3)["audio_in"], stage.batch(3)["audio_in"])   # pure in i
    metrics = stage.evaluate()
    assert metrics["code_loss"] < metrics["unigram_loss"] + 2 and 0 <= metrics["voice_top1"] <= 1


def test_stage1_precision_bf16_autocasts_and_int8_stays_fp32(tmp_path):
    """bf16: the same weights give nearly the same loss, computed through bf16 matmuls (so not exactly the
    fp32 loss), while weights and gradients stay fp32 master copies; int8 has no frozen weights to
    quantize in stage 1, so it is exactly the fp32 run."""
    corpus = make_coded_corpus(tmp_path)
    losses = {}
    for precision in ("fp32", "bf16", "int8"):
        cfg = config.get_config("tiny", [f"--data.corpus={corpus}", "--speechlm.max_seconds=0.5",
                                         f"--system.precision={precision}"])
        torch.manual_seed(0)                                                     # the same initial weights
        stage = speechlm.build_speechlm_stage(cfg, torch.device("cpu"), log=lambda *a: None)
        loss = stage.model(**stage.batch(0))
        loss.backward()
        losses[precision] = loss.item()
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
                   for p in stage.model.parameters() if p.grad is not None)
    assert losses["int8"] == losses["fp32"]
    assert losses["bf16"] != losses["fp32"] and losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)


def test_voice_only_trains_the_voice_encoder_alone_on_mel_or_codes(tmp_path):
    """--speechlm.voice_only: the batch is the VoiceEncoder's alone and only voice.* parameters train;
    --speechlm.voice_audio=mel: its audio tower hears the log-mel stored beside the manifest instead."""
    corpus = make_coded_corpus(tmp_path)
    for audio in ("codes", "mel"):
        if audio == "mel":                           # a log-mel cache, as if encode_manifest_mels had run
            for npy in (corpus / "codes-1.5kbps" / "wav").glob("*.npy"):
                frames = 4 * np.load(npy).shape[1] // 3                          # 100 mel frames per 75 codes
                mel = torch.randn(80, frames, generator=torch.Generator().manual_seed(1))
                (corpus / "mel-80" / "wav").mkdir(parents=True, exist_ok=True)
                np.save(corpus / "mel-80" / "wav" / npy.name, mel.numpy().astype(np.float16))
        cfg = config.get_config("tiny", [f"--data.corpus={corpus}", "--speechlm.max_seconds=0.5",
                                         "--speechlm.voice_only=True", f"--speechlm.voice_audio={audio}"])
        stage = speechlm.build_speechlm_stage(cfg, torch.device("cpu"), log=lambda *a: None)
        trainable = {n for n, p in stage.model.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith("speechlm.voice.") for n in trainable)
        batch = stage.batch(0)
        assert set(batch) == {"voice_audio", "voice_audio_lengths", "voice_desc_ids", "voice_desc_lengths",
                              "voice_same"}
        assert batch["voice_audio"].shape[1] == (2 if audio == "codes" else 80)   # K codebooks or 80 mel bins
        voice = stage.model.speechlm.voice
        expected = voice.loss(**{k.removeprefix("voice_"): v for k, v in batch.items()})
        assert stage.model(**batch).item() == pytest.approx(expected.item(), abs=1e-6)   # InfoNCE alone
        assert set(stage.evaluate()) == {"voice_top1"}


# -----------------------------------------------------------------------------
# the hearing loss: audio-only states predict Whisper's encoder frames

def test_hearing_loss_matches_a_column_by_column_reference():
    """Each clip alone, one column at a time: column j has heard codec frames < j; with lag L it predicts
    the Whisper frame (50/s) under the centre of codec frame j - 1 - L (75/s), layer-normed. Columns whose
    frame is before the clip, past the Whisper frames, or in the padding count for nothing."""
    torch.manual_seed(0)
    D, lag = 6, 2
    lm = SpeechLM(config.get_config("tiny").speechlm, text_vocab=320, n_codebooks=2, whisper_dim=D).eval()
    examples = [{"text_ids": torch.tensor([5]), "desc_ids": torch.tensor([1]), "description": "x",
                 "codes": torch.randint(0, 1024, (2, frames)), "whisper": torch.randn(w_frames, D)}
                for frames, w_frames in ((9, 6), (5, 3))]             # 5 codec frames -> 3.3 Whisper frames
    batch = speechlm.speech_batch(examples)                           # the second row is padded
    loss = lm.whisper_loss(batch["audio_in"], batch["audio_lengths"], batch["whisper_features"],
                           batch["whisper_lengths"], layer=1, lag=lag)
    total, count = 0.0, 0
    for e in examples:
        alone = speechlm.speech_batch([e])
        states = lm.audio_only(alone["audio_in"], 1)[0]                             # (frames + K, C)
        for j in range(states.size(0)):
            frame = j - 1 - lag
            w = int((frame + 0.5) / 75 * 50 + 1e-9)                                   # the frame's centre
            if frame < 0 or w >= e["whisper"].size(0):
                continue
            target = e["whisper"][w]
            target = (target - target.mean()) / (target.var(unbiased=False) + 1e-5).sqrt()
            total += (lm.whisper_head(states[j]) - target).pow(2).mean().item()
            count += 1
    assert count == 8 + 4               # by hand: codec frames 0..7 of the first clip, 0..3 of the second
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_stage1_hearing_loss_reads_the_encoder_cache_and_learns(tmp_path):
    """--speechlm.whisper_weight: the batch brings the cached Whisper frames of its clips, the loss adds
    whisper_weight x the hearing loss, and targets that follow the words are learned (held-out loss < 1,
    the score of predicting zeros)."""
    corpus = make_coded_corpus(tmp_path)
    words = ["red", "blue", "green", "cat", "dog", "bird"]
    table = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))        # one vector per word
    encoder = weights.resolve_checkpoint("tiny:whisper")                           # d_model 64
    cache = {}
    for split in ("train", "test"):
        for row in data.read_manifest(corpus / f"{split}.jsonl"):
            first, second = (words.index(w) for w in row["text"].split())
            frames = (2 * np.load(corpus / "codes-1.5kbps" / "wav" / (row["audio"].split("/")[-1][:-4] + ".npy"))
                      .shape[1] + 2) // 3
            cache[row["audio"]] = torch.stack([table[first if t < frames / 2 else second]
                                               for t in range(frames)]).half()
    (corpus / "cache").mkdir()
    save_file(cache, str(corpus / "cache" / f"{encoder.name}-native.safetensors"))
    cfg = config.get_config("tiny", [f"--data.corpus={corpus}", "--train.eval_samples=4",
                                     "--speechlm.max_seconds=0.5", "--speechlm.whisper_weight=2",
                                     "--speechlm.whisper_lag=0"])
    stage = speechlm.build_speechlm_stage(cfg, torch.device("cpu"), log=lambda *a: None)
    batch = stage.batch(0)
    assert batch["whisper_features"].shape[0] == 4 and batch["whisper_features"].shape[2] == 64
    lm = stage.model.speechlm
    speech = {k: v for k, v in batch.items() if not k.startswith(("voice_", "whisper_"))}
    voice = {k.removeprefix("voice_"): v for k, v in batch.items() if k.startswith("voice_")}
    torch.manual_seed(0)
    parts = (lm(**speech) + cfg.speechlm.voice_weight * lm.voice.loss(**voice)
             + 2 * stage.model.hearing_loss(batch))
    assert stage.model(**batch).item() == pytest.approx(parts.item(), rel=1e-5)
    before = stage.evaluate()["whisper_loss"]
    optimizer = torch.optim.AdamW(stage.model.parameters(), lr=3e-3)
    for i in range(30):
        loss = stage.model(**stage.batch(i))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = stage.evaluate()["whisper_loss"]
    assert before == pytest.approx(1.0, abs=0.05) and after < 0.8 * before, (before, after)


def test_whisper_features_in_bf16_are_fp32_to_within_rounding(tmp_path, monkeypatch):
    """--system.precision=bf16 computes the hearing loss's targets under bf16 autocast (several times faster
    on a CPU with AMX): the same clips and frame counts as fp32, values within bf16 rounding of fp32's."""
    monkeypatch.chdir(tmp_path)                                     # tiny:whisper is written to ./checkpoints
    corpus = tmp_path / "corpus"
    for split in ("train", "test"):
        rows = []
        for i in range(3):
            seconds = 0.4 + 0.2 * i
            t = torch.arange(int(16000 * seconds)) / 16000
            path = corpus / split / f"{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            tone = 0.3 * torch.sin(2 * torch.pi * (150 + 90 * i) * t)
            data.save_wav(path, tone + 0.01 * torch.randn(t.numel()))
            rows.append({"audio": f"{split}/{i}.wav", "text": "red cat", "task": "transcribe",
                         "seconds": seconds})
        data.write_manifest(corpus / f"{split}.jsonl", rows)
    frames = {}
    for precision in ("fp32", "bf16"):
        cfg = config.get_config("tiny", [f"--data.corpus={corpus}", f"--system.precision={precision}"])
        frames[precision] = speechlm.whisper_features(cfg, log=lambda *a: None)
        shutil.rmtree(corpus / "cache")                             # the second precision computes afresh
    assert sorted(frames["bf16"]) == sorted(frames["fp32"]) and len(frames["fp32"]) == 6
    for path, reference in frames["fp32"].items():
        got, reference = frames["bf16"][path].float(), reference.float()
        assert got.shape == reference.shape
        assert 0 < ((got - reference).norm() / reference.norm()).item() < 0.03   # autocast on, and close
