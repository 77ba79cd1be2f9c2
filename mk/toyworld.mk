# Toy world: trains the embedded default models (toy SD pipeline, toy-sam, toy-evaluator)
# from scratch on CPU with fixed seeds, then ships them into services/atelier/embedded/.
# Checkpoints and latent pools live in .cache/toyworld (resumable; delete it to start over).
# Two stages for the SD pipeline and the evaluator: stage 1 trains from scratch in
# $(TOYWORLD_WORK); stage 2 fine-tunes those in $(TOYWORLD_FINAL) (the VAE learns the textures
# with its encoder unfrozen, then the UNet and the evaluator adapt to it). SAM trains once, in
# $(TOYWORLD_FINAL). Independent trainings are separate targets: `make -j3 toy-world` overlaps
# them, each process on TOYWORLD_THREADS threads.
TOYWORLD_WORK ?= .cache/toyworld
TOYWORLD_FINAL ?= $(TOYWORLD_WORK)/final
TOYWORLD_THREADS ?= 1
TOYWORLD_RUN = TOYWORLD_WORK=$(TOYWORLD_WORK) TOYWORLD_THREADS=$(TOYWORLD_THREADS) $(PY) -m
TOYWORLD_RUN_FINAL = TOYWORLD_WORK=$(TOYWORLD_FINAL) TOYWORLD_THREADS=$(TOYWORLD_THREADS) $(PY) -m

.PHONY: toy-world toy-world-quality

# Stage 1: from scratch.
$(TOYWORLD_WORK)/vae/config.json: $(VENV)/.installed
	$(TOYWORLD_RUN) atelier.toyworld.train_vae --steps 2600 --full-from 0.88 --freeze-encoder-at 800 \
		--decoder-steps 1500 --out $(TOYWORLD_WORK)/vae

$(TOYWORLD_WORK)/toy/model_index.json: $(TOYWORLD_WORK)/vae/config.json
	$(TOYWORLD_RUN) atelier.toyworld.train_sd --steps 3000 --more-steps 1200 --vae $(TOYWORLD_WORK)/vae \
		--out $(TOYWORLD_WORK)/toy

$(TOYWORLD_WORK)/toy-evaluator/config.json: $(TOYWORLD_WORK)/vae/config.json
	$(TOYWORLD_RUN) atelier.toyworld.train_evaluator --vae $(TOYWORLD_WORK)/vae-phase1 --steps 2000 \
		--out $(TOYWORLD_WORK)/toy-evaluator

# Stage 2: what ships.
$(TOYWORLD_FINAL)/vae/config.json: $(TOYWORLD_WORK)/toy/model_index.json
	$(TOYWORLD_RUN_FINAL) atelier.toyworld.train_vae --init $(TOYWORLD_WORK)/toy/vae --keep-scaling \
		--steps 500 --full-from 0 --lr 3e-4 --freeze-encoder-at 350 --decoder-steps 1500 \
		--decoder-lr 3e-4 --out $(TOYWORLD_FINAL)/vae

$(TOYWORLD_FINAL)/toy/model_index.json: $(TOYWORLD_FINAL)/vae/config.json
	$(TOYWORLD_RUN_FINAL) atelier.toyworld.train_sd --init $(TOYWORLD_WORK)/toy --steps 2000 \
		--lr 4e-4 --warmup 100 --vae $(TOYWORLD_FINAL)/vae --out $(TOYWORLD_FINAL)/toy

$(TOYWORLD_FINAL)/toy-evaluator/config.json: $(TOYWORLD_FINAL)/vae/config.json \
		$(TOYWORLD_WORK)/toy-evaluator/config.json
	$(TOYWORLD_RUN_FINAL) atelier.toyworld.train_evaluator --init $(TOYWORLD_WORK)/toy-evaluator \
		--vae $(TOYWORLD_FINAL)/vae --steps 600 --lr 5e-4 --out $(TOYWORLD_FINAL)/toy-evaluator

$(TOYWORLD_FINAL)/toy-sam/config.json: $(VENV)/.installed
	$(TOYWORLD_RUN_FINAL) atelier.toyworld.train_sam --steps 4000 --out $(TOYWORLD_FINAL)/toy-sam

toy-world: $(TOYWORLD_FINAL)/toy/model_index.json $(TOYWORLD_FINAL)/toy-sam/config.json \
		$(TOYWORLD_FINAL)/toy-evaluator/config.json
	TOYWORLD_WORK=$(TOYWORLD_FINAL) $(PY) -m atelier.toyworld.ship

# The quality test against the shipped models (also part of `make test`).
toy-world-quality: $(VENV)/.installed
	$(PY) -m pytest -q tests/toyworld
