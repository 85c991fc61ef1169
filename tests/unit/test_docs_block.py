"""Generated blocks in the docs: a command replaces its block and nothing else, a page
without the markers is refused with the lines to add, and `protege demo-spread --docs`
writes its table into its page."""

import json

import pytest

from protege import cli
from protege.demo_report import spread
from protege.docs_block import check_block, docs_page, replace_block

PAGE = """# A page

Hand-written text above.

<!-- figures:begin -->
| old | table |
<!-- figures:end -->

Hand-written text below, with <!-- other:begin -->another block<!-- other:end -->.
"""


def test_the_block_is_replaced_and_the_rest_of_the_page_is_untouched(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    replace_block(page, "figures", "| new | table |\n| 1 | 2 |\n")
    expected = PAGE.replace("| old | table |", "| new | table |\n| 1 | 2 |")
    assert page.read_text() == expected
    replace_block(page, "figures", "| again |")  # the markers stay: it can run again
    assert page.read_text() == PAGE.replace("| old | table |", "| again |")


def test_text_that_looks_like_a_replacement_pattern_is_written_as_is(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    replace_block(page, "figures", r"a \1 and \g<0> stay")
    assert r"a \1 and \g<0> stay" in page.read_text()


def test_a_page_without_the_markers_is_refused_with_the_lines_to_add(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n<!-- figures:begin -->\nno end marker\n")
    for call in (lambda: check_block(page, "figures"), lambda: replace_block(page, "figures", "x")):
        with pytest.raises(ValueError, match="add the lines <!-- figures:begin --> and <!-- fig"):
            call()
    assert page.read_text() == "# A page\n\n<!-- figures:begin -->\nno end marker\n"
    with pytest.raises(ValueError, match="no such page"):
        check_block(tmp_path / "missing.md", "figures")


def test_the_default_page_is_used_only_where_it_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert docs_page(None, "docs/page.md") is None  # not run from a checkout: no page
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(PAGE)
    assert str(docs_page(None, "docs/page.md")) == "docs/page.md"
    assert docs_page("", "docs/page.md") is None  # --docs '': none
    assert str(docs_page("other.md", "docs/page.md")) == "other.md"


def demo_run(folder, seed, results, ratio):
    """A demo.json as `protege demo` writes it, with the fields the spread reads."""
    figure = {"value": 0.2, "low": 0.17, "high": 0.24, "sampled": 237, "records": 437}
    rounds = [
        {"result": result, "decision": {"current": {"escalation_rate": figure}}}
        for result in results
    ]
    seed_figures = {"escalation_rate": 0.391, "cascade_gold_accuracy": 0.912}
    summary = {
        "demo_seed": seed,
        "seed": seed_figures | {"escalation_needed": 0.623},
        "final": {"escalation_rate": 0.172, "cascade_gold_accuracy": 0.919}
        | {"escalation_needed": 0.623 * ratio},
        "ratio_final_to_seed": ratio,
    }
    folder.mkdir()
    (folder / "demo.json").write_text(json.dumps({"summary": summary, "rounds": rounds}))
    return folder


def test_demo_spread_writes_its_table_into_the_page(tmp_path, capsys):
    runs = [
        demo_run(tmp_path / "demo-0", 0, ["promoted", "rejected"], 0.45),
        demo_run(tmp_path / "demo-1", 1, ["rejected", "rejected"], 1.0),
    ]
    page = tmp_path / "learning-loop.md"
    page.write_text(PAGE.replace("figures", "demo-spread"))
    assert cli.main(["demo-spread", *map(str, runs), "--docs", str(page)]) == 0
    table = spread(runs)
    assert "| 0 | promoted, rejected |" in table and "0.45 to 1.00" in table
    assert page.read_text() == PAGE.replace("figures", "demo-spread").replace(
        "| old | table |", table.strip()
    )
    assert table in capsys.readouterr().out  # and printed, as before


def test_demo_spread_refuses_a_page_without_its_block_and_writes_nothing(tmp_path, capsys):
    runs = [demo_run(tmp_path / "demo-0", 0, ["promoted"], 0.45)]
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    assert cli.main(["demo-spread", str(runs[0]), "--docs", str(page)]) == 2
    assert "has no block 'demo-spread'" in capsys.readouterr().err
    assert page.read_text() == PAGE
    assert cli.main(["demo-spread", str(runs[0]), "--docs", ""]) == 0  # '' writes no page
    assert page.read_text() == PAGE
