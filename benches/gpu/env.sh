# Sourced by the GPU-machine scripts: the bundle's folder, the output folder ($OUT, default ./gpu-out),
# the CUDA libraries on the library path, and a kernel cache inside the output folder.
bundle="$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)"
out="${OUT:-$PWD/gpu-out}"
mkdir -p "$out"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export SGDM_CACHE_DIR="$out/kernel-cache"
