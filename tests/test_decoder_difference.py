"""A decoder that differs from the first member's in one tensor is refused naming that tensor,
whether the edited file still records the first decoder's fingerprint or none at all."""
from pathlib import Path

import pytest

from miselbo.errors import CheckpointError
from miselbo.evaluation.members import load_members
from miselbo.storage.checkpoints import read_checkpoint
from miselbo.storage.safe_io import atomic_torch_save

DEMO = Path(__file__).resolve().parents[1] / "models" / "mnist5k_demo"
EDITED = "dec_sampler.0.1.bias"


@pytest.mark.parametrize("recorded_fingerprint", [True, False])
def test_one_changed_decoder_tensor_is_named(tmp_path, recorded_fingerprint):
    checkpoint = read_checkpoint(DEMO / "q2" / "checkpoint.pt")
    checkpoint["state_dict"][EDITED] = checkpoint["state_dict"][EDITED] + 1.0
    if not recorded_fingerprint:
        del checkpoint["miselbo"]["decoder_fingerprint"]
    atomic_torch_save(checkpoint, tmp_path / "q2_edited.pt")
    with pytest.raises(CheckpointError) as refused:
        load_members([DEMO / "p_and_q1", tmp_path / "q2_edited.pt"])
    assert f"(first differing decoder tensor: {EDITED})" in str(refused.value)
