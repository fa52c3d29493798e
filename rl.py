"""
IRA stage 3: Reinforced Behaviour Alignment. PPO in which the LLM judges the SpeechLM's speech.

    prompt (text + voice description) -> policy SpeechLM samples code columns -> codes (K, T)
        -> judge: frozen reference SpeechLM states -> frozen adapter -> frozen LLM
        -> reward = mean log p_LLM(prompt text | adapter vectors)      "does the speech say the text?"
                    (+ voice_weight * cosine(VoiceEncoder(codes), VoiceEncoder(description)))

The players: the policy is the stage-1 SpeechLM plus a linear value head on its last hidden states (actor
and critic share the trunk); the reference is a frozen copy of the stage-1 SpeechLM, and it is also what the
stage-2 adapter reads, so the policy cannot change how the judge hears; the judge is the frozen adapter + LLM.
One action is one delayed column: at step s the policy picks codebook 0 of frame s, codebook 1 of frame s - 1,
... (speechlm.py's delay pattern); entries forced to PAD in the corners are not actions. Each iteration runs
the numbered stages of the loop (section 6), in the style of cleanrl's ppo.py (Huang et al. 2022):
  1. Rollout: sample columns for a batch of prompts with a KV cache; then one teacher-forced pass gives each
     step's log-probability under the policy ("old") and the reference, and the value.
  2. Score: the judge's score of each utterance, minus the mean score of the same prompt's other samples (a
     baseline that depends only on the prompt leaves the best policy unchanged), divided by the batch's spread,
     so the KL coefficient is in units of "one standard deviation of judge score".
  3. Rewards: r_t = -beta (log pi(a_t) - log pi_ref(a_t)) / T at each of the T steps, + the score at the
     last one (Ziegler et al. 2019, per column rather than summed); beta fixed or moved toward a KL target.
  4. Advantages: GAE (Schulman et al. 2016), the reversed loop, whitened over the batch.
  5. PPO epochs over shuffled minibatches (Schulman et al. 2017): clipped policy loss, clipped value loss,
     entropy bonus; the epochs stop early once approx-KL(old || new) passes a limit, and an iteration whose
     rollouts are already too far from the reference (KL above kl_stop) makes no update at all.
  6. Log judge reward (mean, std), KL to the reference, clip fraction, approx-KL, entropy and value loss; the
     held-out judge reward before and after; log.jsonl, rl.svg, an atomic checkpoint, an exact `--resume`.
Every hyper-parameter is a field of config.RLConfig (`--rl.key=value`), documented there.

Run:
    python train.py --stage=rl                # or: python rl.py   (reads out/speechlm and out/align)
    python train.py --stage=rl --resume       # continue out/rl exactly where it stopped

Simplified on purpose: a rollout batch holds prompts with the same number of text tokens, so batched sampling
needs no padding mask (SpeechLM.run has none); one constant learning rate; the whole policy trunk trains (or,
with --rl.lora_r, only LoRA updates of its projections), its text embeddings and VoiceEncoder stay frozen; the
judge is a fixed frozen model, not a learned reward model; scores are normalised per batch, not by statistics
kept across iterations; with --system.precision=bf16 the rollouts come from a bf16 copy of the policy while
PPO's log-probs come from its autocast pass, so sampling and training differ by rounding (mixed_precision).
"""
import copy
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

import config
from adapter import align_batch, load_align_model
from checkpoint import CheckpointCorrupt, load_checkpoint, optimizer_from_tensors, save_checkpoint
from data import CODEBOOK_SIZE, CODEC_FRAME_RATE
from lora import LoRALinear, apply_lora
from model import KVCache
from speechlm import BOS, CODE_VOCAB, END, PAD, load_examples, load_speechlm_checkpoint, pad_stack, undo_delay
from weights import CheckpointError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")   # rl.lora_r
BANNED = -1e9   # log-space "impossible": finite, because 0 * -inf = nan would poison the entropy's gradient

# -----------------------------------------------------------------------------
# 1. The policy: SpeechLM + value head, and the log-probability of whole rollouts in one pass


class Policy(nn.Module):
    """The actor (a SpeechLM) and the critic (one value per column, read from the same hidden states)."""

    def __init__(self, speechlm):
        super().__init__()
        self.speechlm = speechlm
        self.value_head = nn.Linear(speechlm.lcfg.d_model, 1)
        nn.init.zeros_(self.value_head.weight), nn.init.zeros_(self.value_head.bias)   # V = 0 = mean score


def mixed_precision(cfg, device):
    """--system.precision for the policy -> (autocast, sampler dtype). bf16 / fp16: the policy's passes run
    under autocast (fp32 master weights and Adam, as stage 1), and rollouts sample from a 16-bit copy of it
    (`sampler`): in a rollout every step reads all the weights for one column, and casting them anew each
    step made bf16 sampling twice as slow as fp32 on a CPU. The copy's distribution differs from the
    autocast pass's by rounding only; PPO's old log-probs come from that pass, so the first ratio stays 1.
    fp32 and int8 (whose int8 is the frozen reference's): no autocast, rollouts from the policy itself."""
    dtype, _ = config.choose_precision(cfg.system.precision, device, log=lambda *a: None)
    if dtype == torch.float32:
        return nullcontext, dtype
    return (lambda: torch.autocast(device.type, dtype)), dtype


def sampler(speechlm, dtype):
    """The policy's SpeechLM as rollouts read it: itself in fp32; otherwise a frozen copy in `dtype` with the
    LoRA updates folded into the weights (LoRALinear.merge), made afresh after each update."""
    if dtype == torch.float32:
        return speechlm
    snapshot = copy.deepcopy(speechlm)
    for module in snapshot.modules():
        if isinstance(module, LoRALinear):
            module.merge()
    return snapshot.to(dtype).requires_grad_(False).eval()


def code_log_probs(logits, k, temperature):
    """Codebook k's logits (..., CODE_VOCAB) -> the policy's log-probs at `temperature`: codes only, and END
    for codebook 0 (SpeechLM.generate's rule)."""
    ids = torch.arange(CODE_VOCAB, device=logits.device)
    banned = (ids >= CODEBOOK_SIZE) & ((ids != END) if k == 0 else True)            # PAD, BOS (, END)
    return (logits.float() / temperature).masked_fill(banned, BANNED).log_softmax(-1)


def free_mask(steps, k, ended, max_frames):
    """True where codebook k is sampled at delayed step `steps`, for rows whose codebook 0 said END at step
    `ended`; False where it is forced: PAD in the delay corners, END at max_frames (SpeechLM.allowed)."""
    last = ended if k == 0 else ended + k - 1                                        # codebook k's last frame
    free = (steps >= k) & (steps <= last)
    return free & (steps != max_frames) if k == 0 else free


def prompt_batch(prompts, device):
    """Prompts with the same number of text tokens -> text_ids (B, L), desc_ids (B, Ld), desc_lengths (B,)."""
    desc_ids, desc_lengths = pad_stack([p["desc_ids"] for p in prompts])
    return dict(text_ids=torch.stack([p["text_ids"] for p in prompts]).to(device),
                desc_ids=desc_ids.to(device), desc_lengths=desc_lengths.to(device))


def rollout_batch(prompts, columns, ended, max_frames):
    """Prompts + sampled columns (B, K, S) + END steps (B,) -> what a teacher-forced pass needs: the inputs
    (BOS, then each column one step late), the targets, which entries were sampled, which steps are real."""
    K, S = columns.shape[1:]
    steps = torch.arange(S, device=columns.device)
    free = torch.stack([free_mask(steps, k, ended[:, None], max_frames) for k in range(K)], 1)   # (B, K, S)
    return dict(**prompt_batch(prompts, columns.device), columns=columns, free=free,
                audio_in=torch.cat([torch.full_like(columns[..., :1], BOS), columns[..., :-1]], -1),
                mask=free.any(1).float())                                            # (B, S): 1 on real steps


def policy_outputs(speechlm, batch, temperature, value_head=None):
    """One teacher-forced pass -> the log-prob of each sampled column (B, S), its entropy (B, S), the value
    (B, S) or None, and each codebook's full log-probs, K x (B, S, CODE_VOCAB), for exact KLs."""
    B, K, S = batch["columns"].shape
    L = batch["text_ids"].size(1)
    voice = speechlm.voice_vector(batch["desc_ids"], batch["desc_lengths"],
                                  torch.zeros(B, dtype=torch.bool, device=batch["columns"].device))
    x, _ = speechlm.sequence(voice, batch["text_ids"], torch.full((B,), L), batch["audio_in"],
                             torch.full((B,), S))                                   # [voice] [L text] [S audio]
    hidden = speechlm.run(x)[:, 1 + L:]                                              # (B, S, C) audio positions
    log_prob, entropy, full = 0, 0, []
    for k, head in enumerate(speechlm.heads):
        lp = code_log_probs(head(hidden), k, temperature)                            # (B, S, V)
        taken = lp.gather(-1, batch["columns"][:, k, :, None])[..., 0]               # (B, S)
        free = batch["free"][:, k]
        log_prob = log_prob + torch.where(free, taken, 0.0)                          # log p(column) = sum_k
        entropy = entropy - torch.where(free, (lp.exp() * lp).sum(-1), 0.0)
        full.append(lp)
    values = value_head(hidden)[..., 0].float() if value_head is not None else None     # fp32 if autocast
    return log_prob, entropy, values, full


def exact_kl(policy_full, reference_full, free):
    """KL(policy || reference) of each step's column distribution (B, S), summed over the sampled codebooks:
    sum_v p(v) (log p(v) - log q(v)), exact over the actions (no noise from which code was drawn)."""
    return sum(torch.where(free[:, k], (lp.exp() * (lp - lq)).sum(-1), 0.0)
               for k, (lp, lq) in enumerate(zip(policy_full, reference_full)))


# -----------------------------------------------------------------------------
# 2. Rollout: batched sampling with a KV cache, as SpeechLM.generate does for one utterance

@torch.no_grad()
def sample_rollouts(speechlm, prompts, max_frames, temperature, generator):
    """Prompts of equal text length -> columns (B, K, S) in the delay layout (PAD where forced), the step at
    which each row's codebook 0 said END (B,), and the sampling-time log-probs (B, S). Greedy at 0."""
    device, B, K = speechlm.null_voice.device, len(prompts), speechlm.K
    batch = prompt_batch(prompts, device)
    voice = speechlm.voice_vector(batch["desc_ids"], batch["desc_lengths"],
                                  torch.zeros(B, dtype=torch.bool, device=device))             # (B, C)
    L, bos, ones = batch["text_ids"].size(1), torch.full((B, K, 1), BOS, device=device), torch.ones(B).long()
    x, _ = speechlm.sequence(voice, batch["text_ids"], torch.full((B,), L), bos, ones)   # [voice] [text] [BOS]
    cache = KVCache(speechlm.lcfg, B, x.size(1) + max_frames + K, device, x.dtype)
    hidden = speechlm.run(x, cache)[:, -1]                                           # (B, C) predicts step 0
    not_yet = max_frames + K + 1                                                     # "has not said END"
    ended = torch.full((B,), not_yet, device=device)
    columns, log_probs = [], []
    for step in range(max_frames + K):
        column, log_prob = torch.full((B, K), PAD, device=device), torch.zeros(B, device=device)
        for k, head in enumerate(speechlm.heads):
            free = free_mask(torch.tensor(step, device=device), k, ended, max_frames)          # (B,)
            lp = code_log_probs(head(hidden), k, temperature or 1.0)                          # (B, V)
            code = (lp.argmax(-1) if temperature == 0 else
                    torch.multinomial(lp.exp(), 1, generator=generator)[:, 0])
            column[:, k] = torch.where(free, code, PAD)
            log_prob += torch.where(free, lp.gather(1, code[:, None])[:, 0], 0.0)
        stop = (ended == not_yet) & ((column[:, 0] == END) | (step == max_frames))  # END said, or forced
        column[:, 0] = torch.where(stop, END, column[:, 0])
        ended = torch.where(stop, step, ended)
        columns.append(column), log_probs.append(log_prob)
        if (ended < not_yet).all() and step >= ended.max() + max(K - 2, 0):          # every row's last action
            break
        hidden = speechlm.run(speechlm.embed_columns(column[:, :, None]), cache)[:, -1]
    return torch.stack(columns, -1), ended, torch.stack(log_probs, -1)              # (B, K, S), (B,), (B, S)


def columns_to_codes(columns, ended):
    """(B, K, S) delayed columns -> one (K, T) code tensor per row: its frames before END."""
    return [undo_delay(c)[:, :int(e)].cpu() for c, e in zip(columns, ended)]


def choose_prompts(prompts, n_prompts, samples_per_prompt, generator):
    """n_prompts prompts with as many text tokens as a random one, each repeated samples_per_prompt times
    in a row: n_prompts * samples_per_prompt prompts, grouped by prompt. The draws are made on the
    generator's own device (torch refuses a CUDA generator for a CPU tensor)."""
    device = generator.device
    first = prompts[int(torch.randint(len(prompts), (1,), generator=generator, device=device))]
    bucket = [p for p in prompts if len(p["text_ids"]) == len(first["text_ids"])]
    picks = torch.randint(len(bucket), (n_prompts,), generator=generator, device=device).tolist()
    return [bucket[i] for i in picks for _ in range(samples_per_prompt)]


# -----------------------------------------------------------------------------
# 3. Score: the judge (frozen adapter + LLM, hearing through the frozen reference's states)

@torch.no_grad()
def judge_text_scores(align_model, codes, texts, chunk=16):
    """The mean log-probability per token that the LLM gives each text (and its end of turn) after reading
    the adapter vectors of its codes, as in stage 2's training: (B,) nats per token, higher is better."""
    device, scores = align_model.adapter.latents.device, []
    for i in range(0, len(codes), chunk):
        examples = [{"codes": c, "text": t} for c, t in zip(codes[i: i + chunk], texts[i: i + chunk])]
        batch = align_batch(examples, align_model.tokenizer, align_model.adapter.latents.size(0),
                            align_model.prompt)
        batch = {k: v.to(device) for k, v in batch.items()}
        vectors = align_model.audio_vectors(batch["codes"], batch["code_lengths"])  # (b, N, d_llm)
        logits = align_model.answer_logits(batch["input_ids"], batch["labels"], batch["audio_mask"], vectors)
        labelled = batch["labels"][:, 1:] != -100                                   # (b, L - 1): answer tokens
        targets = batch["labels"][:, 1:][labelled]                                  # (n,) all rows, flat
        token_lp = logits.float().log_softmax(-1).gather(1, targets[:, None])[:, 0]
        scores += [lp.mean() for lp in token_lp.split(labelled.sum(1).tolist())]  # back to rows
    return torch.stack(scores).cpu()


def make_judge(align_model, voice_weight):
    """score(codes, prompts) -> {"reward", "judge_text"[, "judge_voice"]}, each (B,). The voice term is the
    cosine of the frozen reference's VoiceEncoder embeddings of the codes and of the description."""
    voice_encoder = align_model.speechlm.voice
    hears_codes = voice_encoder.audio_input == "codes"
    if voice_weight and not hears_codes:
        raise config.ConfigError("--rl.voice_weight needs a VoiceEncoder that hears codes; this stage-1 one "
                                 "hears log-mel (--speechlm.voice_audio=mel): set --rl.voice_weight=0")

    @torch.no_grad()
    def score(codes, prompts):
        text = judge_text_scores(align_model, codes, [p["text"] for p in prompts])
        if not hears_codes:
            return {"reward": text, "judge_text": text}
        device = voice_encoder.logit_scale.device
        padded, lengths = pad_stack([c if c.size(1) else torch.zeros(c.size(0), 1, dtype=torch.long)
                                     for c in codes])                               # (B, K, T), >= 1 frame
        desc_ids, desc_lengths = pad_stack([p["desc_ids"] for p in prompts])
        audio = voice_encoder.embed_audio(padded.to(device), lengths.to(device))   # (B, D) unit vectors
        text_side = voice_encoder.embed_text(desc_ids.to(device), desc_lengths.to(device))
        voice = (audio * text_side).sum(-1).float().cpu()                           # cosine similarity
        return {"reward": text + voice_weight * voice, "judge_text": text, "judge_voice": voice}
    return score


# -----------------------------------------------------------------------------
# 4. Rewards, advantages and the two clipped losses

def centre_scores(scores, samples_per_prompt):
    """(B,) scores grouped by prompt -> each minus the mean of the same prompt's OTHER samples (leave-one-out:
    unbiased), over the batch's std. With one sample per prompt, only the division."""
    G = samples_per_prompt
    if G > 1:
        groups = scores.view(-1, G)                                                  # (n_prompts, G)
        scores = (groups - (groups.sum(1, keepdim=True) - groups) / (G - 1)).view(-1)
    return scores / (scores.std() + 1e-8) if len(scores) > 1 else scores


def per_step_rewards(scores, log_prob, reference_log_prob, mask, kl_coef):
    """r_t = -beta (log pi(a_t) - log pi_ref(a_t)) / T on each of an utterance's T columns, + the score on the
    last one: the utterance pays beta x its mean KL per column. A plain sum charges every extra column, and
    the policy learned to stop talking (measured here: 3.4 s -> 1.1-1.3 s of speech in 20 iterations)."""
    rewards = -kl_coef * (log_prob - reference_log_prob) * mask / mask.sum(1, keepdim=True)   # (B, S)
    last = mask.sum(1).long() - 1                                                    # (B,) last real step
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.device)
    return rewards


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation; rewards, values, mask (B, S), each row's real steps a prefix:
    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  V = 0 after the end.
    Returns advantages and returns = advantages + values, both 0 after the end. With lam < 1 a score paid at
    the last column reaches column t scaled by lam^(T - t): see config.RLConfig.gae_lambda."""
    values = values * mask
    advantages, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        next_value = values[:, t + 1] if t + 1 < rewards.size(1) else 0.0
        delta = rewards[:, t] * mask[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running                                      # 0 until a row's end
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, advantages + values


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x, mask):
    """(x - mean) / std over the real steps; 0 elsewhere."""
    mean = masked_mean(x, mask)
    std = masked_mean((x - mean) ** 2, mask).sqrt()
    return (x - mean) / (std + 1e-8) * mask


def clipped_policy_loss(log_prob, old_log_prob, advantages, mask, clip):
    """PPO's surrogate: mean of max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = pi / pi_old per step. Once r has
    moved past 1 +- eps in the direction A favours, the clipped term wins and the gradient is 0.
    Returns (loss, ratio, clip fraction, approx-KL(old || new) = mean((r - 1) - log r))."""
    log_ratio = log_prob - old_log_prob
    ratio = log_ratio.exp()
    loss = masked_mean(torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)), mask)
    clip_fraction = masked_mean(((ratio - 1).abs() > clip).float(), mask)
    approx_kl = masked_mean((ratio - 1) - log_ratio, mask)                          # >= 0, low variance
    return loss, ratio, clip_fraction.detach(), approx_kl.detach()


def clipped_value_loss(values, old_values, returns, mask, clip):
    """0.5 mean of max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, -eps, eps)."""
    if clip <= 0:
        return 0.5 * masked_mean((values - returns) ** 2, mask)
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


# -----------------------------------------------------------------------------
# 5. Held-out evaluation and the picture

@torch.no_grad()
def evaluate(policy, reference, prompts, score, cfg, seed, reference_temperature=None):
    """rl.eval_samples seeded samples per held-out prompt (before and after RL draw the same random numbers):
    the judge's reward (per prompt, the mean over its samples), the exact KL to the reference per column,
    and the length of the speech. The policy samples at rl.temperature, and the reference is read at it too
    unless reference_temperature says otherwise (scripts/rl_temperature.py)."""
    device, max_frames = policy.value_head.weight.device, int(cfg.rl.max_seconds * CODEC_FRAME_RATE)
    n, (mixed, dtype) = cfg.rl.eval_samples, mixed_precision(cfg, device)
    speaker = sampler(policy.speechlm, dtype)
    generator, by_length = torch.Generator(device).manual_seed(seed), {}
    for i, p in enumerate(prompts):                                                 # equal text length batches
        by_length.setdefault(len(p["text_ids"]), []).extend([(i, p)] * n)
    codes, ordered, kl, steps = [], [], 0.0, 0.0
    for group in [g[i: i + 16] for g in by_length.values() for i in range(0, len(g), 16)]:
        group_prompts = [p for _, p in group]
        columns, ended, _ = sample_rollouts(speaker, group_prompts, max_frames, cfg.rl.temperature, generator)
        batch = rollout_batch(group_prompts, columns, ended, max_frames)
        with mixed():
            full = policy_outputs(policy.speechlm, batch, cfg.rl.temperature)[3]
        full_ref = policy_outputs(reference, batch, reference_temperature or cfg.rl.temperature)[3]
        kl += float((exact_kl(full, full_ref, batch["free"]) * batch["mask"]).sum())
        steps += float(batch["mask"].sum())
        codes, ordered = codes + columns_to_codes(columns, ended), ordered + group
    scores = score(codes, [p for _, p in ordered])
    which = torch.tensor([i for i, _ in ordered])                                   # sample -> its prompt
    per_prompt = {k: torch.zeros(len(prompts)).index_add_(0, which, v.float().cpu()) / n
                  for k, v in scores.items()}
    frames = sum(c.size(1) for c in codes) / len(codes)
    reward = per_prompt["reward"]
    metrics = {"eval_reward": reward.mean().item(), "eval_reward_std": reward.std().item(),
               "eval_kl": kl / steps, "eval_seconds": frames / CODEC_FRAME_RATE}
    metrics.update({f"eval_{k}": v.mean().item() for k, v in per_prompt.items() if k != "reward"})
    metrics["eval_rewards"] = [round(r, 5) for r in reward.tolist()]              # per prompt, a fixed order
    return metrics


def write_curves(rows, path, kl_target):
    """An SVG: the judge reward of each iteration's rollouts, above their KL to the reference and its target."""
    rows = [r for r in rows if "reward" in r]
    W, H, pad = 640, 220, 44
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{2 * H}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>']
    for top, key, colour, target in ((0, "reward", "steelblue", None), (H, "kl", "darkorange", kl_target)):
        xs, ys = [r["iteration"] for r in rows], [r[key] for r in rows] + ([target] if target else [])
        if not xs:
            break
        x0, x1, y0, y1 = min(xs), max(max(xs), min(xs) + 1), min(ys), max(max(ys), min(ys) + 1e-6)
        to_x = lambda x: pad + (x - x0) / (x1 - x0) * (W - 2 * pad)                 # data -> pixels
        to_y = lambda y: top + H - pad - (y - y0) / (y1 - y0) * (H - 2 * pad)
        points = " ".join(f"{to_x(x):.1f},{to_y(y):.1f}" for x, y in zip(xs, ys))
        svg += [f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>',
                f'<text x="{pad}" y="{top + 16}" fill="{colour}">{key}, {y0:.4g} .. {y1:.4g}</text>',
                f'<line x1="{pad}" y1="{top + H - pad}" x2="{W - pad}" y2="{top + H - pad}" stroke="black"/>']
        if target:
            svg.append(f'<line x1="{pad}" y1="{to_y(target):.1f}" x2="{W - pad}" y2="{to_y(target):.1f}" '
                       f'stroke="gray" stroke-dasharray="4"/>')
    Path(path).write_text("\n".join(svg + ["</svg>"]))


# -----------------------------------------------------------------------------
# 6. The loop: rollout, score, rewards, advantages, PPO epochs, log

def train_rl(cfg, policy, reference, train_prompts, score, out_dir, eval_prompts=(), resume=False, log=print):
    """PPO on `policy` (a Policy) held near the frozen `reference`, rewarded by score(codes, prompts).
    Returns the log rows (also written to out_dir/log.jsonl)."""
    r, out_dir = cfg.rl, Path(out_dir)
    device, max_frames = policy.value_head.weight.device, int(r.max_seconds * CODEC_FRAME_RATE)
    B = r.prompts_per_iteration * r.samples_per_prompt                               # rollouts per iteration
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=r.lr, eps=1e-5,                           # cleanrl's eps
                                 fused=device.type in ("cuda", "cpu"))              # one kernel, as train.py
    mixed, dtype = mixed_precision(cfg, device)                     # autocast, and the rollouts' weights' dtype
    generator = torch.Generator(device).manual_seed(cfg.system.seed)              # prompts, samples, shuffles
    start, kl_coef, rows = 0, r.kl_coef, []
    if resume:   # policy, optimizer, iteration, beta and the sampler's RNG: an exact continuation
        tensors, meta, optimizer_tensors = load_checkpoint(out_dir / "ckpt")
        ours = policy.state_dict()
        if set(tensors) != set(ours) or any(tensors[n].shape != ours[n].shape for n in ours):
            raise config.ConfigError(f"{out_dir}/ckpt holds another policy's tensors; resume with the same "
                                     f"--preset and checkpoints, or start afresh without --resume")
        policy.load_state_dict(tensors)
        optimizer_from_tensors(optimizer, optimizer_tensors, meta["optimizer"])
        start, kl_coef = meta["iteration"], meta["kl_coef"]
        generator.set_state(torch.tensor(meta["generator"], dtype=torch.uint8))
        rows = [row for row in map(json.loads, open(out_dir / "log.jsonl")) if row["iteration"] <= start]
        log(f"resumed from {out_dir}/ckpt at iteration {start}")
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(out_dir / "log.jsonl", "w")                 # rows after the checkpoint's iteration go
    log_file.writelines(json.dumps(row) + "\n" for row in rows)

    def write(row):
        rows.append(row)
        log_file.write(json.dumps(row) + "\n"), log_file.flush()

    def save(iteration):
        meta = {"iteration": iteration, "kl_coef": kl_coef, "config": cfg.to_dict(),
                "generator": generator.get_state().tolist()}
        save_checkpoint(out_dir / "ckpt", policy.state_dict(), meta, optimizer)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    def evaluate_and_log(iteration):
        t0 = time.time()
        metrics = evaluate(policy, reference, eval_prompts, score, cfg, cfg.system.seed + 1)
        row = {"iteration": iteration, **metrics, "eval_wall_s": round(time.time() - t0, 2)}
        log(f"held-out at iteration {iteration}: judge reward {row['eval_reward']:.4f} (std "
            f"{row['eval_reward_std']:.4f} over {len(eval_prompts)} prompts x {r.eval_samples}), KL to "
            f"reference {row['eval_kl']:.4f} nats/column, {row['eval_seconds']:.2f} s of speech")
        write(row)

    if eval_prompts and start == 0:
        evaluate_and_log(0)                                                          # the policy before RL
    bar = tqdm(range(start, r.iterations), initial=start, total=r.iterations, desc="rl", unit="iter",
               dynamic_ncols=True)
    for iteration in bar:
        t0 = time.time()
        # 1. rollout. The old and reference log-probs and the values come from the same teacher-forced pass
        # PPO trains with, run on the first epoch's minibatches: its first minibatch has a ratio of exactly 1
        prompts = choose_prompts(train_prompts, r.prompts_per_iteration, r.samples_per_prompt, generator)
        columns, ended, _ = sample_rollouts(sampler(policy.speechlm, dtype), prompts, max_frames, r.temperature,
                                            generator)
        batch = rollout_batch(prompts, columns, ended, max_frames)
        mask, S = batch["mask"], columns.size(-1)
        orders = [torch.randperm(B, generator=generator, device=device) for _ in range(r.epochs)]
        split = lambda order: [order[i: i + r.minibatch_size] for i in range(0, B, r.minibatch_size)]
        old_log_prob, ref_log_prob, old_values, kl = (torch.zeros(B, S, device=device) for _ in range(4))
        with torch.no_grad():
            for idx in split(orders[0]):
                part = {k: v[idx] for k, v in batch.items()}
                with mixed():
                    old_log_prob[idx], _, old_values[idx], full = policy_outputs(
                        policy.speechlm, part, r.temperature, policy.value_head)
                ref_log_prob[idx], _, _, full_ref = policy_outputs(reference, part, r.temperature)
                kl[idx] = exact_kl(full, full_ref, part["free"])                     # (b, S) nats per column
        mean_kl = masked_mean(kl, mask).item()                                       # nats per column
        t_sampled = time.time()

        # 2. score: the judge's reward, centred per prompt and scaled
        scores = score(columns_to_codes(columns, ended), prompts)
        centred = centre_scores(scores["reward"], r.samples_per_prompt)

        # 3. rewards: the KL penalty at every column (its mean over the utterance), the score at the last
        rewards = per_step_rewards(centred, old_log_prob, ref_log_prob, mask, kl_coef)

        # 4. advantages: GAE, whitened
        advantages, returns = gae(rewards, old_values, mask, r.gamma, r.gae_lambda)
        advantages = whiten(advantages, mask)

        # 5. PPO epochs over minibatches; stop once the policy has moved too far from the rollouts' one. The
        # KL brake: no update at all while the policy is already too far from the reference (the penalty of
        # step 3 only pulls back on average; this bounds it), so the next rollouts come from the same policy
        braked = r.kl_stop > 0 and mean_kl > r.kl_stop
        stats, first_ratio_error, t_scored = [], None, time.time()
        for idx in ([] if braked else (idx for order in orders for idx in split(order))):
            part, m = {k: v[idx] for k, v in batch.items()}, mask[idx]
            with mixed():
                log_prob, entropy, values, _ = policy_outputs(policy.speechlm, part, r.temperature,
                                                              policy.value_head)
            policy_loss, ratio, clip_fraction, approx_kl = clipped_policy_loss(
                log_prob, old_log_prob[idx], advantages[idx], m, r.clip)
            if first_ratio_error is None:                                            # 0.0, else a PPO bug
                first_ratio_error = ((ratio - 1).abs() * m).max().item()
            value_loss = clipped_value_loss(values, old_values[idx], returns[idx], m, r.value_clip)
            entropy = masked_mean(entropy, m)
            loss = policy_loss + r.value_coef * value_loss - r.entropy_coef * entropy
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if r.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, r.grad_clip)
            optimizer.step()
            stats.append([policy_loss.item(), value_loss.item(), entropy.item(), clip_fraction.item(),
                          approx_kl.item()])
            if approx_kl > r.target_approx_kl:                                       # early stop
                break

        # 6. log, move beta toward the KL target, checkpoint
        means = torch.tensor(stats).mean(0).tolist() if stats else [0.0] * 5        # braked: no update
        row = {"iteration": iteration + 1, "reward": scores["reward"].mean().item(),
               "reward_std": scores["reward"].std().item(), "kl": mean_kl, "kl_coef": kl_coef,
               **dict(zip(("policy_loss", "value_loss", "entropy", "clip_fraction", "approx_kl"), means)),
               "first_ratio_error": first_ratio_error, "updates": len(stats), "braked": braked,
               "seconds_of_speech": ended.float().mean().item() / CODEC_FRAME_RATE,
               **{k: v.mean().item() for k, v in scores.items() if k != "reward"},
               "rollout_s": round(t_sampled - t0, 2), "score_s": round(t_scored - t_sampled, 2),
               "update_s": round(time.time() - t_scored, 2), "wall_s": round(time.time() - t0, 2)}
        if r.adaptive_kl:   # Ziegler et al. 2019: beta *= 1 + clip(KL / target - 1, +-0.2) * rollouts / horizon
            kl_coef *= 1 + max(-0.2, min(0.2, mean_kl / r.kl_target - 1)) * B / r.kl_horizon
        bar.set_postfix(reward=f"{row['reward']:.4f}", kl=f"{mean_kl:.4f}")
        bar.write(f"iter {iteration + 1:3d}/{r.iterations} | reward {row['reward']:.4f} +- "
                  f"{row['reward_std']:.4f} | KL {mean_kl:.4f} (beta {row['kl_coef']:.3f}) | clip "
                  f"{row['clip_fraction']:.3f} | approx-KL {row['approx_kl']:.4f} | entropy "
                  f"{row['entropy']:.2f} | value loss {row['value_loss']:.3f} | {row['wall_s']:.0f} s"
                  + (" | KL brake: no update" if braked else ""))
        write(row)
        done = iteration + 1
        if eval_prompts and r.eval_every and done % r.eval_every == 0 and done < r.iterations:
            evaluate_and_log(done)                                                   # the last one comes below
        if done % r.save_every == 0 or done == r.iterations:
            save(done)
    bar.close()
    if eval_prompts and start < r.iterations:
        evaluate_and_log(r.iterations)                                               # the policy after RL
    log_file.close()
    write_curves(rows, out_dir / "rl.svg", r.kl_target)
    return rows


# -----------------------------------------------------------------------------
# 7. Stage 3 from the stage-1/2 checkpoints, and the command line

def judge_config(cfg):
    """The adapter settings come from the stage-2 checkpoint's config; a judge trained on another SpeechLM or
    LLM than this config names is refused."""
    folder = Path(cfg.rl.align_checkpoint)
    if not (folder / "ckpt" / "meta.json").exists():
        raise config.ConfigError(f"{folder}: no stage-2 adapter checkpoint (ckpt/meta.json); train stage 2 "
                                 f"first (python train.py --stage=align) or set --rl.align_checkpoint=<folder>")
    saved = json.loads((folder / "ckpt" / "meta.json").read_text())["config"]
    if saved["train"]["stage"] != "align":
        raise config.ConfigError(f"{folder}: a --stage={saved['train']['stage']} checkpoint, not stage 2; set "
                                 f"--rl.align_checkpoint to the output of python train.py --stage=align")
    trained_on = saved["adapter"]["speechlm_checkpoint"]
    if Path(trained_on).resolve() != Path(cfg.adapter.speechlm_checkpoint).resolve() or \
            saved["model"]["llm"] != cfg.model.llm:
        raise config.ConfigError(f"{folder} was trained on the SpeechLM in {trained_on} with LLM "
                                 f"{saved['model']['llm']}, not {cfg.adapter.speechlm_checkpoint} with "
                                 f"{cfg.model.llm}; set --adapter.speechlm_checkpoint and --model.llm to match")
    known = {f.name for f in fields(cfg.adapter)}
    adapter = {k: v for k, v in saved["adapter"].items() if k in known}
    return replace(cfg, adapter=replace(cfg.adapter, **adapter))


def build_rl(cfg, device, log=print):
    """The judge (adapter + LLM), the reference and the policy from the checkpoints; train and held-out
    prompts. Returns (policy, reference, train prompts, held-out prompts, score)."""
    align_model, tokenizer, cfg = load_align_model(judge_config(cfg), cfg.rl.align_checkpoint, device, log)
    reference = align_model.speechlm                    # frozen (in --system.precision); the judge's ears too
    speechlm, _, _ = load_speechlm_checkpoint(cfg.adapter.speechlm_checkpoint, cfg, log)   # fp32, to train
    policy = Policy(speechlm).to(device)
    for name, p in policy.speechlm.named_parameters():                              # the prompt's readers stay
        p.requires_grad_(not name.startswith(("voice.", "text_embed.")))
    if cfg.rl.lora_r:   # a low-rank update of each block projection; B = 0, so the policy starts as stage 1
        apply_lora(policy.speechlm.blocks, cfg.rl.lora_r, cfg.rl.lora_alpha, targets=LORA_TARGETS)
        for name, p in policy.named_parameters():
            p.requires_grad_("lora_" in name or name.startswith("value_head."))
    corpus = Path(cfg.data.corpus)
    train_prompts, _ = load_examples(corpus / "train.jsonl", cfg, tokenizer, log, mel=False)
    eval_prompts, _ = load_examples(corpus / "test.jsonl", cfg, tokenizer, log, mel=False)
    n = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    log(f"policy: stage-1 SpeechLM{f' + LoRA r={cfg.rl.lora_r}' if cfg.rl.lora_r else ''} + value head, "
        f"{n / 1e6:.1f}M trainable parameters; judge: adapter "
        f"({cfg.adapter.n_latents} vectors) + {Path(cfg.model.llm).name}")
    score = make_judge(align_model, cfg.rl.voice_weight)
    return policy, reference, train_prompts, eval_prompts[: cfg.rl.eval_prompts], score


def run(cfg, resume=False, log=print):
    """`python train.py --stage=rl` and `python rl.py`: stage 3 into cfg.train.out_dir."""
    out_dir = Path(cfg.train.out_dir)
    if resume and not (out_dir / "ckpt" / "MANIFEST.json").exists():
        raise config.ConfigError(f"--resume: no checkpoint in {out_dir}/ckpt to continue; drop --resume")
    if cfg.rl.lora_r < 0:
        raise config.ConfigError(f"--rl.lora_r={cfg.rl.lora_r}: a LoRA rank is >= 1 (0: whole trunk trains)")
    if cfg.rl.eval_samples < 1:
        raise config.ConfigError(f"--rl.eval_samples={cfg.rl.eval_samples}: each held-out prompt needs at "
                                 f"least 1 sample")
    if cfg.system.threads:
        torch.set_num_threads(cfg.system.threads)
    device = config.choose_device(cfg.system.device, log)
    policy, reference, train_prompts, eval_prompts, score = build_rl(cfg, device, log)
    rows = train_rl(cfg, policy, reference, train_prompts, score, out_dir, eval_prompts, resume, log)
    log(f"done: checkpoint {out_dir}/ckpt, log {out_dir}/log.jsonl, curves {out_dir}/rl.svg")
    return rows


def parse_args(argv):
    """--preset=NAME, --resume and --section.key=value overrides, as train.py; output in out/rl by default."""
    return config.from_command_line(argv, __doc__, stage="rl")


def main(argv=None):
    try:
        cfg, resume = parse_args(sys.argv[1:] if argv is None else argv)
        run(cfg, resume)
    except (config.ConfigError, CheckpointError, CheckpointCorrupt) as err:   # user mistakes: one line
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
