"""
Tests for data.py: how a file on disk becomes samples, and what the models are fed.

The lesson: a WAV file is a 12-byte RIFF header, a 'fmt ' chunk that says how to read the numbers, and a
'data' chunk of raw integers or floats. We write such files byte by byte with `struct`, so we know every
sample, and check that load_audio returns exactly stored value / full scale (e.g. 16-bit 16384 -> 0.5);
Python's own `wave` module is the reference reader for integer PCM. Every way a file can be broken must end
in an AudioError that names the file, and a property test (hypothesis) throws random and mutated bytes at
the loader to make sure nothing else ever escapes (the synthetic corpus has its own file, test_corpus.py).
Last, the IRA inputs: an untrained EnCodec still tokenizes (k-means codebooks: different sounds, different
codes) and refuses to mix codes of other weights; the cached log-mel equals Whisper's front end.

Run:  python -m pytest tests/test_data.py -q      (CPU, a few seconds)
"""

import itertools
import json
import math
import os
import random
import shutil
import struct
import wave

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import data

# ----------------------------------------------------------------------------------------------------------
# Writing WAV files by hand

# KSDATAFORMAT_SUBTYPE_PCM and _IEEE_FLOAT as bytes: 0000000X-0000-0010-8000-00aa00389b71, little-endian.
GUID_PCM = bytes.fromhex("0100000000001000800000aa00389b71")
GUID_FLOAT = bytes.fromhex("0300000000001000800000aa00389b71")


def chunk(chunk_id, body, size=None):
    """One RIFF chunk: id, little-endian size, body, and a pad byte when the body has odd length."""
    size = len(body) if size is None else size
    return chunk_id + struct.pack("<I", size) + body + (b"\0" if len(body) % 2 else b"")


def wav_bytes(payload, *, tag=1, channels=1, rate=16000, bits=16, guid=None, before=b"", after=b"",
              data_size=None):
    """A complete WAV file: 'fmt ' (plain, or extensible when `guid` is given), extra chunks, 'data'."""
    block_align = channels * bits // 8
    byte_rate = rate * block_align
    fmt = struct.pack("<HHIIHH", 0xFFFE if guid else tag, channels, rate, byte_rate, block_align, bits)
    if guid:  # cbSize = 22, valid bits, channel mask (0 = unspecified), subformat GUID
        fmt += struct.pack("<HHI", 22, bits, 0) + guid
    body = b"WAVE" + before + chunk(b"fmt ", fmt) + after + chunk(b"data", payload, data_size)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def write(path, blob):
    path.write_bytes(blob)
    return path


def int24(*values):
    """struct has no 3-byte integer: little-endian two's complement by hand."""
    return b"".join(v.to_bytes(3, "little", signed=True) for v in values)


# Every supported encoding, five samples each: (format tag, bits, bytes on disk, the values we must get).
ENCODINGS = {
    "u8": (1, 8, bytes([0, 64, 128, 192, 255]), [-1, -0.5, 0, 0.5, 127 / 128]),
    "s16": (1, 16, struct.pack("<5h", -32768, -16384, 0, 16384, 32767), [-1, -0.5, 0, 0.5, 32767 / 32768]),
    "s24": (1, 24, int24(-2**23, -2**22, 0, 2**22, 2**23 - 1), [-1, -0.5, 0, 0.5, (2**23 - 1) / 2**23]),
    "s32": (1, 32, struct.pack("<5i", -2**31, -2**30, 0, 2**30, 2**31 - 1), [-1, -0.5, 0, 0.5, 1 - 2**-31]),
    "f32": (3, 32, struct.pack("<5f", -1, -0.25, 0, 0.75, 1), [-1, -0.25, 0, 0.75, 1]),
    "f64": (3, 64, struct.pack("<5d", -1, -0.25, 0, 0.125, 2.5), [-1, -0.25, 0, 0.125, 1]),  # 2.5 clips to 1
}


# ----------------------------------------------------------------------------------------------------------
# 1. Decoding: hand-computed values, and Python's wave module as the reference for integer PCM

@pytest.mark.parametrize("name", ENCODINGS)
@pytest.mark.parametrize("extensible", [False, True])
def test_every_encoding_decodes_to_hand_computed_values(tmp_path, name, extensible):
    tag, bits, payload, expected = ENCODINGS[name]
    guid = (GUID_PCM if tag == 1 else GUID_FLOAT) if extensible else None
    path = write(tmp_path / f"{name}.wav", wav_bytes(payload, tag=tag, bits=bits, guid=guid))
    audio = data.load_audio(path)  # 16 kHz in, 16 kHz out: no resampling, so the values are exact
    assert audio.dtype == torch.float32
    assert torch.equal(audio, torch.tensor(expected, dtype=torch.float64).float())


@pytest.mark.parametrize("bits", [8, 16, 24, 32])
def test_integer_pcm_matches_the_wave_module(tmp_path, bits):
    width = bits // 8
    rng = random.Random(bits)
    low, high = -2**(bits - 1), 2**(bits - 1)
    frames = [[rng.randrange(low, high) for _ in range(3)] for _ in range(50)]  # 50 frames of 3 channels
    # 8-bit WAV is unsigned (stored = value + 128); wider ones are signed little-endian
    if bits == 8:
        payload = bytes(v + 128 for frame in frames for v in frame)
    else:
        payload = b"".join(v.to_bytes(width, "little", signed=True) for frame in frames for v in frame)
    path = write(tmp_path / "ref.wav", wav_bytes(payload, channels=3, bits=bits))
    with wave.open(str(path)) as reference:  # the standard library's reader: params and raw frames
        assert (reference.getnchannels(), reference.getsampwidth(), reference.getnframes()) == (3, width, 50)
        raw = reference.readframes(50)
    samples = [int.from_bytes(raw[i:i + width], "little", signed=bits > 8) - (128 if bits == 8 else 0)
               for i in range(0, len(raw), width)]
    expected = [sum(samples[i:i + 3]) / 3 / 2**(bits - 1) for i in range(0, len(samples), 3)]  # mono = mean
    expected = torch.tensor(expected, dtype=torch.float32)
    assert torch.allclose(data.load_audio(path), expected, atol=1e-9, rtol=1e-6)  # equal up to float rounding


def test_file_written_by_the_wave_module_loads_and_saves_back_identically(tmp_path):
    values = [-32768, -1, 0, 1, 12345, 32767]
    with wave.open(str(tmp_path / "in.wav"), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes(struct.pack("<6h", *values))
    audio = data.load_audio(tmp_path / "in.wav")
    assert audio.tolist() == [v / 32768 for v in values]
    data.save_wav(tmp_path / "out.wav", audio)  # the same scale both ways: a lossless round trip
    assert (tmp_path / "out.wav").read_bytes() == (tmp_path / "in.wav").read_bytes()


def test_channels_are_averaged(tmp_path):
    # stereo frames (16384, 0), (8192, 8192) -> mono 8192, 8192 -> 0.25, 0.25
    stereo = write(tmp_path / "stereo.wav", wav_bytes(struct.pack("<4h", 16384, 0, 8192, 8192), channels=2))
    assert data.load_audio(stereo).tolist() == [0.25, 0.25]
    # six channels 0, 1000, ..., 5000 average to 2500; a second frame of -6000 everywhere stays -6000
    six = struct.pack("<12h", *range(0, 6000, 1000), *[-6000] * 6)
    assert data.load_audio(write(tmp_path / "six.wav", wav_bytes(six, channels=6))).tolist() == \
        [2500 / 32768, -6000 / 32768]


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000, 96000])
def test_resampling_keeps_a_sine_a_sine(tmp_path, rate):
    n = rate // 10 + 7  # ~0.1 s, an odd length so the rounding of the output length matters
    sine = [0.5 * math.sin(2 * math.pi * 440 * i / rate) for i in range(n)]
    path = write(tmp_path / "sine.wav", wav_bytes(struct.pack(f"<{n}f", *sine), tag=3, bits=32, rate=rate))
    audio = data.load_audio(path)
    assert len(audio) == math.ceil(n * 16000 / rate)
    # the same 440 Hz sine evaluated at 16 kHz; the edges see the filter's zero padding, so skip them
    t = torch.arange(len(audio), dtype=torch.float64) / 16000
    expected = 0.5 * torch.sin(2 * math.pi * 440 * t)
    assert (audio[100:-100] - expected[100:-100]).abs().max() < 5e-3
    unresampled = data.load_audio(path, sr=rate)
    assert torch.equal(unresampled, torch.tensor(sine, dtype=torch.float32))


@pytest.mark.parametrize("rate", [1001, 15969, 44101, 383999])
def test_odd_sample_rates_are_approximated_not_refused(tmp_path, rate):
    # 44101 Hz shares no factor with 16000: an exact sinc kernel would be 16000 x 44101 taps (2.8 GB)
    n = rate // 10
    path = write(tmp_path / "odd.wav", wav_bytes(bytes(2 * n), rate=rate))
    assert abs(len(data.load_audio(path)) / (n * 16000 / rate) - 1) < 0.002  # the length is off by < 0.2%


def test_chunks_are_walked_with_padding(tmp_path):
    odd = chunk(b"LIST", b"INFOx")  # 5 bytes + 1 pad byte: a reader that forgets the pad gets lost
    payload = bytes([0, 128, 255])  # three 8-bit samples: an odd data chunk, padded too
    blob = wav_bytes(payload, bits=8, before=odd, after=chunk(b"fact", b"abc"))
    blob += chunk(b"LIST", b"trailing")  # metadata after the audio is ignored
    assert data.load_audio(write(tmp_path / "pad.wav", blob)).tolist() == [-1, 0, 127 / 128]


@pytest.mark.parametrize("placeholder", [0x7FFFF000, 0xFFFFFFFF])
def test_streaming_placeholder_size_reads_to_the_end(tmp_path, placeholder):
    # espeak-ng --stdout and other pipe writers cannot seek back, so they leave a huge size in the header
    payload = struct.pack("<3h", 0, 16384, -16384)
    path = write(tmp_path / "pipe.wav", wav_bytes(payload, data_size=placeholder))
    assert data.load_audio(path).tolist() == [0, 0.5, -0.5]


def test_a_trailing_partial_frame_is_dropped(tmp_path):
    payload = struct.pack("<5h", 16384, 16384, 0, 0, 999)  # stereo: two whole frames and half of a third
    assert data.load_audio(write(tmp_path / "p.wav", wav_bytes(payload, channels=2))).tolist() == [0.5, 0]


def test_save_wav_clips_and_writes_16_bit_mono(tmp_path):
    path = tmp_path / "sub" / "clip.wav"
    data.save_wav(path, torch.tensor([2.0, -3.0, 0.5, -0.5]), sr=22050)
    with wave.open(str(path)) as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate()) == (1, 2, 22050)
        assert struct.unpack("<4h", f.readframes(4)) == (32767, -32768, 16384, -16384)
    with pytest.raises(ValueError, match="mono"):
        data.save_wav(path, torch.zeros(2, 10))


# ----------------------------------------------------------------------------------------------------------
# 2. Broken files: an AudioError that names the file and the problem, never a traceback from numpy

BROKEN = {  # name -> (file contents, load_audio kwargs, words the message must contain)
    "empty": (b"", {}, ["empty"]),
    "text": (b"hello, I am not audio at all", {}, ["not a RIFF/WAVE"]),
    "avi": (b"RIFF\x10\0\0\0AVI " + bytes(12), {}, ["not WAVE"]),
    "short_header": (b"RIFF\x10\0", {}, ["truncated header", "12 bytes", "found 6"]),
    "cut_fmt": (b"RIFF\x20\0\0\0WAVEfmt \x10\0\0\0" + bytes(6), {},
                ["truncated header", "16 bytes", "holds 6"]),
    "no_data": (b"RIFF\x1c\0\0\0WAVE" + chunk(b"fmt ", struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)), {},
                ["no 'data' chunk"]),
    "cut_data": (wav_bytes(bytes(40), data_size=100), {}, ["truncated data chunk", "100 bytes", "holds 40"]),
    "zero_length": (wav_bytes(b""), {}, ["zero-length"]),
    "12_bit": (wav_bytes(bytes(8), bits=12), {}, ["12-bit"]),
    "a_law": (wav_bytes(bytes(8), tag=6, bits=8), {}, ["A-law", "0x0006"]),
    "mu_law": (wav_bytes(bytes(8), tag=7, bits=8), {}, ["mu-law"]),
    "adpcm": (wav_bytes(bytes(8), tag=2, bits=4), {}, ["ADPCM"]),
    "odd_guid": (wav_bytes(bytes(8), guid=bytes(16)), {}, ["subformat"]),
    "nan": (wav_bytes(struct.pack("<2f", 0, math.nan), tag=3, bits=32), {}, ["NaN"]),
    "inf": (wav_bytes(struct.pack("<2d", math.inf, 0), tag=3, bits=64), {}, ["infinite"]),
    "rate_0": (wav_bytes(bytes(8), rate=0), {}, ["sample rate 0 Hz"]),
    "rate_500": (wav_bytes(bytes(8), rate=500), {}, ["sample rate 500 Hz"]),
    "rate_500k": (wav_bytes(bytes(8), rate=500000), {}, ["sample rate 500000 Hz"]),
    "no_channels": (wav_bytes(bytes(8), channels=0), {}, ["0 channels"]),
    "too_long": (wav_bytes(bytes(32000)), {"max_seconds": 0.5}, ["1.0 s long", "max_seconds=0.5"]),
    "big_endian": (b"RIFX" + bytes(40), {}, ["big-endian", "ffmpeg"]),
    "flac_inside": (b"fLaC" + bytes(60), {}, ["FLAC", "ffmpeg -i"]),
}


@pytest.mark.parametrize("name", BROKEN)
def test_broken_files_raise_audio_error_naming_the_file(tmp_path, name):
    blob, kwargs, words = BROKEN[name]
    path = write(tmp_path / f"{name}.wav", blob)
    with pytest.raises(data.AudioError) as caught:
        data.load_audio(path, **kwargs)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    for word in words:
        assert word in message


def test_missing_file_directory_and_compressed_formats(tmp_path):
    with pytest.raises(data.AudioError, match="no such audio file"):
        data.load_audio(tmp_path / "nowhere.wav")
    (tmp_path / "folder.wav").mkdir()
    with pytest.raises(data.AudioError, match="is a directory"):
        data.load_audio(tmp_path / "folder.wav")
    # an MP3 by extension, whatever its bytes: decoded by torchaudio if it can, else a one-line hint
    with pytest.raises(data.AudioError, match="convert it to 16 kHz mono WAV"):
        data.load_audio(write(tmp_path / "song.mp3", b"not really an mp3"))


def test_max_seconds_allows_what_fits(tmp_path):
    assert len(data.load_audio(write(tmp_path / "one.wav", wav_bytes(bytes(32000))), max_seconds=1)) == 16000


# A property test: whatever the bytes, load_audio returns finite audio in [-1, 1] or raises AudioError.
@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder and a counter: each example gets a new file (rewriting one file is slow on some disks)."""
    return tmp_path_factory.mktemp("fuzz"), itertools.count()


def loads_or_raises_audio_error(scratch, blob):
    folder, counter = scratch
    path = folder / f"{next(counter)}.wav"
    path.write_bytes(blob)
    try:
        audio = data.load_audio(path)
    except data.AudioError as err:
        assert str(path) in str(err)
        return
    assert audio.dtype == torch.float32 and audio.dim() == 1 and len(audio) > 0
    assert torch.isfinite(audio).all() and audio.abs().max() <= 1


riff_wrapped = st.binary(max_size=300).map(lambda b: b"RIFF" + struct.pack("<I", len(b) + 4) + b"WAVE" + b)


@settings(max_examples=500, deadline=None)
@given(blob=st.one_of(st.binary(max_size=300), riff_wrapped))
def test_random_bytes_load_or_raise_audio_error(scratch, blob):
    loads_or_raises_audio_error(scratch, blob)


VALID_FILES = [wav_bytes(struct.pack("<8h", *range(-4, 4))),
               wav_bytes(ENCODINGS["s24"][2] * 2, channels=2, bits=24),
               wav_bytes(ENCODINGS["f32"][2], bits=32, guid=GUID_FLOAT),
               wav_bytes(bytes(range(0, 250, 10)), bits=8, rate=8000, before=chunk(b"LIST", b"odd"))]


@settings(max_examples=500, deadline=None)
@given(which=st.sampled_from(range(len(VALID_FILES))), edits=st.binary(max_size=12),
       cut=st.none() | st.integers(0, 200))
def test_mutated_wavs_load_or_raise_audio_error(scratch, which, edits, cut):
    blob = bytearray(VALID_FILES[which])
    for position, value in zip(edits[0::2], edits[1::2]):  # up to 6 (position, new byte) pairs
        blob[position % len(blob)] = value  # positions wrap around; over half of each file is header
    loads_or_raises_audio_error(scratch, bytes(blob[:cut] if cut is not None else blob))


# ----------------------------------------------------------------------------------------------------------
# 3. Manifests and converters

def test_manifest_round_trip_with_relative_paths(tmp_path):
    rows = [{"audio": str(tmp_path / "clips" / "a.wav"), "text": "hello there", "task": "transcribe",
             "prompt": "Transcribe the audio.", "response": "hello there", "voice": {"speaker": "x"},
             "lang": "en"},
            {"audio": str(tmp_path / "b.wav"), "text": "what is two plus two", "task": "instruct",
             "prompt": "Answer the spoken question.", "response": "four", "voice": {}, "lang": "en"}]
    manifest = tmp_path / "lists" / "m.jsonl"
    data.write_manifest(manifest, rows)
    stored = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [row["audio"] for row in stored] == ["../clips/a.wav", "../b.wav"]  # relative to the manifest
    assert data.read_manifest(manifest) == rows


def test_read_manifest_fills_defaults_and_resolves_paths(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "x.wav", "text": "hi"}\n\n{"audio": "/abs/y.wav", "task": "continue", '
                        '"text": "turn on", "response": "the lights"}\n')
    first, second = data.read_manifest(manifest)
    assert first == {"audio": str(tmp_path / "x.wav"), "text": "hi", "task": "transcribe",
                     "prompt": data.TASK_PROMPTS["transcribe"], "response": "hi"}
    assert second["audio"] == "/abs/y.wav" and second["response"] == "the lights"


@pytest.mark.parametrize("lines, words", [
    ('{"audio": "a.wav", "text": "ok"}\n{"audio": "b.wav", "text": }\n', ["m.jsonl:2:", "bad JSON"]),
    ('{"text": "no audio"}\n', ["m.jsonl:1:", "missing key(s) audio"]),
    ('{"audio": "a.wav", "task": "instruct", "text": "q"}\n', ["m.jsonl:1:", "missing key(s) response"]),
    ('{"audio": "a.wav", "text": "x", "task": "translate"}\n', ["m.jsonl:1:", "unknown task 'translate'"]),
    ('["a.wav", "text"]\n', ["m.jsonl:1:", "JSON object"]),
])
def test_bad_manifest_lines_are_named(tmp_path, lines, words):
    (tmp_path / "m.jsonl").write_text(lines)
    with pytest.raises(ValueError) as caught:
        data.read_manifest(tmp_path / "m.jsonl")
    assert all(word in str(caught.value) for word in words)


def test_librispeech_converter(tmp_path):
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123"
    chapter.mkdir(parents=True)
    (chapter / "84-121123.trans.txt").write_text("84-121123-0000 GO DO YOU HEAR\n"
                                                 "84-121123-0001 BUT IN LESS\n")
    for name in ("84-121123-0000", "84-121123-0001"):
        (chapter / f"{name}.flac").write_bytes(b"fLaC")
    rows = data.librispeech_to_manifest(tmp_path / "LibriSpeech", tmp_path / "ls.jsonl")
    read = data.read_manifest(tmp_path / "ls.jsonl")
    assert [r["text"] for r in read] == ["go do you hear", "but in less"]
    assert read[1]["audio"] == str(chapter / "84-121123-0001.flac") == rows[1]["audio"]
    assert read[0]["voice"] == {"speaker": "84"} and read[0]["task"] == "transcribe"
    (chapter / "84-121123-0001.flac").unlink()
    with pytest.raises(ValueError, match="1 of 2 audio files are missing"):
        data.librispeech_to_manifest(tmp_path / "LibriSpeech", tmp_path / "ls.jsonl")


def test_ljspeech_converter(tmp_path):
    (tmp_path / "wavs").mkdir()
    (tmp_path / "metadata.csv").write_text('LJ001-0001|He said "no.|He said "no.\n'
                                           "LJ001-0002|It cost $5.|It cost five dollars.\n")
    for name in ("LJ001-0001", "LJ001-0002"):
        (tmp_path / "wavs" / f"{name}.wav").write_bytes(b"")
    data.ljspeech_to_manifest(tmp_path, tmp_path / "lj.jsonl")
    read = data.read_manifest(tmp_path / "lj.jsonl")
    assert [r["text"] for r in read] == ['He said "no.', "It cost five dollars."]  # the normalized column
    assert read[1]["audio"] == str(tmp_path / "wavs" / "LJ001-0002.wav")


def test_commonvoice_converter(tmp_path):
    (tmp_path / "clips").mkdir()
    table = [["client_id", "path", "sentence", "up_votes", "down_votes", "age", "gender", "accents", "locale",
              "segment"],
             ["abc", "cv_1.mp3", 'She said "hi" twice.', "2", "0", "twenties", "female", "", "fr", ""],
             ["def", "cv_2.mp3", "Bonjour.", "2", "0", "", "", "", "fr", ""]]  # empty labels are common
    (tmp_path / "dev.tsv").write_text("".join("\t".join(row) + "\n" for row in table))
    for name in ("cv_1.mp3", "cv_2.mp3"):
        (tmp_path / "clips" / name).write_bytes(b"ID3")
    data.commonvoice_to_manifest(tmp_path, tmp_path / "cv.jsonl", split="dev")
    first, second = data.read_manifest(tmp_path / "cv.jsonl")
    assert first["text"] == 'She said "hi" twice.' and first["lang"] == "fr"
    assert first["voice"] == {"speaker": "abc", "gender": "female", "age": "twenties"}
    assert second["audio"] == str(tmp_path / "clips" / "cv_2.mp3")
    with pytest.raises(ValueError, match="no train.tsv"):
        data.commonvoice_to_manifest(tmp_path, tmp_path / "cv.jsonl")


def test_convert_cli_user_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        data.main(["convert", "ljspeech", str(tmp_path / "nowhere"), str(tmp_path / "lj.jsonl")])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------------------
# 4. IRA inputs made once per manifest: EnCodec codes (codec.json says whose) and log-mel frames

def test_kmeans_finds_two_obvious_clusters():
    generator = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(50, 2, generator=generator) * 0.1 + torch.tensor([5.0, 0.0]),
                        torch.randn(50, 2, generator=generator) * 0.1 + torch.tensor([-5.0, 0.0])])
    centres = data.kmeans(points, 2, iters=5, generator=generator)
    by_x = centres[centres[:, 0].argsort()]
    # the exact answer: each centre is the mean of its own 50 points
    assert torch.allclose(by_x, torch.stack([points[50:].mean(0), points[:50].mean(0)]), atol=1e-6)


def test_untrained_codec_tokenizes_and_refuses_to_mix(tmp_path):
    t = torch.arange(int(0.3 * 16000)) / 16000
    for i, f in enumerate((220.0, 880.0)):                                       # two tones, 0.3 s each
        data.save_wav(tmp_path / f"{i}.wav", 0.5 * torch.sin(2 * math.pi * f * t) * (t < 0.15 + 0.1 * i), 16000)
    rows = [json.dumps({"audio": f"{i}.wav", "text": "x"}) + "\n" for i in (0, 1)]
    (tmp_path / "m.jsonl").write_text("".join(rows))
    codes_dir = data.encode_manifest_codes(tmp_path / "m.jsonl", 1.5, "", log=lambda *a: None)
    codes, info = data.read_codes(tmp_path / "m.jsonl", [str(tmp_path / f"{i}.wav") for i in (0, 1)], 1.5)
    assert codes[0].shape == (2, 23)                                       # 0.3 s * 75 frames/s, rounded up
    assert len(torch.cat(codes, 1)[0].unique()) > 3, "k-means codebooks: different sounds, different codes"
    assert info["codec"] == "encodec_24khz-untrained" and not list(codes_dir.rglob("*.tmp"))
    # one more clip with the same codec: encoded, and codec.json left alone (runs started beside this one
    # read it; rewriting it in place once let one of them read an empty file)
    for name in ("codec.json", "codebooks.safetensors"):
        os.utime(codes_dir / name, ns=(10**18, 10**18))                  # a stamp no write could leave
    data.save_wav(tmp_path / "2.wav", 0.1 * torch.randn(4000), 16000)
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write(json.dumps({"audio": "2.wav", "text": "x"}) + "\n")
    data.encode_manifest_codes(tmp_path / "m.jsonl", 1.5, "", log=lambda *a: None)
    assert (codes_dir / "2.npy").exists()
    stamps = [(codes_dir / n).stat().st_mtime_ns for n in ("codec.json", "codebooks.safetensors")]
    assert stamps == [10**18, 10**18]
    # pretend the folder was made by other weights, then ask for one more clip: refused, with the fix
    (codes_dir / "codec.json").write_text(json.dumps({**info, "fingerprint": "0123456789abcdef"}))
    data.save_wav(tmp_path / "3.wav", 0.1 * torch.randn(4000), 16000)
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write(json.dumps({"audio": "3.wav", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="delete"):
        data.encode_manifest_codes(tmp_path / "m.jsonl", 1.5, "", log=lambda *a: None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_codes_made_on_a_gpu_are_the_cpus(tmp_path):
    """The same clips and codebooks encoded on a GPU give the CPU's codes, but for rare near-ties. Every
    other codes test runs the same loop with device="cpu", the default."""
    device = "cuda"
    t = torch.arange(int(0.5 * 16000)) / 16000
    for i, f in enumerate((220.0, 660.0)):
        data.save_wav(tmp_path / f"{i}.wav", 0.4 * torch.sin(2 * math.pi * f * t * (1 + t)), 16000)
    rows = "".join(json.dumps({"audio": f"{i}.wav", "text": "x"}) + "\n" for i in (0, 1))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "m.jsonl").write_text(rows.replace('"audio": "', '"audio": "../'))
    codec = data.load_codec("", 1.5, log=lambda *a: None)                  # untrained: k-means on "a"
    data.encode_manifest_codes(tmp_path / "a" / "m.jsonl", 1.5, "", log=lambda *a: None, codec=codec)
    (tmp_path / "b" / "codes-1.5kbps").mkdir()                             # the same codebooks, not a refit
    shutil.copy(tmp_path / "a" / "codes-1.5kbps" / "codebooks.safetensors", tmp_path / "b" / "codes-1.5kbps")
    data.encode_manifest_codes(tmp_path / "b" / "m.jsonl", 1.5, "", log=lambda *a: None, codec=codec,
                               device=device)
    assert next(codec.model.parameters()).device.type == "cpu"           # handed back where it was
    paths = [str(tmp_path / f"{i}.wav") for i in (0, 1)]
    on_cpu = torch.cat(data.read_codes(tmp_path / "a" / "m.jsonl", paths, 1.5)[0], 1)
    on_device = torch.cat(data.read_codes(tmp_path / "b" / "m.jsonl", paths, 1.5)[0], 1)
    assert on_cpu.shape == on_device.shape == (2, 76)
    assert (on_cpu == on_device).float().mean() >= 0.95                   # near-ties may round differently


def test_log_mel_cache_is_the_front_end_made_once(tmp_path):
    for i, seconds in enumerate((0.5, 0.25)):
        data.save_wav(tmp_path / "wav" / f"{i}.wav", 0.3 * torch.randn(int(seconds * 16000)), 16000)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"audio": f"wav/{i}.wav", "text": "x"}) + "\n"
                                              for i in (0, 1)))
    said = []
    mel_dir = data.encode_manifest_mels(tmp_path / "m.jsonl", log=said.append)
    paths = [str(tmp_path / "wav" / f"{i}.wav") for i in (0, 1)]
    for path, mel, frames in zip(paths, data.read_mels(tmp_path / "m.jsonl", paths), (50, 25)):
        reference = data.log_mel_spectrogram(data.load_audio(path), 80)          # Whisper's front end, (80, T)
        assert mel.shape == reference.shape == (80, frames)                      # 100 frames per second
        assert (mel - reference).abs().max() < 2e-3                              # float16: 11-bit mantissa
    stamp = (mel_dir / "wav" / "0.npy").stat().st_mtime_ns
    data.encode_manifest_mels(tmp_path / "m.jsonl", log=said.append)             # second call: nothing to do
    assert len(said) == 1 and (mel_dir / "wav" / "0.npy").stat().st_mtime_ns == stamp


def test_two_processes_caching_one_clip_do_not_collide(tmp_path, monkeypatch):
    # Runs started side by side on one corpus cache the same clip's codes or log-mel: writer A (pid 111) is
    # overtaken mid-write by writer B (pid 222). With one shared temporary name, B would move it into
    # place first and A's own move would find nothing there (FileNotFoundError).
    path, pid, real_save = tmp_path / "cache" / "000001.npy", [111], np.save
    monkeypatch.setattr(os, "getpid", lambda: pid[0])

    def save_then_overtaken(f, array):
        real_save(f, array)
        if pid[0] == 111:
            pid[0] = 222
            data._save_npy(path, array + 1)                     # B: starts and finishes inside A's write
            pid[0] = 111
    monkeypatch.setattr(np, "save", save_then_overtaken)
    data._save_npy(path, np.arange(3))
    assert np.load(path).tolist() == [0, 1, 2] and [p.name for p in path.parent.iterdir()] == [path.name]
