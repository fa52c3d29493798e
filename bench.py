"""
Speed at the real sizes: our training step and generation against transformers + peft, on one GPU, in one run.

    python bench.py                          # all rows (~3 minutes on an H200, a third of it compiling)
    python bench.py --rows=train,generate    # some rows; also --steps=N (timed repeats), --json=FILE

What is timed (random weights at the real shapes, built here: no checkpoint files; ours and the reference
get the same weights and the same inputs):
  1. train     Audio-LM stage-1 step of the `seed` preset: whisper-small encoder (frozen) + frame-stack-4
               Linear-GELU-Linear projector + Sarvam-2B-shaped Llama with LoRA r=16 on q,k,v,o; batch 8,
               30 s audio, 64 text tokens (375 + 64 = 439 positions), bf16 weights. Ours: model.AudioLM as
               train.py runs it with --system.compile=True (compiled blocks, fused AdamW, logits only on the
               labelled rows, encoder under no_grad, TF32 for the fp32 projector and LoRA matmuls, gradient
               clipping). Reference: the transformers + peft recipe of shared/reference/hf_step.py, line by
               line.
  2. generate  greedy, batch 1, 375 audio positions + 8 prompt tokens (as embeddings), 128 new tokens.
               Ours: Llama.generate with decode="compiled_graph" (static KV cache, torch.compile'd step
               replayed as one CUDA graph per token); also our "cuda_graph" and readable "loop" decoders.
               Reference: transformers generate(), as in shared/reference/hf_generate.py.
  3. speechlm  IRA SpeechLM (speechlm.py) at its real size: 8 layers x 512, 8 codebooks (6 kbps), 10 s of
               codes, batch 8 + a 64-clip VoiceEncoder batch, bf16. No library ships this model, so the
               reference column is our own readable path (eager blocks); generation is speechlm.generate.

Columns: median ms over --steps repeats (after warm-up: compile and graph recording are reported apart);
tokens/s (positions/s for training, new tokens/s for generation); peak GiB (torch.cuda.max_memory_allocated
during the timed repeats, weights included); achieved TFLOP/s and its fraction of the bf16 matmul peak
measured here (training: FLOPs of our step counted once by torch.utils.flop_counter, the same count for both
rows, so the reference's extra logits are not credited) or achieved GB/s (weights + KV cache read per new
token) and its fraction of the copy bandwidth measured here (generation); ours / reference.

transformers and peft are imported by this file only, and only for the reference rows.
Simplified on purpose: one process, one GPU; no data loading in the loop (random inputs made on the GPU).
"""
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

import model
from weights import llama_name_table, whisper_name_table
from lora import apply_lora, mark_only_lora_as_trainable
from model import AudioLM, Llama, LlamaConfig, Projector, WhisperConfig, WhisperEncoder


@dataclass
class Shapes:
    """The sizes a run uses; REAL is the issue's, the tests' smoke run shrinks them."""
    whisper: WhisperConfig
    llama: LlamaConfig
    batch: int = 8                # training examples per step
    mel_frames: int = 3000        # 30 s of audio at 100 frames/s
    stack: int = 4                # projector frame stacking: 1500 encoder frames -> 375 positions
    text: int = 64                # text tokens per example, all labelled
    lora_r: int = 16
    prompt: int = 8               # generation: prompt tokens after the audio positions
    new_tokens: int = 128         # generation: greedy tokens


REAL = Shapes(
    whisper=WhisperConfig(n_mels=80, d_model=768, n_layers=12, n_heads=12, ffn_dim=3072, max_positions=1500),
    llama=LlamaConfig(vocab_size=64128, d_model=2048, n_layers=28, n_heads=16, n_kv_heads=8, ffn_dim=11008,
                      rope_theta=5e6, norm_eps=1e-5, tie_embeddings=False, max_positions=4096, head_dim=128))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory():
    """Drop what the last row left (modules, compiled code, cached blocks) so the next peak is its own."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(fn, warmup, steps, device):
    """Median milliseconds of fn() over `steps` calls after `warmup` calls; peak GiB during the timed calls;
    seconds taken by the first call (compilation, graph recording)."""
    start = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"ms": statistics.median(times) * 1e3, "ms_min": min(times) * 1e3, "ms_max": max(times) * 1e3,
            "peak_gib": peak, "first_s": first}


def count_flops(fn, module):
    """Matmul and attention FLOPs of one call of fn(), as torch.utils.flop_counter counts them. Attention runs
    the readable (manual) path meanwhile: the counter can't read grouped-query shapes in SDPA; causal
    attention counts as full."""
    from torch.utils.flop_counter import FlopCounterMode
    attentions = [m for m in module.modules() if hasattr(m, "manual")]
    for m in attentions:
        m.manual = True
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    for m in attentions:
        m.manual = False
    return counter.get_total_flops()


# -----------------------------------------------------------------------------
# 0. The machine's two ceilings, measured rather than taken from a datasheet

def measure_ceilings(device):
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device,
                                                                              dtype=torch.bfloat16)
    matmul = timed(lambda: a @ b, 3, 10, device)
    src = torch.randn(2**29, device=device, dtype=torch.bfloat16)           # 1 GiB, far past the L2 cache
    dst = torch.empty_like(src)
    copy = timed(lambda: dst.copy_(src), 3, 10, device)
    ceilings = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "bf16_tflops": 2 * n**3 / (matmul["ms"] / 1e3) / 1e12,
                "copy_gbps": 2 * src.numel() * src.element_size() / (copy["ms"] / 1e3) / 1e9}   # read + write
    return ceilings


# -----------------------------------------------------------------------------
# 1. Shared random weights at the real shapes (made once on the GPU, kept on the CPU between rows)

def random_weights(shapes, device):
    """State dicts (CPU) of a random encoder and LLM (bf16) and projector (fp32); nn.Linear's own init."""
    torch.manual_seed(0)
    with torch.device(device):
        encoder = WhisperEncoder(shapes.whisper).to(torch.bfloat16)
        llm = Llama(shapes.llama).to(torch.bfloat16)
        projector = Projector("mlp", shapes.whisper.d_model, shapes.llama.d_model, shapes.stack,
                              shapes.llama.d_model)                       # hidden = 2048, as the seed preset
    weights = {name: {k: v.cpu() for k, v in m.state_dict().items()}
               for name, m in (("encoder", encoder), ("llm", llm), ("projector", projector))}
    l = shapes.llama
    # LoRA A per layer and target (q, k, v, o): (layers, 4, r, in); B starts at zero in both implementations
    weights["lora_A"] = torch.randn(l.n_layers, 4, shapes.lora_r, l.d_model) / l.d_model**0.5
    return weights


def our_audio_lm(shapes, weights, device):
    """model.AudioLM the way weights.build_audio_lm makes it: bf16 frozen parts, fp32 projector and LoRA."""
    with torch.device(device):                                             # initialise on the GPU: seconds
        encoder = WhisperEncoder(shapes.whisper).to(torch.bfloat16)
        llm = Llama(shapes.llama).to(torch.bfloat16)
        projector = Projector("mlp", shapes.whisper.d_model, shapes.llama.d_model, shapes.stack,
                              shapes.llama.d_model)                         # fp32, like build_audio_lm
    encoder.load_state_dict(weights["encoder"])
    llm.load_state_dict(weights["llm"])
    projector.load_state_dict(weights["projector"])
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    apply_lora(llm, shapes.lora_r, 2.0 * shapes.lora_r, targets)
    with torch.no_grad():
        for i, layer in enumerate(llm.layers):
            for j, name in enumerate(targets):
                getattr(layer.attn, name).lora_A.copy_(weights["lora_A"][i, j])
    mark_only_lora_as_trainable(llm)
    return AudioLM(encoder, projector, llm, tokenizer=None).to(device)


def reference_audio_lm(shapes, weights, device):
    """hf_step.py's modules (transformers WhisperEncoder, LlamaForCausalLM + peft, nn.Sequential projector),
    filled with the same weights through our explicit name tables."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder
    w, l = shapes.whisper, shapes.llama
    wcfg = transformers.WhisperConfig(d_model=w.d_model, encoder_layers=w.n_layers,
                                      encoder_attention_heads=w.n_heads, encoder_ffn_dim=w.ffn_dim,
                                      num_mel_bins=w.n_mels, max_source_positions=1500)
    wcfg._attn_implementation = "sdpa"
    with torch.device(device):
        enc = HFWhisperEncoder(wcfg).to(torch.bfloat16).eval().requires_grad_(False)
    table = whisper_name_table(w.n_layers)
    enc.load_state_dict({hf.removeprefix("model.encoder."): weights["encoder"][ours]
                         for hf, ours in table.items()})
    llm = reference_llm(shapes, weights, device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    llm = get_peft_model(llm, LoraConfig(r=shapes.lora_r, lora_alpha=2 * shapes.lora_r,
                                         target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for i in range(l.n_layers):
            attn = llm.base_model.model.model.layers[i].self_attn
            for j, name in enumerate(targets):
                getattr(attn, name).lora_A["default"].weight.copy_(weights["lora_A"][i, j])
    proj = nn.Sequential(nn.Linear(w.d_model * shapes.stack, l.d_model), nn.GELU(),
                         nn.Linear(l.d_model, l.d_model)).to(device, torch.bfloat16)
    proj.load_state_dict({k.removeprefix("net."): v for k, v in weights["projector"].items()})
    return enc, llm, proj


def reference_llm(shapes, weights, device):
    import transformers
    l = shapes.llama
    lcfg = transformers.LlamaConfig(hidden_size=l.d_model, intermediate_size=l.ffn_dim,
                                    num_hidden_layers=l.n_layers, num_attention_heads=l.n_heads,
                                    num_key_value_heads=l.n_kv_heads,
                                    vocab_size=l.vocab_size, rope_theta=l.rope_theta, rms_norm_eps=l.norm_eps,
                                    tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.device(device):
        llm = transformers.LlamaForCausalLM(lcfg).to(torch.bfloat16)
    table = llama_name_table(l.n_layers, tied=False)
    state = {hf: weights["llm"][ours] for hf, ours in table.items()}
    missing, unexpected = llm.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in name for name in missing), (missing, unexpected)
    return llm


# -----------------------------------------------------------------------------
# 2. Row 1: the stage-1 training step, ours and the reference

def training_inputs(shapes, device, generator):
    """A fresh random batch: mel (B, 80, 3000) and 64 text tokens per example, as hf_step.py draws them."""
    B = shapes.batch
    mel = torch.randn(B, shapes.whisper.n_mels, shapes.mel_frames, device=device, dtype=torch.bfloat16,
                      generator=generator)
    ids = torch.randint(0, shapes.llama.vocab_size, (B, shapes.text), device=device, generator=generator)
    return mel, ids


def bench_train_ours(shapes, weights, device, steps, log):
    audio_lm = our_audio_lm(shapes, weights, device)
    n_audio = audio_lm.audio_token_count(shapes.mel_frames)                       # 375
    params = [p for p in audio_lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=1e-4, betas=(0.9, 0.99), fused=device.type == "cuda")
    generator = torch.Generator(device).manual_seed(1)

    def loss_of(mel, ids):
        B = ids.size(0)
        input_ids = torch.cat([torch.zeros(B, n_audio, dtype=torch.long, device=device), ids], dim=1)
        audio_mask = torch.arange(input_ids.size(1), device=device).expand(B, -1) < n_audio     # (B, 439)
        labels = input_ids.masked_fill(audio_mask, -100)                       # the text is the target
        return audio_lm(input_ids, audio_mask, labels, mel=mel)

    def step():
        loss = loss_of(*training_inputs(shapes, device, generator))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)                        # train.py clips; hf_step.py doesn't
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    check = training_inputs(shapes, device, torch.Generator(device).manual_seed(123))
    with torch.no_grad():
        eager_loss = loss_of(*check).item()
    flops = count_flops(lambda: loss_of(*check).backward(), audio_lm)         # forward + backward, eager
    audio_lm.zero_grad(set_to_none=True)
    n_blocks = model.compile_blocks(audio_lm)
    torch.set_float32_matmul_precision("high")                            # train.py's default: system.tf32
    with torch.no_grad():
        compiled_loss = loss_of(*check).item()
    log(f"train/ours: {n_blocks} blocks compiled; loss on a fixed batch: eager {eager_loss:.4f}, compiled "
        f"{compiled_loss:.4f}")
    result = timed(step, 3, steps, device)
    result.update(flops=flops, loss=eager_loss, positions=shapes.batch * (n_audio + shapes.text))
    torch.set_float32_matmul_precision("highest")                             # as the reference runs
    return result


def bench_train_reference(shapes, weights, device, steps, log):
    enc, llm, proj = reference_audio_lm(shapes, weights, device)
    params = [p for p in list(llm.parameters()) + list(proj.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    generator = torch.Generator(device).manual_seed(1)
    B, TXT, STACK = shapes.batch, shapes.text, shapes.stack
    frames = WhisperEncoder.output_length(shapes.mel_frames)                   # 1500

    def loss_of(mel, ids):                                                     # hf_step.py's step(), verbatim
        with torch.no_grad():
            h = enc(mel).last_hidden_state                      # B,1500,768
        a = proj(h.reshape(B, frames // STACK, shapes.whisper.d_model * STACK))      # B,375,2048
        x = torch.cat([a, llm.get_input_embeddings()(ids)], 1)
        labels = torch.cat([torch.full((B, a.shape[1]), -100, device=device), ids], 1)
        return llm(inputs_embeds=x, labels=labels).loss

    def step():
        loss = loss_of(*training_inputs(shapes, device, generator))
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)          # noqa: E702 (as in hf_step.py)
        return loss

    with torch.no_grad():
        loss = loss_of(*training_inputs(shapes, device, torch.Generator(device).manual_seed(123))).item()
    log(f"train/reference: loss on the same fixed batch {loss:.4f}")
    result = timed(step, 3, steps, device)
    result.update(loss=loss, positions=B * (frames // STACK + TXT))
    return result


# -----------------------------------------------------------------------------
# 3. Row 2: greedy generation, batch 1

def generation_prefix(shapes, device):
    torch.manual_seed(2)
    n = WhisperEncoder.output_length(shapes.mel_frames) // shapes.stack + shapes.prompt          # 383
    return torch.randn(1, n, shapes.llama.d_model, device=device, dtype=torch.bfloat16) * 0.02


def bytes_per_token(llm_params, shapes, kv_positions):
    """Bytes a decode step must read: every weight but the embedding table (one row of it), + the KV cache."""
    weights = sum(p.numel() * p.element_size() for name, p in llm_params if "embed_tokens" not in name)
    l = shapes.llama
    return weights + 2 * l.n_layers * l.n_kv_heads * l.head_dim * kv_positions * 2


def bench_generate_ours(shapes, weights, device, steps, decode, log):
    with torch.device(device):
        llm = Llama(shapes.llama).to(torch.bfloat16).eval()
    llm.load_state_dict(weights["llm"])
    llm.cfg.decode = decode
    x = generation_prefix(shapes, device)
    run = lambda: llm.generate(inputs_embeds=x, max_new_tokens=shapes.new_tokens)
    result = timed(run, 2, steps, device)
    result["tokens"] = run()[0].tolist()
    average_kv = x.size(1) + shapes.new_tokens // 2
    result["bytes_per_token"] = bytes_per_token(list(llm.named_parameters()), shapes, average_kv)
    log(f"generate/{decode}: first call (compile + record) {result['first_s']:.1f} s")
    return result


def bench_generate_reference(shapes, weights, device, steps, log):
    llm = reference_llm(shapes, weights, device).eval()
    x = generation_prefix(shapes, device)

    def run():                                                                 # hf_generate.py's gen()
        with torch.no_grad():
            return llm.generate(inputs_embeds=x, max_new_tokens=shapes.new_tokens,
                                min_new_tokens=shapes.new_tokens, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
    result = timed(run, 2, steps, device)
    result["tokens"] = run()[0, -shapes.new_tokens:].tolist()
    return result


# -----------------------------------------------------------------------------
# 4. Row 3: the IRA SpeechLM at its real size (8 x 512, 8 codebooks, 10 s)

SPEECHLM_REAL = ("ira", ["--speechlm.bandwidth=6.0", "--speechlm.max_seconds=10.0"])   # 8 codebooks, 10 s


def bench_speechlm(device, steps, log, preset=SPEECHLM_REAL):
    """-> {"train_readable", "train_fast", "generate"} results, or {"missing": why} when speechlm.py can't."""
    try:
        import config
        import data
        import speechlm
    except ImportError as e:
        return {"missing": f"import speechlm failed: {e}"}
    cfg = config.get_config(*preset)
    K = data.n_codebooks(cfg.speechlm.bandwidth)                            # 8
    frames = int(cfg.speechlm.max_seconds * data.CODEC_FRAME_RATE)         # 750
    text_vocab = 49152                                                      # SmolLM2's tokenizer (ira preset)
    generator = torch.Generator().manual_seed(3)
    descriptions = [f"voice {i}" for i in range(12)]

    def example():
        return {"codes": torch.randint(0, data.CODEBOOK_SIZE, (K, frames), generator=generator),
                "text_ids": torch.randint(0, text_vocab, (64,), generator=generator),
                "desc_ids": torch.randint(0, text_vocab, (16,), generator=generator),
                "description": descriptions[int(torch.randint(12, (1,), generator=generator))], "text": ""}
    B, Bv = cfg.train.batch_size, cfg.speechlm.voice_batch_size
    voice = speechlm.voice_batch([example() for _ in range(Bv)])
    batch = {**speechlm.speech_batch([example() for _ in range(B)]),          # the stage's flat micro-batch
             **{f"voice_{k}": v for k, v in voice.items()}}
    batch = {k: v.to(device) for k, v in batch.items()}
    positions = int(batch["audio_lengths"].sum())                          # train.py's tokens(): audio columns
    results = {"shape": f"{cfg.speechlm.n_layers} x {cfg.speechlm.d_model}, {K} codebooks, {frames} frames"}
    torch.manual_seed(4)
    weights = speechlm.SpeechLM(cfg.speechlm, text_vocab, K).state_dict()

    for variant in ("readable", "fast"):
        torch.manual_seed(4)
        lm = speechlm.SpeechLM(cfg.speechlm, text_vocab, K)
        lm.load_state_dict(weights)
        net = speechlm.SpeechLMTraining(lm, cfg.speechlm.voice_weight).to(device, torch.bfloat16)
        opt = torch.optim.AdamW(net.parameters(), lr=3e-4, fused=device.type == "cuda")

        def step():
            loss = net(**batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if variant == "readable":
            flops = count_flops(lambda: net(**batch).backward(), net)
            net.zero_grad(set_to_none=True)
        else:
            model.compile_blocks(net)
        results[f"train_{variant}"] = {**timed(step, 3, steps, device), "flops": flops,
                                       "positions": positions}
        free_memory()

    lm = speechlm.SpeechLM(cfg.speechlm, text_vocab, K)
    lm.load_state_dict(weights)
    lm = lm.to(device, torch.bfloat16).eval()
    with torch.no_grad():
        lm.heads[0].weight[speechlm.END] = 0.0      # random weights: keep greedy from ending early (all 10 s)
    text, desc = torch.randint(0, text_vocab, (24,)), torch.randint(0, text_vocab, (16,))
    out = {}

    def speak():
        out["codes"] = lm.generate(text, desc, max_seconds=cfg.speechlm.max_seconds, temperature=0.0)
    result = timed(speak, 1, max(2, steps // 3), device)
    result["frames"] = out["codes"].size(1)
    result["codes"] = out["codes"].numel()
    results["generate"] = result
    free_memory()
    return results


# -----------------------------------------------------------------------------
# 5. The table

def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def table(rows, ceilings):
    """rows: (name, result, kind, reference result or None). kind "train" reports TFLOP/s; "generate" GB/s."""
    head = "| row | median ms | tokens/s | peak GiB | achieved | of peak | ours/ref: time | tokens/s | memory |"
    lines = [head, "|" + "---|" * 9]
    for name, r, kind, ref in rows:
        seconds = r["ms"] / 1e3
        if kind == "train":
            tokens = r["positions"] / seconds
            achieved = r["flops"] / seconds / 1e12
            what, of_peak = f"{achieved:.0f} TFLOP/s", achieved / ceilings["bf16_tflops"]
        else:
            tokens = r["new_tokens"] / seconds
            achieved = r["bytes_per_token"] * r["new_tokens"] / seconds / 1e9
            what, of_peak = f"{achieved:.0f} GB/s", achieved / ceilings["copy_gbps"]
        ratio = r["ms"] / ref["ms"] if ref else None                # same work per call: the inverse speed-up
        memory = r["peak_gib"] / ref["peak_gib"] if ref else None
        speedup = 1 / ratio if ratio else None
        lines.append(f"| {name} | {r['ms']:.1f} | {tokens:,.0f} | {r['peak_gib']:.2f} | {what} | {of_peak:.0%} | "
                     f"{fmt(ratio, '.2f')} | {fmt(speedup, '.2f')} | {fmt(memory, '.2f')} |")
    return "\n".join(lines)


def main(argv):
    options = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    unknown = set(options) - {"rows", "steps", "json"}
    if unknown or len(options) != len(argv):
        print(f"usage: python bench.py [--rows=train,generate,speechlm] [--steps=10] [--json=FILE] "
              f"(got {' '.join(argv)})", file=sys.stderr)
        sys.exit(2)
    if not torch.cuda.is_available():
        print("bench.py times GPU code: no CUDA GPU is visible here (torch.cuda.is_available() is False). "
              "Run it on a machine with an NVIDIA GPU; the CPU tests of the same paths are "
              "`python -m pytest tests/test_fast_paths.py`.")
        sys.exit(0)
    selected = options.get("rows", "train,generate,speechlm").split(",")
    steps = int(options.get("steps", 10))
    device, shapes = torch.device("cuda"), REAL
    log = lambda text: print(text, flush=True)
    import peft
    import transformers
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    results = {}

    def done(name, result):          # every number as soon as it exists (a cut-off run still reports)
        results[name] = result
        log(f"{name}: " + json.dumps({k: v for k, v in result.items() if k != "tokens"}, default=str))
        free_memory()
        return result

    c = done("ceilings", measure_ceilings(device))
    weights = random_weights(shapes, device) if {"train", "generate"} & set(selected) else None
    rows = []
    if "train" in selected:
        ref = done("train_reference", bench_train_reference(shapes, weights, device, steps, log))
        ours = done("train_ours", bench_train_ours(shapes, weights, device, steps, log))
        ref["flops"] = ours["flops"]                              # the work the step needs, counted once
        rows += [("1. train step, transformers + peft", ref, "train", None),
                 ("1. train step, ours", ours, "train", ref)]
    if "generate" in selected:
        ref = done("generate_reference", bench_generate_reference(shapes, weights, device, steps // 2, log))
        rows.append(("2. generate, transformers generate()", ref, "generate", None))
        for decode in ("loop", "cuda_graph", "compiled_graph"):
            ours = done(f"generate_{decode}",
                        bench_generate_ours(shapes, weights, device, steps // 2, decode, log))
            for other in ("generate_reference", "generate_loop"):
                pairs = zip(ours["tokens"], results[other]["tokens"])
                same = next((i for i, (a, b) in enumerate(pairs) if a != b), shapes.new_tokens)
                log(f"generate/{decode}: the first {same} of {shapes.new_tokens} greedy tokens equal {other}'s")
            rows.append((f"2. generate, ours ({decode})", ours, "generate", ref))
        for name, r in results.items():
            if name.startswith("generate_"):
                r["new_tokens"] = shapes.new_tokens
                r["bytes_per_token"] = results["generate_loop"]["bytes_per_token"]   # the same model's bytes
    weights = None
    if "speechlm" in selected:
        try:                     # speechlm.py is other work in progress: report a failure, keep the table
            s = bench_speechlm(device, steps, log)
        except Exception as e:
            s = {"missing": f"{type(e).__name__}: {e}"}
        done("speechlm", s)
        if "missing" not in s:
            g = s["generate"]
            log(f"speechlm: {s['shape']}; generation: {g['frames']} frames in {g['ms']:.0f} ms "
                f"({g['frames'] / 75 / (g['ms'] / 1e3):.1f}x real time, "
                f"{g['codes'] / (g['ms'] / 1e3):,.0f} codes/s), first call {g['first_s']:.1f} s")
            s["train_fast"]["flops"] = s["train_readable"]["flops"]
            rows += [("3. SpeechLM train step, readable (eager)", s["train_readable"], "train", None),
                     ("3. SpeechLM train step, ours (compiled)", s["train_fast"], "train", s["train_readable"])]
    if "json" in options:
        with open(options["json"], "w") as f:
            json.dump(results, f, indent=1, default=str)
    log(f"\n{c['device']}: measured bf16 matmul peak {c['bf16_tflops']:.0f} TFLOP/s, copy bandwidth "
        f"{c['copy_gbps']:.0f} GB/s (read + write); median of {steps} steps / {steps // 2} generations\n")
    log(table(rows, c))


if __name__ == "__main__":
    main(sys.argv[1:])
