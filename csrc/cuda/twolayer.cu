// Fully fused two-layer network kernels for small widths: forward, loss + gradient, and the Hessian-vector
// product (Pearlmutter's R-operator: forward-mode derivative of the backward pass), for an ensemble at once.
// A block owns one (member, chunk of tiles); for each tile of TS samples the hidden layer stays in shared
// memory from the pre-activation to the weight-gradient products. Weight gradients are deterministic: each
// block accumulates its tiles, in order, into its own workspace row (no atomics), and a second kernel sums the
// rows of a member in a fixed order. The CPU sibling (csrc/twolayer) cuts the batch into tiles run by OpenMP
// threads around BLAS GEMMs; here there is no BLAS, so this path is meant for m <= 128 (larger m works, with
// a smaller tile, but is not tuned: there is no tiled-GEMM path yet).
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/errors.hpp"
#include "cuda/twolayer.hpp"
#include "cuda/twolayer_fused.cuh"

namespace physai::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxChunks = 64;                // workspace rows per member
constexpr std::size_t kSharedBytes = 40 * 1024;  // under the 48 KiB default: no opt-in attribute needed

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("physai CUDA: ") + what + ": " + cudaGetErrorString(err));
}

template <class T>
int64_t tile_size(const Net<T>& net, Mode mode) {
  const int64_t per = shared_per_sample(net, mode);
  const int64_t ts = static_cast<int64_t>(kSharedBytes / sizeof(T)) / per;
  PHYSAI_REQUIRE(ts >= 1, "width m=", net.m, " and outputs k=", net.k, " are too large for the fused CUDA kernel");
  return std::min<int64_t>(ts, 32);
}

template <class T>
__global__ void forward_kernel(Net<T> net, T* out, int64_t TS) {
  extern __shared__ unsigned char smem_raw[];
  T* H = reinterpret_cast<T*>(smem_raw);  // [TS, m]
  const int64_t e = blockIdx.y, s0 = blockIdx.x * TS;
  const int64_t ns = imin(TS, net.n - s0), m = net.m, d = net.d, k = net.k;
  const T* W = net.W + e * net.sW;
  const T* b = net.b ? net.b + e * net.sb : nullptr;
  const T* a = net.a + e * net.sa;
  const T* X = net.X + e * net.sX + s0 * d;
  for (int64_t idx = threadIdx.x; idx < ns * m; idx += blockDim.x) {
    const int64_t s = idx / m, i = idx % m;
    T acc = T(0);
    for (int64_t c = 0; c < d; ++c) acc += W[i * d + c] * X[s * d + c];
    H[idx] = activation(net.act, net.input_scale * acc + (b ? b[i] : T(0))).s;
  }
  __syncthreads();
  for (int64_t idx = threadIdx.x; idx < ns * k; idx += blockDim.x) {
    const int64_t s = idx / k, j = idx % k;
    T acc = T(0);
    for (int64_t i = 0; i < m; ++i) acc += a[j * m + i] * H[s * m + i];
    out[(e * net.n + s0 + s) * k + j] = net.output_scale * acc;
  }
}

// ws row layout: [P parameter partials, 1 loss partial]. Block (c, e) handles tiles c, c + gridDim.x, ... of member e; its workspace row is (e, c).
template <class T, Mode mode>
__global__ void fused_kernel(Net<T> net, Params<T, const T*> v, T* ws, int64_t TS) {
  extern __shared__ unsigned char smem_raw[];
  const Tile<T, mode> tile{net, v, blockIdx.y, TS, reinterpret_cast<T*>(smem_raw),
                           ws + (int64_t(blockIdx.y) * gridDim.x + blockIdx.x) * (num_params(net) + 1)};
  const int64_t ntiles = (net.n + TS - 1) / TS;
  for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x) {
    for (int phase = 0; phase < kPhases; ++phase) {
      tile.run_phase(phase, t, t == blockIdx.x, threadIdx.x, blockDim.x);
      __syncthreads();
    }
  }
}

template <class T>
__global__ void reduce_kernel(Net<T> net, const T* ws, int64_t chunks, T* loss, Params<T> out) {
  const int64_t total = net.E * (num_params(net) + 1);
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x)
    reduce_element(net, ws, chunks, loss, out, t);
}

template <class T>
void validate(const Net<T>& net) {
  PHYSAI_REQUIRE(net.E >= 1 && net.n >= 1 && net.d >= 1 && net.m >= 1 && net.k >= 1,
                 "sizes must be positive, got E=", net.E, " n=", net.n, " d=", net.d, " m=", net.m, " k=", net.k);
  PHYSAI_REQUIRE(net.E <= 65535, "ensemble size E must be <= 65535, got ", net.E);
}

int grid_1d(int64_t total) { return static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535)); }

// Runs the fused kernel in `mode` and the reduction; loss may be null (hvp).
template <class T, Mode mode>
void run_fused(const Net<T>& net, const Params<T, const T*>& v, T* loss, const Params<T>& out, cudaStream_t stream) {
  validate(net);
  const int64_t TS = tile_size(net, mode), P = num_params(net);
  const int64_t ntiles = (net.n + TS - 1) / TS, chunks = std::min<int64_t>(ntiles, kMaxChunks);
  const std::size_t smem = kSharedBytes;
  T* ws = nullptr;
  check(cudaMallocAsync(reinterpret_cast<void**>(&ws), sizeof(T) * net.E * chunks * (P + 1), stream), "workspace");
  fused_kernel<T, mode><<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(net.E)), kThreads, smem, stream>>>(
      net, v, ws, TS);
  check(cudaGetLastError(), "fused two-layer kernel launch");
  reduce_kernel<T><<<grid_1d(net.E * (P + 1)), kThreads, 0, stream>>>(net, ws, chunks, loss, out);
  check(cudaGetLastError(), "reduction kernel launch");
  check(cudaFreeAsync(ws, stream), "workspace free");
}

// Per-member dot products of two [E, P] buffers; one block per member, fixed-order tree reduction.
template <class T>
__global__ void dot_kernel(const T* x, const T* y, int64_t P, T* out) {
  __shared__ T part[kThreads];
  const int64_t e = blockIdx.x;
  T acc = T(0);
  for (int64_t p = threadIdx.x; p < P; p += blockDim.x) acc += x[e * P + p] * y[e * P + p];
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[e] = part[0];
}

// v = hv / ||hv|| per member (left unchanged where ||hv|| = 0).
template <class T>
__global__ void normalize_kernel(T* v, const T* hv, const T* sq, int64_t E, int64_t P) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < E * P; t += int64_t(gridDim.x) * blockDim.x) {
    const T nrm = sqrt(sq[t / P]);
    if (nrm > T(0)) v[t] = hv[t] / nrm;
  }
}

}  // namespace

template <class T>
void forward(const Net<T>& net, T* f, std::uintptr_t stream_handle) {
  validate(net);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t ts = std::min<int64_t>(static_cast<int64_t>(kSharedBytes / sizeof(T)) / net.m, 32);
  PHYSAI_REQUIRE(ts >= 1, "width m=", net.m, " is too large for the fused CUDA kernel");
  const int64_t ntiles = (net.n + ts - 1) / ts;
  PHYSAI_REQUIRE(ntiles <= 2147483647, "too many samples n=", net.n);
  forward_kernel<T><<<dim3(static_cast<unsigned>(ntiles), static_cast<unsigned>(net.E)), kThreads, kSharedBytes, stream>>>(
      net, f, ts);
  check(cudaGetLastError(), "forward kernel launch");
}

template <class T>
void loss_and_grad(const Net<T>& net, T* loss, const Params<T>& grad, std::uintptr_t stream) {
  run_fused<T, Mode::grad>(net, Params<T, const T*>{}, loss, grad, reinterpret_cast<cudaStream_t>(stream));
}

template <class T>
void hvp(const Net<T>& net, const Params<T, const T*>& v, const Params<T>& out, std::uintptr_t stream) {
  run_fused<T, Mode::hvp>(net, v, nullptr, out, reinterpret_cast<cudaStream_t>(stream));
}

template <class T>
int power_iteration(const Net<T>& net, T* v, T* eig, int iters, double tol, std::uintptr_t stream_handle) {
  validate(net);
  PHYSAI_REQUIRE(iters >= 1, "iters must be >= 1, got ", iters);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t E = net.E, P = num_params(net), nW = net.m * net.d, nb = net.b ? net.m : 0;
  T *hv = nullptr, *sq = nullptr;
  check(cudaMallocAsync(reinterpret_cast<void**>(&hv), sizeof(T) * E * P, stream), "power iteration buffer");
  check(cudaMallocAsync(reinterpret_cast<void**>(&sq), sizeof(T) * E, stream), "power iteration buffer");
  const Params<T, const T*> vin{v, nb ? v + nW : nullptr, v + nW + nb, P, P, P};
  const Params<T> hout{hv, nb ? hv + nW : nullptr, hv + nW + nb, P, P, P};
  std::vector<T> prev(E), cur(E);
  int step = 0;
  bool converged = false;
  // Start from v normalized: "normalize hv into v" with hv = v.
  check(cudaMemcpyAsync(hv, v, sizeof(T) * E * P, cudaMemcpyDeviceToDevice, stream), "copy");
  dot_kernel<T><<<static_cast<unsigned>(E), kThreads, 0, stream>>>(hv, hv, P, sq);
  normalize_kernel<T><<<grid_1d(E * P), kThreads, 0, stream>>>(v, hv, sq, E, P);
  while (step < iters && !converged) {
    hvp(net, vin, hout, stream_handle);
    dot_kernel<T><<<static_cast<unsigned>(E), kThreads, 0, stream>>>(v, hv, P, eig);
    dot_kernel<T><<<static_cast<unsigned>(E), kThreads, 0, stream>>>(hv, hv, P, sq);
    normalize_kernel<T><<<grid_1d(E * P), kThreads, 0, stream>>>(v, hv, sq, E, P);
    check(cudaGetLastError(), "power iteration kernels");
    check(cudaMemcpyAsync(cur.data(), eig, sizeof(T) * E, cudaMemcpyDeviceToHost, stream), "copy eigenvalues");
    check(cudaStreamSynchronize(stream), "power iteration");
    ++step;
    if (step > 1) {
      converged = true;
      for (int64_t e = 0; e < E; ++e)
        if (std::abs(cur[e] - prev[e]) > tol * std::abs(cur[e])) converged = false;
    }
    prev.swap(cur);
  }
  check(cudaFreeAsync(hv, stream), "free");
  check(cudaFreeAsync(sq, stream), "free");
  return step;
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

int runtime_version() { return CUDART_VERSION; }

#define PHYSAI_STRINGIFY2(x) #x
#define PHYSAI_STRINGIFY(x) PHYSAI_STRINGIFY2(x)
const char* architectures() { return PHYSAI_STRINGIFY(__CUDA_ARCH_LIST__); }

#define PHYSAI_INSTANTIATE(T)                                                                            \
  template void forward<T>(const Net<T>&, T*, std::uintptr_t);                                           \
  template void loss_and_grad<T>(const Net<T>&, T*, const Params<T>&, std::uintptr_t);                   \
  template void hvp<T>(const Net<T>&, const Params<T, const T*>&, const Params<T>&, std::uintptr_t);     \
  template int power_iteration<T>(const Net<T>&, T*, T*, int, double, std::uintptr_t);
PHYSAI_INSTANTIATE(float)
PHYSAI_INSTANTIATE(double)

}  // namespace physai::cuda
