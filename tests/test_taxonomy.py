"""Taxonomy files: built-ins, user files, validation, lookups."""

import copy
import json

import pytest

from radregion.errors import RadiographError
from radregion.taxonomy import Taxonomy, body_part_term, builtin_names, load_taxonomy, normalise

UNIFESP22 = [
    "Abdomen",
    "Ankle",
    "Cervical Spine",
    "Chest",
    "Clavicles",
    "Elbow",
    "Feet",
    "Finger",
    "Forearm",
    "Hand",
    "Hip",
    "Knee",
    "Lower Leg",
    "Lumbar Spine",
    "Others",
    "Pelvis",
    "Shoulder",
    "Sinus",
    "Skull",
    "Thigh",
    "Thoracic Spine",
    "Wrist",
]
PAPER14 = [
    "Knee",
    "Shoulder",
    "Ankle",
    "Elbow",
    "Foot",
    "Wrist",
    "Hand",
    "Cervical Spine",
    "Clavicle",
    "Thoracic Spine",
    "Lumbar Spine",
    "Skull",
    "Ribs",
    "Scapula",
]


def test_builtins():
    assert builtin_names() == ["paper14", "unifesp22"]
    unifesp = load_taxonomy()
    assert unifesp.name == "unifesp22" and unifesp.names == UNIFESP22
    assert [r.name for r in unifesp.regions if r.out_of_domain] == ["Others"]
    assert unifesp.in_domain == [n for n in UNIFESP22 if n != "Others"]
    paper = load_taxonomy("paper14")
    assert paper.names == PAPER14 and paper.in_domain == PAPER14


def test_unifesp22_matches_the_shared_labels(unifesp):
    import csv

    with open(unifesp / "labels.csv", newline="") as handle:
        used = {lab for row in csv.DictReader(handle) for lab in row["labels"].split("|")}
    assert used == set(UNIFESP22)


@pytest.mark.parametrize("name", ["unifesp22", "paper14"])
def test_builtin_regions_are_complete(name):
    for region in load_taxonomy(name).regions:
        assert region.description and region.synonyms
        if not region.out_of_domain:
            assert region.snomed and region.snomed.isdigit()


def test_lookups():
    taxonomy = load_taxonomy()
    assert taxonomy.get("Knee").body_part_terms[0] == "KNEE"
    assert taxonomy.get("lumbar spine").name == "Lumbar Spine"
    assert taxonomy.index("Wrist") == len(UNIFESP22) - 1
    with pytest.raises(KeyError, match="Foot.*not a region of taxonomy unifesp22.*Abdomen, Ankle"):
        taxonomy.get("Foot")


def test_body_part_term():
    assert body_part_term("Lumbar Spine") == "LSPINE"
    assert body_part_term("Feet") == "FOOT"
    assert body_part_term("Clavicles") == "CLAVICLE"
    assert body_part_term("Ribs") == "RIB"  # found in paper14
    assert body_part_term("Lower Leg") == "LOWERLEG"
    assert body_part_term("Others") is None and body_part_term("Sinus") is None  # no CID 4031 term
    assert body_part_term("Hand", taxonomy="paper14") == "HAND"
    with pytest.raises(KeyError, match="Humerus"):
        body_part_term("Humerus")


def test_normalise():
    assert normalise("Rö Knie li. in 2 Eb.") == "ROE KNIE LI IN 2 EB"
    assert normalise("Röntgen", umlauts_as_digraphs=False) == "RONTGEN"
    assert normalise("Fuß / Sprunggelenk") == "FUSS SPRUNGGELENK"
    assert normalise("Crânio PA e perfil, mão") == "CRANIO PA E PERFIL MAO"
    assert normalise("L-SPINE_3V") == "L SPINE 3V"


def test_umlaut_spelt_either_way():
    taxonomy = load_taxonomy()
    for text in ("Schädel", "SCHAEDEL", "SCHADEL", "Hüfte", "HUEFTE"):
        assert taxonomy.match_text(text) in ("Skull", "Hip"), text


def test_round_trip():
    for name in builtin_names():
        taxonomy = load_taxonomy(name)
        again = Taxonomy.from_dict(json.loads(json.dumps(taxonomy.to_dict())))
        assert again.to_dict() == taxonomy.to_dict()
        assert again.regions == taxonomy.regions


def _write(tmp_path, data, name="mine.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def test_user_taxonomy_file(tmp_path):
    data = {
        "name": "two",
        "regions": [
            {"name": "Knee", "body_part_terms": ["KNEE"], "synonyms": ["Knie"]},
            {"name": "Elsewhere", "out_of_domain": True},
        ],
    }
    taxonomy = load_taxonomy(_write(tmp_path, data))
    assert taxonomy.names == ["Knee", "Elsewhere"] and taxonomy.in_domain == ["Knee"]
    assert taxonomy.archive_label({"StudyDescription": "Rö Knie"}).region == "Knee"
    assert load_taxonomy(str(tmp_path / "mine.json")).names == taxonomy.names
    assert load_taxonomy(taxonomy) is taxonomy


def test_user_taxonomy_yaml(tmp_path):
    path = _write(tmp_path, "name: y\nregions:\n  - name: Knee\n    synonyms: [KNIE]\n", "mine.yaml")
    assert load_taxonomy(path).match_text("KNIE LI") == "Knee"


def _base():
    return copy.deepcopy(
        {"name": "t", "regions": [{"name": "Knee", "synonyms": ["KNIE"]}, {"name": "Hand", "synonyms": ["MAO"]}]}
    )


def _breaks(change):
    data = _base()
    change(data)
    return data


BAD = [
    (lambda d: d["regions"].append({"name": "knee"}), "region name 'knee' appears twice"),
    (lambda d: d["regions"][1]["synonyms"].append("Knie"), "term 'Knie' is in two regions: 'Knee' and 'Hand'"),
    (lambda d: d["regions"][1]["synonyms"].append("knee"), "term 'knee' is in two regions"),
    (lambda d: d["regions"][0].update(synonym=["X"]), r"unknown key\(s\) \['synonym'\]"),
    (lambda d: d["regions"][0].update(body_part_terms=["knee joint"]), "not a DICOM defined term"),
    (lambda d: d["regions"][0].update(snomed="KNEE1"), "not a SNOMED CT concept id"),
    (lambda d: d["regions"][0].update(synonyms="KNIE"), "synonyms must be a list of strings"),
    (lambda d: d["regions"][0].update(out_of_domain="no"), "out_of_domain must be true or false"),
    (lambda d: d["regions"][0]["synonyms"].append("LEFT"), "only laterality/view words"),
    (lambda d: d["regions"][0]["synonyms"].append("--"), "empty term"),
    (lambda d: d["regions"][0].update(name="Knee|Leg"), "'|' separates labels"),
    (lambda d: d["regions"].append({"synonyms": ["X"]}), "region 3 needs a non-empty string 'name'"),
    (lambda d: d.pop("regions"), "needs a non-empty list 'regions'"),
    (lambda d: d.update(name=""), "needs a non-empty string 'name'"),
    (lambda d: [r.update(out_of_domain=True) for r in d["regions"]], "every region is out_of_domain"),
    (lambda d: d.update(ambiguous=[{"terms": ["LIMB"], "regions": ["Knee", "Foot"]}]), "unknown region 'Foot'"),
    (
        lambda d: d.update(ambiguous=[{"terms": ["KNIE"], "regions": ["Knee", "Hand"]}]),
        "ambiguous term 'KNIE' is also a term of region 'Knee'",
    ),
    (lambda d: d.update(ambiguous=[{"terms": ["LIMB"], "regions": ["Knee"]}]), "at least two regions"),
]


@pytest.mark.parametrize("change, message", BAD)
def test_invalid_taxonomy_file_names_file_and_problem(tmp_path, change, message):
    path = _write(tmp_path, _breaks(change))
    with pytest.raises(RadiographError, match=message) as error:
        load_taxonomy(path)
    assert error.value.path == str(path)


def test_valid_base_loads(tmp_path):
    assert load_taxonomy(_write(tmp_path, _base())).names == ["Knee", "Hand"]


def test_unreadable_files(tmp_path):
    with pytest.raises(RadiographError, match="not valid JSON: .*line 1"):
        load_taxonomy(_write(tmp_path, "{name: oops"))
    with pytest.raises(RadiographError, match="must be a JSON object"):
        load_taxonomy(_write(tmp_path, "[1, 2]"))
    builtins = r"no such taxonomy file, and not a built-in taxonomy \(paper14, unifesp22\)"
    with pytest.raises(RadiographError, match=builtins):
        load_taxonomy("unifesp21")
    with pytest.raises(RadiographError, match="no such taxonomy file"):
        load_taxonomy(tmp_path / "missing.json")
