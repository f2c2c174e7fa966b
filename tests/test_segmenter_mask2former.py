"""The in-environment mIoU segmenter (dynadiff/segmenters/mask2former.py) on a tiny random Mask2Former saved in the
real on-disk layout (config.json, model.safetensors, preprocessor_config.json), and its weights' fetch
(``prepare_weights.py --only segmenter``) against the local Hub of tests/weights_server.py.

The expected maps are computed here from the model's raw outputs, image by image: mask logits resized to the
model's input size, sigmoid; softmax over the classes without the null class; their product summed over queries;
resized to the image's size; argmax. The tiny model's class head and mask embedder are redrawn with a larger spread so that its maps are not
one class everywhere (at the default init every mask is about 0.5 and every map constant).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from weights_server import COMMIT, WeightsServer

from dynadiff.cli import ConfigError
from dynadiff.segmenters import mask2former as m2f

REPO = Path(__file__).resolve().parents[1]
N_LABELS = 7
# name -> (height, width): unequal sizes (two of one size, batched together), a grayscale one
IMAGES = {"a.png": (40, 48), "b.png": (512, 512), "c.png": (40, 48), "d.png": (100, 60), "e_gray.png": (33, 47)}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A tiny Mask2Former folder as prepare_weights.py leaves it (read-only: copy it to modify)."""
    from dynadiff.models.tiny import write_tiny_mask2former

    folder = write_tiny_mask2former(tmp_path_factory.mktemp("weights") / m2f.FOLDER_NAME, n_labels=N_LABELS)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (h, w) in IMAGES.items():
        # smooth colour blobs plus noise: regions for the segmenter to tell apart
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(6 * xx + c) * np.cos(5 * yy - c) for c in range(3)], axis=-1)
        rgb = np.clip(127 + 100 * base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).convert("L" if "gray" in name else "RGB").save(folder / name)
    (folder / ".hidden.png").write_bytes(b"not an image: hidden names are skipped")
    (folder / "notes.txt").write_text("not a .png: skipped")
    return folder


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dynadiff.segmenters.mask2former", *map(str, args)],
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True,
                          text=True, timeout=300, check=False)


def _errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if " ERROR " in line]


def _expected_map(weights: Path, path: Path) -> np.ndarray:
    """The map of one image, alone, from the model's raw outputs (not through the code under test)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    model = Mask2FormerForUniversalSegmentation.from_pretrained(weights, local_files_only=True).eval()
    processor = AutoImageProcessor.from_pretrained(weights, local_files_only=True)
    rgb = Image.open(path).convert("RGB")
    inputs = processor(images=[rgb], return_tensors="pt")
    assert bool(inputs["pixel_mask"].all())  # one image: no padding
    with torch.no_grad():
        out = model(**inputs)
    classes = out.class_queries_logits[0].softmax(-1)[:, :-1]  # (Q, C)
    masks = F.interpolate(out.masks_queries_logits, size=inputs["pixel_values"].shape[-2:], mode="bilinear",
                          align_corners=False)[0].sigmoid()  # (Q, H, W): the model's input size
    scores = (classes[:, :, None, None] * masks[:, None]).sum(0)  # (C, H, W)
    scores = F.interpolate(scores[None], size=(rgb.height, rgb.width), mode="bilinear", align_corners=False)[0]
    return scores.argmax(0).numpy()


# ----------------------------------------------------------------------------- maps


def test_cli_writes_one_map_per_image_equal_to_an_independent_computation(weights, images, tmp_path,
                                                                          one_torch_thread):
    out = tmp_path / "maps"
    result = _run(images, out, "--weights", weights, "--device", "cpu", "--batch-size", "3")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(IMAGES)  # nothing else: no temporary file left
    seen = set()
    for name, (h, w) in IMAGES.items():
        with Image.open(out / name) as im:
            assert im.mode == "L" and im.size == (w, h)
            got = np.asarray(im)
        assert got.max() < N_LABELS
        expected = _expected_map(weights, images / name)
        # the model sees the same input alone and batched with its same-size neighbour: equal up to float
        # rounding of the batched matrix products, which could flip a pixel sitting on a tie
        assert (got == expected).mean() >= 0.999, name
        seen |= set(np.unique(got).tolist())
        if name == "b.png":
            assert len(np.unique(got)) >= 2  # not a constant map: the comparison means something
    assert len(seen) >= 3


def test_maps_depend_neither_on_batch_size_nor_on_the_other_images(weights, images, tmp_path, one_torch_thread):
    one = m2f.segment_folder(images, tmp_path / "one", weights, "cpu", batch_size=1, progress=False)
    many = m2f.segment_folder(images, tmp_path / "many", weights, "cpu", batch_size=8, progress=False)
    assert [p.name for p in one] == sorted(IMAGES)  # the images' order
    for a, b in zip(one, many):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), a.name
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(images / "c.png", alone / "c.png")
    (c,) = m2f.segment_folder(alone, tmp_path / "alone_maps", weights, "cpu", batch_size=4, progress=False)
    assert np.array_equal(np.asarray(Image.open(c)), np.asarray(Image.open(tmp_path / "many" / "c.png")))


def test_padding_is_cut_off_before_the_resize():
    """semantic_maps on a padded input: the map of the unpadded part alone, whatever the padding holds."""
    import torch

    g = torch.Generator().manual_seed(0)
    class_logits = torch.randn(1, 6, N_LABELS + 1, generator=g)
    class_logits[0, 1:, :5] += 8 * torch.eye(5)  # queries 1..5: mostly classes 0..4
    class_logits[0, :, N_LABELS - 1] = -20.0
    class_logits[0, 0, N_LABELS - 1] = 20.0  # class 6: query 0 only, for sure
    valid_part = torch.randn(1, 6, 16, 16, generator=g) * 4  # masks over an input of (64, 64), at a quarter of it
    valid_part[0, 0] = -20.0  # query 0 off on the image
    padded = torch.cat([valid_part, torch.full((1, 6, 16, 8), -20.0)], dim=-1)  # input (64, 96): padding at right
    padded[0, 0, :, 16:] = 20.0  # query 0 (class 6) fills the padding
    (got,) = m2f.semantic_maps(class_logits, padded, (64, 96), [(64, 64)], valid=[(64, 64)])
    (alone,) = m2f.semantic_maps(class_logits, valid_part, (64, 64), [(64, 64)])
    # equal but for the last two columns, where the bilinear resize of the masks (to the input's size, as the
    # original Mask2Former and transformers do) mixes the image's last mask pixel with the padding's first
    assert torch.equal(got[:, :62], alone[:, :62]) and (got == alone).float().mean() > 0.97
    assert len(got[:, :62].unique()) >= 4 and not (got[:, :62] == N_LABELS - 1).any()
    (resized,) = m2f.semantic_maps(class_logits, padded, (64, 96), [(50, 70)], valid=[(64, 64)])
    assert resized.shape == (50, 70) and (resized == N_LABELS - 1).float().mean() < 0.04
    (stretched,) = m2f.semantic_maps(class_logits, padded, (64, 96), [(50, 70)])  # kept, as transformers does
    assert (stretched == N_LABELS - 1).float().mean() > 0.25  # the padding, a third of the input's width


def test_a_384_input_gives_transformers_own_post_processing(weights, images, tmp_path, one_torch_thread):
    """transformers resizes the masks to 384 x 384 whatever the input: with a processor giving that input (as the
    published ones do), the segmenter's maps are transformers' post_process_semantic_segmentation's."""
    import torch
    from transformers import (
        AutoImageProcessor,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
    )

    folder = tmp_path / "square"
    shutil.copytree(weights, folder)
    Mask2FormerImageProcessor(size={"height": 384, "width": 384}, size_divisor=32).save_pretrained(folder)
    some = tmp_path / "in"
    some.mkdir()
    for name in ("d.png", "e_gray.png"):
        shutil.copy(images / name, some / name)
    maps = m2f.segment_folder(some, tmp_path / "maps", folder, "cpu", batch_size=2, progress=False)
    model = Mask2FormerForUniversalSegmentation.from_pretrained(folder, local_files_only=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    for path in maps:
        rgb = Image.open(some / path.name).convert("RGB")
        inputs = processor(images=[rgb], return_tensors="pt")
        assert inputs["pixel_values"].shape[-2:] == (384, 384)
        with torch.no_grad():
            outputs = model(**inputs)
        (theirs,) = processor.post_process_semantic_segmentation(outputs, target_sizes=[(rgb.height, rgb.width)])
        assert np.array_equal(np.asarray(Image.open(path)), theirs.numpy()), path.name


def test_write_map_never_leaves_a_half_written_map(tmp_path, monkeypatch):
    target = tmp_path / "x.png"
    m2f.write_map(np.full((5, 7), 3, np.uint8), target)
    before = target.read_bytes()

    def broken_save(self, fp, format=None, **params):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        m2f.write_map(np.zeros((5, 7), np.uint8), target)
    assert target.read_bytes() == before  # the previous map, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]  # no temporary file left


def test_a_bare_size_in_preprocessor_config_is_read_as_transformers_4_did(weights, images, tmp_path,
                                                                          one_torch_thread):
    folder = tmp_path / "legacy"
    shutil.copytree(weights, folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config["size"] = 64  # the legacy form: transformers 5 alone cannot resize with it
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    assert m2f.processor_overrides(folder) == {"size": {"shortest_edge": 64, "longest_edge": 1333}}
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(images / "d.png", one / "d.png")
    (legacy,) = m2f.segment_folder(one, tmp_path / "legacy_maps", folder, "cpu", progress=False)
    (current,) = m2f.segment_folder(one, tmp_path / "maps", weights, "cpu", progress=False)
    # d.png (100 x 60) never reaches either longest edge: both read the same input
    assert np.array_equal(np.asarray(Image.open(legacy)), np.asarray(Image.open(current)))


def test_labels_are_the_model_ids_and_must_fit_8_bits(weights, images, tmp_path):
    assert m2f.label_names(weights) == {i: f"class{i}" for i in range(N_LABELS)}
    folder = tmp_path / "many_labels"
    shutil.copytree(weights, folder)
    config = json.loads((folder / "config.json").read_text())
    for n, fits in ((255, True), (256, False)):
        config["id2label"] = {str(i): f"c{i}" for i in range(n)}
        (folder / "config.json").write_text(json.dumps(config))
        if fits:
            assert len(m2f.label_names(folder)) == 255  # ids 0..254: 255 stays "no class"
        else:
            with pytest.raises(ConfigError, match=r"has 256 labels \(ids 0\.\.255\), more than an 8-bit label map "
                                                  r"holds \(ids 0\.\.254, 255 meaning no class\)"):
                m2f.segment_folder(images, tmp_path / "out", folder, "cpu")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- errors


def test_missing_weights_is_one_line_naming_the_folder_and_the_fetch_command(images, tmp_path):
    missing = tmp_path / "nowhere" / m2f.FOLDER_NAME
    result = _run(images, tmp_path / "out", "--weights", missing)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (error,) = _errors(result)
    assert f"Mask2Former weights folder {missing} not found: fetch it with `python prepare_weights.py --only " \
           f"segmenter segmenter.path={missing}`" in error
    assert not (tmp_path / "out").exists()
    # the default folder: $DYNADIFF_WEIGHTS/mask2former-swin-large-coco-panoptic, and the plain command
    result = _run(images, tmp_path / "out", env={"DYNADIFF_WEIGHTS": str(tmp_path / "w")})
    assert result.returncode == 2
    (error,) = _errors(result)
    assert error.endswith(f"Mask2Former weights folder {tmp_path / 'w' / m2f.FOLDER_NAME} not found: fetch it with "
                          "`python prepare_weights.py --only segmenter`, or give the folder that holds it "
                          "(--weights DIR)")


def test_empty_input_folder_is_a_usage_error(tmp_path, weights):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    result = _run(empty, tmp_path / "out", "--weights", weights)
    assert result.returncode == 2
    (error,) = _errors(result)
    assert error.endswith(f"no .png image in {empty}: nothing to segment")
    assert not (tmp_path / "out").exists()


def test_a_corrupt_image_mid_run_leaves_the_maps_before_it_whole_and_no_partial_one(weights, images, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.png", "d.png"):
        shutil.copy(images / name, folder / name)
    whole = (images / "b.png").read_bytes()
    (folder / "c.png").write_bytes(whole[: len(whole) // 2])  # a valid header, then cut: fails when decoded
    out = tmp_path / "out"
    result = _run(folder, out, "--weights", weights, "--device", "cpu", "--batch-size", "1")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (error,) = _errors(result)
    assert f"cannot read {folder / 'c.png'} (" in error
    assert error.endswith("2 of the 4 maps were written before it, each complete; replace or remove that image "
                          "and run again")
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]  # b's size batch came before c's
    for name in ("a.png", "b.png"):
        with Image.open(out / name) as im:
            im.load()
            assert im.size == Image.open(folder / name).size


SETUP_ERRORS = {
    # case: (what to change, error type, regex of the message)
    "weights_file_missing": ("rm:model.safetensors", ConfigError,
                             r"Mask2Former weights: no model\.safetensors or pytorch_model\.bin in .*: fetch it with "),
    "processor_missing": ("rm:preprocessor_config.json", ConfigError,
                          (r"Mask2Former weights: .*preprocessor_config\.json not found: fetch it with `python "
                           r"prepare_weights\.py --only segmenter segmenter\.path=")),
    "interrupted_fetch": ("part:model.safetensors", ConfigError,
                          r"\(a download was interrupted there: the same command resumes it\)"),
    "damaged_weights": ("write:model.safetensors", m2f.SegmentationError,
                        r"cannot load the Mask2Former model in .* \(SafetensorError: .*\): fetch it again with "),
    "other_model": ("json:model_type=swin", ConfigError, r"config\.json describes a 'swin' model, not a Mask2Former"),
    "damaged_config": ("write:config.json", m2f.SegmentationError, r"config\.json is not a readable model configuration"),
    "partial_weights": ("drop:class_predictor", m2f.SegmentationError,
                        (r"model\.safetensors leaves 2 of the model's parameters unset \(e\.g\. "
                         r"class_predictor\.bias\): it is not this model's checkpoint")),
    "bad_device": ("arg:device=tpu", ConfigError, r"unknown device 'tpu': use auto, cpu, cuda"),
    "bad_batch": ("arg:batch_size=0", ConfigError, r"--batch-size must be a whole number >= 1, got 0"),
    "out_is_in": ("arg:out=in", ConfigError, r"the output folder is the input folder .*: the maps would replace"),
    "not_an_image": ("image:garbage", m2f.SegmentationError,
                     r"z\.png is not a readable image \(UnidentifiedImageError: .*\): nothing was segmented"),
    "no_input": ("arg:in=missing", ConfigError, r"input folder .*missing does not exist"),
}


@pytest.mark.parametrize("case", list(SETUP_ERRORS))
def test_setup_errors_are_one_clear_exception_before_any_map(case, weights, images, tmp_path, one_torch_thread):
    change, error, pattern = SETUP_ERRORS[case]
    kind, _, what = change.partition(":")
    folder = tmp_path / "weights"
    shutil.copytree(weights, folder)
    in_dir, out, kwargs = tmp_path / "in", tmp_path / "out", {"device": "cpu", "batch_size": 2}
    in_dir.mkdir()
    shutil.copy(images / "a.png", in_dir / "a.png")
    if kind == "rm":
        (folder / what).unlink()
    elif kind == "part":
        (folder / what).rename(folder / f".{what}.part")
    elif kind == "write":
        (folder / what).write_bytes(b"garbage")
    elif kind == "json":
        key, value = what.split("=")
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
    elif kind == "drop":
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        save_file({k: v for k, v in tensors.items() if what not in k}, folder / "model.safetensors",
                  metadata={"format": "pt"})
    elif kind == "image":
        (in_dir / "z.png").write_bytes(b"garbage")
    elif what == "out=in":
        out = in_dir
    elif what == "in=missing":
        in_dir = tmp_path / "missing"
    else:
        key, value = what.split("=")
        kwargs[key] = int(value) if value.isdigit() else value
    with pytest.raises(error, match=pattern):
        m2f.segment_folder(in_dir, out, folder, progress=False, **kwargs)
    assert case == "out_is_in" or not out.exists() or list(out.iterdir()) == []


def test_a_failure_inside_the_model_is_one_line_naming_the_images(weights, images, tmp_path, monkeypatch):
    _model, processor = m2f.load_model(weights)

    def failing(**inputs):
        raise RuntimeError("shape mismatch deep inside (stand-in)")

    monkeypatch.setattr(m2f, "load_model", lambda folder, device: (failing, processor))
    with pytest.raises(m2f.SegmentationError, match=r"Mask2Former failed on a\.png, c\.png \(RuntimeError: shape "
                                                    r"mismatch deep inside \(stand-in\)\): 0 of the 5 maps were "
                                                    r"written before"):
        m2f.segment_folder(images, tmp_path / "out", weights, "cpu", batch_size=2, progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_cuda_asked_for_without_cuda_is_a_usage_error(weights, images, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=r"device 'cuda' asked for, but CUDA is not available here"):
        m2f.segment_folder(images, tmp_path / "out", weights, "cuda")
    assert not (tmp_path / "out").exists()


def test_importing_the_segmenter_imports_neither_torch_nor_transformers():
    code = ("import sys, dynadiff.segmenters.mask2former, dynadiff.fetch.run; "
            "print(sorted(m for m in ('torch', 'transformers', 'PIL') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- prepare_weights.py --only segmenter


@pytest.fixture
def hub(tmp_path, weights):
    """The local Hub serving the segmenter's repository: the tiny model's files, a pytorch_model.bin copy and files
    that are not read (TF weights, README); ``env`` points the Hub, its cache and DYNADIFF_WEIGHTS at tmp_path."""
    server = WeightsServer()
    rng = random.Random(0)
    files = {name: (weights / name).read_bytes() for name in ("config.json", "preprocessor_config.json",
                                                               "model.safetensors")}
    files.update({"pytorch_model.bin": rng.randbytes(3000), "tf_model.h5": rng.randbytes(100),
                  "README.md": b"# Mask2Former\n"})
    server.add_repo(m2f.REPO, files, lfs=["model.safetensors", "pytorch_model.bin", "tf_model.h5"])
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_ENDPOINT=server.url, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"),
               DYNADIFF_WEIGHTS=str(tmp_path / "weights_root"), TORCH_HOME=str(tmp_path / "torch"))
    yield server, files, work, env
    server.close()


def _prepare(work: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "prepare_weights.py"), "--retries", "0", *args], cwd=work,
                          env=env, capture_output=True, text=True, timeout=120, check=False)


def test_prepare_weights_only_segmenter_fills_the_folder_the_segmenter_reads(hub, images, tmp_path, monkeypatch,
                                                                             one_torch_thread):
    server, files, work, env = hub
    result = _prepare(work, env, "--only", "segmenter")
    assert result.returncode == 0, result.stderr
    monkeypatch.setenv("DYNADIFF_WEIGHTS", env["DYNADIFF_WEIGHTS"])
    folder = m2f.default_weights_dir()
    assert folder == Path(env["DYNADIFF_WEIGHTS"]) / "mask2former-swin-large-coco-panoptic"
    fetched = {p.name for p in folder.iterdir()}
    assert fetched == {"config.json", "preprocessor_config.json", "model.safetensors", ".dynadiff-weights.json"}
    for name in fetched - {".dynadiff-weights.json"}:
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == hashlib.sha256(files[name]).hexdigest()
    assert f"done: segmenter in {folder}" in result.stderr
    assert not (work / "checkpoints").exists() and not (work / "versatile_diffusion").exists()
    assert {r.path for r in server.api_calls() if r.path.startswith("/api/models/")} == {
        f"/api/models/{m2f.REPO}/revision/main"}
    # the segmenter reads them there by default
    maps = m2f.segment_folder(images, tmp_path / "maps", None, "cpu", progress=False)
    assert [p.name for p in maps] == sorted(IMAGES)

    # --verify: offline, each file checked
    closed = {**env, "HF_ENDPOINT": "http://127.0.0.1:9"}
    before = len(server.requests)
    verify = _prepare(work, closed, "--only", "segmenter", "--verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
        assert f"segmenter   ok      {folder / name}  (size, " in verify.stdout, verify.stdout
    assert "3 ok, 0 missing, 0 not the expected file" in verify.stdout
    assert server.requests[before:] == []

    # a rerun downloads nothing; a damaged file is fetched again
    before = len(server.requests)
    again = _prepare(work, env, "--only", "segmenter")
    assert again.returncode == 0, again.stderr
    assert "downloaded 0 file(s) (0 B), 3 already present and valid" in again.stderr
    assert [r for r in server.requests[before:] if r.method == "GET" and not r.path.startswith("/api/")] == []
    (folder / "model.safetensors").write_bytes(b"x" * len(files["model.safetensors"]))
    verify = _prepare(work, closed, "--only", "segmenter", "--verify")
    assert verify.returncode == 1 and "segmenter   BAD     " in verify.stdout
    repaired = _prepare(work, env, "--only", "segmenter")
    assert repaired.returncode == 0, repaired.stderr
    assert (folder / "model.safetensors").read_bytes() == files["model.safetensors"]


def test_the_fetch_command_of_the_error_message_fetches_what_is_missing(hub, images, tmp_path):
    _server, _files, work, env = hub
    custom = tmp_path / "elsewhere" / "m2f"
    with pytest.raises(ConfigError, match="fetch it with `(.*)`") as raised:
        m2f.segment_folder(images, tmp_path / "out", custom, "cpu")
    command = raised.value.args[0].split("fetch it with `")[1].split("`")[0]
    assert command == f"python prepare_weights.py --only segmenter segmenter.path={custom}"
    result = _prepare(work, env, *command.split()[2:])
    assert result.returncode == 0, result.stderr
    assert m2f.check_weights(custom) == custom / "model.safetensors"
    assert not (Path(env["DYNADIFF_WEIGHTS"]) / m2f.FOLDER_NAME).exists()


def test_list_and_groups(hub):
    server, files, work, env = hub
    result = _prepare(work, env, "--only", "segmenter", "--list")
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines() if not line.startswith("#")]
    folder = Path(env["DYNADIFF_WEIGHTS"]) / m2f.FOLDER_NAME
    assert {(int(size), Path(dest).name) for size, _url, dest in rows} == {
        (len(files[n]), n) for n in ("config.json", "preprocessor_config.json", "model.safetensors")}
    assert {Path(dest).parent for _, _, dest in rows} == {folder}
    assert all(url.startswith(f"{server.url}/{m2f.REPO}/resolve/{COMMIT}/") for _, url, _ in rows)
    assert server.gets() == []

    from scripts import load_script

    parse = load_script("prepare_weights").parse_groups
    assert parse(None) == ["checkpoints", "vd", "metrics"]  # not in the default set
    assert parse(["segmenter,vd"]) == ["vd", "segmenter"]
    with pytest.raises(ValueError, match=r"--only takes checkpoints, vd, metrics \(the default set\) or segmenter"):
        parse(["segmentor"])


def test_plan_takes_one_copy_of_the_weights(tmp_path):
    from dynadiff.fetch.config import WeightsFetchConfig
    from dynadiff.fetch.hub import HubFile, HubListing
    from dynadiff.fetch.plan import plan_segmenter

    cfg = WeightsFetchConfig(segmenter={"path": tmp_path / "m2f"})

    def listing(*names: str) -> HubListing:
        return HubListing(m2f.REPO, "main", COMMIT, {n: HubFile(n, 10, None, None) for n in names})

    both = plan_segmenter(cfg, listing("config.json", "preprocessor_config.json", "model.safetensors",
                                       "pytorch_model.bin", "README.md"))
    assert [i.dest.name for i in both.items] == ["config.json", "preprocessor_config.json", "model.safetensors"]
    older = plan_segmenter(cfg, listing("config.json", "preprocessor_config.json", "pytorch_model.bin"))
    assert [i.dest.name for i in older.items] == ["config.json", "preprocessor_config.json", "pytorch_model.bin"]
    assert all(i.dest.parent == tmp_path / "m2f" for i in older.items)
    broken = plan_segmenter(cfg, listing("config.json", "model.safetensors"))
    assert broken.items == [] and broken.errors == [
        (f"{m2f.REPO}@main (commit {COMMIT[:12]}) lacks preprocessor_config.json: check segmenter.repo and "
         "segmenter.revision in config/weights.yaml")]
    unlisted = plan_segmenter(cfg, None)
    assert [dest.name for _, _, dest in unlisted.unlisted] == ["config.json", "preprocessor_config.json",
                                                               "model.safetensors"]
