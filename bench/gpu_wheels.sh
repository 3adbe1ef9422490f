#!/usr/bin/env bash
# The packages bench_gpu needs on a lent GPU machine beyond what its image holds (Python 3.12 with
# torch, timm, pyarrow, fsspec, tqdm, ...; /work/.library/device/KINDS.md), py-spy included, as
# wheels in .whl/ (git-ignored) for the device tool to carry: 64 MiB a call with the repository,
# so Ray's wheel goes without its Java jar, its dashboard's web page and RLlib, compressed with LZMA.
#
#   bash bench/gpu_wheels.sh     # here, once: about 50 MiB
#
# then one device call, carry [".whl"], command:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 -m bench.bench_gpu --images 1600;
#   cp bench/RESULTS.md $OUT/
#
# No TorchCodec: each release links one torch release, and the one for the image's torch 2.11
# (0.11) has no image decoders, so JPEGs are decoded by torchvision.io there (`jpeg_library`).
# Checked in a Python 3.12 environment with the image's torch 2.11 and torchvision 0.26 and these
# wheels: a job with `--decoder torch` and `device` stores Pillow's features there.
set -euo pipefail
cd "$(dirname "$0")/.."
constraint() { grep -i "^$1==" constraints.txt; }
rm -rf .whl && mkdir .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "$(constraint ray)" "$(constraint zarr)" "$(constraint numcodecs)" "$(constraint donfig)" "$(constraint google-crc32c)" \
    "$(constraint pillow)" "$(constraint jsonschema)" "$(constraint jsonschema-specifications)" "$(constraint referencing)" \
    "$(constraint rpds-py)" "$(constraint typing_extensions)" "$(constraint py-spy)"
ray=$(ls .whl/ray-*.whl)
python3 - "$ray" <<'EOF'
import sys, zipfile
wheel = sys.argv[1]
unused = ("ray/jars/", "ray/dashboard/client/", "ray/rllib/")
with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(wheel + ".lean", "w", zipfile.ZIP_LZMA) as lean:
    for item in source.infolist():
        if not item.filename.startswith(unused):
            lean.writestr(item.filename, source.read(item.filename))
EOF
mv "$ray.lean" "$ray"
du -sh .whl
