"""
Lesson: PPO piece by piece, then the whole loop, on a SpeechLM that a judge rewards (rl.py).

  - GAE's reversed loop equals the textbook sum A_t = sum_l (gamma lam)^l delta_{t+l}, written out by hand, on
    random rewards and values of rollouts of different lengths (nothing leaks in from after a rollout's end);
  - the rewards: each prompt's other samples are its baseline, the KL penalty is paid at every column and the
    judge's score at the last one, all by hand;
  - clipping: once the ratio has moved past 1 +- eps in the direction the advantage favours, the gradient is
    exactly 0, and the loss equals the hand computation; the value loss clips the same way;
  - batched sampling with a KV cache picks exactly what SpeechLM.generate picks, and its log-probs equal the
    teacher-forced pass that PPO trains with;
  - a toy task, reward = the fraction of one chosen code: the loop raises it several-fold in seconds, the
    probability ratio is exactly 1 on the first minibatch of every iteration, and the KL to the reference
    stays bounded (a larger KL coefficient holds the policy closer);
  - stage 3 from tiny stage-1/2 checkpoints: it runs, resumes exactly, and a missing or mismatched checkpoint
    is one clear error line.

Run:  python -m pytest tests/test_rl.py
"""
import json

import pytest
import torch
from safetensors.torch import save_file

import adapter
import config
import rl
import speechlm
import train
from checkpoint import save_checkpoint
from lora import LoRALinear, apply_lora
from speechlm import END, SpeechLM, audio_columns
from test_speechlm import make_coded_corpus

CHOSEN = 3          # the toy task's code


# -----------------------------------------------------------------------------
# advantages and rewards by hand

def test_gae_equals_the_textbook_sum():
    g = torch.Generator().manual_seed(0)
    lengths, S, gamma, lam = [9, 5, 1, 7], 9, 0.97, 0.9
    mask = (torch.arange(S) < torch.tensor(lengths)[:, None]).float()              # (4, 9)
    rewards, values = torch.randn(4, S, generator=g), torch.randn(4, S, generator=g)   # junk after each end
    advantages, returns = rl.gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        r, v = rewards[b, :n].tolist(), values[b, :n].tolist() + [0.0]             # no value after the end
        delta = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            expected = sum((gamma * lam) ** l * delta[t + l] for l in range(n - t))
            assert advantages[b, t].item() == pytest.approx(expected, abs=1e-5)
            assert returns[b, t].item() == pytest.approx(expected + v[t], abs=1e-5)
        assert (advantages[b, n:] == 0).all()
    white = rl.whiten(advantages, mask)[mask.bool()]
    assert white.mean().item() == pytest.approx(0, abs=1e-6)
    assert (white.pow(2).mean().sqrt().item()) == pytest.approx(1, abs=1e-4)


def test_rewards_baseline_kl_penalty_and_score_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])               # 2 prompts x 4 samples
    centred = rl.centre_scores(scores, samples_per_prompt=4)
    loo = torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3, 0, 0, 0, 0])   # minus the others' mean
    assert torch.allclose(centred, loo / loo.std(), atol=1e-6)
    log_prob = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    reference = torch.tensor([[-1.5, -2.0, -1.0], [-0.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])                        # row 1 has 2 columns
    rewards = rl.per_step_rewards(torch.tensor([10.0, 20.0]), log_prob, reference, mask, kl_coef=0.1)
    expected = torch.tensor([[-0.05 / 3, 0.0, 0.2 / 3 + 10.0], [0.05 / 2, 0.0 + 20.0, 0.0]])   # / T columns
    assert torch.allclose(rewards, expected, atol=1e-6)


# -----------------------------------------------------------------------------
# the clipped losses

def test_clipping_is_active_exactly_when_it_should_be():
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.1, 0.9]])                         # eps = 0.2
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0, -1.0]])
    log_prob = ratio.log().requires_grad_()
    loss, _, clip_fraction, approx_kl = rl.clipped_policy_loss(log_prob, torch.zeros_like(ratio), advantages,
                                                               torch.ones_like(ratio), 0.2)
    loss.backward()
    # max(-A r, -A clip(r)): (1.5, A>0) -> -1.2 clipped; (1.5, A<0) -> 1.5; (0.5, A>0) -> -0.5;
    # (0.5, A<0) -> 0.8 clipped; inside the range nothing is clipped: -1.1 and 0.9
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8 - 1.1 + 0.9) / 6, abs=1e-6)
    # d(-A r)/d log r = -A r where unclipped; 0 where the clipped term won
    expected_grad = torch.tensor([[0.0, 1.5, -0.5, 0.0, -1.1, 0.9]]) / 6
    assert torch.allclose(log_prob.grad, expected_grad, atol=1e-6)
    assert clip_fraction.item() == pytest.approx(4 / 6)
    assert approx_kl.item() == pytest.approx(((ratio - 1) - ratio.log()).mean().item(), abs=1e-6)
    # the value loss: V moved 0.5 away from V_old = 0 with eps 0.2, the return R = 1
    values = torch.tensor([[0.5, -0.5]], requires_grad=True)
    returns = torch.tensor([[1.0, 1.0]])
    rl.clipped_value_loss(values, torch.zeros(1, 2), returns, torch.ones(1, 2), 0.2).backward()
    # V = 0.5: (0.5 - 1)^2 = 0.25 < (0.2 - 1)^2 = 0.64, the clipped term wins: no gradient
    # V = -0.5: (-1.5)^2 = 2.25 > (-0.2 - 1)^2 = 1.44, unclipped: gradient 0.5 * 2 * (-1.5) / 2
    assert torch.allclose(values.grad, torch.tensor([[0.0, -0.75]]), atol=1e-6)


# -----------------------------------------------------------------------------
# sampling, and the toy task

@pytest.fixture(scope="module")
def warm_speechlm():
    """A tiny SpeechLM that learned, in 25 steps, to say 6 to 10 frames of codes 0..15 and then END: a
    stand-in for stage 1 whose chosen code is neither certain nor (as in a random model) 1 in 1024."""
    torch.manual_seed(0)
    cfg = config.get_config("tiny")
    lm, g = SpeechLM(cfg.speechlm, text_vocab=320, n_codebooks=2), torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(lm.parameters(), lr=1e-2)
    for _ in range(25):
        lengths = torch.randint(6, 11, (8,), generator=g)
        audio_in, targets = audio_columns(torch.randint(16, (8, 2, 10), generator=g), lengths)
        loss = lm(desc_ids=torch.randint(320, (8, 4), generator=g), desc_lengths=torch.full((8,), 4),
                  uncond=torch.zeros(8, dtype=torch.bool), text_ids=torch.randint(320, (8, 3), generator=g),
                  text_lengths=torch.full((8,), 3), audio_in=audio_in, audio_targets=targets,
                  audio_lengths=lengths + 2)
        optimizer.zero_grad(), loss.backward(), optimizer.step()
    return lm.eval().requires_grad_(False)


def toy_prompts(n=8):
    g = torch.Generator().manual_seed(1)
    return [{"text": f"prompt {i}", "text_ids": torch.randint(320, (3 + i % 2,), generator=g),
             "desc_ids": torch.randint(320, (4,), generator=g)} for i in range(n)]


def test_batched_sampling_equals_generate_and_the_teacher_forced_pass(warm_speechlm):
    lm, prompts = warm_speechlm, toy_prompts()[0::2]                               # 4 prompts, 3 text tokens
    columns, ended, _ = rl.sample_rollouts(lm, prompts, 15, 0.0, torch.Generator())   # greedy, 15 frames max
    for p, codes in zip(prompts, rl.columns_to_codes(columns, ended)):
        assert torch.equal(codes, lm.generate(p["text_ids"], p["desc_ids"], max_seconds=0.2, temperature=0.0))
    columns, ended, sampled = rl.sample_rollouts(lm, prompts * 4, 15, 1.0, torch.Generator().manual_seed(0))
    assert (columns[:, 0] == END).sum() == 16 and ended.max() <= 15                 # one END a row
    assert len(set(ended.tolist())) > 3                                             # of varied lengths
    batch = rl.rollout_batch(prompts * 4, columns, ended, 15)
    log_prob = rl.policy_outputs(lm, batch, 1.0)[0]                                 # (16, S), no KV cache
    assert torch.allclose(log_prob, sampled, atol=1e-4)
    assert ((log_prob != 0) == batch["mask"].bool()).all()                          # every real step acted


def test_held_out_reward_is_each_prompts_mean_over_its_samples(warm_speechlm):
    cfg = config.get_config("tiny", ["--rl.max_seconds=0.2", "--rl.eval_samples=3"])
    policy = rl.Policy(SpeechLM(cfg.speechlm, text_vocab=320, n_codebooks=2))
    policy.speechlm.load_state_dict(warm_speechlm.state_dict())
    prompts, judged = toy_prompts(5), []                                            # text lengths 3, 4, 3, 4, 3

    def length_and_chosen(codes, asked):                                            # a score that varies per sample
        judged.extend(zip([c.size(1) + (c == CHOSEN).sum().item() for c in codes], asked))
        return {"reward": torch.tensor([float(r) for r, _ in judged[-len(codes):]])}
    metrics = rl.evaluate(policy, warm_speechlm, prompts, length_and_chosen, cfg, seed=0)
    assert len(judged) == 15
    for p, got in zip(prompts, metrics["eval_rewards"]):
        mine = [r for r, q in judged if q is p]
        assert len(mine) == 3 and got == pytest.approx(sum(mine) / 3, abs=1e-5)
    assert len({r for r, _ in judged}) > 1                                          # the samples do differ
    assert metrics["eval_reward"] == pytest.approx(sum(metrics["eval_rewards"]) / 5, abs=1e-4)


def run_toy(lm, tmp_path, *overrides):
    cfg = config.get_config("tiny", ["--rl.iterations=10", "--rl.max_seconds=0.2", "--rl.lr=3e-3",
                                     "--rl.epochs=4", "--rl.prompts_per_iteration=2",
                                     "--rl.samples_per_prompt=4", "--rl.minibatch_size=8", *overrides])
    policy = rl.Policy(SpeechLM(cfg.speechlm, text_vocab=320, n_codebooks=2))
    policy.speechlm.load_state_dict(lm.state_dict())
    policy.speechlm.requires_grad_(True).text_embed.requires_grad_(False)

    def fraction_of_chosen_code(codes, prompts):
        return {"reward": torch.tensor([(c == CHOSEN).float().mean().item() if c.numel() else 0.0
                                        for c in codes])}
    return rl.train_rl(cfg, policy, lm, toy_prompts(), fraction_of_chosen_code, tmp_path, log=lambda *a: None)


@pytest.fixture(scope="module")
def loose_toy_run(warm_speechlm, tmp_path_factory):
    """The toy task with a weak KL penalty and no brake: (its log rows, its out_dir)."""
    out = tmp_path_factory.mktemp("loose")
    return run_toy(warm_speechlm, out, "--rl.kl_coef=1.0", "--rl.kl_stop=0"), out


def test_toy_task_reward_rises_with_bounded_kl(warm_speechlm, loose_toy_run, tmp_path):
    rows, loose_dir = loose_toy_run
    assert all(r["first_ratio_error"] == 0.0 for r in rows)                         # exactly 1, every time
    assert any(r["clip_fraction"] > 0 for r in rows)                                # ... and then it moves
    first, last = [sum(r["reward"] for r in part) / 2 for part in (rows[:2], rows[-2:])]
    assert last > 3 * first and last > 0.2, (first, last)                           # ~1/16 -> several-fold
    kl = [r["kl"] for r in rows]                                                    # nats per column
    assert max(kl) < 2.0, kl                      # saying only the chosen code would cost 2 ln 16 = 5.5
    tight = run_toy(warm_speechlm, tmp_path / "tight", "--rl.kl_coef=30.0", "--rl.adaptive_kl=False",
                    "--rl.kl_stop=0")
    assert max(r["kl"] for r in tight) < 0.5 and tight[-1]["kl"] < kl[-1] / 2      # a shorter leash
    assert (loose_dir / "rl.svg").read_text().startswith("<svg")


def test_kl_brake_skips_exactly_the_updates_from_too_far(warm_speechlm, loose_toy_run, tmp_path):
    loose = loose_toy_run[0]
    braked = run_toy(warm_speechlm, tmp_path / "braked", "--rl.kl_coef=1.0", "--rl.kl_stop=0.2")
    same = lambda rows: [(row["reward"], row["kl"]) for row in rows[:2]]          # KL 0, then < 0.2 (~0.08)
    assert same(loose) == same(braked)                                            # the same run until then
    for row in braked:
        assert row["braked"] == (row["kl"] > 0.2) and (row["updates"] == 0) == row["braked"], row
    assert any(row["braked"] for row in braked)
    assert max(row["kl"] for row in braked) < max(row["kl"] for row in loose) / 2, (braked, loose)


def test_bf16_rollouts_come_from_a_bf16_copy_with_the_lora_update_folded_in(warm_speechlm):
    """--system.precision=bf16: the policy keeps fp32 weights and runs under autocast, and rollouts sample
    from a bf16 copy of it (rl.sampler) that carries its LoRA update; fp32 samples from the policy itself."""
    cfg = config.get_config("tiny", ["--system.precision=bf16"])
    policy = rl.Policy(SpeechLM(cfg.speechlm, text_vocab=320, n_codebooks=2))
    policy.speechlm.load_state_dict(warm_speechlm.state_dict())
    apply_lora(policy.speechlm.blocks, 2, 4.0, targets=rl.LORA_TARGETS)
    torch.manual_seed(0)
    for module in policy.modules():                                   # a trained-looking update, B != 0
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=1.0)
    mixed, dtype = rl.mixed_precision(cfg, torch.device("cpu"))
    assert dtype == torch.bfloat16 and rl.sampler(policy.speechlm, torch.float32) is policy.speechlm
    copy = rl.sampler(policy.speechlm, dtype)
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    folded = [m.merged for m in copy.modules() if isinstance(m, LoRALinear)]
    assert len(folded) == 2 * len(rl.LORA_TARGETS) and all(folded)              # one matmul per projection
    assert {p.dtype for p in policy.parameters()} == {torch.float32}              # the masters stay fp32
    prompts = toy_prompts()[0::2] * 4
    columns, ended, sampled = rl.sample_rollouts(copy, prompts, 15, 1.0, torch.Generator().manual_seed(0))
    batch = rl.rollout_batch(prompts, columns, ended, 15)
    with torch.no_grad():
        exact = rl.policy_outputs(policy.speechlm, batch, 1.0)[0]                 # fp32, LoRA unmerged
        with mixed():
            autocast = rl.policy_outputs(policy.speechlm, batch, 1.0)[0]
        before_rl = rl.policy_outputs(warm_speechlm, batch, 1.0)[0]               # no LoRA update
    mask = batch["mask"].bool()
    rounding = (sampled - exact)[mask].abs().mean()
    assert rounding < 0.02 and (autocast - exact)[mask].abs().mean() < 0.02, rounding   # bf16 rounding only
    assert (before_rl - exact)[mask].abs().mean() > 5 * rounding                 # the update is in the copy
    assert not torch.equal(autocast, exact)                                      # autocast did act


def test_bf16_ppo_keeps_the_first_ratio_exactly_1(warm_speechlm, tmp_path):
    """Under autocast the old log-probs and the first minibatch's pass are the same computation."""
    rows = run_toy(warm_speechlm, tmp_path, "--system.precision=bf16", "--rl.iterations=3", "--rl.kl_stop=0")
    assert [r["first_ratio_error"] for r in rows] == [0.0, 0.0, 0.0]
    assert all(r["updates"] > 1 and r["approx_kl"] > 0 for r in rows)              # and then it moves


# -----------------------------------------------------------------------------
# stage 3 from checkpoints

@pytest.fixture
def checkpoints(tmp_path):
    """A coded corpus, a tiny random stage-1 checkpoint and a tiny stage-2 checkpoint made on it."""
    corpus = make_coded_corpus(tmp_path / "corpus")
    stage1, stage2 = tmp_path / "s1", tmp_path / "align"
    cfg = config.get_config("tiny", [f"--data.corpus={corpus}", "--speechlm.max_seconds=0.5",
                                     f"--adapter.speechlm_checkpoint={stage1}", "--train.stage=align"])
    lm, _ = speechlm.build_speechlm(cfg, log=lambda *a: None)
    (stage1 / "ckpt").mkdir(parents=True)
    state = speechlm.SpeechLMTraining(lm, 1.0).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(stage1 / "ckpt" / "model.safetensors"))
    (stage1 / "config.json").write_text(json.dumps(cfg.to_dict()))
    align_model, _, _ = adapter.build_align_model(cfg, torch.device("cpu"), log=lambda *a: None)
    save_checkpoint(stage2 / "ckpt", {f"adapter.{k}": v for k, v in align_model.adapter.state_dict().items()},
                    {"step": 0, "stage": "align", "config": cfg.to_dict()})
    return corpus, stage1, stage2


def rl_args(checkpoints, out, *extra):
    corpus, stage1, stage2 = checkpoints
    return ["--preset=tiny", f"--data.corpus={corpus}", f"--adapter.speechlm_checkpoint={stage1}",
            f"--rl.align_checkpoint={stage2}", f"--train.out_dir={out}", "--system.device=cpu", *extra]


def test_stage3_runs_from_checkpoints_and_resumes_exactly(checkpoints, tmp_path):
    quiet = lambda *a: None
    straight = rl.run(rl.parse_args(rl_args(checkpoints, tmp_path / "a", "--rl.iterations=2"))[0], log=quiet)
    assert [r["iteration"] for r in straight] == [0, 1, 2, 2]                       # eval, 2 iterations, eval
    assert {"eval_reward", "eval_judge_text", "eval_kl"} <= set(straight[0]) and straight[0]["eval_kl"] == 0
    logged = {"reward", "reward_std", "kl", "clip_fraction", "approx_kl", "entropy", "value_loss"}
    assert logged <= set(straight[1])
    assert straight[1]["reward"] < 0                                                 # a mean log-probability
    rl.run(rl.parse_args(rl_args(checkpoints, tmp_path / "b", "--rl.iterations=1"))[0], log=quiet)
    cfg, resume = rl.parse_args(rl_args(checkpoints, tmp_path / "b", "--rl.iterations=2", "--resume"))
    resumed = rl.run(cfg, resume, log=quiet)
    same = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows if "reward" in r]
    assert same(resumed) == same(straight)                                          # bit for bit
    assert resumed[-1]["eval_reward"] == straight[-1]["eval_reward"]


def test_lora_policy_starts_as_stage_1_and_trains_only_its_updates(checkpoints, tmp_path):
    """--rl.lora_r: the trunk's projections get LoRA updates with B = 0, so the first rollouts' KL to the
    reference is exactly 0; only the updates and the value head train, and they do move."""
    cfg, _ = rl.parse_args(rl_args(checkpoints, tmp_path, "--rl.lora_r=2", "--rl.iterations=2",
                                   "--rl.lr=1e-2", "--rl.kl_stop=0"))
    quiet = lambda *a: None
    policy, reference, train_prompts, _, score = rl.build_rl(cfg, torch.device("cpu"), quiet)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    blocks = len(policy.speechlm.blocks)
    assert len(trainable) == 2 + blocks * len(rl.LORA_TARGETS) * 2      # A and B of each; the value head's 2
    assert all("lora_" in n or n.startswith("value_head.") for n in trainable)
    before = {n: p.clone() for n, p in policy.named_parameters()}
    rows = rl.train_rl(cfg, policy, reference, train_prompts, score, tmp_path, log=quiet)
    assert rows[0]["kl"] == 0.0 and rows[0]["first_ratio_error"] == 0.0
    moved = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable and any("lora_B" in n for n in moved)


def test_temperature_sweep_samples_as_stage_3_and_prices_sharpening_by_hand(checkpoints, tmp_path):
    """scripts/rl_temperature.py: each row is stage 3's held-out evaluation at that temperature (the same
    draws), and its KL is to the reference read at --rl.temperature: 0 at that temperature, and otherwise
    sum_v p_T(v) log(p_T(v) / p_1(v)), checked by hand on one column's logits."""
    from scripts import rl_temperature
    args, quiet = rl_args(checkpoints, tmp_path, "--rl.eval_samples=2"), lambda *a: None
    rows = rl_temperature.main(args + ["--temperatures=1.0,0.5"])
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[0]["change"] == 0.0
    assert rows[1]["kl"] > 0
    cfg, _ = rl.parse_args(args + ["--rl.temperature=0.5"])
    policy, reference, _, prompts, score = rl.build_rl(cfg, torch.device("cpu"), quiet)
    plain = rl.evaluate(policy, reference, prompts, score, cfg, cfg.system.seed + 1)
    assert rows[1]["reward"] == pytest.approx(plain["eval_reward"], abs=1e-5)     # the same samples
    assert rows[1]["change"] == pytest.approx(rows[1]["reward"] - rows[0]["reward"], abs=1e-5)
    logits = torch.randn(rl.CODE_VOCAB) * 3
    lp_half, lp_one = rl.code_log_probs(logits, 1, 0.5), rl.code_log_probs(logits, 1, 1.0)
    p, q = ((logits[:rl.CODEBOOK_SIZE].double() / t).softmax(-1) for t in (0.5, 1.0))   # codebook 1: codes only
    by_hand = (p * (p / q).log()).sum().item()
    free = torch.ones(1, 1, dtype=torch.bool)
    assert rl.exact_kl([lp_half[None]], [lp_one[None]], free).item() == pytest.approx(by_hand, rel=1e-4)


def test_missing_or_mismatched_checkpoint_is_one_clear_error(checkpoints, tmp_path, capsys):
    def error_of(*extra):
        with pytest.raises(SystemExit) as exit_info:
            train.main(["--stage=rl", *rl_args(checkpoints, tmp_path / "out", *extra)])
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]
    assert "--stage=align" in error_of(f"--rl.align_checkpoint={tmp_path / 'nowhere'}")
    assert "--adapter.speechlm_checkpoint" in error_of(f"--adapter.speechlm_checkpoint={tmp_path / 'other'}")
    assert "drop --resume" in error_of("--resume")
    assert "at least 1 sample" in error_of("--rl.eval_samples=0")
    assert "LoRA rank" in error_of("--rl.lora_r=-2")
    (checkpoints[1] / "ckpt" / "model.safetensors").unlink()                       # stage 1 gone
    assert "--stage=speechlm" in error_of()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="a CUDA generator needs a CUDA GPU"))])
def test_choose_prompts_groups_equal_lengths_on_the_generators_device(device):
    """Rollouts draw their prompts with the run's generator, which lives on the run's device (a CUDA
    generator once failed here: torch.randint made a CPU tensor with it). Each chosen prompt comes
    samples_per_prompt times in a row, and all have the text length of the first one drawn."""
    prompts = [{"text_ids": torch.zeros(n), "id": i} for i, n in enumerate([3, 5, 3, 5, 3, 4, 5, 3])]
    generator = torch.Generator(device).manual_seed(0)
    for _ in range(5):
        chosen = rl.choose_prompts(prompts, n_prompts=3, samples_per_prompt=2, generator=generator)
        assert len(chosen) == 6 and len({len(p["text_ids"]) for p in chosen}) == 1
        assert all(chosen[2 * i] is chosen[2 * i + 1] for i in range(3))
