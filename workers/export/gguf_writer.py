"""Write a Llama-architecture Hugging Face causal LM as a GGUF file that llama.cpp, Ollama and
transformers (`from_pretrained(..., gguf_file=...)`) read.

Names come from the `gguf` package's tensor-name table (`get_tensor_name_map`), never typed here.
Two layout rules of llama.cpp's own converter (`convert_hf_to_gguf.py`, `LlamaModel`) apply:

- Q and K projections are stored with each head's rows interleaved for llama.cpp's rotary
  embedding (`llama_cpp_permute`); transformers' GGUF loader undoes exactly this on reading.
- Tied embeddings (`tie_word_embeddings`): no `output.weight`; readers reuse `token_embd.weight`.

    write_gguf(model, tokenizer, Path("model.f16.gguf"), quant="f16", name="smollm2-news")
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np

SUPPORTED_QUANTS = ("f16", "q8_0")
Q8_0_BLOCK = 32  # values per Q8_0 block: a row must be a multiple of it


class GGUFExportError(ValueError):
    """The model cannot be written as GGUF (architecture, quant, tokenizer), or the disk filled up."""


class NotLlamaArchitecture(GGUFExportError):
    """The model is not a plain Llama-architecture causal LM."""


def check_llama(config: Any) -> None:
    """Refuse what this writer would write wrongly.

    Raises:
        NotLlamaArchitecture: another architecture, biases, or a RoPE scaling the writer does not carry.
    """
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise NotLlamaArchitecture(
            f"the base model is a {model_type!r} model, not Llama-architecture: GGUF export writes Llama only "
            f"(export it with format 'merged' or 'peft' instead)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise NotLlamaArchitecture("the base model has attention or MLP biases, which llama.cpp's Llama graph "
                                   "does not read: export it with format 'merged' instead")
    rope = _rope(config)
    if rope.get("rope_type", "default") != "default":
        raise NotLlamaArchitecture(f"the base model uses RoPE scaling {rope.get('rope_type')!r}, which this writer "
                                   f"does not carry into GGUF: export it with format 'merged' instead")


def _rope(config: Any) -> dict[str, Any]:
    # transformers >= 5 keeps rope_theta inside rope_parameters; 4.x had rope_theta/rope_scaling attributes.
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Reorder a Q or K projection's rows the way llama.cpp's rotary embedding reads them.

    Hugging Face rotates each head's first half against its second half; llama.cpp rotates adjacent
    pairs. Per head, rows (0..d/2-1, d/2..d-1) become (0, d/2, 1, d/2+1, ...).
    Shapes: w (n_head * head_dim, hidden) -> same shape.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_tensors(state_dict: dict[str, Any], config: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in GGUF layout) for every tensor a Llama GGUF holds.

    Raises:
        GGUFExportError: a tensor has no name in the gguf package's Llama table.
    """
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_head, n_head_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in state_dict.items():
        if "rotary_emb" in hf_name or (tied and hf_name == "lm_head.weight"):
            continue  # recomputed by readers / the same tensor as token_embd
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFExportError(f"tensor {hf_name!r} has no GGUF name in the gguf package's Llama table; "
                                  f"is this a plain LlamaForCausalLM?")
        arr = tensor.detach().float().cpu().numpy()
        if name.endswith("attn_q.weight"):
            arr = llama_cpp_permute(arr, n_head, n_head)
        elif name.endswith("attn_k.weight"):
            arr = llama_cpp_permute(arr, n_head, n_head_kv)
        yield name, arr


def _encode(arr: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    """The array as stored, and its GGML type (None: the writer takes it from the numpy dtype)."""
    if arr.ndim == 1:
        return arr.astype(np.float32), None  # norms stay F32, as llama.cpp's converter keeps them
    if quant == "q8_0" and arr.shape[-1] % Q8_0_BLOCK == 0:
        return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return arr.astype(np.float16), None


def _tokenizer_dir_files(tokenizer, tmp: Path) -> Path:
    tokenizer.save_pretrained(tmp)
    return tmp


def _vocab(tokenizer, n_vocab: int, tok_dir: Path) -> tuple[str, list[str], list[float] | None, list[int]]:
    """(tokenizer model name, tokens, scores, token types) as llama.cpp's converter builds them."""
    raw = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = raw.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):  # SentencePiece-style (LLaMA-2)
        vocab = gguf.LlamaHfVocab(tok_dir)
        toks = list(vocab.all_tokens())
        tokens = [t.decode("utf-8") for t, _, _ in toks]
        scores, types = [s for _, s, _ in toks], [int(k) for _, _, k in toks]
        kind = "llama"
    elif model.get("type") == "BPE":  # byte-level BPE (GPT-2 style: SmolLM2, Llama 3)
        reverse = {i: t for t, i in tokenizer.get_vocab().items()}
        added = {t: i for t, i in tokenizer.get_added_vocab().items()}
        decoder = tokenizer.added_tokens_decoder
        tokens, types, scores = [], [], None
        for i in range(max(len(reverse), n_vocab)):
            tok = reverse.get(i)
            if tok is None:
                tokens.append(f"[PAD{i}]")
                types.append(int(gguf.TokenType.UNUSED))
            elif tok in added:
                tokens.append(tok)
                special = getattr(decoder.get(i), "special", True)
                types.append(int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED))
            else:
                tokens.append(tok)
                types.append(int(gguf.TokenType.NORMAL))
        kind = "gpt2"
    else:
        raise GGUFExportError(f"tokenizer model {model.get('type')!r} is not one this writer converts "
                              f"(byte-level BPE or SentencePiece-style BPE)")
    if len(tokens) != n_vocab:
        raise GGUFExportError(f"the tokenizer has {len(tokens)} tokens but the model's embedding has {n_vocab} rows")
    return kind, tokens, scores, types


def _add_tokenizer(writer, tokenizer, n_vocab: int, tok_dir: Path, pre: str) -> None:
    kind, tokens, scores, types = _vocab(tokenizer, n_vocab, tok_dir)
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tok_dir, load_merges=kind == "gpt2", n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)
    # Whether the tokenizer puts BOS in front, as newslora's prompts were tokenized in training.
    probe = tokenizer("x", add_special_tokens=True)["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    writer.add_add_bos_token(adds_bos)
    if kind == "gpt2":
        writer.add_add_space_prefix(False)


def base_tokenizer_pre(base_dir: Path) -> str:
    """llama.cpp's pre-tokenizer name, from the GGUF the base model was converted from (else 'default')."""
    src = base_dir / "newslora_source.json"
    if src.is_file():
        try:
            info = json.loads(src.read_text())
            reader = gguf.GGUFReader(str(Path(info["gguf_dir"]) / info["gguf_file"]))
            field_ = reader.fields.get("tokenizer.ggml.pre")
            if field_ is not None:
                return str(field_.contents())
        except (OSError, ValueError, KeyError):
            pass
    return "default"


def write_gguf(model, tokenizer, path: Path, *, quant: str, name: str, tokenizer_pre: str = "default",
               description: str | None = None) -> dict[str, Any]:
    """Write `model` (a LlamaForCausalLM, weights already merged) and its tokenizer to one GGUF file.

    The file appears at `path` only once complete (written next to it, then renamed); on any error,
    a full disk included, the partial file is removed.

    Args:
        quant: "f16" (matrices f16, norms f32) or "q8_0" (matrices Q8_0, norms f32).
        tokenizer_pre: llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`), e.g. "smollm".

    Returns:
        {"path", "bytes", "quant", "n_tensors", "tied_embeddings"}.

    Raises:
        GGUFExportError: unsupported quant, non-Llama model, a tokenizer it cannot convert, or a full disk.
    """
    if quant not in SUPPORTED_QUANTS:
        raise GGUFExportError(f"unsupported GGUF quant {quant!r}: use one of {', '.join(SUPPORTED_QUANTS)}")
    cfg = model.config
    check_llama(cfg)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    n_vocab = model.get_input_embeddings().weight.shape[0]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        if description:
            writer.add_description(description)
        writer.add_context_length(int(cfg.max_position_embeddings))
        writer.add_embedding_length(int(cfg.hidden_size))
        writer.add_block_count(int(cfg.num_hidden_layers))
        writer.add_feed_forward_length(int(cfg.intermediate_size))
        writer.add_head_count(int(cfg.num_attention_heads))
        writer.add_head_count_kv(int(cfg.num_key_value_heads or cfg.num_attention_heads))
        writer.add_rope_dimension_count(int(head_dim))
        writer.add_rope_freq_base(float(_rope(cfg)["rope_theta"]))
        writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        writer.add_vocab_size(int(n_vocab))
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        with tempfile.TemporaryDirectory() as tok_tmp:
            tok_dir = _tokenizer_dir_files(tokenizer, Path(tok_tmp))
            _add_tokenizer(writer, tokenizer, n_vocab, tok_dir, tokenizer_pre)
        n = 0
        for gname, arr in gguf_tensors(model.state_dict(), cfg):
            data, raw_dtype = _encode(arr, quant)
            writer.add_tensor(gname, data, raw_dtype=raw_dtype)
            n += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except OSError as e:
        _discard(writer, tmp)
        if e.errno == errno.ENOSPC:
            raise GGUFExportError(f"the disk filled up while writing {path.name} (partial file removed): free "
                                  f"space under {path.parent} and run the export again") from e
        raise
    except BaseException:
        _discard(writer, tmp)
        raise
    return {"path": str(path), "bytes": path.stat().st_size, "quant": quant, "n_tensors": n,
            "tied_embeddings": bool(getattr(cfg, "tie_word_embeddings", False))}


def _discard(writer, tmp: Path) -> None:
    try:
        writer.close()
    except Exception:  # noqa: BLE001 - the write already failed; removing the file is what matters
        pass
    tmp.unlink(missing_ok=True)
