#!/usr/bin/env python
"""Training-step memory of a ViT under each tuning, and whether ViT-B/16 deep VPT at batch 128
fits a 24 GB GPU.

One training step (forward, GCL-style loss on a cosine head, backward, SGD momentum step) is
taken by each arm on random 224-px images. Memory is counted, not guessed:

- ``activations``: the bytes autograd saves for backward during the forward pass, summed over
  distinct storages by a ``torch.autograd.graph.saved_tensors_hooks`` pack hook (what a GPU
  keeps alive between forward and backward), at two batch sizes; linear in the batch, so the
  fit (bytes per image + constant) extrapolates to ``--target-batch`` (128);
- with activation checkpointing, each block's fp32 input (tokens x D x 4 bytes an image), which
  checkpointing keeps itself, is added to the count;
- ``weights`` (all parameters, fp32), ``grads`` and ``momentum`` (trainable parameters only).

Estimated peak = weights + grads + momentum + activations at the target batch (the backward's
transient buffers and the allocator's slack come on top: on a GPU ``torch.cuda.max_memory_allocated``
replaces the estimate, measured at ``--gpu-batch``). Arms: deep VPT (fp32, bf16 autocast, bf16 +
activation checkpointing), linear probe, LoRA r 8 on qkv, and full fine-tuning for scale.

    python benchmarks/peft_memory.py                    # ViT-B/16, batches 1 and 2 (~2 min CPU)
    python benchmarks/peft_memory.py --quick            # ViT-Ti/16 at 64 px (seconds)
    python benchmarks/peft_memory.py --device cuda      # on a GPU: measured peaks at batch 128

Writes ``benchmarks/results/peft_memory-<device>[-quick].json`` (machine, commit, command).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, format_table, run_header, write_json  # noqa: E402

from longtail.core.config import ModelConfig  # noqa: E402
from longtail.models import build_model  # noqa: E402

GIB = 1024**3
ARMS: Dict[str, Dict[str, Any]] = {
    "deep VPT fp32": {"tuning": "vpt", "amp": None, "ckpt": False},
    "deep VPT bf16": {"tuning": "vpt", "amp": torch.bfloat16, "ckpt": False},
    "deep VPT bf16 + checkpointing": {"tuning": "vpt", "amp": torch.bfloat16, "ckpt": True},
    "linear probe fp32": {"tuning": "linear_probe", "amp": None, "ckpt": False},
    "LoRA r8 qkv bf16": {"tuning": "lora", "amp": torch.bfloat16, "ckpt": False},
    "full fine-tuning bf16": {"tuning": "full", "amp": torch.bfloat16, "ckpt": False},
}
TUNING_PARAMS = {
    "vpt": {"length": 10, "depth": 12, "deep": True},
    "lora": {"rank": 8, "targets": ["qkv"]},
}


def build(arm: Dict[str, Any], backbone: str, size: int, classes: int, device) -> torch.nn.Module:
    params: Dict[str, Any] = {"img_size": size, "grad_checkpointing": arm["ckpt"]}
    if arm["tuning"] == "vpt":
        params["pool"] = "cls_prompt"
    tuning_params = dict(TUNING_PARAMS.get(arm["tuning"], {}))
    if arm["tuning"] == "vpt" and backbone.startswith("vit_tiny"):
        tuning_params["depth"] = 12
    cfg = ModelConfig(
        backbone=backbone,
        backbone_params=params,
        head="cosine",
        tuning=arm["tuning"],
        tuning_params=tuning_params,
    )
    torch.manual_seed(0)
    return build_model(cfg, classes, 3).to(device)


def step(model, opt, x, y, amp) -> Dict[str, int]:
    """One training step; returns the bytes saved for backward (distinct storages)."""
    seen: Dict[Any, int] = {}

    def pack(t: torch.Tensor):
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    model.train()
    opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            logits = model(x).logits
        loss = F.cross_entropy(25.0 * logits.float(), y)
    loss.backward()
    opt.step()
    return {"saved": sum(seen.values())}


def measure(arm, backbone, size, classes, batches: List[int], device) -> Dict[str, Any]:
    model = build(arm, backbone, size, classes, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.01, momentum=0.9)
    total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in trainable)
    saved, seconds, peaks = {}, {}, {}
    for j, b in enumerate(batches):
        x = torch.randn(b, 3, size, size, device=device)
        y = torch.randint(0, classes, (b,), device=device)
        if j == 0 or device.type == "cuda":
            step(model, opt, x, y, arm["amp"])  # warm-up (allocates momentum buffers)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        saved[b] = step(model, opt, x, y, arm["amp"])["saved"]
        if device.type == "cuda":
            torch.cuda.synchronize()
            peaks[b] = torch.cuda.max_memory_allocated()
        seconds[b] = time.perf_counter() - t
    b0, b1 = batches[0], batches[-1]
    per_image = (saved[b1] - saved[b0]) / max(b1 - b0, 1)
    vit = model.backbone
    if arm["ckpt"]:  # the blocks' fp32 inputs, which checkpointing keeps outside autograd's hooks
        tokens = 1 + vit.num_prompts + (size // vit.patch_size) ** 2
        per_image += len(vit.blocks) * tokens * vit.embed_dim * 4
    const = saved[b0] - per_image * b0
    return {
        "params_total": total,
        "params_trainable": n_train,
        "saved_bytes": saved,
        "activation_bytes_per_image": per_image,
        "activation_bytes_const": const,
        "step_seconds": seconds,
        "images_per_s": {b: b / s for b, s in seconds.items()},
        "cuda_peak_bytes": peaks or None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="ViT-Ti/16 at 64 px")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", default=None, help="comma-separated (default 1,2; cuda 32,128)")
    p.add_argument("--target-batch", type=int, default=128)
    p.add_argument("--budget-gib", type=float, default=24.0)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--arms", default=None, help="comma-separated arm names (default: all)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    backbone = "vit_tiny_patch16_224" if args.quick else "vit_base_patch16_224"
    size = 64 if args.quick else 224
    default = "32,128" if device.type == "cuda" else "1,2"
    batches = [int(b) for b in (args.batches or default).split(",")]
    names = args.arms.split(",") if args.arms else list(ARMS)
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    results, rows = {}, []
    for name in names:
        r = measure(ARMS[name], backbone, size, args.classes, batches, device)
        state = 4 * r["params_total"] + 2 * 4 * r["params_trainable"]  # weights, grads, momentum
        act = r["activation_bytes_const"] + r["activation_bytes_per_image"] * args.target_batch
        r["estimated_peak_bytes_at_target"] = state + act
        r["fits_budget"] = (state + act) <= args.budget_gib * GIB
        results[name] = r
        measured = (r["cuda_peak_bytes"] or {}).get(args.target_batch)
        rows.append(
            [
                name,
                f"{r['params_trainable']:,}",
                f"{100.0 * r['params_trainable'] / r['params_total']:.2f}%",
                f"{r['activation_bytes_per_image'] / 2**20:.1f}",
                f"{(state + act) / GIB:.2f}",
                "-" if measured is None else f"{measured / GIB:.2f}",
                "yes" if r["fits_budget"] else "NO",
                f"{r['images_per_s'][batches[-1]]:.1f}",
            ]
        )
    headers = [
        "arm",
        "trainable",
        "of total",
        "MiB saved / image",
        f"est. GiB at batch {args.target_batch}",
        "measured GiB",
        f"fits {args.budget_gib:g} GiB",
        f"img/s (batch {batches[-1]})",
    ]
    print(f"{backbone} at {size} px, {device}, activation fit from batches {batches}")
    table = format_table(headers, rows)
    print(table)
    suffix = device.type + ("-quick" if args.quick else "")
    out = Path(args.out) if args.out else RESULTS_DIR / f"peft_memory-{suffix}.json"
    write_json(
        out,
        {
            **run_header("peft_memory"),
            "backbone": backbone,
            "image_size": size,
            "batches": batches,
            "target_batch": args.target_batch,
            "budget_gib": args.budget_gib,
            "table": table,
            "results": results,
        },
    )
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
