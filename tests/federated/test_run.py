"""fora/federated/run.py: what travels between sites, FoRA's extra factors included."""

import pytest
import torch

from fora.federated.run import adapter_state
from fora.models.load import load_model
from fora.tuners.attach import attach_adapter

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_fora_adapter_travels_whole_between_two_sites(tiny_model):
    """FoRA's extra factors are part of what travels: a second site that loads the tensors computes the same outputs."""
    from fora.args import FinetuningArguments
    from fora.federated.run import load_adapter_state

    def site(seed: int):
        torch.manual_seed(seed)
        model = attach_adapter(load_model(str(tiny_model), torch.float32),
                                        FinetuningArguments(finetuning_type="fora", lora_rank=4))
        with torch.no_grad():  # a trained adapter: every factor away from its initial value
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        return model.eval()

    trained, other = site(0), site(1)
    ids = torch.tensor([[1, 200, 300, 400]])
    assert not torch.allclose(trained(ids).logits, other(ids).logits, atol=1e-5)
    payload = adapter_state(trained)
    assert len({name.rsplit(".", 2)[-2] for name in payload}) > 2  # more factors than LoRA's A and B
    load_adapter_state(other, payload)
    torch.testing.assert_close(other(ids).logits, trained(ids).logits)
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter_state(other, dict(list(payload.items())[1:]))


def test_a_deployment_reads_its_flags_from_the_run_config():
    from fora.federated.run import argv_from_run_config

    config = {"flags": "--model_name_or_path '/models/my base' --num_rounds 2", "other": 1}
    assert argv_from_run_config(config) == ["--model_name_or_path", "/models/my base", "--num_rounds", "2"]
    assert argv_from_run_config({}) == []
