"""The AutoEncoder and its configuration: tables and key lists against docs/nvae.md, many
tiny configurations (construct, forward, sample, save/load, replay, flow inversion), the two halves,
and the regularisers against independent computations."""
import io
import re

import pytest
import torch

from conftest import REPO_ROOT
from miselbo.nvae.config import (ARCH_CELLS, NVAE_TRAIN_FLAGS, ModelConfig, add_nvae_train_arguments,
                                 crop_output, default_nvae_args, get_arch_cells, groups_per_scale,
                                 input_channels, input_size, num_output_dims, output_channels)
from miselbo.nvae.distributions import Normal, reconstruction_loss
from miselbo.nvae.model import (DECODER_MODULE_NAMES, ENCODER_MODULE_NAMES, AutoEncoder, is_decoder_key)

MODEL_DOC = REPO_ROOT / "docs" / "nvae.md"  # the flag table, arch table and key list are read from it
REFERENCE_CONFIG = dict(dataset="mnist", num_channels_enc=8, num_channels_dec=8, num_latent_scales=2,
                        num_groups_per_scale=2, num_latent_per_group=4, num_preprocess_blocks=2,
                        num_preprocess_cells=2, num_postprocess_blocks=2, num_postprocess_cells=2,
                        use_se=True, res_dist=True)
TINY = dict(dataset="mnist", num_channels_enc=4, num_channels_dec=4, num_latent_scales=2,
            num_groups_per_scale=2, num_latent_per_group=2, num_preprocess_blocks=1,
            num_preprocess_cells=2, num_postprocess_blocks=1, num_postprocess_cells=2, use_se=True,
            res_dist=True)
CONFIGS = {
    "three_scales_ada_min2_two_flows": dict(num_latent_scales=3, num_groups_per_scale=4, ada_groups=True,
                                            min_groups_per_scale=2, num_nf=2, num_preprocess_cells=1,
                                            num_postprocess_cells=1),
    "res_elu": dict(arch_instance="res_elu"),
    "res_bnelu_no_se": dict(arch_instance="res_bnelu", use_se=False),
    "res_bnswish": dict(arch_instance="res_bnswish"),
    "mbconv_sep_one_flow": dict(arch_instance="mbconv_sep", num_nf=1),
    "mbconv_sep11": dict(arch_instance="mbconv_sep11"),
    "mbconv_den_cifar_no_res_dist": dict(arch_instance="mbconv_den", dataset="cifar10", num_channels_enc=8,
                                         num_channels_dec=8, num_mixture_dec=3, res_dist=False),
    "res53_mbconv_ada_two_cells": dict(arch_instance="res53_mbconv", ada_groups=True,
                                       num_cell_per_cond_enc=2, num_cell_per_cond_dec=2),
    "res35_mbconv": dict(arch_instance="res35_mbconv"),
    "res55_mbconv": dict(arch_instance="res55_mbconv"),
    "mbconv_res": dict(arch_instance="mbconv_res"),
    "celeba64_normal_decoder": dict(dataset="celeba_64", num_mixture_dec=1, num_preprocess_blocks=2,
                                    num_postprocess_blocks=2, num_preprocess_cells=1,
                                    num_postprocess_cells=1),
    "vanilla_single_group": dict(num_latent_scales=1, num_groups_per_scale=1),
}
FLOW_CONFIGS = [name for name, overrides in CONFIGS.items() if overrides.get("num_nf", 0) > 0]
BATCH = 2


def _doc_text() -> str:
    return MODEL_DOC.read_text(encoding="utf-8")


def _doc_section(title_prefix: str) -> str:
    text = _doc_text()
    start = text.index(f"\n{title_prefix}")
    end = text.index("\n### ", start + 1)
    return text[start:end]


def _args(name=None, **overrides):
    settings = dict(TINY, **(CONFIGS[name] if name else {}))
    settings.update(overrides)
    return default_nvae_args(**settings)


def _build(args, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return AutoEncoder(args, None, get_arch_cells(args.arch_instance)).to(device)


def _input(model, batch=BATCH, seed=7, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, model.config.input_channels, model.config.input_size, model.config.input_size)
    if model.config.input_channels == 1:
        return (torch.rand(shape, generator=generator) > 0.5).float().to(device)
    return (torch.randint(0, 256, shape, generator=generator).float() / 255).to(device)


# ----------------------------------------------------------------------------- configuration


def test_groups_per_scale_examples_and_errors():
    assert groups_per_scale(2, 2, False) == [2, 2]
    assert groups_per_scale(2, 10, True, minimum=1) == [10, 5]
    assert groups_per_scale(5, 16, True, minimum=4) == [16, 8, 4, 4, 4]
    assert groups_per_scale(3, 20, True, minimum=1) == [20, 10, 5]
    with pytest.raises(ValueError, match="num_groups"):
        groups_per_scale(2, 0, False)


def test_dataset_helpers_follow_the_size_table():
    assert [input_size(d) for d in ("mnist", "cifar10", "celeba_64", "lsun_bedroom_128", "ffhq")] == \
        [32, 32, 64, 128, 256]
    assert [input_channels(d) for d in ("omniglot", "imagenet_32")] == [1, 3]
    assert [output_channels("mnist", 10), output_channels("cifar10", 1), output_channels("cifar10", 10)] == \
        [1, 6, 100]
    assert [num_output_dims("mnist"), num_output_dims("cifar10")] == [784, 3072]
    assert crop_output("mnist") and crop_output("stacked_mnist") and not crop_output("cifar10")
    for bad in ("stacked_mnist", "svhn", "celeba_big"):
        with pytest.raises(ValueError, match="is not supported"):
            input_size(bad)


def _parse_arch_table() -> dict:
    section = _doc_section("### 2.4")
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")][1:]
    tables = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        name = re.search(r"`(\w+)`", cells[0]).group(1)
        ops = {}
        for cell_type, cell in zip(header, cells[1:]):
            match = re.fullmatch(r"(\w+) ×2", cell)
            ops[cell_type] = [match.group(1)] * 2 if match else [op.strip() for op in cell.split(",")]
        tables[name] = dict(ops, ar_nn=[""])
    return tables


def test_arch_tables_equal_the_documented_table():
    documented = _parse_arch_table()
    assert len(documented) == 12
    buildable = {name: table for name, table in documented.items() if name != "res_mbconv9"}
    assert {name: get_arch_cells(name) for name in buildable} == buildable == ARCH_CELLS
    with pytest.raises(ValueError, match="cannot be built"):
        get_arch_cells("res_mbconv9")
    with pytest.raises(ValueError, match="unknown arch_instance 'res_foo'"):
        get_arch_cells("res_foo")
    table = get_arch_cells("res_mbconv")
    table["normal_enc"].append("x")
    assert get_arch_cells("res_mbconv")["normal_enc"] == ["res_bnswish", "res_bnswish"]


def _parse_flag_table() -> dict:
    section = _doc_section("### 1.1")
    flags = {}
    for line in section.splitlines():
        match = re.match(r"\| `--(\w+)` \| ([^|]+) \| ([^|]+) \| ([^|]+) \|", line)
        if match:
            flags[match.group(1)] = [part.strip() for part in match.groups()[1:]]
    return flags


def test_train_flag_table_equals_the_documented_one():
    documented = _parse_flag_table()
    assert [flag.name for flag in NVAE_TRAIN_FLAGS] == list(documented)
    for flag in NVAE_TRAIN_FLAGS:
        type_text, default_text, category = documented[flag.name]
        assert flag.category == category, flag.name
        if flag.type is None:
            assert type_text == "flag" and default_text == "off" and flag.default is False, flag.name
        elif flag.type is str:
            assert type_text.startswith("str") and default_text.strip("`") == flag.default, flag.name
        else:
            assert type_text == flag.type.__name__ and flag.type(default_text) == flag.default, flag.name
    choices = re.findall(r"`(\w+)`", documented["dataset"][0])
    assert tuple(choices) == next(f for f in NVAE_TRAIN_FLAGS if f.name == "dataset").choices


def test_default_args_parse_overrides_and_reject_unknown_flags():
    import argparse
    parser = add_nvae_train_arguments(argparse.ArgumentParser())
    parsed = parser.parse_args(["--use_se", "--num_nf", "2", "--dataset", "cifar10"])
    assert parsed.use_se and parsed.num_nf == 2 and parsed.dataset == "cifar10" and not parsed.res_dist
    assert vars(default_nvae_args()) == vars(parser.parse_args([]))
    assert default_nvae_args(num_nf=3).num_nf == 3
    with pytest.raises(ValueError, match="unknown NVAE flag"):
        default_nvae_args(num_flows=3)


def test_model_config_reports_unusable_settings():
    config = ModelConfig.from_args(default_nvae_args())
    assert config.groups_per_scale == (10,) and config.num_groups == 10 and not config.vanilla_vae
    args = default_nvae_args()
    del args.ada_groups
    with pytest.raises(ValueError, match="lack \\['ada_groups'\\]"):
        ModelConfig.from_args(args)
    bad = [dict(num_postprocess_blocks=3), dict(num_latent_scales=1, num_groups_per_scale=1,
                                                 num_channels_dec=16),
           dict(num_preprocess_blocks=5, num_postprocess_blocks=5, num_latent_scales=2),
           dict(dataset="stacked_mnist"), dict(num_latent_per_group=0)]
    for overrides in bad:
        with pytest.raises(ValueError, match="ModelConfig|not supported"):
            ModelConfig.from_args(default_nvae_args(**overrides))


# ----------------------------------------------------------------------------- citations of docs/nvae.md

SOURCE_FOLDERS = ("miselbo", "tests", "benchmarks", "examples")
# Markers of citations of documents that are not in the repository (split so this file has none).
OUTSIDE_CITATIONS = ("\u00a7", "reference" + " doc", "design" + ".md", "nvae-" + "reference", "../" + "shared",
                     "rule" + " W")


def _repository_sources() -> list:
    files = [path for folder in SOURCE_FOLDERS for path in sorted((REPO_ROOT / folder).rglob("*.py"))]
    return files + sorted(REPO_ROOT.glob("*.py"))


def test_code_cites_no_document_outside_the_repository():
    offenders = [f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}"
                 for path in _repository_sources()
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if any(marker in line for marker in OUTSIDE_CITATIONS)]
    assert not offenders, "\n".join(offenders)


def test_code_citations_of_docs_nvae_name_existing_sections():
    headings = re.findall(r"^#{2,3} (.+)$", _doc_text(), flags=re.MULTILINE)
    numbers = {match.group(1) for heading in headings if (match := re.match(r"(\d+(?:\.\d+)?)\.? ", heading))}
    citation = re.compile(r'docs/nvae\.md,?\s+(?:"([^"]+)"|(\d+(?:\.\d+)?))')
    checked, dangling = 0, []
    for path in _repository_sources():
        for match in citation.finditer(path.read_text(encoding="utf-8")):
            title, number = match.groups()
            found = any(title in heading for heading in headings) if title else number in numbers
            checked += 1
            if not found:
                dangling.append(f"{path.relative_to(REPO_ROOT)}: {match.group(0)}")
    assert checked > 50 and not dangling, dangling


# ----------------------------------------------------------------------------- key list (docs/nvae.md 7.2)


def _documented_keys() -> list:
    section = _doc_section("### 7.2")
    block = section.split("```text\n", 1)[1].split("```", 1)[0]
    entries = []
    for line in block.splitlines():
        match = re.fullmatch(r"(\S+)\s+\(([\d,]*)\)(\s+int64)?\s*", line)
        assert match, line
        shape = tuple(int(n) for n in match.group(2).split(",") if n)
        entries.append((match.group(1), shape, torch.int64 if match.group(3) else torch.float32))
    return entries


def test_reference_configuration_state_dict_equals_the_documented_list():
    model = _build(default_nvae_args(**REFERENCE_CONFIG))
    actual = [(key, tuple(value.shape), value.dtype) for key, value in model.state_dict().items()]
    assert actual == _documented_keys()
    assert len(actual) == 514
    assert sum(p.numel() for p in model.parameters()) == 472_766
    assert len(model.all_conv_layers) == 74 and len(model.all_bn_layers) == 50
    assert sum(log_norm is None for log_norm in model.all_log_norm) == 24
    assert tuple(model.prior_ftr0.shape) == (64, 4, 4) and model.z0_size == [4, 4, 4]


def test_one_flow_adds_the_nf_cells_entries_in_place():
    plain = list(_build(default_nvae_args(**REFERENCE_CONFIG)).state_dict())
    state = _build(default_nvae_args(num_nf=1, **REFERENCE_CONFIG)).state_dict()
    keys = list(state)
    flow_keys = [key for key in keys if key.startswith("nf_cells.")]
    assert len(flow_keys) == 56 and [k for k in keys if not k.startswith("nf_cells.")] == plain
    start = keys.index(flow_keys[0])
    assert keys[start - 1] == "dec_sampler.2.1.log_weight_norm"
    assert keys[start + 56] == "dec_tower.0.conv.weight" and keys[start:start + 56] == flow_keys
    expected = [("convz.0.weight", (24, 4, 3, 3)), ("convz.0.log_weight_norm", (24, 1, 1, 1)),
                ("convz.2.weight", (24, 1, 5, 5)), ("convz.2.log_weight_norm", (24, 1, 1, 1))]
    for cell in ("cell1", "cell2"):
        for suffix, shape in expected:
            assert tuple(state[f"nf_cells.0.{cell}.conv.{suffix}"].shape) == shape
        for suffix, shape in (("weight", (4, 24, 1, 1)), ("bias", (4,)), ("log_weight_norm", (4, 1, 1, 1))):
            assert tuple(state[f"nf_cells.0.{cell}.mu.conv_0.{suffix}"].shape) == shape
    assert flow_keys[:7] == [k for k in flow_keys if k.startswith("nf_cells.0.cell1")]


def test_nvae_mnist_paper_configuration_builds_with_the_documented_sizes():
    args = default_nvae_args(dataset="mnist", num_channels_enc=32, num_channels_dec=32, num_latent_scales=2,
                             num_groups_per_scale=10, ada_groups=True, num_latent_per_group=20,
                             num_preprocess_cells=3, num_postprocess_cells=3, num_cell_per_cond_enc=2,
                             num_cell_per_cond_dec=2, use_se=True, res_dist=True, num_nf=0)
    model = _build(args)
    assert sum(p.numel() for p in model.parameters()) == 33_363_134
    assert len(model.state_dict()) == 2016
    assert len(model.all_conv_layers) == 255 and len(model.all_bn_layers) == 214
    assert tuple(model.prior_ftr0.shape) == (256, 4, 4) and model.z0_size == [20, 4, 4]
    assert model.groups_per_scale == [10, 5]


# ----------------------------------------------------------------------------- many configurations


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_train_and_eval_and_sample_give_finite_tensors_of_the_right_shape(name, test_device):
    model = _build(_args(name), device=test_device)
    x = _input(model, device=test_device)
    config = model.config
    side, latent = config.input_size, config.num_latent_per_group
    for training in (True, False):
        model.train(training)
        logits, log_q, log_p, kl_all, kl_diag = model(x)
        assert logits.shape == (BATCH, config.output_channels, side, side)
        assert log_q.shape == log_p.shape == (BATCH,)
        assert len(kl_all) == len(kl_diag) == config.num_groups == model.num_groups
        assert all(k.shape == (BATCH,) for k in kl_all) and all(k.shape == (latent,) for k in kl_diag)
        recon = reconstruction_loss(model.decoder_output(logits), x, model.crop_output)
        values = [logits, log_q, log_p, recon, *kl_all, *kl_diag]
        assert all(torch.isfinite(v).all() for v in values)
        if training:
            (recon + sum(kl_all)).mean().backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        samples = model.sample(3, 0.7)
    assert samples.shape == (3, config.output_channels, side, side) and torch.isfinite(samples).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_save_load_is_bit_identical_with_the_same_outputs(name):
    source = _build(_args(name), seed=0)
    x = _input(source)
    source.train()
    source(x)  # move BN statistics (and run res_elu's data-dependent init)
    source.eval()
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = _build(_args(name), seed=1)
    target.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    target.eval()
    original, restored = source.state_dict(), target.state_dict()
    assert list(restored) == list(original)
    for key, value in original.items():
        assert restored[key].dtype == value.dtype and torch.equal(restored[key], value), key
    with torch.no_grad():
        first = source.forward_detailed(x)
        again = target.forward_detailed(x, z=[record.z_pre for record in first.groups])
    for produced, expected in zip(again.as_nvae_tuple(), first.as_nvae_tuple()):
        expected_list = expected if isinstance(expected, list) else [expected]
        produced_list = produced if isinstance(produced, list) else [produced]
        assert all(torch.equal(a, b) for a, b in zip(produced_list, expected_list))
    for key, value in original.items():  # no data-dependent re-init on the loaded copy
        assert torch.equal(target.state_dict()[key], value), key


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_draws_one_normal_per_group_and_given_z_replays_without_drawing(name):
    model = _build(_args(name)).eval()
    x = _input(model)
    torch.manual_seed(123)
    with torch.no_grad():
        drawn = model.forward_detailed(x)
    torch.manual_seed(123)
    for record, shape in zip(drawn.groups, model.latent_shapes):
        eps = torch.randn(BATCH, *shape)  # NVAE's draw order: one tensor per group, decoder order
        assert torch.equal(record.z_pre, eps * record.q.sigma + record.q.mu)
    rng_before = torch.get_rng_state()
    with torch.no_grad():
        replay = model.forward_detailed(x, z=[record.z_pre for record in drawn.groups])
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(replay.logits, drawn.logits) and torch.equal(replay.log_q, drawn.log_q)
    assert all(torch.equal(a.z_post, b.z_post) for a, b in zip(replay.groups, drawn.groups))
    with pytest.raises(ValueError, match="z must hold"):
        model(x, z=[record.z_pre for record in drawn.groups][:-1])
    with pytest.raises(ValueError, match=r"z\[0\] must have shape"):
        model.sample(BATCH + 1, 1.0, z=[record.z_pre for record in drawn.groups])


@pytest.mark.parametrize("name", FLOW_CONFIGS)
def test_flow_inversion_recovers_the_pre_flow_latents(name):
    model = _build(_args(name)).eval()
    x = _input(model)
    with torch.no_grad():
        result = model.forward_detailed(x)
        for group, record in enumerate(result.groups):
            assert not torch.equal(record.z_post, record.z_pre)
            z_pre, residual = model.invert_flows(group, record.z_post)
            torch.testing.assert_close(z_pre, record.z_pre, rtol=0, atol=1e-5)
            assert residual < 1e-5
            z_post, log_det = model.apply_flows(group, z_pre, record.flow_context)
            torch.testing.assert_close(z_post, record.z_post, rtol=0, atol=1e-5)
            assert torch.equal(log_det, torch.zeros_like(log_det))


def test_res_elu_data_init_runs_on_a_fresh_model_only():
    fresh = _build(_args("res_elu"))
    loaded = _build(_args("res_elu"), seed=1)
    loaded.load_state_dict(fresh.state_dict())
    conv = fresh.pre_process[0]._ops[0].conv_0
    assert conv.data_init and not conv.init_done
    before = conv.log_weight_norm.detach().clone()
    x = _input(fresh)
    fresh(x)
    assert conv.init_done and not torch.equal(before, conv.log_weight_norm.detach())
    state = {key: value.clone() for key, value in loaded.state_dict().items()}
    loaded(x)
    changed = [key for key, value in loaded.state_dict().items()
               if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))
               and not torch.equal(value, state[key])]
    assert changed == []


# ----------------------------------------------------------------------------- the two halves


def _perturbed(model, key):
    tensor = model.state_dict()[key]
    with torch.no_grad():
        tensor.add_(1 if tensor.dtype == torch.int64 else 0.25)


def test_keys_split_into_the_two_halves():
    model = _build(_args("mbconv_sep_one_flow"))
    tops = {key.split(".", 1)[0] for key in model.state_dict()}
    assert tops <= set(ENCODER_MODULE_NAMES) | set(DECODER_MODULE_NAMES)
    encoder, decoder = model.encoder_parameters(), model.decoder_parameters()
    assert {id(p) for p in encoder}.isdisjoint({id(p) for p in decoder})
    assert len(encoder) + len(decoder) == len(list(model.parameters()))
    assert is_decoder_key("prior_ftr0") and not is_decoder_key("nf_cells.0.cell1.mu.conv_0.bias")
    with pytest.raises(ValueError, match="neither half"):
        is_decoder_key("enc_kv.0.weight")
    assert set(model.encoder_conv_layers()) < set(model.all_conv_layers)
    assert set(model.encoder_bn_layers()) < set(model.all_bn_layers)
    assert all(not p.requires_grad for p in model.freeze_decoder().decoder_parameters())


def test_decoder_fingerprint_tracks_decoder_values_only():
    model = _build(_args("mbconv_sep_one_flow"))
    baseline = model.decoder_fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", baseline)
    for key in ("stem.weight", "enc_tower.1.conv.bias", "enc_sampler.0.log_weight_norm",
                "nf_cells.0.cell1.mu.conv_0.bias", "pre_process.0._ops.0.conv.0.bn.running_mean"):
        _perturbed(model, key)
        assert model.decoder_fingerprint() == baseline, key
    decoder_keys = ["prior_ftr0", "dec_tower.0.conv.weight", "dec_sampler.0.1.bias",
                    "post_process.0._ops.0.conv.1.bn.running_var", "image_conditional.1.log_weight_norm",
                    "dec_tower.1._ops.0.conv.0.bn.num_batches_tracked",
                    "dec_tower.1._ops.0.conv.1.conv.0.weight_normalized"]
    for key in decoder_keys:
        before = model.decoder_fingerprint()
        _perturbed(model, key)
        assert model.decoder_fingerprint() != before, key
    names = [key for key, _ in model.decoder_state_items()]
    assert names == sorted(names) and not any(key.endswith("weight_normalized") for key in names)
    other = _build(_args("mbconv_sep_one_flow"), seed=3)
    other.load_state_dict({k: v for k, v in model.state_dict().items() if is_decoder_key(k)}, strict=False)
    assert other.decoder_fingerprint() == model.decoder_fingerprint()


def test_freeze_decoder_keeps_decoder_statistics_through_training_passes():
    model = _build(_args("res_bnelu_no_se"))
    model.freeze_decoder().freeze_decoder()  # idempotent
    model.train()
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if is_decoder_key(k)}
    encoder_bn = model.encoder_bn_layers()[0]
    encoder_mean = encoder_bn.running_mean.clone()
    x = _input(model)
    for _ in range(2):
        logits, _, _, kl_all, _ = model(x)
        (reconstruction_loss(model.decoder_output(logits), x, True) + sum(kl_all)).mean().backward()
        model.eval().train()
    for key, value in model.state_dict().items():
        if is_decoder_key(key):
            assert torch.equal(value, decoder_before[key]), key
    assert not torch.equal(encoder_bn.running_mean, encoder_mean)
    assert all(p.grad is None for p in model.decoder_parameters())
    assert all(p.grad is not None for p in model.encoder_parameters())
    assert model.training and not model.post_process.training and model.pre_process.training


def test_posterior_api_scores_an_encoder_on_another_encoders_decoder_pass():
    """Encoders A and B share a decoder. B's log q at A's samples, computed on A's decoder pass with
    encode_bottom_up + posterior_raw + invert_flows, equals B's own forward at the inverted z."""
    args = _args("mbconv_sep_one_flow")
    model_a, model_b = _build(args, seed=0).eval(), _build(args, seed=5).eval()
    model_b.load_state_dict({k: v for k, v in model_a.state_dict().items() if is_decoder_key(k)},
                            strict=False)
    x = _input(model_a)
    with torch.no_grad():
        drawn = model_a.forward_detailed(x)
        features = {"a": model_a.encode_bottom_up(x), "b": model_b.encode_bottom_up(x)}
        log_q = {"a": 0.0, "b": 0.0}
        z_pre_b = []

        def score_both(group, state, prior):
            z_post = drawn.groups[group].z_post
            for key, model in (("a", model_a), ("b", model_b)):
                posterior = model.posterior_raw(group, features[key], state, prior)
                z_pre, _ = model.invert_flows(group, z_post)
                if key == "b":
                    z_pre_b.append(z_pre)
                base = Normal(posterior.mu_raw, posterior.log_sigma_raw)
                log_q[key] = log_q[key] + base.log_p(z_pre).sum(dim=(1, 2, 3))
            return z_post

        logits = model_a.top_down(BATCH, score_both)
        replay_b = model_b.forward_detailed(x, z=z_pre_b)
    assert torch.equal(logits, drawn.logits)
    torch.testing.assert_close(log_q["a"], drawn.log_q, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(log_q["b"], replay_b.log_q, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(replay_b.logits, drawn.logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(log_q["a"], log_q["b"])
    assert model_b.encoder_combiner(1) is model_b.enc_tower[model_b.enc_combiner_index[1]]


# ----------------------------------------------------------------------------- regularisers


def test_spectral_regulariser_converges_to_the_largest_singular_values():
    model = _build(_args("res53_mbconv_ada_two_cells"))
    model(_input(model))
    layers = model.encoder_conv_layers()
    exact = sum(torch.linalg.matrix_norm(layer.weight_normalized.detach().reshape(
        layer.weight_normalized.shape[0], -1), ord=2) for layer in layers)
    model.num_power_iter = 100  # the first call runs 10x as many iterations
    estimate = model.spectral_norm_parallel(layers)
    torch.testing.assert_close(estimate.detach(), exact, rtol=1e-3, atol=0)
    estimate.backward()
    assert all(layer.log_weight_norm.grad is not None for layer in layers if layer.log_weight_norm is not None)
    everything = model.spectral_norm_parallel()  # other layer counts per shape: restarts, no error
    assert everything.item() > estimate.item()
    with pytest.raises(AssertionError):
        torch.testing.assert_close(model.spectral_norm_parallel(layers[:1]).detach(), exact)


def test_batchnorm_regulariser_sums_the_largest_absolute_scale_per_layer():
    model = _build(_args("mbconv_res"))
    with torch.no_grad():
        for layer in model.all_bn_layers:
            layer.weight.uniform_(-2, 2)
    expected = sum(layer.weight.detach().abs().max() for layer in model.all_bn_layers)
    torch.testing.assert_close(model.batchnorm_loss().detach(), expected)
    subset = model.encoder_bn_layers()
    torch.testing.assert_close(model.batchnorm_loss(subset).detach(),
                               sum(layer.weight.detach().abs().max() for layer in subset))
    assert model.batchnorm_loss([]).item() == 0.0


def test_batchnorm_regulariser_gradient_shares_ties_like_a_per_layer_max():
    model = _build(_args("mbconv_res"))  # fresh: every scale is 1, so each layer's max is a tie
    with torch.no_grad():
        model.all_bn_layers[0].weight[0] = -3.0  # one layer with a single largest |gamma|
    model.batchnorm_loss().backward()
    ours = [layer.weight.grad.clone() for layer in model.all_bn_layers]
    model.zero_grad()
    sum(torch.max(torch.abs(layer.weight)) for layer in model.all_bn_layers).backward()
    for layer, grad in zip(model.all_bn_layers, ours):
        torch.testing.assert_close(grad, layer.weight.grad, rtol=0, atol=1e-7)
    assert ours[0][0].item() == -1.0 and ours[1].sum().item() == pytest.approx(1.0)
