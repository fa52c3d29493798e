"""
Lesson: the training loop is honest. The loss is computed on the response tokens only (padding and
prompt never count), a tiny model really learns, and a run interrupted and resumed repeats the
uninterrupted run's losses bit for bit.

Everything runs on the `tiny` preset (random ~0.3M-parameter encoder and LLM written to tmp_path)
with a corpus of noise clips made in the test, so no speech synthesizer or download is needed.

Run:  python -m pytest tests/test_train.py
"""

import pytest
import torch

import config
import data
import weights
import train

SENTENCES = ["turn on the lights", "what time is it", "seven plus two is nine", "the sky is blue",
             "open the door", "call my sister", "play some music", "it is raining"]


@pytest.fixture
def corpus(tmp_path):
    """A tiny manifest corpus: each sentence gets a clip whose pitch encodes its index."""
    rows = {"train": [], "test": []}
    for split, count in (("train", 16), ("test", 4)):
        for i in range(count):
            k = i % len(SENTENCES)
            t = torch.arange(int(16000 * (0.5 + 0.1 * k))) / 16000
            audio = 0.3 * torch.sin(2 * torch.pi * (200 + 100 * k) * t) + 0.01 * torch.randn(t.numel())
            path = tmp_path / "corpus" / split / f"{i:03d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            data.save_wav(path, audio)
            rows[split].append({"audio": f"{split}/{i:03d}.wav", "text": SENTENCES[k], "task": "transcribe",
                                "prompt": "Transcribe the audio.", "response": SENTENCES[k], "seconds": 0.5})
    for split in rows:
        data.write_manifest(tmp_path / "corpus" / f"{split}.jsonl", rows[split])
    return tmp_path / "corpus"


NO_EVAL = "--train.eval_samples=0"   # no end-of-run evaluation (greedy decoding), for tests reading no metric


def tiny_config(tmp_path, corpus, *overrides):
    cfg, _ = train.parse_args(["--preset=tiny", "--stage=asr", f"--data.corpus={corpus}",
                               f"--train.out_dir={tmp_path / 'out'}", "--system.device=cpu", *overrides])
    return cfg


@pytest.fixture(autouse=True)
def tiny_checkpoints_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # tiny:whisper / tiny:llama are written to ./checkpoints here


def test_tiny_stage1_loss_falls(tmp_path, corpus):
    rows = train.train(tiny_config(tmp_path, corpus, "--train.max_steps=30"), log=lambda *a: None)
    losses = [r["loss"] for r in rows]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, f"loss {first:.2f} -> {last:.2f} did not fall"
    assert "wer" in rows[-1] and "test_loss" in rows[-1]
    assert (tmp_path / "out" / "loss.svg").read_text().startswith("<svg")


@pytest.mark.parametrize("cache", [True, False])
def test_padding_does_not_change_the_loss(tmp_path, corpus, cache):
    """Batch two clips of different lengths: the short one is padded with extra frames (and its text
    with pad tokens). The batch's loss must equal the token-weighted mean of the two losses alone."""
    cfg = tiny_config(tmp_path, corpus)
    audio_lm = weights.build_audio_lm(cfg, log=lambda *a: None)
    rows = data.read_manifest(corpus / "train.jsonl")[:2]          # 0.5 s and 0.6 s clips
    features = data.encoder_features(audio_lm, rows, progress=False) if cache else None
    batches = data.AudioLMBatches(rows, audio_lm, batch_size=2, features=features)
    with torch.no_grad():
        together = batches.collate(rows)
        alone = [batches.collate([r]) for r in rows]
        n = [int((b["labels"] != -100).sum()) for b in alone]
        expected = sum(k * audio_lm(**b).item() for k, b in zip(n, alone)) / sum(n)
        got = audio_lm(**together).item()
    assert abs(got - expected) < 1e-5, (got, expected)
    key = "feature_lengths" if cache else "mel_lengths"
    assert together[key][0] < together[key][1]                     # the first clip really was padded


def test_eval_answers_side_by_side_are_each_rows_answer_alone(tmp_path, corpus):
    """The evaluation decodes rows of one token length together (train.greedy_answers): each row's LLM input
    is what AudioLM.generate builds for it alone, and so are the answers, in the rows' order."""
    audio_lm = weights.build_audio_lm(tiny_config(tmp_path, corpus), log=lambda *a: None).eval()
    frames = [20, 20, 26, 20, 26, 33]             # stack 2: 10, 10, 13, 10, 13 and 17 audio tokens
    generator = torch.Generator().manual_seed(0)
    features = {f"clip{i}": torch.randn(n, audio_lm.encoder.cfg.d_model, generator=generator)
                for i, n in enumerate(frames)}
    rows = [{"audio": f"clip{i}", "prompt": "Transcribe the audio."} for i in range(len(frames))]
    prefixes, generate = [], audio_lm.llm.generate
    audio_lm.llm.generate = lambda **kw: prefixes.append(kw["inputs_embeds"]) or generate(**kw)   # a spy
    together = train.greedy_answers(audio_lm, rows, features, batch_size=2)
    batched, n = prefixes[:], len(prefixes)
    alone = [audio_lm.generate(prompt=r["prompt"], features=features[r["audio"]], max_new_tokens=48) for r in rows]
    assert together == alone
    assert [p.size(0) for p in batched] == [2, 1, 2, 1]          # 10 tokens: 2 + 1 rows; 13: 2; 17: 1
    for row, i in zip([row for p in batched for row in p], [0, 1, 3, 2, 4, 5]):   # in the grouped order
        assert torch.allclose(row, prefixes[n + i][0], atol=1e-5)
    assert not torch.allclose(prefixes[n], prefixes[n + 1], atol=1e-3)   # different audio, different inputs


def test_labels_cover_only_the_response(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus)
    audio_lm = weights.build_audio_lm(cfg, log=lambda *a: None)
    ids, audio_mask, labels = audio_lm.build_example("Transcribe the audio.", 5, "open the door")
    answer = audio_lm.tokenizer.encode("open the door") + [audio_lm.tokenizer.end_of_turn_id]
    assert [t for t in labels if t != -100] == answer and labels[-len(answer):] == answer
    assert sum(audio_mask) == 5 and ids[-len(answer):] == answer


def test_resume_is_exact(tmp_path, corpus):
    """6 steps straight vs 3 steps + resume to 6: the same losses, bit for bit."""
    straight = train.train(tiny_config(tmp_path, corpus, "--train.max_steps=6", "--train.out_dir=a",
                                       NO_EVAL), log=lambda *a: None)
    train.train(tiny_config(tmp_path, corpus, "--train.max_steps=3", "--train.out_dir=b"), log=lambda *a: None)
    resumed = train.train(tiny_config(tmp_path, corpus, "--train.max_steps=6", "--train.out_dir=b", NO_EVAL),
                          resume=True, log=lambda *a: None)
    assert [r["loss"] for r in straight] == [r["loss"] for r in resumed]
    assert len(resumed) == 6                        # the log holds the first run's 3 rows + 3 new ones


def test_prefetched_batches_are_the_inline_ones(tmp_path, corpus):
    """The background Prefetcher (a fast path) vs making each micro-batch when needed (the readable one):
    the same batches in the same order, the same losses bit for bit, and a failing batch still raises."""
    made = lambda i: {"x": torch.full((2,), float(i))}
    ahead = train.Prefetcher(made, iter(range(5, 9)), depth=2)
    inline = train.Prefetcher(made, iter(range(5, 9)), depth=0)
    assert [next(ahead)["x"].tolist() for _ in range(4)] == [next(inline)["x"].tolist() for _ in range(4)]
    assert list(train.micro_batch_indices(1, 3, grad_accum=2, world=2, rank=1)) == [5, 7, 9, 11]

    def broken(i):
        raise data.AudioError(f"clip {i} is unreadable")
    with pytest.raises(data.AudioError, match="clip 0 is unreadable"):
        next(train.Prefetcher(broken, iter(range(3)), depth=2))

    runs = [train.train(tiny_config(tmp_path, corpus, "--train.max_steps=4", f"--system.prefetch={depth}",
                                    f"--train.out_dir=p{depth}", NO_EVAL), log=lambda *a: None)
            for depth in (0, 2)]
    assert [r["loss"] for r in runs[0]] == [r["loss"] for r in runs[1]]


def test_stage2_starts_from_stage1_and_mismatches_are_clear(tmp_path, corpus):
    train.train(tiny_config(tmp_path, corpus, "--train.max_steps=2", NO_EVAL), log=lambda *a: None)
    said = []
    train.train(tiny_config(tmp_path, corpus, "--train.max_steps=1", "--stage=instruct",
                            f"--train.init_from={tmp_path / 'out'}", "--data.mix=(('transcribe', 1.0),)",
                            NO_EVAL), log=said.append)
    assert any("initialised" in line for line in said)
    with pytest.raises(config.ConfigError, match="another preset, projector or --lora"):
        train.train(tiny_config(tmp_path, corpus, "--train.max_steps=1", "--lora.targets=('o_proj',)",
                                f"--train.init_from={tmp_path / 'out'}"), log=lambda *a: None)


def test_more_train_corpora_join_the_training_rows(tmp_path, corpus):
    # the main corpus has no `instruct` rows; a second folder brings some (absolute audio paths are allowed)
    questions = [{**row, "task": "instruct", "prompt": "Answer the spoken question.", "response": "nine"}
                 for row in data.read_manifest(corpus / "train.jsonl")[:4]]
    data.write_manifest(tmp_path / "questions" / "train.jsonl", questions)
    only_instruct = ("--stage=instruct", "--train.max_steps=1", "--data.mix=(('instruct', 1.0),)",
                     NO_EVAL)
    with pytest.raises(ValueError, match=r"tasks \['instruct'\]"):
        train.train(tiny_config(tmp_path, corpus, *only_instruct), log=lambda *a: None)
    rows = train.train(tiny_config(tmp_path, corpus, *only_instruct,
                                   f"--data.more_train=('{tmp_path / 'questions'}',)"), log=lambda *a: None)
    assert rows[-1]["step"] == 1
    with pytest.raises(config.ConfigError, match="nowhere/train.jsonl not found"):
        train.train(tiny_config(tmp_path, corpus, *only_instruct, "--data.more_train=('nowhere',)"),
                    log=lambda *a: None)


def test_cli_user_errors_are_one_line(tmp_path, corpus, capsys):
    for argv in (["--preset=tiny", "--train.lrr=1"], ["--preset=tiny", "--data.corpus=/nonexistent"],
                 ["--preset=tiny", "--stage=dance"]):
        with pytest.raises(SystemExit) as exit_info:
            train.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err


def test_infer_streams_only_the_answer_to_stdout(tmp_path, corpus, capsys):
    import infer
    cfg = tiny_config(tmp_path, corpus, "--train.max_steps=2", NO_EVAL)
    train.train(cfg, log=lambda *a: None)
    audio_lm = infer.load_trained(tmp_path / "out", "cpu")
    wav = data.read_manifest(corpus / "test.jsonl")[0]["audio"]
    expected = audio_lm.generate(data.load_audio(wav), max_new_tokens=20)
    capsys.readouterr()
    infer.main([wav, "--checkpoint", str(tmp_path / "out"), "--device", "cpu", "--max-new-tokens", "20"])
    out = capsys.readouterr()
    assert out.out == expected + "\n"                        # the answer, streamed, and nothing else
    assert "loaded" in out.err and "answered in" in out.err  # diagnostics go to stderr
    infer.main(["--wer", str(corpus / "test.jsonl"), "--checkpoint", str(tmp_path / "out"), "--device", "cpu"])
    assert capsys.readouterr().out.startswith("WER ")
    with pytest.raises(SystemExit) as exit_info:
        infer.main([str(tmp_path / "missing.wav"), "--checkpoint", str(tmp_path / "out"), "--device", "cpu"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip().endswith("no such audio file")


class Toy(torch.nn.Module):
    """loss = mean(w * x)^2, or NaN when the batch says so."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4, 4))

    def forward(self, x, poison):
        loss = (self.w * x).mean() ** 2
        return loss * float("nan") if poison.item() else loss


def test_non_finite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    bad = {2, 3} | set(range(6, 100))                         # two lone bad steps, then a long bad run
    stage = data.Stage(Toy(), lambda i: {"x": torch.ones(4, 4), "poison": torch.tensor(i in bad)},
                       lambda: {}, tokens=lambda batch: 16)
    monkeypatch.setattr(train, "build_stage", lambda *args: stage)
    cfg = tiny_config(tmp_path, tmp_path, "--train.max_steps=50", "--train.warmup_steps=1")
    said = []
    with pytest.raises(FloatingPointError, match="10 non-finite steps in a row"):
        train.train(cfg, log=said.append)
    assert sum("update skipped" in line for line in said) == 12    # 2 lone ones + 10 in a row
    tensors, meta, _ = __import__("checkpoint").load_checkpoint(tmp_path / "out" / "ckpt")
    assert torch.isfinite(tensors["w"]).all()                       # the saved weights never saw a NaN
