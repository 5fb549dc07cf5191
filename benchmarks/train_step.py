"""GPU time of one graphed BMFN training step (batch 32, bf16 autocast, as `bmfn train --precision bfloat16` runs
it) for the kernel variants, against the step before fused Adam, measured in the same run; then a profile of the
eager step by kernel kind; and, on any device, the operations one step dispatches.

    python benchmarks/train_step.py                      # all variants (whole-model compile takes ~1 min)
    python benchmarks/train_step.py foreach-adam fused-adam profile
    python benchmarks/train_step.py set-to-none model --profile-replays   # the kernels of the graphed steps
    git show f30bbab:bmfn_pipeline/model.py > per_branch.py   # bmfn's model before grouping
    python benchmarks/train_step.py fused-adam per-branch ops --per-branch-model per_branch.py
    python benchmarks/train_step.py ops --per-branch-model per_branch.py    # on a CPU too
    python benchmarks/train_step.py set-to-none model --inductor combo_kernels=True  # an inductor setting's effect
    git show 1fd3c06:bmfn_pipeline/model.py > before.py   # the model before its kernel-count changes
    python benchmarks/train_step.py model-before model --before-model before.py --profile-replays
    python benchmarks/train_step.py before set-to-none --before-model before.py   # the same, uncompiled

Variants: foreach-adam (the baseline: capturable foreach Adam), fused-adam (fused Adam, gradients added into
zeroed ones), per-branch (fused Adam, with the model of `--per-branch-model`: one module per parallel block),
set-to-none (fused Adam, gradients set to None before each step, so backward writes them instead of adding into
zeroed ones: the step `bmfn train --precision bfloat16` runs), cells and model (set-to-none with the per-cell
attentions or the whole network compiled: model is the step of `bmfn train --precision bfloat16 --compile`, with
its inductor settings, train.COMPILE_OPTIONS, which take precedence over --inductor), before and model-before
(set-to-none and model with the model.py of `--before-model`).
`ops` counts the aten operations of one eager step (forward, loss, backward, clipping, Adam), each a kernel launch
or more on a GPU, for the current model with fused-adam and set-to-none, and for the per-branch one, and checks
that set-to-none trains as fused-adam does. Inputs are random.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys
import time
from collections import Counter
from types import ModuleType

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from bmfn_pipeline import model as grouped_model
from bmfn_pipeline.graphs import GraphedStep
from bmfn_pipeline.model import BMFNOutput, fully_supervised_loss
from bmfn_pipeline.train import COMPILE_OPTIONS

VARIANTS = ("foreach-adam", "fused-adam", "cells", "model-before", "model", "per-branch", "before", "set-to-none",
            "profile", "ops")
VIEWS = {"view", "_unsafe_view", "reshape", "_reshape_alias", "transpose", "t", "unsqueeze", "squeeze", "expand",
         "permute", "select", "slice", "split", "split_with_sizes", "chunk", "unflatten", "flatten", "as_strided",
         "detach", "alias", "unbind", "empty", "empty_like", "empty_strided"}  # no kernel: not counted
KINDS = (("gemm", ("gemm", "cutlass", "sm90", "nvjet", "xmma")), ("compiled", ("triton",)), ("reduce", ("reduce",)),
         ("element-wise", ("elementwise", "vectorized")), ("optimizer", ("foreach", "adam")))


def make_step(variant: str, device: str = "cuda", models: ModuleType = grouped_model):
    """One training step's function for `variant`, with the BMFN of `models` (a model.py module)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.BMFN(models.BMFNConfig()).to(device)
    if variant == "cells":  # the two attentions over the 7x7 cells, whose tensors are [B*T*49, 2560]
        model.visual_attention.compile()
        model.fusion_attention.compile()
    elif variant in ("model", "model-before"):
        model.compile(options=COMPILE_OPTIONS)
    parameters = list(model.parameters())
    capturable = device == "cuda"  # for CUDA graphs; fused Adam runs on a CPU too (for `ops`)
    optimizer = torch.optim.Adam(parameters, lr=torch.tensor(5e-4, device=device) if capturable else 5e-4,
                                 capturable=capturable, fused=variant != "foreach-adam")

    def step(inputs: dict[str, torch.Tensor]) -> None:
        with torch.autocast(device, dtype=torch.bfloat16, cache_enabled=False):
            output = model(inputs["visual"], inputs["audio"])
        loss = fully_supervised_loss(BMFNOutput(*(None if t is None else t.float() for t in output)), inputs["labels"])
        optimizer.zero_grad(set_to_none=variant in ("set-to-none", "cells", "model", "model-before", "before"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 0.1)
        optimizer.step()

    step.model = model
    return step


def kernel_profile(batch: dict[str, torch.Tensor]) -> str:
    step = make_step("foreach-adam")
    for _ in range(3):
        step(batch)
    return "eager step: " + _profiled(lambda: step(batch), 1)


def _profiled(run, steps: int, top: int = 0) -> str:
    """GPU kernels of `steps` calls of run() (graph replays included), per step: their number and time by kind,
    and the `top` kernels that take the most time."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    groups: dict[str, list[float]] = {}
    names: dict[str, float] = {}
    for event in kernels:
        kind = next((k for k, words in KINDS if any(w in event.name.lower() for w in words)), "other")
        groups.setdefault(kind, []).append(event.device_time / 1000 / steps)
        names[event.name] = names.get(event.name, 0.0) + event.device_time / 1000 / steps
    total = sum(sum(times) for times in groups.values())
    parts = ", ".join(f"{kind} {len(times) // steps} ({sum(times):.2f} ms)" for kind, times in groups.items())
    lines = [f"{len(kernels) // steps} kernels, {total:.2f} ms of GPU time: {parts}"]
    lines += [f"    {ms:6.3f} ms  {name[:110]}" for name, ms in sorted(names.items(), key=lambda kv: -kv[1])[:top]]
    if top:  # the kernels that are many: a step of small kernels is bound by their number
        counts = Counter(event.name for event in kernels)
        lines += [f"    {n // steps:4d} x  {name[:110]}" for name, n in counts.most_common(top)]
    return "\n".join(lines)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ not in VIEWS
        return func(*args, **(kwargs or {}))


def count_ops(batch: dict[str, torch.Tensor], per_branch: ModuleType | None) -> str:
    """Operations of one eager step (the second: Adam's state exists), per model; then set-to-none's parameters
    after those steps and one more, against fused-adam's."""
    device = batch["visual"].device.type
    counts, steps = {}, {}
    for name, variant, models in (("grouped", "fused-adam", grouped_model), ("per-branch", "fused-adam", per_branch),
                                  ("set-to-none", "set-to-none", grouped_model)):
        if models is None:
            continue
        steps[name] = step = make_step(variant, device, models)
        step(batch)
        with _CountOps() as counter:
            step(batch)
        step(batch)
        counts[name] = counter.count
    ratio = f" ({counts['per-branch'] / counts['grouped']:.2f}x fewer)" if "per-branch" in counts else ""
    differences = [(a - b).abs().max().item() for a, b in zip(steps["grouped"].model.parameters(),
                                                               steps["set-to-none"].model.parameters())]
    return ("operations per eager step: " + ", ".join(f"{n} {c}" for n, c in counts.items()) + ratio
            + f"\nset-to-none after 3 steps: parameters differ from fused-adam's by at most {max(differences):.3g}")


def load_models(path: str | None, name: str, commit: str) -> ModuleType | None:
    """The model.py at `path` as a module named `name` (an earlier bmfn's model, for a baseline)."""
    if path is None:
        return None
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file (write it with: git show {commit}:bmfn_pipeline/model.py > {path})")
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def set_inductor_options(options: list[str]) -> None:
    """Apply KEY=VALUE settings of torch._inductor.config (dotted keys for its sub-configs, such as
    triton.cudagraphs), so that one run compares a compiled step with and without them against the same baseline."""
    import torch._inductor.config as inductor_config

    for option in options:
        key, sep, text = option.partition("=")
        *parents, name = key.split(".")
        config = inductor_config
        for parent in parents:
            config = getattr(config, parent, None)
        if not sep or config is None or not hasattr(config, name):
            raise SystemExit(f"--inductor {option}: expected KEY=VALUE with KEY a torch._inductor.config setting")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a plain string, such as a mode name
        setattr(config, name, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=50, help="timed replays per variant")
    parser.add_argument("--per-branch-model", help="model.py of bmfn before grouping (variant per-branch, ops)")
    parser.add_argument("--before-model",
                        help="another model.py, such as bmfn's at 1fd3c06 (variants before and model-before)")
    parser.add_argument("--profile-replays", action="store_true",
                        help="also profile each timed variant's graph replays: kernels by kind, the 12 slowest")
    parser.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                        help="a torch._inductor.config setting for the compiled variants (repeatable), "
                             "e.g. combo_kernels=True")
    args = parser.parse_args()
    set_inductor_options(args.inductor)
    per_branch = load_models(args.per_branch_model, "per_branch_model", "f30bbab")
    before = load_models(args.before_model, "before_model", "1fd3c06")
    others = {"per-branch": per_branch, "before": before, "model-before": before}
    variants = [v for v in args.variants if v not in others or others[v] is not None]
    cuda = torch.cuda.is_available()
    if not cuda and variants != ["ops"]:
        raise SystemExit("benchmarks/train_step.py needs a CUDA device (CUDA graphs), except for the variant ops")
    device = "cuda" if cuda else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)
    labels = torch.zeros(32, 10, 29, device=device)
    labels[..., 3] = 1
    batch = {"visual": torch.rand(32, 10, 7, 7, 512, device=device, generator=generator, dtype=torch.float16),
             "audio": torch.rand(32, 10, 128, device=device, generator=generator), "labels": labels}
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; batch 32, bf16 autocast"
          + (", CUDA graphs" if cuda else "") + "".join(f", inductor {option}" for option in args.inductor))
    base = None
    for variant in variants:
        if variant == "profile":
            print(kernel_profile(batch), flush=True)
            continue
        if variant == "ops":
            print(count_ops(batch, per_branch), flush=True)
            continue
        began = time.perf_counter()
        step = make_step(variant, models=others.get(variant) or grouped_model)
        run = GraphedStep(step, enabled=True, log=print)
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
        if args.profile_replays:
            print("  replayed step: " + _profiled(lambda: run(batch), 3, top=12), flush=True)


if __name__ == "__main__":
    main()
