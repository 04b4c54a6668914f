"""X-LoRA as a routed decoder graph (export/decoder_xlora.py): onnxruntime's logits equal peft's
XLoraModel on the same compressed weights (1e-4 of the logit scale), for a dense and a layerwise
top-k classifier; the cached step equals the full sequence (both KV caches).  And the contract's
reason, checked against peft itself: the folder peft 0.21.2's ``save_pretrained`` writes does not
determine the model (no classifier in ``adapter_model.safetensors``, a reload gives other logits),
while the classifier saved with one call (a filtered ``state_dict``) plus the expert folders do
reproduce it.  If a peft upgrade starts saving the classifier, that assertion fails and the
contract can be relaxed."""

from __future__ import annotations

import json

import numpy as np
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


def _xlora(base_dir, experts, classifier_seed=None, model=None, **options):
    from peft import XLoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    if model is None:
        model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True).eval()
    model.config.use_cache = False
    cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=model.config.hidden_size,
                      adapters={str(i): str(v) for i, v in enumerate(experts.values())},  # peft names them 0, 1, ...
                      **{"xlora_depth": 1, **options})
    pm = get_peft_model(model, cfg).eval()
    if classifier_seed is not None:
        g = torch.Generator().manual_seed(classifier_seed)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "internal_xlora_classifier" in n:
                    p.copy_(torch.randn(p.shape, generator=g))
    return pm


@pytest.fixture(scope="module")
def experts(tmp_path_factory, tiny_llama_sharp_dir):
    """Two LoRA experts written by peft (q/v and q/down), names → folders."""
    root = tmp_path_factory.mktemp("xlora_experts")
    return {k: _lora_expert(tiny_llama_sharp_dir, root / k, i + 1, t) for i, (k, t) in enumerate(EXPERTS.items())}


def test_xlora_refusal_reason_holds(tiny_llama_sharp_dir, experts, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    tiny_llama_dir = tiny_llama_sharp_dir
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

    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "XLORA"


def _save_with_classifier(xl, folder):
    xl.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in xl.state_dict().items() if "internal_xlora_classifier" in k},
              str(folder / "xlora_classifier.safetensors"))
    return folder


@pytest.mark.parametrize("options", [{}, {"xlora_depth": 2, "xlora_size": 16, "layerwise_scalings": True,
                                          "top_k_lora": 1, "softmax_temperature": 0.5},
                                     {"top_k_lora": 1, "enable_softmax": False, "enable_softmax_topk": True,
                                      "global_scaling_weight": 0.7},
                                     {"scaling_pass_value": 0.5, "softmax_temperature": 2.5},
                                     {"scaling_pass_value": 0.25, "top_k_lora": 2, "enable_softmax": False,
                                      "enable_softmax_topk": True, "layerwise_scalings": True}],
                         ids=["dense", "layerwise-top1", "softmax-topk", "scaling-pass", "scaling-pass-topk-all"])
def test_routed_export_matches_peft(options, llama_rtn_export, experts, tmp_path):
    import onnx

    from peft_base import plain_linears
    from quantseal import checkpoint as ckpt
    from quantseal.runtime.pipelines import CausalLM

    ck, report = llama_rtn_export
    compressed = plain_linears(ckpt.load_compressed(ck)[0]).eval()
    xl = _xlora(None, experts, classifier_seed=7, model=compressed, **options)
    folder = _save_with_classifier(xl, tmp_path / "xlora")
    ids = torch.tensor([[1, 7592, 2088, 2003, 102, 55, 999, 3231, 1012]])
    with torch.no_grad():
        want = xl(input_ids=ids).logits.numpy()
        scalings = xl.get_latest_scalings()
    assert scalings.shape[-1] == 2 and (scalings[..., 0] != scalings[..., 1]).any()
    if options.get("scaling_pass_value"):  # the scaling pass's mix does change peft's logits
        xl.set_scaling_pass_value(0)
        with torch.no_grad():
            assert np.abs(xl(input_ids=ids).logits.numpy() - want).max() > 1e-3 * np.abs(want).max()
        xl.set_scaling_pass_value(options["scaling_pass_value"])

    out = tmp_path / "onnx" / "model.onnx"
    rc, stdout, err = run(["export", ck, "-o", out, "--adapter", folder, "--accuracy-level", "0"])
    assert rc == 0, err
    lm = CausalLM(out, provider="cpu")
    got = lm.logits(ids.numpy())[0]
    scale = np.abs(want).max()
    assert np.abs(got - want[0]).max() <= 1e-4 * scale
    base = CausalLM(report["path"], provider="cpu").logits(ids.numpy())[0]
    assert np.abs(base - want[0]).max() > 0.05 * scale  # the routed experts matter
    first, past = lm.step(ids[:, :5].numpy(), np.ones((1, 5), np.int64))
    second, _ = lm.step(ids[:, 5:].numpy(), np.ones((1, 9), np.int64), past)
    np.testing.assert_allclose(np.concatenate([first, second], 1)[0], got, atol=1e-5 * scale)
    names = {i.name for i in onnx.load(str(out)).graph.input}
    assert "scaling_past.0.key" in names and "past_key_values.1.value" in names
    assert not (out.parent / "genai_config.json").exists()
    from quantseal.inspect import inspect_path

    rows = inspect_path(out)["matrices"]  # each matrix once, its bytes the manifest's (both passes read them)
    assert all(r["op"] == "MatMulNBits" and r["bytes"] == r["manifest_bytes"] for r in rows) and len(rows) == 14


def test_xlora_refusals(llama_rtn_export, tiny_llama_sharp_dir, experts, tmp_path):
    ck, _ = llama_rtn_export
    bare = tmp_path / "bare"
    _xlora(tiny_llama_sharp_dir, experts, classifier_seed=3).save_pretrained(bare)  # no classifier file
    cases = {"no classifier": ([ck, "--adapter", bare], "no xlora_classifier.safetensors"),
             "with another adapter": ([ck, "--adapter", bare, "--adapter", experts["e0"]], "export it alone"),
             "adapter rank": ([ck, "--adapter", _save_with_classifier(_xlora(tiny_llama_sharp_dir, experts, 3),
                                                                      tmp_path / "full"), "--adapter-rank", "2"],
                              "routes its experts unfolded"),
             "scaling pass + top-k": ([ck, "--adapter", _save_with_classifier(
                 _xlora(tiny_llama_sharp_dir, experts, 3, scaling_pass_value=0.5, top_k_lora=1), tmp_path / "tk")],
                 "scaling_pass_value=0.5 with top_k_lora=1 < 2 experts")}
    for name, (argv, msg) in cases.items():
        out = tmp_path / name / "model.onnx"
        rc, _, err = run(["export", argv[0], "-o", out, *argv[1:]])
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not out.parent.exists() or not list(out.parent.iterdir()), name


def test_xlora_refuses_phi3_by_name():
    """Phi-3's fused qkv_proj / gate_up_proj have no place in the routed graph: one line naming it."""
    from transformers import Phi3Config

    from quantseal.errors import Unsupported
    from quantseal.export.decoder_xlora import build_xlora_decoder

    cfg = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     max_position_embeddings=32, original_max_position_embeddings=32, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2).to_dict()
    with pytest.raises(Unsupported, match="phi3"):
        build_xlora_decoder(None, None, cfg, None)


def test_float16_routed_graph_for_cuda(llama_rtn_export, experts, tmp_path):
    """``--dtype fp16`` (the CUDA execution provider's graph): float16 activations, both caches and
    logits, the classifier and scalings in float32; onnxruntime's CPU kernels run it here within
    float16 rounding of the float32 routed graph (itself = peft to 1e-4), over both caches too.
    Folded adapters stay float32-only, refused by name."""
    import onnx

    from quantseal.runtime.pipelines import CausalLM

    ck, _ = llama_rtn_export
    folder = _save_with_classifier(_xlora(None, experts, classifier_seed=7, model=_compressed(ck),
                                          scaling_pass_value=0.5, layerwise_scalings=True), tmp_path / "xlora")
    paths = {d: tmp_path / d / "model.onnx" for d in ("fp32", "fp16")}
    for d, out in paths.items():
        rc, _, err = run(["export", ck, "-o", out, "--adapter", folder, "--accuracy-level", "0", "--dtype", d])
        assert rc == 0, err
    proto = onnx.load(str(paths["fp16"]))
    types = {i.name: i.type.tensor_type.elem_type for i in [*proto.graph.input, *proto.graph.output]}
    assert types["logits"] == types["scaling_past.0.key"] == types["past_key_values.1.value"] == onnx.TensorProto.FLOAT16
    ids = np.array([[1, 7592, 2088, 2003, 102, 55, 999, 3231, 1012]])
    full, half = CausalLM(paths["fp32"], provider="cpu"), CausalLM(paths["fp16"], provider="cpu")
    a, b = full.logits(ids), half.logits(ids)
    scale = np.abs(a).max()
    assert 0 < np.abs(a - b).max() <= 1e-2 * scale
    first, past = half.step(ids[:, :5], np.ones((1, 5), np.int64))
    assert past["scaling_past.0.key"].dtype == np.float16
    second, _ = half.step(ids[:, 5:], np.ones((1, 9), np.int64), past)
    np.testing.assert_allclose(np.concatenate([first, second], 1), b, atol=2e-3 * scale)
    rc, _, err = run(["export", ck, "-o", tmp_path / "folded" / "model.onnx", "--adapter", experts["e0"],
                      "--dtype", "fp16"])
    assert rc == 2 and "--dtype fp16 with folded adapters is not supported yet" in err


def _compressed(ck):
    from peft_base import plain_linears
    from quantseal import checkpoint as ckpt

    return plain_linears(ckpt.load_compressed(ck)[0]).eval()
