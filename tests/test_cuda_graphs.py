"""Training with whole-step CUDA graphs gives the same run as eager training (runs only where CUDA is)."""

from __future__ import annotations

import json

import pytest
import torch
from test_data import SMALL_MODEL, make_ave_dir

from bmfn_pipeline.data import ClipArrays
from bmfn_pipeline.evaluate import predict_labels, predict_rows
from bmfn_pipeline.graphs import WARMUP_CALLS, GraphedStep
from bmfn_pipeline.model import BMFN, BMFNConfig
from bmfn_pipeline.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

# 16 training clips in batches of 6: two full batches and a batch of 4 per epoch, so both shapes are captured.
CONFIG = {"mode": "fully", "batch_size": 6, "lr": 2e-3, "clip": 1.0, "milestones": (3,), "progress": False,
          "device": "cuda", "checkpoint_every": 0}


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_graphed_training_matches_eager_training(tmp_path, monkeypatch, precision):
    """Gradients are set to None before each step: the captured ones are written again by every replay."""
    directory = make_ave_dir(tmp_path / "ave", n_clips=24)
    model = {**SMALL_MODEL, "dropout": 0.0, "visual_dropout": 0.0}  # no random masks: eager and graph must agree
    replays, logged = [], []
    original = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: (replays.append(1), original(self))[1])
    epochs = WARMUP_CALLS + 3
    runs = {}
    for graphs in (False, True):
        out = tmp_path / f"graphs-{graphs}"
        train(TrainConfig(ave_dir=str(directory), out=str(out), epochs=epochs, model=model, cuda_graphs=graphs,
                          precision=precision, **CONFIG), log=logged.append)
        runs[graphs] = _metrics(out)
    assert not [line for line in logged if line.startswith("warning")]  # captured, no fallback to eager
    assert len(replays) >= 2 * 3 + 3  # both shapes captured, then replayed for the remaining epochs
    eager_lines, graph_lines = runs[False], runs[True]
    # The same losses epoch after epoch, replayed epochs included (a stale or skipped replay would drift at once).
    # Weights are not compared: Adam turns last-bit differences of near-zero gradients into steps of size lr.
    for a, b in zip(eager_lines, graph_lines, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3) and a["lr"] == b["lr"]
    assert [line["lr"] for line in graph_lines][:4] == [2e-3, 2e-3, 2e-3, 1e-3]  # the schedule reaches the graph
    assert graph_lines[-1]["loss"] < graph_lines[0]["loss"]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-kernels", "compiled"])
def test_graphed_training_with_dropout_learns_and_resumes_on_cpu(tmp_path, compiled):
    directory = make_ave_dir(tmp_path / "ave", n_clips=60)
    logged = []
    result = train(TrainConfig(ave_dir=str(directory), out=str(tmp_path / "run"), epochs=8, model=SMALL_MODEL,
                               compile=compiled, **CONFIG), log=logged.append)
    assert not [line for line in logged if line.startswith("warning")]  # captured (with compiled kernels), no fallback
    assert result.runs[0].test_acc >= 90
    # last.pt (capturable optimiser, learning rate as a CUDA tensor) continues on the CPU (not compiled there: a
    # resumed run keeps --compile, and inductor on the CPU would take minutes).
    resumed = train(TrainConfig(resume=str(tmp_path / "run"), epochs=9, device="cpu", compile=False, progress=False),
                    log=lambda *_: None)
    assert resumed.runs[0].epochs == 9 and _metrics(tmp_path / "run")[-1]["epoch"] == 9


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_graphed_evaluation_predicts_what_eager_evaluation_does(precision):
    """train's evaluation: predict_labels replayed as CUDA graphs (two batch shapes) gives the eager labels, also
    after the weights change in place between calls (an optimiser step), as they do between epochs."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = BMFN(BMFNConfig(**SMALL_MODEL)).to(device)
    n = 40
    labels = torch.zeros(n, 10, 29, device=device)
    labels[..., 28] = 1
    clips = ClipArrays(torch.randn(n, 10, 2, 2, 16, device=device), torch.randn(n, 10, 8, device=device), labels,
                       labels.amax(dim=1))  # SMALL_MODEL's 2x2 cells of 16 channels and 8-d audio
    rows = torch.randperm(n).numpy()
    predict = GraphedStep(lambda inputs: predict_labels(model, inputs, device, precision), enabled=True)
    for call in range(WARMUP_CALLS + 3):
        with torch.no_grad():
            for parameter in model.parameters():  # new weights, written in place
                parameter.add_(0.05 * torch.randn_like(parameter))
            model.head.classifier.weight.normal_()  # events and background both predicted
            model.head.classifier.bias.zero_()
            model.head.event_classifier.weight.normal_()
        graphed = predict_rows(model, clips, rows, device, 16, precision, predict)[0]
        eager = predict_rows(model, clips, rows, device, 16, precision)[0]
        assert (graphed == eager).all(), call
        assert 28 in graphed and len(set(graphed.ravel().tolist())) > 2
    assert len(predict._graphs) == 2  # batches of 16 and the last one of 8, each captured


def test_a_capture_does_not_keep_the_warm_up_calls_memory_beside_its_own():
    """The warm-up calls' cached blocks are released before the capture allocates the graph's pool, so a step
    whose temporaries take 1 GiB reserves about 1 GiB once captured, not 2."""
    gib = 1 << 30
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    total = torch.zeros((), device="cuda")

    def step(inputs):
        temporary = torch.full((gib // 4,), 1.0, device="cuda")  # one 1 GiB block, freed when the step returns
        total.add_(temporary.mul_(inputs["x"]).mean())

    run = GraphedStep(step, enabled=True)
    for _ in range(WARMUP_CALLS + 2):
        run({"x": torch.full((), 2.0, device="cuda")})
    torch.cuda.synchronize()
    assert len(run._graphs) == 1 and total.item() == 2.0 * (WARMUP_CALLS + 2)
    assert torch.cuda.memory_reserved() - before < 1.5 * gib


@pytest.mark.parametrize("share_memory", [False, True])
def test_shared_memory_holds_the_largest_graphs_temporaries_not_their_sum(share_memory):
    """Evaluation's graphs (batches of 256 and the remainder) share one pool: 1 GiB and 0.5 GiB temporaries
    reserve about 1 GiB, where a pool per graph reserves 1.5."""
    gib = 1 << 30
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()

    def step(inputs):
        temporary = torch.ones(inputs["x"].shape[0] * (gib // 16), device="cuda")  # 0.25 GiB per row of x
        return temporary.mul_(inputs["x"].sum()).mean()

    run = GraphedStep(step, enabled=True, share_memory=share_memory)
    for rows in (4, 2):
        for _ in range(WARMUP_CALLS + 2):
            result = run({"x": torch.ones(rows, device="cuda")})
            assert result.item() == pytest.approx(rows)
    reserved = torch.cuda.memory_reserved() - before
    assert reserved < 1.25 * gib if share_memory else reserved > 1.4 * gib
