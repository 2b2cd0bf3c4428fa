"""Suite validation and grid expansion."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from bench.attacks import REGISTRY as ATTACKS
from bench.errors import SuiteError
from bench.grid import count, expand, select
from bench.suite import load_suite

BASE = """
name = "t"
[datasets.mnist]
n = 100
[[defenses]]
name = "none"
[[attacks]]
name = "fgsm"
eps = [0.1, 0.3]
threat = ["whitebox", "bpda"]
"""


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_only_takes_a_whole_id_with_its_commas_as_one_pattern() -> None:
    """Defense ids hold commas (``cq(n=2,z=50)``): a comma followed by ``name=`` stays in the pattern, any other
    comma separates two patterns."""
    cells = expand(load_suite(Path(__file__).resolve().parent.parent / "suites" / "paper-mnist.toml"))

    def chosen(pattern: str) -> set[str]:
        return {c.defense_id for c in select(cells, [f"defense={pattern}"])}

    assert chosen("cq(n=2,z=50)") == {"cq(n=2,z=50)"}
    dqa = chosen("dqa(bits=2,mode=fixed*")
    assert len(dqa) == 2 and all("mode=fixed" in d for d in dqa)
    assert chosen("cq(n=2*,cq(n=3*") == {"cq(n=2,z=50)", "cq(n=3,z=50)"}
    assert chosen("none,tq(n=2,z=5)") == {"none", "tq(n=2,z=5)"}
    assert {c.eps for c in select(cells, ["eps=0.1,0.3"])} == {0.1, 0.3}


def test_valid_suite_expands_to_its_grid(tmp_path: Path) -> None:
    suite = load_suite(write(tmp_path, BASE))
    cells = expand(suite)
    assert len(cells) == count(suite) == 4
    assert {(c.threat, c.eps) for c in cells} == {(t, e) for t in ("whitebox", "bpda") for e in (0.1, 0.3)}
    assert len({c.key for c in cells}) == 4
    bpda = next(c for c in cells if c.threat == "bpda" and c.eps == 0.1)
    white = next(c for c in cells if c.threat == "whitebox" and c.eps == 0.1)
    assert bpda.compute_key == white.key and bpda.cell_seed == white.cell_seed


def test_quantized_threat_has_cells_only_for_continuous_monotone_quantizers(tmp_path: Path) -> None:
    text = BASE.replace('name = "none"', 'name = "none"\n[[defenses]]\nname = "cq"\nhard = [false, true]\n'
                        '[[defenses]]\nname = "tq"\n[[defenses]]\nname = "squeeze"')
    text = text.replace('name = "fgsm"', 'name = "pgd"').replace('"bpda"', '"quantized"')
    cells = expand(load_suite(write(tmp_path, text)))
    assert {c.defense_id for c in cells if c.threat == "quantized"} == {"cq(n=2,z=50)", "tq(n=2,z=5)"}
    assert {c.threat_label for c in cells if c.threat == "quantized"} == {"qs"}


def test_a_revised_attack_gets_new_cell_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Raising an adapter's revision (a fix that changes its results) changes its cells' keys, so a results
    directory recomputes them instead of resuming; an adapter never revised keeps the keys it always had."""
    cell = expand(load_suite(write(tmp_path, BASE)))[0]
    assert "attack_revision" not in cell.spec()
    monkeypatch.setattr(ATTACKS.get("fgsm"), "revision", 1)
    revised = replace(cell)
    assert revised.spec()["attack_revision"] == 1 and revised.key != cell.key


@pytest.mark.parametrize(("text", "path", "expected"), [
    ("colour = 1\n" + BASE, "colour", "unknown key"),
    (BASE + "colour = 1\n", "attacks[0].colour", "unknown key"),
    (BASE.replace('name = "none"', 'name = "nonee"'), "defenses[0].name", 'did you mean "none"'),
    (BASE.replace("eps = [0.1, 0.3]", "eps = [-0.1]"), "attacks[0].eps", "in (0, 1]"),
    (BASE.replace("eps = [0.1, 0.3]", 'eps = "big"'), "attacks[0].eps", "expected a number"),
    (BASE.replace("n = 100", "n = 0"), "datasets.mnist.n", "≥ 1"),
    (BASE.replace("n = 100", "n = 1.5"), "datasets.mnist.n", "expected an integer"),
    (BASE.replace('"bpda"', '"greybox"'), "attacks[0].threat",
     "expected one of blackbox, bpda, oblivious, quantized, whitebox"),
    (BASE.replace('"bpda"', '"quantized"'), "attacks[0].threat", "runs only attacks of the harness's step loop (bim, pgd)"),
    (BASE.replace("[datasets.mnist]", "[datasets.svhn]"), "datasets.svhn", "unknown key"),
    (BASE + "[blackbox]\nrounds = 99\n", "blackbox.rounds", "in [0, 10]"),
    (BASE.replace("eps = [0.1, 0.3]", "eps = []"), "attacks[0].eps", "empty list"),
    (BASE + "[[attacks]]\nname = \"fgsm\"\n", "attacks[1].eps", "missing"),
    ("name = 3\n" + BASE.split("\n", 2)[2], "name", "expected a string"),
    ("[datasets.mnist\n", "", "invalid TOML"),
])
def test_bad_suites_name_file_path_and_expectation(tmp_path: Path, text: str, path: str, expected: str) -> None:
    file = write(tmp_path, text)
    with pytest.raises(SuiteError) as info:
        expand(load_suite(file))
    message = str(info.value)
    assert message.startswith(str(file)) and expected in message and "\n" not in message
    assert info.value.path == path


def test_non_utf8_suite(tmp_path: Path) -> None:
    file = tmp_path / "s.toml"
    file.write_bytes(b"name = \"\xff\"\n")
    with pytest.raises(SuiteError, match="not UTF-8"):
        load_suite(file)


def test_grid_limit_is_enforced_with_the_count(tmp_path: Path) -> None:
    text = BASE.replace("eps = [0.1, 0.3]", "eps = [" + ", ".join(f"{i / 1000:g}" for i in range(1, 301)) + "]")
    with pytest.raises(SuiteError, match="600 cells, more than max_cells = 100"):
        expand(load_suite(write(tmp_path, "max_cells = 100\n" + text)))


def test_include_overrides_keys_and_keeps_the_rest(tmp_path: Path) -> None:
    write(tmp_path, BASE, "base.toml")
    suite = load_suite(write(tmp_path, 'include = "base.toml"\nname = "child"\n[datasets.mnist]\nepochs = 2\n'))
    assert suite.name == "child"
    assert suite.datasets[next(iter(suite.datasets))].n == 100
    assert suite.datasets[next(iter(suite.datasets))].train.epochs == 2
    assert len(expand(suite)) == 4


def test_include_cycle_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, 'include = "b.toml"\n' + BASE, "a.toml")
    write(tmp_path, 'include = "a.toml"\n', "b.toml")
    with pytest.raises(SuiteError, match="nested deeper"):
        load_suite(tmp_path / "a.toml")


def test_shipped_suites_are_valid() -> None:
    suites = sorted(Path(__file__).resolve().parent.parent.glob("suites/*.toml"))
    assert suites
    for path in suites:
        assert expand(load_suite(path)), path


def test_every_suite_setting_is_documented() -> None:
    from bench.suite import CHECKS_PARAMS, DATASET_PARAMS, RESILIENCE_PARAMS, TOP_KEYS
    from bench.threats import REGISTRY as THREATS

    doc = (Path(__file__).resolve().parent.parent / "docs" / "suites.md").read_text()
    for params in (DATASET_PARAMS, CHECKS_PARAMS, RESILIENCE_PARAMS, *(cls.params for cls in THREATS)):
        for p in params:
            assert f"| `{p.name}` |" in doc, p.name
    for key in TOP_KEYS:
        assert f"`{key}`" in doc, key
