"""Whether each recipe's training run repeats another checkout's losses to the bit: short `python -m dmd train` runs on
the 8x8 fixture teacher with this checkout and with --before (e.g. `git worktree add /tmp/before <commit>`), the
same seed and data, and every logged statistic of every step compared exactly. Prints one table: per run, the steps,
whether all statistics are equal, and the largest relative difference of each that is not.

    OMP_NUM_THREADS=1 python benchmarks/same_losses.py --before /tmp/before [--steps 3]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import FIXTURE, ROOT, write_pairs, write_real  # noqa: E402

# Run name -> flags after the common ones: each recipe, DMD2 and f-distill with both --gan-features.
RUNS = {
    "--recipe dmd (LPIPS regression)": ["--recipe", "dmd", "--data-path", "{pairs}"],
    "--recipe dmd2": ["--recipe", "dmd2", "--real-data", "{real}", "--fake-steps-per-gen", "2"],
    "--recipe dmd2 --gan-features teacher": [
        *("--recipe", "dmd2", "--real-data", "{real}", "--fake-steps-per-gen", "2", "--gan-features", "teacher")
    ],
    "--recipe fdistill": ["--recipe", "fdistill", "--real-data", "{real}", "--fake-steps-per-gen", "2"],
    "--recipe fdistill --gan-features teacher": [
        *("--recipe", "fdistill", "--real-data", "{real}", "--fake-steps-per-gen", "2", "--gan-features", "teacher")
    ],
}
STATS = ("loss_G", "loss_dm", "loss_reg", "loss_gan", "loss_fake", "loss_disc", "grad_norm_G", "grad_norm_fake")


def run(checkout, folder, flags, steps):
    """The stats records of one `dmd train` run of `checkout` (fresh process, one thread, CPU)."""
    out = Path(tempfile.mkdtemp(dir=folder)) / "run"
    cmd = [sys.executable, "-m", "dmd", "train", "--model-path", str(FIXTURE), "--output-dir", str(out)]
    cmd += ["--device", "cpu", "--workers", "0", "--lpips-random", "--log-every", "1", "--image-every", "0"]
    cmd += ["--checkpoint-every", "0", "--max-steps", str(steps), "--batch-size", "4", *flags]
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{checkout}: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="another checkout of dmd to compare with")
    parser.add_argument("--steps", type=int, default=3, help="training steps per run")
    args = parser.parse_args()
    if not (args.before / "dmd" / "__init__.py").is_file():
        parser.error(f"--before: {args.before} is not a checkout of dmd (no dmd/__init__.py)")
    print(f"this checkout {ROOT} against {args.before}; {args.steps} steps, batch 4, the 8x8 fixture teacher\n")
    print("| run | steps | every statistic equal | largest relative differences |")
    print("| --- | ---: | --- | --- |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = dict(pairs=folder / "pairs.h5", real=folder / "real.zip")
        write_pairs(data["pairs"], 4 * args.steps, 8)
        write_real(data["real"], 16, 8)
        for name, flags in RUNS.items():
            flags = [f.format(**data) for f in flags]
            new, old = (run(checkout, folder, flags, args.steps) for checkout in (ROOT, args.before))
            diffs = {
                k: max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-30) for a, b in zip(new, old)) for k in STATS if k in new[0]
            }
            same = len(new) == len(old) and not any(diffs.values())
            text = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items() if v) or "-"
            print(f"| {name} | {len(new)} | {'yes' if same else 'no'} | {text} |", flush=True)


if __name__ == "__main__":
    main()
