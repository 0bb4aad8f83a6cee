"""scripts/bench_runtime.py: the table names the machine its rows were measured on."""

import importlib.util
import json
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_runtime", SCRIPTS / "bench_runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(context: int, machine: dict | None) -> dict:
    row = {
        "model": "smollm2-135m", "config": "KV4", "scheme": "per-token", "context": context,
        "kv_bytes": 2**20, "dense_kv_bytes": 6 * 2**20, "effective_bits": 5.0,
        "tokens_per_s": 12.0, "dense_tokens_per_s": 8.0, "speed_ratio": 1.5,
        "prefill_peak_memory_bytes": 100 * 2**20, "dense_prefill_peak_memory_bytes": 120 * 2**20,
        "decode_level_memory_bytes": 2 * 2**20, "dense_decode_level_memory_bytes": 9 * 2**20,
        "decode_memory_saved_fraction": 1.4, "rows": [],
    }  # fmt: skip
    return row if machine is None else {**row, "machine": machine}


def test_table_rows_and_machine_line(tmp_path):
    script = load_script()
    zen = {"cpu": "AMD EPYC", "vector_extension": "AVX2", "threads": 2,
           "decode_path": "C++ kernel", "torch": "2.13.0", "transformers": "5.3.0"}  # fmt: skip
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"contexts": [result(4096, zen), result(8000, zen)]}))
    second.write_text(json.dumps({"contexts": [result(1024, None)]}))
    lines = script.table([first, second]).splitlines()
    assert len([line for line in lines if line.startswith("| smollm2-135m")]) == 3
    assert "| **1.50x** |" in lines[2] and "| 140% |" in lines[2]
    # one machine line, each machine once; a result without a record adds none
    assert lines[-1] == (
        "Measured on AMD EPYC (AVX2), 2 threads, decode: C++ kernel, torch 2.13.0, "
        "transformers 5.3.0."
    )
    assert sum(line.startswith("Measured on") for line in lines) == 1


def test_table_without_machine_records_has_no_machine_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"contexts": [result(4096, None)]}))
    assert not any(
        line.startswith("Measured on") for line in load_script().table([path]).splitlines()
    )
