"""fora/cli.py and the command lines users run: the doors in this process, the root scripts through the real launchers."""

import json
import shlex
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from fora.cli import PAGED_OPTIMIZER, with_paged_optimizer
from fora.errors import UserError
from fora.precision import cpu_has_bf16
from support import ONE_THREAD, PYTHON, REPO, free_port, launcher, processes_failure, run_script, train_script, write_jsonl


def train(tmp_path, model, *extra, output="out"):
    out = tmp_path / output
    result = run_script(
        PYTHON, "train_lora.py", "--model_name_or_path", str(model), "--train_file", "data/train.json",
        "--output_dir", str(out), "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
        "--cache_dir", str(tmp_path / "cache"), "--report_to", "none", *extra,
    )
    return out, result


def first_records(path, count):
    """The project's own data/train.json, cut to its first `count` records (alpaca format, like the seed's spo_0.json)."""
    lines = (REPO / "data" / "train.json").read_text(encoding="utf-8").splitlines(True)[:count]
    path.write_text("".join(lines), encoding="utf-8")
    return path


def adapter_weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_paged_optimizer_only_on_cuda(tmp_path):
    assert with_paged_optimizer(["--lora_rank", "2"], cuda=False) == ["--lora_rank", "2"]
    assert with_paged_optimizer(["--lora_rank", "2"], cuda=True)[-2:] == ["--optim", PAGED_OPTIMIZER]
    assert with_paged_optimizer(["--optim", "adamw_torch"], cuda=True) == ["--optim", "adamw_torch"]
    args = tmp_path / "args.yaml"
    args.write_text("optim: adafactor\n")
    assert with_paged_optimizer([str(args)], cuda=True) == [str(args)]


@pytest.mark.parametrize("argv", [["--deepspeed", "ds_config.json"], ["--deepspeed=ds_config.json"], ["ARGS"]])
def test_under_deepspeed_qlora_keeps_the_trainers_adamw(tmp_path, argv):
    """ZeRO partitions the Trainer's AdamW across the GPUs; DeepSpeed calls bitsandbytes' optimizers untested."""
    args = tmp_path / "args.yaml"
    args.write_text("deepspeed: ds_config.json\n")
    argv = [str(args) if arg == "ARGS" else arg for arg in argv]
    assert with_paged_optimizer(argv, cuda=True) == argv


@pytest.mark.parametrize("optimizer", ["AdamW8bit", "PagedAdamW8bit"])
def test_the_8bit_optimizers_states_pass_the_resume_check(tmp_path, optimizer):
    """What --optim adamw_bnb_8bit / paged_adamw_8bit leave in optimizer.pt after a step (bitsandbytes runs them
    on the CPU too) is tensors and plain data, which resuming accepts."""
    import bitsandbytes as bnb

    from fora.train.checkpoints import check_checkpoint_holds_only_data

    weight = torch.nn.Parameter(torch.randn(4096, 2))  # large enough for 8-bit states (bitsandbytes keeps small ones in 32-bit)
    step = getattr(bnb.optim, optimizer)([weight], lr=1e-3)
    weight.grad = torch.randn_like(weight)
    step.step()
    state = step.state_dict()
    quantized = state["state"][0]["__bnb_optimizer_quant_state__"]  # its 8-bit moments and their scales
    assert quantized["state1"].dtype == quantized["state2"].dtype == torch.uint8
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    torch.save(state, checkpoint / "optimizer.pt")
    check_checkpoint_holds_only_data(checkpoint)


@pytest.mark.usefixtures("keep_environment")
@pytest.mark.parametrize("door", ["train", "train_qlora", "predict", "merge", "chat", "federated", "estimate_memory"])
def test_every_door_turns_a_mistake_into_one_line_and_exit_code_2(door, monkeypatch, capsys):
    """The root scripts' bodies, in this process: their flags reach the package, and a mistake is one line."""
    from fora import cli

    monkeypatch.setattr(sys, "argv", [f"{door}.py", "--no_such_flag", "1"])
    with pytest.raises(SystemExit) as stopped:
        getattr(cli, door)()
    assert stopped.value.code == 2
    expected = ("the following arguments are required: --adapter, --output_dir/--output-dir" if door == "merge"
                else "unknown argument(s): --no_such_flag 1 (see --help for the flags)")
    assert capsys.readouterr().err == f"error: {expected}\n"


def spo_subset(tmp_path, records: int):
    """The first records of the project's own sample data (the seed's spo_0.json has the same fields)."""
    lines = (REPO / "data" / "train.json").read_text(encoding="utf-8").splitlines()[:records]
    path = tmp_path / "spo_0.json"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
def test_estimate_memory_door(tiny_model, tmp_path):
    """estimate_memory.py as a user runs it: the table, --json on stdout, and a mistake in one line with exit code 2."""
    flags = ["--model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "out"), "--device_memory", "8GB"]
    result = run_script(PYTHON, "estimate_memory.py", *flags, "--json", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1])["fits"] is True
    result = run_script(PYTHON, "estimate_memory.py", *flags, "--device_memory", "lots", env=ONE_THREAD)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "error: --device_memory lots: not a memory size (e.g. 24GB, 16GiB, 1500MB)")


@pytest.mark.slow
def test_train_qlora_two_steps(tiny_model, tmp_path):
    out = tmp_path / "out"
    result = run_script(
        sys.executable, str(REPO / "train_qlora.py"), "--train_file", str(spo_subset(tmp_path, 8)),
        "--model_name_or_path", str(tiny_model), "--output_dir", str(out), "--prompt_column", "input",
        "--response_column", "output", "--max_steps", "2", "--per_device_train_batch_size", "1",
        "--max_source_length", "128", "--max_target_length", "64", "--lora_rank", "2", "--logging_steps", "1",
        "--finetuning_type", "fora", "--report_to", "none", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    compute = "bfloat16" if cpu_has_bf16() else "float32"  # no precision flag: the machine's native one
    assert f"Base model loaded in 4-bit (NF4, double quantization), compute dtype torch.{compute}" in result.stdout
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    run_info = json.loads((out / "fora_run.json").read_text())
    assert run_info["quantization_bit"] == 4 and run_info["finetuning_type"] == "fora"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model)
    assert json.loads((out / "train_results.json").read_text())["global_step"] == 2


@pytest.mark.slow
def test_seed_deepspeed_command(tiny_model, tmp_path):
    """The seed's command as written (ZeRO-2 over 2 processes, here on CPU); only the paths differ.

    The first 40 records of spo_0 (`head -40`): 20 optimizer steps (4 epochs x 20 records per rank / 4 accumulated).
    """
    (tmp_path / "ds_config.json").write_text((REPO / "ds_config.json").read_text())
    spo_subset(tmp_path, 40)
    out = tmp_path / "out"
    command = (
        f"{shlex.join(launcher('deepspeed', 2))} {REPO / 'train_qlora.py'} --train_file spo_0.json --model_name_or_path {tiny_model} "
        f"--output_dir {out} --prompt_column input --response_column output --cache_dir goat_cache --overwrite_cache "
        "--overwrite_output_dir --max_source_length 512 --max_target_length 512 --num_train_epochs 4 "
        "--gradient_accumulation_steps 4 --per_device_train_batch_size 1 --warmup_ratio 0.1 --lr_scheduler_type cosine "
        "--save_total_limit 1 --learning_rate 2e-5 --logging_steps 50 --save_steps 500 --lora_rank 2 --fp16 "
        "--torch_dtype float16 --preprocessing_num_workers 2 --deepspeed ds_config.json"
    )
    result = run_script("bash", "-c", command, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert result.stdout.count("Base model loaded in 4-bit (NF4, double quantization)") == 1  # rank 0 logs
    assert json.loads((out / "fora_run.json").read_text())["quantization_bit"] == 4
    assert json.loads((out / "train_results.json").read_text())["global_step"] == 20
    from safetensors.torch import load_file

    weights = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())  # trained away from B = 0


@pytest.mark.slow
def test_train_and_predict_print_no_deprecation_warning(tmp_path, tiny_model):
    out, trained = train_script(tmp_path, tiny_model, "run", "--max_steps", "1", "--save_strategy", "no")
    assert trained.returncode == 0, trained.stderr[-3000:]
    predicted = run_script(sys.executable, "predict_fora.py", "--model_dir", str(out), "--test_path", "data/test.json",
                           "--max_samples", "2", "--max_new_tokens", "4", "--output_dir", str(tmp_path / "pred"),
                           env=ONE_THREAD)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    for result in (trained, predicted):
        assert "deprecated" not in result.stderr and "FutureWarning" not in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_two_steps_write_a_loadable_adapter_that_changes_the_output(tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, result = train(tmp_path, tiny_model, "--max_steps", "2", "--logging_steps", "1", "--report_to", "tensorboard")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainable parameters:" in result.stdout
    for name in ("adapter_config.json", "adapter_model.safetensors", "fora_run.json", "training_loss.png"):
        assert (out / name).is_file(), name
    assert list((out / "runs").glob("events.out.tfevents.*")), "no TensorBoard log"
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 2 and results["trainable_parameters"] > 0 and results["num_input_tokens_seen"] > 0
    assert "final_loss" in results and "train_samples_per_second" in results

    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    before = base(ids).logits
    adapted = PeftModel.from_pretrained(base, out).eval()
    after = adapted(ids).logits
    assert not torch.allclose(before, after, atol=1e-6), "the adapter did not change the output"


@pytest.mark.slow
def test_bf16_trains_under_autocast(tmp_path, tiny_model):
    """--bf16 on a CPU with native bf16: a bf16 base, autocast forward, the head loss outside it (float32 elsewhere)."""
    from fora.precision import cpu_has_bf16

    out, result = train(tmp_path, tiny_model, "--max_steps", "2", "--save_strategy", "no", "--bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "fora_run.json").read_text())["torch_dtype"] == ("bfloat16" if cpu_has_bf16() else "float32")
    assert all(torch.isfinite(w).all() for w in adapter_weights(out).values())


@pytest.mark.slow
def test_same_seed_same_adapter(tmp_path, tiny_model):
    first, r1 = train(tmp_path, tiny_model, "--max_steps", "2", "--save_strategy", "no", output="a")
    second, r2 = train(tmp_path, tiny_model, "--max_steps", "2", "--save_strategy", "no", output="b")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr[-2000:] + r2.stderr[-2000:]
    a, b = adapter_weights(first), adapter_weights(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_from_checkpoint_ends_where_an_uninterrupted_run_ends(tmp_path, tiny_model):
    whole, r1 = train(tmp_path, tiny_model, "--max_steps", "4", "--save_steps", "2", output="whole")
    assert r1.returncode == 0, r1.stderr[-3000:]
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    _, r2 = train(tmp_path, tiny_model, "--max_steps", "4", "--save_steps", "2", "--resume_from_checkpoint", "auto", output="resumed")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert json.loads((resumed / "train_results.json").read_text())["global_step"] == 4
    a, b = adapter_weights(whole), adapter_weights(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


@pytest.mark.slow
def test_refuses_to_overwrite_a_previous_run(tmp_path, tiny_model):
    out, first = train(tmp_path, tiny_model, "--max_steps", "1", "--save_strategy", "no")
    assert first.returncode == 0, first.stderr[-2000:]
    before = (out / "adapter_model.safetensors").read_bytes()
    _, again = train(tmp_path, tiny_model, "--max_steps", "1", "--save_strategy", "no")
    assert again.returncode == 2
    assert "--overwrite_output_dir" in again.stderr and "Traceback" not in again.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == before


@pytest.mark.slow
def test_a_yaml_file_is_the_whole_argument_set(tmp_path, tiny_model):
    args = tmp_path / "args.yaml"
    args.write_text(
        f"model_name_or_path: {tiny_model}\ntrain_file: data/train.json\noutput_dir: {tmp_path / 'yaml_out'}\n"
        f"max_steps: 1\nper_device_train_batch_size: 2\nlora_rank: 3\nlora_target: [q_proj, v_proj]\n"
        f"report_to: none\nsave_strategy: 'no'\ncache_dir: {tmp_path / 'cache'}\n",
        encoding="utf-8",
    )
    result = run_script(PYTHON, "train_lora.py", str(args))
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "yaml_out" / "adapter_config.json").read_text())
    assert config["r"] == 3 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.slow
def test_full_finetuning_with_use_lora_false(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    out, result = train(tmp_path, tiny_model, "--max_steps", "1", "--use_lora", "False", "--save_strategy", "no")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "adapter_config.json").exists()
    tuned = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert len(changed) > 10, "full fine-tuning should change the weights of every layer"
    assert json.loads((out / "fora_run.json").read_text())["finetuning_type"] == "full"


@pytest.mark.slow
@pytest.mark.parametrize("adapter_flags", [[], ["--finetuning_type", "fora"]], ids=["lora", "fora"])
def test_deepspeed_zero2_seed_command_two_processes(tmp_path, tiny_model, adapter_flags):
    """The seed's deepspeed command as written (and with FoRA); only paths and the device selection differ."""
    subset = first_records(tmp_path / "spo_0.json", 16)  # the seed's data has this format; 4 epochs end in a minute
    out = tmp_path / "ds_out"
    result = run_script(
        *launcher("deepspeed", 2), "train_lora.py", "--train_file", str(subset),
        "--model_name_or_path", str(tiny_model), "--output_dir", str(out), "--prompt_column", "input",
        "--response_column", "output", "--cache_dir", str(tmp_path / "goat_cache"), "--overwrite_cache",
        "--overwrite_output_dir", "--max_source_length", "512", "--max_target_length", "512",
        "--num_train_epochs", "4", "--gradient_accumulation_steps", "4", "--per_device_train_batch_size", "1",
        "--warmup_ratio", "0.1", "--lr_scheduler_type", "cosine", "--save_total_limit", "1",
        "--learning_rate", "2e-5", "--logging_steps", "50", "--save_steps", "500", "--lora_rank", "2",
        "--fp16", "--torch_dtype", "float16", "--preprocessing_num_workers", "2", "--deepspeed", "ds_config.json",
        *adapter_flags, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "--fp16 and --torch_dtype float16 ->" in log  # the one CPU fallback line
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 8  # 16 records x 4 epochs / (1 x 4 accumulation x 2 processes)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    (checkpoint,) = out.glob("checkpoint-*")  # --save_total_limit 1
    ranks = sorted(p.name.split("zero_pp_rank_")[1][0] for p in checkpoint.glob("global_step8/*zero_pp_rank_*_optim_states.pt"))
    assert ranks == ["0", "1"]  # ZeRO's optimizer states, partitioned over the 2 processes
    weights = load_file(str(out / "adapter_model.safetensors"))
    factors = {key.rsplit(".", 2)[-2] for key in weights}
    assert factors == ({"lora_A", "lora_B", "lora_C", "lora_D", "lora_E"} if adapter_flags else {"lora_A", "lora_B"})
    trained_from_zero = "lora_D" if adapter_flags else "lora_B"
    assert any(trained_from_zero in k and v.abs().max() > 0 for k, v in weights.items())


@pytest.mark.slow
def test_torchrun_seed_command_two_processes(tmp_path, tiny_model):
    """The seed's torchrun command; paths and --nproc_per_node differ, and --max_steps 10000 becomes 12."""
    data = tmp_path / "DATA"
    data.mkdir()
    records = [json.loads(line) for line in (REPO / "data" / "train.json").read_text(encoding="utf-8").splitlines()]
    promptcblue = [{"input": r["instruction"] + r["input"], "target": r["output"], "type": "extraction", "sample_id": i}
                   for i, r in enumerate(records)]
    write_jsonl(data / "train.json", promptcblue[:200])
    write_jsonl(data / "dev.json", promptcblue[200:216])
    lora_config = tmp_path / "lora_config_tiny.json"
    lora_config.write_text(json.dumps({"lora_r": 4, "lora_alpha": 16, "lora_dropout": 0.1,
                                       "lora_target_modules": ["q_proj", "v_proj"], "modules_to_save": None}))
    out = tmp_path / "OUT"
    result = run_script(
        *launcher("torchrun", 2), "train_lora.py", "--model_name_or_path", str(tiny_model),
        "--use_lora", "True", "--train_file", str(data / "train.json"), "--validation_file", str(data / "dev.json"),
        "--cache_dir", str(data), "--prompt_column", "input", "--response_column", "target",
        "--output_dir", str(out), "--overwrite_output_dir", "--max_source_length", "512",
        "--max_target_length", "64", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
        "--gradient_accumulation_steps", "16", "--max_steps", "12", "--logging_steps", "10", "--save_steps", "300",
        "--learning_rate", "2e-4", "--lora_config", str(lora_config),
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.loads((out / "train_results.json").read_text())
    assert state["global_step"] == 12
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert "eval_loss" in (result.stdout + result.stderr)


# --- The number of processes does not change the run ------------------------------------------

SPLITS = {  # the same global batch of 4 records, split differently
    "one_process": [PYTHON, "train_lora.py", "--per_device_train_batch_size", "4"],
    "accumulation": [PYTHON, "train_lora.py", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"],
    "torchrun": [*launcher("torchrun", 2), "train_lora.py", "--per_device_train_batch_size", "2"],
    "deepspeed": [*launcher("deepspeed", 2), "train_lora.py", "--per_device_train_batch_size", "2",
                  "--deepspeed", "ds_config.json"],
}


SPLIT_STEPS = 16  # 30 records = 7 whole global batches and a short one per epoch, 2 epochs


def train_split(folder, model, split, *extra, output=None):
    """Two epochs over 30 records, logged every step and saved every 4 (the last one's trainer_state.json)."""
    out = folder / (output or split)
    launch = list(SPLITS[split])
    if launch[0] != PYTHON:  # not the launchers' default port, which another run on the machine may hold
        launch[1:1] = ["--master_port", str(free_port())]
    result = run_script(
        *launch, "--model_name_or_path", str(model), "--train_file", str(folder / "records.json"),
        "--output_dir", str(out), "--cache_dir", str(folder / "cache"), "--report_to", "none", "--seed", "11",
        "--learning_rate", "1e-3", "--num_train_epochs", "2", "--logging_steps", "1", "--save_steps", "4",
        "--torch_dtype", "float32",  # a bf16 CPU would choose bf16, whose rounding hides the batches' exactness
        *extra, env=ONE_THREAD, timeout=900,
    )
    return out, result


def logged_losses(out):
    state = json.loads((out / f"checkpoint-{SPLIT_STEPS}" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory, tiny_model):
    """Each split trained once for the tests below: split name -> (run folder, the folder of all runs)."""
    folder = tmp_path_factory.mktemp("splits")
    first_records(folder / "records.json", 30)
    runs = {}

    def run(split):
        if split not in runs:
            out, result = train_split(folder, tiny_model, split)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            runs[split] = out
        return runs[split], folder

    return run


def assert_same_run(out, reference, tolerance):
    losses, expected_losses = logged_losses(out), logged_losses(reference)
    assert len(losses) == len(expected_losses) == SPLIT_STEPS
    for step, (loss, expected) in enumerate(zip(losses, expected_losses), 1):
        assert abs(loss - expected) <= tolerance * abs(expected), f"step {step}: loss {loss} != {expected}"
    weights, expected_weights = adapter_weights(out), adapter_weights(reference)
    assert weights.keys() == expected_weights.keys()
    for name, expected in expected_weights.items():
        assert (weights[name] - expected).norm() <= tolerance * expected.norm(), name


@pytest.mark.slow
@pytest.mark.parametrize("split", ["accumulation", "torchrun", "deepspeed"])
def test_processes_and_accumulation_split_the_same_global_batches(split_runs, split):
    """1 process x batch 2 x 2 accumulation steps, and 2 processes x batch 2 (torchrun; deepspeed ZeRO-2), log the
    same per-step losses and train the same adapter as 1 process x batch 4, to float32 rounding (1e-5 relative):
    the same records in each step, the loss a token mean over the whole global batch."""
    assert_same_run(split_runs(split)[0], split_runs("one_process")[0], tolerance=1e-5)


# --- Resuming loads data, never code ------------------------------------------------------------


class Payload:
    """Unpickled, it creates `marker` (as any code a pickle names would run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path, marker):
    torch.save({"state": Payload(marker)}, path)


RESUME_READS = {  # every pickled file a resume of a split's checkpoint-12 reads, besides safetensors and JSON
    "accumulation": ["optimizer.pt", "scheduler.pt", "rng_state.pth", "adapter_model.bin"],
    "deepspeed": ["global_step12/mp_rank_00_model_states.pt", "global_step12/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                  "global_step12/zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_state_0.pth", "rng_state_1.pth",
                  "scheduler.pt"],
}


@pytest.mark.slow
@pytest.mark.parametrize("split", RESUME_READS)
def test_a_payload_in_any_file_a_resume_reads_is_refused_before_it_loads(tmp_path, split_runs, split):
    from fora.train.checkpoints import check_checkpoint_holds_only_data

    honest = split_runs(split)[0] / "checkpoint-12"
    pickled = {str(p.relative_to(honest)) for p in honest.rglob("*") if p.suffix in (".pt", ".pth", ".bin")}
    assert pickled == set(RESUME_READS[split]) - {"adapter_model.bin"} | {"training_args.bin"}
    check_checkpoint_holds_only_data(honest)
    marker = tmp_path / "payload-ran"
    for name in RESUME_READS[split]:
        planted = tmp_path / name.replace("/", "_")
        shutil.copytree(honest, planted)
        if name == "adapter_model.bin":  # PEFT reads it where there is no adapter_model.safetensors
            (planted / "adapter_model.safetensors").unlink()
        plant(planted / name, marker)
        with pytest.raises(UserError, match=f"{name} is not only tensors and plain data .it unpickles io.open."):
            check_checkpoint_holds_only_data(planted)
        assert not marker.exists(), name
    escape = tmp_path / "escape"
    shutil.copytree(honest, escape)
    (escape / "latest").write_text("../../elsewhere")  # DeepSpeed would read the states of the folder it names
    with pytest.raises(UserError, match="latest names '../../elsewhere', not a folder of the checkpoint"):
        check_checkpoint_holds_only_data(escape)


@pytest.mark.slow
@pytest.mark.parametrize("split, planted", [("accumulation", "optimizer.pt"),
                                            ("deepspeed", "global_step12/zero_pp_rank_1_mp_rank_00_optim_states.pt")])
def test_resuming_from_a_planted_checkpoint_stops_in_one_line(tiny_model, split_runs, split, planted):
    """Through the launcher: exit 2, one line naming the file, and the payload never ran (DeepSpeed itself
    would read its states with weights_only=False)."""
    honest, folder = split_runs(split)
    out = folder / f"planted_{split}"
    shutil.copytree(honest / "checkpoint-12", out / "checkpoint-12")
    marker = folder / f"payload-ran-{split}"
    plant(out / "checkpoint-12" / planted, marker)
    _, result = train_split(folder, tiny_model, split, "--resume_from_checkpoint", "auto", output=out.name)
    exit_code, stderr = processes_failure(SPLITS[split], result)
    assert exit_code == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{planted} is not only tensors and plain data (it unpickles io.open)" in stderr
    assert "Traceback" not in stderr
    assert not marker.exists()


@pytest.mark.slow
def test_trust_checkpoint_skips_the_check(tiny_model, split_runs):
    """--trust_checkpoint: the project's check is skipped and the files go to their loaders as they are (here
    transformers' own weights-only load of optimizer.pt refuses the payload; DeepSpeed's would run it)."""
    honest, folder = split_runs("accumulation")
    out = folder / "trusted"
    shutil.copytree(honest / "checkpoint-12", out / "checkpoint-12")
    marker = folder / "payload-ran-trusted"
    plant(out / "checkpoint-12" / "optimizer.pt", marker)
    _, result = train_split(folder, tiny_model, "accumulation", "--resume_from_checkpoint", "auto", "--trust_checkpoint",
                            output=out.name)
    assert result.returncode != 0 and "is not only tensors and plain data" not in result.stderr
    assert "Weights only load failed" in result.stderr and not marker.exists()


@pytest.mark.slow
def test_an_honest_deepspeed_checkpoint_resumes_to_the_uninterrupted_run(tiny_model, split_runs):
    """Resumed at step 12 (mid-way through the second epoch) under deepspeed ZeRO-2: the same losses after it
    and the same adapter as the run that was never stopped."""
    whole, folder = split_runs("deepspeed")
    resumed = folder / "resumed_deepspeed"
    shutil.copytree(whole / "checkpoint-12", resumed / "checkpoint-12")
    _, result = train_split(folder, tiny_model, "deepspeed", "--resume_from_checkpoint", "auto", output=resumed.name)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Resuming from" in result.stdout
    assert_same_run(resumed, whole, tolerance=1e-6)
