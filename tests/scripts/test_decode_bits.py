"""scripts/decode_bits.py: one line of milliseconds per bits pair, on small random layers."""

import importlib.util
import re
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def test_prints_one_timing_per_pair(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("decode_bits", SCRIPTS / "decode_bits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["decode_bits.py", "--tokens", "300", "--repeats", "1", "--calls", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    module.main()
    lines = capsys.readouterr().out.splitlines()
    assert "threads, decode: " in lines[0]
    timings = [line for line in lines if "ms a layer" in line]
    assert [line.split()[0] for line in timings] == ["KV8", "KV4", "K4V2", "KV2", "KV4"]
    assert all(float(re.search(r"([\d.]+) ms", line).group(1)) > 0 for line in timings)
