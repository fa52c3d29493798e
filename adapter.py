"""
IRA stage 2: a Perceiver adapter that turns any audio-token sequence into exactly N vectors the LLM can read.

    EnCodec codes (K x 75/s, any length) -> frozen SpeechLM, blocks 1..layer (unconditional: no text, no voice)
        -> states (B, T + K, 512) -> PerceiverAdapter -> (B, N, d_llm)
        -> [chat prefix] [N adapter vectors] [prompt] -> frozen LLM -> transcript / answer

The Perceiver idea (Jaegle et al. 2021; Flamingo's Perceiver Resampler, Alayrac et al. 2022; BLIP-2's
Q-Former, Li et al. 2023): N learned latent vectors are the queries of a cross-attention whose keys and
values are the audio states. Attention cost is N x T instead of T x T, and the output has N rows whatever T
is, so a 1 s clip and a 10 s clip both cost the LLM exactly N positions. Then L more blocks in which the
latents attend to [audio ; latents] (Flamingo's resampler): each block both re-reads the audio and lets the
latents exchange what they gathered, which beat one cross-attention followed by latent-only self-attention
(README). A last projection maps them to the LLM's width, at the scale of its token embeddings. Padded
audio is masked out of the keys, so padding cannot change the output.

Training signal (only the adapter trains; SpeechLM and LLM are frozen):
  - cross-entropy of the LLM predicting the transcript from `[adapter vectors] [prompt]`, and
  - distillation with the LLM as its own teacher (as DiVA does, Held et al. 2024): the teacher is the same LLM
    given the transcript as TEXT; the student is the LLM given the adapter vectors. Over the answer tokens,
    KL(teacher || student) = sum_v p_teacher(v) (log p_teacher(v) - log p_student(v)) pulls the whole
    next-token distribution, not just the one right token, toward what the LLM would do had it read the text.
    The end of turn is left out of the KL: only the cross-entropy says where the answer stops.
  - optionally first (--adapter.ctc_steps), a warm-up with no LLM pass: CTC of the vectors against the
    transcript's token embeddings (ctc_token_loss), so that the LLM steps start from vectors that already
    spell the words in order.

Run:
    python train.py --stage=align                       # reads the stage-1 SpeechLM from out/speechlm
    python infer.py --pipeline "turn off the lights"   # text -> SpeechLM codes -> adapter -> LLM

Simplified on purpose: one adapter layer choice (the output of one SpeechLM block), no LoRA on the LLM in
this stage, the teacher sees the transcript in place of the audio with the same instruction.
"""
import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from config import ConfigError, choose_precision
from data import Stage, normalize_text, word_error_rate
from lora import quantize_int8_
from model import AUDIO_MARKER, LayerNorm, RMSNorm, attention
from speechlm import frozen_in_precision, load_examples, load_speechlm_checkpoint, pad_stack, speak
from weights import load_llm, resolve_checkpoint

# -----------------------------------------------------------------------------
# 1. The Perceiver adapter


class CrossAttentionBlock(nn.Module):
    """Latents (B, N, C) attend to inputs (B, T, C): pre-LN cross-attention, then a GELU MLP, both residual."""

    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.q_norm, self.kv_norm, self.mlp_norm = LayerNorm(dim), LayerNorm(dim), LayerNorm(dim)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, latents, inputs, key_mask):
        B, N, C = latents.size()
        T, hs = inputs.size(1), C // self.n_heads
        q = self.q_proj(self.q_norm(latents)).view(B, N, self.n_heads, hs).transpose(1, 2)    # (B, nh, N, hs)
        kv = self.kv_norm(inputs)
        k = self.k_proj(kv).view(B, T, self.n_heads, hs).transpose(1, 2)                       # (B, nh, T, hs)
        v = self.v_proj(kv).view(B, T, self.n_heads, hs).transpose(1, 2)
        y = attention(q, k, v, mask=key_mask)                                                  # (B, nh, N, hs)
        latents = latents + self.o_proj(y.transpose(1, 2).reshape(B, N, C))
        return latents + self.fc2(F.gelu(self.fc1(self.mlp_norm(latents))))


class PerceiverAdapter(nn.Module):
    """audio states (B, T, d_audio) + lengths (B,) -> (B, n_latents, d_llm), whatever T is."""

    def __init__(self, d_audio, d_llm, n_latents=32, dim=512, n_heads=8, n_layers=2, embed_rms=1.0):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(n_latents, dim) * 0.02)          # the N learned queries
        self.in_proj = nn.Linear(d_audio, dim)
        self.cross = CrossAttentionBlock(dim, n_heads)                           # latents read the audio
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, n_heads) for _ in range(n_layers))  # [audio; latents]
        self.out_norm = LayerNorm(dim)
        self.out_proj = nn.Linear(dim, d_llm)
        # The LLM's token embeddings have a typical size (RMS 0.136 for SmolLM2-135M): start the outputs there.
        self.out_scale = RMSNorm(d_llm)
        with torch.no_grad():
            self.out_scale.weight.fill_(embed_rms)

    def forward(self, states, lengths):
        B, T, _ = states.size()
        N = self.latents.size(0)
        audio_mask = torch.arange(T, device=states.device) < lengths[:, None]                     # (B, T)
        both_mask = torch.cat([audio_mask, audio_mask.new_ones(B, N)], dim=1)                     # (B, T + N)
        audio = self.in_proj(states)                                                              # (B, T, dim)
        x = self.cross(self.latents.expand(B, -1, -1), audio, audio_mask[:, None, None, :])      # (B, N, dim)
        for block in self.blocks:
            x = block(x, torch.cat([audio, x], dim=1), both_mask[:, None, None, :])
        return self.out_scale(self.out_proj(self.out_norm(x)))                                   # (B, N, d_llm)


# -----------------------------------------------------------------------------
# 2. The losses: the LLM reads the adapter vectors (student) or the transcript (teacher)

def distillation_kl(teacher_logits, student_logits):
    """Mean over rows of KL(teacher || student) of the next-token distributions, both (n, vocab)."""
    teacher = teacher_logits.float().log_softmax(-1)
    student = student_logits.float().log_softmax(-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def token_scores(vectors, embeddings):
    """Cosine of every vector (B, N, d) with every token's embedding (V, d): (B, N, V)."""
    return F.normalize(vectors.float(), dim=-1) @ F.normalize(embeddings.float(), dim=-1).T


def ctc_token_loss(vectors, labels, embeddings, blank_id, end_id, temperature=0.05, vocab=None):
    """CTC of the N adapter vectors against the answer's tokens, with no LLM pass: the cheap warm-up.

    Each vector is read as the LLM's embedding table would "read" it: its cosine to every token's embedding,
    over `temperature`, is a distribution over the vocabulary. CTC (Graves et al. 2006) then sums over every
    way the N vectors can spell the answer in order, with `blank_id` (AlignModel's: a plain space) or a
    repeat between tokens. So the adapter learns to lay the transcript out as N vectors near
    the right token embeddings, in order: close to what the LLM reads when it is given the text. No LLM
    block runs: in a 2-core CPU's stage 2 (README) a step of 32 clips took 0.92 s, one through the LLM 5.0 s.
    vectors (B, N, d_llm); labels (B, L) as chat_example's (the answer and its end of turn, else -100).
    vocab: sorted token ids (1-D) to spell with instead of the whole table (--adapter.ctc_vocab=train): the
    softmax then runs over these rows only (index i of it is token vocab[i]), and must hold every answer token."""
    keep = (labels != -100) & (labels != end_id) & (labels != blank_id)                    # the answer's tokens
    targets, lengths = labels[keep], keep.sum(1)
    if vocab is not None:                                  # token ids -> their rows in the smaller table
        wanted = torch.cat([targets, targets.new_tensor([blank_id])])
        rows = torch.searchsorted(vocab, wanted).clamp(max=len(vocab) - 1)
        if not torch.equal(vocab[rows], wanted):
            raise ValueError("ctc_token_loss: an answer token or the blank is not in vocab")
        embeddings, targets, blank_id = embeddings[vocab], rows[:-1], int(rows[-1])
    log_probs = (token_scores(vectors, embeddings) / temperature).log_softmax(-1).transpose(0, 1)  # (N, B, V)
    N = vectors.size(1)
    return F.ctc_loss(log_probs, targets, torch.full_like(lengths, N), lengths, blank=blank_id,
                      zero_infinity=True)                    # an answer that N vectors cannot spell adds 0


def chat_example(tokenizer, user, n_audio, answer):
    """Token ids, audio mask and labels of `[chat prefix] [user text, with n_audio slots at AUDIO_MARKER]
    [answer] [end of turn]`; labels are -100 except on the answer and the end of turn."""
    before, _, after = tokenizer.chat_prompt(user).partition(AUDIO_MARKER)    # no marker: after = ""
    head, tail = tokenizer.encode(before), tokenizer.encode(after)
    answer = tokenizer.encode(answer) + [tokenizer.end_of_turn_id]
    ids = head + [tokenizer.pad_id] * n_audio + tail + answer
    audio_mask = [False] * len(head) + [True] * n_audio + [False] * (len(tail) + len(answer))
    labels = [-100] * (len(ids) - len(answer)) + answer
    return torch.tensor(ids), torch.tensor(audio_mask), torch.tensor(labels)


class AlignModel(nn.Module):
    """Frozen SpeechLM -> trainable PerceiverAdapter -> frozen LLM. forward(**batch) = CE + w * KL."""

    def __init__(self, speechlm, adapter, llm, tokenizer, speechlm_layer, distill_weight, prompt):
        super().__init__()
        self.speechlm, self.adapter, self.llm, self.tokenizer = speechlm, adapter, llm, tokenizer
        self.speechlm_layer, self.distill_weight, self.prompt = speechlm_layer, distill_weight, prompt
        self.speechlm.requires_grad_(False).eval()
        self.llm.requires_grad_(False).eval()
        self.register_buffer("ctc_vocab", None, persistent=False)   # the warm-up's token ids; None: all

    def audio_vectors(self, codes, code_lengths, states=None, state_lengths=None):
        """codes (B, K, T) -> adapter vectors (B, N, d_llm), in the adapter's dtype (fp32). Or, when given,
        the SpeechLM's states of those codes (B, T + K, C), computed earlier (cache_audio_states)."""
        if states is None:
            states, state_lengths = self.speechlm.audio_states(codes, code_lengths, self.speechlm_layer)
        return self.adapter(states.to(self.adapter.latents.dtype), state_lengths)   # frozen bf16 -> fp32

    def answer_logits(self, input_ids, labels, audio_mask=None, vectors=None):
        """The LLM's logits at the positions that predict the labelled tokens: (n_labelled, vocab)."""
        embeds = self.llm.embed_tokens(input_ids)                                  # (B, L, d_llm)
        if vectors is not None:
            embeds = embeds.masked_scatter(audio_mask[..., None], vectors.to(embeds.dtype))
        hidden = self.llm(inputs_embeds=embeds, return_hidden=True)                 # (B, L, d_llm)
        rows = labels[:, 1:] != -100                                                # position t predicts t + 1
        return self.llm.lm_head(hidden[:, :-1][rows])

    def blank_id(self):
        return (self.tokenizer.encode(" ") or [self.tokenizer.pad_id])[-1]      # a plain space

    def ctc_loss(self, vectors, labels):
        """ctc_token_loss against this LLM's embedding table."""
        return ctc_token_loss(vectors, labels, self.llm.embed_tokens.weight, self.blank_id(),
                              self.tokenizer.end_of_turn_id, vocab=self.ctc_vocab)

    @torch.no_grad()
    def spell(self, codes, code_lengths):
        """What the N vectors spell by themselves, with no LLM: each one's nearest token embedding (by
        cosine) among the warm-up's tokens, repeats merged, blanks dropped: CTC's greedy reading."""
        table, vocab = self.llm.embed_tokens.weight, self.ctc_vocab
        scores = token_scores(self.audio_vectors(codes, code_lengths), table if vocab is None else table[vocab])
        nearest, blank = scores.argmax(-1), self.blank_id()
        nearest = (nearest if vocab is None else vocab[nearest]).tolist()
        return [self.tokenizer.decode([t for n, t in enumerate(row) if t != blank and (n == 0 or t != row[n - 1])])
                .strip() for row in nearest]

    def forward(self, codes, code_lengths, input_ids, audio_mask, labels, teacher_ids, teacher_labels,
                ctc_only=False, states=None, state_lengths=None):
        vectors = self.audio_vectors(codes, code_lengths, states, state_lengths)
        if ctc_only:                                           # the warm-up steps: no LLM pass at all
            return self.ctc_loss(vectors, labels)
        student = self.answer_logits(input_ids, labels, audio_mask, vectors)
        targets = labels[:, 1:][labels[:, 1:] != -100]
        loss = F.cross_entropy(student.float(), targets)
        if self.distill_weight > 0:
            with torch.no_grad():                                                  # the same answer tokens
                teacher = self.answer_logits(teacher_ids, teacher_labels)
            # not where the end of turn comes: the teacher, having just repeated a text it was given, ends
            # its turn there with p ~0.18 and prefers a line break (12 held-out clips); pulled toward that,
            # the student ran on with the transcript again (README). Cross-entropy alone teaches the stop.
            words = targets != self.tokenizer.end_of_turn_id
            loss = loss + self.distill_weight * distillation_kl(teacher[words], student[words])
        return loss

    @torch.no_grad()
    def transcribe(self, codes, prompt=None, max_new_tokens=48):
        """One clip's codes (K, T) -> the LLM's greedy answer to `prompt` (default: the training prompt)."""
        return self.transcribe_many([codes], prompt, max_new_tokens)[0]

    @torch.no_grad()
    def transcribe_many(self, clips, prompt=None, max_new_tokens=48):
        """Several clips' codes [(K, T_i), ...] -> the LLM's greedy answers, decoded side by side. Every clip
        becomes exactly N vectors, so all the prompts have one length and need no padding. A new token reads
        all the LLM's weights once however many rows it serves (on a 2-core CPU ~230 ms for 8 rows, ~180 ms
        for 1); but a batch runs until its longest answer ends: 48 clips took 64 s in batches of 8, 123 s
        one at a time."""
        device = self.adapter.latents.device
        codes, lengths = pad_stack(clips)                                           # (B, K, T), (B,)
        vectors = self.audio_vectors(codes.to(device), lengths.to(device))          # (B, N, d_llm)
        ids, audio_mask, _ = chat_example(self.tokenizer, f"{AUDIO_MARKER}\n{prompt or self.prompt}",
                                          vectors.size(1), "")
        n_prefix = len(ids) - 1                                               # drop the empty answer's end
        embeds = self.llm.embed_tokens(ids[None, :n_prefix].to(device)).expand(len(clips), -1, -1)
        slots = audio_mask[None, :n_prefix, None].to(device)                  # the same N slots in every row
        embeds = embeds.masked_scatter(slots, vectors.to(embeds.dtype))       # (B, n_prefix, d_llm)
        eot = self.tokenizer.end_of_turn_id
        out = self.llm.generate(inputs_embeds=embeds, max_new_tokens=max_new_tokens, eos_id=eot).tolist()
        return [self.tokenizer.decode([t for t in row if t != eot]).strip() for row in out]


# -----------------------------------------------------------------------------
# 3. Stage 2 for train.py: the batches, the held-out metrics, and the stage itself

def align_batch(examples, tokenizer, n_latents, prompt):
    """Examples (speechlm.load_examples) -> AlignModel.forward's keyword arguments; with their SpeechLM
    states when every example has them (cache_audio_states)."""
    codes, code_lengths = pad_stack([e["codes"] for e in examples])
    student = [chat_example(tokenizer, f"{AUDIO_MARKER}\n{prompt}", n_latents, e["text"]) for e in examples]
    teacher = [chat_example(tokenizer, f"{e['text']}\n\n{prompt}", 0, e["text"]) for e in examples]
    pad = tokenizer.pad_id
    cached = {}
    if all("states" in e for e in examples):
        states, state_lengths = pad_stack([e["states"] for e in examples])           # (B, C, T + K)
        cached = dict(states=states.transpose(1, 2), state_lengths=state_lengths)
    return dict(codes=codes, code_lengths=code_lengths, **cached,
                input_ids=pad_stack([s[0] for s in student], pad)[0],
                audio_mask=pad_stack([s[1] for s in student], False)[0],
                labels=pad_stack([s[2] for s in student], -100)[0],
                teacher_ids=pad_stack([t[0] for t in teacher], pad)[0],
                teacher_labels=pad_stack([t[2] for t in teacher], -100)[0])


@torch.no_grad()
def cache_audio_states(align_model, examples, batch_size, device):
    """Run the frozen SpeechLM over every clip once and keep its states with the example, as fp16 (C, T + K)
    on the CPU (190 KB for a 2.5-s clip at C = 512), so that no training step pays for them again: a 2-core
    CPU took 5.5 min for 10,000 clips, which its 30-minute stage 2 then visited 20,800 times (README). All
    clips' states share one tensor, and clips are batched by length, to pad little."""
    K = align_model.speechlm.K
    ends = torch.tensor([e["codes"].size(1) + K for e in examples]).cumsum(0).tolist()   # states per clip
    store, order = None, sorted(range(len(examples)), key=lambda j: examples[j]["codes"].size(1))
    for s in tqdm(range(0, len(order), batch_size), desc="SpeechLM states", unit="batch", leave=False):
        chosen = order[s: s + batch_size]
        codes, lengths = pad_stack([examples[j]["codes"] for j in chosen])
        states, state_lengths = align_model.speechlm.audio_states(codes.to(device), lengths.to(device),
                                                                  align_model.speechlm_layer)
        if store is None:
            store = torch.empty(ends[-1], states.size(-1), dtype=torch.float16)      # (all states, C)
        for j, row, n in zip(chosen, states.half().cpu(), state_lengths.tolist()):
            start = ends[j] - n
            store[start: ends[j]] = row[:n]
            examples[j]["states"] = store[start: ends[j]].T                  # a (C, T + K) view: pad_stack pads T


def judge_generated(align_model, examples, cfg):
    """Text -> SpeechLM codes -> adapter -> LLM: how often the LLM's transcript of GENERATED speech says the
    text (WER <= 0.3), and the mean WER of those transcripts."""
    texts, heard = [e["text"] for e in examples], []
    for e in examples:
        codes = align_model.speechlm.generate(e["text_ids"], e["desc_ids"], cfg.speechlm.max_seconds,
                                              temperature=0.8, top_k=50)
        heard.append(align_model.transcribe(codes.cpu()))
    said = [word_error_rate([t], [h]) <= 0.3 for t, h in zip(texts, heard)]
    return sum(said) / max(len(said), 1), word_error_rate(texts, heard)


def build_align_model(cfg, device, log=print):
    """Frozen stage-1 SpeechLM + fresh PerceiverAdapter + frozen LLM. --system.precision applies to the
    frozen parts, as in the audio LM: SpeechLM and LLM weights in bf16/fp16, or their Linear layers in int8;
    the adapter trains in fp32 and casts at both ends (SpeechLM states in, LLM embeddings out).
    Returns the AlignModel, the tokenizer and the config (the SpeechLM's dimensions from its checkpoint)."""
    speechlm, tokenizer, cfg = load_speechlm_checkpoint(cfg.adapter.speechlm_checkpoint, cfg, log)
    dtype, int8 = choose_precision(cfg.system.precision, device, log)
    speechlm = frozen_in_precision(speechlm, dtype, int8)
    llm = load_llm(resolve_checkpoint(cfg.model.llm), dtype, cfg.model.attention)
    embed_rms = llm.embed_tokens.weight.float().pow(2).mean().sqrt().item()          # typical token size
    if int8:
        quantize_int8_(llm)
    a = cfg.adapter
    adapter = PerceiverAdapter(cfg.speechlm.d_model, llm.cfg.d_model, a.n_latents, a.d_model, a.n_heads,
                               a.n_layers, embed_rms)
    model = AlignModel(speechlm, adapter, llm, tokenizer, a.speechlm_layer, a.distill_weight, a.prompt)
    model = model.to(device)
    log(f"adapter: {cfg.adapter.n_latents} latents, {sum(p.numel() for p in adapter.parameters()) / 1e6:.1f}M "
        f"trainable parameters; reads SpeechLM block {cfg.adapter.speechlm_layer}")
    return model, tokenizer, cfg


def load_align_model(cfg, align_checkpoint, device, log=print):
    """For inference: build_align_model, then the trained adapter from a stage-2 output folder."""
    model, tokenizer, cfg = build_align_model(cfg, device, log)
    path = Path(align_checkpoint)
    file = path / "ckpt" / "model.safetensors" if (path / "ckpt").exists() else path / "model.safetensors"
    if not file.exists():
        raise ConfigError(f"{file}: no stage-2 adapter checkpoint; run python train.py --stage=align first")
    tensors = {n.removeprefix("adapter."): t for n, t in load_file(str(file)).items()
               if n.startswith("adapter.")}
    ours = model.adapter.state_dict()
    if set(tensors) != set(ours) or any(tensors[n].shape != ours[n].shape for n in ours):
        raise ConfigError(f"{file}: adapter tensors do not match the --adapter.* settings "
                          f"(n_latents, d_model, n_layers), or it predates the resampler blocks: "
                          f"run python train.py --stage=align again")
    model.adapter.load_state_dict(tensors)
    return model.eval(), tokenizer, cfg


def pipeline(align_model, codec, text, description=None, prompt=None, max_seconds=10.0, temperature=0.8,
             top_k=50, max_new_tokens=48):
    """text -> SpeechLM codes -> (waveform through the codec, and the LLM's response to the same codes
    through the adapter). Returns (waveform (samples,) at 24 kHz, response)."""
    codes, waveform = speak(align_model.speechlm, align_model.tokenizer, codec, text, description, max_seconds,
                            temperature, top_k)
    return waveform, align_model.transcribe(codes.cpu(), prompt, max_new_tokens)


def transcript_metrics(said, heard):
    """The WER over a set of clips, with companions that say what carries it: the WER of the middle clip,
    the share of answers more than twice as long as their transcript (an answer that runs on adds up to 48
    insertions, so a few of them can outweigh many good answers), and the WER of each answer's first line.
    A run-on answer is mostly the transcript, a line break, and the transcript again and again (README);
    the first line is what a reader who wants the one-line transcript would take. `wer` stays the whole
    answer's."""
    per_clip = sorted(word_error_rate([r], [h]) for r, h in zip(said, heard))
    n_words = lambda text: len(normalize_text(text).split())
    first_lines = [h.strip().split("\n")[0] for h in heard]
    return {"wer": word_error_rate(said, heard), "wer_median": per_clip[len(per_clip) // 2],
            "long_answers": sum(n_words(h) > 2 * n_words(r) for r, h in zip(said, heard)) / len(said),
            "wer_first_line": word_error_rate(said, first_lines)}


def build_align_stage(cfg, device, log=print):
    """Stage 2: SpeechLM (from stage 1) and LLM frozen; the Perceiver adapter learns to speak LLM."""
    if not 0 <= cfg.adapter.ctc_steps <= cfg.train.max_steps:
        raise ConfigError(f"--adapter.ctc_steps={cfg.adapter.ctc_steps}: choose 0 (no warm-up) up to "
                          f"--train.max_steps={cfg.train.max_steps}")
    if cfg.adapter.ctc_vocab not in ("all", "train"):
        raise ConfigError(f"--adapter.ctc_vocab={cfg.adapter.ctc_vocab}: choose all or train")
    model, tokenizer, cfg = build_align_model(cfg, device, log)
    corpus = Path(cfg.data.corpus)
    train_examples, _ = load_examples(corpus / "train.jsonl", cfg, tokenizer, log, mel=False)
    test_examples, _ = load_examples(corpus / "test.jsonl", cfg, tokenizer, log, mel=False)
    B, N, seed = cfg.train.batch_size, cfg.adapter.n_latents, cfg.system.seed
    if cfg.adapter.cache_states:
        t0 = time.time()
        cache_audio_states(model, train_examples, max(B, 32), device)
        log(f"SpeechLM states of {len(train_examples)} training clips computed once ({time.time() - t0:.0f} s)")
    if cfg.adapter.ctc_steps and cfg.adapter.ctc_vocab == "train":        # spell with the corpus's tokens only
        ids = {t for e in train_examples for t in tokenizer.encode(e["text"])} | {model.blank_id()}
        model.ctc_vocab = torch.tensor(sorted(ids), device=device)
        log(f"warm-up: CTC over the {len(ids)} tokens of the training transcripts (and the blank)")
    # train.py numbers micro-batch i of step s (s * grad_accum + micro) * world + rank: the warm-up's steps
    # are the first ctc_steps * per_step batches, however many GPUs and micro-batches a step has
    per_step = cfg.train.grad_accum * int(os.environ.get("WORLD_SIZE", 1))

    def batch(i):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + i)                # a pure function of i
        chosen = torch.randint(len(train_examples), (B,), generator=generator).tolist()
        return dict(align_batch([train_examples[j] for j in chosen], tokenizer, N, cfg.adapter.prompt),
                    ctc_only=i < cfg.adapter.ctc_steps * per_step)

    def evaluate(net=None):
        net = model if net is None else net
        was_training = net.training
        net.eval()
        held_out = test_examples[: cfg.train.eval_samples]
        with torch.no_grad():
            parts = [align_batch(held_out[s: s + B], tokenizer, N, cfg.adapter.prompt)
                     for s in range(0, len(held_out), B)]
            losses = [net(**{k: v.to(device) for k, v in p.items()}).item() for p in parts]
            heard, spelled = [], []
            for s in tqdm(range(0, len(held_out), B), desc="eval: transcribing", unit="batch", leave=False):
                heard += net.transcribe_many([e["codes"] for e in held_out[s: s + B]])
            said = [e["text"] for e in held_out]
            metrics = {"test_loss": sum(losses) / len(losses), **transcript_metrics(said, heard)}
            out = Path(cfg.train.out_dir)                         # every answer of the last evaluation
            out.mkdir(parents=True, exist_ok=True)
            (out / "answers.jsonl").write_text("".join(json.dumps({"said": r, "heard": h}) + "\n"
                                                       for r, h in zip(said, heard)))
            for r, h in list(zip(said, heard))[:2]:
                log(f"  {r!r} -> {h!r}")
            if cfg.adapter.ctc_steps:                  # what the vectors spell alone (CTC's greedy reading)
                for p in parts:
                    spelled += net.spell(p["codes"].to(device), p["code_lengths"].to(device))
                metrics["ctc_wer"] = word_error_rate(said, spelled)
            if cfg.adapter.eval_generate:
                metrics["generated_said"], metrics["generated_wer"] = judge_generated(
                    net, test_examples[: cfg.adapter.eval_generate], cfg)
        net.train(was_training)
        net.speechlm.eval(), net.llm.eval()
        return metrics

    return Stage(model, batch, evaluate, tokens=lambda b: int(b["input_ids"].numel()))
