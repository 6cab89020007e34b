#!/usr/bin/env bash
# The README's Fashion-MNIST result: MHD against isolated training, 16 clients, label skew
# 0.9, complete graph, 3 aux heads (configs/fashion_mnist.toml), then the comparison table.
#   scripts/fashion_mnist_result.sh [OUT] [extra run flags, e.g. --device cuda --data-dir D]
# OUT defaults to runs/fashion_mnist; OUT/result.md holds the table. Exits 1 when the result
# misses its claim (best aux head >= isolated + 15 points shared, head 0 private within 2).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/fashion_mnist}"
shift || true
for method in mhd isolated; do
    python -m mhd_fast run --config configs/fashion_mnist.toml --method "$method" \
        --name "fashion_mnist-$method" --out "$out/$method" "$@"
done
python scripts/compare_runs.py "$out/mhd/metrics.json" "$out/isolated/metrics.json" \
    --out "$out/result.md"
