"""Plug-ins from outside the package on real MNIST: a custom preprocessing defense from a file, a plug-in attack,
a user's trained model, the automatic adaptive checks (shape/range, no-grad → straight-through BPDA, random →
EOT) and the Python API. Files are written to ``tmp_path``, outside the repository."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from conftest import ROOT, bench

from bench.api import evaluate
from bench.attacks import REGISTRY as ATTACKS
from bench.errors import SuiteError
from bench.grid import expand
from bench.models import CleverhansCNN, DefendedModel
from bench.probe import probe
from bench.runner import train_only
from bench.settings import Settings
from bench.suite import load_suite
from bench.types import Dataset
from defenses.cq import ConstantQuantization

TIMING = {"seconds", "attack_seconds"}

SUITE = """
name = "{name}"
seed = 0
{top}
[datasets.mnist]
n = {n}
epochs = 1
train_limit = 2000
{dataset}
[[defenses]]
name = "custom"
preprocess = "{ref}"
retrain = {retrain}
params = {params}

[[attacks]]
name = "fgsm"
eps = 0.3
threat = ["whitebox", "bpda"]
{attacks}
"""

MODULES = {
    "shrink": ("import torch\n\ndef build(scale: float = 0.9) -> torch.nn.Module:\n"
               "    class Shrink(torch.nn.Module):\n"
               "        def forward(self, x):\n"
               "            return x * scale + (1 - scale) / 2\n"
               "    return Shrink()\n"),
    "rounding": ("import torch\n\nclass Round(torch.nn.Module):\n    def forward(self, x):\n"
                 "        return torch.round(x)\n\ndef build() -> torch.nn.Module:\n    return Round()\n"),
    "noisy": ("import torch\n\nclass Noise(torch.nn.Module):\n    def forward(self, x):\n"
              "        return (x + 0.1 * torch.randn_like(x)).clamp(0, 1)\n\ndef build() -> torch.nn.Module:\n"
              "    return Noise()\n"),
    "flat": ("import torch\n\nclass Flat(torch.nn.Module):\n    def forward(self, x):\n"
             "        return x.flatten(1)\n\ndef build() -> torch.nn.Module:\n    return Flat()\n"),
    "double": ("import torch\n\nclass Double(torch.nn.Module):\n    def forward(self, x):\n"
               "        return 2 * x\n\ndef build() -> torch.nn.Module:\n    return Double()\n"),
}

ATTACK = '''
import torch
from bench.attacks.base import REGISTRY, Attack


@REGISTRY.register
class SignNoise(Attack):
    """Plug-in test attack: a random sign perturbation of size eps."""

    name = "sign_noise_plugin"
    gradient = False
    iterative = False

    def perturb(self, model, x, y, eps, target):
        return x + eps * torch.randn_like(x).sign()
'''

USER_MODEL = '''
import torch
from bench.models import CleverhansCNN
from pathlib import Path


def load():
    model = CleverhansCNN((1, 28, 28))
    model.load_state_dict(torch.load(Path(__file__).with_name("weights.pt"), weights_only=True))
    return model
'''


def write_suite(folder: Path, module: str, *, name: str = "plug", retrain: str = "false", params: str = "{}",
                n: int = 50, top: str = "", dataset: str = "", attacks: str = "", ref: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if module in MODULES:
        (folder / f"{module}.py").write_text(MODULES[module])
    path = folder / "suite.toml"
    path.write_text(SUITE.format(name=name, n=n, top=top, dataset=dataset, ref=ref or f"{module}:build",
                                 retrain=retrain, params=params, attacks=attacks))
    return path


def cells(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]


def test_custom_defense_from_a_file_runs_through_bench_run(tmp_path: Path, bench_env: dict[str, str]) -> None:
    suite = write_suite(tmp_path / "user", "shrink", params="{ scale = 0.9 }")
    done = bench("run", str(suite), "--out", str(tmp_path / "out"), env=bench_env)
    assert done.returncode == 0, done.stderr
    rows = cells(tmp_path / "out")
    assert {r["defense"] for r in rows} == {"custom(shrink:build,scale=0.9,retrain=false)"}
    assert all(r["error"] is None and r["clean_acc"] > 0.5 and r["grad_zero"] == 0 and not r["randomized"]
               for r in rows)
    assert [r.get("bpda_backward") for r in rows if r["threat"] == "bpda"] == ["exact"]
    assert all(len(r["defense_params"]["sha256"]) == 64 for r in rows)
    assert str(tmp_path) not in (tmp_path / "out" / "cells.jsonl").read_text()  # no machine-local path in records
    assert "custom(shrink:build,scale=0.9,retrain=false)" in (tmp_path / "out" / "leaderboard.md").read_text()


def test_editing_the_defense_file_changes_cache_and_cell_keys(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, "shrink", retrain="true")
    before = {c.key for c in expand(load_suite(suite))}
    (tmp_path / "shrink.py").write_text(MODULES["shrink"] + "# edited\n")
    after = expand(load_suite(suite))
    assert before.isdisjoint({c.key for c in after})
    assert len(after[0].defense_values["sha256"]) == 64


def test_eot_is_an_option_of_every_gradient_attack_and_stays_out_of_keys_at_1() -> None:
    assert all(("eot" in [p.name for p in cls.params]) == cls.gradient for cls in ATTACKS)
    stored = {json.loads(line)["cell_id"] for line in (ROOT / "results" / "regression" / "cells.jsonl").open()}
    assert {c.key for c in expand(load_suite(ROOT / "suites" / "regression.toml"))} == stored


def test_missing_module_or_callable_is_one_line_exit_2(tmp_path: Path, bench_env: dict[str, str]) -> None:
    for ref, expected in (("nowhere:build", "neither next to the suite file nor on sys.path"),
                          ("shrink:nothing", "has no 'nothing'")):
        done = bench("check", str(write_suite(tmp_path, "shrink", ref=ref)), env=bench_env)
        assert done.returncode == 2
        assert len(done.stderr.strip().splitlines()) == 1
        assert "defenses[0].preprocess" in done.stderr and expected in done.stderr


@pytest.mark.parametrize(("module", "expected"), [("flat", "returned shape (8, 784) for images of shape (8, 1, 28, 28)"),
                                                  ("double", "output leaves [0, 1]")])
def test_wrong_output_shape_or_range_is_one_line_exit_2(tmp_path: Path, bench_env: dict[str, str], module: str,
                                                        expected: str) -> None:
    done = bench("run", str(write_suite(tmp_path, module)), "--out", str(tmp_path / "out"), env=bench_env)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert f"defense custom({module}:build,retrain=false)" in done.stderr and expected in done.stderr


def test_each_probe_fires_on_its_module_and_is_silent_on_cq(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    found = {}
    for name in ("rounding", "noisy", "shrink"):
        (tmp_path / f"{name}.py").write_text(MODULES[name])
        spec = importlib.util.spec_from_file_location(f"probe_{name}", tmp_path / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found[name] = probe(DefendedModel(module.build(), CleverhansCNN((1, 28, 28))).eval(), x, y)
    cq = ConstantQuantization(Dataset.MNIST, ConstantQuantization.resolve({}, Dataset.MNIST))
    found["cq"] = probe(cq.build().eval(), x, y)
    assert found["rounding"] == {"grad_zero": 1.0, "randomized": False}
    assert found["noisy"]["randomized"] and found["noisy"]["grad_zero"] == 0
    assert found["shrink"] == found["cq"] == {"grad_zero": 0.0, "randomized": False}


def test_bpda_applies_straight_through_and_eot_where_the_probe_says(tmp_path: Path, data_dir: Path,
                                                                     cache_dir: Path) -> None:
    settings = Settings(data_dir=str(data_dir), cache_dir=str(cache_dir))
    applied = {}
    for module in ("rounding", "noisy"):
        records, board = evaluate(suite=load_suite(write_suite(tmp_path / module, module, n=30)), settings=settings)
        bpda = records[(records.threat == "bpda") & (records.defense_name == "custom")].iloc[0]
        applied[module] = (bpda["bpda_backward"], None if pd.isna(bpda.get("eot")) else int(bpda["eot"]))
        assert ("no-grad" if module == "rounding" else "random") in board
    assert applied["rounding"] == ("identity", None)
    assert applied["noisy"] == ("exact", 10)


def test_plugin_attack_from_a_file_is_listed_and_runs(tmp_path: Path, bench_env: dict[str, str]) -> None:
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "attack.py").write_text(ATTACK)
    suite = write_suite(tmp_path, "shrink", top='plugins = ["extra/attack.py"]',
                        attacks='[[attacks]]\nname = "sign_noise_plugin"\neps = 0.3\n')
    listed = bench("list", "--suite", str(suite), env=bench_env)
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if "sign_noise_plugin" in line)
    assert f"plugin: {tmp_path / 'extra' / 'attack.py'}" in line
    done = bench("run", str(suite), "--out", str(tmp_path / "out"), env=bench_env)
    assert done.returncode == 0, done.stderr
    assert any(r["attack"] == "sign_noise_plugin" and r["error"] is None for r in cells(tmp_path / "out"))


def test_entry_point_defense_is_registered_and_listed_with_its_distribution(tmp_path: Path,
                                                                           bench_env: dict[str, str]) -> None:
    site = tmp_path / "site"
    info = site / "my_plug-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[qusec_bench.defenses]\nhalf = half_plug:Half\n")
    (site / "half_plug.py").write_text(
        "from torch import nn\nfrom defenses.base import REGISTRY, Defense\n\n\n@REGISTRY.register\n"
        "class Half(Defense):\n    \"\"\"Entry-point test defense.\"\"\"\n\n    name = \"half_plug\"\n")
    env = {**bench_env, "PYTHONPATH": f"{site}:{bench_env.get('PYTHONPATH', '')}"}
    listed = bench("list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "  half_plug: Entry-point test defense.  [entry point: my-plug]" in listed.stdout


def test_user_model_runs_without_training_and_refuses_training_defenses(tmp_path: Path, data_dir: Path,
                                                                       cache_dir: Path) -> None:
    settings = Settings(data_dir=str(data_dir), cache_dir=str(cache_dir))
    baseline, _ = evaluate(suite=load_suite(write_suite(tmp_path / "base", "shrink")), settings=settings)
    from bench.evaluate import Context

    cell = next(c for c in expand(load_suite(tmp_path / "base" / "suite.toml")))
    none = Context(settings).models._trained(__import__("dataclasses").replace(cell, defense="none",
                                                                               defense_values={}))[0]
    user = tmp_path / "user"
    user.mkdir()
    torch.save(none.classifier.state_dict(), user / "weights.pt")
    (user / "my_model.py").write_text(USER_MODEL)
    suite = write_suite(user, "shrink", dataset='model = "my_model:load"')
    empty = tmp_path / "empty-cache"
    lines: list[str] = []
    assert train_only(load_suite(suite), Settings(data_dir=str(data_dir), cache_dir=str(empty)),
                      report=lines.append) == 0
    own = "the suite's own classifier (my_model:load), never trained here"
    assert lines == [f"[1/1] mnist custom(shrink:build,retrain=false): {own}"]
    records, _ = evaluate(suite=load_suite(suite), settings=Settings(data_dir=str(data_dir), cache_dir=str(empty)))
    assert not list(empty.rglob("*.pt"))  # nothing trained, nothing stored
    assert records.clean_acc.tolist() == baseline.clean_acc.tolist()
    assert set(records.cell_id).isdisjoint(baseline.cell_id)
    (user / "suite.toml").write_text(suite.read_text() + '\n[[defenses]]\nname = "cq"\n')
    with pytest.raises(SuiteError, match=r"defenses\[1\]: cq\(n=2,z=50\) trains its own classifier"):
        load_suite(suite)


def test_api_returns_the_same_records_as_the_cli(tmp_path: Path, bench_env: dict[str, str], data_dir: Path,
                                                 cache_dir: Path) -> None:
    folder = tmp_path / "api"
    suite = write_suite(folder, "shrink", name="api", retrain="false", params="{ scale = 0.8 }")
    suite.write_text(suite.read_text().replace('"custom"', '"custom"\n', 1).replace(
        "[[defenses]]", '[[defenses]]\nname = "none"\n\n[[defenses]]', 1)
        .replace('eps = 0.3\nthreat = ["whitebox", "bpda"]', 'eps = [0.1, 0.3]\nthreat = ["whitebox", "bpda"]'))
    done = bench("run", str(suite), "--out", str(tmp_path / "cli"), env=bench_env)
    assert done.returncode == 0, done.stderr
    spec = importlib.util.spec_from_file_location("shrink", folder / "shrink.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["shrink"] = module
    spec.loader.exec_module(module)
    try:
        records, board = evaluate(preprocess=module.build, params={"scale": 0.8}, retrain=False, attacks=["fgsm"],
                                  eps=[0.1, 0.3], n=50, training={"epochs": 1, "train_limit": 2000},
                                  settings=Settings(data_dir=str(data_dir), cache_dir=str(cache_dir)))
    finally:
        del sys.modules["shrink"]
    api = {r["cell_id"]: {k: v for k, v in r.items() if k not in TIMING} for r in records.to_dict("records")}
    cli = {r["cell_id"]: {k: v for k, v in r.items() if k not in TIMING} for r in cells(tmp_path / "cli")}
    assert api.keys() == cli.keys() and len(api) == 8
    for key, row in cli.items():
        assert {k: api[key].get(k) for k in row} == row
    assert "custom(shrink:build,scale=0.8,retrain=false)" in board


@pytest.mark.ray
def test_custom_defense_and_plugin_attack_under_ray(tmp_path: Path, bench_env: dict[str, str]) -> None:
    pytest.importorskip("ray")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "attack.py").write_text(ATTACK)
    suite = write_suite(tmp_path, "shrink", n=20, top='plugins = ["extra/attack.py"]',
                        attacks='[[attacks]]\nname = "sign_noise_plugin"\neps = 0.3\n')
    local = bench("run", str(suite), "--out", str(tmp_path / "local"), env=bench_env)
    remote = bench("run", str(suite), "--out", str(tmp_path / "ray"), "--executor", "ray", env=bench_env)
    assert local.returncode == remote.returncode == 0, remote.stderr
    strip = [{r["cell_id"]: {k: v for k, v in r.items() if k not in TIMING} for r in cells(tmp_path / out)}
             for out in ("local", "ray")]
    assert strip[0] == strip[1] and len(strip[0]) == 3
