"""Synthetic LLaMA model folders for the scale measurements (issue #12): seeded random weights in
the shapes of real small decoders, vocabulary 49152, tied embeddings, float32 safetensors.

====  ======  ============  ======  =====  =======  ====================  ============
size  hidden  intermediate  layers  heads  kv       parameters            float32 file
====  ======  ============  ======  =====  =======  ====================  ============
135M     576          1536      30      9        3  134.5 M (SmolLM2-135M)     538 MB
360M     960          2560      32     15        5  361.8 M (SmolLM2-360M)    1447 MB
1B      2048          5632      22     32        4  1.07 B (TinyLlama-1.1B)   4276 MB
====  ======  ============  ======  =====  =======  ====================  ============

Every weight matrix is N(0, 0.02²) (transformers' ``initializer_range``), every norm is ones,
each tensor drawn from its own generator seeded by (seed, tensor name): the bytes depend only on
the size and the seed, never on the order of writing.  Tensors are written one at a time
(:class:`quantseal.tensorfile.SafetensorsWriter`), so making the 1B folder holds one matrix in
memory, not the model.  The tokenizer is the bundled MiniLM's (30522 WordPiece ids, all below the
vocabulary size): enough for calibration text and export.  ``shard_bytes`` writes Hugging Face
shards (``model-00001-of-0000N.safetensors`` + ``model.safetensors.index.json``) instead of one
``model.safetensors``.

    python benchmarks/synthetic_llama.py 1B /work/scale_models/llama-1b [--seed 0]
    python benchmarks/synthetic_llama.py 135M DIR --layers 4 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantseal.tensorfile import SafetensorsWriter, TensorInfo  # noqa: E402

VOCAB = 49152
SIZES = {
    "135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),
    "360M": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5),
    "1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
}
INIT_STD = 0.02


def config_of(size: str, **overrides) -> dict:
    """The ``config.json`` contents of a synthetic model (``overrides`` replace fields)."""
    from transformers import LlamaConfig

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} ({', '.join(SIZES)})")
    fields = dict(vocab_size=VOCAB, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
                  tie_word_embeddings=True, initializer_range=INIT_STD, **SIZES[size])
    fields.update(overrides)
    cfg = LlamaConfig(**fields)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = "float32"
    return cfg.to_dict()


def tensor_specs(config: dict) -> dict[str, TensorInfo]:
    """Every stored tensor of the model (a tied head is not stored), from a meta-device build."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    tied = {"lm_head.weight"} if config.get("tie_word_embeddings") else set()
    return {k: TensorInfo(torch.float32, v.shape) for k, v in model.state_dict().items() if k not in tied}


def synthetic_tensor(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """The seeded value of one tensor: ones for norms (1-D), N(0, 0.02²) otherwise."""
    if len(shape) == 1:
        return torch.ones(shape)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randn(shape, generator=gen) * INIT_STD


def _tokenizer_source() -> Path:
    from quantseal.models import default_model_path

    return default_model_path()


def make_synthetic(size: str, folder: str | Path, seed: int = 0, shard_bytes: int | None = None,
                   **overrides) -> Path:
    """Write a synthetic LLaMA folder (config.json, safetensors, tokenizer.json) into ``folder``
    (created; refused if it already holds a model).  Returns the folder."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        raise FileExistsError(f"{folder}: already holds a model")
    folder.mkdir(parents=True, exist_ok=True)
    config = config_of(size, **overrides)
    specs = tensor_specs(config)
    groups: list[dict[str, TensorInfo]] = [{}]
    used = 0
    for name in sorted(specs):
        if shard_bytes is not None and groups[-1] and used + specs[name].nbytes > shard_bytes:
            groups.append({})
            used = 0
        groups[-1][name] = specs[name]
        used += specs[name].nbytes
    if len(groups) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs.values())},
                 "weight_map": {n: f for f, g in zip(files, groups) for n in g}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for f, group in zip(files, groups):
        w = SafetensorsWriter(folder / f, group, {"format": "pt"})
        try:
            for name, info in group.items():
                w.put(name, synthetic_tensor(name, info.shape, seed))
            w.close()
        except BaseException:
            w.abort()
            raise
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(_tokenizer_source() / "tokenizer.json", folder / "tokenizer.json")
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("size", choices=sorted(SIZES))
    ap.add_argument("folder", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-mb", type=int, default=None, help="write Hugging Face shards of at most this many MB")
    ap.add_argument("--layers", type=int, help="override num_hidden_layers")
    ap.add_argument("--hidden", type=int, help="override hidden_size")
    ap.add_argument("--intermediate", type=int, help="override intermediate_size")
    ap.add_argument("--heads", type=int, help="override num_attention_heads")
    ap.add_argument("--kv-heads", type=int, help="override num_key_value_heads")
    ap.add_argument("--vocab", type=int, help="override vocab_size")
    a = ap.parse_args(argv)
    names = dict(layers="num_hidden_layers", hidden="hidden_size", intermediate="intermediate_size",
                 heads="num_attention_heads", kv_heads="num_key_value_heads", vocab="vocab_size")
    over = {field: getattr(a, k) for k, field in names.items() if getattr(a, k) is not None}
    out = make_synthetic(a.size, a.folder, a.seed, None if a.shard_mb is None else a.shard_mb * 1_000_000, **over)
    total = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(json.dumps({"folder": str(out), "size": a.size, "seed": a.seed, "bytes": total, **over}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
