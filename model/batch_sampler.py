"""Sampling for a whole batch: per-row parameters, processors, penalties and generators.

    picks = sample_rows(logits, rows)        # logits (R, vocab) float32, rows: list[RowSampling]
    picks[i] == (token, logprob | None, top_logprobs | None)

Each row gives the same token `model.sampling.sample()` would give it alone with the same
generator: processors and penalties run per row (only rows that have them), then greedy rows take
one batched argmax and sampled rows share one vectorised temperature / top-k / top-p / min-p pass;
the draw itself uses each row's own `torch.Generator`, so a seed means the same reply whatever
else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.sampling import LogitsProcessor, SamplingParams, apply_processors, penalize, token_logprobs


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
            scores[i] = penalize(scores[i], r.params, r.context, r.generated)
    return scores


def _filtered(scores: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p for rows of `scores` (R, V), each with its own values."""
    dev = scores.device
    temp = torch.tensor([p.temperature for p in params], dtype=torch.float64, device=dev)[:, None]
    # shift so the top logit is 0 and divide in float64: a tiny temperature gives -inf, never NaN
    x = ((scores - scores.max(-1, keepdim=True).values).double() / temp).float()
    ks = [p.top_k if 0 < p.top_k < x.shape[-1] else 0 for p in params]
    if any(ks):
        top = torch.topk(x, max(ks), dim=-1).values  # (R, kmax)
        kth = torch.stack([top[i, k - 1] if k else x.new_tensor(float("-inf")) for i, k in enumerate(ks)])
        x = x.masked_fill(x < kth[:, None], float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p if p.top_p < 1.0 else 2.0 for p in params], device=dev)[:, None]
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p  # the mass before a token already reaches p
        drop_sorted[:, 0] = False
        x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), float("-inf"))
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]
        probs = torch.softmax(x, dim=-1)
        x = x.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return x


def sample_rows(logits: torch.Tensor, rows: list[RowSampling]) -> list[tuple[int, float | None, list | None]]:
    scores = _row_scores(logits, rows)
    tokens: list[int] = [0] * len(rows)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    if greedy:
        for i, t in zip(greedy, torch.argmax(scores[greedy], dim=-1).tolist(), strict=True):
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
