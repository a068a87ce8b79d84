"""fora/io.py: JSON a user names read with one-line errors, atomic writes, and the guard on an earlier run's output."""

import json
import os

import pytest

from fora.errors import UserError
from fora.io import STAGING_PREFIX, read_json, refuse_earlier_output, replace_dir, write_json, write_text


def error_of(call) -> str:
    with pytest.raises(UserError) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


def test_read_json_names_the_flag_the_file_and_the_line(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_bytes(b'\xef\xbb\xbf{"zero_optimization": {"stage": 2}}')  # a byte-order mark is accepted
    assert read_json(path, "--deepspeed") == {"zero_optimization": {"stage": 2}}
    assert error_of(lambda: read_json(tmp_path / "none.json", "--deepspeed")) == f"--deepspeed {tmp_path / 'none.json'}: no such file"
    assert error_of(lambda: read_json(tmp_path)) == f"{tmp_path}: is a directory, expected a JSON file"
    path.write_text('{"a": 1,\n  "b": }')
    assert error_of(lambda: read_json(path, "--lora_config")) == f"--lora_config {path}: line 2: invalid JSON (Expecting value)"
    path.write_bytes('{"a": 1,\n "发": 2}'.encode("gbk"))
    assert error_of(lambda: read_json(path)) == (
        f"{path}: line 2: not valid UTF-8 (byte 11); convert it first, e.g. iconv -f GBK -t UTF-8"
    )


def test_writes_replace_the_whole_file_and_leave_nothing_beside_it(tmp_path):
    path = tmp_path / "predict_results.json"
    write_json(path, {"rouge-1": 12.5, "label": "泵"})
    assert path.read_text(encoding="utf-8") == '{\n  "rouge-1": 12.5,\n  "label": "泵"\n}\n'
    write_text(path, "replaced\n")
    assert path.read_text() == "replaced\n"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file was renamed into place
    assert STAGING_PREFIX == ".tmp-" and not list(tmp_path.glob(f"{STAGING_PREFIX}*"))


def test_an_earlier_run_is_replaced_only_when_asked(tmp_path):
    out, markers = tmp_path / "out", ("adapter_config.json", "checkpoint-*")
    assert refuse_earlier_output(out, markers, overwrite=False) == []  # no folder yet
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert refuse_earlier_output(out, markers, overwrite=False) == []  # nothing of a run
    for name in ("checkpoint-2", "checkpoint-10", "adapter_config.json"):
        (out / name).touch()
    assert error_of(lambda: refuse_earlier_output(out, markers, False, otherwise=" or choose another --output_dir")) == (
        f"--output_dir {out} holds an earlier run (adapter_config.json); pass --overwrite_output_dir to replace it "
        "or choose another --output_dir"
    )
    assert refuse_earlier_output(out, markers, overwrite=True) == ["adapter_config.json", "checkpoint-10", "checkpoint-2"]
    assert error_of(lambda: refuse_earlier_output(out / "notes.txt", markers, True)) == (
        f"--output_dir {out / 'notes.txt'}: is a file, expected a folder"
    )


def test_replace_dir_swaps_in_the_finished_folder_or_keeps_the_old_one(tmp_path):
    staging, output = tmp_path / ".merged.partial", tmp_path / "merged"
    staging.mkdir()
    (staging / "model.safetensors").write_text("first")
    replace_dir(staging, output)  # no output yet
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    staging.mkdir()
    (staging / "config.json").write_text(json.dumps({"model_type": "llama"}))
    replace_dir(staging, output)
    assert [p.name for p in output.iterdir()] == ["config.json"] and [p.name for p in tmp_path.iterdir()] == ["merged"]
    with pytest.raises(FileNotFoundError):  # the new folder cannot be moved in: the old one comes back
        replace_dir(tmp_path / "never-written", output)
    assert [p.name for p in output.iterdir()] == ["config.json"] and sorted(os.listdir(tmp_path)) == ["merged"]
