# Synthesis: the tiny IP-Adapter shipped with the embedded `toy` model (DCA's image path).
# About 4.5 CPU-minutes (500 steps, one thread); writes services/atelier/embedded/toy/ip_adapter/.
.PHONY: toy-ip-adapter
toy-ip-adapter: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m atelier.synthesis.train_ip_adapter --steps 500 \
		--out services/atelier/embedded/toy
