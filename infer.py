"""
Talk to a trained audio LM from the shell.

    python infer.py speech.wav                                  # transcript, streamed to stdout
    python infer.py speech.wav --task chat --prompt "Answer the spoken question."
    python infer.py --wer corpus/test.jsonl                     # WER of a manifest's transcribe rows
    python infer.py speech.wav --checkpoint out/instruct        # which trained run (default out/asr)

stdout carries the answer and nothing else, so `python infer.py a.wav | wc -w` works; the device,
timings and warnings go to stderr. The checkpoint folder's config.json says which encoder, LLM,
projector and LoRA settings the run used, so the model is rebuilt exactly as it was trained.

Simplified on purpose: one file at a time, greedy decoding unless --temperature is given.
"""
import argparse
import json
import sys
import time
from pathlib import Path


import config
import data
import model
import weights
from checkpoint import CheckpointCorrupt, load_checkpoint
from train import load_trainable


def log(*args):
    print(*args, file=sys.stderr)


def load_trained(checkpoint_dir, device_request="auto"):
    """Rebuild the AudioLM described by <checkpoint_dir>/config.json and load its trained weights."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "config.json").exists():
        raise config.ConfigError(f"{checkpoint_dir}/config.json not found: train first (`make train`) or "
                                 f"pass --checkpoint FOLDER (a train.py out_dir)")
    saved = json.loads((checkpoint_dir / "config.json").read_text())
    # the architecture-defining sections come from the run; device and precision may differ at inference
    overrides = [f"--{section}.{key}={value!r}" for section, values in saved.items() for key, value in values.items()
                 if section in ("model", "projector", "lora")]
    cfg = config.get_config("base", overrides)
    device = config.choose_device(device_request, log)
    dtype, int8 = config.choose_precision(saved["system"]["precision"], device, log)
    audio_lm = weights.build_audio_lm(cfg, device, dtype, int8, log)
    tensors, meta, _ = load_checkpoint(checkpoint_dir / "ckpt")     # projector + LoRA only; the rest is frozen
    trainable = [n for n, p in audio_lm.named_parameters() if p.requires_grad]
    load_trainable(audio_lm, tensors, trainable, strict=True, where=checkpoint_dir)
    log(f"loaded {checkpoint_dir} (stage {meta['stage']}, step {meta['step']})")
    return audio_lm.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Transcribe or answer speech with a trained audio LM")
    parser.add_argument("audio", nargs="?", help="a WAV file (16-bit/24-bit/32-bit/float, any rate)")
    parser.add_argument("--checkpoint", default="out/asr", help="a train.py output folder")
    parser.add_argument("--task", choices=["transcribe", "chat"], default="transcribe")
    parser.add_argument("--prompt", default=None, help="the instruction (chat default: answer the question)")
    parser.add_argument("--wer", metavar="MANIFEST", help="evaluate WER on a manifest's transcribe rows")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--device", default="auto", help="auto | cuda | mps | cpu")
    args = parser.parse_args(argv)
    if not args.audio and not args.wer:
        parser.error("give an audio file or --wer MANIFEST")
    try:
        audio_lm = load_trained(args.checkpoint, args.device)
        if args.wer:   # transcribe rows only: WER compares against what is spoken
            rows = [r for r in data.read_manifest(args.wer) if r["task"] == "transcribe"]
            hypotheses = []
            for r in rows:
                hypotheses.append(audio_lm.generate(data.load_audio(r["audio"]), max_new_tokens=args.max_new_tokens))
            wer = data.word_error_rate([r["text"] for r in rows], hypotheses)
            print(f"WER {wer:.4f} on {len(rows)} utterances of {args.wer}")
            return
        default = data.TASK_PROMPTS["transcribe" if args.task == "transcribe" else "instruct"]
        audio = data.load_audio(args.audio, max_seconds=model.CHUNK_LENGTH)   # the encoder sees <= 30 s
        start = time.time()
        # each decoded piece goes straight to stdout (flush), so the words appear as they are generated
        audio_lm.generate(audio, args.prompt or default, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, callback=lambda piece: print(piece, end="", flush=True))
        print()
        log(f"{audio.numel() / model.SAMPLE_RATE:.1f} s of audio answered in {time.time() - start:.2f} s")
    except (config.ConfigError, weights.CheckpointError, CheckpointCorrupt, data.AudioError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
