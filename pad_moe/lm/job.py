"""The causal language-model job of ``padmoe train`` (``model.arch=causal_lm``), registered with the job registry.

The model is a Hugging Face causal LM: a local folder (``model.path``) or one built from scratch (``model.family``
mixtral | llama with the sizes of the ``model`` section, seeded by ``train.seed``). What ``moe.mode`` does with it:

- an HF MoE model (a registered family, ``pad_moe.hfmoe.families``; docs/lm.md): ``moe`` trains it as it is (its
  router's load-balancing loss as the aux loss; a family without one, e.g. DeepSeek-V3's bias-balanced router whose
  ``e_score_correction_bias`` stays as it is, needs ``moe.aux_loss_coef=0``); ``pad`` imports its experts as PAD
  experts (``pad_moe.hfmoe``: static weight from the experts, masks one, φ) and IMP partitions them; ``static`` is
  refused (merging experts is ``padmoe compress --method merge``).
- a dense model (Llama, Mistral, Qwen2/3, GPT-2): upcycled as for encoders (``static`` keeps one FFN, ``moe`` / ``pad``
  make experts from it; dropless, so the logits at init are the original's).

Data: a text corpus (``pad_moe.lm.corpus``), tokenized with the model folder's tokenizer (``data.tokenizer=model``)
or a byte-level BPE trained on the training documents (``bpe``, ``model.vocab_size`` ids), packed into
``data.max_length``-token blocks. Loss: next-token cross-entropy + ``moe.aux_loss_coef`` × aux. Evaluation: held-out
perplexity (the exponential of the mean token loss), the mean loss and next-token accuracy. At the end rank 0 writes
the trained model as a Hugging Face folder (``RUN_DIR/hf_model``, native HF MoE models) or a compact PAD export
(``RUN_DIR/deployed``, PAD-imported ones; ``pad_moe.load_deployed``), tokenizer included; upcycled dense models
stay in the run's checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pad_moe.config import MoEConfig, RunConfig
from pad_moe.lm.corpus import PackedBlocks, load_corpus, split_documents
from pad_moe.lm.tokenizer import encode_all, model_tokenizer, train_bpe
from pad_moe.train.job import Job
from pad_moe.train.registry import register_job

FAMILIES = ("mixtral", "llama")


@dataclass
class CausalLMJob(Job):
    """Labels are next-token ids (B, L); evaluation rows are per-sequence (summed loss, tokens, correct tokens)."""

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))

    def eval_rows(self, logits: torch.Tensor, batch) -> torch.Tensor:
        return token_rows(logits, batch["labels"])


def token_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sequence: (summed next-token NLL, token count, correct next tokens), for ``lm_metrics``."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")  # (B, L)
    correct = (logits.argmax(-1) == labels).float()
    return torch.stack([nll.sum(1), torch.full_like(nll[:, 0], labels.shape[1]), correct.sum(1)], dim=1)


def lm_metrics(rows: torch.Tensor, _labels: torch.Tensor) -> dict[str, float]:
    loss = float(rows[:, 0].double().sum() / rows[:, 1].double().sum())
    return {"perplexity": math.exp(min(loss, 700.0)), "loss": loss,
            "token_accuracy": float(rows[:, 2].double().sum() / rows[:, 1].double().sum())}


def from_scratch_config(cfg: RunConfig, vocab_size: int):
    """The HF config of ``model.family`` with the run's sizes (no tied embeddings, eager kernels)."""
    m, moe = cfg.model, cfg.moe
    common = dict(vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_size,
                  num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_heads,
                  max_position_embeddings=m.max_seq_len, tie_word_embeddings=False, attention_dropout=m.dropout,
                  bos_token_id=None, eos_token_id=1, pad_token_id=0)
    if m.family == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(num_local_experts=moe.num_experts, num_experts_per_tok=moe.k,
                             router_aux_loss_coef=moe.aux_loss_coef, output_router_logits=True, **common)
    from transformers import LlamaConfig

    return LlamaConfig(**common)


def build_model(cfg: RunConfig, vocab_size: int, ep_rank: int):
    """(model, is_hf_moe): the causal LM of the run, converted per ``moe.mode``."""
    from transformers import AutoModelForCausalLM

    from pad_moe.hfmoe.experts import import_hf_moe
    from pad_moe.hfmoe.families import family_spec, lookup, refusal
    from pad_moe.models.upcycle import upcycle_from_config

    torch.manual_seed(cfg.train.seed)  # from scratch: the same initial model on every rank
    if cfg.model.path is not None:
        from transformers import AutoConfig

        from pad_moe.hfmoe.weights import check_weight_files

        model_type = AutoConfig.from_pretrained(cfg.model.path).model_type
        if refusal(model_type) is not None:  # a family pad_moe cannot import: not upcycled as if it were dense
            raise ValueError(f"model.path={cfg.model.path}: model_type={model_type!r}: {refusal(model_type)}")
        check_weight_files(cfg.model.path)  # a truncated or pickled-objects weights file: one line naming it
        model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
        if model.get_input_embeddings().weight.shape[0] < vocab_size:
            raise ValueError(f"the tokenizer has {vocab_size} ids but {cfg.model.path} embeds only "
                             f"{model.get_input_embeddings().weight.shape[0]}; use the model's own tokenizer")
    else:
        model = AutoModelForCausalLM.from_config(from_scratch_config(cfg, vocab_size), dtype=torch.float32)
    _check_causal(model, cfg.model.path)
    family = model.config.model_type
    if lookup(family) is not None:
        family_spec(model)  # a configuration of the family pad_moe does not support: one line
        if cfg.moe.mode == "static":
            raise ValueError(f"moe.mode=static on the {family} MoE model: merging its experts is padmoe compress "
                             "--method merge; train it with moe.mode=moe or pad")
        if cfg.moe.ep_size != 1:
            raise ValueError(f"moe.ep_size={cfg.moe.ep_size}: padmoe train keeps an HF MoE model's experts on every "
                             "rank (data parallel); expert parallelism for these families is DeepSpeed AutoEP "
                             "(pad_moe.moe.autoep). Set moe.ep_size=1")
        _check_hf_moe_options(cfg, model, family)
        model.config.output_router_logits = True
        if cfg.moe.mode == "pad":
            import_hf_moe(model, granularity=cfg.moe.granularity, scale_mode=cfg.moe.scale_mode)
        return model, True
    upcycle_from_config(model, cfg.moe, ep_rank=ep_rank, seed=cfg.train.seed)
    return model, False


@torch.no_grad()
def _check_causal(model, where) -> None:
    """Refuse a model whose earlier positions see later tokens (a BERT folder loads as BertLMHeadModel and would
    train on next-token prediction while attending to its labels): change the last token, the logits before it must
    stay the same."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, 6), generator=torch.Generator().manual_seed(0))
    edited = ids.clone()
    edited[0, -1] = (ids[0, -1] + 1) % vocab
    was_training = model.training
    model.eval()
    try:
        a, b = (model(input_ids=x).logits[0, :-1] for x in (ids, edited))
    finally:
        model.train(was_training)
    if not torch.allclose(a, b, atol=1e-5, rtol=1e-4):
        raise ValueError(f"model.path={where}: {type(model).__name__} is not causal (its earlier positions see later "
                         "tokens), so next-token training would see its labels; model.arch=causal_lm needs a decoder "
                         "(Llama, Mistral, Qwen, Mixtral, GPT-2, ...); train encoders with model.arch=hf")


HF_MOE_FOLLOWS = ("mode", "num_experts", "k", "ep_size", "aux_loss_coef", "granularity", "scale_mode")
"""The moe options an HF MoE model follows; every other one must keep its default (dropless is its dispatch)."""


def _check_hf_moe_options(cfg: RunConfig, model, family: str) -> None:
    """The moe options an HF MoE model does not follow are refused, not ignored: its experts, top-k and dropless
    routing are its own, its PAD experts share one mask per layer and are compacted at export."""
    from pad_moe.hfmoe.experts import block_router, moe_blocks
    from pad_moe.hfmoe.families import family_spec

    moe = cfg.moe
    blocks = moe_blocks(model)
    experts = block_router(model, blocks[0][1]).weight.shape[0] if blocks else 0
    top_k = getattr(model.config, "num_experts_per_tok", None)
    where = cfg.model.path or f"model.family={family}"
    if moe.num_experts != experts or moe.k != top_k:
        raise ValueError(f"moe.num_experts={moe.num_experts}, moe.k={moe.k} but {where} has {experts} experts, top "
                         f"{top_k}; set moe.num_experts={experts} moe.k={top_k} (an HF MoE keeps its own)")
    if not family_spec(model).aux_loss and moe.aux_loss_coef != 0:
        raise ValueError(f"moe.aux_loss_coef={moe.aux_loss_coef}: the {family} model has no load-balancing loss to "
                         "weigh (its router balances without one, or transformers implements none); set "
                         "moe.aux_loss_coef=0")
    defaults = MoEConfig()
    implied = {"drop_tokens": (None, False), "dispatch": (None, "dropless")}
    for f in dataclasses.fields(MoEConfig):
        value = getattr(moe, f.name)
        allowed = implied.get(f.name, (getattr(defaults, f.name),))
        if f.name not in HF_MOE_FOLLOWS and value not in allowed:
            raise ValueError(f"moe.{f.name}={value} does not apply to the {family} MoE model (its own experts, "
                             "activation and router, every layer sparse, dropless, one mask per layer, compacted at "
                             f"export to RUN_DIR/deployed); drop it (default {allowed[-1]})")


@torch.no_grad()
def dense_model(module):
    """The plain Hugging Face model of a static-upcycled dense LM: each wrapped FFN (``mlp.block.ffn.*``) back in
    its own place (``mlp.*``), loaded strictly into a fresh model of the same config (a key left over is an error)."""
    from transformers import AutoModelForCausalLM

    state = {name.replace(".block.ffn.", "."): tensor for name, tensor in module.state_dict().items()}
    plain = AutoModelForCausalLM.from_config(module.config, dtype=torch.float32)
    plain.load_state_dict(state, strict=True)
    plain.generation_config = module.generation_config
    return plain


@register_job("causal_lm")
def build_causal_lm_job(cfg: RunConfig, ep_rank: int) -> CausalLMJob:
    from pad_moe.models.upcycle import aux_loss

    d = cfg.data
    train_docs, eval_docs = split_documents(load_corpus(d.task, d.text_files, d.cache_dir))
    if not eval_docs:
        raise ValueError(f"data.task={d.task}: none of its {len(train_docs)} documents falls in the held-out split "
                         "(about 2 % by hash); pass more documents")
    if d.resolved_tokenizer(cfg.model) == "model":
        tokenizer = model_tokenizer(cfg.model.path)
    else:
        tokenizer = train_bpe(train_docs, cfg.model.vocab_size)
    eos = tokenizer.eos_token_id
    train_set = PackedBlocks(encode_all(tokenizer, train_docs), d.max_length, eos, d.max_train)
    eval_set = PackedBlocks(encode_all(tokenizer, eval_docs), d.max_length, eos, d.max_eval)
    model, is_hf_moe = build_model(cfg, len(tokenizer), ep_rank)

    def forward(m, batch):
        if is_hf_moe:
            out = m(input_ids=batch["input_ids"], output_router_logits=True)
            aux = out.aux_loss if out.aux_loss is not None else torch.zeros(())
            return out.logits, aux
        out = m(input_ids=batch["input_ids"])
        return out.logits, aux_loss(m)

    def save_final(module, run_dir: str) -> str:
        from pad_moe.hfmoe.deployed import save_compressed
        from pad_moe.hfmoe.experts import PadHFExperts

        if any(isinstance(x, PadHFExperts) for x in module.modules()):
            out = os.path.join(run_dir, "deployed")
            os.makedirs(out, exist_ok=True)
            save_compressed(module, tokenizer, out, {"method": "train", "source": {"run": cfg.name}})
        else:
            out = os.path.join(run_dir, "hf_model")
            module.save_pretrained(out)
            tokenizer.save_pretrained(out)
        return out

    def save_dense(module, run_dir: str) -> str:
        out = os.path.join(run_dir, "hf_model")
        dense_model(module).save_pretrained(out)
        tokenizer.save_pretrained(out)
        return out

    extras = {"tokenizer": tokenizer}
    if is_hf_moe:  # an upcycled dense model holds pad_moe blocks: its export is not an HF folder
        extras["save_final"] = save_final
    elif cfg.moe.mode == "static":  # ... except in static mode, where the block is the model's own FFN, wrapped
        extras["save_final"] = save_dense
    return CausalLMJob(model=model, train_set=train_set, eval_sets={"heldout": eval_set},
                       collate=PackedBlocks.collate, forward=forward, num_labels=len(tokenizer),
                       metrics=lm_metrics, main_metric="perplexity", extras=extras, integer_predictions=False)
