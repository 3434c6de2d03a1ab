"""operators.models.bert: the lean BERT encoder gives transformers' vectors, and steps aside where it cannot."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from operators.embed.embedder import gather_padded, token_batches
from operators.models.bert import load_bert_encoder
from operators.models.registry import load, resolve
from operators.preprocess.transforms import tokenizer_for

SENTENCES = ["A cat sat on the mat.", "Ray Data streams blocks between operators.",
             "short", "The quick brown fox jumps over the lazy dog, again and again and again.",
             "Embeddings of paraphrases are close; unrelated sentences are far apart."]


def _batches(spec, texts):  # noqa: ANN001
    ids = tokenizer_for(spec.preprocessing).encode(texts)
    lengths = np.array([len(x) for x in ids])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = np.concatenate(ids).astype(np.int64)
    everything = np.arange(len(texts))  # one batch padded to the longest, then featx's own batches
    return [gather_padded(values, offsets, idx) for idx in [everything, *token_batches(lengths, 2)]]


def test_minilm_fast_encoder_gives_transformers_vectors() -> None:
    spec = resolve("minilm-l6")
    hf, fast = load(spec, "cpu"), load(spec, "cpu", for_inference=True)
    assert type(hf.module).__name__ == "BertModel" and type(fast.module).__name__ == "BertEncoder"
    assert fast.dim == hf.dim == 384
    batches = _batches(spec, SENTENCES * 3)
    assert any(int(m.min()) == 0 for _, m in batches) and any(int(m.min()) == 1 for _, m in batches)  # padded, not
    for ids, mask in batches:
        np.testing.assert_allclose(fast.embed_tokens(ids, mask), hf.embed_tokens(ids, mask), atol=2e-6)


def test_cls_pooling_matches_transformers_too(tiny_bert: str) -> None:
    from operators.models.registry import ModelOptions

    spec = resolve(f"hf:{tiny_bert}", ModelOptions(pooling="cls"))
    hf, fast = load(spec, "cpu"), load(spec, "cpu", for_inference=True)
    assert fast.mask_optional and not hf.mask_optional  # transformers' modules always get the mask
    for ids, mask in _batches(spec, SENTENCES):
        np.testing.assert_allclose(fast.embed_tokens(ids, mask), hf.embed_tokens(ids, mask), atol=1e-5)


def test_a_fresh_process_embeds_with_the_fast_encoder_without_transformers() -> None:
    code = ("import sys; from operators.models.registry import load, resolve; import numpy as np; "
            "bb = load(resolve('minilm-l6'), 'cpu', for_inference=True); "
            "v = bb.embed_tokens(np.array([[101, 7592, 102]]), np.ones((1, 3), dtype=np.int64)); "
            "print(v.shape, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[3]).stdout
    assert out.strip().endswith("(1, 384) False")


def test_checkpoints_with_heads_and_old_names_load(tiny_bert: str, tmp_path: Path) -> None:
    """A BertForMaskedLM-style file (``bert.`` prefix, LayerNorm gamma/beta, extra heads) -> the same encoder."""
    from safetensors.torch import load_file, save_file

    ref = load_bert_encoder(tiny_bert)
    assert ref is not None
    sd = {("bert." + k).replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in load_file(str(Path(tiny_bert) / "model.safetensors")).items()}
    sd["cls.predictions.bias"] = torch.zeros(30522)
    folder = tmp_path / "mlm"
    shutil.copytree(tiny_bert, folder)
    save_file(sd, str(folder / "model.safetensors"))
    other = load_bert_encoder(str(folder))
    assert other is not None
    ids, mask = torch.tensor([[101, 2000, 2001, 102, 0]]), torch.tensor([[1, 1, 1, 1, 0]])
    with torch.inference_mode():
        assert torch.equal(other(ids, mask), ref(ids, mask))


def test_tiny_bert_matches_transformers_and_other_architectures_step_aside(tiny_bert: str, tmp_path: Path) -> None:
    spec = resolve(f"hf:{tiny_bert}")
    hf, fast = load(spec, "cpu"), load(spec, "cpu", for_inference=True)
    assert type(fast.module).__name__ == "BertEncoder"
    for ids, mask in _batches(spec, SENTENCES):
        np.testing.assert_allclose(fast.embed_tokens(ids, mask), hf.embed_tokens(ids, mask), atol=1e-5)
    for change in ({"position_embedding_type": "relative_key"}, {"model_type": "roberta"}, {"hidden_act": "relu"}):
        folder = tmp_path / next(iter(change.values()))
        shutil.copytree(tiny_bert, folder)
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **change}))
        assert load_bert_encoder(str(folder)) is None  # transformers runs these
    half = tmp_path / "fp16"  # transformers computes a half checkpoint in half: not the same vectors
    shutil.copytree(tiny_bert, half)
    from safetensors.torch import load_file, save_file

    save_file({k: v.half() for k, v in load_file(str(half / "model.safetensors")).items()}, str(half / "model.safetensors"))
    assert load_bert_encoder(str(half)) is None
    (tmp_path / "broken").mkdir()
    shutil.copy(Path(tiny_bert) / "config.json", tmp_path / "broken" / "config.json")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"not a safetensors file")
    assert load_bert_encoder(str(tmp_path / "broken")) is None  # transformers reports the error
    (tmp_path / "no-weights").mkdir()
    shutil.copy(Path(tiny_bert) / "config.json", tmp_path / "no-weights" / "config.json")
    assert load_bert_encoder(str(tmp_path / "no-weights")) is None
