"""Switch backbone with its sparse MLPs on DeepSpeed MoE: Hugging Face equivalence at mask = 1 (outputs, router z-loss,
gradients), the converter on a saved checkpoint directory, expert-parallel conversion on 2 ranks, bad input.

Tolerance: fp32 logits agree to atol = rtol = 1e-5 (measured ≈ 1e-6: DeepSpeed runs each expert on a padded
(capacity, H) buffer, Hugging Face on the gathered tokens, so matmul blocking differs); gradients to 1e-5 likewise.
"""

import copy

import pytest
import torch

from pad_moe.switch.model import SwitchSparseFFN, from_hf, jitter_policy, load_hf_switch
from pad_moe.switch.presets import get_arch, hf_config
from pad_moe.testing.ranks import run_ranks

TOL = dict(atol=1e-5, rtol=1e-5)
NO_DROP = dict(drop_tokens=False, min_capacity=0)  # every token reaches its expert, as HF with a large capacity


def tiny_hf(seed=0, **extra):
    from transformers import SwitchTransformersForConditionalGeneration

    arch = get_arch("switch-debug").with_(vocab_size=97, num_experts=4)
    cfg = hf_config(arch, router_jitter_noise=0.0, expert_capacity=64, **extra)
    torch.manual_seed(seed)
    model = SwitchTransformersForConditionalGeneration(cfg)
    with torch.no_grad():  # HF initialises the router with std 1: make routing less peaked so experts all get tokens
        for name, p in model.named_parameters():
            if "router" in name:
                p.mul_(0.05)
    return model


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 7:] = 0
    return ids, mask, torch.randint(3, 97, (3, 6), generator=g)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_switch")
    tiny_hf().save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("mode", ["moe", "pad"])
def test_converted_checkpoint_gives_hf_logits_and_router_z_loss(saved, mode):
    from transformers import SwitchTransformersForConditionalGeneration

    hf = SwitchTransformersForConditionalGeneration.from_pretrained(saved, attn_implementation="eager").eval()
    ours = load_hf_switch(saved, mode, **NO_DROP).eval()
    ids, mask, dec = batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, output_router_logits=True)
        logits, aux = ours(ids, mask, dec)
    torch.testing.assert_close(logits, ref.logits, **TOL)
    hf_z = float(ref.encoder_z_loss + ref.decoder_z_loss)
    assert ours.last_losses["z_loss"] == pytest.approx(hf_z, rel=1e-5)
    # aux = Σ DeepSpeed l_aux + (z coef / aux coef) · z-loss
    assert float(aux) == pytest.approx(ours.last_losses["l_aux"] + 0.001 / 0.01 * hf_z, rel=1e-5)
    sparse = ours.sparse_ffns()
    assert [m.stack for m in sparse] == ["encoder", "decoder"] and all(isinstance(m, SwitchSparseFFN) for m in sparse)


def test_training_step_gradients_match_hf_at_mask_one():
    hf = tiny_hf(seed=3).train()  # switch-debug has dropout 0, jitter 0: training forward is deterministic
    ours = from_hf(copy.deepcopy(hf), "pad", **NO_DROP).train()
    ids, mask, dec = batch(2)
    labels = torch.randint(3, 97, dec.shape)
    loss_fn = torch.nn.CrossEntropyLoss()
    ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    loss_fn(ref.reshape(-1, 97), labels.reshape(-1)).backward()
    logits, _ = ours(ids, mask, dec)
    loss_fn(logits.reshape(-1, 97), labels.reshape(-1)).backward()
    torch.testing.assert_close(logits, ref, **TOL)
    torch.testing.assert_close(ours.hf.shared.weight.grad, hf.shared.weight.grad, **TOL)
    hf_mlp = hf.encoder.block[1].layer[1].mlp
    block = ours.hf.encoder.block[1].layer[1].mlp.block
    torch.testing.assert_close(block.moe.deepspeed_moe.gate.wg.weight.grad, hf_mlp.router.classifier.weight.grad,
                               **TOL)
    for j in range(block.num_local_experts):
        torch.testing.assert_close(block.experts.expert_grads(j)["fc1.weight"], hf_mlp.experts[f"expert_{j}"].wi.weight.grad,
                                   **TOL)
    # mask all ones: the static FFN takes no part in the function, so it gets an exactly zero gradient
    assert block.static.fc1.weight.grad is None or not block.static.fc1.weight.grad.any()


def _expert_parallel(rank, world, path):
    from transformers import SwitchTransformersForConditionalGeneration

    from pad_moe.distributed import attach_expert_groups

    ours = load_hf_switch(path, "pad", ep_size=world, ep_rank=rank, **NO_DROP).eval()
    attach_expert_groups(ours)
    ids, mask, dec = batch()
    with torch.no_grad():
        logits, _ = ours(ids[rank::world], mask[rank::world], dec[rank::world])
        hf = SwitchTransformersForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
        ref = hf(input_ids=ids[rank::world], attention_mask=mask[rank::world], decoder_input_ids=dec[rank::world])
    return (logits - ref.logits).abs().max().item(), len(ours.sparse_ffns()[0].block.local_experts)


def test_expert_parallel_conversion_on_two_ranks_matches_hf(saved):
    results = run_ranks(_expert_parallel, 2, saved, timeout=180)
    assert [n for _, n in results] == [2, 2]
    assert max(err for err, _ in results) < 1e-5


def test_bad_input_names_the_value(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_switch(str(tmp_path))
    with pytest.raises(ValueError, match="router_jitter_noise=0.05"):
        jitter_policy(0.05)
    assert jitter_policy(0.01) == "Jitter" and jitter_policy(0.0) is None
    with pytest.raises(ValueError, match="ep_size"):
        from_hf(tiny_hf(), "moe", ep_size=3)
