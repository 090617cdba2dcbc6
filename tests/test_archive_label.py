"""The archive's own label: realistic header strings (English, German, Portuguese, RIS) -> region."""

import csv
from pathlib import Path

import pydicom
import pytest

from radregion.taxonomy import ArchiveLabel, load_taxonomy

# (text, unifesp22 region, paper14 region); None = no region (unknown, generic or outside the taxonomy). Kept in a
# data file (columns source,text,unifesp22,paper14) that bench/archive_label.py times without importing the tests.
with open(Path(__file__).with_name("fixtures") / "archive_headers.csv", newline="", encoding="utf-8") as _handle:
    TABLE = [(row["text"], row["unifesp22"] or None, row["paper14"] or None) for row in csv.DictReader(_handle)]


@pytest.mark.parametrize("taxonomy_name, column", [("unifesp22", 1), ("paper14", 2)])
def test_header_table(taxonomy_name, column):
    taxonomy = load_taxonomy(taxonomy_name)
    assert len(TABLE) >= 60
    wrong = []
    for row in TABLE:
        got = taxonomy.archive_label({"StudyDescription": row[0]}).region
        if got != row[column]:
            wrong.append(f"{row[0]!r}: expected {row[column]}, got {got}")
    assert not wrong, "\n".join(wrong)


def test_every_table_region_is_in_its_taxonomy():
    for taxonomy_name, column in (("unifesp22", 1), ("paper14", 2)):
        names = set(load_taxonomy(taxonomy_name).names)
        assert {row[column] for row in TABLE} - {None} <= names


def test_field_and_matched_say_where_the_region_came_from():
    label = load_taxonomy().archive_label({"BodyPartExamined": "", "StudyDescription": "Rö Knie li. in 2 Eb."})
    assert label == ArchiveLabel("Knee", "StudyDescription", "KNIE", (), ("Knee",))


def test_longest_term_wins():
    taxonomy = load_taxonomy()
    label = taxonomy.archive_label({"SeriesDescription": "LUMBAR SPINE AP"})
    assert (label.region, label.matched) == ("Lumbar Spine", "LUMBAR SPINE")
    assert taxonomy.archive_label({"StudyDescription": "LOWER LEG RIGHT"}).matched == "LOWER LEG"
    assert taxonomy.match_text("Dedos do pé") == "Feet"  # not the ambiguous DEDO


def test_several_regions_in_one_text_first_mentioned_wins_and_all_are_listed():
    taxonomy = load_taxonomy()
    label = taxonomy.archive_label({"StudyDescription": "XR HAND WRIST LEFT"})
    assert (label.region, label.regions, label.conflicts) == ("Hand", ("Hand", "Wrist"), ())
    assert taxonomy.archive_label({"StudyDescription": "Hand|Wrist"}).regions == ("Hand", "Wrist")
    assert taxonomy.match_all("LWS/BWS") == ("Lumbar Spine", "Thoracic Spine")


def test_generic_term_gives_no_region_and_says_why():
    label = load_taxonomy().archive_label({"BodyPartExamined": "SPINE"})
    assert label.region is None and label.field == "BodyPartExamined"
    assert label.matched.startswith("SPINE: ambiguous") and "Lumbar Spine" in label.matched
    label = load_taxonomy().archive_label({"StudyDescription": "XR LEG LEFT"})
    assert "Thigh" in label.matched and "Lower Leg" in label.matched


def test_nothing_known_gives_an_empty_label():
    assert load_taxonomy().archive_label({}) == ArchiveLabel(None, None, None)
    label = load_taxonomy().archive_label({"StudyDescription": "Non-contrast study 123", "Modality": "CR"})
    assert label.region is None


def test_generic_field_is_refined_by_a_specific_one():
    label = load_taxonomy().archive_label({"BodyPartExamined": "SPINE", "StudyDescription": "DX L-SPINE 3V"})
    assert (label.region, label.field, label.conflicts) == ("Lumbar Spine", "StudyDescription", ())


def test_fields_that_agree_give_the_most_trusted_one():
    meta = {
        "BodyPartExamined": "KNEE",
        "StudyDescription": "Rö Knie li.",
        "SeriesDescription": "Knie a.p.",
        "ProtocolName": "KNEE_AP",
    }
    label = load_taxonomy().archive_label(meta)
    assert (label.region, label.field, label.matched, label.conflicts) == ("Knee", "BodyPartExamined", "KNEE", ())


def test_a_study_naming_two_regions_is_narrowed_by_the_series():
    label = load_taxonomy().archive_label({"StudyDescription": "HAND WRIST", "SeriesDescription": "WRIST PA"})
    assert (label.region, label.field, label.conflicts) == ("Wrist", "StudyDescription", ())


CONFLICTS = [
    (
        {"BodyPartExamined": "CHEST", "StudyDescription": "XR KNEE 2 VIEWS LEFT"},
        (("BodyPartExamined", "Chest", "CHEST"), ("StudyDescription", "Knee", "XR KNEE 2 VIEWS LEFT")),
    ),
    (
        {"BodyPartExamined": "KNEE", "ProtocolName": "Thorax pa"},
        (("BodyPartExamined", "Knee", "KNEE"), ("ProtocolName", "Chest", "Thorax pa")),
    ),
    (
        {"StudyDescription": "COLUNA LOMBAR", "SeriesDescription": "HWS seitlich"},
        (
            ("StudyDescription", "Lumbar Spine", "COLUNA LOMBAR"),
            ("SeriesDescription", "Cervical Spine", "HWS seitlich"),
        ),
    ),
    (
        {"BodyPartExamined": "SPINE", "StudyDescription": "Thorax pa"},  # a generic term can still contradict
        (("BodyPartExamined", None, "SPINE"), ("StudyDescription", "Chest", "Thorax pa")),
    ),
    (
        {"BodyPartExamined": "HAND", "StudyDescription": "Hand", "SeriesDescription": "OSG li."},
        (
            ("BodyPartExamined", "Hand", "HAND"),
            ("StudyDescription", "Hand", "Hand"),
            ("SeriesDescription", "Ankle", "OSG li."),
        ),
    ),
]


@pytest.mark.parametrize("meta, conflicts", CONFLICTS)
def test_conflicting_fields_are_reported_not_guessed(meta, conflicts):
    label = load_taxonomy().archive_label(meta)
    assert label.region is None and label.regions == ()
    assert label.conflicts == conflicts


def test_non_string_header_values_are_read_as_text():
    meta = {"BodyPartExamined": None, "StudyDescription": 42, "SeriesDescription": "KNEE"}
    label = load_taxonomy().archive_label(meta)
    assert label.region == "Knee"


def test_real_dicom_headers(real_dicoms):
    taxonomy = load_taxonomy()
    labels = {p.name: taxonomy.archive_label(pydicom.dcmread(p, stop_before_pixels=True)) for p in real_dicoms}
    assert labels["RG1_J2KI.dcm"].region == "Chest"  # BodyPartExamined CHEST, StudyDescription THORAX agree
    assert labels["RG1_J2KI.dcm"].field == "BodyPartExamined"
    # EXTREMITY is generic; "Non-ossifying fibroma of distal tibia" names the lower leg and fits it
    assert (labels["RG3_J2KR.dcm"].region, labels["RG3_J2KR.dcm"].field) == ("Lower Leg", "StudyDescription")
