"""A results folder is consistent: one evaluation run's outputs replace the previous run's all
together; a crash at any step of the swap, or a full disk while writing, never leaves a mix."""
import errno
import json

import pytest

from miselbo.storage import result_set
from miselbo.storage.result_set import INDEX_FILE_NAME, ResultSet
from miselbo.storage.safe_io import atomic_write_text, verify_sha256


class Crash(BaseException):
    """Stands in for SIGKILL: raised mid-commit; the visible folder is then inspected as is."""


def _write_run(folder, tag, names, legacy=()):
    with ResultSet(folder, legacy) as outputs:
        for name in names:
            atomic_write_text(outputs.path(name), f"run {tag}: {name}\n",
                              record_sha256=name.endswith(".json"))


def _visible_tags(folder):
    """The run tag of every output file in the folder (sidecars and the index excluded)."""
    tags = set()
    for path in folder.iterdir():
        if path.is_file() and not path.name.endswith(".sha256") and path.name != INDEX_FILE_NAME:
            tags.add(path.read_text().split(":")[0])
    return tags


def test_a_new_run_replaces_every_output_of_the_previous_one(tmp_path):
    _write_run(tmp_path, "A", ["results.json", "ablation.csv", "ablation.png", "samples.png"])
    _write_run(tmp_path, "B", ["results.json", "samples.png"])  # no ablation this time
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        INDEX_FILE_NAME, "results.json", "results.json.sha256", "samples.png"]
    assert _visible_tags(tmp_path) == {"run B"}
    index = json.loads((tmp_path / INDEX_FILE_NAME).read_text())
    assert index["files"] == ["results.json", "samples.png"] and index["run_id"]
    assert verify_sha256(tmp_path / "results.json")


def test_legacy_outputs_without_an_index_are_replaced_too(tmp_path):
    for name in ("results.json", "ablation.png", "samples.png"):
        (tmp_path / name).write_text(f"run old: {name}\n")
    (tmp_path / "notes.txt").write_text("the user's own file")
    _write_run(tmp_path, "B", ["results.json"], legacy=("results.json", "ablation.png", "samples.png"))
    assert not (tmp_path / "ablation.png").exists() and not (tmp_path / "samples.png").exists()
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"  # not an output: kept


@pytest.mark.parametrize("crash_at", range(1, 17))  # 15 file-system steps in all
def test_a_crash_at_any_step_of_the_swap_leaves_no_mix(tmp_path, monkeypatch, crash_at):
    names_a = ["results.json", "ablation.csv", "ablation.png", "samples.png"]
    _write_run(tmp_path, "A", names_a)
    steps = {"count": 0}
    real_replace, real_unlink = result_set.os.replace, result_set.Path.unlink

    def counted(real):
        def step(*args, **kwargs):
            steps["count"] += 1
            if steps["count"] == crash_at:
                raise Crash()
            return real(*args, **kwargs)
        return step
    monkeypatch.setattr(result_set.os, "replace", counted(real_replace))
    monkeypatch.setattr(result_set.Path, "unlink", counted(real_unlink))
    try:
        _write_run(tmp_path, "B", ["results.json", "samples.png"])
    except Crash:
        pass
    monkeypatch.undo()
    tags = _visible_tags(tmp_path)
    assert len(tags) <= 1, (crash_at, tags)  # only old files or only new ones
    if (tmp_path / INDEX_FILE_NAME).exists():  # an index present means a complete set
        index = json.loads((tmp_path / INDEX_FILE_NAME).read_text())
        assert all((tmp_path / name).exists() for name in index["files"])
        assert tags == ({"run A"} if index["files"] == sorted(names_a) else {"run B"})


def test_disk_full_while_writing_keeps_the_previous_outputs(tmp_path):
    _write_run(tmp_path, "A", ["results.json", "samples.png"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(OSError):
        with ResultSet(tmp_path) as outputs:
            atomic_write_text(outputs.path("results.json"), "run B: results.json\n")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # staging removed too


def test_staging_left_by_a_killed_run_is_removed_by_the_next(tmp_path):
    stale = tmp_path / ".staging-killed"
    stale.mkdir()
    (stale / "results.json").write_text("run dead: results.json\n")
    _write_run(tmp_path, "B", ["results.json"])
    assert not stale.exists() and _visible_tags(tmp_path) == {"run B"}


def test_output_names_must_be_plain(tmp_path):
    with ResultSet(tmp_path) as outputs:
        for bad in ("../x.json", "sub/x.json", INDEX_FILE_NAME):
            with pytest.raises(ValueError):
                outputs.path(bad)
