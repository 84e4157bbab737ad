"""The main job's time accounting (miselbo.runtime.stage_clock, the pipeline's per-stage summary) and the
per-epoch test on a fixed subset (--epoch_test_examples), which must leave training untouched."""
import json
import time

import pytest
import torch

from miselbo.pipeline import run as pipeline
from miselbo.data.datasets import load_dataset
from miselbo.runtime.stage_clock import StageClock, summary_table, training_stage_parts
from miselbo.training import train
from miselbo.nvae.config import get_arch_cells
from miselbo.nvae.model import AutoEncoder
from miselbo.training.epoch_test import UnreplayableDraws, record_draws
from miselbo.training.evaluation import subset_loader
from miselbo.training.options import build_parser, to_nvae_namespace

from test_train_common import one_thread, run_args  # noqa: F401  (fixture)

TINY_PIPELINE = ["--preset", "tiny", "--num_train_examples", "64", "--num_test_examples", "16",
                 "--num_eval_examples", "8", "--num_iw_samples", "2", "--device", "cpu"]


# ----------------------------------------------------------------------------- the clock

def test_measure_accumulates_and_counts_a_block_that_raises():
    clock = StageClock()
    for _ in range(2):
        with clock.measure("nap"):
            time.sleep(0.02)
    with pytest.raises(KeyError):
        with clock.measure("failing"):
            time.sleep(0.02)
            raise KeyError("x")
    assert list(clock.seconds) == ["nap", "failing"]
    assert 0.04 <= clock.seconds["nap"] < 1.0
    assert 0.02 <= clock.seconds["failing"] < 1.0


def test_timed_batches_charges_waiting_for_items_not_the_work_between_them():
    def slow_source():
        for item in range(3):
            time.sleep(0.05)  # "loading"
            yield item

    clock = StageClock()
    seen = []
    for item in clock.timed_batches(slow_source(), "loading"):
        seen.append(item)
        time.sleep(0.1)  # "computing": must not be charged to loading
    assert seen == [0, 1, 2]
    assert 0.15 <= clock.seconds["loading"] < 0.3  # 3 x 0.05 s, well below the 0.3 s of work


def test_summary_table_lists_each_stage_with_its_share_and_parts():
    rows = [("p_and_q1", {"total": 30.0, "steps": 20.0, "epoch_tests": 5.0}),
            ("evaluation", {"total": 10.0})]
    lines = summary_table(rows, 40.0).splitlines()
    assert lines[1].split()[:3] == ["p_and_q1", "30.0", "75.0%"]
    assert lines[1].endswith("steps 20.0, epoch_tests 5.0")
    assert lines[2].split() == ["evaluation", "10.0", "25.0%"]
    assert lines[3].split() == ["all", "40.0", "100.0%"]


def test_stage_parts_come_from_a_result_file_written_during_the_stage_only(tmp_path):
    result = tmp_path / "train_result.json"
    result.write_text(json.dumps({"seconds": {"steps": 3.0, "final_test": 1.0}}))
    written_at = result.stat().st_mtime
    assert training_stage_parts(result, 5.0, written_at - 1) == {"total": 5.0, "steps": 3.0,
                                                                  "final_test": 1.0}
    assert training_stage_parts(result, 0.1, written_at + 1) == {"total": 0.1}  # skipped stage
    assert training_stage_parts(tmp_path / "missing.json", 0.1, 0.0) == {"total": 0.1}


# ----------------------------------------------------------------------------- the subset

class _Loader:
    """What subset_loader reads from a loader."""
    def __init__(self, dataset):
        self.dataset, self.batch_size, self.num_workers, self.pin_memory = dataset, 7, 0, False


def _images(loader) -> torch.Tensor:
    return torch.cat([images for images, _ in loader])


def test_subset_loader_takes_evenly_spaced_images_with_a_fixed_binarisation():
    full = load_dataset("mnist5k", None, False)  # 1,000 test digits
    full.reseed(123)
    state_before = full.generator.get_state()
    loader = subset_loader(_Loader(full), 40, seed=5)
    first, again = _images(loader), _images(subset_loader(_Loader(full), 40, seed=5))
    assert first.shape == (40, 1, 32, 32) and loader.batch_size == 7
    assert torch.equal(first, again)  # same seed: same binarised images
    assert not torch.equal(first, _images(subset_loader(_Loader(full), 40, seed=6)))
    labels = torch.cat([labels for _, labels in loader])
    assert torch.equal(labels, full.labels[[i * 1000 // 40 for i in range(40)]])  # i * N // k
    padded = torch.nn.functional.pad(full.images[[i * 25 for i in range(40)]].float() / 255, (2,) * 4)
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert not bool(((first == 1) & (padded == 0)).any())  # ones only where the digit has ink
    assert torch.equal(full.generator.get_state(), state_before)  # the full test's draws untouched
    assert len(_images(subset_loader(_Loader(full), 5000, seed=5))) == 1000  # capped at the set


# ----------------------------------------------------------------------------- training

def _train(tmp_path, save, *extra):
    return train(run_args(tmp_path, save, "--seed", "3", *extra))


def test_training_with_a_subset_test_is_bit_identical_to_the_full_test_and_reports_parts(
        tmp_path, one_thread):
    small = _train(tmp_path, "small", "--epoch_test_examples", "4")
    large = _train(tmp_path, "large", "--epoch_test_examples", "12")
    full = _train(tmp_path, "full")  # NVAE's per-epoch test on all 16 test images
    assert small.parameter_sha256 == large.parameter_sha256 == full.parameter_sha256
    assert small.test_neg_log_p == large.test_neg_log_p == full.test_neg_log_p  # same final draws
    logs = {name: (tmp_path / f"eval-{name}" / "log.txt").read_text() for name in ("small", "full")}
    assert "epoch 1/2 test (4 images" in logs["small"] and "final test (16 images" in logs["small"]
    assert "epoch 1/2 test (16 images" in logs["full"]
    assert "differ from a run with the full" not in logs["small"]
    for result in (small, full):
        parts = result.seconds
        assert set(parts) == {"steps", "data_loading", "epoch_tests", "checkpoints", "final_test"}
        assert 0 < parts["data_loading"] < parts["steps"]
        assert sum(value for name, value in parts.items() if name != "data_loading") <= result.wall_seconds
    recorded = json.loads((tmp_path / "eval-small" / "train_result.json").read_text())
    assert recorded["seconds"] == pytest.approx(small.seconds)


# ----------------------------------------------------------------------------- replaying draws

def _tiny_model():
    args = to_nvae_namespace(build_parser().parse_args(run_args("/tmp", "unused")))
    torch.manual_seed(0)
    model = AutoEncoder(args, None, get_arch_cells(args.arch_instance))
    model(torch.zeros(2, 1, 32, 32))  # data-dependent initialisation
    return model.eval()


@pytest.mark.parametrize("rows", [1, 5, 33])
def test_replayed_draws_leave_the_generator_where_a_real_test_pass_leaves_it(rows, one_thread):
    model = _tiny_model()
    draws = record_draws(model, torch.zeros(1, 1, 32, 32))
    assert draws and all(draw.dtype == torch.float32 for draw in draws)
    torch.manual_seed(7)
    with torch.no_grad():
        model((torch.rand(rows, 1, 32, 32) < 0.5).float())
    after_pass = torch.get_rng_state()
    torch.manual_seed(7)
    torch.rand(rows, 1, 32, 32)  # the same input draw as above
    for draw in draws:
        torch.randn((rows, *draw.per_row), dtype=draw.dtype)
    assert torch.equal(torch.get_rng_state(), after_pass)


class _FixedSizeNoise(torch.nn.Module):
    def forward(self, x):
        return x + torch.randn(3)  # does not scale with the rows


class _UniformNoise(torch.nn.Module):
    def forward(self, x):
        return x + torch.rand_like(x)


@pytest.mark.parametrize("module", [_FixedSizeNoise(), _UniformNoise()])
def test_draws_that_cannot_be_replayed_by_size_are_refused(module):
    with pytest.raises(UnreplayableDraws):
        record_draws(module, torch.zeros(1, 3))


def test_a_bad_epoch_test_size_is_refused(tmp_path, capsys):
    from miselbo.training import main
    assert main(run_args(tmp_path, "bad", "--epoch_test_examples", "0")) == 2
    assert "--epoch_test_examples must be a whole number >= 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the pipeline

@pytest.mark.slow
def test_pipeline_prints_and_writes_a_time_summary_per_stage(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    assert pipeline.main(TINY_PIPELINE + ["--out", str(out), "--num_encoders", "2"]) == 0
    printed = capsys.readouterr().out
    summary = printed[printed.index("time per stage"):].splitlines()
    assert [line.split()[0] for line in summary[2:6]] == ["p_and_q1", "q2", "evaluation", "all"]
    times = json.loads((out / pipeline.STAGE_TIMES_FILE_NAME).read_text())
    assert list(times["stages"]) == ["p_and_q1", "q2", "evaluation"]
    for stage in ("p_and_q1", "q2"):
        parts = times["stages"][stage]
        assert {"total", "steps", "epoch_tests", "checkpoints", "final_test"} <= set(parts)
        assert parts["steps"] + parts["epoch_tests"] + parts["checkpoints"] <= parts["total"]
    assert sum(parts["total"] for parts in times["stages"].values()) <= times["total"]
    assert pipeline.main(TINY_PIPELINE + ["--out", str(out), "--num_encoders", "2"]) == 0
    again = json.loads((out / pipeline.STAGE_TIMES_FILE_NAME).read_text())
    assert set(again["stages"]["q2"]) == {"total"}
