# The analogue of SPDInv's Table 1 on the toy world (every inversion method x {P2P, MasaCtrl}):
# writes docs/benchmarks/inversion.md, its PNG plots and a JSON of every row. 10 DDIM steps (the
# published numbers; SPDInv and NTI dominate: ~1 CPU-minute per source scene, 12 scenes), split
# into 3 processes by source scene and merged. STEPS=25 for the longer run.
STEPS ?= 10
SHARDS ?= 3

.PHONY: bench-inversion

bench-inversion: $(VENV)/.installed
	for i in $$(seq 0 $$(($(SHARDS) - 1))); do \
	  OMP_NUM_THREADS=1 $(PY) bench/bench_inversion_table.py --steps $(STEPS) --shard $$i/$(SHARDS) & \
	done; wait
	$(PY) bench/bench_inversion_table.py --steps $(STEPS) --merge $(SHARDS)
