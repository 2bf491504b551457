#!/usr/bin/env bash
# Every GPU figure of issue 7 in one run (about 5 minutes on an H100; each part its own time limit,
# so one that fails leaves the others), written to $1 (default
# benchmarks/results): the whole OPT-shaped step per route, the geometry routes' exactness and
# speed, the geometry core's CUDA tests (every input class, every route, bf16 autocast), and a profile
# of one loss call (benchmarks/profile_gpu.py).
# Needs torch and transformers (pytest for the tests); the package from this checkout's src/.
set -uo pipefail
out=${1:-benchmarks/results}
card=${2:-$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
timeout 180 python3 benchmarks/opt_step.py --out "$out/opt-step-$card.md" 2>&1 | tail -n 20
timeout 200 python3 benchmarks/geometry.py --device cuda --repeats 7 --out "$out/geometry-$card.md" 2>&1 | tail -n 60
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_geometry.py tests/test_similarity.py -k "cuda or without_float64" 2>&1 | tee "$out/pytest-cuda-$card.txt" | tail -n 15
timeout 120 python3 benchmarks/profile_gpu.py 2>&1 | tee "$out/profile-$card.txt" | head -n 8
