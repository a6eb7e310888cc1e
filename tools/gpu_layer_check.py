"""The CUDA-selected paths of the layer tests, in bf16 and fp16 (run by tools/gpu_check.sh; needs a GPU).

For plain and PAD experts (mlp and glu, element and neuron, compacted): dropless dispatch equals DeepSpeed's capacity
dispatch without drops (tolerance for the dtype), the grouped GEMM is what runs, gradients are finite and exactly zero
where a PAD mask is static. One line per check; exit status 1 when any fails, 2 without a GPU.
"""

from __future__ import annotations

import copy
import os
import sys

import torch

os.environ.setdefault("DS_ACCELERATOR", "cuda")

from pad_moe.moe.grouped import backend  # noqa: E402
from pad_moe.moe.layer import MoEFFN, PadMoE  # noqa: E402
from pad_moe.testing.layers import perturb_experts_, random_masks  # noqa: E402

H, F, E = 64, 128, 8
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
CASES = [(MoEFFN, {}), (PadMoE, {}), (PadMoE, {"granularity": "neuron"}), (PadMoE, {"mask_sharing": "expert"}),
         (PadMoE, {"expert_type": "glu", "activation": "silu", "bias": False}),
         (MoEFFN, {"expert_type": "glu", "activation": "silu", "bias": False})]


def check(cls, kwargs, dtype) -> list[str]:
    torch.manual_seed(0)
    ref = cls(H, F, num_experts=E, k=2, drop_tokens=False, min_capacity=0, second_expert_sampling=False, **kwargs)
    if isinstance(ref, PadMoE):
        ref.set_masks(random_masks(ref))
    perturb_experts_(ref)
    dropless = copy.deepcopy(ref)
    dropless.dispatch = "dropless"
    ref, dropless = ref.cuda().to(dtype), dropless.cuda().to(dtype)
    x = torch.randn(4, 64, H, device="cuda", dtype=dtype)
    out_ref, out = ref(x)[0], dropless(x)[0]
    problems = []
    err = float((out.float() - out_ref.float()).abs().max() / out_ref.float().abs().max())
    if err > TOLERANCE[dtype]:
        problems.append(f"dropless vs capacity relative error {err:.2e} > {TOLERANCE[dtype]}")
    first = dropless.experts.linear_names[0]
    if backend(x.reshape(-1, H), dropless.experts.tensors()[f"{first}.weight"]) != "grouped_mm":
        problems.append("the grouped GEMM is not selected")
    out.float().square().mean().backward()
    grads = [p.grad for p in dropless.parameters() if p.grad is not None]
    if not all(torch.isfinite(g).all() for g in grads):
        problems.append("non-finite gradient")
    if isinstance(dropless, PadMoE) and not dropless.compacted:
        masks = dropless.weight_masks()
        for i in range(dropless.num_local_experts):
            for name, grad in dropless.experts.expert_grads(i).items():
                if (grad[~masks[name].expand_as(grad)] != 0).any():
                    problems.append(f"non-zero gradient where {name} is static")
    return problems


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_layer_check: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 2
    failed = 0
    for dtype in (torch.bfloat16, torch.float16):
        for cls, kwargs in CASES:
            problems = check(cls, kwargs, dtype)
            failed += bool(problems)
            print(f"[{'FAIL' if problems else 'ok  '}] {cls.__name__} {kwargs} {dtype}: {'; '.join(problems) or 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
