"""
Every knob of the project, as plain dataclasses.

How to use it:
    from config import get_config
    cfg = get_config("base", ["--train.lr=3e-4", "--lora.r=16"])   # a preset, then command-line overrides
    python train.py --preset=tiny --train.max_steps=50              # the same from the shell

Reading guide:
  - Each section is a dataclass; every field has a default and a comment saying what it means,
    which values it takes and in what units.
  - PRESETS holds the named starting points: `tiny` (random weights, for tests and CPU smoke runs),
    `base` (real whisper-base + SmolLM2-135M-Instruct, the default that trains on a laptop), `seed`
    (whisper-small + Sarvam-2B with LoRA r=16, the original Indic recipe).
  - Overrides are `--section.key=value`. The value is parsed with `ast.literal_eval` (so `3e-4`,
    `True`, `("q_proj", "v_proj")` work; a bare word such as `cpu` is taken as a string), checked
    against the type of the default, and an unknown key is refused with the closest valid names.
  - The architecture (widths, depths, vocab) is NOT here: it is read from each checkpoint's
    config.json. The config chooses *which* checkpoint and *how* to train and run it.

Simplified on purpose: no YAML, no inheritance between presets beyond "start from the defaults,
then change a few fields", no environment-variable magic.
"""
import ast
import difflib
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch


@dataclass
class ModelConfig:
    # Checkpoints: a local directory, a Hugging Face hub id, or `tiny:whisper` / `tiny:llama`
    # (a small random checkpoint the code writes itself; see weights.resolve_checkpoint).
    encoder: str = "openai/whisper-base"                # Whisper checkpoint; only its encoder is used
    llm: str = "HuggingFaceTB/SmolLM2-135M-Instruct"    # Llama-family checkpoint (config.json + safetensors)
    pad_audio_to_30s: bool = False   # True: Whisper's way (every clip padded to 30 s = 1500 encoder frames);
                                     # False: Ultravox's way (encode only the real audio; several times cheaper)
    attention: str = "sdpa"          # "sdpa" (fused F.scaled_dot_product_attention) | "manual" (readable path)
    decode: str = "auto"             # generate(): "loop" (readable) | "cuda_graph" | "compiled_graph"; "auto":
                                     # cuda_graph on a CUDA GPU, loop elsewhere (see model.CUDAGraphDecoder)
    activation_checkpointing: bool = False   # recompute each LLM block in backward: less memory, ~30% slower


@dataclass
class ProjectorConfig:
    kind: str = "stack_swiglu"   # "mlp" (Linear-GELU-Linear, the original recipe) | "stack_swiglu" (Ultravox)
    stack: int = 8               # consecutive encoder frames concatenated into one LLM position (50/s -> 6.25/s)
    hidden: int = 1024           # width of the projector's hidden layer


@dataclass
class LoRAConfig:
    r: int = 8                          # rank of the update B @ A; 0 turns LoRA off (LLM fully frozen)
    alpha: float = 16.0                 # the update is scaled by alpha / r
    dropout: float = 0.0                # dropout on the LoRA branch's input
    targets: tuple = ("q_proj", "v_proj")   # names of the LLM's Linear layers that get an adapter


@dataclass
class SystemConfig:
    device: str = "auto"         # "auto" | "cuda" | "mps" | "cpu"; auto picks cuda > mps > cpu and says why
    precision: str = "fp32"      # "fp32" | "fp16" | "bf16" | "int8" (int8 = weight-only int8 frozen base,
                                 # LoRA/projector in fp32: the laptop mode)
    compile: bool = False        # torch.compile each transformer block (model.compile_blocks): GPU speed,
                                 # the first steps are slow while they compile
    tf32: bool = True            # CUDA: fp32 matmuls (projector, LoRA) use TF32 tensor cores (fp32 range and
                                 # accumulation, 10-bit mantissa inputs); False = full fp32 ("highest")
    seed: int = 1337             # seeds torch, numpy and python's random
    threads: int = 0             # CPU threads for torch; 0 = torch's default (under torchrun: cores / ranks)
    prefetch: int = 2            # micro-batches made ahead in a background thread while the model computes
                                 # (train.Prefetcher); 0 = make each one inline, when it is needed


@dataclass
class DataConfig:
    corpus: str = "corpus"       # folder with train.jsonl / test.jsonl (made by `python corpus.py`)
    more_train: tuple = ()       # more corpus folders whose train.jsonl joins corpus's (README: stage 2)
    n_train: int = 2400          # utterances the synthetic corpus makes for training
    n_test: int = 300            # utterances for the held-out-voice test split
    max_seconds: float = 30.0    # longer audio is refused (the encoder sees at most 30 s)
    cache_encoder: bool = True   # cache frozen-encoder outputs on disk so epochs after the first skip Whisper
    mix: tuple = (("transcribe", 0.3), ("continue", 0.2), ("instruct", 0.5))   # stage 2's (task, weight)
                                 # pairs, sampled by weight; stage 1 (asr) uses transcribe rows only


@dataclass
class TrainConfig:
    stage: str = "asr"           # "asr" (stage 1: audio -> transcript) | "instruct" (stage 2: answer speech)
    out_dir: str = "out"         # checkpoints, log.jsonl and the loss-curve picture go here
    init_from: str = ""          # stage 2: a stage-1 checkpoint folder to start from ("" = from scratch)
    batch_size: int = 8          # examples per micro-batch
    grad_accum: int = 1          # micro-batches per optimizer step (effective batch = batch_size * grad_accum)
    max_steps: int = 500         # optimizer steps (base preset: ~300 steps until it reads audio, ~15% WER at 400)
    lr: float = 2e-3             # peak learning rate (projector and LoRA)
    min_lr: float = 1e-4         # learning rate at the end of the cosine decay
    warmup_steps: int = 30       # linear warmup from 0 to lr
    weight_decay: float = 0.01   # AdamW decoupled weight decay (applied to matrices only)
    grad_clip: float = 1.0       # clip the global gradient norm to this; 0 = off
    eval_every: int = 0          # steps between evaluations (loss + WER on the test split); 0 = only at the end
    eval_samples: int = 300      # test utterances decoded for WER (and answers) at each evaluation
    save_every: int = 200        # steps between checkpoints
    log_every: int = 10          # steps between log lines


@dataclass
class SpeechLMConfig:
    # IRA stage 1: a SpeechLM over EnCodec codes (speechlm.py). Fields may grow with the IRA code.
    d_model: int = 512           # transformer width (the seed's size)
    n_layers: int = 8            # transformer blocks
    n_heads: int = 8             # attention heads
    bandwidth: float = 1.5       # EnCodec kbps: 1.5 / 3 / 6 / 12 / 24 -> 2 / 4 / 8 / 16 / 32 codebooks
    codec: str = ""              # folder with EnCodec 24 kHz weights ("" = the package's download, else untrained)
    max_seconds: float = 10.0    # longest audio the SpeechLM generates or trains on
    ffn_dim: int = 1536          # SwiGLU hidden width of each block (~8/3 * d_model, as Llama)
    voice_dim: int = 256         # VoiceEncoder width = size of the shared description/audio space
    voice_layers: int = 2        # transformer blocks in each VoiceEncoder tower (text, audio)
    voice_weight: float = 0.1    # weight of the VoiceEncoder's InfoNCE loss in the stage-1 loss. Its weights are
                                 # its own and AdamW ignores a loss's scale, so this only sets its share of the
                                 # clipped gradient norm: at 1.0 it took most of it and the SpeechLM learned
                                 # slower (code loss 4.45-4.73 against 4.27-4.34 at 0.1; README)
    voice_lr: float = 7e-4       # the VoiceEncoder's peak learning rate (train.lr's warm-up and decay, scaled):
                                 # lower than the SpeechLM's (300 voice-only steps of 256 log-mel clips, README)
    voice_batch_size: int = 64   # clips per contrastive batch (more negatives than one micro-batch)
    voice_audio: str = "codes"   # what the VoiceEncoder's audio tower hears: "codes" (EnCodec) | "mel" (80-bin
                                 # log-mel, made once beside the manifest); speaking uses its text tower only
    voice_only: bool = False     # stage 1 trains only the VoiceEncoder (no SpeechLM loss): quick voice tuning
    uncond_prob: float = 0.1     # chance a training example drops its voice and text (audio-only modelling)
    whisper_weight: float = 8.0  # weight of the hearing loss: the audio-only states of block whisper_layer
                                 # predict the frozen Whisper encoder's (model.encoder) output for the same
                                 # clip, so that the adapter reads states that hear; 0 = off (README: 2, 8, 32)
    whisper_layer: int = 4       # the block that learns to hear (the adapter reads it: adapter.speechlm_layer)
    whisper_lag: int = 25        # codec frames (75/s) a causal state may hear past the Whisper frame it predicts
                                 # (25 = 1/3 s; 10 measured a little worse)
    eval_generate: int = 2       # held-out texts spoken at each evaluation (length check); 0 = none


@dataclass
class AdapterConfig:
    # IRA stage 2: Perceiver adapter from SpeechLM states to N LLM embeddings (adapter.py).
    n_latents: int = 32          # N: how many LLM embeddings any audio becomes
    n_layers: int = 2            # blocks after the first cross-attention: latents attend to [audio ; latents]
    distill_weight: float = 0.2  # weight of the KL(teacher-with-transcript || student-with-adapter) term;
                                 # on one H100, 0.2 beat 1.0 at each of three budgets, and 0 at one (README)
    ctc_steps: int = 0           # first steps train on CTC of the vectors against the transcript's token
                                 # embeddings alone, with no LLM pass (adapter.ctc_token_loss)
    ctc_vocab: str = "all"       # the tokens the warm-up spells with: "all" (the LLM's 49,152) | "train" (those
                                 # of the training transcripts and the blank: a cheaper softmax on a CPU)
    cache_states: bool = True    # compute the frozen SpeechLM's states of the training clips once, kept in
                                 # memory (fp16, ~0.2 MB a clip: 1.9 GB for 10,000), instead of in every step
    d_model: int = 512           # width of the latents inside the adapter
    n_heads: int = 8             # attention heads of the adapter's cross-attention blocks
    speechlm_layer: int = 4      # the adapter reads the output of this SpeechLM block (1..n_layers)
    speechlm_checkpoint: str = "out/speechlm"   # stage-1 output folder (train.py's out_dir of --stage=speechlm)
    prompt: str = "Transcribe the audio."       # the instruction after the adapter vectors
    eval_generate: int = 4       # held-out texts spoken by the SpeechLM and transcribed through the adapter


@dataclass
class RLConfig:
    # IRA stage 3: PPO in which the LLM judges the SpeechLM's speech (rl.py). The policy starts from the
    # stage-1 SpeechLM that stage 2 was trained on (adapter.speechlm_checkpoint); the judge: adapter + LLM.
    align_checkpoint: str = "out/align"   # stage-2 output folder (train.py --stage=align): the judge
    iterations: int = 20          # rounds of rollout -> score -> PPO update (base: ~1 min of CPU each)
    prompts_per_iteration: int = 4    # distinct prompts (text + voice description) per rollout batch; on a
                                  # GPU, 8 x 8 samples with epochs 4 and minibatch 16 (LoRA r=8) raised the
                                  # held-out reward on 6 of 6 runs, where 4 x 4 did not; on a 2-core
                                  # CPU an iteration of 8 x 8 took 6.5 min in fp32, ~61 s with
                                  # --system.precision=bf16 (README, stage 3)
    samples_per_prompt: int = 4   # rollouts per prompt; each one's baseline is the others' mean score
    max_seconds: float = 4.0      # longest speech a rollout may say (END is forced there)
    temperature: float = 1.0      # the policy is softmax(logits / temperature), in rollouts and in ratios
    epochs: int = 2               # PPO passes over each iteration's rollouts
    minibatch_size: int = 8       # rollouts per gradient step
    lr: float = 5e-5              # Adam learning rate, constant (SpeechLM blocks, code embeddings, heads);
                                  # 1e-4 let the held-out KL reach 0.2-0.25 in 20 iterations
    lora_r: int = 0               # > 0: train rank-r LoRA updates of every block's projections (+ the value
                                  # head) instead of the whole trunk; 0 = the whole trunk trains. Measured on
                                  # a GPU: r=8 with lr 3e-4 spent the KL budget several times more slowly
    lora_alpha: float = 16.0      # LoRA scale: the update is B A x (alpha / r), as lora.py
    grad_clip: float = 1.0        # clip the global gradient norm of each step to this; 0 = off
    gamma: float = 1.0            # discount per column; 1: the judge's score counts fully at the first column
    gae_lambda: float = 1.0       # GAE: 0 = one-step TD (low variance, biased) .. 1 = Monte Carlo returns;
                                  # 1 here: a score given at the END reaches a column 250 steps earlier
                                  # as lambda^250 of it (0.95^250 = 3e-6: only the last ~0.3 s would learn)
    clip: float = 0.2             # PPO ratio clip: a step's probability may move to (1 +- clip) x rollout's
    value_clip: float = 0.2       # values may move this far from the rollout's per update; 0 = no clipping
    value_coef: float = 0.5       # weight of the value loss (actor and critic share the trunk)
    entropy_coef: float = 0.0     # weight of the entropy bonus (entropy in nats per column)
    kl_coef: float = 10.0         # beta: an utterance's reward -= beta x its mean (log pi - log pi_ref) per
                                  # column; the score is in units of its batch std, so at KL 0.1 the penalty
                                  # is one std
    adaptive_kl: bool = False     # move beta toward kl_target after each iteration (Ziegler et al. 2019); off:
                                  # while KL < target early on it shrank beta, and KL overshot later
    kl_target: float = 0.1        # nats per column: the KL to the reference the controller aims at, and
                                  # the bound the held-out KL is reported against
    kl_horizon: int = 64          # rollouts: the controller's time constant (beta moves <= 20% per horizon)
    target_approx_kl: float = 0.05    # stop an iteration's epochs once approx-KL(old || new) exceeds this
    kl_stop: float = 0.08         # the KL brake: no PPO update in an iteration whose rollouts' KL to the
                                  # reference is above this (nats per column); under kl_target because one
                                  # update moved it by up to 0.02 on the base preset; 0 = off
    voice_weight: float = 0.0     # reward += this x cosine(VoiceEncoder(speech), VoiceEncoder(description))
    eval_prompts: int = 32        # held-out (test.jsonl) prompts judged before RL, every eval_every, after
    eval_samples: int = 1         # samples per held-out prompt, averaged: two draws for one prompt differ
                                  # by ~1.5 nats/token (sd), so a 32-prompt mean change is +- ~0.3 by chance
    eval_every: int = 0           # iterations between held-out evaluations; 0 = only before and after
    save_every: int = 4           # iterations between checkpoints (and always after the last)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    speechlm: SpeechLMConfig = field(default_factory=SpeechLMConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def to_dict(self):
        return asdict(self)


# -----------------------------------------------------------------------------
# Presets: each is "the defaults, with these fields changed".

PRESETS = {
    # Random weights, ~0.3M parameters each side: seconds per step on a CPU. For tests and smoke runs.
    "tiny": dict(
        model=dict(encoder="tiny:whisper", llm="tiny:llama"),
        projector=dict(kind="mlp", stack=2, hidden=64),
        lora=dict(r=4, alpha=8.0),
        data=dict(n_train=16, n_test=8),
        train=dict(batch_size=4, max_steps=30, lr=1e-2, warmup_steps=3, eval_every=0,
                   eval_samples=4, save_every=1000, log_every=5),
        speechlm=dict(d_model=64, n_layers=2, n_heads=4, ffn_dim=128, voice_dim=32, voice_layers=1,
                      voice_batch_size=8, max_seconds=4.0, eval_generate=1, whisper_layer=1,
                      whisper_weight=0.0),   # tests' corpora are codes only; the hearing loss has its own test
        adapter=dict(n_latents=8, n_layers=1, d_model=64, n_heads=4, speechlm_layer=1, eval_generate=1),
        rl=dict(iterations=2, prompts_per_iteration=2, samples_per_prompt=2, max_seconds=0.2, minibatch_size=2,
                lr=1e-3, eval_prompts=2),
    ),
    # Real whisper-base + SmolLM2-135M-Instruct: the default, trains on a laptop CPU.
    "base": dict(),
    # The original recipe: whisper-small + Sarvam-2B (Indic), frame-stack-4 Linear-GELU-Linear projector,
    # LoRA r=16 on the attention projections, bf16 on a GPU.
    "seed": dict(
        model=dict(encoder="openai/whisper-small", llm="sarvamai/sarvam-2b-v0.5"),
        projector=dict(kind="mlp", stack=4, hidden=2048),
        lora=dict(r=16, alpha=32.0, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
        system=dict(precision="bf16"),
        train=dict(lr=1e-4, min_lr=1e-5, batch_size=8),
    ),
    # IRA (speechlm.py, adapter.py) at full size: the adapter speaks to SmolLM2-1.7B, bf16 on a GPU.
    "ira": dict(
        model=dict(llm="HuggingFaceTB/SmolLM2-1.7B"),
        system=dict(precision="bf16"),
    ),
}


class ConfigError(ValueError):
    """A user mistake in a preset name or an override: one line that says what to fix."""


def _closest(word, choices):
    near = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    return f" (did you mean {', '.join(near)}?)" if near else f" (valid: {', '.join(choices)})"


def _parse_value(text, default, arg):
    # literal_eval turns "3e-4" into a float, "True" into a bool, "('a', 'b')" into a tuple; anything it
    # cannot parse (a bare word like cpu) is kept as the string itself.
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = text
    if isinstance(default, str) and not isinstance(value, str):
        value = text           # "--model.llm=123" names a folder called 123, not a number
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{arg!r}: expected True or False")
    elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)   # "--train.lr=1" means 1.0
    elif isinstance(default, tuple) and isinstance(value, (list, str)):
        value = tuple(value) if isinstance(value, list) else (value,)
    if type(value) is not type(default):
        raise ConfigError(f"{arg!r}: expected {type(default).__name__}, got {type(value).__name__}")
    return value


def apply_overrides(cfg, overrides):
    """Apply `--section.key=value` strings to a Config, in order. Returns a new Config."""
    sections = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    for arg in overrides:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"{arg!r}: overrides look like --section.key=value (e.g. --train.lr=3e-4)")
        key, text = arg[2:].split("=", 1)
        section_name, _, name = key.partition(".")
        if section_name not in sections:
            raise ConfigError(f"{arg!r}: unknown section {section_name!r}" + _closest(section_name, list(sections)))
        section = sections[section_name]
        names = [f.name for f in fields(section)]
        if name not in names:
            valid = [f"{section_name}.{n}" for n in names]
            raise ConfigError(f"{arg!r}: unknown key" + _closest(key, valid))
        value = _parse_value(text, getattr(section, name), arg)
        sections[section_name] = replace(section, **{name: value})
    return Config(**sections)


def get_config(preset="base", overrides=()):
    """The named preset with the overrides applied on top."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}" + _closest(preset, list(PRESETS)))
    preset_args = [f"--{section}.{key}={value!r}"
                   for section, values in PRESETS[preset].items() for key, value in values.items()]
    return apply_overrides(Config(), preset_args + list(overrides))


def from_command_line(argv, usage, stage=None):
    """A script's arguments -> (Config, resume): `--preset=NAME`, `--stage=NAME` (short for --train.stage),
    `--resume`, `-h` (prints `usage`) and `--section.key=value` overrides. `stage` is the script's own stage,
    if it has one. Output goes to <out_dir>/<stage> (out/asr, out/rl, ...) unless --train.out_dir is given."""
    preset, resume, overrides = "base", False, [] if stage is None else [f"--train.stage={stage}"]
    for arg in argv:
        if arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
        elif arg.startswith("--stage="):
            overrides.append("--train.stage=" + arg.split("=", 1)[1])
        elif arg == "--resume":
            resume = True
        elif arg in ("-h", "--help"):
            print(usage)
            sys.exit(0)
        else:
            overrides.append(arg)
    cfg = get_config(preset, overrides)
    if not any(a.startswith("--train.out_dir=") for a in overrides):
        cfg.train.out_dir = str(Path(cfg.train.out_dir) / cfg.train.stage)
    return cfg, resume


# -----------------------------------------------------------------------------
# Device and precision: decided once, with the reason printed.

def choose_device(request="auto", log=print):
    """Turn "auto|cuda|mps|cpu" into a torch.device, saying why."""
    has_cuda = torch.cuda.is_available()
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if request == "auto":
        if has_cuda:
            log(f"device: cuda ({torch.cuda.get_device_name(0)} found)")
            return torch.device("cuda")
        if has_mps:
            log("device: mps (Apple GPU found, no CUDA)")
            return torch.device("mps")
        log("device: cpu (no CUDA or Apple GPU found)")
        return torch.device("cpu")
    if request == "cuda" and not has_cuda:
        raise ConfigError("--system.device=cuda but torch sees no CUDA GPU; use --system.device=auto or cpu")
    if request == "mps" and not has_mps:
        raise ConfigError("--system.device=mps but no Apple GPU is available; use --system.device=auto or cpu")
    if request not in ("cuda", "mps", "cpu"):
        raise ConfigError(f"--system.device={request}: choose auto, cuda, mps or cpu")
    log(f"device: {request} (asked for)")
    return torch.device(request)


def choose_precision(request, device, log=print):
    """Return (weight_dtype, use_int8) for the frozen parts; say so when a request cannot be honoured.

    Trainable parts (projector, LoRA) always keep fp32 master weights on CPU; on a GPU they follow the
    chosen 16-bit dtype, and the optimizer is the only place that needs fp32 (see train.py).
    """
    if request not in ("fp32", "fp16", "bf16", "int8"):
        raise ConfigError(f"--system.precision={request}: choose fp32, fp16, bf16 or int8")
    if request == "fp16" and device.type == "cpu":
        log("precision: fp32 (fp16 matmuls are not supported well on CPU; use bf16 or int8 to save memory)")
        return torch.float32, False
    if request == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log("precision: fp16 (this GPU has no bf16 support)")
        return torch.float16, False
    if request == "int8":
        log("precision: int8 weight-only frozen base, compute in fp32 (LoRA and projector train in fp32)")
        return torch.float32, True
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[request]
    log(f"precision: {request}")
    return dtype, False
