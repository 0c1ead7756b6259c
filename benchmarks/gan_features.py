"""What `--gan-features teacher` saves against DMD2's `fake`: FLOPs counted by torch's FlopCounterMode over one whole
training step (one G update and its 5 fake-score/discriminator updates, DMD2's TTUR) and the step time, interleaved
in one process, on the demo's digits teacher (EDMPrecond + SongUNet, 16x16, 1 channel, 10 classes) and real digits.
With `--divergence js` the f-distill rows add the ratio's pass (one more no-grad encoder pass with `fake`, none with
`teacher`). Prints one Markdown table.

    OMP_NUM_THREADS=2 python benchmarks/gan_features.py --batch 8 --rounds 6
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dmd.build import build_parts, load_teacher, open_datasets, open_stream
from dmd.config import TrainConfig
from dmd.demo import SHIPPED_TEACHER
from dmd.demo.run import write_real_digits
from dmd.steps import fake_score_step, generator_step


def parts_for(tmp, real, batch, **options):
    """The StepParts of a one-process DMD2 run (TTUR 5, GAN on) on the digits teacher, with `options`."""
    cfg = TrainConfig(
        model_path=str(SHIPPED_TEACHER),
        output_dir=str(Path(tmp) / "run"),
        real_data=str(real),
        batch_size=batch,
        max_steps=1,
        recipe="dmd2",
        lambda_reg=0.0,
        fake_steps_per_gen=5,
        gan_weight_gen=3e-3,
        gan_weight_disc=1e-2,
        device="cpu",
        workers=0,
        **options,
    )
    device = torch.device("cpu")
    mu_real, teacher, _ = load_teacher(cfg, device)
    real_stream = open_stream(open_datasets(cfg, mu_real)[1], batch, "--batch-size", "images", cfg, device)
    parts, _ = build_parts(cfg, mu_real, teacher, None, None, real_stream, device)
    return parts


def one_step(parts, step):
    """One training step: the G update, then its fake-score/discriminator updates."""
    fake_score_step(parts, step, generator_step(parts, step))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="generated (and real) images per step")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds, one step per row each")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        real = write_real_digits(Path(tmp) / "digits.zip")
        rows = {
            "DMD2, fake features (DMD2's)": dict(gan_features="fake"),
            "DMD2, teacher features (FastGen's)": dict(gan_features="teacher"),
            "f-distill JS, fake features": dict(gan_features="fake", divergence="js"),
            "f-distill JS, teacher features": dict(gan_features="teacher", divergence="js"),
        }
        parts = {name: parts_for(Path(tmp) / str(i), real, args.batch, **o) for i, (name, o) in enumerate(rows.items())}
        flops = {}
        for name, p in parts.items():
            one_step(p, 0)  # warm-up
            with FlopCounterMode(display=False) as counter:
                one_step(p, 1)
            flops[name] = counter.get_total_flops() / 1e9
        times = {name: [] for name in parts}
        for r in range(args.rounds):
            for name in list(parts)[:: 1 if r % 2 == 0 else -1]:  # alternate the order
                start = time.perf_counter()
                one_step(parts[name], 2 + r)
                times[name].append(time.perf_counter() - start)
    base = next(iter(rows))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, TTUR 5, "
        f"{args.rounds} interleaved rounds, load average {os.getloadavg()[0]:.2f}\n"
    )
    print("| step | GFLOP per step | FLOPs vs DMD2 fake | median s per step | speed vs DMD2 fake | GFLOP/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in rows:
        t = statistics.median(times[name])
        ratio = statistics.median(b / a for a, b in zip(times[name], times[base]))
        print(
            f"| {name} | {flops[name]:.2f} | {flops[name] / flops[base]:.3f} | {t:.3f} | {ratio:.3f}x | "
            f"{flops[name] / t:.1f} |"
        )


if __name__ == "__main__":
    main()
