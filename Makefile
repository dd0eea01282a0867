# The two commands a newcomer needs: `make demo` (the product, running) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint manifest bench screenshots clean

$(STAMP): pyproject.toml constraints.txt
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	uv venv --quiet --allow-existing -p 3.11 $(VENV)
	VIRTUAL_ENV=$(VENV) uv pip install --quiet -e '.[dev]' -c constraints.txt uv
	@touch $@

## Everything: lint, types, manifest drift, unit + PostgreSQL + real Open WebUI end-to-end tests
## (one of them in headless Chromium), and at least 90% branch coverage of the plugin (coverage.py
## with branch = true, [tool.coverage] in pyproject.toml) by the in-process tests. Chromium that
## cannot be installed fails under CI=true; elsewhere the browser test then skips, saying why.
test: $(STAMP)
	bash scripts/ensure-postgres.sh >/dev/null
	bash scripts/ensure-chromium.sh >/dev/null || [ "$${CI:-}" != true ]
	$(MAKE) --no-print-directory lint
	$(BIN)/python -m pytest --cov --cov-report=term-missing:skip-covered

lint: $(STAMP)
	$(BIN)/ruff check plugin openrouter_sim scripts tests bench
	$(BIN)/mypy --strict plugin/openrouter_usage.py openrouter_sim scripts tests bench
	$(BIN)/python scripts/build_manifest.py --check

## A real Open WebUI on http://127.0.0.1:8080 with the function installed (simulator, or
## the real OpenRouter when OPENROUTER_API_KEY is set).
demo: $(STAMP)
	$(BIN)/python scripts/demo.py $(if $(SEED_HISTORY),--seed-history)

## Maintainers: regenerate docs/images/*.png from a fresh demo in headless Chromium.
screenshots: $(STAMP)
	bash scripts/ensure-chromium.sh >/dev/null
	$(BIN)/python scripts/screenshots.py

manifest: $(STAMP)
	$(BIN)/python scripts/build_manifest.py

bench: $(STAMP)
	bash scripts/ensure-postgres.sh >/dev/null
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
