"""X-LoRA stays refused, and the reason the refusal gives is checked against peft itself: the
folder peft 0.21.2's ``save_pretrained`` writes does not determine the model (the classifier is
not in ``adapter_model.safetensors``, a reload gives other logits), while the classifier's
tensors saved with one call (a filtered ``state_dict``) plus the expert folders do reproduce it —
what a routed export would read.  If a peft upgrade starts saving the classifier, the first
assertion fails and the refusal's wording must be revisited."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_run import run  # tests/cli_run.py

EXPERTS = {"e0": ["q_proj", "v_proj"], "e1": ["q_proj", "down_proj"]}


def _lora_expert(base_dir, out, seed, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(out)
    return out


def _xlora(base_dir, experts, classifier_seed=None):
    from peft import XLoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True).eval()
    model.config.use_cache = False
    cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=model.config.hidden_size, xlora_depth=1,
                      adapters={str(i): str(v) for i, v in enumerate(experts.values())})  # peft names them 0, 1, ...
    pm = get_peft_model(model, cfg).eval()
    if classifier_seed is not None:
        g = torch.Generator().manual_seed(classifier_seed)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "internal_xlora_classifier" in n:
                    p.copy_(torch.randn(p.shape, generator=g))
    return pm


def test_xlora_refusal_reason_holds(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    experts = {k: _lora_expert(tiny_llama_dir, tmp_path / k, i + 1, t) for i, (k, t) in enumerate(EXPERTS.items())}
    xl = _xlora(tiny_llama_dir, experts, classifier_seed=5)
    ids = torch.tensor([[1, 7592, 2088, 2003, 102, 55, 999]])
    with torch.no_grad():
        want = xl(input_ids=ids).logits
    folder = tmp_path / "xlora"
    xl.save_pretrained(folder)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert not [k for k in saved if "internal_xlora_classifier" in k]  # the classifier is not saved
    base = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, local_files_only=True).eval()
    base.config.use_cache = False
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(base, str(folder)).eval()(input_ids=ids).logits
    assert (reloaded - want).abs().max() > 0.1  # so the folder does not determine the model

    # one documented call saves the classifier; with the expert folders it reproduces the model
    classifier = {k: v for k, v in xl.state_dict().items() if "internal_xlora_classifier" in k}
    save_file(classifier, str(tmp_path / "xlora_classifier.safetensors"))
    again = _xlora(tiny_llama_dir, experts)
    missing = again.load_state_dict(load_file(str(tmp_path / "xlora_classifier.safetensors")), strict=False)
    assert not missing.unexpected_keys
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, want, atol=1e-6)

    rc, _, err = run(["export", tiny_llama_dir, "-o", tmp_path / "out" / "model.onnx", "--adapter", folder])
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "peft_type 'XLORA' is not exported" in err and "classifier" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "XLORA"
