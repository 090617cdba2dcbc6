"""The shipped model (apps/radregion/model) on real images: the three real CR DICOMs and held-out PNGs of rare
regions (test split of `make model`: `radregion split --seed 0 --test-fraction 0.2`; no training step saw them)."""

import pytest

from radregion.bundle import image_ids, load_bundle, shipped_model_path, trained_on
from radregion.datasets import read_labels_csv
from radregion.inference import Predictor

# held-out test-split images of regions with 4 to 25 training images, and what they show
RARE_REGIONS = {
    "images/1.2.826.0.1.3680043.8.498.11894940074764904932803154350376953059.png": "Elbow",
    "images/1.2.826.0.1.3680043.8.498.13399164675675937607810731683880694686.png": "Shoulder",
    "images/1.2.826.0.1.3680043.8.498.17745861058415991247777393206455732839.png": "Hip",
    "images/1.2.826.0.1.3680043.8.498.20572372883843674103331896810587749996.png": "Finger",
    "images/1.2.826.0.1.3680043.8.498.35566538088048503568734565120348111096.png": "Skull",
}

# held-out `Others` images (bone-density scans of a hip, the same hip, a lumbar spine) the out-of-domain score flags
HELD_OUT_OTHERS = (
    "images/1.2.826.0.1.3680043.8.498.12949185835253",
    "images/1.2.826.0.1.3680043.8.498.40040328007680",
    "images/1.2.826.0.1.3680043.8.498.88421842295081",
)


@pytest.fixture(scope="module")
def predictor():
    path = shipped_model_path()
    assert path is not None and (path / "bundle.json").is_file(), "the shipped model is not installed"
    return Predictor(load_bundle(path), workers=0)


def test_real_cr_dicoms(predictor, real_dicoms):
    by_name = {p.name: p for p in real_dicoms}
    results = {p.path.split("/")[-1]: p for p in predictor.predict([by_name[n] for n in sorted(by_name)])}
    assert all(r.error is None for r in results.values())
    assert results["RG1_J2KI.dcm"].region == "Chest"
    for name in ("RG3_J2KI.dcm", "RG3_J2KR.dcm"):  # a distal tibia, once called Elbow 0.88
        assert results[name].region in ("Lower Leg", "Ankle"), (name, results[name].region)


def test_rare_regions_of_held_out_patients(predictor, unifesp):
    paths = [unifesp / image for image in RARE_REGIONS]
    predicted = {str(p.path): p.region for p in predictor.predict(paths)}
    wrong = {
        image: (region, predicted[str(unifesp / image)])
        for image, region in RARE_REGIONS.items()
        if predicted[str(unifesp / image)] != region
    }
    assert not wrong
    assert not any(p.out_of_domain for p in predictor.predict(paths))  # rare, but in the domain


def test_held_out_out_of_domain_images_are_flagged(predictor, unifesp):
    paths = [next((unifesp / "images").glob(prefix.split("/")[-1] + "*.png")) for prefix in HELD_OUT_OTHERS]
    flagged = {p.path: p.out_of_domain for p in predictor.predict(paths)}
    assert len(flagged) == len(HELD_OUT_OTHERS) and all(flagged.values()), flagged


def test_the_shipped_model_is_the_recipe_of_its_card():
    bundle = load_bundle(shipped_model_path())
    assert bundle.meta["architecture"]["name"] == "efficientnet-lite0"
    assert len(bundle.regions) == 21 and "Others" not in bundle.regions
    assert bundle.training_set() is not None  # what the server's retraining starts from
    assert bundle.held_out() is not None and len(bundle.held_out()) == 258  # what a retrained head must not be worse on
    assert bundle.ood_detector().method == "classifier"
    assert (shipped_model_path() / "MODEL_CARD.md").read_text().count(bundle.version) >= 1


def test_the_shipped_model_knows_its_training_and_held_out_images_by_content(unifesp):
    """Which images trained the model must not depend on the machine: its split CSVs are not in a checkout, and
    matching stored features fails where the CPU computes in other numerics (bf16 against fp32)."""
    bundle = load_bundle(shipped_model_path())
    items = read_labels_csv(unifesp / "labels.csv", taxonomy=bundle.taxonomy())
    by_id = dict(zip(image_ids([it.path for it in items]).tolist(), items))
    patients = {}
    for name, stored in (("train", bundle.training_set()), ("held-out", bundle.held_out())):
        assert stored.images is not None, f"the {name} set stores no image ids"
        rows = [by_id.get(i) for i in stored.images.tolist()]
        assert None not in rows, f"{rows.count(None)} {name} ids are no shared image"
        assert [it.labels[0] for it in rows] == stored.truths(bundle.regions)  # every row is the image it says
        patients[name] = {it.patient_id for it in rows}
    assert not patients["train"] & patients["held-out"]  # split by patient
    held_out = [it.path for it in items if it.patient_id in patients["held-out"]]
    assert not trained_on(bundle, held_out, include_head=True)[0].any()
    train_patients = [it for it in items if it.patient_id in patients["train"]]
    in_head = trained_on(bundle, [it.path for it in train_patients], include_head=True)[0]
    assert in_head.sum() == len(bundle.training_set())
    assert all(it.labels[0] == "Others" for it, known in zip(train_patients, in_head) if not known)
