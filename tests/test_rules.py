"""The routing rule language on real headers from ../shared/data."""

from __future__ import annotations

import pydicom
import pytest

from node.conditions import RuleSyntaxError, evaluate, header_of, keywords_of, matches, parse_condition, prepare
from node.routing.router import plan_routes
from node.settings.config import Settings

from .peers import CT_SERIES, MR_SERIES, series_files


@pytest.fixture(scope="module")
def ct() -> pydicom.Dataset:
    return pydicom.dcmread(series_files(CT_SERIES)[0], stop_before_pixels=True)


@pytest.fixture(scope="module")
def mr() -> pydicom.Dataset:
    return pydicom.dcmread(next(p for p in sorted(MR_SERIES.iterdir()) if p.is_file()), stop_before_pixels=True)


# (condition, matches the CT header, matches the MR header)
CASES = [
    ({"Modality": "CT"}, True, False),
    ({"Modality": {"eq": "CT"}}, True, False),
    ({"Modality": {"ne": "CT"}}, False, True),
    ({"Modality": ["CT", "PT"]}, True, False),
    ({"Modality": {"in": ["mr"], "ignore_case": True}}, False, True),
    ({"StudyDescription": {"regex": "^Chest$"}}, True, False),
    ({"StudyDescription": {"regex": "CHEST"}}, False, False),
    ({"StudyDescription": {"regex": "CHEST", "ignore_case": True}}, True, False),
    ({"ImageType": "AXIAL"}, True, False),  # multi-valued: any value
    ({"ImageType": {"contains": "PRIM"}}, True, True),
    ({"SliceThickness": {"le": 5}}, True, True),
    ({"SliceThickness": {"lt": 5}}, False, True),
    ({"SliceThickness": {"gt": 1, "ge": 5}}, True, False),
    ({"BodyPartExamined": {"exists": True}}, False, True),
    ({"BodyPartExamined": {"exists": False}}, True, False),
    ({"calling_ae_title": "STAT-CT"}, True, True),
    ({"called_ae_title": {"ne": "AINODE"}}, False, False),
    ({"all": [{"Modality": "MR"}, {"SliceThickness": {"le": 4}}]}, False, True),
    ({"any": [{"Modality": "MR"}, {"StudyDescription": {"regex": "chest", "ignore_case": True}}]}, True, True),
    ({"not": {"Modality": "CT"}}, False, True),
    ({"Modality": "CT", "not": {"ConvolutionKernel": "B"}}, True, False),
]


@pytest.mark.parametrize(("spec", "on_ct", "on_mr"), CASES)
def test_operator_and_combinator(spec, on_ct, on_mr, ct, mr):
    condition = parse_condition(spec)
    keywords = keywords_of(condition)
    for ds, expected in ((ct, on_ct), (mr, on_mr)):
        header = header_of(ds, keywords, "STAT-CT", "AINODE")
        assert evaluate(condition, header).matched is expected  # the explaining path
        assert matches(condition, prepare(header)) is expected  # the fast path routing uses


def test_decision_names_tag_and_operator_but_no_value(ct):
    condition = parse_condition({"all": [{"Modality": "CT"}, {"PatientName": {"regex": "Lung"}}]})
    decision = evaluate(condition, header_of(ct, keywords_of(condition), "X", "Y"))
    assert decision.matched
    assert decision.decided_by == "PatientName regex"
    assert "Lung_Dx" not in decision.decided_by


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"Modality": {"equals": "CT"}}, "Modality: unknown operator 'equals'; did you mean 'eq'?"),
        ({"Modalty": "CT"}, "Modalty: 'Modalty' is not a DICOM keyword or combinator; did you mean 'Modality'?"),
        ({"all": []}, "all: expects a non-empty list of conditions"),
        ({"SliceThickness": {"lt": "five"}}, "SliceThickness.lt: expects a number, got str"),
        ({"SeriesDescription": {"regex": "(["}}, "SeriesDescription.regex: invalid regular expression"),
        ({"Modality": {"exists": "yes"}}, "Modality.exists: expects true or false"),
        ({}, "a condition must be a non-empty mapping"),
    ],
)
def test_syntax_errors_are_precise(spec, message):
    with pytest.raises(RuleSyntaxError) as info:
        parse_condition(spec)
    assert message in str(info.value)


def test_first_match_and_study_level(ct, mr):
    settings = Settings.model_validate(
        {
            "keys": {"provider": "env"},
            "routes": [
                {"name": "ct", "match": {"Modality": "CT"}, "algorithms": ["a"]},
                {"name": "any-study", "level": "study", "match": {"Modality": "MR"}, "algorithms": ["b"]},
            ],
        }
    )
    plans = plan_routes(settings, {"ct": ct, "mr": mr}, "X", "AINODE")
    assert [(p.route.name, p.series_keys) for p in plans] == [("ct", ("ct",)), ("any-study", ("mr",))]
    every = settings.model_copy(update={"routing": settings.routing.model_copy(update={"mode": "all_matches"})})
    plans = plan_routes(every, {"ct": ct, "mr": mr}, "X", "AINODE")
    assert [(p.route.name, p.series_keys) for p in plans] == [("ct", ("ct",)), ("any-study", ("ct", "mr"))]
