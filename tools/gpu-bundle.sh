#!/usr/bin/env bash
# What an offline GPU machine needs beyond its own PyTorch/Triton/numba stack to run this project's GPU
# checks (`tools/gpu-check.sh`): wheels of the packages `vmddpm` imports that such machines usually lack
# (pydantic for the typed config; diffusers, nibabel, torch-fidelity, clean-fid, filelock for the
# stages), and mamba-ssm's source with its CUDA targets cut to sm_90 (H100/H200) so that it builds in
# about two minutes. Run here, in the repository root, with package access; carry `.device/` along.
#   tools/gpu-bundle.sh            -> .device/{whl,mamba,env.sh}
# On the GPU machine, in the repository root:  source .device/env.sh && tools/gpu-check.sh
# Wheels are for CPython 3.12 on manylinux x86_64 (PYVER=3.11 etc. to change); versions come from
# constraints.txt, the project's one pin file.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
rm -rf .device && mkdir -p .device/whl .device/sdist
pin() { grep -i "^$1==" constraints.txt | head -1; }
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
for name in pydantic pydantic_core annotated-types typing-inspection typing_extensions diffusers \
    importlib_metadata nibabel torch_fidelity clean-fid filelock; do
  spec=$(pin "$name")
  [ -n "$spec" ] || { echo "gpu-bundle: no pin for $name in constraints.txt" >&2; exit 1; }
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    $plat -d .device/whl "$spec" 2>&1 | grep -v '^WARNING' || true
  norm=$(echo "$name" | tr 'A-Z-' 'a-z_')
  ls .device/whl | tr "A-Z-" "a-z_" | grep -q "^${norm}_[0-9]" || { echo "gpu-bundle: no wheel for $spec" >&2; exit 1; }
done
spec=$(pin mamba-ssm); spec=${spec:-mamba-ssm==2.3.2.post1}
MAMBA_SKIP_CUDA_BUILD=TRUE "$PY" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation \
  -d .device/sdist "$spec" 2>&1 | grep -v '^WARNING' || true
mkdir -p .device/mamba && tar xzf .device/sdist/*.tar.gz -C .device/mamba --strip-components=1 && rm -rf .device/sdist
"$PY" - <<'PYEOF'
from pathlib import Path
p = Path(".device/mamba/setup.py"); s = p.read_text()
anchor = "    # HACK: The compiler flag"
assert anchor in s, "mamba-ssm setup.py changed: find where cc_flag is final and cut it to sm_90 by hand"
s = s.replace(anchor, '    if not HIP_BUILD:\n        cc_flag = ["-gencode", "arch=compute_90,code=sm_90"]\n\n' + anchor, 1)
p.write_text(s)
# only the selective-scan entry point: the full package imports Mamba2/3 modules that need more deps
Path(".device/mamba/mamba_ssm/__init__.py").write_text(
    '__version__ = "device-build"\nfrom mamba_ssm.ops.selective_scan_interface import selective_scan_fn\n')
PYEOF
cat > .device/env.sh <<'SH'
# source me on the GPU machine from the repository root
D=$PWD/.device
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $D/whl/*.whl
if ! ls /tmp/mamba-build/selective_scan_cuda*.so >/dev/null 2>&1; then
  rm -rf /tmp/mamba-build && cp -r $D/mamba /tmp/mamba-build
  (cd /tmp/mamba-build && MAMBA_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-12} python3 setup.py build_ext --inplace > /tmp/mamba-build.log 2>&1) \
    || { echo "mamba-ssm build failed: tail /tmp/mamba-build.log"; tail -20 /tmp/mamba-build.log; }
fi
export PYTHONPATH=/tmp/site:$PWD:/tmp/mamba-build${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch, pydantic, mamba_ssm; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'mamba-ssm ok')"
SH
du -sh .device; ls .device/whl
