// Host-side interface of the CUDA two-layer kernels (plain C++: included by the pybind11 bindings, which are
// compiled without nvcc). Pointers are device pointers; `stream` is a cudaStream_t passed as an integer.
#pragma once
#include <cstdint>

#include "cuda/twolayer_math.cuh"

namespace physai::cuda {

// One ensemble of two-layer networks f = output_scale * a sigma(input_scale * W x + b).
// Each parameter pointer addresses member 0; member e starts `stride` elements further, so the same kernels
// serve separate tensors (W: stride m*d) and one flattened [E, P] buffer (stride P, as power iteration uses).
template <class T>
struct Net {
  int64_t E = 0, n = 0, d = 0, m = 0, k = 0;
  const T* W = nullptr;
  const T* b = nullptr;  // nullptr: no bias
  const T* a = nullptr;
  int64_t sW = 0, sb = 0, sa = 0;
  const T* X = nullptr;
  int64_t sX = 0;  // 0: X shared by all members, n*d: per member
  const T* Y = nullptr;
  int64_t sY = 0;
  T input_scale = T(1), output_scale = T(1);
  Activation act = Activation::Relu;
  Loss loss = Loss::Mse;
};

// A per-member parameter-shaped output or direction: pointers to the W, b, a parts and their member strides.
template <class T, class P = T*>
struct Params {
  P W = nullptr, b = nullptr, a = nullptr;
  int64_t sW = 0, sb = 0, sa = 0;
};

// f [E, n, k].
template <class T>
void forward(const Net<T>& net, T* f, std::uintptr_t stream);

// loss [E]; gradients of the mean loss written to grad.
template <class T>
void loss_and_grad(const Net<T>& net, T* loss, const Params<T>& grad, std::uintptr_t stream);

// Hessian of the mean loss applied to direction v, written to out.
template <class T>
void hvp(const Net<T>& net, const Params<T, const T*>& v, const Params<T>& out, std::uintptr_t stream);

// Power iteration on the HVP, per member. v [E, P] (P = m d + m (if bias) + k m) holds the start vector and
// receives the final normalized iterate; eig [E] (device) the Rayleigh quotients. Stops after `iters` steps or
// when every member's estimate moved by at most tol * |estimate|. Returns the number of steps taken.
template <class T>
int power_iteration(const Net<T>& net, T* v, T* eig, int iters, double tol, std::uintptr_t stream);

int device_count();
int runtime_version();        // CUDART_VERSION this module was built against, e.g. 13000
const char* architectures();  // the compute capabilities compiled, e.g. "900"

}  // namespace physai::cuda
