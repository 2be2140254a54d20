"""A ``gs://`` workdir and a ``gs://`` TFDS data_dir end to end against a local Cloud Storage
emulator (issue 20).

`ssljax.train.loop.train` runs in a subprocess with ``--workdir gs://...`` pointed at the
pip-installable ``gcp-storage-emulator``: orbax writes and restores the checkpoints through
TensorStore's GCS driver (``TENSORSTORE_GCS_HTTP_URL``), and config.json, metrics.jsonl,
results.json, the plot and the linear evaluation's checkpoints go through etils.epath and
gcsfs (``STORAGE_EMULATOR_HOST``). Its data is a TFDS dataset prepared as ArrayRecord and
copied into the same bucket, streamed (``data.source='tfds_stream'``) as on a pod: TFDS reads
the metadata through gcsfs, and array_record opens the shards with its own Cloud Storage
client (``CLOUD_STORAGE_EMULATOR_ENDPOINT``). The run trains, stops, resumes from its bucket
checkpoint and finishes; the test then reads the bucket back. Skipped where gcsfs or the
emulator is not installed (both are in the ``test`` extra).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest

from tests.util import write_tiny_tfds

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUCKET = "ssljax-test"

_RUN = """
import json, logging, sys
logging.basicConfig(level=logging.INFO)
logging.getLogger("gcsfs").setLevel(logging.ERROR)  # 'no default credentials' on every open
sys.path.insert(0, {root!r})
from tests.util import tiny_config, tiny_tfds_builder
from ssljax.train import loop
tiny_tfds_builder()  # registers the dataset's name with TFDS
c = tiny_config({data!r})
c.unlock()
# Decoding in this process: grain's worker processes take seconds each to start on 2 cores.
c.data.update(dict(source="tfds_stream", name={name!r}, data_dir={data_dir!r},
                   stream_workers=0, stream_threads=2))
c.train.num_steps, c.train.checkpoint_every_steps = 4, 2
c.eval.linear_eval, c.eval.linear_eval_epochs, c.eval.linear_eval_batch_size = True, 1.0, 16
c.eval.linear_probe = False  # its results go where kNN's do; the linear evaluation has files
c.eval.enabled = False  # the first session only trains (and checkpoints)
first = loop.train(c, {workdir!r})
c.train.num_steps, c.eval.enabled = 6, True  # a second session resumes at step 4
second = loop.train(c, {workdir!r})
print(json.dumps([{{k: v for k, v in r.items() if isinstance(v, (int, float))}}
                  for r in (first, second)]))
"""


_EMULATOR = """
import sys, time
from gcp_storage_emulator.handlers import objects
download = objects.download
def download_with_generation(request, response, storage, *args, **kwargs):
  # Real GCS sends an object's generation as a header with its bytes, and TensorStore reads
  # it there; the emulator sends it only in the JSON metadata.
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", 1))
  except Exception:  # a missing object: the handler answers 404
    pass
  return download(request, response, storage, *args, **kwargs)
objects.download = download_with_generation
from gcp_storage_emulator.server import create_server  # its routes take the patched handler
server = create_server("localhost", int(sys.argv[1]), in_memory=True, default_bucket=sys.argv[2])
server.start()
print("ready", flush=True)
sys.stdout = open("/dev/null", "w")  # nobody reads the pipe from here on
while True:
  time.sleep(60)
"""


@pytest.fixture(scope="module")
def emulator():
  """``http://localhost:PORT`` of an in-memory emulator (its own process) with an empty bucket."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  process = subprocess.Popen([sys.executable, "-c", _EMULATOR, str(port), BUCKET],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    for line in process.stdout:  # the emulator's start-up lines, then ours
      if line.strip() == "ready":
        break
    else:
      raise RuntimeError("the storage emulator did not start")
    yield f"http://localhost:{port}"
  finally:
    process.kill()
    process.wait()


def _upload(emulator: str, local: pathlib.Path, prefix: str) -> None:
  """Copies every file under `local` to ``gs://BUCKET/<prefix>/<relative path>``."""
  for path in sorted(local.rglob("*")):
    if path.is_file():
      name = urllib.parse.quote(f"{prefix}/{path.relative_to(local)}", safe="")
      request = urllib.request.Request(
          f"{emulator}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={name}",
          data=path.read_bytes(), method="POST",
          headers={"Content-Type": "application/octet-stream"})
      with urllib.request.urlopen(request, timeout=30):
        pass


def test_a_bucket_workdir_and_data_dir_train_resume_and_hold_every_output(emulator, tmp_path):
  pytest.importorskip("tensorflow_datasets")
  workdir, data_dir = f"gs://{BUCKET}/run", f"gs://{BUCKET}/tfds"
  name = write_tiny_tfds(str(tmp_path / "tfds"))
  _upload(emulator, tmp_path / "tfds", "tfds")
  # NO_GCE_CHECK: google-auth skips probing for a GCE metadata server, which on a network
  # that drops the packets costs a timeout per probe.
  env = {**os.environ, "STORAGE_EMULATOR_HOST": emulator, "TENSORSTORE_GCS_HTTP_URL": emulator,
         "CLOUD_STORAGE_EMULATOR_ENDPOINT": emulator,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token", "NO_GCE_CHECK": "True"}
  code = _RUN.format(root=ROOT, data=str(tmp_path / "data"), workdir=workdir, name=name,
                     data_dir=data_dir)
  (tmp_path / "data").mkdir()
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  first, second = json.loads(result.stdout.strip().splitlines()[-1])
  assert (first["steps"], second["steps"]) == (4, 6)
  assert "resumed from step 4" in result.stderr
  assert "knn/top1" not in first and second["linear_eval/steps"] == 4
  # Both sessions streamed the bucket's ArrayRecord shards (64 train, 32 test examples).
  assert result.stderr.count("streaming tfds_stream split 'train': 64 examples") >= 2
  assert second["eval/test_examples"] == 32 and second["linear_eval/test_examples"] == 32

  # Read back through the emulator's JSON API (gcsfs here would leave its event-loop thread in
  # the test process).
  def objects(prefix: str) -> list[str]:
    url = f"{emulator}/storage/v1/b/{BUCKET}/o?prefix={urllib.parse.quote(prefix)}"
    with urllib.request.urlopen(url, timeout=30) as response:
      return [item["name"] for item in json.load(response).get("items", [])]

  def cat(name: str) -> bytes:
    url = (f"{emulator}/download/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}"
           f"?alt=media")
    with urllib.request.urlopen(url, timeout=30) as response:
      return response.read()

  names = objects("run/")
  top = {n.split("/")[1] for n in names}
  assert {"checkpoints", "config.json", "metrics.jsonl", "results.json",
          "training_curves.png", "linear_eval"} <= top, top
  steps = sorted({int(n.split("/")[2]) for n in names
                  if n.startswith("run/checkpoints/") and n.split("/")[2].isdigit()})
  assert steps == [4, 6]  # train.keep_checkpoints = 2
  # The linear evaluation of the step-6 encoder, with its own checkpoint in the bucket.
  runs = {n.split("/")[2] for n in names if n.startswith("run/linear_eval/")}
  assert len(runs) == 1 and next(iter(runs)).startswith("step6-"), runs
  [run] = runs
  assert {n.split("/")[4] for n in names
          if n.startswith(f"run/linear_eval/{run}/checkpoints/")} == {"4"}
  stored = json.loads(cat("run/results.json"))
  assert stored["knn/top1"] == second["knn/top1"]
  assert stored["linear_eval/top1"] == second["linear_eval/top1"]
  records = [json.loads(line) for line in cat("run/metrics.jsonl").decode().splitlines()]
  losses = sorted({r["step"] for r in records if "train/loss" in r})
  assert losses == [2, 4, 6]  # both sessions appended to the same bucket object
  assert json.loads(cat("run/config.json"))["train"]["num_steps"] in (4, 6)
