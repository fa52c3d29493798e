"""
The audio language model, from the waveform to the next token, in one file.

    waveform (16 kHz) -> log-mel (80 x 100/s) -> Whisper encoder (frozen, 50 frames/s)
        -> projector (stack k frames, MLP) -> LLM embeddings (12.5/s for k=4)
        -> [chat prefix] [audio embeddings] [prompt] [response] -> Llama (LoRA) -> next-token logits

Reading order: audio front end, Whisper encoder, projector, Llama (+ KV cache and generate), and finally
AudioLM, which glues them. LoRA and int8 live in lora.py; loading real weights (name tables, the
tokenizer, build_audio_lm) in weights.py.

References: Radford et al. 2022 (Whisper; openai/whisper model.py and audio.py), Touvron et al. 2023
(Llama), Ultravox (frame-stacking SwiGLU projector), SALMONN / Qwen-Audio (frozen encoder + adapter + LLM),
karpathy/nanoGPT and pytorch-labs/gpt-fast (layout, name tables, static KV cache).

Simplified on purpose: encoder-only Whisper (its decoder is never used); no rope scaling variants;
the KV cache is a plain pair of preallocated tensors per layer; batches are right-padded, so the
causal mask alone keeps real tokens from seeing padding during training.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
import torchaudio

# -----------------------------------------------------------------------------
# 1. Audio front end: Whisper's log-mel spectrogram

SAMPLE_RATE = 16000                       # Hz: Whisper's only input rate
N_FFT = 400                               # 25 ms analysis window
HOP_LENGTH = 160                          # 10 ms hop -> 100 mel frames per second
CHUNK_LENGTH = 30                         # seconds Whisper was trained on
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE    # 480,000 samples in a 30 s chunk
N_FRAMES = N_SAMPLES // HOP_LENGTH        # 3000 mel frames in a 30 s chunk (1500 after conv2's stride 2)


def mel_filters(n_mels, device=None):
    """(n_mels, N_FFT // 2 + 1) triangular filters, Slaney mel scale and Slaney area normalisation."""
    fbanks = torchaudio.functional.melscale_fbanks(
        n_freqs=N_FFT // 2 + 1, f_min=0.0, f_max=SAMPLE_RATE / 2, n_mels=n_mels,
        sample_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")      # (201, n_mels)
    return fbanks.T.contiguous().to(device)


def log_mel_spectrogram(audio, n_mels=80):
    """(samples,) or (B, samples) float in [-1, 1] at 16 kHz -> (n_mels, frames) or (B, n_mels, frames),
    frames = samples // 160. Bit-for-bit Whisper's recipe up to float rounding."""
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio.float(), N_FFT, HOP_LENGTH, window=window, return_complex=True)  # (.., 201, frames+1)
    power = stft[..., :-1].abs() ** 2                        # drop the last frame, as Whisper does
    mel = mel_filters(n_mels, audio.device) @ power          # (.., n_mels, frames)
    log_spec = mel.clamp(min=1e-10).log10()
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)         # per clip
    log_spec = torch.maximum(log_spec, peak - 8.0)           # keep an 80 dB dynamic range
    return (log_spec + 4.0) / 4.0                            # roughly [-1, 1]


# -----------------------------------------------------------------------------
# Shared pieces: attention and a LayerNorm that computes in fp32

def attention(q, k, v, mask=None, is_causal=False, manual=False):
    """q (B, nh, Tq, hs), k/v (B, nkv, Tk, hs) with nh a multiple of nkv (grouped-query attention).
    mask: bool, True = may attend, broadcastable to (B, nh, Tq, Tk). Returns (B, nh, Tq, hs)."""
    if not manual:   # fused kernel (flash / memory-efficient on GPU); same maths as below
        # `True if .. else False`: under torch.compile with a dynamic length, `T > 1` is a symbolic bool
        # that SDPA refuses; the `if` turns it into a plain one (and a guard)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True if is_causal else False,
                                              enable_gqa=q.size(1) != k.size(1))
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)   # (B, nh, Tk, hs)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))                      # (B, nh, Tq, Tk)
    if is_causal:
        Tq, Tk = scores.shape[-2:]
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.float().softmax(dim=-1).to(q.dtype) @ v


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the weights' dtype (as Whisper does): 16-bit variance is lossy."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                            self.bias.float(), self.eps).to(x.dtype)


# -----------------------------------------------------------------------------
# 2. Whisper encoder

@dataclass
class WhisperConfig:
    n_mels: int = 80
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    ffn_dim: int = 2048
    max_positions: int = 1500     # 30 s of audio after conv2's stride 2
    attention: str = "sdpa"       # "sdpa" | "manual" (not from the checkpoint: a run-time choice)



class EncoderAttention(nn.Module):
    def __init__(self, d_model, n_heads, manual=False):
        super().__init__()
        self.n_heads, self.manual = n_heads, manual
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)   # Whisper's key projection has no bias
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def forward(self, x, key_mask=None):
        B, T, C = x.size()
        q, k, v = (p(x).view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)   # (B, nh, T, hs)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = attention(q, k, v, mask=key_mask, manual=self.manual)                      # bidirectional
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class EncoderBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = LayerNorm(cfg.d_model)
        self.attn = EncoderAttention(cfg.d_model, cfg.n_heads, manual=cfg.attention == "manual")
        self.mlp_norm = LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)

    def forward(self, x, key_mask=None):
        x = x + self.attn(self.attn_norm(x), key_mask)                 # pre-LN residual blocks
        return x + self.fc2(F.gelu(self.fc1(self.mlp_norm(x))))


class WhisperEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.d_model, cfg.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_positions, cfg.d_model)   # sinusoids, stored in the file
        self.layers = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = LayerNorm(cfg.d_model)

    @staticmethod
    def output_length(mel_frames):
        """conv2 (kernel 3, stride 2, padding 1) maps T frames to ceil(T / 2)."""
        return (mel_frames + 1) // 2

    def forward(self, mel, mel_lengths=None):
        """mel (B, n_mels, T) -> (B, ceil(T / 2), d_model). With mel_lengths (B,), frames past each clip's
        length are ignored exactly: a clip gives the same output alone or padded inside a batch."""
        B, _, T = mel.size()
        x = F.gelu(self.conv1(mel.to(self.conv1.weight.dtype)))             # (B, d, T)
        key_mask = None
        if mel_lengths is not None:
            # zero conv1's output past the end, as conv2's own zero padding would be for a lone clip
            x = x * (torch.arange(T, device=x.device) < mel_lengths[:, None])[:, None, :]
        x = F.gelu(self.conv2(x)).transpose(1, 2)                           # (B, T', d), T' = ceil(T / 2)
        if x.size(1) > self.cfg.max_positions:
            raise ValueError(f"audio of {T} mel frames is longer than the encoder's "
                             f"{self.cfg.max_positions * 2} (30 s); cut it into 30 s pieces")
        x = x + self.embed_positions.weight[: x.size(1)]                   # slice: short clips stay short
        if mel_lengths is not None:
            out_lengths = self.output_length(mel_lengths)
            key_mask = (torch.arange(x.size(1), device=x.device) < out_lengths[:, None])[:, None, None, :]
        for layer in self.layers:
            x = layer(x, key_mask)
        return self.norm(x)


# -----------------------------------------------------------------------------
# 3. Projector: encoder frames -> LLM embeddings

class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (as Llama does) and returned in the input dtype."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Projector(nn.Module):
    """Stack `stack` consecutive encoder frames (50/s -> 50/stack per s), then map to the LLM's width.

    kind="mlp":          Linear -> GELU -> Linear                                  (the original recipe)
    kind="stack_swiglu": RMSNorm -> Linear -> SwiGLU -> RMSNorm -> Linear          (Ultravox)
    """

    def __init__(self, kind, d_audio, d_llm, stack=4, hidden=1024):
        super().__init__()
        self.kind, self.stack = kind, stack
        d_in = d_audio * stack
        if kind == "mlp":
            self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_llm))
        elif kind == "stack_swiglu":
            self.norm_in = RMSNorm(d_in)
            self.up = nn.Linear(d_in, 2 * hidden, bias=False)     # gate and value in one matmul
            self.norm_mid = RMSNorm(hidden)
            self.down = nn.Linear(hidden, d_llm, bias=False)
        else:
            raise ValueError(f"projector kind {kind!r}: choose 'mlp' or 'stack_swiglu'")

    def audio_token_count(self, encoder_frames):
        """ceil(frames / stack): the last group is zero-padded to a full stack."""
        return -(-encoder_frames // self.stack)

    def forward(self, x):
        B, T, C = x.size()
        pad = (-T) % self.stack
        x = F.pad(x, (0, 0, 0, pad))                                    # (B, T + pad, C)
        x = x.reshape(B, (T + pad) // self.stack, C * self.stack)       # (B, N, stack * C)
        if self.kind == "mlp":
            return self.net(x)
        gate, value = self.up(self.norm_in(x)).chunk(2, dim=-1)
        return self.down(self.norm_mid(F.silu(gate) * value))           # (B, N, d_llm)


# -----------------------------------------------------------------------------
# 4. Llama: RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP, KV cache

@dataclass
class LlamaConfig:
    vocab_size: int = 49152
    d_model: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    ffn_dim: int = 1536
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_positions: int = 8192
    bos_id: int = 1
    eos_id: int = 2
    attention: str = "sdpa"       # "sdpa" | "manual" (a run-time choice, not from the checkpoint)
    decode: str = "auto"          # run-time: "loop" | "cuda_graph" | "compiled_graph" | "auto" (see generate)
    checkpoint_activations: bool = False   # run-time: recompute blocks in backward (less memory, ~30% slower)

    head_dim: int = 64



def rope_tables(head_dim, max_positions, theta):
    """cos, sin tables (max_positions, head_dim): pair (i, i + head_dim/2) rotates at theta^(-2i/head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)     # (head_dim / 2,)
    angles = torch.outer(torch.arange(max_positions).float(), inv_freq)             # (T, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)                                    # (T, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x (B, nh, T, hs); cos/sin (T, hs). Rotates the two halves of each head as complex pairs."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache:
    """Preallocated keys and values for every layer: (B, n_kv_heads, max_len, head_dim) each.
    `length` counts the positions already written; a forward pass appends T more."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = 0

    def update(self, layer, k, v):
        """Write k, v (B, nkv, T, hs) after the cached positions; return all keys/values so far."""
        start, end = self.length, self.length + k.size(2)
        if end > self.k[layer].size(2):
            raise ValueError(f"KV cache holds {self.k[layer].size(2)} positions; asked for {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def write_at(self, layer, k, v, position):
        """The static-shape twin of update(), for CUDA graphs: k, v (B, nkv, 1, hs) go to slot `position`,
        a (1,) long tensor (so one recorded graph serves every step), and ALL max_len slots come back;
        the caller masks the slots after `position`. `length` is left to the caller."""
        self.k[layer].index_copy_(2, position, k)
        self.v[layer].index_copy_(2, position, v)
        return self.k[layer], self.v[layer]                                  # (B, nkv, max_len, hs)


class LlamaAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.manual = cfg.attention == "manual"
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, cache=None, layer=0, position=None):
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)      # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)   # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if position is not None:   # Llama.decode_step: T = 1 at a tensor position, every shape fixed
            k, v = cache.write_at(layer, k, v, position)                      # (B, nkv, max_len, hs)
            mask = torch.arange(k.size(2), device=x.device) <= position[:, None]   # (1, max_len): written
            y = attention(q, k, v, mask=mask, manual=self.manual)             # (B, nh, 1, hs)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        past = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.update(layer, k, v)                                             # (B, nkv, past+T, hs)
        if past == 0:
            y = attention(q, k, v, is_causal=T > 1, manual=self.manual)
        else:   # query i sits at position past + i and may see keys 0 .. past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = attention(q, k, v, mask=mask, manual=self.manual)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))   # SwiGLU


class LlamaBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = LlamaAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0, position=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, position)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight        # one matrix, two uses
        cos, sin = rope_tables(cfg.head_dim, cfg.max_positions, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)   # fp32 always; not in checkpoints
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids=None, inputs_embeds=None, kv_cache=None, return_hidden=False):
        """input_ids (B, T) or inputs_embeds (B, T, C) -> logits (B, T, vocab), or the final normed
        hidden states (B, T, C) with return_hidden=True (so a caller can apply lm_head to fewer rows)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        x = x.to(self.embed_tokens.weight.dtype)
        start = kv_cache.length if kv_cache is not None else 0
        cos, sin = self.rope_cos[start: start + x.size(1)], self.rope_sin[start: start + x.size(1)]
        for i, layer in enumerate(self.layers):
            if self.cfg.checkpoint_activations and self.training and torch.is_grad_enabled():
                # keep only each block's input; rerun the block during backward to get its activations back
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += x.size(1)
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

    def decode_step(self, token, position, cache):
        """One new token with static shapes, the function a CUDA graph records (see CUDAGraphDecoder):
        token (B,) at `position`, a (1,) long tensor -> logits (B, vocab). Writes the KV cache at
        `position`: the same maths as forward(token[:, None], kv_cache=cache) at cache.length == position."""
        x = self.embed_tokens(token[:, None])                                   # (B, 1, C)
        cos, sin = self.rope_cos[position], self.rope_sin[position]             # (1, hs)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, position)
        return self.lm_head(self.norm(x))[:, -1]                                # (B, vocab)

    def graph_decoder(self, batch_size, max_len, compile=False):
        """A CUDAGraphDecoder for (batch_size, max_len rounded up to 256), kept for the next generate():
        recording costs a few decode steps (a minute with compile), replaying it costs one launch."""
        max_len = -(-max_len // 256) * 256
        key = (batch_size, max_len, compile)
        if getattr(self, "_graph_decoder", None) is None or self._graph_decoder.key != key:
            self._graph_decoder = None                                          # free the old graph's memory
            self._graph_decoder = CUDAGraphDecoder(self, batch_size, max_len, compile)
        return self._graph_decoder

    @torch.no_grad()
    def generate(self, input_ids=None, inputs_embeds=None, max_new_tokens=64, temperature=0.0, top_k=None,
                 eos_id=None, callback=None):
        """Decode with a KV cache. temperature 0 = greedy; else sample from softmax(logits / T), optionally
        only among the top_k. Stops when every row has produced eos_id. callback(token_ids (B,)) streams.
        Returns the new tokens (B, n) (rows that finished early are padded with eos_id).
        cfg.decode picks how each new token runs: "loop" = an eager forward (readable), "cuda_graph" /
        "compiled_graph" = one replay of a recorded decode_step (CUDAGraphDecoder; CUDA only)."""
        prefix = input_ids if inputs_embeds is None else inputs_embeds
        B, T = prefix.shape[:2]
        device, dtype = self.embed_tokens.weight.device, self.embed_tokens.weight.dtype
        decode = self.cfg.decode
        if decode == "auto":   # the CUDA graph where there is CUDA; the readable loop elsewhere
            decode = "cuda_graph" if device.type == "cuda" else "loop"
        if decode not in ("loop", "cuda_graph", "compiled_graph"):
            raise ValueError(f"decode={decode!r}: choose loop, cuda_graph, compiled_graph or auto")
        compiled = decode == "compiled_graph"
        graph = None if decode == "loop" else self.graph_decoder(B, T + max_new_tokens, compiled)
        cache = KVCache(self.cfg, B, T + max_new_tokens, device, dtype) if graph is None else graph.reset()
        logits = self(input_ids, inputs_embeds, kv_cache=cache)[:, -1]            # (B, vocab)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        new_tokens = []
        for _ in range(max_new_tokens):
            token = sample_next_token(logits, temperature, top_k)                 # (B,)
            if eos_id is not None:
                token = torch.where(done, torch.full_like(token, eos_id), token)
                done |= token == eos_id
            new_tokens.append(token)
            if callback is not None:
                callback(token)
            if eos_id is not None and done.all():     # a GPU -> CPU sync; without eos_id nothing ends early
                break
            if graph is None:
                logits = self(token[:, None], kv_cache=cache)[:, -1]            # readable: an eager forward
            else:
                logits = graph(token)                                           # fast: one graph replay
        return torch.stack(new_tokens, dim=1)


class CUDAGraphDecoder:
    """Llama.decode_step recorded once as a CUDA graph, then replayed once per new token.

    At batch 1 a decode step is a few hundred small kernels, and launching them one by one from Python
    takes longer than running them. A CUDA graph records the launches once; replay() sends them all with
    one call. A graph replays fixed memory addresses, hence the static shapes: the token, its position and
    the logits live in fixed buffers, the KV cache is allocated once at max_len, and attention masks the
    slots not yet written. With compile=True the step is first fused by torch.compile (fewer, larger
    kernels). The readable path is Llama.forward with a KVCache; tests/test_fast_paths.py checks they agree.
    A graph replays the model as it was recorded: after LoRA merge() or int8 quantization, make a new one.
    """

    def __init__(self, llm, batch_size, max_len, compile=False):
        device, dtype = llm.embed_tokens.weight.device, llm.embed_tokens.weight.dtype
        self.key = (batch_size, max_len, compile)
        self.cache = KVCache(llm.cfg, batch_size, max_len, device, dtype)
        self.token = torch.zeros(batch_size, dtype=torch.long, device=device)   # input buffer
        self.position = torch.zeros(1, dtype=torch.long, device=device)         # where the token goes
        # coordinate-descent tuning and autotuning pick the matrix-vector kernels' block sizes by timing them:
        # a decode step only reads weights, and these choices read them ~1.4x faster (20 s more to compile)
        options = {"coordinate_descent_tuning": True, "max_autotune": True}
        step = torch.compile(llm.decode_step, fullgraph=True, options=options) if compile else llm.decode_step
        # warm up on a side stream (kernel selection, compilation), as graph capture requires; these
        # steps write slot 0 of the cache, which the next prefill overwrites
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step(self.token, self.position, self.cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(self.token, self.position, self.cache)            # (B, vocab) output buffer

    def reset(self):
        """The cache, emptied for a new prompt (stale slots are masked, so nothing needs zeroing)."""
        self.cache.length = 0
        return self.cache

    def __call__(self, token):
        """token (B,) -> logits (B, vocab) for the next position; the returned tensor is overwritten by
        the next call, so use it (sample from it) first."""
        self.position.fill_(self.cache.length)
        self.token.copy_(token)
        self.graph.replay()
        self.cache.length += 1
        return self.logits


def sample_next_token(logits, temperature=0.0, top_k=None):
    """logits (B, vocab) -> (B,). Greedy at temperature 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]   # (B, 1) the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1).squeeze(1)


# -----------------------------------------------------------------------------
# 5. AudioLM: frozen encoder -> projector -> LLM, with the audio spliced into the prompt

AUDIO_MARKER = "<|audio|>"   # where the audio embeddings go inside a prompt


class AudioLM(nn.Module):
    """Builds `[chat prefix] [audio embeddings] [prompt] [response]` and trains on the response only.

    The collator writes a placeholder id at each audio position and marks them in `audio_mask`;
    forward() swaps the projector's outputs into exactly those rows of the LLM's input embeddings.
    """

    def __init__(self, encoder, projector, llm, tokenizer, pad_audio_to_30s=False):
        super().__init__()
        self.encoder, self.projector, self.llm, self.tokenizer = encoder, projector, llm, tokenizer
        self.pad_audio_to_30s = pad_audio_to_30s
        self.encoder.requires_grad_(False).eval()          # frozen: never trained, no dropout anyway

    def mel(self, audio):
        """(samples,) waveform -> (n_mels, frames); padded to 30 s first when configured (Whisper's way)."""
        if self.pad_audio_to_30s:
            audio = F.pad(audio, (0, max(0, N_SAMPLES - audio.size(-1))))[..., :N_SAMPLES]
        return log_mel_spectrogram(audio, self.encoder.cfg.n_mels)

    def audio_token_count(self, mel_frames):
        return self.projector.audio_token_count(self.encoder.output_length(mel_frames))

    def build_example(self, prompt, n_audio, response=None, system=None):
        """Token ids, audio-position mask and labels for one example (lists, not yet padded).
        labels are -100 everywhere except the response and its end-of-turn token."""
        if AUDIO_MARKER not in prompt:
            prompt = f"{AUDIO_MARKER}\n{prompt}"          # audio first, then the instruction
        before, after = self.tokenizer.chat_prompt(prompt, system).split(AUDIO_MARKER)
        head, tail = self.tokenizer.encode(before), self.tokenizer.encode(after)
        ids = head + [self.tokenizer.pad_id] * n_audio + tail
        audio_mask = [False] * len(head) + [True] * n_audio + [False] * len(tail)
        labels = [-100] * len(ids)
        if response is not None:
            answer = self.tokenizer.encode(response) + [self.tokenizer.end_of_turn_id]
            ids, audio_mask, labels = ids + answer, audio_mask + [False] * len(answer), labels + answer
        return ids, audio_mask, labels

    @torch.no_grad()
    def encode(self, mel, mel_lengths=None):
        """mel (B, n_mels, T) -> frozen encoder features (B, T', d_audio) and their lengths (B,)."""
        lengths = None if self.pad_audio_to_30s else mel_lengths
        features = self.encoder(mel, lengths)
        if mel_lengths is None or self.pad_audio_to_30s:
            mel_lengths = torch.full((mel.size(0),), mel.size(-1), device=mel.device)
        return features, self.encoder.output_length(mel_lengths)

    def embed(self, input_ids, audio_mask, features, feature_lengths):
        """LLM input embeddings (B, T, C) with the projected audio written at audio_mask's positions."""
        T_enc = features.size(1)
        valid = torch.arange(T_enc, device=features.device) < feature_lengths[:, None]      # (B, T_enc)
        features = features * valid[..., None]              # zero frames past each clip's end
        audio = self.projector(features.to(next(self.projector.parameters()).dtype))       # (B, N, C)
        counts = self.projector.audio_token_count(feature_lengths)                        # (B,)
        keep = torch.arange(audio.size(1), device=audio.device) < counts[:, None]         # (B, N)
        if int(keep.sum()) != int(audio_mask.sum()):
            raise ValueError(f"{int(audio_mask.sum())} audio positions in the prompt but the audio gives "
                             f"{int(keep.sum())} embeddings: build_example's n_audio must be audio_token_count")
        embeds = self.llm.embed_tokens(input_ids)
        return embeds.masked_scatter(audio_mask[..., None], audio[keep].to(embeds.dtype))

    def forward(self, input_ids, audio_mask, labels, mel=None, mel_lengths=None, features=None,
                feature_lengths=None):
        """Mean cross-entropy over the response tokens. Give mel (+ lengths), or cached encoder features."""
        if features is None:
            features, feature_lengths = self.encode(mel, mel_lengths)
        hidden = self.llm(inputs_embeds=self.embed(input_ids, audio_mask, features, feature_lengths),
                          return_hidden=True)                         # (B, T, C)
        targets = labels[:, 1:]                                       # position t predicts token t + 1
        rows = targets != -100
        logits = self.llm.lm_head(hidden[:, :-1][rows])              # (n_labelled, vocab): only where needed
        return F.cross_entropy(logits.float(), targets[rows])

    @torch.no_grad()
    def generate(self, audio=None, prompt="Transcribe the audio.", max_new_tokens=64, temperature=0.0,
                 top_k=None, callback=None, features=None):
        """One waveform (samples,) at 16 kHz, or its cached encoder features (frames, d_audio), -> the
        LLM's answer as text. callback(text_piece) streams the answer as it is decoded."""
        device = self.llm.embed_tokens.weight.device
        if features is None:
            features, lengths = self.encode(self.mel(audio.to(device))[None])    # (1, frames, d_audio)
        else:
            features, lengths = features[None].to(device), torch.tensor([features.size(0)], device=device)
        ids, audio_mask, _ = self.build_example(prompt, int(self.projector.audio_token_count(lengths)[0]))
        ids, audio_mask = torch.tensor([ids], device=device), torch.tensor([audio_mask], device=device)
        embeds = self.embed(ids, audio_mask, features.float(), lengths)
        eot, new_ids, shown = self.tokenizer.end_of_turn_id, [], ""

        def stream(token):      # decode everything so far and emit the new part (keeps UTF-8 intact)
            nonlocal shown
            if callback is not None and token.item() != eot:
                new_ids.append(token.item())
                text = self.tokenizer.decode(new_ids)
                callback(text[len(shown):])
                shown = text
        out = self.llm.generate(inputs_embeds=embeds, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k, eos_id=eot, callback=stream)[0].tolist()
        return self.tokenizer.decode([t for t in out if t != eot])


def compile_blocks(module, **options):
    """torch.compile every transformer block inside `module`, in place ("regional compilation").

    Inside a block, torch.compile fuses the small elementwise steps (RMSNorm, RoPE, SiLU * up, the LoRA
    casts) into a few kernels, and, when training, decides which activations to keep for backward and which
    to recompute (it keeps bf16 inputs and recomputes fp32 casts: less memory). Compiling blocks rather than
    the whole model costs one block's compile time, since identical blocks share the compiled code, and
    leaves the glue between blocks eager and readable. The eager blocks are the readable path; options go
    to torch.compile (tests use backend="aot_eager"). Returns how many blocks were compiled."""
    blocks = [m for m in module.modules() if isinstance(m, (LlamaBlock, EncoderBlock))]
    for block in blocks:
        block.compile(**options)
    return len(blocks)
