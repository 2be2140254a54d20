"""benchmarks/accel_step.py on the CPU: its table and JSON, the peak table, the PyTorch twin.

The timings of a CPU run mean nothing (that is what ``--tiny`` says); these tests check that
the script runs end to end where there is no accelerator, that what it reports is consistent
(FLOPs, images/s against step time, MFU only with a known peak), and, where torch is
installed, that its twin is the same network as ssljax's and augments like the policy.
"""

import json
import math
import os

import jax
import numpy as np
import pytest

from tests.util import load_benchmark


@pytest.fixture(scope="module")
def bench():
  return load_benchmark("accel_step")


def test_peak_table_matches_device_kinds(bench):
  assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
  assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0  # not the SXM number
  assert bench.peak_tflops("NVIDIA H100 NVL") == 835.5  # nor the NVL card's
  assert bench.peak_tflops("NVIDIA H200") == 989.4
  assert bench.peak_tflops("NVIDIA H200 NVL") == 835.5
  assert bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
  assert bench.peak_tflops("NVIDIA L40S") == 362.05
  assert bench.peak_tflops("NVIDIA L40") == 181.05  # not the L4's 121
  assert bench.peak_tflops("TPU v5 lite") == 197.0
  assert bench.peak_tflops("TPU v5") == 459.0  # what jax calls a v5p
  assert bench.peak_tflops("TPU v4") == 275.0
  assert bench.peak_tflops("cpu") is None


def test_torch_choices_name_their_variants(bench):
  assert bench.torch_variants("all") == bench.torch_variants("gpu_aug") + ["dataloader"]
  assert bench.torch_variants("dataloader") == ["dataloader"]  # no torch.compile
  assert bench.torch_variants("none") == []
  assert bench.parse_args(["--torch", "dataloader"]).torch == "dataloader"


def test_unknown_case_is_refused(bench, capsys):
  with pytest.raises(SystemExit):
    bench.parse_args(["--cases", "r18_32_b1024,r34"])
  assert "unknown case(s) ['r34']" in capsys.readouterr().err


def test_cases_are_the_issue_recipes(bench):
  args = bench.parse_args([])
  r18 = bench.case_config("r18_32_b4096", args)
  assert (r18.model.encoder, r18.model.cifar_stem, r18.train.batch_size) == ("resnet18", True,
                                                                             4096)
  assert bench.image_shape(r18) == (32, 32, 3)
  r50 = bench.case_config("r50_224", args)
  assert (r50.model.encoder, r50.model.cifar_stem, r50.train.batch_size) == ("resnet50", False,
                                                                             256)
  assert bench.image_shape(r50) == (224, 224, 3)
  assert r18.train.compute_dtype == r50.train.compute_dtype == "bfloat16"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU report (no MFU)")
def test_tiny_run_writes_a_consistent_report(bench, tmp_path, capsys):
  out = tmp_path / "accel.json"
  bench.main(["--tiny", "--cases", "r18_32_b1024", "--steps", "1", "--rounds", "2",
              "--torch", "none", "--profile", str(tmp_path / "trace"), "--json", str(out)])
  table = capsys.readouterr().out
  report = json.loads(out.read_text())
  assert report["device"]["backend"] == "cpu"
  (case,) = report["cases"]
  row = case["variants"]["ssljax"]
  assert case["batch"] == 16 and row["rounds"] == 2
  assert row["images_per_s"] == pytest.approx(16 / (row["step_ms_median"] / 1e3))
  assert row["step_ms_min"] <= row["step_ms_median"] <= row["step_ms_max"]
  assert row["step_flops"] > 0 and row["compile_s"] > 0 and math.isfinite(row["final_loss"])
  assert row["peak_memory_mib"] > 0
  assert row["step_flops_source"].startswith("XLA cost model of the lowered")
  assert "mfu" not in row, "a CPU has no published bf16 peak, so no MFU"
  assert "r18_32_b1024" in table and "ssljax" in table
  # --profile: a jax.profiler trace of the case, and a step without host transfers.
  files = [f for _, _, names in os.walk(row["trace_dir"]) for f in names]
  assert any(f.endswith(".xplane.pb") for f in files), files
  assert row["hlo_ops"]["host"] == 0 and row["hlo_ops"]["convolution"] + \
      row["hlo_ops"]["fusion"] + row["hlo_ops"]["custom-call"] > 0
  # The trace's summary: on a CPU the thunks are host events named after HLO instructions, so
  # all of them match; the three phases of the step each take time, and the categories and the
  # phases are two splits of the same busy time.
  summary = row["trace_summary"]
  assert "error" not in summary, summary
  assert summary["matched_to_hlo_fraction"] == pytest.approx(1.0)
  assert summary["busy_ms"] > 0 and summary["wall_ms"] > 0
  assert sum(summary["by_category_ms"].values()) == pytest.approx(summary["busy_ms"])
  assert sum(summary["by_phase_ms"].values()) == pytest.approx(summary["busy_ms"])
  assert {"forward", "backward", "augmentation"} <= set(summary["by_phase_ms"])
  assert any(c.startswith("conv") for c in summary["by_category_ms"])
  assert "device time per step" in table and "backward" in table
  traffic = row["hlo_traffic"]
  assert traffic["total_gb"] > 0 and traffic["total_gb"] == pytest.approx(
      sum(r["read_gb"] + r["written_gb"] for r in traffic["by_category"].values()))


def test_mfu_uses_the_given_peak(bench, tmp_path):
  out = tmp_path / "accel.json"
  report = bench.main(["--tiny", "--cases", "r18_32_b1024", "--steps", "1", "--rounds", "1",
                       "--torch", "none", "--peak-tflops", "1.0", "--json", str(out)])
  row = report["cases"][0]["variants"]["ssljax"]
  expected = row["step_flops"] / (row["step_ms_median"] / 1e3) / 1e12
  assert row["mfu"] == pytest.approx(expected)


def test_step_flops_count_the_convolution_before_the_backend_rewrites_it(bench):
  import jax
  import jax.numpy as jnp
  # A 3x3 'VALID' convolution, 2 x 6x6 outputs x 5 output channels x 3x3x4 taps, one
  # multiply-add (2 FLOPs) each; nothing else in the program.
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  lowered = conv.lower(jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 5)))
  flops, source = bench.step_flops(lowered, lowered.compile())
  assert flops == 2 * (2 * 6 * 6 * 5) * (3 * 3 * 4)
  assert source.startswith("XLA cost model of the lowered")

  class NoLowering:  # e.g. a jax whose private cost-analysis entry point moved
    def compiler_ir(self, dialect):
      raise NotImplementedError

  class LibraryCall:  # a GPU step's cost analysis: a cuDNN call counts -1 FLOPs
    def cost_analysis(self):
      return {"flops": -1.0}

  class Compiled:
    def cost_analysis(self):
      return [{"flops": 1e9}]  # the list older jax returns

  assert bench.step_flops(NoLowering(), LibraryCall()) == (None, "not reported")
  flops, source = bench.step_flops(NoLowering(), Compiled())
  assert flops == 1e9 and source.startswith("XLA cost analysis of the compiled step")


def _ssljax_param_count(config):
  import jax
  import jax.numpy as jnp
  from ssljax.methods import build_method
  size = int(config.data.image_size)
  views = tuple(jnp.zeros((2, size, size, 3)) for _ in range(2))
  params, _ = jax.eval_shape(lambda: build_method(config).init(jax.random.key(0), views))
  return sum(leaf.size for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("case", ["r18_32_b1024", "r50_224"])
def test_torch_twin_has_ssljax_parameter_count(bench, case):
  torch = pytest.importorskip("torch")
  config = bench.case_config(case, bench.parse_args([]))
  twin = bench.build_torch_model(config)
  assert sum(p.numel() for p in twin.parameters()) == _ssljax_param_count(config)
  size = int(config.data.image_size)
  with torch.no_grad():
    z = twin.eval()(torch.zeros(2, 3, size, size))
  assert z.shape == (2, config.method.simclr.proj_dim)


def test_torch_device_augment_is_the_identity_without_randomness(bench):
  torch = pytest.importorskip("torch")
  config = bench.case_config("r18_32_b1024", bench.parse_args(["--tiny"]))
  a = config.augment
  a.crop_scale, a.crop_ratio, a.flip_prob = (1.0, 1.0), (1.0, 1.0), 0.0
  a.jitter_prob, a.grayscale_prob, a.blur_prob, a.solarize_prob = 0.0, 0.0, 0.0, 0.0
  images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), np.uint8)
  out = bench.torch_device_augment(torch.from_numpy(images), config).numpy()
  mean, std = np.asarray(config.data.mean), np.asarray(config.data.std)
  expected = ((images / 255.0 - mean) / std).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  # Full jitter / grayscale / blur keeps the shape and the [0, 1] range before normalising.
  config.augment.jitter_prob = config.augment.grayscale_prob = config.augment.blur_prob = 1.0
  config.augment.jitter = (0.8, 0.8, 0.8, 0.2)
  out = bench.torch_device_augment(torch.from_numpy(images), config).numpy()
  raw = out.transpose(0, 2, 3, 1) * std + mean
  assert out.shape == (4, 3, 16, 16) and raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_torch_crop_boxes_are_torchvisions(bench):
  torch = pytest.importorskip("torch")
  import jax
  from ssljax.augment import ops
  a = bench.case_config("r18_32_b1024", bench.parse_args([])).augment  # RRC 0.08-1, 3/4-4/3
  torch.manual_seed(0)
  w, h = (t.numpy() for t in bench.torch_crop_sides(20000, a, torch.device("cpu")))
  assert w.max() <= 1 and h.max() <= 1
  side = 1000  # ssljax's own sampler on a large image, where rounding to pixels is negligible
  _, _, hs, ws = jax.vmap(lambda k: ops.sample_crop_box(k, side, side, a.crop_scale,
                                                        a.crop_ratio))(
      jax.random.split(jax.random.key(0), 20000))
  area = np.asarray(hs * ws) / side ** 2
  # Ten draws, the first that fits: mean area 0.48, 0.53 if oversized boxes were clamped.
  assert abs((w * h).mean() - area.mean()) < 0.015
  assert abs(np.quantile(w * h, 0.9) - np.quantile(area, 0.9)) < 0.02
  # No draw fits (a 2:1 box of >= 90% of the area): torchvision's fallback, the whole width.
  a.crop_scale, a.crop_ratio = (0.9, 1.0), (2.0, 2.0)
  w, h = bench.torch_crop_sides(100, a, torch.device("cpu"))
  np.testing.assert_allclose(w.numpy(), 1.0)
  np.testing.assert_allclose(h.numpy(), 0.5)


class _NumberedViews:
  """Item i is a pair of views that differ by i. At module level, so that the DataLoader's
  forkserver workers can unpickle it."""

  def __len__(self):
    return 10 ** 6

  def __getitem__(self, i):
    import torch
    view = torch.zeros(3, 16, 16)
    return view, view + i


@pytest.mark.slow  # ~20 s of forkserver workers for benchmark-only code: suite time
def test_dataloader_rounds_drop_prefetched_batches_and_cover_whole_worker_cycles(
    bench, monkeypatch, tmp_path):
  torch = pytest.importorskip("torch")

  def loader(config, images, workers):
    # The benchmark's own start method: forkserver (a fork of this JAX process may deadlock).
    return torch.utils.data.DataLoader(_NumberedViews(), batch_size=int(config.train.batch_size),
                                       num_workers=workers, persistent_workers=True,
                                       prefetch_factor=2, multiprocessing_context="forkserver")

  monkeypatch.setattr(bench, "_dataloader", loader)
  report = bench.main(["--tiny", "--cases", "r18_32_b1024", "--steps", "3", "--rounds", "2",
                       "--torch", "dataloader", "--loader-workers", "2",
                       "--json", str(tmp_path / "a.json")])
  # --torch dataloader runs the DataLoader variant alone (no torch.compile).
  assert set(report["cases"][0]["variants"]) == {"ssljax", "torch[dataloader]"}
  assert report["cases"][0]["torch_choice"] == "dataloader"
  row = report["cases"][0]["variants"]["torch[dataloader]"]
  assert "error" not in row, row
  assert row["steps_per_round"] == 4 and row["rounds"] == 2  # 3 steps -> 2 cycles of 2
  case = bench.TorchCase(bench.case_config("r18_32_b1024", bench.parse_args(["--tiny"])),
                         "dataloader", np.zeros((16, 16, 16, 3), np.uint8), workers=2)
  case.run(1)  # the warm-up took batches 0-1, this one 2; the workers ran ahead
  case.restart_loader()
  v1, v2 = next(case.loader)
  # Items 0-15: a fresh epoch, not batch 3 (items 48-63), which was ready before the restart.
  assert int((v2 - v1).min()) == 0


def test_hlo_op_counts_find_transposes_and_host_callbacks(bench):
  import jax
  import jax.numpy as jnp
  x = jnp.ones((8, 16))
  plain = bench.hlo_op_counts(jax.jit(lambda v: (v @ v.T).sum()).lower(x).compile())
  assert plain["host"] == 0
  with_callback = jax.jit(lambda v: jax.pure_callback(
      lambda a: np.asarray(a) * 2, jax.ShapeDtypeStruct(v.shape, v.dtype), v) + 1.0)
  assert bench.hlo_op_counts(with_callback.lower(x).compile())["host"] >= 1


  class Text:  # the parser on HLO lines as XLA prints them
    def as_text(self):
      return "\n".join([
          "  %t = f32[16,8]{1,0} transpose(f32[8,16]{1,0} %p), dimensions={1,0}",
          "  %c.1 = bf16[4,4]{0,1} copy(bf16[4,4]{1,0} %t2)",
          "  %f = f32[8]{0} fusion(f32[8]{0} %a), kind=kLoop, calls=%fused",
          "  ROOT %ar = f32[8]{0} all-reduce-start(f32[8]{0} %f), to_apply=%add",
          "  %cc = (f32[2]{0}, u8[0]{0}) custom-call(f32[2]{0} %x), custom_call_target=\"__cudnn$conv\"",
          "  %o = token[] outfeed(f32[2]{0} %x, token[] %tok)"])

  counts = bench.hlo_op_counts(Text())
  assert (counts["transpose"], counts["copy"], counts["fusion"], counts["all-reduce"],
          counts["custom-call"], counts["host"]) == (1, 1, 1, 1, 1, 1)

  class Fused:  # a transpose and a convolution inside a fusion's body are not kernels
    def as_text(self):
      return "\n".join([
          "HloModule jit_step, entry_computation_layout={(f32[8,16]{1,0})->f32[16,8]{1,0}}",
          "",
          "%fused_transpose.1 (param_0: f32[8,16]) -> f32[16,8] {",
          "  %param_0 = f32[8,16]{1,0} parameter(0)",
          "  %t.1 = f32[16,8]{1,0} transpose(f32[8,16]{1,0} %param_0), dimensions={1,0}",
          "  ROOT %cv = f32[16,8]{1,0} convolution(f32[16,8]{1,0} %t.1, f32[1,1]{1,0} %k)",
          "}",
          "",
          "ENTRY %main.9 (p: f32[8,16]) -> f32[16,8] {",
          "  %p = f32[8,16]{1,0} parameter(0)",
          "  ROOT %f.2 = f32[16,8]{1,0} fusion(f32[8,16]{1,0} %p), kind=kLoop, "
          "calls=%fused_transpose.1",
          "}"])

  counts = bench.hlo_op_counts(Fused())
  assert (counts["fusion"], counts["transpose"], counts["transpose_in_fusions"],
          counts["convolution"]) == (1, 0, 1, 1)


def test_hlo_categories_on_gpu_hlo(bench):
  """Kernel categories and step phases on lines in the form XLA:GPU prints (taken from the
  H200 run's HLO, shortened): cuDNN's three convolutions, cuBLAS, a reduction fusion, a
  layout copy, and the phases from JAX's op_name metadata."""
  meta = lambda op: f'metadata={{op_name="jit(step_fn)/{op}"}}'
  text = "\n".join([
      "HloModule jit_step_fn",
      "",
      "%fused_reduce.7 (param_0: bf16[512,8,8,64]) -> f32[64] {",
      "  %param_0 = bf16[512,8,8,64]{3,2,1,0} parameter(0)",
      "  %convert.1 = f32[512,8,8,64]{3,2,1,0} convert(%param_0)",
      "  ROOT %reduce.3 = f32[64]{0} reduce(%convert.1, %c), dimensions={0,1,2}, to_apply=%add, "
      + meta("transpose(jvp(ResNet))/stage1_block1/bn1/reduce_sum"),
      "}",
      "",
      "%fused_multiply.2 (param_0: f32[16,32,32,3]) -> f32[16,32,32,3] {",
      "  %param_0 = f32[16,32,32,3]{3,2,1,0} parameter(0)",
      "  ROOT %m = f32[16,32,32,3]{3,2,1,0} multiply(%param_0, %param_0), "
      + meta("vmap()/mul"),
      "}",
      "",
      "ENTRY %main (p: bf16[512,8,8,64]) -> f32[64] {",
      '  %cudnn-conv.1 = (bf16[512,8,8,64]{3,2,1,0}, u8[0]{0}) custom-call(%a, %w), '
      'window={size=3x3 pad=1_1x1_1}, custom_call_target="__cudnn$convForward", '
      + meta("jvp(ResNet)/stage1_block1/conv1/conv_general_dilated"),
      '  %cudnn-conv-bw-input.2 = (bf16[512,8,8,64]{3,2,1,0}, u8[0]{0}) custom-call(%g, %w), '
      'custom_call_target="__cudnn$convBackwardInput", '
      + meta("transpose(jvp(ResNet))/stage1_block1/conv1/conv_general_dilated"),
      '  %cudnn-conv-bw-filter.3 = (bf16[64,3,3,64]{3,2,1,0}, u8[0]{0}) custom-call(%a, %g), '
      'custom_call_target="__cudnn$convBackwardFilter", '
      + meta("transpose(jvp(ResNet))/stage1_block1/conv1/conv_general_dilated"),
      '  %cublas-gemm.4 = (f32[512,256]{1,0}, s8[0]{0}) custom-call(%h, %k), '
      'custom_call_target="__cublas$lt$matmul", ' + meta("jvp(SimCLRHead)/dot_general"),
      "  %input_reduce_fusion.7 = f32[64]{0} fusion(%g), kind=kInput, calls=%fused_reduce.7",
      "  %loop_multiply_fusion.2 = f32[16,32,32,3]{3,2,1,0} fusion(%x), kind=kLoop, "
      "calls=%fused_multiply.2",
      "  %copy.9 = f32[64]{0} copy(%input_reduce_fusion.7), " + meta("mul"),
      "  ROOT %add.5 = f32[64]{0} add(%copy.9, %copy.9)",
      "}"])
  got = bench.hlo_categories(text)
  assert got["cudnn-conv.1"] == ("conv forward", "forward")
  assert got["cudnn-conv-bw-input.2"] == ("conv input-grad", "backward")
  assert got["cudnn-conv-bw-filter.3"] == ("conv weight-grad", "backward")
  assert got["cublas-gemm.4"] == ("matmul", "forward")
  # A fusion without metadata of its own takes its phase from its body.
  assert got["input_reduce_fusion.7"] == ("reduction (BN statistics, pooling, loss)",
                                          "backward")
  assert got["loop_multiply_fusion.2"] == ("elementwise / other", "augmentation")
  assert got["copy.9"] == ("transpose / copy", "optimiser and the rest")
  assert got["add.5"] == ("elementwise / other", "unattributed")


@pytest.mark.parametrize("name,category", [
    ("sm90_xmma_wgrad_indexed_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "conv weight-grad"),
    ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "conv input-grad"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "conv forward"),
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bx_coopA_bias_TNT", "matmul"),
    ("input_reduce_select_fusion_55", "reduction (BN statistics, pooling, loss)"),
    ("loop_add_fusion_4", "elementwise / other"),
])
def test_kernel_names_are_categorised(bench, name, category):
  """Kernels no HLO instruction names (inside cuDNN / cuBLAS calls), by the names the H200
  trace recorded."""
  assert bench.kernel_category(name) == category


def test_hlo_traffic_counts_each_kernels_operands_and_result(bench, tmp_path, capsys):
  """Bytes by hand: a cuDNN convolution reading a bf16 [2,4,4,8] input (512 B) and a bf16
  [3,3,8,8] filter (1152 B), writing a bf16 [2,4,4,8] result (512 B) beside a u8 workspace
  that is not counted; a reduction fusion reading that result through get-tuple-element and
  writing f32[8] (32 B); parameters, tuples and get-tuple-element move nothing themselves."""
  text = "\n".join([
      "HloModule jit_step_fn",
      "",
      "%fused_reduce (param_0: bf16[2,4,4,8]) -> f32[8] {",
      "  %param_0 = bf16[2,4,4,8]{3,2,1,0} parameter(0)",
      "  ROOT %r = f32[8]{0} reduce(%param_0, %c), dimensions={0,1,2}, to_apply=%add, "
      'metadata={op_name="jit(step_fn)/transpose(jvp(ResNet))/bn/reduce_sum"}',
      "}",
      "",
      "ENTRY %main (x: bf16[2,4,4,8], w: bf16[3,3,8,8]) -> f32[8] {",
      "  %x = bf16[2,4,4,8]{3,2,1,0} parameter(0)",
      "  %w = bf16[3,3,8,8]{3,2,1,0} parameter(1)",
      "  %cudnn-conv.1 = (bf16[2,4,4,8]{3,2,1,0}, u8[4096]{0}) custom-call(%x, %w), "
      'custom_call_target="__cudnn$convForward", '
      'metadata={op_name="jit(step_fn)/jvp(ResNet)/conv/conv_general_dilated"}',
      "  %get-tuple-element.1 = bf16[2,4,4,8]{3,2,1,0} get-tuple-element(%cudnn-conv.1), index=0",
      "  ROOT %input_reduce_fusion = f32[8]{0} fusion(%get-tuple-element.1), kind=kInput, "
      "calls=%fused_reduce",
      "}"])
  traffic = bench.hlo_traffic(text)
  conv = traffic["by_category"]["conv forward"]
  assert (conv["read_gb"] * 1e9, conv["written_gb"] * 1e9, conv["kernels"]) == \
      pytest.approx((512 + 1152, 512, 1))
  reduce = traffic["by_category"]["reduction (BN statistics, pooling, loss)"]
  assert (reduce["read_gb"] * 1e9, reduce["written_gb"] * 1e9) == pytest.approx((512, 32))
  assert traffic["by_phase"]["backward"]["kernels"] == 1
  assert traffic["total_gb"] * 1e9 == pytest.approx(512 + 1152 + 512 + 512 + 32)
  # The command-line form reads a saved (gzipped) HLO and prints the floor at a bandwidth.
  import gzip
  path = tmp_path / "step.hlo.txt.gz"
  with gzip.open(path, "wt") as f:
    f.write(text)
  assert bench.main(["--hlo-traffic", str(path), "--bandwidth-tbs", "1.0"]) == traffic
  out = capsys.readouterr().out
  assert "conv forward" in out and "ms at 1.0 TB/s" in out


def test_trace_summary_matches_gpu_kernels_to_the_hlo(bench, tmp_path, monkeypatch):
  """The GPU path of `trace_summary` on a stand-in trace shaped like the H200's: one device
  plane whose stream line holds kernels, matched to the HLO by the ``hlo_op`` stat (a cuDNN
  kernel), by the kernel's name with ``.`` written ``_`` (an XLA fusion), or not at all (a
  kernel of a library call without the stat, classified by its name); the host plane's own
  events are left out."""
  import types

  hlo = "\n".join([
      "HloModule jit_step_fn",
      "",
      "%fused_add.4 (p: bf16[8]) -> bf16[8] {",
      "  %p = bf16[8]{0} parameter(0)",
      '  ROOT %a = bf16[8]{0} add(%p, %p), metadata={op_name="jit(step_fn)/transpose(jvp(ResNet))/bn/add_any"}',
      "}",
      "",
      "ENTRY %main (x: bf16[8]) -> bf16[8] {",
      "  %x = bf16[8]{0} parameter(0)",
      '  %cudnn-conv.3 = (bf16[8]{0}, u8[0]{0}) custom-call(%x, %x), '
      'custom_call_target="__cudnn$convForward", '
      'metadata={op_name="jit(step_fn)/jvp(ResNet)/conv/conv_general_dilated"}',
      "  ROOT %loop_add_fusion.4 = bf16[8]{0} fusion(%x), kind=kLoop, calls=%fused_add.4",
      "}"])

  def event(name, ms, **stats):
    return types.SimpleNamespace(name=name, duration_ns=ms * 1e6, stats=list(stats.items()))

  def plane(name, lines):
    return types.SimpleNamespace(name=name, lines=[types.SimpleNamespace(name=n, events=e)
                                                   for n, e in lines.items()])

  steps = 2
  profile = types.SimpleNamespace(planes=[
      plane("/host:CPU", {"python": [event("PjitFunction(step_fn)", 50.0)]}),
      plane("/device:GPU:0", {
          "Stream #14(Compute,Memset)": [
              event("sm90_xmma_fprop_implicit_gemm_bf16", 6.0, hlo_op="cudnn-conv.3"),
              event("sm90_xmma_fprop_implicit_gemm_bf16", 6.0, hlo_op="cudnn-conv.3"),
              event("loop_add_fusion_4", 1.0), event("loop_add_fusion_4", 1.0),
              event("sm90_xmma_wgrad_indexed_implicit_gemm", 4.0)],
          "Stream #15(MemcpyH2D)": [event("MemcpyH2D", 0.5)]})])
  (tmp_path / "plugins").mkdir()
  (tmp_path / "plugins" / "host.xplane.pb").write_bytes(b"")
  monkeypatch.setattr(jax.profiler.ProfileData, "from_file", staticmethod(lambda path: profile))
  summary = bench.trace_summary(str(tmp_path), bench.hlo_categories(hlo), steps,
                                wall_s=2 * 0.0105)
  assert summary["line"] == "/device:GPU:0 / Stream #14(Compute,Memset)"
  assert summary["busy_ms"] == pytest.approx(18.0 / steps)
  assert summary["wall_ms"] == pytest.approx(10.5)
  assert summary["by_category_ms"] == pytest.approx(
      {"conv forward": 6.0, "conv weight-grad": 2.0, "elementwise / other": 1.0})
  assert summary["by_phase_ms"] == pytest.approx(
      {"forward": 6.0, "backward": 1.0, "unattributed": 2.0})
  assert summary["matched_to_hlo_fraction"] == pytest.approx(14.0 / 18.0)
  rows = {r["name"]: r for r in summary["top_ms"]}
  assert rows["loop_add_fusion_4"]["hlo"] == "loop_add_fusion.4"
  assert rows["sm90_xmma_fprop_implicit_gemm_bf16"]["hlo"] == "cudnn-conv.3"
  assert "hlo" not in rows["sm90_xmma_wgrad_indexed_implicit_gemm"]
