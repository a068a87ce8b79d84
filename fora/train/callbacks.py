"""What a run leaves to look at: OUTPUT_DIR/training_loss.png, the loss curve (TensorBoard logs are the
Trainer's own, under --logging_dir)."""

from pathlib import Path

from transformers import TrainerCallback


class LossPlotCallback(TrainerCallback):
    """Writes OUTPUT_DIR/training_loss.png (train and eval loss per step) whenever the Trainer saves and at the end."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_loss(state.log_history, Path(args.output_dir) / "training_loss.png")

    on_train_end = on_save


def plot_loss(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            axes.plot(*zip(*points), style, label=key.replace("_", " "))
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
