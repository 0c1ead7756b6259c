#!/usr/bin/env bash
# The GPU check of dmd's training step, for a machine with one or more CUDA GPUs and dmd already installed (it
# installs nothing and downloads nothing: random-weight networks, random pairs, random LPIPS weights).
#
#     bash benchmarks/gpu_check.sh
#
# Prints, within about 6 minutes on an H100-class GPU: img/s, step time, peak memory, FLOPs and MFU of the full
# CIFAR-10 DDPM++ step (batch 56) in bf16 and fp32, with and without the LPIPS regression; the generator step of
# DMD on EDM2's ImageNet-64 teacher EDM2-S (batch 32, bf16 and fp32), without and with its autoguidance guide
# EDM2-XS; the CIFAR-10 rows compiled (last, skipped if the others leave no time); how closely bf16 follows fp32
# over 20 steps and compiled follows eager; and, with two or more GPUs, a 2-process NCCL run against one process at
# the same global batch. Rows print as they finish, so a run cut short keeps what it measured.
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

# Row budget: rows stop starting after --deadline; timeout is the hard stop for the whole script's 6 minutes.
if [ "$gpus" -ge 2 ]; then deadline=230; limit=280; else deadline=290; limit=340; fi
timeout "$limit" python benchmarks/train_step.py --gpu-check --deadline "$deadline" || echo "gpu_check: rows stopped (exit $?)"

if [ "$gpus" -ge 2 ]; then
    echo
    timeout 70 python benchmarks/train_step.py --ddp-check || echo "gpu_check: DDP check stopped (exit $?)"
fi
echo
echo "gpu_check: $((SECONDS - started)) s"
