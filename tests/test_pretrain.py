"""Pretraining on real radiographs: each method into a loadable bundle, resume, signals, DDP on 2 processes.

Small on purpose (ResNet-10, 32-64 px, 16 images, a few steps): the machine has 2 shared cores.
"""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from radregion.bundle import WEIGHTS, load_bundle
from radregion.device import autocast_dtype
from radregion.errors import RadiographError
from radregion.networks import build_backbone
from radregion.pretrain import byol_momentum, checkpoint_path, lr_factor, pretrain
from radregion.pretrain_data import ViewsDataset, class_ids, usable_images

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(arch="resnet10", size=64, batch_size=8, warmup_epochs=1, workers=0, progress=False)


@pytest.fixture(scope="module")
def images(unifesp, tmp_path_factory) -> dict:
    """12 labelled images (a CSV with 4 regions) and a folder of 4 unlabelled ones, all real."""
    root = tmp_path_factory.mktemp("pretrain_data")
    with open(unifesp / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    chosen = []
    for region in ("Chest", "Knee", "Hand", "Skull"):
        chosen += [r for r in rows if r["labels"] == region][:3]
    csv_path = root / "labels.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "labels"])
        writer.writerows([[str(unifesp / r["image"]), r["labels"]] for r in chosen])
    folder = root / "unlabelled"
    folder.mkdir()
    for path in sorted((unifesp / "unlabelled").glob("*.png"))[:4]:
        shutil.copy(path, folder / path.name)
    return {"csv": csv_path, "folder": folder}


def _backbone_tensors(bundle_path) -> dict:
    return {k: v for k, v in load_file(str(Path(bundle_path) / WEIGHTS)).items() if k.startswith("backbone.")}


@pytest.mark.parametrize("method, precision", [("simclr", "auto"), ("byol", "fp32"), ("supcon", "bf16")])
def test_each_method_writes_a_bundle_that_loads(method, precision, images, tmp_path):
    output = tmp_path / f"{method}-bundle"
    result = pretrain(
        method,
        [images["csv"], images["folder"]],
        output,
        epochs=2,
        seed=0,
        precision=precision,
        log_dir=tmp_path / "tb",
        **SMALL,
    )
    assert result == output and not checkpoint_path(output).exists()
    bundle = load_bundle(output)
    assert bundle.meta["architecture"]["name"] == "resnet10" and bundle.settings.size == 64
    training = bundle.meta["training"]
    expected = autocast_dtype(torch.device("cpu"), precision) or torch.float32  # auto: bf16 where the CPU has it
    assert training["precision"] == str(expected).replace("torch.", "")
    assert training["method"] == method and training["epochs"] == 2 and training["images"] == 16
    assert training["labelled_images"] == 12 and str(images["csv"].resolve()) in training["data"]
    backbone = bundle.backbone()
    with torch.no_grad():
        features = backbone(torch.rand(3, 1, 64, 64))
    assert features.shape == (3, 512) and torch.isfinite(features).all()
    torch.manual_seed(0)
    initial = build_backbone("resnet10").state_dict()
    trained = bundle.backbone_state()
    assert any(not torch.equal(initial[k], trained[k]) for k in initial if initial[k].is_floating_point())
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_zero_epochs_writes_the_seeded_random_backbone(images, tmp_path):
    """The start of the supervised-from-scratch baseline: no training, the same weights for the same seed."""
    first = pretrain("simclr", [images["csv"]], tmp_path / "a", epochs=0, seed=3, **SMALL)
    again = pretrain("simclr", [images["csv"]], tmp_path / "b", epochs=0, seed=3, **SMALL)
    other = pretrain("simclr", [images["csv"]], tmp_path / "c", epochs=0, seed=4, **SMALL)
    a, b, c = (_backbone_tensors(p) for p in (first, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    bundle = load_bundle(first)
    assert bundle.meta["training"]["stage"] == "random initialisation" and bundle.head() is None
    with pytest.raises(ValueError, match="epochs >= 0"):
        pretrain("simclr", [images["csv"]], tmp_path / "d", epochs=-1, **SMALL)


def test_stop_and_resume_equals_an_uninterrupted_run(images, tmp_path):
    inputs = [images["folder"], images["csv"]]
    whole = pretrain("simclr", inputs, tmp_path / "whole", epochs=2, seed=3, log_dir=tmp_path / "tb1", **SMALL)
    output = tmp_path / "resumed"
    assert pretrain("simclr", inputs, output, epochs=2, seed=3, stop_after=1, log_dir=tmp_path / "tb2", **SMALL) is None
    state = torch.load(checkpoint_path(output), weights_only=True)
    assert state["epoch"] == 1 and state["step_in_epoch"] == 0 and state["global_step"] == 2
    assert state["optimizer"]["state"], "the optimizer state is saved"
    assert not output.exists()
    with pytest.raises(RadiographError, match="--resume"):
        pretrain("simclr", inputs, output, epochs=2, seed=3, **SMALL)
    with pytest.raises(RadiographError, match="different run"):
        pretrain("simclr", inputs, output, epochs=3, seed=3, resume=True, **SMALL)
    pretrain("simclr", inputs, output, epochs=2, seed=3, resume=True, log_dir=tmp_path / "tb2", **SMALL)
    a, b = _backbone_tensors(whole), _backbone_tensors(output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not checkpoint_path(output).exists()


def _cli(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "radregion.cli", *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(process, timeout=600):
    """Wait for a command; on a timeout kill it with its loader workers so that nothing is left running."""
    try:
        return process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_sigterm_checkpoints_and_resume_finishes(images, tmp_path):
    output = tmp_path / "killed"
    args = [
        "pretrain",
        "--method",
        "byol",
        "--images",
        images["folder"],
        images["csv"],
        "--output",
        output,
        "--arch",
        "resnet10",
        "--size",
        "32",
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--workers",
        "1",
        "--log-dir",
        tmp_path / "tb",
        "--no-progress",
    ]
    process = _cli(*args)
    deadline = time.monotonic() + 600
    while not checkpoint_path(output).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = _finish(process)
    assert process.returncode == 130, err
    assert "continue with --resume" in err and not output.exists()
    state = torch.load(checkpoint_path(output), weights_only=True)
    assert 4 <= state["global_step"] < 12 and state["target"]  # BYOL's momentum network is saved too
    process = _cli(*args, "--resume")
    out, err = _finish(process)
    assert process.returncode == 0, err
    assert f"resuming {checkpoint_path(output)}" in err
    assert load_bundle(output).meta["training"]["method"] == "byol"


def test_bad_files_are_skipped_and_missing_inputs_are_clear(images, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(images["folder"], folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    process = _cli(
        "pretrain",
        "--method",
        "simclr",
        "--images",
        folder,
        "--output",
        tmp_path / "b",
        "--arch",
        "resnet10",
        "--size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--log-dir",
        tmp_path / "tb",
        "--no-progress",
    )
    out, err = _finish(process)
    assert process.returncode == 0, err
    assert "skipped 1 unusable file" in err and "broken.png" in err
    assert load_bundle(tmp_path / "b").meta["training"]["images"] == 4
    process = _cli("pretrain", "--method", "simclr", "--images", tmp_path / "nowhere", "--output", tmp_path / "c")
    out, err = _finish(process, 120)
    assert process.returncode == 2 and "nowhere: not found" in err and "Traceback" not in err


def test_ddp_two_processes_stay_in_sync(images, tmp_path):
    """torchrun with 2 CPU processes (gloo); SupCon gathers embeddings and labels across the ranks."""
    ranks = tmp_path / "ranks"
    output = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO / "tests" / "ddp_rank_state.py"),
        str(ranks),
        "pretrain",
        "--method",
        "supcon",
        "--images",
        str(images["folder"]),
        str(images["csv"]),
        "--output",
        str(output),
        "--arch",
        "resnet10",
        "--size",
        "48",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--log-dir",
        str(tmp_path / "tb"),
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    out, err = _finish(process)
    assert process.returncode == 0, err[-3000:]
    rank0, rank1 = load_file(str(ranks / "rank0.safetensors")), load_file(str(ranks / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and len(rank0) > 10
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    training = load_bundle(output).meta["training"]
    assert training["world_size"] == 2 and training["global_batch"] == 8 and training["method"] == "supcon"
    torch.manual_seed(0)
    initial = build_backbone("resnet10").conv1.weight
    saved = _backbone_tensors(output)["backbone.conv1.weight"]
    assert torch.equal(saved, rank0["backbone.conv1.weight"]) and not torch.equal(saved, initial)


def test_command_choices_match_the_engine():
    from radregion.commands import pretrain as command
    from radregion.networks import ARCHITECTURES
    from radregion.pretrain import METHODS

    assert command.METHODS == METHODS and set(command.ARCHITECTURES) == set(ARCHITECTURES)
    help_run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "radregion.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "pretrain" in help_run.stdout and " monai" not in help_run.stderr and " torch\n" not in help_run.stderr


def test_schedules():
    factors = [lr_factor(step, 4, 20) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0] and factors[4] == 1.0
    assert all(a >= b for a, b in zip(factors[4:], factors[5:])) and factors[-1] < 0.01
    assert byol_momentum(0, 100) == pytest.approx(0.99) and byol_momentum(100, 100) == pytest.approx(1.0)


def test_unlabelled_images_are_their_own_class():
    ids = class_ids(["Hand", None, "Chest", "Hand", None])
    assert ids[0] == ids[3] != ids[2] and ids[1] != ids[4] and ids[1] < 0 and ids[4] < 0


def _gathered_gradient(rank, port, result_file):
    """One of 2 gloo ranks: NT-Xent on embeddings gathered across ranks; the DDP-averaged gradient."""
    import torch.distributed as dist

    from radregion.losses import ntxent_loss
    from radregion.distributed import GatherWithGradient

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4)
    v1, v2 = torch.randn(8, 6), torch.randn(8, 6)
    mine = slice(4 * rank, 4 * rank + 4)
    loss = ntxent_loss(GatherWithGradient.apply(layer(v1[mine])), GatherWithGradient.apply(layer(v2[mine])))
    loss.backward()
    grad = layer.weight.grad.clone()
    dist.all_reduce(grad)
    grad /= 2  # what DDP does
    if rank == 0:
        layer.zero_grad()
        ntxent_loss(layer(v1), layer(v2)).backward()
        torch.save({"distributed": grad, "single": layer.weight.grad}, result_file)
    dist.destroy_process_group()


def test_gathered_loss_gives_the_single_process_gradient(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gathered_gradient, args=(port, str(tmp_path / "grads.pt")), nprocs=2, join=True)
    grads = torch.load(tmp_path / "grads.pt", weights_only=True)
    assert grads["single"].abs().sum() > 0
    torch.testing.assert_close(grads["distributed"], grads["single"], rtol=1e-5, atol=1e-6)


def test_dataset_reads_cache_entries_and_rebuilds_missing_ones(images, tmp_path):
    from radregion.cleaning import CleaningSettings

    settings = CleaningSettings(size=40)
    paths = sorted(images["folder"].iterdir())[:2]
    kept, entries, classes, errors = usable_images(paths, [-1, -2], settings, workers=1, progress=False)
    assert kept == paths and not errors and all(Path(e).is_file() for e in entries)
    Path(entries[1]).unlink()  # a cache entry lost between the scan and the epoch
    dataset = ViewsDataset(kept, entries, classes, settings, size=32, gauge=True, seed=0)
    for index in range(2):
        first, second, label = dataset[index]
        assert first.shape == second.shape == (1, 32, 32) and label == classes[index]
    assert Path(entries[1]).is_file()
    again = ViewsDataset(kept, entries, classes, settings, size=32, gauge=True, seed=0)[0]
    assert torch.equal(again[0], dataset[0][0])  # the same view for the same seed, epoch and image
