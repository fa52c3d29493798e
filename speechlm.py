"""
IRA stage 1: a SpeechLM that speaks in EnCodec tokens, and a CLIP-style VoiceEncoder that tells it whose voice.

    text ("turn off the lights") + voice description ("a slow, low-pitched male voice")
        -> SpeechLM (8 causal blocks over [voice] [text tokens] [audio codes]) -> EnCodec codes (K x 75/s)
        -> EnCodec decoder -> 24 kHz waveform

The audio side comes from data.py (section 5): EnCodec 24 kHz turns a waveform into K parallel streams of
codes, 75 frames per second, 1024 entries per codebook (1.5 kbps = 2 codebooks = 150 tokens per second),
once per corpus, stored beside the manifest; `data.load_codec_for` turns codes back into a waveform.

Reading order (each section uses only the ones above it):
  1. The delay pattern (MusicGen, Copet et al. 2023). One transformer step predicts all K codebooks of a
     column at once; codebook k is shifted right by k steps, so codebook k of frame t is predicted after
     codebooks < k of frame t are already known (they came one step earlier). For K = 3, T = 4 frames:

            step:   0    1    2    3    4    5            a/b/c = codebooks 0/1/2, digits = frames
        book 0:    a0   a1   a2   a3   .    .             "." = PAD, the filler of the empty corners
        book 1:    .    b0   b1   b2   b3   .
        book 2:    .    .    c0   c1   c2   c3            T frames -> T + K - 1 steps, exactly invertible

  2. VoiceEncoder (CLIP, Radford et al. 2021; voice descriptions as in Parler-TTS, Lyth & King 2024): a small
     text encoder over the description and a small audio encoder over the codes (or log-mel:
     --speechlm.voice_audio), both projected into one space and trained with a symmetric InfoNCE loss at a
     learned temperature. Clips whose descriptions are the same text count as positives of each other (a
     batch often holds two "slow male British" clips).
  3. SpeechLM: Llama blocks (model.LlamaBlock: RMSNorm, RoPE, SwiGLU) over
     `[voice embedding] [text tokens of the LLM's tokenizer] [BOS] [delayed code columns]`, one embedding
     table and one output head per codebook (a column's input is the sum of its K embeddings), cross-entropy
     on audio positions only. A frame of END codes marks the end of speech, so generate() knows when to stop.
     With probability `uncond_prob` the voice and text are dropped (classifier-free-guidance style): the
     model then also knows audio on its own, which is how the adapter (adapter.py) reads it.
  4. Stage 1 for train.py: micro-batches (a pure function of their number), the model's loss, evaluation.

Run:
    python train.py --stage=speechlm                      # encodes corpus codes once, then trains
    python infer.py --speak "turn off the lights" --voice "a fast, high-pitched female voice" --out out.wav

Simplified on purpose: EnCodec's weights cannot be downloaded everywhere; without them the codec runs
UNTRAINED (seeded encoder, k-means codebooks, see data.py section 4): its codes still tokenize audio, but
decoded audio is noise. No classifier-free guidance at sampling time, no prompt audio (voice cloning),
batch-1 generation.
"""
import json
import math
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from config import ConfigError, choose_device, choose_precision
from corpus import describe_voice
from data import (CODEBOOK_SIZE, CODEC_FRAME_RATE, MEL_BINS, MEL_FRAME_RATE, Stage, encode_manifest_codes,
                  encode_manifest_mels, encoder_features, n_codebooks, read_codes, read_manifest, read_mels)
from lora import quantize_int8_
from model import (AudioLM, EncoderBlock, KVCache, LayerNorm, LlamaBlock, LlamaConfig, RMSNorm, WhisperConfig,
                   rope_tables, sample_next_token)
from weights import Tokenizer, load_whisper_encoder, read_config, resolve_checkpoint

# -----------------------------------------------------------------------------
# 1. The delay pattern: K codebooks interleaved one step apart (see the picture in the docstring)

PAD, BOS, END = CODEBOOK_SIZE, CODEBOOK_SIZE + 1, CODEBOOK_SIZE + 2   # ids after the 1024 codes
CODE_VOCAB = CODEBOOK_SIZE + 3                                         # embedding rows / head outputs per book


def apply_delay(codes, pad=PAD):
    """(..., K, T) -> (..., K, T + K - 1): codebook k moves k steps right; the corners are `pad`."""
    K, T = codes.shape[-2:]
    out = codes.new_full((*codes.shape[:-1], T + K - 1), pad)
    for k in range(K):
        out[..., k, k: k + T] = codes[..., k, :]
    return out


def undo_delay(delayed):
    """(..., K, S) -> (..., K, S - K + 1): the exact inverse of apply_delay."""
    K, S = delayed.shape[-2:]
    return torch.stack([delayed[..., k, k: k + S - K + 1] for k in range(K)], dim=-2)


# -----------------------------------------------------------------------------
# 2. VoiceEncoder: descriptions and audio in one space, CLIP-style

def masked_mean(x, lengths):
    """x (B, T, C), lengths (B,) -> (B, C): the mean over each row's first `length` positions."""
    keep = (torch.arange(x.size(1), device=x.device) < lengths[:, None]).to(x.dtype)[..., None]   # (B, T, 1)
    return (x * keep).sum(1) / keep.sum(1).clamp(min=1)


def info_nce(audio, text, logit_scale, same=None):
    """Symmetric InfoNCE over a batch of unit vectors audio (B, D), text (B, D). Row i's positives are the
    columns j with same[i, j] (default: only j = i); the target spreads evenly over them."""
    logits = logit_scale.exp() * (audio @ text.T).float()                        # (B, B) cosine * 1/temperature
    same = torch.eye(len(audio), dtype=torch.bool, device=audio.device) if same is None else same
    target = same.float() / same.float().sum(1, keepdim=True)                    # (B, B) rows sum to 1
    audio_to_text = -(target * logits.log_softmax(1)).sum(1).mean()
    text_to_audio = -(target.T * logits.T.log_softmax(1)).sum(1).mean()
    return (audio_to_text + text_to_audio) / 2


class VoiceEncoder(nn.Module):
    """embed_text(description ids) and embed_audio(codes or log-mel) -> unit vectors (B, dim) in one space.

    The audio tower hears `audio_input`: "codes" (the SpeechLM's own EnCodec codes, K embeddings summed per
    frame, 75 frames/s) or "mel" (80-bin log-mel at 100 frames/s through a 3-tap convolution, as Whisper's
    first layer). Either way a stride-4 convolution then shortens time (18.75 or 25 positions/s). Only the
    text tower is used when speaking; the audio tower exists to teach it, so its input is a free choice."""

    def __init__(self, text_vocab, n_codebooks, dim=256, n_layers=2, n_heads=4, max_text=64, max_frames=1024,
                 audio_input="codes"):
        super().__init__()
        if audio_input not in ("codes", "mel"):
            raise ConfigError(f"--speechlm.voice_audio={audio_input}: choose codes or mel")
        block_cfg = WhisperConfig(d_model=dim, n_layers=n_layers, n_heads=n_heads, ffn_dim=4 * dim)
        self.max_text, self.stride, self.audio_input = max_text, 4, audio_input
        self.text_embed = nn.Embedding(text_vocab, dim)
        self.text_pos = nn.Embedding(max_text, dim)
        self.text_blocks = nn.ModuleList(EncoderBlock(block_cfg) for _ in range(n_layers))
        self.text_norm, self.text_proj = LayerNorm(dim), nn.Linear(dim, dim, bias=False)
        if audio_input == "codes":
            self.code_embed = nn.ModuleList(nn.Embedding(CODEBOOK_SIZE, dim) for _ in range(n_codebooks))
        else:
            self.mel_in = nn.Conv1d(MEL_BINS, dim, kernel_size=3, padding=1)     # sees 30 ms per frame
        self.audio_down = nn.Conv1d(dim, dim, kernel_size=self.stride, stride=self.stride)   # 75 -> 18.75 /s
        self.audio_pos = nn.Embedding(max_frames // self.stride + 1, dim)
        # small, as GPT-2's positions: nn.Embedding's N(0, 1) is ~5x the convolutions' output and drowns the
        # voice in where-am-I; 300 voice-only steps on the speaker corpus: 58-59% top-1 with N(0, 1), 74-76%
        nn.init.normal_(self.audio_pos.weight, std=0.02)            # with this (README, the VoiceEncoder)
        self.audio_blocks = nn.ModuleList(EncoderBlock(block_cfg) for _ in range(n_layers))
        self.audio_norm, self.audio_proj = LayerNorm(dim), nn.Linear(dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))      # CLIP's initial temperature

    def _encode(self, x, lengths, blocks, norm, proj):
        key_mask = (torch.arange(x.size(1), device=x.device) < lengths[:, None])[:, None, None, :]  # (B,1,1,T)
        for block in blocks:
            x = block(x, key_mask)
        return F.normalize(proj(masked_mean(norm(x), lengths)), dim=-1)           # (B, dim), unit length

    def embed_text(self, ids, lengths):
        """ids (B, L) description tokens, right-padded -> (B, dim)."""
        ids, lengths = ids[:, : self.max_text], lengths.clamp(max=self.max_text)
        x = self.text_embed(ids) + self.text_pos.weight[: ids.size(1)]           # (B, L, dim)
        return self._encode(x, lengths, self.text_blocks, self.text_norm, self.text_proj)

    def embed_audio(self, audio, lengths):
        """audio right-padded, codes (B, K, T) (any id < 1024 in the padding) or log-mel (B, 80, T), as
        `audio_input` says; lengths (B,) frames -> (B, dim)."""
        if self.audio_input == "codes":
            x = sum(embed(audio[:, k].clamp(max=CODEBOOK_SIZE - 1)) for k, embed in enumerate(self.code_embed))
            x = x.transpose(1, 2)                                                # (B, T, dim) -> (B, dim, T)
        else:
            x = F.gelu(self.mel_in(audio))                                       # (B, 80, T) -> (B, dim, T)
        x = x * (torch.arange(x.size(2), device=x.device) < lengths[:, None])[:, None]   # padding -> 0, as
        x = F.pad(x, (0, (-x.size(2)) % self.stride))       # this: T -> a multiple of 4 (a clip alone = padded)
        x = self.audio_down(x).transpose(1, 2)                                   # (B, T / 4, dim)
        x = x + self.audio_pos.weight[: x.size(1)]
        return self._encode(x, (lengths + self.stride - 1) // self.stride, self.audio_blocks, self.audio_norm,
                            self.audio_proj)

    def loss(self, audio, audio_lengths, desc_ids, desc_lengths, same=None):
        return info_nce(self.embed_audio(audio, audio_lengths), self.embed_text(desc_ids, desc_lengths),
                        self.logit_scale.clamp(max=math.log(100)), same)        # temperature >= 0.01


# -----------------------------------------------------------------------------
# 3. SpeechLM: [voice] [text] [BOS] [delayed code columns] -> next column, one head per codebook

def speechlm_llama_config(cfg, max_positions):
    """The Llama-block dimensions of a SpeechLMConfig (multi-head attention: as many kv heads as heads)."""
    return LlamaConfig(vocab_size=CODE_VOCAB, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                       n_kv_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim, rope_theta=10000.0, norm_eps=1e-5,
                       max_positions=max_positions)


class SpeechLM(nn.Module):
    def __init__(self, cfg, text_vocab, n_codebooks, max_text=64, whisper_dim=0):
        super().__init__()
        self.K, self.max_text = n_codebooks, max_text
        max_frames = int(cfg.max_seconds * CODEC_FRAME_RATE)                       # 750 for 10 s
        self.lcfg = speechlm_llama_config(cfg, max_positions=1 + max_text + max_frames + n_codebooks + 1)
        voice_frames = max_frames if cfg.voice_audio == "codes" else int(cfg.max_seconds * MEL_FRAME_RATE)
        self.voice = VoiceEncoder(text_vocab, n_codebooks, cfg.voice_dim, cfg.voice_layers,
                                  max_frames=voice_frames, audio_input=cfg.voice_audio)
        self.voice_proj = nn.Linear(cfg.voice_dim, cfg.d_model)                  # shared space -> one position
        # the voice slot when unconditional; random, not zero: RMSNorm's gradient at 0 is 1/sqrt(eps) = 316
        self.null_voice = nn.Parameter(0.02 * torch.randn(cfg.d_model))
        self.text_embed = nn.Embedding(text_vocab, cfg.d_model)
        self.code_embed = nn.ModuleList(nn.Embedding(CODE_VOCAB, cfg.d_model) for _ in range(n_codebooks))
        self.blocks = nn.ModuleList(LlamaBlock(self.lcfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, 1e-5)
        self.heads = nn.ModuleList(nn.Linear(cfg.d_model, CODE_VOCAB, bias=False) for _ in range(n_codebooks))
        # the hearing loss's read-out: audio-only states -> Whisper encoder frames (only when it trains)
        self.whisper_head = nn.Linear(cfg.d_model, whisper_dim) if whisper_dim else None
        cos, sin = rope_tables(self.lcfg.head_dim, self.lcfg.max_positions, self.lcfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for name, p in self.named_parameters():                                   # GPT-2's small init
            if p.dim() == 2 and not name.startswith("voice."):
                nn.init.normal_(p, std=0.02)

    def embed_columns(self, columns):
        """columns (B, K, S) of code ids -> (B, S, C): the K embeddings of each column summed (MusicGen)."""
        return sum(embed(columns[:, k]) for k, embed in enumerate(self.code_embed))

    def voice_vector(self, desc_ids, desc_lengths, uncond):
        """(B, C): the projected description embedding (not trained by this loss), or null_voice."""
        with torch.no_grad():
            voice = self.voice.embed_text(desc_ids, desc_lengths)                  # (B, voice_dim)
        return torch.where(uncond[:, None], self.null_voice, self.voice_proj(voice))

    def run(self, x, cache=None, stop_after=None):
        """x (B, T, C) -> hidden states (B, T, C) after the final norm, or, with stop_after=n, the raw output
        of block n (1-based; what the adapter reads). With a cache, x continues the cached positions."""
        start = cache.length if cache is not None else 0
        cos, sin = self.rope_cos[start: start + x.size(1)], self.rope_sin[start: start + x.size(1)]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i)
            if stop_after == i + 1:
                return x
        if cache is not None:
            cache.length += x.size(1)
        return self.norm(x)

    def sequence(self, voice, text_ids, text_lengths, audio_in, audio_lengths):
        """Right-padded input embeddings (B, T, C) of [voice] [text] [audio columns], and the position of
        each row's first audio column (B,). audio_in (B, K, A) starts with the BOS column."""
        text, audio = self.text_embed(text_ids), self.embed_columns(audio_in)     # (B, L, C), (B, A, C)
        rows = [torch.cat([voice[b, None], text[b, : text_lengths[b]], audio[b, : audio_lengths[b]]])
                for b in range(len(voice))]
        T = max(len(r) for r in rows)
        x = torch.stack([F.pad(r, (0, 0, 0, T - len(r))) for r in rows])          # (B, T, C)
        return x, 1 + text_lengths

    def forward(self, desc_ids, desc_lengths, uncond, text_ids, text_lengths, audio_in, audio_targets,
                audio_lengths):
        """Mean cross-entropy over the audio targets (B, K, A) that are not -100; text positions have none."""
        voice = self.voice_vector(desc_ids, desc_lengths, uncond)
        x, audio_start = self.sequence(voice, text_ids, text_lengths, audio_in, audio_lengths)
        hidden = self.run(x)                                                         # (B, T, C)
        A = audio_in.size(2)
        where = (audio_start[:, None] + torch.arange(A, device=x.device)).clamp(max=x.size(1) - 1)  # (B, A)
        hidden = hidden.gather(1, where[..., None].expand(-1, -1, hidden.size(2)))   # (B, A, C) audio rows
        losses = [F.cross_entropy(head(hidden).flatten(0, 1).float(), audio_targets[:, k].flatten(),
                                  ignore_index=-100, reduction="sum") for k, head in enumerate(self.heads)]
        return sum(losses) / (audio_targets != -100).sum().clamp(min=1)

    def audio_only(self, audio_in, layer):
        """Teacher-forcing columns audio_in (B, K, A) alone (unconditional: null voice, no text) through
        blocks 1..layer -> the states at the audio columns (B, A, C)."""
        x = torch.cat([self.null_voice.expand(audio_in.size(0), 1, -1), self.embed_columns(audio_in)], dim=1)
        return self.run(x, stop_after=layer)[:, 1:]

    @torch.no_grad()
    def audio_states(self, codes, lengths, layer):
        """The adapter's view of audio: codes (B, K, T) through audio_only. Returns the states at the audio
        columns (B, T + K, C) and how many of them are real (lengths + K: BOS, the T + K - 1 delayed columns;
        each column holds frame t's codebook 0 next to frame t - k's codebook k). Right padding and causal
        attention: padding changes nothing."""
        audio_in, _ = audio_columns(codes, lengths)                                  # (B, K, T + K)
        return self.audio_only(audio_in, layer), lengths + self.K                   # (B, T + K, C), (B,)

    def whisper_loss(self, audio_in, audio_lengths, whisper, whisper_lengths, layer, lag):
        """The hearing loss: the audio-only states of block `layer` predict a frozen Whisper encoder's output
        for the same clip, whisper (B, W, D) at 50 frames/s, right-padded, whisper_lengths (B,).

        Column j has heard codec frames < j (75/s). It predicts the Whisper frame at the centre of codec
        frame j - 1 - lag, so a causal state hears `lag` frames (lag / 75 s) past what it describes, as
        Whisper itself, which sees the whole clip, does. Targets are layer-normed per frame (mean 0,
        variance 1 over D, as data2vec's), so predicting all zeros scores 1.0: the loss is the share of
        the teacher's variance still unexplained. Mean squared error over real columns and frames."""
        states = self.audio_only(audio_in, layer)                                     # (B, A, C)
        A = states.size(1)
        frame = torch.arange(A, device=states.device) - 1 - lag                       # (A,) codec frame
        w = torch.div(2 * frame + 1, 3, rounding_mode="floor")                        # its Whisper frame
        target = F.layer_norm(whisper[:, w.clamp(0, whisper.size(1) - 1)].float(), (whisper.size(2),))
        real = ((frame >= 0) & (torch.arange(A, device=w.device) < audio_lengths[:, None])
                & (w < whisper_lengths[:, None]))                                     # (B, A)
        error = (self.whisper_head(states).float() - target).pow(2).mean(-1)         # (B, A)
        return (error * real).sum() / real.sum().clamp(min=1)

    def allowed(self, step, k, ended_at):
        """Which ids codebook k may take at delayed step `step`: PAD in the delay corners (before the
        codebook starts, after its END), END only as codebook 0's way to stop, otherwise a code."""
        if step < k or (ended_at is not None and step >= ended_at + k):
            return "pad"
        return "code_or_end" if k == 0 else "code"

    @torch.no_grad()
    def generate(self, text_ids, desc_ids=None, max_seconds=10.0, temperature=1.0, top_k=None):
        """One utterance: text_ids (L,) + description ids (Ld,) or None -> codes (K, T), with a KV cache.
        Greedy at temperature 0. Codebook 0 ends the speech with END (forced at max_seconds); K - 1 more
        steps then finish the other codebooks' delayed tails."""
        device = self.null_voice.device
        uncond = torch.tensor([desc_ids is None], device=device)
        desc = desc_ids if desc_ids is not None else torch.zeros(1, dtype=torch.long)
        voice = self.voice_vector(desc[None].to(device), torch.tensor([len(desc)], device=device), uncond)
        bos = torch.full((1, self.K, 1), BOS, device=device)
        x, _ = self.sequence(voice, text_ids[None].to(device), torch.tensor([len(text_ids)], device=device),
                             bos, torch.tensor([1], device=device))
        max_frames = int(max_seconds * CODEC_FRAME_RATE)
        cache = KVCache(self.lcfg, 1, x.size(1) + max_frames + self.K, device, x.dtype)
        hidden, columns, ended_at = self.run(x, cache)[:, -1], [], None              # (1, C)
        for step in range(max_frames + self.K):
            column = torch.empty(self.K, dtype=torch.long, device=device)
            for k, head in enumerate(self.heads):
                rule = self.allowed(step, k, ended_at)
                if rule == "pad":
                    column[k] = PAD
                    continue
                banned = torch.arange(CODE_VOCAB, device=device) >= CODEBOOK_SIZE        # PAD, BOS, END
                if rule == "code_or_end":
                    banned[END] = False
                logits = head(hidden).float().masked_fill(banned, float("-inf"))        # (1, CODE_VOCAB)
                column[k] = sample_next_token(logits, temperature, top_k)[0]
            if ended_at is None and (column[0] == END or step == max_frames):
                column[0], ended_at = END, step                                     # frame `step` is END
            columns.append(column)
            if ended_at is not None and step == ended_at + self.K - 1:
                break
            hidden = self.run(self.embed_columns(column[None, :, None]), cache)[:, -1]
        delayed = torch.stack(columns, dim=1)                                        # (K, T + K)
        return undo_delay(delayed)[:, :ended_at]                                     # (K, T): END frame dropped


def audio_columns(codes, lengths):
    """Teacher-forcing inputs and targets for codes (B, K, T) right-padded, lengths (B,) frames:
    append one END frame, delay, then inputs = [BOS column] + columns[:-1], targets = columns with the
    PAD corners and the padding set to -100. Both (B, K, T + K); a row has lengths + K real columns."""
    B, K, T = codes.shape
    frame = torch.arange(T + 1, device=codes.device)
    ext = torch.cat([codes, torch.zeros_like(codes[..., :1])], dim=-1)               # (B, K, T + 1)
    ext = torch.where(frame == lengths[:, None, None], END, ext)                      # END after the last frame
    ext = torch.where(frame > lengths[:, None, None], PAD, ext)                       # padding
    delayed = apply_delay(ext)                                                        # (B, K, T + K)
    inputs = torch.cat([torch.full_like(delayed[..., :1], BOS), delayed[..., :-1]], dim=-1)
    targets = delayed.masked_fill(delayed == PAD, -100)
    return inputs, targets


# -----------------------------------------------------------------------------
# 4. Stage 1 for train.py: the examples, micro-batches, the training loss and the held-out metrics

def describe(row):
    """A row's voice description: the corpus's own (`voice_description`), else made from its voice."""
    if row.get("voice_description") or row.get("description"):
        return row.get("voice_description") or row["description"]
    return describe_voice(row["voice"])


def load_examples(manifest_path, cfg, tokenizer, log=print, whisper=None, mel=None):
    """The transcribe rows of a manifest with their codes (encoded now if not yet on disk) and token ids,
    with `mel` their log-mel (also made once; by default when --speechlm.voice_audio=mel, which only stage 1's
    VoiceEncoder hears), and with `whisper` ({audio path: Whisper encoder frames}, whisper_features: the
    hearing loss's targets) their frames. Clips longer than speechlm.max_seconds are left out."""
    rows = [r for r in read_manifest(manifest_path) if r["task"] == "transcribe"]
    device = "cuda" if choose_device(cfg.system.device, log=lambda *a: None).type == "cuda" else "cpu"
    encode_manifest_codes(manifest_path, cfg.speechlm.bandwidth, cfg.speechlm.codec, log, device=device)
    codes, info = read_codes(manifest_path, [r["audio"] for r in rows], cfg.speechlm.bandwidth)
    mels = [None] * len(rows)
    if cfg.speechlm.voice_audio == "mel" if mel is None else mel:   # what the VoiceEncoder's audio tower hears
        encode_manifest_mels(manifest_path, log)
        mels = read_mels(manifest_path, [r["audio"] for r in rows])                  # each (80, frames)
    frames = [whisper[r["audio"]] if whisper else None for r in rows]                # each (frames, D)
    max_frames = int(cfg.speechlm.max_seconds * CODEC_FRAME_RATE)
    examples = [{"text": r["text"], "description": describe(r), "codes": c,
                 "text_ids": torch.tensor(tokenizer.encode(r["text"])[:64]),
                 "desc_ids": torch.tensor(tokenizer.encode(describe(r))[:64]),
                 **({"mel": m} if m is not None else {}), **({"whisper": w} if w is not None else {})}
                for r, c, m, w in zip(rows, codes, mels, frames) if c.size(1) <= max_frames]
    log(f"{manifest_path}: {len(examples)} clips ({len(rows) - len(examples)} longer than "
        f"{cfg.speechlm.max_seconds} s left out), codes by {info['codec']} ({info['fingerprint']})")
    return examples, info


def whisper_features(cfg, log=print):
    """{audio path: the frozen Whisper encoder's (model.encoder) output (frames, D) fp16} for the transcribe
    clips of the corpus's train and test manifests, the hearing loss's targets. Computed once into
    <corpus>/cache/<encoder>-native.safetensors, the audio LM's own encoder cache (train.py --stage=asr):
    whichever stage runs first fills it for both. The encoder runs on the CPU, under bf16 autocast with
    --system.precision=bf16 (a CPU with AMX does bf16 matmuls several times faster than fp32)."""
    corpus = Path(cfg.data.corpus)
    rows = [r for split in ("train", "test") for r in read_manifest(corpus / f"{split}.jsonl")
            if r["task"] == "transcribe"]
    path = resolve_checkpoint(cfg.model.encoder)
    cache = corpus / "cache" / f"{path.name}-native.safetensors"
    log(f"hearing loss: targets from {path.name}, cached in {cache}")
    teacher = AudioLM(load_whisper_encoder(path), projector=None, llm=None, tokenizer=None)   # mel + encode
    bf16 = cfg.system.precision == "bf16"
    with torch.autocast("cpu", torch.bfloat16) if bf16 else nullcontext():
        return encoder_features(teacher, rows, cache)


def pad_stack(tensors, value=0):
    """Right-pad 1-D (or (K, T)) tensors along their last axis and stack; also return the lengths."""
    T = max(t.size(-1) for t in tensors)
    return (torch.stack([F.pad(t, (0, T - t.size(-1)), value=value) for t in tensors]),
            torch.tensor([t.size(-1) for t in tensors]))


def speech_batch(examples, uncond=None):
    """Examples -> the SpeechLM's keyword arguments (see SpeechLM.forward). uncond (B,) bool: drop the
    voice and the text of these rows."""
    uncond = torch.zeros(len(examples), dtype=torch.bool) if uncond is None else uncond
    text = [torch.zeros(0, dtype=torch.long) if u else e["text_ids"] for e, u in zip(examples, uncond)]
    text_ids, text_lengths = pad_stack(text)
    desc_ids, desc_lengths = pad_stack([e["desc_ids"] for e in examples])
    codes, code_lengths = pad_stack([e["codes"] for e in examples])                   # (B, K, T)
    audio_in, audio_targets = audio_columns(codes, code_lengths)
    whisper = {}
    if all("whisper" in e for e in examples):                  # the hearing loss's targets, (B, W, D)
        features, lengths = pad_stack([e["whisper"].T for e in examples])
        whisper = dict(whisper_features=features.transpose(1, 2), whisper_lengths=lengths)
    return dict(desc_ids=desc_ids, desc_lengths=desc_lengths, uncond=uncond, text_ids=text_ids,
                text_lengths=text_lengths, audio_in=audio_in, audio_targets=audio_targets,
                audio_lengths=code_lengths + codes.size(1), **whisper)


def voice_batch(examples, audio="codes"):
    """Examples -> VoiceEncoder.loss's keyword arguments, with same-description rows as positives.
    audio: the examples' input the audio tower hears, "codes" or "mel" (the VoiceEncoder's audio_input)."""
    audio, audio_lengths = pad_stack([e[audio] for e in examples])         # (B, K, T) codes or (B, 80, T) mel
    desc_ids, desc_lengths = pad_stack([e["desc_ids"] for e in examples])
    names = [e["description"] for e in examples]
    same = torch.tensor([[a == b for b in names] for a in names])
    return dict(audio=audio, audio_lengths=audio_lengths, desc_ids=desc_ids, desc_lengths=desc_lengths,
                same=same)


def lm_arguments(batch):
    """SpeechLM.forward's own arguments out of a stage-1 batch: without the VoiceEncoder's `voice_*` and the
    hearing loss's `whisper_*` entries."""
    return {k: v for k, v in batch.items() if not k.startswith(("voice_", "whisper_"))}


class SpeechLMTraining(nn.Module):
    """Stage 1's loss: the SpeechLM's code-token cross-entropy + voice_weight * the VoiceEncoder's InfoNCE
    (+ whisper_weight * the hearing loss, SpeechLM.whisper_loss, when the batch brings Whisper targets).

    voice_only: the InfoNCE alone, and only the VoiceEncoder trains (a quick way to tune voice retrieval).
    autocast: None (fp32), or torch.bfloat16 / torch.float16 (--system.precision): the step's matmuls run
    in that dtype under torch.autocast while the weights, the gradients and AdamW's update stay fp32. Every
    weight of stage 1 trains, so a 16-bit copy of them would lose small updates to rounding; autocast keeps
    the fp32 master weights and casts on the fly. Norms, softmax and the losses stay fp32 either way."""

    def __init__(self, speechlm, voice_weight, voice_only=False, autocast=None, whisper_weight=0.0,
                 whisper_layer=4, whisper_lag=25):
        super().__init__()
        self.speechlm, self.voice_weight = speechlm, voice_weight
        self.voice_only, self.autocast = voice_only, autocast
        self.whisper_weight, self.whisper_layer, self.whisper_lag = whisper_weight, whisper_layer, whisper_lag
        if voice_only:
            speechlm.requires_grad_(False)
            speechlm.voice.requires_grad_(True)

    def forward(self, **batch):
        """batch: SpeechLM.forward's arguments, and VoiceEncoder.loss's with a `voice_` prefix."""
        voice = {k.removeprefix("voice_"): v for k, v in batch.items() if k.startswith("voice_")}
        device_type = self.speechlm.null_voice.device.type
        with torch.autocast(device_type, self.autocast) if self.autocast else nullcontext():
            if self.voice_only:
                return self.speechlm.voice.loss(**voice)
            loss = self.speechlm(**lm_arguments(batch)) + self.voice_weight * self.speechlm.voice.loss(**voice)
            if self.whisper_weight > 0 and "whisper_features" in batch:
                loss = loss + self.whisper_weight * self.hearing_loss(batch)
            return loss

    def hearing_loss(self, batch):
        return self.speechlm.whisper_loss(batch["audio_in"], batch["audio_lengths"], batch["whisper_features"],
                                          batch["whisper_lengths"], self.whisper_layer, self.whisper_lag)


def build_speechlm(cfg, log=print):
    """A fresh SpeechLM for a Config, and the LLM's tokenizer it reads text with."""
    llm_path = resolve_checkpoint(cfg.model.llm)
    tokenizer = Tokenizer(llm_path)
    whisper_dim = 0
    if cfg.speechlm.whisper_weight > 0:                           # the hearing loss's read-out head
        if not 1 <= cfg.speechlm.whisper_layer <= cfg.speechlm.n_layers:
            raise ConfigError(f"--speechlm.whisper_layer={cfg.speechlm.whisper_layer}: choose a block in "
                              f"1..{cfg.speechlm.n_layers}")
        whisper_dim = read_config(resolve_checkpoint(cfg.model.encoder))["d_model"]
    speechlm = SpeechLM(cfg.speechlm, read_config(llm_path)["vocab_size"], n_codebooks(cfg.speechlm.bandwidth),
                        whisper_dim=whisper_dim)
    n = sum(p.numel() for p in speechlm.parameters())
    log(f"SpeechLM: {cfg.speechlm.n_layers} layers x {cfg.speechlm.d_model}, {speechlm.K} codebooks, "
        f"text tokens of {llm_path.name}: {n / 1e6:.1f}M parameters")
    return speechlm, tokenizer


def load_speechlm_checkpoint(path, cfg, log=print):
    """The stage-1 SpeechLM from a train.py output folder (`<path>/ckpt/model.safetensors`, or a folder
    holding model.safetensors). Its dimensions come from the checkpoint's own config when it has one."""
    path = Path(path)
    folder = path / "ckpt" if (path / "ckpt" / "model.safetensors").exists() else path
    fix = "train stage 1 first (python train.py --stage=speechlm) or set --adapter.speechlm_checkpoint=<folder>"
    if not (folder / "model.safetensors").exists():
        raise ConfigError(f"{path}: no stage-1 SpeechLM checkpoint (model.safetensors) there; {fix}")
    for meta_file, key in ((folder / "meta.json", "config"), (path / "config.json", None)):
        if meta_file.exists():
            saved = json.loads(meta_file.read_text())
            saved = saved[key] if key else saved
            if saved["speechlm"].get("voice_only"):
                raise ConfigError(f"{path}: trained with --speechlm.voice_only=True, so it holds the "
                                  f"VoiceEncoder alone; {fix}")
            saved["speechlm"].setdefault("voice_audio", "codes")           # written before voice_audio existed
            saved["speechlm"].setdefault("whisper_weight", 0.0)            # before the hearing loss: no head
            cfg = replace(cfg, speechlm=replace(cfg.speechlm, **saved["speechlm"]))
            break
    speechlm, tokenizer = build_speechlm(cfg, log)
    tensors = {name.removeprefix("speechlm."): t
               for name, t in load_file(str(folder / "model.safetensors")).items()}
    ours = speechlm.state_dict()
    missing, unexpected = sorted(set(ours) - set(tensors)), sorted(set(tensors) - set(ours))
    bad = [n for n in ours if n in tensors and tensors[n].shape != ours[n].shape]
    if missing or unexpected or bad:
        what = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                else f"{bad[0]} has shape {tuple(tensors[bad[0]].shape)}, needs {tuple(ours[bad[0]].shape)}")
        raise ConfigError(f"{folder / 'model.safetensors'}: not this SpeechLM's weights ({what}); {fix}")
    speechlm.load_state_dict(tensors)
    log(f"SpeechLM: loaded {len(tensors)} tensors from {folder}")
    return speechlm, tokenizer, cfg


def frozen_in_precision(speechlm, dtype, int8):
    """A SpeechLM that no longer trains (stage 2, inference) in the run's --system.precision, as the frozen
    Whisper and LLM are: weights cast to `dtype` (bf16/fp16 halve memory and use the GPU's fast matmuls),
    or with int8 every Linear stored as weight-only int8 (lora.quantize_int8_; embeddings stay float)."""
    speechlm = speechlm.to(dtype).requires_grad_(False).eval()
    return quantize_int8_(speechlm) if int8 else speechlm


def speak(speechlm, tokenizer, codec, text, description=None, max_seconds=10.0, temperature=0.8, top_k=50):
    """text (+ a voice description) -> (codes (K, T), waveform (T * 320,) at 24 kHz through the codec)."""
    desc = torch.tensor(tokenizer.encode(description)) if description else None
    codes = speechlm.generate(torch.tensor(tokenizer.encode(text)), desc, max_seconds, temperature, top_k)
    waveform = codec.decode(codes.cpu()) if codes.size(1) else torch.zeros(0)
    return codes, waveform


def unigram_loss(train_examples, test_batch):
    """Baseline: cross-entropy of the test targets under each codebook's training frequencies (add-one)."""
    targets = speech_batch(train_examples)["audio_targets"]                           # (B, K, A)
    total, n = 0.0, 0
    for k in range(targets.size(1)):
        counts = torch.bincount(targets[:, k][targets[:, k] != -100], minlength=CODE_VOCAB).float() + 1
        log_p = (counts / counts.sum()).log()
        test = test_batch["audio_targets"][:, k]
        total, n = total - log_p[test[test != -100]].sum().item(), n + int((test != -100).sum())
    return total / n


@torch.no_grad()
def voice_retrieval(voice_encoder, examples, candidates=16, seed=0):
    """Top-1 accuracy of picking a clip's own description among `candidates` distinct descriptions
    (its own + others drawn at random from the held-out set). Chance is 1 / candidates."""
    names = sorted({e["description"] for e in examples})
    if len(names) < 2:
        return float("nan")
    candidates = min(candidates, len(names))
    device = next(voice_encoder.parameters()).device
    desc_ids, desc_lengths = pad_stack([next(e["desc_ids"] for e in examples if e["description"] == n)
                                        for n in names])
    text = voice_encoder.embed_text(desc_ids.to(device), desc_lengths.to(device))   # (n_names, D)
    generator, hits = torch.Generator().manual_seed(seed), 0
    for start in range(0, len(examples), 32):
        chunk = examples[start: start + 32]
        inputs, lengths = pad_stack([e[voice_encoder.audio_input] for e in chunk])  # codes or log-mel
        audio = voice_encoder.embed_audio(inputs.to(device), lengths.to(device))    # (b, D)
        for e, a in zip(chunk, audio):
            own = names.index(e["description"])
            others = [i for i in torch.randperm(len(names), generator=generator).tolist() if i != own]
            pool = torch.tensor([own] + others[: candidates - 1])
            hits += int((text[pool.to(device)] @ a).argmax() == 0)
    return hits / len(examples)


def build_speechlm_stage(cfg, device, log=print):
    """Stage 1: train the VoiceEncoder and the SpeechLM on the corpus's transcribe rows (with
    --speechlm.voice_only=True, the VoiceEncoder alone). --system.precision bf16/fp16: autocast, see
    SpeechLMTraining; int8 quantizes frozen weights only, and stage 1 has none, so it runs fp32."""
    speechlm, tokenizer = build_speechlm(cfg, log)
    corpus = Path(cfg.data.corpus)
    hears = cfg.speechlm.whisper_weight > 0 and not cfg.speechlm.voice_only    # voice_only has no hearing loss
    whisper = whisper_features(cfg, log) if hears else None                      # one cache read
    train_examples, _ = load_examples(corpus / "train.jsonl", cfg, tokenizer, log, whisper)
    test_examples, _ = load_examples(corpus / "test.jsonl", cfg, tokenizer, log, whisper)
    dtype, int8 = choose_precision(cfg.system.precision, device, log=lambda *a: None)   # train.py said which
    if int8:
        log("precision: stage 1 trains every weight and int8 is for frozen ones: running fp32")
    if dtype == torch.float16:
        log("precision: fp16 autocast, no loss scaling: very small gradients may round to 0; bf16 is safer")
    sl = cfg.speechlm
    model = SpeechLMTraining(speechlm, sl.voice_weight, sl.voice_only, dtype if dtype != torch.float32 else None,
                             sl.whisper_weight, sl.whisper_layer, sl.whisper_lag)
    B, Bv, seed = cfg.train.batch_size, cfg.speechlm.voice_batch_size, cfg.system.seed
    audio = cfg.speechlm.voice_audio                                             # "codes" or "mel"

    def batch(i):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + i)              # a pure function of i
        chosen = torch.randint(len(train_examples), (B,), generator=generator).tolist()
        uncond = torch.rand(B, generator=generator) < cfg.speechlm.uncond_prob
        voice = torch.randint(len(train_examples), (Bv,), generator=generator).tolist()
        voice_part = voice_batch([train_examples[j] for j in voice], audio)
        voice_part = {f"voice_{k}": v for k, v in voice_part.items()}                # one flat dict of tensors
        if cfg.speechlm.voice_only:                                   # the same voice clips a full run draws
            return voice_part
        return {**speech_batch([train_examples[j] for j in chosen], uncond), **voice_part}

    if not cfg.speechlm.voice_only:
        unigram = unigram_loss(train_examples[:500], speech_batch(test_examples[: cfg.train.eval_samples]))

    def evaluate(net=None):
        net = model if net is None else net
        lm, was_training = net.speechlm, net.training
        net.eval()
        with torch.no_grad():
            metrics = {"voice_top1": voice_retrieval(lm.voice, test_examples[: 4 * cfg.train.eval_samples])}
            if cfg.speechlm.voice_only:                                    # no SpeechLM trained: that is all
                net.train(was_training)
                return metrics
            parts = [{k: v.to(device) for k, v in speech_batch(test_examples[s: s + B]).items()}
                     for s in range(0, cfg.train.eval_samples, B)]
            losses = [(lm(**lm_arguments(p)).item(), int((p["audio_targets"] != -100).sum()))
                      for p in parts]                                                 # (mean, n targets)
            metrics = {"code_loss": sum(l * n for l, n in losses) / sum(n for _, n in losses),
                       "unigram_loss": unigram, **metrics}
            if sl.whisper_weight > 0:              # share of Whisper's variance not yet heard (zeros: 1.0)
                hearing = [net.hearing_loss(p).item() for p in parts]
                metrics["whisper_loss"] = sum(hearing) / len(hearing)
            ratios = []
            for e in test_examples[: cfg.speechlm.eval_generate]:                     # does it speak and stop?
                codes = lm.generate(e["text_ids"], e["desc_ids"], cfg.speechlm.max_seconds, temperature=0.8,
                                    top_k=50)
                ratios.append(codes.size(1) / e["codes"].size(1))
            if ratios:
                metrics["generated_length_ratio"] = sum(ratios) / len(ratios)
        net.train(was_training)
        return metrics

    length_key = "voice_audio_lengths" if cfg.speechlm.voice_only else "audio_lengths"   # for tokens/s
    return Stage(model, batch, evaluate, tokens=lambda b: int(b[length_key].sum()),
                 lr_scale={"speechlm.voice.": sl.voice_lr / cfg.train.lr})          # its own learning rate
