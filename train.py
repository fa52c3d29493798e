"""
Train a stage, as one readable script.

    python train.py --stage=asr                                   # stage 1: speech -> transcript (base preset)
    python train.py --stage=instruct --train.init_from=out/asr    # stage 2: answer / continue speech
    python train.py --preset=tiny --stage=asr                     # seconds on a CPU, random weights
    python train.py --stage=asr --resume                          # continue out/<stage> exactly where it stopped
    python train.py --stage=speechlm | align                      # IRA stages 1 and 2 (speechlm.py, adapter.py)
    python train.py --stage=rl                                    # IRA stage 3: PPO, its own loop (rl.py)
    torchrun --nproc_per_node=2 train.py --stage=asr              # data-parallel on 2 GPUs

Every stage is the same loop; a stage only decides what the model is, what a micro-batch is, and how
to evaluate. The loop: AdamW on the trainable parameters only (projector + LoRA for the audio LM),
linear warmup then cosine decay, gradient accumulation, global-norm clipping, non-finite steps
skipped, one log line per `log_every` steps, evaluation every `eval_every`, atomic checkpoints
(checkpoint.py) holding trainable weights + optimizer + step + config, and a loss-curve picture.

Resume is exact: micro-batch i is a pure function of (seed, i) (see data.AudioLMBatches), the learning
rate a pure function of the step, and the optimizer and RNG states are in the checkpoint, so an
interrupted and resumed run repeats the uninterrupted run's losses bit for bit on a CPU.

Simplified on purpose: one optimizer, one schedule, no EMA, evaluation on rank 0 only.
"""
import base64
import json
import math
import os
import queue
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

import config
import data
import model
import rl
import weights
from checkpoint import CheckpointCorrupt, load_checkpoint, optimizer_from_tensors, save_checkpoint

# -----------------------------------------------------------------------------
# 1. A stage (data.Stage): what to train, on what, and how to judge it


def greedy_answers(audio_lm, rows, features, batch_size, max_new_tokens=48):
    """The LLM's greedy answer to each row's prompt about its clip (cached encoder features), as
    AudioLM.generate gives it. Rows whose token sequences have one length (the same prompt and the same
    number of audio tokens) are decoded side by side, batch_size at a time: no padding, so no row's answer
    changes, while a new token reads every weight once for all the rows (on a 2-core CPU, the 300 test
    transcripts of `make train` took 91 s so, 315 s one at a time)."""
    device, eot = audio_lm.llm.embed_tokens.weight.device, audio_lm.tokenizer.end_of_turn_id
    frames = torch.tensor([features[r["audio"]].size(0) for r in rows])                 # encoder frames
    counts = audio_lm.projector.audio_token_count(frames).tolist()                     # audio tokens
    examples = [audio_lm.build_example(r["prompt"], n) for r, n in zip(rows, counts)]
    same_length = {}
    for i, (ids, _, _) in enumerate(examples):
        same_length.setdefault(len(ids), []).append(i)
    groups = [g[k: k + batch_size] for g in same_length.values() for k in range(0, len(g), batch_size)]
    answers = [None] * len(rows)
    for group in tqdm(groups, desc="eval: answering", unit="batch", leave=False):
        clips = pad_sequence([features[rows[i]["audio"]].float() for i in group], batch_first=True)
        ids = torch.tensor([examples[i][0] for i in group], device=device)                 # (B, T)
        audio_mask = torch.tensor([examples[i][1] for i in group], device=device)
        embeds = audio_lm.embed(ids, audio_mask, clips.to(device), frames[group].to(device))   # (B, T, C)
        out = audio_lm.llm.generate(inputs_embeds=embeds, max_new_tokens=max_new_tokens, eos_id=eot).tolist()
        for i, tokens in zip(group, out):
            answers[i] = audio_lm.tokenizer.decode([t for t in tokens if t != eot])
    return answers


def evaluate_audio_lm(audio_lm, test_rows, features, cfg, device, log=print):
    """Test loss on up to eval_samples rows, WER of greedy transcripts, accuracy of spoken answers."""
    audio_lm.eval()
    n = cfg.train.eval_samples
    tasks = {task for task, weight in cfg.data.mix if weight > 0} if cfg.train.stage == "instruct" else {"transcribe"}
    metrics, rows = {}, [r for r in test_rows if r["task"] in tasks][:n]     # the stage's own tasks only
    present = {r["task"] for r in rows}                  # a small eval_samples may leave a task out
    batches = data.AudioLMBatches(rows, audio_lm, cfg.train.batch_size, mix=[(t, 1.0) for t in present],
                                  features=features)
    with torch.no_grad():
        losses = [audio_lm(**to_device(batches.collate(rows[k: k + cfg.train.batch_size]), device)).item()
                  for k in range(0, len(rows), cfg.train.batch_size)]
    if losses:                                           # none when the test split has no such task
        metrics["test_loss"] = sum(losses) / len(losses)
    for task, name in (("transcribe", "wer"), ("instruct", "accuracy"), ("continue", "continue_wer")):
        chosen = [r for r in test_rows if r["task"] == task][:n]
        if not chosen or (task != "transcribe" and cfg.train.stage == "asr"):
            continue
        if features is not None:
            answers = greedy_answers(audio_lm, chosen, features, cfg.train.batch_size)
        else:                                                             # no cache: one waveform at a time
            answers = [audio_lm.generate(data.load_audio(r["audio"]), r["prompt"], max_new_tokens=48)
                       for r in tqdm(chosen, desc=f"eval: {task}", unit="clip", leave=False)]
        if task == "instruct":
            right = [data.normalize_text(a) == data.normalize_text(r["response"]) for a, r in zip(answers, chosen)]
            metrics[name] = sum(right) / len(right)
        else:
            metrics[name] = data.word_error_rate([r["response"] for r in chosen], answers)
        for r, a in list(zip(chosen, answers))[:2]:
            log(f"  [{task}] {r['response']!r} -> {a!r}")
    audio_lm.train()
    return metrics


def build_audio_lm_stage(cfg, device, dtype, int8, log):
    """Stages asr and instruct: frozen Whisper -> projector -> LLM with LoRA, on a manifest corpus."""
    corpus = Path(cfg.data.corpus)
    if not (corpus / "train.jsonl").exists():
        raise config.ConfigError(f"{corpus}/train.jsonl not found: make the corpus first with "
                                 f"`python corpus.py --out {corpus}` (or set --data.corpus=FOLDER)")
    audio_lm = weights.build_audio_lm(cfg, device, dtype, int8, log)
    train_rows, test_rows = data.read_manifest(corpus / "train.jsonl"), data.read_manifest(corpus / "test.jsonl")
    for folder in cfg.data.more_train:        # e.g. a corpus of spoken questions (README, stage 2 on a GPU)
        if not (Path(folder) / "train.jsonl").exists():
            raise config.ConfigError(f"--data.more_train: {folder}/train.jsonl not found; make it with "
                                     f"`python corpus.py --out {folder} ...` (README, stage 2)")
        train_rows += data.read_manifest(Path(folder) / "train.jsonl")
    mix = cfg.data.mix if cfg.train.stage == "instruct" else (("transcribe", 1.0),)
    features = None
    if cfg.data.cache_encoder:
        encoder_name = Path(weights.resolve_checkpoint(cfg.model.encoder)).name
        cache = corpus / "cache" / f"{encoder_name}-{'30s' if cfg.model.pad_audio_to_30s else 'native'}.safetensors"
        features = data.encoder_features(audio_lm, train_rows + test_rows, cache)
    batches = data.AudioLMBatches(train_rows, audio_lm, cfg.train.batch_size, cfg.system.seed, mix, features)
    return data.Stage(audio_lm, batches, lambda: evaluate_audio_lm(audio_lm, test_rows, features, cfg, device, log),
                      tokens=lambda batch: int(batch["input_ids"].numel()))


def build_stage(cfg, device, dtype, int8, log):
    if cfg.train.stage in ("asr", "instruct"):
        return build_audio_lm_stage(cfg, device, dtype, int8, log)
    if cfg.train.stage == "speechlm":
        from speechlm import build_speechlm_stage
        return build_speechlm_stage(cfg, device, log)
    if cfg.train.stage == "align":
        from adapter import build_align_stage
        return build_align_stage(cfg, device, log)
    raise config.ConfigError(f"--train.stage={cfg.train.stage}: choose asr, instruct, speechlm, align or rl")


# -----------------------------------------------------------------------------
# 2. Small helpers: device moves, the schedule, RNG state, the loss-curve picture

def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Prefetcher:
    """Micro-batches made ahead in a background thread while the model computes the current one.

    stage.batch(i) is CPU work (reading cached features or audio, padding, tokenizing); done inline, the
    GPU waits for it at every micro-batch. Here a thread runs up to `depth` batches ahead and pins their
    memory, so that the copy to the GPU (non_blocking) overlaps compute too. Batch i is a pure function
    of i, so the batches, and therefore the run, are the same as with depth=0, the inline path
    (tests/test_train.py checks both). `waited` counts the seconds the training loop sat waiting.
    """

    def __init__(self, make_batch, indices, depth=2, pin=False):
        self.make_batch, self.indices, self.pin = make_batch, iter(indices), pin
        self.queue, self.stopped, self.waited, self.thread = queue.Queue(maxsize=max(depth, 1)), False, 0.0, None
        if depth > 0:
            self.thread = threading.Thread(target=self._work, daemon=True)
            self.thread.start()

    def _make(self, i):
        batch = self.make_batch(i)
        return {k: v.pin_memory() if self.pin and torch.is_tensor(v) else v for k, v in batch.items()}

    def _work(self):
        try:
            for i in self.indices:
                if self.stopped:
                    return
                self.queue.put(self._make(i))
        except BaseException as err:     # handed to the training thread, which raises it where it is reported
            self.queue.put(err)

    def __next__(self):
        t0 = time.time()
        item = self._make(next(self.indices)) if self.thread is None else self.queue.get()
        self.waited += time.time() - t0
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        """Stop the thread (it may be blocked on a full queue: drain it until the thread ends)."""
        self.stopped = True
        while self.thread is not None and self.thread.is_alive():
            try:
                self.queue.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(timeout=0.01)


def micro_batch_indices(start_step, max_steps, grad_accum, world, rank):
    """The micro-batches this rank trains on, in order: rank r takes r, r + world, r + 2 world, ..."""
    for step in range(start_step, max_steps):
        for micro in range(grad_accum):
            yield (step * grad_accum + micro) * world + rank


def learning_rate(step, cfg):
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def rng_state():
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state):
    as_tensor = lambda text: torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
    torch.set_rng_state(as_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([as_tensor(s) for s in state["cuda"]])


def write_loss_curve(log_rows, path):
    """An SVG line chart of train (and test) loss against step: plain text, no plotting library."""
    train = [(r["step"], r["loss"]) for r in log_rows if "loss" in r]
    test = [(r["step"], r["test_loss"]) for r in log_rows if "test_loss" in r]
    if not train:
        return
    W, H, pad = 640, 360, 48
    steps = [s for s, _ in train + test]
    values = [v for _, v in train + test]
    x0, x1, y0, y1 = min(steps), max(max(steps), min(steps) + 1), min(values), max(max(values), min(values) + 1e-6)
    to_xy = lambda s, v: (pad + (s - x0) / (x1 - x0) * (W - 2 * pad), H - pad - (v - y0) / (y1 - y0) * (H - 2 * pad))
    line = lambda pts, colour: ('<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>'
                                % (colour, " ".join("%.1f,%.1f" % to_xy(s, v) for s, v in pts)))
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
           f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{H - pad}" stroke="black"/>',
           f'<text x="{pad}" y="{H - 16}">step {x0}</text><text x="{W - pad - 60}" y="{H - 16}">step {x1}</text>',
           f'<text x="4" y="{pad}">{y1:.2f}</text><text x="4" y="{H - pad}">{y0:.2f}</text>',
           line(train, "steelblue"), f'<text x="{W - 150}" y="20" fill="steelblue">train loss</text>']
    if test:
        svg += [line(test, "darkorange"), f'<text x="{W - 150}" y="36" fill="darkorange">test loss</text>']
    Path(path).write_text("\n".join(svg + ["</svg>"]))


# -----------------------------------------------------------------------------
# 3. The loop

def train(cfg, resume=False, log=print):
    # 3a. processes and devices: one process per GPU under torchrun, else one process
    distributed = "RANK" in os.environ
    if distributed:   # torchrun sets RANK, LOCAL_RANK (the GPU on this machine) and WORLD_SIZE
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if torch.cuda.is_available() \
            else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        rank, world = dist.get_rank(), dist.get_world_size()
        if not cfg.system.threads:   # torchrun sets OMP_NUM_THREADS=1; share the cores between the ranks instead
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    else:
        rank, world = 0, 1
        device = config.choose_device(cfg.system.device, log)
    main_process = rank == 0
    log = log if main_process else (lambda *a, **k: None)
    if cfg.system.threads:
        torch.set_num_threads(cfg.system.threads)
    torch.manual_seed(cfg.system.seed)
    dtype, int8 = config.choose_precision(cfg.system.precision, device, log)
    if device.type == "cuda":   # the fp32 parts' matmuls: TF32 tensor cores, or full fp32 (see SystemConfig.tf32)
        torch.set_float32_matmul_precision("high" if cfg.system.tf32 else "highest")
    out_dir = Path(cfg.train.out_dir)

    # 3b. the stage, the trainable parameters and the optimizer. Under torchrun, rank 0 builds first so
    # that files made on first use (tiny checkpoints, the encoder-feature cache) are written once
    if distributed and not main_process:
        dist.barrier()
    stage = build_stage(cfg, device, dtype, int8, log)
    if distributed and main_process:
        dist.barrier()
    net = stage.model.to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise config.ConfigError("nothing to train: every parameter is frozen")
    # matrices decay; norms, biases and gains do not. A parameter whose name starts with a prefix of
    # stage.lr_scale follows the same schedule times that scale
    groups = {}
    for name, p in net.named_parameters():
        if p.requires_grad:
            scale = next((s for prefix, s in stage.lr_scale.items() if name.startswith(prefix)), 1.0)
            groups.setdefault((p.dim() < 2, scale), []).append(p)          # decaying groups first, as before
    optimizer = torch.optim.AdamW([{"params": group, "weight_decay": 0.0 if flat else cfg.train.weight_decay,
                                    "lr_scale": scale} for (flat, scale), group in sorted(groups.items())],
                                  lr=cfg.train.lr, betas=(0.9, 0.99), fused=device.type in ("cuda", "cpu"))
    # fused = one kernel for all tensors: on a 2-core CPU, 0.04 s a step for 65M weights of stage 1's shapes,
    # where the plain loop over them took 0.66 s
    trainable_names = {n for n, p in net.named_parameters() if p.requires_grad}

    # 3c. where to start: a stage-1 checkpoint (init_from), our own checkpoint (resume), or fresh
    step = 0
    if resume:
        tensors, meta, opt_tensors = load_checkpoint(out_dir / "ckpt")
        if meta["config"]["model"] != cfg.to_dict()["model"] or meta["stage"] != cfg.train.stage:
            raise config.ConfigError(f"{out_dir}/ckpt was trained with another model or stage "
                                     f"({meta['stage']}); resume with the same --preset and --stage")
        load_trainable(net, tensors, trainable_names, strict=True, where=out_dir / "ckpt")
        optimizer_from_tensors(optimizer, opt_tensors, meta["optimizer"])
        step = meta["step"]
        set_rng_state(meta["rng"])
        log(f"resumed from {out_dir}/ckpt at step {step}")
    elif cfg.train.init_from:
        tensors, meta, _ = load_checkpoint(Path(cfg.train.init_from) / "ckpt"
                                           if (Path(cfg.train.init_from) / "ckpt").exists() else cfg.train.init_from)
        loaded = load_trainable(net, tensors, trainable_names, strict=False, where=cfg.train.init_from)
        log(f"initialised {loaded} tensors from {cfg.train.init_from} (stage {meta['stage']}, step {meta['step']})")
    model_for_step = net
    if distributed:
        # buffers (RoPE tables) never change: no need to broadcast them before every forward
        model_for_step = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda"
                                                                   else None, broadcast_buffers=False)
    if cfg.system.compile:   # fuse each transformer block (model.compile_blocks); eager blocks stay readable
        n_blocks = model.compile_blocks(net)
        log(f"compile: {n_blocks} transformer blocks (the first steps are slow while they compile)")

    def save(step):
        if main_process:
            state = {n: t for n, t in net.state_dict(keep_vars=True).items() if n in trainable_names}
            meta = {"step": step, "stage": cfg.train.stage, "config": cfg.to_dict(), "rng": rng_state()}
            save_checkpoint(out_dir / "ckpt", state, meta, optimizer)
            (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    # 3d. the loop: accumulate grad_accum micro-batches, clip, step; rank r takes micro-batches r, r+world, ...
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(out_dir / "log.jsonl", "a" if resume else "w") if main_process else None
    log_rows = [json.loads(line) for line in open(out_dir / "log.jsonl")] if resume and main_process else []
    bad_in_a_row, skipped = 0, 0
    net.train()
    bar = tqdm(total=cfg.train.max_steps, initial=step, desc=f"train {cfg.train.stage}", unit="step",
               disable=not main_process, dynamic_ncols=True)
    t_last, tokens_since, waited_before = time.time(), 0, 0.0
    batches = Prefetcher(stage.batch, micro_batch_indices(step, cfg.train.max_steps, cfg.train.grad_accum, world,
                                                          rank), cfg.system.prefetch, pin=device.type == "cuda")
    while step < cfg.train.max_steps:
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)          # checkpoints from before lr_scale: 1
        loss_sum = 0.0
        for micro in range(cfg.train.grad_accum):
            batch = to_device(next(batches), device)
            tokens_since += stage.tokens(batch) * world
            sync = micro == cfg.train.grad_accum - 1 or not distributed     # all-reduce once per step
            context = model_for_step.no_sync() if not sync else torch.enable_grad()
            with context:
                loss = model_for_step(**batch) / cfg.train.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        if distributed:   # the mean over ranks, for the log (DDP already averaged the gradients)
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            loss_sum = loss_sum / world
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip if cfg.train.grad_clip > 0
                                                   else float("inf"))
        if not (torch.isfinite(loss_sum) & torch.isfinite(grad_norm)).item():     # one GPU -> CPU sync, not two
            # 3e. a non-finite loss or gradient would poison AdamW's moments: skip the update, count it
            optimizer.zero_grad(set_to_none=True)
            skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
            log(f"step {step}: non-finite loss or gradient, update skipped ({skipped} so far)")
            if bad_in_a_row >= 10:
                save(step)
                batches.close()
                raise FloatingPointError(f"10 non-finite steps in a row at step {step}; saved {out_dir}/ckpt. "
                                         f"Lower --train.lr or use --system.precision=fp32")
            step += 1
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bad_in_a_row, step = 0, step + 1
        bar.update(1)
        row = {"step": step, "loss": round(loss_sum.item(), 5), "lr": lr, "grad_norm": round(grad_norm.item(), 4)}
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            seconds = time.time() - t_last
            row["tokens_per_s"] = round(tokens_since / seconds, 1)
            row["data_wait"] = round((batches.waited - waited_before) / seconds, 4)   # fraction of the time
            waited_before = batches.waited
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if main_process:
                bar.write(f"step {step:5d}/{cfg.train.max_steps} | loss {row['loss']:.4f} | lr {lr:.2e} | "
                          f"grad norm {row['grad_norm']:.2f} | {row['tokens_per_s']:.0f} tok/s")
            t_last, tokens_since = time.time(), 0
        if main_process and ((cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == cfg.train.max_steps):
            with torch.compiler.set_stance("force_eager"):   # evaluation varies shapes; compiling it won't pay
                row.update({k: round(v, 5) for k, v in stage.evaluate().items()})
            bar.write(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                           if k not in ("step", "loss", "lr", "grad_norm",
                                                                        "tokens_per_s", "data_wait")))
        if step % cfg.train.save_every == 0 or step == cfg.train.max_steps:
            save(step)
        if main_process:
            log_rows.append(row)
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
    bar.close()
    batches.close()
    if main_process:
        write_loss_curve(log_rows, out_dir / "loss.svg")
        log(f"done: {step} steps, {skipped} skipped; checkpoint {out_dir}/ckpt, log {out_dir}/log.jsonl, "
            f"curve {out_dir}/loss.svg")
    if distributed:
        dist.destroy_process_group()
    return log_rows


def load_trainable(net, tensors, trainable_names, strict, where):
    """Copy checkpoint tensors into the trainable parameters, checking names and shapes."""
    params = dict(net.named_parameters())
    unknown = [n for n in tensors if n not in params]
    missing = sorted(n for n in trainable_names if n not in tensors)
    if unknown or (strict and missing):
        name = (unknown or missing)[0]
        raise config.ConfigError(f"{where}: tensor {name} {'is not in this model' if unknown else 'is missing'}; "
                                 f"was it trained with another preset, projector or --lora settings?")
    for name, value in tensors.items():
        if params[name].shape != value.shape:
            raise config.ConfigError(f"{where}: tensor {name} has shape {tuple(value.shape)}, the model needs "
                                     f"{tuple(params[name].shape)} (another preset or --lora.r?)")
        with torch.no_grad():
            params[name].copy_(value)
    return len(tensors)


# -----------------------------------------------------------------------------
# 4. Command line: user mistakes are one line and exit code 2; bugs keep their traceback

USER_ERRORS = (config.ConfigError, weights.CheckpointError, CheckpointCorrupt, data.AudioError, FloatingPointError)


def parse_args(argv):
    return config.from_command_line(argv, __doc__)


def main(argv=None):
    try:
        cfg, resume = parse_args(sys.argv[1:] if argv is None else argv)
        if cfg.train.stage == "rl":      # IRA stage 3 is PPO, not this loop: rollouts, a judge, clipped updates
            rl.run(cfg, resume)
        else:
            train(cfg, resume)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
