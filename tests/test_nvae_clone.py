"""Inside a clone of NVAE: plain torch.load after `import train`, NVAE's data sets through the clone's
own datasets.py (a stand-in written here, with NVAE's function names and return shapes, not NVAE's
code), the refusal outside a clone, NVAE's test routine against our evaluator (on identical draws, to
float rounding; and on other draws, within Monte Carlo noise), and no empty run folder after a refused
or failed run."""
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from miselbo.data import nvae_clone
from miselbo.errors import DataError
from miselbo.data.datasets import check_dataset_name, load_dataset
from test_train_common import REPO_ROOT, TINY_ARCH, quiet_env

SCRIPTS = ("train.py", "model.py", "miselbo_eval.py")
TRAIN_ITEMS, TEST_ITEMS = 48, 24

# A stand-in for NVAE's datasets.py: get_loaders(args) / get_loaders_eval(dataset, args) returning
# (train_queue, valid_queue, num_classes); items (image [C, 32, 32] in [0, 1], label). omniglot is
# 28 x 28 padded to 32 and dynamically binarised with torch's global generator, imagenet_32 is
# colour with a random flip, as NVAE's transforms do. Every call is appended to calls.txt in --data.
STAND_IN = textwrap.dedent('''
    """Stand-in for NVAE's datasets.py (test fixture)."""
    import os
    import torch
    from torch.utils.data import DataLoader, Dataset
    {extra_import}

    FORMATS = {{"omniglot": (1, 28, 2, True), "imagenet_32": (3, 32, 0, False),
               "lsun_church_64": (3, 32, 0, False)}}  # the last one with the wrong size for NVAE's model


    class Synthetic(Dataset):
        def __init__(self, count, channels, side, padding, binary, offset):
            self.count, self.channels, self.side = count, channels, side
            self.padding, self.binary, self.offset = padding, binary, offset

        def __len__(self):
            return self.count

        def __getitem__(self, index):
            fixed = torch.Generator().manual_seed(self.offset + index)
            image = torch.rand(self.channels, self.side, self.side, generator=fixed)
            image = torch.nn.functional.pad(image, (self.padding,) * 4)
            if self.binary:
                image = torch.bernoulli(image)
            elif torch.rand(()) < 0.5:
                image = image.flip(-1)
            return image, index % 10


    def get_loaders(args):
        return get_loaders_eval(args.dataset, args)


    def get_loaders_eval(dataset, args):
        if dataset not in FORMATS:
            raise NotImplementedError("stand-in: unknown dataset " + dataset)
        with open(os.path.join(args.data, "calls.txt"), "a") as log:
            log.write(dataset + " distributed=" + str(args.distributed) + "\\n")
        train = Synthetic({train_items}, *FORMATS[dataset], offset=0)
        valid = Synthetic({test_items}, *FORMATS[dataset], offset=10000)
        train_queue = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True)
        valid_queue = DataLoader(valid, batch_size=args.batch_size, shuffle=False)
        return train_queue, valid_queue, 10
''')


def write_clone(folder, extra_import="", with_scripts=False):
    """A fake NVAE clone in `folder`: the stand-in datasets.py (and our three scripts)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "datasets.py").write_text(STAND_IN.format(extra_import=extra_import, train_items=TRAIN_ITEMS,
                                                        test_items=TEST_ITEMS))
    if with_scripts:
        for name in SCRIPTS:
            shutil.copy(REPO_ROOT / name, folder / name)
    (folder / "data").mkdir(exist_ok=True)
    return folder


@pytest.fixture
def clone_on_path(tmp_path, monkeypatch):
    """The stand-in clone on sys.path, as when a script runs from the clone's folder."""
    folder = write_clone(tmp_path / "NVAE")
    monkeypatch.syspath_prepend(str(folder))
    return folder


# ----------------------------------------------------------------------------- torch.load after import train

def _fresh_python(code: str, cwd) -> subprocess.CompletedProcess:
    env = dict(quiet_env(), PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _tiny_checkpoint(path):
    from miselbo.storage.checkpoints import save_nvae_checkpoint
    from miselbo.nvae.config import get_arch_cells
    from miselbo.nvae.model import AutoEncoder
    from miselbo.training.options import build_parser
    args = build_parser().parse_args(TINY_ARCH)
    args.dataset = "mnist"
    torch.manual_seed(0)
    model = AutoEncoder(args, None, get_arch_cells(args.arch_instance))
    save_nvae_checkpoint(path, model, args, miselbo={"role": "p_and_q", "seed": 1})
    return model


def test_plain_torch_load_reads_a_checkpoint_written_by_nvae_after_import_train(tmp_path):
    from conftest import golden_case_dir
    path = golden_case_dir("mnist_small") / "checkpoint.pt"
    code = ("import torch, train\n"
            f"checkpoint = torch.load({str(path)!r}, map_location='cpu')\n"
            "print(sorted(checkpoint), type(checkpoint['args']).__name__)")
    done = _fresh_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("['arch_instance', 'args', 'epoch', 'global_step', 'grad_scalar', 'optimizer', "
                                   "'scheduler', 'state_dict'] Namespace")


def test_plain_torch_load_reads_a_project_checkpoint_only_after_import_train(tmp_path):
    model = _tiny_checkpoint(tmp_path / "checkpoint.pt")
    torch.save(model.state_dict(), tmp_path / "expected.pt")
    code = textwrap.dedent("""
        import pickle, torch
        try:
            torch.load("checkpoint.pt")
            print("loaded before import train")
        except pickle.UnpicklingError as err:
            print("refused before import train:", "argparse.Namespace" in str(err))
        import train
        checkpoint = torch.load("checkpoint.pt")  # default arguments, as NVAE's evaluate.py
        expected = torch.load("expected.pt")
        same = all(torch.equal(checkpoint["state_dict"][k], v) for k, v in expected.items())
        print("after:", type(checkpoint["args"]).__name__, checkpoint["args"].dataset,
              len(checkpoint["state_dict"]) == len(expected), same)
    """)
    done = _fresh_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["refused before import train: True", "after: Namespace mnist True True"]


class _RunsCode:
    """Unpickling this calls os.system: the classic malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_checkpoint_is_still_refused_by_plain_torch_load_after_import_train(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"args": _RunsCode(marker), "state_dict": {}}, tmp_path / "evil.pt")
    torch.save({"args": pickle.Pickler, "state_dict": {}}, tmp_path / "other_type.pt")
    code = textwrap.dedent("""
        import pickle, torch, train
        for name in ("evil.pt", "other_type.pt"):
            try:
                torch.load(name)
                print(name, "loaded")
            except pickle.UnpicklingError as err:
                print(name, "refused", "weights only load failed" in str(err).lower())
    """)
    done = _fresh_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["evil.pt refused True", "other_type.pt refused True"]
    assert not marker.exists()


def test_the_registered_types_are_exactly_the_loader_allow_list(tmp_path):
    code = ("import torch\nbefore = set(torch.serialization.get_safe_globals())\nimport train\n"
            "from miselbo.storage.checkpoints import SAFE_CHECKPOINT_GLOBALS\n"
            "added = set(torch.serialization.get_safe_globals()) - before\n"
            "print(sorted(g.__qualname__ for g in added), added == set(SAFE_CHECKPOINT_GLOBALS))")
    done = _fresh_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['Namespace'] True"


# ----------------------------------------------------------------------------- data sets

def test_outside_a_clone_nvae_names_are_refused_saying_what_to_do():
    assert nvae_clone.find_clone_datasets() is None
    with pytest.raises(DataError) as refused:
        check_dataset_name("omniglot")
    message = str(refused.value)
    assert "clone of NVAE" in message and "datasets.py" in message and "pip install lmdb" in message
    with pytest.raises(DataError, match="unknown data set"):
        check_dataset_name("not_a_dataset")


def test_a_datasets_py_without_nvae_functions_is_not_taken_for_a_clone(tmp_path, monkeypatch):
    (tmp_path / "datasets.py").write_text("def load():\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert nvae_clone.find_clone_datasets() is None


def test_in_a_clone_its_loader_provides_nvae_data_sets(clone_on_path):
    assert nvae_clone.find_clone_datasets() == clone_on_path / "datasets.py"
    data = str(clone_on_path / "data")
    train_set = load_dataset("omniglot", data, train=True)
    test_set = load_dataset("omniglot", data, train=False, max_examples=5)
    assert (len(train_set), len(test_set)) == (TRAIN_ITEMS, 5)
    image, label = train_set[3]
    assert image.shape == (1, 32, 32) and label == 3
    assert set(image.unique().tolist()) <= {0.0, 1.0}
    assert float(image[:, :2].abs().sum()) == 0.0  # the stand-in's zero padding came through
    calls = (clone_on_path / "data" / "calls.txt").read_text().splitlines()
    assert calls == ["omniglot distributed=False"]  # both splits from one call, no sampler


def test_clone_items_are_drawn_reproducibly_per_seed_and_index(clone_on_path):
    images = load_dataset("omniglot", str(clone_on_path / "data"), train=True)
    images.reseed(7)
    first = torch.stack([images[i][0] for i in range(6)])
    torch.rand(100)  # the global generator moves on; the items must not depend on it
    images.reseed(7)
    again = torch.stack([images[i][0] for i in range(6)])
    images.reseed(8)
    other = torch.stack([images[i][0] for i in range(6)])
    assert torch.equal(first, again) and not torch.equal(first, other)
    state = torch.get_rng_state()
    images[0]
    assert torch.equal(state, torch.get_rng_state())  # drawing an item leaves the global state alone


def test_clone_refusals_name_the_problem(clone_on_path):
    data = str(clone_on_path / "data")
    with pytest.raises(DataError, match="celeba_64.*NotImplementedError"):
        load_dataset("celeba_64", data, train=True)
    with pytest.raises(DataError, match="no input size"):
        check_dataset_name("stacked_mnist")
    with pytest.raises(DataError, match=r"lsun_church_64.*shape \(3, 32, 32\).*takes \[3, 64, 64\]"):
        load_dataset("lsun_church_64", data, train=True)


def test_clone_data_sets_work_with_our_loaders_and_worker_processes(clone_on_path):
    from miselbo.data.datasets import build_loaders
    loaders = build_loaders("imagenet_32", str(clone_on_path / "data"), batch_size=8, seed=3, num_workers=2,
                            max_test_examples=10)
    train_batches = [images for images, _ in loaders.train]
    test_images = torch.cat([images for images, _ in loaders.test])
    assert [tuple(batch.shape) for batch in train_batches] == [(8, 3, 32, 32)] * (TRAIN_ITEMS // 8)
    assert test_images.shape == (10, 3, 32, 32) and 0 <= float(test_images.min()) <= float(test_images.max()) <= 1


def test_a_clone_whose_datasets_module_needs_lmdb_says_pip_install_lmdb(tmp_path, monkeypatch):
    folder = write_clone(tmp_path / "NVAE", extra_import="import lmdb")
    monkeypatch.syspath_prepend(str(folder))
    # lmdb must be absent for this test to mean anything
    assert subprocess.run([sys.executable, "-c", "import lmdb"], capture_output=True).returncode != 0
    with pytest.raises(DataError) as failed:
        load_dataset("omniglot", str(folder / "data"), train=True)
    assert "No module named 'lmdb'" in str(failed.value) and "pip install lmdb" in str(failed.value)


# ----------------------------------------------------------------------------- end to end, in a clone

def _run_script(folder, script, *argv):
    return subprocess.run([sys.executable, script, *argv], cwd=folder, env=quiet_env(), capture_output=True,
                          text=True, timeout=600)


QUICK_CLONE = ["--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0", "--final_iw_samples", "2",
               "--num_workers", "0"]


@pytest.mark.slow
def test_train_and_evaluate_a_data_set_only_the_clone_knows(tmp_path):
    folder = write_clone(tmp_path / "NVAE", with_scripts=True)
    arch = [token for token in TINY_ARCH if token not in ("--dataset", "mnist5k")]
    trained = _run_script(folder, "train.py", "--dataset", "omniglot", "--data", "data", "--root", "runs",
                          "--save", "omni", *arch, *QUICK_CLONE)
    assert trained.returncode == 0, trained.stderr
    result = json.loads((folder / "runs" / "eval-omni" / "train_result.json").read_text())
    assert result["global_step"] == TRAIN_ITEMS // 8
    checkpoint = torch.load(folder / "runs" / "eval-omni" / "checkpoint.pt", weights_only=False)
    assert (checkpoint["args"].dataset, checkpoint["args"].miselbo_dataset) == ("omniglot", "omniglot")
    new_encoder = _run_script(folder, "train.py", "--train_new_q", "--p_and_q1_path", "runs/eval-omni", "--root",
                              "runs", "--save", "omni_q2", "--seed", "2", *QUICK_CLONE)
    assert new_encoder.returncode == 0, new_encoder.stderr  # data set and --data inherited from the parent
    evaluated = _run_script(folder, "miselbo_eval.py", "--checkpoints", "runs/eval-omni", "runs/eval-omni_q2",
                            "--num_iw_samples", "3", "--data", "data", "--save", "results", "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    results = json.loads((folder / "results" / "results.json").read_text())
    assert (results["dataset"], results["num_examples"], results["S"], results["L"]) == (
        "omniglot", TEST_ITEMS, 2, 3)
    assert results["num_output_dims"] == 28 * 28
    estimates = {name: results["estimators"][name]["mean"] for name in ("miselbo", "avg_iwelbo", "avg_elbo", "jsd")}
    assert all(torch.isfinite(torch.tensor(value)) for value in estimates.values())
    assert 0.0 <= estimates["jsd"] <= torch.log(torch.tensor(2.0)).item() + 1e-6  # JSD of 2 members
    assert "omniglot distributed=False" in (folder / "data" / "calls.txt").read_text()
    # evaluate.py's estimate for one checkpoint and ours (S = 1: MISELBO is the member's IWELBO) agree within
    # noise: same estimator, other draws and binarisations of the same 24 test images
    nvae_neg_log_p = _follow_nvae_evaluate_steps(folder, "runs/eval-omni/checkpoint.pt", NUM_COMPARED_SAMPLES)
    single = _run_script(folder, "miselbo_eval.py", "--checkpoints", "runs/eval-omni", "--num_iw_samples",
                         str(NUM_COMPARED_SAMPLES), "--data", "data", "--save", "single", "--device", "cpu")
    assert single.returncode == 0, single.stderr
    ours = json.loads((folder / "single" / "results.json").read_text())["estimators"]["miselbo"]
    assert abs(-nvae_neg_log_p - ours["mean"]) < 3 * ours["stderr"], (nvae_neg_log_p, ours)


# The loading and `evaluate` steps NVAE's evaluate.py takes, as its documented behaviour describes them
# (its own file is not used here): import train, torch.load with map_location='cpu' only, back-fill,
# AutoEncoder from model.py with writer None, non-strict load, datasets.get_loaders(args) with --data,
# train.test with the importance samples. NVAE's .cuda() calls are left out (no GPU here).
EVALUATE_STEPS = textwrap.dedent("""
    import math, torch
    import train
    import datasets
    from model import AutoEncoder
    from miselbo.nvae.config import get_arch_cells
    checkpoint = torch.load(PATH, map_location="cpu")
    args = checkpoint["args"]
    for name, default in (("ada_groups", False), ("min_groups_per_scale", 1), ("num_mixture_dec", 10)):
        if not hasattr(args, name):
            setattr(args, name, default)
    model = AutoEncoder(args, None, get_arch_cells(args.arch_instance))
    missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
    args.data = "data"
    train_queue, valid_queue, num_classes = datasets.get_loaders(args)
    model.eval()
    neg_log_p, nelbo = train.test(valid_queue, model, num_samples=NUM_SAMPLES, args=args, logging=None)
    print(len(missing), len(unexpected), math.isfinite(neg_log_p), math.isfinite(nelbo), repr(float(neg_log_p)))
""")


NUM_COMPARED_SAMPLES = 50


def _follow_nvae_evaluate_steps(folder, checkpoint_path, num_samples) -> float:
    """Run EVALUATE_STEPS in a fresh interpreter in the clone; returns its −log p (nats per image)."""
    code = f"PATH = {str(checkpoint_path)!r}\nNUM_SAMPLES = {num_samples}\n" + EVALUATE_STEPS
    done = subprocess.run([sys.executable, "-c", code], cwd=folder, env=dict(quiet_env(), PYTHONPATH=str(folder)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    *checks, neg_log_p = done.stdout.split()
    assert checks == ["0", "0", "True", "True"]
    return float(neg_log_p)


# NVAE's test routine (train.test, what its evaluate.py calls) in a fresh interpreter in the clone, with
# the model from model.py loaded as evaluate.py loads it, once per image: at the draws in latents.pt
# (model.forward answered at those z) and at fresh draws of its own. Prints JSON.
GIVEN_DRAWS_STEPS = textwrap.dedent("""
    import json, torch
    import train
    from model import AutoEncoder
    from miselbo.nvae.config import get_arch_cells
    checkpoint = torch.load(PATH, map_location="cpu")
    args = checkpoint["args"]
    model = AutoEncoder(args, None, get_arch_cells(args.arch_instance))
    missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
    model.eval()
    images = torch.load("x.pt")
    latents = torch.load("latents.pt")  # per group [B, L, *latent_shape]
    held = {"latents": None, "used": 0}
    plain_forward = model.forward

    def forward_at_held_draws(x, z=None):
        if held["latents"] is None:
            return plain_forward(x)
        batch = held["latents"][0].shape[0]
        count = x.shape[0] // batch  # train.test stacks the draws: row k * batch + b is draw k of image b
        start = held["used"]
        held["used"] += count
        z = [g[:, start:start + count].transpose(0, 1).reshape(count * batch, *g.shape[2:])
             for g in held["latents"]]
        return plain_forward(x, z=z)

    model.forward = forward_at_held_draws

    def neg_log_p(index, draws):
        held.update(latents=draws, used=0)
        value, _ = train.test([(images[index:index + 1], None)], model, num_samples=NUM_SAMPLES, args=args,
                              logging=None)
        return float(value)

    given = [neg_log_p(b, [g[b:b + 1] for g in latents]) for b in range(len(images))]
    torch.manual_seed(1)
    fresh = [neg_log_p(b, None) for b in range(len(images))]
    print(json.dumps(dict(missing=len(missing), unexpected=len(unexpected), given=given, fresh=fresh)))
""")


def test_nvae_test_routine_and_our_evaluator_agree_to_rounding_on_identical_draws(tmp_path, monkeypatch):
    """The Monte Carlo comparison above cannot see an offset below ~3 standard errors; this one can.
    miselbo_eval's evaluate() (S = 1: MISELBO is the member's IWELBO) runs on 4 images of the NVAE-written
    golden checkpoint; its draws are replayed with Ensemble.log_weights (same generator state and chunk,
    recorded) and handed to NVAE's test routine in a clone. Per image the two −log p then differ by
    float rounding only (1e-5 relative); at fresh draws they differ by Monte Carlo noise, far more."""
    from conftest import golden_case_dir
    from miselbo.ensemble.log_weights import Ensemble
    from miselbo.evaluation.evaluate import EvalSettings, evaluate
    from miselbo.storage.checkpoints import load_nvae_checkpoint
    checkpoint = golden_case_dir("mnist_small") / "checkpoint.pt"
    folder = write_clone(tmp_path / "NVAE", with_scripts=True)
    images = (torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(5)) < 0.3).float()
    images[..., :2, :] = images[..., -2:, :] = 0  # NVAE's MNIST: 28 x 28 digits padded with zeros
    images[..., :2] = images[..., -2:] = 0
    samples = 20

    calls = []
    reduced_weights = Ensemble.reduced_weights

    def recording(self, x, num_samples, generator=None, chunk_size=None, **kwargs):
        calls.append((x.clone(), num_samples, generator.get_state(), chunk_size))
        return reduced_weights(self, x, num_samples, generator, chunk_size, **kwargs)

    monkeypatch.setattr(Ensemble, "reduced_weights", recording)
    settings = EvalSettings(checkpoints=[str(checkpoint)], num_iw_samples=samples, batch_size=len(images),
                            show_progress=False, seed=3, device="cpu")  # the clone's routine runs on the CPU too
    results = evaluate(settings, images=images)
    monkeypatch.undo()
    ours_mean = results["estimators"]["miselbo"]["mean"]
    assert len(calls) == 1 and calls[0][1] == samples and torch.equal(calls[0][0], images)

    # replay evaluate()'s draws (same generator state, same chunk) and keep them
    x, _, state, chunk_size = calls[0]
    model, _, _ = load_nvae_checkpoint(checkpoint)
    replay = torch.Generator().set_state(state)
    weights = Ensemble([model]).log_weights(x, samples, generator=replay, chunk_size=chunk_size, record_latents=True)
    log_w = weights.log_p[:, 0] - weights.log_q[:, 0, :, 0]  # [B, L]
    ours = torch.logsumexp(log_w, dim=1) - math.log(samples)  # [B], each image's IWELBO
    assert float(ours.mean()) == pytest.approx(ours_mean, rel=1e-6)  # the replay is evaluate()'s draws
    torch.save(x, folder / "x.pt")
    torch.save([g[:, 0].contiguous() for g in weights.latents_pre], folder / "latents.pt")

    code = f"PATH = {str(checkpoint)!r}\nNUM_SAMPLES = {samples}\n" + GIVEN_DRAWS_STEPS
    path = os.pathsep.join([str(folder), str(REPO_ROOT)])  # the clone first; miselbo even if not installed
    done = subprocess.run([sys.executable, "-c", code], cwd=folder, env=dict(quiet_env(), PYTHONPATH=path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    nvae = json.loads(done.stdout.strip().splitlines()[-1])
    assert (nvae["missing"], nvae["unexpected"]) == (0, 0)
    nvae_given = -torch.tensor(nvae["given"], dtype=torch.float64)
    nvae_fresh = -torch.tensor(nvae["fresh"], dtype=torch.float64)
    tolerance = 1e-5 * ours.abs()  # float32 rounding; measured about 1e-7 relative
    assert torch.all((nvae_given - ours).abs() <= tolerance), (nvae_given - ours, tolerance)
    assert abs(float(nvae_given.mean()) - ours_mean) <= 1e-5 * abs(ours_mean)
    # the control: other draws of the same estimator move at least one image by far more than the tolerance
    assert float(((nvae_fresh - ours).abs() / tolerance).max()) > 10, (nvae_fresh - ours, tolerance)


@pytest.mark.slow
def test_a_colour_data_set_of_the_clone_trains_with_the_logistic_mixture(tmp_path):
    folder = write_clone(tmp_path / "NVAE", with_scripts=True)
    arch = [token for token in TINY_ARCH if token not in ("--dataset", "mnist5k")]
    trained = _run_script(folder, "train.py", "--dataset", "imagenet_32", "--data", "data", "--root", "runs",
                          "--save", "colour", "--num_mixture_dec", "2", *arch, *QUICK_CLONE)
    assert trained.returncode == 0, trained.stderr
    result = json.loads((folder / "runs" / "eval-colour" / "train_result.json").read_text())
    # 3 x 32 x 32 data: bits/dim divide by 3072 dimensions
    assert result["test_neg_log_p_bpd"] == pytest.approx(result["test_neg_log_p"] / (3072 * 0.6931471805599453))


# ----------------------------------------------------------------------------- no empty folders after a failure

def test_removed_if_left_empty_removes_only_the_empty_folders_it_saw_missing(tmp_path):
    from miselbo.storage.folders import removed_if_left_empty
    existing = tmp_path / "existing"
    existing.mkdir()
    for folder, write_file in ((tmp_path / "new" / "deeper" / "eval-x", False), (existing / "eval-y", True),
                               (existing, False)):
        with pytest.raises(RuntimeError), removed_if_left_empty(folder):
            folder.mkdir(parents=True, exist_ok=True)
            if write_file:
                (folder / "log.txt").write_text("kept")
            raise RuntimeError("the run failed")
    assert not (tmp_path / "new").exists()  # created by the run, empty: gone, parents included
    assert (existing / "eval-y" / "log.txt").read_text() == "kept"  # holds something: kept
    assert existing.is_dir()  # existed before: kept
    with removed_if_left_empty(tmp_path / "fine"):
        (tmp_path / "fine").mkdir()
    assert (tmp_path / "fine").is_dir()  # success: untouched


def test_a_training_run_failing_after_creating_its_folder_leaves_none(tmp_path, capsys):
    from miselbo.training import main
    status = main(["--root", str(tmp_path / "runs"), "--save", "too_few", *TINY_ARCH, "--num_train_examples", "4",
                   "--batch_size", "16", "--epochs", "1"])
    assert status == 2 and "no full batch" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_training_run_whose_clone_loader_fails_leaves_no_folder(clone_on_path, tmp_path, capsys):
    from miselbo.training import main
    arch = [token for token in TINY_ARCH if token not in ("--dataset", "mnist5k")]
    root = tmp_path / "runs"
    root.mkdir()
    status = main(["--root", str(root), "--save", "celeb", "--dataset", "celeba_64", "--data",
                   str(clone_on_path / "data"), *arch, "--epochs", "1"])
    assert status == 2 and "NotImplementedError" in capsys.readouterr().err
    assert list(root.iterdir()) == []  # no eval-celeb; --root itself existed before and stays


def test_a_refused_evaluation_leaves_no_save_folder(tmp_path, capsys):
    from miselbo.evaluation.evaluate import main
    from miselbo.runtime.cli import run_cli
    save = tmp_path / "results" / "run1"
    status = run_cli(main, ["--checkpoints", str(tmp_path / "missing.pt"), "--save", str(save)])
    assert status == 2 and "missing.pt" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
