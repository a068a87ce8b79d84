"""Federated demo: is the federated adapter as good as a centralised one, and better than each site alone?

    nice python scripts/federated_demo.py                          # LoRA, 3 clients, AdamW server, 60 rounds x 1 local step
    nice python scripts/federated_demo.py --variants fora          # the same for FoRA
    nice python scripts/federated_demo.py --variants qlora --rounds 20
    nice python scripts/federated_demo.py --server_optimizer fedavgm --rounds 10 --local_steps 6   # plain FedAvg

On the embedded default model and the project's sample data (data/train.json), for every variant:
  split    the training records non-IID across the clients by relation type: each record goes to the client
           of the rarest relation among its triples (the rarest relation to client 0, the next to client 1,
           ...; records with none of those to the last client), so clients see different relations
  train    (1) train_federated.py --partition files on the clients' files, --rounds rounds of --local_steps;
           (2) train_lora.py on the union with the same total optimizer steps (clients x rounds x local
           steps); (2b) the same with the federation's records and sequential updates (rounds x local
           steps, each accumulating one batch per client); (3) train_lora.py on each client's file alone
           with rounds x local steps
           (qlora: train_federated.py --quantization_bit 4 and train_qlora.py)
  evaluate one evaluator for every adapter, the federated server's own (GlobalAdapter.evaluate: the eval
           loss on data/test.json as train_lora.py reports it; with --eval_generate also ROUGE-L): the base and each round's global adapter
           are scored by the federated run itself (federated_history.json); the centralised and the
           single-client adapters by the same evaluator in this process, which also re-scores the last
           round's adapter to check that both give the same figure
  report   a table with the ratios federated / centralised (both runs; the target is on (2b)) and federated /
           best client alone, the run times, WORK_DIR/VARIANT/results.json and WORK_DIR/VARIANT/eval_loss.png
Every run uses the same flags (batch, lengths, learning rate and schedule, seed, float32); a decaying
schedule spans the federated run's rounds as it spans the centralised run's steps. With the default
--server_optimizer adamw the optimizer and its schedule are the server's and the clients take plain SGD
steps; with fedavgm the clients restart their own optimizer each round, as FedAvg does.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from fora.federated.run import parse
from fora.federated.server_app import GlobalAdapter

REPO = Path(__file__).resolve().parent.parent

VARIANTS = {  # adapter flags, and the script that trains the centralised and single-client adapters
    "lora": (["--finetuning_type", "lora"], "train_lora.py"),
    "fora": (["--finetuning_type", "fora"], "train_lora.py"),
    "qlora": (["--finetuning_type", "lora", "--quantization_bit", "4"], "train_qlora.py"),
}


def relations(record: dict) -> set[str]:
    """The relation of every `head_relation_tail` line of a record's answer."""
    return {line.split("_")[1] for line in record["output"].splitlines() if line.count("_") >= 2}


def split_by_rarest_relation(records: list[dict], num_clients: int, seed: int) -> list[list[dict]]:
    """Non-IID shares: the num_clients - 1 rarest relations (by records holding them) each own a client;
    a record goes to the owner of its rarest relation, or to the last client. Each share is shuffled with `seed`."""
    counts = Counter(relation for record in records for relation in relations(record))
    owners = sorted(counts, key=lambda relation: (counts[relation], relation))[: num_clients - 1]
    shares: list[list[dict]] = [[] for _ in range(num_clients)]
    for record in records:
        held = relations(record)
        shares[next((i for i, relation in enumerate(owners) if relation in held), num_clients - 1)].append(record)
    rng = random.Random(seed)
    for share in shares:
        rng.shuffle(share)
    return shares


def describe(share: list[dict]) -> str:
    counts = Counter(relation for record in share for relation in relations(record))
    return " ".join(f"{relation}:{count}" for relation, count in counts.most_common())


def run(command: list[str], log_file: Path, env: dict) -> float:
    """Run one entry script to the end, its output into `log_file`; returns the wall time in seconds."""
    print(f"$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    with open(log_file, "w") as log:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
        sys.exit(f"{command[1]} failed (exit {result.returncode}); see {log_file}")
    return time.perf_counter() - started


def evaluate(federated_argv: list[str], folders: dict[str, Path]) -> dict[str, dict[str, float]]:
    """The scores of every adapter folder by the federated server's evaluator, built from the federated
    run's flags (the same base, dataset, batches and, with --eval_generate, generation as its per-round scores)."""
    from safetensors.torch import load_file

    server = GlobalAdapter(parse(federated_argv))
    return {name: server.evaluate(load_file(folder / "adapter_model.safetensors")) for name, folder in folders.items()}


def plot(path: Path, variant: str, rounds: list[float], centralised: float, same_updates: float, alone: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.plot(range(len(rounds)), rounds, marker="o", color="C0", label="federated (global adapter)")
    axes.axhline(centralised, color="C1", label="centralised, same total steps")
    axes.axhline(same_updates, color="C1", linestyle=":", label="centralised, same records and sequential updates")
    for client, loss in enumerate(alone):
        axes.axhline(loss, color=f"C{client + 2}", linestyle="--", label=f"client {client} alone")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_yscale("log")  # the runs end an order of magnitude below the base model, close to each other
    axes.set_xlabel("round (0 = base model)")
    axes.set_ylabel("eval loss (data/test.json)")
    axes.set_title(f"Federated {variant}: {len(alone)} non-IID clients")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def demo(variant: str, options, client_files: list[Path], env: dict) -> dict:
    adapter_flags, single_script = VARIANTS[variant]
    out = options.work_dir / variant
    out.mkdir(parents=True, exist_ok=True)
    common = [
        *adapter_flags, "--lora_config", "configs/lora_config_smollm2.json",
        "--max_source_length", "256", "--max_target_length", "128", "--torch_dtype", "float32",
        "--per_device_train_batch_size", str(options.batch_size), "--per_device_eval_batch_size", "8",
        "--learning_rate", str(options.learning_rate), "--lr_scheduler_type", options.lr_scheduler_type,
        "--seed", str(options.seed), "--logging_steps", "4", "--report_to", "none", "--overwrite_output_dir",
    ]
    num_clients, steps_per_client = len(client_files), options.rounds * options.local_steps
    federated_argv = [
        "--partition", "files", "--client_files", ",".join(map(str, client_files)), "--num_clients", str(num_clients),
        "--num_rounds", str(options.rounds), "--local_steps", str(options.local_steps), "--server_optimizer", options.server_optimizer,
        "--validation_file", options.validation_file, "--output_dir", str(out / "federated"), *common,
        *(["--eval_generate"] if options.eval_generate else []),
    ]
    seconds = {"federated": run([sys.executable, "train_federated.py", *federated_argv], out / "federated.log", env)}
    single = ["--save_strategy", "no", *common]
    seconds["centralised"] = run(
        [sys.executable, single_script, "--train_file", options.train_file, "--max_steps", str(num_clients * steps_per_client),
         "--output_dir", str(out / "centralised"), *single], out / "centralised.log", env)
    seconds["centralised, same updates"] = run(
        [sys.executable, single_script, "--train_file", options.train_file, "--max_steps", str(steps_per_client),
         "--gradient_accumulation_steps", str(num_clients), "--output_dir", str(out / "centralised-same-updates"), *single],
        out / "centralised-same-updates.log", env)
    for client, path in enumerate(client_files):
        seconds[f"client {client} alone"] = run(
            [sys.executable, single_script, "--train_file", str(path), "--max_steps", str(steps_per_client),
             "--output_dir", str(out / f"alone-{client}"), *single], out / f"alone-{client}.log", env)

    history = json.loads((out / "federated" / "federated_history.json").read_text())["rounds"]
    scores = {("base" if r["round"] == 0 else f"round {r['round']}"): r for r in history}
    folders = {
        "centralised": out / "centralised", "centralised, same updates": out / "centralised-same-updates",
        **{f"client {c} alone": out / f"alone-{c}" for c in range(num_clients)},
    }
    last = f"round {options.rounds}"
    folders[f"{last} (re-scored)"] = out / "federated" / f"round-{options.rounds}"
    print(f"Evaluating {len(folders)} adapters on {options.validation_file} ...", flush=True)
    scores.update(evaluate(federated_argv, folders))
    recheck = scores.pop(f"{last} (re-scored)")["eval_loss"]
    losses = {name: entry["eval_loss"] for name, entry in scores.items()}
    rouge_l = {name: entry["rouge-l"] for name, entry in scores.items() if "rouge-l" in entry}

    rounds = [losses["base"]] + [losses[f"round {r}"] for r in range(1, options.rounds + 1)]
    final, centralised, same_updates = rounds[-1], losses["centralised"], losses["centralised, same updates"]
    alone = [losses[f"client {c} alone"] for c in range(num_clients)]
    result = {
        "variant": variant, "eval_loss": losses, "rouge-l": rouge_l, "last_round_rescored": recheck, "seconds": seconds,
        "federated_over_centralised": final / centralised, "federated_over_best_alone": final / min(alone),
        "federated_over_centralised_same_updates": final / same_updates,
        # The target compares runs that update the shared adapter as often, on the same records (README).
        "within_5_percent_of_centralised_same_updates": final <= 1.05 * same_updates,
        "better_than_every_client_alone": final < min(alone),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    plot(out / "eval_loss.png", variant, rounds, centralised, same_updates, alone)

    steps = {"base": 0, "centralised": num_clients * steps_per_client, "centralised, same updates": steps_per_client,
             **{f"round {r}": num_clients * r * options.local_steps for r in range(1, options.rounds + 1)},
             **{f"client {c} alone": steps_per_client for c in range(num_clients)}}
    print(f"\n{variant}: eval loss on {options.validation_file} ({num_clients} clients, {options.rounds} rounds x "
          f"{options.local_steps} local steps, batch {options.batch_size}, {options.lr_scheduler_type} rate {options.learning_rate:g}; "
          f"'centralised, same updates' steps on batches of {num_clients * options.batch_size})")
    print(f"{'adapter':<27}{'steps':>7}{'eval loss':>11}{'/ centralised':>15}{'ROUGE-L':>9}{'seconds':>9}")
    for name, loss in losses.items():
        took = f"{seconds[name]:.0f}" if name in seconds else ""
        rouge = f"{rouge_l[name]:.2f}" if name in rouge_l else ""
        print(f"{name:<27}{steps[name]:>7}{loss:>11.4f}{loss / centralised:>15.3f}{rouge:>9}{took:>9}")
    print(f"{last} re-scored in this process: {recheck:.4f} (the federated run logged {losses[last]:.4f})")
    print(f"federated (round {options.rounds}) / centralised with the same updates: "
          f"{result['federated_over_centralised_same_updates']:.3f} "
          f"(target <= 1.05: {'met' if result['within_5_percent_of_centralised_same_updates'] else 'NOT met'}); "
          f"/ centralised with every client's steps in a row: {result['federated_over_centralised']:.3f}; "
          f"/ best client alone: {result['federated_over_best_alone']:.3f} "
          f"(target < 1: {'met' if result['better_than_every_client_alone'] else 'NOT met'}); "
          f"federated run: {seconds['federated']:.0f} s")
    print(f"Plot: {out / 'eval_loss.png'}; figures: {out / 'results.json'}\n", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="lora", help="comma-separated: lora, fora, qlora")
    parser.add_argument("--clients", type=int, default=3, help="sites to split the training records across, non-IID by relation")
    parser.add_argument("--rounds", type=int, default=60, help="federated rounds")
    parser.add_argument("--local_steps", type=int, default=1, help="optimizer steps of each client per round")
    parser.add_argument("--batch_size", type=int, default=4, help="per-step batch of every run")
    parser.add_argument("--learning_rate", type=float, default=3e-3, help="peak learning rate of every run")
    parser.add_argument("--lr_scheduler_type", default="cosine", choices=["constant", "linear", "cosine"],
                        help="the schedule of every run; a decaying one spans the federated run's rounds")
    parser.add_argument("--server_optimizer", default="adamw", choices=["fedavgm", "adamw"],
                        help="the federated server's step (train_federated.py --server_optimizer); adamw with "
                        "--local_steps 1 is one AdamW step per round on the clients' mean gradient")
    parser.add_argument("--seed", type=int, default=42, help="seed of the split and of every run")
    parser.add_argument("--eval_generate", action="store_true",
                        help="also ROUGE-L of greedy answers for every adapter (train_federated.py --eval_generate); slower")
    parser.add_argument("--train_file", default="data/train.json", help="records to split across the clients")
    parser.add_argument("--validation_file", default="data/test.json", help="held-out records every adapter is scored on")
    parser.add_argument("--work_dir", type=Path, default=REPO / "output" / "federated_demo",
                        help="where the runs, results.json and plots go")
    options = parser.parse_args()
    variants = options.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    options.work_dir = options.work_dir.resolve()

    records = [json.loads(line) for line in (REPO / options.train_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    split_dir = options.work_dir / "clients"
    split_dir.mkdir(parents=True, exist_ok=True)
    client_files = []
    for client, share in enumerate(split_by_rarest_relation(records, options.clients, options.seed)):
        path = split_dir / f"client-{client}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in share), encoding="utf-8")
        client_files.append(path)
        print(f"client {client}: {len(share)} records; relations {describe(share)}")

    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(options.work_dir / "flwr-home")}
    results = [demo(variant, options, client_files, env) for variant in variants]
    (options.work_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
