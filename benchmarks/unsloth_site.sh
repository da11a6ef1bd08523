#!/usr/bin/env bash
# Build the Python packages Unsloth needs on the GPU machine (Python 3.12, torch 2.11 already there, no
# internet) as one compressed folder to carry: .unsloth/site.tar.xz. Unsloth pins transformers <= 5.17,
# so it cannot share a site with this project's pins; benchmarks run it from its own PYTHONPATH.
#
# The list is what `import unsloth; from unsloth import FastVisionModel` needed on a clean Python (found by
# importing until nothing was missing, 2026-11-27, unsloth 2026.10.9), plus pydantic for this project's
# `train.pad_batch`, which unsloth_speed.py uses. Left out to fit the carry limit:
# unsloth's `studio/` web app (90% of its wheel) and bitsandbytes' libraries for other CUDA/ROCm versions.
# pyarrow and pandas (through datasets, which unsloth_zoo imports) are most of the size: if the GPU image
# already has them, build with NO_ARROW=1.
set -euo pipefail
out=${1:-.unsloth}
site=$(mktemp -d)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux_2_24_x86_64)
packages=(unsloth==2026.10.9 unsloth_zoo==2026.10.9 transformers==5.17.0 "huggingface_hub>=1.5,<2" trl==0.24.0
          xformers==0.0.35 bitsandbytes==0.50.2 peft==0.21.2 accelerate tyro docstring_parser typeguard shtab
          "datasets==4.3.0" dill multiprocess xxhash fsspec diffusers torchao cut_cross_entropy msgspec
          hf_transfer structlog json5 typer nest_asyncio sentencepiece protobuf rich markdown-it-py mdurl
          pygments click shellingham psutil pydantic pydantic_core annotated_types typing_inspection)
[ "${NO_ARROW:-0}" = 1 ] || packages+=(pyarrow pandas python-dateutil pytz tzdata six)
pip install -q --target "$site" --python-version 3.12 "${platforms[@]}" --only-binary=:all: --no-deps "${packages[@]}"
rm -rf "$site"/studio "$site"/unsloth_cli
find "$site" -name __pycache__ -prune -exec rm -rf {} +
find "$site"/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda130.so' ! -name '*cpu.so' -delete
rm -f "$site"/pyarrow/libarrow_flight.so* "$site"/pyarrow/libarrow_s3.so*
mkdir -p "$out"
tar -cJf "$out/site.tar.xz" -C "$site" .
rm -rf "$site"
ls -la "$out/site.tar.xz"
