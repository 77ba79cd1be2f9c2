# Toy world: trains the embedded default models (toy SD pipeline, toy-sam, toy-evaluator)
# from scratch on CPU with fixed seeds, then ships them into services/atelier/embedded/.
# Checkpoints and the latent pool live in .cache/toyworld (resumable; delete it to start over).
# Independent trainings are separate targets: `make -j3 toy-world` overlaps SAM with the VAE,
# and the UNet with the evaluator, each process on TOYWORLD_THREADS threads.
TOYWORLD_WORK ?= .cache/toyworld
TOYWORLD_THREADS ?= 1
TOYWORLD_RUN = TOYWORLD_WORK=$(TOYWORLD_WORK) TOYWORLD_THREADS=$(TOYWORLD_THREADS) $(PY) -m

.PHONY: toy-world toy-world-quality

$(TOYWORLD_WORK)/vae/config.json: $(VENV)/.installed
	$(TOYWORLD_RUN) atelier.toyworld.train_vae --steps 2600 --full-from 0.88 --freeze-encoder-at 800 \
		--decoder-steps 1500 --out $(TOYWORLD_WORK)/vae

$(TOYWORLD_WORK)/toy-sam/config.json: $(VENV)/.installed
	$(TOYWORLD_RUN) atelier.toyworld.train_sam --steps 6000 --out $(TOYWORLD_WORK)/toy-sam

$(TOYWORLD_WORK)/toy/model_index.json: $(TOYWORLD_WORK)/vae/config.json
	$(TOYWORLD_RUN) atelier.toyworld.train_sd --steps 3000 --more-steps 1200 --vae $(TOYWORLD_WORK)/vae \
		--out $(TOYWORLD_WORK)/toy

$(TOYWORLD_WORK)/toy-evaluator/config.json: $(TOYWORLD_WORK)/vae/config.json
	$(TOYWORLD_RUN) atelier.toyworld.train_evaluator --vae $(TOYWORLD_WORK)/vae-phase1 --steps 2000 \
		--out $(TOYWORLD_WORK)/toy-evaluator

toy-world: $(TOYWORLD_WORK)/toy/model_index.json $(TOYWORLD_WORK)/toy-sam/config.json \
		$(TOYWORLD_WORK)/toy-evaluator/config.json
	$(TOYWORLD_RUN) atelier.toyworld.ship

# The quality test against the shipped models (also part of `make test`).
toy-world-quality: $(VENV)/.installed
	$(PY) -m pytest -q tests/toyworld
