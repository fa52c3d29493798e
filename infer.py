"""
Talk to a trained audio LM from the shell, or make the IRA system speak.

    python infer.py speech.wav                                  # transcript, streamed to stdout
    python infer.py speech.wav --task chat --prompt "Answer the spoken question."
    python infer.py --wer corpus/test.jsonl                     # WER of a manifest's transcribe rows
    python infer.py speech.wav --checkpoint out/instruct        # which trained run (default out/asr)
    python infer.py --speak "turn off the lights" --voice "a slow, low-pitched male voice" --out out.wav
    python infer.py --pipeline "turn off the lights"            # text -> speech (out.wav) -> adapter -> LLM

stdout carries the answer and nothing else, so `python infer.py a.wav | wc -w` works; the device,
timings and warnings go to stderr. The checkpoint folder's config.json says which encoder, LLM,
projector and LoRA settings the run used, so the model is rebuilt exactly as it was trained.
IRA: --speak runs the stage-1 SpeechLM (default checkpoint out/speechlm) and the codec, and writes the
speech to --out, stdout stays empty; --pipeline (default out/align) speaks the text the same way, then
lets the LLM hear those very codes through the stage-2 adapter and prints its response (adapter.pipeline).

Simplified on purpose: one file at a time, greedy decoding of text unless --temperature is given; speech
is sampled (temperature 0.8, top-k 50, --seed), since greedy decoding of audio codes tends to loop.
"""
import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import adapter
import config
import data
import model
import speechlm
import weights
from checkpoint import CheckpointCorrupt, load_checkpoint
from train import load_trainable

DEFAULT_CHECKPOINTS = {"audio": "out/asr", "speak": "out/speechlm", "pipeline": "out/align"}
SPEECH_TEMPERATURE, SPEECH_TOP_K = 0.8, 50     # sampling of audio codes (speechlm.speak's defaults)


def log(*args):
    print(*args, file=sys.stderr)


def saved_config(checkpoint_dir, sections, fix):
    """The Config of a train.py run (<checkpoint_dir>/config.json): the given sections as the run had them,
    the rest at their defaults; and the run's --system.precision. `fix` says what to do when it is missing."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "config.json").exists():
        raise config.ConfigError(f"{checkpoint_dir}/config.json not found: {fix}")
    saved = json.loads((checkpoint_dir / "config.json").read_text())
    overrides = [f"--{section}.{key}={value!r}" for section, values in saved.items() for key, value in values.items()
                 if section in sections]
    return config.get_config("base", overrides), saved["system"]["precision"]


def load_trained(checkpoint_dir, device_request="auto"):
    """Rebuild the AudioLM described by <checkpoint_dir>/config.json and load its trained weights."""
    checkpoint_dir = Path(checkpoint_dir)
    # the architecture-defining sections come from the run; device and precision may differ at inference
    cfg, precision = saved_config(checkpoint_dir, ("model", "projector", "lora"),
                                  "train first (`make train`) or pass --checkpoint FOLDER (a train.py out_dir)")
    device = config.choose_device(device_request, log)
    dtype, int8 = config.choose_precision(precision, device, log)
    audio_lm = weights.build_audio_lm(cfg, device, dtype, int8, log)
    tensors, meta, _ = load_checkpoint(checkpoint_dir / "ckpt")     # projector + LoRA only; the rest is frozen
    trainable = [n for n, p in audio_lm.named_parameters() if p.requires_grad]
    load_trainable(audio_lm, tensors, trainable, strict=True, where=checkpoint_dir)
    log(f"loaded {checkpoint_dir} (stage {meta['stage']}, step {meta['step']})")
    return audio_lm.eval()


def load_speaker(checkpoint_dir, device_request="auto"):
    """IRA stage 1 for --speak: (SpeechLM in the run's precision, tokenizer, codec, config)."""
    cfg, precision = saved_config(checkpoint_dir, ("model", "data", "speechlm"),
                                  "train stage 1 first (python train.py --stage=speechlm) or pass --checkpoint "
                                  "FOLDER (its out_dir)")
    device = config.choose_device(device_request, log)
    dtype, int8 = config.choose_precision(precision, device, log)
    lm, tokenizer, cfg = speechlm.load_speechlm_checkpoint(checkpoint_dir, cfg, log)
    lm = speechlm.frozen_in_precision(lm, dtype, int8).to(device)
    return lm, tokenizer, data.load_codec_for(cfg, log), cfg


def load_pipeline(checkpoint_dir, device_request="auto"):
    """IRA stages 1 + 2 for --pipeline: (AlignModel, codec, config). The stage-2 run's config names its
    stage-1 SpeechLM (adapter.speechlm_checkpoint) and LLM; both are frozen, in the run's precision."""
    cfg, precision = saved_config(checkpoint_dir, ("model", "data", "speechlm", "adapter"),
                                  "train stage 2 first (python train.py --stage=align) or pass --checkpoint "
                                  "FOLDER (its out_dir)")
    cfg = replace(cfg, system=replace(cfg.system, precision=precision))
    device = config.choose_device(device_request, log)
    align_model, _, cfg = adapter.load_align_model(cfg, checkpoint_dir, device, log)
    return align_model, data.load_codec_for(cfg, log), cfg


def write_speech(path, waveform, seconds_taken):
    """The 24 kHz waveform as a 16-bit WAV, and one line on stderr saying what was written."""
    data.save_wav(path, waveform, data.CODEC_SAMPLE_RATE)
    if waveform.numel() == 0:
        log(f"warning: the SpeechLM ended at once: {path} holds no audio (try another --seed)")
    frames = waveform.numel() * data.CODEC_FRAME_RATE // data.CODEC_SAMPLE_RATE    # 320 samples per frame
    log(f"wrote {path}: {waveform.numel() / data.CODEC_SAMPLE_RATE:.2f} s of speech ({frames} codec frames), "
        f"made in {seconds_taken:.1f} s")


def speak(args, checkpoint):
    """--speak: text (+ --voice) -> SpeechLM codes -> codec -> --out. Nothing on stdout."""
    lm, tokenizer, codec, cfg = load_speaker(checkpoint, args.device)
    start = time.time()
    torch.manual_seed(args.seed)                            # the codes are sampled: same seed, same speech
    temperature = SPEECH_TEMPERATURE if args.temperature is None else args.temperature
    _, waveform = speechlm.speak(lm, tokenizer, codec, args.speak, args.voice,
                                 args.max_seconds or cfg.speechlm.max_seconds, temperature, SPEECH_TOP_K)
    write_speech(args.out, waveform, time.time() - start)


def run_pipeline(args, checkpoint):
    """--pipeline: text -> SpeechLM codes -> codec -> --out, and the same codes -> adapter -> LLM -> stdout."""
    align_model, codec, cfg = load_pipeline(checkpoint, args.device)
    start = time.time()
    torch.manual_seed(args.seed)
    temperature = SPEECH_TEMPERATURE if args.temperature is None else args.temperature
    waveform, response = adapter.pipeline(align_model, codec, args.pipeline, args.voice, args.prompt,
                                          args.max_seconds or cfg.speechlm.max_seconds, temperature,
                                          SPEECH_TOP_K, args.max_new_tokens)
    write_speech(args.out, waveform, time.time() - start)
    print(response)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Transcribe or answer speech with a trained audio LM, or "
                                                 "speak text with the IRA SpeechLM")
    parser.add_argument("audio", nargs="?", help="a WAV file (16-bit/24-bit/32-bit/float, any rate)")
    parser.add_argument("--checkpoint", default=None, help="a train.py output folder (default: out/asr; "
                        "out/speechlm with --speak, out/align with --pipeline)")
    parser.add_argument("--task", choices=["transcribe", "chat"], default="transcribe")
    parser.add_argument("--prompt", default=None, help="the instruction (chat default: answer the question; "
                                                       "--pipeline default: the adapter's training prompt)")
    parser.add_argument("--wer", metavar="MANIFEST", help="evaluate WER on a manifest's transcribe rows")
    parser.add_argument("--speak", metavar="TEXT", help="IRA: say TEXT with the stage-1 SpeechLM into --out")
    parser.add_argument("--pipeline", metavar="TEXT", help="IRA: say TEXT into --out, then print what the LLM "
                                                           "makes of that speech through the adapter")
    parser.add_argument("--voice", metavar="DESCRIPTION", help="--speak/--pipeline: whose voice, e.g. "
                                                               "'a fast, high-pitched female voice'")
    parser.add_argument("--out", default="out.wav", help="--speak/--pipeline: the WAV file written (24 kHz)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="--speak/--pipeline: the longest speech (default: the checkpoint's "
                             "speechlm.max_seconds)")
    parser.add_argument("--seed", type=int, default=0, help="--speak/--pipeline: seeds the sampled speech")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=None,
                        help=f"0 = greedy (the default for text; speech: {SPEECH_TEMPERATURE})")
    parser.add_argument("--device", default="auto", help="auto | cuda | mps | cpu")
    args = parser.parse_args(argv)
    given = {"audio": args.audio or args.wer, "speak": args.speak, "pipeline": args.pipeline}
    modes = [mode for mode, value in given.items() if value]
    if len(modes) != 1:
        parser.error("give one of: an audio file, --wer MANIFEST, --speak TEXT or --pipeline TEXT")
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINTS[modes[0]]
    try:
        if args.speak:
            return speak(args, checkpoint)
        if args.pipeline:
            return run_pipeline(args, checkpoint)
        audio_lm = load_trained(checkpoint, args.device)
        temperature = args.temperature or 0.0
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
                          temperature=temperature, callback=lambda piece: print(piece, end="", flush=True))
        print()
        log(f"{audio.numel() / model.SAMPLE_RATE:.1f} s of audio answered in {time.time() - start:.2f} s")
    except (config.ConfigError, weights.CheckpointError, CheckpointCorrupt, data.AudioError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
