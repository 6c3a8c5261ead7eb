"""model/decode_step.py's pieces: the gather plan, and the fallback to eager decoding when the
compiled step fails. Its numerics against eager rows: tests/model/test_scheduler.py (compiled)."""

from __future__ import annotations

import pytest

from model.decode_step import decode_plan
from model.engine import Engine
from model.sampling import SamplingParams
from tests.model.test_engine import ids, tiny_lm


def test_decode_plan_gathers_earlier_positions_padded_with_the_null_block():
    tables = [[3, 5], [7]]  # block size 4: row 0 holds positions 0-7, row 1 positions 0-3
    idx, valid = decode_plan(tables, [6, 2], 4, window=None)
    assert idx.tolist() == [[12, 13, 14, 15, 20, 21], [28, 29, 0, 0, 0, 0]]
    assert valid.tolist() == [[True] * 6, [True, True] + [False] * 4]


def test_decode_plan_keeps_only_the_sliding_window():
    idx, valid = decode_plan([[3, 5], [7]], [6, 2], 4, window=3)  # position p sees p-2, p-1 and itself
    assert idx.tolist() == [[20, 21], [28, 29]] and valid.all()


def test_decode_plan_is_never_narrower_than_two():
    """Torch specialises sizes 0 and 1; a one-token prompt must not trigger a third graph."""
    idx, valid = decode_plan([[2]], [1], 4, window=None)
    assert idx.shape == (1, 2) and valid.tolist() == [[True, False]]


def test_a_failing_compiled_step_falls_back_to_eager_with_the_same_tokens(tmp_path, caplog):
    lm = tiny_lm()
    prompt = ids(9, 31)
    want = Engine(lm).complete(prompt, SamplingParams(temperature=0, max_tokens=6)).token_ids
    eng = Engine(lm, compile=True, compile_dir=str(tmp_path))
    decode = eng.scheduler.decode

    def broken(*_args, **_kwargs):
        raise RuntimeError("C++ compiler missing")

    decode._fn = broken
    got = eng.complete(prompt, SamplingParams(temperature=0, max_tokens=6)).token_ids
    assert got == want
    assert isinstance(decode.failed, RuntimeError)
    assert "decoding eagerly from now on" in caplog.text
    eng.close()


@pytest.mark.parametrize("n_rows", [1, 3])
def test_warm_up_leaves_the_null_block_zero(tmp_path, n_rows):
    lm = tiny_lm()
    eng = Engine(lm, compile=True, compile_dir=str(tmp_path))
    bs = eng.pool.block_size
    assert eng.scheduler.decode.failed is None and eng.compile_report["seconds"] > 0
    assert not eng.pool.k_all[:, :bs].any() and not eng.pool.v_all[:, :bs].any()
    out = eng.complete(ids(5 + n_rows, 40), SamplingParams(temperature=0, max_tokens=3))
    assert len(out.token_ids) == 3 and eng.scheduler.decode.calls > 0
    eng.close()
