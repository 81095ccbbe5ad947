#!/usr/bin/env bash
# Regenerate the protobuf/gRPC Python modules (+ .pyi stubs) from proto/.
#
#   scripts/gen_proto.sh [OUT_DIR]      (default: mmsvc/proto_gen)
#
# Output lands in OUT_DIR/mmsvc/v1/*_pb2*.py(i); imports are rewritten so that the modules
# import as mmsvc.proto_gen.mmsvc.v1.<name>.  Uses $PYTHON (default: python) with grpcio-tools
# and mypy-protobuf installed (pip install -e '.[dev]').
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
OUT="${1:-$ROOT/mmsvc/proto_gen}"
BIN_DIR="$("$PYTHON" -c 'import os, sys; print(os.path.dirname(sys.executable))')"

mkdir -p "$OUT"
rm -rf "$OUT/mmsvc"
mkdir -p "$OUT/mmsvc/v1"

cd "$ROOT"
mapfile -t PROTOS < <(find proto -name '*.proto' | LC_ALL=C sort)
"$PYTHON" -m grpc_tools.protoc \
  -I proto \
  --plugin=protoc-gen-mypy="$BIN_DIR/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$BIN_DIR/protoc-gen-mypy_grpc" \
  --python_out="$OUT" \
  --grpc_python_out="$OUT" \
  --mypy_out="$OUT" \
  --mypy_grpc_out="$OUT" \
  "${PROTOS[@]#proto/}"

"$PYTHON" "$ROOT/scripts/fix_proto_imports.py" "$OUT"
