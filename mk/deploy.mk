# Deployment artefacts derived from their sources (tests/deploy checks they are in sync).
.PHONY: k8s-rules

k8s-rules: $(VENV)/.installed
	$(PY) deploy/prometheus/prometheusrule.py > k8s/base/prometheusrule.yaml
