# Two commands: `make run` (the whole system, embedded services by default) and `make test`.
# Both first run the preflight (dumont/preflight.py): the OS tools the code runs, installed with apt when
# allowed (root or passwordless sudo), else one message saying exactly what to install.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# the preflight runs before the virtualenv exists: any Python 3 will do
SYSTEM_PYTHON := $(shell command -v $(PYTHON) || command -v python3)

.PHONY: run test lint check venv clean preflight-run preflight-test

$(VENV)/.installed: requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

venv: $(VENV)/.installed

preflight-run:
	@$(SYSTEM_PYTHON) dumont/preflight.py run --python $(PYTHON) --venv $(VENV)

preflight-test:
	@$(SYSTEM_PYTHON) dumont/preflight.py test --python $(PYTHON) --venv $(VENV)

# `make run ARGS=--verbose` shows every task and request (or set LOG_LEVEL=DEBUG)
run: preflight-run venv
	$(PY) -m dumont.devrun $(ARGS)

test: preflight-test venv
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .

check: venv
	$(PY) manage.py check
	$(PY) manage.py makemigrations --check --dry-run

clean:
	rm -rf $(VENV) .dumont
