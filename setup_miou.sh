#!/usr/bin/env bash
# Builds the separate environment of the mIoU segmenter (miou/README.md): ViT-Adapter's Mask2Former
# BEiT-v2-L on COCO-Stuff-164k needs Python 3.7, torch 1.9.0+cu111, mmcv-full 1.4.2, mmdet 2.22.0,
# mmsegmentation 0.20.2 and a compiled CUDA op, which cannot live in .venv. Six steps, each skipped when
# already done: conda env, pinned packages, ViT-Adapter's code, checkpoint, deformable-attention op, self-check.
set -euo pipefail

here=${BASH_SOURCE[0]}
[[ $here == */* ]] || here=./$here
ROOT=$(cd "${here%/*}" && pwd)
PY_VERSION=3.7
VIT_ADAPTER_REPO=${MIOU_VIT_ADAPTER_REPO:-https://github.com/czczup/ViT-Adapter.git}
# The newest commit of ViT-Adapter (2025-06-03); its segmentation code is that of v0.3.1's models.
VIT_ADAPTER_COMMIT=fd64a5190f9f4530e8e5961cc87b2a3ad591190b
MODEL=mask2former_beitv2_adapter_large_896_80k_cocostuff164k
CONFIG_IN_REPO=segmentation/configs/coco_stuff164k/${MODEL}_ss.py
# ViT-Adapter's segmentation/README.md, COCO-Stuff-164K table, BEiTv2-L row (52.3 mIoU): a zip holding the .pth.
CKPT_URL=${MIOU_CKPT_URL:-https://github.com/czczup/ViT-Adapter/releases/download/v0.3.1/$MODEL.zip}
CKPT_SHA256=${MIOU_CKPT_SHA256:-}  # no published digest: set it to check the downloaded file
TORCH_INDEX=https://download.pytorch.org/whl/torch_stable.html
MMCV_INDEX=https://download.openmmlab.com/mmcv/dist/cu111/torch1.9.0/index.html
# ViT-Adapter's segmentation/README.md pins, plus the last versions of their dependencies for Python 3.7
# (yapf 0.40.2 dropped an argument mmcv 1.4.2's Config uses; scipy: ViT-Adapter's Mask2Former assigner).
PINS=(torch==1.9.0+cu111 torchvision==0.10.0+cu111 mmcv-full==1.4.2 mmdet==2.22.0 mmsegmentation==0.20.2
      timm==0.4.12 numpy==1.21.6 scipy==1.7.3 yapf==0.40.1 opencv-python==4.5.5.64)

USAGE="Usage: ./setup_miou.sh [--prefix DIR] [--vit-adapter DIR] [--weights DIR] [--check] [--help]

Builds the environment of eval.py --compute-miou's segmenter (miou/README.md):
  1. a conda environment with Python $PY_VERSION      --prefix DIR       (\$MIOU_ENV, default miou/env)
  2. the pinned packages: ${PINS[*]}
  3. ViT-Adapter's code at commit ${VIT_ADAPTER_COMMIT:0:7}  --vit-adapter DIR  (\$MIOU_VIT_ADAPTER, default miou/ViT-Adapter)
  4. the checkpoint $MODEL.pth
                                                     --weights DIR      (\$MIOU_WEIGHTS, default miou/weights)
  5. ViT-Adapter's deformable-attention CUDA op, compiled (needs nvcc, g++ and a visible GPU)
  6. a self-check: miou/env/bin/python miou/segment.py --self-check
Each step is skipped when already done: run it again after a failure.

  --check   only report what is present and missing (exit 1 if anything is); change nothing
  --help    this text

Environment: MIOU_CONDA (conda, mamba or micromamba executable), CUDA_HOME (the CUDA 11.1 toolkit),
MIOU_CKPT_URL (another place to download the checkpoint from), MIOU_CKPT_SHA256 (its expected SHA-256),
MIOU_VIT_ADAPTER_REPO (another place to fetch ViT-Adapter's commit from: a mirror, a local clone)."

say() { printf 'setup_miou.sh: %s\n' "$*"; }
warn() { printf 'setup_miou.sh: warning: %s\n' "$*" >&2; }
die() { printf 'setup_miou.sh: error: %s\n' "$*" >&2; exit 1; }
usage_error() { printf 'setup_miou.sh: error: %s (see --help)\n' "$*" >&2; exit 2; }
abspath() { case $1 in /*) printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }

PREFIX=${MIOU_ENV:-$ROOT/miou/env}
VIT=${MIOU_VIT_ADAPTER:-$ROOT/miou/ViT-Adapter}
WEIGHTS=${MIOU_WEIGHTS:-$ROOT/miou/weights}
CHECK_ONLY=0
while (($#)); do
    case $1 in
        --prefix|--vit-adapter|--weights)
            (($# >= 2)) && [[ -n $2 ]] || usage_error "$1 needs a folder"
            case $1 in --prefix) PREFIX=$2 ;; --vit-adapter) VIT=$2 ;; --weights) WEIGHTS=$2 ;; esac
            shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --vit-adapter=*) VIT=${1#*=}; shift ;;
        --weights=*) WEIGHTS=${1#*=}; shift ;;
        --check) CHECK_ONLY=1; shift ;;
        -h|--help) printf '%s\n' "$USAGE"; exit 0 ;;
        *) usage_error "unknown argument $1" ;;
    esac
done
for v in PREFIX VIT WEIGHTS; do [[ -n ${!v} ]] || usage_error "empty folder for $v"; done
PREFIX=$(abspath "$PREFIX"); VIT=$(abspath "$VIT"); WEIGHTS=$(abspath "$WEIGHTS")
PY=$PREFIX/bin/python
CKPT=$WEIGHTS/$MODEL.pth
CKPT_ZIP=$WEIGHTS/$MODEL.zip
SEGMENT=$ROOT/miou/segment.py

# The environment's Python must see only its own packages: not this shell's PYTHONPATH (another Python's),
# nor ~/.local. It writes no bytecode, so that --check changes nothing.
unset PYTHONPATH PYTHONHOME
export PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1
envpy() { "$PY" "$@"; }

# Paths a step is making: removed if the script stops before the step ends (failure, Ctrl-C).
IN_PROGRESS=()
cleanup() {
    local p
    for p in "${IN_PROGRESS[@]+"${IN_PROGRESS[@]}"}"; do rm -rf -- "$p"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- what is there -------------------------------------------------------------------------------------------

ENV_PROBLEM=""
env_ok() {  # the prefix holds Python 3.7 (sets ENV_PROBLEM when the prefix is something else)
    ENV_PROBLEM=""
    [[ -e $PREFIX ]] || return 1
    if [[ ! -x $PY ]]; then
        ENV_PROBLEM="$PREFIX exists but has no bin/python: remove it, or choose another folder with --prefix"
        return 1
    fi
    local v
    v=$(envpy -c '# check:version
import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || v="(python does not run)"
    if [[ $v != "$PY_VERSION" ]]; then
        ENV_PROBLEM="$PY is Python $v, not $PY_VERSION: remove $PREFIX, or choose another folder with --prefix"
        return 1
    fi
}

missing_pins() {  # prints the pins pip does not list as installed, space-separated
    local freeze line have=$'\n' pin absent=()
    freeze=$(envpy -m pip freeze --disable-pip-version-check 2>/dev/null) || freeze=""
    while IFS= read -r line; do
        line=${line,,}
        have+=${line//_/-}$'\n'
    done <<<"$freeze"
    for pin in "${PINS[@]}"; do
        [[ $have == *$'\n'"$pin"$'\n'* ]] || absent+=("$pin")
    done
    printf '%s' "${absent[*]-}"
}

op_ok() {  # the compiled op loads, with torch
    envpy -c '# check:op
import torch, MultiScaleDeformableAttention' >/dev/null 2>&1
}

REPO_PROBLEM=""
repo_ok() {  # ViT-Adapter at the pinned commit, with segmentation/ops (sets REPO_PROBLEM when it is something else)
    REPO_PROBLEM=""
    [[ -e $VIT ]] || return 1
    local head=""
    if [[ -f $VIT/.git/HEAD ]]; then read -r head <"$VIT/.git/HEAD" || true; fi
    if [[ $head != "$VIT_ADAPTER_COMMIT" ]]; then
        REPO_PROBLEM="$VIT is not ViT-Adapter at commit $VIT_ADAPTER_COMMIT (its HEAD: ${head:-none}): remove it, or choose another folder with --vit-adapter"
        return 1
    fi
    if [[ ! -f $VIT/$CONFIG_IN_REPO || ! -f $VIT/segmentation/ops/setup.py ]]; then
        REPO_PROBLEM="$VIT is incomplete (no $CONFIG_IN_REPO or segmentation/ops): remove it and run setup_miou.sh again"
        return 1
    fi
}

ckpt_ok() { [[ -s $CKPT ]]; }

# --- tools ---------------------------------------------------------------------------------------------------

find_conda() {
    local c
    if [[ -n ${MIOU_CONDA:-} ]]; then command -v "$MIOU_CONDA" 2>/dev/null; return; fi
    for c in conda mamba micromamba "${CONDA_EXE:-}" "${MAMBA_EXE:-}"; do
        [[ -n $c ]] && command -v "$c" 2>/dev/null && return 0
    done
    return 1
}
find_nvcc() {
    if [[ -n ${CUDA_HOME:-} ]]; then
        [[ -x $CUDA_HOME/bin/nvcc ]] && printf '%s' "$CUDA_HOME/bin/nvcc"
        return
    fi
    command -v nvcc 2>/dev/null
}
find_downloader() { command -v curl 2>/dev/null || command -v wget 2>/dev/null; }

MSG_CONDA="no conda on PATH (nor mamba or micromamba${MIOU_CONDA:+; MIOU_CONDA=$MIOU_CONDA is not an executable}): install Miniforge (https://github.com/conda-forge/miniforge) or micromamba, or load one (module load ...), or set MIOU_CONDA to its executable; then run setup_miou.sh again"
if [[ -n ${CUDA_HOME:-} ]]; then where="there is no $CUDA_HOME/bin/nvcc (CUDA_HOME)"; else where="nvcc is not on PATH"; fi
MSG_NVCC="no CUDA toolkit: $where; compiling ViT-Adapter's deformable-attention op needs one, CUDA 11.1 to match torch 1.9.0+cu111: install it (https://developer.nvidia.com/cuda-11-1-0-download-archive) or load it (module load cuda/11.1), then put its bin/ on PATH or set CUDA_HOME, and run setup_miou.sh again"
MSG_CXX="no C++ compiler: g++ and gcc are not both on PATH; compiling the deformable-attention op needs them (gcc 10 or older for CUDA 11.1): install them (apt-get install g++-10, dnf install gcc-c++) or load them (module load gcc), then run setup_miou.sh again"
MSG_GIT="no git on PATH: it fetches ViT-Adapter's code ($VIT_ADAPTER_REPO at $VIT_ADAPTER_COMMIT): install git, or clone that commit into $VIT elsewhere and copy it here, then run setup_miou.sh again"
MSG_DOWNLOADER="neither curl nor wget on PATH: one downloads the checkpoint $CKPT_URL; install one, or download it elsewhere and put it at $CKPT_ZIP, then run setup_miou.sh again"

BUILD_PROBLEMS=()
BUILD_TOOLS_CHECKED=0
check_build_tools() {  # BUILD_PROBLEMS: the missing-tool messages of the op build; warns on versions
    local nvcc out version
    BUILD_PROBLEMS=()
    BUILD_TOOLS_CHECKED=1
    if ! nvcc=$(find_nvcc); then
        BUILD_PROBLEMS+=("$MSG_NVCC")
    else
        out=$("$nvcc" --version 2>&1) || true
        if [[ $out =~ release\ ([0-9]+)\.([0-9]+) ]]; then
            version=${BASH_REMATCH[1]}.${BASH_REMATCH[2]}
            if [[ ${BASH_REMATCH[1]} != 11 ]]; then
                warn "$nvcc is CUDA $version, not 11.1 (torch 1.9.0+cu111's): torch refuses to build the op with another major version; set CUDA_HOME to a CUDA 11.1 toolkit"
            elif [[ $version != 11.1 ]]; then
                warn "$nvcc is CUDA $version, not 11.1 (torch 1.9.0+cu111's): the op usually builds, but if it fails, set CUDA_HOME to a CUDA 11.1 toolkit"
            fi
        else
            warn "cannot tell the CUDA version of $nvcc (its --version says: ${out%%$'\n'*})"
        fi
    fi
    if ! command -v g++ >/dev/null 2>&1 || ! command -v gcc >/dev/null 2>&1; then
        BUILD_PROBLEMS+=("$MSG_CXX")
    else
        out=$(g++ -dumpversion 2>/dev/null) || out=""
        if [[ $out =~ ^([0-9]+) ]] && ((BASH_REMATCH[1] > 10)); then
            warn "g++ is version $out; CUDA 11.1's nvcc accepts gcc 10 at most: if the op build stops on 'unsupported GNU version', put gcc/g++ 10 first on PATH"
        fi
    fi
}

# --- --check -------------------------------------------------------------------------------------------------

report() { printf '  %-12s %-8s %s\n' "$1" "$2" "$3"; }
if ((CHECK_ONLY)); then
    all=1
    say "what is there (nothing is changed):"
    if env_ok; then
        report env ok "$PREFIX (Python $PY_VERSION)"
        missing=$(missing_pins)
        if [[ -z $missing ]]; then report packages ok "${#PINS[@]} pinned packages"; else report packages missing "$missing"; all=0; fi
        if op_ok; then report op ok "MultiScaleDeformableAttention loads"; else report op missing "MultiScaleDeformableAttention does not load"; all=0; fi
    else
        report env missing "${ENV_PROBLEM:-$PREFIX}"; report packages missing "(no environment)"; report op missing "(no environment)"; all=0
    fi
    if repo_ok; then report ViT-Adapter ok "$VIT (commit ${VIT_ADAPTER_COMMIT:0:7})"; else report ViT-Adapter missing "${REPO_PROBLEM:-$VIT}"; all=0; fi
    if ckpt_ok; then report checkpoint ok "$CKPT"; else report checkpoint missing "$CKPT (from $CKPT_URL)"; all=0; fi
    tools="conda: $(find_conda || echo none); nvcc: $(find_nvcc || echo none); g++: $(command -v g++ || echo none)"
    tools+="; git: $(command -v git || echo none); download: $(find_downloader || echo none)"
    report tools "" "$tools"
    if ((all)); then say "complete"; exit 0; fi
    say "incomplete: run ./setup_miou.sh to build what is missing"
    exit 1
fi

# --- before any work: what is needed for the steps to do ------------------------------------------------------

[[ $OSTYPE == linux* && $HOSTTYPE == x86_64 ]] \
    || die "torch 1.9.0+cu111 and mmcv-full 1.4.2 exist for Linux x86_64 only, this is $OSTYPE $HOSTTYPE"

problems=()
if env_ok; then need_env=0; else
    [[ -z $ENV_PROBLEM ]] || die "$ENV_PROBLEM"
    need_env=1
fi
if repo_ok; then need_repo=0; else
    [[ -z $REPO_PROBLEM ]] || die "$REPO_PROBLEM"
    need_repo=1
fi
((need_env)) && ! find_conda >/dev/null && problems+=("$MSG_CONDA")
((need_repo)) && ! command -v git >/dev/null 2>&1 && problems+=("$MSG_GIT")
if ! ckpt_ok && [[ ! -s $CKPT_ZIP ]] && ! find_downloader >/dev/null; then problems+=("$MSG_DOWNLOADER"); fi
if ((need_env)) || ! op_ok; then
    check_build_tools
    problems+=("${BUILD_PROBLEMS[@]+"${BUILD_PROBLEMS[@]}"}")
fi
if ((${#problems[@]})); then
    for p in "${problems[@]}"; do printf 'setup_miou.sh: error: %s\n' "$p" >&2; done
    exit 1
fi

# --- 1. conda environment ------------------------------------------------------------------------------------

if ((need_env)); then
    CONDA=$(find_conda)
    say "[1/6] creating the conda environment $PREFIX (Python $PY_VERSION, conda-forge) with $CONDA"
    IN_PROGRESS=("$PREFIX")
    "$CONDA" create -y -p "$PREFIX" --override-channels -c conda-forge "python=$PY_VERSION" pip \
        || die "$CONDA could not create $PREFIX (its message is above; it needs conda.anaconda.org): nothing is left there; run setup_miou.sh again"
    env_ok || die "$CONDA created $PREFIX but ${ENV_PROBLEM:-it has no Python $PY_VERSION}"
    IN_PROGRESS=()
else
    say "[1/6] conda environment: $PREFIX (Python $PY_VERSION) is there"
fi

# --- 2. pinned packages --------------------------------------------------------------------------------------

missing=$(missing_pins)
if [[ -n $missing ]]; then
    say "[2/6] installing into $PREFIX: $missing"
    envpy -m pip install --disable-pip-version-check --no-input --only-binary=mmcv-full \
        -f "$TORCH_INDEX" -f "$MMCV_INDEX" "${PINS[@]}" \
        || die "pip could not install the pinned packages (its message is above): it needs pypi.org, $TORCH_INDEX and $MMCV_INDEX; run setup_miou.sh again once they can be reached"
    missing=$(missing_pins)
    [[ -z $missing ]] || die "pip ran, but these pins are still not installed in $PREFIX: $missing"
else
    say "[2/6] packages: the ${#PINS[@]} pins are installed"
fi

# --- 3. ViT-Adapter's code -----------------------------------------------------------------------------------

if ((need_repo)); then
    say "[3/6] fetching ViT-Adapter $VIT_ADAPTER_COMMIT into $VIT"
    part=$VIT.part
    rm -rf -- "$part"
    IN_PROGRESS=("$part")
    [[ -z ${VIT%/*} ]] || mkdir -p -- "${VIT%/*}"
    git init -q "$part" || die "git init $part failed"
    git -C "$part" fetch -q --depth 1 "$VIT_ADAPTER_REPO" "$VIT_ADAPTER_COMMIT" \
        || die "could not fetch $VIT_ADAPTER_REPO at $VIT_ADAPTER_COMMIT (git's message is above): without internet here, clone it elsewhere (git clone $VIT_ADAPTER_REPO && git -C ViT-Adapter checkout $VIT_ADAPTER_COMMIT) and copy it to $VIT"
    git -C "$part" -c advice.detachedHead=false checkout -q FETCH_HEAD || die "git checkout of $VIT_ADAPTER_COMMIT in $part failed"
    # As ViT-Adapter's segmentation/README.md: segmentation/ imports the op's Python side as `ops`, from detection/.
    [[ -e $part/segmentation/ops ]] || ln -s ../detection/ops "$part/segmentation/ops"
    mv -- "$part" "$VIT"
    IN_PROGRESS=()
    repo_ok || die "$REPO_PROBLEM"
else
    say "[3/6] ViT-Adapter: $VIT is at ${VIT_ADAPTER_COMMIT:0:7}"
fi

# --- 4. checkpoint -------------------------------------------------------------------------------------------

# Run by the environment's Python: SRC (the release zip, or the checkpoint itself) -> DST, a checked checkpoint.
CKPT_HELPER='
import hashlib, shutil, sys, zipfile
src, dst, want = sys.argv[1], sys.argv[2], sys.argv[3].lower()

def fail(msg):
    sys.stderr.write("setup_miou.sh: error: %s\n" % msg)
    sys.exit(1)

digest = hashlib.sha256()
with open(src, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
        digest.update(block)
print("setup_miou.sh: %s: SHA-256 %s" % (src, digest.hexdigest()))
if want and digest.hexdigest() != want:
    fail("%s has SHA-256 %s, not MIOU_CKPT_SHA256=%s: a damaged or different file; delete it and run setup_miou.sh again"
         % (src, digest.hexdigest(), want))

def is_torch_zip(names):  # torch.save writes a zip holding <name>/data.pkl
    return any(n == "data.pkl" or n.endswith("/data.pkl") for n in names)

if zipfile.is_zipfile(src):
    with zipfile.ZipFile(src) as z:
        names = [n for n in z.namelist() if not n.endswith("/") and not n.startswith("__MACOSX/")]
        members = [n for n in names if n.endswith((".pth", ".pth.tar", ".pt"))]
        if is_torch_zip(names):
            shutil.copyfile(src, dst)
        elif len(members) == 1:
            with z.open(members[0]) as fin, open(dst, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 22)
            print("setup_miou.sh: extracted %s from %s" % (members[0], src))
        else:
            fail("%s holds no single checkpoint (.pth) but %s" % (src, ", ".join(names[:5]) or "nothing"))
else:
    shutil.copyfile(src, dst)

if zipfile.is_zipfile(dst):
    with zipfile.ZipFile(dst) as z:
        if not is_torch_zip(z.namelist()):
            fail("%s is not a torch checkpoint (no data.pkl inside)" % src)
        bad = z.testzip()
        if bad is not None:
            fail("%s is damaged (%s fails its CRC check): delete it and run setup_miou.sh again" % (src, bad))
else:
    try:
        import torch
        torch.load(dst, map_location="cpu")
    except Exception as e:
        fail("%s is not a loadable checkpoint (%s: %s): delete it and run setup_miou.sh again" % (src, type(e).__name__, e))
'

download() {  # URL DEST: to DEST.part (kept to resume), renamed DEST once complete
    local url=$1 dest=$2 part=$2.part tool rc=0
    tool=$(find_downloader) || die "$MSG_DOWNLOADER"
    case ${tool##*/} in
        curl) "$tool" -fL --retry 3 --retry-delay 5 -C - -o "$part" "$url" || rc=$? ;;
        *) "$tool" -c -O "$part" "$url" || rc=$? ;;
    esac
    if ((rc)) || [[ ! -s $part ]]; then
        die "could not download $url (${tool##*/} exit status $rc); what came is kept in $part and resumed next time. Without internet here: download that URL elsewhere, put the file at $dest (or the .pth it holds at $CKPT), and run setup_miou.sh again"
    fi
    mv -- "$part" "$dest"
}

if ! ckpt_ok; then
    mkdir -p -- "$WEIGHTS"
    downloaded=0
    if [[ -s $CKPT_ZIP ]]; then
        say "[4/6] checkpoint: unpacking $CKPT_ZIP"
    else
        say "[4/6] checkpoint: downloading $CKPT_URL (about 2 GB)"
        download "$CKPT_URL" "$CKPT_ZIP"
        downloaded=1
    fi
    IN_PROGRESS=("$CKPT.part")
    if ! envpy -c "$CKPT_HELPER" "$CKPT_ZIP" "$CKPT.part" "$CKPT_SHA256"; then  # it says why, as one error line
        if ((downloaded)); then
            rm -f -- "$CKPT_ZIP"
            printf 'setup_miou.sh: the download was deleted; nothing was written at %s\n' "$CKPT" >&2
        else
            printf 'setup_miou.sh: %s is left as it is; nothing was written at %s\n' "$CKPT_ZIP" "$CKPT" >&2
        fi
        exit 1
    fi
    mv -- "$CKPT.part" "$CKPT"
    IN_PROGRESS=()
    ((downloaded)) && rm -f -- "$CKPT_ZIP"
else
    say "[4/6] checkpoint: $CKPT is there"
fi

# --- 5. deformable-attention op ------------------------------------------------------------------------------

if ! op_ok; then
    ((BUILD_TOOLS_CHECKED)) || check_build_tools  # the op was there before pip ran: not checked yet
    if ((${#BUILD_PROBLEMS[@]})); then
        for p in "${BUILD_PROBLEMS[@]}"; do printf 'setup_miou.sh: error: %s\n' "$p" >&2; done
        exit 1
    fi
    envpy -c '# check:cuda
import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
        || die "torch sees no CUDA GPU here, and ViT-Adapter's ops/setup.py compiles the op only when it does: run setup_miou.sh on a GPU machine (the steps done so far are kept and skipped)"
    say "[5/6] compiling the deformable-attention op (ViT-Adapter's detection/ops) into $PREFIX"
    export CXX=${CXX:-$(command -v g++)}
    (cd "$VIT/detection/ops" && envpy setup.py build install) \
        || die "compiling the op failed (the compiler's message is above): check the CUDA and gcc versions warned about, then run setup_miou.sh again"
    op_ok || die "the op was compiled but does not load: run $PY -c 'import torch, MultiScaleDeformableAttention' to see why"
else
    say "[5/6] op: MultiScaleDeformableAttention loads"
fi

# --- 6. self-check -------------------------------------------------------------------------------------------

say "[6/6] self-check: $PY $SEGMENT --self-check"
envpy "$SEGMENT" --self-check --vit-adapter "$VIT" --checkpoint "$CKPT" \
    || die "the self-check failed (its message is above)"

if [[ $PREFIX == "$ROOT/miou/env" && $VIT == "$ROOT/miou/ViT-Adapter" && $WEIGHTS == "$ROOT/miou/weights" ]]; then
    say "ready. eval.py --compute-miou runs (DEVICE: eval.py's --device, e.g. cuda; IN_DIR, OUT_DIR: its folders):"
    printf '  %s %s --device DEVICE IN_DIR OUT_DIR\n' "$PY" "$SEGMENT"
else
    say "ready, in other folders than eval.py's default command expects: give eval.py"
    printf "  'miou.segmenter=[\"%s\", \"%s\", \"--vit-adapter\", \"%s\", \"--checkpoint\", \"%s\"]'\n" "$PY" "$SEGMENT" "$VIT" "$CKPT"
    say "with which it runs: $PY $SEGMENT --vit-adapter $VIT --checkpoint $CKPT IN_DIR OUT_DIR"
fi
