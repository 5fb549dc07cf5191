#!/usr/bin/env bash
# Issue #6's checks on a lent GPU, one call each (the device tool's `run`, with carry [".whl"]):
#
#   bash benchmarks/gpu_checks.sh decode   # ~6 min: nvcodec and NVDEC tests (frames to the bit), decoding speed
#                                          # per decoder, extraction end to end with nvcodec then cpu (goal 60 clips/s)
#   bash benchmarks/gpu_checks.sh train    # ~5 min: a 200-epoch `bmfn train` timed whole, cold then with the
#                                          # compile cache warm (goal: under 2 minutes)
#
# The lent machine has its own CUDA torch and no network; bmfn's other dependencies come from .whl/ (git-ignored),
# filled here beforehand with wheels for the machine's Python (3.12 when last seen), for example:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl \
#       pynvvideocodec av h5py resampy==0.2.2 click opencv-python-headless threadpoolctl tqdm pytest
# Only the modules the machine lacks are installed (into /tmp/site), so that its torch and numpy stay its own.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
declare -A package=([cv2]=opencv-python-headless [PyNvVideoCodec]=pynvvideocodec)
missing=()
for module in av h5py librosa resampy click cv2 threadpoolctl tqdm matplotlib pytest PyNvVideoCodec; do
  python3 -c "import $module" 2>/dev/null || missing+=("${package[$module]:-$module}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing from .whl: ${missing[*]}"
  python3 -m pip install -q --no-index --find-links .whl --target /tmp/site "${missing[@]}"
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader || true
ave=(../shared/media/video/ave_*.mp4)

case "${1:-}" in
decode)
  python3 -m pytest -q -rs tests/test_nvcodec.py tests/test_decode.py -k "nvcodec or nvdec or cuda" 2>&1 | tail -15
  python3 benchmarks/decode.py --video-decoders cpu nvcodec --threads 8 --repeats 3
  for decoder in nvcodec cpu; do
    timeout 150 python3 benchmarks/extract.py "${ave[@]}" --skip-visual --repeat-clips 40 --video-decoder "$decoder" \
      2>&1 | grep -v "^\s*$" | tail -12 || echo "extract with $decoder: stopped after 150 s"
  done
  ;;
train)
  for cache in cold warm; do
    echo "== 200 epochs, compile cache $cache"
    python3 benchmarks/train.py --full bfloat16 --full-compile --epochs 1 2>&1 | tail -4
  done
  ;;
*)
  echo "usage: bash benchmarks/gpu_checks.sh decode|train" >&2
  exit 2
  ;;
esac
