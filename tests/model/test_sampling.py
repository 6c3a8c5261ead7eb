"""Unit tests for model/sampling.py: params validation, sample() transforms, stop strings."""

import pytest
import torch

from model.sampling import (
    SamplingParams,
    StopMatcher,
    apply_processors,
    apply_repetition_penalty,
    make_generator,
    mask_min_p,
    mask_top_k,
    mask_top_p,
    penalize,
    sample,
)

NEG = float("-inf")


def test_defaults_match_contract():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.min_p) == (256, 0.7, 0, 1.0, 0.0)
    assert p.repetition_penalty == 1.0 and p.seed is None and p.stop == []


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": 2.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": 2**64}, "seed"),
    ],
)
def test_bad_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kwargs)


def test_single_stop_string_is_wrapped():
    assert SamplingParams(stop="\n").stop == ["\n"]


def test_greedy_is_argmax_and_ignores_generator():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    p = SamplingParams(temperature=0.0)
    assert sample(logits, p, None) == 1
    assert sample(logits, p, make_generator(0)) == 1


def test_same_seed_same_tokens_and_different_seed_differs():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0)

    def draw(seed):
        g = make_generator(seed)
        return [sample(logits, p, g) for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_k_mask_keeps_k_largest():
    out = mask_top_k(torch.tensor([1.0, 5.0, 3.0, 4.0]), 2)
    assert torch.equal(out, torch.tensor([NEG, 5.0, NEG, 4.0]))
    g = make_generator(0)
    p = SamplingParams(temperature=5.0, top_k=1)
    assert {sample(torch.tensor([1.0, 5.0, 3.0, 4.0]), p, g) for _ in range(20)} == {1}


def test_top_p_mask_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert torch.isfinite(mask_top_p(logits, 0.5)).tolist() == [True, False, False, False]
    assert torch.isfinite(mask_top_p(logits, 0.7)).tolist() == [True, True, False, False]
    assert torch.isfinite(mask_top_p(logits, 0.81)).tolist() == [True, True, True, False]
    # order of the vocab does not matter
    shuffled = logits[[2, 0, 3, 1]]
    assert torch.isfinite(mask_top_p(shuffled, 0.7)).tolist() == [False, True, False, True]


def test_min_p_mask_is_relative_to_top_probability():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert torch.isfinite(mask_min_p(logits, 0.5)).tolist() == [True, True, False, False]
    assert torch.isfinite(mask_min_p(logits, 0.2)).tolist() == [True, True, True, False]


def test_repetition_penalty_hf_semantics():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert torch.equal(out, torch.tensor([1.0, -4.0, 1.0, 0.5]))
    assert torch.equal(logits, torch.tensor([2.0, -2.0, 1.0, 0.5]))  # input untouched
    # greedy with a strong penalty moves off the repeated token
    assert sample(logits, SamplingParams(temperature=0, repetition_penalty=3.0), None, [0]) == 2


def test_processors_are_applied_in_order():
    def ban_first(generated, logits):
        return logits.index_fill(0, torch.tensor([0]), NEG)

    seen = []

    def spy(generated, logits):
        seen.append(list(generated))
        return logits

    out = apply_processors([spy, ban_first], [4, 5], torch.tensor([9.0, 1.0]))
    assert seen == [[4, 5]] and out[0] == NEG


def feed(matcher, pieces):
    return [matcher.push(p) for p in pieces]


def test_stop_matcher_cuts_across_token_boundaries():
    m = StopMatcher(["\nUser:"])
    out = feed(m, ["Hello", " there\n", "Us", "er", ": hi"])
    assert "".join(out) == "Hello there"
    assert m.stopped
    assert out[1] == " there"  # the newline is held back while it could start the stop string
    assert m.push("more") == "" and m.flush() == ""


def test_stop_matcher_releases_false_alarm():
    m = StopMatcher(["END"])
    out = feed(m, ["the E", "N", "D", "X"])
    assert "".join(out) == "the "
    m = StopMatcher(["END"])
    out = feed(m, ["the E", "N", "O"])
    assert "".join(out) == "the ENO" and not m.stopped
    m = StopMatcher(["END"])
    assert m.push("tail E") == "tail " and m.flush() == "E"


def test_stop_matcher_earliest_of_several_stops():
    m = StopMatcher(["bb", "a"])
    assert m.push("xxbba") == "xx"


def test_stop_matcher_without_stops_passes_through():
    m = StopMatcher([])
    assert m.push("abc") == "abc" and m.flush() == ""


def test_near_zero_temperature_and_top_p_pick_the_top_token():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    for params in (SamplingParams(temperature=5e-324), SamplingParams(temperature=1e-30), SamplingParams(temperature=0.7, top_p=5e-324)):
        assert sample(logits, params, make_generator(0)) == 1


def test_presence_and_frequency_penalties_follow_openai():
    from model.sampling import penalize

    logits = torch.zeros(4)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = penalize(logits, p, context=[0, 1, 1, 2], generated=[1, 1, 2])
    assert out.tolist() == [0.0, -(0.5 + 2 * 0.25), -(0.5 + 0.25), 0.0]  # the prompt's token 0 is not counted


def test_logit_bias_moves_greedy_choice_and_is_validated():
    p = SamplingParams(temperature=0, logit_bias={2: 100.0})
    assert sample(torch.tensor([5.0, 1.0, 0.0]), p, None) == 2
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101.0})
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=3.0)


def test_token_logprobs_are_log_softmax_with_top_alternatives():
    from model.sampling import token_logprobs

    logits = torch.tensor([2.0, 1.0, 0.0])
    lp, top = token_logprobs(logits, 1, 2)
    want = torch.log_softmax(logits, -1)
    assert abs(lp - float(want[1])) < 1e-6
    assert [t for t, _ in top] == [0, 1] and abs(top[0][1] - float(want[0])) < 1e-6
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)


def test_batched_rows_sample_what_each_row_samples_alone():
    from model.batch_sampler import RowSampling, sample_rows

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0.8, top_k=5), SamplingParams(temperature=0),
              SamplingParams(temperature=1.2, top_p=0.6), SamplingParams(temperature=0.9, min_p=0.1)]
    for seed in range(5):
        rows = [RowSampling(p, make_generator(seed + i), [1, 2], [2]) for i, p in enumerate(params)]
        batched = [t for t, _lp, _top in sample_rows(logits, rows)]
        alone = [sample(logits[i], p, make_generator(seed + i), [1, 2], [2]) for i, p in enumerate(params)]
        assert batched == alone


# ---------------------------------------------------------------- DRY


def dry(**kw) -> SamplingParams:
    kw.setdefault("dry_multiplier", 1.0)
    return SamplingParams(temperature=0.0, **kw)


def test_dry_penalises_the_token_that_extends_a_repeat_by_llama_cpp_formula():
    # ... 1 2 3 4 ... 1 2 3 -> 4 would repeat a 3-token match: 0.8 * 1.75 ** (3 - 2)
    out = penalize(torch.zeros(10), dry(dry_multiplier=0.8), [1, 2, 3, 4, 5, 1, 2, 3])
    want = torch.zeros(10)
    want[4] = -0.8 * 1.75
    assert torch.allclose(out, want)
    # a match shorter than dry_allowed_length costs nothing
    assert torch.equal(penalize(torch.zeros(10), dry(dry_allowed_length=4), [1, 2, 3, 4, 5, 1, 2, 3]), torch.zeros(10))
    assert not SamplingParams().dry and not dry(dry_penalty_last_n=0).dry


def test_dry_matches_stop_at_breakers_and_breakers_are_never_penalised():
    p = dry(dry_breaker_ids=(9,))
    # the earlier "1 2 3" is followed by breaker 9: 9 stays free (turns can still end alike)
    out = penalize(torch.zeros(10), p, [1, 2, 3, 9, 7, 1, 2, 3])
    assert torch.equal(out, torch.zeros(10))
    # "5 9 1 2 3 4": the match through 9 stops there, so 4 is penalised for 3 tokens, not 5
    out = penalize(torch.zeros(10), p, [5, 9, 1, 2, 3, 4, 8, 5, 9, 1, 2, 3])
    assert torch.isclose(out[4], torch.tensor(-1.75))


def test_dry_only_looks_at_the_last_n_tokens():
    ctx = [1, 2, 3, 4, 7, 8, 5, 6, 1, 2, 3]
    assert penalize(torch.zeros(10), dry(), ctx)[4] < 0
    assert penalize(torch.zeros(10), dry(dry_penalty_last_n=6), ctx)[4] == 0


def cycling_logits(context: list[int]) -> torch.Tensor:
    """A scripted 'model' that loves to loop: it prefers the token that followed the last token the
    last time (2.0 over the rest), else token (last + 1) % 10. Greedy without DRY repeats forever."""
    logits = torch.zeros(12)
    last = context[-1]
    seen = [context[i + 1] for i in range(len(context) - 1) if context[i] == last]
    logits[seen[-1] if seen else (last + 1) % 10] = 2.0
    return logits


def greedy_run(params: SamplingParams, steps: int = 40) -> list[int]:
    ctx = [0, 1, 2, 3]
    for _ in range(steps):
        ctx.append(sample(cycling_logits(ctx), params, None, ctx, ctx[4:]))
    return ctx[4:]


def distinct_ngram_share(tokens: list[int], n: int = 4) -> float:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams)


def test_dry_breaks_a_loop_that_greedy_decoding_falls_into():
    plain = greedy_run(SamplingParams(temperature=0.0))
    assert distinct_ngram_share(plain) < 0.3  # the loop 4 5 ... 9 0 1 2 3 over and over
    with_dry = greedy_run(dry(dry_multiplier=1.0, dry_allowed_length=2))
    assert distinct_ngram_share(with_dry) > 0.6
    longest = max(n for n in range(1, 20) if any(
        with_dry[i : i + n] == with_dry[j : j + n] for i in range(len(with_dry)) for j in range(i + 1, len(with_dry) - n + 1)))
    assert longest <= 4  # no repeat beyond allowed_length + a couple of tokens


def test_dry_rows_in_a_batch_match_each_row_alone():
    from model.batch_sampler import RowSampling, sample_rows

    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(5))
    contexts = [[1, 2, 3, 4, 1, 2, 3], [5, 6, 5, 6, 5], [7, 8, 9], [1, 2, 1, 2, 1, 2, 1]]
    params = [SamplingParams(temperature=0.0, dry_multiplier=3.0),
              SamplingParams(temperature=0.9, dry_multiplier=1.0, dry_base=2.0, dry_breaker_ids=(6,)),
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.7, dry_multiplier=0.5, dry_allowed_length=1, dry_penalty_last_n=4)]
    rows = [RowSampling(p, make_generator(i), c, c[-2:]) for i, (p, c) in enumerate(zip(params, contexts, strict=True))]
    batched = sample_rows(logits, rows)
    for i, (p, c) in enumerate(zip(params, contexts, strict=True)):
        assert batched[i][0] == sample(logits[i], p, make_generator(i), c, c[-2:])


@pytest.mark.parametrize("breakers", [((6,), (6,), (6,)), ((6,), (), (2,))])
def test_an_all_dry_batch_scores_each_row_as_alone(breakers):
    """The batch's fast path (every row has DRY: no gather and scatter back, one breaker lookup
    when the rows share their breakers) gives each row's own penalised scores."""
    from model.batch_sampler import RowSampling, _row_scores

    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(7))
    contexts = [[1, 2, 3, 4, 1, 2, 3], [5, 6, 5, 6, 5, 6], [1, 2, 1, 2, 1, 2, 1]]
    params = [dry(dry_multiplier=m, dry_breaker_ids=b) for m, b in zip((3.0, 1.0, 0.5), breakers, strict=True)]
    rows = [RowSampling(p, None, c, c[-2:]) for p, c in zip(params, contexts, strict=True)]
    got = _row_scores(logits, rows)
    assert not torch.equal(got, logits)  # the contexts do repeat: DRY had something to penalise
    for i, (p, c) in enumerate(zip(params, contexts, strict=True)):
        assert torch.allclose(got[i], penalize(logits[i].clone(), p, c, c[-2:]))


@pytest.mark.parametrize("kw, field", [({"dry_multiplier": -1.0}, "dry_multiplier"), ({"dry_base": 1.0}, "dry_base"),
                                       ({"dry_allowed_length": 0}, "dry_allowed_length"),
                                       ({"dry_penalty_last_n": -2}, "dry_penalty_last_n"),
                                       ({"dry_sequence_breakers": [""]}, "dry_sequence_breakers")])
def test_bad_dry_params_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kw)


def test_breaker_ids_hold_the_breaker_strings_and_the_specials():
    from model.sampling import dry_breaker_ids

    texts = ["a", "b:", "\n\n", "", "cd", 'x"']
    assert dry_breaker_ids(texts, ["\n", ":", '"'], special_ids=[4]) == (1, 2, 3, 4, 5)
