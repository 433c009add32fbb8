# Two commands do everything on a fresh machine (as root):
#   make lab    bring up the namespace lab and show traffic flowing
#   make test   run the test suite
.PHONY: setup lab lab-down test bench clean

setup:
	@./scripts/setup.sh

lab: setup
	.venv/bin/xdectl lab up
	.venv/bin/xdectl lab ping

lab-down: setup
	.venv/bin/xdectl lab down

test: setup
	.venv/bin/pytest -q

clean:
	rm -rf .venv *.egg-info .pytest_cache
