#!/usr/bin/env bash
# Wheels of the packages jaxllm needs that the lent GPU machine's image (Python 3.12) lacks, into
# .whl/ (ignored by git; carried to the machine by the device tool: carry=[".whl"]). Run here,
# before `bash tools/gpu_check.sh` there. promise ships as a source archive only: built here
# (pure Python). About 11 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" -d .whl array_record==0.8.6 clu==0.0.12 dm_tree==0.1.10 docstring_parser==0.18.0 \
  googleapis_common_protos==1.76.0 grain==0.2.18 immutabledict==4.3.1 importlib_resources==7.1.0 \
  ml_collections==1.1.0 portpicker==1.6.0 simple_parsing==0.1.9 tensorflow_datasets==4.9.10 \
  tensorflow_metadata==1.21.0 termcolor==3.3.0 toml==0.10.2
python3 -m pip wheel -q --no-deps -w .whl promise==2.3
ls .whl
