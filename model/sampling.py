"""Next-token sampling: `SamplingParams`, the pure `sample()` function, logit processors, stop strings.

    params = SamplingParams(temperature=0.7, top_p=0.9, seed=1)
    gen = make_generator(params.seed)
    token = sample(logits, params, gen, prev_ids, generated)   # logits: (vocab,) float32

The order of transforms: `penalize()` (HF repetition penalty over the whole context, OpenAI
presence/frequency penalties over the reply so far, `logit_bias`, DRY over the context), then
temperature, top-k, top-p, min-p; temperature 0 is greedy (argmax, no randomness). Log-probabilities
(`token_logprobs`) are taken after `penalize()` and before temperature, as vLLM reports them.
Randomness comes only from the explicit `torch.Generator`, so one seed gives one reply whatever
else runs in the process (the batched sampler in model/batch_sampler.py keeps one per row).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

# (token ids generated so far in this reply, next-token logits (vocab,) float32) -> new logits
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]
MAX_LOGPROBS = 20  # top alternatives per token, OpenAI's limit
DRY_BREAKERS = ("\n", ":", "\"", "*")  # llama.cpp's default dry_sequence_breakers
DRY_MAX_MATCH = 64  # longest repeat DRY looks for: at 64 its penalty is already beyond any logit


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repetition_penalty: float = 1.0  # 1.0: off (HF semantics: >1 discourages repeats)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already in the reply
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the reply
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None  # None: off; k: the chosen token's logprob and the top k alternatives
    # DRY ("don't repeat yourself", llama.cpp / SillyTavern semantics): a token that would extend a
    # sequence already in the last `dry_penalty_last_n` context tokens (-1: all) by a match of
    # n >= dry_allowed_length tokens loses dry_multiplier * dry_base ** (n - dry_allowed_length).
    dry_multiplier: float = 0.0  # 0.0: off
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1  # -1: the whole context, 0: off
    dry_sequence_breakers: list[str] = field(default_factory=lambda: list(DRY_BREAKERS))
    # ids of the tokens holding a breaker (+ EOS/specials): matches never cross them and they are
    # never penalised; filled from dry_sequence_breakers by the engine (`with_dry_breakers`)
    dry_breaker_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        def bad(name: str, value: object, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}={value!r}: {why}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "must be an integer >= 1")
        if not self.temperature >= 0.0:
            raise bad("temperature", self.temperature, "must be >= 0 (0 means greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", self.top_k, "must be an integer >= 0 (0 turns it off)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "must be in (0, 1] (1 turns it off)")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", self.min_p, "must be in [0, 1] (0 turns it off)")
        if not self.repetition_penalty > 0.0:
            raise bad("repetition_penalty", self.repetition_penalty, "must be > 0 (1 turns it off)")
        if self.seed is not None and not (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64):
            raise bad("seed", self.seed, "must be None or an integer in [-2**63, 2**64) (torch.Generator's range)")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        if not all(isinstance(s, str) for s in self.stop) or any(s == "" for s in self.stop):
            raise bad("stop", self.stop, "must be a list of non-empty strings")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, getattr(self, name), "must be in [-2, 2] (0 turns it off)")
        self.logit_bias = {int(k): float(v) for k, v in dict(self.logit_bias).items()}
        if any(not -100.0 <= v <= 100.0 for v in self.logit_bias.values()):
            raise bad("logit_bias", self.logit_bias, "values must be in [-100, 100]")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", self.logprobs, f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        self._check_dry(bad)

    def _check_dry(self, bad: Callable[[str, object, str], ValueError]) -> None:
        if not 0.0 <= self.dry_multiplier <= 100.0:
            raise bad("dry_multiplier", self.dry_multiplier, "must be in [0, 100] (0 turns DRY off)")
        if not 1.0 < self.dry_base <= 8.0:
            raise bad("dry_base", self.dry_base, "must be in (1, 8]")
        if not isinstance(self.dry_allowed_length, int) or self.dry_allowed_length < 1:
            raise bad("dry_allowed_length", self.dry_allowed_length, "must be an integer >= 1")
        if not isinstance(self.dry_penalty_last_n, int) or self.dry_penalty_last_n < -1:
            raise bad("dry_penalty_last_n", self.dry_penalty_last_n, "must be an integer >= -1 (-1: whole context)")
        self.dry_sequence_breakers = list(self.dry_sequence_breakers)
        if not all(isinstance(b, str) and b for b in self.dry_sequence_breakers):
            raise bad("dry_sequence_breakers", self.dry_sequence_breakers, "must be a list of non-empty strings")
        self.dry_breaker_ids = tuple(int(i) for i in self.dry_breaker_ids)

    @property
    def penalized(self) -> bool:
        """Whether `penalize()` changes anything for these parameters."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.logit_bias) or self.dry)

    @property
    def dry(self) -> bool:
        """Whether the DRY penalty is on."""
        return self.dry_multiplier > 0.0 and self.dry_penalty_last_n != 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded with `seed`, or from OS entropy when None."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def apply_repetition_penalty(logits: torch.Tensor, prev_ids: Sequence[int], penalty: float) -> torch.Tensor:
    """HF semantics: for each distinct previous token, divide a positive logit by `penalty`,
    multiply a negative one by it."""
    if penalty == 1.0 or len(prev_ids) == 0:
        return logits
    ids = torch.tensor(sorted(set(prev_ids)), dtype=torch.long, device=logits.device)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def apply_presence_frequency(logits: torch.Tensor, generated: Sequence[int], presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI semantics: logit[j] -= frequency * count_j + presence * (count_j > 0), counting the
    reply's own tokens."""
    if (presence == 0.0 and frequency == 0.0) or len(generated) == 0:
        return logits
    counts = Counter(generated)
    ids = torch.tensor(list(counts), dtype=torch.long, device=logits.device)
    n = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
    logits = logits.clone()
    logits[ids] -= frequency * n + presence
    return logits


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    if not bias:
        return logits
    ids = torch.tensor([t for t in bias if 0 <= t < logits.numel()], dtype=torch.long, device=logits.device)
    vals = torch.tensor([bias[int(t)] for t in ids.tolist()], dtype=logits.dtype, device=logits.device)
    logits = logits.clone()
    logits[ids] += vals
    return logits


def penalize(logits: torch.Tensor, params: SamplingParams, context: Sequence[int] = (),
             generated: Sequence[int] = ()) -> torch.Tensor:
    """Every transform that does not depend on temperature: repetition penalty (whole context),
    presence/frequency penalties (the reply), logit bias, DRY (the context)."""
    logits = penalize_counts(logits, params, context, generated)
    if params.dry:
        logits = apply_dry(logits[None], [params], [context])[0]
    return logits


def penalize_counts(logits: torch.Tensor, params: SamplingParams, context: Sequence[int] = (),
                    generated: Sequence[int] = ()) -> torch.Tensor:
    """`penalize()` without DRY (which the batched sampler runs for all rows at once)."""
    logits = apply_repetition_penalty(logits, context, params.repetition_penalty)
    logits = apply_presence_frequency(logits, generated, params.presence_penalty, params.frequency_penalty)
    return apply_logit_bias(logits, params.logit_bias)


def dry_breaker_ids(vocab_texts: Sequence[str], breakers: Iterable[str], special_ids: Iterable[int] = ()) -> tuple[int, ...]:
    """Ids of the tokens whose text holds a sequence breaker, plus `special_ids` (EOS, turn markers):
    DRY must never stop a turn from ending because earlier turns ended the same way."""
    breakers = [b for b in breakers if b]
    ids = {i for i, t in enumerate(vocab_texts) if t == "" or any(b in t for b in breakers)}
    return tuple(sorted(ids | {int(i) for i in special_ids}))


def _dry_window(contexts: Sequence[Sequence[int]], params: list[SamplingParams], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' last `dry_penalty_last_n` context tokens, left-padded to one length (R, N), and
    which of them are breakers. Each pad gets its own negative value: pads never match anything.
    Built in numpy (a list to an array is one C loop; torch.tensor per row, every step, was not)."""
    tails = [c if p.dry_penalty_last_n < 0 else c[-p.dry_penalty_last_n:] for c, p in zip(contexts, params, strict=True)]
    n = max(1, max(len(t) for t in tails))
    x = np.empty((len(tails), n), dtype=np.int64)
    x[:] = -1 - np.arange(n)
    for r, t in enumerate(tails):
        if len(t):
            x[r, n - len(t):] = t
    if all(p.dry_breaker_ids == params[0].dry_breaker_ids for p in params):  # one vocabulary's defaults
        breaker = np.isin(x, params[0].dry_breaker_ids)
    else:
        breaker = np.stack([np.isin(x[r], p.dry_breaker_ids) for r, p in enumerate(params)])
    return torch.from_numpy(x).to(device), torch.from_numpy(breaker).to(device)


def dry_match_lengths(x: torch.Tensor, breaker: torch.Tensor) -> torch.Tensor:
    """m (R, N-1): m[r, i] is how many tokens ending at position i equal the row's last tokens
    (x[r, i-k] == x[r, N-1-k] for k < m), never through a breaker. So x[r, i+1] is the token that
    would repeat a sequence of m[r, i] tokens. One vectorised compare per match length, stopping
    at the first length no row reaches (repeats are short unless the text is degenerating)."""
    rows, n = x.shape
    lengths = torch.zeros(rows, max(0, n - 1), dtype=torch.long, device=x.device)
    alive = torch.ones_like(lengths, dtype=torch.bool)
    padded = torch.cat([-(n + 1) - torch.arange(DRY_MAX_MATCH, device=x.device).repeat(rows, 1), x], dim=1)
    for k in range(min(n - 1, DRY_MAX_MATCH)):
        left = padded[:, DRY_MAX_MATCH - k : DRY_MAX_MATCH - k + n - 1]  # x[i-k] for every i
        right = x[:, n - 1 - k : n - k]  # x[N-1-k], the same for every i
        alive &= (left == right) & ~breaker[:, n - 1 - k : n - k]
        if not alive.any():
            break
        lengths += alive
    return lengths


def apply_dry(scores: torch.Tensor, params: list[SamplingParams], contexts: Sequence[Sequence[int]]) -> torch.Tensor:
    """DRY for rows of `scores` (R, V), each with its own parameters and context (see
    SamplingParams): the longest repeat each candidate token would extend, then its penalty."""
    x, breaker = _dry_window(contexts, params, scores.device)
    lengths = dry_match_lengths(x, breaker)
    if lengths.numel() == 0:
        return scores
    nxt = x[:, 1:]
    lengths = lengths * ((nxt >= 0) & ~breaker[:, 1:])  # pads and breakers are never penalised
    mult, base, allowed = (torch.tensor([getattr(p, f) for p in params], dtype=torch.float32, device=scores.device)[:, None]
                           for f in ("dry_multiplier", "dry_base", "dry_allowed_length"))
    # the penalty of each (row, next token) candidate, at most N per row, then the largest per
    # token (it grows with the length): the vocabulary-wide tensors are one zero fill, one
    # scatter and one subtraction (computing base ** n over the whole vocabulary cost 4 ms a step at 8 rows)
    over = lengths.float() - allowed
    pen = torch.where(over >= 0, mult * base ** over.clamp(min=0, max=DRY_MAX_MATCH), 0.0)
    penalty = torch.zeros(scores.shape, dtype=scores.dtype, device=scores.device)
    penalty.scatter_reduce_(1, nxt.clamp(min=0), pen.to(scores.dtype), reduce="amax")
    return scores - penalty


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """(log p(token), the k most likely (id, log p) pairs) under `logits` (vocab,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logp, k) if k > 0 else None
    alts = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return float(logp[token]), alts


def _per_row(value, rows: int) -> list:
    """A scalar parameter for every row, or one value per row as given."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * rows


def mask_top_k(logits: torch.Tensor, k) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value kept too); the rest become
    -inf. `logits` (..., V); `k` an int or one int per row (0: off)."""
    x = logits.reshape(-1, logits.shape[-1])
    ks = [k if 0 < k < x.shape[-1] else 0 for k in _per_row(k, x.shape[0])]
    if not any(ks):
        return logits
    top = torch.topk(x, max(ks), dim=-1).values  # (R, kmax)
    kth = torch.stack([top[i, k - 1] if k else x.new_tensor(float("-inf")) for i, k in enumerate(ks)])
    return x.masked_fill(x < kth[:, None], float("-inf")).view_as(logits)


def mask_top_p(logits: torch.Tensor, p) -> torch.Tensor:
    """Keep, per row, the smallest set of most likely tokens whose probability mass reaches p
    (always >= 1 token). `p` a float or one float per row (1: off)."""
    x = logits.reshape(-1, logits.shape[-1])
    ps = _per_row(p, x.shape[0])
    if all(p >= 1.0 for p in ps):
        return logits
    top_p = torch.tensor([p if p < 1.0 else 2.0 for p in ps], device=x.device)[:, None]  # 2: never drops
    sorted_x, order = torch.sort(x, dim=-1, descending=True)
    probs = torch.softmax(sorted_x, dim=-1)
    drop_sorted = (probs.cumsum(-1) - probs) >= top_p  # drop when the mass *before* it reaches p
    drop_sorted[:, 0] = False  # a p below float32's smallest value would otherwise drop every token
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return x.masked_fill(drop, float("-inf")).view_as(logits)


def mask_min_p(logits: torch.Tensor, min_p) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times their row's top probability.
    `min_p` a float or one float per row (0: off)."""
    x = logits.reshape(-1, logits.shape[-1])
    ms = _per_row(min_p, x.shape[0])
    if all(m <= 0.0 for m in ms):
        return logits
    probs = torch.softmax(x, dim=-1)
    floor = torch.tensor(ms, device=x.device)[:, None] * probs.max(-1, keepdim=True).values
    return x.masked_fill(probs < floor, float("-inf")).view_as(logits)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    prev_ids: Sequence[int] = (),
    generated: Sequence[int] = (),
) -> int:
    """Pick the next token from `logits` (vocab,). Pure: same inputs and generator state, same token.
    `prev_ids`: the whole context (repetition penalty); `generated`: the reply so far
    (presence/frequency penalties)."""
    logits = penalize(logits.float().reshape(-1), params, prev_ids, generated)
    return sample_penalized(logits, params, generator)


def sample_penalized(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """`sample()` after `penalize()`: temperature, top-k, top-p, min-p, then a draw."""
    if params.greedy:
        return int(torch.argmax(logits))
    # Shift so the top logit is 0, divide in float64 (a temperature like 1e-300 is 0 in float32):
    # a tiny temperature then gives -inf for the others, never NaN, and the top token survives.
    logits = ((logits - logits.max()).double() / params.temperature).float()
    logits = mask_top_k(logits, params.top_k)
    logits = mask_top_p(logits, params.top_p)
    logits = mask_min_p(logits, params.min_p)
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


def apply_processors(
    processors: Iterable[LogitsProcessor], generated: list[int], logits: torch.Tensor
) -> torch.Tensor:
    for proc in processors:
        logits = proc(generated, logits)
    return logits


class StopMatcher:
    """Streams text while watching for stop strings that may straddle token boundaries.

    `push(text)` returns the text that is safe to show now: anything that could still be the
    start of a stop string is held back until the next push decides it. After a stop string is
    seen, `stopped` is True and the text before it is the last thing returned.
    """

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.stopped = False
        self._held = ""

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        keep = self._partial_suffix_len(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """End of generation: release whatever was held back (it never became a stop string)."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out

    def _partial_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best
