"""`memento bench --structured`, as typed: constrained against free decode, one JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_structured_bench_reports_both_rates_and_the_ratio(tmp_path):
    cli = Path(sys.executable).with_name("memento")
    out = subprocess.run([str(cli), "bench", "--structured", "--json"], capture_output=True, text=True,
                         timeout=600, check=True, cwd=tmp_path).stdout
    r = json.loads(out)
    assert r["model"] == "smollm2-135m-instruct" and r["tokens"] == 64
    assert r["free_tok_s"] > 0 and r["json_schema_tok_s"] > 0
    assert r["ratio"] == pytest.approx(r["json_schema_tok_s"] / r["free_tok_s"])
    assert r["constrained_tokens"] > 8  # the schema's long string keeps the reply going
