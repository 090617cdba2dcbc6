"""`radregion soup`: the uniform weight average of bundles fine-tuned from one start (radregion.soup)."""

import numpy as np
import pytest
import torch

from radregion.bundle import load_bundle
from radregion.cli import main

from fixtures.bundle import TINY_PER_CLASS


@pytest.fixture(scope="module")
def members(tiny_bundle, unifesp, tmp_path_factory):
    """Two bundles fine-tuned one epoch from the tiny fixture's pretrained start at other seeds, and a third from
    another start (the first member itself)."""
    from radregion.datasets import read_labels_csv, sample_per_class
    from radregion.fitting import train_head

    root = tmp_path_factory.mktemp("soup")
    items = sample_per_class(read_labels_csv(unifesp / "labels.csv"), TINY_PER_CLASS, seed=0)
    start = load_bundle(tiny_bundle.parent / "pretrained")
    tuned = [train_head(start, items, root / f"m{seed}", fine_tune_epochs=1, folds=2, seed=seed) for seed in (1, 2)]
    other = train_head(tuned[0], items, root / "other", fine_tune_epochs=1, folds=2, seed=3)
    return tuned, other, items


def test_the_soup_is_the_mean_of_its_members_weights_and_has_no_head(members, tmp_path, capsys):
    (first, second), _, _ = members
    out = tmp_path / "soup"
    assert main(["soup", "--model", str(first.path), "--model", str(second.path), "--output", str(out)]) == 0
    soup = load_bundle(out)
    assert not soup.has_head and soup.regions == []
    a, b, mean = first.backbone_state(), second.backbone_state(), soup.backbone_state()
    floats = [k for k, v in a.items() if v.is_floating_point()]
    assert any(not torch.equal(a[k], b[k]) for k in floats)  # the members differ
    for key in floats:  # stored in fp16, as the members are
        assert torch.equal(mean[key], ((a[key] + b[key]) / 2).half().float()), key
    training = soup.meta["training"]
    assert [m["version"] for m in training["members"]] == [first.version, second.version]
    assert training["backbone"] == first.meta["training"]["backbone"]  # the start all members share
    assert training["batch_norm"] == "averaged" and "radregion soup --model" in training["command"]
    assert soup.meta["licence"] == first.meta["licence"]  # the members' terms, once
    assert "fit-head --model" in capsys.readouterr().out


def test_the_soup_refuses_members_of_other_starts_or_a_single_member(members, tiny_bundle, tmp_path, capsys):
    (first, _), other, _ = members
    assert main(["soup", "--model", str(first.path), "--model", str(other.path), "--output", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert str(other.path) in err and "another start" in err
    assert main(["soup", "--model", str(first.path), "--output", str(tmp_path / "s")]) == 2
    assert "at least two" in capsys.readouterr().err
    start = tiny_bundle.parent / "pretrained"  # not fine-tuned: no start to share
    assert main(["soup", "--model", str(start), "--model", str(start), "--output", str(tmp_path / "s")]) == 2
    assert "not a fine-tuned bundle" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_recalibrated_batch_norms_hold_the_statistics_of_the_averaged_network(members, tmp_path):
    from radregion.features import images_to_tensor, load_clean_images
    from radregion.soup import recalibrate_batch_norm

    (first, second), _, items = members
    images = load_clean_images([it.path for it in items[:40]], first.settings)
    net = first.backbone()
    recalibrate_batch_norm(net, images, batch_size=len(images))  # one batch: the statistics are its own
    conv, norm = net.conv1, net.bn1
    with torch.no_grad():
        activations = conv(images_to_tensor(images))
    assert torch.allclose(norm.running_mean, activations.mean((0, 2, 3)), atol=1e-5)
    assert not net.training and torch.equal(conv.weight, first.backbone().conv1.weight)  # the weights stay
    # through the command: the weights are the average, the statistics are recomputed on the CSV's images
    csv = tmp_path / "images.csv"
    csv.write_text("image,labels\n" + "".join(f"{it.path},{it.labels[0]}\n" for it in items[:40]))
    out = tmp_path / "soup"
    args = ["soup", "--model", str(first.path), "--model", str(second.path), "--recalibrate", str(csv)]
    assert main([*args, "--output", str(out)]) == 0
    soup = load_bundle(out).backbone_state()
    averaged = {
        k: (first.backbone_state()[k] + second.backbone_state()[k]) / 2 for k in ("conv1.weight", "bn1.running_mean")
    }
    assert torch.equal(soup["conv1.weight"], averaged["conv1.weight"].half().float())
    assert not torch.allclose(soup["bn1.running_mean"], averaged["bn1.running_mean"], atol=1e-3)
    assert np.isfinite(soup["bn1.running_var"].numpy()).all()
