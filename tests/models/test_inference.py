"""fora/models/inference.py: the model prediction loads, an adapter kept unmerged in half precision."""

import pytest
import torch

from fora import precision
from fora.models.inference import load_inference_model
from fora.run import RunRecord

pytestmark = pytest.mark.usefixtures("one_thread")


# --- prediction scores the model that was trained -----------------------------------------------------


def trained_like_adapter(base, folder, dtype: str):
    """A LoRA adapter whose factors are all non-zero (std 0.5), as after training, with its run record."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.5)
    model.save_pretrained(folder)
    RunRecord(base_model=str(base), finetuning_type="lora", torch_dtype=dtype).save(folder)
    return folder


def test_half_precision_prediction_keeps_the_adapter_unmerged(tmp_path, tiny_model, monkeypatch):
    """In bf16 the logits prediction decodes from are the unmerged PeftModel's, bit for bit; merged bf16
    weights would round much of dW away. In float32 the adapter is merged (same outputs up to rounding)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)  # bf16 is emulated on CPUs without it: slow, still exact
    adapter = trained_like_adapter(tiny_model, tmp_path / "adapter", "bfloat16")
    ids = torch.tensor([[1, 200, 300, 400, 500, 600]])
    model, _, info = load_inference_model(str(adapter))
    assert info["torch_dtype"] == "bfloat16" and not info["merged"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    reference = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
        merged = reference.merge_and_unload()(ids).logits
        assert not torch.equal(merged, model(ids).logits)  # what merging in bf16 would have scored

    model32, _, info32 = load_inference_model(str(adapter), torch_dtype="float32")
    assert info32["merged"]
    unmerged32 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(model32(ids).logits, unmerged32(ids).logits, rtol=1e-5, atol=1e-5)
