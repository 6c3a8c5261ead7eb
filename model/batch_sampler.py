"""Sampling for a whole batch: per-row parameters, processors, penalties and generators.

    picks = sample_rows(logits, rows)        # logits (R, vocab) float32, rows: list[RowSampling]
    picks[i] == (token, logprob | None, top_logprobs | None)

Each row gives the same token `model.sampling.sample()` would give it alone with the same
generator: processors and penalties run per row (only rows that have them), DRY in one pass over the rows
that use it (`apply_dry`: per-row parameters and contexts, no text decoding), then greedy rows take
one batched argmax and sampled rows share one vectorised temperature / top-k / top-p / min-p pass;
the draw itself uses each row's own `torch.Generator`, so a seed means the same reply whatever
else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.sampling import (
    LogitsProcessor,
    SamplingParams,
    apply_dry,
    apply_processors,
    mask_min_p,
    mask_top_k,
    mask_top_p,
    penalize_counts,
    token_logprobs,
)


@dataclass
class RowSampling:
    params: SamplingParams
    generator: torch.Generator | None
    context: list[int]  # prompt + reply so far (repetition penalty)
    generated: list[int]  # the reply so far (processors, presence/frequency penalties)
    processors: list[LogitsProcessor] = field(default_factory=list)


def _row_scores(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    scores = logits.float().clone()  # a plain tensor: processors may edit rows in place
    for i, r in enumerate(rows):
        if r.processors:
            scores[i] = apply_processors(r.processors, r.generated, scores[i].clone())
        if r.params.penalized:
            scores[i] = penalize_counts(scores[i], r.params, r.context, r.generated)
    dry = [i for i, r in enumerate(rows) if r.params.dry]
    if len(dry) == len(rows):  # the usual case (a model preset has DRY): no gather and scatter back
        return apply_dry(scores, [r.params for r in rows], [r.context for r in rows])
    if dry:  # one vectorised pass for every DRY row, after the per-row penalties as in penalize()
        scores[dry] = apply_dry(scores[dry], [rows[i].params for i in dry], [rows[i].context for i in dry])
    return scores


def _filtered(scores: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p for rows of `scores` (R, V), each with its own values."""
    temp = torch.tensor([p.temperature for p in params], dtype=torch.float64, device=scores.device)[:, None]
    # shift so the top logit is 0 and divide in float64: a tiny temperature gives -inf, never NaN
    x = ((scores - scores.max(-1, keepdim=True).values).double() / temp).float()
    x = mask_top_k(x, [p.top_k for p in params])
    x = mask_top_p(x, [p.top_p for p in params])
    return mask_min_p(x, [p.min_p for p in params])


def sample_rows(logits: torch.Tensor, rows: list[RowSampling]) -> list[tuple[int, float | None, list | None]]:
    scores = _row_scores(logits, rows)
    tokens: list[int] = [0] * len(rows)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    if greedy:
        picked = scores if len(greedy) == len(rows) else scores[greedy]
        for i, t in zip(greedy, torch.argmax(picked, dim=-1).tolist(), strict=True):
            tokens[i] = t
    drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
    if drawn:
        probs = torch.softmax(_filtered(scores[drawn], [rows[i].params for i in drawn]), dim=-1)
        for j, i in enumerate(drawn):
            g = rows[i].generator
            p = probs[j] if g is None or g.device == probs.device else probs[j].to(g.device)
            tokens[i] = int(torch.multinomial(p, 1, generator=g))
    out = []
    for i, r in enumerate(rows):
        if r.params.logprobs is None:
            out.append((tokens[i], None, None))
        else:
            lp, top = token_logprobs(scores[i], tokens[i], r.params.logprobs)
            out.append((tokens[i], lp, top))
    return out
