"""
Can the LLM itself do the corpus's arithmetic, as text? Few-shot, in digits and in words.

    python -m scripts.text_arithmetic [--llm checkpoints/SmolLM2-135M-Instruct] [--n 60] [--seed 0]

For each kind (sums and differences of 0..50, products of 0..12, halves of even 2..100), n random problems
are written after two worked examples, once in digits ("3 + 2 = 5 / 7 + 4 = 11 / 24 + 48 =") and once in
words ("three plus two is five / ... / twenty four plus forty eight is"; "half of ten is five / ..."), and
the untouched LLM completes them greedily. A completion counts when its first number, in digits or in words,
is the right result. This is why corpus.py answers arithmetic with its working in digits (README, stage 2).
"""
import argparse
import random
import sys

import torch

import corpus
import data
import weights

KINDS = {  # kind: (in words, in digits, the result, first operands, second operands)
    "plus": ("{a} plus {b}", "{a} + {b}", lambda a, b: a + b, range(51), range(51)),
    "minus": ("{a} minus {b}", "{a} - {b}", lambda a, b: a - b, range(51), range(51)),
    "times": ("{a} times {b}", "{a} * {b}", lambda a, b: a * b, range(13), range(13)),
    "half": ("half of {a}", "{a} / {b}", lambda a, b: a // b, range(2, 101, 2), [2]),
}


def first_number(text, by_words):
    """The first number of a completion, written in digits ("56") or in words ("fifty six"), else None."""
    words = data.normalize_text(text).split()
    for i, word in enumerate(words):
        if word.isdigit():
            return int(word)
        for n in (3, 2, 1):                               # "one hundred five" before "one hundred" and "one"
            if " ".join(words[i:i + n]) in by_words:
                return by_words[" ".join(words[i:i + n])]
    return None


def problems(kind, n, rng):
    """n (prompt in digits, prompt in words, result) of one kind, each prompt after two worked examples."""
    in_words, in_digits, result, first, second = KINDS[kind]
    pairs = [(3, 2), (7, 4)] if kind != "half" else [(10, 2), (8, 2)]   # the two examples
    while len(pairs) < n + 2:
        a, b = rng.choice(first), rng.choice(second)
        if result(a, b) >= 0:                             # no negative differences, as in the corpus
            pairs.append((a, b))
    words = corpus.number_to_words
    digit_lines = [f"{in_digits.format(a=a, b=b)} = {result(a, b)}" for a, b in pairs]
    word_lines = [f"{in_words.format(a=words(a), b=words(b))} is {words(result(a, b))}" for a, b in pairs]
    return [("\n".join(digit_lines[:2] + [digit_lines[i].rsplit(" ", 1)[0]]),      # "... \n24 + 48 ="
             "\n".join(word_lines[:2] + [word_lines[i].rsplit(" is ", 1)[0] + " is"]),
             result(*pairs[i])) for i in range(2, n + 2)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--llm", default="checkpoints/SmolLM2-135M-Instruct", help="an LLM checkpoint folder")
    parser.add_argument("--n", type=int, default=60, help="problems per kind")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:                                   # no such checkpoint folder: one line, not a traceback
        llm, tokenizer = weights.load_llm(args.llm).eval(), weights.Tokenizer(args.llm)
    except (weights.CheckpointError, OSError) as err:
        sys.exit(f"error: {err}")
    by_words = {corpus.number_to_words(n): n for n in range(1000)}
    rng = random.Random(args.seed)
    print(f"{'kind':6s} {'digits':>9s} {'words':>9s}   (right of {args.n}, two worked examples first)")
    for kind in KINDS:
        right = {"digits": 0, "words": 0}
        for in_digits, in_words, result in problems(kind, args.n, rng):
            for form, prompt in (("digits", in_digits), ("words", in_words)):
                ids = torch.tensor([tokenizer.encode(prompt)])
                completion = tokenizer.decode(llm.generate(ids, max_new_tokens=6)[0])
                right[form] += first_number(completion, by_words) == result
        print(f"{kind:6s} {right['digits']:9d} {right['words']:9d}")


if __name__ == "__main__":
    main()
