#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md in one run (under 14 minutes on one H100/H200), written to one file:
#   1. face throughput: umo_core vs the insightface loop at 1/4/16 images, onnxruntime-gpu and torch CUDA;
#   2. one guidance step at 1024 px (full-size FLUX autoencoder, random weights: decode, detecting step, reused
#      faces, full decode with gradient) next to one full-size FLUX.1-dev transformer step (random weights,
#      bf16), so that the guidance's share of a 25-step sampling is a ratio;
#   3. one full-architecture ReReFL step at 512 px, two references, LoRA rank 512 (bench/train_step.py: the
#      trainer's own step; peak memory, seconds, share of the reward);
#   4. the same FLUX.2 step (--backbone flux2): klein-4B at 512 and 1024 px, klein-9B at 512 px, rank 128, and
#      klein-4B at 1024 px with the frozen base in int8 (--base-dtype int8: needs the int8 extra, torchao).
#
#   bench/gpu.sh [--cpu-smoke] [--output FILE]
#
# --cpu-smoke runs the same sections at CPU sizes (CPU providers, 128 px, the tiny transformer), to show that
# the script runs to its end on a machine without a GPU; its figures mean nothing. A section that fails or
# runs out of its time is marked in the file and the next one runs. PYTHON picks the interpreter.
set -uo pipefail

cd "$(dirname "$0")/.."
mode=gpu
output=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) mode=cpu-smoke ;;
        --output) output="$2"; shift ;;
        *) echo "error: unknown argument '$1'; use --cpu-smoke and/or --output FILE" >&2; exit 2 ;;
    esac
    shift
done
python="${PYTHON:-python}"
output="${output:-bench/gpu-results-$mode-$(date +%Y%m%d-%H%M%S).md}"

if [ "$mode" = gpu ]; then
    provider=cuda device=cuda dtype=bfloat16 size=1024 transformer=full train=full repeats=9 train_repeats=2
    face_limit=90 guidance_limit=210 train_limit=180 flux2_limit=120
    flux2_runs="klein-4b:512:auto klein-4b:1024:auto klein-9b:512:auto klein-4b:1024:int8"
else
    provider=cpu device=cpu dtype=float32 size=128 transformer=tiny train=tiny repeats=1 train_repeats=1
    face_limit=900 guidance_limit=1800 train_limit=900 flux2_limit=900
    flux2_runs="tiny:128:auto"
fi

section() {  # section TITLE LIMIT_SECONDS COMMAND...: the command's output under a heading, with its time
    local title="$1" limit="$2"
    shift 2
    local start=$SECONDS status
    {
        echo
        echo "## $title"
        echo
        echo "\`$*\`"
        echo
        echo '```'
    } >>"$output"
    timeout "$limit" "$@" 2>&1 | grep -v -e FutureWarning -e 'tform.estimate' >>"$output"
    status=${PIPESTATUS[0]}
    echo '```' >>"$output"
    if [ "$status" -eq 124 ]; then
        echo "Stopped after its limit of $limit s." >>"$output"
    elif [ "$status" -ne 0 ]; then
        echo "Failed with exit status $status." >>"$output"
    fi
    echo "($((SECONDS - start)) s)" >>"$output"
    echo "$title: status $status, $((SECONDS - start)) s"
}

{
    echo "# bench/gpu.sh ($mode), $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD)"
    echo
    echo "Machine: $(uname -n), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)."
    if command -v nvidia-smi >/dev/null; then
        echo "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)."
    else
        echo "GPU: none (nvidia-smi not found)."
    fi
    "$python" -c "import torch, onnxruntime; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}, \
available {torch.cuda.is_available()}), onnxruntime {onnxruntime.__version__} {onnxruntime.get_available_providers()}.')"
} >"$output"

section "Face throughput, onnxruntime ($provider)" "$face_limit" \
    "$python" bench/face_throughput.py --provider "$provider" --backend onnx --repeats "$repeats"
section "Face throughput, torch embedder ($device)" "$face_limit" \
    "$python" bench/face_throughput.py --provider "$provider" --backend torch --repeats "$repeats"
section "Guidance step at $size px next to a FLUX.1 transformer step ($transformer)" "$guidance_limit" \
    "$python" bench/guidance.py --sizes "$size" --device "$device" --dtype "$dtype" \
    --modes decode guided reused full transformer --transformer "$transformer"
section "ReReFL step ($train architecture, two references)" "$train_limit" \
    "$python" bench/train_step.py --config "$train" --device "$device" --repeats "$train_repeats"
for run in $flux2_runs; do
    IFS=: read -r config resolution base <<< "$run"
    section "FLUX.2 ReReFL step ($config at $resolution px, two references, base $base)" "$flux2_limit" \
        "$python" bench/train_step.py --backbone flux2 --config "$config" --resolution "$resolution" \
        --base-dtype "$base" --device "$device" --repeats 1
done

echo "results: $output"
