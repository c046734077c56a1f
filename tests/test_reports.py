"""``--report`` files and progress bars: the records the Python API returns, as people read them."""

from __future__ import annotations

import json

import pytest
from test_cli import CNN_PATH, _compress, _run

from dwconvert import checkpoint
from dwconvert.cli.common import EXIT_OK, EXIT_USAGE
from dwconvert.report import ConversionReport, LayerRecord, render

pytestmark = pytest.mark.usefixtures("single_thread_module")


def test_compress_report_holds_the_records_saved_with_the_model(tmp_path, capsys):
    output, report = tmp_path / "o.safetensors", tmp_path / "o.json"
    code, out, err = _run(_compress(CNN_PATH, output, "--form", "dw-pw", "--rank", "2",
                                    "--report", report), capsys)
    assert code == EXIT_OK, err
    records = json.loads(report.read_text())
    assert records == checkpoint.read_recipe(output)["extra"]["report"]
    assert [layer["rank"] for layer in records["layers"]] == [2, 2, 2]
    # The converted model's own MACs, recomputed from the per-layer records.
    others = records["macs_before"] - sum(r["macs_before"] for r in records["layers"])
    assert records["macs_after"] == others + sum(r["macs_after"] for r in records["layers"])


def test_compress_markdown_report(tmp_path, capsys):
    output, report = tmp_path / "o.safetensors", tmp_path / "o.md"
    code, out, err = _run(_compress(CNN_PATH, output, "--form", "dw-pw", "--rank", "2",
                                    "--report", report), capsys)
    assert code == EXIT_OK, err
    lines = report.read_text().splitlines()
    assert lines[0] == "# Conversion report"
    header = next(line for line in lines if line.startswith("| layer"))
    assert [c.strip() for c in header.strip("|").split("|")][:3] == ["layer", "form", "rank"]
    rows = [line for line in lines if line.startswith("| conv_layers.")]
    assert [row.split("|")[3].strip() for row in rows] == ["2/9", "2/9", "2/9"]
    assert "- converted 3 of 3 convs" in lines


def test_report_path_is_checked_before_converting(tmp_path, capsys):
    output = tmp_path / "o.safetensors"
    code, _, err = _run(_compress(CNN_PATH, output, "--form", "dw-pw", "--rank", "2",
                                  "--report", tmp_path / "o.html"), capsys)
    assert code == EXIT_USAGE and ".json or .md" in err
    assert not output.exists()
    code, _, err = _run(_compress(CNN_PATH, output, "--form", "dw-pw", "--rank", "2",
                                  "--report", output), capsys)
    assert code == EXIT_USAGE and not output.exists()


def test_render_by_suffix():
    report = ConversionReport(
        layers=[LayerRecord("a", "converted", 90, 10, 30, 4, "cp", 2, 9, weight_error=0.5),
                LayerRecord("b", "skipped", 10, 2, reason="1x1 conv: already pointwise")],
        traced=True, params_before=12, params_after=6, macs_before=100, macs_after=40)
    data = json.loads(render(report, ".json"))
    assert data["mac_ratio"] == 0.4 and data["layers"][1]["reason"].startswith("1x1")
    text = render(report, ".md")
    assert "| a " in text and "| 2/9 " in text and "1x1 conv: already pointwise" in text
    with pytest.raises(ValueError, match=".json"):
        render(report, ".txt")


def test_progress_bars_forced_and_quiet(tmp_path, capsys):
    output = tmp_path / "o.safetensors"
    code, _, err = _run(["--progress", *_compress(CNN_PATH, output, "--form", "dw-pw",
                                                  "--rank", "2")], capsys)
    assert code == EXIT_OK, err
    assert "factorizing" in err and "layer" in err
    code, _, err = _run(["-q", *_compress(CNN_PATH, output, "--form", "dw-pw", "--rank", "2",
                                          "--force")], capsys)
    assert code == EXIT_OK
    assert "factorizing" not in err
    # Not a terminal (pytest captures stderr) and not forced: no bars either.
    code, _, err = _run(_compress(CNN_PATH, output, "--form", "dw-pw", "--rank", "2",
                                  "--force"), capsys)
    assert code == EXIT_OK and "factorizing" not in err
