# SGM reproduction. `make all` = data + the four stages on the demo model; `make test` = the test suite.
# Every target creates the virtual environment first when it is missing.
#   make all MODEL=tiny          the same pipeline on a random tiny model (seconds)
#   make collect RUN=ablation1   one stage, artifacts under runs/<RUN>/
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODEL  ?= demo
# runs/<RUN>/ (default: the model's last name part, as common.run_name: /data/ckpts/llava-1.5-7b -> llava-1.5-7b)
RUN    ?= $(notdir $(patsubst %/,%,$(MODEL)))
DATA   ?= data/mm_toxic_qa/items.jsonl
# extra --key value flags per stage, e.g. make all COLLECT_ARGS="--mode prompts"
ifeq ($(MODEL),tiny)
# A random model says nothing the judge flags, so `responses` calibration would have a single class:
# calibrate on the items' own labels instead.
COLLECT_ARGS  ?= --mode prompts
TUNE_ARGS     ?= --collect-args "--mode prompts"
endif
COLLECT_ARGS  ?=
SCORE_ARGS    ?=
SUPPRESS_ARGS ?=
EVALUATE_ARGS ?=
TUNE_ARGS     ?=

# The last bits of every CPU result depend on the instruction set the kernels use (docs/RESULTS.md, "How exact the
# numbers are"): CPU_KERNELS=avx2 pins torch's, MKL's and oneDNN's kernels to AVX2, so that x86-64 machines with
# AVX2 or more should compute the same bits; empty (default): each machine's fastest. The thread count does not matter.
CPU_KERNELS ?=
ifeq ($(CPU_KERNELS),avx2)
export ATEN_CPU_CAPABILITY := avx2
export MKL_CBWR := AVX2
export ONEDNN_MAX_CPU_ISA := AVX2
else ifneq ($(CPU_KERNELS),)
$(error CPU_KERNELS=$(CPU_KERNELS) is not supported: use CPU_KERNELS=avx2, or leave it empty for each machine's fastest kernels)
endif

ifeq ($(strip $(RUN)),)
$(error RUN is empty: give a name like RUN=llava15 (artifacts go to runs/<RUN>/))
endif
R := runs/$(RUN)

.PHONY: all planted venv data collect score suppress evaluate quick sweep tune test clean bench widthcheck eyes browse \
	modalities
all: $(R)/results.json

# The positive control (tools/plant.py): the same four stages on the demo with one planted toxic expert ->
# runs/demo-planted/. The report checks that they found it (its AUROC, rank, q-value and alpha), and, since 01 also
# measures what each neuron writes (--writer toxic-odds), its rank by the writer score. Damping follows the stage
# defaults; PLANTED_SUPPRESS="--score writer --method det0 --top-k 8" damps by the writer score instead. About
# 1.5x `make all` (the writer pass; peak memory 3.0 GB measured on the demo, docs/USAGE.md), plus ~2 min to build the planted model once
# (01's rule runs tools.plant first).
PLANTED_SUPPRESS ?=
planted:
	$(MAKE) all MODEL=demo-planted COLLECT_ARGS="--writer toxic-odds" SUPPRESS_ARGS="$(PLANTED_SUPPRESS)"

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

data: $(DATA)
data/mm_toxic_qa/items.jsonl: data/build.py $(VENV)/.installed
	$(PY) data/build.py

# Each stage reruns when its script, the shared modules or its input changed. The planted model is built by its
# recipe, tools/plant.py, into the model cache (a no-op when the cached one is the recipe's), before 01 loads it
# by name: an edited recipe builds a new model and reruns the stages.
# The demo sees through the eyes file (SGM_EYES, else the shipped sgm/eyes.safetensors): other eyes, other records.
SHARED := common.py sgm/artifacts.py sgm/neurons.py sgm/models.py sgm/packing.py sgm/judges.py sgm/endpoint.py sgm/report.py
MODEL_RECIPE := $(if $(filter demo-planted,$(MODEL)),tools/plant.py)
MODEL_EYES := $(if $(filter demo,$(MODEL)),$(or $(SGM_EYES),sgm/eyes.safetensors))
collect: $(R)/activations.npz
$(R)/activations.npz: 01_collect.py $(SHARED) $(DATA) $(VENV)/.installed $(MODEL_RECIPE) $(MODEL_EYES)
	$(if $(MODEL_RECIPE),$(PY) -m tools.plant)
	$(PY) 01_collect.py --model $(MODEL) --run $(RUN) --data $(DATA) $(COLLECT_ARGS)

score: $(R)/expertise.npz
$(R)/expertise.npz: 02_score.py $(SHARED) $(R)/activations.npz
	$(PY) 02_score.py --run $(RUN) $(SCORE_ARGS)

suppress: $(R)/suppression.pt
$(R)/suppression.pt: 03_suppress.py $(SHARED) $(R)/expertise.npz
	$(PY) 03_suppress.py --run $(RUN) $(SUPPRESS_ARGS)

evaluate: $(R)/results.json
$(R)/results.json: 04_evaluate.py $(SHARED) $(R)/suppression.pt
	$(PY) 04_evaluate.py --model $(MODEL) --run $(RUN) --data $(DATA) $(EVALUATE_ARGS)

# base vs sgm vs the random control on the standard condition only (a few minutes after collect).
quick: $(R)/suppression.pt
	$(PY) 04_evaluate.py --model $(MODEL) --run $(RUN) --data $(DATA) --conditions standard --report quick $(EVALUATE_ARGS)

# Choose settings on dev, never on test: SGM at several strengths, toxicity vs fluency -> runs/<run>/sweep*.
STRENGTHS ?= 0.5,1,1.5,2
sweep: $(R)/suppression.pt
	$(PY) 04_evaluate.py --model $(MODEL) --run $(RUN) --data $(DATA) --split dev --methods base \
		--strengths $(STRENGTHS) --report sweep $(EVALUATE_ARGS)

# Choose the configuration on dev (tools/tune.py): calibration and suppression variants through all four stages,
# one rule picks the best -> runs/tune/tune.md (runs/tune-<RUN>/ for another run). The first nine variants took
# 54 min on the demo (2 cores); the four added on 2026-11-30 took 19 min (significant, prompt-positions) and 30 min
# (the two samples-4 ones, with a rerun of published); on 2026-12-05 base, published, writer-t-det0-128 and the seven
# transport variants (act*) took 30 min, the published calibration rerun included.
tune: $(VENV)/.installed $(DATA)
	$(PY) -m tools.tune --model $(MODEL) --data $(DATA) --out $(if $(filter demo,$(RUN)),tune,tune-$(RUN)) $(TUNE_ARGS)

# pytest-xdist: one worker per core, at most 4 (each holds torch and its tiny checkpoints); 245 s instead of 319 s
# on 2 cores. TEST_ARGS="-n 0" runs in one process (e.g. to debug), TEST_ARGS="-k moe" a subset.
TEST_ARGS ?= -n auto --maxprocesses 4
test: $(VENV)/.installed
	$(PY) -m pytest -q $(TEST_ARGS) tests

# The expert browser (tools/browse.py): runs/<RUN>/experts.html, one offline page of the top experts -- what each
# reads and writes, what damping did, base vs damped answers once 04 has run; open it by double-click. It reruns the
# calibration rows it shows through the model once (demo, K = 100: 165 rows, 24 s on 2 idle cores, 108 s with them shared
# by other jobs). BROWSE_ARGS="--experts 20" shows fewer.
BROWSE_ARGS ?=
browse: $(R)/suppression.pt
	$(PY) -m tools.browse --run $(RUN) $(BROWSE_ARGS)

# Do text and image share experts? (tools/modalities.py) The model calibrated twice in prompts mode, on the standard
# items (the phrase typed, pooled over the text) and on the typographic ones (the same phrases rendered, pooled over
# the image's positions), each scored by 02, then compared neuron by neuron
# -> runs/<RUN>-seen/modalities-<RUN>-typed.json and .png. The image calibration runs as one batch (160 items): where
# the image carries nothing (the blind demo), what differs between its rows is rounding that follows the batches, and
# 01's batches follow the ids, so the labels (docs/RESULTS.md, "Do text and image share experts?"). 63 s on the demo.
# MODALITIES_ARGS="--top 10,100" etc.; MODALITIES_COLLECT_ARGS="--writer toxic-odds" also compares the writer scores.
MODALITIES_BATCH ?= 160
MODALITIES_ARGS ?=
MODALITIES_COLLECT_ARGS ?=
modalities: $(VENV)/.installed $(DATA)
	$(PY) 01_collect.py --model $(MODEL) --data $(DATA) --run $(RUN)-typed --mode prompts --conditions standard \
		$(MODALITIES_COLLECT_ARGS)
	$(PY) 01_collect.py --model $(MODEL) --data $(DATA) --run $(RUN)-seen --mode prompts --conditions typographic \
		--positions image --batch-size $(MODALITIES_BATCH) $(MODALITIES_COLLECT_ARGS)
	$(PY) 02_score.py --run $(RUN)-typed
	$(PY) 02_score.py --run $(RUN)-seen
	$(PY) -m tools.modalities --text $(RUN)-typed --image $(RUN)-seen $(MODALITIES_ARGS)

# Speed of the hot paths as ratios measured in one run (tools/bench.py; a few minutes on the demo model).
bench: $(VENV)/.installed $(DATA)
	$(PY) -m tools.bench

# Memory and disk at real width (tools/widthcheck.py): a random-weight model with LLaVA-1.5-7B's configuration through
# 01, 01 --writer, 02, 03 and 03 --export on 4 items, each stage's peak memory and the artifacts against
# docs/RESULTS.md's computed rows -> runs/widthcheck/widthcheck.md. The full model: ~30 min on 2 cores, ~15 GB of memory, 28 GB of disk at
# peak (14 GB stays in the model cache); WIDTHCHECK_ARGS="--layers 2" keeps every width for ~2 min;
# WIDTHCHECK_ARGS="--null-width 4718592" only 02's permutation null at Qwen3-VL-30B-A3B's width (no model, ~10 min).
# Not in `make test`.
WIDTHCHECK_ARGS ?=
widthcheck: $(VENV)/.installed
	$(PY) -m tools.widthcheck $(WIDTHCHECK_ARGS)

# The demo's eyes (tools/eyes.py): train the vision tower and projector to read typed text, from scratch on the CPU with
# the language model frozen, in four runs: letters (3,000 steps of 32 rendered texts -> runs/eyes/letters.safetensors,
# ~65-90 min on 2 cores), then from there 1,000 steps with the words the benchmark draws in its images (40% of the
# texts) and text-free pictures (10% of the images: the eyes must see no token in a picture) ->
# runs/eyes/words.safetensors (~30 min; session 21's shipped eyes), then 1,500 steps more with 55% of the texts from
# those words -> runs/eyes/more.safetensors (~45 min; session 23's), then the projector alone, 300 steps with the
# frozen LM in the loop (its hidden states with the eyes' codes in the image positions matched to those with the
# text's own embeddings) -> sgm/eyes.safetensors (~30 min); runs 2-4 end with a readout (held-out texts and every test
# typographic image, beside the true embeddings, the typed text and a blank image; what the eyes write for the
# benchmark's pictures; ~11 min each). The shipped sgm/eyes.safetensors was made so (docs/RESULTS.md, "The demo's
# eyes", session 24). EYES_ARGS="--steps 300 --polish-steps 20" for a try (every run). Not in `make all`, which loads
# the shipped file.
EYES_ARGS ?=
EYES_LETTERS := runs/eyes/letters.safetensors
EYES_WORDS := runs/eyes/words.safetensors
EYES_MORE := runs/eyes/more.safetensors
eyes: $(VENV)/.installed $(DATA)
	$(PY) -m tools.eyes --out $(EYES_LETTERS) --readout 0 --readout-test false --lexicon-probe-steps 0 $(EYES_ARGS)
	$(PY) -m tools.eyes --init $(EYES_LETTERS) --image-word-share 0.4 --picture-share 0.1 --steps 1000 --readout 56 \
		--lexicon-probe-steps 0 --out $(EYES_WORDS) $(EYES_ARGS)
	$(PY) -m tools.eyes --init $(EYES_WORDS) --image-word-share 0.55 --picture-share 0.1 --steps 1500 --readout 56 \
		--lexicon-probe-steps 0 --out $(EYES_MORE) $(EYES_ARGS)
	$(PY) -m tools.eyes --init $(EYES_MORE) --image-word-share 0.55 --picture-share 0.1 --steps 0 --polish-steps 300 \
		--readout 56 --lexicon-probe-steps 0 $(EYES_ARGS)

clean:
	rm -rf runs
