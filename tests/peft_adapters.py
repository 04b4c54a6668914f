"""A LoRA adapter folder written by the real peft library, for the adapter tests."""

from __future__ import annotations

from pathlib import Path

import torch


def peft_lora(base_dir: Path, out: Path, seed: int, scale: float = 0.3, **lora) -> Path:
    """``LoraConfig(**lora)`` on the float model of ``base_dir``, saved to ``out``; lora_B seeded
    non-zero (N(0, scale²)), since peft initialises it to zero (a no-op adapter)."""
    from peft import LoraConfig, get_peft_model

    from quantseal.models import load_model

    model, _ = load_model(base_dir)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    peft_model.save_pretrained(out)
    return out
