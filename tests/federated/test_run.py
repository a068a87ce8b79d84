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


def test_a_deployed_server_reads_the_run_flags_then_its_own():
    from fora.federated.run import server_argv

    config = {"flags": "--num_rounds 2", "server-flags": "--model_name_or_path '/models/my base' --output_dir out"}
    assert server_argv(config) == ["--num_rounds", "2", "--model_name_or_path", "/models/my base", "--output_dir", "out"]
    assert server_argv({}) == []


NODE = {"partition-id": 0, "data-file": "/data/site.json", "model-path": "/models/site base"}


@pytest.mark.parametrize("flags, named", [
    ("--trust_remote_code", "--trust_remote_code"),
    ("--lora_rank 4 --trust_remote", "--trust_remote_code"),  # an abbreviation is the flag it abbreviates
    ("--model_name_or_path /models/theirs", "--model_name_or_path"),
    ("--train_file /etc/passwd", "--train_file"),
    ("--cache_dir /elsewhere", "--cache_dir"),
    ("--output_dir /elsewhere", "--output_dir"),
    ("--report_to wandb", "--report_to"),
    ("--deepspeed ds_config.json", "--deepspeed"),
    ("--lora_config /etc/lora.json", "--lora_config"),
    ("--no_such_flag 1", "--no_such_flag"),
])
def test_a_site_refuses_run_flags_outside_its_training_settings_naming_the_flag(flags, named):
    from fora.federated.run import SiteRefusal, site_argv

    with pytest.raises(SiteRefusal) as refusal:
        site_argv({"flags": f"--learning_rate 1e-3 {flags}"}, NODE)
    assert f"set {named}," in str(refusal.value) and "\n" not in str(refusal.value)
    with pytest.raises(SiteRefusal, match="argument file"):
        site_argv({"flags": "/srv/args.yaml"}, NODE)


def test_a_site_takes_training_settings_from_the_run_and_the_rest_from_its_node_config(tmp_path, monkeypatch):
    from fora.federated.run import SiteRefusal, parse, site_argv

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # restored after the test
    flags = site_argv({"flags": "--lora_rank 4 --learning_rate 1e-3 --num_rounds 5 --local_steps 2", "server-flags": "--trust_remote_code"},
                      {**NODE, "cache-dir": str(tmp_path), "trust-remote-code": True, "device": "cpu"})
    run = parse(flags)
    assert (run.finetuning.lora_rank, run.training.learning_rate, run.federated.num_rounds) == (4, 1e-3, 5)
    assert (run.model.model_name_or_path, run.model.trust_remote_code, run.data.cache_dir) == ("/models/site base", True, str(tmp_path))
    assert run.training.use_cpu and run.training.report_to == []
    assert not parse(site_argv({"flags": ""}, NODE)).model.trust_remote_code  # remote code only when the site says so
    site_argv({"flags": ""}, {**NODE, "device": "cuda:1"})
    import os
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"  # the site's process sees its GPU alone
    with pytest.raises(SiteRefusal, match="model-path"):
        site_argv({"flags": ""}, {"data-file": "x"})
    with pytest.raises(SiteRefusal, match="device='gpu'"):
        site_argv({"flags": ""}, {**NODE, "device": "gpu"})
