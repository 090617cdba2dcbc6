"""Model bundle: a folder with `model.safetensors` (all tensors) and `bundle.json` (everything else).

Tensors: "backbone.*" (fp16 or fp32, loaded as fp32), "head.weight" (C, D), "head.bias" (C,),
"head.feature_mean" (D,), "head.feature_std" (D,), "ood.*" (the out-of-domain statistics), the training set
the head was fitted on: "train.features" (N, D) fp16, "train.targets" (N,) region index, "train.groups" (N,) patient
group (what a retrained head starts from), and optionally a held-out set of other patients' labelled images in the
same form under "heldout.*" (`radregion fit-head --held-out`; what a retrained head must not be worse on).
Loading never unpickles anything: safetensors and JSON only.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from radregion.errors import RadiographError

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "bundle.json"
UNKNOWN_LICENCE = "unknown"  # no one said under which terms the training images may be used


def shipped_model_path() -> Path | None:
    """The shipped model: the bundle installed with the package as `radregion_model` (apps/radregion/model in the
    source tree); None when this install has none."""
    from importlib.util import find_spec

    spec = find_spec("radregion_model")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def default_model_path() -> Path:
    """$RADREGION_MODEL, else the shipped model."""
    env = os.environ.get("RADREGION_MODEL")
    if env:
        return Path(env)
    shipped = shipped_model_path()
    return shipped if shipped is not None else Path(__file__).resolve().parents[2] / "apps" / "radregion" / "model"


def resolve_model(path=None) -> Path:
    """The bundle to use: `path`, or the default model; RadiographError when there is none."""
    if path is not None:
        return Path(path)
    default = default_model_path()
    if not (default / META).is_file():
        raise RadiographError(default, "no default model here (set RADREGION_MODEL or pass --model BUNDLE)")
    return default


TRAINING_SET = "train"  # key prefix of the training set in model.safetensors
HELD_OUT_SET = "heldout"  # key prefix of the held-out set
_KEEP = object()


@dataclass
class TrainingSet:
    """Labelled features of one backbone: (N, D) float32, region index (N,) in the bundle's regions, patient group
    (N,) as integers, and which image each row is (`image_ids`: the first 8 bytes of the file's sha256 as int64;
    None in bundles written before they were stored). A bundle stores the set its head was fitted on, and may store a
    held-out set."""

    features: np.ndarray
    targets: np.ndarray
    groups: np.ndarray
    images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def truths(self, regions) -> list[str]:
        """The region name of every row."""
        return [regions[t] for t in self.targets]

    def tensors(self, prefix: str = TRAINING_SET) -> dict:
        return {
            f"{prefix}.features": torch.from_numpy(np.ascontiguousarray(self.features, np.float32)).half(),
            f"{prefix}.targets": torch.from_numpy(np.ascontiguousarray(self.targets, np.int64)),
            f"{prefix}.groups": torch.from_numpy(np.ascontiguousarray(self.groups, np.int64)),
            **({} if self.images is None else {f"{prefix}.images": torch.from_numpy(np.array(self.images, np.int64))}),
        }


def image_ids(paths) -> np.ndarray:
    """(N,) int64: which image each file is, by content (`TrainingSet.images`), whatever its path or the device."""
    from radregion.cache import file_sha256

    return np.array([int.from_bytes(bytes.fromhex(file_sha256(p)[:16]), "big", signed=True) for p in paths], np.int64)


class Bundle:
    """A loaded bundle. Tensors are read once; the backbone is built on request."""

    def __init__(self, path, meta: dict, tensors: dict[str, torch.Tensor], version: str):
        self.path = Path(path)
        self.meta = meta
        self._tensors = tensors
        self.version = version  # short content hash of the weights file: the model_version the server reports

    # --- description -------------------------------------------------------------------------------------
    @property
    def regions(self) -> list[str]:
        return list(self.meta.get("taxonomy", {}).get("regions", []))

    @property
    def settings(self):
        from radregion.cleaning import CleaningSettings

        return CleaningSettings.from_dict(self.meta["cleaning"])

    @property
    def has_head(self) -> bool:
        return "head.weight" in self._tensors

    def taxonomy(self):
        """The taxonomy stored in the bundle (falls back to the named one shipped with the package)."""
        from radregion.taxonomy import Taxonomy, load_taxonomy

        info = self.meta.get("taxonomy", {})
        if info.get("definition"):
            return Taxonomy.from_dict(info["definition"])
        return load_taxonomy(info.get("name", "unifesp22"))

    # --- tensors -------------------------------------------------------------------------------------------
    def backbone_state(self, dtype=torch.float32) -> dict[str, torch.Tensor]:
        prefix = "backbone."
        return {
            k[len(prefix) :]: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
            for k, v in self._tensors.items()
            if k.startswith(prefix)
        }

    def backbone(self) -> torch.nn.Module:
        """The backbone network with its weights (fp32), in eval mode."""
        from radregion.networks import build_backbone

        arch = self.meta["architecture"]
        net = build_backbone(arch["name"])
        missing, unexpected = net.load_state_dict(self.backbone_state(), strict=False)
        if missing or unexpected:
            raise RadiographError(
                self.path / WEIGHTS,
                f"weights do not fit architecture {arch['name']!r} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
            )
        return net.eval()

    def _array(self, key) -> np.ndarray | None:
        tensor = self._tensors.get(key)
        return None if tensor is None else tensor.float().numpy()

    @property
    def head_weight(self):
        return self._array("head.weight")

    @property
    def head_bias(self):
        return self._array("head.bias")

    @property
    def feature_mean(self):
        return self._array("head.feature_mean")

    @property
    def feature_std(self):
        return self._array("head.feature_std")

    def head(self):
        """The fitted `LinearHead`, or None for a bundle without head (e.g. straight after pretraining)."""
        from radregion.head import LinearHead

        if not self.has_head:
            return None
        return LinearHead(self.head_weight, self.head_bias, self.feature_mean, self.feature_std, self.regions)

    @property
    def ood(self) -> dict:
        """{"method", "threshold", ...} from bundle.json plus the fitted arrays ("ood.X" tensors as key X)."""
        info = dict(self.meta.get("ood") or {})
        for key in self._tensors:
            if key.startswith("ood."):
                info[key[4:]] = self._array(key)
        return info

    def ood_detector(self):
        from radregion.ood import OODDetector

        return OODDetector.from_dict(self.ood) if self.meta.get("ood") else None

    def _stored_set(self, prefix: str) -> TrainingSet | None:
        if f"{prefix}.features" not in self._tensors:
            return None
        images = self._tensors.get(f"{prefix}.images")
        return TrainingSet(
            self._array(f"{prefix}.features"),
            self._tensors[f"{prefix}.targets"].numpy(),
            self._tensors[f"{prefix}.groups"].numpy(),
            None if images is None else images.numpy(),
        )

    def training_set(self) -> TrainingSet | None:
        """The features, region indices and patient groups the head was fitted on (None if not stored)."""
        return self._stored_set(TRAINING_SET)

    def held_out(self) -> TrainingSet | None:
        """The held-out set: features (this backbone's), region indices and patient groups of labelled images of
        patients the head was not fitted on (`radregion fit-head --held-out`); None when the bundle has none."""
        return self._stored_set(HELD_OUT_SET)

    def with_head(
        self,
        path,
        head,
        ood=None,
        meta_updates: dict | None = None,
        *,
        backbone_state=None,
        half_backbone: bool | None = None,
        training_set: TrainingSet | None = None,
        held_out=_KEEP,
    ) -> "Bundle":
        """The one way to replace a bundle's head: save a new bundle at `path` with this backbone (or
        `backbone_state`), a new head, OOD detector and training set; metrics and the old OOD block are dropped,
        `meta_updates` applied. `half_backbone` None: fp16 when this bundle stores fp16.
        `held_out`: a TrainingSet, or None for none; by default this bundle's held-out set is kept when it still
        fits (the same backbone, the same regions in the same order), else dropped."""
        meta = {k: v for k, v in self.meta.items() if k not in ("ood", "metrics")}
        meta.update(meta_updates or {})
        if half_backbone is None:
            half_backbone = self.meta.get("weights_dtype") == "float16"
        if held_out is _KEEP:
            fits = backbone_state is None and head is not None and list(head.regions) == self.regions
            held_out = self.held_out() if fits else None
        state = self.backbone_state(dtype=None) if backbone_state is None else backbone_state
        save_bundle(
            path,
            state,
            head,
            meta,
            ood=ood,
            half_backbone=half_backbone,
            training_set=training_set,
            held_out=held_out,
        )
        return load_bundle(path)

    def __repr__(self):
        arch = self.meta.get("architecture", {}).get("name")
        return f"Bundle({str(self.path)!r}, {arch}, {len(self.regions)} regions, version {self.version})"


def load_bundle(path) -> Bundle:
    """Read a bundle folder; RadiographError naming the file when it is not a usable bundle."""
    path = Path(path)
    if not path.is_dir():
        raise RadiographError(path, "no model bundle here (expected a folder with bundle.json and model.safetensors)")
    meta_file, weights_file = path / META, path / WEIGHTS
    for required in (meta_file, weights_file):
        if not required.is_file():
            raise RadiographError(required, "missing: not a complete model bundle")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RadiographError(meta_file, f"unreadable bundle description ({error})") from None
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise RadiographError(
            meta_file, f"unsupported bundle format version {version!r} (this RadRegion reads up to {FORMAT_VERSION})"
        )
    for key in ("architecture", "cleaning"):
        if key not in meta:
            raise RadiographError(meta_file, f"missing {key!r}")
    try:
        data = weights_file.read_bytes()  # one snapshot: the hash and the tensors come from the same bytes
        tensors = load_safetensors(data)
    except Exception as error:  # safetensors raises its own types for truncated/corrupt files
        raise RadiographError(weights_file, f"unreadable weights ({error})") from None
    bundle = Bundle(path, meta, tensors, hashlib.sha256(data).hexdigest()[:12])
    if bundle.has_head:
        c, d = tensors["head.weight"].shape
        if c != len(bundle.regions) or d != meta["architecture"].get("feature_dim", d):
            raise RadiographError(
                weights_file, f"head has shape ({c}, {d}) but bundle.json lists {len(bundle.regions)} regions"
            )
    for name, prefix in (("training", TRAINING_SET), ("held-out", HELD_OUT_SET)):
        parts = [tensors.get(f"{prefix}.{part}") for part in ("features", "targets", "groups")]
        if all(part is None for part in parts):
            continue
        targets = parts[1]
        images = tensors.get(f"{prefix}.images")
        fits = all(part is not None for part in parts) and len({len(part) for part in parts}) == 1
        fits = fits and (images is None or len(images) == len(targets))
        if not fits or (len(targets) and not 0 <= int(targets.min()) <= int(targets.max()) < len(bundle.regions)):
            raise RadiographError(weights_file, f"the {name} set does not fit the head (rows or region indices)")
    return bundle


def git_commit(cwd=None) -> str | None:
    """The commit of the source tree the code runs from (None outside git)."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance(data, command, **extra) -> dict:
    """The "training" block of bundle.json."""
    return {
        "data": data,
        "command": command,
        "git_commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def combined_licence(data_licence: str, backbone_licence: str | None) -> str:
    """The licence of a bundle trained on data under `data_licence` from a backbone under `backbone_licence`:
    one text when one is unknown or the backbone's already says the data's terms, else both."""
    known = [text for text in (data_licence, backbone_licence) if text and text != UNKNOWN_LICENCE]
    if not known:
        return UNKNOWN_LICENCE
    if len(known) == 1 or known[0] in known[1]:
        return known[-1]
    return f"{known[0]} The backbone it started from: {known[1]}"


def training_stages(training):
    """A bundle's "training" block (see `provenance`), then those of the bundles it was built on, newest first."""
    stage = training if isinstance(training, dict) else {}
    while stage:
        yield stage
        stage = stage.get("backbone") if isinstance(stage.get("backbone"), dict) else {}


def stage_csvs(stage) -> list[str]:
    """The labels CSVs named in one training stage's "data"."""
    return re.findall(r"[^\s'\"(),:\[\]]+\.csv", json.dumps(stage.get("data")))


def label_sources(training, include_head: bool = False) -> list[str]:
    """Labels CSVs whose labels reached a model, read from a bundle's "training" block (see `provenance`) and those
    of the bundles it was built on: fine-tuning (fit-head --fine-tune) and SupCon pretraining train the backbone;
    `include_head` adds the data the last head was fitted on."""
    found = []
    for n, stage in enumerate(training_stages(training)):
        if "head" in stage:  # a head fit: its backbone learnt the labels only when fine-tuned
            used_labels = (include_head and n == 0) or bool((stage.get("head") or {}).get("fine_tune_epochs"))
        else:  # pretraining: SupCon learns from the labels of its CSVs
            used_labels = stage.get("method") == "supcon"
        found += stage_csvs(stage) if used_labels else []
    return list(dict.fromkeys(found))


def labelled_images(bundle, include_head: bool = False) -> tuple[set, list[str], list[str]]:
    """(resolved paths of the images whose labels reached `bundle`, the labels CSVs they were read from, the
    CSVs among those that cannot be read here)."""
    from radregion.datasets import read_labels_csv

    seen, sources, unreadable = set(), label_sources(bundle.meta.get("training"), include_head), []
    for source in sources:
        try:
            seen |= {item.path.resolve() for item in read_labels_csv(source, check_files=False)}
        except RadiographError:
            unreadable.append(source)
    return seen, sources, unreadable


def trained_on(bundle, paths, include_head: bool = False) -> tuple[np.ndarray, list[str], list[str]]:
    """Which of the files `paths` had their labels reach `bundle`: ((N,) bool, the labels CSVs of its training, those
    among them that cannot be read here; see `labelled_images`). A file counts when one of those CSVs lists it, or
    when its content is an image of the training set stored with the bundle's head (`TrainingSet.images`, the same on
    any machine) and either `include_head` is set or a CSV cannot be read here: a bundle made on another machine,
    whose backbone the recipes of this repository fine-tune on the images its head is then fitted on. Missing files
    count as not trained on."""
    seen, sources, unreadable = labelled_images(bundle, include_head)
    paths = [Path(p) for p in paths]
    mask = np.array([p.resolve() in seen for p in paths], bool)
    stored = bundle.training_set() if bundle.has_head and (include_head or unreadable) else None
    if stored is not None and stored.images is not None:
        present = np.array([p.is_file() for p in paths], bool)
        mask[present] |= np.isin(image_ids([p for p, ok in zip(paths, present) if ok]), stored.images)
    return mask, sources, unreadable


def save_bundle(
    path,
    backbone_state: dict,
    head=None,
    meta: dict | None = None,
    ood=None,
    half_backbone: bool = False,
    training_set: TrainingSet | None = None,
    held_out: TrainingSet | None = None,
) -> Path:
    """Write a bundle folder atomically (temp folder next to it, then rename; an old bundle is replaced whole).

    `meta` needs "architecture" ({name, feature_dim, in_channels}) and "cleaning" (CleaningSettings.to_dict());
    taxonomy (name, out_of_domain), training (see `provenance`), metrics, licence (the terms of the training
    data, see `combined_licence`; "unknown" unless given) are recorded as given.
    `head` is a LinearHead or None; `ood` an OODDetector or None. `half_backbone` stores the backbone in fp16.
    `training_set` and `held_out` (TrainingSets, region indices in the head's regions) are stored when given.
    """
    path = Path(path)
    meta = json.loads(json.dumps(meta or {}))  # deep copy, and proof that it is JSON
    for key in ("architecture", "cleaning"):
        if key not in meta:
            raise ValueError(f"bundle meta needs {key!r}")
    tensors = {}
    for key, value in backbone_state.items():
        value = torch.as_tensor(value).detach().cpu()
        if half_backbone and value.is_floating_point():
            value = value.half()
        tensors[f"backbone.{key}"] = value.contiguous()
    taxonomy = meta.setdefault("taxonomy", {})
    taxonomy["regions"] = list(head.regions) if head is not None else []
    if head is not None:
        tensors.update({k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in head.tensors().items()})
    meta.pop("ood", None)
    if ood is not None:
        info, arrays = ood.to_dict()
        meta["ood"] = info
        tensors.update({f"ood.{k}": torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in arrays.items()})
    if training_set is not None:
        tensors.update(training_set.tensors(TRAINING_SET))
    if held_out is not None:
        if head is None or (len(held_out) and int(np.max(held_out.targets)) >= len(head.regions)):
            raise ValueError("a held-out set needs a head whose regions its region indices refer to")
        tensors.update(held_out.tensors(HELD_OUT_SET))
    meta["format_version"] = FORMAT_VERSION
    meta["input_size"] = meta["cleaning"].get("size")
    meta.setdefault("licence", UNKNOWN_LICENCE)
    meta["weights_dtype"] = (
        "float16"
        if half_backbone
        else str(
            next(
                (v.dtype for k, v in tensors.items() if k.startswith("backbone.") and v.is_floating_point()),
                torch.float32,
            )
        ).replace("torch.", "")
    )

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _replace_folder(new: Path, target: Path):
    """Rename `new` to `target`; an existing target is renamed away first and deleted after."""
    if not target.exists():
        os.replace(new, target)
        return
    if not (target / META).exists() and any(target.iterdir()):
        raise RadiographError(target, "exists and is not a model bundle: refusing to replace it")
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
