"""The embedded demo: distil the shipped digits teacher into one-step (and two-step) generators on a CPU, measured.

Stages: (1) train the judge, a small classifier of the real digits; (2) sample teacher pairs (18-step Heun, 35 NFE)
and write the real digits in EDM's dataset format (the GAN's real data); (3) distil the students with the real
training loop: DMD (DM + regression on pairs), regression only, DM only, DMD2 (DM + GAN on the real digits, no
pairs), and with --two-step DMD2 in two steps; (4) score the teacher at 35 NFE, the teacher in one step (one
denoiser call at sigma 80) and the students by digits FID, class accuracy and samples/s on the same seeds, and
write results.md, results.json and grids.
"""

import contextlib
import io
import json
import os
import platform
import signal
import threading
import time
from pathlib import Path

import torch

from dmd.demo.classifier import FEATURE_DIM
from dmd.demo.config import GRID_COLUMNS, DemoConfig, DemoError, DemoInterrupted

EVAL_SEED0 = 1_000_000  # Evaluation seeds start here, far from the pair seeds 0..num_pairs-1.
RESULTS_FORMAT = "dmd-demo-results"
# Samples per method below which results.md warns that its FIDs mean little: 10 per feature dimension. The FID
# estimates a 64 x 64 covariance, singular below 65 samples; samples drawn from the real digits' own feature
# Gaussian score FID 38 at 100 samples, 7.6 at 500, 5.8 at 640, 3.4 at 1,000, 1.7 at 2,000 (mean of 10 draws,
# benchmarks/demo_fid_floor.py), so below 640 the bias alone exceeds the gaps between the methods.
FID_MIN_SAMPLES = 10 * FEATURE_DIM


# The students: (key, title, losses). DMD is the paper's loss and the next two ablate it; DMD2 replaces the pairs by
# a GAN on real digits; f-distill (with --fdistill, on in --full) weights DMD2's DM term by the JS h(r); the two-step
# student (with --two-step, on in --full) samples in two steps, its fake score trained on the last level's samples
# (--fake-score-levels last: 9.9 against 38.6 with DMD2's 'all' over 5 seeds, benchmarks/README.md).
STUDENTS = (
    ("dmd", "DMD (DM + regression)", dict(dm=True, reg=True)),
    ("regression", "regression only", dict(dm=False, reg=True)),
    ("dm", "DM only", dict(dm=True, reg=False)),
    ("dmd2", "DMD2 (DM + GAN on real digits)", dict(dm=True, reg=False, gan=True)),
    ("fdistill", "f-distill JS (DMD2, DM term weighted by h(r))", dict(dm=True, reg=False, gan=True, divergence="js")),
    (
        "dmd2_2step_last",
        "DMD2, two steps (fake score on the last level)",
        dict(dm=True, reg=False, gan=True, two_step=True, fake_score_levels="last"),
    ),
)


def stage(index, total, text):
    """Print a stage header."""
    print(f"\n[{index}/{total}] {text}", flush=True)


def check_output_dir(cfg, out):
    """Refuse an output folder holding a demo run with other settings (its pairs and checkpoints would be reused)."""
    from dmd.utils.io import atomic_write_text

    path, settings = out / "demo-config.json", {k: v for k, v in cfg.to_dict().items() if k != "progress"}
    defaults = {k: v for k, v in DemoConfig().to_dict().items() if k != "progress"}
    # A folder of an earlier version lacks the settings added since; they held their defaults' meaning there.
    if path.is_file() and {**defaults, **json.loads(path.read_text(encoding="utf-8"))} != settings:
        raise DemoError(f"--output-dir {out} holds a demo run with other settings; choose another folder or delete it")
    atomic_write_text(json.dumps(settings, indent=2) + "\n", path)


def build_judge(seed):
    """Train the classifier on the real digits; return it, its held-out accuracy and the real digits' feature stats."""
    from dmd.demo.classifier import train_classifier
    from dmd.demo.digits import load_digits

    images, labels = load_digits()
    classifier, holdout_accuracy = train_classifier(images, labels, seed=seed)
    return classifier, holdout_accuracy, feature_stats(classifier, images)


def feature_stats(classifier, images):
    """Mean (D,) and covariance (D, D) in float64 of the classifier's penultimate features of images."""
    from dmd.demo.classifier import features
    from dmd.fid import FeatureStats

    stats = FeatureStats()
    stats.append(torch.from_numpy(features(classifier, images)))
    return stats.mu_sigma()


def write_real_digits(path):
    """The real digits as an EDM dataset ZIP (uint8 PNGs, labels), the DMD2 students' real data; kept if present."""
    from dmd.demo.digits import load_digits
    from dmd.images import write_image_dataset

    if not path.is_file():
        images, labels = load_digits()
        pixels = (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # EDM's quantisation
        write_image_dataset(path, pixels, labels=labels.numpy())
    return path


def distil(cfg, out, key, losses, data):
    """Train one student with dmd.train and return its final network snapshot (resumes an interrupted run).

    A signal during training ends it with a checkpoint (dmd.train's own handling) and stops the demo here, so a
    half-trained student is never evaluated; rerunning the demo continues that student from its checkpoint.
    """
    from dmd.checkpoint import list_checkpoints
    from dmd.config import TrainConfig
    from dmd.train import train

    gan = losses.get("gan", False)
    train_cfg = TrainConfig(
        model_path=cfg.teacher,
        output_dir=str(out / "train" / key),
        data_path=str(data["pairs"]) if losses["reg"] else None,
        real_data=str(data["real"]) if gan else None,
        batch_size=cfg.batch_size,
        max_steps=cfg.max_steps,
        lr_gen=cfg.lr_gen,
        lr_fake=cfg.lr_fake,
        lambda_dm=1.0 if losses["dm"] else 0.0,
        lambda_reg=cfg.lambda_reg if losses["reg"] else 0.0,
        regression_distance=cfg.regression_distance,
        fake_steps_per_gen=cfg.fake_steps_per_gen,
        gan_weight_gen=cfg.gan_weight_gen if gan else 0.0,
        gan_weight_disc=cfg.gan_weight_disc if gan else 0.0,
        generator_sigmas=(80.0, cfg.two_step_sigma) if losses.get("two_step") else (80.0,),
        fake_score_levels=losses.get("fake_score_levels", "all"),
        divergence=losses.get("divergence", "rkl"),
        seed=cfg.seed,
        device="cpu",
        log_every=max(cfg.max_steps // 4, 1),
        progress=cfg.progress,
        image_every=0,
        checkpoint_every=0,
        keep_last=1,
        workers=0,
        resume="auto",
    )
    # The demo's console is its own: the loop's start summary and losses go to the student's log.txt only.
    with contextlib.redirect_stdout(io.StringIO()):
        result = train(train_cfg)
    print(f"  step {result['step']} of {cfg.max_steps}; its losses: {Path(train_cfg.output_dir) / 'log.txt'}")
    if result["stopped"]:
        raise DemoInterrupted(f"stopped by a signal at step {result['step']} of the {key} student")
    snapshot = list_checkpoints(train_cfg.output_dir, "network-snapshot")[-1]
    step = torch.load(snapshot, map_location="cpu", weights_only=True)["step"]
    if step != cfg.max_steps:  # Only a finished student is ever evaluated.
        raise DemoError(f"{snapshot} is at step {step}, not the {cfg.max_steps} --max-steps asks for")
    return snapshot


def quantise(images):
    """EDM's PNG quantisation applied in memory: [-1, 1] floats -> uint8 levels -> [-1, 1] floats (N, C, H, W)."""
    from dmd.utils.common import to_uint8

    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def score(images, class_ids, classifier, ref_stats):
    """Digits FID against the real digits and class accuracy of conditional samples (N, 1, 16, 16)."""
    from dmd.demo.classifier import predict
    from dmd.fid import frechet_distance

    mu, sigma = feature_stats(classifier, images)
    fid = frechet_distance(mu, sigma, *ref_stats)
    accuracy = (predict(classifier, images) == class_ids).float().mean().item()
    return fid, accuracy


def evaluate(cfg, methods, classifier, ref_stats, out):
    """Sample every method on the evaluation seeds; return result rows and write the grids.

    `methods` are (key, title, network file, teacher sampler steps or None for the network's own sigmas).
    """
    from dmd.generate import DMDGenerator
    from dmd.utils.common import make_grid
    from dmd.utils.io import atomic_save_image

    seeds = list(range(EVAL_SEED0, EVAL_SEED0 + cfg.num_eval))
    class_ids = torch.arange(cfg.num_eval) % 10
    rows, grid_rows = [], []
    for key, title, network, num_steps in methods:
        generator = DMDGenerator(network_path=network, device="cpu")
        start = time.perf_counter()
        images = generator.generate_batch(seeds=seeds, class_ids=class_ids, batch_size=250, num_steps=num_steps)
        seconds = time.perf_counter() - start
        images = quantise(images)
        fid, accuracy = score(images, class_ids, classifier, ref_stats)
        nfe = len(generator.sigmas) if num_steps is None else 2 * num_steps - 1
        speed = len(seeds) / seconds
        rows.append(dict(key=key, method=title, nfe=nfe, fid=fid, accuracy=accuracy, samples_per_s=speed))
        print(f"  {title:<32} NFE {nfe:>2}  FID {fid:8.3f}  accuracy {accuracy:6.1%}  {speed:.0f} samples/s")
        sheet = make_grid(images[:100], nrow=10, class_ids=class_ids[:100], title=f"{title} ({nfe} NFE)")
        atomic_save_image(sheet, out / f"samples-{key}.png")  # column k = class k
        grid_rows.append(images[:GRID_COLUMNS])
    titles = [f"{r['method']} ({r['nfe']} NFE)" for r in rows]
    grid = make_grid(
        torch.cat(grid_rows),
        nrow=GRID_COLUMNS,
        row_labels=titles,
        class_ids=class_ids[:GRID_COLUMNS].repeat(len(rows)),
        title=f"the same {GRID_COLUMNS} seeds for every method",
    )
    atomic_save_image(grid, out / "grid.png")
    return rows


def machine():
    """What the timings were measured on."""
    return dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        load_average_1min=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    )


def fid_warning(num_eval, feature_dim):
    """results.md's warning lines when `num_eval` samples are too few for a FID on `feature_dim`-d features."""
    if num_eval >= FID_MIN_SAMPLES:
        return []
    return [
        f"**Warning: {num_eval} samples per method are too few for a {feature_dim}-d FID** (at least "
        f"{FID_MIN_SAMPLES}, 10 per feature dimension): its bias alone, the FID of samples drawn from the real "
        "digits themselves, is larger than the gaps between methods. Rerun with a larger --num-eval to compare them.",
        "",
    ]


def results_markdown(results):
    """Render results.json as the Markdown report (settings, table, timings)."""
    cfg, rows = results["config"], results["rows"]
    two_step = f", the two-step student at levels 80 and {cfg['two_step_sigma']}" if cfg["two_step"] else ""
    two_step += "; f-distill: DMD2's settings with the JS weights" if cfg.get("fdistill") else ""
    lines = [
        "# DMD demo: digits 16x16, class-conditional",
        "",
        f"Teacher `{Path(cfg['teacher']).name}`; {cfg['num_pairs']} pairs (18-step Heun, 35 NFE); each student "
        f"trained {cfg['max_steps']} steps at batch {cfg['batch_size']}, AdamW lr {cfg['lr_gen']} (G) and "
        f"{cfg['lr_fake']} (mu_fake, GAN head), {cfg['fake_steps_per_gen']} fake-score step(s) per generator step, "
        f"seed {cfg['seed']}; regression distance `{cfg['regression_distance']}` (lambda_reg {cfg['lambda_reg']}); "
        f"DMD2: GAN weights {cfg['gan_weight_gen']} (G) and {cfg['gan_weight_disc']} (discriminator) on the 1,797 "
        f"real digits{two_step}. {cfg['num_eval']} samples per method "
        f"(classes cycling, seeds {EVAL_SEED0}+).",
        "",
        *fid_warning(cfg["num_eval"], results["classifier"]["feature_dim"]),
        "| method | NFE | digits FID (lower is better) | class accuracy | samples/s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['nfe']} | {r['fid']:.2f} | {r['accuracy']:.1%} | {r['samples_per_s']:.0f} |"
        )
    judge = results["classifier"]
    lines += [
        "",
        f"Digits FID: Frechet distance of the judge's {judge['feature_dim']}-d penultimate features to those of the "
        f"1,797 real digits. The judge is a small CNN trained on the real digits (held-out accuracy "
        f"{judge['holdout_accuracy']:.1%}).",
        "",
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings_s"].items()),
        f"on {results['machine']['cpu_count']} CPUs, {results['machine']['torch_threads']} torch threads, "
        f"load average {results['machine']['load_average_1min']}.",
        "",
        "![grid](grid.png)",
        "",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def sigterm_interrupts():
    """Let SIGTERM stop the demo as Ctrl-C does (KeyboardInterrupt) outside training, which handles both itself."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_teacher(path):
    """Load the teacher once up front, so a bad --network file is one clear line before any work."""
    from dmd.edm.persistence import NetworkLoadError, load_network

    if not Path(path).is_file():
        raise DemoError(f"--network: {path} does not exist (retrain one with `python -m dmd demo train-teacher`)")
    try:
        net = load_network(path)
    except NetworkLoadError as e:
        raise DemoError(f"--network: {e}") from e
    wanted = dict(img_resolution=16, img_channels=1, label_dim=10)
    found = {k: getattr(net, k) for k in wanted}
    if found != wanted:
        raise DemoError(f"--network: {path} is a network for {found}, the digits need {wanted}")


def run_demo(cfg):
    """Run the whole demo as `cfg` says; return the results dict also written to results.json.

    Every stage keeps its output (pairs, students' checkpoints), so after an interruption (DemoInterrupted or
    KeyboardInterrupt, also raised for SIGTERM) the same call continues where it stopped.
    """
    with sigterm_interrupts():
        return _run_demo(cfg)


def _run_demo(cfg):
    from dmd.pairs import make_pairs
    from dmd.utils.io import atomic_write_text

    check_teacher(cfg.teacher)
    print(f"torch CPU threads: {torch.get_num_threads()} of {os.cpu_count()} cores", flush=True)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_output_dir(cfg, out)
    students = [
        s for s in STUDENTS if (cfg.two_step or "two_step" not in s[2]) and (cfg.fdistill or "divergence" not in s[2])
    ]
    total, timings, start = 3 + len(students), {}, time.perf_counter()

    def lap(name, since):
        timings[name] = time.perf_counter() - since
        return time.perf_counter()

    stage(1, total, "training the judge (a small classifier of the real digits)")
    t = time.perf_counter()
    classifier, holdout_accuracy, ref_stats = build_judge(cfg.seed)
    print(f"  held-out accuracy {holdout_accuracy:.1%}")
    t = lap("judge", t)

    stage(2, total, f"sampling {cfg.num_pairs} teacher pairs (18-step Heun, 35 NFE); the real digits as a ZIP")
    pairs_path = make_pairs(
        cfg.teacher, out / "pairs.h5", cfg.num_pairs, class_balanced=True, batch_size=250, progress=cfg.progress
    )
    data = dict(pairs=pairs_path, real=write_real_digits(out / "digits.zip"))
    t = lap("pairs", t)

    snapshots = {}
    for i, (key, title, losses) in enumerate(students):
        stage(3 + i, total, f"distilling the {title} student ({cfg.max_steps} steps)")
        snapshots[key] = distil(cfg, out, key, losses, data)
        t = lap(f"train_{key}", t)

    stage(total, total, f"evaluating {cfg.num_eval} samples per method")
    methods = [
        ("teacher_35nfe", "teacher", cfg.teacher, 18),
        ("teacher_1step", "teacher, one step", cfg.teacher, None),
        *[(key, title, snapshots[key], None) for key, title, _ in students],
    ]
    rows = evaluate(cfg, methods, classifier, ref_stats, out)
    lap("evaluate", t)
    timings["total"] = time.perf_counter() - start

    results = {
        "format": RESULTS_FORMAT,
        "version": 1,
        "config": cfg.to_dict(),
        "classifier": {"holdout_accuracy": holdout_accuracy, "feature_dim": FEATURE_DIM},
        "rows": rows,
        "timings_s": timings,
        "machine": machine(),
    }
    atomic_write_text(json.dumps(results, indent=2) + "\n", out / "results.json")
    atomic_write_text(results_markdown(results), out / "results.md")
    print(f"\n{results_markdown(results)}\nWrote {out / 'results.md'}, {out / 'results.json'} and grids.")
    return results
