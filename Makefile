# The two commands of the README:
#   make book   build the static website into _build/html
#   make test   run every test (package unit tests, every notebook under nbval, the book build)
# Both create a project-local virtual environment in .venv from constraints.txt on first use, and copy
# the web assets the site serves itself (MathJax) from npm into _vendor/ (needs Node.js and npm).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

VENDOR := _vendor/.installed

.PHONY: book test clean benchmark constraints vendor release

# Modules are compiled to bytecode at install time (about a minute of a fresh build): skipping that with
# --no-compile made every later process compile what it imports, every time, where PYTHONDONTWRITEBYTECODE
# is set (as on our CI machines), and the test run 6 minutes longer.
#
# PyTorch comes first, from TORCH_INDEX as well as PyPI: by default PyTorch's CPU wheel index, so that any
# Linux machine gets the CPU build (about 200 MB) and not PyPI's default Linux build with CUDA (gigabytes
# of NVIDIA libraries the book never uses). For the CUDA build: make TORCH_INDEX= (PyPI's build) or
# TORCH_INDEX=https://download.pytorch.org/whl/cu128 (a given CUDA version). Where the index cannot be
# reached, pip warns and goes on with PyPI alone (--retries 0: one try per package, not five).
# Python 3.11 to 3.13: nbgrader (the teach extra, for the assignments) needs 3.11.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PIP_INSTALL := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else \
	  "make needs Python 3.11 or newer (nbgrader, for the assignments); set PYTHON=python3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX) --retries 0) torch
	$(PIP_INSTALL) -e ".[book,test,teach]"
	touch $(STAMP)

$(VENDOR): package.json package-lock.json
	npm ci --no-audit --no-fund --ignore-scripts --silent
	rm -rf _vendor && mkdir -p _vendor/mathjax/input/tex _vendor/mathjax/output/chtml/fonts _vendor/widgets
	@# MathJax: the one combined bundle the pages load and its web fonts, plus what it loads on demand (TeX
	@# packages a page asks for; the accessibility explorer of the math menu); not the other bundles
	cp node_modules/mathjax/es5/tex-mml-chtml.js _vendor/mathjax/
	cp -r node_modules/mathjax/es5/output/chtml/fonts/woff-v2 _vendor/mathjax/output/chtml/fonts/
	cp -r node_modules/mathjax/es5/input/tex/extensions _vendor/mathjax/input/tex/
	cp -r node_modules/mathjax/es5/a11y node_modules/mathjax/es5/sre _vendor/mathjax/
	@# the widget renderer (book/explore only) and its icon font in WOFF2, which every current browser reads
	cp node_modules/requirejs/require.js node_modules/@jupyter-widgets/html-manager/dist/embed-amd.js \
	   node_modules/@jupyter-widgets/html-manager/dist/*.woff2 _vendor/widgets/
	touch $(VENDOR)

vendor: $(VENDOR)

# book/execute.py first runs the notebooks that changed, one per core, into the cache the build reads
book: $(STAMP) $(VENDOR) release
	$(BIN)/python book/execute.py
	$(BIN)/jupyter-book build . -W -n --keep-going

test: $(STAMP) $(VENDOR) release
	$(BIN)/python -m pytest -n 2

# Student versions of the assignments (nbgrader generate_assignment) in book/assignments/release/, which the
# website shows and git ignores; only those whose source changed are regenerated.
release: $(STAMP)
	$(BIN)/python book/assignments/release.py

benchmark: $(STAMP)
	$(BIN)/python benchmarks/run.py

# Re-pin constraints.txt from the current environment (after changing a range in pyproject.toml): its header
# and its Python 3.10 section are kept; a package that section pins gets `; python_version >= "3.11"`.
PY310 := python_version < "3.11"
constraints: $(STAMP)
	{ sed -n '/^[^#]/q;p' constraints.txt; \
	  $(BIN)/python -m pip freeze --exclude-editable --disable-pip-version-check | grep -v '^-e ' \
	  | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' \
	  | awk -F'==' 'BEGIN { while ((getline l < "constraints.txt") > 0) if (l ~ /$(PY310)/) { split(l, a, "=="); old[tolower(a[1])] = 1 } } \
	                { print (tolower($$1) in old) ? $$0 "; python_version >= \"3.11\"" : $$0 }'; \
	  sed -n '/^# --- Python 3.10/,$$p' constraints.txt; } > constraints.new && mv constraints.new constraints.txt

clean:
	rm -rf _build _vendor node_modules
