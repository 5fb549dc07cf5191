"""GPU time of one graphed BMFN training step (batch 32, bf16 autocast, as `bmfn train --precision bfloat16` runs
it) for the kernel variants, against the step before fused Adam, measured in the same run; then a profile of the
eager step by kernel kind.

    python benchmarks/train_step.py                      # all variants (whole-model compile takes ~1 min)
    python benchmarks/train_step.py foreach-adam fused-adam profile

Variants: foreach-adam (the baseline: capturable foreach Adam), fused-adam (the default on CUDA), cells
(+ `--compile`: the per-cell attentions compiled), model (+ the whole network compiled). Inputs are random.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bmfn_pipeline.graphs import GraphedStep
from bmfn_pipeline.model import BMFN, BMFNConfig, BMFNOutput, compile_cell_attention, fully_supervised_loss

VARIANTS = ("foreach-adam", "fused-adam", "cells", "model", "profile")
KINDS = (("gemm", ("gemm", "cutlass", "sm90", "nvjet", "xmma")), ("reduce", ("reduce",)),
         ("element-wise", ("elementwise", "vectorized")), ("optimizer", ("foreach", "adam")))


def make_step(variant: str, batch: dict[str, torch.Tensor]):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BMFN(BMFNConfig()).cuda()
    if variant == "cells":
        compile_cell_attention(model)
    elif variant == "model":
        model.compile()
    parameters = list(model.parameters())
    optimizer = torch.optim.Adam(parameters, lr=torch.tensor(5e-4, device="cuda"), capturable=True,
                                 fused=variant != "foreach-adam")

    def step(inputs: dict[str, torch.Tensor]) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            output = model(inputs["visual"], inputs["audio"])
        loss = fully_supervised_loss(BMFNOutput(*(None if t is None else t.float() for t in output)), inputs["labels"])
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 0.1)
        optimizer.step()

    return step


def kernel_profile(batch: dict[str, torch.Tensor]) -> str:
    step = make_step("foreach-adam", batch)
    for _ in range(3):
        step(batch)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(batch)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    groups: dict[str, list[float]] = {}
    for event in kernels:
        kind = next((k for k, words in KINDS if any(w in event.name.lower() for w in words)), "other")
        groups.setdefault(kind, []).append(event.device_time / 1000)
    total = sum(sum(times) for times in groups.values())
    parts = ", ".join(f"{kind} {len(times)} ({sum(times):.2f} ms)" for kind, times in groups.items())
    return f"eager step: {len(kernels)} kernels, {total:.2f} ms of GPU time: {parts}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=50, help="timed replays per variant")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/train_step.py needs a CUDA device (CUDA graphs)")
    generator = torch.Generator(device="cuda").manual_seed(0)
    labels = torch.zeros(32, 10, 29, device="cuda")
    labels[..., 3] = 1
    batch = {"visual": torch.rand(32, 10, 7, 7, 512, device="cuda", generator=generator, dtype=torch.float16),
             "audio": torch.rand(32, 10, 128, device="cuda", generator=generator), "labels": labels}
    print(f"device: {torch.cuda.get_device_name()}; batch 32, bf16 autocast, CUDA graphs")
    base = None
    for variant in args.variants:
        if variant == "profile":
            print(kernel_profile(batch), flush=True)
            continue
        began = time.perf_counter()
        run = GraphedStep(make_step(variant, batch), enabled=True, log=print)
        for _ in range(5):  # warm-up calls, compilation and the capture
            run(batch)
        torch.cuda.synchronize()
        ready = time.perf_counter() - began
        began = time.perf_counter()
        for _ in range(args.steps):
            run(batch)
        torch.cuda.synchronize()
        ms = 1000 * (time.perf_counter() - began) / args.steps
        base = base or ms
        print(f"{variant:>13}: {ms:6.2f} ms per step ({base / ms:4.2f}x), set-up incl. compilation {ready:4.0f} s",
              flush=True)


if __name__ == "__main__":
    main()
