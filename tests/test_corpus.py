"""
Tests for corpus.py: a synthetic speech corpus whose every answer is right and whose test voices are new.

The lesson: a generated dataset is only as good as its checks. Every question's answer is recomputed by an
independent reader of number words (and the calendar module for days and months), the grammar's size is
counted by hand, the voice split is checked to hold out whole voices, and a tiny corpus is spoken twice to
prove the same seed gives byte-identical files. The stage-2 question corpora are checked to pick only the
templates asked for and to keep another corpus's test sentences out.

Run:  python -m pytest tests/test_corpus.py -q      (CPU, seconds; the spoken-corpus tests need espeak-ng)
"""

import calendar
import json
import random
import re
import shutil
import wave

import pytest

import corpus
import data

# ----------------------------------------------------------------------------------------------------------
# 1. The grammar, checked against an independent reader of number words

UNITS = {word: value for value, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
        "ninety": 90}


def words_to_number(text):
    """'one hundred twenty three thousand four' -> 123004: a second, independent implementation."""
    total, current = 0, 0
    for word in text.split():
        if word in UNITS or word in TENS:
            current += UNITS.get(word, TENS.get(word))
        elif word == "hundred":
            current *= 100
        elif word == "thousand":
            total, current = total + current * 1000, 0
        else:
            raise ValueError(f"not a number word: {word}")
    return total + current


def test_number_words_hand_examples():
    assert [corpus.number_to_words(n) for n in (0, 7, 19, 41, 100, 105, 999, 1000, 123456)] == [
        "zero", "seven", "nineteen", "forty one", "one hundred", "one hundred five",
        "nine hundred ninety nine", "one thousand",
        "one hundred twenty three thousand four hundred fifty six"]
    assert [corpus.ordinal_words(n) for n in (1, 2, 3, 12, 20, 21, 31)] == [
        "first", "second", "third", "twelfth", "twentieth", "twenty first", "thirty first"]
    assert [corpus.year_words(y) for y in (1984, 1905, 2000, 2005, 2015)] == [
        "nineteen eighty four", "nineteen oh five", "two thousand", "two thousand five", "twenty fifteen"]
    assert all(words_to_number(corpus.number_to_words(n)) == n for n in [*range(1000), *range(0, 10**6, 997)])


@pytest.fixture(scope="module")
def every_sentence():
    return list(corpus.all_sentences())


def test_grammar_size_hand_counted(every_sentence):
    counts = {}
    for sentence in every_sentence:
        counts[sentence.category] = counts.get(sentence.category, 0) + 1
    assert counts == {
        # on/off x 10 rooms x 8 devices twice, thermostat 10 x 16, dim 10 x 9, open/close 2 x 10 x 4,
        # timer 59, music 8 x 10, shopping 20, reminders 7 people x 180 times
        "command": 160 + 160 + 160 + 90 + 80 + 59 + 80 + 20 + 1260,
        "number": 98 * 10 + 98 + 900 + 10**4 + 49 + 100,           # counted, people, room, code, kg, score
        "date": 366 + 366 + 7 * 31 + 7 + 75,                       # 366 real days (with february 29th)
        "time": 4 * 180,                                           # 12 hours x 15 ways to say a time
        "place": 12 * 11 * 5 + 16 * 15 + 12 * 10 + 12,
        "fact": 11 + 20 + 14,
        "question": 51 * 51 + 51 * 52 // 2 + 13 * 13 + 2 * 100 * 99 + 100 + 100 + 50 + 7 + 7 + 12 + 20 + 14}
    assert len({s.text for s in every_sentence}) == len(every_sentence) == corpus.GRAMMAR_SIZE  # no repeats


def test_every_question_answer_is_right(every_sentence):
    days = [day.lower() for day in calendar.day_name]       # the calendar module as the reference
    months = [month.lower() for month in calendar.month_name[1:]]
    capitals = dict(pair.split(":") for pair in (
        "france:paris germany:berlin spain:madrid italy:rome japan:tokyo egypt:cairo ireland:dublin "
        "norway:oslo portugal:lisbon austria:vienna greece:athens canada:ottawa kenya:nairobi peru:lima "
        "india:new_delhi china:beijing russia:moscow sweden:stockholm poland:warsaw mexico:mexico_city"
    ).split())
    counts = {"legs a spider": 8, "legs a dog": 4, "arms an octopus": 8, "days a week": 7,
              "months a year": 12, "hours a day": 24, "minutes an hour": 60, "seconds a minute": 60,
              "sides a triangle": 3, "corners a square": 4, "sides a pentagon": 5, "sides a hexagon": 6,
              "wheels a bicycle": 2, "wheels a tricycle": 3}
    # arithmetic: (question pattern, the working it must show, what it computes); the spoken numbers are read
    # back with words_to_number and must be the digits the working starts from
    arithmetic = [(r"what is (.+) plus (.+)", "{} + {} = {}", lambda a, b: a + b),
                  (r"what is (.+) minus (.+)", "{} - {} = {}", lambda a, b: a - b),
                  (r"what is (.+) times (.+)", "{} * {} = {}", lambda a, b: a * b),
                  (r"what is half of (.+)", "{} / 2 = {}", lambda a: a / 2)]
    # (question pattern, what the answer in words must be)
    rules = [(r"which is larger (.+) or (.+)", max),
             (r"which is smaller (.+) or (.+)", min),
             (r"what number comes after (.+)", lambda a: a + 1),
             (r"what number comes before (.+)", lambda a: a - 1)]
    questions = [s for s in every_sentence if s.category == "question"]
    assert all(s.answer for s in questions)
    assert all(s.answer is None for s in every_sentence if s.category != "question")
    n_worked = 0
    for s in questions:
        worked = [(m, w, f) for m, w, f in ((re.fullmatch(p, s.text), w, f) for p, w, f in arithmetic) if m]
        numeric = [(m, f) for m, f in ((re.fullmatch(p, s.text), f) for p, f in rules) if m]
        if worked:
            match, working, compute = worked[0]
            spoken = [words_to_number(group) for group in match.groups()]
            result = compute(*spoken)
            assert result == int(result), s                      # halves of even numbers, no negatives
            assert s.answer == working.format(*spoken, int(result)), s
            n_worked += 1
        elif numeric:
            match, compute = numeric[0]
            assert words_to_number(s.answer) == compute(*map(words_to_number, match.groups())), s
        elif match := re.fullmatch(r"what (day|month) comes (after|before) (\w+)", s.text):
            names = days if match[1] == "day" else months
            step = 1 if match[2] == "after" else -1
            assert s.answer == names[(names.index(match[3]) + step) % len(names)], s
        elif match := re.fullmatch(r"what is the capital of (.+)", s.text):
            assert s.answer == capitals[match[1]].replace("_", " "), s
        else:
            match = re.fullmatch(r"how many (\w+) does (.+) have", s.text)
            assert words_to_number(s.answer) == counts[f"{match[1]} {match[2]}"], s
    assert n_worked == 51 * 51 + 51 * 52 // 2 + 13 * 13 + 50      # sums, differences, products, halves


def test_random_sentences_come_from_the_grammar(every_sentence):
    known = {s.text for s in every_sentence}
    rng = random.Random(0)
    drawn = [corpus.random_sentence(rng) for _ in range(300)]
    assert all(s.text in known for s in drawn)
    rng = random.Random(0)
    assert [corpus.random_sentence(rng) for _ in range(300)] == drawn  # the seed decides everything


def test_voices_split_and_described():
    engines = ("espeak-ng", "flite")

    def speakers(pool):  # (engine, base voice, variant) triples
        return {(e, v, x) for e, v, variants in pool for x in variants or [None]}
    every = speakers(corpus.voice_pool("train", engines) + corpus.voice_pool("test", engines))
    assert len(every) == 8 * 12 + 4
    # accents: whole base voices held out, each with all 12 timbres (the draws of earlier corpora, unchanged)
    train, test = corpus.voice_pool("train", engines), corpus.voice_pool("test", engines)
    assert {(e, v) for e, v, _ in test} == corpus.TEST_VOICES and len(train) == 9
    assert not {(e, v) for e, v, _ in train} & corpus.TEST_VOICES
    # speakers: (accent, timbre) pairs held out; every accent, timbre and gender is still heard in training
    train = speakers(corpus.voice_pool("train", engines, "speakers"))
    test = speakers(corpus.voice_pool("test", engines, "speakers"))
    assert test == corpus.TEST_SPEAKERS and len(test) == 7 * 2 + 1 and train == every - test
    def accents(triples):
        return {corpus.ESPEAK_ACCENTS.get(v) or corpus.FLITE_VOICES[v][1] for _, v, _ in triples}
    assert accents(test) <= accents(train) and {x for *_, x in test} <= {x for *_, x in train}
    with pytest.raises(ValueError, match="accents, speakers"):
        corpus.voice_pool("test", engines, "voices")

    voice = {"engine": "espeak-ng", "voice": "en-gb-x-rp", "variant": "f2", "speed": 190, "pitch": 65}
    assert corpus.describe_voice(voice) == "a fast, high-pitched female voice with a Received Pronunciation accent"
    voice["voice"] = "en-gb"  # espeak-ng ignores variants on en-gb: what it speaks is a male voice
    assert corpus.describe_voice(voice) == "a fast, high-pitched male voice with a British accent"
    voice = {"engine": "espeak-ng", "voice": "en-029", "variant": "m3", "speed": 140, "pitch": 50}
    assert corpus.describe_voice(voice) == "a slow, medium-pitched male voice with a Caribbean accent"
    assert corpus.describe_voice({"engine": "flite", "voice": "slt", "speed": 160}) == \
        "a moderately paced female voice with an American accent"
    assert corpus.describe_voice({"speaker": "84"}) == "a recorded human voice"  # LibriSpeech, Common Voice
    assert corpus.describe_voice({"speaker": "abc", "gender": "female"}) == "a recorded female human voice"


# ----------------------------------------------------------------------------------------------------------
# 2. A tiny corpus, spoken for real (skipped without espeak-ng)

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")
TINY = dict(n_train=6, n_test=4, seed=2, continue_fraction=0.3, progress=False)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    corpus.make_corpus(folder, **TINY)
    return folder


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@needs_espeak
def test_corpus_is_deterministic(tiny_corpus, tmp_path):
    corpus.make_corpus(tmp_path / "again", **TINY)
    first, second = tree(tiny_corpus), tree(tmp_path / "again")
    assert len(first) == 6 + 4 + 3 and first == second  # 10 wavs, 2 manifests, corpus.json; identical bytes


@needs_espeak
def test_corpus_rows(tiny_corpus, every_sentence):
    known = {s.text: s for s in every_sentence}
    train = data.read_manifest(tiny_corpus / "train.jsonl")
    test = data.read_manifest(tiny_corpus / "test.jsonl")
    train_voices = {(r["voice"]["engine"], r["voice"]["voice"]) for r in train}
    test_voices = {(r["voice"]["engine"], r["voice"]["voice"]) for r in test}
    assert test_voices <= corpus.TEST_VOICES and not train_voices & test_voices  # whole voices held out
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert {r["task"] for r in train + test} == {"transcribe", "continue", "instruct"}  # seed 2 has all 3
    for row in train + test:
        with wave.open(row["audio"]) as f:
            assert (f.getnchannels(), f.getsampwidth(), f.getframerate()) == (1, 2, 16000)
        audio = data.load_audio(row["audio"])
        assert abs(len(audio) / 16000 - row["seconds"]) < 1e-3 and audio.abs().max() > 0.05  # not silence
        assert row["voice_description"] == corpus.describe_voice(row["voice"])
        if row["task"] == "transcribe":
            assert row["response"] == row["text"]
        elif row["task"] == "instruct":  # the same audio as a transcribe row; the answer from the grammar
            assert row["response"] == known[row["text"]].answer
        else:  # the audio holds the first half; the two halves make a grammar sentence
            assert f"{row['text']} {row['response']}" in known


@needs_espeak
def test_a_corpus_of_chosen_templates_keeps_out_another_test_split(tiny_corpus, tmp_path):
    # the recipe behind `make instruct-gpu`: more spoken sums, none of them a sentence the test split speaks
    held_out = corpus.manifest_sentences(tiny_corpus / "test.jsonl")
    plus = {s.text for s in corpus.all_sentences() if " plus " in s.text}
    exclude = held_out | set(sorted(plus)[:2500])           # leave ~100 sums, so the exclusion must bite
    left = len(plus - exclude)
    corpus.make_corpus(tmp_path, n_train=5, n_test=0, seed=3, continue_fraction=0.0, progress=False,
                     categories=["question"], templates=r"\bplus\b", exclude=exclude)
    rows = data.read_manifest(tmp_path / "train.jsonl")
    assert len(rows) == 10 and {r["task"] for r in rows} == {"transcribe", "instruct"}
    for row in rows:
        assert row["text"] in plus and row["text"] not in exclude
        if row["task"] == "instruct":                        # "what is a plus b" -> "a + b = c" in digits
            a, b = row["text"][len("what is "):].split(" plus ")
            words = {corpus.number_to_words(n): n for n in range(101)}
            assert row["response"] == f"{words[a]} + {words[b]} = {words[a] + words[b]}"
    with pytest.raises(ValueError, match=f"makes {left} distinct sentences"):
        corpus.make_corpus(tmp_path / "x", n_train=left + 1, n_test=0, categories=["question"],
                         templates=r"\bplus\b", exclude=exclude, progress=False)


@needs_espeak
def test_a_bigger_corpus_reuses_another_test_split(tiny_corpus, tmp_path):
    # --test-from: more training speech, measured on the very same held-out clips
    corpus.make_corpus(tmp_path / "big", n_train=8, n_test=0, seed=5, progress=False, test_from=tiny_corpus)
    corpus.make_corpus(tmp_path / "plain", n_train=8, n_test=0, seed=5, progress=False,
                       exclude=corpus.manifest_sentences(tiny_corpus / "test.jsonl"))
    big, old = tree(tmp_path / "big"), tree(tiny_corpus)
    assert {k: v for k, v in big.items() if k.startswith("test")} == \
        {k: v for k, v in old.items() if k.startswith("test")}              # 4 wavs and test.jsonl, same bytes
    assert big["train.jsonl"] == tree(tmp_path / "plain")["train.jsonl"]    # = excluding those sentences
    with pytest.raises(ValueError, match="n_test=0"):
        corpus.make_corpus(tmp_path / "x", n_train=2, n_test=1, progress=False, test_from=tiny_corpus)


@needs_espeak
def test_held_out_speakers(tmp_path):
    # every accent is heard in training; the test split's (accent, timbre) pairs never are, and a bigger
    # corpus made --test-from it holds out the same speakers
    corpus.make_corpus(tmp_path / "spk", **{**TINY, "n_train": 12}, held_out="speakers")
    corpus.make_corpus(tmp_path / "big", n_train=12, n_test=0, seed=4, progress=False, test_from=tmp_path / "spk")
    for folder in ("spk", "big"):
        train = data.read_manifest(tmp_path / folder / "train.jsonl")
        test = data.read_manifest(tmp_path / folder / "test.jsonl")
        who = [{(r["voice"]["engine"], r["voice"]["voice"], r["voice"].get("variant")) for r in rows}
               for rows in (train, test)]
        assert who[1] <= corpus.TEST_SPEAKERS and not who[0] & corpus.TEST_SPEAKERS
        assert json.loads((tmp_path / folder / "corpus.json").read_text())["held_out"] == "speakers"
    with pytest.raises(ValueError, match="holds out speakers"):
        corpus.make_corpus(tmp_path / "x", n_train=1, n_test=0, progress=False, test_from=tmp_path / "spk",
                           held_out="accents")


def test_manifest_sentences_rejoins_halves(tmp_path):
    rows = [{"audio": "a.wav", "text": "turn on the", "task": "continue", "response": "kitchen lights"},
            {"audio": "b.wav", "text": "what is two plus two", "task": "instruct", "response": "four"}]
    data.write_manifest(tmp_path / "m.jsonl", rows)
    assert corpus.manifest_sentences(tmp_path / "m.jsonl") == {"turn on the kitchen lights", "what is two plus two"}


def test_corpus_needs_espeak(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        corpus.make_corpus(tmp_path, n_train=1, n_test=1)


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        corpus.main(["--out", str(tmp_path), "--n-train", "-1"])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
