#!/usr/bin/env bash
# Installs TRL (the peer of the DPO and GRPO benchmarks, tools/trl_dpo_peer.py and
# tools/trl_grpo_peer.py) and the few packages it needs that the project's venv lacks into
# tools/.peer-packages, a separate --target directory used through PYTHONPATH: the venv's own
# packages (torch, transformers, datasets, ...) are neither upgraded nor touched.
#
#   tools/install_trl.sh            # install (skipped when already there at these versions)
#   PYTHONPATH=tools/.peer-packages .venv/bin/python tools/trl_dpo_peer.py    # self-check
#   PYTHONPATH=tools/.peer-packages .venv/bin/python tools/trl_grpo_peer.py   # self-check
#
# Versions: TRL 1.16.0 (the newest at the time of writing) works with the venv's torch 2.13
# (CPU), transformers 5.25.0 and datasets 5.2.0; its other requirements (datasets, pandas,
# pyarrow, jinja2, pyyaml, numpy, huggingface_hub, transformers) are already in the venv, so
# only these are added, each with --no-deps so that pip resolves nothing against the venv:
#   accelerate  (TRL and transformers' Trainer need it)
#   psutil      (accelerate and TRL import it)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
TARGET="$HERE/.peer-packages"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
PINS=(trl==1.16.0 accelerate==1.15.0 psutil==7.2.2)

if [ ! -x "$PYTHON" ]; then
    echo "install_trl: no Python at $PYTHON (make setup, or set PYTHON=...)" >&2
    exit 1
fi

installed() {  # true when $TARGET holds the pinned distribution ("name==version")
    local name="${1%%==*}" version="${1##*==}"
    [ -d "$TARGET/${name}-${version}.dist-info" ]
}

missing=()
for pin in "${PINS[@]}"; do
    installed "$pin" || missing+=("$pin")
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install_trl: ${PINS[*]} already in $TARGET"
else
    echo "install_trl: installing ${missing[*]} into $TARGET"
    mkdir -p "$TARGET"
    for pin in "${missing[@]}"; do  # drop another version's files (its dist-info has its name)
        name="${pin%%==*}"
        rm -rf "${TARGET:?}/$name" "$TARGET/$name"-*.dist-info
    done
    # --upgrade lets pip replace an older version of the same package inside $TARGET.
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
        --target "$TARGET" "${missing[@]}"
fi

# Import check against the venv's torch/transformers/datasets (TRL's DPO and GRPO trainers
# and configs).
PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - <<'EOF'
import accelerate
import datasets
import torch
import transformers
import trl
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer  # noqa: F401

print(
    f"install_trl: trl {trl.__version__} (accelerate {accelerate.__version__}) with torch "
    f"{torch.__version__}, transformers {transformers.__version__}, datasets "
    f"{datasets.__version__}: DPOTrainer and GRPOTrainer import"
)
EOF
