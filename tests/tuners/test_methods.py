"""fora/tuners/methods.py: every method's refusals before loading, the fast paths each method is allowed
(checked against PEFT's own forward), the LoRA variants, and every method through train, predict and merge."""

import json
import math

import pytest
import torch
from peft import PeftModel

from fora.args import FinetuningArguments, TrainArguments
from fora.errors import UserError
from fora.models.load import load_model
from fora.run import RunRecord
from fora.train.trainer import SupervisedTrainer
from fora.tuners.attach import attach_adapter
from fora.tuners.methods import METHODS, check_method
from support import random_batch, trainer_loss_and_grads

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPTERS = [name for name, method in METHODS.items() if method.adapter]
LORA_VARIANTS = {  # LoRA flags whose layers the addmm fast path runs (DoRA through PEFT's own variant)
    "dora": dict(use_dora=True), "rslora": dict(use_rslora=True), "gaussian": dict(init_lora_weights="gaussian"),
    "pissa": dict(init_lora_weights="pissa"), "olora": dict(init_lora_weights="olora"),
}


def method_args(name: str, **flags) -> FinetuningArguments:
    return FinetuningArguments(finetuning_type=name, lora_rank=4, num_virtual_tokens=4, **flags)


@pytest.mark.parametrize(
    ("flags", "quantization_bit", "checkpointing", "deepspeed", "federated", "message"),
    [
        (dict(finetuning_type="loha"), 4, False, False, False, "--finetuning_type loha has no 4/8-bit layer in PEFT"),
        (dict(finetuning_type="oft"), 8, False, False, False, "on a 8-bit base choose one of: lora, fora, ia3, adalora, prefix, prompt"),
        (dict(finetuning_type="freeze"), 4, False, False, False, "trains the base's own weights, which a 4/8-bit base cannot"),
        (dict(finetuning_type="full"), 4, False, False, False, "trains the base's own weights"),
        (dict(init_lora_weights="pissa"), 4, False, False, False, "--init_lora_weights pissa decomposes the full-precision weight"),
        (dict(finetuning_type="prefix"), None, True, False, False, "does not work with --gradient_checkpointing"),
        (dict(finetuning_type="adalora"), None, False, True, False, "which DeepSpeed ZeRO partitions across processes"),
        (dict(finetuning_type="adalora"), None, False, False, True, "each site would prune its ranks by its own gradients"),
        (dict(finetuning_type="full"), None, False, False, True, "every weight would travel"),
        (dict(init_lora_weights="olora"), None, False, False, True, "--init_lora_weights olora with federated rounds"),
    ],
)
def test_a_combination_a_method_does_not_take_is_one_line(flags, quantization_bit, checkpointing, deepspeed, federated, message):
    with pytest.raises(UserError) as error:
        check_method(FinetuningArguments(**flags), quantization_bit, checkpointing, deepspeed, federated)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("flags", [["--finetuning_type", "lokr", "--quantization_bit", "4"],
                                   ["--finetuning_type", "prefix", "--gradient_checkpointing"]])
def test_refused_before_anything_loads(flags, tmp_path, monkeypatch):
    from fora.train import recipe

    monkeypatch.setattr(recipe, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    monkeypatch.setattr(recipe, "build_dataset", lambda *args, **kwargs: pytest.fail("the data was read"))
    with pytest.raises(UserError):
        recipe.main(["--train_file", "data/train.json", "--output_dir", str(tmp_path), "--report_to", "none", *flags])


@pytest.mark.parametrize("flag", [["--use_dora"], ["--use_rslora"], ["--init_lora_weights", "pissa"], ["--loraplus_lr_ratio", "4"]])
def test_lora_variants_go_with_lora_only(flag, out):
    from support import flag_error

    assert flag_error(out, "--finetuning_type", "fora", *flag).startswith(f"{flag[0]} is a LoRA variant; it goes with")


def randomized(model):
    """Every trained tensor drawn at random: factors that start at zero would leave gradients zero."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def trainer_for(name, model, tmp_path) -> SupervisedTrainer:
    record = RunRecord(base_model="tiny", finetuning_type=name, torch_dtype="float32")
    return SupervisedTrainer(model=model, args=TrainArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
                             run_record=record)


def peft_loss_and_grads(model, batch):
    """The reference: PEFT's (or, without an adapter, the model's) forward with labels, its own loss."""
    model.zero_grad()
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


CASES = {**{name: {} for name in METHODS if name != "adalora"}, **{f"lora+{v}": flags for v, flags in LORA_VARIANTS.items()}}


@pytest.mark.parametrize("case", list(CASES))
def test_the_training_loss_is_pefts_own_for_every_method(case, tiny_model, tokenizer, tmp_path):
    """The loss path METHODS gives each method (the supervised positions, or full logits for prefix and prompt)
    equals PEFT's forward with labels in float32, loss and gradients within 1e-5: the fast path stays honest."""
    name = case.split("+")[0]
    torch.manual_seed(0)
    model = randomized(attach_adapter(load_model(str(tiny_model), torch.float32), method_args(name, **CASES[case])))
    model.train()
    batch = random_batch(len(tokenizer), tokenizer.pad_token_id)
    trainer = trainer_for(name, model, tmp_path)
    loss, grads = trainer_loss_and_grads(trainer, model, batch)
    assert trainer.loss_path == METHODS[name].loss
    own_loss, own_grads = peft_loss_and_grads(model, batch)
    torch.testing.assert_close(loss, own_loss, rtol=1e-5, atol=1e-6)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, own_grads[key], rtol=1e-5, atol=1e-6, msg=key)


def test_adalora_takes_pefts_loss_with_its_regulariser(tiny_model, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = randomized(attach_adapter(load_model(str(tiny_model), torch.float32), method_args("adalora"), total_steps=10))
    model.train()
    batch = random_batch(len(tokenizer), tokenizer.pad_token_id)
    trainer = trainer_for("adalora", model, tmp_path)
    loss, _ = trainer_loss_and_grads(trainer, model, batch)
    without_regulariser = model.base_model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                 labels=batch["labels"]).loss
    assert trainer.loss_path == "model"
    torch.testing.assert_close(loss, peft_loss_and_grads(model, batch)[0])
    assert loss > without_regulariser  # PEFT's orthogonality term is in it


@pytest.mark.parametrize("variant", list(LORA_VARIANTS))
def test_the_fast_lora_layer_gives_pefts_outputs_and_gradients_for_each_variant(variant, tiny_model):
    """The addmm layers (fora/tuners/lora_fast.py) under every LoRA variant against PEFT's own LoRA layers built
    with the same flags and weights."""
    from peft import LoraConfig, get_peft_model

    args = method_args("lora", **LORA_VARIANTS[variant])
    torch.manual_seed(0)
    fast = randomized(attach_adapter(load_model(str(tiny_model), torch.float32), args))
    torch.manual_seed(0)
    config = fast.peft_config["default"]
    plain = get_peft_model(load_model(str(tiny_model), torch.float32), LoraConfig(
        r=config.r, lora_alpha=config.lora_alpha, target_modules=config.target_modules, use_dora=config.use_dora,
        use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights))
    plain.load_state_dict(fast.state_dict())  # the same weights, the residual base of PiSSA/OLoRA included
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 2]])
    fast_out, plain_out = fast(input_ids=ids).logits, plain(input_ids=ids).logits
    torch.testing.assert_close(fast_out, plain_out, rtol=1e-5, atol=1e-5)
    fast_out.square().mean().backward()
    plain_out.square().mean().backward()
    plain_grads = dict(plain.named_parameters())
    for name, param in fast.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, plain_grads[name].grad, rtol=1e-5, atol=1e-6, msg=name)


TRAIN_FLAGS = ["--max_steps", "3", "--report_to", "none", "--torch_dtype", "float32", "--lora_rank", "4",
               "--learning_rate", "5e-2", "--num_virtual_tokens", "4", "--save_steps", "2"]


def train(tiny_model, train_file, out, *flags):
    """3 steps of batch 2 in this process (a checkpoint at step 2)."""
    from fora.train.recipe import main

    main(["--model_name_or_path", str(tiny_model), "--train_file", str(train_file), "--output_dir", str(out),
          "--per_device_train_batch_size", "2", *TRAIN_FLAGS, *flags])


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    from support import REPO

    path = tmp_path_factory.mktemp("methods-data") / "train.jsonl"
    path.write_text("".join((REPO / "data" / "train.json").read_text(encoding="utf-8").splitlines(True)[:8]), encoding="utf-8")
    return path


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_adapters_apply_to_the_base_as_it_is(init, tiny_model, train_file, tmp_path):
    """Saved converted against the initial adapter, a PiSSA/OLoRA adapter loaded by plain PEFT on the unchanged
    base gives the trained model's outputs (its residual base plus its factors)."""
    from fora.models.inference import load_inference_model

    out = tmp_path / "adapter"
    train(tiny_model, train_file, out, "--init_lora_weights", init)
    assert (out / "initial_adapter" / "adapter_config.json").is_file()
    plain = PeftModel.from_pretrained(load_model(str(tiny_model), torch.float32), str(out)).eval()
    assert plain.peft_config["default"].r == 8  # twice the rank: the trained factors and the initial ones
    ours, _, info = load_inference_model(str(out), torch_dtype="float32", merge=False)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 2]])
    with torch.no_grad():
        adapted = plain(input_ids=ids).logits
        torch.testing.assert_close(adapted, ours(input_ids=ids).logits)
        with plain.disable_adapter():
            assert not torch.allclose(adapted, plain(input_ids=ids).logits, atol=1e-3)
    with pytest.raises(UserError, match="training cannot continue from"):
        train(tiny_model, train_file, out, "--init_lora_weights", init, "--resume_from_checkpoint", str(out / "checkpoint-2"))


def test_loraplus_gives_b_its_own_rate(tiny_model, tmp_path):
    model = attach_adapter(load_model(str(tiny_model), torch.float32), method_args("lora"))
    trainer = SupervisedTrainer(model=model, args=TrainArguments(output_dir=str(tmp_path), report_to="none", learning_rate=1e-3),
                                loraplus_lr_ratio=16)
    groups = trainer.create_optimizer().param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    rates = {("lora_B" in names[id(p)]): group["lr"] for group in groups for p in group["params"]}
    assert rates == {False: 1e-3, True: 16e-3}


def test_adalora_allocates_ranks_as_it_trains(tiny_model, train_file, tmp_path):
    out = tmp_path / "adapter"
    train(tiny_model, train_file, out, "--finetuning_type", "adalora", "--max_steps", "10", "--save_strategy", "no")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 10
    assert config["rank_pattern"], "the budget was allocated (PEFT's update_and_allocate ran after the steps)"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_predicts_and_merges_or_says_why_not(name, tiny_model, train_file, tmp_path):
    """Train 3 steps (a checkpoint at 2), predict from the final folder and from checkpoint-2, load an adapter
    with plain PEFT and check it gives the logits prediction decodes from, chat with it (its base side is the
    base alone), and merge (or the one-line refusal)."""
    from fora.infer.predict import main as predict
    from fora.merge import main as merge
    from fora.models.inference import load_inference_model
    from fora.tuners.fora import load_fora_config

    out = tmp_path / "out"
    train(tiny_model, train_file, out, "--finetuning_type", name)
    run = json.loads((out / "fora_run.json").read_text())
    assert run["finetuning_type"] == name
    for folder in (out, out / "checkpoint-2"):
        results = predict(["--model_dir", str(folder), "--test_path", str(train_file), "--output_dir", str(folder / "predicted"),
                           "--max_new_tokens", "3", "--max_samples", "2"])
        assert results["total"] == 2
    if METHODS[name].adapter:
        ours, _, info = load_inference_model(str(out), torch_dtype="float32", merge=False)
        config = load_fora_config(str(out))  # FoRA: its own config class; other methods: None, PEFT reads its own
        plain = PeftModel.from_pretrained(load_model(str(tiny_model), torch.float32), str(out), config=config).eval()
        ids = torch.tensor([[1, 50, 60, 70, 80, 90, 2]])
        with torch.no_grad():
            torch.testing.assert_close(plain(input_ids=ids).logits, ours(input_ids=ids).logits)
        assert_chat_base_side_is_the_base(out, tiny_model)
    merged = tmp_path / "merged"
    if METHODS[name].merges:
        merge(["--adapter", str(out), "--output_dir", str(merged)])
        assert (merged / "config.json").is_file()
    else:
        with pytest.raises(UserError) as error:
            merge(["--adapter", str(out), "--output_dir", str(merged)])
        assert "nothing to merge" in str(error.value) or "no weights to merge" in str(error.value)


def assert_chat_base_side_is_the_base(adapter, base):
    from fora.args import ChatArguments
    from fora.infer.chat import BASE, FINE_TUNED, ChatModel, Exchange, Settings

    greedy = Settings(max_new_tokens=6, temperature=0.0, top_p=1.0)
    chat = ChatModel(ChatArguments(model_dir=str(adapter)))
    replies = {who: "".join(chat.respond([], Exchange("hi"), who, greedy)) for who in (FINE_TUNED, BASE)}
    alone = "".join(ChatModel(ChatArguments(ori_model_dir=str(base))).respond([], Exchange("hi"), FINE_TUNED, greedy))
    assert replies[BASE] == alone


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, method in METHODS.items() if method.quantized])
def test_every_method_with_a_quantized_layer_trains_on_a_4bit_base(name, tiny_model, train_file, tmp_path):
    from fora.infer.predict import main as predict

    out = tmp_path / "out"
    train(tiny_model, train_file, out, "--finetuning_type", name, "--quantization_bit", "4", "--save_strategy", "no")
    assert json.loads((out / "fora_run.json").read_text())["quantization_bit"] == 4
    predict(["--model_dir", str(out), "--test_path", str(train_file), "--output_dir", str(tmp_path / "p"),
             "--max_new_tokens", "3", "--max_samples", "2"])


def trained_tensors(folder) -> dict[str, torch.Tensor]:
    """What a run saved: its adapter, or (freeze, full) the whole model's weights."""
    from safetensors.torch import load_file

    adapter = folder / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.is_file() else folder / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in METHODS if name != "adalora"])  # AdaLoRA is refused under ZeRO
def test_two_deepspeed_processes_train_what_one_process_trains(name, tiny_model, train_file, tmp_path):
    """ZeRO-2 over 2 processes x batch 1 gives the adapter 1 process x batch 2 gives, to float32 rounding (1e-5
    relative; plain SGD, so no optimizer amplifies rounding): the same records in each step, the same update."""
    from support import ONE_THREAD, REPO, free_port, launcher, run_script

    flags = ["--finetuning_type", name, "--optim", "sgd", "--learning_rate", "0.1", "--seed", "7", "--logging_steps", "1",
             "--save_steps", "1"]
    train(tiny_model, train_file, tmp_path / "one", *flags)
    deepspeed = launcher("deepspeed", 2)
    result = run_script(
        deepspeed[0], "--master_port", str(free_port()), *deepspeed[1:], "train_lora.py", "--model_name_or_path", str(tiny_model),
        "--train_file", str(train_file), "--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "1",
        "--deepspeed", str(REPO / "ds_config.json"), *TRAIN_FLAGS, *flags, env=ONE_THREAD, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, two = trained_tensors(tmp_path / "one"), trained_tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    for key, expected in one.items():
        assert (two[key] - expected).norm() <= 1e-5 * expected.norm(), key
    losses = [logged_losses(tmp_path / run / "checkpoint-3") for run in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    step_1 = trained_tensors(tmp_path / "one" / "checkpoint-1")  # training moved the weights compared
    assert any(not torch.equal(step_1[key], tensor) for key, tensor in one.items())


def logged_losses(checkpoint) -> list[float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, method in METHODS.items() if method.averaged])
def test_one_federated_round_of_every_averaged_method(name, tiny_model, train_file, tmp_path):
    """Two sites train one local step each from the same start, through the classes the ClientApp and the
    ServerApp run (Site, GlobalAdapter); the server's round folder holds the example-weighted mean of what
    they sent, computed here, and predicts. (The Flower transport is the same tensors for every method:
    tests/federated runs it for real.)"""
    from fora.federated.client_app import Site
    from fora.federated.run import adapter_state, parse
    from fora.federated.server_app import GlobalAdapter
    from fora.infer.predict import main as predict

    lines = train_file.read_text(encoding="utf-8").splitlines(True)
    files = [tmp_path / "site0.jsonl", tmp_path / "site1.jsonl"]
    files[0].write_text("".join(lines[:6]), encoding="utf-8")  # unequal shares: the weights matter
    files[1].write_text("".join(lines[6:8]), encoding="utf-8")
    run = parse(["--model_name_or_path", str(tiny_model), "--train_file", str(train_file), "--output_dir", str(tmp_path / "out"),
                 "--num_clients", "2", "--num_rounds", "1", "--local_steps", "1", "--per_device_train_batch_size", "2",
                 "--finetuning_type", name, "--lora_rank", "4", "--num_virtual_tokens", "4", "--learning_rate", "5e-2",
                 "--torch_dtype", "float32", "--report_to", "none", "--validation_file", str(files[1])])
    site = Site(run)
    sent = adapter_state(site.model)
    replies = [site.train(sent, str(file), server_round=1, proximal_mu=0.0)[:2] for file in files]
    assert [examples for _, examples in replies] == [6, 2]
    mean = {key: (6 * replies[0][0][key] + 2 * replies[1][0][key]) / 8 for key in sent}
    assert all(any(not torch.equal(state[key], sent[key]) for key in sent) for state, _ in replies)

    folder = tmp_path / "out" / "round-1"
    folder.mkdir(parents=True)
    server = GlobalAdapter(run)
    assert math.isfinite(server.evaluate(mean)["eval_loss"])  # the server scores it with the method's own loss
    server.save(folder, mean, server_round=1)
    saved = trained_tensors(folder)
    for key, expected in mean.items():
        torch.testing.assert_close(saved[key], expected, msg=key)
    record = json.loads((folder / "fora_run.json").read_text())
    assert (record["finetuning_type"], record["federated"]["round"]) == (name, 1)
    results = predict(["--model_dir", str(folder), "--test_path", str(train_file), "--output_dir", str(tmp_path / "p"),
                       "--max_new_tokens", "3", "--max_samples", "2"])
    assert results["total"] == 2


@pytest.mark.slow
def test_adalora_trains_under_torchrun(tiny_model, train_file, tmp_path):
    """AdaLoRA's refusal under DeepSpeed points to torchrun: two processes there allocate its ranks (every
    process sees the same all-reduced gradients) and save an adapter that predicts."""
    from fora.infer.predict import main as predict
    from support import ONE_THREAD, free_port, launcher, run_script

    out = tmp_path / "out"
    result = run_script(
        *launcher("torchrun", 2), "--master_port", str(free_port()), "train_lora.py", "--model_name_or_path", str(tiny_model),
        "--train_file", str(train_file), "--output_dir", str(out), "--per_device_train_batch_size", "1",
        "--finetuning_type", "adalora", *TRAIN_FLAGS, "--max_steps", "10", "--save_strategy", "no", env=ONE_THREAD, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["rank_pattern"]
    assert predict(["--model_dir", str(out), "--test_path", str(train_file), "--output_dir", str(tmp_path / "p"),
                    "--max_new_tokens", "3", "--max_samples", "2"])["total"] == 2
