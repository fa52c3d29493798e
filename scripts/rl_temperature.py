"""
What sharpening alone buys in stage 3: the held-out judge reward of the stage-1 SpeechLM sampled at several
temperatures, each next to its price in stage 3's own currency, the KL per column to the reference (the same
SpeechLM at --rl.temperature, which is what PPO is held near).

    python -m scripts.rl_temperature [train.py --stage=rl flags] [--temperatures=1.0,0.9,0.8,0.7]

Sampling at a lower temperature is the simplest change a policy can make, and it needs no training: every
code distribution gets peakier, so fewer unlikely codes slip in. If it raises the judge's reward at a KL under
stage 3's bound, the reward does hold a direction within reach that PPO could find; if the reward does not
move, or moves only past the bound, PPO has less to find than it seemed. It reads the same checkpoints and
held-out prompts as `python train.py --stage=rl` and scores them as its held-out evaluation does
(rl.evaluate): --rl.eval_prompts prompts x --rl.eval_samples seeded samples. Each temperature draws from the
same seed, and its change is paired per prompt with the first temperature's.

Simplified on purpose: one temperature for both codebooks and the whole utterance; no top-k.
"""
import sys
from dataclasses import replace

import torch

import config
import rl
from checkpoint import CheckpointCorrupt
from weights import CheckpointError


def sweep(policy, reference, prompts, score, cfg, temperatures, log=print):
    """One rl.evaluate per temperature, the reference read at cfg.rl.temperature. Returns one row each:
    temperature, reward, KL per column, seconds of speech, and the paired change from the first row with
    its standard error over prompts."""
    rows, first = [], None
    for t in temperatures:
        cfg_t = replace(cfg, rl=replace(cfg.rl, temperature=t))
        m = rl.evaluate(policy, reference, prompts, score, cfg_t, cfg.system.seed + 1,
                        reference_temperature=cfg.rl.temperature)
        per_prompt = torch.tensor(m["eval_rewards"])
        first = per_prompt if first is None else first
        change = per_prompt - first
        se = change.std().item() / len(change) ** 0.5 if len(change) > 1 else 0.0
        rows.append({"temperature": t, "reward": m["eval_reward"], "kl": m["eval_kl"],
                     "seconds": m["eval_seconds"], "change": change.mean().item(), "change_se": se,
                     "better": int((change > 0).sum())})
        r = rows[-1]
        log(f"temperature {t:.2f}: judge reward {r['reward']:.3f} nats/token, change {r['change']:+.3f} "
            f"(se {r['change_se']:.3f}, {r['better']} of {len(change)} prompts better), KL to the reference "
            f"{r['kl']:.4f} nats/column, {r['seconds']:.2f} s of speech")
    return rows


def main(argv):
    temperatures = [1.0, 0.9, 0.8, 0.7]
    rest = []
    for a in argv:
        if a.startswith("--temperatures="):
            try:
                temperatures = [float(t) for t in a.split("=", 1)[1].split(",")]
            except ValueError:
                sys.exit(f"error: {a}: give numbers separated by commas, e.g. --temperatures=1.0,0.8")
        else:
            rest.append(a)
    if any(t <= 0 for t in temperatures):
        sys.exit("error: --temperatures must all be > 0 (greedy decoding has no KL to price)")
    cfg, _ = rl.parse_args(rest)
    device = config.choose_device(cfg.system.device)
    policy, reference, _, prompts, score = rl.build_rl(replace(cfg, rl=replace(cfg.rl, lora_r=0)), device)
    policy.eval().requires_grad_(False)
    return sweep(policy, reference, prompts, score, cfg, temperatures)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (config.ConfigError, CheckpointError, CheckpointCorrupt) as err:   # user mistakes: one line
        sys.exit(f"error: {err}")
