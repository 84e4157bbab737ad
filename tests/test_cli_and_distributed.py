"""The shared CLI conventions (user errors -> exit 2, devices) and the distributed helpers."""
import pytest
import torch

from miselbo.runtime import distributed
from miselbo.errors import CheckpointError
from miselbo.errors import UserError
from miselbo.runtime.cli import require_positive, resolve_device, run_cli


def test_user_error_becomes_message_and_exit_2(capsys):
    def main(argv):
        raise CheckpointError("checkpoint /nowhere/checkpoint.pt does not exist.")

    assert run_cli(main, [], prog="tool") == 2
    err = capsys.readouterr().err
    assert err.startswith("tool: error: checkpoint /nowhere") and "Traceback" not in err


def test_bug_keeps_its_traceback():
    def main(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_cli(main, [])


def test_return_value_is_the_exit_status():
    assert run_cli(lambda argv: None, []) == 0
    assert run_cli(lambda argv: 3, []) == 3


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(UserError, match="not a device name"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3"])
def test_require_positive_refuses(value):
    with pytest.raises(UserError, match="--num_iw_samples"):
        require_positive("--num_iw_samples", value)


def test_node_setups_follow_nvae_ranks():
    setups = distributed.node_setups(2, 3, 1, "cpu", "10.0.0.1")
    assert [(s.rank, s.local_rank, s.world_size) for s in setups] == [(2, 0, 6), (3, 1, 6)]
    assert setups[0].backend == "gloo"
    assert distributed.DistributedSetup(device_type="cuda").backend == "nccl"


def test_single_process_helpers_are_no_ops():
    tensor = torch.tensor([3.0])
    assert distributed.average_tensor_(tensor).item() == 3.0
    assert distributed.world_size() == 1 and distributed.is_main_process()
    assert torch.equal(distributed.all_gather_cat(tensor), tensor)


def _gather_worker(setup, queue):
    distributed.initialize(setup)
    value = torch.tensor([float(setup.rank + 1)])
    distributed.average_tensor_(value)
    gathered = distributed.all_gather_cat(torch.full((setup.rank + 1,), float(setup.rank)))
    # one bucketed all-reduce per dtype vs one all-reduce per tensor: the same averages
    generator = torch.Generator().manual_seed(setup.rank)
    tensors = [torch.randn(3, 2, generator=generator), torch.randn(5, generator=generator, dtype=torch.float64),
               torch.randn(2, 2, 2, generator=generator)[:, 0]]  # a non-contiguous view too
    one_by_one = [distributed.average_tensor_(t.clone()) for t in tensors]
    distributed.average_tensors_(tensors)
    bucketed_equal = all(torch.allclose(a, b, rtol=0, atol=1e-12) and a.dtype == b.dtype
                         for a, b in zip(tensors, one_by_one))
    queue.put((setup.rank, value.item(), gathered.tolist(), bucketed_equal))
    distributed.shutdown()


def test_two_gloo_processes_average_and_gather():
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    setups = distributed.node_setups(2, 1, 0, "cpu", "127.0.0.1")
    port = distributed.free_port()
    processes = [ctx.Process(target=_gather_worker,
                             args=(distributed.DistributedSetup(s.rank, s.local_rank, s.world_size, "cpu",
                                                                "127.0.0.1", port), queue))
                 for s in setups]
    for process in processes:
        process.start()
    results = sorted(queue.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert results == [(0, 1.5, [0.0, 1.0, 1.0], True), (1, 1.5, [0.0, 1.0, 1.0], True)]


def test_local_process_counts_a_machine_cannot_hold_are_refused_naming_the_flag(monkeypatch):
    monkeypatch.setattr(distributed.os, "cpu_count", lambda: 2)
    distributed.require_local_process_count(8, "cpu", "--world_size")  # 4 per core: allowed
    with pytest.raises(UserError, match=r"--world_size 9 would start 9 processes on this machine's 2 CPU core"):
        distributed.require_local_process_count(9, "cpu", "--world_size")
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 1)
    distributed.require_local_process_count(1, "cuda", "--num_process_per_node")
    with pytest.raises(UserError, match="--num_process_per_node 2 asks for one CUDA device per process, "
                                        "and this machine has 1"):
        distributed.require_local_process_count(2, "cuda", "--num_process_per_node")
