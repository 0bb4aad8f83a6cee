"""Commands load what they use: reading a config or exporting a study needs no model stack."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "optuna", "pymoo")


def loaded_after(code: str) -> list[str]:
    probe = (
        f"import sys, json; {code}; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("code", "allowed"),
    [
        ("import kvtuner, kvtuner.cli", []),
        ("import kvtuner.cli.eval, kvtuner.cli.export, kvtuner.cli.show", []),
        ("from kvtuner.config import load_config; load_config('KV4', num_layers=4)", []),
        ("import kvtuner.search.export", ["optuna"]),
    ],
)
def test_imports_stay_light(code, allowed):
    assert set(loaded_after(code)) <= set(allowed)
