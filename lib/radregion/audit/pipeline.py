"""The audit from input to result: which images and given labels, features, out-of-fold probabilities,
suspected errors, out-of-domain flags; then the files in the output folder."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from radregion.audit import issues as label_issues
from radregion.audit.result import AuditResult
from radregion.bundle import image_ids
from radregion.ensemble import bundles_ood
from radregion.errors import RadiographError
from radregion.features import bundle_features
from radregion.validation import can_fit_out_of_fold, label_set_fold_ids, out_of_fold_probabilities

DISPLAY_SIZE = 224  # thumbnails and Grad-CAM overlays in the report, whatever the model's input size


@dataclass
class AuditInput:
    paths: list[Path]
    images: list[str]  # as written in the CSVs
    given: list[tuple[str, ...]]  # () = no given label
    patient_ids: list[str | None]
    source: str
    errors: list = field(default_factory=list)


def inputs_from_labels_csv(csv_path, images_root=None, taxonomy=None) -> AuditInput:
    from radregion.datasets import read_labels_csv

    items = read_labels_csv(csv_path, images_root, taxonomy=taxonomy)
    root = Path(images_root) if images_root else Path(csv_path).parent
    return AuditInput(
        paths=[Path(it.path) for it in items],
        images=[_display(it.path, root) for it in items],
        given=[tuple(it.labels) for it in items],
        patient_ids=[it.patient_id for it in items],
        source=str(csv_path),
    )


def inputs_from_dicom_folder(folder, taxonomy, progress=True) -> AuditInput:
    """Every radiograph under `folder`; the given label is the taxonomy's reading of its DICOM header
    (a conflict between header fields or no mapped field = no given label)."""
    from radregion.io import find_radiographs, read_metadata

    folder = Path(folder)
    if not folder.is_dir():
        raise RadiographError(folder, "not a folder")
    paths, errors = find_radiographs(folder)
    kept, given, patients = [], [], []
    for path in tqdm(paths, desc="headers", unit="file", file=sys.stderr, disable=not progress):
        try:
            meta = read_metadata(path)
        except RadiographError as error:
            errors.append(error)
            continue
        label = taxonomy.archive_label(meta)
        kept.append(Path(path))
        given.append((label.regions or (label.region,)) if label.region and not label.conflicts else ())
        patients.append(meta.get("PatientID") or None)
    return AuditInput(
        paths=kept,
        images=[str(p.resolve()) for p in kept],
        given=given,
        patient_ids=patients,
        source=str(folder),
        errors=list(errors),
    )


def _display(path, root) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def audit_regions(bundle, taxonomy) -> tuple[list[str], set[str]]:
    """(classes of the audit, out-of-domain region names): the bundle head's regions, else the taxonomy's."""
    out_of_domain = {r.name for r in taxonomy.regions if r.out_of_domain}
    regions = list(bundle.regions) if bundle.has_head else [r for r in taxonomy.names if r not in out_of_domain]
    return regions, out_of_domain


def normalise_labels(inputs: AuditInput, regions, out_of_domain, taxonomy):
    """Region names as the audit knows them; unknown names are an error naming the source."""
    known = set(regions) | out_of_domain
    given = []
    for image, labels in zip(inputs.images, inputs.given):
        names = []
        for label in labels:
            name = label if label in known else taxonomy.match_text(label)
            if name is None or name not in known:
                raise RadiographError(
                    inputs.source, f"image {image}: unknown region {label!r} (known: {', '.join(sorted(known))})"
                )
            names.append(name)
        given.append(tuple(names))
    return given


def run_audit(
    bundles, inputs: AuditInput, *, method=label_issues.DEFAULT_METHOD, folds=5, seed=0, workers=2, progress=True
) -> AuditResult:
    """Several bundles average their probabilities."""
    first = bundles[0]
    taxonomy = first.taxonomy()
    regions, ood_regions = audit_regions(first, taxonomy)
    given = normalise_labels(inputs, regions, ood_regions, taxonomy)
    for bundle in bundles[1:]:
        if bundle.has_head and list(bundle.regions) != regions:
            raise RadiographError(bundle.path, "its regions differ from the first model's: cannot ensemble")

    features_per_bundle, ok, errors = [], np.ones(len(inputs.paths), bool), list(inputs.errors)
    for bundle in bundles:
        feats, bundle_ok, bundle_errors = bundle_features(bundle, inputs.paths, workers=workers, progress=progress)
        features_per_bundle.append(feats)
        errors += [e for e, i in zip(bundle_errors, np.flatnonzero(~bundle_ok)) if ok[i]]  # once per file
        ok &= bundle_ok
    rows = np.flatnonzero(ok)
    if not len(rows):
        raise RadiographError(inputs.source, "no readable radiograph to audit")
    paths = [inputs.paths[i] for i in rows]
    given = [given[i] for i in rows]
    patients = [inputs.patient_ids[i] for i in rows]
    in_domain = [tuple(r for r in labels if r in regions) for labels in given]

    use_oof = can_fit_out_of_fold(in_domain)
    stored_too = bool(_stored_labels(first, regions, features_per_bundle[0][rows], paths))
    fold_ids = label_set_fold_ids(in_domain, patients, paths, k=folds, seed=seed) if use_oof else None
    probs = []
    for bundle, feats in zip(bundles, features_per_bundle):
        feats = feats[rows]
        if use_oof:
            probs.append(label_probabilities(bundle, feats, in_domain, regions, fold_ids, progress, paths))
        elif bundle.has_head:
            probs.append(bundle.head().probabilities(feats).astype(np.float64))
        else:
            raise RadiographError(
                bundle.path,
                "has no head and the input has too few labels (fewer than 20, or fewer than two regions) to fit one",
            )
    pred_probs = np.mean(probs, axis=0)
    ood_score, out_of_domain = bundles_ood(bundles, [f[rows] for f in features_per_bundle])
    trained_on = np.zeros(len(rows), bool)
    for bundle, feats in zip(bundles, features_per_bundle):
        trained_on |= in_training_set(bundle, feats[rows], paths)

    given_index = label_issues.primary_labels([[regions.index(r) for r in labels] for labels in in_domain], pred_probs)
    result = AuditResult(
        images=[inputs.images[i] for i in rows],
        paths=paths,
        patient_ids=patients,
        regions=regions,
        given=given,
        given_index=given_index,
        pred_probs=pred_probs,
        issue_score=label_issues.issue_scores(given_index, pred_probs),
        is_issue=label_issues.find_label_issues(given_index, pred_probs, method, out_of_domain=out_of_domain),
        ood_score=ood_score,
        out_of_domain=out_of_domain,
        features=np.concatenate([f[rows] for f in features_per_bundle], axis=1),
        method=method,
        models=[f"{b.path.name} ({b.version})" for b in bundles],
        errors=errors,
        source=inputs.source,
        probabilities_from=(
            f"{len(np.unique(fold_ids[fold_ids >= 0]))}-fold out-of-fold linear heads, grouped by patient"
            + (", each also fitted on the model's own training set" if stored_too else "")
            if use_oof
            else "the model's own head (too few labels to fit out-of-fold heads)"
        )
        + (f", averaged over {len(bundles)} models" if len(bundles) > 1 else ""),
        trained_on=trained_on,
    )
    return result


def label_probabilities(bundle, features, label_sets, regions, fold_ids, progress=False, paths=None) -> np.ndarray:
    """(N, R) out-of-fold probabilities of the audited images (`paths`: their files, when known): each image's from
    a linear head fitted on the archive's other folds and, when the bundle stores it, the model's own labelled
    training set less the audited images themselves (`in_training_set`), so that no image's own label judges it."""
    extra = _stored_labels(bundle, regions, features, paths)
    return out_of_fold_probabilities(features, label_sets, regions, fold_ids, progress=progress, **extra)


def in_training_set(bundle, features, paths=None) -> np.ndarray:
    """(N,) bool: which audited images (their files `paths`, their features) are in the training set the bundle's
    head was fitted on. Their labels reached the model: it rarely doubts them."""
    return _same_images(bundle, features, paths)[0]


SAME_IMAGE = 1e-2  # relative L2 distance under which two feature vectors are one image (fp16 storage: ~1e-3)


def _same_images(bundle, features, paths=None) -> tuple[np.ndarray, np.ndarray, object]:
    """(audited rows that are a stored training image, stored rows that are an audited image, the stored set).
    Same image: the same file content (`TrainingSet.images`, exact on any device) where the bundle stores it and the
    files are known; else features within `SAME_IMAGE` relative distance (the stored features are fp16 copies of the
    same backbone's; two different radiographs lie far further apart; a head fitted on another device's numerics is
    not recognised). In chunks: an archive of 100,000 images costs 16 MB at a time."""
    stored = bundle.training_set() if bundle.has_head else None
    features = np.asarray(features, np.float32)
    audited = np.zeros(len(features), bool)
    if stored is None or not len(stored):
        return audited, np.zeros(0, bool), stored
    if stored.images is not None and paths is not None:
        ids = image_ids(paths)
        return np.isin(ids, stored.images), np.isin(stored.images, ids), stored
    bank = np.asarray(stored.features, np.float32)
    bank_sq = (bank**2).sum(1)
    matched = np.zeros(len(bank), bool)
    for start in range(0, len(features), 4096):
        q = features[start : start + 4096]
        q_sq = (q**2).sum(1)
        close = np.maximum(q_sq[:, None] + bank_sq[None, :] - 2 * q @ bank.T, 0) < SAME_IMAGE**2 * q_sq[:, None]
        audited[start : start + len(q)] = close.any(1)
        matched |= close.any(0)
    return audited, matched, stored


def _stored_labels(bundle, regions, audited_features, audited_paths=None) -> dict:
    """The bundle's own labelled training features as extra rows for the out-of-fold heads (never predicted
    themselves): curated labels that every fold's head learns from besides the audited archive's other folds,
    without the rows of images that are being audited (those would judge themselves)."""
    if not bundle.has_head or list(bundle.regions) != list(regions):
        return {}
    _, matched, stored = _same_images(bundle, audited_features, audited_paths)
    if stored is None or matched.all():
        return {}
    names = stored.truths(regions)
    return {
        "extra_features": np.asarray(stored.features, np.float32)[~matched],
        "extra_label_sets": [(names[j],) for j in np.flatnonzero(~matched)],
    }


def gradcam_maps(bundle, result, images, indices, features=None) -> dict:
    """Grad-CAM of the suggested region for `indices`: the first bundle's backbone + a head fitted on all
    labelled images and the bundle's stored training set, as the audit's probabilities were (the bundle's own head
    when there are too few labels)."""
    from radregion.audit.gradcam import Classifier, grad_cams
    from radregion.head import fit_head

    indices = [i for i in indices if i in images]
    if not indices:
        return {}
    head = bundle.head() if bundle.has_head else None
    labelled = np.flatnonzero(result.given_index >= 0)
    dim = int(bundle.meta["architecture"]["feature_dim"])
    feats = result.features[:, :dim] if features is None else features
    names = [result.regions[k] for k in result.given_index[labelled]]
    if can_fit_out_of_fold([(n,) for n in names]):
        stored = _stored_labels(bundle, result.regions, feats, result.paths)
        x = np.concatenate([feats[labelled], stored.get("extra_features", feats[:0])])
        names += [labels[0] for labels in stored.get("extra_label_sets", ())]
        head = fit_head(x, names, [r for r in result.regions if r in set(names)])
    if head is None:
        return {}
    columns = {r: k for k, r in enumerate(head.regions)}
    targets = [columns.get(result.regions[result.suggested_index[i]]) for i in indices]
    keep = [(i, t) for i, t in zip(indices, targets) if t is not None]
    if not keep:
        return {}
    classifier = Classifier.from_head(bundle.backbone(), head)
    stack = np.stack([images[i] for i, _ in keep])
    maps = grad_cams(classifier, stack, [t for _, t in keep])
    return {i: m for (i, _), m in zip(keep, maps)}


def write_outputs(result, output, bundle, *, max_rows=200, gradcam=True, progress=True) -> dict:
    """label_issues.csv, corrections.csv and index.html in `output`; returns their paths."""
    from radregion.audit.report import shown_indices, tsne_coordinates, write_report
    from radregion.audit.writer import write_audit_csv, write_corrections_csv
    from radregion.cache import load_clean

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    files = {
        "label_issues": write_audit_csv(result.rows(), output / "label_issues.csv"),
        "corrections": write_corrections_csv(result.corrections(), output / "corrections.csv"),
    }
    shown = shown_indices(result, max_rows)
    needed = sorted(set().union(*shown.values()))
    display = dataclasses.replace(bundle.settings, size=max(bundle.settings.size, DISPLAY_SIZE))
    steps = tqdm(total=len(needed) + 2, desc="report", unit="step", file=sys.stderr, disable=not progress)
    images = {}
    for i in needed:
        images[i] = load_clean(result.paths[i], display)
        steps.update()
    model_input = {i: load_clean(result.paths[i], bundle.settings) for i in shown["issues"]} if gradcam else {}
    cams = gradcam_maps(bundle, result, model_input, shown["issues"]) if gradcam else {}
    steps.update()
    xy = tsne_coordinates(result.features, seed=0)
    steps.update()
    steps.close()
    files["report"] = write_report(output / "index.html", result, images, cams, xy, max_rows=max_rows)
    return files
