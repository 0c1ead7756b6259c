"""train --fsdp: two processes with G, mu_fake, G's EMA and the GAN head sharded (FSDP2 on gloo) train as one process
without it does, their checkpoints are whole state dicts that a run without --fsdp resumes, and an --fsdp run resumes
bit for bit."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from test_train import (
    LOSSES,
    ONE_THREAD_ENV,
    ROOT,
    assert_same_updates,
    dmd2_args,
    initial_head_state,
    load,
    load_network_state,
    read_stats,
    run_cli,
)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
WORKER = str(Path(__file__).parent / "test_train.py")  # torchrun's entry point, with test_train's LPIPS stand-in
KEYS = [*LOSSES, "loss_gan", "loss_disc"]
EMAS = ("0.001kimg", "0.9")


def networks(state):
    """A training state's networks by name, its EMAs as 'ema <name>'."""
    return {**state, **{f"ema {name}": weights for name, weights in state["emas"].items()}}


def fsdp_args(out, real, *extra):
    """DMD2 (GAN head, two-step G, two fake-score steps) with two EMAs of G (each sharded as G) and grids,
    checkpoints at steps 2 and 4; at the default lr, as test_train's DDP tests run (see assert_same_updates)."""
    args = dmd2_args(out, real, "--lr-gen", "5e-5", "--lr-fake", "5e-5", "--ema", ",".join(EMAS), *extra)
    return args + ["--image-every", "2", "--checkpoint-every", "2", "--keep-last", "0"]


def torchrun(args):
    args[args.index("--batch-size") + 1] = "1"  # the same global batch of 2 over two processes
    proc = subprocess.run(TORCHRUN + [WORKER, *args, "--fsdp"], cwd=ROOT, env=ONE_THREAD_ENV, capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0 and "Warning" not in proc.stderr, proc.stderr[-3000:]


def test_fsdp_two_processes_equal_one_and_resume(tmp_path, real):
    one, fsdp, again, plain = (tmp_path / name for name in ("one", "fsdp", "again", "plain"))
    run_cli(fsdp_args(one, real, "--max-steps", 4))
    torchrun(fsdp_args(fsdp, real, "--max-steps", 4))
    a, b = read_stats(one), read_stats(fsdp)
    # Sharded sums run in another order than one process's; Adam carries that float noise, so by step 4 the losses
    # and norms differ by up to 3e-5 relative under ATEN_CPU_CAPABILITY=default (1e-6 under avx2): rtol 1e-4.
    np.testing.assert_allclose(
        [[r[k] for k in KEYS] for r in b], [[r[k] for k in KEYS] for r in a], rtol=1e-4, atol=1e-6
    )
    sa, sb = load(one / "training-state-000004.pt"), load(fsdp / "training-state-000004.pt")
    start = load_network_state()
    starts = dict(G=start, mu_fake=start, head=initial_head_state(), **{f"ema {name}": start for name in EMAS})
    assert_same_updates(networks(sa), networks(sb), starts)  # whole tensors, named and shaped as without --fsdp
    assert sb["class_name"] == "EDMPrecond"
    assert all(load(fsdp / f"network-snapshot-000004-ema{name}.pt")["class_name"] == "EDMPrecond" for name in EMAS)
    for key in ("opt_G", "opt_fake"):
        assert sb[key]["param_groups"] == sa[key]["param_groups"]
        assert all(sb[key]["state"][i]["exp_avg"].shape == s["exp_avg"].shape for i, s in sa[key]["state"].items())
    assert (fsdp / "grid-000002.png").is_file()

    # The --fsdp state of step 2 resumed without --fsdp in one process, and with it in two (bit for bit).
    run_cli(fsdp_args(plain, real, "--max-steps", 4, "--resume", fsdp / "training-state-000002.pt"))
    assert_same_updates(networks(sa), networks(load(plain / "training-state-000004.pt")), starts)
    torchrun(fsdp_args(again, real, "--max-steps", 4, "--resume", fsdp / "training-state-000002.pt"))
    assert [[r[k] for k in KEYS] for r in read_stats(again)] == [[r[k] for k in KEYS] for r in b[2:]]
    sb, sc = networks(sb), networks(load(again / "training-state-000004.pt"))
    for key in starts:
        assert all(torch.equal(sb[key][k], sc[key][k]) for k in sb[key]), key
    for key in ("opt_G", "opt_fake"):
        assert all(torch.equal(sb[key]["state"][i][m], s[m]) for i, s in sc[key]["state"].items() for m in s), key


def test_fsdp_fid_needs_as_many_batches_on_every_process(tmp_path, real, monkeypatch):
    """Every call of a sharded G gathers it on all processes, so each must make as many FID batches."""
    import dmd.train

    monkeypatch.setattr(dmd.train.dist, "get_world_size", lambda: 2)
    args = fsdp_args(tmp_path / "run", real, "--max-steps", 1, "--fsdp", "--fid-every", "1", "--fid-num", "6")
    result = run_cli([*args, "--dry-run"], expect_ok=False)
    assert result.exit_code != 0
    assert "--fsdp with --fid-every needs --fid-num a multiple of --batch-size x processes (4)" in result.output


def test_fsdp_alone_changes_nothing(tmp_path, real):
    """Without torchrun there is nothing to shard: --fsdp trains as the run without it, bit for bit."""
    run_cli(fsdp_args(tmp_path / "plain", real, "--max-steps", 1))
    run_cli(fsdp_args(tmp_path / "fsdp", real, "--max-steps", 1, "--fsdp"))
    a, b = (load(tmp_path / name / "training-state-000001.pt") for name in ("plain", "fsdp"))
    assert all(torch.equal(a["G"][k], b["G"][k]) for k in a["G"])


def test_fsdp_on_edm2_keeps_the_normalised_weights_and_equals_one_process(tmp_path, real):
    """EDM2's students: the forced weight normalisation runs on each rank's shard of output channels, and the 0-d
    gains FSDP2 cannot shard stay whole with their gradients averaged; DMD2 with the guided teacher, as one process."""
    from test_train_edm2 import LOSSES as EDM2_LOSSES
    from test_train_edm2 import edm2_args, student_start

    from dmd.edm2.layers import MPConv, normalize

    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(edm2_args(one, real, "--max-steps", 2))
    args = edm2_args(two, real, "--max-steps", 2)
    args[args.index("--batch-size") + 1] = "1"
    proc = subprocess.run([*TORCHRUN, "-m", "dmd", *args, "--fsdp"], cwd=ROOT, env=ONE_THREAD_ENV, capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0 and "Warning" not in proc.stderr, proc.stderr[-3000:]
    a, b = read_stats(one), read_stats(two)
    np.testing.assert_allclose(
        [[r[k] for k in EDM2_LOSSES] for r in b], [[r[k] for k in EDM2_LOSSES] for r in a], rtol=1e-5
    )
    student = student_start()
    start = student.state_dict()
    sa, sb = load(one / "training-state-000002.pt"), load(two / "training-state-000002.pt")
    assert_same_updates(sa, sb, dict(G=start, mu_fake=start))
    assert sb["G"]["unet.out_gain"].shape == () and not torch.equal(sb["G"]["unet.out_gain"], start["unet.out_gain"])
    convs = [f"{name}.weight" for name, m in student.named_modules() if isinstance(m, MPConv)]
    for key in ("G", "mu_fake"):  # normalised after the last step, shard by shard
        assert all(torch.allclose(normalize(sb[key][w]), sb[key][w], atol=1e-6) for w in convs), key
