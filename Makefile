# Two commands do everything on a fresh machine (as root):
#   make lab    bring up the namespace lab and show traffic flowing
#   make test   run the test suite
# Each first installs what it needs (scripts/setup.sh): the lab a lean set,
# the tests every tool they run, the benchmarks the profilers too.
.PHONY: setup setup-test setup-bench lab lab-down test unit clean

setup:
	@./scripts/setup.sh lab

setup-test:
	@./scripts/setup.sh test

setup-bench:
	@./scripts/setup.sh bench

lab: setup
	.venv/bin/xdectl lab up
	.venv/bin/xdectl lab ping

lab-down: setup
	.venv/bin/xdectl lab down

test: setup-test
	.venv/bin/pytest -q

# The unit tier: no root, no namespaces, seconds (after a `make setup`).
unit:
	.venv/bin/pytest -q -m unit

clean:
	rm -rf .venv *.egg-info .pytest_cache
