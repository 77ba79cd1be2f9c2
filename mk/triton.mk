# Triton Inference Server for the SAM image encoder (segmentation service, Triton backend).
#
# nvidia-pytriton 0.7.0 bundles tritonserver 2.51 with the Python backend, but needs numpy<2,
# so it lives in its own venv. torch (pinned, CPU build here) and transformers sit beside it
# for the Python-backend model in deploy/triton-repository/sam_image_encoder/1/model.py.
TRITON_VENV ?= .venv-triton
TRITON_PY := $(TRITON_VENV)/bin/python
TRITON_REPOSITORY ?= deploy/triton-repository

.PHONY: triton-venv triton-serve triton-clean

$(TRITON_VENV)/.installed: mk/triton.mk
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_PY) -m pip install -q --upgrade pip
	$(TRITON_PY) -m pip install -q torch==2.13.0
	$(TRITON_PY) -m pip install -q "nvidia-pytriton==0.7.0" "numpy<2" "transformers==5.23.0" "safetensors>=0.4"
	touch $@

triton-venv: $(TRITON_VENV)/.installed

# Runs tritonserver in the foreground on loopback ports (Ctrl-C / SIGTERM stops it cleanly).
# The encoder weights come from the segmentation service's registry entry "toy-sam".
triton-serve: $(TRITON_VENV)/.installed $(VENV)/.installed
	$(PY) -m atelier.segmentation.triton_launcher --triton-venv $(TRITON_VENV) \
		--model-repository $(TRITON_REPOSITORY) --grpc-port 8101 --http-port 8100 --metrics-port 8102

# The test target builds the Triton venv first so the Triton-path tests run instead of skipping.
test: $(TRITON_VENV)/.installed

triton-clean:
	rm -rf $(TRITON_VENV)
