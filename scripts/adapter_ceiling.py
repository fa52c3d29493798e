"""
The adapter's ceiling: IRA stage 2 with the SpeechLM's states replaced by the real Whisper encoder frames.

    python -m scripts.adapter_ceiling [any train.py --stage=align flags]

Stage 2 asks two things at once: do the frozen SpeechLM's states of the codes carry what was said, and can
the Perceiver adapter + frozen LLM turn such states into the transcript? This run answers the second alone.
Every clip's audio states become its frozen Whisper encoder output (model.encoder, layer-normed per frame:
the hearing loss's targets, read from the same cache), so the adapter reads audio that certainly hears.
Everything else is `train.py --stage=align` unchanged: the same adapter, batches, losses, schedule and
held-out WER. The gap between this run and the real one is what the SpeechLM's hearing still lacks.

Simplified on purpose: the stage looks each clip's frames up by its codes, swapped in for
SpeechLM.audio_states, so no line of adapter.py changes; the Whisper width must equal the SpeechLM's
d_model (512 for whisper-base and the default SpeechLM). A stage-1 checkpoint is still needed, for the
tokenizer and the config.
"""
import sys

import torch
import torch.nn.functional as F

import adapter
import speechlm
import train

whisper = {}           # audio path -> Whisper frames (W, D), read once for both manifests
frames_by_codes = {}   # the bytes of a clip's codes (K, T) -> its layer-normed Whisper frames (W, D)


def load_examples_with_whisper(manifest_path, cfg, tokenizer, log=print):
    if not whisper:
        whisper.update(speechlm.whisper_features(cfg, log))
    examples, info = speechlm.load_examples(manifest_path, cfg, tokenizer, log, whisper)
    for e in examples:
        w = e["whisper"].float()
        if w.size(1) != cfg.speechlm.d_model:
            sys.exit(f"error: Whisper frames are {w.size(1)} wide and the SpeechLM's states "
                     f"{cfg.speechlm.d_model}: the adapter cannot read one in place of the other")
        frames_by_codes[e["codes"].numpy().tobytes()] = F.layer_norm(w, (w.size(1),))
    return examples, info


def whisper_states(self, codes, lengths, layer):
    """In place of SpeechLM.audio_states: codes (B, K, T) -> Whisper frames (B, W, D), lengths (B,)."""
    frames = [frames_by_codes[codes[b, :, :n].cpu().numpy().tobytes()] for b, n in enumerate(lengths.tolist())]
    W = max(f.size(0) for f in frames)
    states = torch.stack([F.pad(f, (0, 0, 0, W - f.size(0))) for f in frames])
    return states.to(codes.device), torch.tensor([f.size(0) for f in frames], device=codes.device)


if __name__ == "__main__":
    adapter.load_examples = load_examples_with_whisper
    speechlm.SpeechLM.audio_states = whisper_states
    train.main(["--stage=align"] + sys.argv[1:])
