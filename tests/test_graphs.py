"""GraphedStep's bookkeeping, on CPU with a stand-in for CUDA graphs: a capture records the step, a replay runs
it on the graph's own input tensors (tests/test_cuda_graphs.py checks real graphs where CUDA is)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from bmfn_pipeline.graphs import WARMUP_CALLS, GraphedStep


class FakeGraph:
    def __init__(self):
        self.recorded = None
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.recorded()


@pytest.fixture
def fake_cuda(monkeypatch):
    state = {"capturing": None, "fail": False, "pools": []}

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None):
        state["capturing"] = g
        state["pools"].append(pool)
        try:
            yield
            if state["fail"]:
                raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        finally:
            state["capturing"] = None

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", object)
    return state


def _counting_step(fake_cuda, seen, eager):
    def step(inputs):
        if fake_cuda["capturing"] is not None:  # a capture records; the replay runs it on these very tensors
            fake_cuda["capturing"].recorded = lambda: seen.append(inputs["x"].clone())
            return
        eager.append(1)
        seen.append(inputs["x"].clone())
    return step


def test_each_batch_runs_once_with_its_own_values(fake_cuda):
    seen, eager = [], []
    run = GraphedStep(_counting_step(fake_cuda, seen, eager), enabled=True)
    batches = [torch.full((4,), float(i)) for i in range(8)] + [torch.full((2,), 100.0 + i) for i in range(5)]
    for x in batches:
        run({"x": x})
    assert len(seen) == len(batches)
    for got, want in zip(seen, batches):
        torch.testing.assert_close(got, want)
    assert len(eager) == 2 * WARMUP_CALLS  # each shape: warm-up calls, then its own graph
    assert len(run._graphs) == 2 and all(g.replays > 0 for g, _, _ in run._graphs.values())


def test_a_step_returns_its_result_and_a_replay_the_graphs_output(fake_cuda):
    """Evaluation's forward passes: each call returns that batch's result; once captured, the graph's own output
    tensor, which each replay fills anew."""
    def doubling(inputs):
        out = inputs["x"] * 2
        if fake_cuda["capturing"] is not None:
            fake_cuda["capturing"].recorded = lambda: out.copy_(inputs["x"] * 2)
        return out

    run = GraphedStep(doubling, enabled=True)
    returned = []
    for i in range(WARMUP_CALLS + 3):
        x = torch.arange(3.0) + i
        result = run({"x": x})
        torch.testing.assert_close(result, 2 * x)
        returned.append(result)
    captured = returned[WARMUP_CALLS:]
    assert all(result is captured[0] for result in captured)  # the graph's output, not a copy per call


@pytest.mark.parametrize("share_memory", [False, True])
def test_graphs_share_one_memory_pool_only_when_asked(fake_cuda, share_memory):
    run = GraphedStep(_counting_step(fake_cuda, [], []), enabled=True, share_memory=share_memory)
    for shape in (4, 2):
        for _ in range(WARMUP_CALLS + 1):
            run({"x": torch.zeros(shape)})
    first, second = fake_cuda["pools"]
    assert (first is second and first is not None) if share_memory else first is second is None  # None: its own


def test_a_failed_capture_falls_back_to_eager_steps_and_says_so(fake_cuda):
    seen, eager, logged = [], [], []
    fake_cuda["fail"] = True
    run = GraphedStep(_counting_step(fake_cuda, seen, eager), enabled=True, log=logged.append)
    batches = [torch.full((3,), float(i)) for i in range(WARMUP_CALLS + 3)]
    for x in batches:
        run({"x": x})
    assert [float(t[0]) for t in seen] == [float(x[0]) for x in batches]  # none lost, none repeated
    assert len(eager) == len(batches) and not run.enabled
    assert logged == ["warning: CUDA graph capture failed (operation not permitted when stream is capturing); "
                      "continuing without CUDA graphs"]


def test_disabled_is_plain_calls():
    calls = []
    run = GraphedStep(lambda inputs: calls.append(inputs["x"]), enabled=False)
    for i in range(WARMUP_CALLS + 2):
        run({"x": i})
    assert calls == list(range(WARMUP_CALLS + 2))
