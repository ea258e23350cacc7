"""``tests/known_bugs.py`` tells an assertion from an exception and from a copy that does not import."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("known_bugs", Path(__file__).with_name("known_bugs.py"))
known_bugs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(known_bugs)


def _report(tmp_path, body: str) -> Path:
    path = tmp_path / "r.xml"
    path.write_text(f'<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">{body}'
                    "</testsuite></testsuites>")
    return path


@pytest.mark.parametrize("body, code, verdict", [
    ('<testcase classname="t" name="a"><failure message="AssertionError: assert 1 == 2">x</failure></testcase>', 1,
     "CAUGHT"),
    ('<testcase classname="t" name="a"><failure message="Failed: DID NOT RAISE &lt;class \'ValueError\'&gt;">x'
     "</failure></testcase>", 1, "CAUGHT"),
    ('<testcase classname="t" name="a"><failure message="NameError: name \'q\' is not defined">x</failure></testcase>',
     1, "ERROR"),
    ('<testcase classname="" name=""><error message="collection failure">ImportError</error></testcase>', 2, "BROKEN"),
    ('<testcase classname="t" name="a" />', 0, "MISSED"),
    ('<testcase classname="t" name="a" />', 4, "BROKEN"),
])
def test_verdicts(tmp_path, body, code, verdict):
    assert known_bugs.classify(_report(tmp_path, body), code)[0] == verdict


def test_no_report_is_broken(tmp_path):
    assert known_bugs.classify(tmp_path / "absent.xml", 3)[0] == "BROKEN"


def test_every_bug_names_its_file_and_tests(tmp_path):
    root = Path(__file__).resolve().parents[1]
    for name, path, old, new, tests in known_bugs.BUGS:
        assert old != new, name
        assert (root / path).read_text().count(old) == 1, f"{name}: stale entry"
        for node in tests.split():
            assert (root / node.split("::")[0]).is_file(), name
