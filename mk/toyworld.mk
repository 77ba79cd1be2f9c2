# Toy world: trains the embedded default models (toy SD pipeline, toy-sam, toy-evaluator)
# from scratch on CPU with fixed seeds, then ships them into services/atelier/embedded/.
# Checkpoints and latent pools live in $(TOYWORLD_WORK) (resumable; delete it to start over).
# Independent trainings are separate targets that `make toy-world` overlaps (TOYWORLD_JOBS
# processes, each on TOYWORLD_THREADS threads). The critical path is VAE (until its encoder freezes) -> UNet:
# the VAE stops at the freeze, the UNet trains on the frozen encoder's latents while the VAE
# goes on with its decoder, and the pipeline is exported again with the final decoder.
TOYWORLD_WORK ?= .cache/toyworld
TOYWORLD_THREADS ?= 1
TOYWORLD_JOBS ?= 3
TOYWORLD_RUN = TOYWORLD_WORK=$(TOYWORLD_WORK) TOYWORLD_THREADS=$(TOYWORLD_THREADS) $(PY) -m
# SAM and the evaluator are off the critical path: niced, they take the CPU the VAE and the UNet
# leave (three processes on two cores otherwise slow the UNet by a third).
TOYWORLD_RUN_BESIDE = TOYWORLD_WORK=$(TOYWORLD_WORK) TOYWORLD_THREADS=$(TOYWORLD_THREADS) nice -n 10 $(PY) -m
TOYWORLD_VAE = atelier.toyworld.train_vae --steps 2000 --full-from 0.7 --freeze-encoder-at 1500 \
	--decoder-steps 1200 --out $(TOYWORLD_WORK)/vae
TOYWORLD_SD = atelier.toyworld.train_sd --steps 3000 --more-steps 1200
# A warm restart of the UNet's second cycle: the same run resumed with that cycle stretched to
# 2200 steps (lr back up to 1.7e-4, decaying again over 1000 more steps). Two-object prompts
# 67 -> 77% all right, one-object shape 95 -> 99%; it ends before SAM does, so the whole
# training takes no longer.
TOYWORLD_SD_RESTART = atelier.toyworld.train_sd --steps 3000 --more-steps 2200

.PHONY: toy-world toy-world-models toy-world-quality
# A recipe that fails or is interrupted after its first command wrote the target (toy-draft's
# two train_sd runs) must not leave it looking done: the next run resumes from the checkpoint.
.DELETE_ON_ERROR:

$(TOYWORLD_WORK)/vae-encoder/config.json: $(VENV)/.installed
	$(TOYWORLD_RUN) $(TOYWORLD_VAE) --stop-at-freeze

$(TOYWORLD_WORK)/vae/config.json: $(TOYWORLD_WORK)/vae-encoder/config.json
	$(TOYWORLD_RUN) $(TOYWORLD_VAE)

# The UNet and text encoder, exported first with the encoder snapshot's decoder ...
$(TOYWORLD_WORK)/toy-draft/model_index.json: $(TOYWORLD_WORK)/vae-encoder/config.json
	$(TOYWORLD_RUN) $(TOYWORLD_SD) --vae $(TOYWORLD_WORK)/vae-encoder --out $(TOYWORLD_WORK)/toy-draft
	$(TOYWORLD_RUN) $(TOYWORLD_SD_RESTART) --vae $(TOYWORLD_WORK)/vae-encoder --out $(TOYWORLD_WORK)/toy-draft

# ... then with the final one (same encoder, same scaling_factor).
$(TOYWORLD_WORK)/toy/model_index.json: $(TOYWORLD_WORK)/toy-draft/model_index.json \
		$(TOYWORLD_WORK)/vae/config.json
	$(TOYWORLD_RUN) $(TOYWORLD_SD_RESTART) --export-only --vae $(TOYWORLD_WORK)/vae --out $(TOYWORLD_WORK)/toy

# Round trips through the VAE as it was when its first cycle ended (train_vae saves vae-phase1).
$(TOYWORLD_WORK)/toy-evaluator/config.json: $(TOYWORLD_WORK)/vae/config.json
	$(TOYWORLD_RUN_BESIDE) atelier.toyworld.train_evaluator --vae $(TOYWORLD_WORK)/vae-phase1 --steps 2000 \
		--out $(TOYWORLD_WORK)/toy-evaluator

$(TOYWORLD_WORK)/toy-sam/config.json: $(VENV)/.installed
	$(TOYWORLD_RUN_BESIDE) atelier.toyworld.train_sam --steps 4000 --out $(TOYWORLD_WORK)/toy-sam

toy-world-models: $(TOYWORLD_WORK)/toy/model_index.json $(TOYWORLD_WORK)/toy-sam/config.json \
		$(TOYWORLD_WORK)/toy-evaluator/config.json

toy-world: $(VENV)/.installed
	$(MAKE) -j$(TOYWORLD_JOBS) toy-world-models
	TOYWORLD_WORK=$(TOYWORLD_WORK) $(PY) -m atelier.toyworld.ship

# The quality test against the shipped models (also part of `make test`).
toy-world-quality: $(VENV)/.installed
	$(PY) -m pytest -q tests/toyworld
