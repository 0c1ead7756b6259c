#!/usr/bin/env bash
# The GPU check of dmd's training step, for a machine with one or more CUDA GPUs and dmd already installed (it
# installs nothing and downloads nothing: random-weight networks, random pairs and images, random LPIPS weights).
#
#     bash benchmarks/gpu_check.sh                                  # dmd alone
#     FASTGEN=/path/to/FastGen bash benchmarks/gpu_check.sh         # and NVIDIA FastGen's DMD2 step beside ours
#
# Prints, within about 10 minutes on an H100-class GPU (each part under its own `timeout`, rows printed as they
# finish, so a run cut short keeps what it measured):
#  1. benchmarks/train_step.py --gpu-check: img/s, step time, peak memory, FLOPs and MFU of the CIFAR-10 DDPM++ step
#     (batch 56) in bf16 and fp32, with and without the LPIPS regression, DMD2's recipe; the generator step on EDM2's
#     ImageNet-64 teacher EDM2-S without and with its autoguidance guide EDM2-XS; bf16 against fp32 agreement.
#  2. benchmarks/train_options.py: DMD2's step in bf16 on CIFAR-10 DDPM++ and on EDM2-S guided by XS, plain, with
#     --channels-last, with --fsdp (torchrun, one process) and compiled, each against the plain row, with how
#     closely its losses follow the plain run's.
#  3. with FASTGEN set to a FastGen checkout whose dependencies this python imports: benchmarks/peers/vs_fastgen.py,
#     FastGen's DMD2 step and ours on the CIFAR-10 network, interleaved (its memory processes left out for time).
#  4. with two or more GPUs: a 2-process NCCL run against one process at the same global batch.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 1 ]; then
    echo "gpu_check: no CUDA device visible (torch $(python -c 'import torch; print(torch.__version__)'))" >&2
    exit 1
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
started=$SECONDS

# Budgets in seconds: each part stops starting rows after its deadline and is killed at its limit; the limits add
# up to 440 s, 580 s with FastGen and a second GPU (the device's commands stop at 600 s).
timeout 190 python benchmarks/train_step.py --gpu-check --deadline 150 || echo "gpu_check: rows stopped (exit $?)"
echo
timeout 250 python benchmarks/train_options.py --deadline 165 || echo "gpu_check: options stopped (exit $?)"

if [ -n "${FASTGEN:-}" ]; then
    echo
    # this python's own environment serves as the venv: a GPU machine may have no network to fill a new one
    prefix=$(python -c 'import sys; print(sys.prefix)')
    timeout 90 python benchmarks/peers/vs_fastgen.py --fastgen "$FASTGEN" --venv "$prefix" --device cuda \
        --configs cifar --methods dmd2 --rounds 3 --no-memory || echo "gpu_check: FastGen comparison stopped (exit $?)"
fi
if [ "$gpus" -ge 2 ]; then
    echo
    timeout 50 python benchmarks/train_step.py --ddp-check || echo "gpu_check: DDP check stopped (exit $?)"
fi
echo
echo "gpu_check: $((SECONDS - started)) s"
