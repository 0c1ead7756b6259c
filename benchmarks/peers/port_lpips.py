"""The LPIPS regression step as the port (github.com/devrimcavusoglu/dmd) takes it against ours, interleaved.

    python benchmarks/peers/port_lpips.py --venv PATH [--batch N] [--resolution R] [--rounds K] [--repeats M]
        [--before REV]

The port's generator loss (its dmd/loss.py, GeneratorLoss) maps x_ref = G(z_ref) and the target y_ref from [-1, 1]
to [0, 1], resizes both with torchvision's `Resize(224)` (bilinear, antialias on) and takes `piq.LPIPS()`: VGG-16
through relu5_3 (piq runs pool5 too) with the LPIPS v0.1 heads, ImageNet mean/std on [0, 1] inputs, reduction "mean";
the loop backpropagates through it. y_ref is data, so no graph is recorded on its side although piq does not turn
autograd off. Ours is `dmd.losses.RegressionLoss(dmd.lpips.LPIPS)`: bilinear upsampling to 224 of both, LPIPS's
shift/scale on [-1, 1], y_ref's features without autograd, per-sample distances that the loop averages. So both do
the same work at 224 x 224 from 32 x 32 (CIFAR-like) images. piq's mean and std on [0, 1] are LPIPS's shift and scale
on [-1, 1] ((1 + shift) / 2 = mean, scale / 2 = std), so the two losses and their gradients are comparable; they
differ by rounding (the antialiased resize, the mean/std form, the order of the sums).

Both sides get the same random weights (piq's two downloads, torchvision's vgg16 and its LPIPS heads, are replaced
by ours: the speed does not depend on the values) and the same inputs, in one process: --rounds rounds of --repeats
steps per side, the order reversed every other round; the speed of ours is the port's time over ours in the same
round (median and range over rounds; above 1: ours is faster). --before REV adds a third side, our LPIPS as
committed at REV (e.g. 724dcc4, before issue 21's rework; see benchmarks/lpips_step.py). Where the `lpips` package
is importable it also prints ours against it on the same weights (values and input gradients): the reference LPIPS
implementation.

piq and torchvision are not dependencies of dmd, so the script runs in a separate virtual environment, --venv: if it
has no python it is created (`python -m venv`); if it cannot import torch, torchvision, piq and dmd, the script
installs torch, torchvision, piq and lpips there; then it runs itself again under that venv's python with
PYTHONPATH = this checkout. Without --venv it runs in the current python and stops with one line if piq or
torchvision is missing. Example (2 threads on the CPU):

    OMP_NUM_THREADS=2 python benchmarks/peers/port_lpips.py --venv /work/peers-venv --batch 4 --rounds 10 \
        --before 724dcc4
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[2]
PROBE = "import torch, torchvision, piq, dmd.losses"


def port_lpips(ours):
    """piq's LPIPS as the port builds it (`piq.LPIPS()`), its downloaded weights replaced by those of `ours`."""
    import piq.perceptual
    import torch
    import torchvision

    def vgg16(**kwargs):  # piq asks torchvision for the ImageNet vgg16
        vgg = torchvision.models.vgg16(weights=None)
        vgg.features.load_state_dict(ours.features.state_dict())
        return vgg

    heads = [head.weight.detach().clone() for head in ours.heads]  # piq's file: the five (1, C, 1, 1) head weights
    with (
        mock.patch.object(piq.perceptual, "vgg16", vgg16),
        mock.patch.object(torch.hub, "load_state_dict_from_url", lambda *args, **kwargs: heads),
    ):
        port = piq.perceptual.LPIPS()
    vgg = [m for m in port.model if isinstance(m, torch.nn.Conv2d)]
    ours_vgg = [m for m in ours.features if isinstance(m, torch.nn.Conv2d)]
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(vgg, ours_vgg)), "piq's VGG did not get our weights"
    return port


def lpips_package(ours):
    """The `lpips` package's LPIPS (net='vgg') with the weights of `ours`, or None where it is not installed."""
    try:
        import lpips
    except ImportError:
        return None
    with warnings.catch_warnings():  # lpips asks torchvision for vgg16(pretrained=False), a deprecated spelling
        warnings.simplefilter("ignore", UserWarning)
        ref = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False).eval()
    slices = [ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5]
    for s in slices:  # each slice keeps torchvision's `features` indices as module names
        s.load_state_dict({k: v for k, v in ours.features.state_dict().items() if k.split(".")[0] in s._modules})
    for lin, head in zip(ref.lins, ours.heads):
        lin.model[-1].weight.data.copy_(head.weight)
    return ref


def step_of_port(port):
    """One regression step as the port takes it: [0, 1] images, Resize(224), piq's batch mean, backward."""
    from torchvision.transforms import Resize

    resize = Resize(224)

    def step(x_ref, y_ref):
        x_ref = x_ref.detach().requires_grad_(True)
        loss = port(resize((x_ref + 1) / 2), resize((y_ref + 1) / 2))
        loss.backward()
        return loss.detach(), x_ref.grad

    return step


def step_of(distance):
    """One regression step as ours takes it: RegressionLoss(distance) per sample, the loop's batch mean, backward."""
    from dmd.losses import RegressionLoss

    loss_of = RegressionLoss(distance)

    def step(x_ref, y_ref):
        x_ref = x_ref.detach().requires_grad_(True)
        loss = loss_of(x_ref, y_ref).mean()
        loss.backward()
        return loss.detach(), x_ref.grad

    return step


def largest_difference(ours, theirs):
    """Text: |loss difference| and the largest |input gradient difference| of two steps' (loss, gradient)."""
    (loss, grad), (their_loss, their_grad) = ours, theirs
    return (
        f"loss {float((loss - their_loss).abs()):.2e} (of {float(their_loss):.4f}), "
        f"input gradient {float((grad - their_grad).abs().max()):.2e} (of {float(their_grad.abs().max()):.2e})"
    )


def main_in_venv(args):
    import torch

    from dmd.lpips import LPIPS

    torch.manual_seed(0)
    ours = LPIPS(pretrained=False)
    port = "port (piq LPIPS, Resize 224)"
    steps = {port: step_of_port(port_lpips(ours))}
    if args.before is not None:  # our LPIPS as committed at --before, on the same weights
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from lpips_step import lpips_at

        before = lpips_at(args.before)(pretrained=False)
        before.load_state_dict(ours.state_dict())
        steps[f"ours before ({args.before})"] = step_of(before)
    steps["ours"] = step_of(ours)
    shape = (args.batch, 3, args.resolution, args.resolution)
    x_ref, y_ref = torch.rand(shape) * 2 - 1, torch.rand(shape) * 2 - 1
    results = {name: step(x_ref, y_ref) for name, step in steps.items()}  # also the warm-up
    reference = lpips_package(ours)

    times = {name: [] for name in steps}
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        for name in list(steps) if r % 2 == 0 else list(reversed(steps)):
            start = time.perf_counter()
            for _ in range(args.repeats):
                steps[name](x_ref, y_ref)
            times[name].append((time.perf_counter() - start) / args.repeats * 1000)
    load_after = os.getloadavg()[0]

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"{args.resolution}x{args.resolution} -> 224, {args.rounds} interleaved rounds of {args.repeats} steps, "
        f"load average (1 min) {load_before:.2f} before, {load_after:.2f} after\n"
    )
    print(
        "| LPIPS regression step | median ms per step (forward + backward) | speed against the port: median (rounds) |"
    )
    print("| --- | ---: | --- |")
    for name, t in times.items():
        ratios = [p / o for p, o in zip(times[port], t)]
        speed = f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f})"
        print(f"| {name} | {statistics.median(t):.1f} | {speed if name != port else '1'} |")
    print(f"\nlargest difference, ours against the port: {largest_difference(results['ours'], results[port])}")
    if reference is not None:
        lpips_result = step_of(reference)(x_ref, y_ref)
        print(
            f"largest difference, ours against the lpips package: {largest_difference(results['ours'], lpips_result)}"
        )


def ensure_venv(venv):
    """The venv's python, the venv created and filled first where it is missing or cannot import both sides."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if subprocess.run([str(python), "-c", PROBE], env=venv_env(), capture_output=True).returncode != 0:
        print(f"installing torch, torchvision, piq and lpips into {venv}", flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "torch", "torchvision", "piq", "lpips"], check=True)
        subprocess.run([str(python), "-c", PROBE], env=venv_env(), check=True)
    return python


def venv_env():
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, help="the virtual environment to run in (created if missing)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--resolution", type=int, default=32, help="G's resolution (both sides upsample to 224)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--repeats", type=int, default=1, help="steps per side per round")
    parser.add_argument("--before", help="also time our dmd/lpips.py as committed at this git revision")
    args = parser.parse_args()
    if min(args.batch, args.resolution, args.rounds, args.repeats) < 1:
        parser.error("--batch, --resolution, --rounds and --repeats must be at least 1")
    if args.venv is not None and os.environ.get("DMD_PEERS_VENV") != str(args.venv.absolute()):
        python = ensure_venv(args.venv.absolute())
        env = dict(venv_env(), DMD_PEERS_VENV=str(args.venv.absolute()))
        os.execve(python, [str(python), __file__, *sys.argv[1:]], env)
    try:
        import piq  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as e:
        parser.error(f"{e.name} is not installed in {sys.executable}: give --venv PATH (created if missing)")
    main_in_venv(args)


if __name__ == "__main__":
    main()
