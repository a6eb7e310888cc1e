"""Serving forms of a compressed HF MoE (pad_moe.hfmoe.serving): ``load_deployed(DIR, resident=...)``.

Every form computes what the PAD model computed (fp32, ≤ 1e-5); ``narrow`` (neuron masks) holds exactly the stored
expert values and no per-forward rebuild; ``full`` holds the source's size; generation (greedy, sampling, KV cache ≡ no
cache) and ``transformers.pipeline`` work; ``dtype`` and ``.to`` work; forms that do not apply are one line.
"""

import pytest
import torch

E, V, H, F = 4, 320, 32, 48


def _pad_model(granularity, seed=0):
    """A tiny Mixtral with PAD experts: random masks (κ≈0.5), λ away from 1, a static weight unlike the mean."""
    from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM

    from pad_moe.hfmoe.experts import import_hf_moe, moe_blocks

    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=V, hidden_size=H, intermediate_size=F, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=E,
                                             num_experts_per_tok=2, max_position_embeddings=64, eos_token_id=1,
                                             bos_token_id=None, pad_token_id=0))
    model.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=0)
    import_hf_moe(model, granularity=granularity)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, block in moe_blocks(model):
            x = block.experts
            for p in (x.gate_up_proj, x.down_proj, x.static_gate_up, x.static_down):
                p.normal_(0, 0.3, generator=g)
            x.set_masks({k: torch.rand(v.shape, generator=g) < 0.5 for k, v in x.masks().items()})
            if isinstance(x.phi, torch.Tensor):
                x.phi.fill_(0.4)
    return model.eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from pad_moe.hfmoe.deployed import save_compressed
    from pad_moe.lm.tokenizer import train_bpe

    tokenizer = train_bpe([f"sentence number {i} about {w}" for i in range(400) for w in ("cats", "rain", "maps")], V)
    out = {}
    for granularity in ("element", "neuron"):
        model = _pad_model(granularity)
        folder = tmp_path_factory.mktemp(granularity)
        meta = save_compressed(model, tokenizer, str(folder), {"family": "mixtral", "method": "random", "kappa": 0.5,
                                                               "granularity": granularity})
        out[granularity] = (model, str(folder), meta, tokenizer)
    return out


IDS = torch.tensor([[5, 17, 42, 7, 99, 3], [8, 8, 250, 31, 2, 64]])


@pytest.mark.parametrize("granularity, forms", [("element", ("auto", "full", "compact")),
                                                ("neuron", ("auto", "narrow", "full", "compact"))])
def test_every_form_computes_what_the_pad_model_computed(exports, granularity, forms):
    from pad_moe import load_deployed

    model, folder, _, _ = exports[granularity]
    with torch.no_grad():
        want = model(input_ids=IDS).logits
        for form in forms:
            got = load_deployed(folder, resident=form)(input_ids=IDS).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"resident={form}")


def _expert_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)


def test_narrow_holds_exactly_the_stored_values_and_full_the_source_size(exports):
    from pad_moe import load_deployed
    from pad_moe.hfmoe.serving import UNIT_ALIGN, NarrowPadExperts

    _, folder, meta, _ = exports["neuron"]
    narrow = load_deployed(folder)  # auto: narrow for neuron masks
    blocks = [m for m in narrow.modules() if hasattr(m, "experts") and hasattr(m, "gate")]
    assert len(blocks) == 2 and all(isinstance(b.experts, NarrowPadExperts) for b in blocks)
    non_expert = sum(p.numel() for n, p in narrow.named_parameters() if ".experts." not in n)
    padding = _expert_params(narrow) + non_expert - meta["params_stored"]  # zero units for the grouped GEMM
    assert 0 <= padding < len(blocks) * E * 3 * H * UNIT_ALIGN
    for b in blocks:
        assert b.experts.dynamic.down_proj.shape[-1] % UNIT_ALIGN == 0
    for b in blocks:  # no full-width weight anywhere
        widths = [p.shape[-1] for p in b.experts.parameters() if p.dim() == 3 and p.shape[-1] != H]
        assert all(w < F for w in widths)
    full = load_deployed(folder, resident="full")
    assert _expert_params(full) == 2 * E * 3 * F * H  # the source's experts, effective weights


def test_generation_kv_cache_sampling_and_pipeline(exports):
    from transformers import pipeline

    from pad_moe import load_deployed

    _, folder, _, tokenizer = exports["neuron"]
    model = load_deployed(folder)
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    cached = model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), use_cache=True, **greedy)
    uncached = model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), use_cache=False, **greedy)
    assert torch.equal(cached, uncached) and cached.shape == (2, IDS.shape[1] + 6)
    compact = load_deployed(folder, resident="compact")
    assert torch.equal(compact.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), **greedy), cached)
    torch.manual_seed(0)
    sampled = model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=4, do_sample=True,
                             top_k=20)
    assert sampled.shape == (2, IDS.shape[1] + 4)
    text = pipeline("text-generation", model=model, tokenizer=tokenizer)("sentence number", max_new_tokens=3,
                                                                          do_sample=False)
    assert text[0]["generated_text"].startswith("sentence number")


def test_dtype_and_to(exports):
    from pad_moe import load_deployed

    model, folder, _, _ = exports["neuron"]
    bf16 = load_deployed(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        want = model(input_ids=IDS).logits
        got = bf16(input_ids=IDS).logits.float()
        assert (got - want).abs().max() <= 0.05 * want.abs().max()
        again = bf16.to(torch.float32).to("cpu")(input_ids=IDS).logits
    assert again.dtype == torch.float32


def test_forms_that_do_not_apply_are_one_line(exports):
    from pad_moe import load_deployed

    _, element, _, _ = exports["element"]
    for kwargs, message in (({"resident": "narrow"}, "needs neuron granularity"),
                            ({"resident": "tiny"}, "resident='tiny' is unknown"),
                            ({"dtype": "bf16"}, "not a floating-point torch dtype")):
        with pytest.raises(ValueError, match=message) as err:
            load_deployed(element, **kwargs)
        assert "\n" not in str(err.value)
