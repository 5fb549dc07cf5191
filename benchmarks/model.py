"""BMFN speed: training and inference samples/s at batch 32 in float32, bf16 autocast and torch.compile,
against float64 (how the official code runs) measured in the same run; ratios and fraction of peak FLOP/s.

    python benchmarks/model.py                     # auto device, all variants
    python benchmarks/model.py --device cpu --iters 2 --skip compile compile-bf16   # minutes of compiling on CPUs
    python benchmarks/model.py --peak-tflops 989   # your device's peak (dense bf16 on GPUs)
"""

from __future__ import annotations

import argparse
import time

import torch

from bmfn_pipeline.model import BMFN, BMFNConfig, fully_supervised_loss

FORWARD_GFLOP_PER_32 = 122.5  # bmfn-reference.md section 11 (FlopCounterMode, supervised model, batch 32)
TRAIN_FLOP_FACTOR = 3  # forward + backward (about twice the forward)
# Dense bf16 tensor-core peaks (vendor data sheets, SXM parts); a CPU's is estimated per core below.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "T4": 65.0}
CPU_PEAK_GFLOPS_PER_CORE = 70.0  # about 2 AVX2 FMA units x 8 float32 lanes x 2 FLOP x ~2.2 GHz (float32: a CPU's
# bf16 instructions, where it has them, pass it, so bf16 rows on CPUs may show more than 100 %)
VARIANTS = ("float64", "float32", "bf16-autocast", "compile", "compile-bf16", "cudagraphs-bf16")


def default_peak_tflops(device: torch.device) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in GPU_PEAK_TFLOPS.items() if key in name), 100.0)
    return CPU_PEAK_GFLOPS_PER_CORE * torch.get_num_threads() / 1000


def make_inputs(batch: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    visual = torch.rand(batch, 10, 7, 7, 512, generator=generator).to(device, dtype)
    audio = torch.rand(batch, 10, 128, generator=generator).to(device, dtype)
    labels = torch.zeros(batch, 10, 29)
    labels[:, :, 28] = 1
    labels[:, 3:7, 28], labels[:, 3:7, 4] = 0, 1
    return visual, audio, labels.to(device, dtype)


def measure(step, iters: int, warmup: int, device: torch.device) -> float:
    """Median seconds of one call after warm-up."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_variant(variant: str, batch: int, device: torch.device, iters: int, warmup: int) -> dict[str, float]:
    dtype = torch.float64 if variant == "float64" else torch.float32
    torch.manual_seed(0)
    model = BMFN(BMFNConfig()).to(device, dtype)
    if variant.startswith("compile"):
        runner = torch.compile(model)
    elif variant.startswith("cudagraphs"):  # compiled and replayed as CUDA graphs: no per-kernel launch cost
        runner = torch.compile(model, mode="reduce-overhead")
    else:
        runner = model
    visual, audio, labels = make_inputs(batch, device, dtype)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled="bf16" in variant)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)

    def train_step():
        model.train()
        with autocast:
            output = runner(visual, audio)
        loss = fully_supervised_loss(type(output)(*(t if t is None else t.to(dtype) for t in output)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()

    @torch.no_grad()
    def infer_step():
        model.eval()
        with autocast:
            runner(visual, audio)

    warmup += 2 if runner is not model else 0  # compiling, and capturing graphs, happen in the first calls
    return {"train": batch / measure(train_step, iters, warmup, device),
            "infer": batch / measure(infer_step, iters, warmup, device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=5, help="timed calls per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--skip", nargs="*", default=[], choices=VARIANTS, help="variants to leave out")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak of the device in TFLOP/s (default: dense bf16 from a table on GPUs, "
                             f"{CPU_PEAK_GFLOPS_PER_CORE:.0f} GFLOP/s per thread on CPUs)")
    args = parser.parse_args()
    if args.iters < 1 or args.batch_size < 1:
        parser.error("--iters and --batch-size: at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores, as any GPU training would
    peak = (args.peak_tflops or default_peak_tflops(device)) * 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; batch {args.batch_size}; peak assumed {peak / 1e12:.2f} TFLOP/s; "
          f"forward {FORWARD_GFLOP_PER_32} GFLOP per 32 clips")
    flop_per_sample = FORWARD_GFLOP_PER_32 * 1e9 / 32
    results = {}
    for variant in VARIANTS:
        if variant in args.skip:
            continue
        if variant == "cudagraphs-bf16" and device.type != "cuda":
            print(f"{variant:>14}: CUDA graphs need a GPU (left out)")
            continue
        results[variant] = bench_variant(variant, args.batch_size, device, args.iters, args.warmup)
        r = results[variant]
        base_name = next(iter(results))  # float64 unless skipped: the first variant measured
        base = results[base_name]
        print(f"{variant:>14}: train {r['train']:8.1f} samples/s ({r['train'] / base['train']:5.2f}x {base_name}, "
              f"{100 * r['train'] * flop_per_sample * TRAIN_FLOP_FACTOR / peak:5.1f} % of peak)   "
              f"infer {r['infer']:8.1f} samples/s ({r['infer'] / base['infer']:5.2f}x {base_name}, "
              f"{100 * r['infer'] * flop_per_sample / peak:5.1f} % of peak)", flush=True)
    if "float32" in results:
        epoch = 3339 / results["float32"]["train"]
        print(f"one AVE training epoch (3339 clips) at float32 speed: {epoch:.1f} s")


if __name__ == "__main__":
    main()
