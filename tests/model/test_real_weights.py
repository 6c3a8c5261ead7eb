"""Real checkpoints: SmolLM2-135M (Q4_1 GGUF) against transformers, Gemma 3 270M continues Korean.

transformers dequantizes the same GGUF to float32, so in float32 both implementations run the
same weights: we measured a max abs logit difference of 0.0 on SmolLM2 and on Gemma 3 270M.
"""

from __future__ import annotations

import os

import pytest
import torch

from model.registry import gemma_path, load_model
from tests.model.conftest import DATA_DIR, SMOLLM2_GGUF

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
# "대한민국의 수도는 서울입니다. 서울은" as transformers' GGUF tokenizer encodes it (with <bos>)
KOREAN_IDS = [2, 146220, 239217, 127561, 79301, 237170, 82358, 15245, 236761, 82358, 237456]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m-instruct", device="cpu", dtype="float32", progress=False, weights="float")


@pytest.fixture(scope="module")
def hf_smollm2():
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(SMOLLM2_GGUF.parent), gguf_file=SMOLLM2_GGUF.name, dtype=torch.float32
    ).eval()


def test_smollm2_loaded_model_fields(smollm2):
    assert smollm2.name == "smollm2-135m-instruct" and smollm2.path == SMOLLM2_GGUF
    assert smollm2.args.family == "llama" and smollm2.args.n_layers == 30 and smollm2.args.tie_embeddings
    assert smollm2.context_window == smollm2.args.max_seq_len == 8192
    assert smollm2.dtype == torch.float32 and smollm2.device.type == "cpu"
    assert smollm2.tokenizer is not None and smollm2.tokenizer.vocab_size == smollm2.args.vocab_size


def test_smollm2_logits_match_transformers(smollm2, hf_smollm2):
    worst = 0.0
    for prompt in PROMPTS:
        ids = torch.tensor([smollm2.tokenizer.encode(prompt)])
        with torch.no_grad():
            want = hf_smollm2(ids).logits
        got = smollm2.model(ids, torch.arange(ids.shape[1]))
        worst = max(worst, (got - want).abs().max().item())
    print(f"SmolLM2 float32 max abs logit diff vs transformers: {worst:.2e}")
    assert worst < 1e-3


def test_smollm2_greedy_32_steps_match_transformers(smollm2, hf_smollm2):
    ids = torch.tensor([smollm2.tokenizer.encode(PROMPTS[0])])
    T, model = ids.shape[1], smollm2.model
    cache = model.new_cache()
    logits = model(ids, torch.arange(T), cache, last_only=True)
    ours = []
    for i in range(32):
        ours.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[ours[-1]]]), torch.tensor([T + i]), cache, last_only=True)
    # transformers, teacher-forced on our tokens: its argmax after every prefix must be our next
    # token, i.e. its own greedy decoding would produce exactly our 32 tokens (one forward, not 32)
    with torch.no_grad():
        full = hf_smollm2(torch.cat([ids, torch.tensor([ours[:-1]])], dim=1)).logits[0, T - 1 :]
    theirs = full.argmax(-1).tolist()
    assert ours == theirs, (smollm2.tokenizer.decode(ours), smollm2.tokenizer.decode(theirs))


def _hangul_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum("\uac00" <= c <= "\ud7a3" for c in letters) / max(1, len(letters))


def test_gemma_continues_korean_in_hangul(gemma_gguf):
    lm = load_model("gemma-3-270m", device="cpu", dtype="float32", data_dir=DATA_DIR, progress=False,
                    weights="float")
    assert lm.args.family == "gemma3" and lm.args.sliding_window == 512 and lm.path == gemma_gguf
    assert lm.args.layer_types.count("global") == 3 and lm.context_window == 8192
    ids = torch.tensor([KOREAN_IDS])
    cache = lm.model.new_cache()
    logits = lm.model(ids, torch.arange(len(KOREAN_IDS)), cache, last_only=True)
    gen = []
    for i in range(16):
        gen.append(int(logits[0, -1].argmax()))
        logits = lm.model(torch.tensor([[gen[-1]]]), torch.tensor([len(KOREAN_IDS) + i]), cache, last_only=True)
    text = lm.tokenizer.decode(gen)
    print(f"Gemma 3 270M continuation: {text!r}")
    assert _hangul_share(text) > 0.6, text


def test_gemma_assembly_is_atomic_and_reused(tmp_path):
    first = gemma_path(tmp_path)
    assert first == tmp_path / "models" / "gemma-3-270m-Q4_K_M.gguf" and first.stat().st_size > 200_000_000
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp file left behind
    mtime = first.stat().st_mtime_ns
    assert gemma_path(tmp_path) == first and first.stat().st_mtime_ns == mtime  # reused, not rewritten
