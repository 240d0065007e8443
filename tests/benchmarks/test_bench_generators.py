"""bench_generators: both upsampling modes are measured, and subpixel counts fewer FLOPs."""
import os
import sys

import helpers

sys.path.insert(0, os.path.join(helpers.REPO_ROOT, "benchmarks"))
import bench_generators  # noqa: E402  pylint: disable=g-import-not-at-top


def test_subpixel_generators_count_fewer_flops(capsys):
  assert bench_generators.main(["--batch", "4", "--vae_batch", "4", "--ngf", "8", "--latent",
                                "8", "--image", "16x16x1", "--repeats", "1"]) == 0
  rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
          if line.startswith("| generator") or line.startswith("| VAE")]
  gflop = {(r[0][2:], r[1]): float(r[3]) for r in rows}
  assert len(gflop) == 8, rows
  part = "generator forward + backward (batch 4)"
  assert gflop[(part, "subpixel")] < 0.8 * gflop[(part, "direct")], gflop
