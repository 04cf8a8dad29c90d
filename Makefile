# fraudscore: `make run` serves the bundled data on :9999; `make test` runs every check.
# Both install what they need into .venv first.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
INDEX  ?= data/references.fsidx
REGISTRY ?= data/registry
PORT   ?= 9999

.PHONY: install system-deps index model run test lint typecheck unit sanitize stubtest bench clean

$(BIN)/.installed: pyproject.toml setup.py $(wildcard src/fraudscore/*/_*.c src/fraudscore/*/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# Programs the tests run for real, from Debian's packages (command:package): the stack's other
# balancers, the stream pipeline's Redis (redis-cli builds the test cluster), and Prometheus with
# promtool.  Installed when missing and we are root with apt-get; otherwise said, once.
SYSTEM_TOOLS = nginx:nginx haproxy:haproxy redis-server:redis-server redis-cli:redis-tools \
               prometheus:prometheus promtool:prometheus

system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do tool=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$tool >/dev/null 2>&1 || [ -x /usr/sbin/$$tool ] || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing (the tests that run them will fail)" >&2; \
	  fi; \
	fi

$(INDEX): data/references.json.gz $(BIN)/.installed
	$(BIN)/fraudscore index build --references data/references.json.gz --out $(INDEX)

index: $(INDEX)

# A model trained on all the references (about 20 s), unless the registry already holds one: the
# drift tests check the models issue's acceptance on it (they skip, saying so, without it).  It is
# not promoted: the registry's production scorer stays whatever it was (the kNN when new).
model: install index
	@if ls $(REGISTRY)/versions/*/model.txt >/dev/null 2>&1; then \
	  echo "$(REGISTRY) holds a model already"; \
	else \
	  $(BIN)/fraudscore model train --registry $(REGISTRY) --no-progress; \
	fi

run: install index
	$(BIN)/fraudscore serve --index $(INDEX) --port $(PORT)

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install
	$(BIN)/mypy

unit: install index model
	$(BIN)/python -m pytest

# The native code under AddressSanitizer and UndefinedBehaviorSanitizer: every extension rebuilt
# with them into $(SAN_DIR) (a copy of the package, so the venv's own build is untouched), then
# a quick sample of the index, fuzz, fast-path and tree tests, and the native loop's (its thread
# too), run against that copy (FRAUDSCORE_SANITIZER makes the long loops short).  Any invalid access or undefined behaviour aborts the run, its report
# on stderr (--capture=sys: pytest leaves the sanitizers' file descriptor alone).
SAN_DIR   = build/sanitize
SAN_FLAGS = -O1 -g -std=c11 -ffp-contract=off -fno-strict-aliasing -fPIC -shared -pthread \
            -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
SAN_TESTS = tests/test_index.py tests/test_index_fuzz.py tests/test_fastpath.py tests/test_models_native.py \
            tests/test_drift.py tests/test_native_loop.py tests/test_native_loop_v1.py

sanitize: install index
	rm -rf $(SAN_DIR) && mkdir -p $(SAN_DIR)
	cp -r src/fraudscore $(SAN_DIR)/
	find $(SAN_DIR) \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
	inc=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])') && \
	ext=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))') && \
	gcc $(SAN_FLAGS) -I$$inc src/fraudscore/index/_knn.c -o $(SAN_DIR)/fraudscore/index/_knn$$ext && \
	gcc $(SAN_FLAGS) -I$$inc -Isrc/fraudscore/index -Isrc/fraudscore/models src/fraudscore/service/_fastpath.c \
	    -o $(SAN_DIR)/fraudscore/service/_fastpath$$ext && \
	gcc $(SAN_FLAGS) -I$$inc src/fraudscore/models/_trees.c -o $(SAN_DIR)/fraudscore/models/_trees$$ext && \
	gcc $(SAN_FLAGS) -I$$inc src/fraudscore/models/_drift.c -o $(SAN_DIR)/fraudscore/models/_drift$$ext
	export LD_PRELOAD=$$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
	       UBSAN_OPTIONS=print_stacktrace=1 PYTHONPATH=$(CURDIR)/$(SAN_DIR) FRAUDSCORE_SANITIZER=1 && \
	$(BIN)/python -c 'import fraudscore.index._knn as k, fraudscore.service._fastpath as f, fraudscore.models._trees as t, \
	    fraudscore.models._drift as d; assert all(m.__file__.startswith("$(CURDIR)/$(SAN_DIR)/") for m in (k, f, t, d))' && \
	$(BIN)/python -m pytest -q -p no:cacheprovider --capture=sys $(SAN_TESTS)

# the native modules' type stubs (.pyi) against what the modules really define
stubtest: install
	$(BIN)/python -m mypy.stubtest fraudscore.index._knn fraudscore.service._fastpath fraudscore.models._trees \
	    fraudscore.models._drift

test: system-deps lint typecheck stubtest unit sanitize

bench: install index
	$(BIN)/python bench/search.py
	$(BIN)/python bench/http_single.py

clean:
	rm -rf build src/*.egg-info src/fraudscore/index/*.so $(INDEX)
