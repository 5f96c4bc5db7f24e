# Conveniences for developers; the README's two commands are tools/run-demo and
# tools/run-tests, which also set the machine up.
.PHONY: setup demo test unit lint golden

setup:
	bash tools/setup

demo:
	bash tools/run-demo

test:
	bash tools/run-tests

unit:
	.venv/bin/python -m pytest -p no:cacheprovider tests/unit -q

lint:
	.venv/bin/ruff check builder tests
	.venv/bin/ruff format --check builder tests
	.venv/bin/mypy builder
	shellcheck builder/image/scripts/meshbake-* tools/*

golden:
	.venv/bin/python -m pytest -p no:cacheprovider tests/unit/test_golden.py tests/unit/test_readme.py --update-golden
