"""benchmarks/streaming_input.py (the README's streaming-input command) on a few images: every
setting it times delivers full 224-px batches, and its JSON records how to rerun it."""

import json

from tests.util import load_benchmark


def test_streaming_input_benchmark_times_every_setting_and_writes_its_json(tmp_path):
  bench = load_benchmark("streaming_input")
  out = tmp_path / "streaming.json"
  argv = ["--images", "12", "--data", str(tmp_path / "jpegs"), "--batch", "4", "--batches", "2",
          "--settings", "0x1,0x2", "--eval-threads", "2", "--out", str(out)]
  result = bench.main(argv)
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))
  settings = [row["setting"] for row in result["rows"]]
  assert settings == ["one example at a time (no grain)",
                      "grain StreamingLoader, 0 workers x 1 threads",
                      "grain StreamingLoader, 0 workers x 2 threads",
                      "evaluation views (get), 1 threads", "evaluation views (get), 2 threads"]
  for row in result["rows"]:
    assert row["images"] > 0 and row["images_per_sec"] > 0, row
  assert [r["images"] for r in result["rows"][1:3]] == [8, 8]  # 2 batches of 4, after warm-up
  # The recorded command is one the script accepts.
  recorded = result["command"].split()[2:]
  assert "--eval-threads=2" in recorded
  assert bench.main(recorded[:-1] + [f"--out={tmp_path / 'again.json'}"])["rows"][0]["images"]
