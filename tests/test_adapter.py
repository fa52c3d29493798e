"""
Lesson: a Perceiver adapter turns audio of any length into exactly N LLM vectors (adapter.py).

  - N learned queries cross-attend to the audio: the output has N rows for 1 frame or 300 frames;
  - padded frames are masked out of the keys, so padding a clip (alone or inside a batch) changes nothing,
    also through the frozen SpeechLM, whose causal attention never lets a real frame see the padding;
  - the CTC warm-up loss equals the sum over its alignments written out by hand, and its steps run no LLM;
  - the distillation term is the KL divergence, checked against torch's own kl_div, and 0 when the
    student's distribution equals the teacher's;
  - a missing stage-1 checkpoint is one clear error line;
  - the tiny preset's stage 2 trains: with SpeechLM and LLM frozen, only the adapter learns, and its loss falls;
    its evaluation decodes clips side by side, each row fed exactly what that clip alone gives the LLM.
  - --system.precision reaches the frozen parts (bf16 weights, or int8 Linear layers); the adapter stays fp32.
  - stage-1 checkpoints load with their hearing-loss head, and those from before the hearing loss without one.

Run:  python -m pytest tests/test_adapter.py
"""
import json
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import adapter
import config
import speechlm
from adapter import PerceiverAdapter, distillation_kl
from data import word_error_rate
from test_speechlm import make_coded_corpus, tiny_speechlm


def tiny_adapter(d_audio=64, d_llm=48, n_latents=8):
    torch.manual_seed(0)
    return PerceiverAdapter(d_audio, d_llm, n_latents=n_latents, dim=32, n_heads=4, n_layers=1).eval()


def test_adapter_outputs_exactly_n_vectors_for_any_length():
    net = tiny_adapter()
    for T in (1, 7, 75, 300):
        out = net(torch.randn(2, T, 64), torch.tensor([T, max(1, T // 2)]))
        assert out.shape == (2, 8, 48)


def test_padding_the_audio_does_not_change_the_output():
    net = tiny_adapter()
    states = torch.randn(1, 20, 64)
    alone = net(states, torch.tensor([20]))
    padded = torch.cat([states, 1e3 * torch.randn(1, 37, 64)], dim=1)          # loud junk after the end
    assert torch.allclose(net(padded, torch.tensor([20])), alone, atol=1e-5)
    # the whole path: codes -> frozen SpeechLM states -> adapter, one clip alone vs padded in a batch
    lm, codes = tiny_speechlm(), torch.randint(0, 1024, (2, 9))
    states, lengths = lm.audio_states(codes[None], torch.tensor([9]), layer=2)
    padded = torch.cat([codes, torch.randint(0, 1024, (2, 6))], 1)               # the clip + 6 junk frames
    batch = torch.stack([padded, torch.randint(0, 1024, (2, 15))])               # next to a longer clip
    batch_states, batch_lengths = lm.audio_states(batch, torch.tensor([9, 15]), layer=2)
    assert torch.allclose(net(batch_states, batch_lengths)[:1], net(states, lengths), atol=1e-5)


def test_distillation_kl():
    teacher, student = torch.randn(5, 11), torch.randn(5, 11)
    assert distillation_kl(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_kl(teacher, teacher + 3.0).item() == pytest.approx(0.0, abs=1e-5)   # same softmax
    reference = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                         reduction="batchmean")                                 # torch's KL(teacher || student)
    assert distillation_kl(teacher, student).item() == pytest.approx(reference.item(), rel=1e-5)
    assert distillation_kl(teacher, student).item() > 0


def test_missing_stage1_checkpoint_is_one_clear_error(tmp_path):
    cfg = config.get_config("tiny", [f"--adapter.speechlm_checkpoint={tmp_path / 'nowhere'}"])
    with pytest.raises(ValueError, match="--stage=speechlm"):
        adapter.build_align_stage(cfg, torch.device("cpu"), log=lambda *a: None)


def tiny_align_stage(tmp_path, *overrides):
    """The tiny preset's stage 2 on a coded corpus, over a fresh SpeechLM saved as its stage-1 checkpoint."""
    corpus = make_coded_corpus(tmp_path / "corpus")
    cfg = config.get_config("tiny", [f"--data.corpus={corpus}", "--train.eval_samples=2",
                                     "--speechlm.max_seconds=0.5", f"--adapter.speechlm_checkpoint={tmp_path}/s1",
                                     f"--train.out_dir={tmp_path}/out", *overrides])
    lm, _ = speechlm.build_speechlm(cfg, log=lambda *a: None)                 # stand-in for a stage-1 run
    (tmp_path / "s1" / "ckpt").mkdir(parents=True)
    state = speechlm.SpeechLMTraining(lm, 1.0).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "s1/ckpt/model.safetensors"))
    return adapter.build_align_stage(cfg, torch.device("cpu"), log=lambda *a: None), lm


def test_tiny_stage2_trains_only_the_adapter_and_loss_falls(tmp_path):
    stage, lm = tiny_align_stage(tmp_path)
    trainable = {n for n, p in stage.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapter.") for n in trainable)
    assert torch.equal(stage.model.speechlm.heads[0].weight, lm.heads[0].weight)  # stage-1 weights loaded
    optimizer = torch.optim.AdamW([p for p in stage.model.parameters() if p.requires_grad], lr=1e-2)
    first = stage.batch(0)
    with torch.no_grad():
        before = stage.model(**first).item()
    for i in range(8):
        loss = stage.model(**stage.batch(i % 2))                                  # two batches, seen repeatedly
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = stage.model(**first).item()
    # A random 2-layer LLM barely listens to its input positions (its std-0.02 attention passes ~3% of a
    # vector on), so the fall is small here; with SmolLM2-135M, 260 steps took the loss from 9.7 to 6.0.
    assert after < before - 0.05, (before, after)
    metrics = stage.evaluate()
    assert {"test_loss", "wer", "wer_median", "long_answers", "generated_said"} <= set(metrics)
    # the evaluation decodes clips side by side: each row of the LLM's input is what that clip alone gives
    # (its audio vectors in the N slots, whatever the padding), and the answers are the same, in order
    prefixes, generate = [], stage.model.llm.generate
    stage.model.llm.generate = lambda **kw: prefixes.append(kw["inputs_embeds"]) or generate(**kw)   # a spy
    clips = [torch.randint(0, 1024, (len(lm.heads), T), generator=torch.Generator().manual_seed(T))
             for T in (5, 12, 9)]
    together = stage.model.transcribe_many(clips, max_new_tokens=6)
    assert together == [stage.model.transcribe(c, max_new_tokens=6) for c in clips]
    side_by_side, alone = prefixes[0], prefixes[1:]
    assert side_by_side.shape[0] == 3
    for row, single in zip(side_by_side, alone):
        assert torch.allclose(row, single[0], atol=1e-5)
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)     # different audio, different inputs


def test_ctc_warmup_loss_by_hand():
    torch.manual_seed(0)
    embeddings, temperature, blank, end = torch.randn(5, 3), 0.5, 0, 4         # tokens 0..4: 0 blank, 4 end
    vectors = torch.randn(1, 3, 3)                                              # N = 3 vectors
    p = (F.normalize(vectors[0], dim=-1) @ F.normalize(embeddings, dim=-1).T / temperature).softmax(-1)

    def loss(answer):
        labels = torch.tensor([[-100, -100, *answer, end]])
        return adapter.ctc_token_loss(vectors, labels, embeddings, blank, end, temperature).item()

    # answer [3]: every way 3 vectors spell it is 3 once or more, blanks before and after (6 paths)
    paths = ["3bb", "b3b", "bb3", "33b", "b33", "333"]
    prob = sum(torch.prod(torch.stack([p[n, blank if c == "b" else int(c)] for n, c in enumerate(path)]))
               for path in paths)
    assert loss([3]) == pytest.approx(-prob.log().item(), rel=1e-5)
    # answer [3, 3]: a repeat must have a blank between, so 3 vectors have one path; torch's 'mean'
    # divides by the answer's length
    assert loss([3, 3]) == pytest.approx(-(p[0, 3] * p[1, blank] * p[2, 3]).log().item() / 2, rel=1e-5)
    assert loss([1, 2, 3, 1]) == 0.0          # 4 tokens cannot be spelled by 3 vectors: zero, not infinity
    # with a smaller vocabulary (blank, 1 and 3 only) the softmax runs over those three rows alone
    vocab = torch.tensor([blank, 1, 3])
    q = (F.normalize(vectors[0], dim=-1) @ F.normalize(embeddings[vocab], dim=-1).T / temperature).softmax(-1)
    small = sum(torch.prod(torch.stack([q[n, 0 if c == "b" else 2] for n, c in enumerate(path)])) for path in paths)
    labels = torch.tensor([[-100, 3, end]])
    assert adapter.ctc_token_loss(vectors, labels, embeddings, blank, end, temperature, vocab).item() == \
        pytest.approx(-small.log().item(), rel=1e-5)
    assert -small.log().item() < loss([3])                 # fewer rivals: the same vectors score better
    with pytest.raises(ValueError, match="not in vocab"):
        adapter.ctc_token_loss(vectors, torch.tensor([[2, end]]), embeddings, blank, end, temperature, vocab)


def test_ctc_warmup_steps_run_no_llm_and_teach_the_adapter(tmp_path):
    for bad in (-1, 10**6):                                  # one clear error, before anything loads
        with pytest.raises(ValueError, match="--adapter.ctc_steps"):
            adapter.build_align_stage(config.get_config("tiny", [f"--adapter.ctc_steps={bad}"]),
                                      torch.device("cpu"), log=lambda *a: None)
    stage, _ = tiny_align_stage(tmp_path, "--adapter.ctc_steps=2")
    assert [stage.batch(i)["ctc_only"] for i in range(3)] == [True, True, False]
    accum, _ = tiny_align_stage(tmp_path / "accum", "--adapter.ctc_steps=2", "--train.grad_accum=3")
    assert [accum.batch(i)["ctc_only"] for i in range(7)] == [True] * 6 + [False]   # 2 steps of 3 batches
    llm_forward = stage.model.llm.forward
    stage.model.llm.forward = lambda *a, **kw: pytest.fail("a warm-up step ran the LLM")
    optimizer = torch.optim.AdamW([p for p in stage.model.parameters() if p.requires_grad], lr=1e-2)
    first = stage.batch(0)
    with torch.no_grad():
        before = stage.model(**first).item()
    for i in range(20):
        loss = stage.model(**stage.batch(i % 2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = stage.model(**first).item()
    assert after < 0.8 * before, (before, after)
    stage.model.llm.forward = llm_forward
    assert stage.model(**stage.batch(2)).item() > 0                           # after the warm-up: CE + KL
    assert "ctc_wer" in stage.evaluate()
    # spell reads CTC's greedy path: vectors equal to the embeddings of a a _ b _ a spell "a b a"
    model, blank = stage.model, stage.model.blank_id()
    a, b = [t for t in model.tokenizer.encode("cat") if t != blank][:2]
    table = model.llm.embed_tokens.weight
    model.audio_vectors = lambda codes, lengths: table[torch.tensor([[a, a, blank, b, blank, a]])]
    assert model.spell(None, None) == [model.tokenizer.decode([a, b, a]).strip()]


def test_transcript_metrics_by_hand():
    said = ["turn on the lights", "what time is it", "seven", "play some music now"]
    heard = ["turn on the lights", "what time is", "seven seven seven", "play some music now please"]
    # per clip: 0/4, 1/4 (a deletion), 2/1 (two insertions), 1/4 (one insertion); sorted 0, .25, .25, 2
    metrics = adapter.transcript_metrics(said, heard)
    assert metrics["wer"] == pytest.approx((0 + 1 + 2 + 1) / 13)
    assert metrics["wer_median"] == pytest.approx(0.25)
    assert metrics["long_answers"] == pytest.approx(1 / 4)             # "seven seven seven": 3 > 2 x 1 words
    # the first line only: a run-on answer that repeats after a line break, and one that breaks early
    heard = ["turn on the lights\n\nturn on the lights\nturn on", "what time\nis it", "\nseven", "play"]
    metrics = adapter.transcript_metrics(said, heard)
    assert metrics["wer_first_line"] == pytest.approx((0 + 2 + 0 + 3) / 13)   # 2 and 3 deletions
    assert metrics["wer"] == pytest.approx((6 + 0 + 0 + 3) / 13)               # 6 insertions, 3 deletions


def test_stage2_precision_applies_to_the_frozen_parts(tmp_path):
    """bf16: the frozen SpeechLM and LLM hold bf16 weights; int8: their Linear layers hold int8 weights
    (one fp32 scale per row). The adapter trains in fp32 either way, and the loss on one batch stays
    close to the fp32 loss of the same weights (bf16 and int8 round, so not exactly)."""
    corpus = make_coded_corpus(tmp_path / "corpus")
    tiny = config.get_config("tiny", ["--speechlm.max_seconds=0.5"])
    lm, _ = speechlm.build_speechlm(tiny, log=lambda *a: None)                   # stand-in for a stage-1 run
    (tmp_path / "s1" / "ckpt").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in speechlm.SpeechLMTraining(lm, 1.0).state_dict().items()},
              str(tmp_path / "s1/ckpt/model.safetensors"))
    losses = {}
    for precision in ("fp32", "bf16", "int8"):
        cfg = config.get_config("tiny", [f"--data.corpus={corpus}", "--speechlm.max_seconds=0.5",
                                         f"--adapter.speechlm_checkpoint={tmp_path}/s1",
                                         f"--system.precision={precision}"])
        torch.manual_seed(0)                                                     # the same fresh adapter
        stage = adapter.build_align_stage(cfg, torch.device("cpu"), log=lambda *a: None)
        net = stage.model
        q_proj, llm_q_proj = net.speechlm.blocks[0].attn.q_proj, net.llm.layers[0].attn.q_proj
        frozen_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}[precision]
        assert q_proj.weight.dtype == llm_q_proj.weight.dtype == frozen_dtype
        assert all(p.dtype == torch.float32 for p in net.adapter.parameters())
        loss = net(**stage.batch(0))
        loss.backward()
        losses[precision] = loss.item()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.adapter.parameters())
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2) and losses["bf16"] != losses["fp32"]
    assert losses["int8"] == pytest.approx(losses["fp32"], rel=2e-2) and losses["int8"] != losses["fp32"]


def test_stage1_checkpoints_with_and_from_before_the_hearing_loss_load(tmp_path):
    """A stage-1 run with the hearing loss saves its Whisper head, and loads back with it; a config.json
    written before the hearing loss existed has no whisper_weight, so it loads with the loss off (no head),
    whatever the current default."""
    cfg = config.get_config("tiny", ["--speechlm.whisper_weight=2"])
    for name, with_head in (("hearing", True), ("before", False)):
        c = cfg if with_head else config.get_config("tiny")
        lm, _ = speechlm.build_speechlm(c, log=lambda *a: None)
        assert (lm.whisper_head is not None) == with_head
        (tmp_path / name / "ckpt").mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in speechlm.SpeechLMTraining(lm, 1.0).state_dict().items()},
                  str(tmp_path / name / "ckpt" / "model.safetensors"))
        saved = c.to_dict()
        if not with_head:
            del saved["speechlm"]["whisper_weight"]
        (tmp_path / name / "config.json").write_text(json.dumps(saved))
        loaded, _, loaded_cfg = speechlm.load_speechlm_checkpoint(tmp_path / name, cfg, log=lambda *a: None)
        assert (loaded.whisper_head is not None) == with_head
        assert torch.equal(loaded.heads[0].weight, lm.heads[0].weight)
        assert loaded_cfg.speechlm.whisper_weight == (2.0 if with_head else 0.0)


def test_cached_states_are_the_speechlm_states_and_train_alike(tmp_path):
    """--adapter.cache_states runs the frozen SpeechLM over every training clip once: each example then holds
    its own states (what audio_states gives for that clip alone, kept in fp16), a batch carries them, and a
    step reads them instead of running the SpeechLM; the loss matches a batch without them."""
    cached, lm = tiny_align_stage(tmp_path / "on", "--adapter.cache_states=True")
    torch.manual_seed(0)
    plain, _ = tiny_align_stage(tmp_path / "off", "--adapter.cache_states=False")
    batch, batch_plain = cached.batch(3), plain.batch(3)
    assert "states" in batch and "states" not in batch_plain
    assert torch.equal(batch["codes"], batch_plain["codes"])                    # the same clips
    model = cached.model
    codes, lengths = batch["codes"], batch["code_lengths"]
    for row in range(codes.size(0)):                                            # clip by clip, unpadded
        n = int(lengths[row])
        alone, alone_len = model.speechlm.audio_states(codes[row: row + 1, :, :n], lengths[row: row + 1],
                                                         model.speechlm_layer)
        assert int(batch["state_lengths"][row]) == int(alone_len[0])
        assert torch.allclose(batch["states"][row, : int(alone_len[0])].float(), alone[0], atol=1e-3, rtol=1e-3)
    plain.model.adapter.load_state_dict(model.adapter.state_dict())
    with torch.no_grad():
        expected = plain.model(**batch_plain).item()
        audio_states = model.speechlm.audio_states
        model.speechlm.audio_states = lambda *a: pytest.fail("a step with cached states ran the SpeechLM")
        got = model(**batch).item()
        model.speechlm.audio_states = audio_states
    assert got == pytest.approx(expected, rel=1e-2)


def test_ctc_vocab_train_spells_with_the_corpus_tokens_and_answers_are_saved(tmp_path):
    stage, _ = tiny_align_stage(tmp_path, "--adapter.ctc_steps=2", "--adapter.ctc_vocab=train")
    model = stage.model
    texts = {e["text"] for e in adapter.load_examples(tmp_path / "corpus" / "train.jsonl",
                                                      config.get_config("tiny"), model.tokenizer,
                                                      log=lambda *a: None)[0]}
    expected = sorted({t for text in texts for t in model.tokenizer.encode(text)} | {model.blank_id()})
    assert model.ctc_vocab.tolist() == expected
    loss = model(**stage.batch(0))                                           # a warm-up step over them
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    metrics = stage.evaluate()
    answers = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 2 and {"said", "heard"} <= set(answers[0])       # --train.eval_samples=2
    assert metrics["wer"] == pytest.approx(word_error_rate([a["said"] for a in answers],
                                                           [a["heard"] for a in answers]))
    # spell reads with the same tokens: a vector equal to a token's embedding outside them spells the
    # nearest token inside them (by cosine), never itself
    table, vocab = model.llm.embed_tokens.weight, model.ctc_vocab
    outside = next(t for t in range(table.size(0)) if t not in expected)
    nearest = int(vocab[adapter.token_scores(table[None, [outside]], table[vocab])[0, 0].argmax()])
    model.audio_vectors = lambda codes, lengths: table[torch.tensor([[outside, outside]])]
    assert nearest != outside
    assert model.spell(None, None) == [model.tokenizer.decode([nearest] if nearest != model.blank_id() else []).strip()]
    with pytest.raises(ValueError, match="--adapter.ctc_vocab"):
        adapter.build_align_stage(config.get_config("tiny", ["--adapter.ctc_vocab=some"]),
                                  torch.device("cpu"), log=lambda *a: None)


def test_stage2_loss_is_ce_plus_kl_over_the_answer_words_not_the_end_of_turn(tmp_path):
    """forward = cross-entropy over the answer and its end of turn + distill_weight x KL(teacher || student)
    over the answer's own tokens: the teacher's reading of where a repeated text ends is not distilled."""
    stage, _ = tiny_align_stage(tmp_path, "--adapter.distill_weight=0.5")
    model, batch = stage.model, stage.batch(0)
    with torch.no_grad():
        vectors = model.audio_vectors(batch["codes"], batch["code_lengths"])
        student = model.answer_logits(batch["input_ids"], batch["labels"], batch["audio_mask"], vectors)
        teacher = model.answer_logits(batch["teacher_ids"], batch["teacher_labels"])
        targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != -100]
        ends = targets == model.tokenizer.end_of_turn_id
        assert ends.sum() == batch["labels"].size(0)                      # one end of turn per answer
        ce = F.cross_entropy(student, targets)
        expected = ce + 0.5 * distillation_kl(teacher[~ends], student[~ends])
        assert model(**batch).item() == pytest.approx(expected.item(), rel=1e-5)
        # a teacher that changes its mind where the turn ends changes nothing; on a word row, it does
        answer_logits = model.answer_logits
        for rows, changes in ((ends, False), (~ends, True)):
            def teacher_changed(ids, labels, audio_mask=None, vectors=None, rows=rows):
                logits = answer_logits(ids, labels, audio_mask, vectors)
                bump = torch.zeros_like(logits)
                bump[rows, 7] = 5.0                                      # token 7 much likelier, these rows only
                return logits if vectors is not None else logits + bump
            model.answer_logits = teacher_changed
            assert (abs(model(**batch).item() - expected.item()) > 1e-3) == changes
        model.answer_logits = answer_logits
