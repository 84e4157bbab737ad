"""--p_and_q1_path is judged as typed: a <(cat parent.pt) pipe gets the storage layer's pipe refusal."""

import pytest

from miselbo.storage.safe_io import NotARegularFileError
from miselbo.training.new_encoder import parent_checkpoint_path


def test_a_dev_fd_pipe_is_refused_as_a_pipe_naming_the_flag(pipe_path):
    with pytest.raises(NotARegularFileError) as refused:
        parent_checkpoint_path(pipe_path)
    message = str(refused.value)
    assert message.startswith(f"--p_and_q1_path {pipe_path}: ")
    assert "is a pipe" in message and "<(cat checkpoint.pt)" in message
    assert "does not exist" not in message


def test_train_py_exits_2_with_the_pipe_message(tmp_path, pipe_path, capsys):
    from miselbo.training import main
    code = main(["--root", str(tmp_path), "--save", "q2", "--train_new_q", "--p_and_q1_path", pipe_path])
    err = capsys.readouterr().err
    assert code == 2 and "is a pipe" in err and "does not exist" not in err


def test_a_symlinked_parent_still_gives_its_real_path(tmp_path):
    real = tmp_path / "run" / "checkpoint.pt"
    real.parent.mkdir()
    real.write_bytes(b"x")
    (tmp_path / "link").symlink_to(real.parent)
    assert parent_checkpoint_path(str(tmp_path / "link")) == real.resolve()
