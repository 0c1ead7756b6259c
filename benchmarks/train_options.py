"""The training step's speed options on a GPU: `--channels-last`, `--fsdp` and `--compile` against the plain step, on
the CIFAR-10 DDPM++ teacher (55.7M parameters, batch 56) and on EDM2's ImageNet-64 teacher EDM2-S guided by EDM2-XS
at w 1.7 (280M + 125M parameters, batch 32), DMD2's recipe (DM + GAN, 5 fake-score steps per G step) in bf16,
random weights. Each row is the real `python -m dmd train` in a fresh process (`--fsdp` under torchrun, one process
per GPU in use: 1 here, so it measures FSDP2's overhead, not its memory split). Prints one table (img/s, step ms,
peak memory, speed against the plain row, GFLOP per step, MFU) as rows finish, then how closely each option's losses
follow the plain run's over the same steps (same seed: the same draws).

    python benchmarks/train_options.py [--deadline 200]     # on a CUDA machine (what gpu_check.sh runs)
    python benchmarks/train_options.py --smoke              # the same code paths on the CPU: the 8x8 fixtures

EDM2-S and its guide are not files here: the teacher and guide arguments name small JSON files of constructor
kwargs (`*.random.json`), and each row runs `dmd train` through this script's `--as-train`, which builds those
networks with random weights (seed 0) where dmd would load a pickle. Everything else is dmd's own code path.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from dmd.edm.persistence import load_network
from dmd.edm.precond import build_network
from dmd.edm.presets import CIFAR10_COND

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import (  # noqa: E402
    EDM2_GUIDANCE,
    EDM2_IMG64_S,
    EDM2_IMG64_XS,
    ROOT,
    Runner,
    fmt,
    peak_bf16,
    print_agreement,
    step_flops,
    summarise,
)

RANDOM_SUFFIX = ".random.json"  # a network file that holds {"class_name": ..., **constructor kwargs}
EDM2_FIXTURES = ROOT / "tests" / "fixtures" / "edm2"

# Option -> (flags, under torchrun?, timed steps, warm-up steps). Compiled rows warm up longer: the first steps of
# each network trace and compile.
OPTIONS = {
    "plain": ([], False, 8, 3),
    "--channels-last": (["--channels-last"], False, 8, 3),
    "--fsdp": (["--fsdp"], True, 8, 3),
    "--compile": (["--compile"], False, 8, 4),
}
# Rows, most important first (a --deadline cuts the list short; compiled rows come last, they take minutes each).
ROWS = [(teacher, option) for option in OPTIONS for teacher in ("cifar", "edm2")]


def random_network(path):
    """The network a `*.random.json` file names, with random weights drawn from seed 0, frozen in eval mode."""
    kwargs = json.loads(Path(path).read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_network(kwargs.pop("class_name"), kwargs).eval().requires_grad_(False)


def train_with_random_networks(argv):
    """dmd's command line on `argv` ('train', ...), with network files ending in RANDOM_SUFFIX built by
    `random_network` instead of loaded."""
    import dmd.edm.persistence as persistence
    from dmd.cli import main

    load = persistence.load_network

    def load_or_build(source, key="ema", cache_dir=None, device="cpu"):
        if str(source).endswith(RANDOM_SUFFIX):
            return random_network(source).to(device)
        return load(source, key=key, cache_dir=cache_dir, device=device)

    persistence.load_network = load_or_build
    main(argv)


def teachers(folder, smoke):
    """{key: (name, teacher file, guide file or None, resolution, batch, device, teacher net, guide net or None)}."""
    if smoke:  # EDM's and EDM2's fixture networks on the CPU
        edm = ROOT / "tests" / "fixtures" / "edm_ddpmpp_cond.pkl"
        edm2, guide = (EDM2_FIXTURES / f"edm2_img_{kind}.pkl" for kind in ("cond", "guide"))
        return {
            "cifar": ("tiny EDM 8x8 (smoke)", edm, None, 8, 4, "cpu", load_network(edm), None),
            "edm2": (
                "tiny EDM2 8x8 + guide (smoke)",
                edm2,
                guide,
                8,
                4,
                "cpu",
                load_network(edm2),
                load_network(guide),
            ),
        }
    specs = {"cifar": ("EDMPrecond", CIFAR10_COND), "edm2": ("Precond", EDM2_IMG64_S)}
    specs["edm2-guide"] = ("Precond", EDM2_IMG64_XS)
    files, nets = {}, {}
    for key, (class_name, kwargs) in specs.items():
        files[key] = folder / f"{key}{RANDOM_SUFFIX}"
        files[key].write_text(json.dumps(dict(kwargs, class_name=class_name)))
        with torch.device("meta"):  # for the FLOP count only
            nets[key] = build_network(class_name, kwargs)
    edm2 = (files["edm2"], files["edm2-guide"], 64, 32, "cuda", nets["edm2"], nets["edm2-guide"])
    return {
        "cifar": ("CIFAR-10 DDPM++ 55.7M", files["cifar"], None, 32, 56, "cuda", nets["cifar"], None),
        "edm2": (f"EDM2-S img64 + XS, w {EDM2_GUIDANCE}", *edm2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deadline", type=float, default=200.0, help="seconds after which no row starts")
    parser.add_argument("--smoke", action="store_true", help="the same rows on the CPU with the 8x8 fixtures")
    parser.add_argument("--as-train", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # a row's `dmd train`
    args = parser.parse_args()
    if args.as_train is not None:
        train_with_random_networks(args.as_train)
        return
    start, cuda = time.monotonic(), torch.cuda.is_available()
    if not (cuda or args.smoke):
        sys.exit("train_options: no CUDA device (use --smoke for the CPU code paths)")
    name = torch.cuda.get_device_name() if cuda and not args.smoke else None
    peak = peak_bf16(name)[1] if name else None
    print(f"torch {torch.__version__}, {name or 'CPU (smoke)'}; DMD2 recipe, bf16, random weights")
    print("\n| teacher | option | batch | img/s | step ms | peak mem GiB | speed vs plain | GFLOP/step | MFU % |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runner = Runner(folder, entry=[str(Path(__file__).resolve()), "--as-train"])
        nets, plain, agreement = teachers(folder, args.smoke), {}, []
        for key, option in ROWS:
            title, teacher, guide, resolution, batch, device, net, guide_net = nets[key]
            flags, torchrun, steps, warmup = OPTIONS[option]
            if time.monotonic() - start > args.deadline or (args.smoke and option == "--compile"):
                print(f"skipped ({'--smoke' if args.smoke else '--deadline'}): {title} {option}", flush=True)
                continue
            if guide is not None:
                flags = [*flags, "--guide-network", str(guide), "--guidance", str(EDM2_GUIDANCE)]
            records = runner.run(teacher, resolution, batch, "dmd2", "bf16", device, steps, warmup, flags, 1, torchrun)
            flops = step_flops(net, batch, "dmd2", guide_net)[1]
            speed, ms, mem, mfu = summarise(records, batch, flops, peak)
            if option == "plain":
                plain[key] = (records, ms)
            elif key in plain:
                agreement.append((f"{title}: {option} vs plain", records, plain[key][0]))
            ratio = plain[key][1] / ms if key in plain else None
            cells = [title, option, batch, fmt(speed), fmt(ms, ".1f"), fmt(mem), fmt(ratio, ".3f") + "x"]
            print("| " + " | ".join(map(str, [*cells, f"{flops / 1e9:.1f}", fmt(mfu, ".1f")])) + " |", flush=True)
    print_agreement(agreement)


if __name__ == "__main__":
    main()
