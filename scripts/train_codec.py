"""
Train EnCodec's 24 kHz architecture here, for when its real weights cannot be downloaded.

    python -m scripts.train_codec --out checkpoints/codec-here [--corpus corpus] [--steps 3000] [--batch 32]
    python train.py --stage=speechlm --speechlm.codec=checkpoints/codec-here      # then use it

Without EnCodec's weights, data.py runs the architecture untrained: its codes are k-means clusters of random
features and say little about the words (`python -m scripts.code_probe`). This script trains the same
network (Defossez et al. 2022, the `encodec` package's modules) as an autoencoder on the corpus's training
clips, so the codes have to carry what was said to rebuild it:

    waveform -> encoder -> residual VQ (K codebooks at --bandwidth) -> decoder -> waveform
    loss = L1(waveform) + L1(log-mel at 3 resolutions) + commitment

The quantizer is encodec's own in training mode: codebooks start as k-means of the first batch, follow the
encoder by exponential moving averages, and unused entries are restarted from the batch. It writes
OUT/codec.safetensors (every weight, fp32) and OUT/codec.json; `--speechlm.codec=OUT` makes data.py use it.

Simplified on purpose: no discriminators and no loss balancer (EnCodec's adversarial and feature losses), one
bandwidth instead of a random one per batch, random 1-second crops, a constant learning rate. So the audio it
decodes is muffled; the point is codes that carry the speech. A GPU does 3000 steps in minutes; a CPU is
hours.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio
from safetensors.torch import save as save_tensors
from tqdm import tqdm

import data

MEL_WINDOWS = (512, 1024, 2048)    # STFT sizes of the log-mel loss (21, 43, 85 ms at 24 kHz), hop = 1/4


def log_mel_loss(mels, output, target):
    """Mean L1 distance of log-mel spectrograms over the resolutions: what the ear hears, not the phase."""
    distances = [F.l1_loss(torch.log(mel(output) + 1e-5), torch.log(mel(target) + 1e-5)) for mel in mels]
    return sum(distances) / len(distances)


def random_crops(clips, batch, samples, rng):
    """(batch, 1, samples): a random window of random clips, zero-padded where a clip is shorter."""
    out = torch.zeros(batch, 1, samples)
    for i in range(batch):
        clip = clips[rng.randrange(len(clips))]
        start = rng.randrange(max(len(clip) - samples, 0) + 1)
        piece = clip[start: start + samples]
        out[i, 0, : len(piece)] = piece
    return out


def train_codec(clips, out_dir, steps=3000, batch=32, seconds=1.0, bandwidth=1.5, lr=3e-4, seed=0,
                device="cpu", max_minutes=None, log=print):
    """Train the codec on clips ([samples] at 24 kHz); write out_dir/codec.safetensors. Returns the loss log.
    max_minutes stops training early (codec.json says how many steps were done)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = data.untrained_encodec().to(device)
    model.set_target_bandwidth(bandwidth)
    model.train()
    mels = [torchaudio.transforms.MelSpectrogram(data.CODEC_SAMPLE_RATE, n_fft=w, hop_length=w // 4,
                                                 n_mels=64).to(device) for w in MEL_WINDOWS]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))   # EnCodec's betas
    samples, rows, t0 = int(seconds * data.CODEC_SAMPLE_RATE), [], time.time()
    bar = tqdm(range(1, steps + 1), desc="codec", unit="step", file=sys.stderr)
    for step in bar:
        x = random_crops(clips, batch, samples, rng).to(device)
        quantized = model.quantizer(model.encoder(x), model.frame_rate, bandwidth)   # EMA codebooks update
        y = model.decoder(quantized.quantized)[..., : x.size(-1)]
        wave_loss, mel_loss = F.l1_loss(y, x), log_mel_loss(mels, y, x)
        loss = wave_loss + mel_loss + quantized.penalty
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        out_of_time = max_minutes is not None and time.time() - t0 > 60 * max_minutes
        if step % 50 == 0 or step == steps or out_of_time:
            rows.append({"step": step, "loss": loss.item(), "wave_l1": wave_loss.item(),
                         "mel_l1": mel_loss.item(), "commit": quantized.penalty.item(),
                         "wall_s": round(time.time() - t0, 1)})
            bar.set_postfix(mel=f"{mel_loss.item():.3f}", commit=f"{quantized.penalty.item():.3f}")
        if out_of_time:
            break
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    data.write_atomic(out_dir / data.TRAINED_HERE, lambda f: f.write(save_tensors(weights)))   # whole or not
    settings = {"steps": rows[-1]["step"], "batch": batch, "seconds": seconds, "bandwidth": bandwidth, "lr": lr,
                "seed": seed, "clips": len(clips)}
    (out_dir / "codec.json").write_text(json.dumps({**settings, "log": rows}, indent=1) + "\n")
    log(f"wrote {out_dir / data.TRAINED_HERE}: mel L1 {rows[-1]['mel_l1']:.3f}, wave L1 "
        f"{rows[-1]['wave_l1']:.4f} after {rows[-1]['step']} steps ({rows[-1]['wall_s']:.0f} s)")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for codec.safetensors (then --speechlm.codec=OUT)")
    parser.add_argument("--corpus", default="corpus", help="its train.jsonl's clips are the training audio")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32, help="crops per step")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each crop")
    parser.add_argument("--bandwidth", type=float, default=1.5, help="kbps: 1.5 = 2 codebooks, as the SpeechLM")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-minutes", type=float, help="stop training after this long, steps done or not")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.seconds <= 0:
        parser.error("--steps and --batch must be >= 1 and --seconds > 0")
    manifest = Path(args.corpus) / "train.jsonl"
    if not manifest.exists():
        sys.exit(f"error: {manifest} not found; make the corpus first (python corpus.py --out {args.corpus})")
    paths = list(dict.fromkeys(row["audio"] for row in data.read_manifest(manifest)))
    try:                                   # a missing or broken clip: one line naming it (data.AudioError)
        clips = [data.load_audio(path, sr=data.CODEC_SAMPLE_RATE)
                 for path in tqdm(paths, desc="reading", file=sys.stderr)]
    except ValueError as err:
        sys.exit(f"error: {err}")
    train_codec(clips, args.out, args.steps, args.batch, args.seconds, args.bandwidth, args.lr, args.seed,
                args.device, args.max_minutes, log=lambda message: print(message, file=sys.stderr))


if __name__ == "__main__":
    main()
