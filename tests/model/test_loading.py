"""GGUF / HF loading: tiny models through real files, and one clear error per failure mode."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from gguf import GGUFWriter, quants
from gguf.constants import GGMLQuantizationType as Q

from model.config import ModelLoadError
from model.gguf_loader import read_gguf
from model.registry import build_model, load_model, load_weights
from tests.model.conftest import SMOLLM2_GGUF, VOCAB, make_hf_model, ours_from_hf_dir

# HF -> GGUF names, as llama.cpp's convert_hf_to_gguf.py writes them
_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def _llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(rp: dict, head_dim: int) -> np.ndarray:
    """Per-frequency divisors as llama.cpp's converter stores Llama 3.1 scaling."""
    inv = 1.0 / (rp["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    ctx, lo, hi, factor = rp["original_max_position_embeddings"], rp["low_freq_factor"], rp["high_freq_factor"], rp["factor"]
    out = []
    for freq in inv:
        wavelen = 2 * np.pi / freq
        if wavelen < ctx / hi:
            out.append(1.0)
        elif wavelen > ctx / lo:
            out.append(factor)
        else:
            smooth = (ctx / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_tiny_gguf(hf, arch: str, path, qtype: Q = Q.F32) -> None:
    """Convert a tiny transformers model the way llama.cpp does (Q/K permute, Gemma norm + 1)."""
    cfg = hf.config
    w = GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "gemma3":
        w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_sliding_window(cfg.sliding_window)
        w.add_sliding_window_pattern([True, False] * (cfg.num_hidden_layers // 2))  # per-layer form
        w.add_string("gemma3.rope.scaling.type", "linear")
        w.add_float32("gemma3.rope.scaling.factor", cfg.rope_parameters["full_attention"]["factor"])
        w.add_float32("gemma3.final_logit_softcapping", cfg.final_logit_softcapping)
    else:
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        if getattr(cfg, "head_dim", None):  # Qwen3: head_dim is not hidden / heads
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        if cfg.rope_parameters.get("rope_type") == "llama3":
            w.add_tensor("rope_freqs.weight", _llama3_rope_factors(cfg.rope_parameters, cfg.head_dim))
    for name, t in hf.state_dict().items():
        a = t.detach().float().numpy()
        name = name.removeprefix("model.")
        if name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            gname = "output.weight"
        elif name == "embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "norm.weight":
            gname = "output_norm.weight"
        else:
            _, i, rest = name.split(".", 2)
            part, kind = rest.rsplit(".", 1)
            if part == "post_attention_layernorm":
                part = "post_attention_norm" if arch == "gemma3" else "ffn_norm"
            else:
                part = _HF_TO_GGUF[part]
            gname = f"blk.{i}.{part}.{kind}"
            if arch == "llama" and part in ("attn_q", "attn_k"):
                a = _llamacpp_permute(a, cfg.num_attention_heads if part == "attn_q" else cfg.num_key_value_heads)
        if arch == "gemma3" and gname.endswith("norm.weight"):
            a = a + 1.0
        if a.ndim == 2 and qtype != Q.F32:
            w.add_tensor(gname, quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kind,arch", [("llama", "llama"), ("llama3", "llama"), ("qwen2", "qwen2"),
                                       ("qwen3", "qwen3"), ("gemma3", "gemma3")])
def test_tiny_gguf_matches_transformers(tmp_path, kind, arch):
    hf = make_hf_model(kind, layer_types=["sliding_attention", "full_attention"] * 2) if kind == "gemma3" \
        else make_hf_model(kind)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(hf, arch, path)
    args, model = load_weights(path, "cpu", "float32")
    tokens = torch.randint(0, VOCAB, (1, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(tokens).logits
    got = model(tokens, torch.arange(50))
    assert args.family == ("gemma3" if kind == "gemma3" else "llama")
    assert (args.rope_freq_factors is not None) == (kind == "llama3")
    assert (got - want).abs().max() < 1e-4


def test_quantized_tiny_gguf_equals_dequantized_weights(tmp_path):
    hf = make_hf_model("llama")
    path = tmp_path / "q8.gguf"
    write_tiny_gguf(hf, "llama", path, qtype=Q.Q8_0)
    args, state = read_gguf(path)
    ref = hf.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()
    want = quants.dequantize(quants.quantize(ref, Q.Q8_0), Q.Q8_0)
    assert np.array_equal(state["layers.0.feed_forward.w3.weight"].numpy(), want)
    assert 0 < np.abs(want - ref).max() < 0.01  # really quantized, and close


def test_sharded_hf_directory(tmp_path):
    hf = make_hf_model("llama")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = ours_from_hf_dir(tmp_path / "sharded")
    tokens = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(tokens, torch.arange(20)) - hf(tokens).logits).abs().max() < 1e-4


def test_default_context_is_capped(tmp_path):
    hf = make_hf_model("llama", max_position_embeddings=100_000)
    hf.save_pretrained(tmp_path / "long")
    args, model = load_weights(tmp_path / "long")
    assert args.context_length == 100_000 and args.max_seq_len == 8192
    args, _ = load_weights(tmp_path / "long", max_seq_len=1000)
    assert args.max_seq_len == 1000


# -- one clear error per failure ------------------------------------------------------------------
def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError, match=r"nope\.gguf: model file or directory not found"):
        load_model(missing, device="cpu", progress=False)


def test_unknown_builtin_name_lists_valid_ones():
    with pytest.raises(ModelLoadError, match="unknown model name 'llama-9000'") as e:
        load_model("llama-9000", device="cpu", progress=False)
    assert "smollm2-135m-instruct" in str(e.value) and "gemma-3-270m" in str(e.value)


@pytest.mark.parametrize("n_bytes", [1000, 100_000, 20_000_000])  # header / vocabulary / tensor data
def test_truncated_gguf(tmp_path, n_bytes):
    cut = tmp_path / "cut.gguf"
    with SMOLLM2_GGUF.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(n_bytes))
    with pytest.raises(ModelLoadError, match=r"cut\.gguf: .*truncated"):
        load_model(cut, device="cpu", progress=False)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(ModelLoadError, match=r"bad\.gguf: not a GGUF file"):
        load_model(bad, device="cpu", progress=False)


def test_unknown_architecture(tmp_path):
    path = tmp_path / "foo.gguf"
    w = GGUFWriter(str(path), "foo")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=r"foo\.gguf: unknown architecture 'foo'.*llama, qwen2, qwen3, gemma3"):
        load_model(path, device="cpu", progress=False)


def test_unsupported_quant_type(tmp_path):
    hf = make_hf_model("llama")
    path = tmp_path / "iq.gguf"
    write_tiny_gguf(hf, "llama", path)
    # rewrite with one tensor in a type we do not support (IQ4_NL: blocks of 32, 18 bytes)
    path2 = tmp_path / "iq2.gguf"
    from model.gguf_meta import read_header

    header = read_header(path)
    w = GGUFWriter(str(path2), "llama")
    for k, v in header.metadata.items():
        if k.startswith("llama."):
            w.add_key_value(k, v, _gguf_type(v))
    for info in header.tensors:
        raw = np.memmap(path, np.uint8, "r", offset=info.offset, shape=(info.n_bytes,))
        if info.name == "blk.0.ffn_up.weight":
            rows, cols = info.shape
            w.add_tensor(info.name, np.zeros((rows, cols // 32 * 18), np.uint8), raw_dtype=Q.IQ4_NL)
        else:
            w.add_tensor(info.name, np.array(raw).view(np.float32).reshape(info.shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=r"iq2\.gguf: tensor 'blk\.0\.ffn_up\.weight' uses quantization type IQ4_NL"):
        load_model(path2, device="cpu", progress=False)


def _gguf_type(v):
    from gguf.constants import GGUFValueType

    return GGUFValueType.FLOAT32 if isinstance(v, float) else GGUFValueType.UINT32


def test_hf_dir_unknown_model_type(tmp_path):
    hf = make_hf_model("llama")
    hf.save_pretrained(tmp_path / "d")
    cfg = (tmp_path / "d" / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "bert"')
    (tmp_path / "d" / "config.json").write_text(cfg)
    with pytest.raises(ModelLoadError, match=r"config\.json: unknown architecture model_type='bert'"):
        load_weights(tmp_path / "d")


def test_weights_not_matching_architecture_name_the_keys(tmp_path):
    hf = make_hf_model("llama")
    hf.save_pretrained(tmp_path / "d")
    from model.hf_loader import read_hf_dir

    args, state = read_hf_dir(tmp_path / "d")
    del state["layers.1.ffn_norm.weight"]
    with pytest.raises(ModelLoadError, match=r"missing: \['layers\.1\.ffn_norm\.weight'\]"):
        build_model(args, state, source=tmp_path / "d")


def test_truncated_safetensors(tmp_path):
    hf = make_hf_model("llama")
    hf.save_pretrained(tmp_path / "d")
    f = tmp_path / "d" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: cannot read safetensors"):
        load_weights(tmp_path / "d")
    shutil.rmtree(tmp_path / "d")


@pytest.mark.slow
def test_read_metadata_equals_gguf_reader():
    """Our fast header parser returns what gguf.GGUFReader reads, as plain Python values."""
    from gguf import GGUFReader

    from model.gguf_meta import read_header, read_metadata

    meta = read_metadata(SMOLLM2_GGUF)
    reader = GGUFReader(SMOLLM2_GGUF)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        want = field.contents()
        assert meta[key] == pytest.approx(want) if isinstance(want, float) else meta[key] == want, key
    assert set(meta) == {k for k in reader.fields if not k.startswith("GGUF.")}
    assert isinstance(meta["tokenizer.ggml.tokens"], list) and isinstance(meta["tokenizer.ggml.tokens"][0], str)
    tensors = read_header(SMOLLM2_GGUF).tensors
    assert [(t.name, t.offset, t.n_bytes) for t in tensors] == [
        (t.name, t.data_offset, t.n_bytes) for t in reader.tensors
    ]


def test_old_style_hf_configs(tmp_path):
    """config.json written by transformers < 5 (rope_theta / rope_scaling / rope_local_base_freq)."""
    from model.hf_loader import args_from_hf_config

    gemma = {"model_type": "gemma3", "text_config": {
        "head_dim": 256, "hidden_size": 2560, "intermediate_size": 10240, "num_attention_heads": 8,
        "num_hidden_layers": 34, "num_key_value_heads": 4, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
        "rope_local_base_freq": 10000.0, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "rope_theta": 1000000.0, "sliding_window": 1024, "vocab_size": 262208, "max_position_embeddings": 131072}}
    args = args_from_hf_config(gemma, tmp_path / "config.json")
    assert args.family == "gemma3" and args.rope_scaling == "linear" and args.rope_scaling_factor == 8.0
    assert args.rope_theta == 1e6 and args.rope_local_theta == 1e4 and args.tie_embeddings
    assert args.layer_types[:6] == ("sliding",) * 5 + ("global",) and args.sliding_window == 1024
    llama32 = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
               "num_hidden_layers": 16, "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
               "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
               "tie_word_embeddings": True, "vocab_size": 128256, "max_position_embeddings": 131072}
    args = args_from_hf_config(llama32, tmp_path / "config.json", max_seq_len=4096)
    assert (args.rope_scaling, args.rope_scaling_factor, args.rope_original_context) == ("llama3", 32.0, 8192)
    assert args.rope_theta == 500000.0 and args.head_dim == 64 and args.max_seq_len == 4096
    with pytest.raises(ModelLoadError, match="rope scaling type 'yarn'"):
        args_from_hf_config({**llama32, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, tmp_path)
