"""The ServerApp: the global adapter (the server's own copy of base + adapter), the rounds, an adapter saved
and evaluated after each one, and federated_history.json with its plots."""

import os
import shutil
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fora import metrics
from fora.data.collator import PaddingCollator
from fora.data.dataset import build_dataset
from fora.data.formats import load_conversations
from fora.federated import resume
from fora.federated.run import (
    HISTORY_FILE,
    FederatedRun,
    adapter_state,
    load_adapted_model,
    load_adapter_state,
    logger,
    parse,
    quiet_training_args,
    refuse_previous_run,
    server_argv,
)
from fora.federated.strategy import AdapterAveraging, FederationFailed, PrivateAveraging, ServerAdamW
from fora.infer import generate
from fora.io import STAGING_PREFIX, write_json
from fora.models.tokenizer import save_base_tokenizer
from fora.run import RunRecord
from fora.train.trainer import SupervisedTrainer
from fora.tuners.attach import save_trained


class GlobalAdapter:
    """The server's copy of base + adapter: the initial adapter, one saved folder per round, and evaluation."""

    def __init__(self, run: FederatedRun):
        self.run = run
        self.model_path, self.tokenizer, self.template, self.model = load_adapted_model(run)
        self.base_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters() if not p.requires_grad)
        self.evaluator = None
        if run.data.validation_file:
            eval_args = quiet_training_args(run.training, str(run.output_dir))
            dataset = build_dataset(
                run.data.validation_file, self.tokenizer, self.template, run.data, run.training.main_process_first, logger.info
            )
            self.evaluator = SupervisedTrainer(
                model=self.model, args=eval_args, eval_dataset=dataset, processing_class=self.tokenizer,
                data_collator=PaddingCollator.for_this_machine(self.tokenizer.pad_token_id), run_record=self.run_record(0),
            )

    def save(self, folder: Path, state: dict[str, torch.Tensor], server_round: int) -> None:
        """The adapter in train_lora.py's format (PEFT files, tokenizer, fora_run.json), written to a
        staging folder and renamed into place, so a reader never finds half an adapter."""
        load_adapter_state(self.model, state)
        staging = folder / f"{STAGING_PREFIX}adapter"
        shutil.rmtree(staging, ignore_errors=True)  # left by a save that was killed midway
        save_trained(self.model, staging)
        save_base_tokenizer(self.model_path, staging, self.run.model.trust_remote_code)
        self.run_record(server_round).save(staging)
        for path in staging.iterdir():
            os.replace(path, folder / path.name)
        staging.rmdir()

    def run_record(self, server_round: int) -> RunRecord:
        run, fed = self.run, self.run.federated
        federation = {
            "round": server_round,
            "num_rounds": fed.num_rounds,
            "num_clients": fed.num_clients,
            "partition": fed.partition,
            "local_steps": fed.local_steps,
            "local_epochs": fed.local_epochs,
            "proximal_mu": fed.proximal_mu,
            "server_learning_rate": fed.server_learning_rate,
            "server_momentum": fed.server_momentum,
            "server_optimizer": fed.server_optimizer,
            "client_learning_rate": fed.client_learning_rate if fed.server_optimizer == "adamw" else None,
            "dp_noise_multiplier": fed.dp_noise_multiplier,
            "dp_clipping_norm": fed.dp_clipping_norm,
        }
        return RunRecord.of_training(
            self.model_path, run.model, run.data, run.finetuning, self.template.name, federated=federation
        )

    def evaluate(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """Eval loss on --validation_file (the Trainer's, as train_lora.py reports it); with --eval_generate
        also ROUGE-L and BLEU-4 of greedy answers, generated and scored by the prediction code."""
        if self.evaluator is None:
            return {}
        load_adapter_state(self.model, state)
        scores = {"eval_loss": self.evaluator.evaluate()["eval_loss"]}
        if self.run.federated.eval_generate:
            args = self.run.data
            conversations, _ = load_conversations(
                args.validation_file, args.data_format, args.prompt_column, args.response_column, require_response=False
            )
            prompts = [generate.build_prompt(self.tokenizer, self.template, c, args.max_source_length, args.max_target_length)[0]
                       for c in conversations]
            stop_ids = self.template.stop_token_ids(self.tokenizer)
            self.model.eval()
            new_ids = generate.generate_ids(
                self.model, self.tokenizer, prompts, stop_ids, args.max_target_length,
                self.run.training.per_device_eval_batch_size, generate.generation_config(self.tokenizer, stop_ids), progress=False,
            )
            scored = metrics.score_predictions([generate.decode(self.tokenizer, ids) for ids in new_ids],
                                               [c.turns[-1][1] for c in conversations])
            scores.update({key: scored[key] for key in ("rouge-l", "bleu-4") if key in scored})
        return scores


class History:
    """federated_history.json and one plot per metric, rewritten after every round."""

    def __init__(self, output_dir: Path, base_bytes: int):
        self.output_dir = output_dir
        self.record = {"base_model_bytes": base_bytes, "rounds": []}

    def add(self, entry: dict) -> None:
        self.record["rounds"].append(entry)
        write_json(self.output_dir / HISTORY_FILE, self.record)
        self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        rounds = self.record["rounds"]
        for metric in ("eval_loss", "rouge-l", "bleu-4"):
            points = [(r["round"], r[metric]) for r in rounds if metric in r]
            if not points:
                continue
            figure, axes = plt.subplots(figsize=(6, 4))
            axes.plot(*zip(*points), marker="o")
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.set_xlabel("round")
            axes.set_ylabel(metric)
            axes.set_title(f"global adapter: {metric} per round")
            axes.grid(alpha=0.3)
            figure.tight_layout()
            figure.savefig(self.output_dir / f"federated_{metric.replace('-', '_')}.png")
            plt.close(figure)


def serve(grid, argv: list[str]) -> None:
    """The ServerApp's body: initial adapter, the rounds, a saved and evaluated adapter after each (and what a
    resumed run needs, fora.federated.resume)."""
    run = parse(argv)
    fed = run.federated
    done = resume.round_to_resume(run.output_dir, fed.resume_from_round, fed.num_rounds) if fed.resume_from_round else 0
    if not done:
        refuse_previous_run(run)
    run.output_dir.mkdir(parents=True, exist_ok=True)
    server = GlobalAdapter(run)
    history = History(run.output_dir, server.base_bytes)
    initial = adapter_state(server.model)
    averaging = AdapterAveraging(fed.min_fit_clients, fed.proximal_mu, fed.server_learning_rate, fed.server_momentum,
                                 ServerAdamW(run.training, fed, initial) if fed.server_optimizer == "adamw" else None,
                                 fed.fraction_train)
    strategy = averaging if fed.dp_noise_multiplier is None else PrivateAveraging(averaging, fed)
    ledger = strategy.ledger if isinstance(strategy, PrivateAveraging) else None
    if done:
        saved = resume.load_round(run.output_dir, done)
        resume.restore(saved, averaging, ledger)
        initial, history.record = saved.adapter, saved.record["history"]
        logger.info("Resuming after round %d of %d from %s", done, fed.num_rounds, run.output_dir / f"round-{done}")
    logger.info("Global adapter: %d tensors, %d bytes; the base model stays at every site (%d bytes)",
                len(initial), ArrayRecord(initial).count_bytes(), server.base_bytes)
    latest = {"state": initial}

    def end_of_round(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round = flower_round + done  # Flower counts a resumed run's rounds from 1
        if flower_round == 0 and done:
            return None  # round `done` was saved and scored before the stop
        state = latest["state"] = arrays.to_torch_state_dict()
        folder = run.output_dir / f"round-{server_round}"
        if server_round:
            folder.mkdir(exist_ok=True)
            server.save(folder, state, server_round)
        scores = server.evaluate(state)
        entry = {"round": server_round, **scores, **averaging.rounds.get(server_round, {})}
        history.add(entry)
        if server_round:
            resume.save_round(folder, server_round, state, averaging, ledger, history.record)
        logger.info("round %d: %s", server_round, ", ".join(f"{k} {v:.4f}" for k, v in scores.items()) or "no --validation_file")
        for client in entry.get("clients", []):
            logger.info("round %d: client %d trained on %d examples (loss %.4f), received %d and sent %d bytes "
                        "(base model: %d bytes, never sent)", server_round, client["client"], client["num_examples"],
                        client["train_loss"], client["download_bytes"], client["upload_bytes"], server.base_bytes)
        return MetricRecord(scores)

    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial),
        num_rounds=fed.num_rounds - done,
        timeout=fed.round_timeout,
        evaluate_fn=end_of_round,
    )
    failure = averaging.no_update_reason()
    if failure and not done:  # the initial adapter must not pass for a trained one
        raise FederationFailed(failure)
    server.save(run.output_dir, latest["state"], fed.num_rounds)
    logger.info("Global adapter saved to %s (one per round in %s/round-N); history: %s",
                run.output_dir, run.output_dir, run.output_dir / HISTORY_FILE)


def make_server_app(argv: list[str] | None = None):
    """The ServerApp. `argv`: the flags (simulation); None: read them from the run config (deployment)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, argv if argv is not None else server_argv(context.run_config))

    return app



# The app a deployment loads by name (federated_app/pyproject.toml); it reads its flags from the run config.
app = make_server_app()
