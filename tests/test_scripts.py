"""
Tests for the measuring scripts behind README figures: scripts/text_arithmetic.py and scripts/code_probe.py.

The lesson: a number in a README is only as good as the code that measured it, so the measuring code gets
hand-computed checks too.
"""
import random
import re

import pytest
import torch

import corpus
import data
from scripts import code_probe, text_arithmetic, train_codec


def test_first_number_reads_digits_or_words_whichever_comes_first():
    by_words = {corpus.number_to_words(n): n for n in range(1000)}
    assert text_arithmetic.first_number(" 120.\n\nThe answer", by_words) == 120
    assert text_arithmetic.first_number(" twenty five\n\n3", by_words) == 25
    assert text_arithmetic.first_number("The answer is one hundred five", by_words) == 105
    assert text_arithmetic.first_number(" no number here", by_words) is None


def test_arithmetic_prompts_pose_the_problem_whose_result_is_scored():
    words = {corpus.number_to_words(n): n for n in range(200)}
    symbols = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
               "/": lambda a, b: a // b}
    for kind in text_arithmetic.KINDS:
        for in_digits, in_words, result in text_arithmetic.problems(kind, 20, random.Random(kind)):
            lines = in_digits.split("\n")
            assert len(lines) == 3 and in_words.count("\n") == 2      # two examples, then the problem
            for line in lines[:2]:                                                # the examples are right
                a, op, b, c = re.fullmatch(r"(\d+) (.) (\d+) = (\d+)", line).groups()
                assert symbols[op](int(a), int(b)) == int(c)
            a, op, b = re.fullmatch(r"(\d+) (.) (\d+) =", lines[2]).groups()
            assert symbols[op](int(a), int(b)) == result >= 0
            spoken = in_words.split("\n")[2]                                      # the same numbers, in words
            numbers = [words[n] for n in re.split(r" plus | minus | times | is$|half of ", spoken) if n]
            assert numbers == ([int(a)] if kind == "half" else [int(a), int(b)]), spoken


def test_auc_and_bags_by_hand():
    assert code_probe.auc(torch.tensor([0.9, 0.8, 0.3, 0.1]), torch.tensor([1, 1, 0, 0])) == 1.0
    assert code_probe.auc(torch.tensor([0.9, 0.8, 0.3, 0.1]), torch.tensor([0, 1, 1, 0])) == 0.5
    assert code_probe.auc(torch.tensor([0.2, 0.2, 0.5]), torch.tensor([1, 0, 0])) == 0.25  # a tie, a loss
    bag = code_probe.bags([torch.tensor([3, 3, 7, 1])])
    assert bag.shape == (1, code_probe.UNITS) and bag[0, 3] == 0.5 and bag[0, 7] == bag[0, 1] == 0.25


def test_probe_finds_a_word_that_the_units_carry_and_not_one_they_do_not():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 32, generator=g)
    carried = (x[:, 5] > 0.5).float()                                            # unit 5 says the word
    unrelated = (torch.rand(400, generator=g) > 0.5).float()
    mean_auc, n = code_probe.probe(x[:300], carried[:300, None], x[300:], carried[300:, None])
    assert n == 1 and mean_auc > 0.95
    mean_auc, _ = code_probe.probe(x[:300], unrelated[:300, None], x[300:], unrelated[300:, None])
    assert 0.35 < mean_auc < 0.65


def test_a_codec_trained_here_loads_by_folder_and_its_codes_are_its_own(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = torch.arange(12000) / data.CODEC_SAMPLE_RATE
    clips = [0.3 * torch.sin(2 * torch.pi * f * t) + 0.01 * torch.randn(12000, generator=g) for f in (200, 300)]
    rows = train_codec.train_codec(clips, tmp_path / "codec", steps=4, batch=2, seconds=0.2, log=lambda m: None)
    assert len(rows) == 1 and rows[0]["step"] == 4                               # the last step is logged
    trained = data.load_codec(str(tmp_path / "codec"))
    untrained = data.Codec(data.untrained_encodec(), 1.5, pretrained=False)       # what offline runs get
    assert trained.name == "encodec_24khz-trained-here" and trained.pretrained
    assert trained.fingerprint() != untrained.fingerprint()                      # its codes never mix
    codes = trained.encode(clips[0])
    assert codes.shape == (2, 12000 // 320 + 1) and codes.max() < data.CODEBOOK_SIZE
    assert not torch.equal(codes[0], torch.zeros_like(codes[0]))                 # k-means filled its codebooks
    # a corpus whose codes the untrained codec made: the trained one is refused by fingerprint, not mixed in
    data.save_wav(tmp_path / "a.wav", clips[0], data.CODEC_SAMPLE_RATE)
    data.write_manifest(tmp_path / "m.jsonl", [{"audio": "a.wav", "text": "x"}])
    data.encode_manifest_codes(tmp_path / "m.jsonl", 1.5, "", log=lambda m: None, codec=untrained)
    with pytest.raises(ValueError, match="encodec_24khz-trained-here .*delete"):
        data.encode_manifest_codes(tmp_path / "m.jsonl", 1.5, str(tmp_path / "codec"), log=lambda m: None)
