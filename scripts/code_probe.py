"""
How much do a corpus's EnCodec codes say about its words? A linear probe, next to the same probe on log-mel.

    python -m scripts.code_probe [--corpus corpus] [--bandwidth 1.5] [--words 100]

Each utterance becomes a bag of units: the share of its frames that carry each of 1024 units. The units are
(a) codebook 0 of the stored codes (`codes-<bandwidth>kbps/`, made by `train.py --stage=speechlm`) and
(b) k-means clusters (1024, fitted on training frames) of the stored 80-bin log-mel (`mel-80/`, made by
`--speechlm.voice_audio=mel`), a unit inventory known to carry phonetic information. For each of the most
frequent transcript words, one linear classifier (all words jointly, as a multi-label logistic regression)
is trained on the training clips to say whether the word is spoken; the score is its ROC AUC on the test
clips (held-out voices), averaged over the words: 0.5 = the units say nothing about the words, 1 = all.

Simplified on purpose: a bag of units forgets their order, so this is a lower bound on what a sequence model
could read from them; it compares unit inventories, it does not measure a trained system.
"""
import argparse
import collections
import sys
from pathlib import Path

import torch

import data

UNITS = 1024          # codebook size; the same number of k-means clusters for log-mel
KMEANS_FRAMES = 60000  # training log-mel frames the clusters are fitted on (10 min of audio)


def clips(manifest):
    """The distinct clips of a manifest's transcribe rows: (audio paths, transcripts)."""
    rows = {row["audio"]: row["text"] for row in data.read_manifest(manifest) if row["task"] == "transcribe"}
    return list(rows), list(rows.values())


def bags(unit_sequences):
    """[(frames,) int] -> (n, UNITS): the share of each clip's frames carrying each unit."""
    out = torch.zeros(len(unit_sequences), UNITS)
    for i, units in enumerate(unit_sequences):
        out[i] = torch.bincount(units, minlength=UNITS).float() / max(len(units), 1)
    return out


def auc(scores, labels):
    """ROC AUC = P(a clip with the word outscores one without it); ties count one half."""
    positive, negative = scores[labels == 1], scores[labels == 0]
    above = (positive[:, None] > negative[None]).float().mean()
    tied = (positive[:, None] == negative[None]).float().mean()
    return (above + tied / 2).item()


def probe(train_x, train_y, test_x, test_y, steps=300, weight_decay=1e-3):
    """A multi-label logistic regression on standardized features; mean test AUC over the labels."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    linear = torch.nn.Linear(train_x.size(1), train_y.size(1))
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(linear(train_x), train_y)
        optimizer.zero_grad(), loss.backward(), optimizer.step()
    with torch.no_grad():
        scores = linear(test_x)
    aucs = [auc(scores[:, j], test_y[:, j]) for j in range(test_y.size(1))
            if 0 < test_y[:, j].sum() < len(test_y)]            # words both present and absent in test
    return sum(aucs) / len(aucs), len(aucs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--corpus", default="corpus", help="folder with train.jsonl, test.jsonl, codes, mel")
    parser.add_argument("--bandwidth", type=float, default=1.5, help="which codes-<bandwidth>kbps folder")
    parser.add_argument("--words", type=int, default=100, help="how many of the most frequent words to probe")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    corpus = Path(args.corpus)
    stage = f"python train.py --stage=speechlm --data.corpus={corpus} --speechlm.bandwidth={args.bandwidth}"
    needed = [(corpus / "train.jsonl", f"python corpus.py --out {corpus}"),               # (what, made by)
              (data.codes_dir_for(corpus / "train.jsonl", args.bandwidth) / "codec.json", stage),
              (data.mels_dir_for(corpus / "train.jsonl"), stage + " --speechlm.voice_audio=mel")]
    for path, command in needed:
        if not path.exists():
            sys.exit(f"error: {path} not found; make it first: {command}")
    train_audio, train_text = clips(corpus / "train.jsonl")
    test_audio, test_text = clips(corpus / "test.jsonl")
    counts = collections.Counter(w for text in train_text for w in set(text.split()))
    words = [w for w, n in counts.most_common() if n < len(train_text) / 2][: args.words]   # not "the"
    labels = lambda texts: torch.tensor([[w in text.split() for w in words] for text in texts]).float()
    train_y, test_y = labels(train_text), labels(test_text)

    try:                                   # a clip whose codes or log-mel were never made: one line
        codes_train, info = data.read_codes(corpus / "train.jsonl", train_audio, args.bandwidth)
        codes_test, _ = data.read_codes(corpus / "test.jsonl", test_audio, args.bandwidth)
        mel_train = data.read_mels(corpus / "train.jsonl", train_audio)
        mel_test = data.read_mels(corpus / "test.jsonl", test_audio)
    except OSError as err:
        sys.exit(f"error: {err}; the stage commands above make every clip's codes and log-mel")
    code_auc, n = probe(bags([c[0] for c in codes_train]), train_y, bags([c[0] for c in codes_test]), test_y)

    frames = torch.cat([m.T for m in mel_train])                                   # (N, 80)
    sample = frames[torch.randperm(len(frames))[:KMEANS_FRAMES]]
    centres = data.kmeans(sample, UNITS, 10, torch.Generator().manual_seed(0))       # (1024, 80)
    assign = lambda m: (centres.pow(2).sum(1)[None] - 2 * m.T @ centres.T).argmin(1)
    mel_auc, _ = probe(bags([assign(m) for m in mel_train]), train_y,
                       bags([assign(m) for m in mel_test]), test_y)

    print(f"{len(train_audio)} training and {len(test_audio)} test clips, {n} words probed")
    print(f"codes ({info['codec']}, codebook 0)    word-presence AUC {code_auc:.3f}")
    print(f"log-mel k-means units (1024)        word-presence AUC {mel_auc:.3f}")


if __name__ == "__main__":
    main()
