"""The demo's two-step students scored per level: does the fake score match the mixture of both levels' outputs?

    python benchmarks/demo_two_step.py [--output-dir runs/two-step] [--network FILE] [--max-steps 300] [--threads 1]

Trains, through the demo's own code (dmd.demo.run.distil, the default demo settings), the two two-step students at
levels 80 and --two-step-sigma: DMD2 (DM + GAN on the real digits, the demo's `--two-step` student) and DM only.
Each is then sampled on the demo's evaluation seeds three ways and scored by the demo's digits FID and accuracy:
level 0 alone (G at sigma 80, the one-step output), two steps (the generator's own sampler), and the mixture the
fake score is trained on (backward simulation draws one level per sample): the first half of the seeds from level 0,
the second half from two steps (classes cycle, so each half holds every class equally). The students and the
judge are kept in --output-dir, so a rerun only evaluates. Prints a Markdown table.
"""

import argparse
import time
from pathlib import Path

import torch


def main():
    from dmd.demo.config import DemoConfig
    from dmd.demo.run import EVAL_SEED0, build_judge, distil, quantise, score, write_real_digits
    from dmd.generate import DMDGenerator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/two-step", help="students and real digits (reused if present)")
    parser.add_argument("--network", default=DemoConfig.teacher, help="the teacher (default: the shipped one)")
    parser.add_argument("--max-steps", type=int, default=DemoConfig.max_steps, help="training steps of each student")
    parser.add_argument("--two-step-sigma", type=float, default=DemoConfig.two_step_sigma, help="the second level")
    parser.add_argument("--num-eval", type=int, default=DemoConfig.num_eval, help="samples per row")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: reproducible)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    out = Path(args.output_dir)
    cfg = DemoConfig(
        output_dir=str(out),
        teacher=args.network,
        max_steps=args.max_steps,
        two_step=True,
        two_step_sigma=args.two_step_sigma,
        num_eval=args.num_eval,
        progress=False,
    )
    start = time.perf_counter()
    classifier, _, ref_stats = build_judge(cfg.seed)
    data = dict(pairs=None, real=write_real_digits(out / "digits.zip"))
    students = {
        "DMD2 (DM + GAN), two steps": ("dmd2_2step", dict(dm=True, reg=False, gan=True, two_step=True)),
        "DM only, two steps": ("dm_2step", dict(dm=True, reg=False, two_step=True)),
    }
    seeds = list(range(EVAL_SEED0, EVAL_SEED0 + cfg.num_eval))
    class_ids = torch.arange(cfg.num_eval) % 10
    half = cfg.num_eval // 2
    rows = []
    for title, (key, losses) in students.items():
        snapshot = distil(cfg, out, key, losses, data)
        images = {}
        for name, sigmas in (("level 0 alone", [80.0]), ("two steps", None)):
            generator = DMDGenerator(network_path=snapshot, device="cpu", sigmas=sigmas)
            images[name] = quantise(generator.generate_batch(seeds=seeds, class_ids=class_ids, batch_size=250))
        images["mixture: half level 0, half two steps"] = torch.cat(
            [images["level 0 alone"][:half], images["two steps"][half:]]
        )
        for name, x in images.items():
            fid, accuracy = score(x, class_ids, classifier, ref_stats)
            rows.append(f"| {title} | {name} | {fid:.2f} | {accuracy:.1%} |")
    print(f"\n{args.max_steps} steps per student, levels 80 and {args.two_step_sigma}, {cfg.num_eval} samples per row")
    print("| student | samples | digits FID | class accuracy |")
    print("| --- | --- | ---: | ---: |")
    print("\n".join(rows))
    print(f"({time.perf_counter() - start:.0f} s, {torch.get_num_threads()} torch threads)")


if __name__ == "__main__":
    main()
