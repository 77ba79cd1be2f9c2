# The analogue of SPDInv's Table 1 on the toy world (every inversion method x {P2P, MasaCtrl}):
# writes docs/benchmarks/inversion.md, its PNG plots and a JSON of every row.
# About 30 min wall on a shared 2-core machine at 25 steps (one thread); STEPS=10 for a quick look.
STEPS ?= 25

.PHONY: bench-inversion

bench-inversion: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) bench/bench_inversion_table.py --steps $(STEPS)
