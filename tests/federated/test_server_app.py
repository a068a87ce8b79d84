"""fora/federated/server_app.py: the global adapter scored as predict_fora.py scores, and the deployment engine on loopback."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fora.federated.run import adapter_state, parse
from fora.federated.server_app import GlobalAdapter
from support import FLOWER_ENV, ONE_THREAD, PYTHON, REPO, free_port, run_script, train_records, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def talkative_copy(model_dir: Path, folder: Path) -> Path:
    """The tiny model with an untied random output layer: the tied one repeats the prompt's last token
    (a newline, so every answer is blank), this one answers words."""
    from safetensors.torch import save_file

    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    weights = load_file(str(folder / "model.safetensors"))
    embedding = weights["model.embed_tokens.weight"]
    weights["lm_head.weight"] = torch.randn(embedding.shape, generator=torch.Generator().manual_seed(0))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.slow
def test_eval_generate_scores_as_predict_fora_does(federated_run, tmp_path, tiny_model):
    """Every round has ROUGE-L/BLEU-4, and the server's scorer gives what predict_fora.py gives the same model
    (the initial global adapter, lora_B = 0, on a tiny model that answers words), on labels that are half
    the model's own answers, so neither score is 0 or 100."""

    out, _, flags = federated_run
    rounds = json.loads((out / "federated_history.json").read_text())["rounds"]
    assert all({"rouge-l", "bleu-4"} <= set(r) for r in rounds)
    assert (out / "federated_rouge_l.png").stat().st_size > 0 and (out / "federated_bleu_4.png").stat().st_size > 0
    model = talkative_copy(tiny_model, tmp_path / "talkative")

    def predict(test_file: Path, name: str) -> dict:
        result = run_script(PYTHON, "predict_fora.py", "--model_dir", str(model), "--test_path", str(test_file),
                            "--max_source_length", "64", "--max_new_tokens", "32", "--output_dir", str(tmp_path / name), env=ONE_THREAD)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads((tmp_path / name / "predict_results.json").read_text())

    validation = Path(flags[flags.index("--validation_file") + 1])
    predict(validation, "first")
    answers = [json.loads(line)["predict"] for line in (tmp_path / "first" / "generated_predictions.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in validation.read_text(encoding="utf-8").splitlines()]
    labelled = write_jsonl(tmp_path / "labelled.jsonl", [
        {**record, "output": answer if i % 2 else record["output"]} for i, (record, answer) in enumerate(zip(records, answers))
    ])
    expected = predict(labelled, "second")
    assert 10 < expected["rouge-l"] < 90, expected

    argv = flags + ["--model_name_or_path", str(model), "--validation_file", str(labelled), "--output_dir", str(tmp_path / "server")]
    server = GlobalAdapter(parse(argv))  # (the last of a repeated flag wins)
    scores = server.evaluate(adapter_state(server.model))
    assert (scores["rouge-l"], scores["bleu-4"]) == (expected["rouge-l"], expected["bleu-4"])


def test_the_global_adapter_is_saved_per_round_as_training_saves_it_and_scored(tmp_path, tiny_model):
    """One round's folder holds what train_lora.py writes (PEFT files, tokenizer, fora_run.json with the round),
    the eval loss is the adapter's, and the history is rewritten with its plot after every round."""
    from fora.federated.server_app import History

    validation = write_jsonl(tmp_path / "validation.jsonl", train_records(4, start=100))
    out = tmp_path / "out"
    run = parse(["--model_name_or_path", str(tiny_model), "--train_file", "data/train.json", "--validation_file",
                 str(validation), "--output_dir", str(out), "--num_rounds", "3", "--lora_rank", "4", "--torch_dtype",
                 "float32", "--max_source_length", "64", "--max_target_length", "16", "--report_to", "none"])
    server = GlobalAdapter(run)
    initial = adapter_state(server.model)
    generator = torch.Generator().manual_seed(0)
    trained = {name: tensor + 0.5 * torch.randn(tensor.shape, generator=generator) for name, tensor in initial.items()}
    history = History(out, server.base_bytes)
    scores = [server.evaluate(state) for state in (initial, trained)]
    assert set(scores[0]) == {"eval_loss"} and scores[0]["eval_loss"] != scores[1]["eval_loss"]
    for server_round, entry in enumerate(scores):
        history.add({"round": server_round, **entry})

    folder = out / "round-1"
    folder.mkdir()
    server.save(folder, trained, 1)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in trained)
    assert (folder / "adapter_config.json").is_file() and (folder / "tokenizer.json").is_file()
    record = json.loads((folder / "fora_run.json").read_text())
    assert record["base_model"] == str(tiny_model) and record["federated"]["round"] == 1
    assert record["federated"]["num_rounds"] == 3 and not list(folder.glob(".tmp-*"))
    written = json.loads((out / "federated_history.json").read_text())
    assert written == {"base_model_bytes": server.base_bytes, "rounds": [{"round": 0, **scores[0]}, {"round": 1, **scores[1]}]}
    assert (out / "federated_eval_loss.png").stat().st_size > 0


# --- The deployment engine, for real on loopback: one SuperLink, two SuperNodes --------------------


def wait_for_port(port: int, seconds: float, processes: list) -> None:
    import socket

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in processes), "a Flower process exited early (see its log)"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


def stop_processes(started: list) -> None:
    """SIGTERM each started process group, SIGKILL what is left; then the same for the helper processes
    Flower spawned in sessions of their own (flower-superexec, flwr-serverapp, flwr-clientapp), which name
    their parent with --parent-pid."""
    import signal

    import psutil

    pids = {p.pid for p in started}
    helpers = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        parent = cmdline[cmdline.index("--parent-pid") + 1:][:1] if "--parent-pid" in cmdline else []
        if parent and int(parent[0]) in pids:
            helpers += [proc, *proc.children(recursive=True)]
    for process in started:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for process in started:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    _, alive = psutil.wait_procs(helpers, timeout=20)
    for proc in alive:
        proc.kill()


def wait_for_supernodes(count: int, seconds: float, env: dict, processes: list) -> None:
    """Until the SuperLink lists `count` SuperNodes online (`flwr supernode list`), so every site is in round 1."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in processes), "a Flower process exited early (see its log)"
        listed = subprocess.run([str(Path(sys.executable).parent / "flwr"), "supernode", "list", "test", "--format", "json"],
                                env=env, capture_output=True, text=True, timeout=60, check=False)
        if listed.returncode == 0 and sum(n["status"] == "online" for n in json.loads(listed.stdout)["nodes"]) >= count:
            return
        time.sleep(1)
    raise TimeoutError(f"fewer than {count} SuperNodes online after {seconds} s")


@pytest.mark.slow
def test_deployment_engine_on_loopback(tmp_path, tiny_model):
    """Three sites on loopback. A run whose flags ask the sites to trust remote code is refused by each
    site, one line in its log naming the flag, and the server's error names it too. Then a run of three
    rounds: site 2's node config names a data file it does not have, so its client raises in every round;
    the log names it and each round goes on with the two others (--min_fit_clients 2); every site loads
    its base once per round (Flower 1.42 starts a ClientApp process per message). The server steps with
    AdamW (FedOpt), so its wiring runs for real here; the simulations run FedAvg."""
    bin_dir = Path(sys.executable).parent
    home = tmp_path / "flwr-home"
    home.mkdir()
    link_port, node_ports = free_port(), (free_port(), free_port(), free_port())
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    sites = [write_jsonl(tmp_path / f"site-{i}.jsonl", train_records(10, start=10 * i)) for i in range(2)] + [tmp_path / "missing.jsonl"]
    validation = write_jsonl(tmp_path / "validation.jsonl", train_records(4, start=100))
    out = tmp_path / "out"
    started = []

    def start(name: str, *command: str) -> None:
        with open(tmp_path / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
            started.append(subprocess.Popen([str(bin_dir / command[0]), *command[1:]], stdout=log, stderr=subprocess.STDOUT,
                                            env=env, cwd=tmp_path, start_new_session=True))

    def submit(flags: str, server_flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(bin_dir / "flwr"), "run", str(REPO / "federated_app"), "test", "--stream", "--run-config",
             f'flags="{flags}" server-flags="{server_flags}"'],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=480, check=False,
        )

    def site_log(site: int) -> str:
        return (tmp_path / f"supernode-{site}.log").read_text()

    try:
        start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
              "--disable-runtime-dependency-installation")
        wait_for_port(link_port, 120, started)
        for site, (data_file, port) in enumerate(zip(sites, node_ports)):
            start(f"supernode-{site}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                  "--port", str(port), "--node-config",
                  f"partition-id={site} num-partitions=3 data-file='{data_file}' model-path='{tiny_model}' device='cpu'")
        wait_for_supernodes(3, 120, env, started)
        server_flags = (f"--model_name_or_path {tiny_model} --num_clients 3 --min_fit_clients 2 --validation_file {validation} "
                        f"--report_to none")
        refused = submit("--num_rounds 1 --local_steps 1 --lora_rank 4 --trust_remote_code",
                         f"{server_flags} --output_dir {tmp_path / 'refused'}")
        assert "client 0 failed: refused: the run config's flags set --trust_remote_code" in refused.stdout + refused.stderr
        assert not (tmp_path / "refused" / "adapter_model.safetensors").exists()  # no round changed the adapter
        for site in range(3):
            lines = [line for line in site_log(site).splitlines() if "refused the run" in line]
            assert len(lines) == 1 and "set --trust_remote_code," in lines[0], site_log(site)[-3000:]
        assert all("Traceback" not in site_log(site) for site in range(3))

        flags = ("--num_rounds 3 --local_steps 2 --server_optimizer adamw --client_learning_rate 0.1 "
                 "--per_device_train_batch_size 4 --learning_rate 5e-3 --lora_rank 4 --max_source_length 64 --max_target_length 32")
        result = submit(flags, f"{server_flags} --output_dir {out}")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        history = json.loads((out / "federated_history.json").read_text())
        assert [r["round"] for r in history["rounds"]] == [0, 1, 2, 3]
        assert [[c["num_examples"] for c in r["clients"]] for r in history["rounds"][1:]] == [[10, 10]] * 3
        for entry in history["rounds"][1:]:
            (dropped,) = entry["dropped"]
            assert dropped.startswith("client 2 failed: ") and "missing.jsonl" in dropped, dropped
        assert f"round 1: {history['rounds'][1]['dropped'][0]}" in result.stdout + result.stderr
        assert history["rounds"][3]["eval_loss"] < history["rounds"][0]["eval_loss"]
        assert (out / "round-3" / "adapter_model.safetensors").is_file()
        assert json.loads((out / "fora_run.json").read_text())["federated"]["server_optimizer"] == "adamw"
        for site in (0, 1):  # the base model's loads, one per round
            assert site_log(site).count("site: base model loaded from") == 3, site_log(site)[-3000:]
            assert "is_gradient_checkpointing` is deprecated" not in site_log(site)
    finally:
        stop_processes(started)
    assert all(p.poll() is not None for p in started)
