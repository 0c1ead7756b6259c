"""The demo's two-step students scored per level: does the fake score match the mixture of both levels' outputs?

    python benchmarks/demo_two_step.py [--output-dir runs/two-step] [--network FILE] [--max-steps 300] [--threads 1]
        [--students dmd2,dm] [--fake-score-levels all,last] [--seeds 0,1,2]

Trains, through the demo's own code (dmd.demo.run.distil, the default demo settings), two-step students at levels
80 and --two-step-sigma: DMD2 (DM + GAN on the real digits, the demo's `--two-step` student) and DM only, each with
every --fake-score-levels value (`train --fake-score-levels`: mu_fake learns all levels' samples, DMD2's, or the
last level's only) and every training seed. Each is then sampled on the demo's evaluation seeds three ways and
scored by the demo's digits FID (one judge, trained with seed 0, for every row): level 0 alone (G at sigma 80, the
one-step output), two steps (the generator's own sampler), and the mixture the fake score of `all` is trained on
(backward simulation draws one level per sample): the first half of the seeds from level 0, the second half from
two steps (classes cycle, so each half holds every class equally). The students and the judge's real digits are
kept in --output-dir, so a rerun only evaluates. Prints Markdown tables (every run, then the means over the seeds)
and writes them to --output-dir/results.json.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

STUDENTS = {  # name: (title, run key, losses for dmd.demo.run.distil)
    "dmd2": ("DMD2 (DM + GAN)", "dmd2_2step", dict(dm=True, reg=False, gan=True, two_step=True)),
    "dm": ("DM only", "dm_2step", dict(dm=True, reg=False, two_step=True)),
}
SAMPLES = ("level 0 alone", "two steps", "mixture")


def names(text, known):
    """A comma-separated list of `known` names; argparse's one-line error (naming the flag) otherwise."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in known for v in values):
        raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(known)}, not {text!r}")
    return values


def seed_list(text):
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of integers, not {text!r}") from None


def main():
    from dmd.demo.config import DemoConfig
    from dmd.demo.run import EVAL_SEED0, build_judge, distil, quantise, score, write_real_digits
    from dmd.generate import DMDGenerator
    from dmd.utils.io import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/two-step", help="students and real digits (reused if present)")
    parser.add_argument("--network", default=DemoConfig.teacher, help="the teacher (default: the shipped one)")
    parser.add_argument("--max-steps", type=int, default=DemoConfig.max_steps, help="training steps of each student")
    parser.add_argument("--two-step-sigma", type=float, default=DemoConfig.two_step_sigma, help="the second level")
    parser.add_argument("--num-eval", type=int, default=DemoConfig.num_eval, help="samples per row")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: reproducible)")
    parser.add_argument("--students", type=lambda t: names(t, STUDENTS), default=list(STUDENTS), help="dmd2, dm")
    parser.add_argument(
        "--fake-score-levels",
        type=lambda t: names(t, ("all", "last")),
        default=["all"],
        help="train's --fake-score-levels values to compare: all, last",
    )
    parser.add_argument("--seeds", type=seed_list, default=[DemoConfig.seed], help="training seeds, e.g. 0,1,2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    out = Path(args.output_dir)
    start = time.perf_counter()
    classifier, _, ref_stats = build_judge(DemoConfig.seed)
    data = dict(pairs=None, real=write_real_digits(out / "digits.zip"))
    seeds = list(range(EVAL_SEED0, EVAL_SEED0 + args.num_eval))
    class_ids = torch.arange(args.num_eval) % 10
    half = args.num_eval // 2
    runs = []
    for student in args.students:
        title, key, losses = STUDENTS[student]
        for levels in args.fake_score_levels:
            for seed in args.seeds:
                cfg = DemoConfig(
                    output_dir=str(out),
                    teacher=args.network,
                    seed=seed,
                    max_steps=args.max_steps,
                    two_step=True,
                    two_step_sigma=args.two_step_sigma,
                    num_eval=args.num_eval,
                    progress=False,
                )
                run_key = f"{key}-{levels}-seed{seed}"
                print(f"{run_key}:", flush=True)
                snapshot = distil(cfg, out, run_key, dict(losses, fake_score_levels=levels), data)
                images = {}
                for name, sigmas in (("level 0 alone", [80.0]), ("two steps", None)):
                    generator = DMDGenerator(network_path=snapshot, device="cpu", sigmas=sigmas)
                    images[name] = quantise(generator.generate_batch(seeds=seeds, class_ids=class_ids, batch_size=250))
                images["mixture"] = torch.cat([images["level 0 alone"][:half], images["two steps"][half:]])
                fids = {name: score(x, class_ids, classifier, ref_stats)[0] for name, x in images.items()}
                runs.append(dict(student=title, fake_score_levels=levels, seed=seed, fid=fids))

    lines = [
        f"{args.max_steps} steps per student, levels 80 and {args.two_step_sigma}, {args.num_eval} samples per "
        "column (mixture: half level 0 alone, half two steps); digits FID",
        "",
        "| student | --fake-score-levels | seed | level 0 alone | two steps | mixture |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['student']} | {r['fake_score_levels']} | {r['seed']} | "
        + " | ".join(f"{r['fid'][s]:.2f}" for s in SAMPLES)
        + " |"
        for r in runs
    ]
    lines += ["", "| student | --fake-score-levels | seeds | level 0 alone | two steps | mixture |"]
    lines += ["| --- | --- | --- | ---: | ---: | ---: |"]
    for student in args.students:
        for levels in args.fake_score_levels:
            group = [r for r in runs if r["student"] == STUDENTS[student][0] and r["fake_score_levels"] == levels]
            means = [statistics.mean(r["fid"][s] for r in group) for s in SAMPLES]
            seeds_text = ",".join(str(r["seed"]) for r in group)
            lines.append(
                f"| {group[0]['student']} | {levels} | {seeds_text} | " + " | ".join(f"{m:.2f}" for m in means) + " |"
            )
    seconds = time.perf_counter() - start
    lines += ["", f"({seconds:.0f} s, {torch.get_num_threads()} torch threads)"]
    print("\n" + "\n".join(lines))
    atomic_write_text(
        json.dumps(dict(args=vars(args), runs=runs, seconds=seconds), indent=2) + "\n", out / "results.json"
    )


if __name__ == "__main__":
    main()
