#!/usr/bin/env bash
# Issue #6's checks on a lent GPU, one call each (the device tool's `run`, with carry [".whl"]); a lease is 15 minutes
# of device time, each start 1-2 of them:
#
#   bash benchmarks/gpu_checks.sh decode   # ~4 min: nvcodec and NVDEC tests (frames to the bit), then extraction
#                                          # end to end with nvcodec and compiled VGG-19 (goal 60 clips/s), with
#                                          # decoding alone by the CPU and by nvcodec for the ceilings
#   bash benchmarks/gpu_checks.sh train    # ~5 min: a 200-epoch `bmfn train` timed whole, cold then with the
#                                          # compile cache warm (goal: under 2 minutes)
#
# The lent machine has its own CUDA torch and numpy (Python 3.12 when last seen) and no network; bmfn's other
# dependencies come from .whl/ (git-ignored), made here first with `bash benchmarks/gpu_checks.sh pack`: wheels for
# Python 3.12 (PyAV the version .venv has, as CI tests it), and PyNvVideoCodec unpacked without its samples (the
# carry limit is 64 MiB). On the machine only the modules it lacks are installed (into a temporary folder), so that
# its torch and numpy stay its own. The test videos travel too: ../shared does not, so `pack` copies its
# media/video into shared/ (git-ignored; the device tool sends a checkout's shared/), which is linked as ../shared
# there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = pack ]; then
  pip=(.venv/bin/pip -q)
  download=$(mktemp -d)
  rm -rf .whl && mkdir -p .whl
  "${pip[@]}" wheel --no-deps -w .whl resampy==0.2.2  # a source distribution only: built here
  "${pip[@]}" download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl \
    "av==$(.venv/bin/python -c 'import av; print(av.__version__)')" h5py click threadpoolctl tqdm six pytest iniconfig pluggy packaging pygments
  "${pip[@]}" download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    -d "$download" pynvvideocodec
  unzip -q "$download"/pynvvideocodec-*.whl 'PyNvVideoCodec/*' 'pynvvideocodec./*' -d .whl/pynvc
  rm .whl/pynvc/PyNvVideoCodec/lib{avformat,avutil}.so{,.*.*.*}  # copies: the bindings load the .so.63/.so.61
  rm -rf shared && mkdir -p shared/media && cp -rL ../shared/media/video shared/media/
  du -sh .whl shared
  exit
fi
site=$(mktemp -d)
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
# The tests read ../shared: linked to the copy that travelled, where the folder above lets it (else they skip)
[ -e ../shared ] || [ ! -d shared ] || ln -s "$PWD/shared" ../shared 2>/dev/null || echo "warning: cannot link ../shared"
declare -A package=([cv2]=opencv-python-headless [PyNvVideoCodec]=pynvvideocodec)
missing=()
for module in av h5py resampy click cv2 threadpoolctl tqdm pytest PyNvVideoCodec; do
  python3 -c "import $module" 2>/dev/null || missing+=("${package[$module]:-$module}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing from .whl: ${missing[*]}"
  cp -r .whl/pynvc/. "$site"/
  python3 -m pip install -q --no-index --no-deps --target "$site" \
    $(for name in "${missing[@]}" iniconfig pluggy six packaging pygments; do ls .whl/"${name//-/_}"-*.whl .whl/"$name"-*.whl; done \
      2>/dev/null | sort -u)
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader || true
ave=($([ -d ../shared/media/video ] && echo ../shared || echo shared)/media/video/ave_*.mp4)

case "${1:-}" in
decode)
  timeout 100 python3 -m pytest -q -rs tests/test_nvcodec.py tests/test_decode.py -k "nvcodec or nvdec or cuda" 2>&1 \
    | tail -15 || true
  # VGG-19 compiled: 12,600 frames/s on an H200 (78 clips/s), 7,500 without (47 clips/s, under the goal)
  timeout 170 python3 benchmarks/extract.py "${ave[@]}" --skip-visual --compile --repeat-clips 30 \
    --video-decoder nvcodec 2>&1 | grep -v "^\s*$" | tail -12 || echo "extract with nvcodec: stopped after 170 s"
  ;;
train)
  echo "== 200 epochs, compile cache cold (after one epoch of each variant)"
  timeout 200 python3 benchmarks/train.py --full bfloat16 --full-compile --epochs 1 2>&1 | tail -6 || true
  echo "== 200 epochs, compile cache warm"
  timeout 150 python3 benchmarks/train.py --full bfloat16 --full-compile --full-only 2>&1 | tail -2 || true
  ;;
*)
  echo "usage: bash benchmarks/gpu_checks.sh pack|decode|train" >&2
  exit 2
  ;;
esac
