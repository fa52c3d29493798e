"""
Which spoken questions does a stage-2 checkpoint answer? Accuracy on the held-out questions, by kind.

    python -m scripts.question_accuracy out/instruct [--manifest corpus/test.jsonl] [--show-wrong]

Each `instruct` row of the manifest is decoded from its audio file (the same path as `infer.py`: WAV ->
log-mel -> encoder -> projector -> LLM, greedy), and the answer counts when its normalised words equal the
row's response, as in train.py's evaluation. train.py reads cached fp16 encoder outputs instead of running
the encoder, so its accuracy can differ from this one by a question or two.
"""
import argparse
import collections
import sys

import torch

import data
import infer
from checkpoint import CheckpointCorrupt
from config import ConfigError
from weights import CheckpointError

# the question templates of data.py, told apart by a word each one has and the others lack
KINDS = ("plus", "minus", "times", "half", "larger", "smaller", "comes after", "comes before", "day comes",
         "month comes", "capital", "how many")


def kind_of(question):
    return next((k for k in KINDS if k in question), "other")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("checkpoint", help="a stage-2 out_dir, e.g. out/instruct")
    parser.add_argument("--manifest", default="corpus/test.jsonl", help="rows with task instruct are asked")
    parser.add_argument("--show-wrong", action="store_true", help="print each wrong answer")
    args = parser.parse_args(argv)
    try:                                    # user errors (no checkpoint, no manifest): one line, exit code 2
        audio_lm = infer.load_trained(args.checkpoint)
        rows = [r for r in data.read_manifest(args.manifest) if r["task"] == "instruct"]
    except (ConfigError, CheckpointError, CheckpointCorrupt, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if not rows:
        print(f"error: {args.manifest} has no instruct rows (spoken questions)", file=sys.stderr)
        sys.exit(2)
    right = collections.defaultdict(list)                          # kind -> [True, False, ...]
    with torch.no_grad():
        for row in rows:
            answer = audio_lm.generate(data.load_audio(row["audio"]), row["prompt"], max_new_tokens=48)
            ok = data.normalize_text(answer) == data.normalize_text(row["response"])
            right[kind_of(row["text"])].append(ok)
            if args.show_wrong and not ok:
                print(f"  {row['text']!r} -> {answer!r} (expected {row['response']!r})")
    for kind, oks in sorted(right.items(), key=lambda item: -len(item[1])):
        print(f"{kind:14s} {sum(oks):3d} / {len(oks):3d}")
    total = sum(sum(oks) for oks in right.values())
    print(f"{'all':14s} {total:3d} / {len(rows):3d} = {total / len(rows):.1%}")


if __name__ == "__main__":
    main()
