"""Test-wide defaults.

Servers the tests start (in this process or as `memento serve` subprocesses, which inherit the
environment) decode eagerly: compiling the decode step costs a minute or more per fresh data dir.
The compiled path has its own tests (tests/model/test_scheduler.py, tests/service/test_compiled_serve.py),
which ask for it explicitly."""

import os

os.environ.setdefault("MEMENTO_COMPILE", "off")
