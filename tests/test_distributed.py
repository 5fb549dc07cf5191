"""Scaling out: shards, `bmfn merge`, and 2-process torchrun runs on CPU (gloo) of extraction and DDP training.

The torchrun runs start `python -m torch.distributed.run --standalone --nproc-per-node 2` as a subprocess, as a
user would. For training this file is also the worker script (`_worker`, at the bottom): it checks DDP gradients
against one process in float64, then trains through the Python API with a small model and dropout off (dropout
masks are drawn per rank and cannot match a single process). One gradient check runs 3 ranks, so that a batch
can be smaller than the world and larger than one clip.

How close "matches" is: in float64 the DDP gradient of a global batch equals the single-process one to 1e-9
(relative), so the arithmetic is the same. In float32 the summation order differs (gradients all-reduced,
BatchNorm statistics summed over ranks); the ESA BatchNorm's backward cancels terms and Adam divides each
gradient by its own size, so rounding grows into weight differences of up to a few learning-rate steps after a
few steps, and loss differences of ~1e-4 relative. The float32 run is checked at that level.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_data import SMALL_AUDIO, SMALL_MODEL, SMALL_VISUAL, STORE_PROVENANCE, make_ave_dir, make_store

import bmfn_pipeline.train as train_module
from bmfn_pipeline.ave import CATEGORIES
from bmfn_pipeline.cli import main
from bmfn_pipeline.distributed import (Shard, local_batch, merge_shards, missing_shards, process_group, resolve_shard,
                                       shard_of, share_from_main, stand_in, wrap)
from bmfn_pipeline.data import load_data
from bmfn_pipeline.errors import BmfnError
from bmfn_pipeline.evaluate import predict_rows, segment_accuracy
from bmfn_pipeline.model import BMFN, BMFNConfig, fully_supervised_loss
from bmfn_pipeline.store import FeatureStore, load_arrays, merge_stores
from bmfn_pipeline.train import TrainConfig, load_checkpoint, train

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node")
# Three short clips; by the SHA-1 of their ids the first two fall in shard 0 of 2, the chaplin clip in shard 1.
CLIPS = ("moviepy_big_buck_bunny_432_433.webm", "ave_0lFf-HP86Q0.mp4", "moviepy_chaplin.mp4")
FAST = ("--weights", "random", "--seed", "0", "--frames-per-second", "1", "--device", "cpu", "--workers", "0")
# Training compared with and without DDP: 15 clips leave 11 for training, so batches of 4, 4 and 3 clips (the
# last one split 1 + 2 between the ranks checks the loss weighting); dropout off (see the module docstring).
DDP_CONFIG = {"mode": "fully", "epochs": 2, "batch_size": 4, "lr": 2e-3, "clip": 1.0, "milestones": [100],
              "model": {**SMALL_MODEL, "dropout": 0.0, "visual_dropout": 0.0}, "progress": False}
# Float32 DDP vs one process (module docstring): losses per epoch, and weights within 5 Adam steps (5 x lr).
LOSS_RTOL = 2e-3
WEIGHT_ATOL = 5 * DDP_CONFIG["lr"]
GRADIENT_RTOL = 1e-9  # float64: rounding only


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def torchrun(*args, cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run([*TORCHRUN, str(processes), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


# ---------------------------------------------------------------------------------------------- shards


def test_shard_parse_path_and_assignment():
    assert Shard.parse("3/8") == Shard(3, 8) and str(Shard(3, 8)) == "3/8"
    assert Shard.parse(" 0 / 1 ") == Shard(0, 1) and Shard(0, 1).holds("any clip")  # one shard: everything
    for bad in ("8/8", "-1/2", "1", "a/b", "1/0", "1/4x", "1/4/8"):
        with pytest.raises(BmfnError, match="shard"):
            Shard.parse(bad)
    with pytest.raises(BmfnError, match="the number of shards must be 1 or more"):
        Shard.parse("0/0")
    assert Shard(1, 4).path(Path("out") / "feats.h5") == Path("out") / "feats.shard-00001-of-00004.h5"
    ids = [f"clip{i}" for i in range(400)]
    owners = [[s for s in range(3) if Shard(s, 3).holds(c)] for c in ids]
    assert all(len(o) == 1 for o in owners)  # each clip in exactly one shard
    sizes = np.bincount([o[0] for o in owners], minlength=3)
    assert sizes.min() > 100  # a hash, not a range: no shard left empty by the ids' order
    # by the id alone: the same with any other clips around, and the same on every run
    assert [shard_of(c, 3) for c in ids[:50]] == [shard_of(c, 3) for c in reversed(ids[:50])][::-1]
    # and the same in every bmfn version (a run resumed after an upgrade extracts the same clips into each shard):
    # the first 16 hex digits of the SHA-1 of the id's UTF-8, whose case counts
    known = {"clip0": 2, "clip1": 5, "Clip1": 2, "-0lFf-HP86Q0": 3, "vid0000": 0, "a": 5, "A": 1, "é": 3}
    assert {c: shard_of(c, 7) for c in known} == known
    assert {c: [s for s in range(7) if Shard(s, 7).holds(c)] for c in known} == {c: [s] for c, s in known.items()}


def test_torchrun_environment_picks_the_shard(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_shard(None) is None and resolve_shard(Shard(0, 2)) == Shard(0, 2)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_shard(None) == Shard(2, 3)
    with pytest.raises(BmfnError, match="torchrun"):
        resolve_shard(Shard(0, 2))


def test_rank_variables_set_without_torchrun_are_one_line(tmp_path, video_dir, monkeypatch):
    """RANK and WORLD_SIZE left in the environment (a cluster job's, a copied line) without torchrun's MASTER_ADDR:
    extract and train stop with one line saying so, and --shard's conflict is said before any rendezvous."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    data = make_ave_dir(tmp_path / "ave", n_clips=12)
    for command in (["extract", video_dir / CLIPS[0], "--out", tmp_path / "feats.h5", *FAST],
                    ["train", "--ave-dir", data, "--out", tmp_path / "run", "--epochs", "1", "--quiet"]):
        result = CliRunner().invoke(main, [str(a) for a in command])
        assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
        assert result.stderr.startswith("bmfn: error: rank 0 of 2 (RANK and WORLD_SIZE are set) cannot join the other "
                                        "ranks: ") and "MASTER_ADDR" in result.stderr
        assert result.stderr.endswith("; start bmfn with torchrun, or unset them\n")
    result = CliRunner().invoke(main, ["extract", str(video_dir / CLIPS[0]), "--out", str(tmp_path / "feats.h5"),
                                       "--shard", "1/4", *FAST])
    assert result.exit_code == 1 and "--shard 1/4 under torchrun (WORLD_SIZE=2)" in result.stderr
    assert not (tmp_path / "feats.h5").exists() and not list(tmp_path.glob("feats.shard-*"))


def test_missing_shards(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    given = [Path("d/feats.shard-00000-of-00003.h5"), Path("d/feats.shard-00002-of-00003.h5"), Path("other.h5")]
    assert missing_shards(given) == [tmp_path / "d" / "feats.shard-00001-of-00003.h5"]
    assert missing_shards(given[2:]) == []
    spelled = [Path("../d/feats.shard-00000-of-00003.h5"), Path("feats.shard-00001-of-00003.h5"),
               tmp_path / "d" / "feats.shard-00002-of-00003.h5"]  # one folder, however each path names it
    monkeypatch.chdir(tmp_path / "d")
    assert missing_shards(spelled) == []
    # a multi-node run's shards, each from its machine's own disk
    nodes = [tmp_path / f"node{i}" / f"feats.shard-0000{i}-of-00003.h5" for i in range(3)]
    assert missing_shards(nodes) == []
    assert missing_shards(nodes[:2]) == [Path("feats.shard-00002-of-00003.h5")]
    # two runs' shards under one name, one run short of a shard: each folder is a run of its own
    other = [tmp_path / "e" / f"feats.shard-0000{i}-of-00003.h5" for i in range(2)]
    assert missing_shards([*spelled, *other]) == [tmp_path / "e" / "feats.shard-00002-of-00003.h5"]


def test_a_merge_of_two_runs_shards_says_so(tmp_path):
    """A glob that took the shards of a 2-shard and a 4-shard run names the mix-up, not just a missing shard."""
    two = [Shard(i, 2).path(tmp_path / "feats.h5") for i in range(2)]
    four = [Shard(i, 4).path(tmp_path / "feats.h5") for i in (0, 1)]
    for path in (*two, *four):
        path.touch()
    with pytest.raises(BmfnError, match=r"shard-00002-of-00004\.h5: shard file not given \(2 of the shards missing; "
                                        r"the shards given are of runs in 2 and 4 shards\)"):
        merge_shards([*two, *four], tmp_path / "out.h5")
    with pytest.raises(BmfnError, match=r"\(1 of the shards missing\); extract"):
        merge_shards(two[:1], tmp_path / "out.h5")


# ---------------------------------------------------------------------------------------------- merge


def labels_for(ids, split="train"):
    one_hot = np.zeros((10, 29), np.float32)
    one_hot[:, 28] = 1
    return {cid: (one_hot, split) for cid in ids}


def test_merge_joins_clips_labels_and_failures(tmp_path):
    a = make_store(tmp_path / "a.h5", n_clips=3, labels=labels_for(["vid0000", "never_extracted"]))
    b = tmp_path / "b.h5"
    with FeatureStore.open(b, STORE_PROVENANCE) as store:  # vid0002 again, identical; vid0100 new, journaled only
        for cid, row in (("vid0002", 2), ("vid0100", 0)):
            visual, audio = store_read(a, row)
            store.add_clip(cid, visual + (cid == "vid0100"), audio, path=f"{cid}.mp4", warnings=["a warning"])
        # vid0001 again, as a run with another thread count makes it: float32 digits apart, which the float16
        # storage rounds to the neighbouring value where they straddle a rounding midpoint
        visual, audio = store_read(a, 1)
        flip = np.random.default_rng(0).random(audio.shape) < 0.05
        audio[flip] = np.nextafter(audio[flip], np.float16(np.inf))
        store.add_clip("vid0001", visual, audio, path="vid0001.mp4")
        store.add_failure("broken", "broken.mp4", "broken.mp4: cannot decode")
        store.add_failure("vid0001", "elsewhere/vid0001.mp4", "failed here, extracted in a.h5")
        store.set_labels(labels_for(["vid0100"], "test"))
    summary = merge_stores([a, b], tmp_path / "merged.h5")
    assert summary.clips == 4 and sorted(summary.identical) == ["vid0001", "vid0002"] and summary.failed == 1

    merged, first = load_arrays(tmp_path / "merged.h5"), load_arrays(a)
    assert list(merged["clip_ids"]) == ["vid0000", "vid0001", "vid0002", "vid0100"]  # each clip once
    np.testing.assert_array_equal(merged["visual"][:3], first["visual"])
    np.testing.assert_array_equal(merged["visual"][3], store_read(a, 0)[0].astype(np.float16) + 1)
    assert merged["has_label"].tolist() == [True, False, False, True] and merged["split"][3] == "test"
    with FeatureStore.open(tmp_path / "merged.h5", create=False, readonly=True) as store:
        assert store.failures() == {"broken": ("broken.mp4", "broken.mp4: cannot decode")}
        assert "never_extracted" in store.labels()
        assert store.clip_info("vid0100") == {"path": "vid0100.mp4", "warnings": ["a warning"],
                                                "precision": None}
        assert store.provenance == json.loads(json.dumps(STORE_PROVENANCE))
    assert not list(tmp_path.glob("merged.h5.tmp-*"))


def store_read(path, row):
    with FeatureStore.open(path, create=False, readonly=True) as store:
        return store.read(store.clip_ids()[row])


def test_merge_keeps_one_video_class_and_refuses_two(tmp_path):
    """A clip labelled in two inputs: the same labels, or one input without its class (a store labelled before video
    classes were kept, for an empty event interval), merge; two different classes are refused."""
    empty = labels_for(["vid0000"])["vid0000"][0]  # background throughout: an empty event interval
    cat, bark = (np.eye(29, dtype=np.float32)[CATEGORIES.index(name)] for name in ("Cat", "Bark"))
    stores = {name: make_store(tmp_path / f"{name}.h5", n_clips=1, labels={"vid0000": (empty, "train", *given)})
              for name, given in (("cat", [cat]), ("bark", [bark]), ("unknown", []))}
    for first, second in (("unknown", "cat"), ("cat", "unknown"), ("cat", "cat")):
        merged = tmp_path / f"{first}-{second}.h5"
        merge_stores([stores[first], stores[second]] if first != second else [stores[first]], merged)
        np.testing.assert_array_equal(load_arrays(merged)["video_labels"][0], cat)
    for inputs in (["cat", "bark"], ["unknown", "cat", "bark"]):  # named: the input whose class it is
        with pytest.raises(BmfnError, match=r"bark\.h5: clip 'vid0000' is labelled differently in .*/cat\.h5"):
            merge_stores([stores[name] for name in inputs], tmp_path / "out.h5")


def test_merge_takes_a_split_one_input_lacks_and_checks_only_the_clips_held(tmp_path):
    """A store extracted with --splits and one without: the clip they share takes the given split; annotation rows of
    clips that neither holds (every store keeps all rows) do not stop the merge; a clip held in two splits does."""
    rows = {**labels_for(["vid0000"], "train"), **labels_for(["not_here"], "val")}
    with_splits = make_store(tmp_path / "a.h5", n_clips=1, labels=rows)
    without = make_store(tmp_path / "b.h5", n_clips=1, labels={**labels_for(["vid0000"], ""),
                                                                 **labels_for(["not_here"], "test")})
    assert merge_stores([without, with_splits], tmp_path / "out.h5").line() == (
        f"1 clip from 2 stores, 0 failed clips recorded -> {tmp_path / 'out.h5'} (1 clip found in two stores, the same "
        "to float rounding, kept once)")
    with FeatureStore.open(tmp_path / "out.h5", create=False, readonly=True) as store:
        assert {cid: given.split for cid, given in store.labels().items()} == {"vid0000": "train", "not_here": "test"}
    elsewhere = make_store(tmp_path / "c.h5", n_clips=1, labels=labels_for(["vid0000"], "val"))
    with pytest.raises(BmfnError, match=r"c\.h5: clip 'vid0000' is labelled differently in .*a\.h5 \(split 'train' "
                                         r"there, 'val' here\)$"):
        merge_stores([with_splits, elsewhere], tmp_path / "out2.h5")
    with pytest.raises(BmfnError, match=r"c\.h5: clip 'vid0000' is labelled differently in .*/a\.h5 "):
        merge_stores([without, with_splits, elsewhere], tmp_path / "out3.h5")  # the split came from a.h5, not b.h5


def test_merge_refusals(tmp_path):
    a = make_store(tmp_path / "a.h5", n_clips=2)
    other = {**STORE_PROVENANCE, "visual": {**STORE_PROVENANCE["visual"], "checksum": "random:1"}}
    b = make_store(tmp_path / "b.h5", n_clips=2, provenance=other)
    with pytest.raises(BmfnError, match=r"b\.h5: features were made differently from .*a\.h5's: visual\.checksum "
                                         r"'random:1' \(.*/b\.h5\) vs 'random:0' \(.*/a\.h5\); they cannot"):
        merge_stores([a, b], tmp_path / "out.h5")
    revised = make_store(tmp_path / "revised.h5", n_clips=1, provenance={**STORE_PROVENANCE, "features_revision": 2})
    with pytest.raises(BmfnError, match=r"revised\.h5: features were made differently from .*a\.h5's: "
                                         r"features_revision 2 \(.*/revised\.h5\) vs 'missing' \(.*/a\.h5\) "
                                         r"\(.*/a\.h5 was made by a bmfn before features revision 2, .*: extract them "
                                         r"again\); they cannot"):
        merge_stores([a, revised], tmp_path / "out.h5")
    newer = make_store(tmp_path / "newer.h5", n_clips=1, provenance={**STORE_PROVENANCE, "features_revision": 3})
    with pytest.raises(BmfnError, match=r"newer\.h5: .*features_revision 3 \(.*/newer\.h5\) vs 2 \(.*/revised\.h5\) "
                                         r"\(.*/revised\.h5 was made by a bmfn before features revision 3, whose "
                                         r"Matroska/WebM clips whose timestamps start late, .* may give other "
                                         r"features: extract them again\); they cannot"):
        merge_stores([revised, newer], tmp_path / "out.h5")
    c = make_store(tmp_path / "c.h5", n_clips=2, seed=1)  # same ids, other features
    with pytest.raises(BmfnError, match=r"c\.h5: clip 'vid0000' is also in .*a\.h5 with different features;"):
        merge_stores([a, c], tmp_path / "out.h5")
    visual, audio = store_read(a, 0)
    visual[3, 2, 1, 7] += 0.01 * np.abs(visual).max()  # a change beyond rounding, in one element
    with FeatureStore.open(tmp_path / "d.h5", STORE_PROVENANCE) as store:
        store.add_clip("vid0000", visual, audio, path="vid0000.mp4")
    with pytest.raises(BmfnError, match=r"d\.h5: clip 'vid0000' is also in .*a\.h5 with different features;"):
        merge_stores([a, tmp_path / "d.h5"], tmp_path / "out.h5")
    a32, bf16 = ({**STORE_PROVENANCE, "precision": p} for p in ("float32", "bfloat16"))  # a run setting: mergeable
    make_store(tmp_path / "a32.h5", n_clips=1, provenance=a32)
    with FeatureStore.open(tmp_path / "bf16.h5", bf16) as store:
        store.add_clip("vid0000", visual, audio, path="vid0000.mp4")
    with pytest.raises(BmfnError, match=r"bf16\.h5: clip 'vid0000' is also in .*a32\.h5 with different features "
                                         r"\(made in float32 there and bfloat16 here, which differ by more than "
                                         r"rounding\); remove it"):
        merge_stores([tmp_path / "a32.h5", tmp_path / "bf16.h5"], tmp_path / "out.h5")
    with pytest.raises(BmfnError, match="named twice"):
        merge_stores([a, tmp_path / "." / "a.h5"], tmp_path / "out.h5")
    with pytest.raises(BmfnError, match="already exists"):
        merge_stores([a], c)
    assert not (tmp_path / "out.h5").exists()
    with FeatureStore.open(a, create=False):  # a writer holds it: refused, not half-read
        with pytest.raises(BmfnError, match="another process is writing"):
            merge_stores([a], tmp_path / "out.h5")
    (tmp_path / "notes.h5").write_text("not a store")
    with pytest.raises(BmfnError, match=r"notes\.h5: not a bmfn feature store"):
        merge_stores([a, tmp_path / "notes.h5"], tmp_path / "out.h5")
    assert not (tmp_path / "notes.h5.parts").exists()  # nothing left beside a file that is no store


def test_merge_into_one_of_its_inputs(tmp_path):
    a = make_store(tmp_path / "a.h5", n_clips=2)
    with FeatureStore.open(a, STORE_PROVENANCE) as store:  # a journaled clip left unconsolidated (a killed run)
        store.add_clip("late", *store.read("vid0000"), path="late.mp4")
    b = tmp_path / "b.h5"
    with FeatureStore.open(b, STORE_PROVENANCE) as store:
        store.add_clip("vid0100", *store_read(a, 1), path="x.mp4")
    assert merge_stores([a, b], a).clips == 4
    with FeatureStore.open(a, create=False, readonly=True) as store:
        assert store.clip_ids() == ["vid0000", "vid0001", "late", "vid0100"]
    assert not list(Path(f"{a}.parts").glob("*.h5"))


# ---------------------------------------------------------------------------------------------- extraction


def test_torchrun_extraction_then_merge_equals_one_process(tmp_path, video_dir):
    clips = [video_dir / name for name in CLIPS]
    reference = tmp_path / "single" / "feats.h5"
    assert cli("extract", *clips, "--out", reference, *FAST).exit_code == 0

    out = tmp_path / "ranks" / "feats.h5"
    run = torchrun("-m", "bmfn_pipeline", "extract", *clips, "--out", out, *FAST, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    shards = [Shard(i, 2).path(out) for i in range(2)]
    for shard in shards:
        assert f"-> {shard}" in run.stdout
    assert sorted(out.parent.glob("*.h5")) == shards
    expected = {i: sorted(Path(c).stem for c in CLIPS if shard_of(Path(c).stem, 2) == i) for i in range(2)}
    for i, shard in enumerate(shards):
        with FeatureStore.open(shard, create=False, readonly=True) as store:
            assert sorted(store.clip_ids()) == expected[i] != []

    # --shard without torchrun makes the same shard file as rank 1
    alone = tmp_path / "alone" / "feats.h5"
    result = cli("extract", *clips, "--out", alone, *FAST, "--shard", "1/2")
    assert result.exit_code == 0, result.output
    assert f"1 extracted, 0 already done, 0 failed -> {Shard(1, 2).path(alone)}" in result.stdout
    for key in ("clip_ids", "visual", "audio"):
        np.testing.assert_array_equal(load_arrays(Shard(1, 2).path(alone))[key], load_arrays(shards[1])[key])

    result = cli("merge", shards[0], "--out", out)
    assert result.exit_code == 1 and f"{shards[1]}: shard file not given" in result.output
    result = cli("merge", *shards, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"3 clips from 2 stores, 0 failed clips recorded -> {out}" in result.stdout

    merged, single = load_arrays(out), load_arrays(reference)
    assert sorted(merged["clip_ids"]) == sorted(single["clip_ids"]) == sorted(Path(c).stem for c in CLIPS)
    order = [list(merged["clip_ids"]).index(cid) for cid in single["clip_ids"]]
    np.testing.assert_array_equal(merged["visual"][order], single["visual"])
    np.testing.assert_array_equal(merged["audio"][order], single["audio"])


# ---------------------------------------------------------------------------------------------- training


def test_a_rank_on_another_machine_that_stops_ends_the_others_wait(tmp_path, video_dir):
    """torchrun stops the ranks of one machine when one fails, not those of another: a rank that finished its shard
    must not wait FINISH_TIMEOUT (48 h) for one that died. Two "machines" on this one, rank 1's shard unreadable."""
    out = tmp_path / "feats.h5"
    Shard(1, 2).path(out).write_bytes(b"not a feature store")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t", "-m",
               "bmfn_pipeline", "extract", *(video_dir / name for name in CLIPS[:2]), "--out", str(out), *FAST]
    nodes = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)]
    _wait_for_port(port)  # the first machine's agent holds the rendezvous, and outlives the other machine's
    nodes.append(subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
    outputs = [node.communicate(timeout=120) for node in nodes]  # a rank left waiting would time out here
    assert [node.returncode for node in nodes] == [1, 1]
    errors = [line for _, err in outputs for line in err.splitlines() if line.startswith("bmfn: error:")]
    assert len(errors) == 2, [err[-2000:] for _, err in outputs]
    assert any("feats.shard-00001-of-00002.h5: not a bmfn feature store" in line for line in errors), errors
    assert any("finished its shard, but another rank stopped before finishing its own" in line for line in errors)
    with FeatureStore.open(Shard(0, 2).path(out), create=False, readonly=True) as store:
        assert sorted(store.clip_ids()) == sorted(Path(c).stem for c in CLIPS[:2] if shard_of(Path(c).stem, 2) == 0)


def _wait_for_port(port: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port} after {seconds} s")


def test_ddp_training_matches_one_process(tmp_path):
    data = make_ave_dir(tmp_path / "ave", n_clips=15)
    single = train(TrainConfig(ave_dir=str(data), out=str(tmp_path / "single"), **DDP_CONFIG), log=lambda *_: None)
    assert len(single.runs[0].history) == 2

    runs = tmp_path / "runs"
    config = {**DDP_CONFIG, "ave_dir": str(data), "runs_dir": str(runs)}  # no --out: a timestamped folder
    report = tmp_path / "gradients.json"
    run = torchrun(__file__, json.dumps(config), report, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    for case, error in json.loads(report.read_text()).items():
        assert error < GRADIENT_RTOL, case
    (run_dir,) = runs.iterdir()  # one folder, named by rank 0 for both ranks
    assert run.stdout.count("epoch 2/2") == 1  # rank 0 alone logs
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "best.pt", "command.txt", "curves.png", "last.pt",
                                                         "metrics.jsonl", "run.json"]

    def metrics(path):
        return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]

    for ddp, alone in zip(metrics(run_dir), metrics(tmp_path / "single"), strict=True):
        assert ddp["loss"] == pytest.approx(alone["loss"], rel=LOSS_RTOL)
    ddp_state = torch.load(run_dir / "last.pt", weights_only=True)
    alone_state = torch.load(tmp_path / "single" / "last.pt", weights_only=True)
    assert ddp_state["model_state"].keys() == alone_state["model_state"].keys()
    for name, value in alone_state["model_state"].items():  # BatchNorm running statistics included
        torch.testing.assert_close(ddp_state["model_state"][name], value, rtol=0, atol=WEIGHT_ATOL, msg=name)
    load_checkpoint(run_dir / "best.pt")  # the synchronised BatchNorm saves a plain BMFN checkpoint
    # Each rank predicted its own share of val and test after each epoch, and the summed counts are the accuracy of
    # the weights on the whole split, as one process evaluates them.
    loaded = load_data(ave_dir=data, progress=False)
    shares = [json.loads(Path(f"{report}.rows{rank}").read_text()) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 4  # val and test, twice
    for number, (mine, theirs) in enumerate(zip(*shares)):
        split = loaded.splits[("val", "test")[number % 2]]
        assert mine and theirs and not set(mine) & set(theirs) and sorted(mine + theirs) == sorted(split)
    last, (model, _) = metrics(run_dir)[-1], load_checkpoint(run_dir / "last.pt")  # the weights evaluated last
    for split in ("val", "test"):
        alone = segment_accuracy(*predict_rows(model, loaded.clips, loaded.splits[split], torch.device("cpu")))
        assert last[f"{split}_acc"] == alone, split
    # rank 0's refusal (say, a run folder already taken) reaches the other rank as the same one line
    assert [Path(f"{report}.rank{rank}").read_text() for rank in (0, 1)] == ["run folder taken"] * 2
    assert [Path(f"{report}.other{rank}").read_text() for rank in (0, 1)] == [
        "PermissionError: [Errno 13] Permission denied",
        "BmfnError: rank 0 failed (PermissionError: [Errno 13] Permission denied)"]
    assert [Path(f"{report}.ddp{rank}").read_text() for rank in (0, 1)] == ["0", "0"]


def test_a_batch_smaller_than_the_world_keeps_its_stand_ins_out_of_batchnorm(tmp_path):
    """3 ranks: batches of 2 and 1 clips leave one and two ranks a zero-weight stand-in row (local_batch), which
    must not enter the synchronised BatchNorm's statistics (with 2 ranks a stand-in is alone, and harmless)."""
    report = tmp_path / "gradients.json"
    run = torchrun(__file__, "gradients", report, cwd=tmp_path, processes=3)
    assert run.returncode == 0, run.stderr[-3000:]
    errors = json.loads(report.read_text())
    assert {"batch of 2", "running statistics, batch of 1"} <= set(errors)
    for case, error in errors.items():
        assert error < GRADIENT_RTOL, case


def test_ranks_that_read_different_clips_stop_with_one_line(tmp_path):
    """Each rank loads the data itself: a store still being extracted into can show them different clips, whose
    batches would never match (a hang). Here rank 1 is given a folder of 14 clips where rank 0 reads 12."""
    for name, n_clips in (("ave", 12), ("grown", 14)):
        make_ave_dir(tmp_path / name, n_clips=n_clips)
    config = {**DDP_CONFIG, "ave_dir": str(tmp_path / "ave"), "out": str(tmp_path / "run"), "epochs": 1}
    report = tmp_path / "refusal"
    run = torchrun(__file__, "differing", json.dumps(config), tmp_path / "grown", report, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank, name in enumerate(("ave", "grown")):
        assert Path(f"{report}.rank{rank}").read_text() == (
            f"{tmp_path / name}: the ranks read different clips or splits (12, 14 clips on ranks 0-1): it changed "
            "while they read it (is `bmfn extract` still writing to it?); train once it no longer does")


def test_a_loss_that_is_not_finite_on_one_rank_stops_every_rank(tmp_path):
    """Rank 1's loss becomes NaN in the last batch of the last epoch, where rank 0's is still finite (the NaN reaches
    its weights only through that step's gradients): both stop with rank 0's line, none waits for the other."""
    make_ave_dir(tmp_path / "ave", n_clips=15)
    config = {**DDP_CONFIG, "ave_dir": str(tmp_path / "ave"), "out": str(tmp_path / "run"), "checkpoint_every": 0}
    report = tmp_path / "refusal"
    run = torchrun(__file__, "nan", json.dumps(config), report, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [Path(f"{report}.rank{rank}").read_text() for rank in (0, 1)]
    assert lines[0] == lines[1]
    assert lines[0].startswith(f"{tmp_path / 'run'}: the loss became nan at epoch 2, batch 3; training stopped. Kept: "
                               "last.pt (epoch 1), best.pt (epoch 1, the best so far).")


def _nan_worker(config: str, report: str) -> None:
    """One rank of test_a_loss_that_is_not_finite_on_one_rank_stops_every_rank: 11 training clips in batches of 4,
    4 and 3, so each rank computes 3 losses an epoch; rank 1's sixth is NaN."""
    with process_group(torch.device("cpu")) as env:
        calls = []
        loss = train_module.fully_supervised_loss

        def failing(output, labels):
            calls.append(1)
            return loss(output, labels) * (float("nan") if env.rank == 1 and len(calls) == 6 else 1)

        train_module.fully_supervised_loss = failing
        try:
            train(TrainConfig(**json.loads(config)), log=lambda *_: None)
        except BmfnError as exc:
            Path(f"{report}.rank{env.rank}").write_text(str(exc))


def _differing_worker(config: str, other: str, report: str) -> None:
    """One rank of test_ranks_that_read_different_clips_stop_with_one_line."""
    with process_group(torch.device("cpu")) as env:
        load = train_module._load_config_data
        train_module._load_config_data = lambda c, log: load(replace(c, ave_dir=other) if env.rank else c, log)
        try:
            train(TrainConfig(**json.loads(config)), log=lambda *_: None)
        except BmfnError as exc:
            Path(f"{report}.rank{env.rank}").write_text(str(exc))


def _worker(config: str, report: str) -> None:
    """One rank of test_ddp_training_matches_one_process: the float64 gradient check, then the float32 run."""
    gc.disable()  # as when no automatic collection comes before the end: process_group must free DDP itself
    with process_group(torch.device("cpu")) as env:
        errors = _gradient_errors((7, 1))  # split 3 + 4 between the ranks; 1: a zero-weight stand-in
        if env.is_main:
            Path(report).write_text(json.dumps(errors))
        shares = []  # the rows this rank predicts in each evaluation
        predict_rows_of_train = train_module.predict_rows
        train_module.predict_rows = lambda model, clips, rows, *args: shares.append(rows.tolist()) or \
            predict_rows_of_train(model, clips, rows, *args)
        try:
            train(TrainConfig(**json.loads(config)))  # in the same process group
        finally:
            train_module.predict_rows = predict_rows_of_train
        Path(f"{report}.rows{env.rank}").write_text(json.dumps(shares))
        try:
            share_from_main(lambda: (_ for _ in ()).throw(BmfnError("run folder taken")))
        except BmfnError as exc:
            Path(f"{report}.rank{env.rank}").write_text(str(exc))
        try:  # another error: rank 0 raises it, the others (waiting for its word) a BmfnError naming it
            share_from_main(lambda: (_ for _ in ()).throw(OSError(13, "Permission denied")))
        except Exception as exc:
            Path(f"{report}.other{env.rank}").write_text(f"{type(exc).__name__}: {exc}")
    # no DDP wrapper outlived the group (one left to the interpreter's exit can abort the process there)
    alive = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
    Path(f"{report}.ddp{env.rank}").write_text(str(alive))


def _gradient_worker(report: str) -> None:
    """One rank of test_a_batch_smaller_than_the_world_keeps_its_stand_ins_out_of_batchnorm."""
    with process_group(torch.device("cpu")) as env:
        errors = _gradient_errors((5, 2, 1))
        if env.is_main:
            Path(report).write_text(json.dumps(errors))


def _gradient_errors(sizes: tuple[int, ...]) -> dict[str, float]:
    """DDP's gradients and BatchNorm running statistics after one step on a global batch of each size, against one
    process's, in float64, relative to the largest; its DDP wrappers are garbage once it returns (process_group
    collects them before the group goes)."""
    model_config = BMFNConfig(mode="fully", **DDP_CONFIG["model"])
    torch.set_default_dtype(torch.float64)
    errors = {}
    try:
        for n in sizes:
            generator = torch.Generator().manual_seed(n)
            batch = {"visual": torch.rand(n, 10, *SMALL_VISUAL, generator=generator),
                     "audio": torch.rand(n, 10, SMALL_AUDIO, generator=generator),
                     "labels": torch.eye(29)[torch.randint(0, 29, (n, 10), generator=generator)]}
            torch.manual_seed(0)
            reference = BMFN(model_config).train()
            torch.manual_seed(0)
            model = BMFN(model_config).train()
            replica = wrap(model, torch.device("cpu"))
            local, weight = local_batch(batch)
            fully_supervised_loss(reference(batch["visual"], batch["audio"]), batch["labels"]).backward()
            with stand_in(weight == 0):  # as train's step
                output = replica(local["visual"], local["audio"])
            (fully_supervised_loss(output, local["labels"]) * weight).backward()
            want, got = dict(reference.named_parameters()), dict(model.named_parameters())
            errors[f"batch of {n}"] = max(float((got[k].grad - p.grad).abs().max() / p.grad.abs().max())
                                          for k, p in want.items())
            got = dict(model.named_buffers())
            errors[f"running statistics, batch of {n}"] = max(
                float((got[k] - b).abs().max() / b.abs().max()) for k, b in reference.named_buffers()
                if b.is_floating_point())
    finally:
        torch.set_default_dtype(torch.float32)
    return errors


if __name__ == "__main__":
    workers = {"gradients": _gradient_worker, "differing": _differing_worker, "nan": _nan_worker}
    if sys.argv[1] in workers:
        workers[sys.argv[1]](*sys.argv[2:])
    else:
        _worker(*sys.argv[1:])
