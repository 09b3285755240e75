# Builds llama.cpp's llama-server for the e2e suite's `llama.cpp` system (issue 6), offline, from the llama.cpp
# that the llama-cpp-python sdist vendors (PyPI has no llama.cpp wheel with its tools; the package's own Python
# binding cannot place expert tensors on the CPU, which --n-cpu-moe needs).
#   bash scripts/llama_cpp_build.sh SRC DEST     # SRC: the sdist (.tar.gz), a tarball of its vendor/llama.cpp,
#                                                #      or a llama.cpp source folder; DEST: build folder
# Prints the llama-server path last. CUDA (sm_90 by default, CUDA_ARCH to change) when nvcc is on PATH or in
# /usr/local/cuda, else CPU only. Why the flags: no network (no prebuilt web UI, no curl/openssl), only the
# server target, no tests. Fetch the source here with:
#   pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d .whl     (76 MB; the suite tested this)
# and carry a trimmed tarball (docs/ and models/ are 113 MB of the 147 and not needed): see BENCHMARKS.md.
set -euo pipefail
src=${1:?usage: bash scripts/llama_cpp_build.sh SRC DEST}
dest=${2:?usage: bash scripts/llama_cpp_build.sh SRC DEST}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
if [ -f "$src" ]; then
  rm -rf "$dest/src"
  mkdir -p "$dest/src"
  tar -xzf "$src" -C "$dest/src"
  root=$(dirname "$(find "$dest/src" -maxdepth 4 -name convert_hf_to_gguf.py -print -quit)")
else
  root=$(cd "$src" && pwd)
fi
[ -f "$root/CMakeLists.txt" ] || { echo "llama_cpp_build: no llama.cpp source (CMakeLists.txt) under $src" >&2; exit 2; }
nvcc=$(command -v nvcc || true)
[ -n "$nvcc" ] || { [ -x /usr/local/cuda/bin/nvcc ] && nvcc=/usr/local/cuda/bin/nvcc; } || true
cuda=(-DGGML_CUDA=OFF)
if [ -n "$nvcc" ] && [ "${LLAMA_CPU_ONLY:-0}" != 1 ]; then
  cuda=(-DGGML_CUDA=ON "-DCMAKE_CUDA_COMPILER=$nvcc" "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-90}")
fi
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
start=$SECONDS
cmake -S "$root" -B "$dest/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release "${cuda[@]}" \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON >"$dest/configure.log" 2>&1 \
  || { tail -30 "$dest/configure.log" >&2; exit 1; }
cmake --build "$dest/build" --target llama-server -j "$(nproc)" >"$dest/build.log" 2>&1 \
  || { tail -40 "$dest/build.log" >&2; exit 1; }
echo "llama_cpp_build: ${cuda[0]} built in $((SECONDS - start)) s; convert script: $root/convert_hf_to_gguf.py" >&2
ln -sfn "$root" "$dest/source"
find "$dest/build" -name llama-server -type f -perm -u+x -print -quit
