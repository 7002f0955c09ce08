import json
import logging
import subprocess
import sys

import pytest

from conftest import ROOT
from game.scenario import json_schema, load_cases, read_case, read_cases

BUNDLED = ROOT / "scenarios"


def problems_of(path):
    loaded, errors = read_case(path)
    assert loaded is None
    return [str(e) for e in errors]


def test_bundled_cases_are_valid_and_varied():
    cases, problems = read_cases([BUNDLED])
    assert problems == []
    assert len(cases) >= 6
    verdicts = [c.case.guilty for c in cases.values()]
    assert verdicts.count(True) >= 2 and verdicts.count(False) >= 2


def test_schema_json_is_current():
    assert (BUNDLED / "schema.json").read_text() == json_schema(), "run: python -m game schema > scenarios/schema.json"


def test_valid_case_reads(case_data, write_case):
    loaded, errors = read_case(write_case(case_data))
    assert errors == [] and loaded.case.suspect.name == "Ivo Brandt" and len(loaded.sha256) == 64


def test_malformed_json_names_file_and_position(write_case):
    path = write_case('{"id": "x",\n "title": }', "broken.json")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: (json): not valid JSON: line 2 column")


def test_missing_field_is_named(case_data, write_case):
    del case_data["suspect"]["manner"]
    assert problems_of(write_case(case_data)) == [f"{write_case(case_data)}: suspect.manner: Field required"]


def test_unknown_field_is_named(case_data, write_case):
    case_data["topics"][0]["hint"] = "x"
    [problem] = problems_of(write_case(case_data))
    assert ": topics.0.hint: unknown field" in problem


def test_ill_typed_field_is_named(case_data, write_case):
    case_data["suspect"]["age"] = "old"
    case_data["guilty"] = "maybe"
    problems = problems_of(write_case(case_data))
    assert any(": suspect.age: Input should be a valid integer" in p for p in problems)
    assert any(": guilty: Input should be a valid boolean" in p for p in problems)


def test_empty_dialogue_material_is_refused(case_data, write_case):
    case_data["topics"][1]["answers"] = []
    [problem] = problems_of(write_case(case_data))
    assert ": topics.1.answers: List should have at least 2 items" in problem


def test_blank_strings_are_refused(case_data, write_case):
    case_data["facts"] = ["  "]
    [problem] = problems_of(write_case(case_data))
    assert ": facts.0: String should have at least 1 character" in problem


def test_guilty_case_without_tells_cannot_be_solved(case_data, write_case):
    case_data["tells"] = []
    [problem] = problems_of(write_case(case_data))
    assert "a guilty suspect needs at least one tell" in problem


def test_case_needs_a_break_character_topic(case_data, write_case):
    case_data["topics"][2]["kind"] = "fact"
    assert any("break_character" in p for p in problems_of(write_case(case_data)))


def test_probe_must_be_held_out(case_data, write_case):
    case_data["probes"][0]["paraphrases"] = ["where were you last night?"]
    assert any("probes.0" in p and "training question" in p for p in problems_of(write_case(case_data)))


def test_duplicate_ids_are_reported_and_first_is_kept(case_data, tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(case_data))
    (tmp_path / "b.json").write_text(json.dumps(case_data | {"title": "Copy"}))
    cases, problems = read_cases([tmp_path])
    assert list(cases) == ["greenhouse-test"] and cases["greenhouse-test"].case.title == "The Greenhouse Orchid"
    assert [str(p) for p in problems] == [f"{tmp_path / 'b.json'}: id: duplicate id 'greenhouse-test', also in {tmp_path / 'a.json'}"]


def test_bad_file_is_skipped_with_a_warning(case_data, tmp_path, caplog):
    (tmp_path / "good.json").write_text(json.dumps(case_data))
    (tmp_path / "bad.json").write_text("{")
    with caplog.at_level(logging.WARNING):
        cases = load_cases(tmp_path)
    assert list(cases) == ["greenhouse-test"]
    assert "bad.json: (json)" in caplog.text


def run_game_cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "game", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**__import__("os").environ, **env}, timeout=300)


def test_validate_command_exit_codes_and_lines(case_data, write_case):
    good = write_case(case_data)
    assert run_game_cli("validate", str(good)).returncode == 0
    bad_data = dict(case_data, id="BAD ID")
    del bad_data["truth"]
    bad = write_case(bad_data, "bad.json")
    result = run_game_cli("validate", str(good), str(bad))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert f"{bad}: id: String should match pattern '^[a-z0-9][a-z0-9-]{{1,47}}$'" in lines
    assert f"{bad}: truth: Field required" in lines


def test_validate_defaults_to_bundled_cases():
    result = run_game_cli("validate")
    assert result.returncode == 0, result.stdout


def test_list_json_names_cases_and_adapters_without_the_truth():
    result = run_game_cli("list", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    cases, _ = read_cases([BUNDLED])
    assert sorted(r["id"] for r in rows) == sorted(cases)
    for row in rows:
        assert {"id", "title", "adapter"} <= set(row)
        truth = cases[row["id"]].case.truth
        assert truth not in result.stdout and "guilty" not in row
