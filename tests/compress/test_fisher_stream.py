"""The streamed output Fisher (quantseal.compress.fisher_stream) against the whole-model backward."""

import shutil

import pytest
import torch

from quantseal.compress.fisher import floor_fisher, output_fisher
from quantseal.compress.fisher_stream import streamed_output_fisher
from quantseal.lazy_source import LazySource
from quantseal.models import DECODER, compressible_linears, embedding, load_model, model_tokenizer
from quantseal.text import calibration_texts


def _batches(folder, n=12, size=5):
    texts = calibration_texts(None, n)
    tok = model_tokenizer(folder)
    return [{k: torch.from_numpy(v) for k, v in tok(texts[i:i + size]).items()} for i in range(0, n, size)]


def _reference(folder, batches, table):
    model, fam = load_model(folder)
    params = {n: m.weight for n, m in compressible_linears(model, fam).items()}
    if table:
        params[fam.embedding_attr] = embedding(model, fam).weight
    return {n: floor_fisher(f) for n, f in output_fisher(model, fam, batches, params).items()}


@pytest.fixture(scope="module")
def untied_llama(tmp_path_factory, minilm_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("untied_llama")
    LlamaForCausalLM(cfg).eval().save_pretrained(folder, safe_serialization=True)
    shutil.copyfile(minilm_path / "tokenizer.json", folder / "tokenizer.json")
    return folder


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_streamed_fisher_equals_the_whole_model_backward(which, tiny_llama_dir, untied_llama, tmp_path, monkeypatch):
    """Every Linear's and the table's Fisher (the table: head and lookup halves when tied, the
    lookup alone when not) equals the loaded model's autograd Fisher to float32 summation order,
    with the head's vocabulary split into several chunks and every boundary spilled to disk."""
    import quantseal.compress.fisher_stream as fs

    folder = tiny_llama_dir if which == "tied" else untied_llama
    monkeypatch.setattr(fs, "CHUNK_BYTES", 4 * 64 * 7000)  # 5 vocabulary chunks of 7000 rows (30522)
    batches = _batches(folder)
    ref = _reference(folder, batches, table=True)
    refs = streamed_output_fisher(LazySource(folder), batches, tmp_path / "fisher.safetensors", table=True,
                                  cap_bytes=0)
    assert set(refs) == set(ref)
    for name, r in ref.items():
        got = refs[name].load()
        assert got.shape == r.shape
        # relative to the tensor's scale: F spans decades, and a missing half (head or lookup) or a
        # wrong batch weighting moves it by far more than 1e-4
        scale = float(r.abs().max())
        assert float((got - r).abs().max()) <= 1e-4 * scale, name
        assert torch.allclose(got, r, rtol=1e-3, atol=1e-6 * scale), name
    table = refs[DECODER.embedding_attr].load()
    # rows of ids the calibration never used still differ from the floor only through the tied head
    assert (table > table.min()).any()


def test_streamed_fisher_without_the_table(tiny_llama_dir, tmp_path):
    batches = _batches(tiny_llama_dir, n=6)
    refs = streamed_output_fisher(LazySource(tiny_llama_dir), batches, tmp_path / "f.safetensors")
    assert DECODER.embedding_attr not in refs and len(refs) == 14
    ref = _reference(tiny_llama_dir, batches, table=False)
    for name, r in ref.items():
        assert torch.allclose(refs[name].load(), r, rtol=1e-3, atol=1e-6 * float(r.abs().max())), name


def test_an_encoder_is_refused(tiny_bert_dir, tmp_path):
    with pytest.raises(ValueError, match="decoders"):
        streamed_output_fisher(LazySource(tiny_bert_dir), [], tmp_path / "f.safetensors")
    assert not (tmp_path / "f.safetensors").exists()
