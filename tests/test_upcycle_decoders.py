"""Upcycling Hugging Face decoder LMs: gated MLPs (Llama, Mistral, Qwen2, Qwen3) and GPT-2's Conv1D MLP.

At init the upcycled model gives the original logits (top-2, dropless, eval mode, any PAD partition); top-1 scales each
block by the router probability (the encoder convention); a PAD decoder trains; save / load round trips; bad input is
refused in one line.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_upcycle import one_line_error, random_masks_
from test_upcycle_io import perturb_
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)
from transformers.pytorch_utils import Conv1D

from pad_moe.models import (
    SITE_KINDS,
    aux_loss,
    expert_counts,
    find_ffn_sites,
    load_upcycled,
    save_upcycled,
    upcycle,
    upcycle_info,
    upcycled_ffns,
)
from pad_moe.models.ffn_sites import linear_from_conv1d
from pad_moe.moe.layer import DenseFFNBlock, MoEFFN, PadMoE
from pad_moe.pad.protocol import pad_modules

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
ATOL = 1e-5
SIZES = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)


def tiny_decoder(arch: str, seed: int = 0, **overrides) -> nn.Module:
    """A random-init 2-layer causal LM (no download), in eval mode."""
    sizes = {**SIZES, **overrides}
    if arch == "gpt2":
        config = GPT2Config(vocab_size=sizes["vocab_size"], n_embd=sizes["hidden_size"],
                            n_inner=sizes["intermediate_size"], n_layer=sizes["num_hidden_layers"],
                            n_head=sizes["num_attention_heads"], n_positions=sizes["max_position_embeddings"],
                            bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            **{k: v for k, v in overrides.items() if k not in SIZES})
    else:
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
        config = cls(**sizes, **({"head_dim": 8} if arch == "qwen3" else {}))
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_ids(seed: int = 1, batch: int = 3, seq: int = 10) -> torch.Tensor:
    return torch.randint(3, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_close(got, want, atol=ATOL) -> None:
    torch.testing.assert_close(got, want, atol=atol, rtol=0)


# -- discovery -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_sites_are_found_in_every_family(arch):
    sites = find_ffn_sites(tiny_decoder(arch))
    kind, prefix = ("gpt2_mlp", "transformer.h") if arch == "gpt2" else ("gated_mlp", "model.layers")
    assert [(s.name, s.kind.name) for s in sites] == [(f"{prefix}.{i}.mlp", kind) for i in range(2)]
    assert all(isinstance(m, nn.Linear) for s in sites for m in s.linears)
    assert {"bert", "albert", "gated_mlp", "gpt2_mlp"} <= set(SITE_KINDS)


def test_conv1d_becomes_an_equal_linear():
    torch.manual_seed(0)
    conv = Conv1D(24, 8)  # nf=24 outputs, nx=8 inputs: weight (8, 24)
    nn.init.normal_(conv.bias)
    linear = linear_from_conv1d(conv)
    assert (linear.in_features, linear.out_features) == (8, 24)
    assert torch.equal(linear.weight, conv.weight.t()) and torch.equal(linear.bias, conv.bias)
    x = torch.randn(3, 5, 8)
    assert_close(linear(x), conv(x))


# -- equivalence at initialisation -----------------------------------------------------------------------------------
MODES = [("static", {}), ("moe", {}), ("pad", {"granularity": "element"}), ("pad", {"granularity": "neuron"})]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode, extra", MODES, ids=["static", "moe", "pad-element", "pad-neuron"])
def test_upcycled_decoder_gives_the_original_logits(arch, mode, extra):
    model, ids = tiny_decoder(arch), tiny_ids()
    ref = logits(model, ids)
    upcycle(model, mode=mode, num_experts=4, k=2, **extra)
    ffns = upcycled_ffns(model)
    block_type = {"static": DenseFFNBlock, "moe": MoEFFN, "pad": PadMoE}[mode]
    assert len(ffns) == 2 and all(type(f.block) is block_type for f in ffns.values())
    expert_type = "mlp" if arch == "gpt2" else "glu"
    assert upcycle_info(model).activation == ("gelu_new" if arch == "gpt2" else "silu")
    assert all((f.block.ffn if mode == "static" else f.block).expert_type == expert_type for f in ffns.values())
    assert_close(logits(model, ids), ref)
    if mode == "pad":  # W_s == W_k at init: every partition gives the dense function
        for seed in (0, 1):
            random_masks_(model, seed)
            assert_close(logits(model, ids), ref)


def test_bfloat16_decoder_keeps_its_dtype():
    model = upcycle(tiny_decoder("mistral").to(torch.bfloat16), mode="pad", num_experts=4)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {b.dtype for n, b in model.named_buffers() if ".mask_" in n} == {torch.bool}
    assert logits(model, tiny_ids()).dtype == torch.bfloat16


def test_every_replaces_every_nth_decoder_mlp():
    model, ids = tiny_decoder("llama", num_hidden_layers=4), tiny_ids()
    ref = logits(model, ids)
    upcycle(model, mode="moe", num_experts=4, every=2)
    assert list(upcycled_ffns(model)) == ["model.layers.1.mlp", "model.layers.3.mlp"]
    assert [s.name for s in find_ffn_sites(model)] == ["model.layers.0.mlp", "model.layers.2.mlp"]
    assert_close(logits(model, ids), ref)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ("moe", "pad"))
def test_top1_scales_each_block_by_the_router_probability(arch, mode):
    # DeepSpeed's top-1 multiplies the expert output by p(x): one expert (p = 1) is the original model, four
    # experts give p(x)·MLP(x) at every block, as for encoders (tests/test_layer.py, tests/test_gated_experts.py)
    model, ids = tiny_decoder(arch), tiny_ids()
    ref = logits(model, ids)
    one = upcycle(copy.deepcopy(model), mode=mode, num_experts=1, k=1)
    assert_close(logits(one, ids), ref)

    original = dict(enumerate(find_ffn_sites(copy.deepcopy(model))))  # a copy: GPT-2's MLP is changed in place
    upcycle(model, mode=mode, num_experts=4, k=1)
    if mode == "pad":
        random_masks_(model, 3)
    seen = {}
    hooks = [f.register_forward_hook(lambda m, args, out, n=n: seen.__setitem__(n, (args[0], out)))
             for n, f in upcycled_ffns(model).items()]
    logits(model, ids)
    for h in hooks:
        h.remove()
    for name, ffn in upcycled_ffns(model).items():
        x, out = seen[name]  # (batch, seq, hidden)
        site = original[ffn.index]
        with torch.no_grad():
            probs = torch.softmax(x @ ffn.block.gate_weight.t(), -1).max(-1, keepdim=True).values
            assert_close(out, probs * site.kind.original(site.module, x))
        assert float(probs.min()) < 0.99  # the scaling is real, not a router that is already one-hot


# -- training --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_pad_decoder_trains_and_masked_entries_get_no_gradient(arch):
    model, ids = tiny_decoder(arch), tiny_ids(batch=4, seq=16)
    upcycle(model, mode="pad", num_experts=4, k=2)
    random_masks_(model, 7)
    with torch.no_grad():
        before = float(model(input_ids=ids, labels=ids).loss)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss + 0.01 * aux_loss(model)  # next-token loss (labels shifted by HF)
    loss.backward()
    counts = expert_counts(model)
    assert all(bool((c > 0).all()) for c in counts.values()), counts  # every expert was routed tokens
    for name, p in model.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    for name, ffn in upcycled_ffns(model).items():
        block = ffn.block
        masks = block.weight_masks()
        for wname, w_s in block.static.named_parameters():
            m = masks[wname].expand_as(w_s)
            assert torch.all(w_s.grad[m] == 0), (name, wname)  # dynamic entries take nothing from W_s
            for i in range(block.num_local_experts):
                assert torch.all(block.experts.expert_grads(i)[wname][~m] == 0), (name, wname)
    torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
    model.eval()
    with torch.no_grad():
        after = float(model(input_ids=ids, labels=ids).loss)
    assert after < before


# -- save / load -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, mode", [("llama", "pad"), ("mistral", "moe"), ("qwen2", "static"), ("qwen3", "pad"),
                                        ("gpt2", "pad"), ("gpt2", "moe")])
def test_save_load_round_trip_gives_identical_logits(tmp_path, arch, mode):
    model, ids = tiny_decoder(arch), tiny_ids()
    upcycle(model, mode=mode, num_experts=4, second_expert_sampling=False)
    random_masks_(model, 2)
    perturb_(model)
    ref = logits(model, ids)
    loaded = load_upcycled(save_upcycled(model, tmp_path / "m"))
    assert type(loaded) is type(model) and not loaded.training
    assert list(upcycled_ffns(loaded)) == list(upcycled_ffns(model))
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits(loaded, ids), ref)
    for (_, a), (_, b) in zip(pad_modules(model), pad_modules(loaded), strict=True):
        assert all(torch.equal(a.masks()[n], b.masks()[n]) for n in a.masks())
    if arch == "gpt2":  # tied embeddings stay tied
        assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_compacted_gated_decoder_round_trips(tmp_path):
    model, ids = tiny_decoder("qwen3"), tiny_ids()
    upcycle(model, mode="pad", num_experts=4, granularity="neuron", second_expert_sampling=False)
    random_masks_(model, 4)
    perturb_(model, 1)
    next(iter(upcycled_ffns(model).values())).block.compact_()
    ref = logits(model, ids)
    loaded = load_upcycled(save_upcycled(model, tmp_path / "m"))
    assert [f.block.compacted for f in upcycled_ffns(loaded).values()] == [True, False]
    assert_close(logits(loaded, ids), ref)


# -- bad input -------------------------------------------------------------------------------------------------------
class NoMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)


class NotAGatedMLP(nn.Module):
    """Has the names of a gated MLP but computes down(act(gate x) + up x)."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))


def test_bad_decoder_input_is_refused():
    one_line_error(lambda: upcycle(NoMLP()), "NoMLP has no recognisable FFN block; supported: .*Llama.*GPT-2")
    untouched = tiny_decoder("llama")
    one_line_error(lambda: upcycle(untouched, mode="moe", num_experts=2, k=3), "k=3 must be in .*num_experts=2")
    one_line_error(lambda: upcycle(tiny_decoder("gpt2"), mode="pad", num_experts=4, k=5), "k=5")
    assert not upcycled_ffns(untouched) and len(find_ffn_sites(untouched)) == 2  # a refused upcycle changes nothing

    holder = nn.Sequential(NotAGatedMLP())
    holder.config = LlamaConfig(hidden_act="silu")
    one_line_error(lambda: upcycle(holder), "looks like a gated_mlp FFN but does not compute one")
    one_line_error(lambda: upcycle(tiny_decoder("llama", hidden_act="quick_gelu")), "hidden_act='quick_gelu'")
    gpt2 = tiny_decoder("gpt2")
    gpt2.config.activation_function = "relu"  # the MLPs still compute gelu_new
    one_line_error(lambda: upcycle(gpt2), "does not compute 'relu' as config.activation_function says")
    bare = tiny_decoder("llama").model.layers[0].mlp  # LlamaMLP keeps its config: found, but has no parent
    one_line_error(lambda: upcycle(bare), "LlamaMLP is a bare MLP")
    assert not upcycled_ffns(bare)
    relu_llama = tiny_decoder("llama", hidden_act="relu")  # a gated MLP needs a gated activation
    one_line_error(lambda: upcycle(relu_llama, mode="pad"), "activation='relu' is not a gated activation")
    assert not upcycled_ffns(relu_llama)
