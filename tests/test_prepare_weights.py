"""prepare_weights.py against a local server playing the Hub (HF_ENDPOINT), download.pytorch.org,
dl.fbaipublicfiles.com and github.com (tests/weights_server.py): tiny files, real layouts, real URLs' paths.

The command runs in a subprocess (huggingface_hub reads HF_ENDPOINT when imported), through the launcher in
weights_server.py, which gives torchvision's files names carrying the SHA-256 prefix of the tiny test files.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from weights_server import COMMIT, WeightsServer

from scripts import default_sigint, load_script

LAUNCHER = Path(__file__).parent / "weights_server.py"
BIG = 1 << 20  # the VD UNet's size here: big enough to stop a transfer half-way (the client reads 256 KiB at a time)


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _free_port() -> int:
    """A port nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Site:
    """The server, what it serves, and where prepare_weights.py (run in ``root``) must put each file."""

    server: WeightsServer
    root: Path
    expected: dict[Path, bytes]  # destination -> content
    not_fetched: list[Path]  # destinations of files the repositories hold that must not be fetched
    urls: dict[str, str]  # short name -> server path
    names: dict[str, str]  # torchvision source -> file name (with its real SHA-256 prefix)
    env: dict[str, str]

    def args(self) -> list[str]:
        url = self.server.url
        return ["checkpoints.subjects=[1,2]", "--retries", "0", f"mirrors.torchvision={url}/tv/",
                f"mirrors.fbaipublicfiles={url}/fb/", f"mirrors.github={url}/gh/"]

    def command(self, *args: str) -> list[str]:
        return [sys.executable, str(LAUNCHER), *self.args(), *args]

    def run(self, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), cwd=self.root, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout, check=False)

    def errors(self, result: subprocess.CompletedProcess) -> list[str]:
        return [line for line in result.stderr.splitlines() if " ERROR " in line]

    def leftovers(self) -> list[Path]:
        return [p for p in self.root.rglob("*") if p.name.endswith((".part", ".unpack", ".zip"))]


@pytest.fixture
def site(tmp_path):
    server = WeightsServer()
    rng = random.Random(0)
    root = tmp_path / "work"
    root.mkdir()
    torch_home, weights = tmp_path / "torch", tmp_path / "weights"
    checkpoints = root / "checkpoints"
    vd = root / "versatile_diffusion"
    expected, not_fetched, urls = {}, [], {}

    # torchvision: the name carries the start of the file's own SHA-256 (computed here, independently)
    names = {}
    for source, stem in (("alexnet", "alexnet-owt"), ("inception", "inception_v3_google"),
                         ("effnet", "efficientnet_b1_rwightman")):
        data = rng.randbytes(3000 + len(stem))
        names[source] = f"{stem}-{_sha256(data)[:8]}.pth"
        urls[source] = f"/tv/{names[source]}"
        server.add_file(urls[source], data)
        expected[torch_home / "hub" / "checkpoints" / names[source]] = data
    swav = rng.randbytes(BIG)  # whole chunks before the break: what a broken transfer keeps
    urls["swav"] = "/fb/deepcluster/swav_800ep_pretrain.pth.tar"
    server.add_file(urls["swav"], swav)
    expected[torch_home / "hub" / "checkpoints" / "swav_800ep_pretrain.pth.tar"] = swav
    dino = rng.randbytes(2500)
    server.add_file("/fb/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth", dino)
    expected[weights / "dreamsim" / "checkpoints" / "dino_vitbase16_pretrain.pth"] = dino
    dreamsim = {"ensemble_lora/adapter_config.json": b'{"r": 16}', "ensemble_lora/adapter_model.safetensors": rng.randbytes(300),
                "dino_vitb16_pretrain.pth": rng.randbytes(200), "clip_vitb16_pretrain.pth.tar": rng.randbytes(210),
                "open_clip_vitb16_pretrain.pth.tar": rng.randbytes(220)}
    urls["dreamsim"] = "/gh/ssundaram21/dreamsim/releases/download/v0.2.0-checkpoints/dreamsim_ensemble_checkpoint.zip"
    server.add_file(urls["dreamsim"], _zip(dreamsim))
    expected.update({weights / "dreamsim" / k: v for k, v in dreamsim.items()})
    dino_repo = {"facebookresearch-dino-7c446df/hubconf.py": b"dependencies = ['torch']\n",
                 "facebookresearch-dino-7c446df/vision_transformer.py": b"# ViT\n"}
    server.add_file("/gh/facebookresearch/dino/zipball/main", _zip(dino_repo))
    expected.update({weights / "dreamsim" / "facebookresearch_dino_main" / k.split("/", 1)[1]: v for k, v in dino_repo.items()})

    # the Hub: subject 1 as the original code names it (sub01/), subject 2 as its README does (subj02/)
    ckpt = {"sub01/checkpoint/mp_rank_00_model_states.pt": rng.randbytes(5000),
            "sub01/checkpoint/zero_pp_rank_0_mp_rank_00_optim_states.pt": rng.randbytes(7000),
            "sub01/latest": b"checkpoint",
            "subj02/checkpoint/mp_rank_00_model_states.pt": rng.randbytes(4000),
            "README.md": b"# Dynadiff\n"}
    server.add_repo("facebook/dynadiff", ckpt, lfs=[k for k in ckpt if k.endswith(".pt")])
    for name, data in ckpt.items():
        if name.startswith("sub01/"):
            expected[checkpoints / "subj01" / name[len("sub01/"):]] = data
        elif name.startswith("subj02/"):
            expected[checkpoints / name] = data
    not_fetched.append(checkpoints / "README.md")
    vd_files = {"model_index.json": b"{}", "image_unet/config.json": b'{"sample_size": 64}',
                "image_unet/diffusion_pytorch_model.safetensors": rng.randbytes(BIG),
                "image_unet/diffusion_pytorch_model.bin": rng.randbytes(900),  # a copy diffusers would not read
                "image_unet/diffusion_pytorch_model.fp16.safetensors": rng.randbytes(500),
                "vae/config.json": b'{"latent_channels": 4}', "vae/diffusion_pytorch_model.bin": rng.randbytes(1500),
                "scheduler/scheduler_config.json": b'{"beta_end": 0.012}',
                "text_unet/config.json": b"{}", "text_unet/diffusion_pytorch_model.bin": rng.randbytes(700),
                "text_encoder/config.json": b"{}", "text_encoder/pytorch_model.bin": rng.randbytes(600)}
    server.add_repo("shi-labs/versatile-diffusion", vd_files, lfs=[k for k in vd_files if "diffusion_pytorch_model" in k
                                                                   or k.endswith(".bin")])
    for name in ("image_unet/config.json", "image_unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "vae/diffusion_pytorch_model.bin", "scheduler/scheduler_config.json"):
        expected[vd / name] = vd_files[name]
    not_fetched += [vd / name for name in vd_files if vd / name not in expected]
    urls["unet"] = f"/lfs/{_sha256(vd_files['image_unet/diffusion_pytorch_model.safetensors'])}"
    urls["vae"] = f"/lfs/{_sha256(vd_files['vae/diffusion_pytorch_model.bin'])}"
    clip = {"config.json": b'{"projection_dim": 768}', "model.safetensors": rng.randbytes(2000),
            "pytorch_model.bin": rng.randbytes(2000), "tf_model.h5": rng.randbytes(100), "tokenizer.json": b"{}"}
    server.add_repo("openai/clip-vit-large-patch14", clip, lfs=["model.safetensors", "pytorch_model.bin", "tf_model.h5"])
    expected[weights / "clip-vit-large-patch14" / "config.json"] = clip["config.json"]
    expected[weights / "clip-vit-large-patch14" / "model.safetensors"] = clip["model.safetensors"]
    not_fetched += [weights / "clip-vit-large-patch14" / n for n in ("pytorch_model.bin", "tf_model.h5", "tokenizer.json")]

    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_ENDPOINT=server.url, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"),
               TORCH_HOME=str(torch_home), DYNADIFF_WEIGHTS=str(weights), FAKE_TORCHVISION_FILES=json.dumps(names))
    yield Site(server, root, expected, not_fetched, urls, names, env)
    server.close()


def _group(site: Site, path: Path) -> str:
    rel = path.relative_to(site.root.parent).parts
    return {"checkpoints": "checkpoints", "versatile_diffusion": "vd"}.get(rel[1], "metrics") if rel[0] == "work" else "metrics"


def _content_ok(site: Site, group: str | None = None) -> dict[Path, str]:
    """Each expected destination (of ``group``) whose file is missing or differs, with why (hashlib on both sides)."""
    bad = {}
    for path, data in site.expected.items():
        if group is not None and _group(site, path) != group:
            continue
        if not path.is_file():
            bad[path] = "missing"
        elif _sha256(path.read_bytes()) != _sha256(data):
            bad[path] = "differs"
    return bad


# ----------------------------------------------------------------------------- fetching


def test_full_fetch_puts_every_file_where_eval_and_the_metrics_read_it(site, monkeypatch):
    result = site.run()
    assert result.returncode == 0, result.stderr
    assert _content_ok(site) == {}
    assert not [p for p in site.not_fetched if p.exists()]
    assert site.leftovers() == []
    assert "subject 1: folder sub01/ of facebook/dynadiff (3 file(s)" in result.stderr
    assert "subject 2: folder subj02/ of facebook/dynadiff (1 file(s)" in result.stderr
    # nothing written but the files and one manifest per folder
    written = {p for p in site.root.parent.rglob("*") if p.is_file() and "hf_home" not in p.parts}
    manifests = {p for p in written if p.name == ".dynadiff-weights.json"}
    assert written - manifests == set(site.expected)
    assert len(manifests) == 5
    # where eval.py, train.py and the metric code look
    from dynadiff.decoder import default_checkpoint
    from dynadiff.metrics import weights as W
    from dynadiff.metrics.config import MetricsWeightsConfig

    monkeypatch.chdir(site.root)  # where the command ran: eval.py run from there finds the checkpoints
    for subject in (1, 2):
        assert default_checkpoint(subject) == Path(f"checkpoints/subj{subject:02d}")
        assert (default_checkpoint(subject) / "checkpoint" / "mp_rank_00_model_states.pt").is_file()
    for name, tiny in site.names.items():
        monkeypatch.setitem(W.TORCHVISION_FILES, name, tiny)
    config = MetricsWeightsConfig(torch_home=Path(site.env["TORCH_HOME"]), weights_dir=Path(site.env["DYNADIFF_WEIGHTS"]))
    for source in ("alexnet", "inception", "effnet", "swav", "clip", "dreamsim"):
        status = W.source_status(source, config)
        assert status.present, status.problem
        if source in site.names:
            W.verify_torchvision_hash(status.path)
    vd = site.root / "versatile_diffusion"
    for sub, cfg in (("image_unet", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        assert (vd / sub / cfg).is_file()  # what dynadiff.models.vd.check_vd_folder asks for


def test_second_run_downloads_nothing_and_a_pinned_one_sends_no_request(site):
    assert site.run().returncode == 0
    first = len(site.server.requests)
    result = site.run()
    assert result.returncode == 0, result.stderr
    again = site.server.requests[first:]
    assert [r for r in again if r.method == "GET" and not r.path.startswith("/api/")] == []
    assert {r.path for r in again if r.path.startswith("/api/models/")} == {
        "/api/models/facebook/dynadiff/revision/main", "/api/models/shi-labs/versatile-diffusion/revision/main",
        "/api/models/openai/clip-vit-large-patch14/revision/main"}
    assert "downloaded 0 file(s) (0 B), 18 already present and valid" in result.stderr
    # revisions pinned to the commit the first run recorded: the listings come from the manifests, no request at all
    second = len(site.server.requests)
    result = site.run(f"checkpoints.revision={COMMIT}", f"versatilediffusion_config.revision={COMMIT}",
                      f"metrics.clip_revision={COMMIT}")
    assert result.returncode == 0, result.stderr
    assert site.server.requests[second:] == []
    assert _content_ok(site) == {}


def test_kill_mid_file_then_rerun_requests_only_the_rest(site):
    dest = site.root / "versatile_diffusion" / "image_unet" / "diffusion_pytorch_model.safetensors"
    part = dest.with_name(f".{dest.name}.part")
    half = BIG // 2
    site.server.fault(site.urls["unet"], stall_at=half)
    proc = subprocess.Popen(site.command("--only", "vd"), cwd=site.root, env=site.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (part.is_file() and part.stat().st_size >= half):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.05)
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not dest.exists()  # never a partial file under the final name
    assert part.stat().st_size == half
    site.server.release()
    before = len(site.server.requests)
    result = site.run("--only", "vd")
    assert result.returncode == 0, result.stderr
    unet_gets = [r for r in site.server.requests[before:] if r.method == "GET" and r.path == site.urls["unet"]]
    assert [r.range for r in unet_gets] == [f"bytes={half}-"]
    assert "resuming" in result.stderr and f"from byte {half}" in result.stderr
    assert _sha256(dest.read_bytes()) == _sha256(site.expected[dest])
    assert not part.exists()


def test_ctrl_c_keeps_the_partial_file_and_says_how_to_resume(site):
    dest = site.root / "versatile_diffusion" / "image_unet" / "diffusion_pytorch_model.safetensors"
    part = dest.with_name(f".{dest.name}.part")
    site.server.fault(site.urls["unet"], stall_at=BIG // 2)
    proc = subprocess.Popen(site.command("--only", "vd"), cwd=site.root, env=site.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 60
        while not (part.is_file() and part.stat().st_size >= BIG // 2):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1].endswith("ERROR prepare_weights: interrupted: complete files are kept, partial "
                                                 "ones as .part files; run the same command again to resume")
    assert not dest.exists() and part.stat().st_size == BIG // 2
    assert (site.root / "versatile_diffusion" / "image_unet" / "config.json").is_file()  # fetched before: kept


def test_only_takes_repeats_and_comma_lists():
    parse = load_script("prepare_weights").parse_groups
    assert parse(None) == ["checkpoints", "vd", "metrics"]
    assert parse(["metrics,vd"]) == ["vd", "metrics"]
    assert parse(["metrics", "checkpoints"]) == ["checkpoints", "metrics"]
    with pytest.raises(ValueError, match=r"--only takes checkpoints, vd, metrics .*got 'vd,weights'"):
        parse(["vd,weights"])


def test_broken_transfer_resumes_with_a_range_request_in_the_same_run(site):
    site.server.fault(site.urls["swav"], truncate=True)
    result = site.run("--only", "metrics", "--retries", "1")
    assert result.returncode == 0, result.stderr
    size = len(site.server.files[site.urls["swav"]])
    gets = [r for r in site.server.gets(site.urls["swav"])]
    assert [r.range for r in gets] == [None, f"bytes={size // 2}-"]
    assert "retry 1/1" in result.stderr
    assert _content_ok(site, "metrics") == {}
    assert not (site.root / "checkpoints").exists() and not (site.root / "versatile_diffusion").exists()


def test_corrupt_or_truncated_files_are_replaced(site):
    assert site.run().returncode == 0
    torch_ckpt = Path(site.env["TORCH_HOME"]) / "hub" / "checkpoints"
    alexnet = torch_ckpt / site.names["alexnet"]
    alexnet.write_bytes(bytes(len(site.expected[alexnet])))  # same size, other bytes: only a hash sees it
    vae = site.root / "versatile_diffusion" / "vae" / "diffusion_pytorch_model.bin"
    vae.write_bytes(site.expected[vae][:100])  # truncated
    swav = torch_ckpt / "swav_800ep_pretrain.pth.tar"
    swav.write_bytes(site.expected[swav][::-1])  # no published hash: the one recorded at download
    before = len(site.server.requests)
    result = site.run()
    assert result.returncode == 0, result.stderr
    fetched = {r.path for r in site.server.requests[before:] if r.method == "GET" and not r.path.startswith("/api/")}
    assert fetched == {site.urls["alexnet"], site.urls["swav"], site.urls["vae"],
                       f"/shi-labs/versatile-diffusion/resolve/{COMMIT}/vae/diffusion_pytorch_model.bin"}
    prefix = site.names["alexnet"].rsplit("-", 1)[1].split(".")[0]
    assert re.search(rf"alexnet-owt-\w+\.pth is not the expected file \(its SHA-256 starts with \w{{8}}, expected {prefix}\)",
                     result.stderr)
    assert "diffusion_pytorch_model.bin is not the expected file (its size is 100 bytes, expected 1500)" in result.stderr
    assert "swav_800ep_pretrain.pth.tar is not the expected file (it changed since it was downloaded" in result.stderr
    assert _content_ok(site) == {}


def test_dual_attention_adds_the_text_unet(site):
    result = site.run("--only", "vd", "--dual-attention")
    assert result.returncode == 0, result.stderr
    text_unet = site.root / "versatile_diffusion" / "text_unet"
    assert sorted(p.name for p in text_unet.iterdir()) == ["config.json", "diffusion_pytorch_model.bin"]
    assert not (site.root / "versatile_diffusion" / "text_encoder").exists()


def test_hf_token_and_hf_home_are_honoured(site, tmp_path):
    site.server.repos["facebook/dynadiff"].token = "hf_secret"
    refused = site.run("--only", "checkpoints")
    assert refused.returncode == 1
    assert site.errors(refused) and "no token is set" in site.errors(refused)[0]
    result = site.run("--only", "checkpoints", env={"HF_TOKEN": "hf_secret"})
    assert result.returncode == 0, result.stderr
    assert {r.authorization for r in site.server.requests if "dynadiff" in r.path} >= {"Bearer hf_secret"}
    home = tmp_path / "other_hf_home"  # the token file `hf auth login` writes under HF_HOME
    home.mkdir()
    (home / "token").write_text("hf_secret")
    for f in (site.root / "checkpoints").rglob("*"):
        if f.is_file():
            f.unlink()
    result = site.run("--only", "checkpoints", env={"HF_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    assert _content_ok(site, "checkpoints") == {}


# ----------------------------------------------------------------------------- errors


ERROR_CASES = {
    # case: (what it changes, --only group, regex of the one ERROR line, a destination that must stay absent)
    "http_500": ("fault:alexnet:500", "metrics", (
        r"alexnet: alexnet-owt-\w+\.pth: giving up on http://127\.0\.0\.1:\d+/tv/alexnet-owt-\w+\.pth after 1 "
        r"attempt\(s\): HTTP 500 Internal Server Error; the server is failing: try again later, or check "
        r"mirrors\.torchvision = http://127\.0\.0\.1:\d+/tv/$"), "alexnet"),
    "http_404": ("fault:swav:404", "metrics", (
        r"swav: swav_800ep_pretrain\.pth\.tar: http://127\.0\.0\.1:\d+/fb/deepcluster/swav_800ep_pretrain\.pth\.tar "
        r"answered HTTP 404 Not Found: not found: check mirrors\.fbaipublicfiles = http://127\.0\.0\.1:\d+/fb/$"), "swav"),
    "hash_mismatch": ("wrong-name:effnet", "metrics", (
        r"effnet: efficientnet_b1_rwightman-00000000\.pth: the file downloaded from http://127\.0\.0\.1:\d+/tv/"
        r"efficientnet_b1_rwightman-00000000\.pth is not the expected one: its SHA-256 starts with \w{8}, "
        r"expected 00000000; it was deleted\. The server serves another file: try again, or check "
        r"mirrors\.torchvision = "), "effnet"),
    "private_repo": ("token:facebook/dynadiff", "checkpoints", (
        r"facebook/dynadiff@main: access refused \(HTTP 401\) by http://127\.0\.0\.1:\d+: the repository is "
        r"gated or private \(no token is set\): accept its terms on http://127\.0\.0\.1:\d+/facebook/dynadiff "
        r"while logged in, then set HF_TOKEN to a read token of that account; if the name is wrong, fix it "
        r"in config/weights\.yaml$"), "subj01"),
    "gated_repo": ("gated:shi-labs/versatile-diffusion", "vd", (
        r"versatile_diffusion/image_unet/diffusion_pytorch_model\.safetensors: http://127\.0\.0\.1:\d+/shi-labs/"
        r"versatile-diffusion/resolve/0123456789abcdef0123456789abcdef01234567/image_unet/diffusion_pytorch_model"
        r"\.safetensors answered HTTP 401 Unauthorized: the repository is gated or private \(no token is set\): "
        r"accept its terms on http://127\.0\.0\.1:\d+/shi-labs/versatile-diffusion while logged in, then set "
        r"HF_TOKEN to a read token of that account$"), "unet"),
    "hub_refused": ("env:HF_ENDPOINT=closed", "vd", (
        r"shi-labs/versatile-diffusion@main: giving up after 1 attempt\(s\): cannot reach "
        r"http://127\.0\.0\.1:\d+ \(Connection refused\): check the network, proxy \(HTTPS_PROXY\) and "
        r"HF_ENDPOINT, or try again later$"), "unet"),
    "mirror_refused": ("arg:mirrors.fbaipublicfiles=closed", "metrics", (
        r"swav: swav_800ep_pretrain\.pth\.tar: giving up on http://127\.0\.0\.1:\d+/deepcluster/"
        r"swav_800ep_pretrain\.pth\.tar after 1 attempt\(s\): Connection refused; check the network, the "
        r"proxy \(HTTPS_PROXY\) and mirrors\.fbaipublicfiles = http://127\.0\.0\.1:\d+/$"), "swav"),
    "no_repo": ("arg:checkpoints.repo=facebook/nothing", "checkpoints", (
        r"no repository facebook/nothing at http://127\.0\.0\.1:\d+ \(HTTP 404\): check its name in "
        r"config/weights\.yaml, and HF_ENDPOINT$"), "subj01"),
    "no_revision": ("arg:versatilediffusion_config.revision=v9", "vd", (
        r"shi-labs/versatile-diffusion has no revision 'v9' at http://127\.0\.0\.1:\d+: check "
        r"versatilediffusion_config\.revision \(a branch, tag or commit hash of the repository\)$"), "unet"),
    "no_subject_folder": ("arg:checkpoints.subjects=[5]", "checkpoints", (
        r"facebook/dynadiff@main \(commit 0123456789ab\) has no folder subj05/ or sub05/ for subject 5 "
        r"\(its folders: sub01/, subj02/\): check checkpoints\.repo and checkpoints\.revision in "
        r"config/weights\.yaml$"), None),
    "folder_is_a_file": ("arg:checkpoints.dir=a_file", "checkpoints", (
        r"checkpoints: cannot write into a_file \(File exists\): choose another folder \(--checkpoints-dir\)$"), None),
    "hub_offline": ("env:HF_HUB_OFFLINE=1", "vd", (
        r"shi-labs/versatile-diffusion: HF_HUB_OFFLINE \(or TRANSFORMERS_OFFLINE\) is set: unset it to "
        r"download from the Hub$"), "unet"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_each_fault_is_one_clear_line_and_leaves_nothing_under_the_final_name(site, case):
    change, group, pattern, absent = ERROR_CASES[case]
    kind, _, what = change.partition(":")
    args, env = ["--only", group], {}
    closed = f"http://127.0.0.1:{_free_port()}"
    if kind == "fault":
        name, status = what.split(":")
        site.server.fault(site.urls[name], status=int(status))
    elif kind == "wrong-name":  # a name whose hash prefix the served file does not have
        wrong = re.sub(r"-\w+\.pth$", "-00000000.pth", site.names[what])
        site.server.add_file(f"/tv/{wrong}", site.server.files[site.urls[what]])
        site.env["FAKE_TORCHVISION_FILES"] = json.dumps({**site.names, what: wrong})
        site.names[what] = wrong
    elif kind == "token":
        site.server.repos[what].token = "hf_secret"
    elif kind == "gated":
        site.server.repos[what].gated = "hf_secret"
    elif kind == "env":
        key, value = what.split("=")
        env[key] = closed if value == "closed" else value
    elif kind == "arg":
        key, value = what.split("=")
        if value == "a_file":
            (site.root / "a_file").write_text("not a folder")
        args.append(f"{key}={closed + '/' if value == 'closed' else value}")
    result = site.run(*args, env=env)
    assert result.returncode == 1, result.stderr
    errors = site.errors(result)
    matching = [e for e in errors if re.search(pattern, e)]
    assert len(matching) == 1, errors
    problems = {"gated_repo": 5, "mirror_refused": 2}.get(case, 1)  # one per file of the gated repo, per file of the mirror
    assert len(errors) == problems + 1 and f"{problems} problem(s), each said above" in errors[-1], errors
    targets = {"alexnet": Path(site.env["TORCH_HOME"]) / "hub" / "checkpoints" / site.names["alexnet"],
               "effnet": Path(site.env["TORCH_HOME"]) / "hub" / "checkpoints" / site.names["effnet"],
               "swav": Path(site.env["TORCH_HOME"]) / "hub" / "checkpoints" / "swav_800ep_pretrain.pth.tar",
               "subj01": site.root / "checkpoints" / "subj01",
               "unet": site.root / "versatile_diffusion" / "image_unet" / "diffusion_pytorch_model.safetensors"}
    if absent is not None:
        assert not targets[absent].exists()
    assert site.leftovers() == []
    if group == "metrics":  # the other networks are still fetched
        assert (Path(site.env["DYNADIFF_WEIGHTS"]) / "dreamsim" / "facebookresearch_dino_main" / "hubconf.py").is_file()


def test_an_unreachable_server_gets_one_attempt_for_its_other_files(site):
    closed = f"http://127.0.0.1:{_free_port()}/"
    result = site.run("--only", "metrics", "--retries", "1", f"mirrors.fbaipublicfiles={closed}")
    assert result.returncode == 1
    # SwAV: the first file of that server, retried once; DINO's weights, from the same server: one attempt
    assert re.findall(r"retry \d/\d", result.stderr) == ["retry 1/1"]
    errors = site.errors(result)
    assert re.search(r"swav_800ep_pretrain\.pth\.tar after 2 attempt\(s\): Connection refused", errors[0])
    assert re.search(r"dino_vitbase16_pretrain\.pth after 1 attempt\(s\): Connection refused", errors[1])
    assert _content_ok(site, "metrics").keys() == {
        Path(site.env["TORCH_HOME"]) / "hub" / "checkpoints" / "swav_800ep_pretrain.pth.tar",
        Path(site.env["DYNADIFF_WEIGHTS"]) / "dreamsim" / "checkpoints" / "dino_vitbase16_pretrain.pth"}


USAGE_CASES = {
    "unknown_group": (["--only", "weights"], r"--only takes checkpoints, vd, metrics"),
    "bad_subject": (["--subjects", "3"], r"argument --subjects: invalid choice: 3"),
    "flag_outside_only": (["--only", "vd", "--subjects", "1"],
                          r"--subjects is about the checkpoints group, which --only leaves out: add --only checkpoints"),
    "negative_retries": (["--retries", "-1"], r"--retries must be >= 0, got -1"),
    "list_and_verify": (["--list", "--verify"], r"argument --verify: not allowed with argument --list"),
    "unknown_key": (["nonsense.key=1"], r"unknown config key 'nonsense.key': allowed keys at the top level are"),
    "bad_mirror": (["mirrors.torchvision=ftp://mirror/"], r"invalid value for 'mirrors.torchvision': a base URL starts with http"),
    "bad_subject_key": (["checkpoints.subjects=[3]"], r"published checkpoints exist for subjects \[1, 2, 5, 7\] only"),
    "bad_revision": (["metrics.clip_revision=a b"], r"invalid value for 'metrics.clip_revision': a revision is"),
    "missing_config": (["--config", "no/such.yaml"], r"config file no/such.yaml does not exist"),
}


@pytest.mark.parametrize("case", list(USAGE_CASES))
def test_usage_errors_exit_2_before_any_request(case, capsys, caplog, tmp_path, monkeypatch):
    argv, pattern = USAGE_CASES[case]
    monkeypatch.chdir(tmp_path)
    main = load_script("prepare_weights").main
    with caplog.at_level(logging.ERROR):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    assert code == 2
    said = capsys.readouterr().err + caplog.text
    assert re.search(pattern, said), said
    assert list(tmp_path.iterdir()) == []  # nothing written


# ----------------------------------------------------------------------------- --list and --verify


def test_list_prints_url_size_and_destination_of_every_file(site):
    result = site.run("--list")
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines() if not line.startswith("#")]
    assert all(len(r) == 3 for r in rows), rows
    listed = {Path(dest): (int(size), url) for size, url, dest in rows}
    by_dest = {}
    for path, data in site.expected.items():
        if "dreamsim" in path.parts and path.name != "dino_vitbase16_pretrain.pth":
            continue  # inside the two archives, listed as archives
        by_dest[path] = data
    zips = {Path(site.env["DYNADIFF_WEIGHTS"]) / "dreamsim" / "dreamsim_ensemble_checkpoint.zip": site.urls["dreamsim"],
            Path(site.env["DYNADIFF_WEIGHTS"]) / "dreamsim" / "facebookresearch_dino_main.zip": "/gh/facebookresearch/dino/zipball/main"}
    absolute = {(p if p.is_absolute() else site.root / p): v for p, v in listed.items()}
    assert set(absolute) == set(by_dest) | set(zips)
    for path, data in by_dest.items():
        size, url = absolute[path]
        assert size == len(data)  # from the Hub listing, or a HEAD request
        assert url.startswith(site.server.url)
    for path, server_path in zips.items():
        assert absolute[path] == (len(site.server.files[server_path]), site.server.url + server_path)
    assert "# shi-labs/versatile-diffusion revision main = commit " + COMMIT in result.stdout
    assert site.server.gets() == []  # nothing downloaded
    assert not (site.root / "checkpoints").exists()


def test_list_offline_says_unknown_and_still_names_every_source(site):
    closed = f"http://127.0.0.1:{_free_port()}"
    result = site.run("--list", f"mirrors.torchvision={closed}/", f"mirrors.fbaipublicfiles={closed}/",
                      f"mirrors.github={closed}/", env={"HF_ENDPOINT": closed})
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines() if not line.startswith("#")]
    assert rows and {r[0] for r in rows} == {"unknown"}
    urls = [r[1] for r in rows]
    assert f"{closed}/facebook/dynadiff/resolve/main/subj01/* (or sub01/*)" in urls
    assert f"{closed}/shi-labs/versatile-diffusion/resolve/main/image_unet/*" in urls
    assert f"{closed}/openai/clip-vit-large-patch14/resolve/main/model.safetensors" in urls
    assert f"{closed}/deepcluster/swav_800ep_pretrain.pth.tar" in urls
    assert result.stdout.count("# could not list: ") == 3
    assert site.server.requests == []


def test_verify_is_offline_and_reports_missing_and_damaged_files(site):
    empty = site.run("--verify")
    assert empty.returncode == 1
    assert "0 ok, 14 missing" in empty.stdout
    assert site.server.requests == []
    assert site.run().returncode == 0
    closed = {"HF_ENDPOINT": f"http://127.0.0.1:{_free_port()}"}
    before = len(site.server.requests)
    result = site.run("--verify", env=closed)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "18 ok, 0 missing, 0 not the expected file" in result.stdout
    assert re.search(r"checkpoints ok +checkpoints/subj01/checkpoint/mp_rank_00_model_states.pt +\(size, SHA-256\)",
                     result.stdout)
    assert site.server.requests[before:] == []
    unet = site.root / "versatile_diffusion" / "image_unet" / "diffusion_pytorch_model.safetensors"
    unet.unlink()
    unet.with_name(f".{unet.name}.part").write_bytes(site.expected[unet][:1000])
    config = site.root / "checkpoints" / "subj01" / "latest"
    config.write_bytes(b"checkpoinT")  # same size, other content
    result = site.run("--verify", env=closed)
    assert result.returncode == 1
    assert re.search(r"vd +MISSING versatile_diffusion/image_unet/diffusion_pytorch_model.safetensors +\(1000 B partly "
                     r"downloaded \(\.diffusion_pytorch_model\.safetensors\.part\): run prepare_weights\.py to resume\)",
                     result.stdout), result.stdout
    assert re.search(r"checkpoints BAD +checkpoints/subj01/latest +\(its git blob hash is \w+\.\.\., expected "
                     + hashlib.sha1(b"blob 10\0checkpoint").hexdigest()[:12], result.stdout), result.stdout
    assert "16 ok, 1 missing, 1 not the expected file" in result.stdout
    assert site.server.requests[before:] == []


# ----------------------------------------------------------------------------- the downloader and the catalogue


@pytest.fixture
def server():
    s = WeightsServer()
    yield s
    s.close()


def test_a_stale_part_of_another_file_is_started_over(server, tmp_path, caplog):
    from dynadiff.fetch.http import Expected, download

    data = random.Random(1).randbytes(5000)
    url = server.add_file("/f.bin", data)
    dest = tmp_path / "f.bin"
    (tmp_path / ".f.bin.part").write_bytes(b"x" * 1000)  # not a prefix of the file
    with caplog.at_level(logging.WARNING):
        got = download(url, dest, label="f", expected=Expected(size=5000, sha256=_sha256(data)), progress=False)
    assert [r.range for r in server.gets()] == ["bytes=1000-", None]
    assert "the resumed download is not the expected file" in caplog.text
    assert dest.read_bytes() == data and got.digests["sha256"] == _sha256(data)
    assert not (tmp_path / ".f.bin.part").exists()


def test_a_server_ignoring_range_gives_the_whole_file_again(server, tmp_path):
    from dynadiff.fetch.http import download

    data = random.Random(2).randbytes(3000)
    url = server.add_file("/g.bin", data)
    server.fault("/g.bin", ignore_range=True)
    (tmp_path / ".g.bin.part").write_bytes(data[:1200])
    got = download(url, tmp_path / "g.bin", label="g", progress=False)
    assert (tmp_path / "g.bin").read_bytes() == data
    assert got.bytes_fetched == 3000 and [r.range for r in server.gets()] == ["bytes=1200-"]


def test_a_second_writer_of_the_same_file_is_refused(server, tmp_path):
    from dynadiff.fetch.http import FetchError, download

    url = server.add_file("/h.bin", b"h" * 100)
    with open(tmp_path / ".h.bin.part", "ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(FetchError, match=r"h: .*\.h\.bin\.part is being written by another process"):
            download(url, tmp_path / "h.bin", label="h", progress=False)
    assert server.requests == [] and not (tmp_path / "h.bin").exists()


def test_archives_with_escaping_members_or_damage_are_refused(tmp_path):
    from dynadiff.fetch.archive import unpack
    from dynadiff.fetch.http import FetchError

    dest = tmp_path / "cache"
    dest.mkdir()
    evil = dest / "evil.zip"
    evil.write_bytes(_zip({"../outside.txt": b"x"}))
    with pytest.raises(FetchError, match=r"refusing .*evil\.zip: member '\.\./outside\.txt' would be unpacked outside"):
        unpack(evil, dest, "zip", "dreamsim")
    assert not (tmp_path / "outside.txt").exists()
    broken = dest / "broken.zip"
    broken.write_bytes(_zip({"a.txt": b"a" * 100})[:-30])
    with pytest.raises(FetchError, match=r"broken\.zip is not a readable zip archive .*: deleted; run again"):
        unpack(broken, dest, "zip", "dreamsim")
    assert not broken.exists() and sorted(p.name for p in dest.iterdir()) == ["evil.zip"]


def test_one_catalogue_for_the_metric_code_and_the_fetcher(tmp_path):
    import importlib.util
    import runpy

    from dynadiff.fetch.config import Mirrors
    from dynadiff.metrics import weights as W
    from dynadiff.metrics.config import MetricsWeightsConfig

    config = MetricsWeightsConfig(torch_home=tmp_path / "t", weights_dir=tmp_path / "w")
    for source in ("alexnet", "inception", "effnet", "swav"):
        (remote,) = W.remote_files(source, config)
        assert remote.dest == W.source_status(source, config).path  # fetched where it is looked for
    remote = W.remote_files("dreamsim", config)
    provided = [f"{os.path.relpath(r.dest, config.resolved_dreamsim_cache())}/{p}".removeprefix("./")
                for r in remote for p in (r.provides or ("",))]
    assert sorted(p.rstrip("/") for p in provided) == sorted(W.DREAMSIM_FILES)
    # the URLs the installed packages themselves would download (read from their sources: importing them takes long)
    dreamsim_dir = Path(importlib.util.find_spec("dreamsim").submodule_search_locations[0])
    assert W.DREAMSIM_URL == runpy.run_path(str(dreamsim_dir / "config.py"))["dreamsim_weights"]["ensemble"]
    hub_source = (Path(importlib.util.find_spec("torch").submodule_search_locations[0]) / "hub.py").read_text()
    archive = re.search(r'def _git_archive_link\(repo_owner, repo_name, ref\):.*?return f"([^"]+)"', hub_source, re.DOTALL)
    assert W.DINO_REPO_URL == archive.group(1).format(repo_owner="facebookresearch", repo_name="dino", ref="main")
    assert W.remote_files("alexnet", config)[0].sha256_prefix == "7be5be79"
    mirrors = Mirrors(torchvision="http://mirror.example/tv")
    assert mirrors.apply(W.TORCHVISION_URL + "a.pth") == "http://mirror.example/tv/a.pth"
    assert mirrors.apply(W.SWAV_URL) == W.SWAV_URL
    assert W.prepare_command(MetricsWeightsConfig(torch_home=Path("/t"))) == "python prepare_weights.py --only metrics --torch-home /t"
