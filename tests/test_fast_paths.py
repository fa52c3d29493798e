"""
Lesson: every fast path computes the same function as the readable path beside it.

bench.py makes training and generation several times faster on a GPU with a handful of tricks; each is
switched by one flag, and each is checked here on a CPU, in fp32, against the plain code:

| fast path                                 | readable path                     | test                        |
|-------------------------------------------|-----------------------------------|-----------------------------|
| fused SDPA attention                      | softmax(q k^T / sqrt(d)) v        | test_model.py, decode below |
| static KV cache + decode_step (CUDA graph)| forward() with a growing KVCache  | test_decode_step_*          |
| torch.compile of each block               | the eager blocks                  | test_compiled_blocks_*      |
| activation checkpointing                  | keep every activation             | test_activation_*           |
| logits only where there are labels        | logits everywhere + ignore_index  | test_logits_only_*          |
| frozen encoder under no_grad              | the encoder inside autograd       | test_frozen_encoder_*       |
| fused AdamW                               | AdamW's for-loop                  | test_fused_adamw_*          |
| no 30 s padding (masked short audio)      | each clip alone                   | test_model.py (short audio) |
| DDP on 2 processes (torchrun)             | 1 process, same global batch      | test_ddp_*                  |

The CUDA graph itself only exists on a GPU: its test runs there and is skipped elsewhere; on a CPU we test
the function the graph records (decode_step). torch.compile is checked with backend="aot_eager" (graph
capture, autograd and the saved-activation choices, without the slow C++ code generation of a CPU).

Run:  python -m pytest tests/test_fast_paths.py
"""
import json
import os
import socket

import pytest
import torch
import torch.nn.functional as F

import model
import train
from lora import apply_lora, mark_only_lora_as_trainable
from model import AudioLM, KVCache, Llama, LlamaConfig, Projector, WhisperConfig, WhisperEncoder
from test_train import corpus, tiny_checkpoints_in_tmp, tiny_config   # noqa: F401 (pytest fixtures)


def tiny_llama(attention="sdpa", lora=False, vocab=128, **changes):
    """A random 2-layer Llama with grouped-query attention (4 heads, 2 kv heads)."""
    cfg = LlamaConfig(vocab_size=vocab, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                      max_positions=512, attention=attention, tie_embeddings=False, **changes)
    llm = Llama(cfg)
    if lora:
        apply_lora(llm, r=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
        mark_only_lora_as_trainable(llm)
        for name, p in llm.named_parameters():          # lora_B starts at 0; make the branch matter
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return llm


def tiny_audio_lm():
    """Whisper-shaped encoder (2 layers) + mlp projector + tiny_llama with LoRA, no files needed."""
    encoder = WhisperEncoder(WhisperConfig(d_model=32, n_layers=2, n_heads=4, ffn_dim=64))
    projector = Projector("mlp", d_audio=32, d_llm=64, stack=2, hidden=48)
    return AudioLM(encoder, projector, tiny_llama(lora=True), tokenizer=None)


def audio_batch(B=2, frames=40, text=6, vocab=128):
    """[audio positions] [text], labels on the text only: the shape of a stage-1 batch (seed: 375 + 64)."""
    n_audio = -(-WhisperEncoder.output_length(frames) // 2)                     # stack 2
    ids = torch.randint(0, vocab, (B, n_audio + text))
    audio_mask = torch.zeros(B, n_audio + text, dtype=torch.bool)
    audio_mask[:, :n_audio] = True
    labels = ids.masked_fill(audio_mask, -100)
    return dict(input_ids=ids, audio_mask=audio_mask, labels=labels, mel=torch.randn(B, 80, frames))


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def flat(grads_by_name, order=None):
    """One vector of gradients, in the order of `order`'s names (so two models' vectors line up)."""
    return torch.cat([grads_by_name[n].flatten() for n in (order or grads_by_name)])


# -----------------------------------------------------------------------------
# Generation: the static-shape decode step that a CUDA graph records

@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_decode_step_equals_forward_with_cache(parity, attention):
    """Prefill 9 tokens, then decode 12 one at a time: decode_step (tensor position, all max_len slots,
    masked) gives the readable path's logits (a KVCache that grows, sliced to what was written)."""
    llm = tiny_llama(attention).eval()
    ids = torch.randint(0, 128, (2, 21))
    with torch.no_grad():
        slow_cache = KVCache(llm.cfg, 2, 21, "cpu", torch.float32)            # exactly as long as needed
        fast_cache = KVCache(llm.cfg, 2, 64, "cpu", torch.float32)            # longer: the tail stays masked
        slow = [llm(ids[:, :9], kv_cache=slow_cache)[:, -1]]
        fast = [llm(ids[:, :9], kv_cache=fast_cache)[:, -1]]
        for t in range(9, 21):
            slow.append(llm(ids[:, t:t + 1], kv_cache=slow_cache)[:, -1])
            fast.append(llm.decode_step(ids[:, t], torch.tensor([t]), fast_cache))
    parity(f"decode_step (static cache, {attention}) vs forward + KVCache", torch.stack(fast),
           torch.stack(slow), 1e-5)


def test_decode_step_ignores_stale_slots(parity):
    """A graph's cache is reused across prompts without zeroing: slots after `position` must not matter."""
    llm = tiny_llama().eval()
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        clean, dirty = (KVCache(llm.cfg, 1, 32, "cpu", torch.float32) for _ in range(2))
        for k, v in zip(dirty.k, dirty.v):
            k.normal_(), v.normal_()                                     # garbage from "a previous prompt"
        llm(ids[:, :5], kv_cache=clean), llm(ids[:, :5], kv_cache=dirty)
        a = llm.decode_step(ids[:, 5], torch.tensor([5]), clean)
        b = llm.decode_step(ids[:, 5], torch.tensor([5]), dirty)
    parity("decode_step: stale cache slots vs zeroed", b, a, 1e-6)


@pytest.mark.slow   # torch.compile on a 2-core CPU: ~20 s
def test_compiled_decode_step_equals_eager(parity):
    """decode="compiled_graph" compiles decode_step with fullgraph=True: it must trace in one piece."""
    llm = tiny_llama(lora=True).eval()
    step = torch.compile(llm.decode_step, fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        a_cache, b_cache = (KVCache(llm.cfg, 1, 16, "cpu", torch.float32) for _ in range(2))
        llm(ids[:, :6], kv_cache=a_cache), llm(ids[:, :6], kv_cache=b_cache)
        eager = [llm.decode_step(ids[:, t], torch.tensor([t]), a_cache) for t in (6, 7)]
        compiled = [step(ids[:, t], torch.tensor([t]), b_cache) for t in (6, 7)]
    parity("decode_step torch.compile (aot_eager) vs eager", torch.stack(compiled), torch.stack(eager), 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("decode", ["cuda_graph", "compiled_graph"])
def test_cuda_graph_generate_equals_loop(decode):
    """On a GPU (fp32): generate() through a recorded graph gives the readable loop's tokens, twice in a
    row (the second call reuses the graph), with eos and streaming intact; and for three prompts side by
    side (stage 2's evaluation), whose rows end at different steps."""
    llm = tiny_llama().cuda().eval()
    prompt = torch.randint(0, 128, (1, 7), device="cuda")
    llm.cfg.decode = "loop"
    expected = llm.generate(prompt, max_new_tokens=20)
    llm.cfg.decode = decode
    for _ in range(2):
        streamed = []
        got = llm.generate(prompt, max_new_tokens=20, callback=lambda t: streamed.append(t.item()))
        assert got.tolist() == expected.tolist() and streamed == expected[0].tolist()
    eos = expected[0, 5].item()
    assert llm.generate(prompt, max_new_tokens=20, eos_id=eos)[0, -1].item() == eos
    prompts = torch.randint(0, 128, (3, 7), device="cuda")
    llm.cfg.decode = "loop"
    expected = llm.generate(prompts, max_new_tokens=20, eos_id=eos)
    llm.cfg.decode = decode
    assert llm.generate(prompts, max_new_tokens=20, eos_id=eos).tolist() == expected.tolist()


# -----------------------------------------------------------------------------
# Training: compiled blocks, activation checkpointing, logits where labelled, frozen encoder, fused AdamW

@pytest.mark.slow   # torch.compile on a 2-core CPU: ~20 s
def test_compiled_blocks_equal_eager(parity):
    """compile_blocks on the whole AudioLM: same loss and same LoRA/projector gradients, for two batches of
    different lengths (the second compiles with a dynamic length)."""
    eager = tiny_audio_lm()
    fast = tiny_audio_lm()
    fast.load_state_dict(eager.state_dict())
    assert model.compile_blocks(fast, backend="aot_eager") == 4                 # 2 encoder + 2 LLM blocks
    for frames in (40, 56):
        batch, loss = audio_batch(frames=frames), {}
        for name, m in (("eager", eager), ("fast", fast)):
            m.zero_grad()
            loss[name] = m(**batch)
            loss[name].backward()
        parity(f"compiled blocks vs eager: loss ({frames} frames)", loss["fast"], loss["eager"], 1e-5)
        g_eager, g_fast = grads(eager), grads(fast)
        assert g_eager.keys() == g_fast.keys() and len(g_eager) > 0
        parity(f"compiled blocks vs eager: gradients ({frames} frames)", flat(g_fast, g_eager), flat(g_eager),
               1e-5)


def test_activation_checkpointing_same_gradients(parity):
    plain = tiny_audio_lm()
    ckpt = tiny_audio_lm()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.llm.cfg.checkpoint_activations = True
    batch = audio_batch()
    for m in (plain, ckpt):
        m(**batch).backward()
    g_plain, g_ckpt = grads(plain), grads(ckpt)
    parity("activation checkpointing vs none: gradients", flat(g_ckpt, g_plain), flat(g_plain), 1e-6)


def test_logits_only_where_labelled(parity):
    """AudioLM.forward runs lm_head on the labelled rows only (64 of 439 at the seed's shapes). The
    readable way: logits everywhere, then cross-entropy that ignores -100."""
    lm = tiny_audio_lm()
    batch = audio_batch()
    with torch.no_grad():
        features, lengths = lm.encode(batch["mel"])
        embeds = lm.embed(batch["input_ids"], batch["audio_mask"], features, lengths)
        logits = lm.llm(inputs_embeds=embeds)                                    # (B, T, vocab): every row
        readable = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                   ignore_index=-100)
        parity("loss: logits where labelled vs everywhere", lm(**batch), readable, 1e-5)


def test_frozen_encoder_runs_without_autograd(parity):
    """AudioLM.encode is under no_grad: no graph is kept for the frozen encoder (its activations are
    freed at once), and the loss and the trainable gradients are what autograd-through-it would give."""
    lm = tiny_audio_lm()
    batch = audio_batch()
    features, lengths = lm.encode(batch["mel"])
    assert not features.requires_grad
    loss = lm(**batch)
    loss.backward()
    fast = grads(lm)
    assert not any(n.startswith("encoder.") for n in fast)
    lm.zero_grad()
    through = lm.encoder(batch["mel"])                                          # the encoder inside autograd
    slow_loss = lm(batch["input_ids"], batch["audio_mask"], batch["labels"], features=through,
                   feature_lengths=lengths)
    slow_loss.backward()
    slow = grads(lm)
    parity("frozen encoder: loss under no_grad vs through autograd", loss, slow_loss, 1e-6)
    parity("frozen encoder: gradients under no_grad vs through autograd", flat(fast, slow), flat(slow), 1e-6)


def test_fused_adamw_equals_for_loop(parity):
    """train.py uses AdamW(fused=True) on a GPU: one kernel for all parameters instead of a loop."""
    torch.manual_seed(0)
    params = [torch.randn(7, 5), torch.randn(5)]
    loop = [p.clone().requires_grad_() for p in params]
    fused = [p.clone().requires_grad_() for p in params]
    opt_loop = torch.optim.AdamW(loop, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, foreach=False)
    opt_fused = torch.optim.AdamW(fused, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, fused=True)
    for step in range(5):
        g = [torch.randn_like(p) for p in params]
        for group, opt in ((loop, opt_loop), (fused, opt_fused)):
            for p, gi in zip(group, g):
                p.grad = gi.clone()
            opt.step()
    parity("AdamW fused vs for-loop, 5 steps", torch.cat([p.flatten() for p in fused]),
           torch.cat([p.flatten() for p in loop]), 1e-6)


# -----------------------------------------------------------------------------
# Data parallel: 2 processes with DistributedDataParallel = 1 process at the same global batch

def _ddp_worker(rank, world, port, argv):
    """One torchrun rank, by hand: the environment torchrun would set, then train.py's train()."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg, _ = train.parse_args(argv)
    train.train(cfg, log=lambda *a: None)


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, corpus, monkeypatch):   # noqa: F811 (corpus is a fixture)
    """Rank r takes micro-batches r, r + 2, ...; DDP averages the gradients. So 2 ranks x 1 micro-batch of 4
    follow the same losses as 1 process x 2 accumulated micro-batches of 4 (gloo on CPU; nccl on GPUs)."""
    args = ["--preset=tiny", "--stage=asr", f"--data.corpus={corpus}", "--system.device=cpu",
            "--train.max_steps=4", "--train.log_every=1", "--train.eval_samples=1"]
    single = train.train(tiny_config(tmp_path, corpus, "--train.max_steps=4", "--train.grad_accum=2",
                                     "--train.out_dir=one", "--train.eval_samples=1"), log=lambda *a: None)
    with socket.socket() as s:                                              # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")                              # children: CPU + gloo
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, args + ["--train.out_dir=two"]), nprocs=2)
    double = [json.loads(line) for line in open(tmp_path / "two" / "log.jsonl")]
    assert [r["step"] for r in double] == [1, 2, 3, 4]
    for one, two in zip(single, double):
        assert abs(one["loss"] - two["loss"]) < 1e-4, (one, two)
        assert abs(one["grad_norm"] - two["grad_norm"]) < 1e-3, (one, two)
    assert (tmp_path / "two" / "ckpt" / "MANIFEST.json").exists()              # rank 0 saved the checkpoint
