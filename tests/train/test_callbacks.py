"""fora/train/callbacks.py: the loss curve (training_loss.png) written at each save and at the end, by the first process."""

from types import SimpleNamespace

from fora.train.callbacks import LossPlotCallback

PNG = b"\x89PNG\r\n\x1a\n"
LOG = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.2}, {"step": 3, "loss": 1.7},
       {"step": 3, "train_runtime": 1.0}]


def test_the_loss_curve_is_written_at_each_save_and_at_the_end(tmp_path):
    callback, args = LossPlotCallback(), SimpleNamespace(output_dir=str(tmp_path / "out"))
    other_rank = SimpleNamespace(is_world_process_zero=False, log_history=LOG)
    callback.on_save(args, other_rank, None)
    assert not (tmp_path / "out").exists()  # only the first process draws
    callback.on_save(args, SimpleNamespace(is_world_process_zero=True, log_history=LOG[:2]), None)
    plot = tmp_path / "out" / "training_loss.png"
    first = plot.read_bytes()
    assert first.startswith(PNG)
    callback.on_train_end(args, SimpleNamespace(is_world_process_zero=True, log_history=LOG), None)
    assert plot.read_bytes().startswith(PNG) and plot.read_bytes() != first  # redrawn with the later steps
