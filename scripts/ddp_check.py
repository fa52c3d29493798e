"""
Does data-parallel training on N GPUs match one GPU, and how much faster is it? One command answers both.

    python scripts/ddp_check.py --gpus=2            # ~5 minutes on 2 H200s (README "Several GPUs")

It writes random checkpoints at the `seed` preset's shapes (a whisper-small-shaped encoder, a
sarvam-2b-shaped Llama, bf16) and a corpus of noise clips of 25-30 s with random transcripts, then trains
the same global batch (32 examples a step) three ways, each with train.py exactly as a user runs it:

    1 GPU,  4 micro-batches of 8 a step          the baseline
    1 GPU,  4 micro-batches of 8 again           the baseline's own run-to-run noise
    N GPUs, 4 / N micro-batches of 8 per rank    torchrun --nproc_per_node=N train.py ...

and prints the largest and mean per-step loss difference to the baseline (against the noise between the
two baseline runs) and the throughput ratio: the median positions/s over the second half of the log windows,
since the first ones are slower while the GPU memory allocators see new batch shapes. With --diagnose it adds a 1-GPU run of 4 / N micro-batches a step: the work one rank
does, alone, so the gap between it and the N-GPU step time is what running in parallel costs.
Needs N CUDA GPUs; nothing is downloaded.
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402  (the repository's modules, found through ROOT)
from model import Llama, WhisperEncoder  # noqa: E402
from weights import (llama_name_table, llama_config, save_hf_checkpoint, whisper_config,  # noqa: E402
                     whisper_name_table, write_tiny_checkpoint)

WHISPER_SMALL = dict(model_type="whisper", num_mel_bins=80, d_model=768, encoder_layers=12,
                     encoder_attention_heads=12, encoder_ffn_dim=3072, max_source_positions=1500)
SARVAM_2B = dict(model_type="llama", vocab_size=64128, hidden_size=2048, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, intermediate_size=11008, rope_theta=5e6,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=4096,
                 bos_token_id=257, eos_token_id=258)       # the byte-level tokenizer's ids (write_tiny_checkpoint)
WORDS = "the a one two three seven river north green stone light water city music open call play".split()


def make_checkpoints(root):
    """Random bf16 weights at the seed shapes, saved as Hugging Face folders (built on the GPU: seconds)."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        encoder = WhisperEncoder(whisper_config(WHISPER_SMALL)).to(torch.bfloat16)
        llm = Llama(llama_config(SARVAM_2B)).to(torch.bfloat16)
        for module in (encoder, llm):
            for p in module.parameters():
                nn.init.normal_(p, std=0.02) if p.dim() == 2 else None
    save_hf_checkpoint(encoder.cpu(), root / "encoder", whisper_name_table(12), WHISPER_SMALL)
    save_hf_checkpoint(llm.cpu(), root / "llm", llama_name_table(28, tied=False), SARVAM_2B)
    tiny = write_tiny_checkpoint("llama", root / "tiny-llama")            # only for its tokenizer.json
    shutil.copy(tiny / "tokenizer.json", root / "llm" / "tokenizer.json")


def make_corpus(root, n_clips, seed=0):
    """Noise clips of 25-30 s with random 8-word transcripts; 4 of them form the test split."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_clips):
        seconds = rng.uniform(25, 30)
        data.save_wav(root / "clips" / f"{i}.wav", 0.1 * torch.randn(int(seconds * 16000), generator=g))
        rows.append({"audio": f"clips/{i}.wav", "text": " ".join(rng.choices(WORDS, k=8)), "task": "transcribe"})
    for name, part in (("train", rows[4:]), ("test", rows[:4])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


def run(name, root, gpus, grad_accum, steps, extra):
    out = root / name
    args = ["--preset=seed", f"--model.encoder={root / 'encoder'}", f"--model.llm={root / 'llm'}",
            f"--data.corpus={root / 'corpus'}", f"--train.grad_accum={grad_accum}", f"--train.max_steps={steps}",
            f"--train.out_dir={out}", "--train.log_every=10", "--train.save_every=100000", "--train.eval_samples=1",
            "--train.warmup_steps=5", *extra]
    launcher = [sys.executable] if gpus == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    print(f"== {name}: {gpus} GPU(s) x {grad_accum} micro-batches of 8 a step", flush=True)
    subprocess.run(launcher + [str(ROOT / "train.py"), *args], check=True, cwd=ROOT,
                   env={**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus)))})
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    waits = [r["data_wait"] for r in rows if "data_wait" in r]
    return {"loss": [r["loss"] for r in rows], "positions_per_s": statistics.median(speeds[len(speeds) // 2:]),
            "data_wait": statistics.median(waits[len(waits) // 2:]), "windows": speeds}


def compare(a, b):
    diffs = [abs(x - y) for x, y in zip(a["loss"], b["loss"])]
    return max(diffs), sum(diffs) / len(diffs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--clips", type=int, default=196)
    parser.add_argument("--work", default="/tmp/ddp_check", help="folder for checkpoints, corpus and runs")
    parser.add_argument("--diagnose", action="store_true", help="also time one rank's share on one GPU")
    parser.add_argument("--no-noise", action="store_true", help="skip the second 1-GPU run")
    parser.add_argument("--json", default="", help="write every number to this file")
    parser.add_argument("extra", nargs="*", help="more train.py overrides, e.g. --system.compile=True")
    args = parser.parse_args()
    if torch.cuda.device_count() < args.gpus:
        print(f"needs {args.gpus} CUDA GPUs, found {torch.cuda.device_count()}")
        return
    root = Path(args.work)
    if not (root / "llm" / "config.json").exists():
        make_checkpoints(root)
    if not (root / "corpus" / "train.jsonl").exists():
        make_corpus(root / "corpus", args.clips)
    accum = 4
    result = {"one": run("one", root, 1, accum, args.steps, args.extra)}
    result["one_again"] = result["one"] if args.no_noise else run("one_again", root, 1, accum, args.steps, args.extra)
    result["many"] = run("many", root, args.gpus, accum // args.gpus, args.steps, args.extra)
    if args.diagnose:
        result["one_rank_alone"] = run("one_rank_alone", root, 1, accum // args.gpus, args.steps, args.extra)
    noise, ddp = compare(result["one"], result["one_again"]), compare(result["one"], result["many"])
    print(f"\nloss, {args.gpus} GPUs vs 1: largest step difference {ddp[0]:.3f}, mean {ddp[1]:.3f} "
          f"(two 1-GPU runs: {noise[0]:.3f}, {noise[1]:.3f}); final {result['many']['loss'][-1]:.3f} vs "
          f"{result['one']['loss'][-1]:.3f}")
    for name, r in result.items():
        print(f"{name:>15}: {r['positions_per_s']:9.0f} positions/s, data wait {r['data_wait']}")
    speedup = result["many"]["positions_per_s"] / result["one"]["positions_per_s"]
    print(f"throughput: {speedup:.2f}x on {args.gpus} GPUs")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "speedup": speedup, "loss_diff": ddp, "noise": noise}))


if __name__ == "__main__":
    main()
