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
#include <cmath>
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

// Stream-ordered device memory of `count` values of T, freed on the stream when the owner goes out of scope, also
// when a check throws between the allocation and the end of the call.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer(int64_t count, cudaStream_t stream, const char* what) : stream_(stream) {
    check(cudaMallocAsync(reinterpret_cast<void**>(&data_), sizeof(T) * static_cast<std::size_t>(count), stream), what);
  }
  ~DeviceBuffer() { cudaFreeAsync(data_, stream_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return data_; }

 private:
  T* data_ = nullptr;
  cudaStream_t stream_;
};

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
  const T* W = net.W_of(e);
  const T* b = net.b_of(e);
  const T* a = net.a_of(e);
  const T* X = net.X_of(e) + s0 * d;
  for (int64_t idx = threadIdx.x; idx < ns * m; idx += blockDim.x) {
    const int64_t s = idx / m, i = idx % m;
    T acc = T(0);
    for (int64_t c = 0; c < d; ++c) acc += W[i * d + c] * X[s * d + c];
    H[idx] = activation(net.activation, net.input_scale * acc + (b ? b[i] : T(0))).s;
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
__global__ void fused_kernel(Net<T> net, Targets<T> targets, Params<T, const T*> v, T* ws, int64_t TS) {
  extern __shared__ unsigned char smem_raw[];
  const Tile<T, mode> tile{net, targets, v, blockIdx.y, TS, reinterpret_cast<T*>(smem_raw),
                           ws + (int64_t(blockIdx.y) * gridDim.x + blockIdx.x) * (net.params() + 1)};
  const int64_t ntiles = (net.n + TS - 1) / TS;
  for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x) {
    for (int phase = 0; phase < kPhases; ++phase) {
      tile.run_phase(phase, t, t == blockIdx.x, threadIdx.x, blockDim.x);
      __syncthreads();
    }
  }
}

template <class T>
__global__ void reduce_kernel(Net<T> net, Targets<T> targets, const T* ws, int64_t chunks, T* loss, Params<T> out) {
  const int64_t total = net.E * (net.params() + 1);
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x)
    reduce_element(net, targets, ws, chunks, loss, out, t);
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
void run_fused(const Net<T>& net, const Targets<T>& targets, const Params<T, const T*>& v, T* loss,
               const Params<T>& out, cudaStream_t stream) {
  validate(net);
  PHYSAI_REQUIRE(targets.Y != nullptr, "Y: the loss needs targets, got none");
  const int64_t TS = tile_size(net, mode), P = net.params();
  const int64_t ntiles = (net.n + TS - 1) / TS, chunks = std::min<int64_t>(ntiles, kMaxChunks);
  const DeviceBuffer<T> ws(net.E * chunks * (P + 1), stream, "workspace");
  fused_kernel<T, mode><<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(net.E)), kThreads, kSharedBytes,
                          stream>>>(net, targets, v, ws.get(), TS);
  check(cudaGetLastError(), "fused two-layer kernel launch");
  reduce_kernel<T><<<grid_1d(net.E * (P + 1)), kThreads, 0, stream>>>(net, targets, ws.get(), chunks, loss, out);
  check(cudaGetLastError(), "reduction kernel launch");
}

// The sum of each thread's `value` over a block of kThreads threads, by a fixed-order tree in shared memory (the
// same bits on every run); thread 0 gets it.
template <class T>
__device__ T block_sum(T value) {
  __shared__ T part[kThreads];
  part[threadIdx.x] = value;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
    __syncthreads();
  }
  return part[0];
}

// Per-member dot products of two [E, P] buffers; one block per member.
template <class T>
__global__ void dot_kernel(const T* x, const T* y, int64_t P, T* out) {
  const int64_t e = blockIdx.x;
  T acc = T(0);
  for (int64_t p = threadIdx.x; p < P; p += blockDim.x) acc += x[e * P + p] * y[e * P + p];
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[e] = acc;
}

// Per-member squared residual sum_p (hv - theta v)^2 with theta = values[e]; one block per member.
template <class T>
__global__ void residual_kernel(const T* v, const T* hv, const T* values, int64_t P, T* out) {
  const int64_t e = blockIdx.x;
  const T theta = values[e];
  T acc = T(0);
  for (int64_t p = threadIdx.x; p < P; p += blockDim.x) {
    const T r = hv[e * P + p] - theta * v[e * P + p];
    acc += r * r;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[e] = acc;
}

// v[e] = hv[e] * scale[e] for the members with scale[e] != 0 (the others have stopped: their v stays).
template <class T>
__global__ void scale_kernel(T* v, const T* hv, const T* scale, int64_t E, int64_t P) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < E * P; t += int64_t(gridDim.x) * blockDim.x) {
    const T s = scale[t / P];
    if (s != T(0)) v[t] = hv[t] * s;
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
void loss_and_grad(const Net<T>& net, const Targets<T>& targets, T* loss, const Params<T>& grad, std::uintptr_t stream) {
  run_fused<T, Mode::grad>(net, targets, Params<T, const T*>{}, loss, grad, reinterpret_cast<cudaStream_t>(stream));
}

template <class T>
void hvp(const Net<T>& net, const Targets<T>& targets, const Params<T, const T*>& v, const Params<T>& out,
         std::uintptr_t stream) {
  run_fused<T, Mode::hvp>(net, targets, v, nullptr, out, reinterpret_cast<cudaStream_t>(stream));
}

template <class T>
void power_iteration(const Net<T>& net, const Targets<T>& targets, T* v, T* values, int64_t max_matvecs, double tol,
                     int64_t* matvecs, uint8_t* converged, std::uintptr_t stream_handle) {
  validate(net);
  PHYSAI_REQUIRE(max_matvecs >= 1, "max_matvecs: expected >= 1, got ", max_matvecs);
  PHYSAI_REQUIRE(tol > 0, "tol: expected > 0, got ", tol);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t E = net.E, P = net.params(), nW = net.m * net.d, nb = net.b ? net.m : 0;
  const DeviceBuffer<T> hv(E * P, stream, "power iteration buffer"), sums(2 * E, stream, "power iteration buffer"),
      scale(E, stream, "power iteration buffer");
  T *squares = sums.get(), *residuals = sums.get() + E;
  const Params<T, const T*> vin{v, nb ? v + nW : nullptr, v + nW + nb, P, P, P};
  const Params<T> hout{hv.get(), nb ? hv.get() + nW : nullptr, hv.get() + nW + nb, P, P, P};
  std::vector<T> host(3 * E), factor(E);  // ||v||^2 (then ||hv||^2), theta, residual^2 per member
  std::vector<uint8_t> done(E, 0);
  // Start from v normalized: v = v / ||v||.
  dot_kernel<T><<<static_cast<unsigned>(E), kThreads, 0, stream>>>(v, v, P, squares);
  check(cudaMemcpyAsync(host.data(), squares, sizeof(T) * E, cudaMemcpyDeviceToHost, stream), "copy norms");
  check(cudaStreamSynchronize(stream), "power iteration start");
  for (int64_t e = 0; e < E; ++e) {
    PHYSAI_REQUIRE(std::isfinite(double(host[e])) && host[e] > T(0),
                   "v: expected a finite nonzero start vector for member ", e);
    factor[e] = T(1) / std::sqrt(host[e]);
    matvecs[e] = 0;
    converged[e] = 0;
  }
  check(cudaMemcpyAsync(scale.get(), factor.data(), sizeof(T) * E, cudaMemcpyHostToDevice, stream), "copy scales");
  scale_kernel<T><<<grid_1d(E * P), kThreads, 0, stream>>>(v, v, scale.get(), E, P);
  for (int64_t active = E; active > 0;) {
    hvp(net, targets, vin, hout, stream_handle);
    dot_kernel<T><<<static_cast<unsigned>(E), kThreads, 0, stream>>>(v, hv.get(), P, values);
    dot_kernel<T><<<static_cast<unsigned>(E), kThreads, 0, stream>>>(hv.get(), hv.get(), P, squares);
    residual_kernel<T><<<static_cast<unsigned>(E), kThreads, 0, stream>>>(v, hv.get(), values, P, residuals);
    check(cudaGetLastError(), "power iteration kernels");
    check(cudaMemcpyAsync(host.data(), squares, sizeof(T) * E, cudaMemcpyDeviceToHost, stream), "copy norms");
    check(cudaMemcpyAsync(host.data() + E, values, sizeof(T) * E, cudaMemcpyDeviceToHost, stream), "copy values");
    check(cudaMemcpyAsync(host.data() + 2 * E, residuals, sizeof(T) * E, cudaMemcpyDeviceToHost, stream),
          "copy residuals");
    check(cudaStreamSynchronize(stream), "power iteration");
    for (int64_t e = 0; e < E; ++e) {
      factor[e] = T(0);
      if (done[e]) continue;
      ++matvecs[e];
      const double ny2 = host[e], theta = host[E + e], res2 = host[2 * E + e];
      PHYSAI_REQUIRE(std::isfinite(ny2) && std::isfinite(res2),
                     "power_iteration: the Hessian-vector product is not finite for member ", e);
      const bool ok = std::sqrt(res2) <= tol * std::abs(theta) || ny2 == 0.0;
      if (ok || matvecs[e] >= max_matvecs) {
        converged[e] = ok;
        done[e] = 1;
        --active;
      } else {
        factor[e] = T(1 / std::sqrt(ny2));
      }
    }
    if (active == 0) break;
    check(cudaMemcpyAsync(scale.get(), factor.data(), sizeof(T) * E, cudaMemcpyHostToDevice, stream), "copy scales");
    scale_kernel<T><<<grid_1d(E * P), kThreads, 0, stream>>>(v, hv.get(), scale.get(), E, P);
    check(cudaGetLastError(), "power iteration kernels");
  }
  // values[e] already holds each member's last Rayleigh quotient, of the v it keeps.
  check(cudaStreamSynchronize(stream), "power iteration");
}

int device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    cudaGetLastError();  // clear the sticky error: no driver or no device is a machine without a GPU, not a fault
    return 0;
  }
  check(err, "counting devices");  // any other failure is a broken install, which must not read as "no GPU"
  return count;
}

int runtime_version() { return CUDART_VERSION; }

// Variadic: with several architectures the list expands to several comma-separated tokens ("800,900").
#define PHYSAI_STRINGIFY2(...) #__VA_ARGS__
#define PHYSAI_STRINGIFY(...) PHYSAI_STRINGIFY2(__VA_ARGS__)
const char* architectures() { return PHYSAI_STRINGIFY(__CUDA_ARCH_LIST__); }

#define PHYSAI_INSTANTIATE(T)                                                                                  \
  template void forward<T>(const Net<T>&, T*, std::uintptr_t);                                                 \
  template void loss_and_grad<T>(const Net<T>&, const Targets<T>&, T*, const Params<T>&, std::uintptr_t);      \
  template void hvp<T>(const Net<T>&, const Targets<T>&, const Params<T, const T*>&, const Params<T>&,          \
                       std::uintptr_t);                                                                        \
  template void power_iteration<T>(const Net<T>&, const Targets<T>&, T*, T*, int64_t, double, int64_t*, uint8_t*, \
                                   std::uintptr_t);
PHYSAI_INSTANTIATE(float)
PHYSAI_INSTANTIATE(double)

}  // namespace physai::cuda
