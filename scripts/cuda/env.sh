# shellcheck shell=bash
# Source this file to get a CUDA 13.0 build environment on a machine without CUDA (or a GPU):
#   source scripts/cuda/env.sh
# It installs nvcc and the link-time CUDA libraries from PyPI into a venv (pinned 13.0.x
# versions; once, seconds when cached), adds the unversioned library links the linker needs and a
# driver stub for `-lcuda`, and exports PATH, CUDA_HOME, CUDA_COMPUTE_CAP and MEDLEY_CUDA_LIB.
# Facts behind every step: shared/docs/dependencies.md §3.
#
#   MEDLEY_CUDA_ENV   the venv (default: <target dir>/medley-cuda-env)
#   CUDA_COMPUTE_CAP  GPU architecture of the kernels (default 90: H100/H200; 80: A100)

_medley_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
_medley_target="${CARGO_TARGET_DIR:-$_medley_root/target}"
MEDLEY_CUDA_ENV="${MEDLEY_CUDA_ENV:-$_medley_target/medley-cuda-env}"

# nvvm must be pinned with nvcc: a newer cicc emits PTX the 13.0 ptxas rejects. 13.0 is what the
# GPU machines' driver (580) runs; PTX from a newer toolkit would not load there.
_medley_wheels=(
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88 nvidia-nccl-cu13==2.27.7
)

_medley_cuda_setup() {
  if [ ! -x "$MEDLEY_CUDA_ENV/bin/python" ]; then
    python3 -m venv "$MEDLEY_CUDA_ENV" || return 1
  fi
  local stamp="$MEDLEY_CUDA_ENV/.medley-wheels"
  if [ "$(cat "$stamp" 2>/dev/null)" != "${_medley_wheels[*]}" ]; then
    "$MEDLEY_CUDA_ENV/bin/pip" install --quiet --disable-pip-version-check "${_medley_wheels[@]}" \
      || return 1
    echo "${_medley_wheels[*]}" >"$stamp"
  fi
  local cu
  cu="$("$MEDLEY_CUDA_ENV/bin/python" -c \
    'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')" || return 1
  [ -x "$cu/bin/nvcc" ] || { echo "cuda env: no nvcc under $cu" >&2; return 1; }
  # The wheels ship only versioned names (libcublas.so.13); `-lcublas` needs libcublas.so.
  local lib
  for lib in cublas cublasLt curand nvrtc cudart; do
    local real
    real="$(cd "$cu/lib" && ls "lib$lib.so."* 2>/dev/null | sort | head -n1)"
    [ -n "$real" ] || { echo "cuda env: no lib$lib.so.* in $cu/lib" >&2; return 1; }
    ln -sfn "$real" "$cu/lib/lib$lib.so"
  done
  # NCCL (the oldest cu13 release, so the binary uses nothing newer than the GPU machines'
  # torch ships) lives in its own wheel folder: link it into the same one, as libnccl.so for
  # the linker and libnccl.so.2 for the loader.
  local nccl
  nccl="$(ls "$cu"/../nccl/lib/libnccl.so.2 2>/dev/null | head -n1)"
  [ -n "$nccl" ] || { echo "cuda env: no libnccl.so.2 in the nvidia-nccl-cu13 wheel" >&2; return 1; }
  ln -sfn "$nccl" "$cu/lib/libnccl.so.2"
  ln -sfn libnccl.so.2 "$cu/lib/libnccl.so"
  # A libcuda stub for linking: every driver function cudarc declares, each returning
  # CUDA_ERROR_NO_DEVICE (100). At run time the driver's libcuda.so.1 is used instead; the stub
  # is exposed as libcuda.so.1 (folder `stub-runtime`) only to the tests that check the no-GPU
  # error. cudarc's build script adds $CUDA_HOME/lib/stubs to the link path if it exists.
  mkdir -p "$cu/lib/stubs" "$cu/lib/stub-runtime"
  if [ ! -e "$cu/lib/stubs/libcuda.so" ]; then
    "$_medley_root/scripts/cuda/libcuda-stub.sh" "$cu/lib/stubs/libcuda.so" || return 1
  fi
  ln -sfn ../stubs/libcuda.so "$cu/lib/stub-runtime/libcuda.so.1"
  export CUDA_HOME="$cu"
  export PATH="$cu/bin:$PATH"
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  export MEDLEY_CUDA_LIB="$cu/lib"
}

_medley_cuda_setup || { echo "cuda env: setup failed" >&2; return 1 2>/dev/null || exit 1; }
unset -f _medley_cuda_setup
