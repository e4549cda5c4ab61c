#!/usr/bin/env bash
# Regenerate the contract's protobuf / gRPC code from proto/*.proto into OUT (default: the
# package's pb/). tests/test_contract.py runs this into a temp dir and compares.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
proto="$here/../../proto"
out="${1:-$here/ecoserve_common/pb}"
python="${PYTHON:-python3}"
"$python" -m grpc_tools.protoc -I"$proto" --python_out="$out" --pyi_out="$out" \
	--grpc_python_out="$out" "$proto"/worker.proto "$proto"/predictor.proto "$proto"/scheduler.proto
rm -f "$out/worker_pb2_grpc.py"  # the worker plane is ZeroMQ, not gRPC
# Generated gRPC modules import their messages as top-level modules; make them package-relative.
sed -i 's/^import \(.*\)_pb2 as/from . import \1_pb2 as/' "$out"/*_pb2_grpc.py
