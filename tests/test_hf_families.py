"""The MoE families of 2025–26 as registered plugins (pad_moe.hfmoe.families): DeepSeek-V2 / V3, gpt-oss, GLM-4.5
(glm4_moe), Qwen3-Next and Llama 4 (text), on tiny random models built here.

References: the HF model itself (all masks one ≡ its logits, bitwise: the same operations on the same values), the HF
model whose experts hold W_eff written back in the family's own layout (random masks, ≤ 1e-6), the published
parameter totals of the families' checkpoints (their config.json sizes, counted on the meta device), and
``padmoe compress`` end to end (κ = 1 exact, κ < 1 stores the counted size, drop keeps the router's bias rows)."""

import json

import pytest
import torch

from pad_moe.hfmoe.experts import PadHFExperts, block_router, import_hf_moe, moe_blocks
from pad_moe.hfmoe.families import family_spec

H, V = 32, 320
FAMILIES = ("deepseek_v2", "deepseek_v3", "gpt_oss", "glm4_moe", "qwen3_next", "llama4_text")
IDS = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(3))


def tiny_config(family: str):
    import transformers as T

    common = dict(vocab_size=V, hidden_size=H, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                  max_position_embeddings=64, num_experts_per_tok=2, eos_token_id=1, bos_token_id=None,
                  pad_token_id=0)
    mla = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    grouped = dict(moe_intermediate_size=24, intermediate_size=40, n_routed_experts=8, n_group=2, topk_group=1,
                   first_k_dense_replace=1, routed_scaling_factor=2.5)
    if family == "deepseek_v2":  # group-limited greedy softmax routing, two shared experts, no q LoRA
        return T.DeepseekV2Config(n_shared_experts=2, topk_method="group_limited_greedy", q_lora_rank=None,
                                  **grouped, **mla, **common)
    if family == "deepseek_v3":
        return T.DeepseekV3Config(n_shared_experts=1, q_lora_rank=24, **grouped, **mla, **common)
    if family == "glm4_moe":
        return T.Glm4MoeConfig(n_shared_experts=1, head_dim=8, **grouped, **common)
    if family == "gpt_oss":
        return T.GptOssConfig(intermediate_size=24, num_local_experts=4, head_dim=8, sliding_window=4, **common)
    if family == "qwen3_next":  # layer 0 linear attention (Gated DeltaNet), layer 1 full attention, layer 2 dense
        return T.Qwen3NextConfig(moe_intermediate_size=24, shared_expert_intermediate_size=20, intermediate_size=40,
                                 num_experts=4, head_dim=8, decoder_sparse_step=1, mlp_only_layers=[2],
                                 linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                                 linear_num_value_heads=4, full_attention_interval=2, **common)
    return T.Llama4TextConfig(intermediate_size=24, intermediate_size_mlp=40, num_local_experts=4, head_dim=8,
                              interleave_moe_layer_step=2, **{**common, "num_hidden_layers": 4,
                                                              "num_experts_per_tok": 1})


def tiny(family: str, seed: int = 0, experts: str = "default"):
    """A tiny random model of ``family`` whose experts (and DeepSeek-V3 / GLM router bias) differ a lot, so a wrong
    expert, layout or mix shows. ``experts="eager"``: transformers' reference loop over the experts, which PAD's
    computation follows operation for operation (the default grouped_mm kernel sums in another order: ~1e-7)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family)
    if experts == "eager":
        config._experts_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for _, block in moe_blocks(model):
            for p in block.experts.parameters():
                p.normal_(0, 0.3)
            bias = getattr(block_router(model, block), "e_score_correction_bias", None)
            if bias is not None:
                bias.normal_(0, 0.3)
    return model.eval()


def random_masks(model, seed=4, p=0.5):
    g = torch.Generator().manual_seed(seed)
    for _, block in moe_blocks(model):
        block.experts.set_masks({k: torch.rand(v.shape, generator=g) < p for k, v in block.experts.masks().items()})


def sparse_layers(model) -> list[int]:
    return sorted(int(name.split(".")[2]) for name, _ in moe_blocks(model))


def test_every_family_is_registered_with_its_sparse_layers():
    expected = {"deepseek_v2": [1, 2], "deepseek_v3": [1, 2], "glm4_moe": [1, 2], "gpt_oss": [0, 1, 2],
                "qwen3_next": [0, 1], "llama4_text": [1, 3]}  # first_k_dense_replace, mlp_only_layers, moe_layers
    for family in FAMILIES:
        model = tiny(family)
        assert family_spec(model).model_type == family
        assert sparse_layers(model) == expected[family], family


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_model_at_all_ones_is_the_original_bitwise(family):
    ids = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(5))
    model = import_hf_moe(tiny(family))
    assert all(isinstance(b.experts, PadHFExperts) for _, b in moe_blocks(model))
    got = model(ids).logits
    assert torch.equal(got, tiny(family, experts="eager")(ids).logits)
    assert (got - tiny(family)(ids).logits).abs().max() <= 1e-6  # the family's default kernels


@pytest.mark.parametrize("family", FAMILIES)
def test_random_masks_equal_the_hf_model_holding_w_eff_in_its_layout(family):
    model = import_hf_moe(tiny(family))
    random_masks(model)
    reference = tiny(family, experts="eager")
    layout = family_spec(model).expert_layout
    with torch.no_grad():
        for (_, pad), (_, hf) in zip(moe_blocks(model), moe_blocks(reference)):
            biases = {n: p for n, p in pad.experts.named_parameters(recurse=False) if n.endswith("_bias")}
            for name, tensor in layout.native(*pad.experts.effective_weights(), biases).items():
                getattr(hf.experts, name).copy_(tensor)
    assert (model(IDS).logits - reference(IDS).logits).abs().max() <= 1e-6
    model(IDS).logits.square().mean().backward()
    for _, block in moe_blocks(model):
        experts, masks = block.experts, block.experts.masks()
        F = experts.intermediate_dim
        assert torch.all(experts.gate_up_proj.grad[:, :F][:, ~masks["gate_proj.weight"]] == 0)
        assert torch.all(experts.down_proj.grad[:, ~masks["down_proj.weight"]] == 0)
        assert experts.static_down.grad[~masks["down_proj.weight"]].abs().sum() > 0
        if layout.has_bias:  # each expert's own biases, outside the partition: trained like any dynamic entry
            assert experts.gate_up_bias.grad.abs().sum() > 0 and experts.down_bias.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text"])
def test_layout_round_trip_is_exact(family):
    model = tiny(family)
    layout = family_spec(model).expert_layout
    for _, block in moe_blocks(model):
        experts = block.experts
        gate_up, down = layout.canonical(experts)
        E, F, Hd = layout.sizes(experts)
        assert gate_up.shape == (E, 2 * F, Hd) and down.shape == (E, Hd, F)
        native = layout.native(gate_up, down, layout.biases(experts))
        assert set(native) == set(layout.native_tensors)
        assert all(torch.equal(t, getattr(experts, n)) for n, t in native.items())
    if family == "gpt_oss":  # canonical gate row j is native column 2j, up row j column 2j + 1
        w = experts.gate_up_proj
        assert torch.equal(gate_up[1, 3], w[1, :, 6]) and torch.equal(gate_up[1, F + 3], w[1, :, 7])


def test_the_router_bias_is_kept_and_matters():
    model = import_hf_moe(tiny("deepseek_v3"))
    before = model(IDS).logits
    with torch.no_grad():
        for _, block in moe_blocks(model):
            router = block_router(model, block)
            assert router.e_score_correction_bias.abs().sum() > 0  # the source's, untouched by the import
            router.e_score_correction_bias.zero_()
    assert not torch.allclose(model(IDS).logits, before)  # it changes which experts are chosen


def test_refused_families_and_configurations_are_one_line():
    import transformers as T

    with pytest.raises(ValueError, match="model_type='llama4'.*vision encoder.*llama4_text") as err:
        family_spec(T.Llama4Config())
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="deepseek_v2 with topk_method='noaux_tc' is not supported"):
        family_spec(T.DeepseekV2Config(topk_method="noaux_tc"))
    with pytest.raises(ValueError, match="model_type='llama' is not an MoE family"):
        family_spec(T.LlamaConfig())


def test_a_refused_folder_is_one_line_in_count(tmp_path):
    from pad_moe.errors import UsageError
    from pad_moe.hfmoe.count import count_hf_moe

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama4"}))
    with pytest.raises(UsageError, match="model_type='llama4'.*vision encoder"):
        count_hf_moe(str(tmp_path))


# Published totals (model cards / papers) and the convention each publisher counts active parameters by: "all" (every
# parameter a token uses, embeddings included, as ``padmoe count`` reports), "-embedding" (without the input embedding
# table, a lookup: DeepSeek, OpenAI's gpt-oss table) or "-embedding-head" (without the embedding and output tables:
# GLM, Qwen3-Next's "A3B"). Tolerance: half a unit of the figure's last published digit, except where noted.
PUBLISHED = [
    ("deepseek-v3", 671e9, 37e9, "-embedding", 0.5e9),  # DeepSeek-V3 report (without the 14B MTP module)
    ("deepseek-v2", 236e9, 21e9, "-embedding", 0.5e9),  # DeepSeek-V2 paper
    ("gpt-oss-120b", 116.8e9, 5.1e9, "-embedding", 0.05e9),  # gpt-oss model card: 116.83B / 5.13B
    ("gpt-oss-20b", 20.9e9, 3.6e9, "-embedding", 0.05e9),  # 20.91B / 3.61B
    ("qwen3-next-80b-a3b", 80e9, 3e9, "-embedding-head", 0.5e9),  # Qwen3-Next model card (without MTP)
]


def _embedding(name: str) -> int:
    from pad_moe.hfmoe.count import HF_MOE_PRESETS

    fields = HF_MOE_PRESETS[name][1]
    return fields["vocab_size"] * fields["hidden_size"]


def _active(name: str, counted: dict, convention: str) -> int:
    return counted["params_active"] - {"all": 0, "-embedding": 1, "-embedding-head": 2}[convention] * _embedding(name)


@pytest.mark.parametrize("name, total, active, convention, tolerance", PUBLISHED)
def test_preset_counts_match_the_published_totals(name, total, active, convention, tolerance):
    from pad_moe.hfmoe.count import count_hf_moe

    r = count_hf_moe(name, mode="moe")
    assert abs(r["params"] - total) <= tolerance and abs(_active(name, r, convention) - active) <= tolerance, r
    pad = count_hf_moe(name, mode="pad", kappa=0.5)
    assert pad["params"] < r["params"] and pad["params_active"] < r["params_active"]


def test_glm_counts_match_the_published_totals_within_one_percent():
    """GLM-4.5 355B / 32B and GLM-4.5-Air 106B / 12B (Z.ai's model card). transformers builds the 92 (46) layers
    without the multi-token-prediction layer: 352.8B (106.9B), 0.6 % (0.8 %) from the rounded figures, which neither
    the model with its MTP layer (356.7B) nor without rounds to; the active counts (without the embedding and output
    tables) are within their rounding."""
    from pad_moe.hfmoe.count import count_hf_moe

    for name, total, active in (("glm-4.5", 355e9, 32e9), ("glm-4.5-air", 106e9, 12e9)):
        r = count_hf_moe(name)
        assert abs(r["params"] / total - 1) < 0.01 and abs(_active(name, r, "-embedding-head") - active) <= 0.5e9, r
        assert r["moe_layers"] == {"glm-4.5": 89, "glm-4.5-air": 45}[name]  # first_k_dense_replace dense layers


def test_llama4_scout_text_model_plus_its_vision_encoder_is_the_published_total():
    """Llama-4-Scout-17B-16E: 109B total, 17B active (Meta). pad_moe counts (and imports) the text model; Meta's
    total also holds the vision encoder and projector of the checkpoint's vision_config, built here on meta."""
    import transformers as T
    from transformers.models.llama4.modeling_llama4 import Llama4MultiModalProjector, Llama4VisionModel

    from pad_moe.hfmoe.count import count_hf_moe

    r = count_hf_moe("llama-4-scout")
    vision = T.Llama4VisionConfig(hidden_size=1408, intermediate_size=5632, num_hidden_layers=34,
                                  num_attention_heads=16, image_size=336, patch_size=14, vision_output_dim=4096,
                                  projector_input_dim=4096, projector_output_dim=4096, pixel_shuffle_ratio=0.5)
    with torch.device("meta"):
        parts = (Llama4VisionModel(vision), Llama4MultiModalProjector(
            T.Llama4Config(vision_config=vision.to_dict(), text_config={"hidden_size": 5120})))
    vision_params = sum(p.numel() for m in parts for p in m.parameters())
    assert abs(r["params"] + vision_params - 109e9) <= 0.5e9 and abs(r["params_active"] - 17e9) <= 0.5e9, r
    assert r["moe_layers"] == 48 and r["k"] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_of_a_folder_are_the_model_s_and_the_export_s(family, tmp_path):
    from pad_moe.hfmoe.count import count_hf_moe
    from pad_moe.hfmoe.deployed import save_compressed
    from pad_moe.partition import random_partition

    base = tiny(family)
    base.save_pretrained(tmp_path / "src")
    params = sum(p.numel() for p in base.parameters())
    full = sum(t.numel() for t in base.state_dict().values())  # + DeepSeek-V3 / GLM's e_score_correction_bias
    assert full - params == (16 if family in ("deepseek_v3", "glm4_moe") else 0)
    spec = family_spec(base)
    k = base.config.num_experts_per_tok
    per_expert = 0  # one expert's weights and biases, summed over the sparse blocks
    for _, block in moe_blocks(base):
        E = spec.num_experts(base.config)
        per_expert += sum(p.numel() for p in block.experts.parameters()) // E
    moe = count_hf_moe(str(tmp_path / "src"))
    assert moe["params"] == full and moe["params_active"] == full - (E - k) * per_expert
    assert moe["params_training"] == params
    model = import_hf_moe(tiny(family))
    random_partition(model, kappa=0.5, scope="layer")
    (tmp_path / "out").mkdir()
    meta = save_compressed(model, None, str(tmp_path / "out"), {"family": family})
    assert meta["params_stored"] == count_hf_moe(str(tmp_path / "src"), mode="pad", kappa=0.5)["params"]
    exported = count_hf_moe(str(tmp_path / "out"))
    assert exported["params"] == meta["params_stored"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A BPE tokenizer of V ids trained on VADER sentences, calibration and held-out text (as tests/test_compress)."""
    from pad_moe.lm.corpus import split_documents, vader_sentences
    from pad_moe.lm.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("families")
    train, held_out = split_documents(vader_sentences())
    (root / "calib.txt").write_text("\n".join(train[3000:3300]) + "\n")
    (root / "eval.txt").write_text("\n".join(held_out[:60]) + "\n")
    return root, train_bpe(train[:3000], V)


def _source(corpus, family):
    root, tokenizer = corpus
    folder = root / family
    if not folder.exists():
        tiny(family).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def _compress(corpus, family, out, **kwargs):
    from pad_moe.hfmoe.compress import compress

    kwargs = {"calib": str(corpus[0] / "calib.txt"), "seq_len": 32, "batch_size": 4, "calib_batches": 2,
              "iterations": 2, **kwargs}
    return compress(str(_source(corpus, family)), out=str(out), **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_compress_end_to_end(corpus, family, tmp_path):
    from transformers import AutoModelForCausalLM

    import pad_moe
    from pad_moe.hfmoe.count import count_hf_moe

    source = AutoModelForCausalLM.from_pretrained(_source(corpus, family)).eval()
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    one = _compress(corpus, family, tmp_path / "k1", kappa=1.0)
    # the reload serves the family's own experts module (its default kernels: ~1e-7 from PAD's reference loop)
    assert one["params_stored"] == one["params_original"] and one["verified_max_abs_diff"] <= 1e-6
    assert torch.equal(pad_moe.load_deployed(str(tmp_path / "k1"))(ids).logits, source(ids).logits)

    half = _compress(corpus, family, tmp_path / "k05", kappa=0.5, granularity="neuron")
    counted = count_hf_moe(str(_source(corpus, family)), mode="pad", kappa=0.5, granularity="neuron")["params"]
    unit = 3 * H * (family_spec(source).num_experts(source.config) - 1)  # one hidden unit moved between layers
    assert abs(half["params_stored"] - counted) <= unit and half["params_stored"] < half["params_original"]
    served = pad_moe.load_deployed(str(tmp_path / "k05"))  # auto: narrow where the layout allows it, else full
    compact = pad_moe.load_deployed(str(tmp_path / "k05"), resident="compact")
    assert (served(ids).logits - compact(ids).logits).abs().max() <= 1e-5
    router_tensors = family_spec(source).router_tensors
    for name, big in moe_blocks(source):  # the router (DeepSeek-V3 / GLM: with its bias) is the source's
        for tensor in router_tensors:
            got = getattr(block_router(compact, compact.get_submodule(name)), tensor)
            assert torch.equal(got, getattr(block_router(source, big), tensor)), (name, tensor)

    dropped = _compress(corpus, family, tmp_path / "drop", kappa=0.5, method="drop")
    small = pad_moe.load_deployed(str(tmp_path / "drop"))
    spec = family_spec(small)
    E, keep = spec.num_experts(source.config), spec.num_experts(small.config)
    assert keep == round(1 + 0.5 * (E - 1))
    assert dropped["params_stored"] == sum(t.numel() for t in small.state_dict().values())  # router bias included
    for (name, block), (_, big) in zip(moe_blocks(small), moe_blocks(source)):
        kept = dropped["kept_experts"][name]
        for tensor in spec.router_tensors:  # the router's rows, and DeepSeek-V3 / GLM's e_score_correction_bias
            got, was = (getattr(block_router(m, b), tensor) for m, b in ((small, block), (source, big)))
            assert torch.equal(got, was[kept]), (name, tensor)


def test_the_causal_lm_job_imports_a_new_family_and_refuses_what_it_cannot_follow(tmp_path):
    import transformers as T

    from pad_moe.config import load_config
    from pad_moe.lm.job import build_model

    tiny("deepseek_v3").save_pretrained(tmp_path / "v3")
    base = ["model.arch=causal_lm", f"model.path={tmp_path / 'v3'}", "data.task=vader", "moe.mode=pad",
            "moe.num_experts=8"]
    with pytest.raises(ValueError, match="moe.aux_loss_coef=0.01: the deepseek_v3 model has no load-balancing loss"):
        build_model(load_config(None, base), V, 0)
    model, is_moe = build_model(load_config(None, [*base, "moe.aux_loss_coef=0"]), V, 0)
    assert is_moe and all(isinstance(b.experts, PadHFExperts) for _, b in moe_blocks(model))
    assert torch.equal(model.eval()(IDS).logits, tiny("deepseek_v3")(IDS).logits)
    T.Llama4Config().save_pretrained(tmp_path / "llama4")  # the multimodal checkpoint: refused before any load
    cfg = load_config(None, ["model.arch=causal_lm", f"model.path={tmp_path / 'llama4'}", "data.task=vader"])
    with pytest.raises(ValueError, match="model_type='llama4'.*vision encoder"):
        build_model(cfg, V, 0)


def _train_family(rank, world, out, folder):
    from pad_moe.config import load_config
    from pad_moe.train.loop import train

    cfg = load_config(None, ["model.arch=causal_lm", f"model.path={folder}", "data.task=vader", "data.max_length=32",
                             "data.max_train=64", "data.max_eval=8", "moe.mode=pad", "moe.num_experts=8",
                             "moe.aux_loss_coef=0", "partition.warmup_steps=2", "partition.iterations=1",
                             "partition.num_batches=1", "train.ds_config=configs/ds_zero2.json",
                             "train.micro_batch_size=8", "train.steps=4", "train.lr=0.003", f"output_dir={out}",
                             "name=v3"])
    return train(cfg)


@pytest.mark.slow  # a DeepSpeed training run: 23-29 s on the 2-core development machine
def test_pad_training_of_deepseek_v3_keeps_its_router_bias_into_the_export(corpus, tmp_path):
    """The causal-LM job (ZeRO-2, one rank) trains the PAD-imported DeepSeek-V3; e_score_correction_bias is a buffer
    that no optimizer step changes (transformers does not implement its bias update): the export holds the source's."""
    from safetensors.torch import load_file

    import pad_moe
    from pad_moe.testing.ranks import run_ranks

    folder = _source(corpus, "deepseek_v3")
    summary = run_ranks(_train_family, 1, str(tmp_path), str(folder), timeout=300)[0]
    assert len(summary["losses"]) == 4 and summary["params_compact"] < summary["params_training"]
    source = load_file(folder / "model.safetensors")
    exported = load_file(tmp_path / "v3" / "deployed" / "model.safetensors")
    biases = [k for k in source if k.endswith("e_score_correction_bias")]
    assert len(biases) == 2 and all(torch.equal(exported[k], source[k]) for k in biases)
    pad_moe.load_deployed(str(tmp_path / "v3" / "deployed"))


def _autoep_engine(family, stage, ep, micro, masked):
    """The tiny ``family`` model under DeepSpeed AutoEP with PAD layers (ZeRO ``stage``, expert parallel ``ep``);
    ``masked``: the same random masks (seed 4) on every run."""
    import deepspeed

    from pad_moe.moe.autoep import autoep_section, pad_autoep_layers, pad_autoep_modules

    model = tiny(family)
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_optimization": {"stage": stage}, "expert_parallel": autoep_section(model, ep),
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}}}
    with pad_autoep_layers():
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    if masked:
        g = torch.Generator().manual_seed(4)
        for _, layer in pad_autoep_modules(engine.module):
            layer.set_masks({k: torch.rand(v.shape, generator=g) < 0.5 for k, v in layer.masks().items()})
    return engine


def _router_biases(module) -> list[torch.Tensor]:
    return [b.detach().clone() for n, b in module.named_buffers() if n.endswith("e_score_correction_bias")]


def _autoep_at_all_ones(rank, world, families):
    from pad_moe.moe.autoep import pad_autoep_modules

    out = {}
    for family in families:
        expected = tiny(family)(IDS).logits
        engine = _autoep_engine(family, 2, 1, 2, masked=False)
        out[family] = (len(pad_autoep_modules(engine.module)),
                       float((engine.module.eval()(IDS).logits - expected).abs().max()),
                       [torch.equal(a, b) for a, b in zip(_router_biases(engine.module), _router_biases(tiny(family)))])
    return out


def test_autoep_converts_deepseek_into_pad_layers_exactly_with_the_router_bias():
    from pad_moe.testing.ranks import run_ranks

    found = run_ranks(_autoep_at_all_ones, 1, ["deepseek_v2", "deepseek_v3"])[0]
    for family, (layers, err, biases) in found.items():
        # AutoEP's grouped GEMM vs transformers' kernel: fp32 reassociation
        assert layers == 2 and err < 1e-5, (family, layers, err)
        assert biases == ([True, True] if family == "deepseek_v3" else []), family  # copied onto AutoEP's router


def _autoep_losses(engine, rank, world, micro, steps=3):
    """Per step, the loss of this rank's rows [rank·micro, (rank+1)·micro) of one global batch (the same each step)."""
    ids = torch.randint(0, V, (world * micro, 9), generator=torch.Generator().manual_seed(50))[rank * micro:][:micro]
    losses = []
    for _ in range(steps):
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _autoep_train(rank, world, stage):
    from pad_moe.moe.autoep import pad_autoep_modules

    engine = _autoep_engine("deepseek_v3", stage, world, 2, masked=True)
    losses = _autoep_losses(engine, rank, world, 2)
    first = pad_autoep_modules(engine.module)[0][1]
    kept = [torch.equal(a, b) for a, b in zip(_router_biases(engine.module), _router_biases(tiny("deepseek_v3")))]
    saved = [k for k in engine.module.state_dict() if k.endswith("e_score_correction_bias")]
    return {"losses": losses, "local_experts": first.num_local_experts, "kept": kept, "saved": len(saved)}


def _autoep_reference(rank, world, ranks):
    return _autoep_losses(_autoep_engine("deepseek_v3", 0, 1, 2 * ranks, masked=True), 0, 1, 2 * ranks)


@pytest.mark.slow  # two spawns of DeepSpeed: 44 s each stage on the (loaded) 2-core development machine
@pytest.mark.parametrize("stage", [2, 3])
def test_pad_training_of_deepseek_v3_under_autoep_two_ranks_matches_one_process_and_keeps_the_router_bias(stage):
    """Expert parallel 2 on 2 gloo ranks, ZeRO-2 / ZeRO-3, random masks: the mean of the ranks' losses per step is
    the one-process loss over the global batch (gradients reduced right), and e_score_correction_bias is the source's
    after training and in the state a checkpoint saves (AutoEP copies it; load_balance_coeff None updates nothing)."""
    from pad_moe.testing.ranks import run_ranks

    per_rank = run_ranks(_autoep_train, 2, stage)
    reference = run_ranks(_autoep_reference, 1, 2)[0]
    assert [r["local_experts"] for r in per_rank] == [4, 4]
    mean = [(a + b) / 2 for a, b in zip(per_rank[0]["losses"], per_rank[1]["losses"])]
    assert mean == pytest.approx(reference, rel=2e-5, abs=1e-6), (mean, reference)
    assert reference[-1] < reference[0]
    assert all(r["kept"] == [True, True] and r["saved"] == 2 for r in per_rank), per_rank
