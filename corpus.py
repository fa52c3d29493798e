"""
corpus.py: a synthetic speech corpus made here, with no download: sentences from a small grammar, spoken by
espeak-ng and flite, written as WAV files and data.py manifests.

Real speech corpora are gigabytes behind a download; this one takes two minutes on a laptop and is exactly
reproducible. In reading order:

  1. Numbers as words. Every transcript has one spelling: 41 is always "forty one", never "41".
  2. The grammar: templates with {slots} (home commands, numbers, dates, times, places, facts, and questions
     whose answers are computed from the drawn slots, never written by hand; arithmetic is answered with
     its working in digits, "43 + 13 = 56"), 41,230 distinct sentences.
  3. Voices: an engine, a base voice (the accent), for espeak-ng a variant (timbre, gender), a speed and a
     pitch, and a Parler-TTS-style description of them ("a slow, low-pitched male voice with a British
     accent"). The test split gets whole base voices that training never hears, so a good test score means
     the model learned speech, not one synthesizer's timbre; or, with --held-out speakers, (accent, timbre)
     pairs that training never hears together, so every word of a test description is heard in training.
  4. The corpus: every random choice is planned first from one seeded generator, then the synthesizers run
     in parallel, so the same seed and engine versions give byte-identical files. Options pick categories or
     templates and keep another corpus's test sentences out (the stage-2 question corpora of the README).

Run:
    python corpus.py --out corpus --n-train 2400 --n-test 300 --seed 0     # apt-get install espeak-ng flite
    python corpus.py --out corpus-questions --n-train 8000 --n-test 0 --categories question \
        --exclude corpus/test.jsonl --seed 1
    python corpus.py --out corpus-big --n-train 10000 --test-from corpus --seed 1   # more speech, same test
    python corpus.py --out corpus-speakers --n-train 2400 --n-test 300 --seed 0 --held-out speakers

References: espeak-ng (github.com/espeak-ng/espeak-ng), Flite (Black & Lenzo, 2001); natural-language voice
descriptions as in Parler-TTS (Lyth & King, "Natural language guidance of high-fidelity text-to-speech with
synthetic annotations", 2024).

Simplified on purpose: English only; the voices sound robotic, which is the price of having no download
at all; the grammar is small enough to enumerate, so "no sentence in both splits" is checked exactly.
"""

import argparse
import functools
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from data import SAMPLE_RATE, TASK_PROMPTS, load_audio, read_manifest, save_wav, write_manifest


# ----------------------------------------------------------------------------------------------------------
# 1. Numbers as words, so that every transcript has exactly one spelling ("41" could be "forty one").
ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
IRREGULAR_ORDINALS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                      "nine": "ninth", "twelve": "twelfth"}


@functools.lru_cache(maxsize=None)  # enumerating the grammar spells the same few hundred numbers 100k times
def number_to_words(n):
    """0 <= n < 1,000,000 in words, no hyphens, no 'and': 41 -> 'forty one', 105 -> 'one hundred five'."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_to_words: {n} is outside [0, 999999]")
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    head, rest, unit = (n // 100, n % 100, "hundred") if n < 1000 else (n // 1000, n % 1000, "thousand")
    return f"{number_to_words(head)} {unit}" + ("" if rest == 0 else " " + number_to_words(rest))


def ordinal_words(n):
    """1 -> 'first', 20 -> 'twentieth', 31 -> 'thirty first': only the last word changes."""
    *head, last = number_to_words(n).split()
    last = IRREGULAR_ORDINALS.get(last) or (last[:-1] + "ieth" if last.endswith("y") else last + "th")
    return " ".join(head + [last])


def year_words(year):
    """Years as people say them: 1984 -> 'nineteen eighty four', 2005 -> 'two thousand five', 2015 -> 'twenty
    fifteen', 1905 -> 'nineteen oh five'."""
    century, rest = divmod(year, 100)
    if 2000 <= year < 2010:
        return number_to_words(year)
    if rest == 0:
        return number_to_words(century) + " hundred"
    return number_to_words(century) + (" oh " if rest < 10 else " ") + number_to_words(rest)


def clock_times():
    """The 180 ways this corpus says a time: 'seven o'clock', 'seven oh five', 'seven ten', ..., 'half past
    seven', 'quarter to seven'."""
    times = []
    for hour in map(number_to_words, range(1, 13)):
        times += [f"{hour} o'clock", f"{hour} oh five"]
        times += [f"{hour} {number_to_words(minute)}" for minute in range(10, 60, 5)]
        times += [f"quarter past {hour}", f"half past {hour}", f"quarter to {hour}"]
    return times


# ----------------------------------------------------------------------------------------------------------
# 2. The grammar. A template is a pattern with {slots}; each slot draws from a list. Integer choices are
# spoken as words; a dict choice fills several slots at once (a country with its capital). Questions carry
# an `answer` function of the drawn values, so every question's answer is computed, never written by hand.
@dataclass(frozen=True)
class Template:
    category: str
    pattern: str             # what the synthesizer reads: may hold ',' and '?' for prosody
    slots: dict              # slot name -> list (or range) of choices
    answer: object = None    # questions only: drawn values -> the answer (words, or worked arithmetic)
    valid: object = None     # drawn values -> False to reject a combination (e.g. "from paris to paris")


def worked(a, operator, b, result):
    """An arithmetic answer with its working, in digits: worked(43, "+", 13, 56) -> '43 + 13 = 56'."""
    return f"{a} {operator} {b} = {result}"


def template(category, pattern, answer=None, valid=None, **slots):
    """Shorthand for the table below: the slots are keyword arguments."""
    return Template(category, pattern, slots, answer, valid)


@dataclass(frozen=True)
class Sentence:
    category: str
    spoken: str              # the text handed to the synthesizer
    text: str                # the transcript: lower-case words, no punctuation
    answer: str = None       # questions only


ROOMS = ["kitchen", "bedroom", "living room", "bathroom", "hallway", "garage", "office", "dining room",
         "basement", "nursery"]
DEVICES = ["lights", "fan", "heater", "radio", "television", "lamp", "air conditioner", "coffee machine"]
OPENINGS = ["window", "door", "blinds", "curtains"]
GENRES = ["jazz", "classical", "rock", "folk", "country", "piano", "blues", "reggae"]
GROCERIES = ["milk", "eggs", "bread", "butter", "apples", "rice", "coffee", "tea", "cheese", "tomatoes",
             "onions", "carrots", "bananas", "yogurt", "honey", "flour", "sugar", "pasta", "oranges",
             "potatoes"]
PEOPLE = ["mum", "dad", "grandma", "the doctor", "the plumber", "my sister", "my brother"]
THINGS = ["apples", "books", "chairs", "students", "cars", "birds", "boxes", "bottles", "trees", "windows"]
PLACES = ["bank", "library", "post office", "museum", "train station", "bakery", "park", "hospital", "school",
          "cinema", "pharmacy", "supermarket"]
PREPOSITIONS = ["next to", "across from", "behind", "near", "around the corner from"]
STREETS = ["oak", "maple", "pine", "elm", "cedar", "birch", "willow", "river", "market", "church"]
CITIES = ["london", "paris", "berlin", "madrid", "rome", "tokyo", "cairo", "sydney", "toronto", "chicago",
          "dublin", "oslo", "lisbon", "vienna", "athens", "mumbai"]
CAPITALS = [{"country": c, "capital": k} for c, k in [
    ("france", "paris"), ("germany", "berlin"), ("spain", "madrid"), ("italy", "rome"), ("japan", "tokyo"),
    ("egypt", "cairo"), ("ireland", "dublin"), ("norway", "oslo"), ("portugal", "lisbon"),
    ("austria", "vienna"), ("greece", "athens"), ("canada", "ottawa"), ("kenya", "nairobi"), ("peru", "lima"),
    ("india", "new delhi"), ("china", "beijing"), ("russia", "moscow"), ("sweden", "stockholm"),
    ("poland", "warsaw"), ("mexico", "mexico city")]]
COUNT_FACTS = [{"thing": t, "parts": p, "n": n} for t, p, n in [
    ("a week", "days", 7), ("a year", "months", 12), ("a day", "hours", 24), ("an hour", "minutes", 60),
    ("a minute", "seconds", 60), ("a spider", "legs", 8), ("an octopus", "arms", 8), ("a dog", "legs", 4),
    ("a triangle", "sides", 3), ("a square", "corners", 4), ("a pentagon", "sides", 5),
    ("a hexagon", "sides", 6), ("a bicycle", "wheels", 2), ("a tricycle", "wheels", 3)]]
PLAIN_FACTS = ["water boils at one hundred degrees celsius", "water freezes at zero degrees celsius",
               "the sun rises in the east", "the sun sets in the west", "the moon goes around the earth",
               "bees make honey", "plants need light to grow", "the pacific is the largest ocean",
               "light travels faster than sound", "blue and yellow make green", "red and white make pink"]
WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december"]
MONTH_DAYS = dict(zip(MONTHS, [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]))  # 29: a leap year is allowed
ORDINALS = [ordinal_words(day) for day in range(1, 32)]  # ORDINALS[0] == "first"
YEARS = [year_words(year) for year in range(1950, 2025)]
TIMES = clock_times()


def in_month(values):
    return ORDINALS.index(values["day"]) < MONTH_DAYS[values["month"]]  # no "thirtieth of february"


def differ(values):
    return values["a"] != values["b"]  # no "from paris to paris", no "larger, six or six"


TEMPLATES = [
    template("command", "turn {switch} the {room} {device}", switch=["on", "off"], room=ROOMS,
             device=DEVICES),
    template("command", "please switch {switch} the {device} in the {room}", switch=["on", "off"], room=ROOMS,
             device=DEVICES),
    template("command", "set the {room} thermostat to {degrees} degrees", room=ROOMS, degrees=range(15, 31)),
    template("command", "dim the {room} lights to {percent} percent", room=ROOMS, percent=range(10, 100, 10)),
    template("command", "{action} the {room} {opening}", action=["open", "close"], room=ROOMS,
             opening=OPENINGS),
    template("command", "set a timer for {minutes} minutes", minutes=range(2, 61)),
    template("command", "play some {genre} music in the {room}", genre=GENRES, room=ROOMS),
    template("command", "add {item} to the shopping list", item=GROCERIES),
    template("command", "remind me to call {person} at {time}", person=PEOPLE, time=TIMES),
    template("number", "i counted {n} {things} this morning", n=range(2, 100), things=THINGS),
    template("number", "there are {n} people waiting outside", n=range(2, 100)),
    template("number", "my room number is {n}", n=range(100, 1000)),
    # commas make the synthesizer pause between digits, as people do; the transcript drops them
    template("number", "the door code is {a}, {b}, {c}, {d}", a=range(10), b=range(10), c=range(10),
             d=range(10)),
    template("number", "the package weighs {kg} kilograms", kg=range(2, 51)),
    template("number", "the final score was {a} to {b}", a=range(10), b=range(10)),
    template("date", "the meeting is on the {day} of {month}", valid=in_month, day=ORDINALS, month=MONTHS),
    template("date", "my birthday is on {month} {day}", valid=in_month, day=ORDINALS, month=MONTHS),
    template("date", "we are leaving on {weekday} the {day}", weekday=WEEKDAYS, day=ORDINALS),
    template("date", "the museum is closed on {weekday}s", weekday=WEEKDAYS),
    template("date", "she was born in {year}", year=YEARS),
    template("time", "the train leaves at {time}", time=TIMES),
    template("time", "wake me up at {time}", time=TIMES),
    template("time", "the film starts at {time} tonight", time=TIMES),
    template("time", "let's meet at {time} tomorrow", time=TIMES),
    template("place", "the {a} is {prep} the {b}", valid=differ, a=PLACES, prep=PREPOSITIONS, b=PLACES),
    template("place", "we flew from {a} to {b}", valid=differ, a=CITIES, b=CITIES),
    template("place", "the {place} is on {street} street", place=PLACES, street=STREETS),
    template("place", "turn left after the {place}", place=PLACES),
    template("fact", "{fact}", fact=PLAIN_FACTS),
    template("fact", "the capital of {country} is {capital}", pair=CAPITALS),
    template("fact", "{thing} has {n} {parts}", fact=COUNT_FACTS),
    # questions: the `?` gives espeak-ng a rising intonation; `answer` computes the reply from the slots.
    # Arithmetic is answered with its working in digits ("what is forty three plus thirteen?" -> "43 + 13 =
    # 56"): the model first writes down what it heard, then computes on digit tokens, the form in which the
    # LLM met arithmetic in pre-training (README, stage 2). Other answers are words.
    template("question", "what is {a} plus {b}?", lambda v: worked(v["a"], "+", v["b"], v["a"] + v["b"]),
             a=range(51), b=range(51)),
    template("question", "what is {a} minus {b}?", lambda v: worked(v["a"], "-", v["b"], v["a"] - v["b"]),
             lambda v: v["a"] >= v["b"], a=range(51), b=range(51)),  # no negative answers
    template("question", "what is {a} times {b}?", lambda v: worked(v["a"], "*", v["b"], v["a"] * v["b"]),
             a=range(13), b=range(13)),
    template("question", "which is larger, {a} or {b}?", lambda v: number_to_words(max(v["a"], v["b"])),
             differ, a=range(100), b=range(100)),
    template("question", "which is smaller, {a} or {b}?", lambda v: number_to_words(min(v["a"], v["b"])),
             differ, a=range(100), b=range(100)),
    template("question", "what number comes after {a}?", lambda v: number_to_words(v["a"] + 1),
             a=range(100)),
    template("question", "what number comes before {a}?", lambda v: number_to_words(v["a"] - 1),
             a=range(1, 101)),
    template("question", "what is half of {a}?", lambda v: worked(v["a"], "/", 2, v["a"] // 2),
             a=range(2, 101, 2)),
    template("question", "what day comes after {weekday}?",
             lambda v: WEEKDAYS[(WEEKDAYS.index(v["weekday"]) + 1) % 7], weekday=WEEKDAYS),
    template("question", "what day comes before {weekday}?",
             lambda v: WEEKDAYS[WEEKDAYS.index(v["weekday"]) - 1], weekday=WEEKDAYS),
    template("question", "what month comes after {month}?",
             lambda v: MONTHS[(MONTHS.index(v["month"]) + 1) % 12], month=MONTHS),
    template("question", "what is the capital of {country}?", lambda v: v["capital"], pair=CAPITALS),
    template("question", "how many {parts} does {thing} have?", lambda v: number_to_words(v["n"]),
             fact=COUNT_FACTS),
]
GRAMMAR_SIZE = 41230  # distinct sentences in TEMPLATES (len(list(all_sentences())), checked by the tests)
# How often each category is drawn (relative weights): questions often, since they also feed `instruct`.
CATEGORY_WEIGHTS = {"command": 3, "number": 2, "date": 1, "time": 1, "place": 1, "fact": 1, "question": 3}


NOT_A_WORD = re.compile(r"[^a-z' ]")  # what a transcript leaves out: punctuation for the synthesizer


def _fill(rule, drawn):
    """Turn drawn slot values into a Sentence, or None when the rule rejects the combination."""
    values = {}
    for name, value in drawn.items():
        values.update(value if isinstance(value, dict) else {name: value})  # a dict fills several slots
    if rule.valid is not None and not rule.valid(values):
        return None
    words = {k: number_to_words(v) if isinstance(v, int) else v for k, v in values.items()}
    spoken = rule.pattern.format(**words)
    text = " ".join(NOT_A_WORD.sub(" ", spoken.lower()).split())  # drop ',' and '?', keep "o'clock"
    return Sentence(rule.category, spoken, text, rule.answer(values) if rule.answer else None)


def random_sentence(rng, weights=CATEGORY_WEIGHTS, rules=TEMPLATES):
    """Draw one sentence: a category by `weights`, one of its `rules` uniformly, then each slot uniformly."""
    category = rng.choices(list(weights), weights=list(weights.values()))[0]
    rule = rng.choice([t for t in rules if t.category == category])
    while True:  # rejection sampling: redraw the slots until the rule accepts them ("paris to paris")
        sentence = _fill(rule, {name: rng.choice(choices) for name, choices in rule.slots.items()})
        if sentence is not None:
            return sentence


def all_sentences(rules=TEMPLATES):
    """Every sentence the grammar can make: 41,230 of them, enumerated in well under a second."""
    for rule in rules:
        for combination in itertools.product(*rule.slots.values()):
            sentence = _fill(rule, dict(zip(rule.slots, combination)))
            if sentence is not None:
                yield sentence


# ----------------------------------------------------------------------------------------------------------
# 3. Voices. A voice is an engine, a base voice (the accent) and, for espeak-ng, a variant (the timbre and
# gender), plus speed and pitch. Which voices only the test split hears is chosen by `held_out`:
#   "accents" (the default): whole base voices; a test score then means generalizing to a new accent, but
#       the words naming those accents ("Scottish") never occur in a training description;
#   "speakers": (accent, timbre) pairs; every accent and every timbre is heard in training, only not
#       together, so every word of a test description occurs in training descriptions.
ESPEAK_ACCENTS = {"en-us": "an American accent", "en-gb": "a British accent",
                  "en-gb-x-rp": "a Received Pronunciation accent", "en-gb-x-gbclan": "a Lancashire accent",
                  "en-gb-x-gbcwmd": "a West Midlands accent", "en-029": "a Caribbean accent",
                  "en-gb-scotland": "a Scottish accent", "en-us-nyc": "a New York accent"}
ESPEAK_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5"]  # m male, f female
ESPEAK_ONE_TIMBRE = {"en-gb"}  # espeak-ng 1.51 ignores +variant here (all 12 measured at 102 Hz): male
FLITE_VOICES = {"kal16": ("male", "an American accent"), "rms": ("male", "an American accent"),
                "slt": ("female", "an American accent"), "awb": ("male", "a Scottish accent")}
TEST_VOICES = {("espeak-ng", "en-gb-scotland"), ("espeak-ng", "en-us-nyc"), ("flite", "awb")}
# held_out="speakers": one male and one female timbre per accent, a different pair for each accent, and awb
TEST_SPEAKERS = {("espeak-ng", accent, variant)
                 for i, accent in enumerate(a for a in ESPEAK_ACCENTS if a not in ESPEAK_ONE_TIMBRE)
                 for variant in (f"m{i % 7 + 1}", f"f{i % 5 + 1}")} | {("flite", "awb", None)}
SPEED_RANGE = (130, 200)  # words per minute (espeak-ng -s); flite gets duration_stretch = 175 / speed
PITCH_RANGE = (30, 70)    # espeak-ng -p, on its 0..99 scale where 50 is the voice's own pitch
INSTALL_HINT = ("apt-get install espeak-ng (macOS: brew install espeak-ng; Windows: the installer from "
                "github.com/espeak-ng/espeak-ng/releases)")
HELD_OUT = ("accents", "speakers")


def voice_pool(split, engines, held_out="accents"):
    """The voices `split` may use, as (engine, base voice, variants); flite voices have no variants.
    accents: the base voices in TEST_VOICES are the test split's, all others training's.
    speakers: the (engine, base voice, variant) in TEST_SPEAKERS are the test split's, all others training's."""
    if held_out not in HELD_OUT:
        raise ValueError(f"held_out must be one of {', '.join(HELD_OUT)}, not {held_out!r}")
    is_test, pool = split == "test", []
    for engine, name in [("espeak-ng", v) for v in ESPEAK_ACCENTS] + [("flite", v) for v in FLITE_VOICES]:
        if engine not in engines:
            continue
        variants = ESPEAK_VARIANTS if engine == "espeak-ng" else [None]
        if held_out == "accents":
            mine = variants if ((engine, name) in TEST_VOICES) == is_test else []
        else:
            mine = [v for v in variants if ((engine, name, v) in TEST_SPEAKERS) == is_test]
        if mine:
            pool.append((engine, name, tuple(mine) if engine == "espeak-ng" else ()))
    return pool


def random_voice(rng, pool):
    engine, name, variants = rng.choice(pool)
    speed = rng.randint(*SPEED_RANGE)
    if engine == "flite":  # flite voices keep their own pitch and timbre
        return {"engine": engine, "voice": name, "speed": speed}
    return {"engine": engine, "voice": name, "variant": rng.choice(variants), "speed": speed,
            "pitch": rng.randint(*PITCH_RANGE)}


def describe_voice(voice):
    """A Parler-TTS-style description: 'a fast, high-pitched female voice with a British accent'."""
    if voice.get("engine") not in ("espeak-ng", "flite"):  # a real recording: say what its labels say
        gender = voice.get("gender", "")
        return f"a recorded {gender + ' ' if gender in ('female', 'male') else ''}human voice"
    # The thresholds cut SPEED_RANGE (130..200 wpm) and PITCH_RANGE (30..70) into rough thirds.
    speed = "slow" if voice["speed"] < 150 else "fast" if voice["speed"] >= 180 else "moderately paced"
    if voice["engine"] == "flite":
        gender, accent = FLITE_VOICES[voice["voice"]]
        return f"a {speed} {gender} voice with {accent}"
    female = voice["variant"].startswith("f") and voice["voice"] not in ESPEAK_ONE_TIMBRE
    gender = "female" if female else "male"
    pitch = ("low-pitched" if voice["pitch"] < 43 else "high-pitched" if voice["pitch"] > 57
             else "medium-pitched")
    return f"a {speed}, {pitch} {gender} voice with {ESPEAK_ACCENTS[voice['voice']]}"


def synthesize(text, voice, out_path, sr=SAMPLE_RATE):
    """Speak `text` with `voice` into a 16-bit mono WAV at `sr` Hz; return its length in seconds."""
    # A private temporary folder per call, so parallel workers never write the same file.
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.wav")  # espeak-ng writes 22.05 kHz, flite 16 kHz
        if voice["engine"] == "espeak-ng":
            command = ["espeak-ng", "-v", f"{voice['voice']}+{voice['variant']}", "-s", str(voice["speed"]),
                       "-p", str(voice["pitch"]), "-w", raw, text]
        else:
            stretch = 175 / voice["speed"]  # > 1 is slower
            command = ["flite", "-voice", voice["voice"], "--setf", f"duration_stretch={stretch:.3f}",
                       "-t", text, "-o", raw]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not os.path.exists(raw):
            reason = result.stderr.strip() or f"exit status {result.returncode}"
            raise RuntimeError(f"{command[0]} failed on {text!r}: {reason}")
        audio = load_audio(raw, sr=sr)
    save_wav(out_path, audio, sr)
    return len(audio) / sr


def _engine_version(engine):
    """The version line of `engine --version`, recorded in corpus.json: other versions give other audio."""
    result = subprocess.run([engine, "--version"], capture_output=True, text=True)
    lines = (result.stdout + result.stderr).strip().splitlines() or ["unknown"]
    line = next((x for x in lines if "version" in x.lower() or "text-to-speech" in x), lines[0])
    return line.split("  Data at:")[0].strip()  # espeak-ng also prints its data path: machine-specific


# ----------------------------------------------------------------------------------------------------------
# 4. The corpus: plan every random choice first (one seeded generator, one order), then synthesize in
# parallel. Parallel work cannot change the result because nothing random happens inside the workers.
def chosen_rules(categories=None, templates=None):
    """The templates make_corpus may draw from, and the weights of their categories: all of them by default,
    else only those of `categories` whose pattern matches the regular expression `templates`."""
    try:
        pattern = re.compile(templates or "")
    except re.error as err:
        raise ValueError(f"--templates {templates!r} is not a regular expression ({err})") from None
    rules = [t for t in TEMPLATES if pattern.search(t.pattern)]
    if categories is not None:
        unknown = sorted(set(categories) - set(CATEGORY_WEIGHTS))
        if unknown or not categories:
            raise ValueError(f"unknown categories {unknown}; choose from {sorted(CATEGORY_WEIGHTS)}")
        rules = [t for t in rules if t.category in categories]
    weights = {c: w for c, w in CATEGORY_WEIGHTS.items() if any(t.category == c for t in rules)}
    if not weights:
        raise ValueError(f"no template matches {templates!r} in categories {categories}")
    return rules, weights


def make_corpus(out_dir, n_train=2000, n_test=300, seed=0, workers=2, continue_fraction=0.15, engines=None,
                progress=True, categories=None, templates=None, exclude=(), test_from=None, held_out=None):
    """Write out_dir/{train,test}/NNNNNN.wav, out_dir/{train,test}.jsonl and out_dir/corpus.json.

    n_train, n_test: utterances (audio files) per split. Each utterance gives a transcribe row; a question
    also gives an instruct row (response = the answer); with probability `continue_fraction` an utterance is
    only the first half of its sentence and gives a continue row instead (response = the other half).
    No sentence is in both splits. engines: a subset of ("espeak-ng", "flite"), None = all installed ones.
    categories: draw only these (e.g. ["question"] for a corpus of spoken questions), None = all.
    templates: a regular expression; draw only from templates whose pattern it matches ("plus|minus").
    exclude: sentences never to draw, e.g. another corpus's test split (see `manifest_sentences`).
    test_from: another corpus folder whose test split (audio and manifest) this one reuses instead of drawing
        its own (n_test must be 0), with its sentences excluded: a larger training set measured on the very
        same held-out clips.
    held_out: which voices only the test split hears, "accents" or "speakers" (section 3); None = "accents",
        or test_from's choice.
    The same seed and the same engine versions give byte-identical files.
    Returns {"train": rows, "test": rows} as written (audio paths relative to out_dir; read_manifest gives
    absolute ones).
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")
    rules, weights = chosen_rules(categories, templates)
    exclude = set(exclude)
    if test_from is not None:
        if n_test:
            raise ValueError(f"test_from={test_from} brings its own test split: ask for n_test=0, not {n_test}")
        exclude |= manifest_sentences(Path(test_from) / "test.jsonl")
        theirs = json.loads((Path(test_from) / "corpus.json").read_text()).get("held_out", "accents")
        if held_out not in (None, theirs):
            raise ValueError(f"{test_from} holds out {theirs}, so this corpus must too, not {held_out}")
        held_out = theirs  # the training split must not hear the other corpus's test voices
    held_out = held_out or "accents"
    available = (GRAMMAR_SIZE if len(rules) == len(TEMPLATES) and not exclude else
                 sum(s.text not in exclude for s in all_sentences(rules)))
    if n_train + n_test > available:  # every utterance is a different sentence
        raise ValueError(f"the grammar makes {available} distinct sentences of these categories; ask for at "
                         f"most that many utterances, not {n_train + n_test}")
    if shutil.which("espeak-ng") is None:
        raise RuntimeError(f"espeak-ng is not installed; install it with: {INSTALL_HINT}")
    if engines is None:
        engines = [engine for engine in ("espeak-ng", "flite") if shutil.which(engine)]
    for engine in engines:
        if engine not in ("espeak-ng", "flite") or shutil.which(engine) is None:
            raise ValueError(f"engine {engine!r} is not available; choose installed ones of espeak-ng, flite")
    out_dir = Path(out_dir)

    # 1. plan: sentences, halves for `continue`, voices
    rng = random.Random(seed)
    seen, plan = set(exclude), []
    for split, count in (("train", n_train), ("test", n_test)):
        pool = voice_pool(split, engines, held_out)
        for index in range(count):
            sentence = random_sentence(rng, weights, rules)
            while sentence.text in seen:  # 41k sentences: a repeat is rare and cheap to redraw
                sentence = random_sentence(rng, weights, rules)
            seen.add(sentence.text)  # shared by both splits: no test sentence is ever heard in training
            sentence_words = sentence.text.split()
            half = len(sentence_words) // 2
            is_half = rng.random() < continue_fraction and len(sentence_words) >= 4
            plan.append({"split": split, "audio": f"{split}/{index:06d}.wav", "sentence": sentence,
                         # the first half is spoken on its own; the rest becomes the continue target
                         "spoken": " ".join(sentence_words[:half]) if is_half else sentence.spoken,
                         "rest": " ".join(sentence_words[half:]) if is_half else None,
                         "voice": random_voice(rng, pool)})

    # 2. synthesize: subprocesses and torch release the GIL, so threads are enough; map keeps plan order
    def speak(item):
        return synthesize(item["spoken"], item["voice"], out_dir / item["audio"])
    with ThreadPoolExecutor(max_workers=workers) as executor:
        seconds = list(tqdm(executor.map(speak, plan), total=len(plan), desc="synthesizing", unit="utt",
                            disable=not progress))

    # 3. manifests: one row per task an utterance serves, all with the same keys. Rows of one utterance
    # share its audio file, so a model can learn to transcribe and to answer the very same recording.
    rows = {"train": [], "test": []}
    for item, duration in zip(plan, seconds):
        sentence = item["sentence"]
        transcript = item["spoken"] if item["rest"] else sentence.text  # a half is transcribed as spoken
        common = {"audio": item["audio"], "text": transcript, "voice": item["voice"],
                  "voice_description": describe_voice(item["voice"]), "lang": "en",
                  "category": sentence.category, "seconds": round(duration, 3)}
        tasks = [("transcribe", transcript)]
        if item["rest"]:
            tasks.append(("continue", item["rest"]))
        elif sentence.answer is not None:
            tasks.append(("instruct", sentence.answer))
        for task, response in tasks:
            row = {**common, "task": task, "prompt": TASK_PROMPTS[task], "response": response}
            rows[item["split"]].append(row)
    for split in rows:
        write_manifest(out_dir / f"{split}.jsonl", rows[split])
    if test_from is not None:                      # the other corpus's clips, copied (not linked: portable)
        shutil.copytree(Path(test_from) / "test", out_dir / "test", dirs_exist_ok=True)
        shutil.copyfile(Path(test_from) / "test.jsonl", out_dir / "test.jsonl")
        rows["test"] = [json.loads(line) for line in (out_dir / "test.jsonl").read_text().splitlines() if line]
    meta = {"seed": seed, "n_train": n_train, "n_test": n_test, "continue_fraction": continue_fraction,
            "categories": sorted(weights), "templates": templates, "excluded_sentences": len(exclude),
            "test_from": None if test_from is None else str(test_from),
            "engines": {engine: _engine_version(engine) for engine in engines},
            "held_out": held_out,  # and its test voices, e.g. "espeak-ng:en-us+m1/f1" for speakers
            "test_voices": sorted(f"{e}:{v}" + (f"+{'/'.join(vs)}" if held_out == "speakers" and vs else "")
                                  for e, v, vs in voice_pool("test", engines, held_out))}
    (out_dir / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n")
    return rows


def manifest_sentences(path):
    """The whole sentences a corpus manifest speaks (a `continue` row's text + response is one), so that
    `make_corpus(exclude=...)` can keep a new corpus's sentences out of an existing test split."""
    return {f"{r['text']} {r['response']}" if r["task"] == "continue" else r["text"]
            for r in read_manifest(path)}


# ----------------------------------------------------------------------------------------------------------
# Command line: python corpus.py --out corpus ...

def main(argv=None):
    parser = argparse.ArgumentParser(description="A synthetic speech corpus: grammar sentences spoken by "
                                                 "espeak-ng (+ flite), as WAV files and JSONL manifests")
    parser.add_argument("--out", default="corpus", help="output folder")
    parser.add_argument("--n-train", type=int, default=2000, help="training utterances")
    parser.add_argument("--n-test", type=int, default=None, help="test utterances (unseen voices); default "
                        "300, or 0 with --test-from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="parallel synthesizer processes")
    parser.add_argument("--categories", nargs="+", help=f"only these, of {', '.join(CATEGORY_WEIGHTS)}")
    parser.add_argument("--templates", metavar="REGEX", help="only templates matching this, e.g. 'plus|minus'")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="MANIFEST",
                        help="never speak a sentence these manifests speak (e.g. corpus/test.jsonl)")
    parser.add_argument("--test-from", metavar="CORPUS", help="reuse this corpus's test split (audio and "
                        "manifest) and keep its sentences out of training, e.g. --test-from corpus")
    parser.add_argument("--held-out", choices=HELD_OUT, help="voices only the test split hears: whole accents "
                        "(default) or (accent, timbre) speakers, so that every accent is heard in training")
    args = parser.parse_args(argv)
    if args.n_test is None:
        args.n_test = 0 if args.test_from else 300
    try:
        exclude = set().union(*(manifest_sentences(m) for m in args.exclude))
        rows = make_corpus(args.out, args.n_train, args.n_test, args.seed, workers=args.workers,
                           categories=args.categories, templates=args.templates, exclude=exclude,
                           test_from=args.test_from, held_out=args.held_out)
    except (ValueError, OSError, RuntimeError) as err:  # user errors: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    n_rows = len(rows["train"]) + len(rows["test"])
    n_test = len({r["audio"] for r in rows["test"]})
    print(f"wrote {args.n_train} + {n_test} utterances ({n_rows} manifest rows) to {args.out}/"
          + (f" (test split: {args.test_from}'s)" if args.test_from else ""))


if __name__ == "__main__":
    main()
