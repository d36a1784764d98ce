"""`nanorun doctor`: the machine's record, native dtypes, peaks and what every `auto` resolves to."""

import json
import os
import subprocess
import sys

from click.testing import CliRunner

from runners.cli import main
from runners.doctor import attention_backends, auto_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_doctor_json_on_the_pinned_machine(nanorun_home):
    out = CliRunner().invoke(main, ["doctor", "--json"], catch_exceptions=False)
    assert out.exit_code == 0
    report = json.loads(out.stdout)
    cpu = report["devices"][0]
    assert cpu["name"] == "Test CPU (AVX2 only)" and cpu["native_dtypes"] == ["float32"]
    auto = report["auto"]["cpu"]
    assert auto["dtype"] == "float32" and auto["dtype_reason"].startswith("auto: CPU has no native bf16")
    assert auto["attention"] == "sdpa" and auto["compile"] is False and auto["mfu_peak_flops"] == 1.2e11
    assert report["versions"]["torch"].startswith("2.") and report["device_type_auto"] in ("cpu", "cuda", "mps")
    text = CliRunner().invoke(main, ["doctor"], catch_exceptions=False).stdout
    assert "dtype -> float32 (auto: CPU has no native bf16" in text and "attention -> sdpa" in text


def test_doctor_reads_the_real_machine_and_measures_in_a_subprocess(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NANORUN_CAPS"}
    env["NANORUN_HOME"] = str(tmp_path)
    code = ("import sys, json\nfrom runners.doctor import doctor_report\n"
            "r = doctor_report(measure=%s)\nassert 'torch' not in sys.modules\nprint(json.dumps(r))\n")
    for measure in (False, True):
        out = subprocess.run([sys.executable, "-c", code % measure], capture_output=True, text=True, cwd=ROOT,
                             env=env, timeout=300)
        assert out.returncode == 0, out.stderr
        cpu = json.loads(out.stdout)["devices"][0]
        assert cpu["cores"] >= 1 and cpu["memory_bytes"] > 0 and "float32" in cpu["native_dtypes"]
        if measure:
            assert set(cpu["matmul_flops"]) == {"bfloat16", "float16", "float32"}
            assert cpu["matmul_flops"]["float32"] > 1e8
        else:
            assert cpu["matmul_flops"] == {}


def test_attention_rules_match_the_stage_rules():
    assert attention_backends("cpu", None, "2.13.0+cpu") == ["flex", "sdpa"]
    assert auto_attention("cpu", "bfloat16", ["flex", "sdpa"]) == "sdpa"
    assert auto_attention("cuda", "bfloat16", ["fa3", "flash_attn", "flex", "sdpa"]) == "fa3"
    assert auto_attention("cuda", "float16", ["fa3", "flash_attn", "flex", "sdpa"]) == "flash_attn"
    assert auto_attention("cuda", "float32", ["flash_attn", "flex", "sdpa"]) == "flex"
