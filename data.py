"""
data.py: everything the audio language model eats, from a file on disk to a (waveform, text) pair.

An audio LM learns from pairs: a waveform goes through the frozen Whisper encoder, a text target comes out of
the LLM. Before any of that can happen we need a few boring but treacherous things, and this file does them
in reading order:

  1. Audio I/O. A WAV file is a RIFF container: a 12-byte header ("RIFF", size, "WAVE") and then chunks, each
     a 4-byte id, a 4-byte little-endian size, the body, and one pad byte when the size is odd. The "fmt "
     chunk says how to read the "data" chunk: format tag (1 = integer PCM, 3 = IEEE float, 0xFFFE =
     "extensible", which hides the real tag in a GUID), channels, sample rate, bytes per frame, bits per
     sample. We parse it ourselves with `struct`, because Python's `wave` module reads integer PCM only and
     `torchaudio.load` needs torchcodec + FFmpeg (see FACTS.md). Everything comes out as one float32 channel
     in [-1, 1] at 16 kHz, the rate Whisper's log-mel front end expects.
  2. Manifests. One JSON object per line: {"audio", "text", "task", "prompt", "response", "voice", "lang"}.
     The model sees (audio, prompt) and learns to say `response`. Converters turn LibriSpeech, LJSpeech and
     Common Voice folders into this format.
  3. Batches for the audio LM: the frozen encoder's outputs cached once, length-sorted padded micro-batches.
  4. IRA inputs (speechlm.py, adapter.py): every clip of a manifest turned ONCE into EnCodec codes (K
     parallel code streams, 75 frames/s) and, for the VoiceEncoder, log-mel frames, stored as .npy beside
     the manifest so training never runs the codec. `codec.json` records which codec weights made the codes;
     codes from other weights are refused, never mixed. Without EnCodec's real weights the codec runs
     untrained (seeded, k-means codebooks), with one loud warning: its codes tokenize, its audio is noise.

The synthetic speech corpus that needs no download is made by corpus.py, into this file's manifests.

Run:
    python data.py convert librispeech ~/LibriSpeech/train-clean-100 librispeech.jsonl

References: the RIFF/WAVE layout (Microsoft & IBM, "Multimedia Programming Interface and Data
Specifications 1.0", 1991) and WAVEFORMATEXTENSIBLE (Microsoft docs); LibriSpeech (Panayotov et al., 2015);
LJSpeech (Ito & Johnson, 2017); Common Voice (Ardila et al., 2020); EnCodec (Defossez et al., "High Fidelity
Neural Audio Compression", 2022).

Simplified on purpose: files are read whole into memory (fine for speech clips, wrong for hour-long
recordings); only WAV is decoded here, anything else goes through torchaudio when it can, or asks you to
convert.
"""

import argparse
import contextlib
import csv
import functools
import hashlib
import json
import math
import os
import re
import struct
import sys
import warnings
import wave
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchaudio
from encodec import EncodecModel
from safetensors.torch import load_file, save as save_tensors
from tqdm import tqdm

from config import ConfigError
from model import log_mel_spectrogram

# ----------------------------------------------------------------------------------------------------------
# 1. Audio I/O

SAMPLE_RATE = 16000               # Hz; Whisper's log-mel front end is defined at 16 kHz
MIN_RATE, MAX_RATE = 1000, 384000  # Hz; a header outside this range is corrupt, not an exotic recording

WAVE_FORMAT_PCM, WAVE_FORMAT_IEEE_FLOAT, WAVE_FORMAT_EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
# Names for the format tags people actually meet, so the error can say what the file is.
FORMAT_NAMES = {0x0001: "PCM", 0x0002: "Microsoft ADPCM", 0x0003: "IEEE float", 0x0006: "A-law",
                0x0007: "mu-law", 0x0011: "IMA ADPCM", 0x0031: "GSM 6.10", 0x0050: "MPEG", 0x0055: "MP3"}
# An extensible file names its encoding with a GUID whose first 2 bytes are the old format tag and whose
# last 14 bytes are this fixed KSDATAFORMAT suffix (e.g. PCM is 00000001-0000-0010-8000-00aa00389b71).
GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")
# Writers that stream to a pipe cannot go back to fill in the data size, so they write a placeholder:
# espeak-ng --stdout writes 0x7FFFF000, others 0xFFFFFFFF. Sizes this big mean "until the end of the file".
UNKNOWN_SIZE = 0x7FFFF000
# Compressed formats by their first bytes; these can only be read through torchaudio (torchcodec + FFmpeg).
MAGIC = {b"fLaC": "FLAC", b"OggS": "Ogg", b"ID3": "MP3", b"FORM": "AIFF", b"caff": "CAF"}
COMPRESSED_SUFFIXES = {".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".aiff", ".aif", ".webm", ".wma"}


class AudioError(ValueError):
    """A file that cannot be read as audio. The message names the file, the problem and the fix."""


def load_audio(path, sr=SAMPLE_RATE, max_seconds=None):
    """Read an audio file as a float32 tensor of shape (samples,) in [-1, 1], mono, at `sr` Hz.

    WAV is decoded here: 8-bit unsigned, 16/24/32-bit signed PCM, 32/64-bit float, plain or extensible, any
    channel count (averaged to mono), any rate in [1 kHz, 384 kHz] (resampled). Other formats go through
    `torchaudio.load` when it works on this machine. Every failure is an AudioError naming the file.
    A data chunk shorter than its header declares is refused, not loaded in part: a cut clip paired with
    the transcript of the whole clip would teach the model to hallucinate the missing words.
    """
    if not MIN_RATE <= sr <= MAX_RATE:
        raise ValueError(f"load_audio: sr={sr} Hz is outside [{MIN_RATE}, {MAX_RATE}]")
    if not os.path.exists(path):
        raise AudioError(f"{path}: no such audio file")
    if os.path.isdir(path):
        raise AudioError(f"{path}: is a directory, not an audio file")
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise AudioError(f"{path}: cannot read the file ({err.strerror})") from None
    if not data:
        raise AudioError(f"{path}: file is empty (0 bytes)")

    # Dispatch on the first four bytes (the "magic"), not on the file name: a .wav may hold anything.
    if data[:4] in (b"RIFX", b"RF64"):  # big-endian and 64-bit RIFF: WAV, but not the kind we parse
        raise AudioError(f"{path}: {data[:4].decode()} (big-endian or 64-bit WAV) is not supported; "
                         f"{_convert_hint(path)}")
    if data[:4] != b"RIFF":
        kind = _sniff_compressed(data, path)
        if kind is None:
            raise AudioError(f"{path}: not a RIFF/WAVE file (it starts with {data[:4]!r})")
        audio, rate = _load_with_torchaudio(path, kind)
    else:
        audio, rate = _decode_wav(data, path, max_seconds)
    _check_length(path, len(audio), rate, max_seconds)
    # Resampling can overshoot a full-scale signal by a hair (the sinc filter rings), so clamp again.
    return _resample(audio, rate, sr).clamp(-1.0, 1.0)


def _decode_wav(data, path, max_seconds):
    """Parse the RIFF chunks of a WAV file held in `data`; return (mono float32 tensor, sample rate)."""
    fmt, start, size = _find_chunks(data, path)
    tag, channels, rate, _byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == WAVE_FORMAT_EXTENSIBLE:
        # Extensible layout after the 16 basic bytes: cbSize (2), valid bits (2), channel mask (4), GUID (16).
        if len(fmt) < 40:
            raise AudioError(f"{path}: truncated header: an extensible 'fmt ' chunk has 40 bytes, "
                             f"found {len(fmt)}")
        subformat = fmt[24:40]
        if subformat[2:] != GUID_TAIL:
            raise AudioError(f"{path}: unsupported WAVE_FORMAT_EXTENSIBLE subformat GUID {subformat.hex()}; "
                             f"{_convert_hint(path)}")
        tag = int.from_bytes(subformat[:2], "little")  # from here on it reads like a plain file
    name = FORMAT_NAMES.get(tag, "unknown")
    if tag not in (WAVE_FORMAT_PCM, WAVE_FORMAT_IEEE_FLOAT):
        raise AudioError(f"{path}: {name} encoding (format tag {tag:#06x}) is not supported; "
                         f"{_convert_hint(path)}")
    # (numpy dtype, offset, scale): sample = (stored - offset) / scale. 24-bit has no numpy dtype: see below.
    layouts = {(1, 8): ("u1", 128, 128), (1, 16): ("<i2", 0, 2**15), (1, 24): (None, 0, 2**31),
               (1, 32): ("<i4", 0, 2**31), (3, 32): ("<f4", 0, 1), (3, 64): ("<f8", 0, 1)}
    if (tag, bits) not in layouts:
        raise AudioError(f"{path}: unsupported sample width: {bits}-bit {name} (supported: 8/16/24/32-bit "
                         f"PCM, 32/64-bit float); {_convert_hint(path)}")
    if channels == 0:
        raise AudioError(f"{path}: corrupt header: 0 channels")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"{path}: absurd sample rate {rate} Hz (expected {MIN_RATE} to {MAX_RATE}); "
                         "the header is corrupt")
    frame_bytes = channels * bits // 8  # one sample for every channel
    if block_align != frame_bytes:
        raise AudioError(f"{path}: corrupt header: block_align is {block_align} bytes but {channels} "
                         f"channel(s) of {bits}-bit samples take {frame_bytes}")
    frames = size // frame_bytes  # a trailing partial frame (a writer's rounding slip) is dropped
    if frames == 0:
        raise AudioError(f"{path}: zero-length audio: the data chunk holds no complete sample frame")
    _check_length(path, frames, rate, max_seconds)  # refuse before decoding a huge file

    dtype, offset, scale = layouts[(tag, bits)]
    raw = np.frombuffer(data, dtype=np.uint8, count=frames * frame_bytes, offset=start)
    if bits == 24:
        # Put each 3-byte sample in the top 3 bytes of an int32 (low byte zero): the sign bit lands where
        # int32 keeps it, and the value is sample * 256, hence the scale 2**31 instead of 2**23.
        wide = np.zeros((frames * channels, 4), dtype=np.uint8)
        wide[:, 1:] = raw.reshape(-1, 3)
        stored = wide.view("<i4").reshape(-1)
    else:
        stored = raw.view(dtype)
    samples = (stored.astype(np.float64) - offset) / scale  # float64 so the division is exact
    if not np.isfinite(samples).all():
        raise AudioError(f"{path}: the audio contains NaN or infinite samples")
    # Interleaved frames: (frames * channels,) -> (frames, channels); average the channels to mono.
    mono = samples.reshape(frames, channels).mean(axis=1)
    # Float files may overshoot full scale after mixing; clip like a sound card would.
    return torch.from_numpy(np.clip(mono, -1.0, 1.0).astype(np.float32)), rate


def _find_chunks(data, path):
    """Walk the RIFF chunk list; return (body of 'fmt ', start of 'data', size of 'data' in bytes)."""
    if len(data) < 12:
        raise AudioError(f"{path}: truncated header: a WAV file starts with 12 bytes, found {len(data)}")
    if data[8:12] != b"WAVE":
        raise AudioError(f"{path}: a RIFF file of type {data[8:12]!r}, not WAVE audio")
    # The RIFF size in bytes 4..8 is not trusted: streaming writers leave placeholders there, and other
    # writers forget to count trailing chunks. Each chunk's own size is what we walk by.
    fmt, start, size = None, None, None
    offset = 12  # just past "RIFF", size, "WAVE"
    while offset + 8 <= len(data) and (fmt is None or start is None):
        chunk_id, chunk_size = struct.unpack_from("<4sI", data, offset)
        body, available = offset + 8, len(data) - offset - 8
        if chunk_id == b"data":
            if chunk_size > available and chunk_size < UNKNOWN_SIZE:
                raise AudioError(f"{path}: truncated data chunk: the header declares {chunk_size} bytes of "
                                 f"audio, the file holds {available} (interrupted download or copy?)")
            start, size = body, min(chunk_size, available)  # a streaming placeholder means "to the end"
        elif chunk_size > available:
            raise AudioError(f"{path}: truncated header: chunk {chunk_id!r} declares {chunk_size} bytes, "
                             f"the file holds {available}")
        elif chunk_id == b"fmt ":
            if chunk_size < 16:
                raise AudioError(f"{path}: truncated header: the 'fmt ' chunk needs 16 bytes, "
                                 f"found {chunk_size}")
            fmt = data[body:body + chunk_size]
        # Anything else (LIST, fact, cue, ...) is metadata we skip. Odd-sized chunks carry one pad byte.
        offset = body + chunk_size + (chunk_size & 1)
    if fmt is None:
        raise AudioError(f"{path}: truncated or malformed header: no 'fmt ' chunk")
    if start is None:
        raise AudioError(f"{path}: no 'data' chunk (the file is truncated or holds no audio)")
    return fmt, start, size


def _sniff_compressed(data, path):
    """Name the compressed format a file looks like (by magic bytes, then by extension), or None."""
    for magic, kind in MAGIC.items():
        if data.startswith(magic):
            return kind
    if len(data) >= 2 and data[0] == 0xFF and (data[1] & 0xE0) == 0xE0:  # an MPEG audio frame sync word
        return "MP3"
    suffix = Path(path).suffix.lower()
    return suffix[1:].upper() if suffix in COMPRESSED_SUFFIXES else None


def _load_with_torchaudio(path, kind):
    """Decode a compressed file with torchaudio (needs torchcodec + FFmpeg); return (mono tensor, rate)."""
    try:
        waveform, rate = torchaudio.load(str(path))  # (channels, samples)
    except Exception as err:  # ImportError without torchcodec, RuntimeError from FFmpeg on a bad file, ...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise AudioError(f"{path}: cannot decode {kind} here ({reason}); {_convert_hint(path)}") from None
    if waveform.numel() == 0:
        raise AudioError(f"{path}: zero-length audio")
    if not torch.isfinite(waveform).all():
        raise AudioError(f"{path}: the audio contains NaN or infinite samples")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"{path}: absurd sample rate {rate} Hz (expected {MIN_RATE} to {MAX_RATE})")
    return waveform.float().mean(dim=0).clamp(-1.0, 1.0), rate


def _check_length(path, frames, rate, max_seconds):
    if max_seconds is not None and frames > max_seconds * rate:
        raise AudioError(f"{path}: audio is {frames / rate:.1f} s long, longer than "
                         f"max_seconds={max_seconds}")


def _convert_hint(path):
    return (f"convert it to 16 kHz mono WAV: `ffmpeg -i {path} -ar 16000 -ac 1 out.wav` "
            f"(or `sox {path} -r 16000 -c 1 out.wav`)")


def _resample(audio, rate, sr):
    """Resample a (samples,) tensor from `rate` to `sr` Hz with torchaudio's windowed-sinc filter."""
    if rate == sr:
        return audio
    # Resampling by the ratio rate/sr = p/q (in lowest terms) builds a sinc kernel of about p x q taps:
    # 44100 -> 16000 is 441/160 (71k taps), fine. An odd rate such as 44101 Hz has nothing in common with
    # 16000, so p/q = 44101/16000 would need 706M taps (2.8 GB). For such rates we take the nearest fraction
    # with a small denominator instead (at most ~65k taps), a pitch and timing error below 0.2%.
    ratio = Fraction(rate, sr)
    if ratio.numerator * ratio.denominator > 2**18:  # 22050 Hz (espeak-ng, LJSpeech): 141k taps, exact
        ratio = ratio.limit_denominator(max(1, math.isqrt(int(2**16 / ratio))))
    return _resampler(ratio.numerator, ratio.denominator)(audio)


@functools.lru_cache(maxsize=8)
def _resampler(orig, new):
    """torchaudio's Resample module builds the sinc kernel once; building it is most of the cost of
    resampling a short clip, so keep the few we meet (one per rate, usually)."""
    return torchaudio.transforms.Resample(orig, new)


def save_wav(path, audio, sr=SAMPLE_RATE):
    """Write mono audio in [-1, 1] as 16-bit PCM WAV (clipped). load_audio reads it back exactly."""
    audio = torch.as_tensor(audio, dtype=torch.float32).detach().cpu()
    if audio.dim() == 2 and audio.shape[0] == 1:  # (1, samples) -> (samples,)
        audio = audio[0]
    if audio.dim() != 1:
        raise ValueError(f"save_wav: {path}: expected mono audio of shape (samples,), "
                         f"got {tuple(audio.shape)}")
    if not torch.isfinite(audio).all():
        raise ValueError(f"save_wav: {path}: the audio contains NaN or infinite samples")
    # Same scale as load_audio (x * 2**15), so a 16-bit file survives load -> save unchanged.
    # The scale is asymmetric at the top: -1.0 is -32768 but +1.0 clips to 32767.
    pcm = (audio.double() * 2**15).round().clamp(-2**15, 2**15 - 1).to(torch.int16)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)  # bytes per sample
        f.setframerate(sr)
        f.writeframes(pcm.numpy().astype("<i2").tobytes())


# ----------------------------------------------------------------------------------------------------------
# 2. Manifests: one JSON object per line, audio paths relative to the manifest's folder (or absolute)

TASKS = ("transcribe", "continue", "instruct")
# The text instruction that goes with the audio when a row does not bring its own `prompt`.
TASK_PROMPTS = {"transcribe": "Transcribe the audio.",
                "continue": "Continue the spoken sentence.",
                "instruct": "Answer the spoken question."}


def read_manifest(path):
    """Read a JSONL manifest into a list of dicts, every row complete and with an absolute `audio` path.

    Required: `audio`, plus `text` for transcribe rows or `response` for continue/instruct rows. Filled in
    when absent: task = "transcribe", prompt = TASK_PROMPTS[task], text = "", response = text.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such manifest file")
    rows = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():  # blank lines are allowed, e.g. a trailing newline
            continue
        where = f"{path}:{line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: bad JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: each line must be a JSON object, got {type(row).__name__}")
        task = row.setdefault("task", "transcribe")
        if task not in TASKS:
            raise ValueError(f"{where}: unknown task {task!r}; expected one of {', '.join(TASKS)}")
        needed = ("audio", "text") if task == "transcribe" else ("audio", "response")
        missing = [key for key in needed if not isinstance(row.get(key), str)]
        if missing:
            raise ValueError(f"{where}: missing key(s) {', '.join(missing)} (a {task} row needs "
                             f"{' and '.join(needed)}, as strings)")
        # Joining with an absolute path keeps the absolute path, so both kinds work; abspath also folds
        # "../" away, so the same file always gets the same string.
        row["audio"] = os.path.abspath(path.parent / row["audio"])
        row.setdefault("text", "")
        row.setdefault("prompt", TASK_PROMPTS[task])
        row.setdefault("response", row["text"])
        rows.append(row)
    return rows


def write_manifest(path, rows):
    """Write rows as JSONL. Absolute audio paths are stored relative to the manifest's folder, so the folder
    can be moved as a whole; relative ones are taken to be relative to that folder already."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.path.abspath(path.parent)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            row = dict(row, audio=str(row["audio"]))
            if os.path.isabs(row["audio"]):
                try:
                    row["audio"] = os.path.relpath(row["audio"], folder)
                except ValueError:  # on another drive (Windows): keep it absolute
                    pass
            row["audio"] = Path(row["audio"]).as_posix()  # forward slashes read back everywhere
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def librispeech_to_manifest(root, out_path):
    """LibriSpeech: root/**/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt holds lines "ID TEXT", the audio is
    ID.flac beside it. Transcripts are upper case in the original; we lower-case them. Returns the rows."""
    root = _existing_folder(root)
    rows = []
    # rglob finds the transcripts whether root is LibriSpeech/ or one split such as LibriSpeech/dev-clean/;
    # sorting makes the manifest's order the same on every machine.
    for transcript in sorted(root.rglob("*.trans.txt")):
        for line in transcript.read_text(encoding="utf-8").splitlines():
            utterance_id, _, text = line.strip().partition(" ")
            if utterance_id:
                speaker = utterance_id.split("-")[0]
                rows.append({"audio": str(transcript.parent / f"{utterance_id}.flac"), "text": text.lower(),
                             "task": "transcribe", "voice": {"speaker": speaker}, "lang": "en"})
    return _finish_conversion(rows, root, out_path, "LibriSpeech's SPEAKER/CHAPTER/*.trans.txt files")


def ljspeech_to_manifest(root, out_path):
    """LJSpeech: root/metadata.csv with lines "ID|text|normalized text" and audio in root/wavs/ID.wav.
    We take the normalized column (numbers and abbreviations spelled out). Returns the rows."""
    root = _existing_folder(root)
    metadata = root / "metadata.csv"
    if not metadata.is_file():
        raise ValueError(f"{root}: no metadata.csv; expected the LJSpeech-1.1 folder (metadata.csv + wavs/)")
    rows = []
    # Split on '|' by hand: the text holds unbalanced quotes that would confuse the csv module.
    for line in metadata.read_text(encoding="utf-8").splitlines():
        fields = line.split("|")
        if len(fields) >= 2:
            text = fields[2] if len(fields) > 2 and fields[2].strip() else fields[1]
            rows.append({"audio": str(root / "wavs" / f"{fields[0]}.wav"), "text": text.strip(),
                         "task": "transcribe", "voice": {"speaker": "LJ"}, "lang": "en"})
    return _finish_conversion(rows, root, out_path, "lines ID|text|normalized in metadata.csv")


def commonvoice_to_manifest(root, out_path, split="train"):
    """Common Voice: root/{split}.tsv (columns client_id, path, sentence, ..., locale), audio in root/clips/.
    The clips are MP3: load_audio needs torchcodec + FFmpeg for them, or convert them to WAV first.
    Returns the rows."""
    root = _existing_folder(root)
    table = root / f"{split}.tsv"
    if not table.is_file():
        raise ValueError(f"{root}: no {split}.tsv; expected a Common Voice language folder "
                         "(train.tsv, clips/)")
    rows = []
    with open(table, encoding="utf-8", newline="") as f:
        # QUOTE_NONE: sentences contain quote marks that are text, not csv quoting.
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if not {"path", "sentence"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{table}: needs columns path and sentence, found {reader.fieldnames}")
        for record in reader:
            # Keep the speaker labels that are filled in; Common Voice leaves most of them empty.
            voice = {"speaker": record.get("client_id", "")}
            voice.update({k: record[k] for k in ("gender", "age", "accents") if record.get(k)})
            rows.append({"audio": str(root / "clips" / record["path"]), "text": record["sentence"].strip(),
                         "task": "transcribe", "voice": voice, "lang": record.get("locale") or "und"})
    return _finish_conversion(rows, root, out_path, f"rows in {split}.tsv")


def _existing_folder(root):
    root = Path(root).absolute()  # absolute, so the rows work from any working directory
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder")
    return root


def _finish_conversion(rows, root, out_path, what):
    """Check that the converted rows point at real files, then write them."""
    if not rows:
        raise ValueError(f"{root}: found no {what}")
    missing = [row["audio"] for row in rows if not os.path.exists(row["audio"])]
    if missing:
        raise ValueError(f"{root}: {len(missing)} of {len(rows)} audio files are missing, e.g. {missing[0]}; "
                         "is the archive fully extracted?")
    write_manifest(out_path, rows)
    return rows


# ----------------------------------------------------------------------------------------------------------
# 3. Batches for the audio LM: frozen-encoder cache, length-sorted batches, padding and label masks

@dataclass
class Stage:
    """What train.py needs from a training stage; every stage (asr, instruct, speechlm, align) builds one."""
    model: torch.nn.Module               # model(**batch) -> scalar loss; only trainable parameters need grad
    batch: Callable[[int], dict]         # micro-batch number i -> dict of CPU tensors (a pure function of i)
    evaluate: Callable[[], dict]         # held-out metrics, e.g. {"test_loss": 1.2, "wer": 0.08}
    tokens: Callable[[dict], int]        # tokens in a batch, for train.py's tokens/s
    lr_scale: dict = field(default_factory=dict)   # {parameter-name prefix: multiple of train.lr} for parts
                                                   # that learn best at their own rate (the VoiceEncoder)


def normalize_text(text):
    """Lower case, punctuation to spaces, one space between words: what WER compares."""
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split())


def word_error_rate(references, hypotheses):
    """(substitutions + deletions + insertions) / reference words, over a whole set, after normalize_text."""
    errors = words = 0
    for ref, hyp in zip(references, hypotheses):
        r, h = normalize_text(ref).split(), normalize_text(hyp).split()
        distance = list(range(len(h) + 1))            # edit distance row for the empty reference prefix
        for i, r_word in enumerate(r, 1):
            previous, distance[0] = distance[0], i
            for j, h_word in enumerate(h, 1):
                previous, distance[j] = distance[j], min(distance[j] + 1, distance[j - 1] + 1,
                                                         previous + (r_word != h_word))
        errors, words = errors + distance[-1], words + len(r)
    return errors / max(words, 1)


def encoder_features(audio_lm, rows, cache_path=None, batch_size=16, progress=True):
    """{audio path: frozen encoder output (frames, d_audio) fp16} for every row's audio, computed once.

    The encoder is frozen, so its output for a clip never changes: computing it once and reading it back
    each epoch turns the CPU's most expensive step into a table look-up. Stored as one safetensors file.
    """
    cached = load_file(str(cache_path)) if cache_path and Path(cache_path).exists() else {}
    seconds = {row["audio"]: row.get("seconds", 0.0) for row in rows}
    todo = sorted(set(seconds) - set(cached), key=lambda p: (seconds[p], p))   # similar lengths batch together
    device = next(audio_lm.encoder.parameters()).device
    for start in tqdm(range(0, len(todo), batch_size), desc="encoding audio (cached)", unit="batch",
                      disable=not progress or not todo):
        paths = todo[start: start + batch_size]
        mels = [audio_lm.mel(load_audio(p)) for p in paths]                       # each (n_mels, T_i)
        lengths = torch.tensor([m.size(-1) for m in mels])
        batch = torch.zeros(len(mels), mels[0].size(0), int(lengths.max()))
        for i, m in enumerate(mels):
            batch[i, :, : m.size(-1)] = m
        features, feature_lengths = audio_lm.encode(batch.to(device), lengths.to(device))
        for p, f, n in zip(paths, features, feature_lengths.tolist()):
            cached[p] = f[:n].to(torch.float16).cpu().contiguous()                # (frames, d_audio)
    if cache_path and todo:
        write_atomic(Path(cache_path), lambda f: f.write(save_tensors(cached)))   # whole, for runs beside us
    return cached


class AudioLMBatches:
    """Micro-batch number i, as a pure function of (rows, seed, i): resuming at step s needs no state.

    Examples are drawn in windows of `window` batches: sample window * batch_size rows (tasks drawn by
    `mix` weights), sort them by length so each batch pads little, cut into batches, shuffle the batches.
    """

    def __init__(self, rows, audio_lm, batch_size, seed=0, mix=(("transcribe", 1.0),), features=None,
                 window=32):
        self.audio_lm, self.batch_size, self.seed, self.features, self.window = \
            audio_lm, batch_size, seed, features, window
        weights = dict(mix)
        self.by_task = {task: [r for r in rows if r["task"] == task] for task in weights}
        empty = [task for task, kept in self.by_task.items() if not kept and weights[task] > 0]
        if empty:
            raise ValueError(f"the data mix asks for tasks {empty} but the manifest has no such rows")
        self.tasks = [task for task in weights if weights[task] > 0]
        self.weights = torch.tensor([weights[t] for t in self.tasks], dtype=torch.float)
        self._window_index, self._window_batches = None, None

    def _frames(self, row):
        if self.features is not None:
            return self.features[row["audio"]].size(0)
        return int(row.get("seconds", 0) * 100)      # mel frames, only needed for sorting

    def __call__(self, i):
        w = i // self.window
        if w != self._window_index:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + w)
            n = self.window * self.batch_size
            tasks = torch.multinomial(self.weights, n, replacement=True, generator=g).tolist()
            rows = [self.by_task[self.tasks[t]][int(torch.randint(len(self.by_task[self.tasks[t]]), (1,),
                                                                   generator=g))] for t in tasks]
            rows.sort(key=self._frames)
            batches = [rows[k: k + self.batch_size] for k in range(0, n, self.batch_size)]
            order = torch.randperm(len(batches), generator=g).tolist()
            self._window_index, self._window_batches = w, [batches[k] for k in order]
        return self.collate(self._window_batches[i % self.window])

    def collate(self, rows):
        """Rows -> padded tensors. Audio goes in as cached features or as mel; text is right-padded."""
        lm = self.audio_lm
        if self.features is not None:
            feats = [self.features[r["audio"]].float() for r in rows]                 # (frames_i, d)
            lengths = torch.tensor([f.size(0) for f in feats])
            audio = {"features": torch.zeros(len(rows), int(lengths.max()), feats[0].size(1)),
                     "feature_lengths": lengths}
            for k, f in enumerate(feats):
                audio["features"][k, : f.size(0)] = f
            counts = lm.projector.audio_token_count(lengths).tolist()
        else:
            mels = [lm.mel(load_audio(r["audio"])) for r in rows]                      # (n_mels, T_i)
            lengths = torch.tensor([m.size(-1) for m in mels])
            audio = {"mel": torch.zeros(len(rows), mels[0].size(0), int(lengths.max())), "mel_lengths": lengths}
            for k, m in enumerate(mels):
                audio["mel"][k, :, : m.size(-1)] = m
            counts = [lm.audio_token_count(n) for n in lengths.tolist()]
        examples = [lm.build_example(r["prompt"], n, r["response"]) for r, n in zip(rows, counts)]
        T = max(len(ids) for ids, _, _ in examples)
        input_ids = torch.full((len(rows), T), lm.tokenizer.pad_id)
        audio_mask = torch.zeros(len(rows), T, dtype=torch.bool)
        labels = torch.full((len(rows), T), -100)                    # padding is never a target
        for k, (ids, mask, target) in enumerate(examples):
            input_ids[k, : len(ids)] = torch.tensor(ids)
            audio_mask[k, : len(ids)] = torch.tensor(mask)
            labels[k, : len(ids)] = torch.tensor(target)
        return {"input_ids": input_ids, "audio_mask": audio_mask, "labels": labels, **audio}


# ----------------------------------------------------------------------------------------------------------
# 4. IRA inputs, made once per manifest and stored beside it: EnCodec codes (what the SpeechLM speaks) and
# log-mel frames (what the VoiceEncoder may hear instead, --speechlm.voice_audio=mel)
#
# EnCodec as a tokenizer (Defossez et al. 2022): a 24 kHz waveform becomes K parallel streams of codes,
# 75 frames per second, 1024 entries per codebook (residual vector quantization: codebook k quantizes what
# codebooks < k left). 1.5 kbps = 2 codebooks = 150 tokens per second. Without the real weights (no
# download here), `encodec_model_24khz(pretrained=False)` has random convolutions and EMPTY codebooks (all
# zeros, `inited = 0`: EnCodec fills them by k-means when its training starts), so every frame would get
# code 0. We do that one step of its training: seeded k-means over the random encoder's frames of the
# corpus's first ~3.6 minutes, one codebook per residual, saved beside the codes.

CODEC_SAMPLE_RATE = 24000                  # Hz: the 24 kHz EnCodec model
CODEC_FRAME_RATE = 75                      # frames per second: 24000 / 320 (the encoder's total stride)
CODEBOOK_SIZE = 1024                       # entries per codebook: 10 bits per code
CODEC_CHECKPOINT = "encodec_24khz-d7cc33bc.th"   # the file name encodec looks for in `repository=`
TRAINED_HERE = "codec.safetensors"         # weights of the same architecture trained by scripts/train_codec.py
UNTRAINED_SEED = 0                         # seeds the untrained codec's weights and its k-means
KMEANS_FRAMES = 16384                      # encoder frames (~3.6 min of audio) the untrained codebooks fit on
KMEANS_ITERS = 10                          # Lloyd iterations per codebook
MEL_BINS = 80                              # the VoiceEncoder's log-mel: Whisper's 80 bins (model.py) ...
MEL_FRAME_RATE = 100                       # ... at 100 frames per second (16000 Hz / hop 160)
_warned = False                            # True once the download failed and we said so


def n_codebooks(bandwidth):
    """kbps -> codebooks: each codebook costs 75 frames/s * 10 bits = 0.75 kbps (1.5 -> 2, 6 -> 8)."""
    return int(round(bandwidth * 1000 / (CODEC_FRAME_RATE * 10)))


def kmeans(x, n_clusters, iters, generator):
    """Plain Lloyd k-means on x (N, D): init from distinct random rows; an empty cluster keeps its centre.
    Distances through ||c||^2 - 2 x.c (one matmul) rather than an (N, n_clusters, D) difference tensor."""
    start = torch.randperm(x.size(0), generator=generator)[:n_clusters]              # distinct rows ...
    if len(start) < n_clusters:                                                       # ... or repeats if few
        start = torch.cat([start, torch.randint(x.size(0), (n_clusters - len(start),), generator=generator)])
    centres = x[start].clone()                                                        # (n_clusters, D)
    for _ in range(iters):
        assign = (centres.pow(2).sum(1)[None] - 2 * x @ centres.T).argmin(1)           # (N,)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=n_clusters)[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres


class Codec:
    """EnCodec 24 kHz at one bandwidth: waveform (samples,) <-> codes (K, frames). `name` says which weights:
    'encodec_24khz' (real), 'encodec_24khz-trained-here' (scripts/train_codec.py) or 'encodec_24khz-untrained'
    (`pretrained` False: its codebooks still need k-means); `fingerprint` is a hash of every weight."""

    def __init__(self, encodec_model, bandwidth, pretrained, name=None):
        self.model, self.bandwidth, self.pretrained = encodec_model.eval(), bandwidth, pretrained
        self.model.set_target_bandwidth(bandwidth)
        self.n_codebooks = n_codebooks(bandwidth)
        self.name = name or ("encodec_24khz" if pretrained else "encodec_24khz-untrained")

    def codebooks(self):
        """The EuclideanCodebook modules of the first K residual quantizers."""
        return [layer._codebook for layer in self.model.quantizer.vq.layers[: self.n_codebooks]]

    def fingerprint(self):
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    @torch.inference_mode()
    def features(self, wav):
        """(samples,) at 24 kHz -> the encoder's (frames, 128) vectors, before quantization."""
        return self.model.encoder(wav.float()[None, None])[0].T

    @torch.inference_mode()
    def encode(self, wav):
        """(samples,) at 24 kHz -> codes (K, ceil(samples / 320)), int64."""
        frames = self.model.encode(wav.float()[None, None])           # [(codes (1, K, T), scale None)]
        return frames[0][0][0]

    @torch.inference_mode()
    def decode(self, codes):
        """codes (K, T) -> waveform (T * 320,) at 24 kHz."""
        return self.model.decode([(codes.long()[None], None)])[0, 0]

    def fit_codebooks(self, waveforms):
        """Untrained codec only: k-means codebooks, residual by residual, on the encoder's frames of these
        clips (EnCodec itself starts training the same way: k-means on its first batch). Deterministic."""
        x = torch.cat([self.features(w) for w in waveforms])[:KMEANS_FRAMES]             # (N, 128)
        generator = torch.Generator().manual_seed(UNTRAINED_SEED)
        for codebook in self.codebooks():
            centres = kmeans(x, CODEBOOK_SIZE, KMEANS_ITERS, generator)                   # (1024, 128)
            codebook.embed.copy_(centres), codebook.embed_avg.copy_(centres), codebook.inited.fill_(1)
            x = x - centres[(centres.pow(2).sum(1)[None] - 2 * x @ centres.T).argmin(1)]   # the residual

    def save_codebooks(self, path):
        tensors = {f"codebook.{k}": c.embed.contiguous() for k, c in enumerate(self.codebooks())}
        write_atomic(Path(path), lambda f: f.write(save_tensors(tensors)))

    def load_codebooks(self, path):
        tensors = load_file(str(path))
        for k, codebook in enumerate(self.codebooks()):
            codebook.embed.copy_(tensors[f"codebook.{k}"]), codebook.embed_avg.copy_(tensors[f"codebook.{k}"])
            codebook.inited.fill_(1)


def untrained_encodec():
    """EnCodec 24 kHz's architecture with seeded random weights: the same on every run and machine."""
    warnings.filterwarnings("ignore", message=".*weight_norm.*")      # encodec uses the older weight_norm API
    with torch.random.fork_rng():
        torch.manual_seed(UNTRAINED_SEED)
        return EncodecModel.encodec_model_24khz(pretrained=False)


def load_codec(codec_dir="", bandwidth=1.5, log=print):
    """The real EnCodec 24 kHz when its weights can be had (`codec_dir` holding encodec_24khz-d7cc33bc.th,
    or the package's own download); a codec trained here (`codec_dir` holding codec.safetensors from
    scripts/train_codec.py); else the same architecture untrained, with one loud warning."""
    global _warned
    warnings.filterwarnings("ignore", message=".*weight_norm.*")      # encodec uses the older weight_norm API
    if codec_dir:
        if (Path(codec_dir) / TRAINED_HERE).exists():
            model = untrained_encodec()
            model.load_state_dict(load_file(str(Path(codec_dir) / TRAINED_HERE)))
            return Codec(model, bandwidth, pretrained=True, name="encodec_24khz-trained-here")
        if not (Path(codec_dir) / CODEC_CHECKPOINT).exists():
            raise ConfigError(f"{codec_dir}: neither {CODEC_CHECKPOINT} (EnCodec's own 24 kHz weights) nor "
                              f"{TRAINED_HERE} (python -m scripts.train_codec); or set --speechlm.codec='' to "
                              f"use the download (or the untrained codec)")
        return Codec(EncodecModel.encodec_model_24khz(repository=Path(codec_dir)), bandwidth, pretrained=True)
    if not _warned:                                # one download attempt (and one warning) per process
        try:                                       # torch.hub prints "Downloading: ..." on stdout: not there
            with contextlib.redirect_stdout(sys.stderr):
                return Codec(EncodecModel.encodec_model_24khz(pretrained=True), bandwidth, pretrained=True)
        except Exception as error:                 # offline: no download possible
            log("!" * 100 + f"\n!! EnCodec weights unavailable ({type(error).__name__}): using an UNTRAINED "
                "EnCodec (seeded weights, k-means codebooks).\n!! Its codes still tokenize audio (k-means "
                "clusters of its random features), but DECODED AUDIO IS NOISE.\n!! For real speech put "
                f"{CODEC_CHECKPOINT} in a folder and set --speechlm.codec=<folder>, or train one on a GPU: "
                "python -m scripts.train_codec --out <folder>.\n" + "!" * 100)
            _warned = True
    return Codec(untrained_encodec(), bandwidth, pretrained=False)


def codes_dir_for(manifest_path, bandwidth):
    return Path(manifest_path).parent / f"codes-{bandwidth}kbps"


def mels_dir_for(manifest_path):
    return Path(manifest_path).parent / f"mel-{MEL_BINS}"


def codes_path(codes_dir, audio_path, root):
    """Where one clip's codes (or log-mel) live: its audio path relative to the manifest's folder, with .npy."""
    try:
        return codes_dir / Path(audio_path).relative_to(root).with_suffix(".npy")
    except ValueError:                             # audio outside the corpus folder: name it by a hash
        return codes_dir / "other" / (hashlib.sha1(str(audio_path).encode()).hexdigest()[:16] + ".npy")


def write_atomic(path, write):
    """write(f) into a temporary file, then move it into place: an interrupted run never leaves half a file,
    and a run reading it meanwhile sees the old file or the new one. The temporary name is the process's own:
    runs started side by side on one corpus may cache the same file at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _save_npy(path, array):
    write_atomic(path, lambda f: np.save(f, array))


def encode_manifest_codes(manifest_path, bandwidth=1.5, codec_dir="", log=print, codec=None, device="cpu"):
    """Encode every clip of a manifest once into `codes-<bandwidth>kbps/<audio path>.npy` (int16, (K, T))
    beside it, with `codec.json` saying which codec weights made them. Clips already encoded are skipped.
    An untrained codec fits its codebooks on this manifest's first clips and saves them there (so the next
    manifest of the corpus reuses them). Refuses to add codes from other weights to a folder.
    device: where the codec runs (a GPU, where there is one: 2 quiet CPU cores take ~0.16 s a clip, ~27 min
    for 10,000, and ~0.5 s with the cores shared); a near-tie between two code vectors may round
    differently there, so a GPU's codes need not match a CPU's bit for bit."""
    manifest_path = Path(manifest_path)
    root, codes_dir = manifest_path.parent.resolve(), codes_dir_for(manifest_path, bandwidth)
    audio_paths = list(dict.fromkeys(row["audio"] for row in read_manifest(manifest_path)))   # unique
    info_file = codes_dir / "codec.json"
    todo = [p for p in audio_paths if not codes_path(codes_dir, p, root).exists()]
    if info_file.exists() and not todo and not codec_dir:     # all there: no need to even build the codec
        return codes_dir                           # (a folder of weights is built: its fingerprint is checked)
    codec = codec or load_codec(codec_dir, bandwidth, log)
    codes_dir.mkdir(parents=True, exist_ok=True)
    if not codec.pretrained:
        codebook_file = codes_dir / "codebooks.safetensors"
        if codebook_file.exists():
            codec.load_codebooks(codebook_file)
        else:
            clips, frames = [], 0
            for path in audio_paths:               # the first clips, up to KMEANS_FRAMES frames
                clips.append(load_audio(path, sr=CODEC_SAMPLE_RATE))
                frames += clips[-1].numel() // 320
                if frames >= KMEANS_FRAMES:
                    break
            log(f"untrained codec: fitting {codec.n_codebooks} k-means codebooks on {frames} frames")
            codec.fit_codebooks(clips)
            codec.save_codebooks(codebook_file)
    info = {"codec": codec.name, "fingerprint": codec.fingerprint(), "bandwidth": bandwidth,
            "n_codebooks": codec.n_codebooks, "frame_rate": CODEC_FRAME_RATE, "sample_rate": CODEC_SAMPLE_RATE}
    if info_file.exists():
        old = json.loads(info_file.read_text())
        if (old["codec"], old["fingerprint"]) != (info["codec"], info["fingerprint"]):
            raise ConfigError(f"{codes_dir}: codes were made by {old['codec']} ({old['fingerprint']}) but "
                              f"this codec is {info['codec']} ({info['fingerprint']}); delete {codes_dir} to "
                              f"re-encode")
    text = json.dumps(info, indent=1) + "\n"
    if not info_file.exists() or info_file.read_text() != text:   # a rewrite could be read half-done by a
        write_atomic(info_file, lambda f: f.write(text.encode()))   # run beside this one (seen on a GPU)
    if todo:
        log(f"encoding {len(todo)} clips of {manifest_path} with {codec.name} at {bandwidth} kbps "
            f"-> {codes_dir}")
    home = next(codec.model.parameters()).device
    codec.model.to(device)
    try:
        for i, path in enumerate(todo):
            codes = codec.encode(load_audio(path, sr=CODEC_SAMPLE_RATE).to(device)).cpu()    # (K, T)
            _save_npy(codes_path(codes_dir, path, root), codes.numpy().astype(np.int16))  # 10-bit codes: int16
            if (i + 1) % 200 == 0:
                log(f"  {i + 1}/{len(todo)} clips encoded")
    finally:
        codec.model.to(home)                       # a codec passed in goes back where it came from
    return codes_dir


def read_codes(manifest_path, audio_paths, bandwidth):
    """The stored codes of these clips, as int64 tensors (K, T), plus the codec.json they came with."""
    manifest_path = Path(manifest_path)
    codes_dir = codes_dir_for(manifest_path, bandwidth)
    info = json.loads((codes_dir / "codec.json").read_text())
    root = manifest_path.parent.resolve()
    codes = [torch.from_numpy(np.load(codes_path(codes_dir, p, root)).astype(np.int64)) for p in audio_paths]
    return codes, info


def load_codec_for(cfg, log=print):
    """The codec that made the corpus's codes, to turn SpeechLM output into audio: the real weights, or the
    untrained codec with the corpus's k-means codebooks. Checked against the corpus's codec.json."""
    codes_dir = codes_dir_for(Path(cfg.data.corpus) / "train.jsonl", cfg.speechlm.bandwidth)
    codec = load_codec(cfg.speechlm.codec, cfg.speechlm.bandwidth, log)
    if not codec.pretrained:
        if not (codes_dir / "codebooks.safetensors").exists():
            raise ConfigError(f"{codes_dir}/codebooks.safetensors: missing; the untrained codec's codebooks "
                              f"are made with the corpus's codes (python train.py --stage=speechlm)")
        codec.load_codebooks(codes_dir / "codebooks.safetensors")
    if (codes_dir / "codec.json").exists():
        made = json.loads((codes_dir / "codec.json").read_text())
        if made["fingerprint"] != codec.fingerprint():
            raise ConfigError(f"{codes_dir}: the SpeechLM learned codes of {made['codec']} "
                              f"({made['fingerprint']}), not of this {codec.name}; set --speechlm.codec to the "
                              f"weights that made them")
    return codec


def encode_manifest_mels(manifest_path, log=print):
    """Every clip's log-mel (80, frames at 100/s) once, as float16 `mel-80/<audio path>.npy` beside the
    manifest: Whisper's front end (model.log_mel_spectrogram), no encoder. Clips already there are skipped."""
    manifest_path = Path(manifest_path)
    root, mel_dir = manifest_path.parent.resolve(), mels_dir_for(manifest_path)
    audio_paths = list(dict.fromkeys(row["audio"] for row in read_manifest(manifest_path)))   # unique
    todo = [p for p in audio_paths if not codes_path(mel_dir, p, root).exists()]
    if todo:
        log(f"log-mel of {len(todo)} clips of {manifest_path} -> {mel_dir}")
    for path in todo:
        mel = log_mel_spectrogram(load_audio(path), MEL_BINS)                            # (80, frames)
        _save_npy(codes_path(mel_dir, path, root), mel.numpy().astype(np.float16))       # values in ~[-1, 1.5]
    return mel_dir


def read_mels(manifest_path, audio_paths):
    """The stored log-mel of these clips, as float32 tensors (80, frames)."""
    manifest_path = Path(manifest_path)
    mel_dir, root = mels_dir_for(manifest_path), manifest_path.parent.resolve()
    return [torch.from_numpy(np.load(codes_path(mel_dir, p, root)).astype(np.float32)) for p in audio_paths]


# ----------------------------------------------------------------------------------------------------------
# Command line: python data.py convert DATASET ROOT OUT

def main(argv=None):
    parser = argparse.ArgumentParser(description="A manifest for a downloaded corpus (the synthetic one: "
                                                 "corpus.py)")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="write a JSONL manifest for a downloaded corpus")
    convert.add_argument("dataset", choices=["librispeech", "ljspeech", "commonvoice"])
    convert.add_argument("root", help="the corpus folder")
    convert.add_argument("out", help="the manifest to write, e.g. train.jsonl")
    convert.add_argument("--split", default="train", help="Common Voice only: train, dev, test, ...")
    args = parser.parse_args(argv)
    try:
        if args.dataset == "commonvoice":
            print(f"wrote {len(commonvoice_to_manifest(args.root, args.out, args.split))} rows to {args.out}")
        else:
            by_name = {"librispeech": librispeech_to_manifest, "ljspeech": ljspeech_to_manifest}
            convert_rows = by_name[args.dataset]
            print(f"wrote {len(convert_rows(args.root, args.out))} rows to {args.out}")
    except (ValueError, OSError, RuntimeError) as err:  # user errors: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
